//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `GET /v1/models` (also without the `/v1` prefix), and `GET /health`.
//!
//! A request is checked (body, key, model, the key's models and limits), then tried on the
//! model's deployments in the strategy's order: a connect error, a timeout, a 429 or a 5xx moves
//! it to the next deployment, as long as nothing has been sent to the client. Other answers are
//! the provider's verdict and go back as they are (in OpenAI's shape). A stream is passed on
//! event by event once the provider's headers say 2xx; if it breaks off after that, the client
//! gets an error event and the stream ends (a half-sent answer cannot move elsewhere).

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use marchproxy_runtime::{RateLimiter, Subject, Verdict};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::timeout_at};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    Ailb,
    config::Compiled,
    keys::VirtualKey,
    metrics::ProviderError,
    providers::{Ask, Endpoint, Translator, error_json, sse},
    routing::{Deployment, InFlight, Model},
};

/// How long a client may take to send its body once the headers arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest provider answer read whole (embeddings of big batches are the large ones).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// The part of a failed provider's body kept for the error message.
const MAX_ERROR_BYTES: usize = 64 * 1024;

struct Api {
    ailb: Arc<Ailb>,
    limiter: Arc<RateLimiter>,
}

pub fn router(ailb: Arc<Ailb>, limiter: Arc<RateLimiter>) -> Router {
    let api = Arc::new(Api { ailb, limiter });
    let mut router = Router::new().route("/health", get(health));
    for prefix in ["/v1", ""] {
        router = router
            .route(
                &format!("{prefix}/chat/completions"),
                post(|State(api): State<Arc<Api>>, headers, body| async move {
                    api.serve(Endpoint::Chat, headers, body).await
                }),
            )
            .route(
                &format!("{prefix}/completions"),
                post(|State(api): State<Arc<Api>>, headers, body| async move {
                    api.serve(Endpoint::Completions, headers, body).await
                }),
            )
            .route(
                &format!("{prefix}/embeddings"),
                post(|State(api): State<Arc<Api>>, headers, body| async move {
                    api.serve(Endpoint::Embeddings, headers, body).await
                }),
            )
            .route(&format!("{prefix}/models"), get(models))
            .route(&format!("{prefix}/models/{{model}}"), get(model));
    }
    router
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; this gateway serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models",
                "invalid_request_error",
                Some("not_found"),
            )
        })
        .with_state(api)
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    let models = api.ailb.compiled().catalog.names().len();
    axum::Json(json!({"status": "healthy", "models": models})).into_response()
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    json_response(status, error_json(message, kind, code))
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn too_many(message: &str, code: &str, wait: Duration) -> Response {
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        message,
        "rate_limit_error",
        Some(code),
    );
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// The client's key: `Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key` (Anthropic's).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The client's virtual key when keys are configured; otherwise why it has none that fits.
fn authenticate(
    compiled: &Compiled,
    headers: &HeaderMap,
) -> Result<Option<Arc<VirtualKey>>, &'static str> {
    if !compiled.keys.required() {
        return Ok(None);
    }
    let presented =
        presented_key(headers).ok_or("no API key: send `Authorization: Bearer YOUR_KEY`")?;
    match compiled.keys.find(presented) {
        Some(key) => Ok(Some(Arc::clone(key))),
        None => Err("incorrect API key provided"),
    }
}

fn unauthorized(why: &str) -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        why,
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

fn model_entry(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "marchproxy"})
}

