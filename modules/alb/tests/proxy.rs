//! The ALB binary between real clients (raw HTTP/1.1, curl for HTTP/2 over h2c and TLS, a
//! WebSocket client) and upstream servers written here, directly and through a real NLB:
//! Host/path/header routing, weights, forwarded headers, a failing server ejected and its
//! requests retried, health checks taking a dead server out and bringing it back, timeouts,
//! and rate limits set over gRPC.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use marchproxy::pb;
use marchproxy_testkit::{
    eventually,
    external::{require, wait_for_port},
    http_get,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{Alb, DEADLINE, ROOMY_CACHE};

const ANSWER: u8 = 0;
const FAIL: u8 = 1;
const SLOW: u8 = 2;

/// An upstream web server written for the tests: answers JSON describing the request it got
/// (its name, path, Host and forwarded headers), `/health` by its health flag; it can be set
/// to fail (500) or to answer slowly, and killed with every connection it holds.
struct Upstream {
    name: &'static str,
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
    healthy: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(name: &'static str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Upstream::serve(name, listener)
    }

    /// Starts again on the address it had (after [`Upstream::kill`]).
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let fresh = Upstream::serve(self.name, listener);
        self.requests = fresh.requests;
        self.mode = fresh.mode;
        self.healthy = fresh.healthy;
        self.task = fresh.task;
    }

    fn serve(name: &'static str, listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(AtomicU8::new(ANSWER));
        let healthy = Arc::new(AtomicBool::new(true));
        let (counted, current, health) = (
            Arc::clone(&requests),
            Arc::clone(&mode),
            Arc::clone(&healthy),
        );
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task closes them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (counted, current, health) = (
                    Arc::clone(&counted),
                    Arc::clone(&current),
                    Arc::clone(&health),
                );
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let (counted, current, health) = (
                            Arc::clone(&counted),
                            Arc::clone(&current),
                            Arc::clone(&health),
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                respond(name, request, &counted, &current, &health).await,
                            )
                        }
                    },
                );
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            name,
            addr,
            requests,
            mode,
            healthy,
            task,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn kill(&self) {
        self.task.abort();
    }
}

