//! The NLB's configuration: flags, each also an environment variable, over an optional TOML
//! file (`--config`), over defaults. Keys in the file are the flag names with `_` for `-`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use marchproxy::{telemetry::LogFormat, time::parse_duration};
use serde::Deserialize;

use marchproxy::listen::ListenSpec;

use crate::{dataplane::Limits, settings::Settings};

/// `marchproxy-nlb` flags.
#[derive(Clone, Debug, Default, clap::Parser)]
#[command(
    name = "marchproxy-nlb",
    version,
    about = "MarchProxy's network load balancer: module registry, routing and the NLBService control plane"
)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "MARCHPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC control plane (NLBService, grpc.health.v1, reflection) [default: 0.0.0.0:50050]
    #[arg(long, env = "MARCHPROXY_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Admin HTTP: /metrics, /healthz, /readyz, /status [default: 0.0.0.0:7001]
    #[arg(long, env = "MARCHPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Directory for operator-set state (routes, config, scale); memory only when unset.
    #[arg(long, env = "MARCHPROXY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Cluster API key every NLBService call must carry as `authorization: Bearer <key>`
    /// (also read from MARCHPROXY_CLUSTER_API_KEY).
    #[arg(long, env = "MARCHPROXY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A module silent this long gets no new connections [default: 30s]
    #[arg(long, env = "MARCHPROXY_UNHEALTHY_AFTER", value_parser = parse_duration)]
    pub unhealthy_after: Option<Duration>,
    /// A module silent this long is removed with its routes [default: 120s]
    #[arg(long, env = "MARCHPROXY_EXPIRE_AFTER", value_parser = parse_duration)]
    pub expire_after: Option<Duration>,
    /// Shell command run on every TriggerScaling decision (see README, "Scaling").
    #[arg(long, env = "MARCHPROXY_SCALER_COMMAND")]
    pub scaler_command: Option<String>,
    /// Docker Engine API socket (e.g. /var/run/docker.sock): TriggerScaling starts and stops
    /// copies of the containers labelled marchproxy.scale=<kind> (see README, "Containers")
    #[arg(long, env = "MARCHPROXY_SCALER_DOCKER")]
    pub scaler_docker: Option<String>,
    /// Data-plane listener, PROTOCOL=ADDR (repeatable); `auto` recognises the protocol from the
    /// first bytes, a named one (`mysql=0.0.0.0:3306`) skips that.
    #[arg(long, env = "MARCHPROXY_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Most client connections open at once across listeners; 0 for no limit [default: 0]
    #[arg(long, env = "MARCHPROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// New connections per second allowed from one client IP; 0 for no limit [default: 0]
    #[arg(long, env = "MARCHPROXY_PER_SOURCE_RATE")]
    pub per_source_rate: Option<u32>,
    /// Burst above --per-source-rate [default: the rate]
    #[arg(long, env = "MARCHPROXY_PER_SOURCE_BURST")]
    pub per_source_burst: Option<u32>,
    /// Longest wait for the first bytes of an `auto` connection [default: 5s]
    #[arg(long, env = "MARCHPROXY_SNIFF_TIMEOUT", value_parser = parse_duration)]
    pub sniff_timeout: Option<Duration>,
    /// Longest wait to connect to a module instance before trying another [default: 2s]
    #[arg(long, env = "MARCHPROXY_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// How long open connections may finish when the NLB stops [default: 30s]
    #[arg(long, env = "MARCHPROXY_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Send a PROXY protocol v2 header to modules on every connection.
    #[arg(long, env = "MARCHPROXY_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
    /// Log format [default: text]
    #[arg(long, env = "MARCHPROXY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Share state with other NLB replicas through etcd: etcd://HOST:PORT[,HOST:PORT...]
    /// (see README, "NLB cluster"); needs a build with the `etcd` feature.
    #[arg(long, env = "MARCHPROXY_STORE")]
    pub store: Option<String>,
    /// Key prefix in etcd [default: /marchproxy/]
    #[arg(long, env = "MARCHPROXY_STORE_PREFIX")]
    pub store_prefix: Option<String>,
    /// etcd user and password, as USER:PASSWORD
    #[arg(long, env = "MARCHPROXY_STORE_AUTH", hide_env_values = true)]
    pub store_auth: Option<String>,
    /// CA certificate (PEM) that signed the etcd members' certificates: talks TLS to them
    #[arg(long, env = "MARCHPROXY_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd members that ask for one
    #[arg(long, env = "MARCHPROXY_STORE_CERT_FILE", requires = "store_key_file")]
    pub store_cert_file: Option<PathBuf>,
    #[arg(long, env = "MARCHPROXY_STORE_KEY_FILE", requires = "store_cert_file")]
    pub store_key_file: Option<PathBuf>,
    /// This replica's name in the cluster [default: HOSTNAME:GRPC_PORT]
    #[arg(long, env = "MARCHPROXY_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Take the place of the NLB running on the same --state-dir: its listening sockets,
    /// state and module registrations move here, then it drains and exits (no connection is
    /// refused). Without this flag, starting beside a running NLB is refused.
    #[arg(long, env = "MARCHPROXY_TAKEOVER")]
    pub takeover: bool,
}

