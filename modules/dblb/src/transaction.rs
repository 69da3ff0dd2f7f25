//! A client of a transaction-pooled route, after its login. The client's messages are framed
//! as they arrive; the first message of a transaction takes an idle server connection from the
//! pool, and the connection goes back once the server is idle again: its last ReadyForQuery
//! says `I`, every Query, FunctionCall and Sync sent has been answered, no extended-protocol
//! message waits for a Sync, and everything for the server has been written. A client that
//! leaves mid-transaction takes its server connection with it (closing it rolls the
//! transaction back).
//!
//! Both directions are buffered and written inside one `select!` with the reads, so neither
//! side can block the other (a pipelining client that does not read its results stops being
//! read once a buffer is full, instead of deadlocking with the server).
//!
//! Named prepared statements live on one server connection, so a Parse that names one is
//! refused in words (unnamed statements and portals work); session state set with SQL (`SET`,
//! `LISTEN`, SQL `PREPARE`) stays on whichever connection ran it, as with PgBouncer's
//! transaction mode.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BytesMut};
use marchproxy_runtime::Stats;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    Dblb,
    pool::{Pool, PoolClient, ServerConn},
    postgres::{ClientKey, error_response},
    relay::{Framer, Framing},
    table::Engine,
};

/// PostgreSQL's own bound on a message.
const MAX_MESSAGE: u32 = 1 << 30;
/// Bytes buffered towards either side before the other side stops being read.
const BUFFERED: usize = 256 * 1024;

/// A client message the scan stopped at.
enum Stop {
    Terminate,
    Invalid(u32),
    NamedStatement,
}

/// A server connection serving this client's transaction.
struct Attached {
    conn: ServerConn,
    progress: Progress,
}

/// Where a server connection stands in the conversation: whether it may go back to the pool.
pub(crate) struct Progress {
    /// ReadyForQuery answers still due (one per Query, FunctionCall and Sync the server acts on).
    outstanding: u32,
    /// The transaction status of the last ReadyForQuery.
    status: u8,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    /// Syncs sent since the last Execute or Query: if that one starts a COPY FROM STDIN, the
    /// server ignores them (it ignores Syncs in copy-in mode).
    syncs_since_execute: u32,
    /// The server is in copy-in mode (CopyInResponse seen, CopyDone or CopyFail not yet sent).
    copy_in: bool,
    framer: Framer,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            outstanding: 0,
            status: b'I',
            unsynced: false,
            syncs_since_execute: 0,
            copy_in: false,
            framer: Framer::new(Framing::Postgres),
        }
    }

    pub(crate) fn idle(&self) -> bool {
        self.outstanding == 0
            && self.status == b'I'
            && !self.unsynced
            && !self.copy_in
            && self.framer.at_boundary()
    }

    /// Accounts for a client message about to go to the server.
    pub(crate) fn client_sends(&mut self, kind: u8) {
        match kind {
            b'Q' | b'F' => {
                self.outstanding += 1;
                self.syncs_since_execute = 0;
            }
            b'S' if self.copy_in => {}
            b'S' => {
                self.outstanding += 1;
                self.syncs_since_execute += 1;
                self.unsynced = false;
            }
            b'E' => {
                self.syncs_since_execute = 0;
                self.unsynced = true;
            }
            b'P' | b'B' | b'D' | b'C' | b'H' => self.unsynced = true,
            b'c' | b'f' => self.copy_in = false,
            _ => {}
        }
    }

    /// Accounts for what the server sent.
    pub(crate) fn server_sent(&mut self, bytes: &[u8]) {
        let mut answers = Vec::new();
        let mut copy_in = false;
        self.framer.feed(bytes, |kind, first| match kind {
            b'Z' => answers.push(first.unwrap_or(b'I')),
            b'G' => copy_in = true,
            _ => {}
        });
        if copy_in {
            // The Syncs sent after the COPY's Execute are ignored by the server.
            self.outstanding = self.outstanding.saturating_sub(self.syncs_since_execute);
            self.syncs_since_execute = 0;
            self.copy_in = true;
        }
        for status in answers {
            self.outstanding = self.outstanding.saturating_sub(1);
            self.status = status;
        }
    }
}

/// What one turn of the session's `select!` brought.
enum Event {
    Client(io::Result<ClientIo>),
    Server(io::Result<ServerIo>),
    Stalled,
}

enum ClientIo {
    Read(usize),
    Wrote(usize),
    Flushed,
}

/// Reads from, writes to or flushes the client (plain TCP or TLS), whichever it is ready for
/// first. A flush is owed after writes: TLS holds records back until flushed.
async fn client_io<S>(
    client: &mut S,
    scratch: &mut [u8],
    may_read: bool,
    out: &[u8],
    flush: bool,
) -> io::Result<ClientIo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| {
        if !out.is_empty() {
            if let Poll::Ready(written) = Pin::new(&mut *client).poll_write(cx, out) {
                return Poll::Ready(written.map(ClientIo::Wrote));
            }
        } else if flush {
            if let Poll::Ready(flushed) = Pin::new(&mut *client).poll_flush(cx) {
                return Poll::Ready(flushed.map(|()| ClientIo::Flushed));
            }
        }
        if may_read {
            let mut buffer = ReadBuf::new(scratch);
            if let Poll::Ready(read) = Pin::new(&mut *client).poll_read(cx, &mut buffer) {
                let n = buffer.filled().len();
                return Poll::Ready(read.map(|()| ClientIo::Read(n)));
            }
        }
        Poll::Pending
    })
    .await
}

