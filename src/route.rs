//! Validated routes and how a connection matches them.
//!
//! A wire `Route` becomes a [`RouteSpec`] only through [`RouteSpec::try_from`], which checks every
//! field, so the routing table never holds a route it cannot evaluate. Persisted routes go through
//! the same check when they are read back.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{names, pb};

/// What a route matches on the client side (`source_pattern`).
#[derive(Clone, Debug, PartialEq)]
pub enum SourceMatch {
    /// Empty or `*`: every client.
    Any,
    /// A client address range (a bare IP is a /32 or /128).
    Cidr(IpNet),
    /// A TLS SNI or HTTP Host glob (`*` any run of characters, `?` one), lowercase.
    Name(String),
}

impl SourceMatch {
    fn parse(pattern: &str) -> Result<Self, String> {
        let pattern = pattern.trim();
        if pattern.is_empty() || pattern == "*" {
            return Ok(SourceMatch::Any);
        }
        if let Ok(ip) = pattern.parse::<IpAddr>() {
            return Ok(SourceMatch::Cidr(IpNet::from(ip)));
        }
        if pattern.contains('/') {
            return pattern
                .parse::<IpNet>()
                .map(SourceMatch::Cidr)
                .map_err(|_| {
                    format!("source_pattern `{pattern}` is not a valid CIDR; write e.g. 10.0.0.0/8")
                });
        }
        let lower = pattern.to_ascii_lowercase();
        if lower.len() > 253
            || !lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'?' | b'_'))
        {
            return Err(format!(
                "source_pattern `{pattern}` is neither an IP, a CIDR nor a host name glob such as *.example.com"
            ));
        }
        Ok(SourceMatch::Name(lower))
    }

    /// How specific the match is, to break priority ties: names and ranges beat "any".
    fn specificity(&self) -> u32 {
        match self {
            SourceMatch::Any => 0,
            SourceMatch::Cidr(net) => 1 + u32::from(net.prefix_len()),
            SourceMatch::Name(glob) => {
                200 + glob.bytes().filter(|&b| b != b'*' && b != b'?').count() as u32
            }
        }
    }
}

/// Glob match with `*` (any run, also empty) and `?` (one character), ASCII case-insensitive.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi].eq_ignore_ascii_case(&t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A route whose every field has been checked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRoute", into = "RawRoute")]
pub struct RouteSpec {
    pub id: String,
    pub protocol: pb::Protocol,
    pub source: SourceMatch,
    source_pattern: String,
    pub destination: String,
    pub source_port: u16,
    pub destination_port: u16,
    pub headers: BTreeMap<String, String>,
    pub path_pattern: String,
    pub priority: i32,
    pub metadata: BTreeMap<String, String>,
}

/// The persisted form: the wire fields, with the protocol by name so state files read well.
#[derive(Clone, Serialize, Deserialize)]
struct RawRoute {
    route_id: String,
    protocol: String,
    #[serde(default)]
    source_pattern: String,
    #[serde(default)]
    destination_pattern: String,
    #[serde(default)]
    source_port: i32,
    #[serde(default)]
    destination_port: i32,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    path_pattern: String,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl TryFrom<RawRoute> for RouteSpec {
    type Error = String;

    fn try_from(raw: RawRoute) -> Result<Self, Self::Error> {
        let protocol = names::parse_protocol(&raw.protocol)
            .ok_or_else(|| format!("unknown protocol `{}`", raw.protocol))?;
        RouteSpec::try_from(pb::Route {
            route_id: raw.route_id,
            protocol: protocol as i32,
            source_pattern: raw.source_pattern,
            destination_pattern: raw.destination_pattern,
            source_port: raw.source_port,
            destination_port: raw.destination_port,
            headers: raw.headers.into_iter().collect(),
            path_pattern: raw.path_pattern,
            priority: raw.priority,
            metadata: raw.metadata.into_iter().collect(),
        })
    }
}

impl From<RouteSpec> for RawRoute {
    fn from(route: RouteSpec) -> Self {
        RawRoute {
            route_id: route.id,
            protocol: names::protocol_name(route.protocol),
            source_pattern: route.source_pattern,
            destination_pattern: route.destination,
            source_port: i32::from(route.source_port),
            destination_port: i32::from(route.destination_port),
            headers: route.headers,
            path_pattern: route.path_pattern,
            priority: route.priority,
            metadata: route.metadata,
        }
    }
}

fn port(field: &str, value: i32) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("{field} {value} is outside 0-65535"))
}

impl TryFrom<pb::Route> for RouteSpec {
    type Error = String;

