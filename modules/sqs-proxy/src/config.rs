//! Flags (each also an environment variable) of `marchproxy-sqs-proxy` and its `puller`
//! subcommand, on top of the runtime's common flags. Queue settings are the same for both, so a
//! puller started with the proxy's environment drains the proxy's queue.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use marchproxy::{telemetry::LogFormat, time::parse_duration};
use marchproxy_runtime::CommonArgs;

#[derive(Debug, Parser)]
#[command(
    name = "marchproxy-sqs-proxy",
    about = "MarchProxy's SQS proxy: edge devices POST JSON to /send, it lands on a queue (Amazon SQS or a durable local one); `puller` drains it",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Also drain the queue in this process into the sink below (the way to pull from a local
    /// queue while the proxy runs: one process owns its directory).
    #[arg(long, env = "MARCHPROXY_PULL")]
    pub pull: bool,
    #[command(flatten)]
    pub sink: SinkArgs,
    #[command(flatten)]
    pub edge: EdgeArgs,
}

/// The MQTT face: edge devices publishing readings and presence instead of POSTing.
#[derive(Clone, Debug, Args)]
pub struct EdgeArgs {
    /// Broker to take device messages from: mqtt://[user:password@]host[:port] or mqtts://...
    /// [default: no MQTT face]
    #[arg(long, env = "MARCHPROXY_MQTT_URL", hide_env_values = true)]
    pub mqtt_url: Option<String>,
    /// Broker user name (when not in the URL)
    #[arg(long, env = "MARCHPROXY_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// Broker password (when not in the URL)
    #[arg(long, env = "MARCHPROXY_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
    /// MQTT client id; the broker keeps this session's messages while it reconnects
    /// [default: marchproxy-<instance id>]
    #[arg(long, env = "MARCHPROXY_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    /// Shared-subscription group, so several instances split the messages; empty to subscribe
    /// plainly (every instance gets every message)
    #[arg(
        long,
        env = "MARCHPROXY_MQTT_SHARE_GROUP",
        default_value = "marchproxy"
    )]
    pub mqtt_share_group: String,
    /// Topic of `msg.Connect` (device online)
    #[arg(long, env = "MARCHPROXY_CONNECT_TOPIC", default_value = "connect")]
    pub connect_topic: String,
    /// Topic of `msg.LWT` (the devices' last will)
    #[arg(long, env = "MARCHPROXY_LWT_TOPIC", default_value = "lwt")]
    pub lwt_topic: String,
    /// Data topic (filter) and its payload, TOPIC=SensorData or TOPIC=json (repeatable)
    #[arg(
        long,
        env = "MARCHPROXY_DATA_TOPICS",
        value_delimiter = ',',
        default_value = "data/sensor=SensorData"
    )]
    pub data_topic: Vec<String>,
    /// Data messages per queued batch: once this many wait, the batch goes when no other is at hand
    #[arg(long, env = "MARCHPROXY_DATA_BATCH_MIN", default_value_t = 1)]
    pub data_batch_min: usize,
    /// Most data messages in one queued batch
    #[arg(long, env = "MARCHPROXY_DATA_BATCH_MAX", default_value_t = 10)]
    pub data_batch_max: usize,
    /// Longest a data message waits for its batch
    #[arg(long, env = "MARCHPROXY_DATA_BATCH_WAIT", value_parser = parse_duration, default_value = "1s")]
    pub data_batch_wait: Duration,
    /// Webhook that gets one POST per batch of devices that went offline
    #[arg(long, env = "MARCHPROXY_ALERT_WEBHOOK", hide_env_values = true)]
    pub alert_webhook: Option<String>,
    /// Outages within this window make one alert
    #[arg(long, env = "MARCHPROXY_ALERT_WINDOW", value_parser = parse_duration, default_value = "5s")]
    pub alert_window: Duration,
    /// SQS queue for outage events [default: the data queue; local: <queue-dir>/lwt]
    #[arg(long, env = "SQS_LWT_QUEUE_URL")]
    pub lwt_queue_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drain the queue: long-poll (up to 10 messages, 20 s), hand each message to the sink,
    /// delete it once handled.
    Puller(PullerArgs),
}

