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
use marchproxy_runtime::{RateLimiter, Verdict};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::timeout_at};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    Ailb,
    config::Compiled,
    keys::{Charge, VirtualKey},
    metrics::ProviderError,
    providers::{Ask, Endpoint, Translator, Usage, error_event, error_json},
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
            .route(&format!("{prefix}/models/{{*model}}"), get(model));
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

/// Seconds (or OpenAI's `retry-after-ms`) a provider asked to wait, at most an hour.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    let seconds = number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))?;
    Duration::try_from_secs_f64(seconds.clamp(0.0, 3600.0)).ok()
}

/// Reads at most `limit` bytes of `body` before `deadline`.
async fn read(body: Incoming, limit: usize, deadline: Instant) -> Result<Bytes, ProviderError> {
    match timeout_at(deadline.into(), Limited::new(body, limit).collect()).await {
        Err(_) => Err(ProviderError::Timeout),
        Ok(Err(_)) => Err(ProviderError::BadAnswer),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The client's JSON object, or the status and reason to refuse it with.
async fn read_request(body: Body, limit: usize) -> Result<Value, (StatusCode, String)> {
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {limit} bytes"),
            ));
        }
        Ok(Err(_)) | Err(_) => {
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time".into(),
            ));
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(body @ Value::Object(_)) => Ok(body),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object".into(),
        )),
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
        let tried = self.lines.join("; ");
        let (status, message, kind, code) = if self.lines.is_empty() && !self.timed_out {
            let message = self.untranslatable.unwrap_or_else(|| {
                format!(
                    "model `{}` has no deployment serving {}",
                    model.name,
                    endpoint.path()
                )
            });
            (
                StatusCode::BAD_REQUEST,
                message,
                "invalid_request_error",
                None,
            )
        } else if self.timed_out {
            let message = format!("model `{}`: no answer in time (tried {tried})", model.name);
            (
                StatusCode::GATEWAY_TIMEOUT,
                message,
                "timeout",
                Some("timeout"),
            )
        } else if self.all_rate_limited {
            let message = format!(
                "every provider of model `{}` is rate limiting ({tried})",
                model.name
            );
            let wait = self.shortest_wait.unwrap_or(Duration::from_secs(1));
            return (
                StatusCode::TOO_MANY_REQUESTS,
                too_many(&message, "rate_limit_exceeded", wait),
            );
        } else {
            let message = format!("no provider could answer model `{}`: {tried}", model.name);
            (
                StatusCode::BAD_GATEWAY,
                message,
                "api_error",
                Some("provider_error"),
            )
        };
        (status, error(status, &message, kind, code))
    }
}

