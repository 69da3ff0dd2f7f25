//! What an operator graphs for the SQS proxy: messages received, queued, filtered and rejected
//! (by reason), how long the queue takes to accept a message, and what the puller did.
//! Served on the module's `/metrics` beside the runtime's own `marchproxy_module_*` figures.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why a message was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    InvalidJson,
    NotAnObject,
    TooLarge,
    ContentType,
    QueueUnavailable,
    QueueRefused,
    QueueBusy,
}

impl Rejection {
    const ALL: [Rejection; 7] = [
        Rejection::InvalidJson,
        Rejection::NotAnObject,
        Rejection::TooLarge,
        Rejection::ContentType,
        Rejection::QueueUnavailable,
        Rejection::QueueRefused,
        Rejection::QueueBusy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::InvalidJson => "invalid_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::TooLarge => "too_large",
            Rejection::ContentType => "content_type",
            Rejection::QueueUnavailable => "queue_unavailable",
            Rejection::QueueRefused => "queue_refused",
            Rejection::QueueBusy => "queue_busy",
        }
    }
}

/// What the puller did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pulled {
    /// The sink took it; deleted.
    Handled,
    /// The sink failed; kept for redelivery (KEEP_FAILED_MESSAGES).
    Kept,
    /// The sink failed; deleted anyway.
    Dropped,
}

impl Pulled {
    pub fn label(self) -> &'static str {
        match self {
            Pulled::Handled => "handled",
            Pulled::Kept => "kept",
            Pulled::Dropped => "dropped",
        }
    }
}

pub struct Metrics {
    pub received: IntCounter,
    pub queued: IntCounter,
    pub filtered: IntCounter,
    rejected: IntCounterVec,
    pub queue_latency: Histogram,
    pulled: IntCounterVec,
    pub devices_online: IntGauge,
    pub outages: IntCounter,
    mqtt_messages: IntCounterVec,
    decode_errors: IntCounterVec,
}

impl Metrics {
    /// Metrics whose options pass through `labelled` (the runtime adds the instance's labels).
    pub fn new(labelled: impl Fn(Opts) -> Opts) -> Self {
        // Names and label sets are fixed and valid, so building them cannot fail.
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(labelled(Opts::new(name, help)))
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let by = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(labelled(Opts::new(name, help)), &[label])
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let latency = labelled(Opts::new(
            "sqs_proxy_queue_latency_seconds",
            "Time from a message's arrival to the queue's acceptance",
        ));
        let metrics = Metrics {
            received: counter("sqs_proxy_received_total", "Messages POSTed to /send"),
            queued: counter("sqs_proxy_queued_total", "Messages the queue accepted"),
            filtered: counter(
                "sqs_proxy_filtered_total",
                "Messages not queued: older job submission than the newest seen for their hostname",
            ),
            rejected: by(
                "sqs_proxy_rejected_total",
                "Messages refused, by reason",
                "reason",
            ),
            queue_latency: Histogram::with_opts(HistogramOpts {
                common_opts: latency,
                buckets: vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            })
            .unwrap_or_else(|e| panic!("metric sqs_proxy_queue_latency_seconds: {e}")),
            pulled: by(
                "sqs_proxy_pulled_total",
                "Messages the in-process puller handled, by outcome",
                "outcome",
            ),
            devices_online: IntGauge::with_opts(labelled(Opts::new(
                "sqs_proxy_devices_online",
                "Devices connected or in their last-will grace period, as this instance saw them",
            )))
            .unwrap_or_else(|e| panic!("metric sqs_proxy_devices_online: {e}")),
            outages: counter(
                "sqs_proxy_outages_total",
                "Devices that dropped and did not come back within their last will's delay",
            ),
            mqtt_messages: by(
                "sqs_proxy_mqtt_messages_total",
                "MQTT messages received, by subscribed topic",
                "topic",
            ),
            decode_errors: by(
                "sqs_proxy_decode_errors_total",
                "MQTT messages that could not be decoded (counted and dropped), by subscribed topic",
                "topic",
            ),
        };
        // Every label value shows from the start, at 0, so rates work before the first event.
        for reason in Rejection::ALL {
            metrics.rejected.with_label_values(&[reason.label()]);
        }
        for outcome in [Pulled::Handled, Pulled::Kept, Pulled::Dropped] {
            metrics.pulled.with_label_values(&[outcome.label()]);
        }
        metrics
    }

    /// Adds every metric to `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.received.clone()))?;
        registry.register(Box::new(self.queued.clone()))?;
        registry.register(Box::new(self.filtered.clone()))?;
        registry.register(Box::new(self.rejected.clone()))?;
        registry.register(Box::new(self.queue_latency.clone()))?;
        registry.register(Box::new(self.pulled.clone()))?;
        registry.register(Box::new(self.devices_online.clone()))?;
        registry.register(Box::new(self.outages.clone()))?;
        registry.register(Box::new(self.mqtt_messages.clone()))?;
        registry.register(Box::new(self.decode_errors.clone()))
    }

    pub fn mqtt_message(&self, topic: &str) {
        self.mqtt_messages.with_label_values(&[topic]).inc();
    }

    pub fn decode_error(&self, topic: &str) {
        self.decode_errors.with_label_values(&[topic]).inc();
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected.with_label_values(&[reason.label()]).get()
    }

    pub fn pulled(&self, outcome: Pulled) {
        self.pulled.with_label_values(&[outcome.label()]).inc();
    }
}
