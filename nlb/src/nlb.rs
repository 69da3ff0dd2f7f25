//! The shared NLB handle: state behind one mutex, the disk store, metrics, and the operations
//! several front doors need (gRPC, the admin server, the liveness sweeper).

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use marchproxy::{names::ModuleKind, pb, time};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::{
    error::NlbError,
    metrics::NlbMetrics,
    state::{State, SweepEvent},
    store::Store,
};

/// Completes once the shutdown flag is up (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped at once; only the wake-up matters.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

pub struct Nlb {
    state: Mutex<State>,
    /// Woken on every heartbeat and removal, for drains waiting on connection counts.
    pub activity: Notify,
    store: Arc<Store>,
    pub metrics: NlbMetrics,
    pub started_at: SystemTime,
    pub api_key: Option<String>,
    pub ready: AtomicBool,
    /// Connection rate limits per client source, asked by the data plane.
    pub source_limiter: Arc<marchproxy::limiter::RateLimiter>,
    /// Flips to true when the NLB shuts down; streams and drains end early.
    pub shutdown: watch::Receiver<bool>,
    /// Calls rollout webhooks; None when the machine has no TLS root certificates.
    webhooks: Option<marchproxy::http_client::Client>,
    /// Up while a new process takes over: state stays as saved for it (no step, no write).
    pub handing_over: AtomicBool,
    /// Held through each pass of the rollout stepper, and by a handover while it saves the
    /// state, so no step is half taken in what moves.
    pub stepping: tokio::sync::Mutex<()>,
    /// The shared store, when replicas share their state through etcd (instead of `store`).
    #[cfg(feature = "etcd")]
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Nlb {
    pub fn new(
        state: State,
        store: Store,
        api_key: Option<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Nlb {
            state: Mutex::new(state),
            activity: Notify::new(),
            store: Arc::new(store),
            metrics: NlbMetrics::default(),
            started_at: SystemTime::now(),
            api_key,
            ready: AtomicBool::new(false),
            source_limiter: marchproxy::limiter::RateLimiter::new(),
            shutdown,
            handing_over: AtomicBool::new(false),
            stepping: tokio::sync::Mutex::new(()),
            #[cfg(feature = "etcd")]
            cluster: None,
            webhooks: marchproxy::http_client::client()
                .inspect_err(|error| {
                    warn!(%error, "no HTTP client for rollout webhooks (install ca-certificates)");
                })
                .ok(),
        }
    }

    /// Asks webhooks in turn (pre-rollout, gates); the first that does not answer 2xx says no.
    pub async fn ask_webhooks(
        &self,
        hooks: &[crate::policy::Webhook],
        payload: &serde_json::Value,
    ) -> Result<(), String> {
        crate::webhook::all_agree(self.webhooks.as_ref(), hooks, payload).await
    }

    /// Shares this NLB's state with other replicas through `cluster` (etcd).
    #[cfg(feature = "etcd")]
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Self {
        self.state().shares_instances = true;
        self.cluster = Some(cluster);
        self
    }

    /// Whether this process runs gradual promotions: always alone, only the leader among
    /// replicas.
    pub fn runs_rollouts(&self) -> bool {
        #[cfg(feature = "etcd")]
        if let Some(cluster) = &self.cluster {
            return cluster.is_leader();
        }
        true
    }

    /// A heartbeat was acknowledged here: passes it on to the shared store, if any. Ok(false)
    /// when the store says the registration has run out (the module must register again), an
    /// error when the store is away (the module should try another replica).
    pub async fn heartbeat_shared(&self, id: &str) -> Result<bool, NlbError> {
        #[cfg(feature = "etcd")]
        if let Some(cluster) = &self.cluster {
            match cluster.heartbeat(self, id).await {
                crate::cluster::Renewal::Renewed => {}
                crate::cluster::Renewal::Expired => return Ok(false),
                crate::cluster::Renewal::StoreAway(error) => return Err(error),
            }
            // A changed health status is shared; a store away is tried again by the next.
            if !self.state().shared_dirty.is_empty() {
                let _ = cluster.write(self).await;
            }
            return Ok(true);
        }
        let _ = id;
        Ok(true)
    }

    /// The state. Callers hold the guard briefly and never across an `.await`.
    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug already reported by its own panic; the state
        // itself is only changed after validation, so carrying on is safer than failing every call.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.store.dir()
    }

