//! NLBService over gRPC: the edge where wire messages become validated requests, and errors
//! become statuses (with the failure body in the details where the response has one).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use marchproxy::checksum::sha256_hex;
use marchproxy::{
    names::ModuleKind,
    pb::{self, nlb_service_server::NlbService},
    query,
    route::{Flow, RouteSpec},
    time,
};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{
    docker_scaler,
    error::NlbError,
    module_client,
    nlb::Nlb,
    scaler,
    settings::{SECTIONS, Strategy},
    state::{HeartbeatOutcome, RouteOwner, check_id},
    target::OperatorTarget,
};

/// Drain time when `UnregisterModule` asks for a graceful drain without saying how long.
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Most instances of one kind a scaling decision may ask for.
const MAX_INSTANCES: i32 = 10_000;
/// Most data points in one metrics report, and labels on one point.
const MAX_POINTS: usize = 1000;
const MAX_LABELS: usize = 32;
/// Heartbeat samples averaged for historical load.
const HISTORY_WINDOW: Duration = Duration::from_secs(300);
/// Window for the current request rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Below this balance score (Jain's index) a rebalance acts without `force`.
const REBALANCE_BELOW: f64 = 0.9;

pub struct NlbGrpc {
    nlb: Arc<Nlb>,
}

impl NlbGrpc {
    pub fn new(nlb: Arc<Nlb>) -> Self {
        NlbGrpc { nlb }
    }
}

type Result<T> = std::result::Result<Response<T>, Status>;

pub(crate) fn kind_filter(
    value: i32,
    field: &str,
) -> std::result::Result<Option<ModuleKind>, NlbError> {
    if value == 0 {
        return Ok(None);
    }
    ModuleKind::from_module_type(value).map(Some).ok_or_else(|| {
        NlbError::Invalid(format!(
            "{field} {value} is not a module kind; use 0 for all or ALB, DBLB, AILB, RTMP, WASM_REGISTRY, SQS_PROXY"
        ))
    })
}

pub(crate) fn health_filter(
    value: i32,
    field: &str,
) -> std::result::Result<Option<pb::HealthStatus>, NlbError> {
    match pb::HealthStatus::try_from(value) {
        Ok(pb::HealthStatus::Unspecified) => Ok(None),
        Ok(status) => Ok(Some(status)),
        Err(_) => Err(NlbError::Invalid(format!(
            "{field} {value} is not a HealthStatus value"
        ))),
    }
}

fn seconds(field: &str, value: i32, default: Duration) -> std::result::Result<Duration, NlbError> {
    time::seconds_field(field, value, default).map_err(NlbError::Invalid)
}

fn time_range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> std::result::Result<(), NlbError> {
    time::check_range(start, end).map_err(NlbError::Invalid)
}

/// Jain's fairness index of the loads: 1 when even, towards 1/n when one instance takes all.
fn balance_score(loads: impl Iterator<Item = f64>) -> f64 {
    let loads: Vec<f64> = loads.collect();
    let sum: f64 = loads.iter().sum();
    let squares: f64 = loads.iter().map(|l| l * l).sum();
    if loads.len() < 2 || squares == 0.0 {
        1.0
    } else {
        sum * sum / (loads.len() as f64 * squares)
    }
}

#[tonic::async_trait]
impl NlbService for NlbGrpc {
    async fn register_module(
        &self,
        request: Request<pb::RegisterModuleRequest>,
    ) -> Result<pb::RegisterModuleResponse> {
        let request = request.into_inner();
        let described = request
            .instance
            .as_ref()
            .map(|i| (i.instance_id.clone(), i.address.clone(), i.version.clone()));
        let routes = request.initial_routes.len();
        let wall = SystemTime::now();
        let registered = self.nlb.state().register(request, Instant::now(), wall);
        let registered = registered.map_err(NlbError::reject::<pb::RegisterModuleResponse>)?;
        let (id, address, version) = described.unwrap_or_default();
        let kind = self
            .nlb
            .state()
            .instance(&id)
            .map(|i| i.kind)
            .map_err(NlbError::reject::<pb::RegisterModuleResponse>)?;
        let outcome = if registered.replaced {
            "replaced"
        } else {
            "new"
        };
        info!(instance = %id, module_type = %kind, %address, %version, routes, weight = registered.version_weight, outcome, "module registered");
        self.nlb
            .metrics
            .registrations
            .with_label_values(&[kind.name(), outcome])
            .inc();
        self.nlb.activity.notify_waiters();
        self.nlb
            .persist()
            .await
            .map_err(NlbError::reject::<pb::RegisterModuleResponse>)?;
        Ok(Response::new(pb::RegisterModuleResponse {
            success: true,
            message: if registered.replaced {
                format!("instance {id} re-registered; its previous registration is replaced")
            } else {
                format!("instance {id} registered")
            },
            registration_id: registered.registration_id,
            registered_at: Some(time::timestamp(wall)),
            error: None,
        }))
    }

