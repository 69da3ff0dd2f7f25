//! The operator console on the admin server: `/ui/` is one page, embedded in the binary (no
//! build step, nothing fetched), that polls `/ui/api/state` each second and steers blue/green
//! through POSTs to `/ui/api/*`. Every action calls the NLB's ModuleService ([`ModuleGateway`])
//! exactly as a gRPC client's call does, so the console has no rules of its own.
//!
//! With a cluster key, `/ui/api/login` trades the key for a session cookie (HttpOnly,
//! SameSite=Strict, 12 hours); without one the console is as open as the gRPC API, except that
//! its actions then need the page to be opened by IP address or as localhost: a name could be a
//! rebound DNS name pointing a foreign page at the NLB. Every POST also needs the
//! `x-marchproxy-console` header, which a page of another origin cannot send without a CORS
//! preflight that the console never grants.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use marchproxy::{
    names::{self, ModuleKind},
    pb::{self, module_service_server::ModuleService, nlb_service_server::NlbService},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::Request;

use crate::{module_gateway::ModuleGateway, nlb::Nlb, service::NlbGrpc, state::unix_ms};

const PAGE: &str = include_str!("console.html");
const COOKIE: &str = "marchproxy_console";
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const ACTION_HEADER: &str = "x-marchproxy-console";
/// Per-second samples of new connections kept for the chart: five minutes.
const SAMPLES_KEPT: usize = 300;
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);
/// Sessions held at most (one per sign-in); the oldest go first.
const SESSIONS_KEPT: usize = 1000;

pub struct Console {
    nlb: Arc<Nlb>,
    gateway: ModuleGateway,
    /// For `UnregisterModule`, which a drain is.
    grpc: Arc<NlbGrpc>,
    /// Session tokens and when each expires.
    sessions: Mutex<HashMap<String, Instant>>,
    samples: Mutex<VecDeque<Sample>>,
}

/// Connections routed so far per (module kind, version), at one moment.
struct Sample {
    at: SystemTime,
    routed: BTreeMap<(String, String), u64>,
}

type Answer = Result<Json<Value>, (StatusCode, Json<Value>)>;

fn refuse(status: StatusCode, error: impl Into<String>) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "error": error.into() })))
}

impl Console {
    pub fn new(nlb: Arc<Nlb>) -> Arc<Console> {
        Arc::new(Console {
            gateway: ModuleGateway::new(Arc::clone(&nlb)),
            grpc: Arc::new(NlbGrpc::new(Arc::clone(&nlb))),
            nlb,
            sessions: Mutex::new(HashMap::new()),
            samples: Mutex::new(VecDeque::new()),
        })
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
            .route("/ui/", get(page))
            .route("/ui/api/login", post(login))
            .route("/ui/api/logout", post(logout))
            .route("/ui/api/state", get(state))
            .route("/ui/api/weight", post(weight))
            .route("/ui/api/promote", post(promote))
            .route("/ui/api/rollback", post(rollback))
            .route("/ui/api/drain", post(drain))
            .route("/ui/api/pause", post(pause))
            .with_state(Arc::clone(self))
    }

    /// Samples the routed-connection counters each second for the chart, until shutdown.
    pub async fn run_sampler(self: Arc<Self>) {
        let mut shutdown = self.nlb.shutdown.clone();
        let mut tick = tokio::time::interval(SAMPLE_PERIOD);
        // After a stall, one sample a second again, not a burst of them milliseconds apart.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::nlb::stopped(&mut shutdown) => return,
            }
            let sample = Sample {
                at: SystemTime::now(),
                routed: self.nlb.metrics.routed_by_version(),
            };
            let mut samples = lock(&self.samples);
            if samples.len() == SAMPLES_KEPT {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }

    /// Whether the request may see and steer: no key is set, or it carries a live session.
    fn signed_in(&self, headers: &HeaderMap) -> bool {
        if self.nlb.api_key.is_none() {
            return true;
        }
        let Some(token) = session_token(headers) else {
            return false;
        };
        lock(&self.sessions)
            .get(token)
            .is_some_and(|expires| *expires > Instant::now())
    }

