//! The one outbound HTTP/1.1 client every component uses (modules' upstream calls, the NLB's
//! rollout webhooks): plain TCP for http://, TLS with the system's root certificates for
//! https://, and a connect timeout so an unreachable host fails fast.
//!
//! Behind the `http-client` feature: marchctl and other users of the API types do not pay for
//! a TLS stack.

use std::time::Duration;

pub use hyper_rustls::HttpsConnector;

/// An outbound HTTP/1.1 client for http:// and https:// (the system's root certificates).
pub type Client =
    hyper_util::client::legacy::Client<Connector, http_body_util::Full<hyper::body::Bytes>>;

/// How long a connection attempt may take: an unreachable host fails in this time instead of
/// the system's TCP timeout (minutes), so callers can move on to another server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What outbound HTTP clients dial with: plain TCP for http://, TLS with the system's root
/// certificates for https://, each connection attempt within `connect_timeout`.
pub type Connector = HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Builds a [`Connector`]; fails only when the system has no root certificates at all.
pub fn connector(connect_timeout: Duration) -> Result<Connector, std::io::Error> {
    https_over(tcp_connector(connect_timeout))
}

/// The plain TCP half of [`connector`], for connectors that dial somewhere else first (a
/// proxy) before TLS.
pub fn tcp_connector(
    connect_timeout: Duration,
) -> hyper_util::client::legacy::connect::HttpConnector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

/// TLS with the system's root certificates for https:// over `connector`; http:// passes
/// through it as is.
pub fn https_over<C>(connector: C) -> Result<HttpsConnector<C>, std::io::Error> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector))
}

/// Builds a [`Client`]; fails only when the system has no root certificates at all.
pub fn client() -> Result<Client, std::io::Error> {
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector(CONNECT_TIMEOUT)?),
    )
}
