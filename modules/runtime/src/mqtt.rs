//! The MQTT session loop shared by the modules that take messages from a broker (the SQS
//! proxy's edge face, the wasm-registry): poll the client's event loop until told to stop,
//! subscribe again after every connect (a broker that restarted has forgotten the
//! subscriptions, logged when the broker confirms them), and wait with a growing backoff between connection attempts. What a module
//! does with the events is its own ([`drive`]'s `on_event`).

use std::{future::Future, ops::ControlFlow, time::Duration};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, SubscribeFilter};
use tracing::{info, warn};

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs `events` until `stop` completes or `on_event` breaks. `broker` names the broker in
/// logs (without credentials); `filters` are subscribed on each CONNACK.
pub async fn drive(
    client: &AsyncClient,
    events: &mut EventLoop,
    broker: &str,
    filters: &[SubscribeFilter],
    stop: impl Future<Output = ()>,
    mut on_event: impl FnMut(Event) -> ControlFlow<()>,
) {
    tokio::pin!(stop);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let event = tokio::select! {
            event = events.poll() => event,
            () = &mut stop => return,
        };
        match event {
            Ok(event) => {
                if let Event::Incoming(Packet::ConnAck(_)) = &event {
                    backoff = FIRST_BACKOFF;
                    let topics: Vec<&str> = filters.iter().map(|f| f.path.as_str()).collect();
                    info!(%broker, ?topics, "MQTT connected; subscribing");
                    // The request queue is drained by this very loop: subscribe from another task.
                    let (client, filters) = (client.clone(), filters.to_vec());
                    tokio::spawn(async move {
                        if let Err(error) = client.subscribe_many(filters).await {
                            warn!(%error, "MQTT subscribe not sent");
                        }
                    });
                }
                if let Event::Incoming(Packet::SubAck(_)) = &event {
                    info!(%broker, "MQTT subscribed");
                }
                if on_event(event).is_break() {
                    return;
                }
            }
            Err(error) => {
                warn!(%broker, %error, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stop => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
