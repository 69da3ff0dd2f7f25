//! A module's own counters: requests, errors, connections, bytes and latency percentiles, kept
//! twice on purpose. Prometheus counters only grow (graphs need that); the `GetStats` view can be
//! reset by the operator (`reset_counters`) and starts a new `since` window.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use marchproxy::{names::ModuleKind, pb, time};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Upper bounds of the latency buckets, in milliseconds (about 25 % apart, 0.1 ms to 2 min).
fn latency_bounds() -> Vec<f64> {
    let mut bounds = Vec::new();
    let mut bound = 0.1;
    while bound < 120_000.0 {
        bounds.push(bound);
        bound *= 1.25;
    }
    bounds
}

/// Resettable counters and a latency histogram for percentiles.
struct Window {
    total_requests: AtomicI64,
    failed_requests: AtomicI64,
    total_connections: AtomicI64,
    bytes_received: AtomicI64,
    bytes_sent: AtomicI64,
    latency_sum_us: AtomicU64,
    latency_buckets: Vec<AtomicU64>,
    since: Mutex<SystemTime>,
}

impl Window {
    fn new(buckets: usize) -> Self {
        Window {
            total_requests: AtomicI64::new(0),
            failed_requests: AtomicI64::new(0),
            total_connections: AtomicI64::new(0),
            bytes_received: AtomicI64::new(0),
            bytes_sent: AtomicI64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency_buckets: (0..=buckets).map(|_| AtomicU64::new(0)).collect(),
            since: Mutex::new(SystemTime::now()),
        }
    }

    fn reset(&self) {
        for counter in [
            &self.total_requests,
            &self.failed_requests,
            &self.total_connections,
            &self.bytes_received,
            &self.bytes_sent,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.latency_sum_us.store(0, Ordering::Relaxed);
        for bucket in &self.latency_buckets {
            bucket.store(0, Ordering::Relaxed);
        }
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
    }
}

/// The module's live counters. Cheap to update from any task.
pub struct Stats {
    instance_id: String,
    kind: ModuleKind,
    bounds: Vec<f64>,
    window: Window,
    active_connections: AtomicI64,
    /// Woken whenever a connection closes (the drain waits on it).
    pub closed: tokio::sync::Notify,
    in_flight: AtomicI64,
    process: Mutex<ProcessSample>,
    /// The runtime's metrics, named `marchproxy_module_*`.
    pub registry: Registry,
    /// The module's own metrics under their own names (`sqs_proxy_*`, `ailb_*`...), served on
    /// the same `/metrics`; build them with [`Stats::labelled`] so they carry the instance.
    pub module_registry: Registry,
    requests: IntCounterVec,
    connections: IntCounter,
    active: IntGauge,
    /// `bytes_total{direction}`'s two series, looked up once: they are counted per chunk.
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    latency: Histogram,
    rate_limited: IntCounter,
}

/// Tracks one open connection; dropping it closes the count.
pub struct ConnectionGuard {
    stats: Arc<Stats>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.active_connections.fetch_sub(1, Ordering::AcqRel);
        self.stats.active.dec();
        self.stats.closed.notify_waiters();
    }
}

/// Tracks one request in progress; finish it with [`RequestGuard::finish`] to count it.
/// A request dropped without finishing counts as failed.
pub struct RequestGuard {
    stats: Arc<Stats>,
    started: Instant,
    finished: bool,
}

impl RequestGuard {
    pub fn finish(mut self, success: bool) {
        self.record(success);
    }

