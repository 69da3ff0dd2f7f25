//! MarchProxy's ALB: an L7 reverse proxy for HTTP/1.1, HTTP/2 (h2c, and over TLS by ALPN) and
//! WebSocket, and a caching forward proxy for device updates.
//!
//! - [`config`]: flags and the `[module]` defaults (timeouts, retries, health checks, outlier
//!   ejection, upstream pools);
//! - [`table`]: module routes compiled into the routing table (Host, path, headers,
//!   priority) with each route's policy and pool;
//! - [`pool`]: weighted servers, round robin or least request, passive outlier ejection;
//! - [`health`]: active health checks per pool;
//! - [`proxy`]: the request path: match, limit, forward with retries, upgrades;
//! - [`forward`]: the caching forward proxy for device updates (absolute-URI requests);
//! - [`metrics`]: `alb_*` on the module's `/metrics`.
//!
//! Everything else (ModuleService, registration as `MODULE_TYPE_ALB`, heartbeats, rate limits
//! from `SetRateLimit`, admin, drain) is the module runtime's. [`run`] is the binary's entry.

pub mod config;
pub mod forward;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod table;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use axum::{Json, Router, routing::get};
use marchproxy::{names::ModuleKind, pb, route::RouteSpec};
use marchproxy_runtime::http::TlsAcceptor;
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig};
use serde_json::json;
use tracing::info;

use crate::{
    config::{Cli, Settings},
    forward::ForwardProxy,
    metrics::Metrics,
    proxy::{Proxy, UpstreamClient},
    table::Table,
};

/// Where the proxy listens when no `--listen` is given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8090";

/// The module: settings and routes, the table built from them, the upstream client.
pub struct Alb {
    /// Held while a change is built and installed, so a config update and a route update
    /// cannot each install a table missing the other.
    changing: Mutex<()>,
    settings: RwLock<Settings>,
    routes: RwLock<Vec<RouteSpec>>,
    /// Shared with the admin server's `/upstreams` page.
    table: Arc<ArcSwap<Table>>,
    client: ArcSwap<UpstreamClient>,
    pub metrics: Arc<Metrics>,
    tls: Option<TlsAcceptor>,
    /// Set when absolute-URI requests are served as a (caching) forward proxy.
    pub forward: Option<ForwardProxy>,
}

impl Alb {
    pub fn new(
        metrics: Arc<Metrics>,
        tls: Option<TlsAcceptor>,
        forward: Option<ForwardProxy>,
    ) -> Result<Arc<Alb>, std::io::Error> {
        let settings = Settings::default();
        Ok(Arc::new(Alb {
            changing: Mutex::new(()),
            client: ArcSwap::from_pointee(proxy::upstream_client(&settings)?),
            settings: RwLock::new(settings),
            routes: RwLock::new(Vec::new()),
            table: Arc::new(ArcSwap::from_pointee(Table::default())),
            metrics,
            tls,
            forward,
        }))
    }

