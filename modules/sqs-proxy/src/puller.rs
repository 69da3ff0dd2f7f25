//! The puller: long-polls the queue (up to 10 messages, 20 s wait), hands each message to a sink
//! and deletes it once handled. A message the sink failed on is kept for redelivery after the
//! visibility timeout when `KEEP_FAILED_MESSAGES=true`, and deleted otherwise (logged and
//! counted either way). Runs as `marchproxy-sqs-proxy puller` or inside the proxy (`--pull`).

use std::{future::Future, process::Stdio, sync::Arc, time::Duration};

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::{
    config::SinkArgs,
    metrics::{Metrics, Pulled},
    queue::{Queue, Received},
};

/// Messages asked for per receive (SQS's maximum).
const BATCH: usize = 10;
/// Longest pause between failed receives.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where handled messages go.
#[derive(Clone, Debug)]
pub enum Sink {
    /// One JSON line per message body on stdout.
    Stdout,
    /// `sh -c COMMAND` per message, the body on its stdin, `MESSAGE_ID` in its environment.
    Command(String),
}

impl Sink {
    async fn handle(&self, message: &Received, timeout: Duration) -> Result<(), String> {
        match self {
            Sink::Stdout => {
                let mut line = match serde_json::from_str::<serde_json::Value>(&message.body) {
                    Ok(value) => value.to_string(),
                    // Not ours (another producer on the same SQS queue): still one JSON line.
                    Err(_) => serde_json::Value::String(message.body.clone()).to_string(),
                };
                line.push('\n');
                let mut stdout = tokio::io::stdout();
                stdout
                    .write_all(line.as_bytes())
                    .await
                    .map_err(|e| format!("stdout: {e}"))?;
                stdout.flush().await.map_err(|e| format!("stdout: {e}"))
            }
            Sink::Command(command) => {
                let mut child = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .env("MESSAGE_ID", &message.message_id)
                    .stdin(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot start `{command}`: {e}"))?;
                let body = message.body.clone();
                let mut stdin = child.stdin.take();
                let run = async move {
                    if let Some(stdin) = stdin.as_mut() {
                        // A command that ignores its input closes the pipe early; its exit
                        // status is what counts.
                        let _ = stdin.write_all(body.as_bytes()).await;
                    }
                    drop(stdin);
                    child.wait().await
                };
                match tokio::time::timeout(timeout, run).await {
                    Ok(Ok(status)) if status.success() => Ok(()),
                    Ok(Ok(status)) => Err(format!("`{command}` exited with {status}")),
                    Ok(Err(e)) => Err(format!("`{command}`: {e}")),
                    Err(_) => Err(format!(
                        "`{command}` took longer than {}s",
                        timeout.as_secs()
                    )),
                }
            }
        }
    }
}

pub struct Puller {
    queue: Arc<dyn Queue>,
    sink: Sink,
    keep_failed: bool,
    visibility: Duration,
    wait: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl Puller {
    pub fn new(queue: Arc<dyn Queue>, args: &SinkArgs, metrics: Option<Arc<Metrics>>) -> Self {
        Puller {
            queue,
            sink: args
                .sink_command
                .clone()
                .map_or(Sink::Stdout, Sink::Command),
            keep_failed: args.keep_failed_messages,
            visibility: args.visibility_timeout.max(Duration::from_secs(1)),
            wait: args.pull_wait,
            metrics,
        }
    }

    /// Pulls until `stop` completes; a batch being handled then is finished first.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        info!(queue = %self.queue.describe(), sink = ?self.sink, keep_failed = self.keep_failed, "puller started");
        let mut backoff = Duration::from_secs(1);
        loop {
            let received = tokio::select! {
                received = self.queue.receive(BATCH, self.wait, self.visibility) => received,
                () = &mut stop => break,
            };
            match received {
                Ok(messages) => {
                    backoff = Duration::from_secs(1);
                    // Every message of the batch must be handled and deleted while it is still
                    // ours; what is left at the deadline comes back later instead of twice.
                    let deadline = tokio::time::Instant::now() + self.visibility.mul_f64(0.9);
                    let total = messages.len();
                    for (handled, message) in messages.into_iter().enumerate() {
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        if left.is_zero() {
                            warn!(queue = %self.queue.describe(), left_for_redelivery = total - handled, visibility_s = self.visibility.as_secs(), "the batch outlasted the visibility timeout; raise --visibility-timeout");
                            break;
                        }
                        self.handle(message, left).await;
                    }
                }
                Err(error) => {
                    warn!(queue = %self.queue.describe(), %error, retry_in_s = backoff.as_secs(), "receive failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut stop => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        info!(queue = %self.queue.describe(), "puller stopped");
    }

    async fn handle(&self, message: Received, within: Duration) {
        let outcome = match self.sink.handle(&message, within).await {
            Ok(()) => Pulled::Handled,
            Err(error) if self.keep_failed => {
                warn!(message_id = %message.message_id, receive_count = message.receive_count, %error, "handling failed; kept for redelivery");
                Pulled::Kept
            }
            Err(error) => {
                warn!(message_id = %message.message_id, %error, "handling failed; deleted (set KEEP_FAILED_MESSAGES=true to keep it)");
                Pulled::Dropped
            }
        };
        if outcome != Pulled::Kept
            && let Err(error) = self.queue.delete(&message.receipt).await
        {
            warn!(message_id = %message.message_id, %error, "delete failed; the message will be delivered again");
        }
        if let Some(metrics) = &self.metrics {
            metrics.pulled(outcome);
        }
    }
}
