//! The MQTT face of the edge-ingest module: subscribes (QoS 1, a persistent session, so the
//! broker keeps what arrives while we reconnect) to the connect, lwt and data topics; presence
//! messages go to Redis, data messages are batched into the queue. A message is acknowledged to
//! the broker only once it is stored (in Redis or the queue): a crash or an outage of either
//! loses nothing, the broker delivers again. Garbage is counted and acknowledged (dropped).

use std::{sync::Arc, time::Duration};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, Transport};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    metrics::Metrics,
    presence::Presence,
    queue::Queue,
    wire::{self, DataFormat},
};

/// Longest pause between reconnection attempts and between retries of a store.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// When a batch of data messages goes to the queue.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Once this many are waiting, the batch goes as soon as no other message is at hand.
    pub min: usize,
    /// A batch never holds more.
    pub max: usize,
    /// The first message of a batch waits at most this long.
    pub wait: Duration,
}

/// Where and what to subscribe to.
#[derive(Clone, Debug)]
pub struct MqttSettings {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    pub connect_topic: String,
    pub lwt_topic: String,
    /// Topic filters carrying data, with their payload format.
    pub data_topics: Vec<(String, DataFormat)>,
    pub batching: Batching,
}

/// `mqtt://[user:password@]host[:port]` or `mqtts://...`, as rumqttc options.
fn options(settings: &MqttSettings) -> Result<MqttOptions, String> {
    let url = &settings.url;
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!(
            "--mqtt-url `{}` must start with mqtt:// or mqtts://",
            crate::presence::redacted(url)
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((credentials, address)) => (Some(credentials), address),
        None => (None, rest),
    };
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("--mqtt-url: `{port}` is not a port"))?,
        ),
        None => (address, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err("--mqtt-url has no host".into());
    }
    let mut options = MqttOptions::new(&settings.client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (user, password) = match credentials.map(|c| c.split_once(':').unwrap_or((c, ""))) {
        Some((user, password)) => (Some(user.to_owned()), Some(password.to_owned())),
        None => (settings.username.clone(), settings.password.clone()),
    };
    if let Some(user) = user {
        options.set_credentials(user, password.unwrap_or_default());
    }
    if tls {
        options.set_transport(Transport::tls_with_default_config());
    }
    Ok(options)
}

/// Checks the URL without connecting (for start-up errors).
pub fn check(settings: &MqttSettings) -> Result<(), String> {
    options(settings).map(|_| ())
}

