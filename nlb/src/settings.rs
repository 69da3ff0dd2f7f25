//! The NLB's live configuration sections, read and written through `GetNLBConfig` /
//! `UpdateNLBConfig` as JSON objects (`config_type` names the section).
//!
//! An update is merged over the section's current values, so a client may send only the keys it
//! changes; the result is parsed strictly (unknown keys are errors naming the key) and checked
//! as a whole before anything changes.

use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// When a silent module stops getting traffic, and when it is forgotten.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSettings {
    /// Without a heartbeat for this long a module is UNHEALTHY (no new connections).
    pub unhealthy_after_ms: u64,
    /// Without a heartbeat for this long a module is removed with its routes.
    pub expire_after_ms: u64,
}

impl HeartbeatSettings {
    pub fn unhealthy_after(&self) -> Duration {
        Duration::from_millis(self.unhealthy_after_ms)
    }

    pub fn expire_after(&self) -> Duration {
        Duration::from_millis(self.expire_after_ms)
    }

    fn check(&self, errors: &mut Vec<String>) {
        if self.unhealthy_after_ms == 0 {
            errors.push("heartbeat.unhealthy_after_ms must be above 0".into());
        }
        if self.expire_after_ms <= self.unhealthy_after_ms {
            errors.push(format!(
                "heartbeat.expire_after_ms ({}) must be above unhealthy_after_ms ({})",
                self.expire_after_ms, self.unhealthy_after_ms
            ));
        }
    }
}

/// The hook `TriggerScaling` calls, and how often scaling may change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingSettings {
    /// A shell command run on every scaling decision (empty: none), with the environment
    /// MARCHPROXY_MODULE_TYPE, MARCHPROXY_SCALING_ACTION, MARCHPROXY_CURRENT_INSTANCES,
    /// MARCHPROXY_DESIRED_INSTANCES.
    pub command: String,
    pub command_timeout_seconds: u32,
    /// The Docker Engine API socket the Docker scaler starts and stops module containers
    /// through (empty: no Docker scaler).
    #[serde(default)]
    pub docker_socket: String,
    /// Minimum time between two scaling decisions for one module kind.
    pub cooldown_seconds: u32,
}

impl ScalingSettings {
    fn check(&self, errors: &mut Vec<String>) {
        if self.command_timeout_seconds == 0 || self.command_timeout_seconds > 3600 {
            errors.push("scaling.command_timeout_seconds must be from 1 to 3600".into());
        }
    }
}

/// How the NLB picks an instance among the healthy ones of the chosen version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Fewest live connections; ties taken in turn.
    #[default]
    LeastConnections,
    RoundRobin,
    Random,
}

impl Strategy {
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(text.trim().replace('-', "_"))).ok()
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::LeastConnections => "least_connections",
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancingSettings {
    pub strategy: Strategy,
}

/// Every section, as in effect.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub heartbeat: HeartbeatSettings,
    pub scaling: ScalingSettings,
    pub balancing: BalancingSettings,
    pub rollout: crate::policy::RolloutSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: HeartbeatSettings {
                unhealthy_after_ms: 30_000,
                expire_after_ms: 120_000,
            },
            scaling: ScalingSettings {
                command: String::new(),
                command_timeout_seconds: 30,
                docker_socket: String::new(),
                cooldown_seconds: 0,
            },
            balancing: BalancingSettings::default(),
            rollout: crate::policy::RolloutSettings::default(),
        }
    }
}

/// The section names `config_type` accepts.
pub const SECTIONS: [&str; 4] = ["heartbeat", "scaling", "balancing", "rollout"];

/// Keys only flags and the config file may set: running a command is not something a gRPC
/// caller may ask for.
const FLAG_ONLY: [(&str, &str, &str); 2] = [
    ("scaling", "command", "--scaler-command"),
    ("scaling", "docker_socket", "--scaler-docker"),
];

