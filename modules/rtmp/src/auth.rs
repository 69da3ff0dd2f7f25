//! Who may publish: the configured stream keys, and the `on_publish` callback (nginx-rtmp's
//! form: `call=publish&app=...&name=...&addr=...` and the publisher's own query arguments; any
//! 2xx allows). Both must agree when both are set.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, header::CONTENT_TYPE};
use marchproxy_runtime::http::{Client, percent_encode};

use crate::config::Settings;

/// How long the callback may take to answer.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a publisher was refused: a metric reason and words for the log and the client.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

pub async fn authorize(
    settings: &Settings,
    client: &Client,
    app: &str,
    key: &str,
    args: &str,
    addr: SocketAddr,
) -> Result<(), Refusal> {
    if !settings.allowed_keys.is_empty() && !settings.allowed_keys.iter().any(|k| k == key) {
        return Err(Refusal {
            reason: "key",
            message: format!("stream key for {app} is not allowed"),
        });
    }
    let Some(url) = &settings.on_publish else {
        return Ok(());
    };
    let mut body = format!(
        "call=publish&app={}&name={}&addr={}",
        percent_encode(app),
        percent_encode(key),
        percent_encode(&addr.ip().to_string())
    );
    // The publisher's own arguments (`rtmp://host/app/key?token=...`) follow, as nginx-rtmp
    // sends them; they are already in form encoding.
    if !args.is_empty() {
        body.push('&');
        body.push_str(args);
    }
    let request = Request::post(url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Refusal {
            reason: "callback",
            message: format!("on_publish `{url}`: {e}"),
        })?;
    match tokio::time::timeout(CALLBACK_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(response)) => Err(Refusal {
            reason: "callback",
            message: format!("on_publish answered {}", response.status()),
        }),
        Ok(Err(e)) => Err(Refusal {
            reason: "callback",
            message: format!("on_publish unreachable: {e}"),
        }),
        Err(_) => Err(Refusal {
            reason: "callback",
            message: format!("on_publish gave no answer within {CALLBACK_TIMEOUT:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_escaped() {
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
