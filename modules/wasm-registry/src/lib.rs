//! MarchProxy's wasm-registry module (spec/wasm-registry.md): Propeller proplets ask over MQTT
//! for a WebAssembly module by image reference; the module pulls it from an OCI registry
//! ([`registry`]), keeps it on disk by digest ([`cache`]) and publishes it as base64 chunks on
//! the channel's server topic, in index order. Requests for a reference already being served
//! share that one fetch and publication (chunks are broadcast); a bounded number of fetches run
//! at once and the rest wait their turn. Failures are published as `{"app_name", "error"}`.
//!
//! `GET /health` and `GET /metrics` answer on `PROXY_HTTP_PORT`; ModuleService, registration
//! as `MODULE_TYPE_WASM_REGISTRY` and the admin server are the runtime's. [`run`] is the
//! binary's entry point.

pub mod cache;
pub mod config;
pub mod reference;
pub mod registry;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, routing::get};
use base64::Engine;
use hyper::body::Bytes;
use marchproxy::{names::ModuleKind, pb};
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::{
    cache::Cache,
    config::{Cli, ProxyArgs, TopicStyle},
    reference::{Reference, Version},
};

/// What operators graph.
pub struct Metrics {
    pub requests: IntCounter,
    pub cache_hits: IntCounter,
    pub bytes_pulled: IntCounter,
    pub chunks_published: IntCounter,
    pub failures: IntCounterVec,
    pub coalesced: IntCounter,
    pub malformed: IntCounter,
    pub fetch_seconds: Histogram,
}

impl Metrics {
    fn new(labelled: impl Fn(Opts) -> Opts) -> Self {
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(labelled(Opts::new(name, help)))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        Metrics {
            requests: counter(
                "wasm_registry_requests_total",
                "Module requests from proplets",
            ),
            cache_hits: counter(
                "wasm_registry_cache_hits_total",
                "Requests served from the disk cache",
            ),
            bytes_pulled: counter(
                "wasm_registry_bytes_pulled_total",
                "Module bytes pulled from registries",
            ),
            chunks_published: counter(
                "wasm_registry_chunks_published_total",
                "Chunks published to proplets",
            ),
            failures: IntCounterVec::new(
                labelled(Opts::new(
                    "wasm_registry_failures_total",
                    "Requests answered with an error object, by reason",
                )),
                &["reason"],
            )
            .unwrap_or_else(|e| panic!("metric wasm_registry_failures_total: {e}")),
            coalesced: counter(
                "wasm_registry_coalesced_total",
                "Requests for a reference already being served (they share its publication)",
            ),
            malformed: counter(
                "wasm_registry_malformed_total",
                "Requests that were not JSON with a string app_name",
            ),
            fetch_seconds: Histogram::with_opts(HistogramOpts {
                common_opts: labelled(Opts::new(
                    "wasm_registry_fetch_duration_seconds",
                    "Time to pull a module from its registry",
                )),
                buckets: vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            })
            .unwrap_or_else(|e| panic!("metric wasm_registry_fetch_duration_seconds: {e}")),
        }
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.cache_hits.clone()))?;
        registry.register(Box::new(self.bytes_pulled.clone()))?;
        registry.register(Box::new(self.chunks_published.clone()))?;
        registry.register(Box::new(self.failures.clone()))?;
        registry.register(Box::new(self.coalesced.clone()))?;
        registry.register(Box::new(self.malformed.clone()))?;
        registry.register(Box::new(self.fetch_seconds.clone()))
    }
}

/// The request topics to subscribe to.
pub fn request_topics(domain: &str, channel: &str, style: TopicStyle) -> Vec<String> {
    let current = format!("m/{domain}/c/{channel}/registry/proplet");
    let messages = format!("m/{domain}/c/{channel}/messages/registry/proplet");
    match style {
        TopicStyle::Current => vec![current],
        TopicStyle::Messages => vec![messages],
        TopicStyle::Both => vec![current, messages],
    }
}

