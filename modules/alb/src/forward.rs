//! The caching forward proxy for device updates (`spec/ota-cache.md`, the ota-proxy's
//! behaviour): devices send absolute-URI GET requests (`GET http://host/file`) and files are
//! served from the disk cache ([`marchproxy_file_cache`]), one upstream download shared by every
//! concurrent client of a file.
//!
//! - Only GET; a request for the proxy itself is 400. Upstream gets `Authorization` and
//!   `Cookie` (and `Ota-File-Cache-Control` when chained to an upper proxy); clients get
//!   `Content-Type`, `Content-Encoding`, `Ota-File-Cache-Control`.
//! - `Ota-File-Cache-Control` directives: `no_cache` relays, `retry_caching` replaces the
//!   entry, `file_sha256` keys (and checks) the entry, `file_compression_alg` is kept with it.
//! - Errors: too many requests in flight 429, the cache unable to take a file 503, upstream
//!   statuses passed through, upstream unreachable or too slow to answer 502.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{
        HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
        uri::Scheme,
    },
};
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyDataStream, Empty};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector, proxy::Tunnel},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use marchproxy_file_cache::{EntryMeta, FileCache, Key, Lookup, Reader};
use marchproxy_runtime::http::{HttpsConnector, LocalAddr};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tower::Service;
use tracing::{debug, info};

use crate::{config::ForwardArgs, metrics::Metrics, proxy::plain};

/// The request and response header that carries cache directives.
pub const CACHE_CONTROL: HeaderName = HeaderName::from_static("ota-file-cache-control");

/// How many times a request looks its key up again after a download it waited for gave up.
const LOOKUPS: usize = 3;

type UpstreamClient = hyper_util::client::legacy::Client<HttpsConnector<Dialer>, Empty<Bytes>>;

/// The forward proxy: its cache (when configured), its upstream client, its request budget.
pub struct ForwardProxy {
    cache: Option<FileCache>,
    client: UpstreamClient,
    chained: bool,
    upstream_https: bool,
    permits: Arc<Semaphore>,
    max_requests: usize,
}

/// The `Ota-File-Cache-Control` directives a request carries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Directives {
    no_cache: bool,
    retry_caching: bool,
    file_sha256: Option<String>,
    file_compression_alg: Option<String>,
}

impl Directives {
    /// Comma-separated `name` or `name=value`, spaces trimmed, unknown names ignored.
    fn parse(headers: &HeaderMap) -> Directives {
        let mut directives = Directives::default();
        for value in headers.get_all(&CACHE_CONTROL) {
            for directive in value.to_str().unwrap_or("").split(',') {
                let (name, value) = directive
                    .split_once('=')
                    .map_or((directive, ""), |(n, v)| (n, v));
                let value = value.trim();
                match name.trim() {
                    "no_cache" => directives.no_cache = true,
                    "retry_caching" => directives.retry_caching = true,
                    "file_sha256" if !value.is_empty() => {
                        directives.file_sha256 = Some(value.to_owned())
                    }
                    "file_compression_alg" if !value.is_empty() => {
                        directives.file_compression_alg = Some(value.to_owned())
                    }
                    _ => {}
                }
            }
        }
        directives
    }
}

/// Whether a request is meant for a forward proxy: HTTP/1 with an absolute URI.
pub fn is_absolute_form(request: &Request<Body>) -> bool {
    request.version() < axum::http::Version::HTTP_2 && request.uri().scheme().is_some()
}

