//! The SQS proxy with its durable local queue, as the binary operators run: the HTTP contract
//! of spec/sqs-proxy.md, bad input, the puller, a `kill -9` under load, and regions routed
//! through a real NLB.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Proxy, Puller, send, start_load};
use marchproxy::pb;
use marchproxy_sqs_proxy::{
    config::SinkArgs,
    local::{LocalQueue, LocalSettings},
    puller,
    queue::Queue,
};
use marchproxy_testkit::{eventually, http_request};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_http_contract_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("queue");
    let queue_arg = queue_dir.to_str().unwrap();
    let mut proxy = Proxy::start(
        dir.path(),
        &["--queue-dir", queue_arg, "--max-body", "2048"],
        &[],
    )
    .await;

    let (status, answer) = send(proxy.data, &common::reading(1)).await;
    assert_eq!(status, 200);
    let first_id = answer["message_id"]
        .as_str()
        .expect("a message id")
        .to_owned();

    let newer = json!({"hostname": "node-a", "job_submission_time": 200, "sequence": 2});
    let older = json!({"hostname": "node-a", "job_submission_time": 100, "sequence": 3});
    let same = json!({"hostname": "node-a", "job_submission_time": 200, "sequence": 4});
    assert_eq!(send(proxy.data, &newer.to_string()).await.0, 200);
    assert_eq!(
        send(proxy.data, &older.to_string()).await,
        (
            200,
            json!({"status": "filtered", "message": "Message filtered due to newer submission"})
        )
    );
    assert!(send(proxy.data, &same.to_string()).await.1["message_id"].is_string());

    assert_eq!(
        send(proxy.data, "{not json").await,
        (400, json!({"detail": "Invalid JSON"}))
    );
    let (status, answer) = send(proxy.data, "[1, 2]").await;
    assert_eq!(status, 400);
    assert!(answer["detail"].as_str().unwrap().contains("JSON object"));

    // `curl -d` sends a form content type; the original proxy took such bodies as JSON.
    let (status, body) = http_request(
        proxy.data,
        "POST",
        "/send",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        json!({"sequence": 5}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_request(
        proxy.data,
        "POST",
        "/send",
        &[("Content-Type", "multipart/form-data; boundary=x")],
        b"--x--",
    )
    .await;
    assert_eq!((status, body.contains("application/json")), (415, true));

    // Too large by its declared length: refused before the body is read.
    let mut stream = tokio::net::TcpStream::connect(proxy.data).await.unwrap();
    stream
        .write_all(b"POST /send HTTP/1.1\r\nHost: edge\r\nContent-Length: 999999999\r\n\r\n{")
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut head))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    // Too large without a declared length (chunked).
    let chunk = format!("{{\"pad\": \"{}\"}}", "x".repeat(3000));
    let chunked = format!(
        "POST /send HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let mut stream = tokio::net::TcpStream::connect(proxy.data).await.unwrap();
    stream.write_all(chunked.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    assert_eq!(
        marchproxy_testkit::http_get(proxy.data, "/health").await,
        (200, json!({"status": "healthy"}).to_string())
    );
    assert_eq!(
        marchproxy_testkit::http_get(proxy.data, "/elsewhere")
            .await
            .0,
        404
    );

    assert_eq!(proxy.metric("sqs_proxy_received_total", "").await, 10.0);
    assert_eq!(proxy.metric("sqs_proxy_queued_total", "").await, 4.0);
    assert_eq!(proxy.metric("sqs_proxy_filtered_total", "").await, 1.0);
    for (reason, count) in [
        ("invalid_json", 1.0),
        ("not_an_object", 1.0),
        ("content_type", 1.0),
        ("too_large", 2.0),
        ("queue_unavailable", 0.0),
    ] {
        let labels = format!("reason=\"{reason}\"");
        assert_eq!(
            proxy.metric("sqs_proxy_rejected_total", &labels).await,
            count,
            "{reason}"
        );
    }
    assert_eq!(proxy.stop().code(), Some(0));

    // The puller drains what was queued (once the proxy let go of the directory).
    let mut puller = Puller::start(&["--queue-dir", queue_arg], &[]);
    eventually(
        "the puller printed the four queued readings",
        DEADLINE,
        || {
            let lines = puller.lines.lock().unwrap().len();
            async move { lines == 4 }
        },
    )
    .await;
    puller.stop();
    let printed = puller.lines.lock().unwrap().clone();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&printed[0]).unwrap(),
        serde_json::from_str::<serde_json::Value>(&common::reading(1)).unwrap()
    );
    assert_eq!(puller.sequences(), [1, 2, 4, 5].into());
    let queue = LocalQueue::open(&queue_dir, LocalSettings::default()).unwrap();
    assert_eq!(queue.depth(), (0, 0), "every handled message was deleted");
    assert!(!first_id.is_empty());
}