/// The server topic answering a request topic (same form).
fn server_topic(request_topic: &str) -> String {
    match request_topic.strip_suffix("/proplet") {
        Some(base) => format!("{base}/server"),
        None => request_topic.to_owned(),
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn mqtt_options(args: &ProxyArgs, default_id: &str) -> Result<MqttOptions, String> {
    let address = &args.mqtt_address;
    let (tls, rest) = [
        ("tcp://", false),
        ("mqtt://", false),
        ("ssl://", true),
        ("mqtts://", true),
    ]
    .iter()
    .find_map(|(scheme, tls)| address.strip_prefix(scheme).map(|rest| (*tls, rest)))
    .ok_or_else(|| {
        format!(
            "PROXY_MQTT_ADDRESS `{address}` must start with tcp://, mqtt://, ssl:// or mqtts://"
        )
    })?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("PROXY_MQTT_ADDRESS: `{port}` is not a port"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| default_id.to_owned());
    let mut options = MqttOptions::new(&client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20);
    if let Some(key) = &args.client_key {
        options.set_credentials(client_id, key.clone());
    }
    if tls {
        options.set_transport(Transport::tls_with_default_config());
    }
    Ok(options)
}

#[derive(Deserialize)]
struct Request {
    app_name: String,
}

/// The module.
pub struct WasmRegistry {
    args: ProxyArgs,
    registry: registry::Registry,
    cache: Cache,
    metrics: Arc<Metrics>,
    /// References being served now: a second request for one shares its publication.
    serving: Mutex<HashSet<String>>,
    fetches: Semaphore,
    instance_id: String,
}

impl WasmRegistry {
    pub fn new(args: ProxyArgs, instance_id: &str) -> anyhow::Result<Arc<Self>> {
        let credentials = args.authenticate.then(|| registry::Credentials {
            host: args.registry_url.as_deref().map(|url| {
                url.trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned()
            }),
            username: args.registry_username.clone(),
            password: args.registry_password.clone(),
            token: args.registry_token.clone(),
        });
        let registry = registry::Registry::new(
            args.insecure_registries.clone(),
            credentials,
            args.max_module_bytes,
        )?;
        let cache = Cache::open(&args.cache_dir, args.cache_max_bytes)?;
        let metrics = Arc::new(Metrics::new(|opts| {
            opts.const_label("module_type", ModuleKind::WasmRegistry.name())
                .const_label("instance", instance_id)
        }));
        Ok(Arc::new(WasmRegistry {
            fetches: Semaphore::new(args.max_fetches.max(1)),
            args,
            registry,
            cache,
            metrics,
            serving: Mutex::new(HashSet::new()),
            instance_id: instance_id.to_owned(),
        }))
    }

    /// The module `app_name` names: from the cache when fresh, else from its registry (a
    /// stale cached copy when the registry cannot be reached).
    async fn resolve(&self, app_name: &str) -> Result<(String, Bytes), String> {
        let reference: Reference = app_name.parse()?;
        let fresh = match reference.version {
            Version::Digest(_) => None,
            Version::Tag(_) => Some(self.args.tag_ttl),
        };
        if let Some(hit) = self.cache.lookup(app_name, fresh) {
            self.metrics.cache_hits.inc();
            return Ok(hit);
        }
        let started = Instant::now();
        match self.registry.fetch(&reference).await {
            Ok(module) => {
                self.metrics
                    .fetch_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.bytes_pulled.inc_by(module.bytes.len() as u64);
                info!(%reference, digest = %module.digest, bytes = module.bytes.len(), elapsed_ms = started.elapsed().as_millis() as u64, "module pulled");
                self.cache.store(app_name, &module.digest, &module.bytes);
                Ok((module.digest, module.bytes))
            }
            Err(error) => match self.cache.lookup(app_name, None) {
                Some(stale)
                    if matches!(
                        error,
                        registry::FetchError::Unreachable(_) | registry::FetchError::Status(_)
                    ) =>
                {
                    warn!(%reference, %error, "registry unavailable; serving the cached module");
                    self.cache.refresh(app_name);
                    self.metrics.cache_hits.inc();
                    Ok(stale)
                }
                _ => Err(error.to_string()),
            },
        }
    }

    /// Serves one request: resolves, then publishes the chunks or an error object.
    async fn serve_request(self: Arc<Self>, client: AsyncClient, topic: String, app_name: String) {
        let _turn = self.fetches.acquire().await;
        let server = server_topic(&topic);
        let qos = qos(self.args.mqtt_qos);
        match self.resolve(&app_name).await {
            Ok((digest, bytes)) if !bytes.is_empty() => {
                let total = bytes.len().div_ceil(self.args.chunk_size);
                for (index, chunk) in bytes.chunks(self.args.chunk_size).enumerate() {
                    let payload = json!({
                        "app_name": app_name,
                        "chunk_idx": index,
                        "total_chunks": total,
                        "data": base64::engine::general_purpose::STANDARD.encode(chunk),
                        "digest": digest,
                        "size": bytes.len(),
                    })
                    .to_string();
                    if let Err(error) = client.publish(&server, qos, false, payload).await {
                        warn!(%app_name, %error, chunk = index, "chunk not published (the MQTT client stopped)");
                        break;
                    }
                    self.metrics.chunks_published.inc();
                }
                info!(%app_name, %digest, chunks = total, topic = %server, "module published");
            }
            Ok(_) => {
                self.fail(&client, &server, &app_name, "empty", "the module is empty")
                    .await
            }
            Err(error) => {
                self.fail(&client, &server, &app_name, "fetch", &error)
                    .await
            }
        }
        if let Ok(mut serving) = self.serving.lock() {
            serving.remove(&app_name);
        }
    }

    async fn fail(
        &self,
        client: &AsyncClient,
        server: &str,
        app_name: &str,
        reason: &str,
        error: &str,
    ) {
        warn!(%app_name, %error, "request failed; publishing an error object");
        self.metrics.failures.with_label_values(&[reason]).inc();
        let payload = json!({"app_name": app_name, "error": error}).to_string();
        if let Err(error) = client
            .publish(server, qos(self.args.mqtt_qos), false, payload)
            .await
        {
            warn!(%app_name, %error, "error object not published");
        }
    }

    /// A request as it arrived: bad ones are logged and dropped, duplicates share the one
    /// being served.
    fn request(self: &Arc<Self>, client: &AsyncClient, topic: String, payload: &[u8]) {
        self.metrics.requests.inc();
        let Ok(Request { app_name }) = serde_json::from_slice::<Request>(payload) else {
            self.metrics.malformed.inc();
            warn!(%topic, bytes = payload.len(), "request is not JSON with a string app_name; dropped");
            return;
        };
        let first = self
            .serving
            .lock()
            .map(|mut serving| serving.insert(app_name.clone()))
            .unwrap_or(true);
        if !first {
            self.metrics.coalesced.inc();
            debug!(%app_name, "already being served; this request shares that publication");
            return;
        }
        tokio::spawn(Arc::clone(self).serve_request(client.clone(), topic, app_name));
    }

    /// The MQTT side until `stop` completes: subscribe (again after each reconnect), dispatch.
    async fn mqtt(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let options = match mqtt_options(&self.args, &format!("wasm-registry-{}", self.instance_id))
        {
            Ok(options) => options,
            Err(error) => {
                warn!(%error, "MQTT not started");
                return;
            }
        };
        let (client, mut events) = AsyncClient::new(options, 1024);
        let topics = request_topics(
            self.args.domain_id.as_deref().unwrap_or_default(),
            self.args.channel_id.as_deref().unwrap_or_default(),
            self.args.topic_style,
        );
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(200);
        loop {
            let event = tokio::select! {
                event = events.poll() => event,
                () = &mut stop => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    info!(broker = %self.args.mqtt_address, topics = ?topics, "MQTT connected; subscribing");
                    let (client, topics, qos) =
                        (client.clone(), topics.clone(), qos(self.args.mqtt_qos));
                    // The request queue is drained by this very loop: subscribe from another task.
                    tokio::spawn(async move {
                        for topic in topics {
                            if let Err(error) = client.subscribe(topic, qos).await {
                                warn!(%error, "MQTT subscribe not sent");
                            }
                        }
                    });
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    self.request(&client, publish.topic.clone(), &publish.payload);
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(broker = %self.args.mqtt_address, %error, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut stop => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let _ = client.try_disconnect();
    }
}

#[tonic::async_trait]
impl Module for WasmRegistry {
    fn kind(&self) -> ModuleKind {
        ModuleKind::WasmRegistry
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Tcp]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        self.metrics.register(&plane.stats.module_registry)?;
        let mut stopping = plane.stopping.clone();
        let mqtt = tokio::spawn(Arc::clone(&self).mqtt(async move { stopping.wait().await }));
        let stats = Arc::clone(&plane.stats);
        let router = Router::new()
            .route(
                "/health",
                get(|| async { Json(json!({"status": "ok", "service": "proxy"})) }),
            )
            .route(
                "/metrics",
                get(move || {
                    let stats = Arc::clone(&stats);
                    async move {
                        marchproxy::admin::render(&stats.registry)
                            + &marchproxy::admin::render(&stats.module_registry)
                    }
                }),
            );
        let served = marchproxy_runtime::http::serve(plane, router).await;
        let _ = mqtt.await;
        served
    }

    fn custom_stats(&self) -> HashMap<String, String> {
        let m = &self.metrics;
        let failures: u64 = ["fetch", "empty"]
            .iter()
            .map(|r| m.failures.with_label_values(&[r]).get())
            .sum();
        HashMap::from([
            ("requests".to_owned(), m.requests.get().to_string()),
            ("cache_hits".to_owned(), m.cache_hits.get().to_string()),
            ("bytes_pulled".to_owned(), m.bytes_pulled.get().to_string()),
            (
                "chunks_published".to_owned(),
                m.chunks_published.get().to_string(),
            ),
            ("failures".to_owned(), failures.to_string()),
        ])
    }
}

/// The binary: the module on the runtime.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = cli.proxy.resolve().map_err(anyhow::Error::msg)?;
    let mut common = cli.common;
    if common.listen.is_empty() {
        common.listen = vec![format!("0.0.0.0:{}", args.http_port)];
    }
    let config = RuntimeConfig::from_args(ModuleKind::WasmRegistry, common)?;
    marchproxy::telemetry::init(config.log_format);
    mqtt_options(&args, "check").map_err(anyhow::Error::msg)?;
    let module = WasmRegistry::new(args, &config.instance_id)?;
    marchproxy_runtime::run(module, config, marchproxy::signal::shutdown()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(
            request_topics("d1", "c1", TopicStyle::Both),
            [
                "m/d1/c/c1/registry/proplet",
                "m/d1/c/c1/messages/registry/proplet"
            ]
        );
        assert_eq!(
            server_topic("m/d1/c/c1/messages/registry/proplet"),
            "m/d1/c/c1/messages/registry/server"
        );
    }
}
