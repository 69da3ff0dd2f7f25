//! The wasm-registry binary between a real OCI registry (Debian `docker-registry`, modules
//! pushed with ORAS) and a real Mosquitto broker, with an MQTT client behaving like a Propeller
//! proplet: it asks on the proplet topic and reassembles the chunks from the server topic.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use marchproxy_testkit::{
    eventually,
    external::{Mosquitto, OciRegistry, Process, free_port},
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sha2::Digest;

const DEADLINE: Duration = Duration::from_secs(60);
const CHUNK: usize = 100_000;
/// The topics of today's proplets; older ones put `messages/` before `registry`.
const TOPICS: &str = "m/d1/c/c1/registry";
const OLDER_TOPICS: &str = "m/d1/c/c1/messages/registry";

struct Service {
    http: SocketAddr,
    log: std::path::PathBuf,
    _process: Process,
}

impl Service {
    async fn start(dir: &std::path::Path, broker: &Mosquitto, extra: &[(&str, &str)]) -> Service {
        let [http, grpc, admin] = [(); 3].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let log = dir.join("service.log");
        let mut process = Process::spawn(
            "marchproxy-wasm-registry",
            Command::new(env!("CARGO_BIN_EXE_marchproxy-wasm-registry"))
                .arg("--listen")
                .arg(http.to_string())
                .arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string())
                .env(
                    "PROXY_MQTT_ADDRESS",
                    format!("tcp://127.0.0.1:{}", broker.port),
                )
                .env("PROXY_DOMAIN_ID", "d1")
                .env("PROXY_CHANNEL_ID", "c1")
                .env("PROXY_CHUNK_SIZE", CHUNK.to_string())
                .env("PROXY_CACHE_DIR", dir.join("cache"))
                .env("RUST_LOG", "info")
                .envs(extra.iter().copied())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        process.wait_listening(http, DEADLINE, &log).await;
        let service = Service {
            http,
            log,
            _process: process,
        };
        eventually("the service subscribed", DEADLINE, || async {
            service.log().contains("MQTT subscribed")
        })
        .await;
        service
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metric(&self, name: &str) -> f64 {
        marchproxy_testkit::metric(self.http, name, "").await
    }
}

/// A proplet: everything published on the server topic, in arrival order.
struct Proplet {
    client: AsyncClient,
    requests: String,
    received: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Proplet {
    async fn connect(broker: &Mosquitto, name: &str) -> Proplet {
        Proplet::connect_on(broker, name, TOPICS).await
    }

    /// Connects at QoS 2 (the spec's default) to the `proplet`/`server` topics under `topics`.
    async fn connect_on(broker: &Mosquitto, name: &str, topics: &str) -> Proplet {
        let mut options = MqttOptions::new(name, "127.0.0.1", broker.port);
        options.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut events) = AsyncClient::new(options, 64);
        client
            .subscribe(format!("{topics}/server"), QoS::ExactlyOnce)
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (recorded, subscribed) = (Arc::clone(&received), Arc::new(tokio::sync::Notify::new()));
        let ready = Arc::clone(&subscribed);
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => ready.notify_one(),
                    Event::Incoming(Packet::Publish(p)) => {
                        if let Ok(json) = serde_json::from_slice(&p.payload) {
                            recorded.lock().unwrap().push(json);
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed.notified())
            .await
            .expect("the proplet subscribed");
        Proplet {
            client,
            requests: format!("{topics}/proplet"),
            received,
        }
    }

    async fn ask(&self, payload: &str) {
        self.client
            .publish(
                &self.requests,
                QoS::ExactlyOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .unwrap();
    }

    /// The chunks of `app_name` received so far, by index.
    fn chunks(&self, app_name: &str) -> BTreeMap<u64, serde_json::Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m["app_name"] == app_name && m.get("chunk_idx").is_some())
            .map(|m| (m["chunk_idx"].as_u64().unwrap(), m.clone()))
            .collect()
    }

