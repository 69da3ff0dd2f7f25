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

/// Counts query messages in a stream fed chunk by chunk.
pub struct QueryCounter {
    framing: Framing,
    header: [u8; 5],
    have: usize,
    /// Bytes of the current message body still to pass.
    skip: u64,
    /// A framing error: counting stops (the server will reject the stream itself).
    lost: bool,
}

impl QueryCounter {
    pub fn new(framing: Framing) -> Self {
        QueryCounter {
            framing,
            header: [0; 5],
            have: 0,
            skip: 0,
            lost: false,
        }
    }

    /// Feeds the next bytes; returns how many queries started in them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut queries = 0;
        while !bytes.is_empty() && !self.lost {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64);
                self.skip -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            match self.framing {
                Framing::Postgres if self.have == 5 => {
                    let length = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    if length < 4 {
                        self.lost = true;
                    }
                    queries += u64::from(matches!(self.header[0], b'Q' | b'E'));
                    self.skip = u64::from(length.saturating_sub(4));
                    self.have = 0;
                }
                Framing::Mysql if self.have == 4 => {
                    let length =
                        u32::from_le_bytes([self.header[0], self.header[1], self.header[2], 0]);
                    if length == 0 {
                        self.have = 0;
                    }
                }
                Framing::Mysql if self.have == 5 => {
                    let length =
                        u32::from_le_bytes([self.header[0], self.header[1], self.header[2], 0]);
                    let sequence = self.header[3];
                    queries += u64::from(sequence == 0 && matches!(self.header[4], 0x03 | 0x17));
                    self.skip = u64::from(length - 1);
                    self.have = 0;
                }
                _ => {}
            }
        }
        queries
    }
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
