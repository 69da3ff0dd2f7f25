//! The `rollout` config section: how gradual promotions step and judge the new version, as
//! defaults for every module kind with per-kind overrides under `kinds`.
//!
//! ```json
//! {"step_interval_ms": 30000, "step_percent": 10, "max_weight": 50,
//!  "min_success_ratio": 0.95, "max_p99_latency_ms": 0, "max_p99_latency_ratio": 0,
//!  "min_requests": 20, "max_connect_failures": 3, "failed_checks_tolerated": 2,
//!  "progress_deadline_ms": 600000, "affinity": false, "affinity_idle_ms": 1800000,
//!  "paused": false, "webhooks": [],
//!  "kinds": {"alb": {"step_percent": 20, "paused": true}}}
//! ```
//!
//! A kind's policy is the defaults with its `kinds` entry merged over them, resolved once when
//! the section changes so the data plane reads it without parsing anything.

use std::collections::BTreeMap;

use marchproxy::names::ModuleKind;
use serde::{Deserialize, Serialize};

/// One module kind's rollout policy; keys left out take their defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Time between two analyses (and so between two steps).
    pub step_interval_ms: u64,
    /// Percent added per passing step; PromoteVersion's `promotion_rate` overrides it.
    pub step_percent: u32,
    /// Once the new version carries this much, the next passing analysis gives it everything.
    pub max_weight: u32,
    /// The new version's successful share of requests (its heartbeats' counters over the
    /// analysis window, the NLB's failed connects to it counted as failures) must be at least
    /// this.
    pub min_success_ratio: f64,
    /// The new version's p99 latency (its heartbeats) must stay at or under this; 0: no bound.
    pub max_p99_latency_ms: f64,
    /// ... and at or under this multiple of the stable version's p99; 0: no bound.
    pub max_p99_latency_ratio: f64,
    /// Requests (or, for modules that count none, connections) the new version must have had in
    /// the window before it is judged at all; fewer holds the step.
    pub min_requests: u64,
    /// Failed connects from the NLB to the new version in one window that fail the analysis.
    pub max_connect_failures: u64,
    /// Failed analyses tolerated over a rollout; the next one rolls back.
    pub failed_checks_tolerated: u32,
    /// How long a step may be held for too little traffic (or no instance of the new version)
    /// before the rollout is rolled back; never promote on silence.
    pub progress_deadline_ms: u64,
    /// During a rollout, a client (by source IP) keeps the version it first reached.
    pub affinity: bool,
    /// A client silent this long is placed afresh by the weights.
    pub affinity_idle_ms: u64,
    /// A paused rollout takes no step and no analysis until resumed.
    pub paused: bool,
    pub webhooks: Vec<Webhook>,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            step_interval_ms: 30_000,
            step_percent: 10,
            max_weight: 50,
            min_success_ratio: 0.95,
            max_p99_latency_ms: 0.0,
            max_p99_latency_ratio: 0.0,
            min_requests: 20,
            max_connect_failures: 3,
            failed_checks_tolerated: 2,
            progress_deadline_ms: 600_000,
            affinity: false,
            affinity_idle_ms: 1_800_000,
            paused: false,
            webhooks: Vec::new(),
        }
    }
}

/// When a webhook is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookType {
    /// Before a gradual promotion starts; a non-2xx answer refuses the PromoteVersion.
    PreRollout,
    /// Before each step; a non-2xx answer holds the step until the next analysis.
    Gate,
    /// After the new version took all traffic (a notification).
    Promoted,
    /// After a rollout was rolled back, by itself or by an operator (a notification).
    RolledBack,
}

impl HookType {
    pub fn name(self) -> &'static str {
        match self {
            HookType::PreRollout => "pre-rollout",
            HookType::Gate => "gate",
            HookType::Promoted => "promoted",
            HookType::RolledBack => "rolled-back",
        }
    }
}

/// An HTTP endpoint the rollout POSTs its state to (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub name: String,
    #[serde(rename = "type")]
    pub hook: HookType,
    /// http:// or https://.
    pub url: String,
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_webhook_timeout_ms() -> u64 {
    5_000
}

impl RolloutPolicy {
    fn check(&self, at: &str, errors: &mut Vec<String>) {
        let mut bad = |key: &str, rule: &str, got: String| {
            errors.push(format!("{at}{key} must be {rule} (got {got})"));
        };
        if !(100..=3_600_000).contains(&self.step_interval_ms) {
            bad(
                "step_interval_ms",
                "from 100 to 3600000",
                self.step_interval_ms.to_string(),
            );
        }
        if !(1..=100).contains(&self.step_percent) {
            bad(
                "step_percent",
                "from 1 to 100",
                self.step_percent.to_string(),
            );
        }
        if !(1..=100).contains(&self.max_weight) {
            bad("max_weight", "from 1 to 100", self.max_weight.to_string());
        }
        if !(0.0..=1.0).contains(&self.min_success_ratio) {
            bad(
                "min_success_ratio",
                "from 0 to 1",
                self.min_success_ratio.to_string(),
            );
        }
        if !(self.max_p99_latency_ms >= 0.0 && self.max_p99_latency_ms.is_finite()) {
            bad(
                "max_p99_latency_ms",
                "0 (no bound) or more",
                self.max_p99_latency_ms.to_string(),
            );
        }
        if !(self.max_p99_latency_ratio == 0.0
            || (self.max_p99_latency_ratio >= 1.0 && self.max_p99_latency_ratio.is_finite()))
        {
            bad(
                "max_p99_latency_ratio",
                "0 (no bound) or at least 1",
                self.max_p99_latency_ratio.to_string(),
            );
        }
        if self.progress_deadline_ms < self.step_interval_ms {
            bad(
                "progress_deadline_ms",
                "at least step_interval_ms",
                self.progress_deadline_ms.to_string(),
            );
        }
        if self.affinity_idle_ms == 0 {
            bad("affinity_idle_ms", "above 0", "0".into());
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            let url_ok = hook
                .url
                .parse::<hyper::Uri>()
                .is_ok_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")));
            if !url_ok {
                bad(
                    &format!("webhooks[{i}].url"),
                    "an http:// or https:// URL",
                    format!("`{}`", hook.url),
                );
            }
            if !(1..=60_000).contains(&hook.timeout_ms) {
                bad(
                    &format!("webhooks[{i}].timeout_ms"),
                    "from 1 to 60000",
                    hook.timeout_ms.to_string(),
                );
            }
        }
    }

