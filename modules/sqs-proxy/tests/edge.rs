//! The MQTT face with a real Mosquitto broker and a real Redis: devices simulated by MQTT
//! clients with real last wills, readings batched into the queue, garbage counted and dropped,
//! one outage alert for a device that stays away and none for one that comes back in time,
//! and restarts of Redis and of the broker survived.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Proxy, Puller};
use marchproxy_sqs_proxy::wire::{Connect, Lwt, SensorData};
use marchproxy_testkit::{
    eventually,
    external::{Mosquitto, Redis},
};
use prost::Message;
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// A device: an MQTT connection with its last will, announced on `connect`.
struct Device {
    client: AsyncClient,
    events: JoinHandle<()>,
}

impl Device {
    async fn connect(broker: &Mosquitto, name: &str, delay: i64) -> Device {
        let mut options = MqttOptions::new(format!("device-{name}"), "127.0.0.1", broker.port);
        let will = Lwt {
            device: name.into(),
            delay,
        }
        .encode_to_vec();
        options.set_last_will(LastWill::new("lwt", will, QoS::AtLeastOnce, false));
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 64);
        let events = tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let hello = Connect {
            device: name.into(),
        }
        .encode_to_vec();
        client
            .publish("connect", QoS::AtLeastOnce, false, hello)
            .await
            .unwrap();
        Device { client, events }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Drops the connection without DISCONNECT: the broker publishes the last will.
    fn vanish(self) {
        self.events.abort();
    }
}

/// A webhook that records every POST body.
async fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&bodies);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(read) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..read]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    if let Ok(json) = serde_json::from_str(body) {
                        recorded.lock().unwrap().push(json);
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
            });
        }
    });
    (url, bodies)
}

