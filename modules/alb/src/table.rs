//! The ALB's routing table, compiled from its module routes (config `[[routes]]` and
//! `UpdateRoutes`): how a request is matched (Host glob or client CIDR in `source_pattern`,
//! `path_pattern` as a prefix or a glob, `headers`, `priority`) and the policy and upstream pool
//! of the route it matches. Requests read one immutable table; a change builds a new one,
//! keeping each server's state (health, ejection) where the route and address stay the same.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use axum::http::{HeaderMap, HeaderName};
use marchproxy::route::{RouteSpec, SourceMatch, glob_match};

use crate::{
    config::{HealthCheck, Settings},
    metrics::Metrics,
    pool::{Balance, Pool, Server},
};

/// How a route matches the request path.
#[derive(Clone, Debug, PartialEq)]
enum PathMatch {
    Any,
    /// A plain `path_pattern`: the path starts with it.
    Prefix(String),
    /// A `path_pattern` with `*` or `?`: the whole path matches it.
    Glob(String),
}

impl PathMatch {
    fn parse(pattern: &str) -> Self {
        match pattern {
            "" | "/" => PathMatch::Any,
            glob if glob.contains(['*', '?']) => PathMatch::Glob(glob.to_owned()),
            prefix => PathMatch::Prefix(prefix.to_owned()),
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            // Whole segments: `/api` takes `/api` and `/api/x`, not `/apiv2`.
            PathMatch::Prefix(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
                None => false,
            },
            PathMatch::Glob(glob) => glob_match(glob, path),
        }
    }

    /// Longer patterns are more specific (priority ties go to them).
    fn specificity(&self) -> usize {
        match self {
            PathMatch::Any => 0,
            PathMatch::Prefix(p) | PathMatch::Glob(p) => p.len(),
        }
    }
}

/// What a route does with the requests it takes.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub retries: u32,
    pub timeout: Duration,
    pub try_timeout: Duration,
    /// Removed from the front of the path before it goes upstream.
    pub strip_prefix: Option<String>,
    /// `https` toward the servers (metadata `upstream_tls=true`), else `http`.
    pub upstream_scheme: &'static str,
}

/// A compiled route.
pub struct Route {
    pub id: String,
    source: SourceMatch,
    path: PathMatch,
    /// Header name and the value it must have (`*`: present with any value).
    headers: Vec<(HeaderName, String)>,
    priority: i32,
    pub policy: Policy,
    pub pool: Arc<Pool>,
}

impl Route {
    fn matches(&self, host: Option<&str>, client: IpAddr, path: &str, headers: &HeaderMap) -> bool {
        let source = match &self.source {
            SourceMatch::Any => true,
            SourceMatch::Cidr(net) => net.contains(&client),
            SourceMatch::Name(glob) => host.is_some_and(|h| glob_match(glob, h)),
        };
        source
            && self.path.matches(path)
            && self.headers.iter().all(|(name, want)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|v| want == "*" || v.as_bytes() == want.as_bytes())
            })
    }

    fn rank(&self) -> (i32, u32, usize, usize) {
        let source = match &self.source {
            SourceMatch::Any => 0,
            SourceMatch::Cidr(net) => 1 + u32::from(net.prefix_len()),
            SourceMatch::Name(glob) => 200 + glob.bytes().filter(|&b| b != b'*').count() as u32,
        };
        (
            self.priority,
            source,
            self.path.specificity(),
            self.headers.len(),
        )
    }
}

/// Every route, best first.
#[derive(Default)]
pub struct Table {
    pub routes: Vec<Route>,
}

