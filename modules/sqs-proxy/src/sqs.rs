//! The Amazon SQS backend (`--queue sqs`): any SQS-compatible endpoint, region and credentials
//! from the usual AWS environment (`AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_ENDPOINT_URL`), the queue from `SQS_QUEUE_URL`.
//!
//! Sends go through one batcher: a message goes out at once when the queue is idle; while
//! earlier sends are in flight, the ones that arrive meanwhile (up to 10, or `batch_wait`) go
//! out together in one SendMessageBatch. The SDK retries throttling, 5xx and timeouts; entries a
//! batch reports as failed by the server's fault are retried here. A sender hears back only
//! when the queue accepted its message (its id) or finally did not (an error): nothing is
//! acknowledged that is not stored.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aws_config::{BehaviorVersion, timeout::TimeoutConfig};
use aws_sdk_sqs::{
    Client,
    error::{DisplayErrorContext, SdkError},
    types::{MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry},
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::debug;

use crate::queue::{Queue, QueueError, Received};

/// SQS takes at most 10 entries per batch.
const MAX_BATCH: usize = 10;
/// SQS caps a batch's payload at 256 KiB on many servers (1 MiB on AWS since 2025).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Attempts for entries a batch reports as failed through no fault of ours.
const ENTRY_ATTEMPTS: u32 = 3;

/// How the backend talks to SQS.
#[derive(Clone, Debug)]
pub struct SqsSettings {
    pub queue_url: String,
    /// Longest wait for more messages to fill a batch while the queue is busy.
    pub batch_wait: Duration,
    /// Batches in flight at once.
    pub concurrent_sends: usize,
    /// Messages waiting for the queue at once; beyond, senders wait, then get `Busy`.
    pub backlog: usize,
    /// Longest a message may wait for SQS, retries included, before its sender hears 503
    /// (receives add their long-poll wait to it).
    pub timeout: Duration,
}

struct Pending {
    body: String,
    reply: oneshot::Sender<Result<String, QueueError>>,
}

pub struct SqsQueue {
    client: Client,
    settings: SqsSettings,
    pending: mpsc::Sender<Pending>,
}

#[derive(Debug, thiserror::Error)]
pub enum SqsConfigError {
    #[error(
        "no AWS region is set for the SQS queue; set AWS_REGION (any value, e.g. us-east-1, for an SQS-compatible server)"
    )]
    NoRegion,
}

impl SqsQueue {
    /// Reads the AWS environment and starts the batcher. No request is made yet.
    pub async fn connect(settings: SqsSettings) -> Result<Arc<Self>, SqsConfigError> {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3).min(settings.timeout))
                    .operation_timeout(settings.timeout)
                    .build(),
            )
            .load()
            .await;
        if config.region().is_none() {
            return Err(SqsConfigError::NoRegion);
        }
        let client = Client::new(&config);
        let (pending, incoming) = mpsc::channel(settings.backlog.max(1));
        tokio::spawn(batcher(client.clone(), settings.clone(), incoming));
        Ok(Arc::new(SqsQueue {
            client,
            settings,
            pending,
        }))
    }
}

/// Collects pending messages into batches and sends them, `concurrent_sends` at a time.
async fn batcher(client: Client, settings: SqsSettings, mut incoming: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(settings.concurrent_sends.max(1)));
    // A message that did not fit the last batch's size goes first in the next one.
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match incoming.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut size = first.body.len();
        let mut batch = vec![first];
        let busy = slots.available_permits() + 1 < settings.concurrent_sends.max(1);
        let deadline = tokio::time::Instant::now() + settings.batch_wait;
        while batch.len() < MAX_BATCH {
            let next = match incoming.try_recv() {
                Ok(next) => next,
                // Idle: send now. Busy: others are in flight, so more are likely on their way.
                Err(_) if !busy => break,
                Err(_) => match tokio::time::timeout_at(deadline, incoming.recv()).await {
                    Ok(Some(next)) => next,
                    _ => break,
                },
            };
            if size + next.body.len() > MAX_BATCH_BYTES {
                carried = Some(next);
                break;
            }
            size += next.body.len();
            batch.push(next);
        }
        let client = client.clone();
        let queue_url = settings.queue_url.clone();
        tokio::spawn(async move {
            if batch.len() == 1 {
                if let Some(one) = batch.pop() {
                    send_one(&client, &queue_url, one).await;
                }
            } else {
                send_batch(&client, &queue_url, batch).await;
            }
            drop(slot);
        });
    }
}

async fn send_one(client: &Client, queue_url: &str, message: Pending) {
    let result = client
        .send_message()
        .queue_url(queue_url)
        .message_body(message.body)
        .send()
        .await;
    let reply = match result {
        Ok(output) => output
            .message_id
            .ok_or_else(|| QueueError::Unavailable("SQS answered without a message id".into())),
        Err(error) => Err(classify(&error)),
    };
    let _ = message.reply.send(reply);
}

