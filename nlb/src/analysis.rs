//! Rollout analysis: how the new version did over one window (the time since the last check),
//! judged against the rollout policy.
//!
//! Module heartbeats carry counters that only grow (until an operator resets them), so a
//! window is the difference between the counters now and a [`Baseline`] taken when it began;
//! the NLB adds what it saw itself: connections routed to the version and connects that
//! failed. Latency is the modules' own p99 as last reported.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{policy::RolloutPolicy, state::Instance};

/// One instance's counters at a moment: the module's own request counters (None before its
/// first heartbeat with stats) and the NLB's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    pub requests: Option<(u64, u64)>,
    pub connections: u64,
    pub connect_failures: u64,
}

/// What happened in a window, summed over instances.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Window {
    requests: u64,
    failed_requests: u64,
    connections: u64,
    connect_failures: u64,
}

impl Counters {
    pub fn of(instance: &Instance) -> Self {
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Counters {
            requests: instance
                .stats
                .as_ref()
                .map(|s| (count(s.total_requests), count(s.failed_requests))),
            connections: instance.routed_total,
            connect_failures: instance.connect_failures_total,
        }
    }

    /// What happened since `before`. A counter that went down was reset (a module restart, an
    /// operator's `reset_counters`), so all of it is new; request counters that were unknown
    /// when the window began (no heartbeat yet: they may go back to the module's start) count
    /// from the next window.
    fn since(self, before: Counters) -> Window {
        let delta = |now: u64, then: u64| if now >= then { now - then } else { now };
        let (requests, failed_requests) = match (self.requests, before.requests) {
            (Some((total, failed)), Some((total_then, failed_then))) => {
                (delta(total, total_then), delta(failed, failed_then))
            }
            _ => (0, 0),
        };
        Window {
            requests,
            failed_requests,
            connections: delta(self.connections, before.connections),
            connect_failures: delta(self.connect_failures, before.connect_failures),
        }
    }
}

impl Window {
    fn add(self, other: Window) -> Window {
        Window {
            requests: self.requests + other.requests,
            failed_requests: self.failed_requests + other.failed_requests,
            connections: self.connections + other.connections,
            connect_failures: self.connect_failures + other.connect_failures,
        }
    }
}

/// Counters per instance (keyed by instance and registration id, so a re-registered instance
/// starts from nothing) when a window began.
pub type Baseline = BTreeMap<(String, String), Counters>;

pub fn baseline<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Baseline {
    instances
        .into_iter()
        .map(|i| ((i.id.clone(), i.registration_id.clone()), Counters::of(i)))
        .collect()
}

/// What an analysis concluded.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail(String),
    /// Too little traffic (or no instance) to judge: the step holds.
    Hold(String),
}

/// One analysis, as status shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    pub at_unix_ms: u64,
    pub requests: u64,
    pub failed_requests: u64,
    pub connections: u64,
    pub connect_failures: u64,
    pub success_ratio: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub stable_p99_latency_ms: Option<f64>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The highest p99 among instances that served requests.
fn p99(instances: &[&Instance]) -> Option<f64> {
    instances
        .iter()
        .filter_map(|i| i.stats.as_ref())
        .filter(|s| s.total_requests > 0 && s.p99_latency_ms.is_finite())
        .map(|s| s.p99_latency_ms)
        .reduce(f64::max)
}