impl Table {
    /// The route for a request: `host` lowercase without its port.
    pub fn find(
        &self,
        host: Option<&str>,
        client: IpAddr,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches(host, client, path, headers))
    }

    /// Builds the table for `routes` with `settings` as defaults, reusing the servers of
    /// `previous`. Every problem is named, as `route <id>: ...`.
    pub fn compile(
        routes: &[RouteSpec],
        settings: &Settings,
        previous: &Table,
        metrics: &Metrics,
    ) -> Result<Table, Vec<String>> {
        let mut known: HashMap<(&str, &str), &Arc<Server>> = HashMap::new();
        for route in &previous.routes {
            for server in &route.pool.servers {
                known.insert((route.id.as_str(), server.address.as_str()), server);
            }
        }
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        for spec in routes {
            match compile_route(spec, settings, &known, metrics) {
                Ok(route) => compiled.push(route),
                Err(problem) => problems.push(format!("route {}: {problem}", spec.id)),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        compiled.sort_by_key(|route| std::cmp::Reverse(route.rank()));
        let table = Table { routes: compiled };
        for ((route, address), _) in known {
            let kept = table
                .routes
                .iter()
                .any(|r| r.id == route && r.pool.servers.iter().any(|s| s.address == address));
            if !kept {
                metrics.forget_server(route, address);
            }
        }
        Ok(table)
    }
}

fn compile_route(
    spec: &RouteSpec,
    settings: &Settings,
    known: &HashMap<(&str, &str), &Arc<Server>>,
    metrics: &Metrics,
) -> Result<Route, String> {
    let meta = |key: &str| {
        spec.metadata
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let number = |key: &str, default: u64| -> Result<u64, String> {
        meta(key).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("metadata.{key} `{v}` must be a whole number"))
        })
    };
    let balance = Balance::parse(meta("lb").unwrap_or("round_robin"))?;
    let retries = number("retries", u64::from(settings.retries))?;
    if retries > 10 {
        return Err("metadata.retries must be at most 10".into());
    }
    let timeout_ms = number("timeout_ms", settings.timeout_ms)?;
    if timeout_ms == 0 {
        return Err("metadata.timeout_ms must be above 0".into());
    }
    let try_timeout_ms = match number("try_timeout_ms", settings.try_timeout_ms)? {
        0 => timeout_ms,
        ms => ms.min(timeout_ms),
    };
    let strip_prefix = match meta("strip_prefix") {
        None | Some("false") => None,
        Some("true") => match PathMatch::parse(&spec.path_pattern) {
            PathMatch::Prefix(prefix) => Some(prefix.trim_end_matches('/').to_owned()),
            _ => {
                return Err(
                    "metadata.strip_prefix=true needs a plain path_pattern prefix such as /api"
                        .into(),
                );
            }
        },
        Some(prefix) if prefix.starts_with('/') => Some(prefix.trim_end_matches('/').to_owned()),
        Some(other) => {
            return Err(format!(
                "metadata.strip_prefix `{other}` must be true, false or a path such as /api"
            ));
        }
    };
    let upstream_scheme = match meta("upstream_tls") {
        None | Some("false") => "http",
        Some("true") => "https",
        Some(other) => {
            return Err(format!(
                "metadata.upstream_tls `{other}` must be true or false"
            ));
        }
    };
    let health = route_health(spec, &settings.health_check)?;
    let mut headers = Vec::new();
    for (name, value) in &spec.headers {
        let name = HeaderName::try_from(name.as_str())
            .map_err(|_| format!("headers: `{name}` is not a valid header name"))?;
        headers.push((name, value.clone()));
    }
    let mut servers = Vec::new();
    for (endpoint, weight) in spec.servers()? {
        let address = endpoint.to_string();
        let server = match known.get(&(spec.id.as_str(), address.as_str())) {
            Some(server) => Arc::clone(server),
            None => Arc::new(Server::new(
                address.clone(),
                metrics.server(&spec.id, &address),
            )),
        };
        servers.push((server, weight));
    }
    Ok(Route {
        id: spec.id.clone(),
        source: spec.source.clone(),
        path: PathMatch::parse(&spec.path_pattern),
        headers,
        priority: spec.priority,
        policy: Policy {
            retries: retries as u32,
            timeout: Duration::from_millis(timeout_ms),
            try_timeout: Duration::from_millis(try_timeout_ms),
            strip_prefix,
            upstream_scheme,
        },
        pool: Arc::new(Pool::new(
            spec.id.clone(),
            servers,
            balance,
            health,
            settings.outlier.clone(),
        )),
    })
}

/// The route's active health check: the module's, with any of `health_check_path`,
/// `interval_seconds`, `timeout_seconds`, `healthy_threshold`, `unhealthy_threshold` from the
/// route's metadata. None when no path is set (checks off).
fn route_health(spec: &RouteSpec, defaults: &HealthCheck) -> Result<Option<HealthCheck>, String> {
    let mut check = defaults.clone();
    for (key, value) in &spec.metadata {
        let value = value.trim();
        let bad = || format!("metadata.{key} `{value}` is not a number");
        match key.as_str() {
            "health_check_path" => check.health_check_path = Some(value.to_owned()),
            "interval_seconds" => check.interval_seconds = value.parse().map_err(|_| bad())?,
            "timeout_seconds" => check.timeout_seconds = value.parse().map_err(|_| bad())?,
            "healthy_threshold" => check.healthy_threshold = value.parse().map_err(|_| bad())?,
            "unhealthy_threshold" => {
                check.unhealthy_threshold = value.parse().map_err(|_| bad())?
            }
            _ => {}
        }
    }
    let problems = check.problems("metadata.");
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(check
        .health_check_path
        .as_deref()
        .is_some_and(|p| !p.is_empty())
        .then_some(check))
}