    /// The webhooks of one type.
    pub fn hooks(&self, hook: HookType) -> impl Iterator<Item = &Webhook> {
        self.webhooks.iter().filter(move |w| w.hook == hook)
    }
}

/// The whole section: defaults, each kind's overrides, and the policies they resolve to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RolloutSettings {
    defaults: RolloutPolicy,
    /// Keys set for one kind, over the defaults.
    overrides: BTreeMap<ModuleKind, serde_json::Map<String, serde_json::Value>>,
    resolved: BTreeMap<ModuleKind, RolloutPolicy>,
}

impl RolloutSettings {
    /// The policy in effect for a kind.
    pub fn policy(&self, kind: ModuleKind) -> &RolloutPolicy {
        self.resolved.get(&kind).unwrap_or(&self.defaults)
    }

    /// The section as JSON: the defaults' keys and `kinds`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = match serde_json::to_value(&self.defaults) {
            Ok(serde_json::Value::Object(object)) => object,
            _ => serde_json::Map::new(),
        };
        let kinds = self
            .overrides
            .iter()
            .map(|(kind, keys)| (kind.name().to_owned(), keys.clone().into()))
            .collect();
        object.insert("kinds".into(), serde_json::Value::Object(kinds));
        serde_json::Value::Object(object)
    }

    /// Reads the section from JSON, each problem naming its key.
    pub fn from_json(value: serde_json::Value) -> Result<Self, Vec<String>> {
        let serde_json::Value::Object(mut object) = value else {
            return Err(vec!["rollout must be a JSON object".into()]);
        };
        let kinds = object
            .remove("kinds")
            .unwrap_or(serde_json::Value::Object(serde_json::Map::new()));
        let defaults_json = serde_json::Value::Object(object);
        let defaults: RolloutPolicy = parse("rollout.", defaults_json.clone())?;
        let mut errors = Vec::new();
        defaults.check("rollout.", &mut errors);
        let serde_json::Value::Object(kinds) = kinds else {
            return Err(vec![
                "rollout.kinds must be an object of module kind -> policy keys".into(),
            ]);
        };
        let mut overrides = BTreeMap::new();
        let mut resolved = BTreeMap::new();
        for (name, keys) in kinds {
            // `"alb": null` removes alb's overrides.
            if keys.is_null() {
                continue;
            }
            let at = format!("rollout.kinds.{name}.");
            let Ok(kind) = name.parse::<ModuleKind>() else {
                errors.push(format!(
                    "rollout.kinds: `{name}` is not a module kind (alb, dblb, ailb, rtmp, ...)"
                ));
                continue;
            };
            let serde_json::Value::Object(keys) = keys else {
                errors.push(format!("{at} must be an object of policy keys"));
                continue;
            };
            let mut merged = defaults_json.clone();
            super::settings::merge(&mut merged, &serde_json::Value::Object(keys.clone()));
            match parse::<RolloutPolicy>(&at, merged) {
                Ok(policy) => {
                    policy.check(&at, &mut errors);
                    resolved.insert(kind, policy);
                    overrides.insert(kind, keys);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(RolloutSettings {
                defaults,
                overrides,
                resolved,
            })
        } else {
            Err(errors)
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    at: &str,
    value: serde_json::Value,
) -> Result<T, Vec<String>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path == "." {
            vec![format!("{}: {inner}", at.trim_end_matches('.'))]
        } else {
            vec![format!("{at}{path}: {inner}")]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_kind_overrides_only_what_it_names() {
        let settings = RolloutSettings::from_json(json!({
            "step_percent": 5,
            "kinds": {"alb": {"step_percent": 20, "paused": true}}
        }))
        .unwrap();
        assert_eq!(settings.policy(ModuleKind::Alb).step_percent, 20);
        assert!(settings.policy(ModuleKind::Alb).paused);
        assert_eq!(settings.policy(ModuleKind::Dblb).step_percent, 5);
        assert!(!settings.policy(ModuleKind::Dblb).paused);
        let again = RolloutSettings::from_json(settings.to_json()).unwrap();
        assert_eq!(again, settings);
    }

    #[test]
    fn problems_name_their_key() {
        let errors = RolloutSettings::from_json(json!({
            "step_percent": 0,
            "kinds": {"alb": {"min_success_ratio": 2}, "teapot": {}},
            "webhooks": [{"name": "w", "type": "gate", "url": "ftp://x"}]
        }))
        .unwrap_err();
        let all = errors.join("\n");
        for key in [
            "rollout.step_percent",
            "rollout.kinds.alb.min_success_ratio",
            "`teapot`",
            "rollout.webhooks[0].url",
        ] {
            assert!(all.contains(key), "{key} missing in {all}");
        }
        let errors = RolloutSettings::from_json(json!({"kinds": {"alb": {"stepp": 1}}}))
            .unwrap_err()
            .join("\n");
        assert!(
            errors.contains("rollout.kinds.alb") && errors.contains("stepp"),
            "{errors}"
        );
    }
}
