//! Typed client for MarchProxy's NLB, and the `marchctl` command built on it.
//!
//! - [`connect`]: an `NLBService` client that carries the cluster key.
//! - [`json`]: any API message as canonical protobuf JSON (what `-o json` prints), and routes
//!   read from JSON files.
//! - [`cli`]: the `marchctl` commands; [`cli::run`] is the binary's entry point; `rollout`
//!   follows gradual promotions.

pub mod cli;
pub mod json;
mod rollout;
mod table;

use marchproxy::{auth::AttachApiKey, pb};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

/// An NLBService client with the cluster key attached to every call.
pub type NlbClient =
    pb::nlb_service_client::NlbServiceClient<InterceptedService<Channel, AttachApiKey>>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("`{0}` is not a gRPC URL; write e.g. http://127.0.0.1:50050")]
    Url(String),
    #[error(
        "cannot reach the NLB at {url}: {source}; is it running (marchproxy up) and is --nlb right?"
    )]
    Unreachable {
        url: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Key(#[from] marchproxy::auth::InvalidApiKey),
}

/// The NLB's ModuleService (blue/green, and calls forwarded to module instances), with the key.
pub type ModuleClient =
    pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

/// Both services of one NLB over one connection.
pub struct Clients {
    pub nlb: NlbClient,
    pub modules: ModuleClient,
}

/// Connects to the NLB at `url` (`http://host:port`; a bare `host:port` is taken as http).
pub async fn connect(url: &str, api_key: Option<&str>) -> Result<Clients, ConnectError> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let endpoint = Channel::from_shared(url.clone()).map_err(|_| ConnectError::Url(url.clone()))?;
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| ConnectError::Unreachable { url, source })?;
    let auth = AttachApiKey::new(api_key)?;
    Ok(Clients {
        nlb: pb::nlb_service_client::NlbServiceClient::with_interceptor(
            channel.clone(),
            auth.clone(),
        ),
        modules: pb::module_service_client::ModuleServiceClient::with_interceptor(channel, auth),
    })
}
