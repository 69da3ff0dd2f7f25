//! Rollout webhooks: a JSON POST to each configured URL, answered within its timeout. A 2xx
//! answer is a yes; anything else (another status, no answer, a refused connection) is a no,
//! with the reason in words for the event log and the operator.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes, header};
use marchproxy::http_client::Client;
use tracing::{info, warn};

use crate::policy::Webhook;

/// Shown of a refusing answer's body at most.
const BODY_SHOWN: usize = 200;

/// Calls one webhook; Err says why it did not answer 2xx.
pub async fn call(
    client: Option<&Client>,
    hook: &Webhook,
    payload: &serde_json::Value,
) -> Result<(), String> {
    let client = client.ok_or_else(|| {
        format!(
            "webhook `{}`: this machine has no TLS root certificates, so the NLB has no HTTP client; install ca-certificates and restart it",
            hook.name
        )
    })?;
    let request = Request::post(&hook.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "marchproxy-nlb-rollout")
        .body(Full::new(Bytes::from(payload.to_string())))
        .map_err(|e| format!("webhook `{}`: bad URL `{}`: {e}", hook.name, hook.url))?;
    let answer = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(Duration::from_millis(hook.timeout_ms), answer).await {
        Ok(Ok((status, _))) if status.is_success() => Ok(()),
        Ok(Ok((status, body))) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(BODY_SHOWN)])
                .trim()
                .to_owned();
            Err(format!(
                "webhook `{}` answered {status}{}",
                hook.name,
                if text.is_empty() {
                    String::new()
                } else {
                    format!(": {text}")
                }
            ))
        }
        Ok(Err(error)) => Err(format!(
            "webhook `{}` at {} is unreachable: {error}",
            hook.name, hook.url
        )),
        Err(_) => Err(format!(
            "webhook `{}` gave no answer within {} ms",
            hook.name, hook.timeout_ms
        )),
    }
}

/// Asks every hook in turn; the first no ends it.
pub async fn all_agree(
    client: Option<&Client>,
    hooks: &[Webhook],
    payload: &serde_json::Value,
) -> Result<(), String> {
    for hook in hooks {
        call(client, hook, payload).await?;
    }
    Ok(())
}

/// Waits before each new attempt of a notification: a receiver that is restarting or briefly
/// overloaded still hears of a rollback.
const RETRY_AFTER: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(8),
];

/// Tells every hook, each in its own task, trying again a few times; logs the ones that never
/// took it. Nobody waits for this.
pub fn notify(client: Option<&Client>, hooks: &[Webhook], payload: &serde_json::Value) {
    for hook in hooks {
        let (client, hook, payload) = (client.cloned(), hook.clone(), payload.clone());
        tokio::spawn(async move {
            let mut waits = RETRY_AFTER.iter();
            loop {
                match call(client.as_ref(), &hook, &payload).await {
                    Ok(()) => {
                        info!(webhook = %hook.name, kind = %payload["kind"], "rollout notification sent");
                        return;
                    }
                    Err(reason) => match waits.next() {
                        Some(wait) => {
                            info!(kind = %payload["kind"], %reason, retry_in_ms = wait.as_millis() as u64, "rollout notification not taken; trying again");
                            tokio::time::sleep(*wait).await;
                        }
                        None => {
                            warn!(kind = %payload["kind"], %reason, "rollout notification not delivered");
                            return;
                        }
                    },
                }
            }
        });
    }
}
