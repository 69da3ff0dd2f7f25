//! MarchProxy's AILB: an LLM gateway speaking OpenAI's API to clients and each provider's own
//! API to providers.
//!
//! - [`config`]: flags and the `[module]` settings (providers, models, deployments, keys);
//! - [`routing`]: the catalog of models and the strategies that order their deployments,
//!   with the load, latency and cooldown each deployment remembers;
//! - [`providers`]: OpenAI-compatible, Anthropic and Ollama providers and the translations;
//! - [`keys`]: virtual API keys with allowed models and RPM/TPM limits;
//! - [`api`]: the HTTP endpoints and the failover loop, on the runtime's HTTP data plane;
//! - [`metrics`]: `ailb_*` on the module's `/metrics`.
//!
//! Everything else (ModuleService, registration as `MODULE_TYPE_AILB`, heartbeats, rate limits
//! from `SetRateLimit`, admin, drain) is the module runtime's. [`run`] is the binary's entry.

pub mod api;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod providers;
pub mod routing;

use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use marchproxy::{names::ModuleKind, pb, route::RouteSpec};
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig, http::Client};
use tracing::{info, warn};

use crate::{
    config::{Cli, Compiled, Settings},
    metrics::Metrics,
};

/// Where the API listens when no `--listen` is given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// The module: settings and routes, the catalog built from them, and what requests share.
pub struct Ailb {
    /// Held while a change is built and installed, so two changes (a config update and a
    /// route update) cannot each install a catalog missing the other.
    changing: Mutex<()>,
    settings: RwLock<Settings>,
    routes: RwLock<Vec<RouteSpec>>,
    compiled: ArcSwap<Compiled>,
    metrics: Arc<Metrics>,
    client: Client,
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

impl Ailb {
    pub fn new(metrics: Arc<Metrics>, client: Client) -> Arc<Ailb> {
        let settings = Settings::default();
        // Default settings name nothing that can fail: no providers, models or keys.
        let compiled = settings
            .compile(&[], None, &env)
            .unwrap_or_else(|problems| panic!("default settings: {problems:?}"));
        Arc::new(Ailb {
            changing: Mutex::new(()),
            settings: RwLock::new(settings),
            routes: RwLock::new(Vec::new()),
            compiled: ArcSwap::from_pointee(compiled),
            metrics,
            client,
        })
    }

    /// The catalog and settings requests use now.
    pub fn compiled(&self) -> Arc<Compiled> {
        self.compiled.load_full()
    }

    fn settings(&self) -> Settings {
        // Settings are replaced whole under the lock; a panic elsewhere cannot tear them.
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn routes(&self) -> Vec<RouteSpec> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn rebuild(&self, settings: &Settings, routes: &[RouteSpec]) -> Result<Compiled, Vec<String>> {
        settings.compile(routes, Some(&self.compiled()), &env)
    }

    fn install(&self, compiled: Compiled) {
        let names = compiled.catalog.names().len();
        self.compiled.store(Arc::new(compiled));
        info!(models = names, "catalog updated");
    }

    fn changing(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects no data of its own; a panic while held leaves nothing torn.
        self.changing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tonic::async_trait]
impl Module for Ailb {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Ailb
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Http]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        self.metrics.register(&plane.stats.module_registry)?;
        let router = api::router(Arc::clone(&self), Arc::clone(&plane.limiter));
        marchproxy_runtime::http::serve(plane, router).await
    }

    fn apply_routes(&self, routes: &[RouteSpec]) -> Result<(), String> {
        let _changing = self.changing();
        let compiled = self
            .rebuild(&self.settings(), routes)
            .map_err(|problems| problems.join("; "))?;
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes.to_vec();
        self.install(compiled);
        Ok(())
    }

    fn check_config(
        &self,
        _config_type: &str,
        config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        let _changing = self.changing();
        let settings = self.settings().merged(config)?;
        self.rebuild(&settings, &self.routes()).map(|_| ())
    }

    fn apply_config(&self, _config_type: &str, config: &serde_json::Value) {
        let _changing = self.changing();
        let built = self
            .settings()
            .merged(config)
            .and_then(|settings| Ok((self.rebuild(&settings, &self.routes())?, settings)));
        match built {
            Ok((compiled, settings)) => {
                *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
                self.install(compiled);
            }
            // Only when the environment changed between the check and now (a variable unset).
            Err(problems) => warn!(?problems, "config not applied; the previous one stays"),
        }
    }

    fn custom_stats(&self) -> std::collections::HashMap<String, String> {
        let compiled = self.compiled();
        let names = compiled.catalog.names();
        let in_flight: u32 = names
            .iter()
            .filter(|(name, model)| *name == model.name)
            .flat_map(|(_, model)| model.deployments.iter().map(|d| d.in_flight()))
            .sum();
        [
            ("models".to_owned(), names.len().to_string()),
            ("requests_in_flight".to_owned(), in_flight.to_string()),
        ]
        .into()
    }
}

/// Runs until `shutdown` completes (then drains), as the binary does until SIGINT or SIGTERM.
pub async fn run_until(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut common = cli.common;
    if common.listen.is_empty() {
        common.listen = vec![DEFAULT_LISTEN.to_owned()];
    }
    let config = RuntimeConfig::from_args(ModuleKind::Ailb, common)?;
    marchproxy::telemetry::init(config.log_format);
    let metrics = Arc::new(Metrics::new(|opts| {
        opts.const_label("module_type", ModuleKind::Ailb.name())
            .const_label("instance", &config.instance_id)
    }));
    let client = marchproxy_runtime::http::client()?;
    let ailb = Ailb::new(metrics, client);
    marchproxy_runtime::run(ailb, config, shutdown).await?;
    Ok(())
}

/// The binary's entry: runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, marchproxy::signal::shutdown()).await
}
