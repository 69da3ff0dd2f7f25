//! A route's upstream pool: weighted servers, how the next one is chosen (weighted round robin,
//! or least request by power of two choices), and what each server's recent results say about
//! it: active health (from [`crate::health`]) and passive outlier ejection.
//!
//! The request path reads only atomics; a server's failure streak is behind a small mutex
//! taken once per answered try.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus::{IntCounter, IntGauge};
use rand::Rng;
use tracing::{info, warn};

use crate::config::{HealthCheck, Outlier};

/// How the next server is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's): a weight-3 server gets three of every four
    /// requests beside a weight-1 one, interleaved.
    RoundRobin,
    /// Two servers drawn by weight, the one with fewer requests in flight (per weight) wins.
    LeastRequest,
}

impl Balance {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "round_robin" => Ok(Balance::RoundRobin),
            "least_request" => Ok(Balance::LeastRequest),
            other => Err(format!(
                "metadata.lb `{other}` must be round_robin or least_request"
            )),
        }
    }
}

/// Per-server figures on `/metrics`, resolved once when the pool is built.
pub struct ServerMetrics {
    pub healthy: IntGauge,
    pub ejections: IntCounter,
    pub active: IntGauge,
}

/// One upstream server and what the ALB knows about it (its weight is the pool's: a route
/// change that only reweighs keeps the server's state).
pub struct Server {
    /// `host:port`, as written in the route.
    pub address: String,
    /// Requests sent and not yet answered.
    active: AtomicUsize,
    /// The active health check's verdict (true while no check runs).
    healthy: AtomicBool,
    /// Milliseconds since [`epoch`] until which passive ejection keeps it out (0: not ejected).
    ejected_until: AtomicU64,
    streak: Mutex<Streak>,
    pub metrics: ServerMetrics,
}

#[derive(Default)]
struct Streak {
    /// Passive: failures in a row.
    failures: u32,
    /// Passive: ejections so far (each one lasts twice the previous).
    ejections: u32,
    /// When the last ejection ended, and how long it was: a server healthy for that long
    /// starts again from the base ejection time.
    back: Option<(Instant, Duration)>,
    /// Active: checks in a row that passed or failed.
    checks_passed: u32,
    checks_failed: u32,
}

/// The process's clock origin for the ejection deadlines kept in atomics.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Server {
    pub fn new(address: String, metrics: ServerMetrics) -> Self {
        metrics.healthy.set(1);
        Server {
            address,
            active: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            ejected_until: AtomicU64::new(0),
            streak: Mutex::new(Streak::default()),
            metrics,
        }
    }

    fn streak(&self) -> std::sync::MutexGuard<'_, Streak> {
        // A streak is a few counters updated together; a panic elsewhere cannot tear them.
        self.streak.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms()
    }

    /// May it take a request now?
    pub fn available(&self) -> bool {
        self.is_healthy() && !self.is_ejected()
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        InFlight(Arc::clone(self))
    }

    /// An answer that was not a failure: ends the failure streak.
    pub fn succeeded(&self) {
        let mut streak = self.streak();
        streak.failures = 0;
        if let Some((back, lasted)) = streak.back {
            if back.elapsed() >= lasted {
                streak.ejections = 0;
                streak.back = None;
            }
        }
    }

    /// A 5xx, connect failure or timeout. Returns how long the server is now ejected for,
    /// when this failure ejects it (`may_eject` says whether the pool can spare it).
    fn failed(&self, outlier: &Outlier, may_eject: bool) -> Option<Duration> {
        let mut streak = self.streak();
        streak.failures += 1;
        if outlier.consecutive_failures == 0
            || streak.failures < outlier.consecutive_failures
            || !may_eject
            || self.is_ejected()
        {
            return None;
        }
        let factor = 1u64 << streak.ejections.min(20);
        let lasts = Duration::from_millis(
            outlier
                .base_ejection_ms
                .saturating_mul(factor)
                .min(outlier.max_ejection_ms),
        );
        streak.failures = 0;
        streak.ejections += 1;
        streak.back = Some((Instant::now() + lasts, lasts));
        self.ejected_until
            .store(now_ms() + lasts.as_millis() as u64, Ordering::Relaxed);
        self.metrics.ejections.inc();
        Some(lasts)
    }

    /// Back in service for a pool without active checks (a route that dropped them).
    pub fn forget_checks(&self) {
        self.healthy.store(true, Ordering::Relaxed);
        self.metrics.healthy.set(1);
        let mut streak = self.streak();
        streak.checks_passed = 0;
        streak.checks_failed = 0;
    }

    /// An active check's result; returns the new verdict when it changed.
    pub fn checked(&self, passed: bool, check: &HealthCheck) -> Option<bool> {
        let mut streak = self.streak();
        if passed {
            streak.checks_passed += 1;
            streak.checks_failed = 0;
        } else {
            streak.checks_failed += 1;
            streak.checks_passed = 0;
        }
        let healthy = self.is_healthy();
        let verdict = if !healthy && streak.checks_passed >= check.healthy_threshold {
            // A server the checks bring back is also forgiven its passive ejection.
            self.ejected_until.store(0, Ordering::Relaxed);
            streak.failures = 0;
            true
        } else if healthy && streak.checks_failed >= check.unhealthy_threshold {
            false
        } else {
            return None;
        };
        self.healthy.store(verdict, Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(verdict));
        Some(verdict)
    }
}

