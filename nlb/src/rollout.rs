//! The rollout step machine: a gradual promotion of a new version, analysed every step interval
//! against its kind's [`RolloutPolicy`].
//!
//! A passing analysis moves one step (through the gate webhooks when there are any); a failing
//! one counts, and past the tolerated number rolls back at once; too little traffic holds the
//! step until the progress deadline, then rolls back. A paused policy holds everything. Each
//! change is an event (kept per kind, persisted, shown by status) and, at the end, a
//! notification for the `promoted` / `rolled-back` webhooks.
//!
//! Everything here runs under the state lock and never waits: webhook calls are handed back to
//! the caller ([`GateCall`], [`State::take_notifications`]) and their answers come back through
//! [`State::gate_answered`].

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime},
};

use marchproxy::{names::ModuleKind, pb};
use serde::Serialize;
use serde_json::json;

use crate::{
    analysis::{self, Analysis, Baseline, Verdict},
    bluegreen::{Weights, active, with_weight},
    policy::{HookType, RolloutPolicy, Webhook},
    state::{Instance, State, unix_ms},
};

/// Where a rollout stands between two analyses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Progressing,
    /// The policy is paused: no analysis, no step.
    Paused,
    /// The analysis passed; the gate webhooks are being asked.
    AwaitingGate,
    /// A gate webhook said no; asked again after the next passing analysis.
    HeldByGate,
    /// Too little traffic (or no instance) to judge, since `held_since`.
    HeldForTraffic,
}

/// A gradual promotion under way.
#[derive(Clone, Debug)]
pub struct Promotion {
    pub version: String,
    /// The version that carried most traffic when it began: the latency yardstick.
    pub stable: String,
    pub step_percent: u32,
    /// The split before it began, restored by a rollback.
    pub before: Weights,
    pub started: SystemTime,
    /// Steps taken; the first is taken when the promotion starts.
    pub step: u32,
    pub failed_checks: u32,
    pub phase: Phase,
    /// When the last analysis ran (or the step began): the next is due an interval later.
    pub last_check: Instant,
    /// Since when the step has waited for traffic to judge.
    pub held_since: Option<Instant>,
    /// The new version's counters when the current window began; None until the first
    /// check after a start or restart takes it.
    pub window: Option<Baseline>,
    pub last_analysis: Option<Analysis>,
}

impl Promotion {
    /// Identifies one step of one rollout, to tell whether a gate answer is still wanted.
    fn token(&self) -> (SystemTime, u32) {
        (self.started, self.step)
    }
}

/// Something a rollout did, kept for status and logs.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RolloutEvent {
    pub at_unix_ms: u64,
    pub version: String,
    pub step: u32,
    pub message: String,
    /// Set on the event that ended a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<RolloutEnd>,
}

/// How a rollout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutEnd {
    Promoted,
    RolledBack,
    /// Ended by the operator some other way: a weight set, an immediate promotion, another
    /// rollout started.
    Stopped,
}

/// Events kept per kind.
const EVENTS_KEPT: usize = 50;

/// What a check or an answer did, for the caller to log and count.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Analysed {
        kind: ModuleKind,
        version: String,
        verdict: Verdict,
    },
    Stepped {
        kind: ModuleKind,
        version: String,
        step: u32,
        weight: u32,
    },
    Held {
        kind: ModuleKind,
        version: String,
        reason: String,
    },
    Promoted {
        kind: ModuleKind,
        version: String,
    },
    RolledBack {
        kind: ModuleKind,
        version: String,
        reason: String,
    },
}

/// A step waiting for the gate webhooks' word.
#[derive(Clone, Debug)]
pub struct GateCall {
    pub kind: ModuleKind,
    token: (SystemTime, u32),
    pub hooks: Vec<Webhook>,
    pub payload: serde_json::Value,
}

/// A notification webhook call to make.
#[derive(Clone, Debug)]
pub struct Notification {
    pub hooks: Vec<Webhook>,
    pub payload: serde_json::Value,
}

/// The weight the next step gives the new version.
fn next_weight(current: u32, step_percent: u32, max_weight: u32) -> u32 {
    if current >= max_weight {
        100
    } else {
        (current + step_percent).min(max_weight).min(100)
    }
}

impl State {
    /// The policy in effect for a kind.
    pub fn policy(&self, kind: ModuleKind) -> &RolloutPolicy {
        self.settings.rollout.policy(kind)
    }

