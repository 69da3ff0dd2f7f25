//! The AILB's flags and settings. Settings are the `[module]` section of the config file (and
//! `UpdateConfig` `module`, merged key by key): providers, models with their deployments,
//! virtual keys, and the timeouts and cooldowns of failover. [`Settings::compile`] checks the
//! whole section and resolves API keys from the environment, so a bad section is refused whole,
//! each problem named, and the running catalog stays.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use clap::Parser;
use marchproxy::route::RouteSpec;
use marchproxy_runtime::CommonArgs;
use serde::{Deserialize, Serialize};

use crate::{
    keys::{VirtualKey, VirtualKeys},
    providers::{Provider, ProviderKind},
    routing::{Catalog, Deployment, Model, Strategy},
};

#[derive(Debug, Parser)]
#[command(
    name = "marchproxy-ailb",
    about = "MarchProxy's AILB: an OpenAI-compatible LLM gateway (chat, completions, embeddings, models) routing each model to OpenAI-compatible, Anthropic or Ollama providers",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The longest timeout or cooldown accepted, in milliseconds (a day).
const MAX_MS: u64 = 86_400_000;

/// The `[module]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Provider endpoints by name.
    pub providers: BTreeMap<String, ProviderSettings>,
    /// The models clients ask for, by name.
    pub models: BTreeMap<String, ModelSettings>,
    /// Client keys; none means the gateway is open to any client.
    pub keys: Vec<KeySettings>,
    /// A request's whole time, streams included, across every deployment tried.
    pub request_timeout_ms: u64,
    /// The longest a started stream may go without an event (then it counts as broken).
    pub stream_idle_timeout_ms: u64,
    /// How long a failing deployment gets no requests.
    pub cooldown_ms: u64,
    /// Consecutive failures (connect errors, timeouts, 5xx) before a deployment cools down; a 429
    /// cools it down at once.
    pub allowed_fails: u32,
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            providers: BTreeMap::new(),
            models: BTreeMap::new(),
            keys: Vec::new(),
            request_timeout_ms: 600_000,
            stream_idle_timeout_ms: 120_000,
            cooldown_ms: 30_000,
            allowed_fails: 3,
            max_body_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub kind: ProviderKind,
    /// e.g. `https://api.openai.com/v1`, `https://api.anthropic.com`, `http://localhost:11434`.
    pub base_url: String,
    /// The environment variable holding the provider's API key (preferred: GetConfig shows this
    /// section to holders of the cluster key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// OpenAI-compatible servers only: ask for the usage chunk of streams (`stream_options`);
    /// turn off for servers that refuse that field (tokens are then estimated).
    #[serde(default = "yes")]
    pub stream_usage: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    #[serde(default)]
    pub strategy: Strategy,
    /// Other names clients may ask for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub deployments: Vec<DeploymentSettings>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSettings {
    pub provider: String,
    /// The provider's name for the model [default: the model's name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Shown in logs and metrics instead of the key.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Models (or aliases) this key may use; empty for all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Requests per minute [default: no limit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (prompt and completion) per minute [default: no limit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
}

/// A model while the settings and routes are gathered.
struct ModelDraft {
    strategy: Strategy,
    aliases: Vec<String>,
    deployments: Vec<Deployment>,
}

/// Everything a request needs, built from valid settings.
pub struct Compiled {
    pub catalog: Catalog,
    pub keys: VirtualKeys,
    pub request_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub max_body_bytes: usize,
    /// Failures in a row before a deployment cools down, and for how long.
    pub cooldown: (u32, Duration),
}

impl Settings {
    /// `self` with the keys of `update` replaced (UpdateConfig sends only what changes).
    pub fn merged(&self, update: &serde_json::Value) -> Result<Settings, Vec<String>> {
        marchproxy_runtime::config::merge_section("module", self, update)
    }

