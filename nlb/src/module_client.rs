//! Calls from the NLB to a module's ModuleService (`CanHandle` for ValidateRoute, `HealthCheck`
//! for CheckHealth), with the cluster key and tight timeouts so one dead module cannot stall
//! an operator's call.

use std::time::Duration;

use marchproxy::{auth::AttachApiKey, names::Endpoint, pb};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

pub type Client =
    pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

pub async fn connect(address: &Endpoint, api_key: Option<&str>) -> Result<Client, String> {
    let auth = AttachApiKey::new(api_key).map_err(|e| e.to_string())?;
    let channel = Channel::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad module address {address}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("cannot reach module at {address}: {e}"))?;
    Ok(pb::module_service_client::ModuleServiceClient::with_interceptor(channel, auth))
}

pub async fn can_handle(
    address: &Endpoint,
    api_key: Option<&str>,
    route: pb::Route,
) -> Result<pb::CanHandleResponse, String> {
    let mut client = connect(address, api_key).await?;
    client
        .can_handle(pb::CanHandleRequest {
            route: Some(route),
            context: Default::default(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("CanHandle failed: {}: {}", status.code(), status.message()))
}

pub async fn health_check(
    address: &Endpoint,
    api_key: Option<&str>,
    instance_id: &str,
    deep: bool,
) -> Result<pb::HealthCheckResponse, String> {
    let mut client = connect(address, api_key).await?;
    client
        .health_check(pb::HealthCheckRequest {
            instance_id: instance_id.to_owned(),
            deep_check: deep,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| {
            format!(
                "HealthCheck failed: {}: {}",
                status.code(),
                status.message()
            )
        })
}

/// Asks every `(instance, address)` at once whether it can handle `route`.
pub async fn can_handle_all(
    targets: Vec<(String, Endpoint)>,
    api_key: Option<String>,
    route: pb::Route,
) -> Vec<(String, Result<pb::CanHandleResponse, String>)> {
    let mut calls = tokio::task::JoinSet::new();
    for (id, address) in targets {
        let (key, route) = (api_key.clone(), route.clone());
        calls.spawn(async move { (id, can_handle(&address, key.as_deref(), route).await) });
    }
    let mut answers = Vec::new();
    while let Some(joined) = calls.join_next().await {
        // A call task only ends by returning; a panic inside tonic is the one way to lose it.
        if let Ok(answer) = joined {
            answers.push(answer);
        }
    }
    answers
}
