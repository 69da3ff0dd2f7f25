//! MarchProxy's DBLB module: PostgreSQL and MySQL/MariaDB load balancing. Clients connect to
//! `postgres=` and `mysql=` listeners; each session goes to a server chosen by its database
//! (PostgreSQL names it at startup), by whether it asked for a read-only session (replicas
//! first), by server health and by each server's free connections; a client that finds every
//! server full waits in a bounded queue, then gets its protocol's "too many connections".
//!
//! - [`table`]: routes, servers, their health and open sessions, and the choice of a server;
//! - [`postgres`], [`mysql`]: each protocol's session, from the first bytes to the relay;
//! - [`relay`]: copying a session both ways while counting its queries;
//! - [`pool`], [`transaction`]: pooling of PostgreSQL server connections;
//! - [`auth`], [`login`], [`held`]: PostgreSQL clients the DBLB authenticates itself, the
//!   server logins it makes for them, and sessions holding one of those;
//! - [`health`]: protocol health checks;
//! - [`config`], [`metrics`]: settings and `dblb_*` metrics.
//!
//! Everything else (ModuleService, registration as `MODULE_TYPE_DBLB`, heartbeats, rate limits,
//! admin, drain) is the module runtime's. [`run`] is the binary's entry.

pub mod auth;
pub mod config;
pub mod health;
pub mod held;
pub mod login;
pub mod metrics;
pub mod mysql;
pub mod pool;
pub mod postgres;
pub mod relay;
pub mod table;
pub mod transaction;

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use marchproxy::{names::ModuleKind, pb, route::RouteSpec};
use marchproxy_runtime::{
    DataPlane, Module, ModuleError, RuntimeConfig, http::TlsAcceptor, tcp::Accepted,
};
use tokio::{net::TcpStream, sync::Notify};

use crate::{
    auth::AuthFile,
    config::{Cli, Settings},
    metrics::{Metrics, Outcome},
    pool::Pools,
    postgres::Cancels,
    table::{Backend, Engine, Pick, Table, Want},
};

/// Where clients connect when no `--listen` is given: PgBouncer's and ProxySQL's usual ports.
pub const DEFAULT_LISTEN: [&str; 2] = ["postgres=0.0.0.0:6432", "mysql=0.0.0.0:6033"];

/// Why a session gets no server; the client reads this text in its protocol's error.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "no route serves this database here; add a DBLB route (protocol POSTGRES or MYSQL, metadata.database) that names its servers"
    )]
    NoRoute,
    #[error("{0}")]
    Unavailable(String),
    #[error("too many connections: {0}")]
    Full(String),
}

impl Refusal {
    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::NoRoute => Outcome::NoRoute,
            Refusal::Unavailable(_) => Outcome::Unavailable,
            Refusal::Full(_) => Outcome::Full,
        }
    }
}

pub struct Dblb {
    settings: RwLock<Settings>,
    table: ArcSwap<Table>,
    /// Woken whenever a session ends, for clients waiting for a free server.
    freed: Arc<Notify>,
    waiting: AtomicUsize,
    pub cancels: Cancels,
    pub pools: Pools,
    pub metrics: Arc<Metrics>,
    /// TLS for PostgreSQL clients that ask for SSL, when certificates are configured.
    tls: Option<TlsAcceptor>,
    /// The users of `module.auth_file`, read when the setting is applied.
    auth_file: ArcSwapOption<AuthFile>,
}

/// A place in the wait queue, given back on drop.
struct Waiting<'a>(&'a Dblb);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.waiting.dec();
    }
}

impl Dblb {
    pub fn new(metrics: Arc<Metrics>, tls: Option<TlsAcceptor>) -> Arc<Dblb> {
        Arc::new(Dblb {
            settings: RwLock::new(Settings::default()),
            table: ArcSwap::from_pointee(Table::default()),
            freed: Arc::new(Notify::new()),
            waiting: AtomicUsize::new(0),
            cancels: Cancels::default(),
            pools: Pools::default(),
            metrics,
            tls,
            auth_file: ArcSwapOption::empty(),
        })
    }

    pub fn auth_file(&self) -> Option<Arc<AuthFile>> {
        self.auth_file.load_full()
    }

