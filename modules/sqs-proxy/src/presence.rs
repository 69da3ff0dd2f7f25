//! Device presence in Redis, as edge systems already keep it: `SET <device> ""` when a device
//! connects, `SET <device> "" EX <delay>` when its last will arrives. If the key expires, the
//! device did not come back in time: an outage. Redis announces the expiry (keyspace
//! notifications, `notify-keyspace-events Ex`, which this module sets when the server allows);
//! the set `marchproxy:leaving` holds the devices in their grace period, and removing a device
//! from it decides which instance reports the outage (exactly one, and only for devices that
//! left through their last will). Outages go to the `lwt` queue and, batched, to the alert
//! webhook. The expiry listener reconnects and re-subscribes after a Redis restart, and sweeps
//! the set for keys that expired while it was not listening.
//!
//! Device names are Redis keys, so names that would touch our own keys (`marchproxy:...`) are
//! refused, and grace periods are capped at a week.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use redis::{AsyncCommands, aio::ConnectionManager};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::{metrics::Metrics, queue::Queue};

/// The set of devices in their grace period (their last will arrived, their key expires).
const LEAVING: &str = "marchproxy:leaving";
/// Longest pause between reconnection attempts to Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the leaving set is swept for keys whose expiry notification was missed.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The longest grace period a last will may ask for.
pub const MAX_DELAY_SECONDS: u64 = 7 * 24 * 3600;
/// Devices remembered for `GET /devices`; past it, the offline ones heard from longest ago go.
const MAX_DEVICES: usize = 100_000;
/// Longest a Redis command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a device stands, as `GET /devices` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Online,
    /// Its last will arrived; gone unless it reconnects before `expires_at`.
    Leaving,
    Offline,
}