    fn errors(&self, app_name: &str) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m["app_name"] == app_name)
            .filter_map(|m| m["error"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits for every chunk of `app_name` and reassembles the module, checking the framing.
    async fn module(&self, app_name: &str) -> Vec<u8> {
        eventually(&format!("all chunks of {app_name}"), DEADLINE, || {
            let chunks = self.chunks(app_name);
            async move {
                chunks
                    .values()
                    .next()
                    .and_then(|c| c["total_chunks"].as_u64())
                    .is_some_and(|total| chunks.len() as u64 == total)
            }
        })
        .await;
        let chunks = self.chunks(app_name);
        let total = chunks.len();
        let mut module = Vec::new();
        for (index, chunk) in &chunks {
            let data = base64::engine::general_purpose::STANDARD
                .decode(chunk["data"].as_str().unwrap())
                .expect("standard base64 with padding");
            if (*index as usize) < total - 1 {
                assert_eq!(data.len(), CHUNK, "chunk {index} is full size");
            }
            module.extend(data);
        }
        let size = chunks[&0]["size"].as_u64().unwrap() as usize;
        assert_eq!(module.len(), size);
        assert_eq!(total, size.div_ceil(CHUNK));
        module
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

#[tokio::test]
async fn proplets_get_modules_from_the_registry_and_the_cache() {
    let broker = Mosquitto::start().await;
    let mut registry = OciRegistry::start(None).await;
    let small = random_bytes(1_000, 1);
    let large = random_bytes(3_000_000, 2);
    registry.push("demo/small.wasm:v1", &small);
    registry.push("demo/large.wasm:v2", &large);
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(dir.path(), &broker, &[]).await;
    let proplet = Proplet::connect(&broker, "proplet-1").await;
    let other = Proplet::connect(&broker, "proplet-2").await;

    let small_ref = format!("{}/demo/small.wasm:v1", registry.host());
    let large_ref = format!("{}/demo/large.wasm:v2", registry.host());
    proplet
        .ask(&format!(r#"{{"app_name": "{small_ref}"}}"#))
        .await;
    proplet
        .ask(&format!(r#"{{"app_name": "{large_ref}"}}"#))
        .await;
    other
        .ask(&format!(r#"{{"app_name": "{large_ref}"}}"#))
        .await;
    assert_eq!(proplet.module(&small_ref).await, small);
    assert_eq!(proplet.module(&large_ref).await, large);
    assert_eq!(
        other.module(&large_ref).await,
        large,
        "chunks are broadcast"
    );
    assert_eq!(
        service.metric("wasm_registry_coalesced_total").await,
        1.0,
        "the second request for the large module shared (or re-ran) the first one's publication"
    );
    assert_eq!(proplet.chunks(&small_ref)[&0]["total_chunks"], 1);
    let digest = proplet.chunks(&large_ref)[&0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(digest.starts_with("sha256:"));

    // A reference pinned by manifest digest (the manifest is the registry's bytes, hashed).
    let (status, manifest) = marchproxy_testkit::http_request(
        SocketAddr::from(([127, 0, 0, 1], registry.port)),
        "GET",
        "/v2/demo/small.wasm/manifests/v1",
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{manifest}");
    let pinned = format!(
        "{}/demo/small.wasm@sha256:{:x}",
        registry.host(),
        sha2::Sha256::digest(manifest.as_bytes())
    );
    proplet.ask(&format!(r#"{{"app_name": "{pinned}"}}"#)).await;
    assert_eq!(proplet.module(&pinned).await, small);

    // Garbage is ignored; the service carries on.
    proplet.ask("not json").await;
    proplet.ask(r#"{"app_name": 7}"#).await;
    let unknown = format!("{}/demo/missing.wasm:v1", registry.host());
    proplet
        .ask(&format!(r#"{{"app_name": "{unknown}"}}"#))
        .await;
    eventually("an error object for the unknown module", DEADLINE, || {
        let errors = proplet.errors(&unknown);
        async move { errors.iter().any(|e| e.contains("not found")) }
    })
    .await;
    assert_eq!(service.metric("wasm_registry_malformed_total").await, 2.0);

    // With the registry gone, a module asked for again comes from the cache.
    registry.stop();
    let late = Proplet::connect(&broker, "proplet-3").await;
    late.ask(&format!(r#"{{"app_name": "{large_ref}"}}"#)).await;
    assert_eq!(late.module(&large_ref).await, large);
    assert!(service.metric("wasm_registry_cache_hits_total").await >= 1.0);
    let (status, body) = marchproxy_testkit::http_get(service.http, "/health").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"service":"proxy","status":"ok"}"#)
    );
}

#[tokio::test]
async fn registry_credentials_and_a_broker_restart() {
    let mut broker = Mosquitto::start().await;
    let registry = OciRegistry::start(Some(("edge", "s3cret"))).await;
    let module = random_bytes(250_000, 3);
    registry.push("private/app.wasm:v1", &module);
    let reference = format!("{}/private/app.wasm:v1", registry.host());
    let ask = format!(r#"{{"app_name": "{reference}"}}"#);

    let dir = tempfile::tempdir().unwrap();
    let without = Service::start(dir.path(), &broker, &[]).await;
    let proplet = Proplet::connect(&broker, "proplet-1").await;
    proplet.ask(&ask).await;
    eventually(
        "an error object saying credentials are needed",
        DEADLINE,
        || {
            let errors = proplet.errors(&reference);
            async move { errors.iter().any(|e| e.contains("PROXY_AUTHENTICATE")) }
        },
    )
    .await;
    drop(without);

    let host = registry.host();
    let service = Service::start(
        dir.path(),
        &broker,
        &[
            ("PROXY_TOPIC_STYLE", "both"),
            ("PROXY_AUTHENTICATE", "true"),
            ("PROXY_REGISTRY_URL", &host),
            ("PROXY_REGISTRY_USERNAME", "edge"),
            ("PROXY_REGISTRY_PASSWORD", "s3cret"),
        ],
    )
    .await;
    proplet.ask(&ask).await;
    assert_eq!(proplet.module(&reference).await, module);
    assert!(
        !service.log().contains("s3cret"),
        "the password is never logged"
    );

    // The broker restarts: the service reconnects and subscribes again, to both topic forms.
    broker.restart().await;
    eventually("the service subscribed again", DEADLINE, || async {
        service.log().matches("MQTT subscribed").count() >= 2
    })
    .await;
    let after = Proplet::connect_on(&broker, "proplet-after", OLDER_TOPICS).await;
    after.ask(&ask).await;
    assert_eq!(after.module(&reference).await, module);
}
