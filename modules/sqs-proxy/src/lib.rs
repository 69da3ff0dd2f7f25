//! MarchProxy's SQS proxy module (spec/sqs-proxy.md): edge devices POST JSON readings to
//! `/send`, the proxy puts them on a queue, a puller drains the queue centrally.
//!
//! - [`api`]: the HTTP contract (`POST /send`, `GET /health`), served by the runtime's HTTP
//!   data plane (connection counts, rate limits, PROXY protocol, drain);
//! - [`filter`]: the per-hostname ordering filter;
//! - [`queue`]: the backend trait, with [`sqs`] (Amazon SQS or compatible), [`local`] (a
//!   durable queue on disk, the default without `SQS_QUEUE_URL`) and [`redis_queue`];
//! - [`puller`]: `marchproxy-sqs-proxy puller`, or in-process with `--pull`;
//! - [`mqtt`], [`wire`], [`presence`], [`alerts`]: the MQTT face for edge devices (readings
//!   batched into the queue, presence in Redis, outages to a `lwt` queue and a webhook);
//! - [`metrics`]: `sqs_proxy_*` on the module's `/metrics`.
//!
//! Everything else (ModuleService, registration as `MODULE_TYPE_SQS_PROXY`, heartbeats, admin)
//! is the module runtime's. [`run`] is the binary's entry point.

pub mod alerts;
pub mod api;
pub mod config;
pub mod filter;
pub mod local;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod puller;
pub mod queue;
pub mod redis_queue;
pub mod sqs;
pub mod wire;

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use marchproxy::{names::ModuleKind, pb};
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Backend, Cli, Command, EdgeArgs, QueueArgs, SinkArgs},
    filter::OrderingFilter,
    metrics::{Metrics, Rejection},
    puller::Puller,
    queue::Queue,
};

/// Where `/send` listens when no `--listen` is given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";
/// Host names the ordering filter remembers at most (the least recently heard go first).
const FILTER_MAX_HOSTS: usize = 100_000;
/// The largest `max_body_bytes` accepted (the local queue takes it; SQS itself takes at most
/// 1 MiB on AWS and 256 KiB on many compatible servers, and answers larger ones with 503).
const MAX_BODY_CEILING: usize = 16 * 1024 * 1024;

/// The live settings: config section `module` (UpdateConfig merges into them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub ordering_filter: bool,
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ordering_filter: true,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// The module: the queue, the filter and the live settings the HTTP API reads.
pub struct SqsProxy {
    pub queue: Arc<dyn Queue>,
    pub filter: OrderingFilter,
    ordering_filter: AtomicBool,
    max_body: AtomicUsize,
    /// The section as last applied, to merge partial updates into.
    settings: RwLock<Settings>,
    region: Option<String>,
    /// `Some` runs the puller in this process.
    pull: Option<SinkArgs>,
    pub metrics: Arc<Metrics>,
    /// The MQTT face and presence, when configured.
    edge: Option<Edge>,
    /// Queue failures are logged at most once a second.
    log_throttle: marchproxy::telemetry::LogThrottle,
}

/// The MQTT face's parts, started with the data plane.
pub struct Edge {
    pub mqtt: Option<mqtt::MqttSettings>,
    pub presence: Option<Arc<presence::Presence>>,
    /// Outage reporting: events from `presence`, to the `lwt` queue and the webhook.
    pub outages: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
    pub lwt_queue: Arc<dyn Queue>,
    pub webhook: Option<alerts::Webhook>,
    pub alert_window: std::time::Duration,
}

impl SqsProxy {
    pub fn new(
        queue: Arc<dyn Queue>,
        metrics: Arc<Metrics>,
        region: Option<String>,
        pull: Option<SinkArgs>,
        edge: Option<Edge>,
    ) -> Arc<Self> {
        let settings = Settings::default();
        Arc::new(SqsProxy {
            queue,
            filter: OrderingFilter::new(FILTER_MAX_HOSTS),
            ordering_filter: AtomicBool::new(settings.ordering_filter),
            max_body: AtomicUsize::new(settings.max_body_bytes),
            settings: RwLock::new(settings),
            region,
            pull,
            metrics,
            edge,
            log_throttle: marchproxy::telemetry::LogThrottle::new(std::time::Duration::from_secs(
                1,
            )),
        })
    }

    /// Device presence, when `--redis-url` is set.
    pub fn presence(&self) -> Option<&Arc<presence::Presence>> {
        self.edge.as_ref()?.presence.as_ref()
    }

    pub fn ordering_filter(&self) -> bool {
        self.ordering_filter.load(Ordering::Relaxed)
    }

    pub fn max_body(&self) -> usize {
        self.max_body.load(Ordering::Relaxed)
    }

