//! The gRPC services every MarchProxy server answers beside its own: `grpc.health.v1` (open to
//! all, for load balancers and orchestrators) and server reflection (behind the cluster key, like
//! the rest of the API).

use tonic::service::{Routes, interceptor::InterceptedService};
use tonic_health::server::HealthReporter;

use crate::{auth::RequireApiKey, pb};

/// Reflection could not be built from the compiled-in descriptors.
#[derive(Debug, thiserror::Error)]
#[error("cannot build gRPC reflection: {0}")]
pub struct ReflectionError(String);

/// Health (open) and reflection v1 and v1alpha (guarded by `auth`), as routes to add services
/// to; the reporter sets each service's serving status.
pub fn standard_routes(auth: RequireApiKey) -> Result<(HealthReporter, Routes), ReflectionError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ReflectionError(e.to_string()))?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ReflectionError(e.to_string()))?;
    let routes = Routes::new(health)
        .add_service(InterceptedService::new(v1, auth.clone()))
        .add_service(InterceptedService::new(v1alpha, auth));
    Ok((reporter, routes))
}
