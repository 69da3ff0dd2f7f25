//! MySQL and MariaDB sessions. The server speaks first, so the server is chosen when the client
//! connects (by listener), its greeting is the first thing the client reads, and from there
//! bytes are copied both ways (authentication included). A client that cannot be served gets
//! an ERR packet in place of the greeting, which every MySQL client shows as an error.

use std::sync::Arc;

use marchproxy_runtime::tcp::Accepted;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use crate::{
    Dblb, Refusal,
    metrics::Outcome,
    relay::{self, Framing},
    table::{Engine, Want},
};

/// ER_CON_COUNT_ERROR: what MySQL itself answers when it has no room.
const TOO_MANY_CONNECTIONS: u16 = 1040;
/// ER_BAD_DB_ERROR.
const NO_DATABASE: u16 = 1049;
/// ER_UNKNOWN_ERROR, for servers that are all down.
const UNAVAILABLE: u16 = 1105;

/// An ERR packet sent in place of the greeting: an error code and message. No SQL state:
/// before the handshake no capabilities are agreed, and MySQL itself omits it there.
pub fn greeting_error(code: u16, message: &str) -> Vec<u8> {
    let mut payload = vec![0xff];
    payload.extend_from_slice(&code.to_le_bytes());
    payload.extend_from_slice(message.as_bytes());
    packet(0, &payload)
}

/// A packet: 3-byte little-endian length, sequence number, payload (under 16 MiB here).
pub fn packet(sequence: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    packet.push(sequence);
    packet.extend_from_slice(payload);
    packet
}

/// Serves one client connection on a MySQL listener.
pub async fn serve(dblb: Arc<Dblb>, accepted: Accepted) {
    let Accepted {
        mut stream,
        client,
        listener,
        stats,
    } = accepted;
    let _ = stream.set_nodelay(true);
    let request = stats.request();
    let want = Want {
        engine: Engine::Mysql,
        listener_port: listener.addr.port(),
        database: "*",
        read_only: false,
        tried: &[],
    };
    let (lease, server) = match dblb.open(want).await {
        Ok(opened) => opened,
        Err(refusal) => {
            info!(%client, listener = %listener.addr, %refusal, "MySQL session refused");
            dblb.metrics
                .session(Engine::Mysql.name(), refusal.outcome());
            let code = match &refusal {
                Refusal::NoRoute => NO_DATABASE,
                Refusal::Unavailable(_) => UNAVAILABLE,
                Refusal::Full(_) => TOO_MANY_CONNECTIONS,
            };
            // MySQL's own messages start with a capital ("Too many connections").
            let message = refusal.to_string();
            let message = match message.chars().next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(message.chars().skip(1))
                    .collect(),
                None => message,
            };
            let _ = stream.write_all(&greeting_error(code, &message)).await;
            return;
        }
    };
    debug!(%client, backend = %lease.backend.address, route = %lease.route_id, "MySQL session");
    let _ = server.set_nodelay(true);
    let queries = dblb.metrics.query_counter(Engine::Mysql.name());
    let relayed = relay::session(
        stream.into_split(),
        server,
        Framing::Mysql,
        &queries,
        &stats,
    )
    .await;
    if let Err(error) = relayed {
        debug!(%client, %error, "MySQL session ended with an error");
    }
    drop(lease);
    dblb.metrics.session(Engine::Mysql.name(), Outcome::Served);
    request.finish(true);
}

/// Answers a client over its rate limit with the ERR packet MySQL sends when it is full.
pub async fn refuse_rate_limited(accepted: Accepted, retry_after: std::time::Duration) {
    let message = format!(
        "Too many connections from {}: over the rate limit; retry in {} s",
        accepted.client.ip(),
        retry_after.as_secs().max(1)
    );
    let mut stream = accepted.stream;
    let _ = stream
        .write_all(&greeting_error(TOO_MANY_CONNECTIONS, &message))
        .await;
}