async fn models(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let compiled = api.ailb.compiled();
    let key = match authenticate(&compiled, &headers) {
        Ok(key) => key,
        Err(why) => return unauthorized(why),
    };
    let data: Vec<Value> = compiled
        .catalog
        .names()
        .into_iter()
        .filter(|(name, model)| key.as_ref().is_none_or(|k| k.allows(&model.name, name)))
        .map(|(name, _)| model_entry(name))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let compiled = api.ailb.compiled();
    let key = match authenticate(&compiled, &headers) {
        Ok(key) => key,
        Err(why) => return unauthorized(why),
    };
    match compiled.catalog.get(&name) {
        Some(model) if key.as_ref().is_none_or(|k| k.allows(&model.name, &name)) => {
            axum::Json(model_entry(&name)).into_response()
        }
        _ => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("the model `{name}` does not exist or you do not have access to it"),
        "invalid_request_error",
        Some("model_not_found"),
    )
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection refused").
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Seconds (or OpenAI's `retry-after-ms`) a provider asked to wait.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    number("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
        .or_else(|| number("retry-after").map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Reads at most `limit` bytes of `body` before `deadline`.
async fn read(body: Incoming, limit: usize, deadline: Instant) -> Result<Bytes, ProviderError> {
    match timeout_at(deadline.into(), Limited::new(body, limit).collect()).await {
        Err(_) => Err(ProviderError::Timeout),
        Ok(Err(_)) => Err(ProviderError::BadAnswer),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Why no deployment answered, for the client.
#[derive(Default)]
struct Failures {
    lines: Vec<String>,
    all_rate_limited: bool,
    shortest_wait: Option<Duration>,
    timed_out: bool,
    untranslatable: Option<String>,
}

impl Failures {
    fn add(&mut self, deployment: &Deployment, why: String, rate_limited: Option<Duration>) {
        if self.lines.is_empty() {
            self.all_rate_limited = true;
        }
        match rate_limited {
            Some(wait) => {
                self.shortest_wait = Some(self.shortest_wait.map_or(wait, |w| w.min(wait)));
            }
            None => self.all_rate_limited = false,
        }
        self.lines.push(format!("{}: {why}", deployment.label()));
    }

    fn response(self, model: &Model, endpoint: Endpoint) -> (StatusCode, Response) {
        if self.lines.is_empty() {
            let message = self.untranslatable.unwrap_or_else(|| {
                format!(
                    "model `{}` has no deployment serving {}",
                    model.name,
                    endpoint.path()
                )
            });
            return (
                StatusCode::BAD_REQUEST,
                error(
                    StatusCode::BAD_REQUEST,
                    &message,
                    "invalid_request_error",
                    None,
                ),
            );
        }
        let tried = self.lines.join("; ");
        if self.timed_out {
            let message = format!("model `{}`: no answer in time (tried {tried})", model.name);
            return (
                StatusCode::GATEWAY_TIMEOUT,
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &message,
                    "timeout",
                    Some("timeout"),
                ),
            );
        }
        if self.all_rate_limited {
            let message = format!(
                "every provider of model `{}` is rate limiting ({tried})",
                model.name
            );
            return (
                StatusCode::TOO_MANY_REQUESTS,
                too_many(
                    &message,
                    "rate_limit_exceeded",
                    self.shortest_wait.unwrap_or(Duration::from_secs(1)),
                ),
            );
        }
        let message = format!("no provider could answer model `{}`: {tried}", model.name);
        (
            StatusCode::BAD_GATEWAY,
            error(
                StatusCode::BAD_GATEWAY,
                &message,
                "api_error",
                Some("provider_error"),
            ),
        )
    }
}

impl Api {
    async fn serve(&self, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
        let started = Instant::now();
        let compiled = self.ailb.compiled();
        let metrics = &self.ailb.metrics;
        let refused = |status: StatusCode, model: &str, response: Response| {
            metrics.finished(model, "none", status.as_u16(), started.elapsed());
            response
        };

        let bytes = match tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(body, compiled.max_body_bytes).collect(),
        )
        .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                let message = format!("the body is over {} bytes", compiled.max_body_bytes);
                return refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "unknown",
                    error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &message,
                        "invalid_request_error",
                        None,
                    ),
                );
            }
            Ok(Err(_)) | Err(_) => {
                return refused(
                    StatusCode::REQUEST_TIMEOUT,
                    "unknown",
                    error(
                        StatusCode::REQUEST_TIMEOUT,
                        "the body did not arrive in time",
                        "invalid_request_error",
                        None,
                    ),
                );
            }
        };
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(body @ Value::Object(_)) => body,
            _ => {
                return refused(
                    StatusCode::BAD_REQUEST,
                    "unknown",
                    error(
                        StatusCode::BAD_REQUEST,
                        "the body must be a JSON object",
                        "invalid_request_error",
                        None,
                    ),
                );
            }
        };
        let key = match authenticate(&compiled, &headers) {
            Ok(key) => key,
            Err(why) => return refused(StatusCode::UNAUTHORIZED, "unknown", unauthorized(why)),
        };
        let Some(asked) = body["model"].as_str().map(str::to_owned) else {
            return refused(
                StatusCode::BAD_REQUEST,
                "unknown",
                error(
                    StatusCode::BAD_REQUEST,
                    "you must provide a model parameter",
                    "invalid_request_error",
                    None,
                ),
            );
        };
        let Some(model) = compiled.catalog.get(&asked).cloned() else {
            return refused(StatusCode::NOT_FOUND, "unknown", not_found(&asked));
        };
        if let Some(key) = &key {
            if !key.allows(&model.name, &asked) {
                let message = format!("key `{}` may not use model `{asked}`", key.name);
                return refused(
                    StatusCode::FORBIDDEN,
                    &model.name,
                    error(
                        StatusCode::FORBIDDEN,
                        &message,
                        "invalid_request_error",
                        Some("model_not_allowed"),
                    ),
                );
            }
        }
        if let Some(presented) = presented_key(&headers) {
            let subject = Subject {
                api_key: Some(presented),
                ..Subject::default()
            };
            if let Verdict::Limited {
                limit_id,
                retry_after,
            } = self.limiter.check(&subject)
            {
                let message = format!("rate limited by `{limit_id}`");
                return refused(
                    StatusCode::TOO_MANY_REQUESTS,
                    &model.name,
                    too_many(&message, "rate_limit_exceeded", retry_after),
                );
            }
        }
        if let Some(key) = &key {
            if let Err((limit, wait)) = key.admit() {
                metrics.limited(&key.name, limit.label());
                let message = format!(
                    "key `{}` is over its {} limit; retry in {} s",
                    key.name,
                    match limit {
                        crate::keys::Limit::Requests => "requests-per-minute",
                        crate::keys::Limit::Tokens => "tokens-per-minute",
                    },
                    wait.as_secs_f64().ceil()
                );
                return refused(
                    StatusCode::TOO_MANY_REQUESTS,
                    &model.name,
                    too_many(&message, "rate_limit_exceeded", wait),
                );
            }
        }

        let ask = Ask::new(endpoint, body);
        let deadline = started + compiled.request_timeout;
        let (allowed_fails, cooldown) = compiled.cooldown;
        let mut failures = Failures::default();
        let candidates = model.order();
        for deployment in candidates.iter().filter(|d| d.provider.serves(endpoint)) {
            let provider = deployment.provider.name.as_str();
            let request = match deployment.provider.request(&ask, &deployment.model) {
                Ok(request) => request,
                Err(why) => {
                    failures.untranslatable.get_or_insert(why);
                    continue;
                }
            };
            if !failures.lines.is_empty() {
                metrics.failover(&model.name);
                info!(model = %model.name, to = %deployment.label(), "failing over");
            }
            let in_flight = deployment.start();
            let sent = Instant::now();
            let response = match timeout_at(deadline.into(), self.ailb.client.request(request))
                .await
            {
                Err(_) => {
                    metrics.provider_error(provider, ProviderError::Timeout);
                    deployment.failed(allowed_fails, cooldown, None);
                    failures.add(deployment, "no answer in time".into(), None);
                    failures.timed_out = true;
                    break;
                }
                Ok(Err(e)) => {
                    metrics.provider_error(provider, ProviderError::Connect);
                    let why = describe(&e);
                    warn!(model = %model.name, deployment = %deployment.label(), error = %why, "provider unreachable");
                    deployment.failed(allowed_fails, cooldown, None);
                    failures.add(deployment, why, None);
                    continue;
                }
                Ok(Ok(response)) => response,
            };
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                let asked_wait = retry_after(response.headers());
                let text = read(response.into_body(), MAX_ERROR_BYTES, deadline)
                    .await
                    .map(|b| {
                        String::from_utf8_lossy(&b)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    })
                    .unwrap_or_default();
                let (reason, wait) = if status == StatusCode::TOO_MANY_REQUESTS {
                    (
                        ProviderError::RateLimited,
                        Some(asked_wait.unwrap_or(cooldown)),
                    )
                } else {
                    (ProviderError::ServerError, None)
                };
                metrics.provider_error(provider, reason);
                warn!(model = %model.name, deployment = %deployment.label(), status = status.as_u16(), body = %text, "provider failed");
                deployment.failed(allowed_fails, cooldown, wait);
                failures.add(deployment, format!("{status} {text}"), wait);
                continue;
            }
            if !status.is_success() {
                let body = read(response.into_body(), MAX_ERROR_BYTES, deadline)
                    .await
                    .unwrap_or_default();
                deployment.succeeded(sent.elapsed());
                metrics.finished(&model.name, provider, status.as_u16(), started.elapsed());
                debug!(model = %model.name, deployment = %deployment.label(), status = status.as_u16(), "provider refused the request");
                return json_response(
                    status,
                    deployment.provider.error_body(status.as_u16(), &body),
                );
            }
            if ask.stream {
                deployment.succeeded(sent.elapsed());
                let job = StreamJob {
                    translator: deployment.provider.translator(&ask, &deployment.model),
                    deployment: Arc::clone(deployment),
                    _in_flight: in_flight,
                    model: model.name.clone(),
                    key: key.clone(),
                    prompt_chars: ask.prompt_chars(),
                    started,
                    deadline,
                    ailb: Arc::clone(&self.ailb),
                };
                return job.start(response.into_body());
            }
            let bytes = match read(response.into_body(), MAX_ANSWER_BYTES, deadline).await {
                Ok(bytes) => bytes,
                Err(reason) => {
                    metrics.provider_error(provider, reason);
                    deployment.failed(allowed_fails, cooldown, None);
                    failures.add(
                        deployment,
                        format!("the answer did not arrive whole ({})", reason.label()),
                        None,
                    );
                    failures.timed_out |= reason == ProviderError::Timeout;
                    if failures.timed_out {
                        break;
                    }
                    continue;
                }
            };
            match deployment.provider.answer(&ask, &bytes) {
                Ok(answer) => {
                    deployment.succeeded(sent.elapsed());
                    metrics.tokens(&model.name, provider, answer.usage);
                    metrics.first_token(&model.name, provider, started.elapsed());
                    metrics.finished(&model.name, provider, 200, started.elapsed());
                    if let Some(key) = &key {
                        key.spend(answer.usage.total());
                    }
                    return json_response(StatusCode::OK, answer.body);
                }
                Err(why) => {
                    metrics.provider_error(provider, ProviderError::BadAnswer);
                    warn!(model = %model.name, deployment = %deployment.label(), error = %why, "provider answer unreadable");
                    deployment.failed(allowed_fails, cooldown, None);
                    failures.add(deployment, why, None);
                }
            }
        }
        let (status, response) = failures.response(&model, endpoint);
        metrics.finished(&model.name, "none", status.as_u16(), started.elapsed());
        response
    }
}