/// The same settings in a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    grpc_listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    api_key: Option<String>,
    unhealthy_after: Option<String>,
    expire_after: Option<String>,
    scaler_command: Option<String>,
    scaler_docker: Option<String>,
    #[serde(default)]
    listen: Vec<String>,
    max_connections: Option<usize>,
    per_source_rate: Option<u32>,
    per_source_burst: Option<u32>,
    sniff_timeout: Option<String>,
    connect_timeout: Option<String>,
    drain_timeout: Option<String>,
    #[serde(default)]
    proxy_protocol: bool,
    log_format: Option<LogFormat>,
    store: Option<String>,
    store_prefix: Option<String>,
    store_auth: Option<String>,
    store_ca_file: Option<PathBuf>,
    store_cert_file: Option<PathBuf>,
    store_key_file: Option<PathBuf>,
    replica_id: Option<String>,
    /// The `rollout` section's startup values (`[rollout]`, `[rollout.kinds.alb]`,
    /// `[[rollout.webhooks]]`); keys set over the API win.
    rollout: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] marchproxy::config_file::FileError),
    #[error("{0}")]
    Invalid(String),
}

/// Everything the NLB needs to start, resolved.
#[derive(Clone, Debug)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub state_dir: Option<PathBuf>,
    pub api_key: Option<String>,
    /// Startup values of the live sections; persisted sections set over the API win.
    pub settings: Settings,
    pub listen: Vec<ListenSpec>,
    pub limits: Limits,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    /// Take over from the NLB running on the same state directory.
    pub takeover: bool,
    /// State shared with other replicas through etcd, instead of `state_dir`.
    pub store: Option<StoreSpec>,
    /// This replica's name among replicas (default: host name and gRPC port).
    pub replica_id: Option<String>,
}

/// `--store etcd://...` and its companions, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreSpec {
    /// `http://HOST:PORT` (or `https://` with a CA file), one per etcd member.
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub auth: Option<(String, String)>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl StoreSpec {
    /// Reads `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(
        url: &str,
        prefix: Option<String>,
        auth: Option<String>,
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Result<Self, String> {
        let members = url.strip_prefix("etcd://").ok_or_else(|| {
            format!("--store `{url}` is not a store URL; write etcd://HOST:PORT[,HOST:PORT...]")
        })?;
        let scheme = if ca_file.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = members
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|member| {
                let (host, port) = member
                    .rsplit_once(':')
                    .ok_or_else(|| format!("--store member `{member}` needs a port (HOST:PORT)"))?;
                port.parse::<u16>()
                    .map_err(|_| format!("--store member `{member}` has no valid port"))?;
                if host.is_empty() || member.contains('/') {
                    return Err(format!("--store member `{member}` must be HOST:PORT"));
                }
                Ok(format!("{scheme}://{member}"))
            })
            .collect::<Result<_, String>>()?;
        if endpoints.is_empty() {
            return Err(
                "--store names no etcd member; write etcd://HOST:PORT[,HOST:PORT...]".into(),
            );
        }
        let mut prefix = prefix.unwrap_or_else(|| "/marchproxy/".to_owned());
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let auth = auth
            .map(|text| {
                text.split_once(':')
                    .map(|(user, password)| (user.to_owned(), password.to_owned()))
                    .filter(|(user, _)| !user.is_empty())
                    .ok_or_else(|| "--store-auth must be USER:PASSWORD".to_owned())
            })
            .transpose()?;
        Ok(StoreSpec {
            endpoints,
            prefix,
            auth,
            ca_file,
            cert_file,
            key_file,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 50050)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 7001)),
            state_dir: None,
            api_key: None,
            settings: Settings::default(),
            listen: Vec::new(),
            limits: Limits::default(),
            drain_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
            takeover: false,
            store: None,
            replica_id: None,
        }
    }
}