/// A provider failure counts against the deployment unless it was the request's own deadline.
fn blamed(reason: ProviderError, deadline: Instant) -> bool {
    reason != ProviderError::Timeout || Instant::now() < deadline
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

        // The key first: a client without one gets no body read.
        let key = match authenticate(&compiled, &headers) {
            Ok(key) => key,
            Err(why) => return refused(StatusCode::UNAUTHORIZED, "unknown", unauthorized(why)),
        };
        let body = match read_request(body, compiled.max_body_bytes).await {
            Ok(body) => body,
            Err((status, message)) => {
                let response = error(status, &message, "invalid_request_error", None);
                return refused(status, "unknown", response);
            }
        };
        let Some(asked) = body["model"].as_str().map(str::to_owned) else {
            let response = error(
                StatusCode::BAD_REQUEST,
                "you must provide a model parameter",
                "invalid_request_error",
                None,
            );
            return refused(StatusCode::BAD_REQUEST, "unknown", response);
        };
        let Some(model) = compiled.catalog.get(&asked).cloned() else {
            return refused(StatusCode::NOT_FOUND, "unknown", not_found(&asked));
        };
        if let Some(key) = key.as_ref().filter(|key| !key.allows(&model.name, &asked)) {
            let message = format!("key `{}` may not use model `{asked}`", key.name);
            let response = error(
                StatusCode::FORBIDDEN,
                &message,
                "invalid_request_error",
                Some("model_not_allowed"),
            );
            return refused(StatusCode::FORBIDDEN, &model.name, response);
        }
        if let Some(Verdict::Limited {
            limit_id,
            retry_after,
        }) = presented_key(&headers).map(|presented| self.limiter.check_api_key(presented))
        {
            let message = format!("rate limited by `{limit_id}`");
            let response = too_many(&message, "rate_limit_exceeded", retry_after);
            return refused(StatusCode::TOO_MANY_REQUESTS, &model.name, response);
        }
        let ask = Ask::new(endpoint, body);
        let charge = match &key {
            None => None,
            Some(key) => match key.admit(Usage::estimate(ask.prompt_chars(), 0).prompt) {
                Ok(charge) => Some(charge),
                Err((limit, wait)) => {
                    metrics.limited(&key.name, limit.label());
                    let message = format!(
                        "key `{}` is over its {} limit; retry in {} s",
                        key.name,
                        limit.describe(),
                        wait.as_secs_f64().ceil()
                    );
                    let response = too_many(&message, "rate_limit_exceeded", wait);
                    return refused(StatusCode::TOO_MANY_REQUESTS, &model.name, response);
                }
            },
        };

        let mut call = Call {
            ailb: &self.ailb,
            compiled: &compiled,
            ask: &ask,
            model: &model,
            started,
            deadline: started + compiled.request_timeout,
            failures: Failures::default(),
            charge,
        };
        for deployment in model.order().iter().filter(|d| d.provider.serves(endpoint)) {
            if Instant::now() >= call.deadline {
                call.failures.timed_out = true;
                break;
            }
            let request = match deployment.provider.request(&ask, &deployment.model) {
                Ok(request) => request,
                Err(why) => {
                    call.failures.untranslatable.get_or_insert(why);
                    continue;
                }
            };
            if !call.failures.lines.is_empty() {
                metrics.failover(&model.name);
                info!(model = %model.name, to = %deployment.label(), "failing over");
            }
            if let Some(response) = call.attempt(deployment, request).await {
                return response;
            }
            if call.failures.timed_out {
                break;
            }
        }
        let (status, response) = call.failures.response(&model, endpoint);
        metrics.finished(&model.name, "none", status.as_u16(), started.elapsed());
        response
    }
}

/// One client request while its deployments are tried.
struct Call<'a> {
    ailb: &'a Arc<Ailb>,
    compiled: &'a Compiled,
    ask: &'a Ask,
    model: &'a Model,
    started: Instant,
    deadline: Instant,
    failures: Failures,
    charge: Option<Charge>,
}