/// A stream being relayed: provider events in, the client's events out.
struct StreamJob {
    deployment: Arc<Deployment>,
    _in_flight: InFlight,
    translator: Box<dyn Translator>,
    model: String,
    key: Option<Arc<VirtualKey>>,
    prompt_chars: usize,
    started: Instant,
    deadline: Instant,
    ailb: Arc<Ailb>,
}

impl StreamJob {
    fn start(self, body: Incoming) -> Response {
        let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(32);
        tokio::spawn(self.relay(body, sender));
        (
            StatusCode::OK,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            Body::from_stream(ReceiverStream::new(receiver)),
        )
            .into_response()
    }

    async fn relay(mut self, mut body: Incoming, sender: mpsc::Sender<Result<Bytes, Infallible>>) {
        let metrics = &self.ailb.metrics;
        let provider = self.deployment.provider.name.clone();
        let mut events = Vec::new();
        let mut first_token = false;
        let mut client_gone = false;
        let mut broken = None;
        loop {
            let frame = match timeout_at(self.deadline.into(), body.frame()).await {
                Err(_) => {
                    broken = Some(ProviderError::Timeout);
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => {
                    broken = Some(ProviderError::StreamBroken);
                    break;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if let Err(why) = self.translator.feed(&data, &mut events) {
                warn!(model = %self.model, deployment = %self.deployment.label(), error = %why, "provider stream unreadable");
                broken = Some(ProviderError::BadAnswer);
                break;
            }
            if !first_token && self.translator.content_started() {
                first_token = true;
                metrics.first_token(&self.model, &provider, self.started.elapsed());
            }
            for event in events.drain(..) {
                if sender.send(Ok(event)).await.is_err() {
                    client_gone = true;
                    break;
                }
            }
            if client_gone || self.translator.complete() {
                break;
            }
        }
        if !client_gone && !self.translator.complete() {
            let reason = broken.unwrap_or(ProviderError::StreamBroken);
            metrics.provider_error(&provider, reason);
            let ailb = self.ailb.compiled();
            let (allowed_fails, cooldown) = ailb.cooldown;
            self.deployment.failed(allowed_fails, cooldown, None);
            warn!(model = %self.model, deployment = %self.deployment.label(), reason = reason.label(), "provider stream ended early; the client gets an error event");
            let message = format!(
                "the provider's stream ended before the answer was complete ({})",
                reason.label()
            );
            let event = error_json(&message, "api_error", Some("stream_interrupted"));
            let _ = sender.send(Ok(sse(&String::from_utf8_lossy(&event)))).await;
        }
        if client_gone {
            debug!(model = %self.model, deployment = %self.deployment.label(), "client left mid-stream");
        }
        let usage = self.translator.usage(self.prompt_chars);
        metrics.tokens(&self.model, &provider, usage);
        if let Some(key) = &self.key {
            key.spend(usage.total());
        }
        metrics.finished(&self.model, &provider, 200, self.started.elapsed());
    }
}
