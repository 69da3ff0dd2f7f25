//! A client of a session-pooled route that the DBLB authenticated itself: it holds one pooled
//! server connection from its greeting to its end, relayed as a plain two-way copy (only the
//! client's side framed, to count queries and to keep its Terminate from the server). When
//! the client leaves, the connection is reset with `DISCARD ALL` and goes back to the pool; a
//! server that closed, or a reset that fails (a transaction left open, a COPY cut short),
//! closes it instead.

use std::io;

use marchproxy_runtime::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::{
    Dblb,
    pool::PoolClient,
    postgres::{ClientKey, ClientStream, error_response},
    relay::{self, Framer, Framing},
    table::Engine,
};

/// The Terminate message a client ends with: the DBLB keeps it, so the connection lives on.
const TERMINATE: &[u8] = b"X\0\0\0\x04";

/// Serves the client until it leaves.
pub async fn serve<S>(
    dblb: &Dblb,
    mut client: S,
    pool: &PoolClient,
    key: &ClientKey<'_>,
    stats: &Stats,
) -> io::Result<()>
where
    S: ClientStream,
{
    let mut conn = match pool.checkout(dblb, dblb.settings().queue_timeout()).await {
        Ok(conn) => conn,
        Err(error) => {
            debug!(route = %pool.route_id, %error, "no pooled connection for a session");
            client
                .write_all(&error_response(error.sqlstate(), &error.to_string()))
                .await?;
            return client.shutdown().await;
        }
    };
    dblb.metrics.checkouts(&pool.route_id).inc();
    key.point(&conn.address, conn.key);
    let queries = dblb.metrics.query_counter(Engine::Postgres.name());
    let (mut client_read, client_write) = client.halves();
    let left_cleanly = {
        let (server_read, mut server_write) = conn.stream.split();
        let upstream = async {
            let mut framer = Framer::new(Framing::Postgres);
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                let n = client_read.read(&mut buffer).await?;
                if n == 0 {
                    return io::Result::Ok(true);
                }
                let (mut counted, mut terminated) = (0, false);
                framer.feed(&buffer[..n], |kind, _| match kind {
                    b'Q' | b'E' => counted += 1,
                    b'X' => terminated = true,
                    _ => {}
                });
                let chunk = &buffer[..n];
                let forward = match (terminated, chunk.strip_suffix(TERMINATE)) {
                    (false, _) => chunk,
                    (true, Some(before)) => before,
                    // Bytes after a Terminate, or one split across reads: not a clean end.
                    (true, None) => return Ok(false),
                };
                server_write.write_all(forward).await?;
                stats.bytes_received(n as u64);
                queries.inc_by(counted);
                if terminated {
                    return Ok(true);
                }
            }
        };
        let downstream = relay::pump(server_read, client_write, None, |bytes, _| {
            stats.bytes_sent(bytes)
        });
        tokio::select! {
            up = upstream => up.unwrap_or(false),
            // The server closed or failed: its connection goes with the session.
            _ = downstream => false,
        }
    };
    if left_cleanly {
        key.clear();
        pool.reset_and_release(conn);
    }
    Ok(())
}
