//! The rate limiter a data plane asks before serving (a module's through `SetRateLimit`, the
//! NLB's for connections per source). A limit applies to a target:
//!
//! - `*`: every client, each with its own bucket (by client IP);
//! - an IP or CIDR: clients in that range, each with its own bucket;
//! - `route:<route id>`: all traffic of one route, one bucket;
//! - `key:<api key>`: all traffic carrying that API key, one bucket.
//!
//! Per-second rates are token buckets of `burst_size` (at least the rate) tokens; per-minute and
//! per-hour rates are fixed windows. A request passes only when every matching limit allows it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use crate::pb;
use dashmap::DashMap;
use ipnet::IpNet;

/// Highest rate or burst accepted (a billion a second is no limit at all).
const MAX_RATE: i64 = 1_000_000_000;

/// Whom a limit applies to.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Everyone,
    Clients(IpNet),
    Route(String),
    ApiKey(String),
}

impl Target {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Target::Everyone);
        }
        if let Some(route) = text.strip_prefix("route:").filter(|r| !r.is_empty()) {
            return Ok(Target::Route(route.to_owned()));
        }
        if let Some(key) = text.strip_prefix("key:").filter(|k| !k.is_empty()) {
            return Ok(Target::ApiKey(key.to_owned()));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Target::Clients(IpNet::from(ip)));
        }
        text.parse::<IpNet>().map(Target::Clients).map_err(|_| {
            format!("target `{text}` must be *, an IP, a CIDR, route:<route id> or key:<api key>")
        })
    }
}

/// A validated limit.
#[derive(Clone, Debug)]
pub struct Limit {
    pub spec: pb::RateLimit,
    pub target: Target,
}

impl Limit {
    /// Checks a wire limit; an empty `limit_id` gets one derived from the target.
    pub fn try_from_wire(mut spec: pb::RateLimit) -> Result<Self, String> {
        let target = Target::parse(&spec.target)?;
        let rates = [
            ("requests_per_second", spec.requests_per_second),
            ("requests_per_minute", spec.requests_per_minute),
            ("requests_per_hour", spec.requests_per_hour),
            ("burst_size", spec.burst_size),
        ];
        if let Some((name, value)) = rates.iter().find(|(_, v)| !(0..=MAX_RATE).contains(v)) {
            return Err(format!("{name} must be from 0 to {MAX_RATE} (got {value})"));
        }
        if spec.requests_per_second == 0
            && spec.requests_per_minute == 0
            && spec.requests_per_hour == 0
        {
            return Err(
                "set at least one of requests_per_second, requests_per_minute, requests_per_hour"
                    .into(),
            );
        }
        spec.limit_id = spec.limit_id.trim().to_owned();
        if spec.limit_id.is_empty() {
            spec.limit_id = format!("limit-{}", spec.target.trim());
        }
        if spec.limit_id.len() > 200 {
            return Err("limit_id must be at most 200 characters".into());
        }
        Ok(Limit { spec, target })
    }

    fn matches(&self, subject: &Subject<'_>) -> Option<BucketKey> {
        match &self.target {
            Target::Everyone => Some(
                subject
                    .client_ip
                    .map_or(BucketKey::Everyone, BucketKey::Client),
            ),
            Target::Clients(net) => subject
                .client_ip
                .filter(|ip| net.contains(ip))
                .map(BucketKey::Client),
            Target::Route(route) => {
                (subject.route_id == Some(route.as_str())).then_some(BucketKey::Shared)
            }
            Target::ApiKey(key) => {
                (subject.api_key == Some(key.as_str())).then_some(BucketKey::Shared)
            }
        }
    }
}

/// What a request is, as limits see it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Subject<'a> {
    pub client_ip: Option<IpAddr>,
    pub route_id: Option<&'a str>,
    pub api_key: Option<&'a str>,
}

