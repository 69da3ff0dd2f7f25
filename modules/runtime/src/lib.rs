//! The module runtime: what every MarchProxy module (ALB, DBLB, AILB, RTMP, wasm-registry, SQS
//! proxy) is built on. A module implements [`Module`] (its data plane and a few hooks); the
//! runtime supplies the rest:
//!
//! - ModuleService, all 22 RPCs ([`service`]), with health and reflection beside it;
//! - registration, heartbeats with live stats, re-registration and graceful unregister
//!   ([`registration`]);
//! - one shared rate limiter the data plane asks ([`limiter`]), counters and latency
//!   percentiles ([`stats`]);
//! - an HTTP/1.1 data plane for modules that answer HTTP ([`http`]);
//! - the admin server (`/metrics`, `/healthz`, `/readyz`), the common flags ([`config`]);
//! - the drain on SIGTERM/SIGINT or a `Shutdown` RPC: stop accepting, let open connections
//!   finish (up to the drain timeout), unregister, exit.
//!
//! [`Runtime::bind`] then [`Runtime::run`] start a module; [`run`] does both.

pub mod config;
pub mod echo;
pub mod http;
pub mod module;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod registration;
pub mod service;
pub mod shared;
pub mod stats;
pub mod tcp;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use marchproxy::{admin::AdminState, auth::RequireApiKey, pb};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

pub use config::{CommonArgs, RuntimeConfig};
pub use marchproxy::{
    limiter::{RateLimiter, Subject, Verdict},
    listen::ListenSpec,
};
pub use module::{DataListener, DataPlane, Module, ModuleError, Stopping};
pub use shared::{Phase, Shared};
pub use stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Bind(#[from] marchproxy::serve::BindError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Reflection(#[from] marchproxy::serve::ReflectionError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl AdminState for Shared {
    fn metrics(&self) -> String {
        marchproxy::admin::render(&self.stats.registry)
            + &marchproxy::admin::render(&self.stats.module_registry)
    }

    fn ready(&self) -> bool {
        self.phase() == Phase::Ready
    }
}

/// What others should dial for a listener bound at `bound`: its port on the advertised host.
fn reachable(host: &str, bound: SocketAddr) -> String {
    format!("{host}:{}", bound.port())
}

/// A module bound to its ports, not yet serving.
pub struct Runtime {
    shared: Arc<Shared>,
    grpc: marchproxy::serve::Bound,
    admin: marchproxy::serve::Bound,
    data: Vec<DataListener>,
    api_key: Option<String>,
    startup_section: serde_json::Value,
    startup_routes: Vec<pb::Route>,
}

