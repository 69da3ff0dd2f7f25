//! MarchProxy's RTMP module: live ingest and fan-out. Publishers push
//! `rtmp://host/app/stream_key`; any number of players pull the same stream and start at once
//! on a keyframe.
//!
//! - [`session`]: one connection (handshake, rml_rtmp's server session, publish or play);
//! - [`streams`]: live streams, their start-up part for late joiners, and the fan-out that
//!   never waits on a slow player;
//! - [`auth`]: allowed stream keys and the `on_publish` callback;
//! - [`restream`]: pushing a live stream on to other RTMP servers;
//! - [`config`], [`metrics`]: settings, `rtmp_*` metrics and the admin `/stats` page.
//!
//! Everything else (ModuleService, registration as `MODULE_TYPE_RTMP`, heartbeats, rate limits,
//! admin, drain) is the module runtime's. [`run`] is the binary's entry.

pub mod auth;
pub mod chunks;
pub mod config;
pub mod metrics;
pub mod restream;
pub mod session;
pub mod streams;

use std::sync::{Arc, RwLock};

use axum::{Json, Router, routing::get};
use marchproxy::{names::ModuleKind, pb};
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig, http::Client};
use serde_json::json;
use tracing::warn;

use crate::{
    config::{Cli, Settings},
    metrics::Metrics,
    streams::{Publishing, Streams},
};

/// Where publishers and players connect when no `--listen` is given (RTMP's port).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1935";

pub struct Rtmp {
    settings: RwLock<Settings>,
    pub streams: Arc<Streams>,
    pub metrics: Arc<Metrics>,
    /// For the `on_publish` callback.
    pub client: Client,
}

impl Rtmp {
    pub fn new(metrics: Arc<Metrics>, client: Client) -> Arc<Rtmp> {
        let settings = Settings::default();
        Arc::new(Rtmp {
            streams: Streams::new(settings.player_queue, Arc::clone(&metrics)),
            settings: RwLock::new(settings),
            metrics,
            client,
        })
    }

    pub fn settings(&self) -> Settings {
        // Settings are replaced whole under the lock; a panic elsewhere cannot tear them.
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts pushing a newly published stream to its re-streaming destinations.
    fn restream(&self, publishing: &Publishing) {
        let (app, key) = (&publishing.stream.app, &publishing.stream.key);
        for restream in self
            .settings()
            .restream
            .iter()
            .filter(|r| r.matches(app, key))
        {
            match restream.destination(app, key) {
                Ok(destination) => {
                    tokio::spawn(restream::push(
                        Arc::clone(&self.streams),
                        Arc::clone(&self.metrics),
                        app.clone(),
                        key.clone(),
                        publishing.id,
                        destination,
                    ));
                }
                Err(problem) => warn!(%problem, "re-streaming destination skipped"),
            }
        }
    }
}

#[tonic::async_trait]
impl Module for Rtmp {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Rtmp
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Rtmp]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        self.metrics.register(&plane.stats.module_registry)?;
        marchproxy_runtime::tcp::serve(plane, move |accepted| {
            session::serve(
                Arc::clone(&self),
                accepted.stream,
                accepted.client,
                accepted.stats,
            )
        })
        .await
    }

    fn check_config(
        &self,
        _config_type: &str,
        config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        self.settings().merged(config).map(|_| ())
    }

    fn apply_config(&self, _config_type: &str, config: &serde_json::Value) {
        if let Ok(settings) = self.settings().merged(config) {
            self.streams.set_queue(settings.player_queue);
            *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
        }
    }

    fn admin_routes(&self) -> Option<Router> {
        let streams = Arc::clone(&self.streams);
        Some(Router::new().route(
            "/stats",
            get(move || {
                let streams = Arc::clone(&streams);
                async move { Json(json!({"streams": streams.stats()})) }
            }),
        ))
    }

    fn custom_stats(&self) -> std::collections::HashMap<String, String> {
        [
            ("streams".to_owned(), self.metrics.streams.get().to_string()),
            (
                "publishers".to_owned(),
                self.metrics.publishers.get().to_string(),
            ),
            ("players".to_owned(), self.metrics.players.get().to_string()),
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
    let config = RuntimeConfig::from_args(ModuleKind::Rtmp, common)?;
    marchproxy::telemetry::init(config.log_format);
    let metrics = Arc::new(Metrics::new(|opts| {
        opts.const_label("module_type", ModuleKind::Rtmp.name())
            .const_label("instance", &config.instance_id)
    }));
    let rtmp = Rtmp::new(metrics, marchproxy_runtime::http::client()?);
    marchproxy_runtime::run(rtmp, config, shutdown).await?;
    Ok(())
}

/// The binary's entry: runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, marchproxy::signal::shutdown()).await
}
