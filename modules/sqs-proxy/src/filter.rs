//! The ordering filter: a message from an older job submission than the newest one seen for its
//! `hostname` is stale and is not queued. The newest submission time per host name lives in one
//! concurrent map shared by every connection; the compare and the update are one atomic step
//! per host name, so two racing messages can never both pass as "newest".

use std::time::Instant;

use dashmap::DashMap;

/// What the filter says about one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Queue it (it carries no ordering fields, or it is as new as or newer than any seen).
    Queue,
    /// An older submission than the newest seen for its host name.
    Filtered,
}

struct Newest {
    submitted: f64,
    seen: Instant,
}

pub struct OrderingFilter {
    newest: DashMap<String, Newest>,
    max_hosts: usize,
}

impl OrderingFilter {
    /// A filter that remembers at most `max_hosts` host names; past that, the ones not heard
    /// from for longest are forgotten first (a forgotten host's next message is queued).
    pub fn new(max_hosts: usize) -> Self {
        OrderingFilter {
            newest: DashMap::new(),
            max_hosts: max_hosts.max(1),
        }
    }

    /// Decides for a message body (a JSON object).
    pub fn decide(&self, body: &serde_json::Map<String, serde_json::Value>) -> Decision {
        let (Some(host), Some(submitted)) = (
            body.get("hostname").and_then(|h| h.as_str()),
            body.get("job_submission_time").and_then(submission_time),
        ) else {
            return Decision::Queue;
        };
        let now = Instant::now();
        if let Some(mut newest) = self.newest.get_mut(host) {
            newest.seen = now;
            if submitted < newest.submitted {
                return Decision::Filtered;
            }
            newest.submitted = submitted;
            return Decision::Queue;
        }
        if self.newest.len() >= self.max_hosts {
            self.forget_oldest();
        }
        let mut newest = self.newest.entry(host.to_owned()).or_insert(Newest {
            submitted,
            seen: now,
        });
        // Another message for this host may have inserted first.
        if submitted < newest.submitted {
            return Decision::Filtered;
        }
        newest.submitted = submitted;
        newest.seen = now;
        Decision::Queue
    }

    /// Host names remembered now.
    pub fn hosts(&self) -> usize {
        self.newest.len()
    }

    /// Forgets the tenth of the host names heard from longest ago (at least one).
    fn forget_oldest(&self) {
        let mut seen: Vec<Instant> = self.newest.iter().map(|e| e.seen).collect();
        let drop = (seen.len() / 10).max(1);
        if drop > seen.len() {
            return;
        }
        let (_, &mut cutoff, _) = seen.select_nth_unstable(drop - 1);
        self.newest.retain(|_, newest| newest.seen > cutoff);
    }
}

/// Unix seconds, as a JSON number or a numeric string.
fn submission_time(value: &serde_json::Value) -> Option<f64> {
    match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|t: &f64| t.is_finite())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn message(
        host: &str,
        submitted: serde_json::Value,
    ) -> serde_json::Map<String, serde_json::Value> {
        serde_json::json!({"hostname": host, "job_submission_time": submitted})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn older_submissions_are_filtered_per_host() {
        let filter = OrderingFilter::new(100);
        assert_eq!(filter.decide(&message("a", 100.into())), Decision::Queue);
        assert_eq!(
            filter.decide(&message("a", 100.into())),
            Decision::Queue,
            "equal is queued"
        );
        assert_eq!(filter.decide(&message("a", 99.into())), Decision::Filtered);
        assert_eq!(
            filter.decide(&message("b", 50.into())),
            Decision::Queue,
            "hosts are apart"
        );
        assert_eq!(
            filter.decide(&message("a", "101.5".into())),
            Decision::Queue
        );
        assert_eq!(filter.decide(&message("a", 101.into())), Decision::Filtered);
        let no_time = serde_json::json!({"hostname": "a"})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(filter.decide(&no_time), Decision::Queue);
        assert_eq!(filter.decide(&message("a", "soon".into())), Decision::Queue);
    }

    #[test]
    fn racing_threads_never_lose_the_newest() {
        let filter = Arc::new(OrderingFilter::new(100));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let filter = Arc::clone(&filter);
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|n| filter.decide(&message("h", (n * 8 + t).into())))
                        .filter(|d| *d == Decision::Queue)
                        .count()
                })
            })
            .collect();
        let queued: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(queued > 0);
        // No update was lost: the newest time remembered is the newest sent.
        assert_eq!(
            filter.decide(&message("h", 7998.into())),
            Decision::Filtered
        );
        assert_eq!(filter.decide(&message("h", 7999.into())), Decision::Queue);
    }

    #[test]
    fn memory_is_bounded() {
        let filter = OrderingFilter::new(50);
        for n in 0..500 {
            filter.decide(&message(&format!("host-{n}"), 1.into()));
        }
        assert!(filter.hosts() <= 50, "{} hosts remembered", filter.hosts());
        assert_eq!(
            filter.decide(&message("host-499", 0.into())),
            Decision::Filtered
        );
    }
}
