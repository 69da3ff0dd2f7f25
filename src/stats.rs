//! `ModuleStats` as `MetricDataPoint`s, so metric listings show heartbeat stats beside reported
//! metrics under the same names everywhere.

use crate::pb;

/// One data point per numeric field of `stats`, stamped `at`, labelled `source=heartbeat`.
pub fn data_points(
    stats: &pb::ModuleStats,
    at: prost_types::Timestamp,
) -> Vec<pb::MetricDataPoint> {
    let fields: [(&str, f64); 13] = [
        ("total_requests", stats.total_requests as f64),
        ("successful_requests", stats.successful_requests as f64),
        ("failed_requests", stats.failed_requests as f64),
        ("active_connections", stats.active_connections as f64),
        ("total_connections", stats.total_connections as f64),
        ("avg_latency_ms", stats.avg_latency_ms),
        ("p50_latency_ms", stats.p50_latency_ms),
        ("p95_latency_ms", stats.p95_latency_ms),
        ("p99_latency_ms", stats.p99_latency_ms),
        ("bytes_received", stats.bytes_received as f64),
        ("bytes_sent", stats.bytes_sent as f64),
        ("cpu_usage_percent", stats.cpu_usage_percent),
        ("memory_usage_mb", stats.memory_usage_mb),
    ];
    fields
        .into_iter()
        .map(|(name, value)| pb::MetricDataPoint {
            name: name.to_owned(),
            value,
            labels: [("source".to_owned(), "heartbeat".to_owned())].into(),
            timestamp: Some(at),
        })
        .collect()
}

/// Keeps the points whose name is in `names` (all when empty) and whose timestamp lies in
/// `[start, end]` (an unset bound is open).
pub fn select(
    points: impl IntoIterator<Item = pb::MetricDataPoint>,
    names: &[String],
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Vec<pb::MetricDataPoint> {
    let key = |ts: &prost_types::Timestamp| (ts.seconds, ts.nanos);
    points
        .into_iter()
        .filter(|p| names.is_empty() || names.iter().any(|n| n == &p.name))
        .filter(|p| {
            let at = p.timestamp.as_ref().map(key);
            start.is_none_or(|s| at.is_some_and(|a| a >= key(s)))
                && end.is_none_or(|e| at.is_some_and(|a| a <= key(e)))
        })
        .collect()
}