    /// Writes the state to disk if it changed since the last write.
    pub async fn persist(&self) -> Result<(), NlbError> {
        if self.handing_over.load(Ordering::SeqCst) {
            return Err(NlbError::Unavailable(
                "this NLB is handing over to a new process: this change may not be kept; check and retry in a moment (the new process answers)".into(),
            ));
        }
        self.persist_now().await
    }

    /// [`Nlb::persist`], also while handing over (the state the newcomer gets).
    pub async fn persist_now(&self) -> Result<(), NlbError> {
        #[cfg(feature = "etcd")]
        if let Some(cluster) = &self.cluster {
            return cluster.write(self).await;
        }
        if self.store.is_saved(self.state().generation) {
            return Ok(());
        }
        let (generation, snapshot) = {
            let state = self.state();
            (state.generation, state.persisted())
        };
        let store = Arc::clone(&self.store);
        let saved = tokio::task::spawn_blocking(move || store.save(generation, &snapshot)).await;
        match saved {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                error!(%error, "operator state not persisted");
                Err(NlbError::Unavailable(format!(
                    "the change is applied but not persisted: {error}"
                )))
            }
            Err(error) => Err(NlbError::Unavailable(format!(
                "the change is applied but not persisted: {error}"
            ))),
        }
    }

    /// Where operator state lives, in words (`GetNLBStatus` details `store`).
    pub fn store_description(&self) -> String {
        #[cfg(feature = "etcd")]
        if let Some(cluster) = &self.cluster {
            return format!("etcd {}", cluster.endpoints());
        }
        match self.state_dir() {
            Some(dir) => format!("disk {}", dir.display()),
            None => "memory".to_owned(),
        }
    }

    pub fn probe_store(&self) -> Result<(), String> {
        self.store.probe().map_err(|e| e.to_string())
    }

    /// One liveness pass: log and count what changed.
    pub async fn sweep(&self) {
        let events = self.state().sweep(Instant::now());
        if events.is_empty() {
            return;
        }
        for event in &events {
            match event {
                SweepEvent::Unhealthy {
                    id,
                    kind,
                    silent_for,
                } => {
                    warn!(instance = %id, module_type = %kind, silent_ms = silent_for.as_millis() as u64, "module missed its heartbeats: unhealthy, no new connections");
                    self.metrics
                        .liveness
                        .with_label_values(&[kind.name(), "unhealthy"])
                        .inc();
                }
                SweepEvent::Removed {
                    id,
                    kind,
                    silent_for,
                } => {
                    warn!(instance = %id, module_type = %kind, silent_ms = silent_for.as_millis() as u64, "module silent too long: removed with its routes");
                    self.metrics
                        .liveness
                        .with_label_values(&[kind.name(), "removed"])
                        .inc();
                }
            }
        }
        self.activity.notify_waiters();
        // Removal may change nothing persisted, and a failure is logged inside; nothing to answer.
        let _ = self.persist().await;
    }

    /// Runs the sweeper until shutdown, often enough to notice a silent module promptly.
    pub async fn run_sweeper(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        let mut forgotten = Instant::now();
        loop {
            // Clients that connected once do not keep a rate-limit bucket forever.
            if forgotten.elapsed() >= Duration::from_secs(60) {
                self.source_limiter.forget_idle(Duration::from_secs(3600));
                forgotten = Instant::now();
            }
            let period = {
                let state = self.state();
                (state.settings.heartbeat.unhealthy_after() / 10)
                    .clamp(Duration::from_millis(50), Duration::from_secs(1))
            };
            tokio::select! {
                () = tokio::time::sleep(period) => self.sweep().await,
                () = stopped(&mut shutdown) => return,
            }
        }
    }

    /// Removes an instance, after a drain of up to `timeout` when `graceful`.
    /// Returns the connections drained and what happened, in words.
    pub async fn unregister(
        &self,
        id: &str,
        registration: &str,
        graceful: bool,
        timeout: Duration,
    ) -> Result<(i64, String), NlbError> {
        let mut drained = 0;
        let kind = if graceful {
            let (kind, open) = self.state().start_drain(id, registration)?;
            // Other replicas stop sending it connections too; should the store be away, the
            // drain goes on here and the registration's end reaches them later.
            if let Err(error) = self.persist().await {
                warn!(instance = %id, %error, "drain not shared with the other replicas yet");
            }
            info!(instance = %id, module_type = %kind, open_connections = open, timeout_s = timeout.as_secs(), "draining module: no new connections");
            let remaining = self.wait_drained(id, registration, timeout).await;
            drained = (open - remaining).max(0);
            if remaining > 0 {
                warn!(instance = %id, remaining, "drain ended with connections still open");
            }
            kind
        } else {
            self.state().check_registration(id, registration)?
        };
        let removed = self.state().remove(id, registration);
        self.activity.notify_waiters();
        let mode = if graceful { "graceful" } else { "immediate" };
        if removed.is_none() {
            return Ok((
                drained,
                format!(
                    "instance {id} re-registered or left while draining; its current registration is kept"
                ),
            ));
        }
        info!(instance = %id, module_type = %kind, mode, drained, "module unregistered");
        self.metrics
            .unregistrations
            .with_label_values(&[kind.name(), mode])
            .inc();
        self.metrics
            .drained_connections
            .with_label_values(&[kind.name()])
            .inc_by(drained as u64);
        self.persist().await?;
        Ok((
            drained,
            format!("instance {id} unregistered ({mode}, {drained} connections drained)"),
        ))
    }

    /// Runs the rollouts' analyses and steps as they fall due, until shutdown.
    pub async fn run_rollouts(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            // Checks are due per kind; looking ten times per the shortest interval keeps each
            // within a tenth of its interval of when it is due.
            let period = {
                let state = self.state();
                let shortest = state
                    .promotions
                    .keys()
                    .map(|kind| state.policy(*kind).step_interval_ms)
                    .min()
                    .unwrap_or(1_000);
                (Duration::from_millis(shortest) / 10)
                    .clamp(Duration::from_millis(20), Duration::from_secs(1))
            };
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = stopped(&mut shutdown) => return,
            }
            let pass = self.stepping.lock().await;
            // Among replicas, one steps promotions; the others follow what it writes.
            if self.handing_over.load(Ordering::SeqCst) || !self.runs_rollouts() {
                continue;
            }
            let (outcomes, gates) = self
                .state()
                .check_rollouts(Instant::now(), SystemTime::now());
            // Gates answer in their own time; the rollout waits in AwaitingGate meanwhile.
            for call in gates {
                tokio::spawn(Arc::clone(&self).answer_gate(call));
            }
            for outcome in &outcomes {
                self.account(outcome);
            }
            self.send_notifications();
            // Also the events of a pause; nothing is written when nothing changed.
            let _ = self.persist().await;
            drop(pass);
        }
    }

    /// Asks a step's gate webhooks and takes (or holds) the step by their answer.
    async fn answer_gate(self: Arc<Self>, call: crate::rollout::GateCall) {
        let refusal = self.ask_webhooks(&call.hooks, &call.payload).await.err();
        let _pass = self.stepping.lock().await;
        // Handing over: the new process analyses and asks again; should the takeover fail,
        // this one does.
        if self.handing_over.load(Ordering::SeqCst) {
            self.state().gate_dropped(&call, Instant::now());
            return;
        }
        let outcome = self.state().gate_answered(&call, refusal, Instant::now());
        if let Some(outcome) = outcome {
            self.account(&outcome);
        }
        self.send_notifications();
        let _ = self.persist().await;
    }

    /// Makes the notification webhook calls the state has queued; nobody waits for them.
    pub(crate) fn send_notifications(&self) {
        let queued = self.state().take_notifications();
        for notification in queued {
            crate::webhook::notify(
                self.webhooks.as_ref(),
                &notification.hooks,
                &notification.payload,
            );
        }
    }

    /// Logs and counts what a rollout did.
    fn account(&self, outcome: &crate::rollout::Outcome) {
        use crate::{analysis::Verdict, rollout::Outcome};
        let m = &self.metrics;
        match outcome {
            Outcome::Analysed {
                kind,
                version,
                verdict,
            } => {
                let result = match verdict {
                    Verdict::Pass => "pass",
                    Verdict::Fail(reason) => {
                        warn!(module_type = %kind, %version, %reason, "rollout analysis failed");
                        "fail"
                    }
                    Verdict::Hold(_) => "hold",
                };
                m.rollout_analyses
                    .with_label_values(&[kind.name(), result])
                    .inc();
            }
            Outcome::Stepped {
                kind,
                version,
                step,
                weight,
            } => {
                info!(module_type = %kind, %version, step, weight, "rollout step");
                m.rollout_steps.with_label_values(&[kind.name()]).inc();
            }
            Outcome::Held {
                kind,
                version,
                reason,
            } => info!(module_type = %kind, %version, %reason, "rollout step held"),
            Outcome::Promoted { kind, version } => {
                info!(module_type = %kind, %version, "rollout complete: all new connections go to it");
                m.rollouts
                    .with_label_values(&[kind.name(), "promoted"])
                    .inc();
            }
            Outcome::RolledBack {
                kind,
                version,
                reason,
            } => {
                warn!(module_type = %kind, %version, %reason, "rollout rolled back by itself");
                m.rollouts
                    .with_label_values(&[kind.name(), "rolled_back"])
                    .inc();
            }
        }
    }

    /// Waits until the instance reports no connections, leaves, `timeout` passes or the NLB
    /// shuts down.
    /// Returns the connections still open at the end.
    pub async fn wait_drained(&self, id: &str, registration_id: &str, timeout: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let woken = self.activity.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let remaining = match self.state().connections_of(id, registration_id) {
                Some(0) | None => return 0,
                Some(open) => open,
            };
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep_until(deadline) => return remaining,
                () = stopped(&mut shutdown) => return remaining,
            }
        }
    }

    /// What `GetNLBStatus` and the admin `/status` page show.
    pub fn status(&self, include_modules: bool) -> pb::GetNlbStatusResponse {
        let state = self.state();
        let now = Instant::now();
        let mut by_type = std::collections::HashMap::new();
        for instance in state.instances.values() {
            *by_type.entry(instance.kind.name().to_owned()).or_insert(0) += 1;
        }
        let active: i64 = state.instances.values().map(|i| i.connections()).sum();
        let healthy = state
            .instances
            .values()
            .filter(|i| i.routable(now, &state.settings))
            .count();
        let module_routes: usize = state.instances.values().map(|i| i.routes.len()).sum();
        let uptime = SystemTime::now()
            .duration_since(self.started_at)
            .unwrap_or_default();
        let mut details: std::collections::HashMap<String, String> = [
            ("uptime_seconds", uptime.as_secs().to_string()),
            ("healthy_modules", healthy.to_string()),
            ("operator_routes", state.operator_routes.len().to_string()),
            ("module_routes", module_routes.to_string()),
            (
                "balancing_strategy",
                state.settings.balancing.strategy.name().to_owned(),
            ),
            (
                "state_dir",
                match self.state_dir() {
                    Some(dir) => dir.display().to_string(),
                    None if state.shares_instances => "(none: state in etcd)".into(),
                    None => "(memory only)".into(),
                },
            ),
            ("store", self.store_description()),
            (
                "auth",
                if self.api_key.is_some() {
                    "api-key"
                } else {
                    "none"
                }
                .to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        #[cfg(feature = "etcd")]
        if let Some(cluster) = &self.cluster {
            details.insert("replica".into(), cluster.replica_id.clone());
            details.insert("replicas".into(), cluster.replicas().join(","));
            details.insert("rollout_leader".into(), cluster.is_leader().to_string());
        }
        // Each kind with a split or a rollout history: `rollout.<kind>`, JSON (marchctl rollout
        // status reads it).
        let kinds: std::collections::BTreeSet<_> = state
            .weights
            .keys()
            .chain(state.rollout_events.keys())
            .copied()
            .collect();
        for kind in kinds {
            details.insert(
                format!("rollout.{kind}"),
                state.rollout_status(kind, now).to_string(),
            );
        }
        pb::GetNlbStatusResponse {
            status: pb::HealthStatus::Healthy as i32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(time::timestamp(self.started_at)),
            total_requests: state.route_requests as i64,
            active_connections: active,
            registered_modules: state.instances.len() as i32,
            modules_by_type: by_type,
            modules: if include_modules {
                state
                    .instances
                    .values()
                    .map(|i| state.view(i, now))
                    .collect()
            } else {
                Vec::new()
            },
            details,
        }
    }

    /// The NLB's own metric points (`GetNLBMetrics`, `StreamNLBMetrics`).
    pub fn own_points(&self) -> Vec<pb::MetricDataPoint> {
        let state = self.state();
        let now = Instant::now();
        let at = time::now();
        let point = |name: &str, value: f64, labels: &[(&str, &str)]| pb::MetricDataPoint {
            name: name.to_owned(),
            value,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            timestamp: Some(at),
        };
        let mut points = vec![
            point("nlb_registered_modules", state.instances.len() as f64, &[]),
            point(
                "nlb_healthy_modules",
                state
                    .instances
                    .values()
                    .filter(|i| i.routable(now, &state.settings))
                    .count() as f64,
                &[],
            ),
            point("nlb_route_requests_total", state.route_requests as f64, &[]),
            point(
                "nlb_active_connections",
                state
                    .instances
                    .values()
                    .map(|i| i.connections())
                    .sum::<i64>() as f64,
                &[],
            ),
            point(
                "nlb_routes",
                state.operator_routes.len() as f64,
                &[("source", "operator")],
            ),
            point(
                "nlb_routes",
                state
                    .instances
                    .values()
                    .map(|i| i.routes.len())
                    .sum::<usize>() as f64,
                &[("source", "module")],
            ),
            point(
                "nlb_uptime_seconds",
                SystemTime::now()
                    .duration_since(self.started_at)
                    .unwrap_or_default()
                    .as_secs_f64(),
                &[],
            ),
        ];
        for kind in ModuleKind::ALL {
            let count = state.instances.values().filter(|i| i.kind == kind).count();
            if count > 0 {
                points.push(point(
                    "nlb_registered_modules",
                    count as f64,
                    &[("module_type", kind.name())],
                ));
            }
            if let Some(desired) = state.desired.get(&kind) {
                points.push(point(
                    "nlb_desired_instances",
                    f64::from(desired.count),
                    &[("module_type", kind.name())],
                ));
            }
        }
        points
    }

    /// An instance's metrics: its reported ones and its last heartbeat stats, filtered.
    pub fn module_metrics(
        &self,
        id: &str,
        names: &[String],
        start: Option<&prost_types::Timestamp>,
        end: Option<&prost_types::Timestamp>,
    ) -> Result<pb::ModuleMetrics, NlbError> {
        let state = self.state();
        let instance = state.instance(id)?;
        let mut points: Vec<pb::MetricDataPoint> = instance
            .metrics()
            .flat_map(|m| m.metrics.iter().cloned())
            .collect();
        if let (Some(stats), Some(at)) = (&instance.stats, instance.last_heartbeat_at) {
            points.extend(marchproxy::stats::data_points(stats, time::timestamp(at)));
        }
        Ok(pb::ModuleMetrics {
            instance_id: id.to_owned(),
            module_type: instance.kind.module_type() as i32,
            metrics: marchproxy::stats::select(points, names, start, end),
            collected_at: Some(time::now()),
        })
    }

    /// Records one instance's reported metrics.
    pub fn record_metrics(&self, id: &str, metrics: pb::ModuleMetrics) -> Result<(), NlbError> {
        let mut state = self.state();
        let instance = state.instances.get_mut(id).ok_or_else(|| {
            NlbError::NotFound(format!(
                "no module instance `{id}` is registered; register before reporting metrics"
            ))
        })?;
        instance.push_metrics(metrics);
        Ok(())
    }

    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
        info!("NLB ready");
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !*self.shutdown.borrow()
    }
}