#[cfg(test)]
mod tests {
    use super::*;
    use marchproxy::pb;

    fn spec(id: &str, host: &str, path: &str, priority: i32, meta: &[(&str, &str)]) -> RouteSpec {
        RouteSpec::try_from(pb::Route {
            route_id: id.into(),
            protocol: pb::Protocol::Http as i32,
            source_pattern: host.into(),
            destination_pattern: "127.0.0.1:8080=2,127.0.0.1:8081".into(),
            path_pattern: path.into(),
            priority,
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn metrics() -> Metrics {
        Metrics::new(|o| o)
    }

    #[test]
    fn the_best_route_wins() {
        let metrics = metrics();
        let routes = [
            spec("any", "", "", 0, &[]),
            spec("api", "*.example.com", "/api", 0, &[]),
            spec("static", "*.example.com", "/static/*.css", 0, &[]),
            spec("urgent", "", "/", 10, &[]),
        ];
        let table =
            Table::compile(&routes, &Settings::default(), &Table::default(), &metrics).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let find = |host, path| {
            table
                .find(Some(host), ip, path, &HeaderMap::new())
                .unwrap()
                .id
                .clone()
        };
        assert_eq!(find("a.example.com", "/api/x"), "urgent");
        let table = Table::compile(
            &routes[..3],
            &Settings::default(),
            &Table::default(),
            &metrics,
        )
        .unwrap();
        let find = |host, path| {
            table
                .find(Some(host), ip, path, &HeaderMap::new())
                .map(|r| r.id.clone())
        };
        assert_eq!(find("a.example.com", "/api/x").as_deref(), Some("api"));
        assert_eq!(
            find("a.example.com", "/static/a/b.css").as_deref(),
            Some("static")
        );
        assert_eq!(find("other.org", "/api/x").as_deref(), Some("any"));
        assert_eq!(find("a.example.com", "/api").as_deref(), Some("api"));
        assert_eq!(find("a.example.com", "/apiv2").as_deref(), Some("any"));
    }

    #[test]
    fn headers_must_match() {
        let mut canary = spec("canary", "", "", 0, &[]);
        canary.headers.insert("x-canary".into(), "yes".into());
        let table = Table::compile(
            &[canary, spec("main", "", "", 0, &[])],
            &Settings::default(),
            &Table::default(),
            &metrics(),
        )
        .unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(table.find(None, ip, "/", &headers).unwrap().id, "main");
        headers.insert("x-canary", "yes".parse().unwrap());
        assert_eq!(table.find(None, ip, "/", &headers).unwrap().id, "canary");
    }

    #[test]
    fn servers_keep_their_state_across_changes() {
        let metrics = metrics();
        let routes = [spec("web", "", "", 0, &[])];
        let first =
            Table::compile(&routes, &Settings::default(), &Table::default(), &metrics).unwrap();
        let second = Table::compile(&routes, &Settings::default(), &first, &metrics).unwrap();
        assert!(Arc::ptr_eq(
            &first.routes[0].pool.servers[0],
            &second.routes[0].pool.servers[0]
        ));
        assert_eq!(second.routes[0].pool.weights, [2, 1]);
    }

    #[test]
    fn bad_routes_are_named() {
        let mut no_servers = spec("empty", "", "", 0, &[]);
        no_servers.destination = String::new();
        let mut bad_weight = spec("weight", "", "", 0, &[]);
        bad_weight.destination = "127.0.0.1:80=0".into();
        let routes = [
            no_servers,
            bad_weight,
            spec("lb", "", "", 0, &[("lb", "random")]),
            spec("strip", "", "/a/*", 0, &[("strip_prefix", "true")]),
            spec("check", "", "", 0, &[("health_check_path", "health")]),
        ];
        let problems = Table::compile(&routes, &Settings::default(), &Table::default(), &metrics())
            .err()
            .unwrap();
        assert_eq!(problems.len(), 5, "{problems:?}");
        for (problem, id) in problems
            .iter()
            .zip(["empty", "weight", "lb", "strip", "check"])
        {
            assert!(problem.starts_with(&format!("route {id}:")), "{problem}");
        }
    }
}