    pub fn settings(&self) -> Settings {
        // Settings are replaced whole under the lock; a panic elsewhere cannot tear them.
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Woken whenever a server slot may have come free.
    pub fn freed(&self) -> &Arc<Notify> {
        &self.freed
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// A server for `want` and a connection to it. A server that cannot be dialled is taken
    /// out and the next one tried; when every server is full the client waits (bounded by
    /// `max_waiting` and `queue_timeout_ms`) for a session to end.
    pub async fn open(&self, want: Want<'_>) -> Result<(table::Lease, TcpStream), Refusal> {
        self.open_or_full(want, true)
            .await?
            .ok_or_else(|| Refusal::Full("every server is at its max_connections".to_owned()))
    }

    /// As [`Dblb::open`], but None at once when every server is full (after closing an idle
    /// pooled connection fails to make room): for a pool that waits for its own connections
    /// to come back rather than in the queue.
    pub async fn open_unless_full(
        &self,
        want: Want<'_>,
    ) -> Result<Option<(table::Lease, TcpStream)>, Refusal> {
        self.open_or_full(want, false).await
    }

    async fn open_or_full(
        &self,
        want: Want<'_>,
        queue: bool,
    ) -> Result<Option<(table::Lease, TcpStream)>, Refusal> {
        let settings = self.settings();
        let deadline = tokio::time::Instant::now() + settings.queue_timeout();
        let mut tried: Vec<Arc<Backend>> = Vec::new();
        let mut queued: Option<(Waiting, Instant)> = None;
        let protocol = want.engine.name();
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let attempt = Want {
                tried: &tried,
                ..want
            };
            match self.table.load().pick(&attempt, &self.freed) {
                Pick::Got(lease) => {
                    if let Some((_, since)) = &queued {
                        self.metrics.waited(protocol, since.elapsed().as_secs_f64());
                    }
                    let address = &lease.backend.address;
                    let dialled = tokio::time::timeout(
                        settings.connect_timeout(),
                        TcpStream::connect((address.host(), address.port())),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {:?}", settings.connect_timeout()),
                        ))
                    });
                    match dialled {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            return Ok(Some((lease, stream)));
                        }
                        Err(error) => {
                            lease.backend.dial_failed(&error);
                            self.metrics.connect_failed(&address.to_string());
                            tried.push(Arc::clone(&lease.backend));
                        }
                    }
                }
                Pick::Full(routes) => {
                    // Idle pooled connections give way to a login.
                    if self.pools.make_room(&routes) {
                        continue;
                    }
                    if !queue {
                        return Ok(None);
                    }
                    if queued.is_none() {
                        if self.waiting.fetch_add(1, Ordering::AcqRel) >= settings.max_waiting {
                            self.waiting.fetch_sub(1, Ordering::AcqRel);
                            return Err(Refusal::Full(format!(
                                "every server is at its max_connections and {} clients already wait",
                                settings.max_waiting
                            )));
                        }
                        self.metrics.waiting.inc();
                        queued = Some((Waiting(self), Instant::now()));
                    }
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(Refusal::Full(format!(
                            "every server stayed at its max_connections for {} ms",
                            settings.queue_timeout_ms
                        )));
                    }
                }
                Pick::Unavailable(why) => return Err(Refusal::Unavailable(why)),
                Pick::NoRoute => return Err(Refusal::NoRoute),
            }
        }
    }

    async fn connection(self: Arc<Self>, accepted: Accepted) {
        match accepted.listener.protocol {
            Some(pb::Protocol::Mysql) => mysql::serve(self, accepted).await,
            _ => postgres::serve(self, accepted).await,
        }
    }
}

#[tonic::async_trait]
impl Module for Dblb {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Dblb
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Postgres, pb::Protocol::Mysql]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        self.metrics.register(&plane.stats.module_registry)?;
        let checks = tokio::spawn(health::run(Arc::clone(&self)));
        let reaper = tokio::spawn(close_idle_logins(Arc::clone(&self)));
        let metrics = Arc::clone(&self.metrics);
        let tls = self.tls.clone();
        let served = marchproxy_runtime::tcp::serve_refusing(
            plane,
            move |accepted| Arc::clone(&self).connection(accepted),
            move |accepted, retry_after| {
                let metrics = Arc::clone(&metrics);
                let tls = tls.clone();
                async move {
                    match accepted.listener.protocol {
                        Some(pb::Protocol::Mysql) => {
                            metrics.session(Engine::Mysql.name(), Outcome::RateLimited);
                            mysql::refuse_rate_limited(accepted, retry_after).await;
                        }
                        _ => {
                            metrics.session(Engine::Postgres.name(), Outcome::RateLimited);
                            postgres::refuse_rate_limited(accepted, retry_after, tls).await;
                        }
                    }
                }
            },
        )
        .await;
        checks.abort();
        reaper.abort();
        served
    }

    fn apply_routes(&self, routes: &[RouteSpec]) -> Result<(), String> {
        let table = Table::compile(routes, &self.table.load(), &self.metrics)?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    fn check_config(
        &self,
        _config_type: &str,
        config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        let settings = self.settings().merged(config)?;
        settings.load_auth_file().map_err(|e| vec![e.to_string()])?;
        Ok(())
    }

    fn apply_config(&self, _config_type: &str, config: &serde_json::Value) {
        let Ok(settings) = self.settings().merged(config) else {
            return;
        };
        match settings.load_auth_file() {
            Ok(file) => self.auth_file.store(file.map(Arc::new)),
            // Checked just before; a file changed since keeps the users read last time.
            Err(error) => tracing::warn!(%error, "module.auth_file not reloaded"),
        }
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    fn custom_stats(&self) -> std::collections::HashMap<String, String> {
        let table = self.table();
        let backends = table.backends();
        let healthy = backends.iter().filter(|b| b.is_healthy()).count();
        [
            ("backends".to_owned(), backends.len().to_string()),
            ("backends_healthy".to_owned(), healthy.to_string()),
            (
                "waiting_clients".to_owned(),
                self.waiting.load(Ordering::Acquire).to_string(),
            ),
        ]
        .into()
    }
}

/// Closes the DBLB's own server logins once unused for `module.server_idle_timeout_ms`.
async fn close_idle_logins(dblb: Arc<Dblb>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let closed = dblb.pools.close_idle(dblb.settings().server_idle_timeout());
        if closed > 0 {
            tracing::debug!(closed, "idle server logins closed");
        }
    }
}

/// Runs until `shutdown` completes (then drains), as the binary does until SIGINT or SIGTERM.
pub async fn run_until(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut common = cli.common;
    if common.listen.is_empty() {
        common.listen = DEFAULT_LISTEN.iter().map(|l| (*l).to_owned()).collect();
    }
    let config = RuntimeConfig::from_args(ModuleKind::Dblb, common)?;
    marchproxy::telemetry::init(config.log_format);
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(
            marchproxy_runtime::http::tls_acceptor(cert, key, &[b"postgresql"])
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let metrics = Arc::new(Metrics::new(|opts| {
        opts.const_label("module_type", ModuleKind::Dblb.name())
            .const_label("instance", &config.instance_id)
    }));
    marchproxy_runtime::run(Dblb::new(metrics, tls), config, shutdown).await?;
    Ok(())
}

/// The binary's entry: runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, marchproxy::signal::shutdown()).await
}
