//! The DBLB's flags and its `[module]` settings (also `UpdateConfig` `module`, merged key by
//! key): how long clients wait for a server, how many may wait, how backends are checked and
//! who authenticates PostgreSQL clients.

use std::time::Duration;

use clap::Parser;
use marchproxy_runtime::CommonArgs;
use serde::{Deserialize, Serialize};

use crate::auth::{AuthFile, AuthFileError, AuthType};

#[derive(Debug, Parser)]
#[command(
    name = "marchproxy-dblb",
    about = "MarchProxy's DBLB module: PostgreSQL and MySQL/MariaDB load balancing by database, with read-only routing, protocol health checks and connection limits",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PEM certificate chain: PostgreSQL clients asking for SSL get TLS, ended here (without
    /// it, SSL requests are declined and clients go on in plain text)
    #[arg(long, env = "MARCHPROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "MARCHPROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long a client may wait for a server with a free connection before it is told there
    /// are too many connections.
    pub queue_timeout_ms: u64,
    /// Clients that may wait at once; the next one is refused at once.
    pub max_waiting: usize,
    /// How long dialling a backend may take before the next server is tried.
    pub connect_timeout_ms: u64,
    /// How long a PostgreSQL client may take to send its startup packet.
    pub startup_timeout_ms: u64,
    pub health_check: HealthCheck,
    /// Who checks PostgreSQL clients' passwords: `passthrough` (the servers, each client on a
    /// login of its own), `scram-sha-256` (the DBLB, against `auth_file`, handing clients
    /// server connections it logged in itself) or `trust` (the DBLB lets in the users of
    /// `auth_file`, or anyone without one, and logs in with their plain passwords, if any).
    pub auth_type: AuthType,
    /// PgBouncer's `userlist.txt` format: `"user" "password"` lines, the password plain or the
    /// user's `SCRAM-SHA-256$` secret from `pg_authid`.
    pub auth_file: Option<std::path::PathBuf>,
    /// How long a server connection the DBLB logged in may stay unused before it is closed.
    pub server_idle_timeout_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_timeout_ms: 5_000,
            max_waiting: 1_000,
            connect_timeout_ms: 3_000,
            startup_timeout_ms: 10_000,
            health_check: HealthCheck::default(),
            auth_type: AuthType::Passthrough,
            auth_file: None,
            server_idle_timeout_ms: 60_000,
        }
    }
}

/// Active checks that speak each backend's protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub interval_seconds: f64,
    pub timeout_seconds: f64,
    /// Passes in a row that bring a server back.
    pub healthy_threshold: u32,
    /// Failures in a row that take a server out.
    pub unhealthy_threshold: u32,
    /// The user the check logs in as. It needs no password: a server that asks for one, or
    /// refuses the user, has answered in its protocol and passes; one that cannot take
    /// connections (starting, shutting down, full) fails.
    pub user: String,
    /// The PostgreSQL database the check names.
    pub database: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval_seconds: 2.0,
            timeout_seconds: 2.0,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            user: "marchproxy_health".into(),
            database: "postgres".into(),
        }
    }
}

impl HealthCheck {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval_seconds)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_seconds)
    }
}

impl Settings {
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms)
    }

    pub fn server_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.server_idle_timeout_ms)
    }

    /// The users of `auth_file`, when one is set.
    pub fn load_auth_file(&self) -> Result<Option<AuthFile>, AuthFileError> {
        self.auth_file.as_deref().map(AuthFile::load).transpose()
    }

    /// `self` with `update`'s keys, checked.
    pub fn merged(&self, update: &serde_json::Value) -> Result<Settings, Vec<String>> {
        let settings: Settings = marchproxy_runtime::config::merge_section("module", self, update)?;
        let mut problems = Vec::new();
        if !(1..=600_000).contains(&settings.queue_timeout_ms) {
            problems.push("module.queue_timeout_ms must be from 1 to 600000".to_owned());
        }
        if !(1..=60_000).contains(&settings.connect_timeout_ms) {
            problems.push("module.connect_timeout_ms must be from 1 to 60000".to_owned());
        }
        if !(100..=600_000).contains(&settings.startup_timeout_ms) {
            problems.push("module.startup_timeout_ms must be from 100 to 600000".to_owned());
        }
        let check = &settings.health_check;
        if !(0.1..=3600.0).contains(&check.interval_seconds) {
            problems.push("module.health_check.interval_seconds must be from 0.1 to 3600".into());
        }
        if !(0.1..=60.0).contains(&check.timeout_seconds) {
            problems.push("module.health_check.timeout_seconds must be from 0.1 to 60".into());
        }
        if check.healthy_threshold == 0 || check.unhealthy_threshold == 0 {
            problems.push("module.health_check thresholds must be at least 1".into());
        }
        if check.user.is_empty() || check.user.contains('\0') || check.database.contains('\0') {
            problems.push("module.health_check.user must be a non-empty name".into());
        }
        if settings.auth_type == AuthType::ScramSha256 && settings.auth_file.is_none() {
            problems.push(
                "module.auth_type scram-sha-256 needs module.auth_file, the users and their passwords or SCRAM secrets".into(),
            );
        }
        if settings.server_idle_timeout_ms == 0 {
            problems.push("module.server_idle_timeout_ms must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(problems)
        }
    }
}
