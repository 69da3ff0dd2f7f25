//! MarchProxy's network load balancer (NLB): modules register and heartbeat here, operators
//! route, configure and scale here, and every RPC of NLBService does real work.
//!
//! - [`state`]: the registry, routing table and decisions, as plain synchronous rules.
//! - [`service`]: NLBService over gRPC (validation at the edge, errors mapped once).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`store`]: operator-set state on disk; [`settings`]: live config sections.
//!
//! [`Server::bind`] then [`Server::run`] start it; [`run`] does both.

pub mod admin;
mod affinity;
pub mod analysis;
pub mod bluegreen;
#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod console;
pub mod dataplane;
mod docker_scaler;
pub mod error;
pub mod handover;
pub mod metrics;
mod module_client;
pub mod module_gateway;
pub mod nlb;
pub mod policy;
mod relay;
pub mod rollout;
mod scaler;
pub mod service;
pub mod settings;
pub mod sniff;
pub mod state;
pub mod store;
mod target;
mod webhook;

use std::{future::Future, net::SocketAddr, sync::Arc};

use marchproxy::{auth::RequireApiKey, pb};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use config::{Args, Config};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] marchproxy::serve::BindError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot restore state: {0}")]
    Restore(String),
    #[error(transparent)]
    Reflection(#[from] marchproxy::serve::ReflectionError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("admin server failed: {0}")]
    Admin(std::io::Error),
    #[error(transparent)]
    Handover(#[from] handover::HandoverError),
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cannot load the shared state: {0}")]
    SharedState(String),
    #[error(
        "--store needs an NLB built with etcd support: cargo build --release -p marchproxy-nlb --features etcd (which needs protoc: apt-get install protobuf-compiler)"
    )]
    NoEtcdSupport,
}

/// A bound NLB, not yet serving: its addresses are known (port 0 resolved).
pub struct Server {
    grpc: marchproxy::serve::Bound,
    admin: marchproxy::serve::Bound,
    listeners: Vec<dataplane::Listener>,
    limits: dataplane::Limits,
    drain_timeout: std::time::Duration,
    nlb: Arc<nlb::Nlb>,
    stop: watch::Sender<bool>,
    /// From the process this one replaces, told `ready` once this one serves.
    inherited: Option<handover::Inherited>,
}