    /// The JSON webhooks receive.
    pub fn hook_payload(
        &self,
        hook: HookType,
        kind: ModuleKind,
        version: &str,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let promotion = self.promotions.get(&kind);
        let mut payload = json!({
            "type": hook.name(),
            "kind": kind.name(),
            "version": version,
            "stable_version": promotion.map(|p| p.stable.clone())
                .or_else(|| self.weights.get(&kind).and_then(|w| active(w)).map(str::to_owned)),
            "step": promotion.map_or(0, |p| p.step),
            "weights": self.weights.get(&kind).cloned().unwrap_or_default(),
            "analysis": promotion.and_then(|p| p.last_analysis.clone()),
            "failed_checks": promotion.map_or(0, |p| p.failed_checks),
        });
        crate::settings::merge(&mut payload, &extra);
        payload
    }

    pub fn record_event(&mut self, kind: ModuleKind, version: &str, message: String) {
        self.push_event(kind, version, message, None);
    }

    /// Records the event that ends a rollout.
    pub fn record_end(
        &mut self,
        kind: ModuleKind,
        version: &str,
        end: RolloutEnd,
        message: String,
    ) {
        self.push_event(kind, version, message, Some(end));
    }

    fn push_event(
        &mut self,
        kind: ModuleKind,
        version: &str,
        message: String,
        end: Option<RolloutEnd>,
    ) {
        let step = self.promotions.get(&kind).map_or(0, |p| p.step);
        let events = self.rollout_events.entry(kind).or_default();
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(RolloutEvent {
            at_unix_ms: unix_ms(SystemTime::now()),
            version: version.to_owned(),
            step,
            message,
            end,
        });
        self.generation += 1;
    }

    pub fn events(&self, kind: ModuleKind) -> impl DoubleEndedIterator<Item = &RolloutEvent> {
        self.rollout_events.get(&kind).into_iter().flatten()
    }

