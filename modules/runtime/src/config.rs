//! The flags every module takes (each also an environment variable), over an optional TOML file
//! (`--config`) that can also carry the module's routes, health-check settings and its own
//! `[module]` section. A module's binary flattens [`CommonArgs`] into its own flags.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use marchproxy::{
    listen::ListenSpec,
    names::{self, ModuleKind},
    pb,
    route::RouteSpec,
    telemetry::LogFormat,
    time::parse_duration,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// `current` with the top-level keys of `update` replaced: how `UpdateConfig` changes a section
/// (it sends only what changes). Errors name the section and the field.
pub fn merge_section<T: Serialize + DeserializeOwned>(
    section: &str,
    current: &T,
    update: &serde_json::Value,
) -> Result<T, Vec<String>> {
    let mut merged = serde_json::to_value(current).unwrap_or_default();
    if let (Some(target), Some(update)) = (merged.as_object_mut(), update.as_object()) {
        target.extend(update.clone());
    }
    serde_json::from_value(merged).map_err(|e| vec![format!("{section}: {e}")])
}

/// Flags shared by every module.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML file with any of these settings, plus [[routes]], [health_check] and [module].
    #[arg(long, env = "MARCHPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The NLB's gRPC endpoint, or several NLB replicas' comma-separated (a failed call moves to
    /// the next; the registration stays); without it the module runs alone (no registration).
    #[arg(long, env = "MARCHPROXY_NLB")]
    pub nlb: Option<String>,
    /// ModuleService, health and reflection [default: 0.0.0.0:<50051..50056 by kind>]
    #[arg(long, env = "MARCHPROXY_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// host:port the NLB should dial for ModuleService; its host also fronts the data listeners
    /// [default: the gRPC listen address, 127.0.0.1 when that is 0.0.0.0]
    #[arg(long, env = "MARCHPROXY_ADVERTISE")]
    pub advertise: Option<String>,
    /// This instance's id [default: <kind>-<host name>]
    #[arg(long, env = "MARCHPROXY_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// The version blue/green traffic shifting knows this instance by [default: v1]
    #[arg(long = "version", env = "MARCHPROXY_VERSION")]
    pub module_version: Option<String>,
    /// Admin HTTP: /metrics, /healthz, /readyz [default: 0.0.0.0:<7002..7007 by kind>]
    #[arg(long, env = "MARCHPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Cluster API key: required on this module's gRPC and sent to the NLB.
    #[arg(long, env = "MARCHPROXY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Data-plane listener, ADDR or PROTOCOL=ADDR (repeatable).
    #[arg(long, env = "MARCHPROXY_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// How often to heartbeat to the NLB [default: 10s]
    #[arg(long, env = "MARCHPROXY_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// How long open connections may take to finish on shutdown [default: 30s]
    #[arg(long, env = "MARCHPROXY_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Most connections this instance takes at once; 0 for no limit [default: 0]
    #[arg(long, env = "MARCHPROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Log format [default: text]
    #[arg(long, env = "MARCHPROXY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// `[health_check]` in the file: the `HealthCheckConfig` sent at registration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default)]
    pub interval_seconds: u32,
    #[serde(default)]
    pub timeout_seconds: u32,
    #[serde(default)]
    pub unhealthy_threshold: u32,
    #[serde(default)]
    pub healthy_threshold: u32,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

impl HealthCheck {
    pub fn to_wire(&self) -> Result<pb::HealthCheckConfig, String> {
        let protocol = match &self.protocol {
            Some(name) => names::parse_protocol(name)
                .ok_or_else(|| format!("health_check.protocol `{name}` is unknown"))?,
            None => pb::Protocol::Unspecified,
        };
        let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(pb::HealthCheckConfig {
            interval_seconds: int(self.interval_seconds),
            timeout_seconds: int(self.timeout_seconds),
            unhealthy_threshold: int(self.unhealthy_threshold),
            healthy_threshold: int(self.healthy_threshold),
            health_check_path: self.path.clone(),
            health_check_port: i32::from(self.port),
            health_check_protocol: protocol as i32,
            metadata: Default::default(),
        })
    }
}