async fn respond(
    name: &str,
    request: hyper::Request<hyper::body::Incoming>,
    counted: &AtomicUsize,
    mode: &AtomicU8,
    healthy: &AtomicBool,
) -> hyper::Response<String> {
    let header = |n: &str| {
        request
            .headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if request.uri().path() == "/health" {
        let status = if healthy.load(Ordering::SeqCst) {
            200
        } else {
            503
        };
        return hyper::Response::builder()
            .status(status)
            .body(String::new())
            .unwrap();
    }
    counted.fetch_add(1, Ordering::SeqCst);
    match mode.load(Ordering::SeqCst) {
        FAIL => {
            return hyper::Response::builder()
                .status(500)
                .body(format!("{name} is broken"))
                .unwrap();
        }
        SLOW => tokio::time::sleep(Duration::from_secs(3)).await,
        _ => {}
    }
    let body = json!({
        "server": name,
        "path": request.uri().path(),
        "query": request.uri().query(),
        "host": header("host"),
        "x_forwarded_for": header("x-forwarded-for"),
        "x_forwarded_proto": header("x-forwarded-proto"),
        "x_forwarded_host": header("x-forwarded-host"),
        "connection": header("connection"),
    });
    hyper::Response::builder()
        .header("content-type", "application/json")
        .body(body.to_string())
        .unwrap()
}

/// A WebSocket server answering each text message with `echo: <text>`.
async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        let reply = format!("echo: {}", text.as_str());
                        if socket.send(Message::text(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A response as a client sees it.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn server(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.body);
        self.json()["server"].as_str().unwrap().to_owned()
    }
}

/// One HTTP/1.1 request on its own connection.
async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Answer {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in extra {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Answer {
    request(addr, "GET", host, path, &[]).await
}

fn route(id: &str, host: &str, path: &str, servers: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nroute_id = \"{id}\"\nprotocol = \"http\"\nsource_pattern = \"{host}\"\n\
         path_pattern = \"{path}\"\ndestination_pattern = \"{servers}\"\n{extra}\n"
    )
}

/// curl's answer: (HTTP version, status, body).
fn curl(args: &[&str]) -> (String, u16, String) {
    let output = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (version, status) = last.split_once(' ').unwrap_or(("", "0"));
    (
        version.to_owned(),
        status.parse().unwrap_or(0),
        body.to_owned(),
    )
}

fn require_curl() {
    require("curl", "curl --version", "sudo apt-get install -y curl");
}

#[tokio::test]
async fn routes_weights_websocket_and_http2_through_the_nlb() {
    require_curl();
    let (a, b, assets, canary) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("assets").await,
        Upstream::start("canary").await,
    );
    let ws = websocket_echo().await;
    let state = marchproxy_testkit::state_dir();
    let nlb = marchproxy_testkit::start_with(marchproxy_nlb::Config {
        state_dir: Some(state.path().to_owned()),
        listen: vec![marchproxy::listen::ListenSpec::parse("http=127.0.0.1:0").unwrap()],
        limits: marchproxy_nlb::dataplane::Limits {
            proxy_protocol: true,
            ..Default::default()
        },
        ..marchproxy_nlb::Config::local()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = [
        route(
            "api",
            "api.example.com",
            "/v1",
            &format!("{}=3,{}=1", a.addr, b.addr),
            "",
        ),
        route(
            "assets",
            "*",
            "/static/",
            &assets.addr.to_string(),
            "metadata = { strip_prefix = \"true\" }",
        ),
        route("ws", "*", "/ws", &ws.to_string(), ""),
        route(
            "canary",
            "*",
            "/v1",
            &canary.addr.to_string(),
            "priority = 10\nheaders = { x-canary = \"yes\" }",
        ),
    ]
    .concat();
    let cache = dir.path().join("cache");
    let alb = Alb::start(
        dir.path(),
        &config,
        &[
            "--nlb",
            &nlb.url(),
            "--heartbeat-interval",
            "1s",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-max-bytes",
            ROOMY_CACHE,
        ],
        None,
    )
    .await;
    nlb.wait_healthy(pb::ModuleType::Alb, DEADLINE).await;
    let front = nlb.listen[0];

    // Weights 3:1, and what the upstream is told about the client.
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..200 {
        let answer = get(front, "api.example.com", "/v1/items?page=2").await;
        *seen.entry(answer.server()).or_default() += 1;
    }
    assert_eq!((seen["a"], seen["b"]), (150, 50), "{seen:?}");
    let answer = request(
        front,
        "GET",
        "api.example.com:8443",
        "/v1/items?page=2",
        &[
            ("X-Forwarded-For", "10.9.9.9"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    .await
    .json();
    assert_eq!(answer["path"], "/v1/items");
    assert_eq!(answer["query"], "page=2");
    assert_eq!(answer["host"], "api.example.com:8443", "the Host is kept");
    assert_eq!(
        answer["x_forwarded_for"], "10.9.9.9, 127.0.0.1",
        "the client (from the NLB's PROXY header) appended"
    );
    assert_eq!(answer["x_forwarded_proto"], "http");
    assert_eq!(
        answer["x_forwarded_host"], "api.example.com",
        "the client's is replaced"
    );
    assert_eq!(
        answer["connection"], "",
        "the client's Connection: close stays behind"
    );

    // Path prefix stripped; a header picks the canary over the plain route; no match is 404.
    let answer = get(front, "www.example.org", "/static/css/site.css").await;
    assert_eq!(answer.server(), "assets");
    assert_eq!(answer.json()["path"], "/css/site.css");
    let canaried = request(
        front,
        "GET",
        "api.example.com",
        "/v1/x",
        &[("X-Canary", "yes")],
    )
    .await;
    assert_eq!(canaried.server(), "canary");
    let missing = get(front, "www.example.org", "/nothing").await;
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("no route"), "{}", missing.body);

    // WebSocket through the NLB and the ALB.
    let stream = TcpStream::connect(front).await.unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async(
        format!("ws://chat.example.com:{}/ws", front.port()),
        stream,
    )
    .await
    .expect("the WebSocket upgrade goes through");
    assert_eq!(response.status(), 101);
    for word in ["hello", "again"] {
        socket.send(Message::text(word)).await.unwrap();
        let reply = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("an echo in time")
            .expect("an open socket")
            .unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("echo: {word}"));
    }
    socket.close(None).await.unwrap();

    // HTTP/2 with prior knowledge (h2c) through the NLB; the upstream gets HTTP/1.1.
    let url = format!("http://{front}/static/h2.txt");
    let (version, status, body) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--http2-prior-knowledge",
            "-H",
            "Host: h2.example.com",
            &url,
        ])
    })
    .await
    .unwrap();
    assert_eq!((version.as_str(), status), ("2", 200), "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["path"], "/h2.txt");
    assert_eq!(body["host"], "h2.example.com");

    // A route limit set over gRPC: two requests pass, the third is refused with Retry-After.
    let mut module = alb.module_client().await;
    let set = module
        .set_rate_limit(pb::SetRateLimitRequest {
            instance_id: String::new(),
            limit: Some(pb::RateLimit {
                limit_id: "assets-limit".into(),
                target: "route:assets".into(),
                requests_per_minute: 2,
                enabled: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(set.success, "{}", set.message);
    let statuses: Vec<u16> = [
        get(front, "x", "/static/1").await.status,
        get(front, "x", "/static/2").await.status,
    ]
    .into();
    assert_eq!(statuses, [200, 200]);
    let refused = get(front, "x", "/static/3").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    let retry_after: u64 = refused.headers["retry-after"].parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        get(front, "api.example.com", "/v1/x").await.status,
        200,
        "other routes pass"
    );

    assert_eq!(
        alb.metric("alb_requests_total", "route=\"api\",status_class=\"2xx\"")
            .await,
        Some(202.0)
    );
    assert_eq!(
        alb.metric(
            "alb_requests_total",
            "route=\"assets\",status_class=\"4xx\""
        )
        .await,
        Some(1.0)
    );
    assert!(
        alb.metric(
            "alb_upstream_requests_total",
            &format!("server=\"{}\",outcome=\"2xx\"", a.addr)
        )
        .await
            >= Some(150.0)
    );

    // The caching forward proxy through the NLB (routed by the upstream's Host, `*`): a device's
    // absolute-URI GET is fetched once, then served from the cache.
    let fetched_before = a.requests();
    let url = format!("http://{}/firmware/v2.bin", a.addr);
    for _ in 0..2 {
        let answer = get(front, &a.addr.to_string(), &url).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()["path"], "/firmware/v2.bin");
    }
    assert_eq!(
        a.requests(),
        fetched_before + 1,
        "the second fetch is a hit"
    );
    assert_eq!(
        alb.metric("alb_forward_requests_total", "outcome=\"hit\"")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn failures_are_retried_ejected_health_checked_and_timed_out() {
    let (mut a, b, slow) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("slow").await,
    );
    slow.set(SLOW);
    let dir = tempfile::tempdir().unwrap();
    let health = "metadata = { health_check_path = \"/health\", interval_seconds = \"0.2\", \
                  healthy_threshold = \"2\", unhealthy_threshold = \"2\" }";
    let config = [
        "[module]\noutlier = { consecutive_failures = 3, base_ejection_ms = 60000, max_ejection_ms = 600000 }\n".to_owned(),
        route("web", "*", "/", &format!("{},{}", a.addr, b.addr), health),
        route(
            "slow",
            "*",
            "/slow",
            &slow.addr.to_string(),
            "metadata = { timeout_ms = \"300\", retries = \"0\" }",
        ),
    ]
    .concat();
    let alb = Alb::start(dir.path(), &config, &[], None).await;

    // A answers 500: every request still succeeds (retried on B), and A is ejected.
    a.set(FAIL);
    for _ in 0..20 {
        assert_eq!(get(alb.http, "x", "/page").await.server(), "b");
    }
    let a_label = format!("route=\"web\",server=\"{}\"", a.addr);
    assert_eq!(
        alb.metric("alb_upstream_ejections_total", &a_label).await,
        Some(1.0)
    );
    assert_eq!(a.requests(), 3, "A is left alone once ejected");
    assert!(alb.metric("alb_retries_total", "route=\"web\"").await >= Some(3.0));

    // A dies: the health checks take it out (before its ejection would end)...
    a.kill();
    eventually("A marked unhealthy", DEADLINE, || async {
        alb.metric("alb_upstream_healthy", &a_label).await == Some(0.0)
    })
    .await;
    let (_, upstreams) = http_get(alb.admin, "/upstreams").await;
    let upstreams: Value = serde_json::from_str(&upstreams).unwrap();
    let web = upstreams["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "web")
        .unwrap();
    assert_eq!(web["servers"][0]["healthy"], false, "{upstreams}");
    assert_eq!(web["servers"][1]["healthy"], true, "{upstreams}");

    // ...and bring it back when it answers again, ejection forgiven.
    a.restart().await;
    eventually("A healthy again", DEADLINE, || async {
        alb.metric("alb_upstream_healthy", &a_label).await == Some(1.0)
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(alb.http, "x", "/page").await.status, 200);
    }
    assert_eq!(a.requests(), 5, "A takes its share again");

    // With no server left: 503 once the checks see it, saying why.
    a.kill();
    b.kill();
    eventually("the route has no server", DEADLINE, || async {
        let answer = get(alb.http, "x", "/page").await;
        answer.status == 503 && answer.body.contains("no server of route `web`")
    })
    .await;

    // A server slower than the route's timeout: 504.
    let started = std::time::Instant::now();
    let answer = get(alb.http, "x", "/slow").await;
    assert_eq!(answer.status, 504, "{}", answer.body);
    assert!(
        answer.body.contains("did not answer within"),
        "{}",
        answer.body
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn http2_over_tls_by_alpn_and_h2c() {
    require_curl();
    let upstream = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = marchproxy_testkit::external::self_signed_certificate(dir.path(), "alb.test");
    let config = route("web", "*", "/", &upstream.addr.to_string(), "");
    let alb = Alb::start(dir.path(), &config, &[], Some((&cert, &key))).await;
    let https = alb.https.unwrap();
    wait_for_port(https, DEADLINE).await;

    let (cert, url, resolve) = (
        cert.display().to_string(),
        format!("https://alb.test:{}/tls", https.port()),
        format!("alb.test:{}:127.0.0.1", https.port()),
    );
    let (version, status, body) = tokio::task::spawn_blocking(move || {
        curl(&["--http2", "--cacert", &cert, "--resolve", &resolve, &url])
    })
    .await
    .unwrap();
    assert_eq!((version.as_str(), status), ("2", 200), "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["x_forwarded_proto"], "https");
    assert_eq!(body["host"], format!("alb.test:{}", https.port()));

    let url = format!("http://{}/plain", alb.http);
    let (version, status, _) =
        tokio::task::spawn_blocking(move || curl(&["--http2-prior-knowledge", &url]))
            .await
            .unwrap();
    assert_eq!((version.as_str(), status), ("2", 200));
    let url = format!("http://{}/plain", alb.http);
    let (version, status, _) = tokio::task::spawn_blocking(move || curl(&["--http1.1", &url]))
        .await
        .unwrap();
    assert_eq!((version.as_str(), status), ("1.1", 200));
}
