//! ModuleService on the NLB. Blue/green (`SetTrafficWeight`, `GetActiveVersion`,
//! `PromoteVersion`, `Rollback`), `GetInstances`, `Scale` and `CanHandle` are answered here, where
//! that state lives (a module relays them here too). Every other call names a module instance in
//! `instance_id` and is forwarded to it, so operators reach any module through the NLB's one
//! endpoint.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Instant, SystemTime},
};

use marchproxy::{
    pb::{self, module_service_server::ModuleService},
    status::{self, FailureBody},
};
use serde_json::json;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::{bluegreen, error::NlbError, module_client, nlb::Nlb, policy::HookType};

pub struct ModuleGateway {
    nlb: Arc<Nlb>,
}

impl ModuleGateway {
    pub fn new(nlb: Arc<Nlb>) -> Self {
        ModuleGateway { nlb }
    }

    /// A client to the instance a forwarded call names.
    async fn instance_client(&self, id: &str) -> Result<module_client::Client, Status> {
        if id.trim().is_empty() {
            return Err(Status::invalid_argument(
                "name the module instance in instance_id: the NLB forwards this call to it",
            ));
        }
        let address = self.nlb.state().instance(id).map(|i| i.address.clone())?;
        module_client::connect(&address, self.nlb.api_key.as_deref())
            .await
            .map_err(Status::unavailable)
    }