/// A request in flight to a server.
pub struct InFlight(Arc<Server>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}

/// The longest round-robin schedule kept; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

/// A route's servers and how to choose among them.
pub struct Pool {
    pub route_id: String,
    pub servers: Vec<Arc<Server>>,
    /// The servers' weights, in the same order.
    pub weights: Vec<u32>,
    pub balance: Balance,
    pub health: Option<HealthCheck>,
    outlier: Outlier,
    /// Server indexes in smooth weighted round-robin order, walked by `cursor`.
    schedule: Vec<usize>,
    cursor: AtomicUsize,
}

impl Pool {
    pub fn new(
        route_id: String,
        servers: Vec<(Arc<Server>, u32)>,
        balance: Balance,
        health: Option<HealthCheck>,
        outlier: Outlier,
    ) -> Self {
        let (servers, weights): (Vec<_>, Vec<_>) = servers.into_iter().unzip();
        if health.is_none() {
            servers.iter().for_each(|s| s.forget_checks());
        }
        let schedule = smooth_schedule(&weights);
        Pool {
            route_id,
            servers,
            weights,
            balance,
            health,
            outlier,
            schedule,
            cursor: AtomicUsize::new(rand::rng().random_range(0..usize::MAX / 2)),
        }
    }

    /// The server for the next try: available and not in `tried` (the servers this request
    /// has failed on) when there is one, else available; None when none is.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let usable = |index: usize, fresh: bool| {
            self.servers[index].available() && !(fresh && tried.contains(&index))
        };
        [true, false]
            .into_iter()
            .find_map(|fresh| match self.balance {
                // Retries stay off the shared turn, so a failing server does not shift the
                // rotation of first tries.
                Balance::RoundRobin if tried.is_empty() => self.next_in_turn(|i| usable(i, fresh)),
                Balance::RoundRobin => self.drawn_by_weight(|i| usable(i, fresh)),
                Balance::LeastRequest => self.least_request(|i| usable(i, fresh)),
            })
    }

    /// The server whose turn it is; when it is unavailable, one drawn by weight among those
    /// that are (walking on would hand its turns to its neighbour alone).
    fn next_in_turn(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        let index = self.schedule[turn];
        if usable(index) {
            return Some(index);
        }
        self.drawn_by_weight(usable)
    }

    fn drawn_by_weight(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.servers.len()).filter(|&i| usable(i)).collect();
        let total: u64 = candidates.iter().map(|&i| u64::from(self.weights[i])).sum();
        let mut point = rand::rng().random_range(0..total.max(1));
        candidates.into_iter().find(|&i| {
            let weight = u64::from(self.weights[i]);
            let hit = point < weight;
            point = point.saturating_sub(weight);
            hit
        })
    }

    fn least_request(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.servers.len()).filter(|&i| usable(i)).collect();
        let weight = |i: usize| u64::from(self.weights[i]);
        let mut rng = rand::rng();
        let mut draw = |except: Option<usize>| {
            let total: u64 = candidates
                .iter()
                .filter(|&&i| Some(i) != except)
                .map(|&i| weight(i))
                .sum();
            let mut point = rng.random_range(0..total.max(1));
            candidates
                .iter()
                .copied()
                .filter(|&i| Some(i) != except)
                .find(|&i| {
                    let hit = point < weight(i);
                    point = point.saturating_sub(weight(i));
                    hit
                })
        };
        let first = draw(None)?;
        let Some(second) = draw(Some(first)) else {
            return Some(first);
        };
        // Requests in flight per unit of weight, compared without division.
        let load = |i: usize| self.servers[i].active() as u64 + 1;
        Some(
            if load(first) * weight(second) <= load(second) * weight(first) {
                first
            } else {
                second
            },
        )
    }

    /// Records a failed try on server `index`, ejecting it when its streak is long enough and
    /// the pool can spare it (at most half the pool out at once, for ejection or health).
    pub fn failed(&self, index: usize, reason: &str) {
        let out = self.servers.iter().filter(|s| !s.available()).count();
        let may_eject = self.servers.len() > 1 && (out + 1) * 2 <= self.servers.len();
        let server = &self.servers[index];
        if let Some(lasts) = server.failed(&self.outlier, may_eject) {
            warn!(route = %self.route_id, server = %server.address, %reason, ejected_s = lasts.as_secs_f64(), "upstream server ejected after consecutive failures");
        }
    }

    /// How many servers may take requests now.
    pub fn available(&self) -> usize {
        self.servers.iter().filter(|s| s.available()).count()
    }

    /// Logs an active health verdict that changed.
    pub fn log_verdict(&self, server: &Server, healthy: bool, detail: &str) {
        if healthy {
            info!(route = %self.route_id, server = %server.address, %detail, "upstream server healthy again");
        } else {
            warn!(route = %self.route_id, server = %server.address, %detail, "upstream server failed its health checks");
        }
    }
}

