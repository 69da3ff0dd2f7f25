//! An HTTP data plane for modules that answer HTTP (the ALB, AILB, SQS proxy, wasm-registry):
//! the module writes an axum [`Router`]; this serves it on every data listener with what each
//! of them would otherwise write again: HTTP/1.1 and HTTP/2 (prior knowledge, or over TLS by
//! ALPN on `https=` listeners), upgrades (WebSocket), connection and request counts in
//! [`Stats`], the shared rate limiter (429 with `Retry-After`), the client address from a PROXY
//! v2 header on `+proxy` listeners (as [`ConnectInfo`]), and a graceful stop when the runtime
//! drains. Also the one outbound HTTP/HTTPS client modules use ([`client`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
pub use marchproxy::http_client::{
    CONNECT_TIMEOUT, Client, Connector, HttpsConnector, client, connector, https_over,
    tcp_connector,
};
use marchproxy::pb;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::rustls;
pub use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tower::ServiceExt;
use tracing::debug;

use crate::{DataListener, DataPlane, ModuleError, RateLimiter, Stats, Subject, Verdict};

/// How long a client may take to send the PROXY header, finish the TLS handshake, and then
/// send each request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle HTTP/2 connection is pinged.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Set on every request: the address the client connected to (the listener's own), so a
/// forward proxy can refuse requests addressed to itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// Set on every request: whether it came over TLS (an `https=` listener), for modules that
/// tell upstreams the client's scheme (`X-Forwarded-Proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secure(pub bool);

/// Serves `app` on every listener of `plane` until the runtime stops accepting; connections
/// open then finish their current request and close.
pub async fn serve(plane: DataPlane, app: Router) -> Result<(), ModuleError> {
    serve_tls(plane, app, None).await
}

/// [`serve`], with TLS on the `https=` listeners (which need `tls`).
pub async fn serve_tls(
    plane: DataPlane,
    app: Router,
    tls: Option<TlsAcceptor>,
) -> Result<(), ModuleError> {
    let DataPlane {
        listeners,
        stats,
        limiter,
        mut stopping,
    } = plane;
    let https = listeners
        .iter()
        .find(|l| l.protocol == Some(pb::Protocol::Https));
    if let (None, Some(https)) = (&tls, https) {
        return Err(format!(
            "the https listener on {} needs a certificate: give --tls-cert and --tls-key",
            https.addr
        )
        .into());
    }
    let mut accepting = JoinSet::new();
    for data in listeners {
        let tls = tls
            .clone()
            .filter(|_| data.protocol == Some(pb::Protocol::Https));
        let (app, stats, limiter, stopping) = (
            app.clone(),
            Arc::clone(&stats),
            Arc::clone(&limiter),
            stopping.clone(),
        );
        accepting.spawn(accept_loop(data, app, stats, limiter, stopping, tls));
    }
    stopping.wait().await;
    while accepting.join_next().await.is_some() {}
    Ok(())
}

/// TLS from PEM files (the certificate chain, then the private key), offering the `alpn`
/// protocols (for `https=` listeners, HTTP/2 and HTTP/1.1).
pub fn tls_acceptor(certificate: &Path, key: &Path, alpn: &[&[u8]]) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("certificate {}: {e}", certificate.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate {} holds no PEM certificate",
            certificate.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("private key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate {}: {e}", certificate.display()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    data: DataListener,
    app: Router,
    stats: Arc<Stats>,
    limiter: Arc<RateLimiter>,
    mut stopping: crate::Stopping,
    tls: Option<TlsAcceptor>,
) {
    while let Some((stream, peer)) = crate::tcp::accept(&data, &mut stopping).await {
        let connection = Connection {
            app: app.clone(),
            stats: Arc::clone(&stats),
            limiter: Arc::clone(&limiter),
            stopping: stopping.clone(),
            proxy_protocol: data.proxy_protocol,
        };
        tokio::spawn(connection.serve(stream, peer, tls.clone()));
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
    async fn serve(self, mut stream: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>) {
        let _open = self.stats.connection();
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let Some(client) = crate::tcp::client_address(&mut stream, peer, self.proxy_protocol).await
        else {
            return;
        };
        match tls {
            None => {
                // The version sniff reads without a timer of its own: a client that connects
                // and says nothing is let go here instead of holding its socket for ever.
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await,
                    Ok(Ok(1..))
                ) {
                    debug!(%client, "closed: no request within the header timeout");
                    return;
                }
                self.serve_http(stream, client, LocalAddr(local), Secure(false))
                    .await
            }
            Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    self.serve_http(stream, client, LocalAddr(local), Secure(true))
                        .await
                }
                Ok(Err(error)) => debug!(%client, %error, "TLS handshake failed"),
                Err(_) => debug!(%client, "TLS handshake timed out"),
            },
        }
    }

    async fn serve_http<I>(mut self, io: I, client: SocketAddr, local: LocalAddr, secure: Secure)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (app, stats, limiter) = (self.app, self.stats, self.limiter);
        let service = hyper::service::service_fn(move |mut request: Request<_>| {
            request.extensions_mut().insert(ConnectInfo(client));
            request.extensions_mut().insert(secure);
            request.extensions_mut().insert(local);
            let (app, stats, limiter) = (app.clone(), Arc::clone(&stats), Arc::clone(&limiter));
            async move {
                Ok::<_, Infallible>(
                    handle(app, &stats, &limiter, client, request.map(Body::new)).await,
                )
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        // Pings find HTTP/2 clients that vanished without closing.
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(HTTP2_PING_INTERVAL))
            .keep_alive_timeout(HEADER_TIMEOUT);
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
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

/// The answer to a request over a rate limit: 429, `Retry-After` in whole seconds, and a JSON
/// body naming the limit.
pub fn too_many_requests(limit_id: &str, retry_after: Duration) -> Response<Body> {
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
