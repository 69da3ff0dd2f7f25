//! Recognising a connection's protocol from its first bytes, and the name it asks for (TLS SNI,
//! HTTP Host). Pure functions over a byte slice, kept apart from I/O: each answers "need more
//! bytes", "this is X" or "not anything I know", and never panics on any input.

use marchproxy::pb;

/// Bytes a sniff may look at before it decides (a ClientHello record is at most 16 KiB + header).
pub const MAX_SNIFF: usize = 16 * 1024 + 5;
/// HTTP/1 request heads longer than this are routed without their Host.
const MAX_HTTP_HEAD: usize = 8 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Could still be something known: read more (up to [`MAX_SNIFF`]).
    Incomplete,
    Known(Detected),
    Unknown,
}

/// A recognised protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    /// The routing protocol (TLS routes as `https`, MQTT as `tcp`: the API has no such values).
    pub protocol: pb::Protocol,
    /// What was seen, for metrics and logs: tls, http, http2, postgres, rtmp, mqtt, redis.
    pub label: &'static str,
    /// TLS SNI or HTTP Host, lowercase and without a port.
    pub name: Option<String>,
}

fn known(protocol: pb::Protocol, label: &'static str, name: Option<String>) -> Sniff {
    Sniff::Known(Detected {
        protocol,
        label,
        name,
    })
}

/// Recognises the protocol of a connection that starts with `bytes`.
pub fn sniff(bytes: &[u8]) -> Sniff {
    let Some(&first) = bytes.first() else {
        return Sniff::Incomplete;
    };
    match first {
        0x16 => tls(bytes),
        // RTMP's C0: protocol version 3.
        0x03 => known(pb::Protocol::Rtmp, "rtmp", None),
        0x10 => mqtt(bytes),
        b'*' => redis(bytes),
        0x00 => postgres(bytes),
        b'A'..=b'Z' => http(bytes),
        _ => Sniff::Unknown,
    }
}

/// A big-endian integer of `N` bytes at `at`, if there.
fn be(bytes: &[u8], at: usize, n: usize) -> Option<usize> {
    let slice = bytes.get(at..at.checked_add(n)?)?;
    Some(
        slice
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
    )
}

fn tls(bytes: &[u8]) -> Sniff {
    // Record header: type 0x16, version 3.x, length.
    match bytes.get(1) {
        None => return Sniff::Incomplete,
        Some(3) => {}
        Some(_) => return Sniff::Unknown,
    }
    let Some(length) = be(bytes, 3, 2) else {
        return Sniff::Incomplete;
    };
    if bytes.get(5).is_some_and(|t| *t != 1) {
        return Sniff::Unknown; // a handshake, but not a ClientHello
    }
    let Some(record) = bytes.get(5..5 + length) else {
        return Sniff::Incomplete;
    };
    known(pb::Protocol::Https, "tls", server_name(record))
}

/// The SNI host name in a ClientHello handshake message, if it has one.
fn server_name(hello: &[u8]) -> Option<String> {
    // type(1) length(3) version(2) random(32)
    let mut at = 1 + 3 + 2 + 32;
    at += 1 + be(hello, at, 1)?; // session id
    at += 2 + be(hello, at, 2)?; // cipher suites
    at += 1 + be(hello, at, 1)?; // compression methods
    let end = (at + 2 + be(hello, at, 2)?).min(hello.len());
    at += 2;
    while at + 4 <= end {
        let kind = be(hello, at, 2)?;
        let length = be(hello, at + 2, 2)?;
        let data = hello.get(at + 4..at + 4 + length)?;
        if kind == 0 {
            // server_name: list length(2), then entries of type(1) length(2) name.
            let mut entry = 2;
            while entry + 3 <= data.len() {
                let name_length = be(data, entry + 1, 2)?;
                let name = data.get(entry + 3..entry + 3 + name_length)?;
                if data[entry] == 0 {
                    return host_name(name);
                }
                entry += 3 + name_length;
            }
            return None;
        }
        at += 4 + length;
    }
    None
}

/// A plausible host name, lowercase, without a port.
fn host_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    // `[v6 address]:port` keeps the brackets and loses the port.
    if let Some(end) = text.strip_prefix('[').and_then(|rest| rest.find(']')) {
        let host = &text[..end + 2];
        return host[1..end + 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
            .then(|| host.to_ascii_lowercase());
    }
    let host = match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => text,
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        });
    valid.then(|| host.to_ascii_lowercase())
}