#[tokio::test]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("queue");
    let queue_arg = queue_dir.to_str().unwrap();
    let proxy = Proxy::start(dir.path(), &["--queue-dir", queue_arg], &[]).await;
    let (stop, stopping) = watch::channel(false);
    let (load, mut senders) = start_load(proxy.data, 8, stopping);
    eventually("300 readings acknowledged", DEADLINE, || {
        let acked = load.acked();
        async move { acked >= 300 }
    })
    .await;
    proxy.process.signal("KILL");
    eventually("the senders notice the proxy is gone", DEADLINE, || {
        let broken = load.broken.load(std::sync::atomic::Ordering::Relaxed);
        async move { broken > 0 }
    })
    .await;
    stop.send_replace(true);
    while let Some(sender) = senders.join_next().await {
        sender.expect("no sender saw an unexpected answer");
    }
    drop(proxy);

    let acked = load.acked.lock().unwrap().clone();
    let mut puller = Puller::start(&["--queue-dir", queue_arg], &[]);
    eventually(
        &format!(
            "the puller printed all {} acknowledged readings",
            acked.len()
        ),
        DEADLINE,
        || {
            let pulled = puller.sequences();
            let acked = &acked;
            async move { acked.is_subset(&pulled) }
        },
    )
    .await;
    puller.stop();
}

