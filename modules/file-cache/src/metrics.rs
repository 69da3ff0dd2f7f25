//! The cache's own series, named with the owning module's prefix (`alb_cache_*`,
//! `wasm_registry_cache_*`): what is stored, what was evicted, committed or thrown away.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct CacheMetrics {
    entries: IntGauge,
    bytes: IntGauge,
    evictions: IntCounter,
    commits: IntCounter,
    discarded: IntCounterVec,
    relayed_full: IntCounter,
}

impl CacheMetrics {
    /// Series named `{prefix}_cache_*`; `labelled` adds the module's constant labels.
    pub fn new(prefix: &str, labelled: impl Fn(Opts) -> Opts) -> CacheMetrics {
        let opts =
            |name: &str, help: &str| labelled(Opts::new(format!("{prefix}_cache_{name}"), help));
        // The names are fixed and valid; only a bad name or label could fail here.
        let gauge = |name, help| IntGauge::with_opts(opts(name, help)).expect("valid gauge");
        let counter = |name, help| IntCounter::with_opts(opts(name, help)).expect("valid counter");
        CacheMetrics {
            entries: gauge("entries", "Entries committed to the cache"),
            bytes: gauge("bytes", "Bytes of the committed entries"),
            evictions: counter(
                "evictions_total",
                "Entries evicted (least recently used) to stay under the soft limit",
            ),
            commits: counter("commits_total", "Downloads committed whole to the cache"),
            discarded: IntCounterVec::new(
                opts(
                    "discarded_total",
                    "Downloads not committed, by reason (download: failed or short or a digest mismatch; too_large; io)",
                ),
                &["reason"],
            )
            .expect("valid counter"),
            relayed_full: counter(
                "full_total",
                "Lookups relayed without caching because the cache was at its hard limit",
            ),
        }
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.entries.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.evictions.clone()))?;
        registry.register(Box::new(self.commits.clone()))?;
        registry.register(Box::new(self.discarded.clone()))?;
        registry.register(Box::new(self.relayed_full.clone()))
    }

    pub(crate) fn stored(&self, entries: usize, bytes: u64) {
        self.entries.set(entries as i64);
        self.bytes.set(bytes as i64);
    }

    pub(crate) fn evicted(&self) {
        self.evictions.inc();
    }

    pub(crate) fn committed(&self) {
        self.commits.inc();
    }

    pub(crate) fn discarded(&self, reason: &str) {
        self.discarded.with_label_values(&[reason]).inc();
    }

    pub(crate) fn over_hard_limit(&self) {
        self.relayed_full.inc();
    }
}
