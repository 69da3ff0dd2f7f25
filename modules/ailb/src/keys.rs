//! Virtual API keys: what clients put in `Authorization: Bearer ...`. Each key has a name (what
//! logs and metrics show), the models it may use, and request-per-minute and token-per-minute
//! limits. Keys are looked up by their SHA-256, so the lookup does not leak a key's prefix
//! through timing and the table holds no key in the clear.
//!
//! Limits are token buckets refilled continuously over a minute. Tokens are only known once the
//! provider answers, so a request is admitted while the token bucket is not empty and its usage
//! is taken afterwards: a large answer may overdraw the bucket, and the next requests wait
//! until it has refilled (as providers' own TPM limits behave).

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
}

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

    /// Time until the level reaches `needed`.
    fn wait_for(&self, needed: f64) -> Duration {
        let missing = (needed - self.level).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / self.per_minute.max(1.0))
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

    /// Takes one request if both limits allow it; otherwise which refused and for how long.
    pub fn admit(&self) -> Result<(), (Limit, Duration)> {
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
            requests.level -= 1.0;
        }
        Ok(())
    }

    /// Charges the tokens a request used.
    pub fn spend(&self, tokens: u64) {
        if let Some(bucket) = &self.tokens {
            let mut bucket = lock(bucket);
            bucket.refill(Instant::now());
            bucket.level -= tokens as f64;
        }
    }
}

/// The configured keys; empty means the gateway asks for none.
#[derive(Default)]
pub struct VirtualKeys {
    by_digest: HashMap<[u8; 32], Arc<VirtualKey>>,
}

impl VirtualKeys {
    pub fn new(keys: Vec<VirtualKey>) -> Result<Self, String> {
        let mut by_digest = HashMap::new();
        for key in keys {
            let name = key.name.clone();
            if let Some(other) = by_digest.insert(key.digest, Arc::new(key)) {
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

    pub fn find(&self, secret: &str) -> Option<&Arc<VirtualKey>> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute() {
        let key = VirtualKey::new("team", "s", vec![], Some(2), None);
        assert!(key.admit().is_ok());
        assert!(key.admit().is_ok());
        let (limit, wait) = key.admit().unwrap_err();
        assert_eq!(limit, Limit::Requests);
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
    }

    #[test]
    fn tokens_per_minute_are_charged_after_the_answer() {
        let key = VirtualKey::new("team", "s", vec![], None, Some(100));
        assert!(key.admit().is_ok(), "a full bucket admits");
        key.spend(250);
        let (limit, wait) = key.admit().unwrap_err();
        assert_eq!(limit, Limit::Tokens);
        assert!(wait > Duration::from_secs(80), "overdrawn by 150: {wait:?}");
    }

    #[test]
    fn models_and_duplicates() {
        let key = VirtualKey::new("team", "s", vec!["fast".into()], None, None);
        assert!(key.allows("gpt", "fast"));
        assert!(!key.allows("claude", "claude"));
        let twins = VirtualKeys::new(vec![
            VirtualKey::new("a", "same", vec![], None, None),
            VirtualKey::new("b", "same", vec![], None, None),
        ]);
        assert!(twins.err().unwrap().contains("same key"));
    }
}
