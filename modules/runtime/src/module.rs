//! What a module implements: its data plane and a few hooks. Everything else (ModuleService,
//! registration, heartbeats, rate limits, stats, admin, drain) is the runtime's.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use marchproxy::{names::ModuleKind, pb, route::RouteSpec};
use tokio::{net::TcpListener, sync::watch};

use marchproxy::limiter::RateLimiter;

use crate::stats::Stats;

/// A module's failure, as text for logs and gRPC answers.
pub type ModuleError = Box<dyn std::error::Error + Send + Sync>;

/// A bound data-plane listener.
pub struct DataListener {
    /// The protocol named on `--listen PROTOCOL=ADDR`, if any.
    pub protocol: Option<pb::Protocol>,
    pub listener: TcpListener,
    pub addr: SocketAddr,
    /// `+proxy` on `--listen`: each connection starts with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
}

impl From<marchproxy::serve::Bound> for DataListener {
    fn from(bound: marchproxy::serve::Bound) -> Self {
        DataListener {
            protocol: None,
            listener: bound.listener,
            addr: bound.addr,
            proxy_protocol: false,
        }
    }
}

/// Tells the data plane when to stop accepting new connections.
#[derive(Clone)]
pub struct Stopping(pub(crate) watch::Receiver<bool>);

impl Stopping {
    /// Completes once the module is shutting down (stop accepting; finish open connections).
    pub async fn wait(&mut self) {
        // Only the wake-up matters; the guard is dropped at once.
        let _ = self.0.wait_for(|stop| *stop).await.map(|_| ());
    }
}

/// What the runtime hands the data plane.
pub struct DataPlane {
    pub listeners: Vec<DataListener>,
    /// Count connections (`stats.connection()`), requests (`stats.request()`) and bytes here:
    /// heartbeats, GetStats and /metrics read them, and the drain waits on the connections.
    pub stats: Arc<Stats>,
    /// Ask before serving; over-limit traffic gets the protocol's refusal.
    pub limiter: Arc<RateLimiter>,
    pub stopping: Stopping,
}

/// A module: one implementation per kind (ALB, DBLB, ...). Only `kind`, `protocols` and `serve`
/// are required.
#[tonic::async_trait]
pub trait Module: Send + Sync + 'static {
    fn kind(&self) -> ModuleKind;

    /// Protocols this module serves (CanHandle's default answer, and the NLB's capabilities).
    fn protocols(&self) -> Vec<pb::Protocol>;

    /// Runs the data plane on the listeners until `plane.stopping` fires, then returns; the
    /// runtime then waits for open connections (counted in `plane.stats`) to finish.
    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError>;

    /// Whether this module can serve `route`. By default: when it speaks the route's protocol.
    fn can_handle(
        &self,
        route: &pb::Route,
        _context: &HashMap<String, String>,
    ) -> pb::CanHandleResponse {
        let protocols = self.protocols();
        let speaks = route.protocol == pb::Protocol::Unspecified as i32
            || protocols.iter().any(|p| *p as i32 == route.protocol);
        let names: Vec<String> = protocols
            .iter()
            .map(|p| marchproxy::names::protocol_name(*p))
            .collect();
        pb::CanHandleResponse {
            can_handle: speaks,
            priority: 0,
            reason: if speaks {
                format!("{} serves {}", self.kind(), names.join(", "))
            } else {
                format!("{} serves only {}", self.kind(), names.join(", "))
            },
            metadata: HashMap::new(),
        }
    }

    /// The whole route table after every change (start, UpdateRoutes, DeleteRoute, Reload).
    /// An error rejects the change and names what is wrong; the old table stays.
    fn apply_routes(&self, _routes: &[RouteSpec]) -> Result<(), String> {
        Ok(())
    }

    /// The config sections this module owns (`config_type` in Get/UpdateConfig).
    fn config_types(&self) -> Vec<&'static str> {
        vec!["module"]
    }

    /// Checks a section without applying it; each error names its field.
    fn check_config(
        &self,
        _config_type: &str,
        _config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        Ok(())
    }

    /// Applies a section that passed `check_config` (at start with the file's `[module]`, then on
    /// UpdateConfig and Reload).
    fn apply_config(&self, _config_type: &str, _config: &serde_json::Value) {}

    /// Deep health checks (its backends, its queue...): name -> Ok(detail) or Err(problem).
    async fn health_checks(&self) -> Vec<(String, Result<String, String>)> {
        Vec::new()
    }

    /// Labels added to this instance's registration metadata (e.g. the SQS proxy's `region`),
    /// which operator routes and `marchctl modules` show.
    fn metadata(&self) -> HashMap<String, String> {
        HashMap::new()
    }

    /// Pages the module adds to the admin server beside `/metrics`, `/healthz` and `/readyz`
    /// (e.g. the RTMP module's `/stats`), behind the same listener.
    fn admin_routes(&self) -> Option<axum::Router> {
        None
    }

    /// Extra figures for GetStats and heartbeats (`custom_stats`).
    fn custom_stats(&self) -> HashMap<String, String> {
        HashMap::new()
    }
}