    fn settings(&self) -> Settings {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// The current settings with `update`'s keys over them.
    fn merged(&self, update: &serde_json::Value) -> Result<Settings, Vec<String>> {
        let settings =
            marchproxy_runtime::config::merge_section("module", &self.settings(), update)?;
        if !(1..=MAX_BODY_CEILING).contains(&settings.max_body_bytes) {
            return Err(vec![format!(
                "module.max_body_bytes must be from 1 to {MAX_BODY_CEILING} (got {})",
                settings.max_body_bytes
            )]);
        }
        Ok(settings)
    }
}

#[tonic::async_trait]
impl Module for SqsProxy {
    fn kind(&self) -> ModuleKind {
        ModuleKind::SqsProxy
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Http]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        let metrics = Arc::clone(&self.metrics);
        metrics.register(&plane.stats.module_registry)?;
        let mut edge_tasks = Vec::new();
        if let Some(edge) = &self.edge {
            let stopped = || {
                let mut stopping = plane.stopping.clone();
                async move { stopping.wait().await }
            };
            if let Some(presence) = &edge.presence {
                edge_tasks.push(tokio::spawn(Arc::clone(presence).listen(stopped())));
            }
            let outages = edge.outages.lock().ok().and_then(|mut o| o.take());
            if let Some(outages) = outages {
                tokio::spawn(presence::report_outages(
                    outages,
                    Arc::clone(&edge.lwt_queue),
                    edge.webhook.clone(),
                    edge.alert_window,
                ));
            }
            if let Some(settings) = &edge.mqtt {
                edge_tasks.push(tokio::spawn(mqtt::run(
                    settings.clone(),
                    Arc::clone(&self.queue),
                    edge.presence.clone(),
                    Arc::clone(&metrics),
                    stopped(),
                )));
            }
        }
        let puller = self.pull.as_ref().map(|sink| {
            let puller = Puller::new(Arc::clone(&self.queue), sink, Some(Arc::clone(&metrics)));
            let mut stopping = plane.stopping.clone();
            tokio::spawn(async move { puller.run(async move { stopping.wait().await }).await })
        });
        let router = api::router(Arc::clone(&self), metrics);
        let served = marchproxy_runtime::http::serve(plane, router).await;
        if let Some(puller) = puller {
            let _ = puller.await;
        }
        for task in edge_tasks {
            let _ = task.await;
        }
        served
    }

    fn config_types(&self) -> Vec<&'static str> {
        vec!["module"]
    }

    fn check_config(
        &self,
        _config_type: &str,
        config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        self.merged(config).map(|_| ())
    }

    fn apply_config(&self, _config_type: &str, config: &serde_json::Value) {
        if let Ok(settings) = self.merged(config) {
            self.ordering_filter
                .store(settings.ordering_filter, Ordering::Relaxed);
            self.max_body
                .store(settings.max_body_bytes, Ordering::Relaxed);
            if let Ok(mut current) = self.settings.write() {
                *current = settings;
            }
        }
    }

    async fn health_checks(&self) -> Vec<(String, Result<String, String>)> {
        vec![("queue".to_owned(), self.queue.check().await)]
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::from([("queue".to_owned(), self.queue.describe())]);
        if let Some(region) = &self.region {
            metadata.insert("region".to_owned(), region.clone());
        }
        metadata
    }

    fn custom_stats(&self) -> HashMap<String, String> {
        let metrics = &self.metrics;
        let rejected: u64 = [
            Rejection::InvalidJson,
            Rejection::NotAnObject,
            Rejection::TooLarge,
            Rejection::ContentType,
        ]
        .into_iter()
        .map(|r| metrics.rejected(r))
        .sum();
        let queue_failed: u64 = [
            Rejection::QueueUnavailable,
            Rejection::QueueRefused,
            Rejection::QueueBusy,
        ]
        .into_iter()
        .map(|r| metrics.rejected(r))
        .sum();
        HashMap::from([
            ("received".to_owned(), metrics.received.get().to_string()),
            ("queued".to_owned(), metrics.queued.get().to_string()),
            ("filtered".to_owned(), metrics.filtered.get().to_string()),
            ("rejected".to_owned(), rejected.to_string()),
            ("queue_failed".to_owned(), queue_failed.to_string()),
            ("filter_hosts".to_owned(), self.filter.hosts().to_string()),
        ])
    }
}

/// Opens the queue the flags name.
pub async fn open_queue(args: &QueueArgs) -> anyhow::Result<Arc<dyn Queue>> {
    Ok(match args.backend() {
        Backend::Local => local::LocalQueue::open(
            &args.queue_dir,
            local::LocalSettings {
                send_timeout: args.queue_timeout,
                backlog: args.max_in_flight,
            },
        )?,
        Backend::Redis => {
            let url = args
                .redis_url
                .as_deref()
                .context("--queue redis needs --redis-url (or MARCHPROXY_REDIS_URL)")?;
            redis_queue::RedisQueue::connect(url, &args.redis_list, args.queue_timeout).await?
        }
        Backend::Sqs => {
            let queue_url = args.sqs_queue_url.clone().context(
                "--queue sqs needs the queue's URL: set SQS_QUEUE_URL (or --sqs-queue-url)",
            )?;
            sqs::SqsQueue::connect(sqs::SqsSettings {
                queue_url,
                batch_wait: args.batch_wait,
                concurrent_sends: args.concurrent_sends,
                backlog: args.max_in_flight,
                timeout: args.queue_timeout,
            })
            .await?
        }
    })
}