/// The answer to "may this request pass?".
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Allowed,
    /// Refused by `limit_id`; the client may try again after `retry_after`.
    Limited {
        limit_id: String,
        retry_after: Duration,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum BucketKey {
    Everyone,
    Client(IpAddr),
    Shared,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    minute: (Instant, i64),
    hour: (Instant, i64),
    used: Instant,
}

impl Bucket {
    fn new(limit: &pb::RateLimit, now: Instant) -> Self {
        Bucket {
            tokens: capacity(limit),
            refilled: now,
            minute: (now, 0),
            hour: (now, 0),
            used: now,
        }
    }

    /// Takes one request if every window of `limit` allows it.
    fn take(&mut self, limit: &pb::RateLimit, now: Instant) -> Result<(), Duration> {
        self.used = now;
        if limit.requests_per_second > 0 {
            let rate = limit.requests_per_second as f64;
            let elapsed = now.duration_since(self.refilled).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(capacity(limit));
            self.refilled = now;
            if self.tokens < 1.0 {
                return Err(Duration::from_secs_f64((1.0 - self.tokens) / rate));
            }
        }
        for (window, length, max) in [
            (
                &mut self.minute,
                Duration::from_secs(60),
                limit.requests_per_minute,
            ),
            (
                &mut self.hour,
                Duration::from_secs(3600),
                limit.requests_per_hour,
            ),
        ] {
            if max == 0 {
                continue;
            }
            if now.duration_since(window.0) >= length {
                *window = (now, 0);
            }
            if window.1 >= max {
                return Err(length.saturating_sub(now.duration_since(window.0)));
            }
        }
        if limit.requests_per_second > 0 {
            self.tokens -= 1.0;
        }
        self.minute.1 += 1;
        self.hour.1 += 1;
        Ok(())
    }
}

fn capacity(limit: &pb::RateLimit) -> f64 {
    limit.burst_size.max(limit.requests_per_second).max(1) as f64
}

/// The limits and their buckets, shared by the data plane and ModuleService.
#[derive(Default)]
pub struct RateLimiter {
    limits: RwLock<Arc<Vec<Limit>>>,
    buckets: DashMap<(String, BucketKey), Bucket>,
}

impl RateLimiter {
    pub fn new() -> Arc<Self> {
        Arc::new(RateLimiter::default())
    }

    fn snapshot(&self) -> Arc<Vec<Limit>> {
        // The lock only guards swapping the list; a panic elsewhere cannot leave it half-written.
        Arc::clone(&self.limits.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Adds or replaces a limit (by id); a replaced limit starts with fresh buckets.
    pub fn set(&self, limit: Limit) -> bool {
        let id = limit.spec.limit_id.clone();
        let mut guard = self.limits.write().unwrap_or_else(|e| e.into_inner());
        let mut next: Vec<Limit> = guard
            .iter()
            .filter(|l| l.spec.limit_id != id)
            .cloned()
            .collect();
        let replaced = next.len() != guard.len();
        next.push(limit);
        *guard = Arc::new(next);
        drop(guard);
        self.buckets.retain(|(limit_id, _), _| *limit_id != id);
        replaced
    }

    /// Removes a limit; false when there is none with that id.
    pub fn remove(&self, id: &str) -> bool {
        let mut guard = self.limits.write().unwrap_or_else(|e| e.into_inner());
        let next: Vec<Limit> = guard
            .iter()
            .filter(|l| l.spec.limit_id != id)
            .cloned()
            .collect();
        let removed = next.len() != guard.len();
        *guard = Arc::new(next);
        drop(guard);
        self.buckets.retain(|(limit_id, _), _| limit_id != id);
        removed
    }

    /// The limits, optionally only those whose target is `target`.
    pub fn list(&self, target: &str) -> Vec<pb::RateLimit> {
        self.snapshot()
            .iter()
            .filter(|l| target.is_empty() || l.spec.target.trim() == target.trim())
            .map(|l| l.spec.clone())
            .collect()
    }

    /// May a request from `subject` pass now? Counts it when it may.
    pub fn check(&self, subject: &Subject<'_>) -> Verdict {
        self.check_targets(subject, |_| true)
    }

    /// Only the `key:<api key>` limits, for a data plane that has checked the client's other
    /// limits already (checking them again would count the request twice).
    pub fn check_api_key(&self, key: &str) -> Verdict {
        let subject = Subject {
            api_key: Some(key),
            ..Subject::default()
        };
        self.check_targets(&subject, |target| matches!(target, Target::ApiKey(_)))
    }

    /// Only the `route:<route id>` limits, for a data plane that has checked the client's
    /// limits before it knew the route (the ALB matches the route after the request arrives).
    pub fn check_route(&self, route_id: &str) -> Verdict {
        let subject = Subject {
            route_id: Some(route_id),
            ..Subject::default()
        };
        self.check_targets(&subject, |target| matches!(target, Target::Route(_)))
    }

    fn check_targets(&self, subject: &Subject<'_>, applies: impl Fn(&Target) -> bool) -> Verdict {
        let now = Instant::now();
        for limit in self
            .snapshot()
            .iter()
            .filter(|l| l.spec.enabled && applies(&l.target))
        {
            let Some(key) = limit.matches(subject) else {
                continue;
            };
            let mut bucket = self
                .buckets
                .entry((limit.spec.limit_id.clone(), key))
                .or_insert_with(|| Bucket::new(&limit.spec, now));
            if let Err(retry_after) = bucket.take(&limit.spec, now) {
                return Verdict::Limited {
                    limit_id: limit.spec.limit_id.clone(),
                    retry_after,
                };
            }
        }
        Verdict::Allowed
    }

    /// Forgets buckets idle for `idle`, so clients that come once do not stay in memory.
    pub fn forget_idle(&self, idle: Duration) {
        let now = Instant::now();
        self.buckets
            .retain(|_, bucket| now.duration_since(bucket.used) < idle);
    }

    /// How many buckets exist now, per limit (for stats).
    pub fn bucket_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for entry in &self.buckets {
            *counts.entry(entry.key().0.clone()).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(target: &str, per_second: i64, burst: i64) -> Limit {
        Limit::try_from_wire(pb::RateLimit {
            limit_id: String::new(),
            target: target.into(),
            requests_per_second: per_second,
            burst_size: burst,
            enabled: true,
            ..Default::default()
        })
        .unwrap()
    }

    fn from(ip: &str) -> Subject<'static> {
        Subject {
            client_ip: Some(ip.parse().unwrap()),
            ..Subject::default()
        }
    }

    #[test]
    fn each_client_has_its_own_bucket() {
        let limiter = RateLimiter::new();
        limiter.set(limit("10.0.0.0/8", 1, 2));
        assert_eq!(limiter.check(&from("10.0.0.1")), Verdict::Allowed);
        assert_eq!(limiter.check(&from("10.0.0.1")), Verdict::Allowed);
        let Verdict::Limited {
            limit_id,
            retry_after,
        } = limiter.check(&from("10.0.0.1"))
        else {
            panic!("the third request within the burst of 2 must be refused");
        };
        assert_eq!(limit_id, "limit-10.0.0.0/8");
        assert!(retry_after <= Duration::from_secs(1));
        assert_eq!(
            limiter.check(&from("10.0.0.2")),
            Verdict::Allowed,
            "another client"
        );
        assert_eq!(
            limiter.check(&from("192.168.0.1")),
            Verdict::Allowed,
            "outside the range"
        );
    }

    #[test]
    fn api_key_checks_leave_client_limits_alone() {
        let limiter = RateLimiter::new();
        limiter.set(limit("*", 1, 1));
        limiter.set(limit("key:team", 1, 1));
        for _ in 0..3 {
            assert_eq!(limiter.check_api_key("other"), Verdict::Allowed);
        }
        assert_eq!(limiter.check_api_key("team"), Verdict::Allowed);
        assert!(
            matches!(limiter.check_api_key("team"), Verdict::Limited { limit_id, .. } if limit_id == "limit-key:team")
        );
        assert_eq!(
            limiter.check(&from("10.0.0.1")),
            Verdict::Allowed,
            "the client's own bucket is untouched"
        );
    }

    #[test]
    fn route_checks_count_only_route_limits() {
        let limiter = RateLimiter::new();
        limiter.set(limit("*", 1, 1));
        limiter.set(limit("route:web", 2, 2));
        assert_eq!(limiter.check_route("web"), Verdict::Allowed);
        assert_eq!(limiter.check_route("web"), Verdict::Allowed);
        assert!(
            matches!(limiter.check_route("web"), Verdict::Limited { limit_id, .. } if limit_id == "limit-route:web")
        );
        assert_eq!(
            limiter.check_route("api"),
            Verdict::Allowed,
            "another route"
        );
        assert_eq!(
            limiter.check(&from("10.0.0.1")),
            Verdict::Allowed,
            "the client's own bucket is untouched"
        );
    }

    #[test]
    fn windows_and_shared_targets() {
        let limiter = RateLimiter::new();
        limiter.set(
            Limit::try_from_wire(pb::RateLimit {
                limit_id: "per-minute".into(),
                target: "route:web".into(),
                requests_per_minute: 3,
                enabled: true,
                ..Default::default()
            })
            .unwrap(),
        );
        let web = Subject {
            route_id: Some("web"),
            ..from("1.1.1.1")
        };
        let web_elsewhere = Subject {
            route_id: Some("web"),
            ..from("2.2.2.2")
        };
        assert_eq!(limiter.check(&web), Verdict::Allowed);
        assert_eq!(limiter.check(&web_elsewhere), Verdict::Allowed);
        assert_eq!(limiter.check(&web), Verdict::Allowed);
        assert!(
            matches!(limiter.check(&web_elsewhere), Verdict::Limited { retry_after, .. } if retry_after > Duration::from_secs(50))
        );
        assert_eq!(
            limiter.check(&from("1.1.1.1")),
            Verdict::Allowed,
            "other routes pass"
        );
        assert!(limiter.remove("per-minute"));
        assert_eq!(limiter.check(&web), Verdict::Allowed);
        assert!(!limiter.remove("per-minute"));
    }

    #[test]
    fn disabled_limits_and_bad_specs() {
        let limiter = RateLimiter::new();
        let mut off = limit("*", 1, 1);
        off.spec.enabled = false;
        limiter.set(off);
        for _ in 0..5 {
            assert_eq!(limiter.check(&from("1.2.3.4")), Verdict::Allowed);
        }
        for (target, rps) in [
            ("nonsense", 1),
            ("10.0.0.0/99", 1),
            ("*", -1),
            ("*", 0),
            ("route:", 1),
        ] {
            let wire = pb::RateLimit {
                target: target.into(),
                requests_per_second: rps,
                ..Default::default()
            };
            assert!(Limit::try_from_wire(wire).is_err(), "{target} {rps}");
        }
    }

    #[test]
    fn idle_buckets_are_forgotten() {
        let limiter = RateLimiter::new();
        limiter.set(limit("*", 5, 5));
        limiter.check(&from("1.1.1.1"));
        limiter.check(&from("2.2.2.2"));
        assert_eq!(limiter.bucket_counts()["limit-*"], 2);
        limiter.forget_idle(Duration::ZERO);
        assert!(limiter.bucket_counts().is_empty());
    }
}