/// Refuses updates to keys that only flags may set.
pub fn check_api_keys(section: &str, update: &serde_json::Value) -> Result<(), Vec<String>> {
    let errors: Vec<String> = FLAG_ONLY
        .iter()
        .filter(|(s, key, _)| *s == section && update.get(key).is_some())
        .map(|(s, key, flag)| {
            format!(
                "{s}.{key} can only be set with {flag} on the NLB's command line or config file"
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

impl Settings {
    /// One section as JSON.
    pub fn section(&self, name: &str) -> Option<serde_json::Value> {
        match name {
            "heartbeat" => serde_json::to_value(&self.heartbeat).ok(),
            "scaling" => serde_json::to_value(&self.scaling).ok(),
            "balancing" => serde_json::to_value(&self.balancing).ok(),
            "rollout" => Some(self.rollout.to_json()),
            _ => None,
        }
    }

    /// These settings with `update` (a JSON object) merged over section `name`, or every problem
    /// found, each naming its field.
    pub fn with_section(
        &self,
        name: &str,
        update: &serde_json::Value,
    ) -> Result<Settings, Vec<String>> {
        let Some(mut merged) = self.section(name) else {
            return Err(vec![format!(
                "unknown config_type `{name}`; use one of {}",
                SECTIONS.join(", ")
            )]);
        };
        if !update.is_object() {
            return Err(vec![format!(
                "config_data for `{name}` must be a JSON object"
            )]);
        }
        merge(&mut merged, update);
        let mut next = self.clone();
        let mut errors = Vec::new();
        match name {
            "heartbeat" => next.heartbeat = parse(name, merged)?,
            "scaling" => next.scaling = parse(name, merged)?,
            "balancing" => next.balancing = parse(name, merged)?,
            _ => next.rollout = crate::policy::RolloutSettings::from_json(merged)?,
        }
        next.heartbeat.check(&mut errors);
        next.scaling.check(&mut errors);
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }
}

/// Merges `update` over `target`: objects key by key, all the way down (so `{"kinds": {"alb":
/// {"paused": true}}}` leaves alb's other keys alone); anything else replaces what was there.
pub fn merge(target: &mut serde_json::Value, update: &serde_json::Value) {
    match (target, update) {
        (serde_json::Value::Object(target), serde_json::Value::Object(update)) => {
            for (key, value) in update {
                match target.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, update) => *target = update.clone(),
    }
}

fn parse<T: DeserializeOwned>(section: &str, value: serde_json::Value) -> Result<T, Vec<String>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path == "." {
            vec![format!("{section}: {inner}")]
        } else {
            vec![format!("{section}.{path}: {inner}")]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merges_partial_updates() {
        let next = Settings::default()
            .with_section("heartbeat", &json!({"unhealthy_after_ms": 5000}))
            .unwrap();
        assert_eq!(next.heartbeat.unhealthy_after_ms, 5000);
        assert_eq!(next.heartbeat.expire_after_ms, 120_000);
    }

    #[test]
    fn errors_name_the_field() {
        let errors = Settings::default()
            .with_section("heartbeat", &json!({"unhealthy_after_ms": "soon"}))
            .unwrap_err();
        assert!(
            errors[0].contains("heartbeat.unhealthy_after_ms"),
            "{errors:?}"
        );
        assert!(check_api_keys("scaling", &json!({"command": "rm -rf /"})).is_err());
        assert!(check_api_keys("scaling", &json!({"docker_socket": "/run/docker.sock"})).is_err());
        assert!(check_api_keys("scaling", &json!({"cooldown_seconds": 5})).is_ok());
        let errors = Settings::default()
            .with_section("scaling", &json!({"comand": "x"}))
            .unwrap_err();
        assert!(errors[0].contains("comand"), "{errors:?}");
        let errors = Settings::default()
            .with_section("heartbeat", &json!({"expire_after_ms": 10}))
            .unwrap_err();
        assert!(errors[0].contains("expire_after_ms"), "{errors:?}");
        assert!(
            Settings::default()
                .with_section("colour", &json!({}))
                .is_err()
        );
        assert!(
            Settings::default()
                .with_section("balancing", &json!([1]))
                .is_err()
        );
        let errors = Settings::default()
            .with_section("balancing", &json!({"strategy": "fastest"}))
            .unwrap_err();
        assert!(errors[0].contains("balancing.strategy"), "{errors:?}");
    }
}