    /// Refuses what is not signed in, and POSTs without the console's header (or, with no
    /// key set, from a page opened by host name).
    fn check(&self, headers: &HeaderMap, action: bool) -> Result<(), (StatusCode, Json<Value>)> {
        if action && !headers.contains_key(ACTION_HEADER) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "console actions need the {ACTION_HEADER} header (the console's page sends it)"
                ),
            ));
        }
        if action && self.nlb.api_key.is_none() && !addressed_by_ip(headers) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "without an API key, steer from the console opened by IP address or localhost (or set --api-key)",
            ));
        }
        if !self.signed_in(headers) {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "sign in with the cluster API key",
            ));
        }
        Ok(())
    }

    fn snapshot(&self) -> Value {
        let now = Instant::now();
        let state = self.nlb.state();
        let instances: Vec<Value> = state
            .instances
            .values()
            .map(|i| {
                let error_ratio = i.stats.as_ref().and_then(|s| {
                    (s.total_requests > 0)
                        .then(|| s.failed_requests as f64 / s.total_requests as f64)
                });
                json!({
                    "instance_id": i.id,
                    "kind": i.kind.name(),
                    "version": i.version,
                    "address": i.address.to_string(),
                    "health": names::health_name(i.health(now, &state.settings)),
                    "heartbeat_age_s": now.duration_since(i.last_seen).as_secs_f64(),
                    "connections": i.open_connections(),
                    "error_ratio": error_ratio,
                    "draining": i.draining,
                })
            })
            .collect();
        let mut kinds: Vec<ModuleKind> = state.instances.values().map(|i| i.kind).collect();
        kinds.sort_by_key(|k| k.name());
        kinds.dedup();

        let kinds: Vec<Value> = kinds
            .into_iter()
            .map(|kind| {
                let mut weights: Vec<(String, i32)> =
                    state.version_weights(kind).into_iter().collect();
                weights.sort();
                let status = state.rollout_status(kind, now);
                json!({
                    "kind": kind.name(),
                    "active_version": state.deployment(kind).active_version,
                    "previous_version": state.previous_active.get(&kind),
                    "weights": weights.into_iter().map(|(v, w)| json!({"version": v, "weight": w})).collect::<Vec<_>>(),
                    "promotion": status["rollout"],
                    "last_promotion_end": status["last_end"],
                })
            })
            .collect();
        let routes: Vec<Value> = state
            .table()
            .into_iter()
            .map(|(route, owner, _)| {
                let wire = pb::Route::from(&route.spec);
                json!({
                    "route_id": wire.route_id,
                    "protocol": names::protocol_name(route.spec.protocol),
                    "source_pattern": wire.source_pattern,
                    "path_pattern": wire.path_pattern,
                    "destination": wire.destination_pattern,
                    "priority": wire.priority,
                    "owner": match owner {
                        crate::state::RouteOwner::Operator => "operator".to_owned(),
                        crate::state::RouteOwner::Module(id) => id,
                    },
                })
            })
            .collect();
        drop(state);
        json!({
            "key_required": self.nlb.api_key.is_some(),
            "instances": instances,
            "kinds": kinds,
            "routes": routes,
            "new_connections": self.series(),
        })
    }

    /// New connections per second, per kind and version, over the kept samples.
    fn series(&self) -> Value {
        let samples = lock(&self.samples);
        let at: Vec<u64> = samples.iter().skip(1).map(|s| unix_ms(s.at)).collect();
        let mut keys: Vec<&(String, String)> =
            samples.iter().flat_map(|s| s.routed.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut kinds: BTreeMap<&str, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
        for key in keys {
            let counts: Vec<u64> = samples
                .iter()
                .zip(samples.iter().skip(1))
                .map(|(before, after)| {
                    let count = |s: &Sample| s.routed.get(key).copied().unwrap_or(0);
                    count(after).saturating_sub(count(before))
                })
                .collect();
            kinds
                .entry(key.0.as_str())
                .or_default()
                .insert(key.1.as_str(), counts);
        }
        json!({ "at_unix_ms": at, "kinds": kinds })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only plain inserts and removals happen under these locks: a poisoned one is still whole.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the page was opened by IP address or as localhost (the Host header says).
fn addressed_by_ip(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        // An IPv6 literal keeps its brackets; a port follows the last colon.
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|cookie| cookie.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

async fn page() -> Response {
    let mut response = Html(PAGE).into_response();
    let headers = response.headers_mut();
    // The page runs its own inline script and talks to its own origin only, in no frame.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
struct Login {
    key: String,
}

async fn login(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Json(login): Json<Login>,
) -> Response {
    if !headers.contains_key(ACTION_HEADER) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("sign in from the console's page (it sends the {ACTION_HEADER} header)"),
        )
        .into_response();
    }
    let Some(expected) = &console.nlb.api_key else {
        return Json(
            json!({ "signed_in": true, "message": "this NLB has no API key: the console is open" }),
        )
        .into_response();
    };
    if !marchproxy::auth::constant_time_eq(login.key.as_bytes(), expected.as_bytes()) {
        tracing::warn!("console sign-in refused: wrong API key");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "that is not the cluster's API key",
        )
        .into_response();
    }
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    {
        let now = Instant::now();
        let mut sessions = lock(&console.sessions);
        sessions.retain(|_, expires| *expires > now);
        if sessions.len() >= SESSIONS_KEPT {
            // The oldest session is the one that expires first.
            let oldest = sessions
                .iter()
                .min_by_key(|(_, expires)| **expires)
                .map(|(token, _)| token.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(token.clone(), now + SESSION_LIFETIME);
    }
    tracing::info!("console signed in");
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    );
    let mut response = Json(json!({ "signed_in": true })).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if !headers.contains_key(ACTION_HEADER) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("sign out from the console's page (it sends the {ACTION_HEADER} header)"),
        )
        .into_response();
    }
    if let Some(token) = session_token(&headers) {
        lock(&console.sessions).remove(token);
    }
    let mut response = Json(json!({ "signed_in": false })).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "marchproxy_console=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0",
        ),
    );
    response
}