fn http(bytes: &[u8]) -> Sniff {
    if bytes.starts_with(H2_PREFACE) {
        return known(pb::Protocol::Http2, "http2", None);
    }
    if H2_PREFACE.starts_with(bytes) {
        return Sniff::Incomplete;
    }
    let Some(line_end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        // Still a method token, or a request line being written?
        let plausible = bytes.len() < MAX_HTTP_HEAD
            && bytes.iter().take_while(|b| b.is_ascii_uppercase()).count() <= 16
            && bytes.iter().enumerate().all(|(i, b)| {
                b.is_ascii_graphic() || *b == b' ' || (*b == b'\r' && i + 1 == bytes.len())
            });
        return if plausible {
            Sniff::Incomplete
        } else {
            Sniff::Unknown
        };
    };
    let line = &bytes[..line_end];
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Sniff::Unknown;
    };
    let method_ok =
        !method.is_empty() && method.len() <= 16 && method.iter().all(u8::is_ascii_uppercase);
    if !method_ok || target.is_empty() || !version.starts_with(b"HTTP/1.") {
        return Sniff::Unknown;
    }
    // Headers: find Host, or the end of the head.
    let mut at = line_end + 2;
    loop {
        let Some(end) = bytes[at..].windows(2).position(|w| w == b"\r\n") else {
            return if bytes.len() >= MAX_HTTP_HEAD {
                known(pb::Protocol::Http, "http", None)
            } else {
                Sniff::Incomplete
            };
        };
        let header = &bytes[at..at + end];
        if header.is_empty() {
            return known(pb::Protocol::Http, "http", None);
        }
        if let Some(colon) = header.iter().position(|b| *b == b':') {
            if header[..colon].eq_ignore_ascii_case(b"host") {
                return known(pb::Protocol::Http, "http", host_name(&header[colon + 1..]));
            }
        }
        at += end + 2;
    }
}

fn postgres(bytes: &[u8]) -> Sniff {
    let (Some(length), Some(code)) = (be(bytes, 0, 4), be(bytes, 4, 4)) else {
        return Sniff::Incomplete;
    };
    const STARTUP_3_0: usize = 196_608;
    const CANCEL: usize = 80_877_102;
    const SSL: usize = 80_877_103;
    const GSSENC: usize = 80_877_104;
    let plausible = match code {
        SSL | GSSENC => length == 8,
        CANCEL => length == 16,
        STARTUP_3_0 => (8..=10_000).contains(&length),
        _ => false,
    };
    if plausible {
        known(pb::Protocol::Postgres, "postgres", None)
    } else {
        Sniff::Unknown
    }
}

fn mqtt(bytes: &[u8]) -> Sniff {
    // Fixed header: 0x10, remaining length (1 to 4 bytes, 7 bits each), then the protocol name.
    let mut at = 1;
    loop {
        let Some(byte) = bytes.get(at) else {
            return Sniff::Incomplete;
        };
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Sniff::Unknown;
        }
    }
    for name in [&b"\x00\x04MQTT"[..], &b"\x00\x06MQIsdp"[..]] {
        let seen = &bytes[at..bytes.len().min(at + name.len())];
        if name.starts_with(seen) {
            return if seen.len() == name.len() {
                known(pb::Protocol::Tcp, "mqtt", None)
            } else {
                Sniff::Incomplete
            };
        }
    }
    Sniff::Unknown
}

