//! The SQS proxy against a real SQS-compatible server (moto): messages reach the queue (in
//! batches under load), the puller receives and deletes them or keeps the ones its sink
//! refused, and a queue outage in the middle of a load loses nothing that was acknowledged.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{Proxy, Puller, borrowed, moto_env, send, start_load};
use marchproxy_testkit::{eventually, external::Moto};
use serde_json::json;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn messages_reach_sqs_and_the_puller_drains_them() {
    let moto = Moto::start().await;
    let queue = moto.create_queue("readings").await;
    let env = moto_env(&moto.endpoint(), &queue);
    let env = borrowed(&env);
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(dir.path(), &[], &env).await;

    let mut sending = tokio::task::JoinSet::new();
    for sequence in 0..40 {
        let addr = proxy.data;
        sending.spawn(async move { send(addr, &common::reading(sequence)).await });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(answer) = sending.join_next().await {
        let (status, body) = answer.unwrap();
        assert_eq!(status, 200, "{body}");
        ids.insert(body["message_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 40, "every message got its own queue id");
    let older = json!({"hostname": "node-3", "job_submission_time": 1, "sequence": 99});
    assert_eq!(
        send(proxy.data, &older.to_string()).await.1["status"],
        "filtered"
    );
    assert_eq!(moto.depth(&queue).await, (40, 0));
    assert_eq!(proxy.metric("sqs_proxy_queued_total", "").await, 40.0);
    assert_eq!(proxy.stop().code(), Some(0));

    let mut puller = Puller::start(&[], &env);
    eventually("the puller printed all 40 readings", DEADLINE, || {
        let pulled = puller.sequences();
        async move { pulled == (0..40).collect() }
    })
    .await;
    puller.stop();
    assert_eq!(
        moto.depth(&queue).await,
        (0, 0),
        "handled messages are deleted"
    );
}

fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_puller_keeps_failed_messages_only_when_asked() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (keep, left) in [("true", (0, 1)), ("false", (0, 0))] {
        let queue = moto.create_queue(&format!("keep-{keep}")).await;
        for body in [r#"{"n":1}"#, r#"{"n":"poison"}"#, r#"{"n":2}"#] {
            moto.call(&format!(
                "Action=SendMessage&QueueUrl={}&MessageBody={}",
                form_encode(&queue),
                form_encode(body)
            ))
            .await;
        }
        let taken = dir.path().join(format!("taken-{keep}"));
        let sink = format!(
            r#"body=$(cat); case "$body" in *poison*) exit 3;; esac; printf '%s\n' "$body" >> {}"#,
            taken.display()
        );
        let mut env = moto_env(&moto.endpoint(), &queue);
        env.push(("KEEP_FAILED_MESSAGES".into(), keep.into()));
        let mut puller = Puller::start(
            &[
                "--sink-command",
                &sink,
                "--visibility-timeout",
                "60s",
                "--pull-wait",
                "1s",
            ],
            &borrowed(&env),
        );
        eventually(
            &format!("KEEP_FAILED_MESSAGES={keep}: good ones taken, the queue holds {left:?} (visible, in flight)"),
            DEADLINE,
            || {
                let (moto, queue, taken) = (&moto, &queue, &taken);
                async move {
                    std::fs::read_to_string(taken).unwrap_or_default() == "{\"n\":1}\n{\"n\":2}\n"
                        && moto.depth(queue).await == left
                }
            },
        )
        .await;
        puller.stop();
    }
}

#[tokio::test]
async fn a_queue_outage_under_load_loses_nothing_acknowledged() {
    let moto = Moto::start().await;
    let queue = moto.create_queue("outage").await;
    let env = moto_env(&moto.endpoint(), &queue);
    let env = borrowed(&env);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(dir.path(), &["--queue-timeout", "1s"], &env).await;
    let (stop, stopping) = watch::channel(false);
    let (load, mut senders) = start_load(proxy.data, 8, stopping);
    eventually("100 readings acknowledged", DEADLINE, || {
        let acked = load.acked();
        async move { acked >= 100 }
    })
    .await;

    moto.process.signal("STOP");
    eventually(
        "senders are told the queue is unavailable (503)",
        DEADLINE,
        || {
            let refused = load.unavailable.load(Ordering::Relaxed);
            async move { refused >= 8 }
        },
    )
    .await;
    let before_recovery = load.acked();
    moto.process.signal("CONT");
    eventually("acknowledgements resume after the outage", DEADLINE, || {
        let acked = load.acked();
        async move { acked >= before_recovery + 100 }
    })
    .await;
    stop.send_replace(true);
    while let Some(sender) = senders.join_next().await {
        sender.expect("no sender saw an unexpected answer");
    }
    assert_eq!(
        load.broken.load(Ordering::Relaxed),
        0,
        "no connection broke"
    );
    assert!(
        proxy.log().contains("message not queued"),
        "the outage is logged"
    );

    let acked = load.acked.lock().unwrap().clone();
    let mut puller = Puller::start(&["--pull-wait", "1s"], &env);
    eventually(
        &format!("all {} acknowledged readings are in the queue", acked.len()),
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
