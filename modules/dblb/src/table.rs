//! The routing table, compiled from module routes (DESIGN.md, "Module routes name their
//! backends"): which servers may take a session, by protocol, listener port, database and
//! whether the client asked for a read-only session; each server's health and the sessions it
//! holds now. A new table keeps the state (health, open sessions) of the servers it keeps.
//!
//! Route metadata: `database` (a glob; `*`, the default, for any; MySQL routes serve a whole
//! listener, so only `*`), `role` (`primary`, the default, or `replica`), `max_connections`
//! (sessions each of the route's servers takes at once; 0, the default, for no limit),
//! `backend_database` (PostgreSQL: the name sent to the server, so `app_ro` can be a read-only
//! alias of `app`), `pool_mode` (`session`) and `listener_port` (the DBLB listener the route
//! serves, such as a read-only port; 0, the default, for all). `source_port` is left to the
//! NLB, which matches it against its own listeners when it routes to the DBLB.

use std::{
    cmp::Reverse,
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use marchproxy::{names::Endpoint, pb, route::RouteSpec, route::glob_match};
use prometheus::IntGauge;
use rand::Rng;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{config::HealthCheck, metrics::Metrics};

/// The wire protocol a route and its servers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Engine {
    Postgres,
    Mysql,
}

impl Engine {
    pub fn from_protocol(protocol: pb::Protocol) -> Option<Engine> {
        match protocol {
            pb::Protocol::Postgres => Some(Engine::Postgres),
            pb::Protocol::Mysql => Some(Engine::Mysql),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
        }
    }
}

/// How a route's server connections are shared (PostgreSQL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps one server connection for its whole session.
    Session,
    /// A client holds a server connection only during a transaction; between transactions the
    /// connection serves other clients of the same user, database and options.
    Transaction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// A database server, shared by every route that names it: its health from protocol checks
/// and failed dials.
pub struct Backend {
    pub address: Endpoint,
    pub engine: Engine,
    healthy: AtomicBool,
    /// Passes and failures in a row.
    streak: Mutex<(u32, u32)>,
    up: IntGauge,
}

impl Backend {
    fn new(address: Endpoint, engine: Engine, metrics: &Metrics) -> Self {
        let up = metrics.backend_up(engine.name(), &address.to_string());
        up.set(1);
        Backend {
            address,
            engine,
            // A new server is trusted until a check or a dial says otherwise, so a fresh
            // DBLB serves at once.
            healthy: AtomicBool::new(true),
            streak: Mutex::new((0, 0)),
            up,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn set_healthy(&self, healthy: bool) -> bool {
        self.up.set(i64::from(healthy));
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    /// Counts a health check; returns the new state when this check changed it.
    pub fn checked(&self, passed: bool, check: &HealthCheck) -> Option<bool> {
        let mut streak = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        let (passes, failures) = &mut *streak;
        if passed {
            *passes = passes.saturating_add(1);
            *failures = 0;
            if *passes >= check.healthy_threshold && self.set_healthy(true) {
                return Some(true);
            }
        } else {
            *failures = failures.saturating_add(1);
            *passes = 0;
            if *failures >= check.unhealthy_threshold && self.set_healthy(false) {
                return Some(false);
            }
        }
        None
    }

    /// Dialling it failed: it is out at once, and health checks bring it back.
    pub fn dial_failed(&self, error: &std::io::Error) {
        *self.streak.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0);
        if self.set_healthy(false) {
            warn!(backend = %self.address, protocol = self.engine.name(), %error, "backend out: dialling it failed; health checks will bring it back");
        }
    }
}

/// A route's server: its weight, its limit and the sessions it holds now.
struct Member {
    backend: Arc<Backend>,
    weight: u32,
    max_connections: usize,
    active: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Member {
    fn has_room(&self) -> bool {
        self.max_connections == 0 || self.active.load(Ordering::Acquire) < self.max_connections
    }

    fn try_take(&self) -> bool {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                (self.max_connections == 0 || active < self.max_connections).then_some(active + 1)
            })
            .is_ok()
    }

    /// Load relative to weight, for least-sessions choice.
    fn load(&self) -> u64 {
        (self.active.load(Ordering::Acquire) as u64 + 1) * 10_000 / u64::from(self.weight)
    }
}

struct Route {
    id: String,
    engine: Engine,
    database: String,
    port: u16,
    priority: i32,
    role: Role,
    backend_database: Option<String>,
    pool_mode: PoolMode,
    members: Vec<Member>,
}

impl Route {
    fn specificity(&self) -> (bool, usize) {
        (
            self.port != 0,
            self.database
                .bytes()
                .filter(|&b| b != b'*' && b != b'?')
                .count(),
        )
    }