    /// Checks every part and builds the catalog; `env` reads environment variables. Keys and
    /// deployments unchanged from `previous` are kept, with their buckets, load and cooldowns.
    pub fn compile(
        &self,
        routes: &[RouteSpec],
        previous: Option<&Compiled>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Compiled, Vec<String>> {
        let mut problems = Vec::new();
        for (field, value) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("stream_idle_timeout_ms", self.stream_idle_timeout_ms),
            ("cooldown_ms", self.cooldown_ms.max(1)),
        ] {
            if !(1..=MAX_MS).contains(&value) {
                problems.push(format!("module.{field} must be from 1 to {MAX_MS} (a day)"));
            }
        }
        if self.max_body_bytes == 0 {
            problems.push("module.max_body_bytes must be above 0".to_owned());
        }
        let secret = |field: &str, literal: &Option<String>, var: &Option<String>| {
            match (
            literal, var,
        ) {
            (Some(_), Some(_)) => Err(format!("{field}: give a key or its variable, not both")),
            (Some(key), None) => Ok(Some(key.clone())),
            (None, Some(var)) => env(var).filter(|v| !v.is_empty()).map(Some).ok_or_else(|| {
                format!("{field}: environment variable {var} is not set; export it or remove the setting")
            }),
            (None, None) => Ok(None),
        }
        };

        let mut providers = BTreeMap::new();
        for (name, provider) in &self.providers {
            let field = format!("module.providers.{name}");
            let api_key = match secret(&field, &provider.api_key, &provider.api_key_env) {
                Ok(key) => key,
                Err(problem) => {
                    problems.push(problem);
                    continue;
                }
            };
            match Provider::new(name, provider.kind, &provider.base_url, api_key) {
                Ok(built) => {
                    let built = built.with_stream_usage(provider.stream_usage);
                    providers.insert(name.clone(), Arc::new(built));
                }
                Err(problem) => problems.push(format!("{field}.base_url: {problem}")),
            }
        }

        let mut models: BTreeMap<String, ModelDraft> = BTreeMap::new();
        for (name, model) in &self.models {
            let field = format!("module.models.{name}");
            if model.deployments.is_empty() {
                problems.push(format!("{field}.deployments: name at least one deployment"));
                continue;
            }
            let mut deployments = Vec::new();
            for (index, deployment) in model.deployments.iter().enumerate() {
                let Some(provider) = providers.get(&deployment.provider) else {
                    if !self.providers.contains_key(&deployment.provider) {
                        problems.push(format!(
                            "{field}.deployments[{index}].provider: no provider `{}` in module.providers",
                            deployment.provider
                        ));
                    }
                    continue;
                };
                if deployment.weight == 0 {
                    problems.push(format!(
                        "{field}.deployments[{index}].weight must be above 0"
                    ));
                    continue;
                }
                let provider_model = deployment.model.clone().unwrap_or_else(|| name.clone());
                deployments.push(Deployment::new(
                    Arc::clone(provider),
                    provider_model,
                    deployment.weight,
                ));
            }
            models.insert(
                name.clone(),
                ModelDraft {
                    strategy: model.strategy,
                    aliases: model.aliases.clone(),
                    deployments,
                },
            );
        }
        for route in routes {
            match route_deployments(route, env) {
                Ok((name, strategy, deployments)) => {
                    let draft = models.entry(name).or_insert_with(|| ModelDraft {
                        strategy,
                        aliases: Vec::new(),
                        deployments: Vec::new(),
                    });
                    draft.deployments.extend(deployments);
                }
                Err(problem) => problems.push(format!("route {}: {problem}", route.id)),
            }
        }
        let mut catalog = Catalog::default();
        for (name, draft) in models {
            let deployments = draft
                .deployments
                .into_iter()
                .map(|d| {
                    previous
                        .and_then(|p| p.catalog.existing(&d))
                        .unwrap_or_else(|| Arc::new(d))
                })
                .collect();
            let built = Arc::new(Model {
                name: name.clone(),
                strategy: draft.strategy,
                deployments,
            });
            for alias in std::iter::once(&name).chain(&draft.aliases) {
                if let Some(other) = catalog.insert(alias, Arc::clone(&built)) {
                    problems.push(format!(
                        "module.models.{name}: the name `{alias}` is already taken by model `{other}`"
                    ));
                }
            }
        }

        let mut keys = Vec::new();
        for (index, key) in self.keys.iter().enumerate() {
            let field = format!("module.keys[{index}] ({})", key.name);
            match secret(&field, &key.key, &key.key_env) {
                Ok(Some(secret)) => {
                    for model in &key.models {
                        if catalog.get(model).is_none() {
                            problems.push(format!(
                                "{field}.models: no model or alias `{model}` in module.models"
                            ));
                        }
                    }
                    for (limit, value) in [("rpm", key.rpm), ("tpm", key.tpm)] {
                        if value == Some(0) {
                            problems.push(format!(
                                "{field}.{limit} must be above 0 (leave it out for no limit)"
                            ));
                        }
                    }
                    let built =
                        VirtualKey::new(&key.name, &secret, key.models.clone(), key.rpm, key.tpm);
                    let kept = previous.and_then(|p| p.keys.existing(&built));
                    keys.push(kept.unwrap_or_else(|| Arc::new(built)));
                }
                Ok(None) => problems.push(format!("{field}: give key_env (or key)")),
                Err(problem) => problems.push(problem),
            }
        }
        let keys = match VirtualKeys::new(keys) {
            Ok(keys) => keys,
            Err(problem) => {
                problems.push(format!("module.keys: {problem}"));
                VirtualKeys::default()
            }
        };

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Compiled {
            catalog,
            keys,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            stream_idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
            max_body_bytes: self.max_body_bytes,
            cooldown: (
                self.allowed_fails.max(1),
                Duration::from_millis(self.cooldown_ms),
            ),
        })
    }
}

