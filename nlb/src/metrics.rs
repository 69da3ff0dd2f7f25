//! Prometheus metrics of the NLB, in a registry of its own (several NLBs may share a process in
//! tests and in `marchproxy up`). Gauges that describe the registry are refreshed at scrape time.

use std::time::Instant;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::state::State;

pub struct NlbMetrics {
    pub registry: Registry,
    pub registrations: IntCounterVec,
    pub unregistrations: IntCounterVec,
    pub drained_connections: IntCounterVec,
    pub heartbeats: IntCounterVec,
    pub liveness: IntCounterVec,
    pub route_decisions: IntCounterVec,
    pub scaling_decisions: IntCounterVec,
    pub config_updates: IntCounterVec,
    pub rollouts: IntCounterVec,
    pub rollout_steps: IntCounterVec,
    pub rollout_analyses: IntCounterVec,
    rollout_step: IntGaugeVec,
    /// Data plane.
    pub accepted: IntCounterVec,
    pub routed: IntCounterVec,
    pub routing_errors: IntCounterVec,
    pub active: IntGaugeVec,
    pub bytes: IntCounterVec,
    pub connect_seconds: prometheus::Histogram,
    pub connection_seconds: prometheus::Histogram,
    modules: IntGaugeVec,
    routes: IntGaugeVec,
    desired_instances: IntGaugeVec,
    version_weight: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    // Names are fixed here and registered once per registry, so registration cannot collide.
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered twice: {e}"));
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registered twice: {e}"));
    metric
}

impl Default for NlbMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(name, help).buckets(buckets),
            )
            .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
            r.register(Box::new(metric.clone()))
                .unwrap_or_else(|e| panic!("metric {name} registered twice: {e}"));
            metric
        };
        NlbMetrics {
            rollouts: counter(
                r,
                "nlb_rollouts_total",
                "Gradual promotions by kind and result (started, blocked, promoted, rolled_back, rolled_back_by_operator)",
                &["module_type", "result"],
            ),
            rollout_steps: counter(
                r,
                "nlb_rollout_steps_total",
                "Steps taken by gradual promotions, by kind",
                &["module_type"],
            ),
            rollout_analyses: counter(
                r,
                "nlb_rollout_analyses_total",
                "Rollout analyses by kind and result (pass, fail, hold)",
                &["module_type", "result"],
            ),
            rollout_step: gauge(
                r,
                "nlb_rollout_step",
                "The step a kind's running rollout is at (absent when none runs)",
                &["module_type", "version"],
            ),
            accepted: counter(
                r,
                "nlb_connections_accepted_total",
                "Client connections accepted, by listener protocol (auto or named)",
                &["listener"],
            ),
            routed: counter(
                r,
                "nlb_routed_connections_total",
                "Client connections handed to a module instance, by protocol, kind and version",
                &["protocol", "module_type", "version"],
            ),
            routing_errors: counter(
                r,
                "nlb_routing_errors_total",
                "Connections not routed or retried, by cause (no_route, no_instance, connect_failed, unknown_protocol, sniff_timeout, capacity, rate_limited)",
                &["cause"],
            ),
            active: gauge(
                r,
                "nlb_active_connections",
                "Connections open through the NLB, per instance and version",
                &["module_type", "version", "instance"],
            ),
            bytes: counter(
                r,
                "nlb_bytes_total",
                "Bytes relayed, by direction (client_to_module, module_to_client)",
                &["direction"],
            ),
            connect_seconds: histogram(
                "nlb_connect_duration_seconds",
                "Time to connect to the chosen module instance",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            connection_seconds: histogram(
                "nlb_connection_duration_seconds",
                "How long relayed connections lasted",
                vec![
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0,
                ],
            ),
            registrations: counter(
                r,
                "nlb_registrations_total",
                "Module registrations, by kind and whether they replaced a live instance",
                &["module_type", "outcome"],
            ),
            unregistrations: counter(
                r,
                "nlb_unregistrations_total",
                "Module unregistrations, by kind and mode",
                &["module_type", "mode"],
            ),
            drained_connections: counter(
                r,
                "nlb_drained_connections_total",
                "Connections that finished while their instance drained",
                &["module_type"],
            ),
            heartbeats: counter(
                r,
                "nlb_heartbeats_total",
                "Heartbeats, by result (acknowledged, reregister)",
                &["result"],
            ),
            liveness: counter(
                r,
                "nlb_liveness_events_total",
                "Instances marked unhealthy or removed for missed heartbeats",
                &["module_type", "event"],
            ),
            route_decisions: counter(
                r,
                "nlb_route_decisions_total",
                "Routing decisions, by result (routed, no_route, no_instance)",
                &["result", "module_type"],
            ),
            scaling_decisions: counter(
                r,
                "nlb_scaling_decisions_total",
                "TriggerScaling decisions, by kind, action and hook result",
                &["module_type", "action", "result"],
            ),
            config_updates: counter(
                r,
                "nlb_config_updates_total",
                "UpdateNLBConfig calls, by section and result",
                &["section", "result"],
            ),
            modules: gauge(
                r,
                "nlb_modules",
                "Registered module instances, by kind, version and health",
                &["module_type", "version", "health"],
            ),
            routes: gauge(
                r,
                "nlb_routes",
                "Routes in the routing table, by source (module, operator)",
                &["source"],
            ),
            desired_instances: gauge(
                r,
                "nlb_desired_instances",
                "Desired instance count per module kind (TriggerScaling)",
                &["module_type"],
            ),
            version_weight: gauge(
                r,
                "nlb_bluegreen_traffic_split",
                "Traffic weight of each version, per module kind",
                &["module_type", "version"],
            ),
            registry,
        }
    }
}

impl NlbMetrics {
    /// Connections routed so far per (module kind, version), over every protocol.
    pub fn routed_by_version(&self) -> std::collections::BTreeMap<(String, String), u64> {
        use prometheus::core::Collector;
        let mut totals = std::collections::BTreeMap::new();
        for family in self.routed.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or_else(String::new, |l| l.value().to_owned())
                };
                *totals
                    .entry((label("module_type"), label("version")))
                    .or_insert(0) += metric.get_counter().get_value() as u64;
            }
        }
        totals
    }

    /// Sets the gauges from the current state.
    pub fn refresh(&self, state: &State, now: Instant) {
        self.modules.reset();
        for instance in state.instances.values() {
            let health = marchproxy::names::health_name(instance.health(now, &state.settings));
            self.modules
                .with_label_values(&[
                    instance.kind.name(),
                    instance.version.as_str(),
                    health.as_str(),
                ])
                .inc();
        }
        let module_routes: usize = state.instances.values().map(|i| i.routes.len()).sum();
        self.routes
            .with_label_values(&["module"])
            .set(module_routes as i64);
        self.routes
            .with_label_values(&["operator"])
            .set(state.operator_routes.len() as i64);
        self.desired_instances.reset();
        for (kind, desired) in &state.desired {
            self.desired_instances
                .with_label_values(&[kind.name()])
                .set(i64::from(desired.count));
        }
        self.rollout_step.reset();
        for (kind, promotion) in &state.promotions {
            self.rollout_step
                .with_label_values(&[kind.name(), &promotion.version])
                .set(i64::from(promotion.step));
        }
        self.version_weight.reset();
        for (kind, versions) in &state.weights {
            for (version, weight) in versions {
                self.version_weight
                    .with_label_values(&[kind.name(), version.as_str()])
                    .set(i64::from(*weight));
            }
        }
    }
}
