//! Names operators type and the validated forms behind them: module kinds (`alb`, `dblb`, ...),
//! protocols (`http`, `postgres`, ...) and `host:port` endpoints.

use std::{fmt, str::FromStr};

use crate::pb;

/// A kind of module: a `ModuleType` other than UNSPECIFIED and NLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleKind {
    Alb,
    Dblb,
    Ailb,
    Rtmp,
    WasmRegistry,
    SqsProxy,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 6] = [
        ModuleKind::Alb,
        ModuleKind::Dblb,
        ModuleKind::Ailb,
        ModuleKind::Rtmp,
        ModuleKind::WasmRegistry,
        ModuleKind::SqsProxy,
    ];

    /// The name operators use: `alb`, `dblb`, `ailb`, `rtmp`, `wasm-registry`, `sqs-proxy`.
    pub fn name(self) -> &'static str {
        match self {
            ModuleKind::Alb => "alb",
            ModuleKind::Dblb => "dblb",
            ModuleKind::Ailb => "ailb",
            ModuleKind::Rtmp => "rtmp",
            ModuleKind::WasmRegistry => "wasm-registry",
            ModuleKind::SqsProxy => "sqs-proxy",
        }
    }

    /// The module's default gRPC port (ModuleService): 50051 for the ALB up to 50056.
    pub fn default_grpc_port(self) -> u16 {
        match self {
            ModuleKind::Alb => 50051,
            ModuleKind::Dblb => 50052,
            ModuleKind::Ailb => 50053,
            ModuleKind::Rtmp => 50054,
            ModuleKind::WasmRegistry => 50055,
            ModuleKind::SqsProxy => 50056,
        }
    }

    /// The module's default admin HTTP port: 7002 for the ALB up to 7007 (the NLB has 7001).
    pub fn default_admin_port(self) -> u16 {
        self.default_grpc_port() - 50051 + 7002
    }

    pub fn module_type(self) -> pb::ModuleType {
        match self {
            ModuleKind::Alb => pb::ModuleType::Alb,
            ModuleKind::Dblb => pb::ModuleType::Dblb,
            ModuleKind::Ailb => pb::ModuleType::Ailb,
            ModuleKind::Rtmp => pb::ModuleType::Rtmp,
            ModuleKind::WasmRegistry => pb::ModuleType::WasmRegistry,
            ModuleKind::SqsProxy => pb::ModuleType::SqsProxy,
        }
    }

    /// The kind for a wire `module_type`; `None` for UNSPECIFIED, NLB or an unknown number.
    pub fn from_module_type(value: i32) -> Option<Self> {
        match pb::ModuleType::try_from(value).ok()? {
            pb::ModuleType::Alb => Some(ModuleKind::Alb),
            pb::ModuleType::Dblb => Some(ModuleKind::Dblb),
            pb::ModuleType::Ailb => Some(ModuleKind::Ailb),
            pb::ModuleType::Rtmp => Some(ModuleKind::Rtmp),
            pb::ModuleType::WasmRegistry => Some(ModuleKind::WasmRegistry),
            pb::ModuleType::SqsProxy => Some(ModuleKind::SqsProxy),
            pb::ModuleType::Unspecified | pb::ModuleType::Nlb => None,
        }
    }
}

impl fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The text is not a module kind.
#[derive(Debug, thiserror::Error)]
#[error("unknown module kind `{0}`; use one of alb, dblb, ailb, rtmp, wasm-registry, sqs-proxy")]
pub struct UnknownModuleKind(pub String);

impl FromStr for ModuleKind {
    type Err = UnknownModuleKind;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wanted = text.trim().to_ascii_lowercase().replace('_', "-");
        ModuleKind::ALL
            .into_iter()
            .find(|kind| kind.name() == wanted)
            .ok_or_else(|| UnknownModuleKind(text.to_owned()))
    }
}

/// Lowercase name of a protocol (`http`, `postgres`, ...), as flags and tables show it.
pub fn protocol_name(protocol: pb::Protocol) -> String {
    protocol
        .as_str_name()
        .trim_start_matches("PROTOCOL_")
        .to_ascii_lowercase()
}

/// Parses `http`, `POSTGRES`, `PROTOCOL_MYSQL` ...
pub fn parse_protocol(text: &str) -> Option<pb::Protocol> {
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with("PROTOCOL_") {
        upper
    } else {
        format!("PROTOCOL_{upper}")
    };
    pb::Protocol::from_str_name(&full)
}

/// Lowercase name of a health status (`healthy`, `stopping`, ...).
pub fn health_name(status: pb::HealthStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("HEALTH_STATUS_")
        .to_ascii_lowercase()
}

/// Parses `healthy`, `HEALTH_STATUS_DEGRADED` ...
pub fn parse_health(text: &str) -> Option<pb::HealthStatus> {
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with("HEALTH_STATUS_") {
        upper
    } else {
        format!("HEALTH_STATUS_{upper}")
    };
    pb::HealthStatus::from_str_name(&full)
}

/// A `host:port` a peer can dial: a DNS name, an IPv4 address or a bracketed IPv6 address, and
/// a port from 1 to 65535.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
}

/// Why a text is not a `host:port`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("`{text}` is not a host:port address ({why}); write e.g. 10.0.0.5:50051 or alb-1:50051")]
pub struct InvalidEndpoint {
    text: String,
    why: &'static str,
}

impl Endpoint {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for Endpoint {
    type Err = InvalidEndpoint;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why| InvalidEndpoint {
            text: text.to_owned(),
            why,
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(|| fail("no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| fail("port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(fail("port 0 cannot be dialled"));
        }
        let valid_host =
            if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                inner.parse::<std::net::Ipv6Addr>().is_ok()
            } else {
                !host.is_empty()
                    && host.len() <= 253
                    && host.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    })
            };
        if !valid_host {
            return Err(fail("bad host name"));
        }
        Ok(Endpoint {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// This machine's name (`HOSTNAME`, else /etc/hostname), for default instance and replica ids.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let ok: Endpoint = "10.0.0.5:50051".parse().unwrap();
        assert_eq!((ok.host(), ok.port()), ("10.0.0.5", 50051));
        assert!("[::1]:80".parse::<Endpoint>().is_ok());
        assert!("alb-green.local:50051".parse::<Endpoint>().is_ok());
        for bad in [
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:70000",
            "ho st:80",
            "[zz]:80",
            "a..b:80",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn kinds_and_protocols() {
        for kind in ModuleKind::ALL {
            assert_eq!(kind.name().parse::<ModuleKind>().unwrap(), kind);
            assert_eq!(
                ModuleKind::from_module_type(kind.module_type() as i32),
                Some(kind)
            );
        }
        assert_eq!(
            "sqs_proxy".parse::<ModuleKind>().unwrap(),
            ModuleKind::SqsProxy
        );
        assert!(ModuleKind::from_module_type(pb::ModuleType::Nlb as i32).is_none());
        assert!(ModuleKind::from_module_type(99).is_none());
        assert_eq!(parse_protocol("postgres"), Some(pb::Protocol::Postgres));
        assert_eq!(protocol_name(pb::Protocol::Http2), "http2");
        assert_eq!(parse_health("degraded"), Some(pb::HealthStatus::Degraded));
        assert_eq!(parse_protocol("gopher"), None);
    }
}
