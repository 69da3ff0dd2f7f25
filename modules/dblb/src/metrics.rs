//! What an operator graphs for the DBLB: sessions by outcome, sessions open per route and
//! server, queries, time spent waiting for a free server and clients waiting now, backend
//! health and connect failures, cancel requests, and pooled connections. Served on the admin `/metrics` beside the
//! runtime's `marchproxy_module_*` figures (connections, bytes, rate-limited clients).

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    sessions: IntCounterVec,
    queries: IntCounterVec,
    wait: HistogramVec,
    pub waiting: IntGauge,
    backend_up: IntGaugeVec,
    backend_sessions: IntGaugeVec,
    connect_failures: IntCounterVec,
    cancels: IntCounterVec,
    pool_idle: IntGaugeVec,
    checkouts: IntCounterVec,
    server_logins: IntCounterVec,
}

/// Why a session ended before or after reaching a server (`dblb_sessions_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to a server until one side closed.
    Served,
    /// No route serves the database (or listener).
    NoRoute,
    /// Every server that could take it is down or could not be dialled.
    Unavailable,
    /// It waited `queue_timeout_ms` for a free server, or the wait queue was full.
    Full,
    /// The startup packet was malformed, unsupported, cut short or late (a connection closed
    /// before sending anything, such as a port probe, is not a session).
    BadStartup,
    /// Over its client rate limit.
    RateLimited,
    /// The DBLB authenticated the client itself (`module.auth_type`) and it failed.
    AuthFailed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::NoRoute => "no_route",
            Outcome::Unavailable => "unavailable",
            Outcome::Full => "full",
            Outcome::BadStartup => "bad_startup",
            Outcome::RateLimited => "rate_limited",
            Outcome::AuthFailed => "auth_failed",
        }
    }
}

impl Metrics {
    /// Metrics whose options pass through `labelled` (the instance's labels).
    pub fn new(labelled: impl Fn(Opts) -> Opts) -> Self {
        // Names and label sets are fixed and valid, so building them cannot fail.
        let counters = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(labelled(Opts::new(name, help)), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(labelled(Opts::new(name, help)), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let opts = labelled(Opts::new(
            "dblb_wait_seconds",
            "Time a client waited for a server with a free connection",
        ));
        let wait = HistogramVec::new(
            HistogramOpts::from(opts).buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["protocol"],
        )
        .unwrap_or_else(|e| panic!("metric dblb_wait_seconds: {e}"));
        Metrics {
            sessions: counters(
                "dblb_sessions_total",
                "Client sessions by protocol and outcome (served, no_route, unavailable, full, bad_startup, rate_limited, auth_failed)",
                &["protocol", "outcome"],
            ),
            queries: counters(
                "dblb_queries_total",
                "Queries relayed (PostgreSQL Query and Execute messages, MySQL COM_QUERY and COM_STMT_EXECUTE)",
                &["protocol"],
            ),
            wait,
            waiting: IntGauge::with_opts(labelled(Opts::new(
                "dblb_waiting_clients",
                "Clients waiting now for a server with a free connection",
            )))
            .unwrap_or_else(|e| panic!("metric dblb_waiting_clients: {e}")),
            backend_up: gauges(
                "dblb_backend_up",
                "1 while a backend passes its protocol health checks, 0 while it is out",
                &["protocol", "backend"],
            ),
            backend_sessions: gauges(
                "dblb_backend_sessions",
                "Sessions open now, per route and backend",
                &["route", "backend"],
            ),
            connect_failures: counters(
                "dblb_backend_connect_failures_total",
                "Times dialling a backend for a session failed (the session went to another server)",
                &["backend"],
            ),
            cancels: counters(
                "dblb_cancel_requests_total",
                "PostgreSQL cancel requests by outcome (forwarded, idle, unknown, failed)",
                &["outcome"],
            ),
            pool_idle: gauges(
                "dblb_pool_idle_connections",
                "Pooled server connections idle now (transaction pooling), per route",
                &["route"],
            ),
            checkouts: counters(
                "dblb_pool_checkouts_total",
                "Transactions (sessions, on session-pooled routes) given a pooled server connection, per route",
                &["route"],
            ),
            server_logins: counters(
                "dblb_server_logins_total",
                "Server connections the DBLB logged in itself for the clients it authenticates (module.auth_type), per route and outcome (ok, failed)",
                &["route", "outcome"],
            ),
        }
    }

    pub fn session(&self, protocol: &str, outcome: Outcome) {
        self.sessions
            .with_label_values(&[protocol, outcome.label()])
            .inc();
    }

    pub fn waited(&self, protocol: &str, seconds: f64) {
        self.wait.with_label_values(&[protocol]).observe(seconds);
    }

    pub fn backend_up(&self, protocol: &str, backend: &str) -> IntGauge {
        self.backend_up.with_label_values(&[protocol, backend])
    }

    pub fn forget_backend(&self, protocol: &str, backend: &str) {
        let _ = self.backend_up.remove_label_values(&[protocol, backend]);
    }

    pub fn backend_sessions(&self, route: &str, backend: &str) -> IntGauge {
        self.backend_sessions.with_label_values(&[route, backend])
    }

    pub fn forget_member(&self, route: &str, backend: &str) {
        let _ = self.backend_sessions.remove_label_values(&[route, backend]);
    }

    pub fn connect_failed(&self, backend: &str) {
        self.connect_failures.with_label_values(&[backend]).inc();
    }

    pub fn cancel(&self, outcome: &str) {
        self.cancels.with_label_values(&[outcome]).inc();
    }

    pub fn pool_idle(&self, route: &str) -> IntGauge {
        self.pool_idle.with_label_values(&[route])
    }

    pub fn server_login(&self, route: &str, outcome: &str) {
        self.server_logins
            .with_label_values(&[route, outcome])
            .inc();
    }

    pub fn checkouts(&self, route: &str) -> IntCounter {
        self.checkouts.with_label_values(&[route])
    }

    /// The queries counter of `protocol`, for a session to count into without lookups.
    pub fn query_counter(&self, protocol: &str) -> IntCounter {
        self.queries.with_label_values(&[protocol])
    }

    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.sessions.clone()))?;
        registry.register(Box::new(self.queries.clone()))?;
        registry.register(Box::new(self.wait.clone()))?;
        registry.register(Box::new(self.waiting.clone()))?;
        registry.register(Box::new(self.backend_up.clone()))?;
        registry.register(Box::new(self.backend_sessions.clone()))?;
        registry.register(Box::new(self.connect_failures.clone()))?;
        registry.register(Box::new(self.cancels.clone()))?;
        registry.register(Box::new(self.pool_idle.clone()))?;
        registry.register(Box::new(self.checkouts.clone()))?;
        registry.register(Box::new(self.server_logins.clone()))?;
        Ok(())
    }
}
