//! Blue/green traffic shifting: per module kind, the split of new connections between versions,
//! set by operators (`SetTrafficWeight`), moved all at once or step by step (`PromoteVersion`),
//! and undone (`Rollback`, or by itself when a gradual promotion sees the new version fail).
//!
//! The weight arithmetic is plain functions over a version -> percent map; [`State`] keeps the
//! maps, the running promotions and the previous active version per kind.

use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use marchproxy::{names::ModuleKind, pb};
use serde::{Deserialize, Serialize};

use crate::{error::NlbError, state::State};

/// Weights per version; they add up to 100 when any version exists.
pub type Weights = BTreeMap<String, u32>;

/// The active version: the highest weight, ties to the first name.
pub fn active(weights: &Weights) -> Option<&str> {
    weights
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(version, _)| version.as_str())
}

/// `weights` with `version` at `weight` and the rest shared by the other versions in proportion
/// to what they had (all of it to `fallback` when they had nothing).
pub fn with_weight(
    weights: &Weights,
    version: &str,
    weight: u32,
    fallback: Option<&str>,
) -> Weights {
    let remaining = 100 - weight.min(100);
    let others: Vec<(&String, u32)> = weights
        .iter()
        .filter(|(v, _)| *v != version)
        .map(|(v, w)| (v, *w))
        .collect();
    let sum: u32 = others.iter().map(|(_, w)| w).sum();
    let mut next = Weights::new();
    next.insert(version.to_owned(), weight.min(100));
    let Some(nonzero) = std::num::NonZeroU32::new(sum) else {
        for (other, _) in &others {
            next.insert((*other).clone(), 0);
        }
        if let Some(fallback) = fallback.filter(|f| *f != version) {
            next.insert(fallback.to_owned(), remaining);
        }
        return next;
    };
    let mut given = 0;
    for (other, w) in &others {
        let share = w * remaining / nonzero;
        given += share;
        next.insert((*other).clone(), share);
    }
    // Rounding leaves a few points over: they go to the largest of the others.
    if let Some((largest, _)) = others.iter().max_by_key(|(_, w)| *w) {
        if let Some(w) = next.get_mut(*largest) {
            *w += remaining - given;
        }
    }
    next
}

/// Rollout settings (config section `rollout`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSettings {
    /// Time between two steps of a gradual promotion.
    pub step_interval_ms: u64,
    /// Percent added per step when PromoteVersion gives no `promotion_rate`.
    pub default_step_percent: u32,
    /// Above this failed/total request ratio of the new version (from its heartbeats), roll back.
    pub max_error_ratio: f64,
    /// Requests the new version must have served before its error ratio counts.
    pub min_requests: i64,
    /// Failed connects from the NLB to the new version during one step that roll back.
    pub max_connect_failures: u64,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            step_interval_ms: 30_000,
            default_step_percent: 10,
            max_error_ratio: 0.05,
            min_requests: 20,
            max_connect_failures: 3,
        }
    }
}

impl RolloutSettings {
    pub fn check(&self, errors: &mut Vec<String>) {
        if !(100..=3_600_000).contains(&self.step_interval_ms) {
            errors.push(format!(
                "rollout.step_interval_ms must be from 100 to 3600000 (got {})",
                self.step_interval_ms
            ));
        }
        if !(1..=100).contains(&self.default_step_percent) {
            errors.push(format!(
                "rollout.default_step_percent must be from 1 to 100 (got {})",
                self.default_step_percent
            ));
        }
        if !(0.0..=1.0).contains(&self.max_error_ratio) {
            errors.push(format!(
                "rollout.max_error_ratio must be from 0 to 1 (got {})",
                self.max_error_ratio
            ));
        }
        if self.min_requests < 0 {
            errors.push("rollout.min_requests must not be negative".into());
        }
    }
}