async fn send_batch(client: &Client, queue_url: &str, mut batch: Vec<Pending>) {
    let mut attempt = 1;
    loop {
        let entries = batch
            .iter()
            .enumerate()
            .map(|(n, message)| {
                SendMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .message_body(message.body.clone())
                    .build()
            })
            .collect::<Result<Vec<_>, _>>();
        let entries = match entries {
            Ok(entries) => entries,
            Err(error) => {
                let reason = format!("cannot build the SQS batch: {error}");
                for message in batch {
                    let _ = message
                        .reply
                        .send(Err(QueueError::Unavailable(reason.clone())));
                }
                return;
            }
        };
        let output = match client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(output) => output,
            Err(error) => {
                let error = classify(&error);
                let reason = error.to_string();
                for message in batch {
                    let _ = message.reply.send(Err(match &error {
                        QueueError::Refused(_) => QueueError::Refused(reason.clone()),
                        _ => QueueError::Unavailable(reason.clone()),
                    }));
                }
                return;
            }
        };
        let mut slots: Vec<Option<Pending>> = batch.into_iter().map(Some).collect();
        let mut take = |id: &str| {
            id.parse::<usize>()
                .ok()
                .and_then(|n| slots.get_mut(n)?.take())
        };
        for done in output.successful {
            if let Some(message) = take(&done.id) {
                let _ = message.reply.send(Ok(done.message_id));
            }
        }
        let mut retry = Vec::new();
        for failed in output.failed {
            let Some(message) = take(&failed.id) else {
                continue;
            };
            let reason = format!(
                "{}: {}",
                failed.code,
                failed.message.as_deref().unwrap_or("no message")
            );
            if failed.sender_fault || attempt >= ENTRY_ATTEMPTS {
                debug!(code = %failed.code, sender_fault = failed.sender_fault, "SQS refused a batch entry");
                let _ = message.reply.send(Err(if failed.sender_fault {
                    QueueError::Refused(reason)
                } else {
                    QueueError::Unavailable(reason)
                }));
            } else {
                retry.push(message);
            }
        }
        for missing in slots.into_iter().flatten() {
            let _ = missing.reply.send(Err(QueueError::Unavailable(
                "SQS left the message out of its batch answer".into(),
            )));
        }
        if retry.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
        attempt += 1;
        batch = retry;
    }
}

/// A refusal when SQS answered that the request itself is wrong (4xx other than throttling),
/// unavailable otherwise (no answer, 5xx, throttled past the SDK's retries).
fn classify<E>(error: &SdkError<E>) -> QueueError
where
    E: std::error::Error + 'static,
{
    let text = DisplayErrorContext(error).to_string();
    match error.raw_response().map(|r| r.status().as_u16()) {
        Some(status) if (400..500).contains(&status) && status != 429 => QueueError::Refused(text),
        _ => QueueError::Unavailable(text),
    }
}

#[tonic::async_trait]
impl Queue for SqsQueue {
    fn describe(&self) -> String {
        format!("sqs {}", self.settings.queue_url)
    }

    async fn send(&self, body: String) -> Result<String, QueueError> {
        let (reply, answer) = oneshot::channel();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let permit = match tokio::time::timeout_at(deadline, self.pending.reserve()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(QueueError::Unavailable("the SQS sender stopped".into())),
            Err(_) => return Err(QueueError::Busy(self.settings.backlog)),
        };
        permit.send(Pending { body, reply });
        // Past the deadline the message may still land (the batch goes on): the sender, told
        // 503, may send it again; a duplicate, never a loss.
        let answer = match tokio::time::timeout_at(deadline, answer).await {
            Ok(answer) => {
                answer.map_err(|_| QueueError::Unavailable("the SQS sender stopped".into()))?
            }
            Err(_) => {
                return Err(QueueError::Unavailable(format!(
                    "SQS did not accept the message within {} s",
                    self.settings.timeout.as_secs_f64()
                )));
            }
        };
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = answer.is_ok(),
            "SQS send"
        );
        answer
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        let seconds = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        let output = self
            .client
            .receive_message()
            .queue_url(&self.settings.queue_url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
            .wait_time_seconds(seconds(wait).min(20))
            .visibility_timeout(seconds(visibility))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .customize()
            .config_override(
                aws_sdk_sqs::Config::builder().timeout_config(
                    TimeoutConfig::builder()
                        .operation_timeout(self.settings.timeout + wait)
                        .operation_attempt_timeout(self.settings.timeout + wait)
                        .build(),
                ),
            )
            .send()
            .await
            .map_err(|e| classify(&e))?;
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|message| {
                let receive_count = message
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                Some(Received {
                    message_id: message.message_id?,
                    body: message.body.unwrap_or_default(),
                    receipt: message.receipt_handle?,
                    receive_count,
                })
            })
            .collect())
    }

    async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.settings.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    async fn check(&self) -> Result<String, String> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.settings.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| DisplayErrorContext(&e).to_string())?;
        let depth = output
            .attributes
            .as_ref()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .cloned()
            .unwrap_or_else(|| "?".into());
        Ok(format!(
            "about {depth} messages waiting in {}",
            self.settings.queue_url
        ))
    }
}
