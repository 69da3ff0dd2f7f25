//! PROXY protocol v2 (haproxy.org's proxy-protocol.txt): the NLB writes a header in front of a
//! connection it relays so the module behind it sees the real client address; modules read it
//! back on listeners marked `+proxy`.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt};

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header we accept: addresses plus generous room for TLVs.
const MAX_LENGTH: usize = 4096;

/// A PROXY protocol v2 header saying the connection came from `source` to `destination`.
pub fn header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.push(0x21); // version 2, PROXY
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            header.push(0x11); // TCP over IPv4
            header.extend(12u16.to_be_bytes());
            header.extend(s.ip().octets());
            header.extend(d.ip().octets());
            header.extend(s.port().to_be_bytes());
            header.extend(d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
                SocketAddr::V6(v6) => *v6.ip(),
            };
            header.push(0x21); // TCP over IPv6
            header.extend(36u16.to_be_bytes());
            header.extend(v6(s).octets());
            header.extend(v6(d).octets());
            header.extend(s.port().to_be_bytes());
            header.extend(d.port().to_be_bytes());
        }
    }
    header
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error(
        "the connection does not start with a PROXY protocol v2 header (is `+proxy` set on a listener the NLB does not front?)"
    )]
    NotProxy,
    #[error("PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("the peer closed or stalled before sending a whole PROXY protocol header")]
    Truncated,
}

/// Reads the v2 header at the start of `stream` and returns the client address it carries:
/// `None` for a LOCAL connection (the proxy's own health check) or an address family that has
/// no socket address (UNIX, unspecified). Reads exactly the header, nothing of what follows.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(within, read_header(stream))
        .await
        .map_err(|_| ProxyHeaderError::Truncated)?
}

async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut fixed = [0u8; 16];
    stream
        .read_exact(&mut fixed)
        .await
        .map_err(|_| ProxyHeaderError::Truncated)?;
    if &fixed[..12] != SIGNATURE {
        return Err(ProxyHeaderError::NotProxy);
    }
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if length > MAX_LENGTH {
        return Err(ProxyHeaderError::Malformed("longer than 4096 bytes"));
    }
    let mut rest = vec![0u8; length];
    stream
        .read_exact(&mut rest)
        .await
        .map_err(|_| ProxyHeaderError::Truncated)?;
    parse(fixed[12], fixed[13], &rest)
}

fn parse(
    version_command: u8,
    family: u8,
    body: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("version is not 2"));
    }
    match version_command & 0x0f {
        0 => return Ok(None), // LOCAL
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed("unknown command")),
    }
    // Only streams carry these connections: a datagram (UDP) header is not ours.
    if matches!(family >> 4, 1 | 2) && family & 0x0f != 1 {
        return Err(ProxyHeaderError::Malformed("transport is not TCP"));
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match family >> 4 {
        1 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::from((ip, port(8)))))
        }
        2 if body.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let ip = Ipv6Addr::from(octets);
            let ip = ip
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
            Ok(Some(SocketAddr::new(ip, port(32))))
        }
        1 | 2 => Err(ProxyHeaderError::Malformed(
            "address block shorter than its family needs",
        )),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITHIN: Duration = Duration::from_secs(1);

    #[test]
    fn header_bytes() {
        let header = header(
            "192.168.1.10:51000".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        );
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(header[12..16], [0x21, 0x11, 0, 12]);
        assert_eq!(header[16..20], [192, 168, 1, 10]);
        assert_eq!(header[20..24], [10, 0, 0, 1]);
        assert_eq!(header[24..28], [0xc7, 0x38, 0x01, 0xbb]);
    }

    #[tokio::test]
    async fn reads_back_what_it_writes_and_leaves_the_payload() {
        for (source, destination) in [
            ("192.168.1.10:51000", "10.0.0.1:443"),
            ("[2001:db8::7]:4000", "[::1]:80"),
            ("10.1.2.3:9", "[::1]:80"),
        ] {
            let source: SocketAddr = source.parse().unwrap();
            let mut bytes = header(source, destination.parse().unwrap());
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut stream = bytes.as_slice();
            assert_eq!(read(&mut stream, WITHIN).await, Ok(Some(source)));
            assert_eq!(stream, b"GET / HTTP/1.1\r\n");
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_header() {
        let mut plain: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            read(&mut plain, WITHIN).await,
            Err(ProxyHeaderError::NotProxy)
        );
        let whole = header("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        let mut cut = &whole[..20];
        assert_eq!(
            read(&mut cut, WITHIN).await,
            Err(ProxyHeaderError::Truncated)
        );
        let mut short = whole.clone();
        short[15] = 4; // IPv4 needs 12 bytes
        short.truncate(20);
        assert!(matches!(
            read(&mut short.as_slice(), WITHIN).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut datagram = whole.clone();
        datagram[13] = 0x12; // UDP over IPv4
        assert!(matches!(
            read(&mut datagram.as_slice(), WITHIN).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
        let mut local = whole;
        local[12] = 0x20;
        assert_eq!(read(&mut local.as_slice(), WITHIN).await, Ok(None));
    }
}