/// A gradual promotion under way.
#[derive(Clone, Debug)]
pub struct Promotion {
    pub version: String,
    pub step_percent: u32,
    /// The split before it began, restored by a rollback.
    pub before: Weights,
    pub started: SystemTime,
    pub last_step: Instant,
    /// Connect failures to the version when the current step began.
    pub failures_at_step: u64,
}

/// What a promotion step decided.
#[derive(Debug, PartialEq)]
pub enum Step {
    Advanced {
        kind: ModuleKind,
        version: String,
        weight: u32,
    },
    Completed {
        kind: ModuleKind,
        version: String,
    },
    RolledBack {
        kind: ModuleKind,
        version: String,
        reason: String,
    },
}

impl State {
    /// The module kind an `instance_id` field names: a kind (`alb`) or a registered instance.
    pub fn kind_named(&self, id: &str) -> Result<ModuleKind, NlbError> {
        if id.trim().is_empty() {
            return Err(NlbError::Invalid(
                "instance_id is empty; name a module kind (alb, dblb, ...) or an instance".into(),
            ));
        }
        if let Ok(kind) = id.parse::<ModuleKind>() {
            return Ok(kind);
        }
        self.instance(id).map(|i| i.kind)
    }

    fn versions_of(&self, kind: ModuleKind) -> Vec<String> {
        let mut versions: Vec<String> = self
            .instances
            .values()
            .filter(|i| i.kind == kind)
            .map(|i| i.version.clone())
            .collect();
        versions.sort();
        versions.dedup();
        versions
    }

    fn check_version(&self, kind: ModuleKind, version: &str) -> Result<(), NlbError> {
        if version.trim().is_empty() {
            return Err(NlbError::Invalid(
                "version is empty; name the version (GetActiveVersion lists them)".into(),
            ));
        }
        let known = self
            .weights
            .get(&kind)
            .is_some_and(|w| w.contains_key(version))
            || self.versions_of(kind).iter().any(|v| v == version);
        if known {
            Ok(())
        } else {
            Err(NlbError::NotFound(format!(
                "{kind} has no version `{version}`; versions: {}",
                self.versions_of(kind).join(", ")
            )))
        }
    }

    fn replace_weights(&mut self, kind: ModuleKind, next: Weights) {
        let before = self
            .weights
            .get(&kind)
            .and_then(|w| active(w).map(str::to_owned));
        let after = active(&next).map(str::to_owned);
        if before.is_some() && before != after {
            if let Some(previous) = before {
                self.previous_active.insert(kind, previous);
            }
        }
        self.weights.insert(kind, next);
        self.generation += 1;
    }

    /// `SetTrafficWeight`: an operator's split; it ends any promotion of the kind.
    pub fn set_weight(
        &mut self,
        kind: ModuleKind,
        version: &str,
        weight: i32,
    ) -> Result<(), NlbError> {
        let weight = u32::try_from(weight)
            .ok()
            .filter(|w| *w <= 100)
            .ok_or_else(|| {
                NlbError::Invalid(format!("weight must be from 0 to 100 (got {weight})"))
            })?;
        self.check_version(kind, version)?;
        let current = self.weights.get(&kind).cloned().unwrap_or_default();
        if weight < 100 && !current.keys().any(|v| v != version) {
            return Err(NlbError::Invalid(format!(
                "`{version}` is the only version of {kind}; it carries all traffic until another version registers"
            )));
        }
        let fallback = self
            .previous_active
            .get(&kind)
            .cloned()
            .or_else(|| current.keys().find(|v| *v != version).cloned());
        let next = with_weight(&current, version, weight, fallback.as_deref());
        self.promotions.remove(&kind);
        self.replace_weights(kind, next);
        Ok(())
    }

