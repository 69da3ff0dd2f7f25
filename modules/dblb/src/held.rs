//! A client of a session-pooled route that the DBLB authenticated itself: it holds one pooled
//! server connection from its greeting to its end, relayed as a two-way copy, both sides
//! framed on the fly (no buffering): the client's to count its queries and keep its Terminate
//! from the server, the server's to know when every request has been answered. A client that
//! leaves at a message boundary with everything answered and the server idle (ReadyForQuery
//! `I`) hands the connection back, reset with `DISCARD ALL`; any other end (a transaction
//! open, answers still due, a message cut short, the server closing, a failed reset) closes it.

use std::{io, sync::Mutex};

use marchproxy_runtime::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::{
    Dblb,
    pool::PoolClient,
    postgres::{ClientKey, ClientStream, error_response},
    relay::{Framer, Framing},
    table::Engine,
    transaction::Progress,
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
    let (mut client_read, mut client_write) = client.halves();
    // Both directions run in this one task: the lock is never contended.
    let progress = Mutex::new(Progress::new());
    // Only ever held for a call that cannot panic halfway, so a poisoned lock is whole.
    let progress = || progress.lock().unwrap_or_else(|e| e.into_inner());
    let left_cleanly = {
        let (mut server_read, mut server_write) = conn.stream.split();
        let upstream = async {
            let mut framer = Framer::new(Framing::Postgres);
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                let n = client_read.read(&mut buffer).await?;
                if n == 0 {
                    return io::Result::Ok(framer.at_boundary());
                }
                let (mut counted, mut terminated) = (0, false);
                framer.feed(&buffer[..n], |kind, _| match kind {
                    b'X' => terminated = true,
                    kind => {
                        counted += u64::from(matches!(kind, b'Q' | b'E'));
                        progress().client_sends(kind);
                    }
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
        let downstream = async {
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                let n = server_read.read(&mut buffer).await?;
                if n == 0 {
                    let _ = client_write.shutdown().await;
                    return io::Result::Ok(());
                }
                // Accounted before the client can see it, so an answer it reacts to by
                // leaving is already counted.
                progress().server_sent(&buffer[..n]);
                client_write.write_all(&buffer[..n]).await?;
                client_write.flush().await?;
                stats.bytes_sent(n as u64);
            }
        };
        tokio::select! {
            up = upstream => up.unwrap_or(false),
            // The server closed or failed: its connection goes with the session.
            _ = downstream => false,
        }
    };
    let reusable = left_cleanly && progress().idle();
    if reusable {
        key.clear();
        pool.reset_and_release(conn);
    }
    Ok(())
}
