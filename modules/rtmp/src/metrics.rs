//! What an operator graphs for the RTMP module: streams, publishers and players now, bytes in and
//! out, publishers refused (by reason) and players that fell behind (skipped ahead or dropped).
//! Served on the admin `/metrics` beside the runtime's `marchproxy_module_*` figures; per-stream
//! detail (bitrate, players) is on the admin `/stats` page.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub streams: IntGauge,
    pub publishers: IntGauge,
    pub players: IntGauge,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    refused: IntCounterVec,
    pub player_skips: IntCounter,
    pub players_dropped: IntCounter,
    pub restream_connects: IntCounterVec,
}

impl Metrics {
    /// Metrics whose options pass through `labelled` (the instance's labels).
    pub fn new(labelled: impl Fn(Opts) -> Opts) -> Self {
        // Names and label sets are fixed and valid, so building them cannot fail.
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(labelled(Opts::new(name, help)))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(labelled(Opts::new(name, help)))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let by = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(labelled(Opts::new(name, help)), &[label])
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        Metrics {
            streams: gauge("rtmp_streams_active", "Streams with a publisher or players"),
            publishers: gauge("rtmp_publishers_active", "Publishers connected"),
            players: gauge("rtmp_players_active", "Players connected"),
            bytes_received: counter("rtmp_bytes_received_total", "Media bytes from publishers"),
            bytes_sent: counter("rtmp_bytes_sent_total", "Bytes sent to players"),
            refused: by(
                "rtmp_publish_refused_total",
                "Publishers refused, by reason (key, callback, taken)",
                "reason",
            ),
            player_skips: counter(
                "rtmp_player_skips_total",
                "Times a player's queue was full and it skipped to the next keyframe",
            ),
            players_dropped: counter(
                "rtmp_players_dropped_total",
                "Players dropped for staying behind too long",
            ),
            restream_connects: by(
                "rtmp_restream_connects_total",
                "Re-streaming connections to destinations, by outcome (ok, failed)",
                "outcome",
            ),
        }
    }

    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.streams.clone()))?;
        registry.register(Box::new(self.publishers.clone()))?;
        registry.register(Box::new(self.players.clone()))?;
        registry.register(Box::new(self.bytes_received.clone()))?;
        registry.register(Box::new(self.bytes_sent.clone()))?;
        registry.register(Box::new(self.refused.clone()))?;
        registry.register(Box::new(self.player_skips.clone()))?;
        registry.register(Box::new(self.players_dropped.clone()))?;
        registry.register(Box::new(self.restream_connects.clone()))?;
        Ok(())
    }
}
