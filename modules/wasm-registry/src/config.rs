//! Flags of `marchproxy-wasm-registry`: the original proxy's `PROXY_*` variables (each also a
//! flag, aliases included) on top of the runtime's common flags.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, ValueEnum};
use marchproxy::time::parse_duration;
use marchproxy_runtime::CommonArgs;

/// The largest chunk: its base64 (4/3) and JSON framing stay under 16 MiB MQTT packets.
pub const MAX_CHUNK: usize = 8 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "marchproxy-wasm-registry",
    about = "MarchProxy's wasm-registry: pulls WebAssembly modules from OCI registries and publishes them to Propeller proplets as MQTT chunks",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Which topic forms are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TopicStyle {
    /// `m/{domain}/c/{channel}/registry/...`
    Current,
    /// `m/{domain}/c/{channel}/messages/registry/...` (older proplets)
    Messages,
    Both,
}

#[derive(Clone, Debug, Args)]
pub struct ProxyArgs {
    /// Broker URL: tcp://, mqtt://, ssl:// or mqtts://
    #[arg(
        long,
        env = "PROXY_MQTT_ADDRESS",
        default_value = "tcp://localhost:1883"
    )]
    pub mqtt_address: String,
    /// Per-operation MQTT timeout
    #[arg(long, env = "PROXY_MQTT_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub mqtt_timeout: Duration,
    /// QoS for subscribe and publish (0, 1 or 2)
    #[arg(long, env = "PROXY_MQTT_QOS", default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub mqtt_qos: u8,
    /// QoS 1/2 publications awaiting the broker's acknowledgement at once. Brokers cap what a client
    /// may have unacknowledged (Mosquitto's max_inflight_messages is 20, HiveMQ's receive maximum
    /// 10) and over MQTT 3.1.1 they drop the excess silently, so stay at or under the broker's cap.
    #[arg(long, env = "PROXY_MQTT_INFLIGHT", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub mqtt_inflight: u16,
    /// Topic domain (alias PROXY_TENANT_ID)
    #[arg(long, env = "PROXY_DOMAIN_ID")]
    pub domain_id: Option<String>,
    /// Topic channel
    #[arg(long, env = "PROXY_CHANNEL_ID")]
    pub channel_id: Option<String>,
    /// MQTT client id and user name (alias PROXY_ENTITY_ID)
    #[arg(long, env = "PROXY_CLIENT_ID")]
    pub client_id: Option<String>,
    /// MQTT password (alias PROXY_API_KEY)
    #[arg(long, env = "PROXY_CLIENT_KEY", hide_env_values = true)]
    pub client_key: Option<String>,
    /// CA certificate (PEM file) for TLS to the broker
    #[arg(long, env = "PROXY_MQTT_TLS_CA_CERT")]
    pub mqtt_tls_ca_cert: Option<PathBuf>,
    /// Client certificate (PEM file) for TLS to the broker
    #[arg(long, env = "PROXY_MQTT_TLS_CLIENT_CERT")]
    pub mqtt_tls_client_cert: Option<PathBuf>,
    /// Client key (PEM file) for TLS to the broker
    #[arg(long, env = "PROXY_MQTT_TLS_CLIENT_KEY")]
    pub mqtt_tls_client_key: Option<PathBuf>,
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace)
    #[arg(long, env = "PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Topic forms to serve
    #[arg(long, env = "PROXY_TOPIC_STYLE", value_enum, default_value = "current")]
    pub topic_style: TopicStyle,
    /// The registry host the credentials belong to
    #[arg(long, env = "PROXY_REGISTRY_URL")]
    pub registry_url: Option<String>,
    /// Send credentials to PROXY_REGISTRY_URL's host
    #[arg(long, env = "PROXY_AUTHENTICATE", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub authenticate: bool,
    #[arg(long, env = "PROXY_REGISTRY_USERNAME")]
    pub registry_username: Option<String>,
    #[arg(long, env = "PROXY_REGISTRY_PASSWORD", hide_env_values = true)]
    pub registry_password: Option<String>,
    /// A static bearer token for PROXY_REGISTRY_URL's host
    #[arg(long, env = "PROXY_REGISTRY_TOKEN", hide_env_values = true)]
    pub registry_token: Option<String>,
    /// Registries reached over plain HTTP (comma-separated hosts or host:port)
    #[arg(
        long,
        env = "PROXY_INSECURE_REGISTRIES",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1"
    )]
    pub insecure_registries: Vec<String>,
    /// Raw bytes per chunk (before base64)
    #[arg(long, env = "PROXY_CHUNK_SIZE", default_value_t = 512_000)]
    pub chunk_size: usize,
    /// Health and metrics HTTP port (`GET /health`, `GET /metrics`)
    #[arg(long, env = "PROXY_HTTP_PORT", default_value_t = 9191)]
    pub http_port: u16,
    /// Module cache directory
    #[arg(long, env = "PROXY_CACHE_DIR", default_value = "wasm-registry-cache")]
    pub cache_dir: PathBuf,
    /// Cache size limit in bytes (least recently used modules go first)
    #[arg(long, env = "PROXY_CACHE_MAX_BYTES", default_value_t = 1 << 30)]
    pub cache_max_bytes: u64,
    /// How long a tag's resolution is trusted before the registry is asked again (digests
    /// never go stale; an unreachable registry falls back to the cached module)
    #[arg(long, env = "PROXY_TAG_TTL", value_parser = parse_duration, default_value = "5m")]
    pub tag_ttl: Duration,
    /// Fetches at once; further requests wait their turn
    #[arg(long, env = "PROXY_MAX_FETCHES", default_value_t = 4)]
    pub max_fetches: usize,
    /// Largest module pulled, in bytes
    #[arg(long, env = "PROXY_MAX_MODULE_BYTES", default_value_t = 256 << 20)]
    pub max_module_bytes: usize,
}

impl ProxyArgs {
    /// Fills the original proxy's aliases and checks the required variables, naming any missing.
    pub fn resolve(mut self) -> Result<Self, String> {
        let alias = |value: &mut Option<String>, name: &str| {
            if value.is_none() {
                *value = std::env::var(name).ok().filter(|v| !v.is_empty());
            }
        };
        alias(&mut self.domain_id, "PROXY_TENANT_ID");
        alias(&mut self.client_id, "PROXY_ENTITY_ID");
        alias(&mut self.client_key, "PROXY_API_KEY");
        if self.domain_id.as_deref().is_none_or(str::is_empty) {
            return Err("PROXY_DOMAIN_ID (or PROXY_TENANT_ID, or --domain-id) is required".into());
        }
        if self.channel_id.as_deref().is_none_or(str::is_empty) {
            return Err("PROXY_CHANNEL_ID (or --channel-id) is required".into());
        }
        // Base64 and the JSON around it must fit the 16 MiB packets the client allows.
        if !(1..=MAX_CHUNK).contains(&self.chunk_size) {
            return Err(format!(
                "PROXY_CHUNK_SIZE must be from 1 to {MAX_CHUNK} bytes (got {})",
                self.chunk_size
            ));
        }
        Ok(self)
    }
}
