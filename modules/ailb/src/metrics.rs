//! What an operator graphs for the AILB, per model and provider: requests by status, latency
//! (whole request and time to first token), tokens in and out, provider errors by reason,
//! failovers, and clients refused by their key's limits. Served on the module's `/metrics`
//! beside the runtime's own `marchproxy_module_*` figures.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::providers::Usage;

pub struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    first_token: HistogramVec,
    tokens: IntCounterVec,
    provider_errors: IntCounterVec,
    failovers: IntCounterVec,
    limited: IntCounterVec,
}

/// Why a provider did not give an answer the gateway could pass on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderError {
    /// The connection could not be made.
    Connect,
    /// The connection failed after it was made, before an answer.
    Transport,
    Timeout,
    RateLimited,
    ServerError,
    /// 401, 403, 404 and other answers that say this deployment cannot serve (its key, its
    /// model name), not that the request is wrong.
    Refused,
    BadAnswer,
    StreamBroken,
    /// The provider sent an error event inside a stream.
    StreamError,
}

impl ProviderError {
    pub fn label(self) -> &'static str {
        match self {
            ProviderError::Connect => "connect",
            ProviderError::Transport => "transport",
            ProviderError::Timeout => "timeout",
            ProviderError::RateLimited => "rate_limited",
            ProviderError::ServerError => "server_error",
            ProviderError::Refused => "refused",
            ProviderError::BadAnswer => "bad_answer",
            ProviderError::StreamBroken => "stream_broken",
            ProviderError::StreamError => "stream_error",
        }
    }
}

const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

impl Metrics {
    /// Metrics whose options pass through `labelled` (the instance's labels).
    pub fn new(labelled: impl Fn(Opts) -> Opts) -> Self {
        // Names and label sets are fixed and valid, so building them cannot fail.
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(labelled(Opts::new(name, help)), labels)
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts {
                    common_opts: labelled(Opts::new(name, help)),
                    buckets: LATENCY_BUCKETS.to_vec(),
                },
                &["model", "provider"],
            )
            .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        Metrics {
            requests: counter(
                "ailb_requests_total",
                "Requests by model, the provider that answered (none when refused before routing) and HTTP status",
                &["model", "provider", "status"],
            ),
            duration: histogram(
                "ailb_request_duration_seconds",
                "Whole request time, streams to their end",
            ),
            first_token: histogram(
                "ailb_time_to_first_token_seconds",
                "Streams: time until the first generated text went to the client",
            ),
            tokens: counter(
                "ailb_tokens_processed_total",
                "Tokens by model, provider and direction (prompt, completion); estimated when a provider gives no usage",
                &["model", "provider", "direction"],
            ),
            provider_errors: counter(
                "ailb_provider_errors_total",
                "Provider failures by model, provider and reason (connect, transport, timeout, rate_limited, server_error, refused, bad_answer, stream_broken, stream_error)",
                &["model", "provider", "reason"],
            ),
            failovers: counter(
                "ailb_failovers_total",
                "Requests moved to another deployment after a failure, by model",
                &["model"],
            ),
            limited: counter(
                "ailb_key_limited_total",
                "Requests refused by a virtual key's limits, by key name and limit (rpm, tpm)",
                &["key", "limit"],
            ),
        }
    }

    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.duration.clone()))?;
        registry.register(Box::new(self.first_token.clone()))?;
        registry.register(Box::new(self.tokens.clone()))?;
        registry.register(Box::new(self.provider_errors.clone()))?;
        registry.register(Box::new(self.failovers.clone()))?;
        registry.register(Box::new(self.limited.clone()))?;
        Ok(())
    }

    pub fn finished(&self, model: &str, provider: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[model, provider, &status.to_string()])
            .inc();
        self.duration
            .with_label_values(&[model, provider])
            .observe(elapsed.as_secs_f64());
    }

    pub fn first_token(&self, model: &str, provider: &str, elapsed: Duration) {
        self.first_token
            .with_label_values(&[model, provider])
            .observe(elapsed.as_secs_f64());
    }

    pub fn tokens(&self, model: &str, provider: &str, usage: Usage) {
        self.tokens
            .with_label_values(&[model, provider, "prompt"])
            .inc_by(usage.prompt);
        self.tokens
            .with_label_values(&[model, provider, "completion"])
            .inc_by(usage.completion);
    }

    pub fn provider_error(&self, model: &str, provider: &str, reason: ProviderError) {
        self.provider_errors
            .with_label_values(&[model, provider, reason.label()])
            .inc();
    }

    pub fn failover(&self, model: &str) {
        self.failovers.with_label_values(&[model]).inc();
    }

    pub fn limited(&self, key: &str, limit: &str) {
        self.limited.with_label_values(&[key, limit]).inc();
    }
}