    /// Checks a wire route; the error names the field and says what to write instead.
    fn try_from(route: pb::Route) -> Result<Self, Self::Error> {
        let id = route.route_id.trim().to_owned();
        if id.is_empty() {
            return Err("route_id is empty; give every route a unique id".into());
        }
        if id.len() > 128
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
        {
            return Err(format!(
                "route_id `{id}` must be at most 128 letters, digits or - _ . : /"
            ));
        }
        let protocol = pb::Protocol::try_from(route.protocol).map_err(|_| {
            format!(
                "route {id}: protocol {} is not a known Protocol value",
                route.protocol
            )
        })?;
        let source =
            SourceMatch::parse(&route.source_pattern).map_err(|e| format!("route {id}: {e}"))?;
        let source_port =
            port("source_port", route.source_port).map_err(|e| format!("route {id}: {e}"))?;
        let destination_port = port("destination_port", route.destination_port)
            .map_err(|e| format!("route {id}: {e}"))?;
        if !route.path_pattern.is_empty() && !route.path_pattern.starts_with('/') {
            return Err(format!(
                "route {id}: path_pattern `{}` must start with /",
                route.path_pattern
            ));
        }
        Ok(RouteSpec {
            id,
            protocol,
            source,
            source_pattern: route.source_pattern.trim().to_owned(),
            destination: route.destination_pattern.trim().to_owned(),
            source_port,
            destination_port,
            headers: route.headers.into_iter().collect(),
            path_pattern: route.path_pattern,
            priority: route.priority,
            metadata: route.metadata.into_iter().collect(),
        })
    }
}

impl From<&RouteSpec> for pb::Route {
    fn from(route: &RouteSpec) -> Self {
        pb::Route {
            route_id: route.id.clone(),
            protocol: route.protocol as i32,
            source_pattern: route.source_pattern.clone(),
            destination_pattern: route.destination.clone(),
            source_port: i32::from(route.source_port),
            destination_port: i32::from(route.destination_port),
            headers: route.headers.clone().into_iter().collect(),
            path_pattern: route.path_pattern.clone(),
            priority: route.priority,
            metadata: route.metadata.clone().into_iter().collect(),
        }
    }
}

/// A connection (or a `RouteRequest`) to be routed.
#[derive(Clone, Debug, Default)]
pub struct Flow {
    pub protocol: Option<pb::Protocol>,
    /// The port the client connected to; 0 when unknown.
    pub listener_port: u16,
    /// TLS SNI or HTTP Host, lowercase, without a port.
    pub name: Option<String>,
    pub client_ip: Option<IpAddr>,
}

impl Flow {
    /// Reads a `RouteRequest`: the route's protocol and `source_port` (the listener's port), the
    /// name or client IP in `source_pattern`, and `context` keys `host`, `sni`, `client_ip`.
    pub fn from_request(
        route: &pb::Route,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<Self, String> {
        let protocol = match pb::Protocol::try_from(route.protocol) {
            Ok(pb::Protocol::Unspecified) => None,
            Ok(protocol) => Some(protocol),
            Err(_) => {
                return Err(format!(
                    "protocol {} is not a known Protocol value",
                    route.protocol
                ));
            }
        };
        let listener_port = port("source_port", route.source_port)?;
        let mut flow = Flow {
            protocol,
            listener_port,
            ..Flow::default()
        };
        let source = route.source_pattern.trim();
        if let Ok(ip) = source.parse::<IpAddr>() {
            flow.client_ip = Some(ip);
        } else if !source.is_empty() {
            flow.name = Some(strip_port(source));
        }
        if let Some(ip) = context.get("client_ip") {
            flow.client_ip = Some(
                ip.trim()
                    .parse()
                    .map_err(|_| format!("context client_ip `{ip}` is not an IP address"))?,
            );
        }
        if let Some(name) = context.get("host").or_else(|| context.get("sni")) {
            flow.name = Some(strip_port(name.trim()));
        }
        Ok(flow)
    }
}

/// A Host header or SNI as routes match it: lowercase, without a `:port`.
pub fn strip_port(name: &str) -> String {
    let name = match name.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.contains(':') => {
            host
        }
        _ => name,
    };
    name.to_ascii_lowercase()
}

