//! An HTTP/1.1 data plane for modules that answer HTTP (the SQS proxy, later the ALB and AILB):
//! the module writes an axum [`Router`]; this serves it on every data listener with what each
//! of them would otherwise write again: connection and request counts in [`Stats`], the shared
//! rate limiter (429 with `Retry-After`), the client address from a PROXY v2 header on `+proxy`
//! listeners (as [`ConnectInfo`]), and a graceful stop when the runtime drains. Also the one
//! outbound HTTP/HTTPS client modules use ([`client`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::ConnectInfo,
    http::{HeaderValue, Request, Response, StatusCode, header::RETRY_AFTER},
    response::IntoResponse,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpStream, task::JoinSet};
use tower::ServiceExt;
use tracing::debug;

use crate::{DataListener, DataPlane, ModuleError, RateLimiter, Stats, Subject, Verdict};

/// How long a client may take to send the PROXY header and then each request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on every listener of `plane` until the runtime stops accepting; connections
/// open then finish their current request and close.
pub async fn serve(plane: DataPlane, app: Router) -> Result<(), ModuleError> {
    let DataPlane {
        listeners,
        stats,
        limiter,
        mut stopping,
    } = plane;
    let mut accepting = JoinSet::new();
    for data in listeners {
        let (app, stats, limiter, stopping) = (
            app.clone(),
            Arc::clone(&stats),
            Arc::clone(&limiter),
            stopping.clone(),
        );
        accepting.spawn(accept_loop(data, app, stats, limiter, stopping));
    }
    stopping.wait().await;
    while accepting.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(
    data: DataListener,
    app: Router,
    stats: Arc<Stats>,
    limiter: Arc<RateLimiter>,
    mut stopping: crate::Stopping,
) {
    while let Some((stream, peer)) = crate::tcp::accept(&data, &mut stopping).await {
        let connection = Connection {
            app: app.clone(),
            stats: Arc::clone(&stats),
            limiter: Arc::clone(&limiter),
            stopping: stopping.clone(),
            proxy_protocol: data.proxy_protocol,
        };
        tokio::spawn(connection.serve(stream, peer));
    }
}

struct Connection {
    app: Router,
    stats: Arc<Stats>,
    limiter: Arc<RateLimiter>,
    stopping: crate::Stopping,
    proxy_protocol: bool,
}

impl Connection {
    async fn serve(mut self, mut stream: TcpStream, peer: SocketAddr) {
        let _open = self.stats.connection();
        let _ = stream.set_nodelay(true);
        let Some(client) = crate::tcp::client_address(&mut stream, peer, self.proxy_protocol).await
        else {
            return;
        };
        let (app, stats, limiter) = (self.app, self.stats, self.limiter);
        let service = hyper::service::service_fn(move |mut request: Request<_>| {
            request.extensions_mut().insert(ConnectInfo(client));
            let (app, stats, limiter) = (app.clone(), Arc::clone(&stats), Arc::clone(&limiter));
            async move {
                Ok::<_, Infallible>(
                    handle(app, &stats, &limiter, client, request.map(Body::new)).await,
                )
            }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.stopping.wait() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            debug!(%client, %error, "HTTP connection ended with an error");
        }
    }
}

async fn handle(
    app: Router,
    stats: &Arc<Stats>,
    limiter: &RateLimiter,
    client: SocketAddr,
    request: Request<Body>,
) -> Response<Body> {
    let subject = Subject {
        client_ip: Some(client.ip()),
        ..Subject::default()
    };
    if let Verdict::Limited {
        limit_id,
        retry_after,
    } = limiter.check(&subject)
    {
        stats.rate_limited();
        return too_many_requests(&limit_id, retry_after);
    }
    let counted = stats.request();
    let started = Instant::now();
    // A Router's error type is Infallible: every failure is already a response.
    let response = match app.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    debug!(%client, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    counted.finish(!response.status().is_server_error());
    response
}

fn too_many_requests(limit_id: &str, retry_after: Duration) -> Response<Body> {
    let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(serde_json::json!({
            "detail": format!("rate limited by `{limit_id}`; retry after {seconds} s")
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// An outbound HTTP/1.1 client for http:// and https:// (the system's root certificates).
pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<hyper::body::Bytes>,
>;

/// How long a connection attempt may take: an unreachable host fails in this time instead of
/// the system's TCP timeout (minutes), so callers can move on to another server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Percent-encoding of a URL query or form value (RFC 3986 unreserved characters stay).
pub fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Builds a [`Client`]; fails only when the system has no root certificates at all.
pub fn client() -> Result<Client, std::io::Error> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}
