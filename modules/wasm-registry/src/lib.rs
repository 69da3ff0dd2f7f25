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
    collections::HashMap,
    ops::ControlFlow,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, routing::get};
use base64::Engine;
use hyper::body::Bytes;
use marchproxy::{names::ModuleKind, pb};
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter, Transport};
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
    /// The module cache's `wasm_registry_cache_*` series.
    pub cache: marchproxy_file_cache::CacheMetrics,
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
            cache: marchproxy_file_cache::CacheMetrics::new("wasm_registry", &labelled),
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
        registry.register(Box::new(self.fetch_seconds.clone()))?;
        self.cache.register(registry)
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
        .set_inflight(args.mqtt_inflight)
        .set_max_packet_size(16 << 20, 16 << 20);
    if let Some(key) = &args.client_key {
        options.set_credentials(client_id, key.clone());
    }
    let read = |path: &std::path::PathBuf, what: &str| {
        std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
    };
    let tls = tls || args.mqtt_tls_ca_cert.is_some();
    if tls {
        let client_auth = match (&args.mqtt_tls_client_cert, &args.mqtt_tls_client_key) {
            (Some(cert), Some(key)) => Some((
                read(cert, "PROXY_MQTT_TLS_CLIENT_CERT")?,
                read(key, "PROXY_MQTT_TLS_CLIENT_KEY")?,
            )),
            (None, None) => None,
            _ => {
                return Err(
                    "PROXY_MQTT_TLS_CLIENT_CERT and PROXY_MQTT_TLS_CLIENT_KEY go together".into(),
                );
            }
        };
        let transport = match &args.mqtt_tls_ca_cert {
            Some(ca) => Transport::tls(read(ca, "PROXY_MQTT_TLS_CA_CERT")?, client_auth, None),
            None if client_auth.is_some() => {
                return Err("a client certificate needs PROXY_MQTT_TLS_CA_CERT too".into());
            }
            None => Transport::tls_with_default_config(),
        };
        options.set_transport(transport);
    }
    Ok(options)
}

/// Where a publication stands.
#[derive(Clone, Copy, Debug, Default)]
struct Publication {
    /// The first chunk went out: a new requester missed it.
    started: bool,
    /// Someone asked after it started: publish the module once more when done.
    again: bool,
}

/// Registry hosts as references resolve them (`docker.io` is `registry-1.docker.io`).
fn registry_host(url: &str) -> String {
    let host = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    match host {
        "docker.io" | "index.docker.io" => "registry-1.docker.io".to_owned(),
        other => other.to_owned(),
    }
}

#[derive(Deserialize)]
struct Request {
    app_name: String,
}

/// The module.
pub struct WasmRegistry {
    args: ProxyArgs,
    registry: registry::Registry,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// Publications under way, by (server topic, reference): a request arriving before the
    /// first chunk went out shares it; one arriving later marks it to be published once more.
    serving: Mutex<HashMap<(String, String), Publication>>,
    fetches: Semaphore,
    instance_id: String,
}