    /// The table requests use now.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    pub fn client(&self) -> Arc<UpstreamClient> {
        self.client.load_full()
    }

    pub fn settings(&self) -> Settings {
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

    fn changing(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects no data of its own; a panic while held leaves nothing torn.
        self.changing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn compile(&self, routes: &[RouteSpec], settings: &Settings) -> Result<Table, Vec<String>> {
        Table::compile(routes, settings, &self.table(), &self.metrics)
    }

    fn install(&self, table: Table) {
        let (routes, servers) = (
            table.routes.len(),
            table
                .routes
                .iter()
                .map(|r| r.pool.servers.len())
                .sum::<usize>(),
        );
        health::start(&table, &self.client());
        self.table.store(Arc::new(table));
        info!(routes, servers, "routing table updated");
    }
}

/// Per route: its servers, their weights, health, ejection and requests in flight.
fn upstreams(table: &Table) -> serde_json::Value {
    {
        let routes: Vec<_> = table
            .routes
            .iter()
            .map(|route| {
                let servers: Vec<_> = route
                    .pool
                    .servers
                    .iter()
                    .zip(&route.pool.weights)
                    .map(|(s, weight)| {
                        json!({
                            "address": s.address,
                            "weight": weight,
                            "healthy": s.is_healthy(),
                            "ejected": s.is_ejected(),
                            "active_requests": s.active(),
                        })
                    })
                    .collect();
                json!({
                    "route": route.id,
                    "health_checked": route.pool.health.is_some(),
                    "servers": servers,
                })
            })
            .collect();
        json!({ "routes": routes })
    }
}

#[tonic::async_trait]
impl Module for Alb {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Alb
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![
            pb::Protocol::Http,
            pb::Protocol::Https,
            pb::Protocol::Http2,
            pb::Protocol::Websocket,
        ]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        self.metrics.register(&plane.stats.module_registry)?;
        let proxy = Proxy {
            alb: Arc::clone(&self),
            limiter: Arc::clone(&plane.limiter),
        };
        let router = Router::new().fallback(move |request| proxy.clone().handle(request));
        marchproxy_runtime::http::serve_tls(plane, router, self.tls.clone()).await
    }

    fn apply_routes(&self, routes: &[RouteSpec]) -> Result<(), String> {
        let _changing = self.changing();
        let table = self
            .compile(routes, &self.settings())
            .map_err(|problems| problems.join("; "))?;
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes.to_vec();
        self.install(table);
        Ok(())
    }

    fn check_config(
        &self,
        _config_type: &str,
        config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        let settings = self.settings().merged(config)?;
        self.compile(&self.routes(), &settings).map(|_| ())
    }

    fn apply_config(&self, _config_type: &str, config: &serde_json::Value) {
        let _changing = self.changing();
        let Ok(settings) = self.settings().merged(config) else {
            return;
        };
        let Ok(table) = self.compile(&self.routes(), &settings) else {
            return;
        };
        let old = self.settings();
        if (
            old.connect_timeout_ms,
            old.idle_timeout_ms,
            old.max_idle_per_server,
        ) != (
            settings.connect_timeout_ms,
            settings.idle_timeout_ms,
            settings.max_idle_per_server,
        ) {
            match proxy::upstream_client(&settings) {
                Ok(client) => self.client.store(Arc::new(client)),
                Err(error) => tracing::warn!(%error, "upstream client kept: {error}"),
            }
        }
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
        self.install(table);
    }

    async fn health_checks(&self) -> Vec<(String, Result<String, String>)> {
        self.table()
            .routes
            .iter()
            .map(|route| {
                let (up, all) = (route.pool.available(), route.pool.servers.len());
                let verdict = if up > 0 {
                    Ok(format!("{up} of {all} servers available"))
                } else {
                    Err(format!(
                        "none of {all} servers available (health checks or ejection)"
                    ))
                };
                (format!("route {}", route.id), verdict)
            })
            .collect()
    }

    fn admin_routes(&self) -> Option<Router> {
        let table = Arc::clone(&self.table);
        Some(Router::new().route(
            "/upstreams",
            get(move || {
                let table = table.load_full();
                async move { Json(upstreams(&table)) }
            }),
        ))
    }

    fn custom_stats(&self) -> HashMap<String, String> {
        let table = self.table();
        let servers: usize = table.routes.iter().map(|r| r.pool.servers.len()).sum();
        let available: usize = table.routes.iter().map(|r| r.pool.available()).sum();
        [
            ("routes".to_owned(), table.routes.len().to_string()),
            ("upstream_servers".to_owned(), servers.to_string()),
            (
                "upstream_servers_available".to_owned(),
                available.to_string(),
            ),
        ]
        .into()
    }
}

/// Flags, the TLS certificate when given, the runtime, until `shutdown` completes (then it
/// drains), as the binary does until SIGINT or SIGTERM.
pub async fn run_until(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut common = cli.common;
    if common.listen.is_empty() {
        common.listen = vec![DEFAULT_LISTEN.to_owned()];
    }
    let config = RuntimeConfig::from_args(ModuleKind::Alb, common)?;
    marchproxy::telemetry::init(config.log_format);
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(
            marchproxy_runtime::http::tls_acceptor(cert, key, &[b"h2", b"http/1.1"])
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let metrics = Arc::new(Metrics::new(|opts| {
        opts.const_label("module_type", ModuleKind::Alb.name())
            .const_label("instance", &config.instance_id)
    }));
    let forward = if cli.forward.enabled() {
        let connect_timeout = Duration::from_millis(Settings::default().connect_timeout_ms);
        Some(ForwardProxy::new(&cli.forward, connect_timeout, &metrics)?)
    } else {
        None
    };
    let alb = Alb::new(metrics, tls, forward)?;
    marchproxy_runtime::run(alb, config, shutdown).await?;
    Ok(())
}

/// The binary's entry: runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, marchproxy::signal::shutdown()).await
}
