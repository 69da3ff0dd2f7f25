//! Copying a session's bytes both ways once it is set up, counting the client's queries on the
//! fly from the protocol's message framing (no buffering, no parsing of message bodies).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How a client's byte stream is cut into messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A type byte and a big-endian length that counts itself; queries are `Q` (simple query)
    /// and `E` (execute a prepared portal).
    Postgres,
    /// A 3-byte little-endian length and a sequence number; a command starts at sequence 0 and
    /// its first byte names it: queries are COM_QUERY (3) and COM_STMT_EXECUTE (0x17).
    Mysql,
}

/// Finds message boundaries in a stream fed chunk by chunk, without buffering it.
pub struct Framer {
    framing: Framing,
    header: [u8; 5],
    have: usize,
    /// Bytes of the current message body still to pass.
    skip: u64,
    /// The header is complete and the body's first byte is awaited.
    first_pending: bool,
    /// A framing error: the stream is no longer followed (the peer will reject it).
    lost: bool,
}

impl Framer {
    pub fn new(framing: Framing) -> Self {
        Framer {
            framing,
            header: [0; 5],
            have: 0,
            skip: 0,
            first_pending: false,
            lost: false,
        }
    }

    fn header_len(&self) -> usize {
        match self.framing {
            Framing::Postgres => 5,
            Framing::Mysql => 4,
        }
    }

    /// Feeds the next bytes; `on_message(kind, first)` sees each message once its first body
    /// byte is known (None for an empty body): `kind` is PostgreSQL's type byte, or MySQL's
    /// sequence number (then `first` is the command of a sequence-0 packet).
    pub fn feed(&mut self, mut bytes: &[u8], mut on_message: impl FnMut(u8, Option<u8>)) {
        while !bytes.is_empty() && !self.lost {
            if self.first_pending {
                let first = bytes[0];
                self.first_pending = false;
                self.skip -= 1;
                bytes = &bytes[1..];
                on_message(self.kind(), Some(first));
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64);
                self.skip -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < self.header_len() {
                continue;
            }
            self.have = 0;
            let body = match self.framing {
                Framing::Postgres => {
                    let length = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    if length < 4 {
                        self.lost = true;
                        return;
                    }
                    u64::from(length - 4)
                }
                Framing::Mysql => u64::from(u32::from_le_bytes([
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    0,
                ])),
            };
            if body == 0 {
                on_message(self.kind(), None);
            } else {
                self.skip = body;
                self.first_pending = true;
            }
        }
    }

    fn kind(&self) -> u8 {
        match self.framing {
            Framing::Postgres => self.header[0],
            Framing::Mysql => self.header[3],
        }
    }

    /// Whether the bytes fed so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.skip == 0 && !self.first_pending
    }
}

/// Counts query messages in a client's stream.
pub struct QueryCounter(Framer);

impl QueryCounter {
    pub fn new(framing: Framing) -> Self {
        QueryCounter(Framer::new(framing))
    }

    /// Feeds the next bytes; returns how many queries started in them.
    pub fn feed(&mut self, bytes: &[u8]) -> u64 {
        let framing = self.0.framing;
        let mut queries = 0;
        self.0.feed(bytes, |kind, first| {
            queries += u64::from(match framing {
                Framing::Postgres => matches!(kind, b'Q' | b'E'),
                Framing::Mysql => kind == 0 && matches!(first, Some(0x03 | 0x17)),
            });
        });
        queries
    }
}

/// Relays a session both ways until each side has closed: the client's bytes, its queries
/// counted by `framing` into `queries`, to the server, and the server's back; bytes into `stats`.
pub async fn session<R, W>(
    (client_read, client_write): (R, W),
    server: tokio::net::TcpStream,
    framing: Framing,
    queries: &prometheus::IntCounter,
    stats: &marchproxy_runtime::Stats,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (server_read, server_write) = server.into_split();
    let upstream = pump(
        client_read,
        server_write,
        Some(QueryCounter::new(framing)),
        |bytes, counted| {
            stats.bytes_received(bytes);
            queries.inc_by(counted);
        },
    );
    let downstream = pump(server_read, client_write, None, |bytes, _| {
        stats.bytes_sent(bytes)
    });
    let (up, down) = tokio::join!(upstream, downstream);
    up.and(down)
}

/// Copies `from` to `to` until `from` ends, then half-closes `to`; `on_chunk(bytes, queries)`
/// sees every chunk, queries counted when a counter is given.
pub async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut counter: Option<QueryCounter>,
    on_chunk: impl Fn(u64, u64),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            // The peer may already be gone; the session is over either way.
            let _ = to.shutdown().await;
            return Ok(());
        }
        let queries = counter.as_mut().map_or(0, |c| c.feed(&buffer[..n]));
        to.write_all(&buffer[..n]).await?;
        // TLS holds records back until flushed; plain TCP's flush is free.
        to.flush().await?;
        on_chunk(n as u64, queries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut message = vec![kind];
        message.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        message.extend_from_slice(body);
        message
    }

    fn my(sequence: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        packet.push(sequence);
        packet.extend_from_slice(payload);
        packet
    }

    #[test]
    fn postgres_queries_are_counted_across_any_split() {
        let stream: Vec<u8> = [
            pg(b'p', b"secret\0"),
            pg(b'Q', b"SELECT 1\0"),
            pg(b'P', b"\0SELECT $1\0\0\0"),
            pg(b'B', &[0; 8]),
            pg(b'E', b"\0\0\0\0\0"),
            pg(b'S', b""),
            pg(b'Q', &vec![b'x'; 70_000]),
        ]
        .concat();
        for chunk in [1, 2, 3, 7, 4096, stream.len()] {
            let mut counter = QueryCounter::new(Framing::Postgres);
            let total: u64 = stream.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(total, 3, "chunks of {chunk}");
        }
    }

    #[test]
    fn mysql_commands_are_counted_and_handshake_packets_are_not() {
        let stream: Vec<u8> = [
            my(1, &[0x85, 0xa6, 0x03, 0x00, 0x03]),
            my(0, b"\x03SELECT 1"),
            my(0, b"\x16SELECT ?"),
            my(0, &[0x17, 1, 0, 0, 0]),
            my(0, b""),
            my(0, b"\x0e"),
            my(0, b"\x03SELECT 2"),
        ]
        .concat();
        for chunk in [1, 3, 5, stream.len()] {
            let mut counter = QueryCounter::new(Framing::Mysql);
            let total: u64 = stream.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(total, 3, "chunks of {chunk}");
        }
    }
}
