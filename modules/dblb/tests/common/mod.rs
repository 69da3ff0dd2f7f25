//! What every DBLB test file uses: the DBLB binary started on free ports with a config file,
//! and routes written as TOML.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use marchproxy_testkit::{
    external::{Process, free_port},
    http_get, metric_value,
};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `[module]` section: `settings` (TOML lines) and health checks that react within a
/// second (every 0.2 s, one result flips a server).
pub fn module(settings: &str) -> String {
    format!(
        "[module]\n{settings}\n[module.health_check]\ninterval_seconds = 0.2\ntimeout_seconds = 1.0\nhealthy_threshold = 1\nunhealthy_threshold = 1\n"
    )
}

/// The DBLB binary; `listeners[i]` is where the i-th `protocols` entry listens.
pub struct Dblb {
    pub listeners: Vec<SocketAddr>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _process: Process,
}

/// A tokio-postgres client of `database` through `addr` as `postgres`; `extra` adds
/// connection settings (`options='...'`).
pub async fn connect(
    addr: SocketAddr,
    database: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let config = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname={database} connect_timeout=10 {extra}",
        addr.port(),
        marchproxy_testkit::databases::PASSWORD
    );
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A `[[routes]]` entry: `servers` as destination_pattern, `metadata` as pairs.
pub fn route(id: &str, protocol: &str, servers: &str, metadata: &[(&str, &str)]) -> String {
    let mut toml = format!(
        "[[routes]]\nroute_id = \"{id}\"\nprotocol = \"{protocol}\"\ndestination_pattern = \"{servers}\"\n"
    );
    if !metadata.is_empty() {
        toml.push_str("[routes.metadata]\n");
        for (key, value) in metadata {
            toml.push_str(&format!("{key} = \"{value}\"\n"));
        }
    }
    toml
}

impl Dblb {
    pub async fn start(dir: &Path, config: &str, protocols: &[&str], args: &[&str]) -> Dblb {
        let listeners: Vec<SocketAddr> = protocols
            .iter()
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        Dblb::start_on(dir, config, protocols, &listeners, args).await
    }

    /// As [`Dblb::start`] on listener addresses chosen beforehand (routes name their ports).
    pub async fn start_on(
        dir: &Path,
        config: &str,
        protocols: &[&str],
        listeners: &[SocketAddr],
        args: &[&str],
    ) -> Dblb {
        let [grpc, admin] = [(); 2].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let file = dir.join("dblb.toml");
        std::fs::write(&file, config).unwrap();
        let log = dir.join("dblb.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_marchproxy-dblb"));
        command
            .arg("--config")
            .arg(&file)
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--instance-id")
            .arg("dblb-test")
            .args(args)
            .env_remove("MARCHPROXY_NLB")
            .env("RUST_LOG", "info,marchproxy_dblb=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (protocol, addr) in protocols.iter().zip(listeners) {
            command.arg("--listen").arg(format!("{protocol}={addr}"));
        }
        let mut process = Process::spawn("marchproxy-dblb", &mut command);
        for addr in listeners.iter().chain([&admin]) {
            process.wait_listening(*addr, DEADLINE, &log).await;
        }
        Dblb {
            listeners: listeners.to_vec(),
            grpc,
            admin,
            _process: process,
        }
    }

    /// Limits all clients together to `per_minute` connections (no burst beyond it), over
    /// the module's gRPC SetRateLimit.
    pub async fn limit_clients(&self, per_minute: i64) {
        let mut client = marchproxy::pb::module_service_client::ModuleServiceClient::connect(
            format!("http://{}", self.grpc),
        )
        .await
        .unwrap();
        let answer = client
            .set_rate_limit(marchproxy::pb::SetRateLimitRequest {
                instance_id: String::new(),
                limit: Some(marchproxy::pb::RateLimit {
                    limit_id: "clients".into(),
                    target: "*".into(),
                    requests_per_minute: per_minute,
                    burst_size: per_minute,
                    enabled: true,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.success, "{}", answer.message);
    }

    /// A metric's value (0 when the series does not exist yet).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, page) = http_get(self.admin, "/metrics").await;
        metric_value(&page, name, labels).unwrap_or(0.0)
    }
}
