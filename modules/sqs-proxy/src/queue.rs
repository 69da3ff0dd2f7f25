//! The queue behind the proxy, as a small trait with three backends: Amazon SQS (or any
//! SQS-compatible server) in [`crate::sqs`], a durable queue on local disk in [`crate::local`],
//! and Redis lists in [`crate::redis_queue`]. The proxy sends; the puller receives and deletes.

use std::time::Duration;

/// A message handed to the puller; it stays invisible to other receivers until `visibility`
/// passes, then comes back unless it was deleted with `receipt`.
#[derive(Clone, Debug)]
pub struct Received {
    pub message_id: String,
    pub body: String,
    pub receipt: String,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue could not be reached or did not answer in time; the message was not stored.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The queue answered and refused the message (too large, invalid characters...).
    #[error("queue refused the message: {0}")]
    Refused(String),
    /// More messages are waiting for the queue than the proxy holds at once.
    #[error("queue is too slow: {0} messages are already waiting for it; retry later")]
    Busy(usize),
    /// A delete for a message that is no longer held by this receiver (it timed out and came back).
    #[error("receipt `{0}` is stale: the message became visible again and will be redelivered")]
    StaleReceipt(String),
    /// Writing to or reading from the local queue's files failed.
    #[error("queue storage failed: {0}")]
    Storage(#[from] std::io::Error),
}

/// What every backend does.
#[tonic::async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Where messages go, for logs and health (`sqs https://...` or `local /var/lib/...`).
    fn describe(&self) -> String;

    /// Stores `body`; returns the queue's message id once the queue has it for good.
    async fn send(&self, body: String) -> Result<String, QueueError>;

    /// Stores a message of `topic` (an MQTT data topic). Backends with one queue take it like
    /// any message (the body names its topic); the Redis backend keeps a list per topic.
    async fn send_to(&self, topic: &str, body: String) -> Result<String, QueueError> {
        let _ = topic;
        self.send(body).await
    }

    /// Up to `max` messages, waiting up to `wait` for the first one.
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError>;

    /// Removes a received message for good.
    async fn delete(&self, receipt: &str) -> Result<(), QueueError>;

    /// A cheap question that proves the queue answers, with a figure for operators.
    async fn check(&self) -> Result<String, String>;
}