impl RouteSpec {
    /// The servers a module route names (DESIGN.md, "Module routes name their backends"):
    /// `destination_pattern` as `host:port[=weight]` separated by commas, weights from 1 to
    /// 10000 (default 1). The error names the entry and says what to write.
    pub fn servers(&self) -> Result<Vec<(names::Endpoint, u32)>, String> {
        let mut servers = Vec::new();
        for entry in self
            .destination
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (address, weight) = match entry.split_once('=') {
                Some((address, weight)) => (
                    address.trim(),
                    weight
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|w| (1..=10_000).contains(w))
                        .ok_or_else(|| {
                            format!("`{entry}`: the weight must be a whole number from 1 to 10000")
                        })?,
                ),
                None => (entry, 1),
            };
            let endpoint = address.parse().map_err(|e| format!("{e}"))?;
            servers.push((endpoint, weight));
        }
        if servers.is_empty() {
            return Err(
                "destination_pattern must list the servers as host:port[=weight], separated by commas"
                    .into(),
            );
        }
        Ok(servers)
    }

    /// Does this route take the flow?
    pub fn matches(&self, flow: &Flow) -> bool {
        let protocol_ok = self.protocol == pb::Protocol::Unspecified
            || flow.protocol.is_none_or(|p| p == self.protocol);
        let port_ok = self.source_port == 0 || self.source_port == flow.listener_port;
        let source_ok = match &self.source {
            SourceMatch::Any => true,
            SourceMatch::Cidr(net) => flow.client_ip.is_some_and(|ip| net.contains(&ip)),
            SourceMatch::Name(glob) => flow.name.as_deref().is_some_and(|n| glob_match(glob, n)),
        };
        protocol_ok && port_ok && source_ok
    }

    /// Orders candidate routes: priority first, then the more specific match.
    pub fn rank(&self) -> (i32, u32, bool) {
        (
            self.priority,
            self.source.specificity(),
            self.source_port != 0,
        )
    }
}

/// Checks a whole list of wire routes: every problem, each as `routes[i]: ...`, including a
/// `route_id` given twice. All or nothing: no spec comes back when any route is wrong.
pub fn check_all(routes: Vec<pb::Route>) -> Result<Vec<RouteSpec>, Vec<String>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut specs = Vec::with_capacity(routes.len());
    let mut errors = Vec::new();
    for (index, route) in routes.into_iter().enumerate() {
        match RouteSpec::try_from(route) {
            Ok(spec) if !seen.insert(spec.id.clone()) => {
                errors.push(format!(
                    "routes[{index}]: route_id `{}` appears twice",
                    spec.id
                ));
            }
            Ok(spec) => specs.push(spec),
            Err(error) => errors.push(format!("routes[{index}]: {error}")),
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, source: &str) -> pb::Route {
        pb::Route {
            route_id: id.into(),
            protocol: pb::Protocol::Http as i32,
            source_pattern: source.into(),
            ..Default::default()
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.example.com", "api.example.com"));
        assert!(glob_match("*.example.com", "a.b.example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(glob_match("api-?.x", "API-1.x"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbd"));
        assert!(glob_match("a*b*c", "aXbYbc"));
    }

    #[test]
    fn validates_fields() {
        assert!(RouteSpec::try_from(route("", "x")).is_err());
        assert!(RouteSpec::try_from(route("bad id", "x")).is_err());
        assert!(RouteSpec::try_from(route("r", "10.0.0.0/33")).is_err());
        assert!(RouteSpec::try_from(route("r", "bad host!")).is_err());
        let mut bad_port = route("r", "");
        bad_port.source_port = 70000;
        assert!(
            RouteSpec::try_from(bad_port)
                .unwrap_err()
                .contains("source_port")
        );
        let mut bad_protocol = route("r", "");
        bad_protocol.protocol = 99;
        assert!(
            RouteSpec::try_from(bad_protocol)
                .unwrap_err()
                .contains("protocol")
        );
        let mut bad_path = route("r", "");
        bad_path.path_pattern = "api".into();
        assert!(RouteSpec::try_from(bad_path).is_err());
    }

    #[test]
    fn matches_flows() {
        let web = RouteSpec::try_from(route("web", "*.example.com")).unwrap();
        let office = RouteSpec::try_from(route("office", "192.168.0.0/16")).unwrap();
        let context =
            std::collections::HashMap::from([("client_ip".to_string(), "192.168.4.2".to_string())]);
        let flow = Flow::from_request(&route("", "Api.Example.com:443"), &context).unwrap();
        assert!(web.matches(&flow));
        assert!(office.matches(&flow));
        let other = Flow::from_request(&route("", "10.1.1.1"), &Default::default()).unwrap();
        assert!(!web.matches(&other));
        assert!(!office.matches(&other));
        assert!(web.rank() > office.rank());
    }

    #[test]
    fn persisted_form_round_trips_and_is_rechecked() {
        let spec = RouteSpec::try_from(route("web", "*.example.com")).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"protocol\":\"http\""));
        assert_eq!(serde_json::from_str::<RouteSpec>(&json).unwrap(), spec);
        let tampered = json.replace("*.example.com", "10.0.0.0/99");
        assert!(serde_json::from_str::<RouteSpec>(&tampered).is_err());
    }
}