    async fn unregister_module(
        &self,
        request: Request<pb::UnregisterModuleRequest>,
    ) -> Result<pb::UnregisterModuleResponse> {
        let request = request.into_inner();
        let reject = NlbError::reject::<pb::UnregisterModuleResponse>;
        let timeout = seconds(
            "drain_timeout_seconds",
            request.drain_timeout_seconds,
            DEFAULT_DRAIN,
        )
        .map_err(reject)?;
        // The drain runs in its own task: a caller that gives up (deadline, SIGKILL) must not
        // leave the instance half-drained forever.
        let nlb = Arc::clone(&self.nlb);
        let (id, registration) = (request.instance_id.clone(), request.registration_id.clone());
        let outcome = tokio::spawn(async move {
            nlb.unregister(&id, &registration, request.graceful, timeout)
                .await
        })
        .await
        .map_err(|e| NlbError::Unavailable(format!("unregistering failed: {e}")))
        .and_then(|result| result)
        .map_err(reject)?;
        let (drained, message) = outcome;
        Ok(Response::new(pb::UnregisterModuleResponse {
            success: true,
            message,
            active_connections_drained: i32::try_from(drained).unwrap_or(i32::MAX),
            error: None,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<pb::HeartbeatResponse> {
        let request = request.into_inner();
        let id = request.instance_id.clone();
        let outcome = self
            .nlb
            .state()
            .heartbeat(request, Instant::now(), SystemTime::now())?;
        self.nlb.activity.notify_waiters();
        let outcome = match outcome {
            HeartbeatOutcome::Acknowledged { .. } if !self.nlb.heartbeat_shared(&id).await? => {
                HeartbeatOutcome::Reregister(format!(
                    "instance `{id}` expired (no heartbeat reached any NLB replica in time); register again"
                ))
            }
            outcome => outcome,
        };
        let response = match outcome {
            HeartbeatOutcome::Acknowledged {
                should_scale,
                instructions,
                recovered,
            } => {
                if recovered {
                    info!(instance = %id, "module heartbeating again: healthy");
                }
                self.nlb
                    .metrics
                    .heartbeats
                    .with_label_values(&["acknowledged"])
                    .inc();
                pb::HeartbeatResponse {
                    acknowledged: true,
                    message: "ok".into(),
                    server_time: Some(time::now()),
                    should_reload: false,
                    should_scale,
                    instructions,
                }
            }
            HeartbeatOutcome::Reregister(message) => {
                info!(instance = %id, "heartbeat from an unknown registration: asked to register");
                self.nlb
                    .metrics
                    .heartbeats
                    .with_label_values(&["reregister"])
                    .inc();
                pb::HeartbeatResponse {
                    acknowledged: false,
                    message,
                    server_time: Some(time::now()),
                    should_reload: false,
                    should_scale: false,
                    instructions: HashMap::from([("action".to_owned(), "register".to_owned())]),
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn list_modules(
        &self,
        request: Request<pb::ListModulesRequest>,
    ) -> Result<pb::ListModulesResponse> {
        let request = request.into_inner();
        let kind = kind_filter(request.module_type_filter, "module_type_filter")?;
        let health = health_filter(request.status_filter, "status_filter")?;
        let modules = self.nlb.state().views(kind, health);
        let page = query::apply(modules, request.query.as_ref()).map_err(NlbError::from)?;
        Ok(Response::new(pb::ListModulesResponse {
            total_modules: page.total as i32,
            modules: page.items,
            pagination: Some(page.pagination),
        }))
    }

    async fn get_module_info(
        &self,
        request: Request<pb::GetModuleInfoRequest>,
    ) -> Result<pb::GetModuleInfoResponse> {
        let id = request.into_inner().instance_id;
        check_id("instance_id", &id)?;
        let state = self.nlb.state();
        let instance = state.instance(&id)?;
        let now = Instant::now();
        let mut details: HashMap<String, String> = [
            (
                "registered_at",
                format!("{:?}", time::timestamp(instance.registered_at)),
            ),
            ("draining", instance.draining.to_string()),
            ("routed_total", instance.routed_total.to_string()),
            (
                "heartbeat_age_ms",
                instance.last_heartbeat_at.map_or_else(
                    || "never".to_owned(),
                    |_| {
                        now.duration_since(instance.last_seen)
                            .as_millis()
                            .to_string()
                    },
                ),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in &instance.capabilities {
            details.insert(format!("capability.{key}"), value.clone());
        }
        if let Some(health) = &instance.health_config {
            details.insert(
                "health_check.interval_seconds".into(),
                health.interval_seconds.to_string(),
            );
            details.insert("health_check.path".into(), health.health_check_path.clone());
        }
        Ok(Response::new(pb::GetModuleInfoResponse {
            instance: Some(state.view(instance, now)),
            routes: instance
                .routes
                .values()
                .map(|r| pb::Route::from(&r.spec))
                .collect(),
            stats: instance.stats.clone(),
            deployment_config: Some(state.deployment(instance.kind)),
            details,
        }))
    }

    async fn update_routing(
        &self,
        request: Request<pb::UpdateRoutingRequest>,
    ) -> Result<pb::UpdateRoutingResponse> {
        let request = request.into_inner();
        let source = request.source_instance_id.trim().to_owned();
        let reject = NlbError::reject::<pb::UpdateRoutingResponse>;
        if !source.is_empty() {
            check_id("source_instance_id", &source).map_err(reject)?;
            self.nlb
                .state()
                .instance(&source)
                .map(|_| ())
                .map_err(reject)?;
        }
        let count = request.routes.len();
        let outcome = self.nlb.state().update_routes(
            &source,
            request.routes,
            request.replace_all,
            request.validate_only,
            SystemTime::now(),
        );
        let owner = if source.is_empty() {
            "operator".to_owned()
        } else {
            format!("instance {source}")
        };
        match outcome {
            Ok(written) if request.validate_only => Ok(Response::new(pb::UpdateRoutingResponse {
                success: true,
                message: format!("{written} routes are valid; nothing changed (validate_only)"),
                routes_updated: 0,
                validation_errors: Vec::new(),
                error: None,
            })),
            Ok(written) => {
                info!(owner = %owner, routes = written, replace_all = request.replace_all, "routes updated");
                self.nlb.persist().await.map_err(reject)?;
                Ok(Response::new(pb::UpdateRoutingResponse {
                    success: true,
                    message: format!(
                        "{written} routes of the {owner} {}",
                        if request.replace_all {
                            "now form its whole table"
                        } else {
                            "written"
                        }
                    ),
                    routes_updated: written as i32,
                    validation_errors: Vec::new(),
                    error: None,
                }))
            }
            Err(errors) => {
                let message = format!(
                    "{} of {count} routes rejected; nothing changed: {}",
                    errors.len(),
                    errors.join("; ")
                );
                let body = pb::UpdateRoutingResponse {
                    success: false,
                    message: message.clone(),
                    routes_updated: 0,
                    validation_errors: errors,
                    error: Some(marchproxy::status::error_body(
                        tonic::Code::InvalidArgument,
                        &message,
                    )),
                };
                if request.validate_only {
                    Ok(Response::new(body))
                } else {
                    Err(marchproxy::status::with_body(
                        tonic::Code::InvalidArgument,
                        &message,
                        <pb::UpdateRoutingResponse as marchproxy::status::FailureBody>::NAME,
                        &body,
                    ))
                }
            }
        }
    }

    async fn get_routing_table(
        &self,
        request: Request<pb::GetRoutingTableRequest>,
    ) -> Result<pb::GetRoutingTableResponse> {
        let request = request.into_inner();
        let protocol = match pb::Protocol::try_from(request.protocol_filter) {
            Ok(pb::Protocol::Unspecified) => None,
            Ok(protocol) => Some(protocol),
            Err(_) => {
                return Err(NlbError::Invalid(format!(
                    "protocol_filter {} is not a Protocol value",
                    request.protocol_filter
                ))
                .into());
            }
        };
        let destination = request.destination_filter.trim().to_ascii_lowercase();
        let entries: Vec<pb::RoutingEntry> = {
            let state = self.nlb.state();
            state
                .table()
                .into_iter()
                .filter(|(route, _, _)| protocol.is_none_or(|p| route.spec.protocol == p))
                .filter(|(route, _, instance)| {
                    destination.is_empty()
                        || route
                            .spec
                            .destination
                            .to_ascii_lowercase()
                            .contains(&destination)
                        || instance.is_some_and(|i| {
                            i.id.to_ascii_lowercase() == destination || i.kind.name() == destination
                        })
                })
                .map(|(route, owner, instance)| {
                    let mut wire = pb::Route::from(&route.spec);
                    wire.metadata.insert(
                        "source".into(),
                        match owner {
                            RouteOwner::Operator => "operator".into(),
                            RouteOwner::Module(_) => "module".into(),
                        },
                    );
                    pb::RoutingEntry {
                        route: Some(wire),
                        target_instance_id: instance.map(|i| i.id.clone()).unwrap_or_default(),
                        target_module_type: instance.map_or(0, |i| i.kind.module_type() as i32),
                        current_connections: instance
                            .map_or(0, |i| i32::try_from(i.connections()).unwrap_or(i32::MAX)),
                        created_at: Some(time::timestamp(route.created_at)),
                        last_used: route.last_used.map(time::timestamp),
                    }
                })
                .collect()
        };
        let page = query::apply(entries, request.query.as_ref()).map_err(NlbError::from)?;
        Ok(Response::new(pb::GetRoutingTableResponse {
            total_entries: page.total as i32,
            entries: page.items,
            pagination: Some(page.pagination),
        }))
    }

    async fn route_request(
        &self,
        request: Request<pb::RouteRequestRequest>,
    ) -> Result<pb::RouteRequestResponse> {
        let request = request.into_inner();
        let route = request
            .route
            .ok_or_else(|| NlbError::Invalid("route is missing; describe the flow in route (protocol, source_port, source_pattern)".into()))?;
        let flow = Flow::from_request(&route, &request.context).map_err(NlbError::Invalid)?;
        let decision =
            self.nlb
                .state()
                .decide(&flow, request.dry_run, Instant::now(), SystemTime::now());
        let response = match decision {
            Ok(decision) => {
                if !request.dry_run {
                    self.nlb
                        .metrics
                        .route_decisions
                        .with_label_values(&["routed", decision.kind.name()])
                        .inc();
                }
                pb::RouteRequestResponse {
                    routed: true,
                    target_instance_id: decision.instance_id,
                    target_module_type: decision.kind.module_type() as i32,
                    target_address: decision.target_address,
                    priority: decision.route.priority,
                    message: format!(
                        "matched route {}{}",
                        decision.route.id,
                        if request.dry_run { " (dry run)" } else { "" }
                    ),
                    error: None,
                }
            }
            Err(no_route) => {
                if !request.dry_run {
                    self.nlb
                        .metrics
                        .route_decisions
                        .with_label_values(&[no_route.label(), ""])
                        .inc();
                }
                let code = match no_route {
                    crate::state::NoRoute::NoMatchingRoute => tonic::Code::NotFound,
                    crate::state::NoRoute::NoHealthyInstance(_) => tonic::Code::Unavailable,
                };
                let message = no_route.message();
                pb::RouteRequestResponse {
                    routed: false,
                    message: message.clone(),
                    error: Some(marchproxy::status::error_body(code, &message)),
                    ..Default::default()
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn validate_route(
        &self,
        request: Request<pb::ValidateRouteRequest>,
    ) -> Result<pb::ValidateRouteResponse> {
        let route = request.into_inner().route.ok_or_else(|| {
            NlbError::Invalid("route is missing; send the route to validate".into())
        })?;
        let spec = match RouteSpec::try_from(route.clone()) {
            Ok(spec) => spec,
            Err(error) => {
                return Ok(Response::new(pb::ValidateRouteResponse {
                    valid: false,
                    validation_errors: vec![error],
                    ..Default::default()
                }));
            }
        };
        let target = OperatorTarget::of(&spec).ok();
        let candidates = self.nlb.state().endpoints(|i| match &target {
            Some(OperatorTarget::Kind(kind)) => i.kind == *kind,
            Some(OperatorTarget::Instance(id)) => &i.id == id,
            None => true,
        });
        let answers =
            module_client::can_handle_all(candidates, self.nlb.api_key.clone(), route).await;
        let mut capable = Vec::new();
        let mut details = HashMap::new();
        for (id, answer) in answers {
            let detail = match answer {
                Ok(answer) if answer.can_handle => {
                    capable.push(id.clone());
                    format!("capable (priority {}): {}", answer.priority, answer.reason)
                }
                Ok(answer) => format!("not capable: {}", answer.reason),
                Err(error) => format!("unreachable: {error}"),
            };
            details.insert(format!("instance.{id}"), detail);
        }
        capable.sort();
        if let Some(OperatorTarget::Instance(id)) = &target {
            if !details.contains_key(&format!("instance.{id}")) {
                details.insert(
                    "target".into(),
                    format!("no instance `{id}` is registered yet"),
                );
            }
        }
        Ok(Response::new(pb::ValidateRouteResponse {
            valid: true,
            has_handler: !capable.is_empty(),
            capable_instances: capable,
            validation_errors: Vec::new(),
            details,
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<pb::ReportMetricsResponse> {
        let request = request.into_inner();
        check_id("instance_id", &request.instance_id)?;
        let mut metrics = request
            .metrics
            .ok_or_else(|| NlbError::Invalid("metrics is missing; send a ModuleMetrics".into()))?;
        if !metrics.instance_id.is_empty() && metrics.instance_id != request.instance_id {
            return Err(NlbError::Invalid(format!(
                "metrics.instance_id `{}` differs from instance_id `{}`",
                metrics.instance_id, request.instance_id
            ))
            .into());
        }
        if metrics.metrics.len() > MAX_POINTS {
            return Err(NlbError::Invalid(format!(
                "{} data points in one report; send at most {MAX_POINTS}",
                metrics.metrics.len()
            ))
            .into());
        }
        if let Some(point) = metrics.metrics.iter().find(|p| p.labels.len() > MAX_LABELS) {
            return Err(NlbError::Invalid(format!(
                "metric {} has {} labels; at most {MAX_LABELS}",
                point.name,
                point.labels.len()
            ))
            .into());
        }
        let stamp = request
            .reported_at
            .or(metrics.collected_at)
            .unwrap_or_else(time::now);
        for (index, point) in metrics.metrics.iter_mut().enumerate() {
            if point.name.trim().is_empty() {
                return Err(
                    NlbError::Invalid(format!("metrics.metrics[{index}].name is empty")).into(),
                );
            }
            if !point.value.is_finite() {
                return Err(NlbError::Invalid(format!(
                    "metrics.metrics[{index}] ({}) is not a finite number",
                    point.name
                ))
                .into());
            }
            point.timestamp.get_or_insert(stamp);
        }
        metrics.instance_id = request.instance_id.clone();
        let count = metrics.metrics.len();
        self.nlb.record_metrics(&request.instance_id, metrics)?;
        Ok(Response::new(pb::ReportMetricsResponse {
            acknowledged: true,
            message: format!("{count} data points recorded"),
            processed_at: Some(time::now()),
        }))
    }

    async fn get_nlb_metrics(
        &self,
        request: Request<pb::GetNlbMetricsRequest>,
    ) -> Result<pb::GetNlbMetricsResponse> {
        let request = request.into_inner();
        time_range(request.start_time.as_ref(), request.end_time.as_ref())?;
        let (start, end) = (request.start_time.as_ref(), request.end_time.as_ref());
        let mut metrics =
            marchproxy::stats::select(self.nlb.own_points(), &request.metric_names, start, end);
        let ids: Vec<String> = self.nlb.state().instances.keys().cloned().collect();
        let mut module_metrics = HashMap::new();
        for id in ids {
            // An instance may leave between listing and reading; it then simply has no metrics.
            if let Ok(m) = self
                .nlb
                .module_metrics(&id, &request.metric_names, start, end)
            {
                module_metrics.insert(id, m);
            }
        }
        if request.aggregate {
            // Each instance contributes the latest value of each series (name and labels), so a
            // gauge reported many times counts once.
            let mut sums: std::collections::BTreeMap<(String, i32), f64> = Default::default();
            for m in module_metrics.values() {
                let mut latest: std::collections::BTreeMap<
                    (&str, Vec<(&String, &String)>),
                    (Option<(i64, i32)>, f64),
                > = Default::default();
                for point in &m.metrics {
                    let mut labels: Vec<_> = point.labels.iter().collect();
                    labels.sort();
                    let at = point.timestamp.map(|t| (t.seconds, t.nanos));
                    let entry = latest
                        .entry((point.name.as_str(), labels))
                        .or_insert((at, point.value));
                    if at >= entry.0 {
                        *entry = (at, point.value);
                    }
                }
                for ((name, _), (_, value)) in latest {
                    *sums.entry((name.to_owned(), m.module_type)).or_default() += value;
                }
            }
            let at = time::now();
            metrics.extend(sums.into_iter().map(|((name, module_type), value)| {
                pb::MetricDataPoint {
                    name: format!("modules.{name}"),
                    value,
                    labels: HashMap::from([
                        ("aggregate".to_owned(), "sum".to_owned()),
                        (
                            "module_type".to_owned(),
                            ModuleKind::from_module_type(module_type)
                                .map_or_else(String::new, |k| k.name().to_owned()),
                        ),
                    ]),
                    timestamp: Some(at),
                }
            }));
            module_metrics.clear();
        }
        Ok(Response::new(pb::GetNlbMetricsResponse {
            metrics,
            module_metrics,
            collected_at: Some(time::now()),
        }))
    }

    async fn get_module_metrics(
        &self,
        request: Request<pb::GetModuleMetricsRequest>,
    ) -> Result<pb::GetModuleMetricsResponse> {
        let request = request.into_inner();
        check_id("instance_id", &request.instance_id)?;
        time_range(request.start_time.as_ref(), request.end_time.as_ref())?;
        let metrics = self.nlb.module_metrics(
            &request.instance_id,
            &request.metric_names,
            request.start_time.as_ref(),
            request.end_time.as_ref(),
        )?;
        Ok(Response::new(pb::GetModuleMetricsResponse {
            metrics: Some(metrics),
            collected_at: Some(time::now()),
        }))
    }

    type StreamNLBMetricsStream = Pin<
        Box<dyn Stream<Item = std::result::Result<pb::StreamNlbMetricsResponse, Status>> + Send>,
    >;

    async fn stream_nlb_metrics(
        &self,
        request: Request<pb::StreamNlbMetricsRequest>,
    ) -> Result<Self::StreamNLBMetricsStream> {
        let request = request.into_inner();
        let interval = seconds(
            "interval_seconds",
            request.interval_seconds,
            Duration::from_secs(5),
        )?;
        let nlb = Arc::clone(&self.nlb);
        let mut shutdown = self.nlb.shutdown.clone();
        let stop = async move { crate::nlb::stopped(&mut shutdown).await };
        let stream = marchproxy::serve::every(interval, stop, move || {
            let metrics =
                marchproxy::stats::select(nlb.own_points(), &request.metric_names, None, None);
            let mut module_metrics = HashMap::new();
            if request.include_modules {
                let ids: Vec<String> = nlb.state().instances.keys().cloned().collect();
                for id in ids {
                    if let Ok(m) = nlb.module_metrics(&id, &request.metric_names, None, None) {
                        module_metrics.insert(id, m);
                    }
                }
            }
            pb::StreamNlbMetricsResponse {
                metrics,
                module_metrics,
                timestamp: Some(time::now()),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn check_health(
        &self,
        request: Request<pb::CheckHealthRequest>,
    ) -> Result<pb::CheckHealthResponse> {
        let request = request.into_inner();
        let mut checks = HashMap::new();
        let mut status = pb::HealthStatus::Healthy;
        let (registry_line, mut module_health, targets) = {
            let state = self.nlb.state();
            let now = Instant::now();
            let health: HashMap<String, i32> = state
                .instances
                .values()
                .map(|i| (i.id.clone(), i.health(now, &state.settings) as i32))
                .collect();
            let targets = state.endpoints(|_| true);
            (
                format!("{} instances registered", state.instances.len()),
                health,
                targets,
            )
        };
        checks.insert("registry".to_owned(), registry_line);
        if request.deep_check {
            match self.nlb.probe_store() {
                Ok(()) => {
                    checks.insert("state_dir".to_owned(), "writable".to_owned());
                }
                Err(error) => {
                    checks.insert("state_dir".to_owned(), error);
                    status = pb::HealthStatus::Unhealthy;
                }
            }
        }
        if request.check_modules {
            let mut calls = JoinSet::new();
            for (id, address) in targets {
                let key = self.nlb.api_key.clone();
                let deep = request.deep_check;
                calls.spawn(async move {
                    (
                        id.clone(),
                        module_client::health_check(&address, key.as_deref(), &id, deep).await,
                    )
                });
            }
            while let Some(joined) = calls.join_next().await {
                let Ok((id, answer)) = joined else { continue };
                let (health, line) = match answer {
                    Ok(answer) => (answer.status, answer.message),
                    Err(error) => (pb::HealthStatus::Unhealthy as i32, error),
                };
                module_health.insert(id.clone(), health);
                checks.insert(format!("module.{id}"), line);
            }
        }
        let unhealthy = module_health
            .values()
            .filter(|h| {
                !matches!(
                    pb::HealthStatus::try_from(**h),
                    Ok(pb::HealthStatus::Healthy | pb::HealthStatus::Degraded)
                )
            })
            .count();
        if unhealthy > 0 && status == pb::HealthStatus::Healthy {
            status = pb::HealthStatus::Degraded;
        }
        let message = match status {
            pb::HealthStatus::Healthy => "NLB healthy; all modules healthy".to_owned(),
            pb::HealthStatus::Degraded => {
                format!("NLB serving; {unhealthy} module instances not healthy")
            }
            _ => "NLB unhealthy: see checks".to_owned(),
        };
        Ok(Response::new(pb::CheckHealthResponse {
            status: status as i32,
            message,
            module_health,
            checks,
            checked_at: Some(time::now()),
        }))
    }

    async fn get_nlb_status(
        &self,
        request: Request<pb::GetNlbStatusRequest>,
    ) -> Result<pb::GetNlbStatusResponse> {
        Ok(Response::new(
            self.nlb.status(request.into_inner().include_modules),
        ))
    }

    async fn update_nlb_config(
        &self,
        request: Request<pb::UpdateNlbConfigRequest>,
    ) -> Result<pb::UpdateNlbConfigResponse> {
        let request = request.into_inner();
        let reject = NlbError::reject::<pb::UpdateNlbConfigResponse>;
        let config = request
            .config
            .ok_or_else(|| {
                NlbError::Invalid(
                    "config is missing; send a ConfigUpdate with config_type and config_data"
                        .into(),
                )
            })
            .map_err(reject)?;
        let section = config.config_type.trim().to_ascii_lowercase();
        // Checked and applied under one lock, so concurrent updates cannot undo each other.
        let mut errors = Vec::new();
        match marchproxy::config_file::update_data(&config) {
            Ok(data) => {
                let mut state = self.nlb.state();
                let outcome = if request.validate_only {
                    state.check_config(&section, &data).map(|_| ())
                } else {
                    state.apply_config(&section, &data, SystemTime::now())
                };
                if let Err(problems) = outcome {
                    errors.extend(problems);
                }
            }
            Err(problems) => errors = problems,
        }
        let label = if SECTIONS.contains(&section.as_str()) {
            section.as_str()
        } else {
            "unknown"
        };
        if !errors.is_empty() {
            self.nlb
                .metrics
                .config_updates
                .with_label_values(&[label, "rejected"])
                .inc();
            let message = format!(
                "config `{section}` rejected; nothing changed: {}",
                errors.join("; ")
            );
            let body = pb::UpdateNlbConfigResponse {
                success: false,
                message: message.clone(),
                validation_passed: false,
                validation_errors: errors,
                requires_restart: false,
                error: Some(marchproxy::status::error_body(
                    tonic::Code::InvalidArgument,
                    &message,
                )),
            };
            return if request.validate_only {
                Ok(Response::new(body))
            } else {
                Err(marchproxy::status::with_body(
                    tonic::Code::InvalidArgument,
                    &message,
                    <pb::UpdateNlbConfigResponse as marchproxy::status::FailureBody>::NAME,
                    &body,
                ))
            };
        }
        if request.validate_only {
            return Ok(Response::new(pb::UpdateNlbConfigResponse {
                success: true,
                message: format!("config `{section}` is valid; nothing changed (validate_only)"),
                validation_passed: true,
                ..Default::default()
            }));
        }
        let now_in_effect = self
            .nlb
            .state()
            .settings
            .section(&section)
            .unwrap_or_default();
        info!(section = %section, config = %now_in_effect, "NLB config updated");
        self.nlb
            .metrics
            .config_updates
            .with_label_values(&[label, "applied"])
            .inc();
        self.nlb.persist().await.map_err(reject)?;
        Ok(Response::new(pb::UpdateNlbConfigResponse {
            success: true,
            message: format!("config `{section}` applied live"),
            validation_passed: true,
            validation_errors: Vec::new(),
            requires_restart: false,
            error: None,
        }))
    }

    async fn get_nlb_config(
        &self,
        request: Request<pb::GetNlbConfigRequest>,
    ) -> Result<pb::GetNlbConfigResponse> {
        let wanted = request.into_inner().config_type.trim().to_ascii_lowercase();
        if !wanted.is_empty() && !SECTIONS.contains(&wanted.as_str()) {
            return Err(NlbError::NotFound(format!(
                "no config section `{wanted}`; sections: {}",
                SECTIONS.join(", ")
            ))
            .into());
        }
        let state = self.nlb.state();
        let mut last_updated = self.nlb.started_at;
        let configs = SECTIONS
            .iter()
            .filter(|name| wanted.is_empty() || **name == wanted)
            .filter_map(|name| {
                let data = serde_json::to_vec(&state.settings.section(name)?).ok()?;
                let set = state.overrides.get(*name);
                let updated = set.map_or(self.nlb.started_at, |o| o.set_at);
                last_updated = last_updated.max(updated);
                Some(pb::ConfigUpdate {
                    config_id: format!("nlb/{name}"),
                    config_type: (*name).to_owned(),
                    checksum: sha256_hex(&data),
                    config_data: data,
                    updated_at: Some(time::timestamp(updated)),
                    metadata: HashMap::from([
                        (
                            "source".to_owned(),
                            if set.is_some() { "api" } else { "startup" }.to_owned(),
                        ),
                        (
                            "api_keys".to_owned(),
                            set.map(|o| o.keys.keys().cloned().collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                        ),
                    ]),
                })
            })
            .collect();
        Ok(Response::new(pb::GetNlbConfigResponse {
            configs,
            last_updated: Some(time::timestamp(last_updated)),
        }))
    }

    async fn rebalance_load(
        &self,
        request: Request<pb::RebalanceLoadRequest>,
    ) -> Result<pb::RebalanceLoadResponse> {
        let request = request.into_inner();
        let reject = NlbError::reject::<pb::RebalanceLoadResponse>;
        let strategy = match request.strategy.trim() {
            "" => None,
            text => Some(Strategy::parse(text).ok_or_else(|| {
                NlbError::Invalid(format!("strategy `{text}` is unknown; use least_connections, round_robin or random"))
            }).map_err(reject)?),
        };
        let plan = self.plan_rebalance(&request, strategy).map_err(reject)?;
        let Rebalance {
            score,
            acted: act,
            asked,
            previous,
            new_distribution,
            strategy_note,
        } = plan;
        if strategy.is_some() {
            self.nlb.persist().await.map_err(reject)?;
        }
        let message = if act {
            info!(score, asked, force = request.force, "load rebalanced");
            format!(
                "balance score {score:.2}; {asked} instances asked to shed connections toward an even share{}",
                strategy_note.unwrap_or_default()
            )
        } else {
            format!(
                "balance score {score:.2} is already above {REBALANCE_BELOW}; nothing moved (use force){}",
                strategy_note.unwrap_or_default()
            )
        };
        Ok(Response::new(pb::RebalanceLoadResponse {
            success: true,
            message,
            previous_distribution: previous,
            new_distribution,
            error: None,
        }))
    }

    async fn get_load_distribution(
        &self,
        request: Request<pb::GetLoadDistributionRequest>,
    ) -> Result<pb::GetLoadDistributionResponse> {
        let request = request.into_inner();
        let kind = kind_filter(request.module_type_filter, "module_type_filter")?;
        let state = self.nlb.state();
        let now = Instant::now();
        let mut distribution = HashMap::new();
        for instance in state
            .instances
            .values()
            .filter(|i| kind.is_none_or(|k| i.kind == k))
        {
            let latest = instance.stats.clone().unwrap_or_default();
            let mut info = pb::LoadInfo {
                instance_id: instance.id.clone(),
                active_connections: i32::try_from(latest.active_connections).unwrap_or(i32::MAX),
                cpu_usage_percent: latest.cpu_usage_percent,
                memory_usage_mb: latest.memory_usage_mb,
                requests_per_second: instance.requests_per_second(now, RATE_WINDOW),
                avg_latency_ms: latest.avg_latency_ms,
                queue_depth: latest
                    .custom_stats
                    .get("queue_depth")
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(0),
                load_score: 0.0,
            };
            if request.include_historical {
                let samples: Vec<&pb::ModuleStats> =
                    instance.recent_stats(now, HISTORY_WINDOW).collect();
                if !samples.is_empty() {
                    let n = samples.len() as f64;
                    let mean = |f: fn(&pb::ModuleStats) -> f64| {
                        samples.iter().map(|s| f(s)).sum::<f64>() / n
                    };
                    info.active_connections = mean(|s| s.active_connections as f64).round() as i32;
                    info.cpu_usage_percent = mean(|s| s.cpu_usage_percent);
                    info.memory_usage_mb = mean(|s| s.memory_usage_mb);
                    info.avg_latency_ms = mean(|s| s.avg_latency_ms);
                    info.requests_per_second = instance.requests_per_second(now, HISTORY_WINDOW);
                }
            }
            // The larger of connection use (percent of max_connections; the raw count for an
            // unlimited instance) and CPU percent.
            let connection_use = if instance.max_connections > 0 {
                100.0 * f64::from(info.active_connections) / f64::from(instance.max_connections)
            } else {
                f64::from(info.active_connections)
            };
            info.load_score = connection_use.max(info.cpu_usage_percent);
            distribution.insert(instance.id.clone(), info);
        }
        let score = balance_score(distribution.values().map(|i| i.load_score));
        Ok(Response::new(pb::GetLoadDistributionResponse {
            distribution,
            balance_score: score,
            measured_at: Some(time::now()),
        }))
    }

    async fn trigger_scaling(
        &self,
        request: Request<pb::TriggerScalingRequest>,
    ) -> Result<pb::TriggerScalingResponse> {
        self.trigger(request.into_inner())
            .await
            .map(Response::new)
            .map_err(NlbError::reject::<pb::TriggerScalingResponse>)
    }
}

/// What a rebalance found and did.
struct Rebalance {
    score: f64,
    acted: bool,
    asked: usize,
    previous: HashMap<String, i32>,
    new_distribution: HashMap<String, i32>,
    strategy_note: Option<String>,
}

impl NlbGrpc {
    /// Records a scaling decision and runs the hook; the answer says how the hook went.
    async fn trigger(
        &self,
        request: pb::TriggerScalingRequest,
    ) -> std::result::Result<pb::TriggerScalingResponse, NlbError> {
        let decided = self.decide_scaling(&request)?;
        let (kind, action, current, desired, hook) = decided;
        let outcome = if !hook.docker_socket.is_empty() {
            docker_scaler::scale(&hook.docker_socket, kind, current, desired)
                .await
                .map(|done| format!("Docker scaler: {done}"))
        } else if hook.command.is_empty() {
            Ok(
                "no scaler configured (--scaler-command or --scaler-docker); modules are told through heartbeats"
                    .to_owned(),
            )
        } else {
            let decision = scaler::Decision {
                kind,
                action: &action,
                current,
                desired,
            };
            scaler::run_hook(
                &hook.command,
                Duration::from_secs(u64::from(hook.command_timeout_seconds)),
                &decision,
            )
            .await
            .map(|out| {
                if out.is_empty() {
                    "scaling hook succeeded".to_owned()
                } else {
                    format!("scaling hook: {out}")
                }
            })
        };
        self.nlb.persist().await?;
        let result = if outcome.is_ok() { "ok" } else { "hook_failed" };
        self.nlb
            .metrics
            .scaling_decisions
            .with_label_values(&[kind.name(), action.as_str(), result])
            .inc();
        match outcome {
            Ok(note) => {
                info!(module_type = %kind, %action, current, desired, "scaling decided");
                Ok(pb::TriggerScalingResponse {
                    success: true,
                    message: format!("{kind}: {current} -> {desired} instances; {note}"),
                    current_instances: current as i32,
                    target_instances: desired as i32,
                    scaling_action: action,
                    error: None,
                })
            }
            Err(error) => {
                warn!(module_type = %kind, %action, current, desired, %error, "scaling hook failed");
                let message = format!("{kind}: desired {desired} instances recorded, but {error}");
                let body = pb::TriggerScalingResponse {
                    success: false,
                    message: message.clone(),
                    current_instances: current as i32,
                    target_instances: desired as i32,
                    scaling_action: action,
                    error: Some(marchproxy::status::error_body(
                        tonic::Code::Unavailable,
                        &message,
                    )),
                };
                Ok(body)
            }
        }
    }

    /// A scaling decision for a whole kind (ModuleService `Scale` on the NLB or a module).
    pub async fn scale_kind(
        &self,
        kind: ModuleKind,
        action: &str,
        target_instances: i32,
        config: pb::ScalingConfig,
    ) -> std::result::Result<pb::TriggerScalingResponse, NlbError> {
        self.trigger(pb::TriggerScalingRequest {
            instance_id: String::new(),
            module_type: kind.module_type() as i32,
            scaling_action: action.to_owned(),
            target_instances,
            config: Some(config),
        })
        .await
    }

    /// Measures the balance of the chosen instances and, when it is poor (or `force`), asks the
    /// ones above their fair share (by `max_connections`) to shed the difference.
    fn plan_rebalance(
        &self,
        request: &pb::RebalanceLoadRequest,
        strategy: Option<Strategy>,
    ) -> std::result::Result<Rebalance, NlbError> {
        let mut state = self.nlb.state();
        for id in &request.target_instances {
            state.instance(id)?;
        }
        let chosen: Vec<&crate::state::Instance> = state
            .instances
            .values()
            .filter(|i| !i.draining)
            .filter(|i| {
                request.target_instances.is_empty() || request.target_instances.contains(&i.id)
            })
            .collect();
        // Shares follow max_connections when every instance has one; otherwise they are equal
        // (an unlimited instance has no capacity to compare).
        let by_capacity = chosen.iter().all(|i| i.max_connections > 0);
        // (instance, connections, capacity weight)
        let members: Vec<(String, i64, f64)> = chosen
            .iter()
            .map(|i| {
                let weight = if by_capacity {
                    f64::from(i.max_connections)
                } else {
                    1.0
                };
                (i.id.clone(), i.connections(), weight)
            })
            .collect();
        let total: i64 = members.iter().map(|m| m.1).sum();
        let capacity: f64 = members.iter().map(|m| m.2).sum();
        let previous: HashMap<String, i32> = members
            .iter()
            .map(|(id, c, _)| (id.clone(), i32::try_from(*c).unwrap_or(i32::MAX)))
            .collect();
        let score = balance_score(members.iter().map(|(_, c, w)| *c as f64 / w));
        let strategy_note = strategy.map(|s| {
            let before = state.set_strategy(s, SystemTime::now());
            format!("; strategy {} -> {}", before.name(), s.name())
        });
        let acted = request.force || score < REBALANCE_BELOW;
        let mut new_distribution = previous.clone();
        let mut asked = 0;
        if acted && capacity > 0.0 {
            for (id, connections, weight) in &members {
                let share = (total as f64 * weight / capacity).round() as i64;
                new_distribution.insert(id.clone(), i32::try_from(share).unwrap_or(i32::MAX));
                if *connections > share {
                    state.ask_to_shed(id, connections - share);
                    asked += 1;
                }
            }
        }
        Ok(Rebalance {
            score,
            acted,
            asked,
            previous,
            new_distribution,
            strategy_note,
        })
    }

    /// Validates a scaling request and records the desired count.
    /// Returns (kind, action, current, desired, hook settings).
    fn decide_scaling(
        &self,
        request: &pb::TriggerScalingRequest,
    ) -> std::result::Result<
        (
            ModuleKind,
            String,
            u32,
            u32,
            crate::settings::ScalingSettings,
        ),
        NlbError,
    > {
        let mut state = self.nlb.state();
        let by_type = kind_filter(request.module_type, "module_type")?;
        let by_instance = match request.instance_id.trim() {
            "" => None,
            id => {
                check_id("instance_id", id)?;
                Some(state.instance(id)?.kind)
            }
        };
        let kind = match (by_type, by_instance) {
            (Some(a), Some(b)) if a != b => {
                return Err(NlbError::Invalid(format!(
                    "instance_id is a {b} but module_type says {a}"
                )));
            }
            (Some(kind), _) | (None, Some(kind)) => kind,
            (None, None) => {
                return Err(NlbError::Invalid(
                    "name the module kind in module_type or an instance in instance_id".into(),
                ));
            }
        };
        let action = request.scaling_action.trim().to_ascii_lowercase();
        if !matches!(action.as_str(), "scale-up" | "scale-down" | "auto") {
            return Err(NlbError::Invalid(format!(
                "scaling_action `{}` is unknown; use scale-up, scale-down or auto",
                request.scaling_action
            )));
        }
        if !(0..=MAX_INSTANCES).contains(&request.target_instances) {
            return Err(NlbError::Invalid(format!(
                "target_instances must be from 0 to {MAX_INSTANCES} (got {})",
                request.target_instances
            )));
        }
        let config = request.config.unwrap_or_default();
        let numbers = [
            ("min_instances", config.min_instances, MAX_INSTANCES),
            ("max_instances", config.max_instances, MAX_INSTANCES),
            ("target_cpu_percent", config.target_cpu_percent, 100),
            ("target_memory_percent", config.target_memory_percent, 100),
            ("target_connections", config.target_connections, i32::MAX),
            ("scale_up_threshold", config.scale_up_threshold, i32::MAX),
            (
                "scale_down_threshold",
                config.scale_down_threshold,
                i32::MAX,
            ),
            (
                "cooldown_seconds",
                config.cooldown_seconds,
                time::MAX_REQUEST_SECONDS,
            ),
        ];
        if let Some((name, value, max)) = numbers.iter().find(|(_, v, max)| *v < 0 || v > max) {
            return Err(NlbError::Invalid(format!(
                "config.{name} must be from 0 to {max} (got {value})"
            )));
        }
        if config.max_instances > 0 && config.min_instances > config.max_instances {
            return Err(NlbError::Invalid(format!(
                "config.min_instances ({}) is above config.max_instances ({})",
                config.min_instances, config.max_instances
            )));
        }
        let hook = state.settings.scaling.clone();
        let cooldown = Duration::from_secs(if config.cooldown_seconds > 0 {
            config.cooldown_seconds as u64
        } else {
            u64::from(hook.cooldown_seconds)
        });
        let now = Instant::now();
        if let Some(last) = state.desired.get(&kind) {
            let since = now.duration_since(last.changed);
            if since < cooldown {
                return Err(NlbError::Exhausted(format!(
                    "{kind} was scaled {}s ago; the cooldown is {}s, try again in {}s",
                    since.as_secs(),
                    cooldown.as_secs(),
                    (cooldown - since).as_secs().max(1)
                )));
            }
        }
        let current = state.count_of(kind);
        let target = request.target_instances as u32;
        let mut desired = match action.as_str() {
            "scale-up" if target > 0 => target,
            "scale-up" => current + 1,
            "scale-down" if target > 0 => target,
            "scale-down" => current.saturating_sub(1),
            _ if target > 0 => target,
            _ => auto_desired(&state, kind, current, &config),
        };
        if config.min_instances > 0 {
            desired = desired.max(config.min_instances as u32);
        }
        if config.max_instances > 0 {
            desired = desired.min(config.max_instances as u32);
        }
        if action == "scale-up" && desired < current {
            return Err(NlbError::Invalid(format!(
                "scale-up to {desired} is below the current {current} instances"
            )));
        }
        if action == "scale-down" && desired > current {
            return Err(NlbError::Invalid(format!(
                "scale-down to {desired} is above the current {current} instances"
            )));
        }
        state.set_desired(kind, desired, now);
        Ok((kind, action, current, desired, hook))
    }
}

/// Instances needed for the kind's reported load against the config's targets (connections per
/// instance, CPU percent); the current count when no target is set.
fn auto_desired(
    state: &crate::state::State,
    kind: ModuleKind,
    current: u32,
    config: &pb::ScalingConfig,
) -> u32 {
    let members: Vec<_> = state
        .instances
        .values()
        .filter(|i| i.kind == kind && !i.draining)
        .collect();
    let mut needed = Vec::new();
    if config.target_connections > 0 {
        let connections: i64 = members.iter().map(|i| i.connections()).sum();
        needed.push((connections as f64 / f64::from(config.target_connections)).ceil() as u32);
    }
    if config.target_cpu_percent > 0 && !members.is_empty() {
        let cpu: f64 = members
            .iter()
            .filter_map(|i| i.stats.as_ref())
            .map(|s| s.cpu_usage_percent)
            .sum();
        needed.push((cpu / f64::from(config.target_cpu_percent)).ceil() as u32);
    }
    needed
        .into_iter()
        .max()
        .map_or(current, |n| n.clamp(1, MAX_INSTANCES as u32))
}