#[derive(Debug, Args)]
pub struct PullerArgs {
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub sink: SinkArgs,
    /// Log format (logs go to stderr; stdout carries the messages)
    #[arg(
        long,
        env = "MARCHPROXY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Amazon SQS or an SQS-compatible server (SQS_QUEUE_URL, AWS_* variables).
    Sqs,
    /// The embedded durable queue in --queue-dir.
    Local,
    /// Redis lists (--redis-url): one per topic, `send` for POST /send.
    Redis,
}

#[derive(Clone, Debug, Args)]
pub struct QueueArgs {
    /// Queue backend [default: sqs when SQS_QUEUE_URL is set, else local]
    #[arg(long = "queue", env = "MARCHPROXY_QUEUE", value_enum)]
    pub backend: Option<Backend>,
    /// The SQS queue's URL (region, credentials and endpoint come from AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL)
    #[arg(long, env = "SQS_QUEUE_URL")]
    pub sqs_queue_url: Option<String>,
    /// The local queue's directory
    #[arg(long, env = "MARCHPROXY_QUEUE_DIR", default_value = "sqs-proxy-queue")]
    pub queue_dir: PathBuf,
    /// Redis, for device presence and the redis backend: redis://[user:password@]host:port[/db]
    /// or rediss://... [default: no presence]
    #[arg(long, env = "MARCHPROXY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The redis backend's list for POST /send (the puller drains this one; outage events go to
    /// `lwt`, MQTT data to a list per topic)
    #[arg(long, env = "MARCHPROXY_REDIS_LIST", default_value = "send")]
    pub redis_list: String,
    /// Longest a message may wait for the queue (retries included); its sender then gets 503
    #[arg(long, env = "MARCHPROXY_QUEUE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub queue_timeout: Duration,
    /// Most messages waiting for the queue at once; beyond, senders wait (up to
    /// --queue-timeout, then 503) instead of growing memory
    #[arg(long, env = "MARCHPROXY_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// SQS: concurrent SendMessage(Batch) calls
    #[arg(long, env = "MARCHPROXY_CONCURRENT_SENDS", default_value_t = 32)]
    pub concurrent_sends: usize,
    /// SQS: longest wait to fill a batch (up to 10) while earlier sends are still in flight;
    /// an idle queue sends at once
    #[arg(long, env = "MARCHPROXY_BATCH_WAIT", value_parser = parse_duration, default_value = "5ms")]
    pub batch_wait: Duration,
}

impl QueueArgs {
    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or(if self.sqs_queue_url.is_some() {
            Backend::Sqs
        } else {
            Backend::Local
        })
    }
}

/// The live settings (config section `module`); the flags give their starting values.
#[derive(Clone, Debug, Args)]
pub struct ProxyArgs {
    /// Drop messages from an older job submission than the newest seen for their hostname
    /// [default: true]
    #[arg(long, env = "MARCHPROXY_ORDERING_FILTER", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub ordering_filter: Option<bool>,
    /// Largest request body in bytes; larger ones get 413 [default: 1048576]
    #[arg(long, env = "MARCHPROXY_MAX_BODY")]
    pub max_body: Option<usize>,
    /// Region label sent with the registration (metadata `region`), so operator routes can
    /// send each region's devices to their own proxies
    #[arg(long, env = "MARCHPROXY_REGION")]
    pub region: Option<String>,
}

#[derive(Clone, Debug, Args)]
pub struct SinkArgs {
    /// Hand each message to this shell command on its stdin (MESSAGE_ID in its environment);
    /// exit status 0 means handled [default: print JSON lines on stdout]
    #[arg(long, env = "MARCHPROXY_SINK_COMMAND")]
    pub sink_command: Option<String>,
    /// Keep messages whose handling failed (they come back after the visibility timeout)
    /// instead of deleting them
    #[arg(long, env = "KEEP_FAILED_MESSAGES", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub keep_failed_messages: bool,
    /// How long a received message stays hidden from other pullers while it is handled
    #[arg(long, env = "MARCHPROXY_VISIBILITY_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub visibility_timeout: Duration,
    /// Long-poll wait per receive (at most 20 s on SQS)
    #[arg(long, env = "MARCHPROXY_PULL_WAIT", value_parser = parse_duration, default_value = "20s")]
    pub pull_wait: Duration,
}
