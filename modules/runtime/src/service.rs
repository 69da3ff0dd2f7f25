//! ModuleService for every module: the 22 RPCs over the runtime's state and the module's hooks.
//! Requests are validated here; blue/green, scaling and instance listings are relayed to the
//! NLB, which owns that state.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use marchproxy::{
    pb::{self, module_service_server::ModuleService},
    query,
    status::{self, FailureBody},
    time,
};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::info;

use marchproxy::limiter::Limit;

use crate::shared::{NlbLink, Phase, Shared};

pub struct ModuleGrpc {
    shared: Arc<Shared>,
}

impl ModuleGrpc {
    pub fn new(shared: Arc<Shared>) -> Self {
        ModuleGrpc { shared }
    }

    /// Requests name the instance they are for; empty means this one.
    fn check_instance(&self, id: &str) -> Result<(), Status> {
        if id.is_empty() || id == self.shared.instance_id {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "this is instance `{}`, not `{id}`; call that instance, or find it with GetInstances",
                self.shared.instance_id
            )))
        }
    }

    fn link(&self) -> Result<&NlbLink, Status> {
        self.shared
            .nlb
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this module runs without an NLB (--nlb); blue/green, scaling and instance listings live there"))
    }

    /// The id to relay: the caller's instance or kind, else this instance.
    fn relay_id(&self, id: &str) -> String {
        if id.is_empty() {
            self.shared.instance_id.clone()
        } else {
            id.to_owned()
        }
    }
}

/// A failed call whose response `R` carries `success`/`error`.
fn reject<R: FailureBody>(code: Code, message: impl Into<String>) -> Status {
    status::reject::<R>(code, &message.into())
}

fn seconds(field: &str, value: i32, default: Duration) -> Result<Duration, String> {
    time::seconds_field(field, value, default)
}

