//! The reverse proxy: a request is matched to a route, checked against the route's rate limits,
//! and sent to a server of the route's pool over pooled keep-alive connections, with
//! `X-Forwarded-For/-Proto/-Host` added and hop-by-hop headers dropped. A failed try (connect
//! failure, 5xx, timeout) counts against the server and, when the request can be sent again,
//! is retried on another server within the route's overall timeout. WebSocket (and any HTTP/1.1
//! upgrade) is passed through: after the server's 101 both connections are joined.
//!
//! What the client sees when no try succeeds: 502 (no server answered usefully), 503 (no server
//! available, or the route over its limit answers 429), 504 (the servers took too long), each
//! with a one-line body saying why.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{
        HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
        header, request::Parts,
    },
};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use marchproxy_runtime::{RateLimiter, Verdict, http::Secure};
use tracing::debug;

use crate::{
    Alb,
    config::Settings,
    metrics::status_class,
    pool::InFlight,
    table::{Route, Table},
};

/// The pooled HTTP/1.1 client toward upstream servers.
pub type UpstreamClient =
    hyper_util::client::legacy::Client<marchproxy_runtime::http::Connector, Body>;

/// A client with the pool and connect settings of `settings`.
pub fn upstream_client(settings: &Settings) -> Result<UpstreamClient, std::io::Error> {
    let connector =
        marchproxy_runtime::http::connector(Duration::from_millis(settings.connect_timeout_ms))?;
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(settings.idle_timeout_ms))
            .pool_max_idle_per_host(settings.max_idle_per_server)
            .build(connector),
    )
}

/// The data plane's request handler.
#[derive(Clone)]
pub struct Proxy {
    pub alb: Arc<Alb>,
    pub limiter: Arc<RateLimiter>,
}

impl Proxy {
    pub async fn handle(self, mut request: Request<Body>) -> Response<Body> {
        if let Some(forward) = &self.alb.forward {
            if crate::forward::is_absolute_form(&request) {
                let timeout = Duration::from_millis(self.alb.settings().timeout_ms);
                return forward.handle(request, &self.alb.metrics, timeout).await;
            }
        }
        let started = Instant::now();
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let secure = request.extensions().get::<Secure>().is_some_and(|s| s.0);
        let host = request_host(&request);
        let table: Arc<Table> = self.alb.table();
        let Some(route) = table.find(
            host.as_deref(),
            client,
            request.uri().path(),
            request.headers(),
        ) else {
            self.alb.metrics.answered("none", 404, started.elapsed());
            return plain(
                StatusCode::NOT_FOUND,
                &format!(
                    "no route for host `{}` and path `{}`",
                    host.as_deref().unwrap_or(""),
                    request.uri().path()
                ),
            );
        };
        if let Verdict::Limited {
            limit_id,
            retry_after,
        } = self.limiter.check_route(&route.id)
        {
            self.alb.metrics.answered(&route.id, 429, started.elapsed());
            return marchproxy_runtime::http::too_many_requests(&limit_id, retry_after);
        }
        if request.method() == Method::CONNECT {
            self.alb.metrics.answered(&route.id, 405, started.elapsed());
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not proxied; this is a reverse proxy",
            );
        }
        // Taken before the request is split up: the client side of an upgrade.
        let client_upgrade =
            is_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
        let forwarded = Forwarded {
            client,
            secure,
            host,
        };
        let response = self
            .forward(route, request, &forwarded, client_upgrade)
            .await;
        self.alb
            .metrics
            .answered(&route.id, response.status().as_u16(), started.elapsed());
        response
    }

    async fn forward(
        &self,
        route: &Route,
        request: Request<Body>,
        forwarded: &Forwarded,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let policy = &route.policy;
        let deadline = Instant::now() + policy.timeout;
        let (parts, body) = request.into_parts();
        let limit = self.alb.settings().retry_body_limit;
        let mut payload = match Payload::read(&parts, body, limit, deadline).await {
            Ok(payload) => payload,
            Err(response) => return response,
        };
        let idempotent = is_idempotent(&parts.method);
        let client = self.alb.client();
        let metrics = &self.alb.metrics;
        let mut tried = Vec::new();
        let mut failure = Failure::NoServer;
        for attempt in 0..=policy.retries {
            let Some(index) = route.pool.pick(&tried) else {
                break;
            };
            let server = &route.pool.servers[index];
            if attempt > 0 {
                metrics.retried(&route.id);
            }
            let Some(body) = payload.next() else {
                break;
            };
            let upstream = match upstream_request(&parts, body, route, &server.address, forwarded) {
                Ok(upstream) => upstream,
                Err(problem) => return plain(StatusCode::BAD_REQUEST, &problem),
            };
            let in_flight = server.start();
            let sent = Instant::now();
            let try_deadline = deadline.min(sent + policy.try_timeout);
            let result =
                tokio::time::timeout_at(try_deadline.into(), client.request(upstream)).await;
            let elapsed = sent.elapsed();
            let may_retry;
            match result {
                Ok(Ok(response)) => {
                    let status = response.status();
                    metrics.tried(
                        &route.id,
                        &server.address,
                        status_class(status.as_u16()),
                        elapsed,
                    );
                    if !status.is_server_error() {
                        server.succeeded();
                        return answer(response, in_flight, client_upgrade);
                    }
                    route.pool.failed(index, &format!("answered {status}"));
                    may_retry = idempotent && payload.replayable();
                    // Kept: when no further try happens, the client gets this answer as it is.
                    failure = Failure::Answered(response, in_flight);
                }
                Ok(Err(error)) => {
                    let connect = error.is_connect();
                    let outcome = if connect { "connect_error" } else { "error" };
                    metrics.tried(&route.id, &server.address, outcome, elapsed);
                    let reason = error_chain(&error);
                    route.pool.failed(index, &reason);
                    debug!(route = %route.id, server = %server.address, %reason, "upstream try failed");
                    // A connection never made carried nothing: any request may go again.
                    may_retry = payload.replayable() && (connect || idempotent);
                    failure = Failure::Transport(server.address.clone(), reason);
                }
                Err(_) => {
                    metrics.tried(&route.id, &server.address, "timeout", elapsed);
                    route.pool.failed(index, "timed out");
                    may_retry = payload.replayable() && idempotent;
                    failure = Failure::Timeout(server.address.clone(), elapsed);
                }
            }
            tried.push(index);
            if !may_retry || Instant::now() >= deadline {
                break;
            }
        }
        match failure {
            Failure::Answered(response, in_flight) => answer(response, in_flight, None),
            failure => failure.response(&route.id, route.pool.servers.len()),
        }
    }
}