/// A module route's deployments (DESIGN.md, "Module routes name their backends"): metadata
/// `model` (the name clients ask for), `provider` (openai, anthropic, ollama; default openai),
/// `provider_model` (default: `model`), `strategy`, `api_key_env` (the variable holding the
/// provider key: keys never travel in routes), `tls=true` for https and `base_path` (default
/// `/v1` for openai, none for the others); `destination_pattern` lists the servers as
/// `host:port[=weight]` separated by commas.
fn route_deployments(
    route: &RouteSpec,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Strategy, Vec<Deployment>), String> {
    let meta = |key: &str| {
        route
            .metadata
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let model = meta("model").ok_or("metadata.model must name the model clients ask for")?;
    let kind: ProviderKind = serde_json::from_value(meta("provider").unwrap_or("openai").into())
        .map_err(|_| "metadata.provider must be openai, anthropic or ollama".to_owned())?;
    let strategy: Strategy = serde_json::from_value(meta("strategy").unwrap_or("weighted").into())
        .map_err(|_| {
            "metadata.strategy must be weighted, least_busy or lowest_latency".to_owned()
        })?;
    let provider_model = meta("provider_model").unwrap_or(model);
    let api_key = match meta("api_key_env") {
        Some(var) => Some(env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
            format!("environment variable {var} (metadata.api_key_env) is not set")
        })?),
        None => None,
    };
    let scheme = if meta("tls") == Some("true") {
        "https"
    } else {
        "http"
    };
    let base_path = meta("base_path").unwrap_or(if kind == ProviderKind::Openai {
        "/v1"
    } else {
        ""
    });
    let mut deployments = Vec::new();
    for (address, weight) in route.servers()? {
        let name = format!("route:{}/{address}", route.id);
        let provider = Provider::new(
            &name,
            kind,
            &format!("{scheme}://{address}{base_path}"),
            api_key.clone(),
        )
        .map_err(|e| format!("`{address}`: {e}"))?;
        deployments.push(Deployment::new(
            Arc::new(provider),
            provider_model.to_owned(),
            weight,
        ));
    }
    Ok((model.to_owned(), strategy, deployments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: serde_json::Value) -> Settings {
        Settings::default().merged(&json).unwrap()
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let bad = settings(serde_json::json!({
            "providers": {
                "main": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "NOT_SET_ANYWHERE"},
                "odd": {"kind": "anthropic", "base_url": "ftp://x"}
            },
            "models": {
                "gpt": {"deployments": [{"provider": "nobody"}]},
                "empty": {"deployments": []},
                "dup": {"aliases": ["gpt"], "deployments": [{"provider": "odd"}]}
            },
            "keys": [{"name": "team", "models": ["unknown"]}]
        }));
        let problems = bad.compile(&[], None, &|_| None).err().unwrap().join("\n");
        for expected in [
            "NOT_SET_ANYWHERE is not set",
            "module.providers.odd.base_url",
            "no provider `nobody`",
            "module.models.empty.deployments",
            "`gpt` is already taken",
            "give key_env",
        ] {
            assert!(
                problems.contains(expected),
                "{expected} missing in:\n{problems}"
            );
        }
    }

    #[test]
    fn keys_come_from_the_environment() {
        let good = settings(serde_json::json!({
            "providers": {"main": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key_env": "PROVIDER_KEY"}},
            "models": {"gpt": {"aliases": ["g"], "deployments": [{"provider": "main", "model": "gpt-4o", "weight": 2}]}},
            "keys": [{"name": "team", "key_env": "TEAM_KEY", "models": ["g"], "rpm": 5}]
        }));
        let env = |var: &str| Some(format!("value-of-{var}"));
        let compiled = good.compile(&[], None, &env).unwrap();
        let model = compiled.catalog.get("g").unwrap();
        assert_eq!(model.name, "gpt");
        assert_eq!(model.deployments[0].model, "gpt-4o");
        assert!(compiled.keys.find("value-of-TEAM_KEY").is_some());
        assert!(compiled.keys.find("value-of-PROVIDER_KEY").is_none());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = Settings::default()
            .merged(&serde_json::json!({"request_timeout": 5}))
            .unwrap_err();
        assert!(
            error[0].contains("unknown field `request_timeout`"),
            "{error:?}"
        );
    }
}