    fn same_group(&self, other: &Route) -> bool {
        self.priority == other.priority
            && self.port == other.port
            && self.database == other.database
    }
}

/// A session's hold on one server: counted while it lives; dropping it wakes waiting clients.
pub struct Lease {
    pub backend: Arc<Backend>,
    pub route_id: String,
    /// The database name to send to the server, when the route renames it.
    pub backend_database: Option<String>,
    pub pool_mode: PoolMode,
    active: Arc<AtomicUsize>,
    gauge: IntGauge,
    freed: Arc<Notify>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
        self.freed.notify_waiters();
    }
}

/// What a session asks for.
pub struct Want<'a> {
    pub engine: Engine,
    pub listener_port: u16,
    pub database: &'a str,
    pub read_only: bool,
    /// Servers this session already failed to dial.
    pub tried: &'a [Arc<Backend>],
}

/// The answer to a [`Want`].
pub enum Pick {
    Got(Lease),
    /// Healthy servers exist but every one is at its `max_connections`: wait (or close idle
    /// pooled connections of these routes).
    Full(Vec<String>),
    /// No server can take it; says why.
    Unavailable(String),
    NoRoute,
}

#[derive(Default)]
pub struct Table {
    /// Most specific first: priority, then a listener port, then the database pattern.
    routes: Vec<Route>,
}

impl Table {
    /// Compiles `specs` (every route of the module: routes of other protocols are an error),
    /// keeping the servers and session counts of `previous`.
    pub fn compile(
        specs: &[RouteSpec],
        previous: &Table,
        metrics: &Metrics,
    ) -> Result<Table, String> {
        let mut backends: HashMap<(Engine, String), Arc<Backend>> = HashMap::new();
        let mut members: HashMap<(&str, String), &Member> = HashMap::new();
        for route in &previous.routes {
            for member in &route.members {
                let address = member.backend.address.to_string();
                backends.insert((route.engine, address.clone()), Arc::clone(&member.backend));
                members.insert((route.id.as_str(), address), member);
            }
        }
        let mut routes = Vec::new();
        for spec in specs {
            let route = compile_route(spec, &mut backends, &members, metrics)
                .map_err(|e| format!("route {}: {e}", spec.id))?;
            routes.push(route);
        }
        routes.sort_by_key(|r| (Reverse(r.priority), Reverse(r.specificity())));
        forget_dropped(previous, &routes, metrics);
        Ok(Table { routes })
    }