fn redis(bytes: &[u8]) -> Sniff {
    // A RESP array of bulk strings: `*<count>\r\n$...`.
    let digits = bytes[1..].iter().take_while(|b| b.is_ascii_digit()).count();
    match bytes.get(1 + digits..) {
        _ if digits > 9 => Sniff::Unknown,
        Some([]) => Sniff::Incomplete,
        Some([b'\r']) if digits > 0 => Sniff::Incomplete,
        Some([b'\r', b'\n', ..]) if digits > 0 => known(pb::Protocol::Redis, "redis", None),
        _ => Sniff::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello for `host` as a TLS client sends it.
    fn client_hello(host: &str) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni = vec![0, 0];
        let list_len = (name.len() + 3) as u16;
        sni.extend((list_len + 2).to_be_bytes());
        sni.extend(list_len.to_be_bytes());
        sni.push(0);
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name);
        let alpn: &[u8] = &[0, 16, 0, 5, 0, 3, 2, b'h', b'2'];
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0]); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let extensions: Vec<u8> = [alpn, &sni].concat();
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut handshake = vec![1, 0];
        handshake.extend((body.len() as u16).to_be_bytes());
        handshake.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }

    fn postgres_startup() -> Vec<u8> {
        let params = b"user\0app\0database\0shop\0\0";
        let mut message = ((8 + params.len()) as u32).to_be_bytes().to_vec();
        message.extend(196_608u32.to_be_bytes());
        message.extend(params);
        message
    }

    /// Every proper prefix is Incomplete, the whole is `expected`.
    fn check_prefixes(input: &[u8], expected: Sniff) {
        for end in 1..input.len() {
            let partial = sniff(&input[..end]);
            assert!(
                partial == Sniff::Incomplete || partial == expected,
                "prefix of {end} bytes gave {partial:?}, wanted Incomplete or {expected:?}"
            );
        }
        assert_eq!(sniff(input), expected);
    }

    #[test]
    fn recognises_each_protocol_on_every_prefix() {
        let detected = |protocol, label, name: Option<&str>| {
            Sniff::Known(Detected {
                protocol,
                label,
                name: name.map(str::to_owned),
            })
        };
        check_prefixes(
            &client_hello("API.Example.com"),
            detected(pb::Protocol::Https, "tls", Some("api.example.com")),
        );
        check_prefixes(
            b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHost: Shop.example:8080\r\n\r\n",
            detected(pb::Protocol::Http, "http", Some("shop.example")),
        );
        check_prefixes(
            b"POST / HTTP/1.0\r\n\r\n",
            detected(pb::Protocol::Http, "http", None),
        );
        check_prefixes(
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            detected(pb::Protocol::Http, "http", Some("[::1]")),
        );
        check_prefixes(H2_PREFACE, detected(pb::Protocol::Http2, "http2", None));
        check_prefixes(
            &postgres_startup(),
            detected(pb::Protocol::Postgres, "postgres", None),
        );
        check_prefixes(
            &[0, 0, 0, 8, 4, 210, 22, 47],
            detected(pb::Protocol::Postgres, "postgres", None),
        );
        check_prefixes(
            b"\x10\x14\x00\x04MQTT\x04\x02\x00\x3c",
            detected(pb::Protocol::Tcp, "mqtt", None),
        );
        check_prefixes(
            b"*1\r\n$4\r\nPING\r\n",
            detected(pb::Protocol::Redis, "redis", None),
        );
        assert_eq!(
            sniff(&[3; 1537]),
            detected(pb::Protocol::Rtmp, "rtmp", None)
        );
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        for input in [
            &b"\xff\xfe"[..],
            b"hello world\r\n",
            b"GET\r\n",
            b"get / HTTP/1.1\r\n",
            b"\x16\x02\x00",
            b"*x",
            b"\x10\x02\x00\x05",
            b"\x00\x00\x00\x08\x00\x00\x00\x01",
            b"SSH-2.0-OpenSSH\r\n",
        ] {
            assert_eq!(sniff(input), Sniff::Unknown, "{input:?}");
        }
        assert_eq!(sniff(b""), Sniff::Incomplete);
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random inputs, plus every valid message cut and corrupted at
        // each position: the sniffer must answer, never panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = bytes.first_mut() {
                *first = [0x16, 0x03, 0x10, b'*', 0x00, b'G', b'P'][(next() % 7) as usize];
            }
            let _ = sniff(&bytes);
        }
        for valid in [
            client_hello("a.example"),
            postgres_startup(),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        ] {
            for at in 0..valid.len() {
                for value in [0u8, 1, 0x7f, 0xff] {
                    let mut corrupted = valid.clone();
                    corrupted[at] = value;
                    let _ = sniff(&corrupted);
                    let _ = sniff(&corrupted[..at]);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Any bytes at all: an answer, never a panic; and a known answer stays known when more
        /// bytes follow (a sniff never changes its mind once it decided).
        #[test]
        fn any_input_gets_an_answer(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), more in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let first = sniff(&bytes);
            if let Sniff::Known(detected) = &first {
                let mut longer = bytes.clone();
                longer.extend(&more);
                if let Sniff::Known(again) = sniff(&longer) {
                    proptest::prop_assert_eq!(again.protocol, detected.protocol);
                }
            }
        }

        /// HTTP requests with any Host are recognised and the Host comes back lowercase.
        #[test]
        fn http_hosts_round_trip(host in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,10}){0,3}", method in "(GET|POST|PUT|DELETE|HEAD)") {
            let request = format!("{method} / HTTP/1.1\r\nHost: {}\r\n\r\n", host.to_ascii_uppercase());
            let expected = Sniff::Known(Detected { protocol: pb::Protocol::Http, label: "http", name: Some(host.clone()) });
            proptest::prop_assert_eq!(sniff(request.as_bytes()), expected);
        }

        /// TLS ClientHellos with any SNI give that name back.
        #[test]
        fn tls_names_round_trip(host in "[a-z0-9-]{1,30}(\\.[a-z0-9]{1,10}){1,3}") {
            let expected = Sniff::Known(Detected { protocol: pb::Protocol::Https, label: "tls", name: Some(host.clone()) });
            proptest::prop_assert_eq!(sniff(&client_hello(&host)), expected);
        }
    }
}