/// Runs the MQTT face until `stop` completes.
pub async fn run(
    settings: MqttSettings,
    queue: Arc<dyn Queue>,
    presence: Option<Arc<Presence>>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let options = match options(&settings) {
        Ok(options) => options,
        Err(error) => {
            warn!(%error, "MQTT face not started");
            return;
        }
    };
    let (client, mut events) = AsyncClient::new(options, 256);
    let (publishes, incoming) = mpsc::unbounded_channel();
    let handler = Handler {
        settings: settings.clone(),
        client: client.clone(),
        queue,
        presence,
        metrics,
    };
    let handling = tokio::spawn(handler.run(incoming));
    let mut topics = vec![settings.connect_topic.clone(), settings.lwt_topic.clone()];
    topics.extend(settings.data_topics.iter().map(|(topic, _)| topic.clone()));
    let broker = crate::presence::redacted(&settings.url);
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let event = tokio::select! {
            event = events.poll() => event,
            () = &mut stop => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(200);
                info!(%broker, session_present = ack.session_present, topics = ?topics, "MQTT connected; subscribing");
                for topic in &topics {
                    // The request queue is drained by this very loop: never wait on it here.
                    if let Err(error) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                        warn!(%topic, %error, "MQTT subscribe not sent");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publishes.send(publish).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%broker, %error, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stop => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let _ = client.try_disconnect();
    drop(publishes);
    let _ = handling.await;
}

/// Handles publishes in order; stores, then acknowledges.
struct Handler {
    settings: MqttSettings,
    client: AsyncClient,
    queue: Arc<dyn Queue>,
    presence: Option<Arc<Presence>>,
    metrics: Arc<Metrics>,
}

/// A data topic's pending batch.
struct Batch {
    topic: String,
    messages: Vec<serde_json::Value>,
    publishes: Vec<Publish>,
    deadline: tokio::time::Instant,
}

impl Handler {
    async fn run(self, mut incoming: mpsc::UnboundedReceiver<Publish>) {
        let mut batch: Option<Batch> = None;
        loop {
            let deadline = batch.as_ref().map(|b| b.deadline);
            let next = tokio::select! {
                next = incoming.recv() => next,
                () = async {
                    match deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(full) = batch.take() {
                        self.flush(full).await;
                    }
                    continue;
                }
            };
            let Some(publish) = next else {
                // Shutting down: an unsent batch is not acknowledged, so the broker redelivers it.
                return;
            };
            let topic = publish.topic.clone();
            self.metrics.mqtt_message(&self.topic_label(&topic));
            if topic == self.settings.connect_topic {
                self.presence(publish, true).await;
            } else if topic == self.settings.lwt_topic {
                self.presence(publish, false).await;
            } else if let Some(format) = self.format_of(&topic) {
                match wire::decode_data(format, &publish.payload) {
                    Ok(message) => {
                        // One batch per topic: another topic's message closes the current one.
                        if batch.as_ref().is_some_and(|b| b.topic != topic)
                            && let Some(other) = batch.take()
                        {
                            self.flush(other).await;
                        }
                        let current = batch.get_or_insert_with(|| Batch {
                            topic: topic.clone(),
                            messages: Vec::new(),
                            publishes: Vec::new(),
                            deadline: tokio::time::Instant::now() + self.settings.batching.wait,
                        });
                        current.messages.push(message);
                        current.publishes.push(publish);
                        let len = current.messages.len();
                        let ready = len >= self.settings.batching.max
                            || (len >= self.settings.batching.min && incoming.is_empty());
                        if ready && let Some(full) = batch.take() {
                            self.flush(full).await;
                        }
                    }
                    Err(error) => self.garbage(publish, &error).await,
                }
            } else {
                self.garbage(publish, "no handler for this topic").await;
            }
        }
    }

    /// The configured topic (or filter) a message came in on: metrics are labelled by it, so
    /// wildcards cannot multiply the series.
    fn topic_label(&self, topic: &str) -> String {
        if topic == self.settings.connect_topic || topic == self.settings.lwt_topic {
            return topic.to_owned();
        }
        self.settings
            .data_topics
            .iter()
            .find(|(filter, _)| wire::topic_matches(filter, topic))
            .map_or_else(|| "other".to_owned(), |(filter, _)| filter.clone())
    }

    fn format_of(&self, topic: &str) -> Option<DataFormat> {
        self.settings
            .data_topics
            .iter()
            .find(|(filter, _)| wire::topic_matches(filter, topic))
            .map(|(_, format)| *format)
    }

    async fn ack(&self, publish: &Publish) {
        if let Err(error) = self.client.ack(publish).await {
            debug!(%error, "MQTT ack not sent (disconnected; the broker will redeliver)");
        }
    }

    async fn garbage(&self, publish: Publish, why: &str) {
        debug!(topic = %publish.topic, bytes = publish.payload.len(), why, "MQTT message ignored");
        self.metrics.decode_error(&self.topic_label(&publish.topic));
        self.ack(&publish).await;
    }

    async fn presence(&self, publish: Publish, connected: bool) {
        let decoded = if connected {
            wire::decode_connect(&publish.payload).map(|device| (device, None))
        } else {
            wire::decode_lwt(&publish.payload).map(|(device, delay)| (device, Some(delay)))
        };
        let (device, delay) = match decoded {
            Ok(decoded) => decoded,
            Err(error) => return self.garbage(publish, &error).await,
        };
        let Some(presence) = &self.presence else {
            debug!(%device, "presence message without --redis-url: counted only");
            return self.ack(&publish).await;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let stored = match delay {
                None => presence.online(&device).await,
                Some(delay) => presence.leaving(&device, delay).await,
            };
            match stored {
                Ok(()) => break,
                Err(error) => {
                    // Not acknowledged until stored: the broker holds further messages back.
                    warn!(%device, %error, retry_in_ms = backoff.as_millis() as u64, "presence not stored in Redis; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        debug!(%device, ?delay, "presence stored");
        self.ack(&publish).await;
    }

    async fn flush(&self, batch: Batch) {
        let body = json!({
            "topic": batch.topic,
            "count": batch.messages.len(),
            "messages": batch.messages,
        })
        .to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.queue.send_to(&batch.topic, body.clone()).await {
                Ok(message_id) => {
                    debug!(topic = %batch.topic, count = batch.publishes.len(), %message_id, "data batch queued");
                    self.metrics.queued.inc();
                    break;
                }
                Err(error) => {
                    warn!(topic = %batch.topic, %error, retry_in_ms = backoff.as_millis() as u64, "data batch not queued; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        for publish in &batch.publishes {
            self.ack(publish).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> MqttSettings {
        MqttSettings {
            url: url.into(),
            username: None,
            password: None,
            client_id: "test".into(),
            connect_topic: "connect".into(),
            lwt_topic: "lwt".into(),
            data_topics: vec![],
            batching: Batching {
                min: 1,
                max: 10,
                wait: Duration::from_secs(1),
            },
        }
    }

    #[test]
    fn broker_urls() {
        let plain = options(&settings("mqtt://broker:1884")).unwrap();
        assert_eq!(plain.broker_address(), ("broker".to_owned(), 1884));
        let with_user = options(&settings("mqtt://edge:s3cret@broker")).unwrap();
        assert_eq!(with_user.broker_address(), ("broker".to_owned(), 1883));
        let login = with_user.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("edge", "s3cret")
        );
        assert_eq!(
            options(&settings("mqtts://broker"))
                .unwrap()
                .broker_address()
                .1,
            8883
        );
        for bad in ["http://broker", "mqtt://", "mqtt://broker:port"] {
            assert!(options(&settings(bad)).is_err(), "{bad}");
        }
        let error = options(&settings("tcp://user:pw@broker")).unwrap_err();
        assert!(!error.contains("pw"), "the password is not shown: {error}");
    }
}