enum ServerIo {
    Read(usize),
    Wrote(usize),
}

/// Reads from or writes to the server, whichever it is ready for first.
async fn server_io(
    stream: Option<&TcpStream>,
    scratch: &mut [u8],
    out: &[u8],
    may_read: bool,
) -> io::Result<ServerIo> {
    let Some(stream) = stream else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            ready = stream.readable(), if may_read => {
                ready?;
                match stream.try_read(scratch) {
                    Ok(n) => return Ok(ServerIo::Read(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            ready = stream.writable(), if !out.is_empty() => {
                ready?;
                match stream.try_write(out) {
                    Ok(n) => return Ok(ServerIo::Wrote(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            else => return std::future::pending().await,
        }
    }
}

/// Serves the client until it leaves; `pending` holds whatever it sent after its login.
pub async fn serve<S>(
    dblb: &Dblb,
    mut client: S,
    mut pending: BytesMut,
    pool: &PoolClient,
    key: &ClientKey<'_>,
    stats: &Stats,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let wait = dblb.settings().queue_timeout();
    let queries = dblb.metrics.query_counter(Engine::Postgres.name());
    let checkouts = dblb.metrics.checkouts(&pool.route_id);
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::with_capacity(32 * 1024);
    let mut scratch = vec![0u8; 32 * 1024];
    let mut from_client = vec![0u8; 16 * 1024];
    let mut flush_owed = false;
    let mut attached: Option<Attached> = None;
    // Body bytes of the client's current message not yet scanned.
    let mut body_left: usize = 0;
    loop {
        // Scan the client's bytes into whole messages for the server; stop at a message that
        // needs a decision first.
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
                let conn = match pool.checkout(dblb, wait).await {
                    Ok(conn) => conn,
                    Err(error) => {
                        debug!(route = %pool.route_id, %error, "no pooled connection for a transaction");
                        return refuse(
                            &mut client,
                            None,
                            pool,
                            error.sqlstate(),
                            &error.to_string(),
                        )
                        .await;
                    }
                };
                checkouts.inc();
                key.point(&conn.address, conn.key);
                attached = Some(Attached {
                    conn,
                    progress: Progress::new(),
                });
            }
            if let Some(server) = attached.as_mut() {
                server.progress.client_sends(kind);
            }
            if matches!(kind, b'Q' | b'E') {
                queries.inc();
            }
            ready += 5;
            body_left = length as usize - 4;
        }
        if ready > 0 {
            stats.bytes_received(ready as u64);
            to_server.extend_from_slice(&pending.split_to(ready));
            // Most of the time the socket takes it all at once: no turn of the loop needed.
            if let Some(server) = attached.as_ref() {
                match server.conn.stream.try_write(&to_server) {
                    Ok(n) => to_server.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        let message = "the server connection failed during the transaction";
                        return refuse(&mut client, None, pool, "08006", message).await;
                    }
                }
            }
        }
        match stop {
            Some(Stop::Terminate) => {
                client.write_all(&to_client).await?;
                client.flush().await?;
                if let Some(server) = attached.as_ref() {
                    write_all(&server.conn.stream, &to_server).await?;
                }
                return finish(attached, pool, true);
            }
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
        if body_left == 0
            && to_server.is_empty()
            && attached.as_ref().is_some_and(|a| a.progress.idle())
        {
            if let Some(server) = attached.take() {
                key.clear();
                pool.release(server.conn);
            }
        }
        let may_read_server = to_client.len() < BUFFERED;
        let may_read_client = to_server.len() < BUFFERED;
        let event = {
            let server = attached.as_ref().map(|a| &a.conn.stream);
            let server_busy = server.is_some() && (may_read_server || !to_server.is_empty());
            let client_busy = may_read_client || !to_client.is_empty() || flush_owed;
            tokio::select! {
                io = client_io(&mut client, &mut from_client, may_read_client, &to_client, flush_owed), if client_busy => Event::Client(io),
                io = server_io(server, &mut scratch, &to_server, may_read_server), if server_busy => Event::Server(io),
                else => Event::Stalled,
            }
        };
        match event {
            Event::Client(Ok(ClientIo::Read(0))) => {
                return finish(attached, pool, to_server.is_empty());
            }
            Event::Client(Ok(ClientIo::Read(n))) => pending.extend_from_slice(&from_client[..n]),
            Event::Client(Ok(ClientIo::Wrote(n))) => {
                stats.bytes_sent(n as u64);
                to_client.advance(n);
                flush_owed = !flush_now(&mut client)?;
            }
            Event::Client(Ok(ClientIo::Flushed)) => flush_owed = false,
            Event::Client(Err(error)) => return Err(error),
            Event::Server(Ok(ServerIo::Read(n))) if n > 0 => {
                if let Some(server) = attached.as_mut() {
                    server.progress.server_sent(&scratch[..n]);
                }
                to_client.extend_from_slice(&scratch[..n]);
                if let Some(written) = write_now(&mut client, &to_client) {
                    let n = written?;
                    stats.bytes_sent(n as u64);
                    to_client.advance(n);
                    flush_owed = !flush_now(&mut client)?;
                }
            }
            Event::Server(Ok(ServerIo::Wrote(n))) => to_server.advance(n),
            Event::Server(_) => {
                // Whatever the server said before it went goes to the client first.
                let _ = client.write_all(&to_client).await;
                let message = "the server connection closed or failed during the transaction";
                return refuse(&mut client, None, pool, "08006", message).await;
            }
            Event::Stalled => {
                return Err(io::Error::other(
                    "session stalled: nothing to read or write",
                ));
            }
        }
    }
}

/// Writes to the client if it can take bytes right now, without waiting; None if it cannot.
/// (The next `select!` polls it again with the task's waker before the task sleeps.)
fn write_now<S>(client: &mut S, bytes: &[u8]) -> Option<io::Result<usize>>
where
    S: AsyncWrite + Unpin,
{
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(client).poll_write(&mut cx, bytes) {
        Poll::Ready(written) => Some(written),
        Poll::Pending => None,
    }
}

/// Flushes the client if that needs no waiting (always, for plain TCP); false if it must wait.
fn flush_now<S>(client: &mut S) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(client).poll_flush(&mut cx) {
        Poll::Ready(flushed) => flushed.map(|()| true),
        Poll::Pending => Ok(false),
    }
}

/// Writes all of `bytes` to a server connection shared by reference.
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The client left: an idle connection with nothing left to write goes back to the pool, one
/// mid-transaction is closed.
fn finish(attached: Option<Attached>, pool: &Pool, written: bool) -> io::Result<()> {
    if let Some(server) = attached {
        if written && server.progress.idle() {
            pool.release(server.conn);
        }
    }
    Ok(())
}

/// Ends the client's session with a FATAL error.
async fn refuse<S>(
    client: &mut S,
    attached: Option<Attached>,
    pool: &Pool,
    sqlstate: &str,
    message: &str,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    finish(attached, pool, false)?;
    client.write_all(&error_response(sqlstate, message)).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![kind];
        message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        message.extend_from_slice(body);
        message
    }

    fn ready(status: u8) -> Vec<u8> {
        message(b'Z', &[status])
    }

    #[test]
    fn a_connection_is_idle_only_when_everything_is_answered() {
        // Pipelined extended queries: two Syncs, two answers.
        let mut progress = Progress::new();
        for kind in *b"PBESPBES" {
            progress.client_sends(kind);
        }
        progress.server_sent(
            &[
                message(b'1', b""),
                message(b'C', b"SELECT 1\0"),
                ready(b'I'),
            ]
            .concat(),
        );
        assert!(!progress.idle(), "the second Sync is not answered yet");
        progress.server_sent(&ready(b'I'));
        assert!(progress.idle());

        // A transaction left open, or failed, keeps the connection.
        progress.client_sends(b'Q');
        progress.server_sent(&ready(b'T'));
        assert!(!progress.idle());
        progress.client_sends(b'Q');
        progress.server_sent(&ready(b'E'));
        assert!(!progress.idle());
        progress.client_sends(b'Q');
        progress.server_sent(&ready(b'I'));
        assert!(progress.idle());

        // Flush alone waits for a Sync.
        progress.client_sends(b'P');
        progress.client_sends(b'H');
        progress.server_sent(&message(b'1', b""));
        assert!(!progress.idle());
        progress.client_sends(b'S');
        progress.server_sent(&ready(b'I'));
        assert!(progress.idle());
    }

    #[test]
    fn copy_from_stdin_over_both_protocols() {
        // libpq's extended COPY: P B D E S, data, CopyDone, S; the first Sync is ignored.
        let mut progress = Progress::new();
        for kind in *b"PBDES" {
            progress.client_sends(kind);
        }
        progress.server_sent(&message(b'G', &[0, 0, 0]));
        for kind in *b"ddcS" {
            progress.client_sends(kind);
        }
        assert!(!progress.idle());
        // A ReadyForQuery split across reads.
        let answer = [message(b'C', b"COPY 2\0"), ready(b'I')].concat();
        progress.server_sent(&answer[..answer.len() - 1]);
        assert!(!progress.idle());
        progress.server_sent(&answer[answer.len() - 1..]);
        assert!(progress.idle());

        // Simple-protocol COPY.
        progress.client_sends(b'Q');
        progress.server_sent(&message(b'G', &[0, 0, 0]));
        progress.client_sends(b'd');
        assert!(!progress.idle(), "copy in progress");
        progress.client_sends(b'c');
        progress.server_sent(&[message(b'C', b"COPY 1\0"), ready(b'I')].concat());
        assert!(progress.idle());
    }
}