impl ForwardProxy {
    /// The proxy `args` describe, with its cache opened (and its index loaded).
    pub fn new(
        args: &ForwardArgs,
        connect_timeout: Duration,
        metrics: &Metrics,
    ) -> anyhow::Result<ForwardProxy> {
        let cache = match &args.cache_dir {
            Some(dir) => {
                let mut config = marchproxy_file_cache::Config::new(dir);
                config.max_bytes = args.cache_max_bytes;
                config.soft_limit_percent = args.cache_soft_limit;
                config.hard_limit_percent = args.cache_hard_limit;
                config.wipe = args.init_cache;
                let cache = FileCache::open(&config, metrics.cache.clone()).map_err(|e| {
                    anyhow::anyhow!("the cache in {} cannot be opened: {e}", dir.display())
                })?;
                Some(cache)
            }
            None => None,
        };
        let upper = match &args.upper_proxy {
            Some(upper) => {
                let uri: Uri = upper
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--upper-proxy `{upper}`: {e}"))?;
                if uri.scheme() != Some(&Scheme::HTTP) || uri.host().is_none() {
                    anyhow::bail!("--upper-proxy `{upper}` must be an http://host:port URL");
                }
                Some(uri)
            }
            None => None,
        };
        let dialer = Dialer {
            tcp: marchproxy_runtime::http::tcp_connector(connect_timeout),
            upper,
        };
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(marchproxy_runtime::http::https_over(dialer)?);
        let max_requests = args.forward_max_requests.max(1);
        Ok(ForwardProxy {
            cache,
            client,
            chained: args.upper_proxy.is_some(),
            upstream_https: args.upstream_https,
            permits: Arc::new(Semaphore::new(max_requests)),
            max_requests,
        })
    }

    pub fn cache(&self) -> Option<&FileCache> {
        self.cache.as_ref()
    }

    /// Serves one absolute-URI request; `timeout` bounds the wait for upstream's answer.
    pub async fn handle(
        &self,
        request: Request<Body>,
        metrics: &Metrics,
        timeout: Duration,
    ) -> Response<Body> {
        let started = Instant::now();
        let (outcome, response) = self.serve(request, timeout).await;
        metrics.forwarded(outcome);
        metrics.answered(
            "forward-proxy",
            response.status().as_u16(),
            started.elapsed(),
        );
        response
    }

