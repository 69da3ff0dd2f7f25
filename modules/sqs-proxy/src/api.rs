//! The edge-facing HTTP API of spec/sqs-proxy.md: `POST /send` and `GET /health`, with the
//! status codes and bodies edge devices already expect (FastAPI's `{"detail": ...}` errors).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tracing::{debug, warn};

use crate::{
    SqsProxy,
    filter::Decision,
    metrics::{Metrics, Rejection},
    queue::QueueError,
};

/// How long a client may take to send its body once the headers arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

struct Api {
    proxy: Arc<SqsProxy>,
    metrics: Arc<Metrics>,
}

pub fn router(proxy: Arc<SqsProxy>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/send", post(send))
        .route("/health", get(health))
        .route("/devices", get(devices))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .with_state(Arc::new(Api { proxy, metrics }))
}

fn detail(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": detail.into() }))).into_response()
}

/// Every device this instance heard of, with its presence.
async fn devices(State(api): State<Arc<Api>>) -> Response {
    match api.proxy.presence() {
        Some(presence) => Json(json!({ "devices": presence.devices() })).into_response(),
        None => detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "Device presence is off: start the proxy with --redis-url",
        ),
    }
}

async fn health() -> Response {
    Json(json!({"status": "healthy"})).into_response()
}

/// JSON, or a type that says nothing useful about the body: none, text, octet-stream, or the
/// form type `curl -d` sends by default (the original proxy read the body as JSON whatever the
/// header said, and edge scripts rely on it). Multipart, XML and the like are refused.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let media = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "application/json"
        || media.ends_with("+json")
        || media == "text/plain"
        || media == "application/octet-stream"
        || media == "application/x-www-form-urlencoded"
}

async fn send(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    let arrived = Instant::now();
    let metrics = &api.metrics;
    metrics.received.inc();
    let reject = |reason: Rejection, status: StatusCode, text: String| {
        metrics.reject(reason);
        detail(status, text)
    };
    if !json_content_type(&headers) {
        return reject(
            Rejection::ContentType,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json".into(),
        );
    }
    let limit = api.proxy.max_body();
    let too_large = || format!("Body is larger than the limit of {limit} bytes");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return reject(
            Rejection::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            too_large(),
        );
    }
    let Ok(read) = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await
    else {
        return reject(
            Rejection::InvalidJson,
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "Request body not received within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        );
    };
    let bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return reject(
                Rejection::TooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                too_large(),
            );
        }
        Err(error) => {
            // The client went away or broke the framing; it hears nothing either way.
            debug!(%error, "request body unreadable");
            return reject(
                Rejection::InvalidJson,
                StatusCode::BAD_REQUEST,
                "Request body could not be read".into(),
            );
        }
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return reject(
            Rejection::InvalidJson,
            StatusCode::BAD_REQUEST,
            "Invalid JSON".into(),
        );
    };
    let Some(object) = value.as_object() else {
        let kind = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return reject(
            Rejection::NotAnObject,
            StatusCode::BAD_REQUEST,
            format!("Body must be a JSON object, not {kind}"),
        );
    };
    if api.proxy.ordering_filter() && api.proxy.filter.decide(object) == Decision::Filtered {
        metrics.filtered.inc();
        return Json(json!({
            "status": "filtered",
            "message": "Message filtered due to newer submission"
        }))
        .into_response();
    }
    // JSON text is UTF-8 and it parsed, so this is the body exactly as sent, queued as is.
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match api.proxy.queue.send(text).await {
        Ok(message_id) => {
            metrics.queued.inc();
            metrics
                .queue_latency
                .observe(arrived.elapsed().as_secs_f64());
            Json(json!({ "message_id": message_id })).into_response()
        }
        Err(error) => {
            let reason = match error {
                QueueError::Refused(_) => Rejection::QueueRefused,
                QueueError::Busy(_) => Rejection::QueueBusy,
                _ => Rejection::QueueUnavailable,
            };
            if let Some(suppressed) = api.proxy.log_throttle.allow() {
                warn!(queue = %api.proxy.queue.describe(), %error, suppressed_since_last = suppressed, "message not queued");
            }
            reject(reason, StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
    }
}