async fn state(State(console): State<Arc<Console>>, headers: HeaderMap) -> Answer {
    console.check(&headers, false)?;
    Ok(Json(console.snapshot()))
}

/// The answer of a ModuleService call, as the console shows it.
fn answered<T>(
    outcome: Result<tonic::Response<T>, tonic::Status>,
    message: impl FnOnce(T) -> String,
) -> Answer {
    match outcome {
        Ok(response) => Ok(Json(json!({ "message": message(response.into_inner()) }))),
        Err(status) => {
            let code = match status.code() {
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                    StatusCode::BAD_REQUEST
                }
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(refuse(code, status.message()))
        }
    }
}

#[derive(Deserialize)]
struct Weight {
    kind: String,
    version: String,
    percent: i32,
}

async fn weight(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Json(weight): Json<Weight>,
) -> Answer {
    console.check(&headers, true)?;
    let outcome = console
        .gateway
        .set_traffic_weight(Request::new(pb::SetTrafficWeightRequest {
            instance_id: weight.kind,
            version: weight.version,
            weight: weight.percent,
        }))
        .await;
    answered(outcome, |r| r.message)
}

#[derive(Deserialize)]
struct Promote {
    kind: String,
    version: String,
    #[serde(default)]
    immediate: bool,
    /// Percent per step; 0 for the rollout policy's.
    #[serde(default)]
    rate: i32,
}

async fn promote(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Json(promote): Json<Promote>,
) -> Answer {
    console.check(&headers, true)?;
    let outcome = console
        .gateway
        .promote_version(Request::new(pb::PromoteVersionRequest {
            instance_id: promote.kind,
            version: promote.version,
            immediate: promote.immediate,
            promotion_rate: promote.rate,
        }))
        .await;
    answered(outcome, |r| r.message)
}

#[derive(Deserialize)]
struct Rollback {
    kind: String,
    /// The version to return to; empty for the one before.
    #[serde(default)]
    to: String,
}

async fn rollback(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Json(rollback): Json<Rollback>,
) -> Answer {
    console.check(&headers, true)?;
    let outcome = console
        .gateway
        .rollback(Request::new(pb::RollbackRequest {
            instance_id: rollback.kind,
            target_version: rollback.to,
        }))
        .await;
    answered(outcome, |r| r.message)
}

#[derive(Deserialize)]
struct Pause {
    kind: String,
    paused: bool,
}

/// Pauses or resumes a kind's rollouts: the `paused` key of its `rollout` policy, set through
/// UpdateNLBConfig like `marchctl rollout pause` does.
async fn pause(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Json(pause): Json<Pause>,
) -> Answer {
    console.check(&headers, true)?;
    let update = json!({ "kinds": { pause.kind.as_str(): { "paused": pause.paused } } });
    let outcome = console
        .grpc
        .update_nlb_config(Request::new(pb::UpdateNlbConfigRequest {
            config: Some(pb::ConfigUpdate {
                config_type: "rollout".into(),
                config_data: update.to_string().into_bytes(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await;
    match outcome {
        Ok(answer) if !answer.get_ref().success => Err(refuse(
            StatusCode::BAD_REQUEST,
            answer.into_inner().validation_errors.join("; "),
        )),
        outcome => answered(outcome, |_| {
            if pause.paused {
                format!(
                    "{} rollouts paused: no analysis and no step until resumed",
                    pause.kind
                )
            } else {
                format!("{} rollouts resumed", pause.kind)
            }
        }),
    }
}

#[derive(Deserialize)]
struct Drain {
    instance: String,
}

/// `UnregisterModule` with `graceful`: no new connections for the instance, which leaves once its
/// open ones have ended (or the drain time is up). Answered at once; the drain goes on.
async fn drain(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Json(drain): Json<Drain>,
) -> Answer {
    console.check(&headers, true)?;
    let (registration_id, open) = {
        let state = console.nlb.state();
        let instance = state
            .instance(&drain.instance)
            .map_err(|e| refuse(StatusCode::NOT_FOUND, e.to_string()))?;
        (
            instance.registration_id.clone(),
            instance.open_connections(),
        )
    };
    let grpc = Arc::clone(&console.grpc);
    let id = drain.instance.clone();
    tokio::spawn(async move {
        let request = Request::new(pb::UnregisterModuleRequest {
            instance_id: id.clone(),
            registration_id,
            graceful: true,
            drain_timeout_seconds: 0,
        });
        match grpc.unregister_module(request).await {
            Ok(done) => {
                tracing::info!(instance = %id, message = %done.into_inner().message, "console drain finished")
            }
            Err(status) => {
                tracing::warn!(instance = %id, error = %status.message(), "console drain failed")
            }
        }
    });
    Ok(Json(json!({
        "message": format!(
            "draining {}: no new connections; it leaves the NLB when its {open} open connection(s) end (a running module registers again)",
            drain.instance
        )
    })))
}