/// The file: the flags' keys plus routes, health checks and the module's own section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    nlb: Option<String>,
    grpc_listen: Option<SocketAddr>,
    advertise: Option<String>,
    instance_id: Option<String>,
    version: Option<String>,
    admin_listen: Option<SocketAddr>,
    api_key: Option<String>,
    #[serde(default)]
    listen: Vec<String>,
    heartbeat_interval: Option<String>,
    drain_timeout: Option<String>,
    max_connections: Option<u32>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    pub health_check: Option<HealthCheck>,
    /// The module's own settings, handed to it as the `module` config section.
    #[serde(default)]
    pub module: Option<toml::Table>,
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        Ok(marchproxy::config_file::read(path)?)
    }

    /// The `[module]` section as JSON (an empty object when absent).
    pub fn module_section(&self) -> serde_json::Value {
        self.module
            .as_ref()
            .and_then(|table| serde_json::to_value(table).ok())
            .unwrap_or_else(|| serde_json::json!({}))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] marchproxy::config_file::FileError),
    #[error("{0}")]
    Invalid(String),
}

/// Everything the runtime needs, resolved.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub kind: ModuleKind,
    pub config_path: Option<PathBuf>,
    pub nlb: Option<String>,
    pub grpc_listen: SocketAddr,
    pub advertise: Option<String>,
    pub instance_id: String,
    pub version: String,
    pub admin_listen: SocketAddr,
    pub api_key: Option<String>,
    pub listen: Vec<ListenSpec>,
    pub heartbeat_interval: Duration,
    pub drain_timeout: Duration,
    pub max_connections: u32,
    pub log_format: LogFormat,
    pub routes: Vec<RouteSpec>,
    pub health_check: Option<pb::HealthCheckConfig>,
    pub module_section: serde_json::Value,
}

pub use marchproxy::names::host_name;

