//! The Redis list backend (`--queue redis`, with `--redis-url`): one list per topic, one
//! element per message, appended with RPUSH: `/send` goes to list `marchproxy:queue:send`, an
//! MQTT data topic's batches to `marchproxy:queue:<topic filter>`, outage events to
//! `marchproxy:queue:lwt` (device presence keys can never take these names). A list is also
//! what other edge tools read directly.
//!
//! The puller takes messages with LMOVE into `<list>:processing` and removes them from there
//! once handled (the reliable-queue pattern), so a crash between the two loses nothing. A
//! message not deleted within the visibility timeout goes back to the list; what a crashed
//! puller left in `:processing` goes back when the next puller starts (one puller per list).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{AsyncCommands, aio::ConnectionManager};
use tokio::time::Instant;
use tracing::info;
use uuid::Uuid;

use crate::queue::{Queue, QueueError, Received};

/// Where the list of `topic` lives.
pub fn list_key(topic: &str) -> String {
    format!("marchproxy:queue:{topic}")
}

/// Moves a message back from `:processing` to the front of its list, only if it is still there.
const PUT_BACK: &str = r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0";

pub struct RedisQueue {
    client: redis::Client,
    commands: ConnectionManager,
    /// A connection of its own for blocking moves (the shared one must stay free).
    blocking: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// The list `send` (and messages without a topic) go to.
    list: String,
    shown_url: String,
    /// Messages received by this process and not yet deleted: receipt -> (list, body, due back).
    held: Mutex<HashMap<String, (String, String, Instant)>>,
    /// Whether a crashed puller's leftovers were put back yet.
    recovered: tokio::sync::OnceCell<()>,
}

fn processing(list: &str) -> String {
    format!("{list}:processing")
}

fn unavailable(error: redis::RedisError) -> QueueError {
    QueueError::Unavailable(format!("Redis: {error}"))
}

impl RedisQueue {
    /// Connects; every command may take up to `timeout`.
    pub async fn connect(
        url: &str,
        list: &str,
        timeout: Duration,
    ) -> Result<Arc<Self>, QueueError> {
        let shown_url = crate::presence::redacted(url);
        let (client, commands) = crate::presence::connect_redis(url, timeout)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        Ok(Arc::new(RedisQueue {
            client,
            commands,
            blocking: tokio::sync::Mutex::new(None),
            list: list_key(list),
            shown_url,
            held: Mutex::new(HashMap::new()),
            recovered: tokio::sync::OnceCell::new(),
        }))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String, Instant)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `body` back from `:processing` to the front of its list, atomically.
    async fn put_back(&self, list: &str, body: &str) -> Result<(), QueueError> {
        let mut commands = self.commands.clone();
        redis::Script::new(PUT_BACK)
            .key(processing(list))
            .key(list)
            .arg(body)
            .invoke_async::<i64>(&mut commands)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Messages held past their visibility timeout go back to their list.
    async fn return_overdue(&self) -> Result<(), QueueError> {
        let now = Instant::now();
        let overdue: Vec<(String, String, String)> = self
            .held()
            .iter()
            .filter(|(_, (_, _, due))| *due <= now)
            .map(|(receipt, (list, body, _))| (receipt.clone(), list.clone(), body.clone()))
            .collect();
        for (receipt, list, body) in overdue {
            self.put_back(&list, &body).await?;
            self.held().remove(&receipt);
        }
        Ok(())
    }

    /// What a crashed puller left in `:processing` goes back first.
    async fn recover(&self) -> Result<(), QueueError> {
        let mut commands = self.commands.clone();
        let mut moved = 0;
        while commands
            .lmove::<_, _, Option<String>>(
                processing(&self.list),
                &self.list,
                redis::Direction::Right,
                redis::Direction::Left,
            )
            .await
            .map_err(unavailable)?
            .is_some()
        {
            moved += 1;
        }
        if moved > 0 {
            info!(list = %self.list, moved, "put back messages a previous puller did not finish");
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Queue for RedisQueue {
    fn describe(&self) -> String {
        format!("redis {} list {}", self.shown_url, self.list)
    }

    async fn send(&self, body: String) -> Result<String, QueueError> {
        let mut commands = self.commands.clone();
        commands
            .rpush::<_, _, i64>(&self.list, body)
            .await
            .map_err(unavailable)?;
        Ok(Uuid::new_v4().to_string())
    }

    async fn send_to(&self, topic: &str, body: String) -> Result<String, QueueError> {
        let mut commands = self.commands.clone();
        commands
            .rpush::<_, _, i64>(list_key(topic), body)
            .await
            .map_err(unavailable)?;
        Ok(Uuid::new_v4().to_string())
    }

    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>, QueueError> {
        if self.recovered.get().is_none() {
            self.recover().await?;
            let _ = self.recovered.set(());
        }
        self.return_overdue().await?;
        let (list, busy) = (self.list.clone(), processing(&self.list));
        let due = Instant::now() + visibility;
        let mut received = Vec::new();
        // Each moved message is tracked at once, so a failure halfway loses track of none.
        let track = |body: String| {
            let receipt = Uuid::new_v4().to_string();
            self.held()
                .insert(receipt.clone(), (list.clone(), body.clone(), due));
            Received {
                message_id: receipt.clone(),
                body,
                receipt,
                receive_count: 1,
            }
        };
        let mut commands = self.commands.clone();
        let mut failure = None;
        for _ in 0..max {
            match commands
                .lmove::<_, _, Option<String>>(
                    &list,
                    &busy,
                    redis::Direction::Left,
                    redis::Direction::Right,
                )
                .await
            {
                Ok(Some(body)) => received.push(track(body)),
                Ok(None) => break,
                Err(error) => {
                    failure = Some(unavailable(error));
                    break;
                }
            }
        }
        if received.is_empty() && failure.is_none() && !wait.is_zero() {
            let mut blocking = self.blocking.lock().await;
            if blocking.is_none() {
                *blocking = Some(
                    self.client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(unavailable)?,
                );
            }
            if let Some(connection) = blocking.as_mut() {
                match connection
                    .blmove::<_, _, Option<String>>(
                        &list,
                        &busy,
                        redis::Direction::Left,
                        redis::Direction::Right,
                        wait.as_secs_f64(),
                    )
                    .await
                {
                    Ok(moved) => received.extend(moved.map(track)),
                    Err(error) => {
                        *blocking = None;
                        failure = Some(unavailable(error));
                    }
                }
            }
        }
        match failure {
            Some(error) if received.is_empty() => Err(error),
            _ => Ok(received),
        }
    }

    async fn delete(&self, receipt: &str) -> Result<(), QueueError> {
        let Some((list, body, _)) = self.held().get(receipt).cloned() else {
            return Err(QueueError::StaleReceipt(receipt.to_owned()));
        };
        let mut commands = self.commands.clone();
        commands
            .lrem::<_, _, i64>(processing(&list), 1, body)
            .await
            .map_err(unavailable)?;
        self.held().remove(receipt);
        Ok(())
    }

    async fn check(&self) -> Result<String, String> {
        let mut commands = self.commands.clone();
        let length: i64 = commands
            .llen(&self.list)
            .await
            .map_err(|e| format!("Redis at {}: {e}", self.shown_url))?;
        Ok(format!("{length} messages waiting in list {}", self.list))
    }
}
