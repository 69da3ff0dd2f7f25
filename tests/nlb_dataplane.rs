//! The NLB's data plane with real TCP backends behind registered instances: protocols are
//! recognised and routed by SNI and Host, failed instances are skipped, half-closed streams
//! complete, drains let open connections finish, and bad or slow input is counted and closed.

use std::{net::SocketAddr, time::Duration};

use marchproxy::{listen::ListenSpec, pb};
use marchproxy_nlb::Config;
use marchproxy_testkit::{backend::tagged_echo, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn nlb_with_listener(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestNlb {
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        listen: vec![ListenSpec::parse("auto=127.0.0.1:0").unwrap()],
        ..Config::local()
    };
    config.limits.sniff_timeout = Duration::from_millis(300);
    config.limits.connect_timeout = Duration::from_millis(500);
    tweak(&mut config);
    start_with(config).await
}

/// Sends `request`, half-closes, and reads the whole answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("the NLB accepts");
    stream.write_all(request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the answer ends")
        .ok();
    answer
}

/// Awaits a read that must finish promptly.
async fn within<T, E: std::fmt::Debug>(read: impl std::future::Future<Output = Result<T, E>>) -> T {
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the bytes arrive within 10 s")
        .expect("the read succeeds")
}

fn tag(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn metrics(nlb: &TestNlb) -> String {
    http_get(nlb.admin, "/metrics").await.1
}

/// A ClientHello with SNI `host` (the sniffer's own tests cover the format in detail).
fn client_hello(host: &str) -> Vec<u8> {
    let name = host.as_bytes();
    let mut sni = vec![0, 0];
    sni.extend(((name.len() + 5) as u16).to_be_bytes());
    sni.extend(((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend((name.len() as u16).to_be_bytes());
    sni.extend(name);
    let mut body = vec![3, 3];
    body.extend([1u8; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend((sni.len() as u16).to_be_bytes());
    body.extend(sni);
    let mut handshake = vec![1, 0];
    handshake.extend((body.len() as u16).to_be_bytes());
    handshake.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn connections_are_routed_by_protocol_sni_and_host() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |_| {}).await;
    let mut client = nlb.client().await;
    let (a, b, db) = (
        tagged_echo("alb-a").await,
        tagged_echo("alb-b").await,
        tagged_echo("dblb-1").await,
    );
    register(
        &mut client,
        instance("alb-a", pb::ModuleType::Alb, "v1", &a.addr.to_string()),
        vec![],
    )
    .await;
    register(
        &mut client,
        instance("alb-b", pb::ModuleType::Alb, "v1", &b.addr.to_string()),
        vec![],
    )
    .await;
    register(
        &mut client,
        instance("dblb-1", pb::ModuleType::Dblb, "v1", &db.addr.to_string()),
        vec![route("pg", pb::Protocol::Postgres, "", "", 0)],
    )
    .await;
    let mut proxied = route("b-tls", pb::Protocol::Https, "*.b.example", "alb-b", 10);
    proxied
        .metadata
        .insert("proxy_protocol".into(), "v2".into());
    client
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![
                route("a-http", pb::Protocol::Http, "a.example", "alb-a", 10),
                proxied,
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let listener = nlb.listen[0];

    let request = b"GET / HTTP/1.1\r\nHost: A.example:8080\r\n\r\n";
    let answer = exchange(listener, request).await;
    assert_eq!(tag(&answer), "alb-a");
    assert!(
        answer.ends_with(request),
        "the module gets the client's bytes untouched"
    );

    let hello = client_hello("www.b.example");
    let answer = exchange(listener, &hello).await;
    assert_eq!(tag(&answer), "alb-b");
    let relayed = &answer["alb-b\n".len()..];
    assert_eq!(
        &relayed[..12],
        b"\r\n\r\n\0\r\nQUIT\n",
        "the route asked for a PROXY v2 header"
    );
    assert_eq!(
        &relayed[16..20],
        &[127, 0, 0, 1],
        "with the client's address"
    );
    assert_eq!(&relayed[28..], &hello[..]);

    let mut startup = vec![0, 0, 0, 8, 4, 210, 22, 47];
    startup.extend(b"more");
    assert_eq!(tag(&exchange(listener, &startup).await), "dblb-1");

    let text = metrics(&nlb).await;
    assert!(
        text.contains(
            "nlb_routed_connections_total{module_type=\"alb\",protocol=\"http\",version=\"v1\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("nlb_routed_connections_total{module_type=\"dblb\",protocol=\"postgres\",version=\"v1\"} 1"), "{text}");
    assert!(
        text.contains("nlb_connect_duration_seconds_count 3"),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_slow_and_unroutable_input_is_counted_and_closed() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |_| {}).await;
    let listener = nlb.listen[0];
    assert!(exchange(listener, b"\xff\xfe garbage").await.is_empty());
    // A client that sends nothing is closed after the sniff timeout.
    let mut silent = TcpStream::connect(listener).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed by the NLB");
    assert!(matches!(closed, Ok(0) | Err(_)));
    // HTTP with no route.
    assert!(
        exchange(listener, b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
            .await
            .is_empty()
    );
    let text = metrics(&nlb).await;
    assert!(
        text.contains("nlb_routing_errors_total{cause=\"unknown_protocol\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("nlb_routing_errors_total{cause=\"sniff_timeout\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("nlb_routing_errors_total{cause=\"no_route\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_dead_instance_costs_no_client_a_connection() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |_| {}).await;
    let mut client = nlb.client().await;
    let live = tagged_echo("alive").await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    register(
        &mut client,
        instance("alive", pb::ModuleType::Alb, "v1", &live.addr.to_string()),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    register(
        &mut client,
        instance("dead", pb::ModuleType::Alb, "v1", &dead.to_string()),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    for _ in 0..20 {
        let answer = exchange(nlb.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(tag(&answer), "alive");
    }
    assert_eq!(live.connections(), 20);
    let text = metrics(&nlb).await;
    let failures = metric_value(
        &text,
        "nlb_routing_errors_total",
        "cause=\"connect_failed\"",
    )
    .unwrap_or(0.0) as u64;
    assert!(
        (1..=3).contains(&failures),
        "the dead instance is ejected after a few failures, not tried 20 times: {failures}"
    );
}

#[tokio::test]
async fn killing_an_instance_loses_no_new_connection() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |_| {}).await;
    let mut client = nlb.client().await;
    let (one, two) = (tagged_echo("one").await, tagged_echo("two").await);
    for backend in [&one, &two] {
        register(
            &mut client,
            instance(
                &backend.name,
                pb::ModuleType::Alb,
                "v1",
                &backend.addr.to_string(),
            ),
            vec![route("web", pb::Protocol::Http, "", "", 0)],
        )
        .await;
    }
    for _ in 0..10 {
        assert!(
            !exchange(nlb.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_empty()
        );
    }
    assert!(one.connections() > 0 && two.connections() > 0, "both serve");
    one.kill();
    for _ in 0..30 {
        let answer = exchange(nlb.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(
            tag(&answer),
            "two",
            "every new connection reaches the live instance"
        );
    }
}

#[tokio::test]
async fn half_closed_streams_complete_both_ways() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |_| {}).await;
    let mut client = nlb.client().await;
    let backend = tagged_echo("echo").await;
    register(
        &mut client,
        instance("echo", pb::ModuleType::Alb, "v1", &backend.addr.to_string()),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    // A large upload, then the client closes its side; every byte comes back after it.
    let mut body = b"POST /upload HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    body.extend((0..2_000_000u32).map(|i| (i % 251) as u8));
    let answer = exchange(nlb.listen[0], &body).await;
    assert_eq!(&answer[..5], b"echo\n");
    assert_eq!(answer.len() - 5, body.len());
    assert!(answer[5..] == body[..], "the echoed stream is intact");
}

#[tokio::test]
async fn a_draining_instance_finishes_open_connections_and_gets_no_new_ones() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |_| {}).await;
    let mut client = nlb.client().await;
    let (old, new) = (tagged_echo("old").await, tagged_echo("new").await);
    let old_registration = register(
        &mut client,
        instance("old", pb::ModuleType::Alb, "v1", &old.addr.to_string()),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    // One open connection to the old instance.
    let mut open = TcpStream::connect(nlb.listen[0]).await.unwrap();
    open.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 4];
    within(open.read_exact(&mut first)).await;
    assert_eq!(&first, b"old\n");
    register(
        &mut client,
        instance("new", pb::ModuleType::Alb, "v1", &new.addr.to_string()),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;

    let mut draining = client.clone();
    let drain = tokio::spawn(async move {
        draining
            .unregister_module(pb::UnregisterModuleRequest {
                instance_id: "old".into(),
                registration_id: old_registration,
                graceful: true,
                drain_timeout_seconds: 20,
            })
            .await
    });
    eventually(
        "the old instance is draining",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                client
                    .get_module_info(pb::GetModuleInfoRequest {
                        instance_id: "old".into(),
                    })
                    .await
                    .is_ok_and(|i| {
                        i.into_inner().instance.unwrap().health_status
                            == pb::HealthStatus::Stopping as i32
                    })
            }
        },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            tag(&exchange(nlb.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await),
            "new"
        );
    }
    // The open connection still works through the drain.
    let mut echoed_request = vec![0u8; b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".len()];
    within(open.read_exact(&mut echoed_request)).await;
    open.write_all(b"still there").await.unwrap();
    let mut more = [0u8; 11];
    within(open.read_exact(&mut more)).await;
    assert_eq!(&more, b"still there");
    assert!(!drain.is_finished());
    drop(open);
    let drained = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain ends once the connection closed")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(drained.active_connections_drained, 1);
}

#[tokio::test]
async fn connection_limits_hold() {
    let dir = state_dir();
    let nlb = nlb_with_listener(&dir, |config| {
        config.limits.per_source_rate = 1;
        config.limits.per_source_burst = 3;
    })
    .await;
    let mut client = nlb.client().await;
    let backend = tagged_echo("limited").await;
    register(
        &mut client,
        instance(
            "limited",
            pb::ModuleType::Alb,
            "v1",
            &backend.addr.to_string(),
        ),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    let mut served = 0;
    for _ in 0..6 {
        if tag(&exchange(nlb.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await) == "limited" {
            served += 1;
        }
    }
    assert_eq!(served, 3, "a burst of 3 from one source, then refused");
    assert!(
        metrics(&nlb)
            .await
            .contains("nlb_routing_errors_total{cause=\"rate_limited\"} 3")
    );

    let capped_dir = state_dir();
    let capped = nlb_with_listener(&capped_dir, |config| config.limits.max_connections = 1).await;
    let mut capped_client = capped.client().await;
    register(
        &mut capped_client,
        instance(
            "limited",
            pb::ModuleType::Alb,
            "v1",
            &backend.addr.to_string(),
        ),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    let mut holding = TcpStream::connect(capped.listen[0]).await.unwrap();
    holding
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 8];
    within(holding.read_exact(&mut first)).await;
    assert!(
        exchange(capped.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_empty(),
        "over the global cap"
    );
    drop(holding);
    eventually("a slot frees up", Duration::from_secs(5), || async {
        tag(&exchange(capped.listen[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await) == "limited"
    })
    .await;
}