    async fn serve(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> (&'static str, Response<Body>) {
        if request.method() != Method::GET {
            return (
                "refused",
                plain(
                    StatusCode::BAD_REQUEST,
                    "only GET is forwarded by this proxy",
                ),
            );
        }
        let local = request.extensions().get::<LocalAddr>().map(|l| l.0);
        let url = request.uri().clone();
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return (
                "refused",
                plain(
                    StatusCode::BAD_REQUEST,
                    "the URL must be absolute, http:// or https://",
                ),
            );
        }
        if local.is_some_and(|local| names_listener(&url, local)) {
            return (
                "refused",
                plain(
                    StatusCode::BAD_REQUEST,
                    "the request names this proxy itself; it is a proxy, not a web server",
                ),
            );
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            return (
                "refused",
                plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!(
                        "{} forward-proxy requests are in flight already; retry shortly",
                        self.max_requests
                    ),
                ),
            );
        };
        let directives = Directives::parse(request.headers());
        let upstream = match self.upstream_request(&url, request.headers()) {
            Ok(upstream) => upstream,
            Err(problem) => return ("refused", plain(StatusCode::BAD_REQUEST, &problem)),
        };
        let Some(cache) = self.cache.as_ref().filter(|_| !directives.no_cache) else {
            return self.relay(upstream, timeout, permit).await;
        };
        let key = directives
            .file_sha256
            .as_deref()
            .and_then(Key::digest)
            .unwrap_or_else(|| Key::url(&url.to_string()));
        let mut refetch = directives.retry_caching;
        for _ in 0..LOOKUPS {
            match cache.lookup(&key, refetch) {
                Lookup::Hit(reader) => return ("hit", cached(reader, &key, None, permit)),
                Lookup::Wait(pending) => {
                    if let Some(reader) = pending.ready().await {
                        return ("joined", cached(reader, &key, None, permit));
                    }
                }
                Lookup::Fetch(filler) => {
                    let response = match self.send(upstream, timeout).await {
                        Ok(response) => response,
                        Err(response) => return ("failed", response),
                    };
                    if response.status() != StatusCode::OK {
                        return ("upstream_status", passed_on(response, permit));
                    }
                    let size = hyper::body::Body::size_hint(response.body()).exact();
                    if !filler.fits(size) {
                        return ("relayed", passed_on(response, permit));
                    }
                    let (parts, body) = response.into_parts();
                    let meta = EntryMeta {
                        content_type: header_text(&parts.headers, &header::CONTENT_TYPE),
                        content_encoding: header_text(&parts.headers, &header::CONTENT_ENCODING),
                        compression: directives.file_compression_alg.clone(),
                        url: Some(url.to_string()),
                    };
                    let upstream_directives = parts.headers.get(&CACHE_CONTROL).cloned();
                    return match filler.fill(meta, size, BodyDataStream::new(body)) {
                        Ok(reader) => ("filled", cached(reader, &key, upstream_directives, permit)),
                        Err(error) => (
                            "failed",
                            plain(
                                StatusCode::SERVICE_UNAVAILABLE,
                                &format!("the cache cannot take the file now ({error}); retry"),
                            ),
                        ),
                    };
                }
                Lookup::Relay => break,
            }
            refetch = false;
        }
        self.relay(upstream, timeout, permit).await
    }

    /// The request upstream gets: the URL (over https when asked) and the headers it may see.
    fn upstream_request(
        &self,
        url: &Uri,
        headers: &HeaderMap,
    ) -> Result<Request<Empty<Bytes>>, String> {
        let mut target = url.clone();
        if self.upstream_https && url.scheme() == Some(&Scheme::HTTP) {
            let mut parts = url.clone().into_parts();
            parts.scheme = Some(Scheme::HTTPS);
            // An explicit :80 belonged to plain http.
            if let Some(authority) = &parts.authority {
                if authority.port_u16() == Some(80) {
                    parts.authority = authority.host().parse().ok();
                }
            }
            target = Uri::from_parts(parts)
                .map_err(|e| format!("the URL cannot be fetched over https: {e}"))?;
        }
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = target;
        let forwarded: &[&HeaderName] = if self.chained {
            &[&header::AUTHORIZATION, &header::COOKIE, &CACHE_CONTROL]
        } else {
            &[&header::AUTHORIZATION, &header::COOKIE]
        };
        for name in forwarded {
            for value in headers.get_all(*name) {
                request.headers_mut().append((*name).clone(), value.clone());
            }
        }
        Ok(request)
    }

    async fn send(
        &self,
        request: Request<Empty<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, Response<Body>> {
        let url = request.uri().clone();
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                let reason = crate::proxy::error_chain(&error);
                info!(%url, %reason, "forward proxy: upstream unreachable");
                Err(plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream {url} could not be reached: {reason}"),
                ))
            }
            Err(_) => Err(plain(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "upstream {url} did not answer within {} ms",
                    timeout.as_millis()
                ),
            )),
        }
    }

    async fn relay(
        &self,
        upstream: Request<Empty<Bytes>>,
        timeout: Duration,
        permit: OwnedSemaphorePermit,
    ) -> (&'static str, Response<Body>) {
        match self.send(upstream, timeout).await {
            Ok(response) => ("relayed", passed_on(response, permit)),
            Err(response) => ("failed", response),
        }
    }
}

