//! A module double serving ModuleService on a loopback port: it answers `CanHandle` (capable of
//! the protocols it is given) and `HealthCheck` (with the status it is given), the two calls the
//! NLB makes to modules. The real ModuleService is the module runtime's; this stands in for it
//! here the way a test backend would.

use std::net::SocketAddr;

use marchproxy::pb::{self, module_service_server::ModuleService};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

pub struct FakeModule {
    pub protocols: Vec<pb::Protocol>,
    pub health: pb::HealthStatus,
}

/// Serves the double on a free loopback port until the test ends; returns its address.
pub async fn serve(protocols: Vec<pb::Protocol>, health: pb::HealthStatus) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service =
        pb::module_service_server::ModuleServiceServer::new(FakeModule { protocols, health });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn not_in_double<T>() -> Result<Response<T>, Status> {
    Err(Status::failed_precondition(
        "the test double answers only CanHandle and HealthCheck",
    ))
}

#[tonic::async_trait]
impl ModuleService for FakeModule {
    async fn can_handle(
        &self,
        request: Request<pb::CanHandleRequest>,
    ) -> Result<Response<pb::CanHandleResponse>, Status> {
        let route = request.into_inner().route.unwrap_or_default();
        let capable = self.protocols.iter().any(|p| *p as i32 == route.protocol);
        Ok(Response::new(pb::CanHandleResponse {
            can_handle: capable,
            priority: 10,
            reason: if capable {
                "serves this protocol".into()
            } else {
                "other protocol".into()
            },
            metadata: Default::default(),
        }))
    }

    async fn health_check(
        &self,
        _: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        Ok(Response::new(pb::HealthCheckResponse {
            status: self.health as i32,
            message: format!(
                "double says {}",
                marchproxy::names::health_name(self.health)
            ),
            checks: Default::default(),
            checked_at: None,
        }))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        not_in_double()
    }
    async fn reload(
        &self,
        _: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        not_in_double()
    }
    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        not_in_double()
    }
    async fn get_routes(
        &self,
        _: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        not_in_double()
    }
    async fn update_routes(
        &self,
        _: Request<pb::UpdateRoutesRequest>,
    ) -> Result<Response<pb::UpdateRoutesResponse>, Status> {
        not_in_double()
    }
    async fn delete_route(
        &self,
        _: Request<pb::DeleteRouteRequest>,
    ) -> Result<Response<pb::DeleteRouteResponse>, Status> {
        not_in_double()
    }
    async fn get_rate_limits(
        &self,
        _: Request<pb::GetRateLimitsRequest>,
    ) -> Result<Response<pb::GetRateLimitsResponse>, Status> {
        not_in_double()
    }
    async fn set_rate_limit(
        &self,
        _: Request<pb::SetRateLimitRequest>,
    ) -> Result<Response<pb::SetRateLimitResponse>, Status> {
        not_in_double()
    }
    async fn remove_rate_limit(
        &self,
        _: Request<pb::RemoveRateLimitRequest>,
    ) -> Result<Response<pb::RemoveRateLimitResponse>, Status> {
        not_in_double()
    }
    async fn get_metrics(
        &self,
        _: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        not_in_double()
    }
    async fn scale(
        &self,
        _: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ScaleResponse>, Status> {
        not_in_double()
    }
    async fn get_instances(
        &self,
        _: Request<pb::GetInstancesRequest>,
    ) -> Result<Response<pb::GetInstancesResponse>, Status> {
        not_in_double()
    }
    async fn set_traffic_weight(
        &self,
        _: Request<pb::SetTrafficWeightRequest>,
    ) -> Result<Response<pb::SetTrafficWeightResponse>, Status> {
        not_in_double()
    }
    async fn get_active_version(
        &self,
        _: Request<pb::GetActiveVersionRequest>,
    ) -> Result<Response<pb::GetActiveVersionResponse>, Status> {
        not_in_double()
    }
    async fn rollback(
        &self,
        _: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        not_in_double()
    }
    async fn promote_version(
        &self,
        _: Request<pb::PromoteVersionRequest>,
    ) -> Result<Response<pb::PromoteVersionResponse>, Status> {
        not_in_double()
    }
    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        not_in_double()
    }

    type StreamMetricsStream = tokio_stream::Empty<Result<pb::StreamMetricsResponse, Status>>;

    async fn stream_metrics(
        &self,
        _: Request<pb::StreamMetricsRequest>,
    ) -> Result<Response<Self::StreamMetricsStream>, Status> {
        not_in_double()
    }
    async fn get_config(
        &self,
        _: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        not_in_double()
    }
    async fn update_config(
        &self,
        _: Request<pb::UpdateConfigRequest>,
    ) -> Result<Response<pb::UpdateConfigResponse>, Status> {
        not_in_double()
    }
}
