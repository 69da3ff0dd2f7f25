//! The runtime's HTTP data plane with a module written here: the client address from a PROXY
//! v2 header on a `+proxy` listener, a rate limit answered with 429 and `Retry-After`, requests
//! counted, and a drain that lets a slow request finish.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo, routing::get};
use marchproxy::{limiter::Limit, names::ModuleKind, pb};
use marchproxy_runtime::{DataPlane, ListenSpec, Module, ModuleError, Runtime, RuntimeConfig};
use marchproxy_testkit::{eventually, http_get};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Answers `/ip` with the client address it sees, `/slow` after half a second.
struct WhoAmI;

#[tonic::async_trait]
impl Module for WhoAmI {
    fn kind(&self) -> ModuleKind {
        ModuleKind::Alb
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Http]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        let app = Router::new()
            .route(
                "/ip",
                get(|ConnectInfo(client): ConnectInfo<SocketAddr>| async move {
                    client.ip().to_string()
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "done"
                }),
            );
        marchproxy_runtime::http::serve(plane, app).await
    }
}

async fn get_over(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    // A refused connection may end in a reset: what arrived before it is the answer.
    let _ = stream.read_to_string(&mut response).await;
    response
}

#[tokio::test]
async fn proxy_header_rate_limit_counts_and_drain() {
    let mut config = RuntimeConfig::local(ModuleKind::Alb, "who-am-i");
    config.listen = vec![
        ListenSpec::parse("http=127.0.0.1:0").unwrap(),
        ListenSpec::parse("http+proxy=127.0.0.1:0").unwrap(),
    ];
    config.drain_timeout = Duration::from_secs(10);
    let runtime = Runtime::bind(Arc::new(WhoAmI), config).await.unwrap();
    let (plain, proxied) = (runtime.data_addrs()[0], runtime.data_addrs()[1]);
    let shared = Arc::clone(runtime.shared());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runtime.run(async move {
        let _ = stopped.await;
    }));

    assert_eq!(http_get(plain, "/ip").await, (200, "127.0.0.1".to_owned()));
    let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let mut stream = TcpStream::connect(proxied).await.unwrap();
    stream
        .write_all(&marchproxy::proxy_protocol::header(client, proxied))
        .await
        .unwrap();
    let response = get_over(&mut stream, "/ip").await;
    assert!(response.ends_with("\r\n\r\n203.0.113.7"), "{response}");
    let mut stream = TcpStream::connect(proxied).await.unwrap();
    let response = get_over(&mut stream, "/ip").await;
    assert!(
        response.is_empty(),
        "no PROXY header, no answer: {response}"
    );

    let limit = Limit::try_from_wire(pb::RateLimit {
        limit_id: "edge".into(),
        target: "127.0.0.1".into(),
        requests_per_minute: 2,
        burst_size: 2,
        enabled: true,
        ..Default::default()
    })
    .unwrap();
    shared.limiter.set(limit);
    let statuses = statuses_of(plain, 3).await;
    assert_eq!(statuses, [200, 200, 429]);
    let mut stream = TcpStream::connect(plain).await.unwrap();
    let limited = get_over(&mut stream, "/ip").await;
    assert!(
        limited.to_ascii_lowercase().contains("retry-after: "),
        "{limited}"
    );
    assert!(limited.contains("rate limited by `edge`"), "{limited}");
    shared.limiter.remove("edge");

    let metrics = marchproxy::admin::render(&shared.stats.registry);
    assert!(
        metrics.contains(
            "marchproxy_module_rate_limited_total{instance=\"who-am-i\",module_type=\"alb\"} 2"
        ),
        "{metrics}"
    );

    // A request in flight when the drain starts still gets its answer.
    let slow = tokio::spawn(http_get(plain, "/slow"));
    eventually(
        "the slow request is in flight",
        Duration::from_secs(10),
        || {
            let open = shared.stats.active_connections();
            async move { open >= 1 }
        },
    )
    .await;
    let _ = stop.send(());
    assert_eq!(slow.await.unwrap(), (200, "done".to_owned()));
    running.await.unwrap().unwrap();
}

async fn statuses_of(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(http_get(addr, "/ip").await.0);
    }
    statuses
}