/// Whether `url` addresses the listener at `local` (same port, and its address or a loopback
/// name): fetching it would loop.
fn names_listener(url: &Uri, local: SocketAddr) -> bool {
    let default_port = if url.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    if url.port_u16().unwrap_or(default_port) != local.port() {
        return false;
    }
    let host = url
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == local.ip() || ip.is_loopback() || ip.is_unspecified(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

fn header_text(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

/// The headers a client may see of an upstream answer.
fn client_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in [
        &header::CONTENT_TYPE,
        &header::CONTENT_ENCODING,
        &CACHE_CONTROL,
    ] {
        if let Some(value) = from.get(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    headers
}

/// An upstream answer relayed as it comes (errors and all), holding a request slot until done.
fn passed_on(response: Response<Incoming>, permit: OwnedSemaphorePermit) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let mut relayed = Response::new(Body::new(Held {
        body,
        _permit: permit,
    }));
    *relayed.status_mut() = parts.status;
    *relayed.headers_mut() = client_headers(&parts.headers);
    relayed
}

/// A cached (or being cached) file as the client gets it.
fn cached(
    reader: Reader,
    key: &Key,
    upstream_directives: Option<HeaderValue>,
    permit: OwnedSemaphorePermit,
) -> Response<Body> {
    let mut headers = HeaderMap::new();
    let meta = reader.meta();
    for (name, value) in [
        (header::CONTENT_TYPE, &meta.content_type),
        (header::CONTENT_ENCODING, &meta.content_encoding),
    ] {
        if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    }
    let directives = match key.sha256() {
        Some(digest) => {
            let mut text = format!("file_sha256={digest}");
            if let Some(alg) = &meta.compression {
                text.push_str(&format!(",file_compression_alg={alg}"));
            }
            HeaderValue::from_str(&text).ok()
        }
        None => upstream_directives,
    };
    if let Some(directives) = directives {
        headers.insert(CACHE_CONTROL, directives);
    }
    debug!(%key, committed = reader.is_committed(), "forward proxy: serving from the cache");
    let size = reader.size();
    let mut response = Response::new(Body::new(Held {
        body: ReaderBody {
            chunks: Box::pin(reader.into_stream()),
            remaining: size,
        },
        _permit: permit,
    }));
    *response.headers_mut() = headers;
    response
}

/// A cache reader as an HTTP body of known length where it is known, so clients get a
/// `Content-Length` and see a cut transfer as one.
struct ReaderBody {
    chunks: Pin<Box<dyn Stream<Item = Result<Bytes, marchproxy_file_cache::ReadError>> + Send>>,
    remaining: Option<u64>,
}

impl hyper::body::Body for ReaderBody {
    type Data = Bytes;
    type Error = marchproxy_file_cache::ReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.chunks.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(remaining) = &mut self.remaining {
                    *remaining = remaining.saturating_sub(chunk.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A body that holds one of the forward proxy's request slots until it is done or dropped.
struct Held<B> {
    body: B,
    _permit: OwnedSemaphorePermit,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Dials upstream servers: directly, or through the upper proxy (plain requests in absolute
/// form to it, https:// through a CONNECT tunnel).
#[derive(Clone)]
pub struct Dialer {
    tcp: HttpConnector,
    upper: Option<Uri>,
}

/// A dialed connection, saying whether requests on it go to a proxy (absolute form).
pub struct Dialed {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for Dialer {
    type Response = Dialed;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Dialed, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        match self.upper.clone() {
            None => Box::pin(async move {
                let io = tcp.call(target).await?;
                Ok(Dialed { io, proxied: false })
            }),
            Some(upper) if target.scheme() == Some(&Scheme::HTTPS) => Box::pin(async move {
                let io = Tunnel::new(upper, tcp).call(target).await?;
                Ok(Dialed { io, proxied: false })
            }),
            Some(upper) => Box::pin(async move {
                let io = tcp.call(upper).await?;
                Ok(Dialed { io, proxied: true })
            }),
        }
    }
}

impl Connection for Dialed {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_parse_as_the_ota_client_writes_them() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CACHE_CONTROL,
            " retry_caching , file_sha256=ABCdef ,file_compression_alg=zst,unknown=1, no_cache"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            Directives::parse(&headers),
            Directives {
                no_cache: true,
                retry_caching: true,
                file_sha256: Some("ABCdef".into()),
                file_compression_alg: Some("zst".into()),
            }
        );
        assert_eq!(Directives::parse(&HeaderMap::new()), Directives::default());
    }

    #[test]
    fn requests_for_the_listener_itself_are_recognised() {
        let local: SocketAddr = "10.0.0.5:8090".parse().unwrap();
        for own in [
            "http://10.0.0.5:8090/x",
            "http://127.0.0.1:8090/",
            "http://localhost:8090/a",
        ] {
            assert!(names_listener(&own.parse().unwrap(), local), "{own}");
        }
        for other in [
            "http://10.0.0.6:8090/x",
            "http://10.0.0.5/x",
            "http://updates.example:8090/",
        ] {
            assert!(!names_listener(&other.parse().unwrap(), local), "{other}");
        }
    }
}