impl Call<'_> {
    /// Sends `request` to `deployment`: the response for the client, or None when this
    /// deployment failed before anything reached the client (noted in `failures`).
    async fn attempt(
        &mut self,
        deployment: &Arc<Deployment>,
        request: hyper::Request<http_body_util::Full<Bytes>>,
    ) -> Option<Response> {
        let metrics = &self.ailb.metrics;
        let (model, provider) = (self.model.name.as_str(), deployment.provider.name.as_str());
        let in_flight = deployment.start();
        let sent = Instant::now();
        let response =
            match timeout_at(self.deadline.into(), self.ailb.client.request(request)).await {
                Err(_) => {
                    self.fail(
                        deployment,
                        ProviderError::Timeout,
                        "no answer in time".into(),
                        None,
                    );
                    self.failures.timed_out = true;
                    return None;
                }
                Ok(Err(e)) => {
                    let reason = if e.is_connect() {
                        ProviderError::Connect
                    } else {
                        ProviderError::Transport
                    };
                    self.fail(deployment, reason, describe(&e), None);
                    return None;
                }
                Ok(Ok(response)) => response,
            };
        if !response.status().is_success() {
            return self.refusal(deployment, response).await;
        }
        if self.ask.stream {
            return self.stream(deployment, in_flight, sent, response).await;
        }
        let bytes = match read(response.into_body(), MAX_ANSWER_BYTES, self.deadline).await {
            Ok(bytes) => bytes,
            Err(reason) => {
                let why = format!("the answer did not arrive whole ({})", reason.label());
                self.fail(deployment, reason, why, None);
                self.failures.timed_out |= reason == ProviderError::Timeout;
                return None;
            }
        };
        match deployment.provider.answer(self.ask, &bytes) {
            Ok(answer) => {
                deployment.succeeded(sent.elapsed());
                metrics.tokens(model, provider, answer.usage);
                metrics.finished(model, provider, 200, self.started.elapsed());
                if let Some(charge) = &mut self.charge {
                    charge.used(answer.usage.total());
                }
                Some(json_response(StatusCode::OK, answer.body))
            }
            Err(why) => {
                self.fail(deployment, ProviderError::BadAnswer, why, None);
                None
            }
        }
    }

    /// Notes a deployment's failure: counted, logged, held against it (unless it was the
    /// request's own deadline) and kept for the client's error.
    fn fail(
        &mut self,
        deployment: &Deployment,
        reason: ProviderError,
        why: String,
        rate_limited: Option<Duration>,
    ) {
        let (model, provider) = (self.model.name.as_str(), deployment.provider.name.as_str());
        self.ailb.metrics.provider_error(model, provider, reason);
        warn!(model, deployment = %deployment.label(), reason = reason.label(), error = %why, "provider failed");
        if blamed(reason, self.deadline) {
            let (allowed_fails, cooldown) = self.compiled.cooldown;
            deployment.failed(allowed_fails, cooldown, rate_limited);
        }
        self.failures.add(deployment, why, rate_limited);
    }

    /// A non-2xx answer: the provider's verdict on the request goes back to the client (400, 413,
    /// 422: another deployment would say the same); anything else is this deployment failing.
    async fn refusal(
        &mut self,
        deployment: &Arc<Deployment>,
        response: hyper::Response<Incoming>,
    ) -> Option<Response> {
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = read(response.into_body(), MAX_ERROR_BYTES, self.deadline)
            .await
            .unwrap_or_default();
        let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        let (reason, rate_limited, why) = match status.as_u16() {
            400 | 413 | 422 => {
                let provider = deployment.provider.name.as_str();
                self.ailb.metrics.finished(
                    &self.model.name,
                    provider,
                    status.as_u16(),
                    self.started.elapsed(),
                );
                debug!(model = %self.model.name, deployment = %deployment.label(), status = status.as_u16(), "provider refused the request");
                let body = deployment.provider.error_body(status.as_u16(), &body);
                return Some(json_response(status, body));
            }
            429 => {
                let cooldown = self.compiled.cooldown.1;
                (
                    ProviderError::RateLimited,
                    Some(wait.unwrap_or(cooldown)),
                    format!("{status} {text}"),
                )
            }
            // The body may echo part of the provider's key: it stays out of the client's view.
            401 | 403 => (
                ProviderError::Refused,
                None,
                format!("{status}: the provider refused the gateway's credentials (its API key)"),
            ),
            code if code >= 500 => (ProviderError::ServerError, None, format!("{status} {text}")),
            _ => (ProviderError::Refused, None, format!("{status} {text}")),
        };
        self.fail(deployment, reason, why, rate_limited);
        None
    }

    /// A 2xx answer to a streamed request: relayed once its first events arrived (until then a
    /// failure can still move to another deployment).
    async fn stream(
        &mut self,
        deployment: &Arc<Deployment>,
        in_flight: InFlight,
        sent: Instant,
        response: hyper::Response<Incoming>,
    ) -> Option<Response> {
        if !deployment.provider.is_stream(response.headers()) {
            let content_type = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            let why = format!("answered a streamed request with content type {content_type}");
            self.fail(deployment, ProviderError::BadAnswer, why, None);
            return None;
        }
        let mut relay = Relay {
            body: response.into_body(),
            translator: deployment.provider.translator(self.ask, &deployment.model),
            idle: self.compiled.stream_idle_timeout,
            deadline: self.deadline,
        };
        let mut first = Vec::new();
        while first.is_empty() {
            let failure = match relay.pump(&mut first).await {
                Ok(true) if relay.translator.failed() => Some(ProviderError::StreamError),
                Ok(true) => None,
                Ok(false) => Some(ProviderError::StreamBroken),
                Err(reason) => Some(reason),
            };
            if let Some(reason) = failure {
                let why = format!(
                    "the stream failed before its first event ({})",
                    reason.label()
                );
                self.fail(deployment, reason, why, None);
                self.failures.timed_out |= !blamed(reason, self.deadline);
                return None;
            }
        }
        deployment.succeeded(sent.elapsed());
        let job = StreamJob {
            relay,
            deployment: Arc::clone(deployment),
            _in_flight: in_flight,
            model: self.model.name.clone(),
            charge: self.charge.take(),
            prompt_chars: self.ask.prompt_chars(),
            started: self.started,
            ailb: Arc::clone(self.ailb),
        };
        Some(job.start(first))
    }
}