/// The MQTT face and presence from the flags: connects to Redis (so a wrong URL stops the
/// start), opens the `lwt` queue. `None` without `--mqtt-url` and `--redis-url`.
async fn edge(
    args: &EdgeArgs,
    queue_args: &QueueArgs,
    instance_id: &str,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Edge>> {
    if args.mqtt_url.is_none() && queue_args.redis_url.is_none() {
        return Ok(None);
    }
    let mqtt = match &args.mqtt_url {
        Some(url) => {
            let data_topics = args
                .data_topic
                .iter()
                .map(|spec| match spec.split_once('=') {
                    Some((topic, format)) => Ok((topic.to_owned(), format.parse()?)),
                    None => Ok((spec.clone(), wire::DataFormat::Json)),
                })
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| anyhow::anyhow!("--data-topic: {e}"))?;
            if args.data_batch_max == 0 || args.data_batch_min > args.data_batch_max {
                anyhow::bail!(
                    "--data-batch-min must be at most --data-batch-max, which must be above 0"
                );
            }
            let settings = mqtt::MqttSettings {
                url: url.clone(),
                username: args.mqtt_username.clone(),
                password: args.mqtt_password.clone(),
                client_id: args
                    .mqtt_client_id
                    .clone()
                    .unwrap_or_else(|| format!("marchproxy-{instance_id}")),
                connect_topic: args.connect_topic.clone(),
                lwt_topic: args.lwt_topic.clone(),
                data_topics,
                share_group: args.mqtt_share_group.clone(),
                batching: mqtt::Batching {
                    min: args.data_batch_min.max(1),
                    max: args.data_batch_max,
                    wait: args.data_batch_wait,
                },
            };
            mqtt::check(&settings).map_err(|e| anyhow::anyhow!(e))?;
            Some(settings)
        }
        None => None,
    };
    let (outage_sender, outages) = tokio::sync::mpsc::channel(1024);
    let presence = match &queue_args.redis_url {
        Some(url) => {
            Some(presence::Presence::connect(url, outage_sender, Arc::clone(metrics)).await?)
        }
        None => None,
    };
    // The data queue's settings, with the lwt queue's own place in each backend (the backend
    // pinned, since an lwt URL alone would otherwise pick SQS).
    let lwt_queue = open_queue(&QueueArgs {
        backend: Some(queue_args.backend()),
        queue_dir: queue_args.queue_dir.join("lwt"),
        redis_list: "lwt".into(),
        sqs_queue_url: args
            .lwt_queue_url
            .clone()
            .or(queue_args.sqs_queue_url.clone()),
        ..queue_args.clone()
    })
    .await?;
    let webhook = args
        .alert_webhook
        .as_deref()
        .map(alerts::Webhook::new)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some(Edge {
        mqtt,
        presence,
        outages: std::sync::Mutex::new(Some(outages)),
        lwt_queue,
        webhook,
        alert_window: args.alert_window,
    }))
}

/// The proxy on the module runtime, or the `puller` subcommand, until `shutdown` completes
/// (then it drains), as the binary does until SIGINT or SIGTERM.
pub async fn run_until(
    cli: Cli,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Some(Command::Puller(args)) = cli.command {
        marchproxy::telemetry::init(args.log_format);
        let queue = open_queue(&args.queue).await?;
        Puller::new(queue, &args.sink, None).run(shutdown).await;
        return Ok(());
    }
    let mut common = cli.common;
    if common.listen.is_empty() {
        common.listen = vec![DEFAULT_LISTEN.to_owned()];
    }
    let mut config = RuntimeConfig::from_args(ModuleKind::SqsProxy, common)?;
    marchproxy::telemetry::init(config.log_format);
    // Flags given explicitly win over the file's [module] section.
    if let Some(section) = config.module_section.as_object_mut() {
        if let Some(on) = cli.proxy.ordering_filter {
            section.insert("ordering_filter".into(), on.into());
        }
        if let Some(bytes) = cli.proxy.max_body {
            section.insert("max_body_bytes".into(), bytes.into());
        }
    }
    let queue = open_queue(&cli.queue).await?;
    let metrics = Arc::new(Metrics::new(|opts| {
        opts.const_label("module_type", ModuleKind::SqsProxy.name())
            .const_label("instance", &config.instance_id)
    }));
    let edge = edge(&cli.edge, &cli.queue, &config.instance_id, &metrics).await?;
    let proxy = SqsProxy::new(
        queue,
        metrics,
        cli.proxy.region,
        cli.pull.then_some(cli.sink),
        edge,
    );
    marchproxy_runtime::run(proxy, config, shutdown).await?;
    Ok(())
}

/// The binary's entry: runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, marchproxy::signal::shutdown()).await
}