/// The NLB's answer, or its failure with the NLB named as its source.
/// An answer relayed from the NLB's endpoint `used`; a replica that was away makes the next
/// call go to another.
fn relayed<T>(
    link: &NlbLink,
    used: usize,
    answer: Result<Response<T>, Status>,
) -> Result<Response<T>, Status> {
    answer.map_err(|status| {
        link.fail_over(used, &status);
        Status::new(status.code(), format!("NLB: {}", status.message()))
    })
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ModuleService for ModuleGrpc {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Reply<pb::GetStatusResponse> {
        self.check_instance(&request.into_inner().instance_id)?;
        let shared = &self.shared;
        let phase = shared.phase();
        let details = HashMap::from([
            (
                "registered".to_owned(),
                shared.registration().is_some().to_string(),
            ),
            (
                "nlb".to_owned(),
                shared
                    .nlb
                    .as_ref()
                    .map_or_else(|| "(none)".to_owned(), NlbLink::urls),
            ),
            ("routes".to_owned(), shared.routes().len().to_string()),
            (
                "rate_limits".to_owned(),
                shared.limiter.list("").len().to_string(),
            ),
            (
                "data_addresses".to_owned(),
                shared
                    .data_addresses
                    .iter()
                    .map(|(_, a)| a.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "in_flight_requests".to_owned(),
                shared.stats.in_flight().to_string(),
            ),
        ]);
        Ok(Response::new(pb::GetStatusResponse {
            instance: Some(shared.instance()),
            status: phase.health() as i32,
            message: match phase {
                Phase::Starting => "serving; registering with the NLB".to_owned(),
                Phase::Ready => "serving".to_owned(),
                Phase::Stopping => "draining: no new connections".to_owned(),
            },
            last_updated: Some(time::now()),
            details,
        }))
    }

    async fn reload(&self, request: Request<pb::ReloadRequest>) -> Reply<pb::ReloadResponse> {
        let request = request.into_inner();
        let fail = |code, message: String| reject::<pb::ReloadResponse>(code, message);
        self.check_instance(&request.instance_id)
            .map_err(|s| fail(s.code(), s.message().to_owned()))?;
        let timeout = seconds(
            "timeout_seconds",
            request.timeout_seconds,
            Duration::from_secs(30),
        )
        .map_err(|e| fail(Code::InvalidArgument, e))?;
        let Some(path) = self.shared.config_path.clone() else {
            return Err(fail(
                Code::FailedPrecondition,
                "this module was started without --config; there is nothing to re-read".into(),
            ));
        };
        // Read and check everything before changing anything.
        let file = crate::config::FileConfig::read(&path)
            .map_err(|e| fail(Code::InvalidArgument, e.to_string()))?;
        let section = file.module_section();
        self.shared
            .module
            .check_config("module", &section)
            .map_err(|errors| {
                fail(
                    Code::InvalidArgument,
                    format!("{}: {}", path.display(), errors.join("; ")),
                )
            })?;
        if request.graceful {
            let deadline = tokio::time::Instant::now() + timeout;
            while self.shared.stats.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let routes: Vec<pb::Route> = file.routes.iter().map(pb::Route::from).collect();
        let count = self
            .shared
            .update_routes(routes, true)
            .map_err(|e| fail(Code::InvalidArgument, format!("{}: {e}", path.display())))?;
        if self.shared.module.config_types().contains(&"module") {
            self.shared
                .update_section("module", &section, false)
                .map_err(|errors| fail(Code::InvalidArgument, errors.join("; ")))?;
        }
        self.shared.relay_routes().await;
        info!(instance = %self.shared.instance_id, file = %path.display(), routes = count, "config reloaded");
        Ok(Response::new(pb::ReloadResponse {
            success: true,
            message: format!(
                "reloaded {}: {count} routes and the module section",
                path.display()
            ),
            error: None,
        }))
    }

    async fn shutdown(&self, request: Request<pb::ShutdownRequest>) -> Reply<pb::ShutdownResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::ShutdownResponse>(s.code(), s.message()))?;
        let drain = if request.graceful {
            seconds(
                "timeout_seconds",
                request.timeout_seconds,
                self.shared.settings().drain_timeout(),
            )
            .map_err(|e| reject::<pb::ShutdownResponse>(Code::InvalidArgument, e))?
        } else {
            Duration::ZERO
        };
        info!(instance = %self.shared.instance_id, graceful = request.graceful, drain_s = drain.as_secs(), "shutdown requested over gRPC");
        self.shared.stop_request.send_replace(Some(drain));
        Ok(Response::new(pb::ShutdownResponse {
            success: true,
            message: if request.graceful {
                format!("shutting down: draining for up to {}s", drain.as_secs())
            } else {
                "shutting down now".to_owned()
            },
            error: None,
        }))
    }

    async fn can_handle(
        &self,
        request: Request<pb::CanHandleRequest>,
    ) -> Reply<pb::CanHandleResponse> {
        let request = request.into_inner();
        let route = request
            .route
            .ok_or_else(|| Status::invalid_argument("route is missing; send the route to check"))?;
        if pb::Protocol::try_from(route.protocol).is_err() {
            return Err(Status::invalid_argument(format!(
                "route.protocol {} is not a Protocol value",
                route.protocol
            )));
        }
        Ok(Response::new(
            self.shared.module.can_handle(&route, &request.context),
        ))
    }

    async fn get_routes(
        &self,
        request: Request<pb::GetRoutesRequest>,
    ) -> Reply<pb::GetRoutesResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        let routes: Vec<pb::Route> = self.shared.routes().iter().map(pb::Route::from).collect();
        let page = query::apply(routes, request.query.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::GetRoutesResponse {
            total_routes: i32::try_from(page.total).unwrap_or(i32::MAX),
            routes: page.items,
            pagination: Some(page.pagination),
        }))
    }

    async fn update_routes(
        &self,
        request: Request<pb::UpdateRoutesRequest>,
    ) -> Reply<pb::UpdateRoutesResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::UpdateRoutesResponse>(s.code(), s.message()))?;
        let written = self
            .shared
            .update_routes(request.routes, request.replace_all)
            .map_err(|e| {
                reject::<pb::UpdateRoutesResponse>(
                    Code::InvalidArgument,
                    format!("{e}; nothing changed"),
                )
            })?;
        self.shared.relay_routes().await;
        info!(instance = %self.shared.instance_id, routes = written, replace_all = request.replace_all, "routes updated");
        Ok(Response::new(pb::UpdateRoutesResponse {
            success: true,
            message: format!(
                "{written} routes written; {} in the table",
                self.shared.routes().len()
            ),
            routes_updated: i32::try_from(written).unwrap_or(i32::MAX),
            error: None,
        }))
    }

    async fn delete_route(
        &self,
        request: Request<pb::DeleteRouteRequest>,
    ) -> Reply<pb::DeleteRouteResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::DeleteRouteResponse>(s.code(), s.message()))?;
        if request.route_id.trim().is_empty() {
            return Err(reject::<pb::DeleteRouteResponse>(
                Code::InvalidArgument,
                "route_id is empty; name the route to delete",
            ));
        }
        match self.shared.delete_route(&request.route_id) {
            Ok(true) => {
                self.shared.relay_routes().await;
                Ok(Response::new(pb::DeleteRouteResponse {
                    success: true,
                    message: format!("route {} deleted", request.route_id),
                    error: None,
                }))
            }
            Ok(false) => Err(reject::<pb::DeleteRouteResponse>(
                Code::NotFound,
                format!("no route `{}`; list them with GetRoutes", request.route_id),
            )),
            Err(e) => Err(reject::<pb::DeleteRouteResponse>(
                Code::FailedPrecondition,
                e,
            )),
        }
    }

    async fn get_rate_limits(
        &self,
        request: Request<pb::GetRateLimitsRequest>,
    ) -> Reply<pb::GetRateLimitsResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        let limits = self.shared.limiter.list(&request.target);
        Ok(Response::new(pb::GetRateLimitsResponse {
            total_limits: i32::try_from(limits.len()).unwrap_or(i32::MAX),
            limits,
        }))
    }

    async fn set_rate_limit(
        &self,
        request: Request<pb::SetRateLimitRequest>,
    ) -> Reply<pb::SetRateLimitResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::SetRateLimitResponse>(s.code(), s.message()))?;
        let wire = request.limit.ok_or_else(|| {
            reject::<pb::SetRateLimitResponse>(
                Code::InvalidArgument,
                "limit is missing; send a RateLimit",
            )
        })?;
        let limit = Limit::try_from_wire(wire)
            .map_err(|e| reject::<pb::SetRateLimitResponse>(Code::InvalidArgument, e))?;
        let id = limit.spec.limit_id.clone();
        let target = limit.spec.target.clone();
        let replaced = self.shared.limiter.set(limit);
        info!(instance = %self.shared.instance_id, limit = %id, %target, replaced, "rate limit set");
        Ok(Response::new(pb::SetRateLimitResponse {
            success: true,
            message: format!(
                "limit {id} on {target} {}",
                if replaced { "replaced" } else { "set" }
            ),
            error: None,
        }))
    }

    async fn remove_rate_limit(
        &self,
        request: Request<pb::RemoveRateLimitRequest>,
    ) -> Reply<pb::RemoveRateLimitResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::RemoveRateLimitResponse>(s.code(), s.message()))?;
        if !self.shared.limiter.remove(&request.limit_id) {
            return Err(reject::<pb::RemoveRateLimitResponse>(
                Code::NotFound,
                format!(
                    "no rate limit `{}`; list them with GetRateLimits",
                    request.limit_id
                ),
            ));
        }
        info!(instance = %self.shared.instance_id, limit = %request.limit_id, "rate limit removed");
        Ok(Response::new(pb::RemoveRateLimitResponse {
            success: true,
            message: format!("limit {} removed", request.limit_id),
            error: None,
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Reply<pb::GetMetricsResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        time::check_range(request.start_time.as_ref(), request.end_time.as_ref())
            .map_err(Status::invalid_argument)?;
        let points = marchproxy::stats::select(
            self.shared.metric_points(),
            &request.metric_names,
            request.start_time.as_ref(),
            request.end_time.as_ref(),
        );
        Ok(Response::new(pb::GetMetricsResponse {
            metrics: Some(pb::ModuleMetrics {
                instance_id: self.shared.instance_id.clone(),
                module_type: self.shared.kind.module_type() as i32,
                metrics: points,
                collected_at: Some(time::now()),
            }),
            collected_at: Some(time::now()),
        }))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Reply<pb::ScaleResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::ScaleResponse>(s.code(), s.message()))?;
        let link = self
            .link()
            .map_err(|s| reject::<pb::ScaleResponse>(s.code(), s.message()))?;
        let mut config = request.config.ok_or_else(|| {
            reject::<pb::ScaleResponse>(
                Code::InvalidArgument,
                "config is missing; send a ScalingConfig",
            )
        })?;
        if request.immediate {
            config.cooldown_seconds = 0;
        }
        let used = link.at();
        let answer = link
            .nlb()
            .trigger_scaling(pb::TriggerScalingRequest {
                instance_id: self.shared.instance_id.clone(),
                module_type: self.shared.kind.module_type() as i32,
                scaling_action: "auto".to_owned(),
                target_instances: 0,
                config: Some(config),
            })
            .await;
        Ok(Response::new(
            relayed(link, used, answer)?.into_inner().into(),
        ))
    }

    async fn get_instances(
        &self,
        request: Request<pb::GetInstancesRequest>,
    ) -> Reply<pb::GetInstancesResponse> {
        let request = request.into_inner();
        let link = self.link()?;
        let used = link.at();
        let answer = link
            .nlb()
            .list_modules(pb::ListModulesRequest {
                module_type_filter: request.module_type,
                status_filter: request.status_filter,
                query: None,
            })
            .await;
        let answer = relayed(link, used, answer)?.into_inner();
        Ok(Response::new(pb::GetInstancesResponse {
            total_instances: answer.total_modules,
            instances: answer.modules,
        }))
    }

    async fn set_traffic_weight(
        &self,
        request: Request<pb::SetTrafficWeightRequest>,
    ) -> Reply<pb::SetTrafficWeightResponse> {
        let mut request = request.into_inner();
        request.instance_id = self.relay_id(&request.instance_id);
        let link = self.link()?;
        let used = link.at();
        relayed(link, used, link.modules().set_traffic_weight(request).await)
    }

    async fn get_active_version(
        &self,
        request: Request<pb::GetActiveVersionRequest>,
    ) -> Reply<pb::GetActiveVersionResponse> {
        let mut request = request.into_inner();
        request.instance_id = self.relay_id(&request.instance_id);
        let link = self.link()?;
        let used = link.at();
        relayed(link, used, link.modules().get_active_version(request).await)
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Reply<pb::RollbackResponse> {
        let mut request = request.into_inner();
        request.instance_id = self.relay_id(&request.instance_id);
        let link = self.link()?;
        let used = link.at();
        relayed(link, used, link.modules().rollback(request).await)
    }

    async fn promote_version(
        &self,
        request: Request<pb::PromoteVersionRequest>,
    ) -> Reply<pb::PromoteVersionResponse> {
        let mut request = request.into_inner();
        request.instance_id = self.relay_id(&request.instance_id);
        let link = self.link()?;
        let used = link.at();
        relayed(link, used, link.modules().promote_version(request).await)
    }

    async fn health_check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Reply<pb::HealthCheckResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        let (status, message, checks) = self.shared.health(request.deep_check).await;
        Ok(Response::new(pb::HealthCheckResponse {
            status: status as i32,
            message,
            checks,
            checked_at: Some(time::now()),
        }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Reply<pb::GetStatsResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        let stats = self.shared.stats(request.reset_counters);
        if request.reset_counters {
            info!(instance = %self.shared.instance_id, "stats counters reset");
        }
        Ok(Response::new(pb::GetStatsResponse { stats: Some(stats) }))
    }

    type StreamMetricsStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamMetricsResponse, Status>> + Send>>;

    async fn stream_metrics(
        &self,
        request: Request<pb::StreamMetricsRequest>,
    ) -> Reply<Self::StreamMetricsStream> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        let interval = seconds(
            "interval_seconds",
            request.interval_seconds,
            Duration::from_secs(5),
        )
        .map_err(Status::invalid_argument)?;
        let shared = Arc::clone(&self.shared);
        let mut phase = self.shared.phase.subscribe();
        let stop = async move {
            let _ = phase.wait_for(|p| *p == Phase::Stopping).await.map(|_| ());
        };
        let stream = marchproxy::serve::every(interval, stop, move || pb::StreamMetricsResponse {
            metrics: Some(pb::ModuleMetrics {
                instance_id: shared.instance_id.clone(),
                module_type: shared.kind.module_type() as i32,
                metrics: marchproxy::stats::select(
                    shared.metric_points(),
                    &request.metric_names,
                    None,
                    None,
                ),
                collected_at: Some(time::now()),
            }),
            timestamp: Some(time::now()),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Reply<pb::GetConfigResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)?;
        let wanted = request.config_type.trim();
        let sections = self.shared.sections();
        if !wanted.is_empty() && !sections.contains_key(wanted) {
            return Err(Status::not_found(format!(
                "no config section `{wanted}`; this module has {}",
                self.shared.section_types().join(", ")
            )));
        }
        let mut last_updated = self.shared.started_at;
        let configs = sections
            .into_iter()
            .filter(|(name, _)| wanted.is_empty() || name == wanted)
            .map(|(name, section)| {
                last_updated = last_updated.max(section.updated_at);
                let data = serde_json::to_vec(&section.value).unwrap_or_default();
                pb::ConfigUpdate {
                    config_id: format!("{}/{name}", self.shared.instance_id),
                    config_type: name,
                    checksum: marchproxy::checksum::sha256_hex(&data),
                    config_data: data,
                    updated_at: Some(time::timestamp(section.updated_at)),
                    metadata: HashMap::new(),
                }
            })
            .collect();
        Ok(Response::new(pb::GetConfigResponse {
            configs,
            last_updated: Some(time::timestamp(last_updated.max(SystemTime::UNIX_EPOCH))),
        }))
    }

    async fn update_config(
        &self,
        request: Request<pb::UpdateConfigRequest>,
    ) -> Reply<pb::UpdateConfigResponse> {
        let request = request.into_inner();
        self.check_instance(&request.instance_id)
            .map_err(|s| reject::<pb::UpdateConfigResponse>(s.code(), s.message()))?;
        let config = request.config.ok_or_else(|| {
            reject::<pb::UpdateConfigResponse>(
                Code::InvalidArgument,
                "config is missing; send a ConfigUpdate",
            )
        })?;
        let section = config.config_type.trim().to_owned();
        let errors = match marchproxy::config_file::update_data(&config) {
            Ok(value) => self
                .shared
                .update_section(&section, &value, request.validate_only)
                .err()
                .unwrap_or_default(),
            Err(problems) => problems,
        };
        if errors.is_empty() {
            return Ok(Response::new(pb::UpdateConfigResponse {
                success: true,
                message: if request.validate_only {
                    format!("config `{section}` is valid; nothing changed (validate_only)")
                } else {
                    format!("config `{section}` applied")
                },
                validation_passed: true,
                validation_errors: Vec::new(),
                error: None,
            }));
        }
        let message = format!(
            "config `{section}` rejected; nothing changed: {}",
            errors.join("; ")
        );
        let body = pb::UpdateConfigResponse {
            success: false,
            message: message.clone(),
            validation_passed: false,
            validation_errors: errors,
            error: Some(status::error_body(Code::InvalidArgument, &message)),
        };
        if request.validate_only {
            Ok(Response::new(body))
        } else {
            Err(status::with_body(
                Code::InvalidArgument,
                &message,
                pb::UpdateConfigResponse::NAME,
                &body,
            ))
        }
    }
}