impl RuntimeConfig {
    /// Defaults for `kind` on loopback with ephemeral ports: for tests and embedding.
    pub fn local(kind: ModuleKind, instance_id: &str) -> Self {
        RuntimeConfig {
            kind,
            config_path: None,
            nlb: None,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            instance_id: instance_id.to_owned(),
            version: "v1".to_owned(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: None,
            listen: Vec::new(),
            heartbeat_interval: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            max_connections: 0,
            log_format: LogFormat::Text,
            routes: Vec::new(),
            health_check: None,
            module_section: serde_json::json!({}),
        }
    }

    /// Flags over the file over defaults, for a module of `kind`.
    pub fn from_args(kind: ModuleKind, args: CommonArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        let duration = |flag: Option<Duration>,
                        text: Option<&String>,
                        key: &str,
                        default: Duration|
         -> Result<Duration, ConfigError> {
            match (flag, text) {
                (Some(d), _) => Ok(d),
                (None, Some(t)) => parse_duration(t)
                    .map_err(|e| ConfigError::Invalid(format!("config file key {key}: {e}"))),
                (None, None) => Ok(default),
            }
        };
        let listen_texts = if args.listen.is_empty() {
            file.listen.clone()
        } else {
            args.listen.clone()
        };
        let listen = listen_texts
            .iter()
            .map(|t| ListenSpec::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConfigError::Invalid)?;
        let heartbeat_interval = duration(
            args.heartbeat_interval,
            file.heartbeat_interval.as_ref(),
            "heartbeat_interval",
            Duration::from_secs(10),
        )?;
        let max = Duration::from_millis(crate::shared::MAX_HEARTBEAT_MS);
        if heartbeat_interval.is_zero() || heartbeat_interval > max {
            return Err(ConfigError::Invalid(format!(
                "--heartbeat-interval must be above 0 and at most {}s (the NLB marks a module unhealthy after 30s without one)",
                max.as_secs()
            )));
        }
        let health_check = file
            .health_check
            .as_ref()
            .map(HealthCheck::to_wire)
            .transpose()
            .map_err(ConfigError::Invalid)?;
        let api_key = marchproxy::config_file::api_key(args.api_key, file.api_key.clone())
            .map_err(|e| ConfigError::Invalid(format!("--api-key: {e}")))?;
        let instance_id = args
            .instance_id
            .or(file.instance_id.clone())
            .unwrap_or_else(|| format!("{}-{}", kind.name(), host_name()));
        if let Some(advertise) = args.advertise.as_ref().or(file.advertise.as_ref()) {
            advertise
                .parse::<names::Endpoint>()
                .map_err(|e| ConfigError::Invalid(format!("--advertise: {e}")))?;
        }
        Ok(RuntimeConfig {
            kind,
            config_path: args.config.clone(),
            nlb: args.nlb.or(file.nlb.clone()),
            grpc_listen: args
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], kind.default_grpc_port()))),
            advertise: args.advertise.or(file.advertise.clone()),
            instance_id,
            version: args
                .module_version
                .or(file.version.clone())
                .unwrap_or_else(|| "v1".to_owned()),
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], kind.default_admin_port()))),
            api_key,
            listen,
            heartbeat_interval,
            drain_timeout: duration(
                args.drain_timeout,
                file.drain_timeout.as_ref(),
                "drain_timeout",
                Duration::from_secs(30),
            )?,
            max_connections: args.max_connections.or(file.max_connections).unwrap_or(0),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            module_section: file.module_section(),
            routes: file.routes,
            health_check,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flags_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alb.toml");
        std::fs::write(
            &path,
            r#"
nlb = "http://nlb:50050"
listen = ["http=0.0.0.0:8080"]
heartbeat_interval = "2s"
[[routes]]
route_id = "web"
protocol = "http"
source_pattern = "*.example.com"
destination_pattern = "10.0.0.5:8080=3"
[health_check]
interval_seconds = 5
path = "/health"
[module]
retries = 2
"#,
        )
        .unwrap();
        let args = CommonArgs {
            config: Some(path),
            instance_id: Some("alb-7".into()),
            ..CommonArgs::default()
        };
        let config = RuntimeConfig::from_args(ModuleKind::Alb, args).unwrap();
        assert_eq!(config.instance_id, "alb-7");
        assert_eq!(config.grpc_listen.port(), 50051);
        assert_eq!(config.admin_listen.port(), 7002);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(config.listen[0].protocol, Some(pb::Protocol::Http));
        assert_eq!(config.routes[0].id, "web");
        assert_eq!(config.health_check.unwrap().health_check_path, "/health");
        assert_eq!(config.module_section["retries"], 2);
    }

    #[test]
    fn refuses_bad_settings() {
        assert!(ListenSpec::parse("gopher=0.0.0.0:70").is_err());
        assert!(ListenSpec::parse("nowhere").is_err());
        assert_eq!(ListenSpec::parse("127.0.0.1:5432").unwrap().protocol, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[[routes]]\nroute_id = \"r\"\nprotocol = \"http\"\nsource_pattern = \"10.0.0.0/99\"\n",
        )
        .unwrap();
        let args = CommonArgs {
            config: Some(path),
            ..CommonArgs::default()
        };
        assert!(
            RuntimeConfig::from_args(ModuleKind::Alb, args)
                .unwrap_err()
                .to_string()
                .contains("CIDR")
        );
        let args = CommonArgs {
            heartbeat_interval: Some(Duration::from_secs(60)),
            ..CommonArgs::default()
        };
        assert!(
            RuntimeConfig::from_args(ModuleKind::Alb, args)
                .unwrap_err()
                .to_string()
                .contains("at most 10s")
        );
        let args = CommonArgs {
            advertise: Some("no-port".into()),
            ..CommonArgs::default()
        };
        assert!(RuntimeConfig::from_args(ModuleKind::Alb, args).is_err());
    }
}