/// A sink command that takes every message except those containing `poison`, appending the
/// ones it takes to `file`.
fn picky_sink(file: &std::path::Path, keep_failed: bool) -> SinkArgs {
    SinkArgs {
        sink_command: Some(format!(
            r#"body=$(cat); case "$body" in *poison*) exit 3;; esac; printf '%s\n' "$body" >> {}"#,
            file.display()
        )),
        keep_failed_messages: keep_failed,
        visibility_timeout: Duration::from_secs(60),
        pull_wait: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn the_puller_keeps_or_deletes_what_its_sink_refused() {
    for keep_failed in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let queue = LocalQueue::open(&dir.path().join("queue"), LocalSettings::default()).unwrap();
        for body in [r#"{"n":1}"#, r#"{"n":"poison"}"#, r#"{"n":2}"#] {
            queue.send(body.to_owned()).await.unwrap();
        }
        let taken = dir.path().join("taken");
        let puller = puller::Puller::new(
            Arc::clone(&queue) as Arc<dyn Queue>,
            &picky_sink(&taken, keep_failed),
            None,
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(puller.run(async move {
            let _ = stopped.await;
        }));
        let settled = if keep_failed { (1, 1) } else { (0, 0) };
        eventually(
            &format!("keep_failed={keep_failed}: the good ones taken, the queue at {settled:?}"),
            DEADLINE,
            || {
                let depth = queue.depth();
                let taken = std::fs::read_to_string(&taken).unwrap_or_default();
                async move { depth == settled && taken == "{\"n\":1}\n{\"n\":2}\n" }
            },
        )
        .await;
        let _ = stop.send(());
        running.await.unwrap();
    }
}

/// Two regional proxies behind one NLB: each region's host name reaches its own proxy, and
/// the NLB lists each with its `region` label.
#[tokio::test]
async fn regions_are_routed_to_their_own_proxies_through_the_nlb() {
    let state = marchproxy_testkit::state_dir();
    let nlb = marchproxy_testkit::start_with(marchproxy_nlb::Config {
        state_dir: Some(state.path().to_owned()),
        listen: vec![marchproxy::listen::ListenSpec::parse("http=127.0.0.1:0").unwrap()],
        ..marchproxy_nlb::Config::local()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxies = Vec::new();
    for region in ["eu", "us"] {
        let file = dir.path().join(format!("{region}.toml"));
        std::fs::write(
            &file,
            format!(
                "[[routes]]\nroute_id = \"sensors-{region}\"\nprotocol = \"http\"\nsource_pattern = \"{region}.sensors.example\"\n"
            ),
        )
        .unwrap();
        let queue_dir = dir.path().join(format!("queue-{region}"));
        proxies.push(
            Proxy::start(
                dir.path(),
                &[
                    "--config",
                    file.to_str().unwrap(),
                    "--nlb",
                    &nlb.url(),
                    "--region",
                    region,
                    "--instance-id",
                    &format!("sqs-proxy-{region}"),
                    "--queue-dir",
                    queue_dir.to_str().unwrap(),
                    "--heartbeat-interval",
                    "1s",
                ],
                &[],
            )
            .await,
        );
    }
    let client = nlb.client().await;
    eventually(
        "both regional proxies registered and healthy",
        DEADLINE,
        || {
            let mut client = client.clone();
            async move {
                let listed = client
                    .list_modules(pb::ListModulesRequest::default())
                    .await
                    .map(|r| r.into_inner().modules)
                    .unwrap_or_default();
                ["eu", "us"].iter().all(|region| {
                    listed.iter().any(|m| {
                        m.module_type == pb::ModuleType::SqsProxy as i32
                            && m.metadata.get("region").map(String::as_str) == Some(region)
                            && m.health_status == pb::HealthStatus::Healthy as i32
                    })
                })
            }
        },
    )
    .await;

    let through_nlb = nlb.listen[0];
    for (region, count) in [("eu", 3), ("us", 1)] {
        for n in 0..count {
            let host = format!("{region}.sensors.example");
            let (status, body) = http_request(
                through_nlb,
                "POST",
                "/send",
                &[("Host", &host), ("Content-Type", "application/json")],
                common::reading(n).as_bytes(),
            )
            .await;
            assert_eq!(status, 200, "{region}: {body}");
        }
    }
    assert_eq!(proxies[0].metric("sqs_proxy_queued_total", "").await, 3.0);
    assert_eq!(proxies[1].metric("sqs_proxy_queued_total", "").await, 1.0);
}

/// `--pull` drains the local queue inside the proxy; the `module` section changes the filter
/// live over gRPC; the deep health check reports the queue.
#[tokio::test]
async fn in_process_puller_live_settings_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("queue");
    let taken = dir.path().join("taken");
    let sink = format!(r#"cat >> {}; echo >> {}"#, taken.display(), taken.display());
    let proxy = Proxy::start(
        dir.path(),
        &[
            "--queue-dir",
            queue_dir.to_str().unwrap(),
            "--pull",
            "--sink-command",
            &sink,
            "--pull-wait",
            "1s",
        ],
        &[],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::module_service_client::ModuleServiceClient::new(channel);

    let reading =
        |time: u64| json!({"hostname": "node-a", "job_submission_time": time}).to_string();
    assert!(send(proxy.data, &reading(200)).await.1["message_id"].is_string());
    assert_eq!(
        send(proxy.data, &reading(100)).await.1["status"],
        "filtered"
    );
    let update = |data: &str| pb::UpdateConfigRequest {
        config: Some(pb::ConfigUpdate {
            config_type: "module".into(),
            config_data: data.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let refused = client
        .update_config(update(r#"{"max_body_bytes": 0}"#))
        .await
        .unwrap_err();
    assert!(refused.message().contains("max_body_bytes"), "{refused:?}");
    assert!(
        client
            .update_config(update(r#"{"ordering_filter": false}"#))
            .await
            .unwrap()
            .into_inner()
            .success
    );
    assert!(send(proxy.data, &reading(100)).await.1["message_id"].is_string());

    eventually(
        "the in-process puller handed both queued readings to the sink",
        DEADLINE,
        || {
            let taken = std::fs::read_to_string(&taken).unwrap_or_default();
            async move { taken.lines().count() == 2 }
        },
    )
    .await;
    let handled = || proxy.metric("sqs_proxy_pulled_total", "outcome=\"handled\"");
    eventually("both counted as handled", DEADLINE, || async {
        handled().await == 2.0
    })
    .await;

    let health = client
        .health_check(pb::HealthCheckRequest {
            deep_check: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        pb::HealthStatus::Healthy as i32,
        "{health:?}"
    );
    assert!(
        health.checks["queue"].contains("0 messages pending"),
        "{health:?}"
    );
}