    /// The server for `want`: the best-matching routes form its group; a read-only session
    /// prefers the group's replicas and falls back to its primaries, a read-write one takes a
    /// primary (or a replica where the group has only replicas, as on a read-only listener).
    /// Among healthy servers with room, the one with the fewest sessions for its weight wins.
    pub fn pick(&self, want: &Want, freed: &Arc<Notify>) -> Pick {
        let mut matching = self.routes.iter().filter(|r| {
            r.engine == want.engine
                && (r.port == 0 || r.port == want.listener_port)
                && glob_match(&r.database, want.database)
        });
        let Some(first) = matching.next() else {
            return Pick::NoRoute;
        };
        let group: Vec<&Route> = std::iter::once(first)
            .chain(matching.filter(|r| r.same_group(first)))
            .collect();
        let has_primary = group.iter().any(|r| r.role == Role::Primary);
        let tiers: &[Role] = if want.read_only {
            &[Role::Replica, Role::Primary]
        } else if has_primary {
            &[Role::Primary]
        } else {
            &[Role::Replica]
        };
        let mut full = Vec::new();
        for &role in tiers {
            let mut candidates: Vec<(&Route, &Member)> = group
                .iter()
                .filter(|r| r.role == role)
                .flat_map(|r| r.members.iter().map(move |m| (*r, m)))
                .filter(|(_, m)| {
                    m.backend.is_healthy() && !want.tried.iter().any(|t| Arc::ptr_eq(t, &m.backend))
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            if !candidates.iter().any(|(_, m)| m.has_room()) {
                full.extend(candidates.iter().map(|(r, _)| r.id.clone()));
                continue;
            }
            candidates.retain(|(_, m)| m.has_room());
            // Random order first, so equal loads share the sessions.
            let offset = rand::rng().random_range(0..candidates.len());
            candidates.rotate_left(offset);
            candidates.sort_by_key(|(_, m)| m.load());
            for &(route, member) in &candidates {
                if member.try_take() {
                    member.gauge.inc();
                    return Pick::Got(Lease {
                        backend: Arc::clone(&member.backend),
                        route_id: route.id.clone(),
                        backend_database: route.backend_database.clone(),
                        pool_mode: route.pool_mode,
                        active: Arc::clone(&member.active),
                        gauge: member.gauge.clone(),
                        freed: Arc::clone(freed),
                    });
                }
            }
            full.extend(candidates.iter().map(|(r, _)| r.id.clone()));
        }
        if !full.is_empty() {
            full.dedup();
            return Pick::Full(full);
        }
        let roles: Vec<&str> = tiers.iter().map(|r| r.name()).collect();
        let serving = match want.engine {
            Engine::Postgres => format!("database `{}`", want.database),
            Engine::Mysql => format!("listener port {}", want.listener_port),
        };
        Pick::Unavailable(format!(
            "no healthy {} server for {serving} (route {}): every one is down or could not be dialled",
            roles.join(" or "),
            first.id
        ))
    }

    /// Every server once, for health checks.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        let mut seen: Vec<Arc<Backend>> = Vec::new();
        for member in self.routes.iter().flat_map(|r| &r.members) {
            if !seen.iter().any(|b| Arc::ptr_eq(b, &member.backend)) {
                seen.push(Arc::clone(&member.backend));
            }
        }
        seen
    }

    /// Whether any route serves `engine`.
    pub fn serves(&self, engine: Engine) -> bool {
        self.routes.iter().any(|r| r.engine == engine)
    }
}

fn compile_route(
    spec: &RouteSpec,
    backends: &mut HashMap<(Engine, String), Arc<Backend>>,
    members: &HashMap<(&str, String), &Member>,
    metrics: &Metrics,
) -> Result<Route, String> {
    let engine = Engine::from_protocol(spec.protocol)
        .ok_or("protocol must be POSTGRES or MYSQL: the DBLB balances only those")?;
    let meta = |key: &str| {
        spec.metadata
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let database = meta("database").unwrap_or("*").to_owned();
    if engine == Engine::Mysql && database != "*" {
        return Err(format!(
            "metadata.database `{database}`: a MySQL client names its database only after the server greets it, so MySQL routes serve a whole listener; use `*` and metadata.listener_port for the listener"
        ));
    }
    let role = match meta("role").unwrap_or("primary") {
        "primary" => Role::Primary,
        "replica" => Role::Replica,
        other => {
            return Err(format!(
                "metadata.role `{other}` must be primary or replica"
            ));
        }
    };
    let max_connections: usize = match meta("max_connections") {
        Some(text) => text.parse().map_err(|_| {
            format!("metadata.max_connections `{text}` must be a whole number (0 for no limit)")
        })?,
        None => 0,
    };
    let pool_mode = match meta("pool_mode").unwrap_or("session") {
        "session" => PoolMode::Session,
        "transaction" if engine == Engine::Postgres => PoolMode::Transaction,
        "transaction" => {
            return Err(
                "metadata.pool_mode `transaction` applies to PostgreSQL routes only".into(),
            );
        }
        other => {
            return Err(format!(
                "metadata.pool_mode `{other}` must be session or transaction"
            ));
        }
    };
    let port: u16 = match meta("listener_port") {
        Some(text) => text.parse().map_err(|_| {
            format!("metadata.listener_port `{text}` must be a port number (0 for every listener)")
        })?,
        None => 0,
    };
    let backend_database = meta("backend_database").map(str::to_owned);
    if backend_database.is_some() && engine == Engine::Mysql {
        return Err("metadata.backend_database applies to PostgreSQL routes only".into());
    }
    let mut route_members = Vec::new();
    for (address, weight) in spec.servers()? {
        let key = address.to_string();
        let backend = Arc::clone(
            backends
                .entry((engine, key.clone()))
                .or_insert_with(|| Arc::new(Backend::new(address, engine, metrics))),
        );
        let active = members
            .get(&(spec.id.as_str(), key.clone()))
            .map_or_else(|| Arc::new(AtomicUsize::new(0)), |m| Arc::clone(&m.active));
        route_members.push(Member {
            backend,
            weight,
            max_connections,
            active,
            gauge: metrics.backend_sessions(&spec.id, &key),
        });
    }
    Ok(Route {
        id: spec.id.clone(),
        engine,
        database,
        port,
        priority: spec.priority,
        role,
        backend_database,
        pool_mode,
        members: route_members,
    })
}

/// Drops the metric series of servers and memberships the new table no longer has.
fn forget_dropped(previous: &Table, routes: &[Route], metrics: &Metrics) {
    for old in &previous.routes {
        for member in &old.members {
            let address = member.backend.address.to_string();
            let kept_member = routes.iter().any(|r| {
                r.id == old.id
                    && r.members
                        .iter()
                        .any(|m| m.backend.address.to_string() == address)
            });
            if !kept_member {
                metrics.forget_member(&old.id, &address);
            }
            let kept_backend = routes
                .iter()
                .flat_map(|r| &r.members)
                .any(|m| Arc::ptr_eq(&m.backend, &member.backend));
            if !kept_backend {
                info!(backend = %address, protocol = old.engine.name(), "backend no longer routed");
                metrics.forget_backend(old.engine.name(), &address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, protocol: pb::Protocol, servers: &str, meta: &[(&str, &str)]) -> RouteSpec {
        RouteSpec::try_from(pb::Route {
            route_id: id.into(),
            protocol: protocol as i32,
            destination_pattern: servers.into(),
            metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn want(database: &str, read_only: bool) -> Want<'_> {
        Want {
            engine: Engine::Postgres,
            listener_port: 6432,
            database,
            read_only,
            tried: &[],
        }
    }

    fn picked(table: &Table, want: &Want, freed: &Arc<Notify>) -> Lease {
        match table.pick(want, freed) {
            Pick::Got(lease) => lease,
            _ => panic!("a server must be picked"),
        }
    }

    #[test]
    fn databases_roles_limits_and_health() {
        let metrics = Metrics::new(|o| o);
        let freed = Arc::new(Notify::new());
        let specs = [
            route(
                "app",
                pb::Protocol::Postgres,
                "10.0.0.1:5432",
                &[("database", "app"), ("max_connections", "1")],
            ),
            route(
                "app-ro",
                pb::Protocol::Postgres,
                "10.0.0.2:5432",
                &[("database", "app"), ("role", "replica")],
            ),
            route("rest", pb::Protocol::Postgres, "10.0.0.3:5432", &[]),
        ];
        let table = Table::compile(&specs, &Table::default(), &metrics).unwrap();

        let lease = picked(&table, &want("app", false), &freed);
        assert_eq!(lease.backend.address.to_string(), "10.0.0.1:5432");
        assert!(
            matches!(table.pick(&want("app", false), &freed), Pick::Full(_)),
            "max_connections 1"
        );
        let reader = picked(&table, &want("app", true), &freed);
        assert_eq!(
            reader.backend.address.to_string(),
            "10.0.0.2:5432",
            "read-only goes to the replica"
        );
        drop(lease);
        assert!(
            matches!(table.pick(&want("app", false), &freed), Pick::Got(_)),
            "the slot is back"
        );
        assert_eq!(
            picked(&table, &want("other", false), &freed).route_id,
            "rest"
        );

        // A replica that is down: read-only sessions fall back to the primary.
        reader
            .backend
            .dial_failed(&std::io::Error::other("refused"));
        drop(reader);
        assert_eq!(picked(&table, &want("app", true), &freed).route_id, "app");

        // Recompiling keeps health and open sessions.
        let held = picked(&table, &want("app", false), &freed);
        let again = Table::compile(&specs, &table, &metrics).unwrap();
        assert!(matches!(
            again.pick(&want("app", false), &freed),
            Pick::Full(_)
        ));
        assert!(
            matches!(again.pick(&want("app", true), &freed), Pick::Full(_)),
            "replica still out, primary full"
        );
        drop(held);
    }

    #[test]
    fn bad_routes_are_refused_with_reasons() {
        let metrics = Metrics::new(|o| o);
        let compile =
            |spec: RouteSpec| Table::compile(&[spec], &Table::default(), &metrics).map(|_| ());
        let err = compile(route(
            "m",
            pb::Protocol::Mysql,
            "db:3306",
            &[("database", "shop")],
        ))
        .unwrap_err();
        assert!(err.contains("whole listener"), "{err}");
        let err = compile(route("h", pb::Protocol::Http, "web:80", &[])).unwrap_err();
        assert!(err.contains("POSTGRES or MYSQL"), "{err}");
        let err = compile(route(
            "r",
            pb::Protocol::Postgres,
            "db:5432",
            &[("role", "leader")],
        ))
        .unwrap_err();
        assert!(err.contains("primary or replica"), "{err}");
        let err = compile(route("s", pb::Protocol::Postgres, "", &[])).unwrap_err();
        assert!(err.contains("host:port"), "{err}");
    }
}
