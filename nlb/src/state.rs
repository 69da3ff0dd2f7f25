//! The NLB's state: registered module instances with their routes and reported stats, operator
//! routes, version weights, desired scale and the live config sections.
//!
//! Everything here is plain synchronous code over one [`State`] value that the service keeps
//! behind a mutex: each RPC takes the lock, validates, applies all of its change or none of it,
//! and returns what it must answer. Time is passed in, so the rules are testable without clocks.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use marchproxy::{
    names::{self, Endpoint, ModuleKind},
    pb,
    route::{Flow, RouteSpec},
    time,
};

use tracing::warn;

use crate::{
    error::NlbError,
    settings::{Settings, Strategy},
    store::{PersistedRoute, PersistedSection, PersistedState},
    target::OperatorTarget,
};

/// Heartbeat samples kept per instance (rates and historical load come from them).
const STATS_HISTORY: usize = 64;
/// Metric reports kept per instance for `GetModuleMetrics` time ranges.
const METRICS_HISTORY: usize = 120;
/// Failed connects in a row that take an instance out of rotation, and for how long at first.
pub const EJECT_AFTER: u32 = 3;
const EJECT_FOR: Duration = Duration::from_secs(5);
/// Versions registered without a version string share this one.
pub const UNVERSIONED: &str = "unversioned";

/// A route and the bookkeeping the routing table shows.
#[derive(Clone, Debug)]
pub struct TableRoute {
    pub spec: RouteSpec,
    pub created_at: SystemTime,
    pub last_used: Option<SystemTime>,
}

impl TableRoute {
    fn new(spec: RouteSpec, created_at: SystemTime) -> Self {
        TableRoute {
            spec,
            created_at,
            last_used: None,
        }
    }
}

/// A registered module instance.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub kind: ModuleKind,
    pub address: Endpoint,
    pub version: String,
    pub max_connections: i32,
    pub metadata: HashMap<String, String>,
    pub started_at: Option<prost_types::Timestamp>,
    pub registration_id: String,
    pub registered_at: SystemTime,
    /// Last sign of life (registration or heartbeat).
    pub last_seen: Instant,
    pub last_heartbeat_at: Option<SystemTime>,
    pub reported: pb::HealthStatus,
    pub stats: Option<pb::ModuleStats>,
    stats_history: VecDeque<(Instant, pb::ModuleStats)>,
    pub routes: BTreeMap<String, TableRoute>,
    pub health_config: Option<pb::HealthCheckConfig>,
    pub capabilities: HashMap<String, String>,
    pub draining: bool,
    /// Marked unhealthy for missed heartbeats (logged once, cleared by the next heartbeat).
    pub stale: bool,
    /// With a shared store: the leases that keep the registration and its liveness, which
    /// then decide health and removal instead of this process's own clock.
    pub leases: Option<Leases>,
    pub routed_total: u64,
    /// Connections open through the NLB's data plane (shared with the connections themselves).
    live: Arc<AtomicI64>,
    /// Consecutive failed connects; past a few the instance is ejected for a while.
    connect_failures: u32,
    /// All failed connects, for promotions to judge a version by.
    pub connect_failures_total: u64,
    ejected_until: Option<Instant>,
    /// Flows sent here since the last heartbeat, which the reported count does not include yet.
    routed_since_heartbeat: i64,
    /// Instructions for the next heartbeat answer only (rebalancing).
    pending_instructions: BTreeMap<String, String>,
    metrics: VecDeque<pb::ModuleMetrics>,
}

impl Instance {
    /// Keeps a metrics report, forgetting the oldest beyond the history size.
    pub fn push_metrics(&mut self, metrics: pb::ModuleMetrics) {
        if self.metrics.len() == METRICS_HISTORY {
            self.metrics.pop_front();
        }
        self.metrics.push_back(metrics);
    }

    pub fn metrics(&self) -> impl Iterator<Item = &pb::ModuleMetrics> {
        self.metrics.iter()
    }

    pub fn health(&self, now: Instant, settings: &Settings) -> pb::HealthStatus {
        let silent = match self.leases {
            Some(leases) => !leases.alive,
            None => now.duration_since(self.last_seen) > settings.heartbeat.unhealthy_after(),
        };
        if self.draining {
            pb::HealthStatus::Stopping
        } else if silent {
            pb::HealthStatus::Unhealthy
        } else {
            self.reported
        }
    }

    /// May get new connections: healthy or degraded, not draining, not silent, under its limit.
    pub fn routable(&self, now: Instant, settings: &Settings) -> bool {
        let under_limit =
            self.max_connections <= 0 || self.open_connections() < i64::from(self.max_connections);
        let ejected = self.ejected_until.is_some_and(|until| now < until);
        matches!(
            self.health(now, settings),
            pb::HealthStatus::Healthy | pb::HealthStatus::Degraded
        ) && under_limit
            && !ejected
    }

    /// Keeps a heartbeat's stats (from the module, or passed on by another NLB replica).
    fn record_stats(&mut self, now: Instant, mut stats: pb::ModuleStats) {
        stats.instance_id = self.id.clone();
        if self.stats_history.len() == STATS_HISTORY {
            self.stats_history.pop_front();
        }
        self.stats_history.push_back((now, stats.clone()));
        self.stats = Some(stats);
    }

    /// Live connections as the module last reported them.
    pub fn connections(&self) -> i64 {
        self.stats.as_ref().map_or(0, |s| s.active_connections)
    }

    /// Connections to expect now: what the NLB has open to it, or the last report plus what was
    /// routed here since, whichever is more.
    pub fn load(&self) -> i64 {
        self.connections()
            .saturating_add(self.routed_since_heartbeat)
            .max(self.live.load(Ordering::Relaxed))
    }

    /// Connections open through the NLB now.
    pub fn live_connections(&self) -> i64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Open connections as far as anyone knows: the module's report or the NLB's own count.
    pub fn open_connections(&self) -> i64 {
        self.connections().max(self.live_connections())
    }

    /// Requests per second over the heartbeat samples newer than `window`.
    pub fn requests_per_second(&self, now: Instant, window: Duration) -> i64 {
        let recent: Vec<_> = self
            .stats_history
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= window)
            .collect();
        match (recent.first(), recent.last()) {
            (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => {
                let seconds = t1.duration_since(*t0).as_secs_f64();
                ((s1.total_requests - s0.total_requests).max(0) as f64 / seconds).round() as i64
            }
            _ => 0,
        }
    }

    /// Heartbeat samples newer than `window`.
    pub fn recent_stats(
        &self,
        now: Instant,
        window: Duration,
    ) -> impl Iterator<Item = &pb::ModuleStats> {
        self.stats_history
            .iter()
            .filter(move |(at, _)| now.duration_since(*at) <= window)
            .map(|(_, stats)| stats)
    }

    /// Where data connections for `route` go: the module's listener for the route's protocol
    /// (`metadata["data_address.postgres"]` ...) when it has several, else
    /// `metadata["data_address"]`, else the gRPC host with the route's `destination_port`.
    pub fn data_address(&self, route: &RouteSpec) -> Option<String> {
        let by_protocol = format!("data_address.{}", names::protocol_name(route.protocol));
        for key in [by_protocol.as_str(), "data_address"] {
            if let Some(address) = self.metadata.get(key).filter(|a| !a.is_empty()) {
                return Some(address.clone());
            }
        }
        (route.destination_port != 0)
            .then(|| format!("{}:{}", self.address.host(), route.destination_port))
    }
}

/// Where a route came from.
#[derive(Clone, Debug, PartialEq)]
pub enum RouteOwner {
    /// Registered or relayed by this instance.
    Module(String),
    /// Set by an operator through `UpdateRouting`.
    Operator,
}

/// The instances a route may send to, each with its own copy of the route.
type Members<'a> = Vec<(&'a Instance, &'a RouteSpec)>;

