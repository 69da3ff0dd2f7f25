//! A client of a transaction-pooled route, after its login. The client's messages are read
//! one frame at a time; the first message of a transaction takes an idle server connection
//! from the pool, and the connection goes back once the server is idle again: its last
//! ReadyForQuery says `I`, every Query, FunctionCall and Sync sent has been answered, and no
//! extended-protocol message waits for a Sync. A client that leaves mid-transaction takes its
//! server connection with it (closing it rolls the transaction back).
//!
//! Named prepared statements live on one server connection, so a Parse that names one is
//! refused in words (unnamed statements and portals work); session state set with SQL (`SET`,
//! `LISTEN`, SQL `PREPARE`) stays on whichever connection ran it, as with PgBouncer's
//! transaction mode.

use std::io;

use bytes::{Buf, BytesMut};
use marchproxy_runtime::Stats;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    Dblb,
    pool::{Pool, ServerConn},
    postgres::{ClientKey, error_response},
    relay::{Framer, Framing},
    table::Engine,
};

/// PostgreSQL's own bound on a message.
const MAX_MESSAGE: u32 = 1 << 30;

/// A client message the scan stopped at.
enum Stop {
    Terminate,
    Invalid(u32),
    NamedStatement,
}

/// A server connection serving this client's transaction.
struct Attached {
    conn: ServerConn,
    /// ReadyForQuery answers still due (one per Query, FunctionCall and Sync sent).
    outstanding: u32,
    /// The transaction status of the last ReadyForQuery.
    status: u8,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    framer: Framer,
}

impl Attached {
    fn idle(&self) -> bool {
        self.outstanding == 0 && self.status == b'I' && !self.unsynced && self.framer.at_boundary()
    }
}

/// Serves the client until it leaves; `first` is its login connection, which joins the pool.
pub async fn serve(
    dblb: &Dblb,
    mut client: TcpStream,
    first: ServerConn,
    pool: &std::sync::Arc<Pool>,
    key: &ClientKey<'_>,
    stats: &Stats,
) -> io::Result<()> {
    let _counted = pool.client();
    pool.release(first);
    let wait = dblb.settings().queue_timeout();
    let protocol = Engine::Postgres.name();
    let mut pending = BytesMut::with_capacity(16 * 1024);
    let mut from_server = vec![0u8; 32 * 1024];
    let mut attached: Option<Attached> = None;
    // Body bytes of the client's current message still to pass to the server.
    let mut body_left: usize = 0;
    loop {
        // Whole messages (and the body in flight) go to the server in one write; the scan
        // stops at a message that needs a decision first.
        let mut ready = 0;
        let mut stop = None;
        while ready < pending.len() {
            if body_left > 0 {
                let n = body_left.min(pending.len() - ready);
                ready += n;
                body_left -= n;
                continue;
            }
            let header = &pending[ready..];
            if header.len() < 5 {
                break;
            }
            let kind = header[0];
            let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            if !(4..=MAX_MESSAGE).contains(&length) {
                stop = Some(Stop::Invalid(length));
                break;
            }
            match kind {
                b'X' => {
                    stop = Some(Stop::Terminate);
                    break;
                }
                b'P' if header.len() < 6 => break,
                b'P' if length > 4 && header[5] != 0 => {
                    stop = Some(Stop::NamedStatement);
                    break;
                }
                _ => {}
            }
            if attached.is_none() {
                let conn = match pool.checkout(wait).await {
                    Ok(conn) => conn,
                    Err(error) => {
                        debug!(route = %pool.route_id, %error, "no pooled connection for a transaction");
                        return refuse(&mut client, None, pool, "53300", &error.to_string()).await;
                    }
                };
                dblb.metrics.checkout(&pool.route_id);
                key.point(&conn.address, conn.key);
                attached = Some(Attached {
                    conn,
                    outstanding: 0,
                    status: b'I',
                    unsynced: false,
                    framer: Framer::new(Framing::Postgres),
                });
            }
            let Some(server) = attached.as_mut() else {
                return Err(io::Error::other("no server connection after checkout"));
            };
            match kind {
                b'Q' | b'F' => server.outstanding += 1,
                b'S' => {
                    server.outstanding += 1;
                    server.unsynced = false;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => server.unsynced = true,
                _ => {}
            }
            if matches!(kind, b'Q' | b'E') {
                dblb.metrics.queries(protocol, 1);
            }
            ready += 5;
            body_left = length as usize - 4;
        }
        if ready > 0 {
            let Some(server) = attached.as_mut() else {
                // Bytes are only marked ready once a connection is attached, and it stays
                // attached until they have gone.
                return Err(io::Error::other("client bytes without a server connection"));
            };
            server.conn.stream.write_all(&pending[..ready]).await?;
            stats.bytes_received(ready as u64);
            pending.advance(ready);
        }
        match stop {
            Some(Stop::Terminate) => return finish(attached, pool),
            Some(Stop::Invalid(length)) => {
                let message = format!("invalid message length {length}");
                return refuse(&mut client, attached, pool, "08P01", &message).await;
            }
            Some(Stop::NamedStatement) => {
                let message = "named prepared statements cannot be pooled by transaction: use unnamed statements (e.g. pgbench -M extended) or a route with pool_mode = session";
                return refuse(&mut client, attached, pool, "0A000", message).await;
            }
            None => {}
        }
        if body_left == 0 && attached.as_ref().is_some_and(Attached::idle) {
            if let Some(server) = attached.take() {
                key.clear();
                pool.release(server.conn);
            }
        }
        tokio::select! {
            read = client.read_buf(&mut pending) => {
                if read? == 0 {
                    return finish(attached, pool);
                }
            }
            read = read_server(&mut attached, &mut from_server) => {
                let n = match read {
                    Ok(n) if n > 0 => n,
                    _ => {
                        let message = "the server closed the connection during the transaction";
                        return refuse(&mut client, None, pool, "08006", message).await;
                    }
                };
                let Some(server) = attached.as_mut() else {
                    return Err(io::Error::other("server bytes without a server connection"));
                };
                let (mut answered, mut status) = (0, None);
                server.framer.feed(&from_server[..n], |kind, first| {
                    if kind == b'Z' {
                        answered += 1;
                        status = first;
                    }
                });
                server.outstanding = server.outstanding.saturating_sub(answered);
                if let Some(status) = status {
                    server.status = status;
                }
                client.write_all(&from_server[..n]).await?;
                stats.bytes_sent(n as u64);
            }
        }
    }
}

/// Reads from the attached server; pending forever while none is attached.
async fn read_server(attached: &mut Option<Attached>, buffer: &mut [u8]) -> io::Result<usize> {
    match attached {
        Some(server) => server.conn.stream.read(buffer).await,
        None => std::future::pending().await,
    }
}

/// The client left: an idle connection goes back to the pool, one mid-transaction is closed.
fn finish(attached: Option<Attached>, pool: &Pool) -> io::Result<()> {
    if let Some(server) = attached {
        if server.idle() {
            pool.release(server.conn);
        }
    }
    Ok(())
}

/// Ends the client's session with a FATAL error.
async fn refuse(
    client: &mut TcpStream,
    attached: Option<Attached>,
    pool: &Pool,
    sqlstate: &str,
    message: &str,
) -> io::Result<()> {
    finish(attached, pool)?;
    client.write_all(&error_response(sqlstate, message)).await?;
    client.shutdown().await
}