impl WasmRegistry {
    pub fn new(args: ProxyArgs, instance_id: &str) -> anyhow::Result<Arc<Self>> {
        let credentials = args.authenticate.then(|| registry::Credentials {
            host: args.registry_url.as_deref().map(registry_host),
            username: args.registry_username.clone(),
            password: args.registry_password.clone(),
            token: args.registry_token.clone(),
        });
        let registry = registry::Registry::new(
            args.insecure_registries.clone(),
            credentials,
            args.max_module_bytes,
        )?;
        let metrics = Arc::new(Metrics::new(|opts| {
            opts.const_label("module_type", ModuleKind::WasmRegistry.name())
                .const_label("instance", instance_id)
        }));
        let cache = Arc::new(Cache::open(
            &args.cache_dir,
            args.cache_max_bytes,
            metrics.cache.clone(),
        )?);
        Ok(Arc::new(WasmRegistry {
            fetches: Semaphore::new(args.max_fetches.max(1)),
            args,
            registry,
            cache,
            metrics,
            serving: Mutex::new(HashMap::new()),
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
        if let Some(hit) = self.cached(app_name, fresh).await {
            self.metrics.cache_hits.inc();
            return Ok(hit);
        }
        // Only pulls take a turn: cached modules never wait behind a slow registry.
        let _turn = self.fetches.acquire().await;
        let started = Instant::now();
        match self.registry.fetch(&reference).await {
            Ok(module) => {
                self.metrics
                    .fetch_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.bytes_pulled.inc_by(module.bytes.len() as u64);
                info!(%reference, digest = %module.digest, bytes = module.bytes.len(), elapsed_ms = started.elapsed().as_millis() as u64, "module pulled");
                let (cache, name, module_bytes, digest) = (
                    Arc::clone(&self.cache),
                    app_name.to_owned(),
                    module.bytes.clone(),
                    module.digest.clone(),
                );
                // Hashing and writing up to the module limit: off the async workers.
                let _ =
                    tokio::task::spawn_blocking(move || cache.store(&name, &digest, &module_bytes))
                        .await;
                Ok((module.digest, module.bytes))
            }
            Err(error) => match self.cached(app_name, None).await {
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

    /// The cached module for `app_name`, read and checked off the async workers.
    async fn cached(&self, app_name: &str, fresh: Option<Duration>) -> Option<(String, Bytes)> {
        let (cache, name) = (Arc::clone(&self.cache), app_name.to_owned());
        tokio::task::spawn_blocking(move || cache.lookup(&name, fresh))
            .await
            .ok()
            .flatten()
    }

    /// Serves one request: resolves, then publishes the chunks (again while someone asked
    /// after the first chunk went out) or an error object.
    async fn serve_request(self: Arc<Self>, client: AsyncClient, topic: String, app_name: String) {
        let server = server_topic(&topic);
        let key = (server.clone(), app_name.clone());
        let qos = qos(self.args.mqtt_qos);
        match self.resolve(&app_name).await {
            Ok((digest, bytes)) if !bytes.is_empty() => loop {
                self.update(&key, |p| {
                    *p = Publication {
                        started: true,
                        again: false,
                    }
                });
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
                    // Waits while the client's queue is full: at most its capacity is in memory.
                    if let Err(error) = client.publish(&server, qos, false, payload).await {
                        warn!(%app_name, %error, chunk = index, "chunk not published (the MQTT client stopped)");
                        break;
                    }
                    self.metrics.chunks_published.inc();
                }
                info!(%app_name, %digest, chunks = total, topic = %server, "module published");
                let again = self
                    .serving
                    .lock()
                    .map(|serving| serving.get(&key).is_some_and(|p| p.again))
                    .unwrap_or(false);
                if !again {
                    break;
                }
            },
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
            serving.remove(&key);
        }
    }

    fn update(&self, key: &(String, String), change: impl FnOnce(&mut Publication)) {
        if let Ok(mut serving) = self.serving.lock()
            && let Some(publication) = serving.get_mut(key)
        {
            change(publication);
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
        let key = (server_topic(&topic), app_name.clone());
        let first = match self.serving.lock() {
            Ok(mut serving) => match serving.get_mut(&key) {
                Some(publication) => {
                    publication.again |= publication.started;
                    false
                }
                None => {
                    serving.insert(key, Publication::default());
                    true
                }
            },
            Err(_) => true,
        };
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
        let (client, mut events) = AsyncClient::new(options, 64);
        events
            .network_options
            .set_connection_timeout(self.args.mqtt_timeout.as_secs().max(1));
        let topics = request_topics(
            self.args.domain_id.as_deref().unwrap_or_default(),
            self.args.channel_id.as_deref().unwrap_or_default(),
            self.args.topic_style,
        );
        let qos = qos(self.args.mqtt_qos);
        let filters: Vec<SubscribeFilter> = topics
            .into_iter()
            .map(|topic| SubscribeFilter::new(topic, qos))
            .collect();
        marchproxy_runtime::mqtt::drive(
            &client,
            &mut events,
            &self.args.mqtt_address,
            &filters,
            stop,
            |event| {
                if let Event::Incoming(Packet::Publish(publish)) = event {
                    self.request(&client, publish.topic.clone(), &publish.payload);
                }
                ControlFlow::Continue(())
            },
        )
        .await;
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

/// The binary's entry: runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, marchproxy::signal::shutdown()).await
}

/// The module on the runtime until `shutdown` completes (then it drains), as the binary does
/// until SIGINT or SIGTERM.
pub async fn run_until(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let args = cli.proxy.resolve().map_err(anyhow::Error::msg)?;
    let mut common = cli.common;
    if common.listen.is_empty() {
        common.listen = vec![format!("0.0.0.0:{}", args.http_port)];
    }
    let config = RuntimeConfig::from_args(ModuleKind::WasmRegistry, common)?;
    marchproxy::telemetry::init_with_default(config.log_format, &args.log_level);
    mqtt_options(&args, "check").map_err(anyhow::Error::msg)?;
    let module = WasmRegistry::new(args, &config.instance_id)?;
    marchproxy_runtime::run(module, config, shutdown).await?;
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
