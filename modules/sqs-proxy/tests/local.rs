//! The SQS proxy with its durable local queue, as the binary operators run: the HTTP contract
//! of spec/sqs-proxy.md, bad input, the puller, a `kill -9` under load, and regions routed
//! through a real NLB.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Proxy, Puller, send, start_load};
use marchproxy::pb;
use marchproxy_sqs_proxy::{config::SinkArgs, local::LocalQueue, puller, queue::Queue};
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
    let queue = LocalQueue::open(&queue_dir).unwrap();
    assert_eq!(queue.depth(), (0, 0), "every handled message was deleted");
    assert!(!first_id.is_empty());
}