/// The outcome of routing one flow.
#[derive(Clone, Debug)]
pub struct Decision {
    pub route: RouteSpec,
    pub owner: RouteOwner,
    pub instance_id: String,
    pub kind: ModuleKind,
    pub version: String,
    pub target_address: String,
    /// The instance's count of connections open through the NLB.
    pub live: Arc<AtomicI64>,
    /// The instance failed connects lately: a success should clear that (otherwise the data
    /// plane need not take the lock again to say so).
    pub recovering: bool,
}

/// Why a flow could not be routed.
#[derive(Debug, Clone, PartialEq)]
pub enum NoRoute {
    NoMatchingRoute,
    /// Routes matched but none had a healthy instance with a data address.
    NoHealthyInstance(Vec<String>),
}

impl NoRoute {
    pub fn label(&self) -> &'static str {
        match self {
            NoRoute::NoMatchingRoute => "no_route",
            NoRoute::NoHealthyInstance(_) => "no_instance",
        }
    }

    pub fn message(&self) -> String {
        match self {
            NoRoute::NoMatchingRoute => "no route matches this protocol, port and source".into(),
            NoRoute::NoHealthyInstance(routes) => format!(
                "routes {} match but no healthy instance with a data address serves them",
                routes.join(", ")
            ),
        }
    }
}

/// The store's leases behind a shared registration: one lives as long as the registration
/// (the expiry timeout), one as long as the instance counts as alive (the unhealthy timeout).
/// Heartbeats renew both, on whichever NLB replica they arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Leases {
    pub registration: i64,
    pub liveness: i64,
    /// The liveness lease holds: heartbeats arrive (here or at another replica).
    pub alive: bool,
}

/// Desired instance count for one module kind, set by `TriggerScaling`.
#[derive(Clone, Debug)]
pub struct DesiredScale {
    pub count: u32,
    pub changed: Instant,
}

/// Something that happened to an instance without an RPC asking for it.
#[derive(Debug, PartialEq)]
pub enum SweepEvent {
    Unhealthy {
        id: String,
        kind: ModuleKind,
        silent_for: Duration,
    },
    Removed {
        id: String,
        kind: ModuleKind,
        silent_for: Duration,
    },
}

/// The outcome of a registration.
pub struct Registered {
    pub registration_id: String,
    pub replaced: bool,
    pub version_weight: u32,
}

/// The outcome of a heartbeat.
pub enum HeartbeatOutcome {
    Acknowledged {
        should_scale: bool,
        instructions: HashMap<String, String>,
        recovered: bool,
    },
    /// Unknown instance or a registration id from before a restart: the module must register.
    Reregister(String),
}

/// Config keys an operator set through the API.
#[derive(Clone, Debug)]
pub struct Override {
    pub keys: serde_json::Map<String, serde_json::Value>,
    pub set_at: SystemTime,
}

/// Everything the NLB knows.
pub struct State {
    pub instances: BTreeMap<String, Instance>,
    pub operator_routes: BTreeMap<String, TableRoute>,
    pub settings: Settings,
    /// Keys set through the API, per section, with when: persisted and applied over the flags
    /// at start, so flags still govern every key the API never touched.
    pub overrides: BTreeMap<String, Override>,
    pub desired: BTreeMap<ModuleKind, DesiredScale>,
    pub weights: BTreeMap<ModuleKind, BTreeMap<String, u32>>,
    /// The version that was active before the last change of each kind's split.
    pub previous_active: BTreeMap<ModuleKind, String>,
    pub promotions: BTreeMap<ModuleKind, crate::rollout::Promotion>,
    /// What each kind's rollouts did lately, oldest first.
    pub rollout_events: BTreeMap<ModuleKind, VecDeque<crate::rollout::RolloutEvent>>,
    /// Notification webhook calls the stepper has yet to make.
    pub outbox: Vec<crate::rollout::Notification>,
    /// Clients pinned to a version during rollouts with affinity.
    pub affinity: crate::affinity::Affinity,
    pub route_requests: u64,
    cursor: u64,
    /// Bumped on every change that must reach disk.
    pub generation: u64,
    /// Registrations are shared through a store (etcd): changed ones wait in `shared_dirty`.
    pub shares_instances: bool,
    /// Instances whose shared record must be written (or deleted, when gone).
    pub shared_dirty: std::collections::BTreeSet<String>,
}

pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Checks an id the operator will type: instance ids, registration ids.
pub fn check_id(field: &str, id: &str) -> Result<(), NlbError> {
    if id.trim().is_empty() {
        return Err(NlbError::Invalid(format!(
            "{field} is empty; name the instance"
        )));
    }
    if id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(NlbError::Invalid(format!(
            "{field} `{id}` must be at most 128 letters, digits or - _ . :"
        )));
    }
    Ok(())
}

/// Largest counter a module may report: sums over any number of instances stay far from
/// overflowing, and every value is exact as a double.
const MAX_COUNT: i64 = 1 << 53;

fn check_stats(stats: &pb::ModuleStats) -> Result<(), NlbError> {
    let counts = [
        ("total_requests", stats.total_requests),
        ("successful_requests", stats.successful_requests),
        ("failed_requests", stats.failed_requests),
        ("active_connections", stats.active_connections),
        ("total_connections", stats.total_connections),
        ("bytes_received", stats.bytes_received),
        ("bytes_sent", stats.bytes_sent),
    ];
    for (name, value) in counts {
        if !(0..=MAX_COUNT).contains(&value) {
            return Err(NlbError::Invalid(format!(
                "current_stats.{name} must be from 0 to {MAX_COUNT} (got {value})"
            )));
        }
    }
    let gauges = [
        ("avg_latency_ms", stats.avg_latency_ms),
        ("p50_latency_ms", stats.p50_latency_ms),
        ("p95_latency_ms", stats.p95_latency_ms),
        ("p99_latency_ms", stats.p99_latency_ms),
        ("cpu_usage_percent", stats.cpu_usage_percent),
        ("memory_usage_mb", stats.memory_usage_mb),
    ];
    for (name, value) in gauges {
        if !value.is_finite() || value < 0.0 {
            return Err(NlbError::Invalid(format!(
                "current_stats.{name} must be a non-negative number (got {value})"
            )));
        }
    }
    Ok(())
}