#[derive(Clone, Debug, Serialize)]
pub struct Device {
    pub device: String,
    pub state: State,
    /// Unix seconds of the last thing heard (connect, last will or outage).
    pub last_seen: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Presence state shared by the MQTT face, the expiry listener and `GET /devices`.
pub struct Presence {
    client: redis::Client,
    commands: ConnectionManager,
    /// The Redis database the keys live in (from the URL's path).
    database: i64,
    devices: DashMap<String, Device>,
    outages: mpsc::Sender<String>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error(
        "--redis-url {url}: {source}; write redis://[user:password@]host:port[/db] or rediss://..."
    )]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot reach Redis at {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
}

/// A Redis client and a reconnecting, timed connection for `url` (shown redacted in errors).
pub async fn connect_redis(
    url: &str,
    timeout: Duration,
) -> Result<(redis::Client, ConnectionManager), PresenceError> {
    let shown = redacted(url);
    let client = redis::Client::open(url).map_err(|source| PresenceError::Url {
        url: shown.clone(),
        source,
    })?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    let commands = ConnectionManager::new_with_config(client.clone(), config)
        .await
        .map_err(|source| PresenceError::Connect { url: shown, source })?;
    Ok((client, commands))
}

/// Whether retrying can help (the server was unreachable), as opposed to a refused command.
pub fn transient(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

/// Why a device name cannot be a presence key, if it cannot.
pub fn refused_name(device: &str) -> Option<&'static str> {
    if device.starts_with("marchproxy:") {
        Some("device names starting with `marchproxy:` are reserved")
    } else if device.len() > 256 {
        Some("device names are at most 256 bytes")
    } else {
        None
    }
}

/// Hides the password of a URL for logs.
pub fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() => {
            let host = &url[at + 1..];
            let user = rest.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

impl Presence {
    /// Connects to Redis; outage events go to `outages` (see [`report_outages`]).
    pub async fn connect(
        url: &str,
        outages: mpsc::Sender<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, PresenceError> {
        let (client, commands) = connect_redis(url, COMMAND_TIMEOUT).await?;
        let database = client.get_connection_info().redis.db;
        Ok(Arc::new(Presence {
            client,
            commands,
            database,
            devices: DashMap::new(),
            outages,
            metrics,
        }))
    }

    fn note(&self, device: &str, state: State) {
        let was = self.devices.insert(
            device.to_owned(),
            Device {
                device: device.to_owned(),
                state,
                last_seen: unix_now(),
            },
        );
        let counted = |s: Option<State>| i64::from(s.is_some_and(|s| s != State::Offline));
        self.metrics
            .devices_online
            .add(counted(Some(state)) - counted(was.map(|d| d.state)));
        if self.devices.len() > MAX_DEVICES {
            let mut offline: Vec<(u64, String)> = self
                .devices
                .iter()
                .filter(|d| d.state == State::Offline)
                .map(|d| (d.last_seen, d.key().clone()))
                .collect();
            offline.sort_unstable();
            for (_, name) in offline.into_iter().take(MAX_DEVICES / 10) {
                self.devices.remove(&name);
            }
        }
    }

    /// A device connected: its key stays without expiry, and a pending outage is called off.
    pub async fn online(&self, device: &str) -> redis::RedisResult<()> {
        let mut commands = self.commands.clone();
        redis::pipe()
            .atomic()
            .set(device, "")
            .ignore()
            .srem(LEAVING, device)
            .ignore()
            .query_async::<()>(&mut commands)
            .await?;
        self.note(device, State::Online);
        Ok(())
    }

    /// A device's last will arrived: its key expires after `delay` seconds unless it reconnects.
    pub async fn leaving(&self, device: &str, delay: u64) -> redis::RedisResult<()> {
        let mut commands = self.commands.clone();
        redis::pipe()
            .atomic()
            .set_ex(device, "", delay.clamp(1, MAX_DELAY_SECONDS))
            .ignore()
            .sadd(LEAVING, device)
            .ignore()
            .query_async::<()>(&mut commands)
            .await?;
        self.note(device, State::Leaving);
        Ok(())
    }

    /// Every device heard of, by name.
    pub fn devices(&self) -> Vec<Device> {
        let sorted: BTreeMap<String, Device> = self
            .devices
            .iter()
            .map(|d| (d.key().clone(), d.value().clone()))
            .collect();
        sorted.into_values().collect()
    }

    /// Turns on expiry notifications if the server lets us (managed Redis often refuses CONFIG);
    /// an error says what the operator must set instead.
    async fn enable_notifications(&self) -> Result<(), String> {
        let mut commands = self.commands.clone();
        let current: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut commands)
            .await
            .unwrap_or_default();
        let flags = current.get(1).cloned().unwrap_or_default();
        let has_expired = flags.contains('x') || flags.contains('A');
        if flags.contains('E') && has_expired {
            return Ok(());
        }
        let wanted = format!("{flags}Ex");
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg(&wanted)
            .query_async::<()>(&mut commands)
            .await
            .map_err(|e| {
                format!("cannot turn on expiry notifications ({e}); set `notify-keyspace-events Ex` in the Redis server's configuration")
            })
    }

    /// Listens for expired keys until `stop` completes, reconnecting after failures.
    pub async fn listen(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let channel = format!("__keyevent@{}__:expired", self.database);
        let mut backoff = Duration::from_millis(200);
        loop {
            let listening = async {
                if let Err(problem) = self.enable_notifications().await {
                    warn!(%problem, "presence: outages cannot be seen");
                }
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                info!(%channel, "presence: listening for expired devices");
                let mut messages = pubsub.on_message();
                let mut sweeps = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else { break };
                            if let Ok(key) = message.get_payload::<String>() {
                                self.expired(&key).await;
                            }
                        }
                        // The first tick is at once: what expired while we were away.
                        _ = sweeps.tick() => self.sweep().await?,
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            tokio::select! {
                ended = listening => match ended {
                    Ok(()) => warn!("presence: Redis closed the notification stream; reconnecting"),
                    Err(error) => warn!(%error, retry_in_ms = backoff.as_millis() as u64, "presence: Redis unavailable; reconnecting"),
                },
                () = &mut stop => return,
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut stop => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Devices in their grace period whose key is gone: their notification was missed.
    async fn sweep(&self) -> redis::RedisResult<()> {
        let mut commands = self.commands.clone();
        let leaving: Vec<String> = commands.smembers(LEAVING).await?;
        for device in leaving {
            if !commands.exists::<_, bool>(&device).await? {
                self.expired(&device).await;
            }
        }
        Ok(())
    }

    async fn expired(&self, key: &str) {
        let mut commands = self.commands.clone();
        // Only one instance removes it: that one reports the outage.
        match commands.srem::<_, _, i64>(LEAVING, key).await {
            Ok(1) => {
                self.note(key, State::Offline);
                self.metrics.outages.inc();
                if self.outages.send(key.to_owned()).await.is_err() {
                    warn!(device = key, "presence: outage reporting stopped");
                }
            }
            Ok(_) => {}
            Err(error) => {
                warn!(device = key, %error, "presence: cannot settle an expired device")
            }
        }
    }
}

/// Reports outages: each to the `lwt` queue, and together (one alert per `window`) to the
/// webhook. Ends when every sender is gone.
pub async fn report_outages(
    mut outages: mpsc::Receiver<String>,
    lwt_queue: Arc<dyn Queue>,
    webhook: Option<crate::alerts::Webhook>,
    window: Duration,
) {
    while let Some(first) = outages.recv().await {
        let mut devices = vec![first];
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(next)) = tokio::time::timeout_at(deadline, outages.recv()).await {
            devices.push(next);
        }
        devices.sort();
        devices.dedup();
        let at = unix_now();
        for device in &devices {
            let event = serde_json::json!({"event": "outage", "device": device, "at": at});
            let mut attempt = 0;
            loop {
                match lwt_queue.send(event.to_string()).await {
                    Ok(_) => break,
                    Err(error) if attempt < 5 => {
                        attempt += 1;
                        warn!(%device, %error, attempt, "outage event not queued yet; retrying");
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    }
                    Err(error) => {
                        warn!(%device, %error, "outage event could not be queued");
                        break;
                    }
                }
            }
        }
        info!(devices = ?devices, "devices went offline");
        if let Some(webhook) = &webhook {
            webhook.alert(&devices).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls() {
        assert!(refused_name("marchproxy:leaving").is_some());
        assert!(refused_name(&"d".repeat(300)).is_some());
        assert_eq!(refused_name("sensor-7"), None);
        assert_eq!(
            redacted("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
    }
}
