//! The alert webhook (`--alert-webhook URL`): one POST per batch of devices that went offline,
//! `{"devices": [...], "text": "The following device(s) have shut down: ..."}`, retried a few
//! times. HTTP or HTTPS (the system's root certificates).

use std::time::Duration;

use http_body_util::Full;
use hyper::{Method, Request, body::Bytes};
use tracing::{info, warn};

const ATTEMPTS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Webhook {
    url: hyper::Uri,
    client: marchproxy_runtime::http::Client,
}

impl Webhook {
    pub fn new(url: &str) -> Result<Self, String> {
        // Webhook URLs often carry a secret token: errors never show them.
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("--alert-webhook is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err("--alert-webhook must be an http:// or https:// URL".into());
        }
        let client = marchproxy_runtime::http::client()
            .map_err(|e| format!("no root certificates for --alert-webhook: {e}"))?;
        Ok(Webhook { url: uri, client })
    }

    /// The alert's JSON body.
    pub fn body(devices: &[String]) -> serde_json::Value {
        serde_json::json!({
            "devices": devices,
            "text": format!("The following device(s) have shut down: {}", devices.join(", ")),
        })
    }

    pub async fn alert(&self, devices: &[String]) {
        let body = Bytes::from(Self::body(devices).to_string());
        for attempt in 1..=ATTEMPTS {
            let request = Request::builder()
                .method(Method::POST)
                .uri(self.url.clone())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()));
            let request = match request {
                Ok(request) => request,
                Err(error) => {
                    warn!(%error, "alert webhook: cannot build the request");
                    return;
                }
            };
            match tokio::time::timeout(TIMEOUT, self.client.request(request)).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    info!(devices = devices.len(), "alert sent");
                    return;
                }
                Ok(Ok(response)) => {
                    warn!(
                        status = response.status().as_u16(),
                        attempt, "alert webhook refused the alert"
                    )
                }
                Ok(Err(error)) => warn!(%error, attempt, "alert webhook unreachable"),
                Err(_) => warn!(attempt, "alert webhook did not answer in time"),
            }
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        warn!(devices = ?devices, "alert dropped after {ATTEMPTS} attempts");
    }
}