/// A provider's streamed body and its translation.
struct Relay {
    body: Incoming,
    translator: Box<dyn Translator>,
    idle: Duration,
    deadline: Instant,
}

impl Relay {
    /// Feeds the provider's next bytes through the translator into `events`; false at the end.
    async fn pump(&mut self, events: &mut Vec<Bytes>) -> Result<bool, ProviderError> {
        loop {
            let until = self.deadline.min(Instant::now() + self.idle);
            let frame = match timeout_at(until.into(), self.body.frame()).await {
                Err(_) => return Err(ProviderError::Timeout),
                Ok(None) => return Ok(false),
                Ok(Some(Err(_))) => return Err(ProviderError::StreamBroken),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                self.translator.feed(&data, events).map_err(|why| {
                    debug!(error = %why, "provider stream unreadable");
                    ProviderError::BadAnswer
                })?;
                return Ok(true);
            }
        }
    }
}

/// A stream being relayed: provider events in, the client's events out.
struct StreamJob {
    relay: Relay,
    deployment: Arc<Deployment>,
    _in_flight: InFlight,
    model: String,
    charge: Option<Charge>,
    prompt_chars: usize,
    started: Instant,
    ailb: Arc<Ailb>,
}

impl StreamJob {
    fn start(self, first: Vec<Bytes>) -> Response {
        let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(32);
        tokio::spawn(self.run(first, sender));
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

    /// Sends `event` unless the client left or stopped reading for the idle timeout.
    async fn send(&self, sender: &mpsc::Sender<Result<Bytes, Infallible>>, event: Bytes) -> bool {
        let until = self.relay.deadline.min(Instant::now() + self.relay.idle);
        matches!(
            timeout_at(until.into(), sender.send(Ok(event))).await,
            Ok(Ok(()))
        )
    }

    async fn run(mut self, first: Vec<Bytes>, sender: mpsc::Sender<Result<Bytes, Infallible>>) {
        let metrics = Arc::clone(&self.ailb.metrics);
        let provider = self.deployment.provider.name.clone();
        let mut events = first;
        let mut first_token = false;
        let mut client_gone = false;
        let mut broken = None;
        loop {
            if !first_token && self.relay.translator.content_started() {
                first_token = true;
                metrics.first_token(&self.model, &provider, self.started.elapsed());
            }
            for event in std::mem::take(&mut events) {
                if !self.send(&sender, event).await {
                    client_gone = true;
                    break;
                }
            }
            if client_gone || self.relay.translator.complete() {
                break;
            }
            let pumped = tokio::select! {
                () = sender.closed() => {
                    client_gone = true;
                    break;
                }
                pumped = self.relay.pump(&mut events) => pumped,
            };
            match pumped {
                Ok(true) => {}
                Ok(false) => break,
                Err(reason) => {
                    broken = Some(reason);
                    break;
                }
            }
        }
        let label = self.deployment.label();
        let (allowed_fails, cooldown) = self.ailb.compiled().cooldown;
        if client_gone {
            debug!(model = %self.model, deployment = %label, "client left mid-stream");
        } else if self.relay.translator.failed() {
            metrics.provider_error(&self.model, &provider, ProviderError::StreamError);
            self.deployment.failed(allowed_fails, cooldown, None);
            warn!(model = %self.model, deployment = %label, "provider reported an error mid-stream; passed on to the client");
        } else if !self.relay.translator.finished() {
            let reason = broken.unwrap_or(ProviderError::StreamBroken);
            metrics.provider_error(&self.model, &provider, reason);
            if blamed(reason, self.relay.deadline) {
                self.deployment.failed(allowed_fails, cooldown, None);
            }
            warn!(model = %self.model, deployment = %label, reason = reason.label(), "provider stream ended early; the client gets an error event");
            let message = format!(
                "the provider's stream ended before the answer was complete ({})",
                reason.label()
            );
            let event = error_event(&message, "api_error", Some("stream_interrupted"));
            self.send(&sender, event).await;
        }
        let usage = self.relay.translator.usage(self.prompt_chars);
        metrics.tokens(&self.model, &provider, usage);
        if let Some(charge) = &mut self.charge {
            charge.used(usage.total());
        }
        metrics.finished(&self.model, &provider, 200, self.started.elapsed());
    }
}