    /// `PromoteVersion`: all traffic to `version` now, or step by step.
    pub fn promote(
        &mut self,
        kind: ModuleKind,
        version: &str,
        immediate: bool,
        rate: i32,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), NlbError> {
        self.check_version(kind, version)?;
        if !(0..=100).contains(&rate) {
            return Err(NlbError::Invalid(format!(
                "promotion_rate must be from 0 (the rollout default) to 100 (got {rate})"
            )));
        }
        let current = self.weights.get(&kind).cloned().unwrap_or_default();
        if immediate {
            self.promotions.remove(&kind);
            self.replace_weights(kind, with_weight(&current, version, 100, None));
            return Ok(());
        }
        if current.get(version) == Some(&100) {
            return Err(NlbError::Invalid(format!(
                "`{version}` already carries all of {kind}'s traffic"
            )));
        }
        let step_percent = if rate == 0 {
            self.settings.rollout.default_step_percent
        } else {
            rate as u32
        };
        let promotion = Promotion {
            version: version.to_owned(),
            step_percent,
            before: current.clone(),
            started: wall,
            last_step: now,
            failures_at_step: self.connect_failures_of(kind, version),
        };
        let first = (current.get(version).copied().unwrap_or(0) + step_percent).min(100);
        self.promotions.insert(kind, promotion);
        self.replace_weights(kind, with_weight(&current, version, first, None));
        Ok(())
    }

    /// `Rollback`: undoes a running promotion, or gives `target` (else the previous active
    /// version) all traffic. Returns (previous active, now active).
    pub fn rollback(
        &mut self,
        kind: ModuleKind,
        target: &str,
    ) -> Result<(String, String), NlbError> {
        let current = self.weights.get(&kind).cloned().unwrap_or_default();
        let was = active(&current).unwrap_or_default().to_owned();
        let next =
            if let Some(promotion) = self.promotions.remove(&kind).filter(|_| target.is_empty()) {
                promotion.before
            } else {
                let target = if target.is_empty() {
                    self.previous_active.get(&kind).cloned().ok_or_else(|| {
                        NlbError::Invalid(format!(
                            "{kind} has no previous version to return to; name target_version"
                        ))
                    })?
                } else {
                    target.to_owned()
                };
                self.check_version(kind, &target)?;
                self.promotions.remove(&kind);
                with_weight(&current, &target, 100, None)
            };
        self.replace_weights(kind, next);
        let now_active = self
            .weights
            .get(&kind)
            .and_then(|w| active(w))
            .unwrap_or_default()
            .to_owned();
        Ok((was, now_active))
    }

    /// The split of a kind as `GetActiveVersion` reports it.
    pub fn version_weights(&self, kind: ModuleKind) -> std::collections::HashMap<String, i32> {
        self.weights
            .get(&kind)
            .map(|w| w.iter().map(|(v, w)| (v.clone(), *w as i32)).collect())
            .unwrap_or_default()
    }

    fn connect_failures_of(&self, kind: ModuleKind, version: &str) -> u64 {
        self.instances
            .values()
            .filter(|i| i.kind == kind && i.version == version)
            .map(|i| i.connect_failures_total)
            .sum()
    }

