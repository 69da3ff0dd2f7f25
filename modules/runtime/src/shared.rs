//! The runtime's state for one module instance: identity, routes, config sections, limits,
//! stats, lifecycle phase, and the link to the NLB. ModuleService, the registration loop and
//! the admin server all work on this one value.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use marchproxy::{
    auth::AttachApiKey,
    names::{self, ModuleKind},
    pb,
    route::RouteSpec,
    time,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{service::interceptor::InterceptedService, transport::Channel};
use tracing::{info, warn};

use marchproxy::limiter::RateLimiter;

use crate::{module::Module, stats::Stats};

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving its data plane, not (yet) registered with the NLB.
    Starting,
    /// Registered (or running without an NLB): ready for traffic.
    Ready,
    /// Draining: no new connections, open ones finishing.
    Stopping,
}

impl Phase {
    pub fn health(self) -> pb::HealthStatus {
        match self {
            Phase::Starting => pb::HealthStatus::Starting,
            Phase::Ready => pb::HealthStatus::Healthy,
            Phase::Stopping => pb::HealthStatus::Stopping,
        }
    }
}

/// Longest heartbeat interval: the NLB marks a module unhealthy after 30 s without one by
/// default, so a longer interval would make it flap.
pub const MAX_HEARTBEAT_MS: u64 = 10_000;

/// The runtime's own live settings: config section `runtime`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    pub heartbeat_interval_ms: u64,
    pub drain_timeout_ms: u64,
    pub max_connections: u32,
}