/// What the proxy tells upstreams about the client.
struct Forwarded {
    client: IpAddr,
    secure: bool,
    /// The Host the client asked for (lowercase, no port), for `X-Forwarded-Host`.
    host: Option<String>,
}

/// Why the last try failed, when all did.
enum Failure {
    NoServer,
    /// A 5xx answer, passed on unless another try does better.
    Answered(Response<Incoming>, InFlight),
    Transport(String, String),
    Timeout(String, Duration),
}

impl Failure {
    fn response(self, route: &str, servers: usize) -> Response<Body> {
        match self {
            Failure::NoServer => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "no server of route `{route}` is available ({servers} failing health checks or ejected)"
                ),
            ),
            Failure::Answered(response, _) => plain(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "an upstream of route `{route}` answered {}",
                    response.status()
                ),
            ),
            Failure::Transport(server, reason) => plain(
                StatusCode::BAD_GATEWAY,
                &format!("upstream {server} of route `{route}` failed: {reason}"),
            ),
            Failure::Timeout(server, waited) => plain(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "upstream {server} of route `{route}` did not answer within {} ms",
                    waited.as_millis()
                ),
            ),
        }
    }
}

/// The request body as the tries need it: nothing, kept in memory (sent again on a retry), or
/// streamed through once.
enum Payload {
    Empty,
    Kept(Bytes),
    Streamed(Option<Body>),
}

