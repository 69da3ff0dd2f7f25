//! The ALB's flags and its `[module]` settings (also `UpdateConfig` `module`, merged key by key):
//! the defaults every route starts from (timeouts, retries, health checks, outlier ejection,
//! upstream connection pools). A route's `metadata` overrides them for that route.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use marchproxy_runtime::CommonArgs;
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(
    name = "marchproxy-alb",
    about = "MarchProxy's ALB module: an HTTP/1.1, HTTP/2 and WebSocket reverse proxy with host/path routing, weighted upstream pools, health checks, outlier ejection, retries and rate limits",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PEM certificate chain for `https=ADDR` listeners (HTTP/2 and HTTP/1.1 by ALPN)
    #[arg(long, env = "MARCHPROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "MARCHPROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub forward: ForwardArgs,
}

/// The caching forward proxy for device updates: absolute-URI requests (`GET http://host/path`
/// sent to the ALB as a proxy) are fetched upstream and cached on disk.
#[derive(Clone, Debug, clap::Args)]
pub struct ForwardArgs {
    /// Answer absolute-URI requests as a forward proxy, relaying without a cache (implied by
    /// --cache-dir, which adds the cache)
    #[arg(long, env = "MARCHPROXY_FORWARD_PROXY")]
    pub forward_proxy: bool,
    /// Cache forward-proxied files in this directory
    #[arg(long, env = "MARCHPROXY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Start with an empty cache (everything in --cache-dir is removed)
    #[arg(long, env = "MARCHPROXY_INIT_CACHE")]
    pub init_cache: bool,
    /// A byte budget for the cache; without it the limits apply to its filesystem's use
    #[arg(long, env = "MARCHPROXY_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// Above this percentage of the budget (or filesystem), least recently used files are
    /// evicted to make room
    #[arg(long, env = "MARCHPROXY_CACHE_SOFT_LIMIT", default_value_t = 75, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub cache_soft_limit: u8,
    /// At this percentage, nothing new is cached: requests are relayed
    #[arg(long, env = "MARCHPROXY_CACHE_HARD_LIMIT", default_value_t = 80, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub cache_hard_limit: u8,
    /// Send upstream requests through this HTTP proxy (e.g. another caching proxy:
    /// `Ota-File-Cache-Control` is passed on to it); https:// through a CONNECT tunnel
    #[arg(long, env = "MARCHPROXY_UPPER_PROXY")]
    pub upper_proxy: Option<String>,
    /// Fetch http:// URLs from their servers over https://
    #[arg(long, env = "MARCHPROXY_UPSTREAM_HTTPS")]
    pub upstream_https: bool,
    /// Forward-proxy requests served at once; more are answered 429
    #[arg(long, env = "MARCHPROXY_FORWARD_MAX_REQUESTS", default_value_t = 1024)]
    pub forward_max_requests: usize,
}

impl ForwardArgs {
    pub fn enabled(&self) -> bool {
        self.forward_proxy || self.cache_dir.is_some()
    }
}

/// `[module]`: defaults for every route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Whole time for a request's answer to start, retries included (route `timeout_ms`).
    pub timeout_ms: u64,
    /// Time for one upstream try to answer; 0 means `timeout_ms` (route `try_timeout_ms`).
    pub try_timeout_ms: u64,
    /// Further tries on another server after a failure (route `retries`).
    pub retries: u32,
    /// Request bodies up to this size are kept so the request can be retried; larger or
    /// unsized bodies stream straight through and are tried once.
    pub retry_body_limit: usize,
    /// Time to open an upstream connection before that try counts as a connect failure.
    pub connect_timeout_ms: u64,
    /// Idle upstream connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Idle upstream connections kept per server.
    pub max_idle_per_server: usize,
    pub health_check: HealthCheck,
    pub outlier: Outlier,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout_ms: 30_000,
            try_timeout_ms: 0,
            retries: 1,
            retry_body_limit: 64 * 1024,
            connect_timeout_ms: 2_000,
            idle_timeout_ms: 90_000,
            max_idle_per_server: 256,
            health_check: HealthCheck::default(),
            outlier: Outlier::default(),
        }
    }
}

/// Active health checks, named as in `HealthCheckConfig`; off until a path is given (here, or
/// per route as metadata `health_check_path`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// GET this path on every server; a 2xx or 3xx answer passes.
    pub health_check_path: Option<String>,
    pub interval_seconds: f64,
    pub timeout_seconds: f64,
    /// Passes in a row that bring a server back.
    pub healthy_threshold: u32,
    /// Failures in a row that take a server out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            health_check_path: None,
            interval_seconds: 5.0,
            timeout_seconds: 2.0,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
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

    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(path) = &self.health_check_path {
            if !path.starts_with('/') {
                problems.push(format!(
                    "{prefix}health_check_path `{path}` must start with /"
                ));
            }
        }
        for (name, value) in [
            ("interval_seconds", self.interval_seconds),
            ("timeout_seconds", self.timeout_seconds),
        ] {
            if !(0.05..=3600.0).contains(&value) {
                problems.push(format!(
                    "{prefix}{name} must be from 0.05 to 3600 (got {value})"
                ));
            }
        }
        for (name, value) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if !(1..=100).contains(&value) {
                problems.push(format!(
                    "{prefix}{name} must be from 1 to 100 (got {value})"
                ));
            }
        }
        problems
    }
}

/// Passive outlier ejection: a server that fails `consecutive_failures` times in a row (5xx
/// answers, connect failures, timeouts) gets no requests for `base_ejection_ms`, doubled on
/// each repeat up to `max_ejection_ms`. At most half of a pool is ejected at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    /// 0 turns passive ejection off.
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
        }
    }
}

impl Settings {
    /// These settings with the keys of `update` replaced, checked.
    pub fn merged(&self, update: &serde_json::Value) -> Result<Settings, Vec<String>> {
        let settings: Settings = marchproxy_runtime::config::merge_section("module", self, update)?;
        let mut problems = settings.health_check.problems("module.health_check.");
        if settings.timeout_ms == 0 || settings.timeout_ms > 3_600_000 {
            problems.push("module.timeout_ms must be from 1 to 3600000".into());
        }
        if settings.connect_timeout_ms == 0 || settings.connect_timeout_ms > 60_000 {
            problems.push("module.connect_timeout_ms must be from 1 to 60000".into());
        }
        if settings.retries > 10 {
            problems.push("module.retries must be at most 10".into());
        }
        if settings.outlier.base_ejection_ms == 0
            || settings.outlier.max_ejection_ms < settings.outlier.base_ejection_ms
        {
            problems.push(
                "module.outlier: base_ejection_ms must be above 0 and at most max_ejection_ms"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(settings)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_merge_and_every_problem_is_named() {
        let merged = Settings::default()
            .merged(&serde_json::json!({"retries": 3}))
            .unwrap();
        assert_eq!((merged.retries, merged.timeout_ms), (3, 30_000));
        let problems = Settings::default()
            .merged(&serde_json::json!({
                "timeout_ms": 0,
                "health_check": {"health_check_path": "health", "interval_seconds": 0},
                "outlier": {"base_ejection_ms": 10, "max_ejection_ms": 1}
            }))
            .unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            Settings::default()
                .merged(&serde_json::json!({"nonsense": 1}))
                .unwrap_err()[0]
                .contains("nonsense")
        );
    }
}
