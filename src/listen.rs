//! `--listen PROTOCOL=ADDR`: a data-plane listener and the protocol it serves (`auto` or none:
//! decided per connection).

use std::net::SocketAddr;

use crate::{names, pb};

/// A data-plane listener to bind.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenSpec {
    /// The protocol named on the flag (`postgres=...`), if any.
    pub protocol: Option<pb::Protocol>,
    pub addr: SocketAddr,
}

impl ListenSpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (protocol, addr) = match text.split_once('=') {
            Some((name, addr)) if name.trim().eq_ignore_ascii_case("auto") => (None, addr),
            Some((name, addr)) => (
                Some(
                    names::parse_protocol(name)
                        .ok_or_else(|| format!("--listen {text}: unknown protocol `{name}`"))?,
                ),
                addr,
            ),
            None => (None, text),
        };
        let addr = addr.trim().parse().map_err(|_| {
            format!("--listen {text}: `{addr}` is not an IP:port such as 0.0.0.0:8080")
        })?;
        Ok(ListenSpec { protocol, addr })
    }
}