impl Payload {
    async fn read(
        parts: &Parts,
        body: Body,
        limit: usize,
        deadline: Instant,
    ) -> Result<Payload, Response<Body>> {
        if hyper::body::Body::is_end_stream(&body) {
            return Ok(Payload::Empty);
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_none_or(|length| length > limit) {
            return Ok(Payload::Streamed(Some(body)));
        }
        match tokio::time::timeout_at(deadline.into(), body.collect()).await {
            Ok(Ok(collected)) => Ok(Payload::Kept(collected.to_bytes())),
            Ok(Err(error)) => Err(plain(
                StatusCode::BAD_REQUEST,
                &format!("the request body could not be read: {error}"),
            )),
            Err(_) => Err(plain(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )),
        }
    }

    fn replayable(&self) -> bool {
        !matches!(self, Payload::Streamed(_))
    }

    /// The body for the next try; None once a streamed body has been sent.
    fn next(&mut self) -> Option<Body> {
        match self {
            Payload::Empty => Some(Body::empty()),
            Payload::Kept(bytes) => Some(Body::from(bytes.clone())),
            Payload::Streamed(body) => body.take(),
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` and `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| connection_tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers that belong to one connection and never pass a proxy (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Drops hop-by-hop headers (and those the Connection header names); `Upgrade` too unless the
/// message is an upgrade being passed through.
fn drop_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(connection_tokens)
        .filter_map(|t| HeaderName::try_from(t).ok())
        .filter(|name| *name != header::HOST && !(upgrade && name == header::UPGRADE))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The Host a request asked for: the URI's authority (HTTP/2, absolute form) or the Host
/// header, lowercase and without its port.
fn request_host(request: &Request<Body>) -> Option<String> {
    request
        .uri()
        .host()
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok())
        .map(marchproxy::route::strip_port)
}

fn upstream_request(
    parts: &Parts,
    body: Body,
    route: &Route,
    server: &str,
    forwarded: &Forwarded,
) -> Result<Request<Body>, String> {
    let path = parts.uri.path();
    let path = match &route.policy.strip_prefix {
        Some(prefix) if path.starts_with(prefix.as_str()) => {
            let rest = &path[prefix.len()..];
            if rest.starts_with('/') {
                rest.to_owned()
            } else {
                format!("/{rest}")
            }
        }
        _ => path.to_owned(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri: Uri = format!("{}://{server}{path}{query}", route.policy.upstream_scheme)
        .parse()
        .map_err(|e| format!("the request path cannot be sent on: {e}"))?;
    let mut headers = parts.headers.clone();
    let upgrade = is_upgrade(&headers);
    drop_hop_by_hop(&mut headers, upgrade);
    // The authority of an absolute-form or HTTP/2 request is what was routed; a Host header
    // saying otherwise is ignored (RFC 9112 3.2.2), so the server sees the routed host.
    if let Some(authority) = parts.uri.authority() {
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| "the request authority is not a valid Host".to_owned())?;
        headers.insert(header::HOST, value);
    }
    if parts.version == Version::HTTP_2 {
        // HTTP/2 may split cookies over several fields; HTTP/1.1 servers expect one line.
        let cookies: Vec<&str> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if cookies.len() > 1 {
            if let Ok(joined) = HeaderValue::from_str(&cookies.join("; ")) {
                headers.insert(header::COOKIE, joined);
            }
        }
    }
    let x_forwarded_for = HeaderName::from_static("x-forwarded-for");
    let mut chain: Vec<String> = headers
        .get_all(&x_forwarded_for)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    chain.push(forwarded.client.to_string());
    // Visible text joined by commas, ending in an IP address: always a valid value.
    if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert(x_forwarded_for, value);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if forwarded.secure { "https" } else { "http" }),
    );
    // Set by the proxy only: a client's own would steer links and caches upstream.
    let x_forwarded_host = HeaderName::from_static("x-forwarded-host");
    headers.remove(&x_forwarded_host);
    if let Some(host) = forwarded.host.as_deref() {
        if let Ok(value) = HeaderValue::from_str(host) {
            headers.insert(x_forwarded_host, value);
        }
    }
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The upstream's answer as the client gets it. The server counts as busy until the body has
/// been sent (or, for an upgrade, until the joined connections close).
fn answer(
    mut response: Response<Incoming>,
    in_flight: InFlight,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
        let server_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            match tokio::try_join!(client_upgrade, server_upgrade) {
                Ok((client, server)) => {
                    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                    if let Err(error) =
                        tokio::io::copy_bidirectional(&mut client, &mut server).await
                    {
                        debug!(%error, "upgraded connection ended with an error");
                    }
                }
                Err(error) => debug!(%error, "the upgrade did not complete"),
            }
        });
        let (mut parts, _) = response.into_parts();
        drop_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, Body::empty());
    }
    let (mut parts, body) = response.into_parts();
    drop_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(
        parts,
        Body::new(Counted {
            body,
            _in_flight: in_flight,
        }),
    )
}

/// A response body that keeps its server counted busy until it is done or dropped.
struct Counted {
    body: Incoming,
    _in_flight: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A short text answer of the proxy's own.
pub(crate) fn plain(status: StatusCode, why: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(format!(
        "{} {}: {why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error with its causes, which say what actually went wrong ("connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::UPGRADE, "h2c".parse().unwrap());
        headers.insert("x-kept", "yes".parse().unwrap());
        drop_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));

        let mut upgrade = HeaderMap::new();
        upgrade.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        upgrade.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(is_upgrade(&upgrade));
        drop_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade[header::UPGRADE], "websocket");
        assert_eq!(upgrade[header::CONNECTION], "upgrade");
    }

    #[test]
    fn error_answers_say_why() {
        let response =
            Failure::Timeout("10.0.0.1:80".into(), Duration::from_millis(1500)).response("web", 2);
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let response = Failure::NoServer.response("web", 2);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