impl Config {
    /// Loopback, ephemeral ports: for tests and embedding.
    pub fn local() -> Self {
        Config {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Config::default()
        }
    }

    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => marchproxy::config_file::read(path)?,
            None => FileConfig::default(),
        };
        let file_duration =
            |text: Option<String>, key: &str| -> Result<Option<Duration>, ConfigError> {
                text.map(|t| {
                    parse_duration(&t)
                        .map_err(|e| ConfigError::Invalid(format!("config file key {key}: {e}")))
                })
                .transpose()
            };
        let defaults = Config::default();
        let mut settings = defaults.settings.clone();
        if let Some(after) = args
            .unhealthy_after
            .or(file_duration(file.unhealthy_after, "unhealthy_after")?)
        {
            settings.heartbeat.unhealthy_after_ms = after.as_millis() as u64;
        }
        if let Some(after) = args
            .expire_after
            .or(file_duration(file.expire_after, "expire_after")?)
        {
            settings.heartbeat.expire_after_ms = after.as_millis() as u64;
        }
        if settings.heartbeat.expire_after_ms <= settings.heartbeat.unhealthy_after_ms
            || settings.heartbeat.unhealthy_after_ms == 0
        {
            return Err(ConfigError::Invalid(format!(
                "--expire-after ({}ms) must be longer than --unhealthy-after ({}ms), and both above 0",
                settings.heartbeat.expire_after_ms, settings.heartbeat.unhealthy_after_ms
            )));
        }
        if let Some(command) = args.scaler_command.or(file.scaler_command) {
            settings.scaling.command = command;
        }
        if let Some(socket) = args.scaler_docker.or(file.scaler_docker) {
            settings.scaling.docker_socket = socket;
        }
        if !settings.scaling.command.is_empty() && !settings.scaling.docker_socket.is_empty() {
            return Err(ConfigError::Invalid(
                "--scaler-command and --scaler-docker are two ways to scale: give one".into(),
            ));
        }
        if let Some(rollout) = file.rollout {
            settings.rollout =
                crate::policy::RolloutSettings::from_json(rollout).map_err(|errors| {
                    ConfigError::Invalid(format!("config file: {}", errors.join("; ")))
                })?;
        }
        let api_key = marchproxy::config_file::api_key(args.api_key, file.api_key)
            .map_err(|e| ConfigError::Invalid(format!("--api-key: {e}")))?;
        let listen = (if args.listen.is_empty() {
            &file.listen
        } else {
            &args.listen
        })
        .iter()
        .map(|text| ListenSpec::parse(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ConfigError::Invalid)?;
        let limits = Limits {
            sniff_timeout: args
                .sniff_timeout
                .or(file_duration(file.sniff_timeout, "sniff_timeout")?)
                .unwrap_or(defaults.limits.sniff_timeout),
            connect_timeout: args
                .connect_timeout
                .or(file_duration(file.connect_timeout, "connect_timeout")?)
                .unwrap_or(defaults.limits.connect_timeout),
            max_connections: args.max_connections.or(file.max_connections).unwrap_or(0),
            per_source_rate: args.per_source_rate.or(file.per_source_rate).unwrap_or(0),
            per_source_burst: args.per_source_burst.or(file.per_source_burst).unwrap_or(0),
            proxy_protocol: args.proxy_protocol || file.proxy_protocol,
        };
        let store = args
            .store
            .or(file.store)
            .map(|url| {
                StoreSpec::parse(
                    &url,
                    args.store_prefix.or(file.store_prefix),
                    args.store_auth.or(file.store_auth),
                    args.store_ca_file.or(file.store_ca_file),
                    args.store_cert_file.or(file.store_cert_file),
                    args.store_key_file.or(file.store_key_file),
                )
            })
            .transpose()
            .map_err(ConfigError::Invalid)?;
        let state_dir = args.state_dir.or(file.state_dir);
        if store.is_some() && (state_dir.is_some() || args.takeover) {
            return Err(ConfigError::Invalid(
                "--store keeps the state in etcd: drop --state-dir and --takeover (replicas replace each other there)".into(),
            ));
        }
        let drain_timeout = args
            .drain_timeout
            .or(file_duration(file.drain_timeout, "drain_timeout")?)
            .unwrap_or(defaults.drain_timeout);
        Ok(Config {
            grpc_listen: args
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or(defaults.grpc_listen),
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(defaults.admin_listen),
            state_dir,
            api_key,
            settings,
            listen,
            limits,
            drain_timeout,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            takeover: args.takeover,
            store,
            replica_id: args.replica_id.or(file.replica_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn store_urls_name_every_member_and_refuse_the_state_dir_beside() {
        let spec = StoreSpec::parse(
            "etcd://10.0.0.1:2379, 10.0.0.2:2379",
            Some("/edge".into()),
            Some("nlb:secret".into()),
            None,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            spec.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(spec.prefix, "/edge/");
        assert_eq!(spec.auth, Some(("nlb".into(), "secret".into())));
        for bad in [
            "http://10.0.0.1:2379",
            "etcd://",
            "etcd://host",
            "etcd://host:x",
        ] {
            assert!(
                StoreSpec::parse(bad, None, None, None, None, None).is_err(),
                "{bad}"
            );
        }
        let both = Args::parse_from([
            "nlb",
            "--store",
            "etcd://127.0.0.1:2379",
            "--state-dir",
            "/tmp/x",
        ]);
        let error = Config::from_args(both).unwrap_err().to_string();
        assert!(error.contains("drop --state-dir"), "{error}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nlb.toml");
        std::fs::write(&path, "grpc_listen = \"127.0.0.1:6000\"\nadmin_listen = \"127.0.0.1:6001\"\nunhealthy_after = \"5s\"\n").unwrap();
        let args = Args::parse_from([
            "nlb",
            "--config",
            path.to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:7000",
        ]);
        let config = Config::from_args(args).unwrap();
        assert_eq!(config.grpc_listen.port(), 7000);
        assert_eq!(config.admin_listen.port(), 6001);
        assert_eq!(config.settings.heartbeat.unhealthy_after_ms, 5000);
    }

    #[test]
    fn the_file_sets_the_rollout_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nlb.toml");
        std::fs::write(
            &path,
            "[rollout]\nstep_percent = 5\n[rollout.kinds.alb]\nstep_percent = 25\n[[rollout.webhooks]]\nname = \"qa\"\ntype = \"gate\"\nurl = \"http://qa.internal/approve\"\n",
        )
        .unwrap();
        let config = Config::from_args(Args::parse_from([
            "nlb",
            "--config",
            path.to_str().unwrap(),
        ]))
        .unwrap();
        let rollout = &config.settings.rollout;
        assert_eq!(
            rollout
                .policy(marchproxy::names::ModuleKind::Alb)
                .step_percent,
            25
        );
        assert_eq!(
            rollout
                .policy(marchproxy::names::ModuleKind::Dblb)
                .step_percent,
            5
        );
        assert_eq!(
            rollout.policy(marchproxy::names::ModuleKind::Alb).webhooks[0].name,
            "qa"
        );
        std::fs::write(&path, "[rollout.kinds.alb]\nstep_percent = 0\n").unwrap();
        let error = Config::from_args(Args::parse_from([
            "nlb",
            "--config",
            path.to_str().unwrap(),
        ]))
        .unwrap_err()
        .to_string();
        assert!(error.contains("rollout.kinds.alb.step_percent"), "{error}");
    }

    #[test]
    fn rejects_bad_files_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nlb.toml");
        std::fs::write(&path, "grpc_lisen = \"x\"\n").unwrap();
        let args = Args::parse_from(["nlb", "--config", path.to_str().unwrap()]);
        assert!(
            Config::from_args(args)
                .unwrap_err()
                .to_string()
                .contains("grpc_lisen")
        );
        let args = Args::parse_from(["nlb", "--unhealthy-after", "10s", "--expire-after", "5s"]);
        assert!(Config::from_args(args).is_err());
    }
}