impl Runtime {
    /// Binds every listener and prepares the module's state from `config`.
    pub async fn bind(
        module: Arc<dyn Module>,
        config: RuntimeConfig,
    ) -> Result<Self, RuntimeError> {
        if module.kind() != config.kind {
            return Err(RuntimeError::Config(format!(
                "the config is for a {} but the module is a {}",
                config.kind,
                module.kind()
            )));
        }
        let grpc = marchproxy::serve::bind(config.grpc_listen, "gRPC", "--grpc-listen").await?;
        let admin =
            marchproxy::serve::bind(config.admin_listen, "admin HTTP", "--admin-listen").await?;
        let mut data = Vec::with_capacity(config.listen.len());
        for spec in &config.listen {
            data.push(DataListener {
                protocol: spec.protocol,
                proxy_protocol: spec.proxy_protocol,
                ..DataListener::from(
                    marchproxy::serve::bind(spec.addr, "data plane", "--listen").await?,
                )
            });
        }
        let grpc_addr = grpc.addr;
        let advertise = match &config.advertise {
            Some(advertise) => advertise.clone(),
            None if grpc_addr.ip().is_unspecified() => format!("127.0.0.1:{}", grpc_addr.port()),
            None => grpc_addr.to_string(),
        };
        let host = advertise
            .rsplit_once(':')
            .map_or("127.0.0.1", |(host, _)| host)
            .to_owned();
        let data_addresses = data
            .iter()
            .map(|l| (l.protocol, reachable(&host, l.addr)))
            .collect();
        let admin_address = reachable(&host, admin.addr);
        let nlb = config
            .nlb
            .as_deref()
            .map(|url| shared::NlbLink::new(url, config.api_key.as_deref()))
            .transpose()
            .map_err(RuntimeError::Config)?;
        let shared = Shared::new(shared::Identity {
            module,
            instance_id: config.instance_id.clone(),
            version: config.version.clone(),
            advertise,
            data_addresses,
            admin_address,
            config_path: config.config_path.clone(),
            health_check: config.health_check.clone(),
            nlb,
            settings: shared::RuntimeSettings {
                heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
                drain_timeout_ms: config.drain_timeout.as_millis() as u64,
                max_connections: config.max_connections,
            },
        });
        Ok(Runtime {
            shared,
            grpc,
            admin,
            data,
            api_key: config.api_key,
            startup_section: config.module_section,
            startup_routes: config.routes.iter().map(pb::Route::from).collect(),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    pub fn data_addrs(&self) -> Vec<SocketAddr> {
        self.data.iter().map(|l| l.addr).collect()
    }

    /// Serves until `shutdown` completes or a `Shutdown` RPC arrives, then drains and stops.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RuntimeError> {
        let Runtime {
            shared,
            grpc,
            admin,
            data,
            api_key,
            startup_section,
            startup_routes,
        } = self;
        shared
            .update_routes(startup_routes, true)
            .map_err(|e| RuntimeError::Config(format!("routes: {e}")))?;
        if shared.module.config_types().contains(&"module") {
            shared
                .update_section("module", &startup_section, false)
                .map_err(|e| RuntimeError::Config(format!("[module]: {}", e.join("; "))))?;
        }

        let auth = RequireApiKey::new(api_key);
        let (health, routes) = marchproxy::serve::standard_routes(auth.clone())?;
        type Server = pb::module_service_server::ModuleServiceServer<service::ModuleGrpc>;
        health.set_serving::<Server>().await;
        let module_service = pb::module_service_server::ModuleServiceServer::with_interceptor(
            service::ModuleGrpc::new(Arc::clone(&shared)),
            auth,
        );
        let (stop_servers, servers_stopped) = watch::channel(false);
        let mut grpc_stopped = servers_stopped.clone();
        let grpc_task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes.add_service(module_service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(grpc.listener), async move {
                    let _ = grpc_stopped.wait_for(|stop| *stop).await.map(|_| ());
                }),
        );
        let mut admin_stopped = servers_stopped.clone();
        let admin_app = marchproxy::admin::router(Arc::clone(&shared))
            .merge(shared.module.admin_routes().unwrap_or_default());
        let admin_server =
            axum::serve(admin.listener, admin_app).with_graceful_shutdown(async move {
                let _ = admin_stopped.wait_for(|stop| *stop).await.map(|_| ());
            });
        let admin_task = tokio::spawn(async move { admin_server.await });

        let (stop_accepting, stopping) = watch::channel(false);
        let plane = DataPlane {
            listeners: data,
            stats: Arc::clone(&shared.stats),
            limiter: Arc::clone(&shared.limiter),
            stopping: Stopping(stopping),
        };
        let data_task = tokio::spawn(Arc::clone(&shared.module).serve(plane));
        let (finish_registration, registration_finished) = watch::channel(false);
        let registration_task = tokio::spawn(registration::maintain(
            Arc::clone(&shared),
            registration_finished,
        ));
        let limiter = Arc::clone(&shared.limiter);
        let mut forgetting_stopped = servers_stopped.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = ticks.tick() => limiter.forget_idle(Duration::from_secs(3600)),
                    _ = forgetting_stopped.wait_for(|stop| *stop) => return,
                }
            }
        });
        if shared.nlb.is_none() {
            shared.set_phase(Phase::Ready);
        }
        info!(instance = %shared.instance_id, module_type = %shared.kind, version = %shared.version, advertise = %shared.advertise, data = ?shared.data_addresses, "module serving");

        let mut stop_request = shared.stop_request.subscribe();
        let drain = tokio::select! {
            () = shutdown => shared.settings().drain_timeout(),
            requested = stop_request.wait_for(Option::is_some) => requested.ok().and_then(|r| *r).unwrap_or_default(),
        };

        // Drain: no new connections, open ones finish, the NLB is told, then everything stops.
        shared.set_phase(Phase::Stopping);
        info!(instance = %shared.instance_id, open_connections = shared.stats.active_connections(), drain_s = drain.as_secs_f64(), "draining");
        // Tell the NLB first (STOPPING, and the connections open now, which its drain waits on),
        // then stop accepting: connections it routed meanwhile are still taken.
        registration::report_now(&shared).await;
        stop_accepting.send_replace(true);
        let unregistering = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { registration::unregister(&shared, drain).await })
        };
        let left = marchproxy::serve::drain(
            || shared.stats.active_connections(),
            &shared.stats.closed,
            drain,
        )
        .await;
        if left > 0 {
            warn!(instance = %shared.instance_id, left, "drain timeout: closing with connections open");
        }
        registration::report_now(&shared).await;
        if tokio::time::timeout(Duration::from_secs(5), unregistering)
            .await
            .is_err()
        {
            warn!(instance = %shared.instance_id, "the NLB did not confirm the unregistration in time");
        }
        finish_registration.send_replace(true);
        stop_servers.send_replace(true);
        let _ = registration_task.await;
        match tokio::time::timeout(Duration::from_secs(5), data_task).await {
            Ok(Ok(Err(error))) => {
                warn!(instance = %shared.instance_id, %error, "data plane ended with an error")
            }
            Ok(Err(error)) => {
                warn!(instance = %shared.instance_id, %error, "data plane task failed")
            }
            Err(_) => {
                warn!(instance = %shared.instance_id, "data plane did not stop accepting in time")
            }
            Ok(Ok(Ok(()))) => {}
        }
        health.set_not_serving::<Server>().await;
        let served = grpc_task.await;
        let _ = admin_task.await;
        info!(instance = %shared.instance_id, "stopped");
        match served {
            Ok(result) => result.map_err(RuntimeError::from),
            Err(_) => Ok(()),
        }
    }
}

/// Binds and serves `module` until `shutdown` completes (or a `Shutdown` RPC), then drains.
pub async fn run(
    module: Arc<dyn Module>,
    config: RuntimeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RuntimeError> {
    Runtime::bind(module, config).await?.run(shutdown).await
}