impl State {
    /// State from what was persisted, over settings from flags.
    pub fn restore(persisted: PersistedState, mut settings: Settings) -> Result<Self, String> {
        let mut overrides = BTreeMap::new();
        for (name, section) in persisted.config {
            let serde_json::Value::Object(keys) = section.data else {
                return Err(format!(
                    "persisted config section `{name}` is not a JSON object"
                ));
            };
            let data = serde_json::Value::Object(keys.clone());
            crate::settings::check_api_keys(&name, &data)
                .and_then(|()| settings.with_section(&name, &data))
                .map(|next| settings = next)
                .map_err(|errors| {
                    format!("persisted config section `{name}`: {}", errors.join("; "))
                })?;
            overrides.insert(
                name,
                Override {
                    keys,
                    set_at: from_unix_ms(section.updated_at_ms),
                },
            );
        }
        let operator_routes = persisted
            .operator_routes
            .into_iter()
            .map(|r| {
                (
                    r.route.id.clone(),
                    TableRoute::new(r.route, from_unix_ms(r.created_at_ms)),
                )
            })
            .collect();
        let kind = |name: &str| {
            name.parse::<ModuleKind>()
                .map_err(|e| format!("persisted state: {e}"))
        };
        let now = Instant::now();
        let mut desired = BTreeMap::new();
        for (name, count) in persisted.desired_instances {
            desired.insert(
                kind(&name)?,
                DesiredScale {
                    count,
                    changed: now,
                },
            );
        }
        let mut weights = BTreeMap::new();
        for (name, versions) in persisted.version_weights {
            if let Some((version, weight)) = versions.iter().find(|(_, w)| **w > 100) {
                return Err(format!(
                    "persisted weight {weight} of {name} {version} is above 100"
                ));
            }
            weights.insert(kind(&name)?, versions);
        }
        let mut previous_active = BTreeMap::new();
        for (name, version) in persisted.previous_active {
            previous_active.insert(kind(&name)?, version);
        }
        let mut promotions = BTreeMap::new();
        for (name, p) in persisted.promotions {
            let stable = if p.stable.is_empty() {
                crate::bluegreen::active(&p.before)
                    .unwrap_or_default()
                    .to_owned()
            } else {
                p.stable
            };
            let kind = kind(&name)?;
            let phase = if settings.rollout.policy(kind).paused {
                crate::rollout::Phase::Paused
            } else if p.held_for_ms.is_some() {
                crate::rollout::Phase::HeldForTraffic
            } else {
                crate::rollout::Phase::Progressing
            };
            promotions.insert(
                kind,
                crate::rollout::Promotion {
                    version: p.version,
                    stable,
                    step_percent: p.step_percent.clamp(1, 100),
                    before: p.before,
                    started: from_unix_ms(p.started_at_ms),
                    step: p.step.max(1),
                    failed_checks: p.failed_checks,
                    phase,
                    // The modules are not back yet: the first check opens a window, the
                    // next judges it.
                    last_check: now,
                    held_since: p
                        .held_for_ms
                        .map(|ms| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)),
                    window: None,
                    last_analysis: None,
                },
            );
        }
        let mut rollout_events = BTreeMap::new();
        for (name, events) in persisted.rollout_events {
            rollout_events.insert(kind(&name)?, events.into_iter().collect());
        }
        Ok(State {
            instances: BTreeMap::new(),
            operator_routes,
            settings,
            overrides,
            desired,
            weights,
            previous_active,
            promotions,
            rollout_events,
            outbox: Vec::new(),
            affinity: crate::affinity::Affinity::default(),
            route_requests: 0,
            cursor: 0,
            generation: 0,
            shares_instances: false,
            shared_dirty: Default::default(),
        })
    }

    /// What goes to disk.
    pub fn persisted(&self) -> PersistedState {
        let now = Instant::now();
        PersistedState {
            operator_routes: self
                .operator_routes
                .values()
                .map(|r| PersistedRoute {
                    route: r.spec.clone(),
                    created_at_ms: unix_ms(r.created_at),
                })
                .collect(),
            config: self
                .overrides
                .iter()
                .map(|(name, set)| {
                    (
                        name.clone(),
                        PersistedSection {
                            data: serde_json::Value::Object(set.keys.clone()),
                            updated_at_ms: unix_ms(set.set_at),
                        },
                    )
                })
                .collect(),
            desired_instances: self
                .desired
                .iter()
                .map(|(kind, d)| (kind.name().to_owned(), d.count))
                .collect(),
            version_weights: self
                .weights
                .iter()
                .map(|(kind, w)| (kind.name().to_owned(), w.clone()))
                .collect(),
            previous_active: self
                .previous_active
                .iter()
                .map(|(kind, v)| (kind.name().to_owned(), v.clone()))
                .collect(),
            promotions: self
                .promotions
                .iter()
                .map(|(kind, p)| {
                    (
                        kind.name().to_owned(),
                        crate::store::PersistedPromotion {
                            version: p.version.clone(),
                            step_percent: p.step_percent,
                            before: p.before.clone(),
                            started_at_ms: unix_ms(p.started),
                            stable: p.stable.clone(),
                            step: p.step,
                            failed_checks: p.failed_checks,
                            held_for_ms: p
                                .held_since
                                .map(|since| now.duration_since(since).as_millis() as u64),
                        },
                    )
                })
                .collect(),
            rollout_events: self
                .rollout_events
                .iter()
                .map(|(kind, events)| (kind.name().to_owned(), events.iter().cloned().collect()))
                .collect(),
        }
    }

    /// Takes the operator state as the shared store holds it (written by any replica), over
    /// the flags' `base` settings. Registrations, pins, route use and the live parts of a
    /// promotion this process is analysing (its window, last check and analysis) stay.
    /// Nothing is bumped: this is what is stored already.
    pub fn adopt(&mut self, persisted: PersistedState, base: &Settings) -> Result<(), String> {
        let mut fresh = State::restore(persisted, base.clone())?;
        for (id, route) in &mut fresh.operator_routes {
            route.last_used = self.operator_routes.get(id).and_then(|r| r.last_used);
        }
        for (kind, desired) in &mut fresh.desired {
            if let Some(old) = self.desired.get(kind).filter(|d| d.count == desired.count) {
                desired.changed = old.changed;
            }
        }
        for (kind, promotion) in &mut fresh.promotions {
            let Some(old) = self
                .promotions
                .get(kind)
                .filter(|p| p.version == promotion.version && p.started == promotion.started)
            else {
                continue;
            };
            promotion.last_check = old.last_check;
            promotion.window = old.window.clone();
            promotion.last_analysis = old.last_analysis.clone();
            let paused = promotion.phase == crate::rollout::Phase::Paused;
            if !paused && old.phase != crate::rollout::Phase::Paused {
                promotion.phase = old.phase;
                promotion.held_since = old.held_since;
            }
        }
        self.operator_routes = fresh.operator_routes;
        self.settings = fresh.settings;
        self.overrides = fresh.overrides;
        self.desired = fresh.desired;
        self.weights = fresh.weights;
        self.previous_active = fresh.previous_active;
        self.promotions = fresh.promotions;
        self.rollout_events = fresh.rollout_events;
        Ok(())
    }

    fn changed(&mut self) {
        self.generation += 1;
    }

    /// Notes that an instance's shared record is out of date (with a shared store).
    fn share(&mut self, id: &str) {
        if self.shares_instances {
            self.shared_dirty.insert(id.to_owned());
        }
    }

    pub fn instance(&self, id: &str) -> Result<&Instance, NlbError> {
        self.instances.get(id).ok_or_else(|| {
            NlbError::NotFound(format!(
                "no module instance `{id}` is registered; list them with ListModules"
            ))
        })
    }

    /// Instances of `kind` that are not leaving.
    pub fn count_of(&self, kind: ModuleKind) -> u32 {
        self.instances
            .values()
            .filter(|i| i.kind == kind && !i.draining)
            .count() as u32
    }

    pub fn weight_of(&self, kind: ModuleKind, version: &str) -> u32 {
        self.weights
            .get(&kind)
            .and_then(|w| w.get(version))
            .copied()
            .unwrap_or(0)
    }

    /// The gRPC endpoints of the instances not leaving that `keep` selects, for calls to their
    /// ModuleService.
    pub fn endpoints(&self, keep: impl Fn(&Instance) -> bool) -> Vec<(String, Endpoint)> {
        self.instances
            .values()
            .filter(|i| !i.draining && keep(i))
            .map(|i| (i.id.clone(), i.address.clone()))
            .collect()
    }

    /// Instances of `kind` (all when `None`) whose live health is `health` (any when `None`), as
    /// ListModules and GetInstances show them.
    pub fn views(
        &self,
        kind: Option<ModuleKind>,
        health: Option<pb::HealthStatus>,
    ) -> Vec<pb::ModuleInstance> {
        let now = Instant::now();
        self.instances
            .values()
            .filter(|i| kind.is_none_or(|k| i.kind == k))
            .map(|i| self.view(i, now))
            .filter(|view| health.is_none_or(|h| view.health_status == h as i32))
            .collect()
    }

    /// The wire view of an instance, with its live health, connections and traffic weight.
    pub fn view(&self, instance: &Instance, now: Instant) -> pb::ModuleInstance {
        pb::ModuleInstance {
            instance_id: instance.id.clone(),
            module_type: instance.kind.module_type() as i32,
            address: instance.address.to_string(),
            health_status: instance.health(now, &self.settings) as i32,
            metadata: instance.metadata.clone(),
            started_at: instance
                .started_at
                .or(Some(time::timestamp(instance.registered_at))),
            current_connections: i32::try_from(instance.open_connections()).unwrap_or(i32::MAX),
            max_connections: instance.max_connections,
            version: instance.version.clone(),
            traffic_weight: self.weight_of(instance.kind, &instance.version) as i32,
        }
    }

    /// The blue/green view of a module kind: the serving version (highest weight) as blue, the
    /// next one as green.
    pub fn deployment(&self, kind: ModuleKind) -> pb::BlueGreenConfig {
        let mut versions: Vec<(&str, u32)> = self
            .weights
            .get(&kind)
            .into_iter()
            .flatten()
            .filter(|(version, _)| {
                self.instances
                    .values()
                    .any(|i| i.kind == kind && &i.version == *version)
            })
            .map(|(version, weight)| (version.as_str(), *weight))
            .collect();
        versions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let (blue, green) = (versions.first(), versions.get(1));
        let green_weight = green.map_or(0, |g| g.1 as i32);
        pb::BlueGreenConfig {
            blue_version: blue.map_or_else(String::new, |b| b.0.to_owned()),
            green_version: green.map_or_else(String::new, |g| g.0.to_owned()),
            blue_weight: blue.map_or(0, |b| b.1 as i32),
            green_weight,
            active_version: blue.map_or_else(String::new, |b| b.0.to_owned()),
            canary_enabled: green_weight > 0 && green_weight < 100,
            canary_percent: green_weight,
            deployment_started: None,
        }
    }

    // ---- registration and liveness ----

    pub fn register(
        &mut self,
        request: pb::RegisterModuleRequest,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Registered, NlbError> {
        let registration_id = uuid::Uuid::new_v4().to_string();
        let instance = build_instance(request, registration_id.clone(), now, wall)?;
        let (kind, version) = (instance.kind, instance.version.clone());
        let replaced = self.instances.remove(&instance.id).is_some();
        let weights = self.weights.entry(kind).or_default();
        if !weights.contains_key(&version) {
            let serving = weights.iter().any(|(v, w)| {
                *w > 0
                    && self
                        .instances
                        .values()
                        .any(|i| i.kind == kind && &i.version == v)
            });
            // A version that appears beside a serving one waits for an operator; a lone one serves
            // everything (and the versions without instances keep 0, so the split adds up).
            if serving {
                weights.insert(version.clone(), 0);
            } else {
                *weights = crate::bluegreen::with_weight(weights, &version, 100, None);
            }
        }
        let version_weight = weights[&version];
        self.share(&instance.id);
        self.instances.insert(instance.id.clone(), instance);
        self.changed();
        Ok(Registered {
            registration_id,
            replaced,
            version_weight,
        })
    }

    /// The record other NLB replicas mirror an instance from (with a shared store).
    pub fn shared(&self, id: &str) -> Option<crate::store::SharedInstance> {
        let instance = self.instances.get(id)?;
        Some(crate::store::SharedInstance {
            registration: prost::Message::encode_to_vec(&registration_of(instance)),
            registration_id: instance.registration_id.clone(),
            registered_at_ms: unix_ms(instance.registered_at),
            draining: instance.draining,
        })
    }

    /// Takes in a registration another replica made (or updates it): no weight changes, those
    /// arrive as the operator state the registering replica wrote. Returns whether it is new
    /// here (or replaces another registration of the same id).
    pub fn mirror(
        &mut self,
        record: crate::store::SharedInstance,
        leases: Leases,
        now: Instant,
    ) -> Result<bool, NlbError> {
        let request: pb::RegisterModuleRequest =
            prost::Message::decode(record.registration.as_slice())
                .map_err(|e| NlbError::Invalid(format!("shared registration: {e}")))?;
        if let Some(existing) = self
            .instances
            .get_mut(request.instance.as_ref().map_or("", |i| &i.instance_id))
            .filter(|i| i.registration_id == record.registration_id)
        {
            // The same registration: only what may change after registering. A drain is never
            // undone (a replica that had not seen it yet may write the record without it).
            existing.draining |= record.draining;
            existing.leases = Some(Leases {
                alive: existing.leases.is_none_or(|l| l.alive),
                ..leases
            });
            if let Some(info) = &request.instance {
                if let Ok(status) = pb::HealthStatus::try_from(info.health_status) {
                    existing.reported = status;
                }
            }
            let wall = existing.registered_at;
            existing.routes = marchproxy::route::check_all(request.initial_routes)
                .map_err(|errors| NlbError::Invalid(errors.join("; ")))?
                .into_iter()
                .map(|spec| {
                    let created = existing.routes.get(&spec.id).map_or(wall, |r| r.created_at);
                    (spec.id.clone(), TableRoute::new(spec, created))
                })
                .collect();
            return Ok(false);
        }
        let wall = from_unix_ms(record.registered_at_ms);
        let mut instance = build_instance(request, record.registration_id, now, wall)?;
        instance.draining = record.draining;
        instance.leases = Some(leases);
        self.instances.insert(instance.id.clone(), instance);
        Ok(true)
    }

    /// Stats of a heartbeat another replica received, for the rollout analysis here. Returns
    /// false when the registration is not (or no longer) the one they belong to.
    pub fn shared_stats(
        &mut self,
        id: &str,
        registration_id: &str,
        stats: pb::ModuleStats,
        now: Instant,
    ) -> bool {
        match self
            .instances
            .get_mut(id)
            .filter(|i| i.registration_id == registration_id)
        {
            Some(instance) => {
                instance.record_stats(now, stats);
                true
            }
            None => false,
        }
    }

    /// Drops an instance whose shared record is gone (unregistered or expired at any
    /// replica); returns it.
    pub fn forget(&mut self, id: &str) -> Option<Instance> {
        self.shared_dirty.remove(id);
        self.instances.remove(id)
    }

    /// The liveness lease of a shared registration started (`Some`) or ran out (`None`).
    /// Returns the instance's kind when its health changed.
    pub fn set_alive(
        &mut self,
        id: &str,
        registration_id: &str,
        liveness: Option<i64>,
    ) -> Option<ModuleKind> {
        let instance = self
            .instances
            .get_mut(id)
            .filter(|i| i.registration_id == registration_id)?;
        let leases = instance.leases.as_mut()?;
        let was = leases.alive;
        leases.alive = liveness.is_some();
        if let Some(lease) = liveness {
            leases.liveness = lease;
        }
        instance.stale = !leases.alive;
        (was != leases.alive).then_some(instance.kind)
    }

    /// Records the leases the store granted a registration (if it is still the current one).
    pub fn leased(&mut self, id: &str, registration_id: &str, leases: Leases) {
        if let Some(instance) = self
            .instances
            .get_mut(id)
            .filter(|i| i.registration_id == registration_id)
        {
            instance.leases = Some(leases);
        }
    }

    /// The registrations that move to a new process at a takeover (not the ones leaving).
    pub fn moving_instances(&self, now: Instant) -> Vec<crate::handover::MovedInstance> {
        use prost::Message;
        self.instances
            .values()
            .filter(|i| !i.draining)
            .map(|i| {
                let request = registration_of(i);
                crate::handover::MovedInstance {
                    registration: request.encode_to_vec(),
                    registration_id: i.registration_id.clone(),
                    registered_at_ms: unix_ms(i.registered_at),
                    silent_ms: now.duration_since(i.last_seen).as_millis() as u64,
                    stats: i.stats.as_ref().map(Message::encode_to_vec),
                    last_heartbeat_at_ms: i.last_heartbeat_at.map(unix_ms),
                }
            })
            .collect()
    }

    /// Registrations a takeover brought, as they were (their ids too, so the modules'
    /// heartbeats carry on). Returns how many came back.
    pub fn restore_moved(
        &mut self,
        moved: Vec<crate::handover::MovedInstance>,
        now: Instant,
        wall: SystemTime,
    ) -> usize {
        use prost::Message;
        let mut restored = 0;
        for m in moved {
            let registered = pb::RegisterModuleRequest::decode(m.registration.as_slice())
                .map_err(|e| NlbError::Invalid(e.to_string()))
                .and_then(|request| {
                    let id = request
                        .instance
                        .as_ref()
                        .map(|i| i.instance_id.clone())
                        .unwrap_or_default();
                    self.register(request, now, wall).map(|_| id)
                });
            match registered {
                Ok(id) => {
                    if let Some(instance) = self.instances.get_mut(&id) {
                        instance.registration_id = m.registration_id;
                        instance.registered_at = from_unix_ms(m.registered_at_ms);
                        instance.last_seen = now
                            .checked_sub(Duration::from_millis(m.silent_ms))
                            .unwrap_or(now);
                        instance.stats = m
                            .stats
                            .and_then(|bytes| pb::ModuleStats::decode(bytes.as_slice()).ok());
                        instance.last_heartbeat_at = m.last_heartbeat_at_ms.map(from_unix_ms);
                        restored += 1;
                    }
                }
                Err(error) => {
                    warn!(%error, "a registration from the old process is unusable; that module registers again");
                }
            }
        }
        restored
    }

    /// Clients pinned by rollout affinity, for a takeover.
    pub fn moving_pins(&self, now: Instant) -> Vec<crate::handover::MovedPin> {
        self.affinity.pins(now)
    }

    /// Pins a takeover brought.
    pub fn restore_pins(&mut self, pins: Vec<crate::handover::MovedPin>, now: Instant) {
        self.affinity.restore(pins, now);
    }

    /// Checks the caller owns the registration, and returns its kind.
    pub fn check_registration(
        &self,
        id: &str,
        registration_id: &str,
    ) -> Result<ModuleKind, NlbError> {
        check_id("instance_id", id)?;
        let instance = self.instance(id)?;
        if registration_id.is_empty() {
            return Err(NlbError::Invalid(
                "registration_id is empty; send the id RegisterModule returned".into(),
            ));
        }
        if instance.registration_id != registration_id {
            return Err(NlbError::Denied(format!(
                "registration_id does not match instance `{id}`'s current registration (it re-registered since); nothing changed"
            )));
        }
        Ok(instance.kind)
    }

    /// Stops new traffic to an instance; returns the connections it had then.
    /// Checks the caller owns the registration and stops new traffic to it, in one step so a
    /// concurrent re-registration cannot be drained by mistake. Returns the kind and the
    /// connections open now.
    pub fn start_drain(
        &mut self,
        id: &str,
        registration_id: &str,
    ) -> Result<(ModuleKind, i64), NlbError> {
        let kind = self.check_registration(id, registration_id)?;
        let instance = self
            .instances
            .get_mut(id)
            .ok_or_else(|| NlbError::NotFound(format!("instance `{id}` left")))?;
        instance.draining = true;
        let open = instance.open_connections();
        self.share(id);
        Ok((kind, open))
    }

    /// Removes an instance if it still has `registration_id`; returns its remaining connections.
    pub fn remove(&mut self, id: &str, registration_id: &str) -> Option<i64> {
        if self.instances.get(id)?.registration_id != registration_id {
            return None;
        }
        let instance = self.instances.remove(id)?;
        self.share(id);
        self.changed();
        Some(instance.open_connections())
    }

    pub fn connections_of(&self, id: &str, registration_id: &str) -> Option<i64> {
        self.instances
            .get(id)
            .filter(|i| i.registration_id == registration_id)
            .map(Instance::open_connections)
    }

    pub fn heartbeat(
        &mut self,
        request: pb::HeartbeatRequest,
        now: Instant,
        wall: SystemTime,
    ) -> Result<HeartbeatOutcome, NlbError> {
        check_id("instance_id", &request.instance_id)?;
        let status = pb::HealthStatus::try_from(request.status).map_err(|_| {
            NlbError::Invalid(format!(
                "status {} is not a HealthStatus value",
                request.status
            ))
        })?;
        if let Some(stats) = &request.current_stats {
            check_stats(stats)?;
        }
        let Some(instance) = self.instances.get(&request.instance_id) else {
            return Ok(HeartbeatOutcome::Reregister(format!(
                "instance `{}` is not registered (the NLB restarted or expired it); register again",
                request.instance_id
            )));
        };
        if instance.registration_id != request.registration_id {
            return Ok(HeartbeatOutcome::Reregister(format!(
                "registration_id is stale for instance `{}`; register again",
                request.instance_id
            )));
        }
        let kind = instance.kind;
        let current = self.count_of(kind);
        let desired = self.desired.get(&kind).map(|d| d.count);
        let Some(instance) = self.instances.get_mut(&request.instance_id) else {
            unreachable!("looked up above under the same lock");
        };
        instance.last_seen = now;
        instance.last_heartbeat_at = Some(wall);
        instance.routed_since_heartbeat = 0;
        let reported_changed =
            status != pb::HealthStatus::Unspecified && instance.reported != status;
        if reported_changed {
            instance.reported = status;
        }
        if let Some(stats) = request.current_stats {
            instance.record_stats(now, stats);
        }
        let recovered = std::mem::take(&mut instance.stale);
        let mut instructions: HashMap<String, String> =
            std::mem::take(&mut instance.pending_instructions)
                .into_iter()
                .collect();
        if reported_changed {
            self.share(&request.instance_id);
        }
        let should_scale = desired.is_some_and(|d| d != current);
        if let Some(desired) = desired.filter(|_| should_scale) {
            instructions.insert("desired_instances".into(), desired.to_string());
            instructions.insert("current_instances".into(), current.to_string());
        }
        Ok(HeartbeatOutcome::Acknowledged {
            should_scale,
            instructions,
            recovered,
        })
    }

    /// Marks silent instances unhealthy and removes long-silent ones.
    pub fn sweep(&mut self, now: Instant) -> Vec<SweepEvent> {
        let unhealthy_after = self.settings.heartbeat.unhealthy_after();
        let expire_after = self.settings.heartbeat.expire_after();
        let mut events = Vec::new();
        self.instances.retain(|_, instance| {
            if instance.leases.is_some() {
                // The store's leases time it out, on every replica at once.
                return true;
            }
            let silent_for = now.duration_since(instance.last_seen);
            if silent_for > expire_after && !instance.draining {
                events.push(SweepEvent::Removed {
                    id: instance.id.clone(),
                    kind: instance.kind,
                    silent_for,
                });
                return false;
            }
            if silent_for > unhealthy_after && !instance.stale {
                instance.stale = true;
                events.push(SweepEvent::Unhealthy {
                    id: instance.id.clone(),
                    kind: instance.kind,
                    silent_for,
                });
            }
            true
        });
        if events
            .iter()
            .any(|e| matches!(e, SweepEvent::Removed { .. }))
        {
            self.changed();
        }
        events
    }

    // ---- routing ----

    /// Replaces or upserts routes of the operator (`source` empty) or of one instance.
    /// Returns how many routes were written. Nothing changes on error or with `validate_only`.
    pub fn update_routes(
        &mut self,
        source: &str,
        routes: Vec<pb::Route>,
        replace_all: bool,
        validate_only: bool,
        wall: SystemTime,
    ) -> Result<usize, Vec<String>> {
        let specs = marchproxy::route::check_all(routes)?;
        let mut errors = Vec::new();
        if source.is_empty() {
            for spec in &specs {
                if let Err(error) = OperatorTarget::of(spec) {
                    errors.push(error);
                }
            }
        } else if let Err(error) =
            check_id("source_instance_id", source).and_then(|()| self.instance(source).map(|_| ()))
        {
            errors.push(error.to_string());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let written = specs.len();
        if validate_only {
            return Ok(written);
        }
        let table = if source.is_empty() {
            &mut self.operator_routes
        } else {
            match self.instances.get_mut(source) {
                Some(instance) => &mut instance.routes,
                None => {
                    return Err(vec![format!(
                        "instance `{source}` left while its routes were updated"
                    )]);
                }
            }
        };
        let mut next = if replace_all {
            BTreeMap::new()
        } else {
            table.clone()
        };
        for spec in specs {
            let created_at = table.get(&spec.id).map_or(wall, |old| old.created_at);
            next.insert(spec.id.clone(), TableRoute::new(spec, created_at));
        }
        *table = next;
        if !source.is_empty() {
            self.share(source);
        }
        self.changed();
        Ok(written)
    }

    /// Instances an operator route sends to.
    fn operator_targets<'a>(
        instances: &'a BTreeMap<String, Instance>,
        spec: &'a RouteSpec,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        let target = OperatorTarget::of(spec).ok();
        instances.values().filter(move |i| match &target {
            Some(OperatorTarget::Kind(kind)) => i.kind == *kind,
            Some(OperatorTarget::Instance(id)) => &i.id == id,
            None => false,
        })
    }

    /// Every (route, owner, target instance) as the routing table shows them.
    pub fn table(&self) -> Vec<(&TableRoute, RouteOwner, Option<&Instance>)> {
        let mut rows = Vec::new();
        for route in self.operator_routes.values() {
            let mut targets = Self::operator_targets(&self.instances, &route.spec).peekable();
            if targets.peek().is_none() {
                rows.push((route, RouteOwner::Operator, None));
            }
            for instance in targets {
                rows.push((route, RouteOwner::Operator, Some(instance)));
            }
        }
        for instance in self.instances.values() {
            for route in instance.routes.values() {
                rows.push((
                    route,
                    RouteOwner::Module(instance.id.clone()),
                    Some(instance),
                ));
            }
        }
        rows
    }

    /// Routes a flow the way the data plane does: the best matching route that has a healthy
    /// instance, then a version by weight, then an instance by the balancing strategy.
    /// With `dry_run` nothing is counted and the turn-taking cursor does not move.
    pub fn decide(
        &mut self,
        flow: &Flow,
        dry_run: bool,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Decision, NoRoute> {
        let decision = self.decide_excluding(flow, dry_run, now, wall, &[], false)?;
        // A decision made for someone else's data plane: count it until the module's next
        // heartbeat reports the connection (the NLB's own connections are counted live).
        if !dry_run {
            if let Some(instance) = self.instances.get_mut(&decision.instance_id) {
                instance.routed_since_heartbeat += 1;
            }
        }
        Ok(decision)
    }

    /// [`State::decide`], skipping instances in `excluded` (ones that just failed to connect).
    /// With `hold`, the chosen instance's live count is raised here, under the lock, so
    /// simultaneous connections see each other (the caller lowers it when the connection ends).
    pub fn decide_excluding(
        &mut self,
        flow: &Flow,
        dry_run: bool,
        now: Instant,
        wall: SystemTime,
        excluded: &[String],
        hold: bool,
    ) -> Result<Decision, NoRoute> {
        // Candidate routes: operator routes, and module routes grouped by (kind, route id) so
        // blue and green instances carrying the same route share it.
        let mut candidates: Vec<(RouteSpec, RouteOwner, Members)> = Vec::new();
        for route in self
            .operator_routes
            .values()
            .filter(|r| r.spec.matches(flow))
        {
            let targets = Self::operator_targets(&self.instances, &route.spec)
                .map(|i| (i, &route.spec))
                .collect();
            candidates.push((route.spec.clone(), RouteOwner::Operator, targets));
        }
        // Each member keeps its own copy of the route (its destination port may differ); the
        // highest-ranked copy places the group among the candidates.
        let mut groups: BTreeMap<(ModuleKind, &str), (RouteSpec, Members)> = BTreeMap::new();
        for instance in self.instances.values() {
            for route in instance.routes.values().filter(|r| r.spec.matches(flow)) {
                let group = groups
                    .entry((instance.kind, route.spec.id.as_str()))
                    .or_insert_with(|| (route.spec.clone(), Vec::new()));
                if route.spec.rank() > group.0.rank() {
                    group.0 = route.spec.clone();
                }
                group.1.push((instance, &route.spec));
            }
        }
        for (spec, members) in groups.into_values() {
            let owner = RouteOwner::Module(members[0].0.id.clone());
            candidates.push((spec, owner, members));
        }
        if candidates.is_empty() {
            return Err(NoRoute::NoMatchingRoute);
        }
        candidates.sort_by(|a, b| {
            b.0.rank()
                .cmp(&a.0.rank())
                .then_with(|| (b.1 == RouteOwner::Operator).cmp(&(a.1 == RouteOwner::Operator)))
                .then_with(|| a.0.id.cmp(&b.0.id))
        });
        let strategy = self.settings.balancing.strategy;
        let mut tried = Vec::new();
        let mut chosen = None;
        for (spec, owner, members) in candidates {
            let usable: Vec<(&Instance, String)> = members
                .into_iter()
                .filter(|(i, _)| i.routable(now, &self.settings) && !excluded.contains(&i.id))
                .filter_map(|(i, own)| Some((i, i.data_address(own)?)))
                .collect();
            if usable.is_empty() {
                tried.push(spec.id.clone());
                continue;
            }
            let instances: Vec<&Instance> = usable.iter().map(|(i, _)| *i).collect();
            let preferred = affine_version(
                &mut self.affinity,
                !dry_run,
                &self.promotions,
                &self.settings,
                &self.weights,
                &instances,
                flow.client_ip,
                now,
            );
            let (instance, target_address) = &usable[pick(
                &instances,
                &self.weights,
                strategy,
                self.cursor,
                preferred.as_deref(),
            )];
            let route = match &owner {
                RouteOwner::Operator => spec,
                RouteOwner::Module(_) => instance
                    .routes
                    .get(&spec.id)
                    .map_or(spec, |own| own.spec.clone()),
            };
            chosen = Some(Decision {
                target_address: target_address.clone(),
                instance_id: instance.id.clone(),
                kind: instance.kind,
                version: instance.version.clone(),
                live: Arc::clone(&instance.live),
                recovering: instance.connect_failures > 0,
                route,
                owner,
            });
            break;
        }
        let decision = chosen.ok_or(NoRoute::NoHealthyInstance(tried))?;
        if !dry_run {
            self.cursor = self.cursor.wrapping_add(1);
            self.route_requests += 1;
            let table = match &decision.owner {
                RouteOwner::Operator => Some(&mut self.operator_routes),
                RouteOwner::Module(_) => self
                    .instances
                    .get_mut(&decision.instance_id)
                    .map(|i| &mut i.routes),
            };
            if let Some(route) = table.and_then(|t| t.get_mut(&decision.route.id)) {
                route.last_used = Some(wall);
            }
            if let Some(instance) = self.instances.get_mut(&decision.instance_id) {
                instance.routed_total += 1;
            }
            if hold {
                decision.live.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(decision)
    }

    // ---- load ----

    /// A connect to the instance failed: after [`EJECT_AFTER`] in a row it gets no new
    /// connections for a while, doubling on each repeat (up to five minutes). Returns whether
    /// this failure ejected it.
    pub fn connect_failed(&mut self, id: &str, now: Instant) -> bool {
        let Some(instance) = self.instances.get_mut(id) else {
            return false;
        };
        instance.connect_failures += 1;
        instance.connect_failures_total += 1;
        if instance.connect_failures < EJECT_AFTER {
            return false;
        }
        let doublings = (instance.connect_failures - EJECT_AFTER).min(5);
        let pause = (EJECT_FOR * 2u32.pow(doublings)).min(Duration::from_secs(300));
        instance.ejected_until = Some(now + pause);
        true
    }

    pub fn connect_succeeded(&mut self, id: &str) {
        if let Some(instance) = self.instances.get_mut(id) {
            instance.connect_failures = 0;
            instance.ejected_until = None;
        }
    }

    /// Sets how new connections are balanced; returns the previous strategy.
    pub fn set_strategy(&mut self, strategy: Strategy, wall: SystemTime) -> Strategy {
        let previous = self.settings.balancing.strategy;
        if previous != strategy {
            let update = serde_json::json!({ "strategy": strategy.name() });
            // A strategy is always a valid balancing section.
            let _ = self.apply_config("balancing", &update, wall);
        }
        previous
    }

    /// Asks an instance, through its next heartbeat answer, to shed connections.
    pub fn ask_to_shed(&mut self, id: &str, connections: i64) {
        if let Some(instance) = self.instances.get_mut(id) {
            instance
                .pending_instructions
                .insert("action".into(), "rebalance".into());
            instance
                .pending_instructions
                .insert("shed_connections".into(), connections.to_string());
        }
    }

    pub fn set_desired(&mut self, kind: ModuleKind, count: u32, now: Instant) {
        self.desired.insert(
            kind,
            DesiredScale {
                count,
                changed: now,
            },
        );
        self.changed();
    }

    /// The settings `update` (a JSON object of keys to change in `section`) would give, or every
    /// problem with it.
    pub fn check_config(
        &self,
        section: &str,
        update: &serde_json::Value,
    ) -> Result<Settings, Vec<String>> {
        crate::settings::check_api_keys(section, update)?;
        self.settings.with_section(section, update)
    }

    /// Applies and remembers an API config update, all of it or none.
    pub fn apply_config(
        &mut self,
        section: &str,
        update: &serde_json::Value,
        wall: SystemTime,
    ) -> Result<(), Vec<String>> {
        self.settings = self.check_config(section, update)?;
        let set = self
            .overrides
            .entry(section.to_owned())
            .or_insert_with(|| Override {
                keys: serde_json::Map::new(),
                set_at: wall,
            });
        let mut keys = serde_json::Value::Object(std::mem::take(&mut set.keys));
        crate::settings::merge(&mut keys, update);
        if let serde_json::Value::Object(keys) = keys {
            set.keys = keys;
        }
        set.set_at = wall;
        self.changed();
        Ok(())
    }
}

/// The registration that recreates `instance` as it is now (with its current routes).
fn registration_of(instance: &Instance) -> pb::RegisterModuleRequest {
    pb::RegisterModuleRequest {
        instance: Some(pb::ModuleInstance {
            instance_id: instance.id.clone(),
            module_type: instance.kind.module_type() as i32,
            address: instance.address.to_string(),
            health_status: instance.reported as i32,
            metadata: instance.metadata.clone(),
            started_at: instance.started_at,
            max_connections: instance.max_connections,
            version: instance.version.clone(),
            ..Default::default()
        }),
        initial_routes: instance
            .routes
            .values()
            .map(|r| pb::Route::from(&r.spec))
            .collect(),
        health_config: instance.health_config.clone(),
        capabilities: instance.capabilities.clone(),
    }
}

/// Checks a registration and builds its instance (weights and the registry untouched).
fn build_instance(
    request: pb::RegisterModuleRequest,
    registration_id: String,
    now: Instant,
    wall: SystemTime,
) -> Result<Instance, NlbError> {
    let info = request.instance.ok_or_else(|| {
        NlbError::Invalid("instance is missing; send the module's ModuleInstance".into())
    })?;
    check_id("instance.instance_id", &info.instance_id)?;
    let kind = ModuleKind::from_module_type(info.module_type).ok_or_else(|| {
            NlbError::Invalid(format!(
                "instance.module_type {} is not a module kind; use ALB, DBLB, AILB, RTMP, WASM_REGISTRY or SQS_PROXY",
                info.module_type
            ))
        })?;
    let address: Endpoint = info
        .address
        .parse()
        .map_err(|e| NlbError::Invalid(format!("instance.address: {e}")))?;
    if info.max_connections < 0 {
        return Err(NlbError::Invalid(format!(
            "instance.max_connections must not be negative (got {}); 0 means no limit",
            info.max_connections
        )));
    }
    let reported = match pb::HealthStatus::try_from(info.health_status) {
        Ok(pb::HealthStatus::Unspecified) => pb::HealthStatus::Healthy,
        Ok(status) => status,
        Err(_) => {
            return Err(NlbError::Invalid(format!(
                "instance.health_status {} is not a HealthStatus value",
                info.health_status
            )));
        }
    };
    let version = match info.version.trim() {
        "" => UNVERSIONED.to_owned(),
        v if v.len() <= 64 && !v.contains(char::is_whitespace) => v.to_owned(),
        v => {
            return Err(NlbError::Invalid(format!(
                "instance.version `{v}` must be at most 64 characters without spaces"
            )));
        }
    };
    if let Some(health) = &request.health_config {
        let numbers = [
            ("interval_seconds", health.interval_seconds),
            ("timeout_seconds", health.timeout_seconds),
            ("unhealthy_threshold", health.unhealthy_threshold),
            ("healthy_threshold", health.healthy_threshold),
            ("health_check_port", health.health_check_port),
        ];
        if let Some((name, value)) = numbers.iter().find(|(_, v)| *v < 0) {
            return Err(NlbError::Invalid(format!(
                "health_config.{name} must not be negative (got {value})"
            )));
        }
        if health.health_check_port > 65535 {
            return Err(NlbError::Invalid(
                "health_config.health_check_port must be at most 65535".into(),
            ));
        }
        if pb::Protocol::try_from(health.health_check_protocol).is_err() {
            return Err(NlbError::Invalid(format!(
                "health_config.health_check_protocol {} is not a Protocol value",
                health.health_check_protocol
            )));
        }
    }
    if let Some(data) = info.metadata.get("data_address").filter(|a| !a.is_empty()) {
        data.parse::<Endpoint>()
            .map_err(|e| NlbError::Invalid(format!("instance.metadata[data_address]: {e}")))?;
    }
    let routes = marchproxy::route::check_all(request.initial_routes)
        .map_err(|errors| NlbError::Invalid(format!("initial_{}", errors.join("; initial_"))))?;

    Ok(Instance {
        id: info.instance_id.clone(),
        kind,
        address,
        version,
        max_connections: info.max_connections,
        metadata: info.metadata,
        started_at: info.started_at,
        registration_id,
        registered_at: wall,
        last_seen: now,
        last_heartbeat_at: None,
        reported,
        stats: None,
        stats_history: VecDeque::new(),
        routes: routes
            .into_iter()
            .map(|spec| (spec.id.clone(), TableRoute::new(spec, wall)))
            .collect(),
        health_config: request.health_config,
        capabilities: request.capabilities,
        draining: false,
        stale: false,
        leases: None,
        routed_total: 0,
        live: Arc::new(AtomicI64::new(0)),
        connect_failures: 0,
        connect_failures_total: 0,
        ejected_until: None,
        routed_since_heartbeat: 0,
        pending_instructions: BTreeMap::new(),
        metrics: VecDeque::new(),
    })
}

/// The version a client keeps during its kind's rollout, when the policy asks for affinity;
/// `pin` is false for predictions (RouteRequest), which change nothing. (Fields of [`State`]
/// one by one: the caller holds others borrowed.)
#[allow(clippy::too_many_arguments)]
fn affine_version(
    affinity: &mut crate::affinity::Affinity,
    pin: bool,
    promotions: &BTreeMap<ModuleKind, crate::rollout::Promotion>,
    settings: &Settings,
    weights: &BTreeMap<ModuleKind, BTreeMap<String, u32>>,
    usable: &[&Instance],
    client: Option<std::net::IpAddr>,
    now: Instant,
) -> Option<String> {
    let client = client?;
    let kind = usable.first()?.kind;
    let promotion = promotions.get(&kind)?;
    let policy = settings.rollout.policy(kind);
    if !policy.affinity {
        return None;
    }
    let split = weights.get(&kind)?;
    let mut versions: Vec<&str> = usable
        .iter()
        .filter(|i| i.kind == kind)
        .map(|i| i.version.as_str())
        .collect();
    versions.sort_unstable();
    versions.dedup();
    // The new version first: as its weight grows, the clients it takes are the same plus more.
    versions.sort_by_key(|v| *v != promotion.version);
    let versions: Vec<(&str, u32)> = versions
        .into_iter()
        .map(|v| (v, split.get(v).copied().unwrap_or(0)))
        .collect();
    affinity.version_for(
        kind,
        client,
        &versions,
        Duration::from_millis(policy.affinity_idle_ms),
        unix_ms(promotion.started),
        now,
        pin,
    )
}

/// Picks among usable instances: the `preferred` version when it has one, else a version by
/// weight (versions whose weight is 0 only when no weighted version has a usable instance),
/// then an instance by strategy. Returns an index.
fn pick(
    usable: &[&Instance],
    weights: &BTreeMap<ModuleKind, BTreeMap<String, u32>>,
    strategy: Strategy,
    cursor: u64,
    preferred: Option<&str>,
) -> usize {
    let weight = |i: &Instance| {
        weights
            .get(&i.kind)
            .and_then(|w| w.get(&i.version))
            .copied()
            .unwrap_or(0)
    };
    let mut versions: BTreeMap<&str, u32> = BTreeMap::new();
    for instance in usable {
        versions.insert(instance.version.as_str(), weight(instance));
    }
    let total: u32 = versions.values().sum();
    let version = if let Some(preferred) = preferred.filter(|p| versions.contains_key(p)) {
        Some(preferred)
    } else if total == 0 {
        // No weighted version is up: any healthy instance beats failing the client.
        None
    } else {
        let mut roll = rand::random_range(0..total);
        versions.iter().find_map(|(v, w)| {
            if roll < *w {
                Some(*v)
            } else {
                roll -= w;
                None
            }
        })
    };
    let pool: Vec<usize> = (0..usable.len())
        .filter(|&i| version.is_none_or(|v| usable[i].version == v))
        .collect();
    let turn = (cursor % pool.len() as u64) as usize;
    match strategy {
        Strategy::RoundRobin => pool[turn],
        Strategy::Random => pool[rand::random_range(0..pool.len())],
        Strategy::LeastConnections => {
            // Read each load once: live counts move under our feet as connections close.
            let loads: Vec<(usize, i64)> = pool.iter().map(|&i| (i, usable[i].load())).collect();
            let least = loads.iter().map(|(_, load)| *load).min().unwrap_or(0);
            let tied: Vec<usize> = loads
                .into_iter()
                .filter(|(_, load)| *load == least)
                .map(|(i, _)| i)
                .collect();
            tied[(cursor % tied.len() as u64) as usize]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn state() -> State {
        State::restore(PersistedState::default(), Settings::default()).unwrap()
    }

    fn registration(id: &str, version: &str, data: &str) -> pb::RegisterModuleRequest {
        pb::RegisterModuleRequest {
            instance: Some(pb::ModuleInstance {
                instance_id: id.into(),
                module_type: pb::ModuleType::Alb as i32,
                address: "127.0.0.1:50051".into(),
                version: version.into(),
                metadata: HashMap::from([("data_address".to_string(), data.to_string())]),
                ..Default::default()
            }),
            initial_routes: vec![pb::Route {
                route_id: "web".into(),
                protocol: pb::Protocol::Http as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn http() -> Flow {
        Flow {
            protocol: Some(pb::Protocol::Http),
            ..Flow::default()
        }
    }

    #[test]
    fn new_version_waits_beside_a_serving_one() {
        let mut state = state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        assert_eq!(
            state
                .register(registration("a", "v1", "127.0.0.1:1"), now, wall)
                .unwrap()
                .version_weight,
            100
        );
        assert_eq!(
            state
                .register(registration("b", "v2", "127.0.0.1:2"), now, wall)
                .unwrap()
                .version_weight,
            0
        );
        for _ in 0..20 {
            let decision = state.decide(&http(), false, now, wall).unwrap();
            assert_eq!(decision.instance_id, "a");
        }
    }

    #[test]
    fn sequential_flows_spread_over_equal_instances_and_dry_run_counts_nothing() {
        let mut state = state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        state
            .register(registration("a", "v1", "127.0.0.1:1"), now, wall)
            .unwrap();
        state
            .register(registration("b", "v1", "127.0.0.1:2"), now, wall)
            .unwrap();
        let first = state.decide(&http(), true, now, wall).unwrap().instance_id;
        assert_eq!(
            state.decide(&http(), true, now, wall).unwrap().instance_id,
            first
        );
        assert_eq!(state.route_requests, 0);
        let picks: BTreeSet<_> = (0..4)
            .map(|_| state.decide(&http(), false, now, wall).unwrap().instance_id)
            .collect();
        assert_eq!(picks.len(), 2);
        assert_eq!(state.route_requests, 4);
    }

    #[test]
    fn least_connections_counts_what_it_routed_since_the_last_heartbeat() {
        let mut state = state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let a = state
            .register(registration("a", "v1", "127.0.0.1:1"), now, wall)
            .unwrap();
        let b = state
            .register(registration("b", "v1", "127.0.0.1:2"), now, wall)
            .unwrap();
        let _ = a;
        let busy = pb::HeartbeatRequest {
            instance_id: "b".into(),
            registration_id: b.registration_id,
            current_stats: Some(pb::ModuleStats {
                active_connections: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            state.heartbeat(busy, now, wall),
            Ok(HeartbeatOutcome::Acknowledged { .. })
        ));
        let picks: Vec<String> = (0..8)
            .map(|_| state.decide(&http(), false, now, wall).unwrap().instance_id)
            .collect();
        assert_eq!(
            &picks[..3],
            ["a", "a", "a"],
            "a catches up with b's 3 first"
        );
        assert!(
            picks[3..].iter().filter(|p| *p == "b").count() >= 2,
            "then they share: {picks:?}"
        );
    }

    #[test]
    fn each_instance_keeps_its_own_destination_port() {
        let mut state = state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        for (id, port) in [("blue", 8081), ("green", 8082)] {
            let mut request = registration(id, "v1", "");
            request.instance.as_mut().unwrap().metadata.clear();
            request.initial_routes[0].destination_port = port;
            state.register(request, now, wall).unwrap();
        }
        let mut targets = BTreeSet::new();
        for _ in 0..4 {
            let decision = state.decide(&http(), false, now, wall).unwrap();
            targets.insert((decision.instance_id, decision.target_address));
        }
        let expected: BTreeSet<(String, String)> = [
            ("blue".to_string(), "127.0.0.1:8081".to_string()),
            ("green".to_string(), "127.0.0.1:8082".to_string()),
        ]
        .into();
        assert_eq!(targets, expected);
    }

    #[test]
    fn silent_instances_turn_unhealthy_then_go() {
        let mut state = state();
        let (now, wall) = (Instant::now(), SystemTime::now());
        state
            .register(registration("a", "v1", "127.0.0.1:1"), now, wall)
            .unwrap();
        let later = now + Duration::from_secs(31);
        assert!(matches!(
            state.sweep(later)[..],
            [SweepEvent::Unhealthy { .. }]
        ));
        assert_eq!(
            state
                .decide(&http(), true, later, wall)
                .unwrap_err()
                .label(),
            "no_instance"
        );
        assert!(state.sweep(later).is_empty());
        assert!(matches!(
            state.sweep(now + Duration::from_secs(121))[..],
            [SweepEvent::Removed { .. }]
        ));
        assert!(state.instances.is_empty());
    }

    #[test]
    fn rejected_route_updates_change_nothing() {
        let mut state = state();
        let wall = SystemTime::now();
        let good = pb::Route {
            route_id: "r1".into(),
            destination_pattern: "alb".into(),
            ..Default::default()
        };
        state
            .update_routes("", vec![good.clone()], false, false, wall)
            .unwrap();
        let bad = pb::Route {
            route_id: "r2".into(),
            source_port: -1,
            destination_pattern: "alb".into(),
            ..Default::default()
        };
        let errors = state
            .update_routes("", vec![good, bad], true, false, wall)
            .unwrap_err();
        assert!(errors[0].contains("routes[1]"), "{errors:?}");
        assert_eq!(state.operator_routes.keys().collect::<Vec<_>>(), ["r1"]);
    }
}