fn alerted(bodies: &Mutex<Vec<serde_json::Value>>) -> Vec<String> {
    bodies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn devices_readings_outages_and_a_redis_restart() {
    let mut broker = Mosquitto::start().await;
    let mut redis = Redis::start().await;
    let (hook, alerts) = webhook().await;
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("queue");
    let batches = dir.path().join("batches");
    let sink = format!("cat >> {0}; echo >> {0}", batches.display());
    let mut proxy = Proxy::start(
        dir.path(),
        &[
            "--queue-dir",
            queue_dir.to_str().unwrap(),
            "--mqtt-url",
            &broker.url(),
            "--redis-url",
            &redis.url(),
            "--alert-webhook",
            &hook,
            "--alert-window",
            "500ms",
            "--data-batch-min",
            "5",
            "--data-batch-max",
            "10",
            "--data-batch-wait",
            "2s",
            "--pull",
            "--sink-command",
            &sink,
            "--pull-wait",
            "1s",
        ],
        &[],
    )
    .await;
    eventually(
        "the proxy subscribed (the broker has its session)",
        DEADLINE,
        || async { proxy.log().contains("MQTT connected") },
    )
    .await;

    // Two devices drop; one comes back within its delay.
    let gone = Device::connect(&broker, "gone", 1).await;
    let back = Device::connect(&broker, "back", 5).await;
    eventually("both devices online in Redis", DEADLINE, || async {
        redis.cli(&["EXISTS", "gone"]) == "1" && redis.cli(&["EXISTS", "back"]) == "1"
    })
    .await;
    gone.vanish();
    back.vanish();
    eventually("both in their grace period", DEADLINE, || async {
        redis.cli(&["TTL", "back"]).parse::<i64>().unwrap_or(-2) > 0
            && redis.cli(&["SISMEMBER", "marchproxy:leaving", "gone"]) == "1"
    })
    .await;
    let back = Device::connect(&broker, "back", 5).await;
    eventually(
        "`back` is online again with no expiry",
        DEADLINE,
        || async { redis.cli(&["TTL", "back"]) == "-1" },
    )
    .await;

    eventually("one alert names `gone`", DEADLINE, || {
        let alerted = alerted(&alerts);
        async move { alerted == ["gone"] }
    })
    .await;
    let first = alerts.lock().unwrap()[0].clone();
    assert_eq!(
        first["text"],
        "The following device(s) have shut down: gone"
    );
    assert_eq!(
        redis.cli(&["SMEMBERS", "marchproxy:leaving"]),
        "",
        "nothing else pending"
    );
    assert_eq!(proxy.metric("sqs_proxy_outages_total", "").await, 1.0);
    let (status, devices) = marchproxy_testkit::http_get(proxy.data, "/devices").await;
    assert_eq!(status, 200);
    let devices: serde_json::Value = serde_json::from_str(&devices).unwrap();
    let state = |name: &str| {
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == name)
            .map(|d| d["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state("gone").as_deref(), Some("offline"));
    assert_eq!(state("back").as_deref(), Some("online"));

    // Readings arrive in batches; garbage is counted and dropped.
    let sensor = Device::connect(&broker, "sensor", 30).await;
    for n in 0..25 {
        let reading = SensorData {
            device: "sensor".into(),
            temp: 20.0 + n as f32,
            rh: 50.0,
            epoch: 1_700_000_000 + n,
        };
        sensor.publish("data/sensor", reading.encode_to_vec()).await;
    }
    sensor
        .publish("data/sensor", b"\xff\xfe not protobuf".to_vec())
        .await;
    sensor
        .publish("connect", b"{\"no\": \"device\"}".to_vec())
        .await;
    let reserved = Connect {
        device: "marchproxy:leaving".into(),
    };
    sensor.publish("connect", reserved.encode_to_vec()).await;
    eventually("all 25 readings reached the queue", DEADLINE, || {
        let text = std::fs::read_to_string(&batches).unwrap_or_default();
        async move {
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|b| b["messages"].as_array().map_or(0, Vec::len))
                .sum::<usize>()
                == 25
        }
    })
    .await;
    let queued: Vec<serde_json::Value> = std::fs::read_to_string(&batches)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        queued.iter().all(
            |b| b["topic"] == "data/sensor" && (1..=10).contains(&b["count"].as_u64().unwrap())
        ),
        "{queued:?}"
    );
    assert!(
        queued.iter().any(|b| b["count"].as_u64().unwrap() >= 5),
        "readings were batched: {queued:?}"
    );
    assert_eq!(queued[0]["messages"][0]["device"], "sensor");
    for (topic, count) in [("data/sensor", 1.0), ("connect", 2.0)] {
        let labels = format!("topic=\"{topic}\"");
        eventually(&format!("garbage on {topic} counted"), DEADLINE, || async {
            proxy.metric("sqs_proxy_decode_errors_total", &labels).await == count
        })
        .await;
    }

    // Redis comes back empty: presence and outage detection carry on.
    redis.restart().await;
    eventually("the expiry listener is back", DEADLINE, || async {
        proxy.log().matches("listening for expired devices").count() >= 2
    })
    .await;
    let late = Device::connect(&broker, "late", 1).await;
    eventually("`late` is online in the new Redis", DEADLINE, || async {
        redis.cli(&["EXISTS", "late"]) == "1"
    })
    .await;
    late.vanish();
    eventually("an alert names `late`", DEADLINE, || {
        let alerted = alerted(&alerts);
        async move { alerted == ["gone", "late"] }
    })
    .await;

    // The broker comes back without sessions: the proxy reconnects and subscribes again.
    drop((back, sensor));
    broker.restart().await;
    eventually("the proxy subscribed again", DEADLINE, || async {
        proxy.log().matches("MQTT connected").count() >= 2
    })
    .await;
    let after = Device::connect(&broker, "after", 30).await;
    let reading = SensorData {
        device: "after".into(),
        ..Default::default()
    };
    after.publish("data/sensor", reading.encode_to_vec()).await;
    eventually(
        "a reading after the broker restart reached the queue",
        DEADLINE,
        || {
            let text = std::fs::read_to_string(&batches).unwrap_or_default();
            async move { text.contains("\"device\":\"after\"") }
        },
    )
    .await;

    drop(after);
    assert_eq!(proxy.stop().code(), Some(0));
    let lwt_dir = queue_dir.join("lwt");
    let mut puller = Puller::start(&["--queue-dir", lwt_dir.to_str().unwrap()], &[]);
    eventually("two outage events in the lwt queue", DEADLINE, || {
        let lines = puller.lines.lock().unwrap().len();
        async move { lines == 2 }
    })
    .await;
    puller.stop();
    let left = marchproxy_sqs_proxy::local::LocalQueue::open(&lwt_dir, Default::default())
        .unwrap()
        .depth();
    assert_eq!(left, (0, 0), "no third outage event");
    let events: Vec<serde_json::Value> = puller
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "outage");
    assert_eq!(
        events
            .iter()
            .map(|e| e["device"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["gone", "late"]
    );
}

/// `--queue redis`: a list per topic, one element per message; the puller drains `send`
/// through `send:processing`, and what it kept after a failure is back for the next puller.
#[tokio::test]
async fn redis_lists_hold_each_topic() {
    let broker = Mosquitto::start().await;
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let redis_url = redis.url();
    let mut proxy = Proxy::start(
        dir.path(),
        &[
            "--queue",
            "redis",
            "--redis-url",
            &redis_url,
            "--mqtt-url",
            &broker.url(),
            "--data-batch-min",
            "5",
            "--data-batch-max",
            "5",
        ],
        &[],
    )
    .await;
    for body in [r#"{"n":1}"#, r#"{"n":"poison"}"#, r#"{"n":2}"#] {
        let (status, answer) = common::send(proxy.data, body).await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(
        redis.cli(&["LRANGE", "marchproxy:queue:send", "0", "-1"]),
        "{\"n\":1}\n{\"n\":\"poison\"}\n{\"n\":2}"
    );
    eventually("the proxy subscribed", DEADLINE, || async {
        proxy.log().contains("MQTT connected")
    })
    .await;
    let sensor = Device::connect(&broker, "sensor", 30).await;
    for epoch in 0..5 {
        let reading = SensorData {
            device: "sensor".into(),
            epoch,
            ..Default::default()
        };
        sensor.publish("data/sensor", reading.encode_to_vec()).await;
    }
    eventually(
        "one batch of five in the data/sensor list",
        DEADLINE,
        || async { redis.cli(&["LLEN", "marchproxy:queue:data/sensor"]) == "1" },
    )
    .await;
    let batch: serde_json::Value =
        serde_json::from_str(&redis.cli(&["LINDEX", "marchproxy:queue:data/sensor", "0"])).unwrap();
    assert_eq!(batch["count"], 5);
    drop(sensor);
    assert_eq!(proxy.stop().code(), Some(0));

    let taken = dir.path().join("taken");
    let sink = format!(
        r#"body=$(cat); case "$body" in *poison*) exit 3;; esac; printf '%s\n' "$body" >> {}"#,
        taken.display()
    );
    let queue = ["--queue", "redis", "--redis-url", &redis_url];
    let keep = [("KEEP_FAILED_MESSAGES", "true")];
    let mut puller = Puller::start(
        &[&queue[..], &["--sink-command", &sink, "--pull-wait", "1s"]].concat(),
        &keep,
    );
    eventually(
        "the good ones taken, the poisoned one kept",
        DEADLINE,
        || async {
            std::fs::read_to_string(&taken).unwrap_or_default() == "{\"n\":1}\n{\"n\":2}\n"
                && redis.cli(&["LLEN", "marchproxy:queue:send"]) == "0"
                && redis.cli(&["LRANGE", "marchproxy:queue:send:processing", "0", "-1"])
                    == "{\"n\":\"poison\"}"
        },
    )
    .await;
    puller.stop();
    let mut next = Puller::start(&[&queue[..], &["--pull-wait", "1s"]].concat(), &[]);
    eventually("the next puller gets the kept message", DEADLINE, || {
        let lines = next.lines.lock().unwrap().clone();
        async move { lines == ["{\"n\":\"poison\"}"] }
    })
    .await;
    next.stop();
    assert_eq!(
        redis.cli(&["LLEN", "marchproxy:queue:send:processing"]),
        "0"
    );
}
