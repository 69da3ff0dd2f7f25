//! What an operator graphs for the ALB: requests by route and status class, their latency,
//! upstream tries by server and outcome (so one bad server stands out), retries, and each
//! server's health, ejections and requests in flight. Served on the module's `/metrics` beside
//! the runtime's own `marchproxy_module_*` figures.

use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, core::Collector,
};

use crate::pool::ServerMetrics;

pub struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream: IntCounterVec,
    upstream_duration: HistogramVec,
    retries: IntCounterVec,
    healthy: IntGaugeVec,
    ejections: IntCounterVec,
    active: IntGaugeVec,
    forwarded: IntCounterVec,
    /// The forward proxy's disk cache (`alb_cache_*`).
    pub cache: marchproxy_file_cache::CacheMetrics,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Every `outcome` of `alb_upstream_requests_total`.
const OUTCOMES: [&str; 8] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "connect_error",
    "timeout",
    "error",
];

/// `2xx`, `4xx`... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// Metrics whose options pass through `labelled` (the instance's labels).
    pub fn new(labelled: impl Fn(Opts) -> Opts) -> Self {
        // Names and label sets are fixed and valid, so building them cannot fail.
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(labelled(Opts::new(name, help)), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(labelled(Opts::new(name, help)), &["route", "server"])
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts {
                    common_opts: labelled(Opts::new(name, help)),
                    buckets: LATENCY_BUCKETS.to_vec(),
                },
                labels,
            )
            .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        Metrics {
            requests: counter(
                "alb_requests_total",
                "Requests answered, by route (`none` when no route matched) and status class",
                &["route", "status_class"],
            ),
            duration: histogram(
                "alb_request_duration_seconds",
                "Time from a request's arrival to its answer's headers, by route",
                &["route"],
            ),
            upstream: counter(
                "alb_upstream_requests_total",
                "Tries sent to upstream servers, by outcome (2xx..5xx, connect_error, timeout, error)",
                &["route", "server", "outcome"],
            ),
            upstream_duration: histogram(
                "alb_upstream_duration_seconds",
                "Time for an upstream server to answer one try",
                &["route", "server"],
            ),
            retries: counter(
                "alb_retries_total",
                "Tries made again on another server after a failure, by route",
                &["route"],
            ),
            healthy: gauge(
                "alb_upstream_healthy",
                "1 while the server passes its active health checks (always 1 without them)",
            ),
            ejections: counter(
                "alb_upstream_ejections_total",
                "Times passive outlier ejection took the server out",
                &["route", "server"],
            ),
            active: gauge(
                "alb_upstream_active_requests",
                "Requests sent to the server and not yet answered",
            ),
            forwarded: counter(
                "alb_forward_requests_total",
                "Forward-proxy requests by outcome: hit (a cached file), joined (a download under way), filled (fetched and cached), relayed (not cached: no_cache, too large, cache full), upstream_status (upstream answered other than 200), refused (400 or 429), failed (502, 504, 500)",
                &["outcome"],
            ),
            cache: marchproxy_file_cache::CacheMetrics::new("alb", &labelled),
        }
    }

    fn collectors(&self) -> [Box<dyn Collector>; 9] {
        [
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.upstream.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.healthy.clone()),
            Box::new(self.ejections.clone()),
            Box::new(self.active.clone()),
            Box::new(self.forwarded.clone()),
        ]
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        self.collectors()
            .into_iter()
            .try_for_each(|c| registry.register(c))?;
        self.cache.register(registry)
    }

    pub fn server(&self, route: &str, server: &str) -> ServerMetrics {
        let labels = [route, server];
        ServerMetrics {
            healthy: self.healthy.with_label_values(&labels),
            ejections: self.ejections.with_label_values(&labels),
            active: self.active.with_label_values(&labels),
        }
    }

    /// Drops the per-server series of a server no route has any more.
    pub fn forget_server(&self, route: &str, server: &str) {
        let labels = [route, server];
        let _ = self.healthy.remove_label_values(&labels);
        let _ = self.ejections.remove_label_values(&labels);
        let _ = self.active.remove_label_values(&labels);
        let _ = self.upstream_duration.remove_label_values(&labels);
        for outcome in OUTCOMES {
            let _ = self.upstream.remove_label_values(&[route, server, outcome]);
        }
    }

    pub fn answered(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, status_class(status)])
            .inc();
        self.duration
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    pub fn tried(&self, route: &str, server: &str, outcome: &str, elapsed: Duration) {
        self.upstream
            .with_label_values(&[route, server, outcome])
            .inc();
        self.upstream_duration
            .with_label_values(&[route, server])
            .observe(elapsed.as_secs_f64());
    }

    pub fn forwarded(&self, outcome: &str) {
        self.forwarded.with_label_values(&[outcome]).inc();
    }

    pub fn retried(&self, route: &str) {
        self.retries.with_label_values(&[route]).inc();
    }
}