/// Smooth weighted round robin, laid out once: each step every server gains its weight, the
/// highest is chosen and loses the total. Weights are scaled down when their sum is large.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let sum: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let scale = sum.div_ceil(MAX_SCHEDULE).max(1);
    let weights: Vec<i64> = weights
        .iter()
        .map(|&w| (u64::from(w) / scale).max(1) as i64)
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
                .unwrap_or((0, &0));
            current[best] -= total;
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(address: &str) -> Arc<Server> {
        let gauge = || IntGauge::new("g", "g").unwrap();
        Arc::new(Server::new(
            address.into(),
            ServerMetrics {
                healthy: gauge(),
                ejections: IntCounter::new("c", "c").unwrap(),
                active: gauge(),
            },
        ))
    }

    fn pool(weights: &[u32], balance: Balance) -> Pool {
        let servers = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (server(&format!("s{i}:80")), w))
            .collect();
        Pool::new("r".into(), servers, balance, None, Outlier::default())
    }

    #[test]
    fn round_robin_follows_the_weights_interleaved() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        let pool = pool(&[3, 1], Balance::RoundRobin);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[pool.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
        let scaled = smooth_schedule(&[1_000_000, 1_000_000]);
        assert!(scaled.len() <= 4096, "{}", scaled.len());
        assert_eq!(scaled.iter().filter(|&&i| i == 0).count() * 2, scaled.len());
    }

    #[test]
    fn an_unavailable_servers_turns_are_shared_by_weight() {
        let pool = pool(&[1, 1, 1], Balance::RoundRobin);
        for _ in 0..5 {
            pool.failed(0, "5xx");
        }
        assert!(pool.servers[0].is_ejected());
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[pool.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!((1300..1700).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn least_request_prefers_the_idle_server() {
        let pool = pool(&[1, 1], Balance::LeastRequest);
        let _busy: Vec<_> = (0..10).map(|_| pool.servers[0].start()).collect();
        let picks: Vec<usize> = (0..50).map(|_| pool.pick(&[]).unwrap()).collect();
        assert!(picks.iter().all(|&p| p == 1), "{picks:?}");
    }

    #[test]
    fn failures_eject_with_growing_times_and_spare_half_the_pool() {
        let pool = pool(&[1, 1], Balance::RoundRobin);
        for _ in 0..4 {
            pool.failed(0, "5xx");
        }
        assert!(
            !pool.servers[0].is_ejected(),
            "four failures are not enough"
        );
        pool.failed(0, "5xx");
        assert!(pool.servers[0].is_ejected());
        assert_eq!(pool.pick(&[]), Some(1));
        for _ in 0..10 {
            pool.failed(1, "5xx");
        }
        assert!(
            !pool.servers[1].is_ejected(),
            "the last half of the pool stays"
        );
        let streak = pool.servers[0].streak();
        assert_eq!(streak.back.unwrap().1, Duration::from_secs(10));
    }

    #[test]
    fn retries_prefer_a_server_not_tried() {
        let pool = pool(&[1, 1, 1], Balance::RoundRobin);
        for _ in 0..20 {
            let first = pool.pick(&[]).unwrap();
            let second = pool.pick(&[first]).unwrap();
            assert_ne!(first, second);
        }
        let lone = self::pool(&[1], Balance::LeastRequest);
        assert_eq!(lone.pick(&[0]), Some(0), "a lone server is tried again");
    }

    #[test]
    fn health_checks_take_out_and_bring_back() {
        let check = HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            ..HealthCheck::default()
        };
        let s = server("a:1");
        assert_eq!(s.checked(false, &check), None);
        assert_eq!(s.checked(false, &check), Some(false));
        assert!(!s.available());
        assert_eq!(s.checked(true, &check), None);
        assert_eq!(s.checked(true, &check), Some(true));
        assert!(s.available());
    }
}
