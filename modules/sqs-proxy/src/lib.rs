//! MarchProxy's SQS proxy module (spec/sqs-proxy.md): edge devices POST JSON readings to
//! `/send`, the proxy puts them on a queue, a puller drains the queue centrally.
//!
//! - [`api`]: the HTTP contract (`POST /send`, `GET /health`), served by the runtime's HTTP
//!   data plane (connection counts, rate limits, PROXY protocol, drain);
//! - [`filter`]: the per-hostname ordering filter;
//! - [`queue`]: the backend trait, with [`sqs`] (Amazon SQS or compatible) and [`local`] (a
//!   durable queue on disk, the default without `SQS_QUEUE_URL`);
//! - [`puller`]: `marchproxy-sqs-proxy puller`, or in-process with `--pull`;
//! - [`metrics`]: `sqs_proxy_*` on the module's `/metrics`.
//!
//! Everything else (ModuleService, registration as `MODULE_TYPE_SQS_PROXY`, heartbeats, admin)
//! is the module runtime's. [`run`] is the binary's entry point.

pub mod api;
pub mod config;
pub mod filter;
pub mod local;
pub mod metrics;
pub mod puller;
pub mod queue;
pub mod sqs;

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use marchproxy::{names::ModuleKind, pb};
use marchproxy_runtime::{DataPlane, Module, ModuleError, RuntimeConfig};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Backend, Cli, Command, QueueArgs, SinkArgs},
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
    metrics: OnceLock<Arc<Metrics>>,
    /// Queue failures are logged at most once a second.
    log_throttle: marchproxy::telemetry::LogThrottle,
}

impl SqsProxy {
    pub fn new(queue: Arc<dyn Queue>, region: Option<String>, pull: Option<SinkArgs>) -> Arc<Self> {
        let settings = Settings::default();
        Arc::new(SqsProxy {
            queue,
            filter: OrderingFilter::new(FILTER_MAX_HOSTS),
            ordering_filter: AtomicBool::new(settings.ordering_filter),
            max_body: AtomicUsize::new(settings.max_body_bytes),
            settings: RwLock::new(settings),
            region,
            pull,
            metrics: OnceLock::new(),
            log_throttle: marchproxy::telemetry::LogThrottle::new(std::time::Duration::from_secs(
                1,
            )),
        })
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
        let mut merged = serde_json::to_value(self.settings()).unwrap_or_default();
        if let (Some(target), Some(update)) = (merged.as_object_mut(), update.as_object()) {
            target.extend(update.clone());
        }
        let settings: Settings =
            serde_json::from_value(merged).map_err(|e| vec![format!("module: {e}")])?;
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
        let metrics = Arc::clone(
            self.metrics
                .get_or_init(|| Arc::new(Metrics::new(|opts| plane.stats.labelled(opts)))),
        );
        metrics.register(&plane.stats.module_registry)?;
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
        let Some(metrics) = self.metrics.get() else {
            return HashMap::new();
        };
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

/// The binary: the proxy on the module runtime, or the `puller` subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Puller(args)) = cli.command {
        marchproxy::telemetry::init(args.log_format);
        let queue = open_queue(&args.queue).await?;
        Puller::new(queue, &args.sink, None)
            .run(marchproxy::signal::shutdown())
            .await;
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
    let proxy = SqsProxy::new(queue, cli.proxy.region, cli.pull.then_some(cli.sink));
    marchproxy_runtime::run(proxy, config, marchproxy::signal::shutdown()).await?;
    Ok(())
}