/// Judges the new version's instances (`canary`, with `healthy` telling whether any of them may
/// take connections) over the window since `since`, against the stable version's.
pub fn analyse(
    canary: &[&Instance],
    healthy: bool,
    stable: &[&Instance],
    since: &Baseline,
    policy: &RolloutPolicy,
    at_unix_ms: u64,
) -> Analysis {
    // An instance that was not there when the window began (just registered, or the NLB just
    // restarted) counts from the next window: its counters may go back to before this one.
    let window = canary
        .iter()
        .filter_map(|i| {
            let before = since.get(&(i.id.clone(), i.registration_id.clone()))?;
            Some(Counters::of(i).since(*before))
        })
        .fold(Window::default(), Window::add);
    // Modules that count requests are judged by them (with the NLB's failed connects as
    // failures too); ones that count none by the NLB's connections alone.
    let (traffic, failures) = if window.requests > 0 {
        (
            window.requests + window.connect_failures,
            window.failed_requests + window.connect_failures,
        )
    } else {
        (window.connections, window.connect_failures)
    };
    let success_ratio = (traffic > 0).then(|| 1.0 - failures.min(traffic) as f64 / traffic as f64);
    let (p99_latency_ms, stable_p99_latency_ms) = (p99(canary), p99(stable));
    let verdict = if canary.is_empty() {
        Verdict::Hold("no instance of the new version is registered".into())
    } else if !healthy {
        Verdict::Fail("no instance of the new version is healthy".into())
    } else if window.connect_failures >= policy.max_connect_failures.max(1) {
        Verdict::Fail(format!(
            "{} failed connects from the NLB in the window (limit {})",
            window.connect_failures, policy.max_connect_failures
        ))
    } else if traffic < policy.min_requests.max(1) {
        Verdict::Hold(format!(
            "too little traffic to judge: {traffic} of the {} requests needed",
            policy.min_requests.max(1)
        ))
    } else if let Some(ratio) = success_ratio.filter(|r| *r < policy.min_success_ratio) {
        Verdict::Fail(format!(
            "success ratio {ratio:.3} ({failures} of {traffic} failed) is under {}",
            policy.min_success_ratio
        ))
    } else if let Some(p99) =
        p99_latency_ms.filter(|p| policy.max_p99_latency_ms > 0.0 && *p > policy.max_p99_latency_ms)
    {
        Verdict::Fail(format!(
            "p99 latency {p99:.1} ms is over {} ms",
            policy.max_p99_latency_ms
        ))
    } else if let Some((p99, stable)) =
        p99_latency_ms.zip(stable_p99_latency_ms).filter(|(p, s)| {
            policy.max_p99_latency_ratio > 0.0 && *s > 0.0 && *p > s * policy.max_p99_latency_ratio
        })
    {
        Verdict::Fail(format!(
            "p99 latency {p99:.1} ms is over {}x the stable version's {stable:.1} ms",
            policy.max_p99_latency_ratio
        ))
    } else {
        Verdict::Pass
    };
    Analysis {
        at_unix_ms,
        requests: window.requests,
        failed_requests: window.failed_requests,
        connections: window.connections,
        connect_failures: window.connect_failures,
        success_ratio,
        p99_latency_ms,
        stable_p99_latency_ms,
        verdict,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime};

    use marchproxy::pb;

    use super::*;
    use crate::{settings::Settings, state::State, store::PersistedState};

    /// A v1 and a v2 instance that have each reported `(requests, failed, p99)` once.
    fn reported(v1: (i64, i64, f64), v2: (i64, i64, f64)) -> State {
        let mut state = State::restore(PersistedState::default(), Settings::default()).unwrap();
        let (now, wall) = (Instant::now(), SystemTime::now());
        for (id, version, (total, failed, p99)) in [("blue", "v1", v1), ("green", "v2", v2)] {
            let registration = state
                .register(
                    pb::RegisterModuleRequest {
                        instance: Some(pb::ModuleInstance {
                            instance_id: id.into(),
                            module_type: pb::ModuleType::Alb as i32,
                            address: "127.0.0.1:50051".into(),
                            version: version.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    now,
                    wall,
                )
                .unwrap()
                .registration_id;
            state
                .heartbeat(
                    pb::HeartbeatRequest {
                        instance_id: id.into(),
                        registration_id: registration,
                        status: pb::HealthStatus::Healthy as i32,
                        current_stats: Some(pb::ModuleStats {
                            total_requests: total,
                            successful_requests: total - failed,
                            failed_requests: failed,
                            p99_latency_ms: p99,
                            ..Default::default()
                        }),
                        timestamp: None,
                    },
                    now,
                    wall,
                )
                .unwrap();
        }
        state
    }

    fn of<'a>(state: &'a State, version: &str) -> Vec<&'a Instance> {
        state
            .instances
            .values()
            .filter(|i| i.version == version)
            .collect()
    }

    /// The verdict on v2 over a window that began when each had served `start` requests.
    fn verdict(state: &State, start: (u64, u64), policy: &RolloutPolicy) -> Verdict {
        let since: Baseline = of(state, "v2")
            .iter()
            .map(|i| {
                (
                    (i.id.clone(), i.registration_id.clone()),
                    Counters {
                        requests: Some(start),
                        ..Counters::default()
                    },
                )
            })
            .collect();
        analyse(&of(state, "v2"), true, &of(state, "v1"), &since, policy, 0).verdict
    }

    #[test]
    fn verdicts_follow_the_policy() {
        let policy = RolloutPolicy {
            max_p99_latency_ms: 100.0,
            max_p99_latency_ratio: 2.0,
            ..RolloutPolicy::default()
        };
        let healthy = reported((1000, 0, 10.0), (500, 5, 12.0));
        assert_eq!(verdict(&healthy, (0, 0), &policy), Verdict::Pass);
        // The window is what changed since it began: 10 requests are too few to judge.
        assert!(matches!(
            verdict(&healthy, (490, 5), &policy),
            Verdict::Hold(_)
        ));
        let failing = reported((1000, 0, 10.0), (500, 100, 12.0));
        let Verdict::Fail(reason) = verdict(&failing, (0, 0), &policy) else {
            panic!("20 % failed passed");
        };
        assert!(reason.contains("success ratio 0.800"), "{reason}");
        let slow = reported((1000, 0, 10.0), (500, 0, 150.0));
        let Verdict::Fail(reason) = verdict(&slow, (0, 0), &policy) else {
            panic!("150 ms passed a 100 ms bound");
        };
        assert!(reason.contains("over 100 ms"), "{reason}");
        let slower_than_stable = reported((1000, 0, 10.0), (500, 0, 30.0));
        let Verdict::Fail(reason) = verdict(&slower_than_stable, (0, 0), &policy) else {
            panic!("3x the stable p99 passed a 2x bound");
        };
        assert!(
            reason.contains("2x the stable version's 10.0 ms"),
            "{reason}"
        );
        // Counters that went down were reset: everything since is new.
        assert!(matches!(
            verdict(&failing, (10_000, 0), &policy),
            Verdict::Fail(_)
        ));
    }
}
