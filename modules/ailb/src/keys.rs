//! Virtual API keys: what clients put in `Authorization: Bearer ...`. Each key has a name (what
//! logs and metrics show), the models it may use, and request-per-minute and token-per-minute
//! limits. Keys are looked up by their SHA-256, so the lookup does not leak a key's prefix
//! through timing and the table holds no key in the clear.
//!
//! Limits are token buckets refilled continuously over a minute. Tokens are only known once the
//! provider answers, so a request is admitted while the token bucket is not empty and is charged
//! its estimated prompt at once ([`Charge`]); the charge is settled to the real usage when the
//! answer is known (refunded if there was none). A large answer may overdraw the bucket, and the
//! next requests wait until it has refilled (as providers' own TPM limits behave).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

pub struct VirtualKey {
    pub name: String,
    digest: [u8; 32],
    /// Model names or aliases; empty for all.
    models: Vec<String>,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "rpm",
            Limit::Tokens => "tpm",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Limit::Requests => "requests-per-minute",
            Limit::Tokens => "tokens-per-minute",
        }
    }
}

/// The longest a client is told to wait, and the deepest a bucket may be overdrawn (an hour of
/// its rate), so no provider's usage figure can push the arithmetic out of range.
const MAX_WAIT: Duration = Duration::from_secs(3600);

struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64) -> Mutex<Bucket> {
        Mutex::new(Bucket {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            at: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    fn take(&mut self, amount: f64) {
        let floor = -self.per_minute * MAX_WAIT.as_secs_f64() / 60.0;
        self.level = (self.level - amount).max(floor);
    }

    /// Time until the level reaches `needed`.
    fn wait_for(&self, needed: f64) -> Duration {
        let missing = (needed - self.level).max(0.0);
        let seconds = missing * 60.0 / self.per_minute.max(1.0);
        Duration::try_from_secs_f64(seconds).map_or(MAX_WAIT, |wait| wait.min(MAX_WAIT))
    }
}

fn lock(bucket: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    // A bucket is three plain numbers; a panic elsewhere cannot leave them torn.
    bucket.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtualKey {
    pub fn new(
        name: &str,
        secret: &str,
        models: Vec<String>,
        rpm: Option<u64>,
        tpm: Option<u64>,
    ) -> Self {
        VirtualKey {
            name: name.to_owned(),
            digest: Sha256::digest(secret.as_bytes()).into(),
            models,
            requests: rpm.map(Bucket::new),
            tokens: tpm.map(Bucket::new),
        }
    }

    /// May this key use `model` (asked for by `asked`, a name or alias)?
    pub fn allows(&self, model: &str, asked: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model || m == asked)
    }

    /// Takes one request, and `estimate` tokens toward its usage, if both limits allow it;
    /// otherwise says which refused and for how long.
    pub fn admit(self: &Arc<Self>, estimate: u64) -> Result<Charge, (Limit, Duration)> {
        let now = Instant::now();
        let mut tokens = self.tokens.as_ref().map(lock);
        if let Some(tokens) = tokens.as_mut() {
            tokens.refill(now);
            if tokens.level < 1.0 {
                return Err((Limit::Tokens, tokens.wait_for(1.0)));
            }
        }
        if let Some(requests) = &self.requests {
            let mut requests = lock(requests);
            requests.refill(now);
            if requests.level < 1.0 {
                return Err((Limit::Requests, requests.wait_for(1.0)));
            }
            requests.take(1.0);
        }
        if let Some(tokens) = tokens.as_mut() {
            tokens.take(estimate as f64);
        }
        Ok(Charge {
            key: Arc::clone(self),
            charged: estimate,
            used: None,
        })
    }

    /// Moves the token bucket by what a request used beyond (or below) what it was charged.
    fn settle(&self, charged: u64, used: u64) {
        if let Some(bucket) = &self.tokens {
            let mut bucket = lock(bucket);
            bucket.refill(Instant::now());
            bucket.take(used as f64 - charged as f64);
        }
    }

    /// Whether `other` is this key with the same settings (a rebuilt catalog keeps its buckets).
    pub fn same_as(&self, other: &VirtualKey) -> bool {
        let rate = |b: &Option<Mutex<Bucket>>| b.as_ref().map(|b| lock(b).per_minute);
        self.name == other.name
            && self.digest == other.digest
            && self.models == other.models
            && rate(&self.requests) == rate(&other.requests)
            && rate(&self.tokens) == rate(&other.tokens)
    }
}

/// A request's tokens charged to its key: settled to the real usage when [`Charge::used`] is
/// called, refunded when dropped without it (no answer, no tokens).
pub struct Charge {
    key: Arc<VirtualKey>,
    charged: u64,
    used: Option<u64>,
}

impl Charge {
    pub fn used(&mut self, tokens: u64) {
        self.used = Some(tokens);
    }

    pub fn key(&self) -> &VirtualKey {
        &self.key
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.key.settle(self.charged, self.used.unwrap_or(0));
    }
}

/// The configured keys; empty means the gateway asks for none.
#[derive(Default)]
pub struct VirtualKeys {
    by_digest: HashMap<[u8; 32], Arc<VirtualKey>>,
}

impl VirtualKeys {
    pub fn new(keys: Vec<Arc<VirtualKey>>) -> Result<Self, String> {
        let mut by_digest = HashMap::new();
        for key in keys {
            let name = key.name.clone();
            if let Some(other) = by_digest.insert(key.digest, key) {
                return Err(format!(
                    "keys `{}` and `{name}` are the same key; give each client its own",
                    other.name
                ));
            }
        }
        Ok(VirtualKeys { by_digest })
    }

    pub fn required(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// This set's own copy of `key` when it has one with the same settings.
    pub fn existing(&self, key: &VirtualKey) -> Option<Arc<VirtualKey>> {
        self.by_digest
            .get(&key.digest)
            .filter(|known| known.same_as(key))
            .cloned()
    }

    pub fn find(&self, secret: &str) -> Option<&Arc<VirtualKey>> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u64>, tpm: Option<u64>) -> Arc<VirtualKey> {
        Arc::new(VirtualKey::new("team", "s", vec![], rpm, tpm))
    }

    #[test]
    fn requests_per_minute() {
        let key = key(Some(2), None);
        assert!(key.admit(0).is_ok());
        assert!(key.admit(0).is_ok());
        let (limit, wait) = key.admit(0).err().unwrap();
        assert_eq!(limit, Limit::Requests);
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn tokens_are_charged_then_settled() {
        let key = key(None, Some(100));
        let mut first = key.admit(30).unwrap();
        let second = key.admit(30).unwrap();
        drop(second); // no answer: refunded
        first.used(250);
        drop(first);
        let (limit, wait) = key.admit(1).err().unwrap();
        assert_eq!(limit, Limit::Tokens);
        assert!(wait > Duration::from_secs(80), "overdrawn by 150: {wait:?}");
    }

    #[test]
    fn absurd_usage_stays_in_range() {
        let key = key(None, Some(10));
        let mut charge = key.admit(0).unwrap();
        charge.used(u64::MAX);
        drop(charge);
        let (_, wait) = key.admit(0).err().unwrap();
        assert_eq!(wait, MAX_WAIT);
    }

    #[test]
    fn models_and_duplicates() {
        let key = VirtualKey::new("team", "s", vec!["fast".into()], None, None);
        assert!(key.allows("gpt", "fast"));
        assert!(!key.allows("claude", "claude"));
        let twins = VirtualKeys::new(vec![
            Arc::new(VirtualKey::new("a", "same", vec![], None, None)),
            Arc::new(VirtualKey::new("b", "same", vec![], None, None)),
        ]);
        assert!(twins.err().unwrap().contains("same key"));
    }
}