impl Server {
    /// Restores state from the state directory (or, with `takeover`, from the NLB it replaces)
    /// and binds the listeners (or takes the replaced NLB's).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let store = store::Store::open(config.state_dir.as_deref())?;
        let mut inherited =
            handover::before_bind(config.state_dir.as_deref(), config.takeover).await?;
        let persisted = match inherited.as_mut() {
            Some(from) => std::mem::take(&mut from.state),
            None => store.load()?,
        };
        let restored_routes = persisted.operator_routes.len();
        let mut state = state::State::restore(persisted, config.settings.clone())
            .map_err(StartError::Restore)?;
        if let Some(from) = inherited.as_mut() {
            let now = std::time::Instant::now();
            let moved = state.restore_moved(
                std::mem::take(&mut from.instances),
                now,
                std::time::SystemTime::now(),
            );
            state.restore_pins(std::mem::take(&mut from.pins), now);
            info!(
                modules = moved,
                "taking over from the running NLB: its state, registrations and listeners move here"
            );
        }
        match store.dir() {
            _ if config.store.is_some() => {}
            Some(dir) => {
                info!(state_dir = %dir.display(), operator_routes = restored_routes, "operator state restored")
            }
            None => info!("no --state-dir: operator state lives in memory and is lost on restart"),
        }
        let grpc = bind_or_inherit(
            &mut inherited,
            handover::Role::Grpc,
            config.grpc_listen,
            "gRPC",
            "--grpc-listen",
        )
        .await?;
        let admin = bind_or_inherit(
            &mut inherited,
            handover::Role::Admin,
            config.admin_listen,
            "admin HTTP",
            "--admin-listen",
        )
        .await?;
        let mut listeners = Vec::with_capacity(config.listen.len());
        for spec in &config.listen {
            listeners.push(dataplane::Listener {
                protocol: spec.protocol,
                proxy_protocol: spec.proxy_protocol,
                bound: bind_or_inherit(
                    &mut inherited,
                    handover::Role::Data,
                    spec.addr,
                    "data plane",
                    "--listen",
                )
                .await?,
            });
        }
        let (stop, stopped) = watch::channel(false);
        let nlb = nlb::Nlb::new(state, store, config.api_key, stopped);
        let nlb = match &config.store {
            None => nlb,
            #[cfg(feature = "etcd")]
            Some(spec) => {
                let replica_id = config.replica_id.clone().unwrap_or_else(|| {
                    format!("{}:{}", marchproxy::names::host_name(), grpc.addr.port())
                });
                let options = cluster::EtcdOptions {
                    endpoints: spec.endpoints.clone(),
                    prefix: spec.prefix.clone(),
                    user: spec.auth.clone(),
                    ca_file: spec.ca_file.clone(),
                    cert_file: spec.cert_file.clone(),
                    key_file: spec.key_file.clone(),
                };
                let cluster =
                    cluster::Cluster::connect(options, config.settings.clone(), replica_id).await?;
                cluster.metrics.register(&nlb.metrics.registry);
                let nlb = nlb.with_cluster(Arc::new(cluster));
                if let Some(cluster) = &nlb.cluster {
                    cluster
                        .load(&nlb)
                        .await
                        .map_err(|e| StartError::SharedState(e.to_string()))?;
                    info!(store = %cluster.endpoints(), replica = %cluster.replica_id, modules = nlb.state().instances.len(), "shared state loaded from etcd");
                }
                nlb
            }
            #[cfg(not(feature = "etcd"))]
            Some(_) => return Err(StartError::NoEtcdSupport),
        };
        let nlb = Arc::new(nlb);
        Ok(Server {
            grpc,
            admin,
            listeners,
            limits: config.limits,
            drain_timeout: config.drain_timeout,
            nlb,
            stop,
            inherited,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    /// The registry served on the admin server's `/metrics`, for what runs beside the NLB in
    /// one process (`marchproxy up`'s MQTT broker) to add its metrics to.
    pub fn metrics_registry(&self) -> &prometheus::Registry {
        &self.nlb.metrics.registry
    }

    /// The data-plane listeners' addresses, in `--listen` order.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.bound.addr).collect()
    }

    /// Serves until `shutdown` completes, then stops streams and drains in-flight calls.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let Server {
            grpc,
            admin,
            listeners,
            limits,
            drain_timeout,
            nlb,
            stop,
            inherited,
        } = self;
        let stop = Arc::new(stop);
        // Duplicates of the listening sockets for a newcomer taking over, kept by the
        // handover task for as long as it may offer them.
        let offered: std::io::Result<Vec<handover::Offered>> =
            [
                handover::Offered::of(handover::Role::Grpc, grpc.addr, &grpc.listener),
                handover::Offered::of(handover::Role::Admin, admin.addr, &admin.listener),
            ]
            .into_iter()
            .chain(listeners.iter().map(|l| {
                handover::Offered::of(handover::Role::Data, l.bound.addr, &l.bound.listener)
            }))
            .collect();
        let data_plane = tokio::spawn(
            dataplane::DataPlane::new(Arc::clone(&nlb), limits).run(listeners, drain_timeout),
        );
        let (grpc_addr, admin_addr) = (grpc.addr, admin.addr);

        let auth = RequireApiKey::new(nlb.api_key.clone());
        let (health, routes) = marchproxy::serve::standard_routes(auth.clone())?;
        health
            .set_serving::<pb::nlb_service_server::NlbServiceServer<service::NlbGrpc>>()
            .await;
        let nlb_service = pb::nlb_service_server::NlbServiceServer::with_interceptor(
            service::NlbGrpc::new(Arc::clone(&nlb)),
            auth.clone(),
        );
        let module_service = pb::module_service_server::ModuleServiceServer::with_interceptor(
            module_gateway::ModuleGateway::new(Arc::clone(&nlb)),
            auth,
        );

