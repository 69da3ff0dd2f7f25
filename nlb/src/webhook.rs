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

/// Tells every hook, logging the ones that did not take it; nobody waits for this.
pub async fn notify(client: Option<&Client>, hooks: &[Webhook], payload: &serde_json::Value) {
    for hook in hooks {
        match call(client, hook, payload).await {
            Ok(()) => {
                info!(webhook = %hook.name, kind = %payload["kind"], "rollout notification sent")
            }
            Err(reason) => {
                warn!(kind = %payload["kind"], %reason, "rollout notification not delivered")
            }
        }
    }
}