    async fn changed(&self) -> Result<(), NlbError> {
        self.nlb.persist().await
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn reject<R: FailureBody>(error: NlbError) -> Status {
    error.reject::<R>()
}

/// Forwards a call that names its instance, unchanged, and returns the instance's answer.
macro_rules! forward {
    ($self:ident, $request:ident, $method:ident) => {{
        let request = $request.into_inner();
        let mut client = $self.instance_client(&request.instance_id).await?;
        client.$method(request).await
    }};
}

#[tonic::async_trait]
impl ModuleService for ModuleGateway {
    async fn set_traffic_weight(
        &self,
        request: Request<pb::SetTrafficWeightRequest>,
    ) -> Reply<pb::SetTrafficWeightResponse> {
        let request = request.into_inner();
        let fail = reject::<pb::SetTrafficWeightResponse>;
        let (kind, config, weights) = {
            let mut state = self.nlb.state();
            let kind = state.kind_named(&request.instance_id).map_err(fail)?;
            state
                .set_weight(kind, &request.version, request.weight)
                .map_err(fail)?;
            (
                kind,
                bluegreen::deployment(&state, kind),
                state.version_weights(kind),
            )
        };
        info!(module_type = %kind, version = %request.version, weight = request.weight, split = ?weights, "traffic weight set");
        self.changed().await.map_err(fail)?;
        Ok(Response::new(pb::SetTrafficWeightResponse {
            success: true,
            message: format!(
                "{kind}: {} now takes {}% of new connections",
                request.version, request.weight
            ),
            current_config: Some(config),
            error: None,
        }))
    }

    async fn get_active_version(
        &self,
        request: Request<pb::GetActiveVersionRequest>,
    ) -> Reply<pb::GetActiveVersionResponse> {
        let request = request.into_inner();
        let state = self.nlb.state();
        let kind = state.kind_named(&request.instance_id)?;
        let config = bluegreen::deployment(&state, kind);
        Ok(Response::new(pb::GetActiveVersionResponse {
            active_version: config.active_version.clone(),
            config: Some(config),
            version_weights: state.version_weights(kind),
        }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Reply<pb::RollbackResponse> {
        let request = request.into_inner();
        let fail = reject::<pb::RollbackResponse>;
        let (kind, previous, current, ended_rollout) = {
            let mut state = self.nlb.state();
            let kind = state.kind_named(&request.instance_id).map_err(fail)?;
            let (previous, current, ended_rollout) = state
                .rollback(kind, request.target_version.trim())
                .map_err(fail)?;
            (kind, previous, current, ended_rollout)
        };
        info!(module_type = %kind, from = %previous, to = %current, "rolled back");
        if ended_rollout {
            self.nlb
                .metrics
                .rollouts
                .with_label_values(&[kind.name(), "rolled_back_by_operator"])
                .inc();
        }
        self.changed().await.map_err(fail)?;
        Ok(Response::new(pb::RollbackResponse {
            success: true,
            message: format!("{kind}: {current} is active again"),
            previous_version: previous,
            current_version: current,
            error: None,
        }))
    }

    async fn promote_version(
        &self,
        request: Request<pb::PromoteVersionRequest>,
    ) -> Reply<pb::PromoteVersionResponse> {
        let request = request.into_inner();
        let fail = reject::<pb::PromoteVersionResponse>;
        let (kind, pre_rollout) = {
            let state = self.nlb.state();
            let kind = state.kind_named(&request.instance_id).map_err(fail)?;
            state
                .check_promote(
                    kind,
                    &request.version,
                    request.immediate,
                    request.promotion_rate,
                )
                .map_err(fail)?;
            let hooks: Vec<_> = state
                .policy(kind)
                .hooks(HookType::PreRollout)
                .cloned()
                .collect();
            let payload =
                state.hook_payload(HookType::PreRollout, kind, &request.version, json!({}));
            (kind, (!request.immediate).then_some((hooks, payload)))
        };
        if let Some((hooks, payload)) = pre_rollout {
            if let Err(reason) = self.nlb.ask_webhooks(&hooks, &payload).await {
                warn!(module_type = %kind, version = %request.version, %reason, "rollout blocked by a pre-rollout webhook");
                {
                    let mut state = self.nlb.state();
                    state.record_event(
                        kind,
                        &request.version,
                        format!("blocked by a pre-rollout webhook: {reason}"),
                    );
                }
                self.nlb
                    .metrics
                    .rollouts
                    .with_label_values(&[kind.name(), "blocked"])
                    .inc();
                // The event is kept even though nothing else changed.
                let _ = self.nlb.persist().await;
                return Err(fail(NlbError::Refused(format!(
                    "{kind}: the rollout of {} did not start: {reason}",
                    request.version
                ))));
            }
        }
        let message = {
            let mut state = self.nlb.state();
            state
                .promote(
                    kind,
                    &request.version,
                    request.immediate,
                    request.promotion_rate,
                    Instant::now(),
                    SystemTime::now(),
                )
                .map_err(fail)?;
            match state.promotion(kind) {
                Some(p) => format!(
                    "{kind}: promoting {} from {} % by {} % per passing analysis every {} ms",
                    p.version,
                    state.weight_of(kind, &p.version),
                    p.step_percent,
                    state.policy(kind).step_interval_ms
                ),
                None => format!("{kind}: {} now takes all new connections", request.version),
            }
        };
        info!(module_type = %kind, version = %request.version, immediate = request.immediate, "promotion started");
        if !request.immediate {
            self.nlb
                .metrics
                .rollouts
                .with_label_values(&[kind.name(), "started"])
                .inc();
        }
        self.changed().await.map_err(fail)?;
        Ok(Response::new(pb::PromoteVersionResponse {
            success: true,
            message,
            promoted_version: request.version,
            error: None,
        }))
    }

    async fn get_instances(
        &self,
        request: Request<pb::GetInstancesRequest>,
    ) -> Reply<pb::GetInstancesResponse> {
        let request = request.into_inner();
        let kind = crate::service::kind_filter(request.module_type, "module_type")?;
        let health = crate::service::health_filter(request.status_filter, "status_filter")?;
        let instances = self.nlb.state().views(kind, health);
        Ok(Response::new(pb::GetInstancesResponse {
            total_instances: i32::try_from(instances.len()).unwrap_or(i32::MAX),
            instances,
        }))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Reply<pb::ScaleResponse> {
        let request = request.into_inner();
        let mut config = request.config.ok_or_else(|| {
            status::reject::<pb::ScaleResponse>(
                Code::InvalidArgument,
                "config is missing; send a ScalingConfig",
            )
        })?;
        if request.immediate {
            config.cooldown_seconds = 0;
        }
        let kind = self
            .nlb
            .state()
            .kind_named(&request.instance_id)
            .map_err(reject::<pb::ScaleResponse>)?;
        let answer = crate::service::NlbGrpc::new(Arc::clone(&self.nlb))
            .scale_kind(kind, "auto", 0, config)
            .await
            .map_err(reject::<pb::ScaleResponse>)?;
        Ok(Response::new(answer.into()))
    }

    async fn can_handle(
        &self,
        request: Request<pb::CanHandleRequest>,
    ) -> Reply<pb::CanHandleResponse> {
        let request = request.into_inner();
        let route = request
            .route
            .ok_or_else(|| Status::invalid_argument("route is missing; send the route to check"))?;
        let targets = self.nlb.state().endpoints(|_| true);
        let answers = module_client::can_handle_all(targets, self.nlb.api_key.clone(), route).await;
        let mut capable: Vec<String> = answers
            .into_iter()
            .filter(|(_, answer)| answer.as_ref().is_ok_and(|a| a.can_handle))
            .map(|(id, _)| id)
            .collect();
        capable.sort();
        Ok(Response::new(pb::CanHandleResponse {
            can_handle: !capable.is_empty(),
            priority: 0,
            reason: if capable.is_empty() {
                "no registered module instance can handle this route".to_owned()
            } else {
                format!("handled by {}", capable.join(", "))
            },
            metadata: capable
                .iter()
                .map(|id| (format!("instance.{id}"), "capable".to_owned()))
                .collect(),
        }))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Reply<pb::GetStatusResponse> {
        forward!(self, request, get_status)
    }

    async fn reload(&self, request: Request<pb::ReloadRequest>) -> Reply<pb::ReloadResponse> {
        forward!(self, request, reload)
    }

    async fn shutdown(&self, request: Request<pb::ShutdownRequest>) -> Reply<pb::ShutdownResponse> {
        forward!(self, request, shutdown)
    }

    async fn get_routes(
        &self,
        request: Request<pb::GetRoutesRequest>,
    ) -> Reply<pb::GetRoutesResponse> {
        forward!(self, request, get_routes)
    }

    async fn update_routes(
        &self,
        request: Request<pb::UpdateRoutesRequest>,
    ) -> Reply<pb::UpdateRoutesResponse> {
        forward!(self, request, update_routes)
    }

    async fn delete_route(
        &self,
        request: Request<pb::DeleteRouteRequest>,
    ) -> Reply<pb::DeleteRouteResponse> {
        forward!(self, request, delete_route)
    }

    async fn get_rate_limits(
        &self,
        request: Request<pb::GetRateLimitsRequest>,
    ) -> Reply<pb::GetRateLimitsResponse> {
        forward!(self, request, get_rate_limits)
    }

    async fn set_rate_limit(
        &self,
        request: Request<pb::SetRateLimitRequest>,
    ) -> Reply<pb::SetRateLimitResponse> {
        forward!(self, request, set_rate_limit)
    }

    async fn remove_rate_limit(
        &self,
        request: Request<pb::RemoveRateLimitRequest>,
    ) -> Reply<pb::RemoveRateLimitResponse> {
        forward!(self, request, remove_rate_limit)
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Reply<pb::GetMetricsResponse> {
        forward!(self, request, get_metrics)
    }

    async fn health_check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Reply<pb::HealthCheckResponse> {
        forward!(self, request, health_check)
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Reply<pb::GetStatsResponse> {
        forward!(self, request, get_stats)
    }

    type StreamMetricsStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamMetricsResponse, Status>> + Send>>;

    async fn stream_metrics(
        &self,
        request: Request<pb::StreamMetricsRequest>,
    ) -> Reply<Self::StreamMetricsStream> {
        let stream = forward!(self, request, stream_metrics)?.into_inner();
        // Ends with the NLB too, so a long-lived stream cannot hold its shutdown open.
        let mut shutdown = self.nlb.shutdown.clone();
        let stop = async move { crate::nlb::stopped(&mut shutdown).await };
        Ok(Response::new(Box::pin(marchproxy::serve::until(
            stream, stop,
        ))))
    }

    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Reply<pb::GetConfigResponse> {
        forward!(self, request, get_config)
    }

    async fn update_config(
        &self,
        request: Request<pb::UpdateConfigRequest>,
    ) -> Reply<pb::UpdateConfigResponse> {
        forward!(self, request, update_config)
    }
}