    fn record(&mut self, success: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.stats.record_request(self.started.elapsed(), success);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.record(false);
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> C {
    // Each metric below has a distinct fixed name in a registry of its own.
    registry
        .register(Box::new(collector.clone()))
        .unwrap_or_else(|e| panic!("metric registered twice: {e}"));
    collector
}

impl Stats {
    pub fn new(instance_id: &str, kind: ModuleKind) -> Arc<Self> {
        let bounds = latency_bounds();
        let registry = Registry::new_custom(Some("marchproxy_module".into()), None)
            .unwrap_or_else(|e| panic!("the fixed prefix is valid: {e}"));
        let labels = |opts: Opts| {
            opts.const_label("module_type", kind.name())
                .const_label("instance", instance_id)
        };
        let requests = register(
            &registry,
            IntCounterVec::new(
                labels(Opts::new(
                    "requests_total",
                    "Requests handled, by result (success, failure)",
                )),
                &["result"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let connections = register(
            &registry,
            IntCounter::with_opts(labels(Opts::new(
                "connections_total",
                "Connections accepted",
            )))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let active = register(
            &registry,
            IntGauge::with_opts(labels(Opts::new(
                "active_connections",
                "Connections open now",
            )))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let bytes = register(
            &registry,
            IntCounterVec::new(
                labels(Opts::new(
                    "bytes_total",
                    "Bytes moved, by direction (received, sent)",
                )),
                &["direction"],
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let rate_limited = register(
            &registry,
            IntCounter::with_opts(labels(Opts::new(
                "rate_limited_total",
                "Requests or connections refused by a rate limit",
            )))
            .unwrap_or_else(|e| panic!("{e}")),
        );
        let latency_opts = HistogramOpts::new("request_duration_seconds", "Request latency")
            .const_label("module_type", kind.name())
            .const_label("instance", instance_id)
            .buckets(bounds.iter().step_by(3).map(|ms| ms / 1000.0).collect());
        let latency = register(
            &registry,
            Histogram::with_opts(latency_opts).unwrap_or_else(|e| panic!("{e}")),
        );
        Arc::new(Stats {
            instance_id: instance_id.to_owned(),
            kind,
            window: Window::new(bounds.len()),
            bounds,
            active_connections: AtomicI64::new(0),
            closed: tokio::sync::Notify::new(),
            in_flight: AtomicI64::new(0),
            process: Mutex::new(ProcessSample::now()),
            registry,
            module_registry: Registry::new(),
            requests,
            connections,
            active,
            bytes_in: bytes.with_label_values(&["received"]),
            bytes_out: bytes.with_label_values(&["sent"]),
            latency,
            rate_limited,
        })
    }

    /// `opts` with this instance's `module_type` and `instance` labels, for module metrics.
    pub fn labelled(&self, opts: Opts) -> Opts {
        opts.const_label("module_type", self.kind.name())
            .const_label("instance", &self.instance_id)
    }

    /// Counts a new connection until the guard drops.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.active_connections.fetch_add(1, Ordering::AcqRel);
        self.window
            .total_connections
            .fetch_add(1, Ordering::Relaxed);
        self.connections.inc();
        self.active.inc();
        ConnectionGuard {
            stats: Arc::clone(self),
        }
    }

    /// Starts timing a request.
    pub fn request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            stats: Arc::clone(self),
            started: Instant::now(),
            finished: false,
        }
    }

    fn record_request(&self, took: Duration, success: bool) {
        self.window.total_requests.fetch_add(1, Ordering::Relaxed);
        if !success {
            self.window.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        self.requests
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
        let ms = took.as_secs_f64() * 1000.0;
        let bucket = self.bounds.partition_point(|bound| *bound < ms);
        self.window.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.window
            .latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.latency.observe(took.as_secs_f64());
    }

    pub fn bytes_received(&self, n: u64) {
        self.window
            .bytes_received
            .fetch_add(n as i64, Ordering::Relaxed);
        self.bytes_in.inc_by(n);
    }

    pub fn bytes_sent(&self, n: u64) {
        self.window
            .bytes_sent
            .fetch_add(n as i64, Ordering::Relaxed);
        self.bytes_out.inc_by(n);
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub fn active_connections(&self) -> i64 {
        self.active_connections.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The latency below which `quantile` of the requests finished, in ms (bucket interpolation).
    fn percentile(&self, counts: &[u64], quantile: f64) -> f64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = quantile * total as f64;
        let mut seen = 0.0;
        for (index, count) in counts.iter().enumerate() {
            let next = seen + *count as f64;
            if next >= rank && *count > 0 {
                let lower = if index == 0 {
                    0.0
                } else {
                    self.bounds[index - 1]
                };
                let upper = self.bounds.get(index).copied().unwrap_or(lower * 1.25);
                return lower + (upper - lower) * ((rank - seen) / *count as f64).clamp(0.0, 1.0);
            }
            seen = next;
        }
        self.bounds.last().copied().unwrap_or(0.0)
    }

    /// The `GetStats` view, optionally starting a new window afterwards.
    pub fn snapshot(
        &self,
        custom: std::collections::HashMap<String, String>,
        reset: bool,
    ) -> pb::ModuleStats {
        let w = &self.window;
        let counts: Vec<u64> = w
            .latency_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total = w.total_requests.load(Ordering::Relaxed);
        let failed = w.failed_requests.load(Ordering::Relaxed);
        let (cpu, memory) = self.process_usage();
        let stats = pb::ModuleStats {
            instance_id: self.instance_id.clone(),
            total_requests: total,
            successful_requests: total - failed,
            failed_requests: failed,
            active_connections: self.active_connections(),
            total_connections: w.total_connections.load(Ordering::Relaxed),
            avg_latency_ms: if total > 0 {
                w.latency_sum_us.load(Ordering::Relaxed) as f64 / 1000.0 / total as f64
            } else {
                0.0
            },
            p50_latency_ms: self.percentile(&counts, 0.50),
            p95_latency_ms: self.percentile(&counts, 0.95),
            p99_latency_ms: self.percentile(&counts, 0.99),
            bytes_received: w.bytes_received.load(Ordering::Relaxed),
            bytes_sent: w.bytes_sent.load(Ordering::Relaxed),
            cpu_usage_percent: cpu,
            memory_usage_mb: memory,
            since: Some(time::timestamp(
                *w.since.lock().unwrap_or_else(|e| e.into_inner()),
            )),
            custom_stats: custom,
        };
        if reset {
            w.reset();
        }
        stats
    }

    /// CPU percent since the previous call (of one core), and resident memory in MB.
    fn process_usage(&self) -> (f64, f64) {
        let now = ProcessSample::now();
        let mut last = self.process.lock().unwrap_or_else(|e| e.into_inner());
        let wall = now.at.duration_since(last.at).as_secs_f64();
        let cpu = if wall > 0.0 {
            (100.0 * (now.cpu_seconds - last.cpu_seconds) / wall).max(0.0)
        } else {
            0.0
        };
        // Keep the older sample when calls come close together, so the rate stays meaningful.
        if wall >= 1.0 {
            *last = now.clone();
        }
        (cpu, now.resident_mb)
    }
}

/// CPU time and memory of this process, from /proc (zero where /proc is absent).
#[derive(Clone)]
struct ProcessSample {
    at: Instant,
    cpu_seconds: f64,
    resident_mb: f64,
}

impl ProcessSample {
    fn now() -> Self {
        // Linux reports utime and stime (fields 14 and 15) in clock ticks of 1/100 s.
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                let after_name = stat.rsplit_once(')')?.1;
                let fields: Vec<&str> = after_name.split_whitespace().collect();
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) / 100.0)
            })
            .unwrap_or(0.0);
        let resident_mb = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb / 1024.0)
            })
            .unwrap_or(0.0);
        ProcessSample {
            at: Instant::now(),
            cpu_seconds,
            resident_mb,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_latencies() {
        let stats = Stats::new("t", ModuleKind::Alb);
        for ms in 1..=100 {
            stats.record_request(Duration::from_millis(ms), ms % 10 != 0);
        }
        let snapshot = stats.snapshot(Default::default(), true);
        assert_eq!(snapshot.total_requests, 100);
        assert_eq!(snapshot.failed_requests, 10);
        assert!(
            (40.0..60.0).contains(&snapshot.p50_latency_ms),
            "{}",
            snapshot.p50_latency_ms
        );
        assert!(
            (85.0..110.0).contains(&snapshot.p95_latency_ms),
            "{}",
            snapshot.p95_latency_ms
        );
        assert!(snapshot.p99_latency_ms >= snapshot.p95_latency_ms);
        assert!((45.0..56.0).contains(&snapshot.avg_latency_ms));
        assert!(snapshot.memory_usage_mb > 0.0, "read from /proc");
        let after = stats.snapshot(Default::default(), false);
        assert_eq!(after.total_requests, 0, "reset starts a new window");
        assert_eq!(after.p99_latency_ms, 0.0);
    }

    #[test]
    fn guards_count_and_uncount() {
        let stats = Stats::new("t", ModuleKind::Alb);
        let connection = stats.connection();
        let request = stats.request();
        assert_eq!((stats.active_connections(), stats.in_flight()), (1, 1));
        drop(request);
        drop(connection);
        assert_eq!((stats.active_connections(), stats.in_flight()), (0, 0));
        let snapshot = stats.snapshot(Default::default(), false);
        assert_eq!(
            (
                snapshot.total_requests,
                snapshot.failed_requests,
                snapshot.total_connections
            ),
            (1, 1, 1)
        );
        let metrics = marchproxy::admin::render(&stats.registry);
        assert!(metrics.contains("marchproxy_module_requests_total{instance=\"t\",module_type=\"alb\",result=\"failure\"} 1"), "{metrics}");
    }
}