impl RuntimeSettings {
    fn check(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if !(10..=MAX_HEARTBEAT_MS).contains(&self.heartbeat_interval_ms) {
            errors.push(format!(
                "runtime.heartbeat_interval_ms must be from 10 to {MAX_HEARTBEAT_MS}, well inside the NLB's unhealthy timeout (got {})",
                self.heartbeat_interval_ms
            ));
        }
        if self.drain_timeout_ms > 3_600_000 {
            errors.push(format!(
                "runtime.drain_timeout_ms must be at most 3600000 (got {})",
                self.drain_timeout_ms
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// The name of the runtime's own config section.
pub const RUNTIME_SECTION: &str = "runtime";

pub type NlbClient =
    pb::nlb_service_client::NlbServiceClient<InterceptedService<Channel, AttachApiKey>>;
pub type NlbModuleClient =
    pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

/// The NLB's gRPC endpoints (`--nlb URL[,URL...]`, one per NLB replica), each connected lazily
/// and reconnected by its channel. Calls go to the current one; a call that finds it away
/// moves the link to the next, so a module rides out the loss of a replica with its
/// registration intact (the replicas share it).
#[derive(Clone)]
pub struct NlbLink {
    endpoints: Arc<Vec<(String, Channel)>>,
    current: Arc<std::sync::atomic::AtomicUsize>,
    auth: AttachApiKey,
}

impl NlbLink {
    pub fn new(urls: &str, api_key: Option<&str>) -> Result<Self, String> {
        let endpoints = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                let url = if url.contains("://") {
                    url.to_owned()
                } else {
                    format!("http://{url}")
                };
                let channel = Channel::from_shared(url.clone())
                    .map_err(|_| format!("--nlb `{url}` is not a URL such as http://nlb:50050"))?
                    .connect_timeout(Duration::from_secs(3))
                    .timeout(Duration::from_secs(10))
                    .connect_lazy();
                Ok((url, channel))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if endpoints.is_empty() {
            return Err(
                "--nlb names no endpoint; write http://nlb:50050[,http://nlb-2:50050]".into(),
            );
        }
        let auth = AttachApiKey::new(api_key).map_err(|e| e.to_string())?;
        Ok(NlbLink {
            endpoints: Arc::new(endpoints),
            current: Arc::default(),
            auth,
        })
    }

    fn channel(&self) -> Channel {
        self.endpoints[self.at()].1.clone()
    }

    /// The endpoint calls go to now.
    pub fn url(&self) -> &str {
        self.url_of(self.at())
    }

    /// Which endpoint calls go to now: take it before a call, give it to
    /// [`NlbLink::fail_over`] after a failure.
    pub fn at(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed) % self.endpoints.len()
    }

    /// The URL of endpoint `index`.
    pub fn url_of(&self, index: usize) -> &str {
        &self.endpoints[index % self.endpoints.len()].0
    }

    /// Every endpoint, comma-separated (for status pages).
    pub fn urls(&self) -> String {
        self.endpoints
            .iter()
            .map(|(url, _)| url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// After a call to endpoint `used` failed: when the status says the NLB was not reached
    /// (or could not do it for now), moves to the next endpoint and returns it; None with one
    /// endpoint or for an answer that another replica would give the same way. Calls that
    /// failed together on one endpoint move the link once.
    pub fn fail_over(&self, used: usize, status: &tonic::Status) -> Option<&str> {
        let away = matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        );
        if !away || self.endpoints.len() < 2 {
            return None;
        }
        let next = (used + 1) % self.endpoints.len();
        // Another call that failed on `used` may have moved on already: then stay there.
        let _ = self.current.compare_exchange(
            used,
            next,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
        Some(self.url())
    }

    pub fn nlb(&self) -> NlbClient {
        pb::nlb_service_client::NlbServiceClient::with_interceptor(
            self.channel(),
            self.auth.clone(),
        )
    }

    /// The NLB's ModuleService (blue/green is answered there).
    pub fn modules(&self) -> NlbModuleClient {
        pb::module_service_client::ModuleServiceClient::with_interceptor(
            self.channel(),
            self.auth.clone(),
        )
    }
}

/// A stored config section.
#[derive(Clone, Debug)]
pub struct Section {
    pub value: serde_json::Value,
    pub updated_at: SystemTime,
}

pub struct Shared {
    pub module: Arc<dyn Module>,
    pub kind: ModuleKind,
    pub instance_id: String,
    pub version: String,
    /// What the NLB dials for ModuleService.
    pub advertise: String,
    /// Data-plane addresses as the NLB should connect to them, with the protocol named on
    /// `--listen` where there was one.
    pub data_addresses: Vec<(Option<pb::Protocol>, String)>,
    pub admin_address: String,
    pub started_at: SystemTime,
    pub stats: Arc<Stats>,
    pub limiter: Arc<RateLimiter>,
    pub config_path: Option<PathBuf>,
    pub health_check: Option<pb::HealthCheckConfig>,
    pub nlb: Option<NlbLink>,
    pub phase: watch::Sender<Phase>,
    /// A Shutdown RPC asks for a drain of this long.
    pub stop_request: watch::Sender<Option<Duration>>,
    settings: Mutex<RuntimeSettings>,
    routes: Mutex<BTreeMap<String, RouteSpec>>,
    sections: Mutex<BTreeMap<String, Section>>,
    registration: Mutex<Option<String>>,
    /// One route relay at a time, each sending the table as it is then: the NLB ends with the
    /// latest table whatever order concurrent updates finish in.
    relaying: tokio::sync::Mutex<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // State here is replaced whole after validation; a panic elsewhere cannot leave it torn.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The parts of `Shared` that come from start-up.
pub struct Identity {
    pub module: Arc<dyn Module>,
    pub instance_id: String,
    pub version: String,
    pub advertise: String,
    pub data_addresses: Vec<(Option<pb::Protocol>, String)>,
    pub admin_address: String,
    pub config_path: Option<PathBuf>,
    pub health_check: Option<pb::HealthCheckConfig>,
    pub nlb: Option<NlbLink>,
    pub settings: RuntimeSettings,
}

impl Shared {
    pub fn new(identity: Identity) -> Arc<Self> {
        let kind = identity.module.kind();
        Arc::new(Shared {
            stats: Stats::new(&identity.instance_id, kind),
            kind,
            module: identity.module,
            instance_id: identity.instance_id,
            version: identity.version,
            advertise: identity.advertise,
            data_addresses: identity.data_addresses,
            admin_address: identity.admin_address,
            started_at: SystemTime::now(),
            limiter: RateLimiter::new(),
            config_path: identity.config_path,
            health_check: identity.health_check,
            nlb: identity.nlb,
            phase: watch::channel(Phase::Starting).0,
            stop_request: watch::channel(None).0,
            settings: Mutex::new(identity.settings),
            routes: Mutex::new(BTreeMap::new()),
            sections: Mutex::new(BTreeMap::new()),
            registration: Mutex::new(None),
            relaying: tokio::sync::Mutex::new(()),
        })
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    pub fn settings(&self) -> RuntimeSettings {
        lock(&self.settings).clone()
    }

    pub fn registration(&self) -> Option<String> {
        lock(&self.registration).clone()
    }

    pub fn set_registration(&self, id: Option<String>) {
        *lock(&self.registration) = id;
    }

    /// This instance as the NLB and GetStatus show it.
    pub fn instance(&self) -> pb::ModuleInstance {
        let mut metadata = self.module.metadata();
        metadata.insert("admin_address".to_owned(), self.admin_address.clone());
        if let Some((_, first)) = self.data_addresses.first() {
            metadata.insert("data_address".to_owned(), first.clone());
        }
        // The NLB sends each protocol to the first listener named for it.
        for (protocol, address) in &self.data_addresses {
            if let Some(protocol) = protocol {
                metadata
                    .entry(format!("data_address.{}", names::protocol_name(*protocol)))
                    .or_insert_with(|| address.clone());
            }
        }
        pb::ModuleInstance {
            instance_id: self.instance_id.clone(),
            module_type: self.kind.module_type() as i32,
            address: self.advertise.clone(),
            health_status: self.phase().health() as i32,
            metadata,
            started_at: Some(time::timestamp(self.started_at)),
            current_connections: i32::try_from(self.stats.active_connections()).unwrap_or(i32::MAX),
            max_connections: i32::try_from(self.settings().max_connections).unwrap_or(i32::MAX),
            version: self.version.clone(),
            traffic_weight: 0,
        }
    }

    pub fn routes(&self) -> Vec<RouteSpec> {
        lock(&self.routes).values().cloned().collect()
    }

    /// Validates `routes` (all of them, nothing applied on error), lets the module compile them,
    /// then makes them the table. `replace_all` drops routes not listed.
    pub fn update_routes(
        &self,
        routes: Vec<pb::Route>,
        replace_all: bool,
    ) -> Result<usize, String> {
        let specs = marchproxy::route::check_all(routes).map_err(|errors| errors.join("; "))?;
        let written = specs.len();
        let mut table = lock(&self.routes);
        let mut next = if replace_all {
            BTreeMap::new()
        } else {
            table.clone()
        };
        for spec in specs {
            next.insert(spec.id.clone(), spec);
        }
        let list: Vec<RouteSpec> = next.values().cloned().collect();
        self.module.apply_routes(&list)?;
        *table = next;
        Ok(written)
    }

    /// Removes one route; `Ok(false)` when there is no such route.
    pub fn delete_route(&self, id: &str) -> Result<bool, String> {
        let mut table = lock(&self.routes);
        if !table.contains_key(id) {
            return Ok(false);
        }
        let mut next = table.clone();
        next.remove(id);
        let list: Vec<RouteSpec> = next.values().cloned().collect();
        self.module.apply_routes(&list)?;
        *table = next;
        Ok(true)
    }

    /// Sends the whole route table to the NLB, so its routing follows this instance's.
    pub async fn relay_routes(&self) {
        let Some(link) = &self.nlb else { return };
        if self.registration().is_none() {
            return; // the next registration carries the table
        }
        let _one_at_a_time = self.relaying.lock().await;
        let routes: Vec<pb::Route> = self.routes().iter().map(pb::Route::from).collect();
        let request = pb::UpdateRoutingRequest {
            routes,
            replace_all: true,
            source_instance_id: self.instance_id.clone(),
            validate_only: false,
        };
        let used = link.at();
        if let Err(status) = link.nlb().update_routing(request).await {
            link.fail_over(used, &status);
            warn!(instance = %self.instance_id, error = %status.message(), "could not relay routes to the NLB; they go with the next registration");
        }
    }

    /// The config section types: the runtime's own and the module's.
    pub fn section_types(&self) -> Vec<String> {
        let mut types = vec![RUNTIME_SECTION.to_owned()];
        types.extend(self.module.config_types().into_iter().map(str::to_owned));
        types
    }

    /// Every section as in effect now.
    pub fn sections(&self) -> BTreeMap<String, Section> {
        let mut all = lock(&self.sections).clone();
        all.insert(
            RUNTIME_SECTION.to_owned(),
            Section {
                value: serde_json::to_value(self.settings()).unwrap_or_default(),
                updated_at: lock(&self.sections)
                    .get(RUNTIME_SECTION)
                    .map_or(self.started_at, |s| s.updated_at),
            },
        );
        for kind in self.module.config_types() {
            all.entry(kind.to_owned()).or_insert_with(|| Section {
                value: serde_json::json!({}),
                updated_at: self.started_at,
            });
        }
        all
    }

    /// Checks (and unless `validate_only`, applies) a section update: a JSON object whose keys
    /// are merged over the runtime section, or handed whole to the module for its sections.
    pub fn update_section(
        &self,
        config_type: &str,
        value: &serde_json::Value,
        validate_only: bool,
    ) -> Result<(), Vec<String>> {
        if !value.is_object() {
            return Err(vec![format!(
                "config_data for `{config_type}` must be a JSON object"
            )]);
        }
        if config_type == RUNTIME_SECTION {
            let next: RuntimeSettings =
                crate::config::merge_section("runtime", &self.settings(), value)?;
            next.check()?;
            if !validate_only {
                *lock(&self.settings) = next;
                self.remember(config_type, value.clone());
            }
            return Ok(());
        }
        if !self.module.config_types().contains(&config_type) {
            return Err(vec![format!(
                "unknown config_type `{config_type}`; this module has {}",
                self.section_types().join(", ")
            )]);
        }
        self.module.check_config(config_type, value)?;
        if !validate_only {
            self.module.apply_config(config_type, value);
            self.remember(config_type, value.clone());
        }
        Ok(())
    }

    fn remember(&self, config_type: &str, value: serde_json::Value) {
        lock(&self.sections).insert(
            config_type.to_owned(),
            Section {
                value,
                updated_at: SystemTime::now(),
            },
        );
        info!(instance = %self.instance_id, section = config_type, "config applied");
    }

    /// `HealthCheck`: the phase, and with `deep` the module's own checks.
    pub async fn health(&self, deep: bool) -> (pb::HealthStatus, String, HashMap<String, String>) {
        let mut checks = HashMap::from([
            (
                "phase".to_owned(),
                format!("{:?}", self.phase()).to_ascii_lowercase(),
            ),
            (
                "registered".to_owned(),
                self.registration().is_some().to_string(),
            ),
        ]);
        let mut failed = Vec::new();
        if deep {
            for (name, outcome) in self.module.health_checks().await {
                match outcome {
                    Ok(detail) => checks.insert(name, detail),
                    Err(problem) => {
                        failed.push(name.clone());
                        checks.insert(name, format!("FAILED: {problem}"))
                    }
                };
            }
        }
        let status = match self.phase() {
            Phase::Stopping => pb::HealthStatus::Stopping,
            _ if !failed.is_empty() => pb::HealthStatus::Degraded,
            Phase::Starting if self.nlb.is_some() => pb::HealthStatus::Starting,
            _ => pb::HealthStatus::Healthy,
        };
        let message = if failed.is_empty() {
            format!(
                "{} {} is {}",
                self.kind,
                self.instance_id,
                names::health_name(status)
            )
        } else {
            format!("checks failing: {}", failed.join(", "))
        };
        (status, message, checks)
    }

    /// GetStats and heartbeats.
    pub fn stats(&self, reset: bool) -> pb::ModuleStats {
        let mut custom = self.module.custom_stats();
        custom.insert(
            "rate_limits".to_owned(),
            self.limiter.list("").len().to_string(),
        );
        self.stats.snapshot(custom, reset)
    }

    /// Metric points: the stats and the module's numeric custom figures.
    pub fn metric_points(&self) -> Vec<pb::MetricDataPoint> {
        let stats = self.stats(false);
        let at = time::now();
        let mut points = marchproxy::stats::data_points(&stats, at);
        for (name, value) in &stats.custom_stats {
            if let Ok(value) = value.parse::<f64>() {
                points.push(pb::MetricDataPoint {
                    name: name.clone(),
                    value,
                    labels: HashMap::from([("source".to_owned(), "module".to_owned())]),
                    timestamp: Some(at),
                });
            }
        }
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_link_moves_to_the_next_replica_only_when_one_is_away() {
        let link = NlbLink::new("nlb-1:50050, http://nlb-2:50050", None).unwrap();
        assert_eq!(link.url(), "http://nlb-1:50050");
        assert_eq!(link.urls(), "http://nlb-1:50050,http://nlb-2:50050");
        // An answer another replica would give the same way stays here.
        assert_eq!(
            link.fail_over(0, &tonic::Status::invalid_argument("no")),
            None
        );
        let gone = tonic::Status::unavailable("gone");
        assert_eq!(link.fail_over(0, &gone), Some("http://nlb-2:50050"));
        // A second call that failed on the first endpoint does not move the link back to it.
        assert_eq!(link.fail_over(0, &gone), Some("http://nlb-2:50050"));
        assert_eq!(
            link.fail_over(1, &tonic::Status::deadline_exceeded("slow")),
            Some("http://nlb-1:50050")
        );
        let alone = NlbLink::new("http://nlb:50050", None).unwrap();
        assert_eq!(alone.fail_over(0, &gone), None);
        assert!(NlbLink::new(" , ", None).is_err());
    }
}
