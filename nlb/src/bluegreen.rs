//! Blue/green traffic shifting: per module kind, the split of new connections between versions,
//! set by operators (`SetTrafficWeight`), moved all at once or step by step (`PromoteVersion`,
//! stepped by [`crate::rollout`]), and undone (`Rollback`).
//!
//! The weight arithmetic is plain functions over a version -> percent map; [`State`] keeps the
//! maps, the running promotions and the previous active version per kind.

use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use marchproxy::{names::ModuleKind, pb};

use crate::{
    analysis,
    error::NlbError,
    policy::HookType,
    rollout::{Phase, Promotion, RolloutEnd},
    state::State,
};

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

    pub(crate) fn replace_weights(&mut self, kind: ModuleKind, next: Weights) {
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
        self.replace_weights(kind, next);
        self.stop_rollout(kind, &format!("{version} set to {weight} %"));
        Ok(())
    }

    /// Whether `PromoteVersion` would be accepted, before the pre-rollout webhooks are asked.
    pub fn check_promote(
        &self,
        kind: ModuleKind,
        version: &str,
        immediate: bool,
        rate: i32,
    ) -> Result<(), NlbError> {
        self.check_version(kind, version)?;
        if !(0..=100).contains(&rate) {
            return Err(NlbError::Invalid(format!(
                "promotion_rate must be from 0 (the rollout default) to 100 (got {rate})"
            )));
        }
        if !immediate && self.weight_of(kind, version) == 100 {
            return Err(NlbError::Invalid(format!(
                "`{version}` already carries all of {kind}'s traffic"
            )));
        }
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
        self.check_promote(kind, version, immediate, rate)?;
        let current = self.weights.get(&kind).cloned().unwrap_or_default();
        if immediate {
            self.replace_weights(kind, with_weight(&current, version, 100, None));
            if !self.stop_rollout(kind, &format!("{version} promoted at once")) {
                self.record_event(kind, version, "promoted at once by the operator".into());
            }
            return Ok(());
        }
        let policy = self.policy(kind);
        let step_percent = if rate == 0 {
            policy.step_percent
        } else {
            rate as u32
        };
        // One step up to the policy's cap, never below what the version already has.
        let now_weight = current.get(version).copied().unwrap_or(0);
        let first = (now_weight + step_percent)
            .min(policy.max_weight.max(step_percent).max(now_weight))
            .min(100);
        let stable = active(&current)
            .filter(|v| *v != version)
            .map(str::to_owned)
            .or_else(|| current.keys().find(|v| *v != version).cloned())
            .unwrap_or_default();
        let window = analysis::baseline(
            self.instances
                .values()
                .filter(|i| i.kind == kind && i.version == version),
        );
        self.stop_rollout(kind, &format!("a rollout of {version} started"));
        self.promotions.insert(
            kind,
            Promotion {
                version: version.to_owned(),
                stable: stable.clone(),
                step_percent,
                before: current.clone(),
                started: wall,
                step: 1,
                failed_checks: 0,
                phase: Phase::Progressing,
                last_check: now,
                held_since: None,
                window: Some(window),
                last_analysis: None,
            },
        );
        self.replace_weights(kind, with_weight(&current, version, first, None));
        self.record_event(
            kind,
            version,
            format!("started from {stable}: step 1, {version} at {first} %, +{step_percent} % per passing analysis"),
        );
        Ok(())
    }

    /// Ends a running rollout of the kind that an operator's change overrides; false when none
    /// ran.
    fn stop_rollout(&mut self, kind: ModuleKind, why: &str) -> bool {
        let Some(version) = self.promotions.get(&kind).map(|p| p.version.clone()) else {
            return false;
        };
        self.record_end(
            kind,
            &version,
            RolloutEnd::Stopped,
            format!("ended by the operator: {why}"),
        );
        self.end_promotion(kind);
        true
    }

    /// `Rollback`: undoes a running promotion, or gives `target` (else the previous active
    /// version) all traffic. Returns (previous active, now active, whether a rollout ended).
    pub fn rollback(
        &mut self,
        kind: ModuleKind,
        target: &str,
    ) -> Result<(String, String, bool), NlbError> {
        let current = self.weights.get(&kind).cloned().unwrap_or_default();
        let was = active(&current).unwrap_or_default().to_owned();
        let next = match self.promotions.get(&kind).filter(|_| target.is_empty()) {
            Some(promotion) => promotion.before.clone(),
            None => {
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
                with_weight(&current, &target, 100, None)
            }
        };
        self.replace_weights(kind, next);
        let running = self.promotions.get(&kind).map(|p| p.version.clone());
        if let Some(version) = &running {
            let reason = "rolled back by the operator";
            self.record_end(kind, version, RolloutEnd::RolledBack, reason.into());
            self.notify(HookType::RolledBack, kind, version, Some(reason));
            self.end_promotion(kind);
        }
        let now_active = self
            .weights
            .get(&kind)
            .and_then(|w| active(w))
            .unwrap_or_default()
            .to_owned();
        Ok((was, now_active, running.is_some()))
    }

    /// The split of a kind as `GetActiveVersion` reports it.
    pub fn version_weights(&self, kind: ModuleKind) -> std::collections::HashMap<String, i32> {
        self.weights
            .get(&kind)
            .map(|w| w.iter().map(|(v, w)| (v.clone(), *w as i32)).collect())
            .unwrap_or_default()
    }

    /// The running promotion of a kind.
    pub fn promotion(&self, kind: ModuleKind) -> Option<&Promotion> {
        self.promotions.get(&kind)
    }
}

/// The `BlueGreenConfig` of a kind: during a rollout the stable version is blue and the new
/// one green (the canary, with its weight and the rollout's start); otherwise the serving
/// version is blue and the next one green.
pub fn deployment(state: &State, kind: ModuleKind) -> pb::BlueGreenConfig {
    let mut config = state.deployment(kind);
    if let Some(p) = state.promotion(kind) {
        let green_weight = state.weight_of(kind, &p.version) as i32;
        config.blue_version = p.stable.clone();
        config.blue_weight = state.weight_of(kind, &p.stable) as i32;
        config.green_version = p.version.clone();
        config.green_weight = green_weight;
        config.canary_enabled = true;
        config.canary_percent = green_weight;
        config.deployment_started = Some(marchproxy::time::timestamp(p.started));
    }
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