        #[cfg(feature = "etcd")]
        let follower = nlb
            .cluster
            .clone()
            .map(|cluster| tokio::spawn(cluster.run(Arc::clone(&nlb), grpc.addr)));
        let sweeper = tokio::spawn(Arc::clone(&nlb).run_sweeper());
        let rollouts = tokio::spawn(Arc::clone(&nlb).run_rollouts());
        let mut stopped = nlb.shutdown.clone();
        let admin_stopped = nlb.shutdown.clone();
        let console = console::Console::new(Arc::clone(&nlb));
        let sampler = tokio::spawn(Arc::clone(&console).run_sampler());
        let admin_server = axum::serve(admin.listener, admin::router(Arc::clone(&nlb), &console))
            .with_graceful_shutdown(async move {
                let mut admin_stopped = admin_stopped;
                nlb::stopped(&mut admin_stopped).await;
            });
        let admin_task = tokio::spawn(async move { admin_server.await });

        let stopper = Arc::clone(&stop);
        tokio::spawn(async move {
            shutdown.await;
            info!("NLB shutting down");
            // Receivers live in `nlb`, which outlives this task's send.
            let _ = stopper.send(true);
        });
        nlb.mark_ready();
        info!(grpc = %grpc_addr, admin = %admin_addr, "NLB listening");
        let mut not_confirmed = None;
        if let Some(from) = inherited {
            match from.ready().await {
                Ok(()) => info!("took over: the old NLB drains and exits"),
                Err(error) => {
                    tracing::error!(%error, "takeover not confirmed: stopping");
                    let _ = stop.send(true);
                    not_confirmed = Some(error);
                }
            }
        }
        // Started only now: until the old process confirmed, its handover socket is the one.
        let handover_task = match (nlb.state_dir(), offered) {
            (Some(dir), Ok(offered)) if not_confirmed.is_none() => Some(tokio::spawn(
                handover::serve(Arc::clone(&nlb), dir.to_owned(), offered, Arc::clone(&stop)),
            )),
            (Some(_), Err(error)) => {
                tracing::warn!(%error, "cannot keep the listening sockets for a takeover: --takeover will not find this NLB");
                None
            }
            _ => None,
        };
        let served = tonic::transport::Server::builder()
            .add_routes(routes.add_service(nlb_service).add_service(module_service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc.listener), async move {
                nlb::stopped(&mut stopped).await;
            })
            .await;
        health
            .set_not_serving::<pb::nlb_service_server::NlbServiceServer<service::NlbGrpc>>()
            .await;
        let _ = data_plane.await;
        sweeper.abort();
        rollouts.abort();
        if let Some(task) = handover_task {
            // Awaited, not just aborted: once this returns nothing answers on the handover
            // socket, so an NLB started right after on the same state directory may start.
            task.abort();
            let _ = task.await;
        }
        sampler.abort();
        #[cfg(feature = "etcd")]
        if let Some(follower) = follower {
            // It ends at shutdown, giving up this replica's lease (and any leadership) at once.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(3), follower).await;
        }
        let admin_result = admin_task.await;
        if let Some(error) = not_confirmed {
            return Err(error.into());
        }
        served?;
        match admin_result {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(error)) => Err(StartError::Admin(error)),
        }
    }
}

/// The listener the replaced NLB had at `addr` for `role`, or a fresh one.
async fn bind_or_inherit(
    inherited: &mut Option<handover::Inherited>,
    role: handover::Role,
    addr: SocketAddr,
    what: &'static str,
    flag: &'static str,
) -> Result<marchproxy::serve::Bound, marchproxy::serve::BindError> {
    if let Some(listener) = inherited.as_mut().and_then(|from| from.take(role, addr)) {
        return Ok(marchproxy::serve::Bound { listener, addr });
    }
    marchproxy::serve::bind(addr, what, flag).await
}

/// Binds and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    Server::bind(config).await?.run(shutdown).await
}