    /// Notification webhook calls waiting to be made.
    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.outbox)
    }

    pub(crate) fn notify(
        &mut self,
        hook: HookType,
        kind: ModuleKind,
        version: &str,
        reason: Option<&str>,
    ) {
        let hooks: Vec<Webhook> = self.policy(kind).hooks(hook).cloned().collect();
        if hooks.is_empty() {
            return;
        }
        let payload = self.hook_payload(hook, kind, version, json!({ "reason": reason }));
        self.outbox.push(Notification { hooks, payload });
    }

    /// Ends a kind's promotion (its clients' version affinity with it).
    pub fn end_promotion(&mut self, kind: ModuleKind) -> Option<Promotion> {
        self.affinity.forget(kind);
        self.promotions.remove(&kind)
    }

    /// Rolls a promotion back to the split before it, now.
    fn roll_back_by_itself(&mut self, kind: ModuleKind, reason: String) -> Outcome {
        let (version, before) = self
            .promotions
            .get(&kind)
            .map(|p| (p.version.clone(), p.before.clone()))
            .unwrap_or_default();
        self.replace_weights(kind, before);
        self.record_end(
            kind,
            &version,
            RolloutEnd::RolledBack,
            format!("rolled back: {reason}"),
        );
        self.notify(HookType::RolledBack, kind, &version, Some(&reason));
        self.end_promotion(kind);
        Outcome::RolledBack {
            kind,
            version,
            reason,
        }
    }

    /// Gives the new version its next step's weight; all of it completes the promotion.
    fn take_step(&mut self, kind: ModuleKind, now: Instant) -> Option<Outcome> {
        let promotion = self.promotions.get(&kind)?;
        let version = promotion.version.clone();
        let current = self.weights.get(&kind).cloned().unwrap_or_default();
        let weight = next_weight(
            current.get(&version).copied().unwrap_or(0),
            promotion.step_percent,
            self.policy(kind).max_weight,
        );
        self.replace_weights(kind, with_weight(&current, &version, weight, None));
        if weight == 100 {
            self.record_end(
                kind,
                &version,
                RolloutEnd::Promoted,
                "promoted: it takes all traffic".into(),
            );
            self.notify(HookType::Promoted, kind, &version, None);
            self.end_promotion(kind);
            return Some(Outcome::Promoted { kind, version });
        }
        // Traffic while a gate was asked came at the old weight: the next window starts here.
        let window = analysis::baseline(
            self.instances
                .values()
                .filter(|i| i.kind == kind && i.version == version),
        );
        let promotion = self.promotions.get_mut(&kind)?;
        promotion.step += 1;
        promotion.phase = Phase::Progressing;
        promotion.last_check = now;
        promotion.window = Some(window);
        let step = promotion.step;
        self.record_event(
            kind,
            &version,
            format!("step {step}: {version} at {weight} %"),
        );
        Some(Outcome::Stepped {
            kind,
            version,
            step,
            weight,
        })
    }

    /// Analyses every rollout whose interval has passed and acts on the verdict. Returns what
    /// happened and the gate calls to make before the steps that passed.
    pub fn check_rollouts(
        &mut self,
        now: Instant,
        wall: SystemTime,
    ) -> (Vec<Outcome>, Vec<GateCall>) {
        let due: Vec<ModuleKind> = self
            .promotions
            .iter()
            .filter(|(kind, p)| {
                p.phase != Phase::AwaitingGate
                    && now.duration_since(p.last_check)
                        >= Duration::from_millis(self.policy(**kind).step_interval_ms)
            })
            .map(|(kind, _)| *kind)
            .collect();
        let mut outcomes = Vec::new();
        let mut gates = Vec::new();
        for kind in due {
            let policy = self.policy(kind).clone();
            let Some(promotion) = self.promotions.get(&kind) else {
                continue;
            };
            let (version, phase, window) = (
                promotion.version.clone(),
                promotion.phase,
                promotion.window.clone(),
            );
            let (fresh_window, result) = {
                let of = |version: &str| -> Vec<&Instance> {
                    self.instances
                        .values()
                        .filter(|i| i.kind == kind && i.version == version)
                        .collect()
                };
                let canary = of(&version);
                let healthy = canary.iter().any(|i| {
                    matches!(
                        i.health(now, &self.settings),
                        pb::HealthStatus::Healthy | pb::HealthStatus::Degraded
                    )
                });
                let stable = of(&promotion.stable);
                let result = window.as_ref().map(|window| {
                    analysis::analyse(&canary, healthy, &stable, window, &policy, unix_ms(wall))
                });
                (analysis::baseline(canary), result)
            };
            if policy.paused {
                if let Some(p) = self.promotions.get_mut(&kind) {
                    p.phase = Phase::Paused;
                    p.last_check = now;
                    p.window = None;
                    // A pause is the operator's: the progress deadline starts over after it.
                    p.held_since = None;
                }
                if phase != Phase::Paused {
                    self.record_event(kind, &version, "paused by the operator".into());
                }
                continue;
            }
            if phase == Phase::Paused {
                self.record_event(kind, &version, "resumed by the operator".into());
            }
            let Some(promotion) = self.promotions.get_mut(&kind) else {
                continue;
            };
            promotion.window = Some(fresh_window);
            promotion.last_check = now;
            if phase == Phase::Paused {
                promotion.phase = Phase::Progressing;
            }
            // The first check after a start, restart or resume only opens the window.
            let Some(result) = result else {
                continue;
            };
            let verdict = result.verdict.clone();
            promotion.last_analysis = Some(result);
            outcomes.push(Outcome::Analysed {
                kind,
                version: version.clone(),
                verdict: verdict.clone(),
            });
            match verdict {
                Verdict::Fail(reason) => {
                    promotion.phase = Phase::Progressing;
                    promotion.held_since = None;
                    promotion.failed_checks += 1;
                    let failed = promotion.failed_checks;
                    self.record_event(
                        kind,
                        &version,
                        format!(
                            "analysis failed ({failed}, {} tolerated): {reason}",
                            policy.failed_checks_tolerated
                        ),
                    );
                    if failed > policy.failed_checks_tolerated {
                        outcomes.push(self.roll_back_by_itself(
                            kind,
                            format!("{failed} failed analyses, the last: {reason}"),
                        ));
                    }
                }
                Verdict::Hold(reason) => {
                    let since = *promotion.held_since.get_or_insert(now);
                    let was = std::mem::replace(&mut promotion.phase, Phase::HeldForTraffic);
                    let deadline = Duration::from_millis(policy.progress_deadline_ms);
                    if now.duration_since(since) >= deadline {
                        outcomes.push(self.roll_back_by_itself(
                            kind,
                            format!(
                                "no progress within the deadline of {} s: {reason}",
                                deadline.as_secs()
                            ),
                        ));
                    } else if was != Phase::HeldForTraffic {
                        self.record_event(kind, &version, format!("holding: {reason}"));
                        outcomes.push(Outcome::Held {
                            kind,
                            version,
                            reason,
                        });
                    }
                }
                Verdict::Pass => {
                    promotion.held_since = None;
                    let hooks: Vec<Webhook> = policy.hooks(HookType::Gate).cloned().collect();
                    if hooks.is_empty() {
                        outcomes.extend(self.take_step(kind, now));
                        continue;
                    }
                    promotion.phase = Phase::AwaitingGate;
                    let (token, step_percent) = (promotion.token(), promotion.step_percent);
                    let next = next_weight(
                        self.weight_of(kind, &version),
                        step_percent,
                        policy.max_weight,
                    );
                    let payload = self.hook_payload(
                        HookType::Gate,
                        kind,
                        &version,
                        json!({ "next_weight": next }),
                    );
                    gates.push(GateCall {
                        kind,
                        token,
                        hooks,
                        payload,
                    });
                }
            }
        }
        (outcomes, gates)
    }

    /// The gate webhooks' answer to `call`: the step is taken, or held with `refusal` as why.
    pub fn gate_answered(
        &mut self,
        call: &GateCall,
        refusal: Option<String>,
        now: Instant,
    ) -> Option<Outcome> {
        let paused = self.policy(call.kind).paused;
        let promotion = self
            .promotions
            .get_mut(&call.kind)
            .filter(|p| p.token() == call.token && p.phase == Phase::AwaitingGate)?;
        if paused {
            // Paused while the gate was asked: the next check after the resume starts afresh.
            promotion.phase = Phase::Progressing;
            promotion.last_check = now;
            return None;
        }
        let Some(reason) = refusal else {
            return self.take_step(call.kind, now);
        };
        promotion.phase = Phase::HeldByGate;
        promotion.last_check = now;
        let version = promotion.version.clone();
        self.record_event(call.kind, &version, format!("held by a gate: {reason}"));
        Some(Outcome::Held {
            kind: call.kind,
            version,
            reason,
        })
    }

    /// A gate answer that came while this NLB handed over: the step is analysed and asked for
    /// again (here, if the takeover fails).
    pub fn gate_dropped(&mut self, call: &GateCall, now: Instant) {
        if let Some(promotion) = self
            .promotions
            .get_mut(&call.kind)
            .filter(|p| p.token() == call.token && p.phase == Phase::AwaitingGate)
        {
            promotion.phase = Phase::Progressing;
            promotion.last_check = now;
        }
    }

    /// A kind's rollout as status shows it (GetNLBStatus details, the console, marchctl).
    pub fn rollout_status(&self, kind: ModuleKind, now: Instant) -> serde_json::Value {
        let rollout = self.promotions.get(&kind).map(|p| {
            let interval = Duration::from_millis(self.policy(kind).step_interval_ms);
            json!({
                "version": p.version,
                "stable_version": p.stable,
                "step": p.step,
                "step_percent": p.step_percent,
                "weight": self.weight_of(kind, &p.version),
                "phase": p.phase,
                "failed_checks": p.failed_checks,
                "failed_checks_tolerated": self.policy(kind).failed_checks_tolerated,
                "started_unix_ms": unix_ms(p.started),
                "next_check_in_ms": interval.saturating_sub(now.duration_since(p.last_check)).as_millis() as u64,
                "last_analysis": p.last_analysis,
                "paused": self.policy(kind).paused,
                "affinity": self.policy(kind).affinity,
            })
        });
        json!({
            "kind": kind.name(),
            "weights": self.weights.get(&kind).cloned().unwrap_or_default(),
            "rollout": rollout,
            "last_end": self.events(kind).rev().find(|e| e.end.is_some()),
            "events": self.events(kind).collect::<VecDeque<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_climb_to_the_max_weight_then_switch_fully() {
        let mut weight = 0;
        let mut seen = Vec::new();
        while weight < 100 {
            weight = next_weight(weight, 20, 50);
            seen.push(weight);
        }
        assert_eq!(seen, [20, 40, 50, 100]);
        assert_eq!(next_weight(90, 20, 100), 100);
    }
}
