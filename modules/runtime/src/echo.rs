//! The smallest module: a line-based TCP echo. The runtime's tests run it, and it shows what a
//! module writes itself: its data plane (asking the rate limiter, counting connections,
//! requests and bytes) and its own config section. Nothing of ModuleService is here.
//!
//! Its config can also make it fail a share of its lines or answer slowly, so the NLB's
//! rollout tests have a stand-in version that goes bad on cue, with real heartbeat stats.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use marchproxy::{names::ModuleKind, pb};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::{DataPlane, Module, ModuleError, stats::Stats};

/// The `module` config section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoConfig {
    /// Written before every echoed line.
    #[serde(default)]
    prefix: String,
    /// Share of lines answered `ERR` and counted as failed requests (0 to 1).
    #[serde(default)]
    fail_ratio: f64,
    /// Wait before each answer.
    #[serde(default)]
    delay_ms: u64,
}

pub struct EchoModule {
    kind: ModuleKind,
    config: RwLock<EchoConfig>,
    lines: AtomicU64,
}

impl EchoModule {
    /// An echo that registers as a module of `kind` (tests stand it in for any kind).
    pub fn new(kind: ModuleKind) -> Arc<Self> {
        Arc::new(EchoModule {
            kind,
            config: RwLock::new(EchoConfig::default()),
            lines: AtomicU64::new(0),
        })
    }

    fn config(&self) -> EchoConfig {
        self.config.read().map(|c| c.clone()).unwrap_or_default()
    }

    async fn serve_connection(self: Arc<Self>, stream: TcpStream, stats: Arc<Stats>) {
        let (reader, mut writer) = stream.into_split();
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let request = stats.request();
            stats.bytes_received(line.len() as u64 + 1);
            let config = self.config();
            if config.delay_ms > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(config.delay_ms)).await;
            }
            // Exactly `fail_ratio` of the lines fail, spread evenly: line n fails when the
            // running count of failures owed goes up by one.
            let n = self.lines.fetch_add(1, Ordering::Relaxed) as f64;
            let fail = ((n + 1.0) * config.fail_ratio).floor() > (n * config.fail_ratio).floor();
            let reply = if fail {
                format!("{}ERR\n", config.prefix)
            } else {
                format!("{}{line}\n", config.prefix)
            };
            let sent = writer.write_all(reply.as_bytes()).await.is_ok();
            if sent {
                stats.bytes_sent(reply.len() as u64);
            }
            request.finish(sent && !fail);
            if !sent {
                break;
            }
        }
    }
}

#[tonic::async_trait]
impl Module for EchoModule {
    fn kind(&self) -> ModuleKind {
        self.kind
    }

    fn protocols(&self) -> Vec<pb::Protocol> {
        vec![pb::Protocol::Tcp]
    }

    async fn serve(self: Arc<Self>, plane: DataPlane) -> Result<(), ModuleError> {
        crate::tcp::serve(plane, move |accepted| {
            Arc::clone(&self).serve_connection(accepted.stream, accepted.stats)
        })
        .await
    }

    fn check_config(
        &self,
        _config_type: &str,
        config: &serde_json::Value,
    ) -> Result<(), Vec<String>> {
        let parsed: EchoConfig =
            serde_json::from_value(config.clone()).map_err(|e| vec![format!("module: {e}")])?;
        let mut errors = Vec::new();
        if parsed.prefix.len() > 64 {
            errors.push(format!(
                "module.prefix must be at most 64 bytes (got {})",
                parsed.prefix.len()
            ));
        }
        if !(0.0..=1.0).contains(&parsed.fail_ratio) {
            errors.push(format!(
                "module.fail_ratio must be from 0 to 1 (got {})",
                parsed.fail_ratio
            ));
        }
        if parsed.delay_ms > 60_000 {
            errors.push(format!(
                "module.delay_ms must be at most 60000 (got {})",
                parsed.delay_ms
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn apply_config(&self, _config_type: &str, config: &serde_json::Value) {
        if let (Ok(parsed), Ok(mut current)) = (
            serde_json::from_value::<EchoConfig>(config.clone()),
            self.config.write(),
        ) {
            *current = parsed;
        }
    }

    async fn health_checks(&self) -> Vec<(String, Result<String, String>)> {
        vec![(
            "echo".to_owned(),
            Ok(format!(
                "{} lines answered",
                self.lines.load(Ordering::Relaxed)
            )),
        )]
    }

    fn custom_stats(&self) -> HashMap<String, String> {
        HashMap::from([(
            "echo_lines".to_owned(),
            self.lines.load(Ordering::Relaxed).to_string(),
        )])
    }
}