    /// Moves every promotion whose step interval has passed: forward when the new version is
    /// healthy, back to where it began when it fails.
    pub fn step_promotions(&mut self, now: Instant) -> Vec<Step> {
        let interval = std::time::Duration::from_millis(self.settings.rollout.step_interval_ms);
        let due: Vec<ModuleKind> = self
            .promotions
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_step) >= interval)
            .map(|(k, _)| *k)
            .collect();
        let mut steps = Vec::new();
        for kind in due {
            let Some(promotion) = self.promotions.get(&kind).cloned() else {
                continue;
            };
            let version = promotion.version.clone();
            // No instance of the version is registered (the NLB just restarted and the modules
            // are still coming back): hold for another step instead of judging.
            if !self
                .instances
                .values()
                .any(|i| i.kind == kind && i.version == version)
            {
                if let Some(p) = self.promotions.get_mut(&kind) {
                    p.last_step = now;
                }
                continue;
            }
            if let Some(reason) = self.failing(kind, &promotion, now) {
                self.promotions.remove(&kind);
                self.replace_weights(kind, promotion.before);
                steps.push(Step::RolledBack {
                    kind,
                    version,
                    reason,
                });
                continue;
            }
            let current = self.weights.get(&kind).cloned().unwrap_or_default();
            let weight =
                (current.get(&version).copied().unwrap_or(0) + promotion.step_percent).min(100);
            self.replace_weights(kind, with_weight(&current, &version, weight, None));
            if weight == 100 {
                self.promotions.remove(&kind);
                steps.push(Step::Completed { kind, version });
            } else {
                let failures = self.connect_failures_of(kind, &version);
                if let Some(p) = self.promotions.get_mut(&kind) {
                    p.last_step = now;
                    p.failures_at_step = failures;
                }
                steps.push(Step::Advanced {
                    kind,
                    version,
                    weight,
                });
            }
        }
        steps
    }

    /// Why the promoted version should not get more traffic, if it should not.
    fn failing(&self, kind: ModuleKind, promotion: &Promotion, now: Instant) -> Option<String> {
        let members: Vec<_> = self
            .instances
            .values()
            .filter(|i| i.kind == kind && i.version == promotion.version)
            .collect();
        let healthy = |i: &&crate::state::Instance| {
            matches!(
                i.health(now, &self.settings),
                pb::HealthStatus::Healthy | pb::HealthStatus::Degraded
            )
        };
        if !members.iter().any(healthy) {
            return Some(format!("no healthy instance of {}", promotion.version));
        }
        let failures = self
            .connect_failures_of(kind, &promotion.version)
            .saturating_sub(promotion.failures_at_step);
        if failures >= self.settings.rollout.max_connect_failures.max(1) {
            return Some(format!(
                "{failures} failed connects from the NLB during the last step"
            ));
        }
        let (total, failed) =
            members
                .iter()
                .filter_map(|i| i.stats.as_ref())
                .fold((0i64, 0i64), |(t, f), s| {
                    (
                        t.saturating_add(s.total_requests),
                        f.saturating_add(s.failed_requests),
                    )
                });
        if total >= self.settings.rollout.min_requests.max(1) {
            let ratio = failed as f64 / total as f64;
            if ratio > self.settings.rollout.max_error_ratio {
                return Some(format!(
                    "error ratio {ratio:.3} ({failed} of {total} requests) is above {}",
                    self.settings.rollout.max_error_ratio
                ));
            }
        }
        None
    }

    /// The running promotion of a kind, for status answers.
    pub fn promotion(&self, kind: ModuleKind) -> Option<&Promotion> {
        self.promotions.get(&kind)
    }
}

/// The `BlueGreenConfig` with the promotion's start when one runs.
pub fn deployment(state: &State, kind: ModuleKind) -> pb::BlueGreenConfig {
    let mut config = state.deployment(kind);
    config.deployment_started = state
        .promotion(kind)
        .map(|p| marchproxy::time::timestamp(p.started));
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(pairs: &[(&str, u32)]) -> Weights {
        pairs.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect()
    }

    #[test]
    fn weights_always_add_up_to_100() {
        let split = with_weight(&weights(&[("v1", 100), ("v2", 0)]), "v2", 20, None);
        assert_eq!(split, weights(&[("v1", 80), ("v2", 20)]));
        let three = with_weight(&weights(&[("a", 50), ("b", 30), ("c", 20)]), "c", 40, None);
        assert_eq!(three.values().sum::<u32>(), 100);
        assert_eq!(three["c"], 40);
        assert!(three["a"] > three["b"]);
        let from_nothing = with_weight(&weights(&[("v1", 0), ("v2", 0)]), "v2", 30, Some("v1"));
        assert_eq!(from_nothing, weights(&[("v1", 70), ("v2", 30)]));
        assert_eq!(active(&weights(&[("v1", 50), ("v2", 50)])), Some("v1"));
        assert_eq!(active(&weights(&[("v1", 10), ("v2", 90)])), Some("v2"));
    }
}
