//! `--listen PROTOCOL=ADDR`: a data-plane listener and the protocol it serves (`auto` or none:
//! decided per connection). `PROTOCOL+proxy=ADDR` marks a listener whose connections carry a
//! PROXY protocol v2 header toward the module.

use std::net::SocketAddr;

use crate::{names, pb};

/// A data-plane listener to bind.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenSpec {
    /// The protocol named on the flag (`postgres=...`), if any.
    pub protocol: Option<pb::Protocol>,
    pub addr: SocketAddr,
    /// `+proxy`: a PROXY protocol v2 header goes with each connection (the NLB sends it; a
    /// module expects it).
    pub proxy_protocol: bool,
}

impl ListenSpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, addr) = match text.split_once('=') {
            Some((name, addr)) => (Some(name.trim()), addr),
            None => (None, text),
        };
        let (name, proxy_protocol) =
            match name.map(|n| n.strip_suffix("+proxy").map_or((n, false), |n| (n, true))) {
                Some((name, proxy)) => (Some(name), proxy),
                None => (None, false),
            };
        let protocol = match name {
            None => None,
            Some(name) if name.eq_ignore_ascii_case("auto") => None,
            Some(name) => Some(
                names::parse_protocol(name)
                    .ok_or_else(|| format!("--listen {text}: unknown protocol `{name}`"))?,
            ),
        };
        let addr = addr.trim().parse().map_err(|_| {
            format!("--listen {text}: `{addr}` is not an IP:port such as 0.0.0.0:8080")
        })?;
        Ok(ListenSpec {
            protocol,
            addr,
            proxy_protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners() {
        let auto = ListenSpec::parse("auto=0.0.0.0:8080").unwrap();
        assert_eq!((auto.protocol, auto.proxy_protocol), (None, false));
        let pg = ListenSpec::parse("postgres+proxy=127.0.0.1:5432").unwrap();
        assert_eq!(
            (pg.protocol, pg.proxy_protocol, pg.addr.port()),
            (Some(pb::Protocol::Postgres), true, 5432)
        );
        assert_eq!(ListenSpec::parse("127.0.0.1:1").unwrap().protocol, None);
        assert!(ListenSpec::parse("gopher=0.0.0.0:70").is_err());
        assert!(ListenSpec::parse("auto=nowhere").is_err());
    }
}
