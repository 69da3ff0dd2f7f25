//! Progressive delivery at the NLB, end to end: stand-in modules (the runtime's echo module, so
//! registration, heartbeats and their request/latency stats are the real ones) serve two
//! versions behind the NLB while clients keep connecting through it. A healthy version is
//! promoted in steps; one that starts failing 30 % of its requests, a slow one and one that gets
//! no traffic are rolled back by themselves; webhooks block a start and hold a step; affinity
//! keeps every client on one version; pause holds; a new NLB process taking over mid-rollout
//! resumes at the same step. No client connection fails in any of it, the takeover included.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use marchproxy::{auth::AttachApiKey, listen::ListenSpec, names::ModuleKind, pb};
use marchproxy_nlb::Config;
use marchproxy_testkit::{
    external::free_port,
    standin::{Load, Standin},
    *,
};
use serde_json::{Value, json};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(40);

/// The NLB with a TCP listener, on fixed ports so a restart keeps them.
fn nlb_config(dir: &tempfile::TempDir, grpc: u16, data: u16) -> Config {
    Config {
        grpc_listen: SocketAddr::from(([127, 0, 0, 1], grpc)),
        state_dir: Some(dir.path().to_owned()),
        listen: vec![ListenSpec::parse(&format!("tcp=127.0.0.1:{data}")).unwrap()],
        ..Config::local()
    }
}

async fn start_nlb(dir: &tempfile::TempDir) -> TestNlb {
    start_bound(nlb_config(dir, free_port(), free_port())).await
}

async fn set_policy(nlb: &TestNlb, policy: Value) {
    let answer = nlb.update_nlb_config("rollout", policy).await.unwrap();
    assert!(answer.success, "{:?}", answer.validation_errors);
}

/// Pauses the ALB's rollouts and waits until the running one says so, or resumes them.
async fn pause_alb(nlb: &TestNlb, paused: bool) {
    set_policy(nlb, json!({"kinds": {"alb": {"paused": paused}}})).await;
    if paused {
        eventually("the rollout is paused", DEADLINE, || async {
            status(nlb, "alb").await["rollout"]["phase"] == "paused"
        })
        .await;
    }
}

/// How many module instances the NLB has registered.
async fn registered(nlb: &TestNlb) -> usize {
    nlb.client()
        .await
        .list_modules(pb::ListModulesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .modules
        .len()
}

async fn promote(nlb: &TestNlb, kind: &str, version: &str) -> Result<String, tonic::Status> {
    let mut gateway = pb::module_service_client::ModuleServiceClient::with_interceptor(
        nlb.channel().await,
        AttachApiKey::new(None).unwrap(),
    );
    gateway
        .promote_version(pb::PromoteVersionRequest {
            instance_id: kind.into(),
            version: version.into(),
            immediate: false,
            promotion_rate: 0,
        })
        .await
        .map(|r| r.into_inner().message)
}

async fn active_version(nlb: &TestNlb, kind: &str) -> pb::GetActiveVersionResponse {
    let mut gateway = pb::module_service_client::ModuleServiceClient::with_interceptor(
        nlb.channel().await,
        AttachApiKey::new(None).unwrap(),
    );
    gateway
        .get_active_version(pb::GetActiveVersionRequest {
            instance_id: kind.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The kind's rollout status, as GetNLBStatus details carry it.
async fn status(nlb: &TestNlb, kind: &str) -> Value {
    nlb.status_details()
        .await
        .get(&format!("rollout.{kind}"))
        .map(|text| serde_json::from_str(text).unwrap())
        .unwrap_or(Value::Null)
}

fn events(status: &Value) -> Vec<String> {
    status["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn wait_weight(nlb: &TestNlb, kind: &str, version: &str, weight: i32) {
    eventually(
        &format!("{kind} {version} at {weight} %"),
        DEADLINE,
        || async { active_version(nlb, kind).await.version_weights.get(version) == Some(&weight) },
    )
    .await;
}

/// Both versions of `kind` registered and healthy; v2 has no traffic yet.
async fn two_versions(nlb: &TestNlb, kind: ModuleKind, priority: i32) -> (Standin, Standin) {
    let v1 = Standin::start(&nlb.url(), kind, "v1", priority).await;
    wait_weight(nlb, kind.name(), "v1", 100).await;
    let v2 = Standin::start(&nlb.url(), kind, "v2", priority).await;
    wait_weight(nlb, kind.name(), "v2", 0).await;
    (v1, v2)
}

/// A webhook receiver: records every POST body and answers with the status it is set to.
struct Hook {
    url: String,
    status: Arc<AtomicU16>,
    /// Calls answered 503 before `status` applies.
    refusals: Arc<AtomicU64>,
    calls: Arc<Mutex<Vec<Value>>>,
}

impl Hook {
    async fn start(status: u16) -> Hook {
        let (answer, refusals, calls) = (
            Arc::new(AtomicU16::new(status)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let app = {
            let (answer, refusals, calls) = (
                Arc::clone(&answer),
                Arc::clone(&refusals),
                Arc::clone(&calls),
            );
            axum::Router::new().route(
                "/hook",
                axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                    let (answer, refusals, calls) = (
                        Arc::clone(&answer),
                        Arc::clone(&refusals),
                        Arc::clone(&calls),
                    );
                    async move {
                        calls.lock().unwrap().push(body);
                        let refuse = refusals
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let status = if refuse {
                            503
                        } else {
                            answer.load(Ordering::SeqCst)
                        };
                        (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            if status == 200 {
                                "ok"
                            } else {
                                "change freeze until Monday"
                            },
                        )
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hook {
            url,
            status: answer,
            refusals,
            calls,
        }
    }

    fn calls(&self, of_type: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c["type"] == of_type)
            .cloned()
            .collect()
    }
}

async fn metrics(nlb: &TestNlb) -> String {
    http_get(nlb.admin, "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_version_is_promoted_step_by_step() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    let hook = Hook::start(200).await;
    set_policy(
        &nlb,
        json!({"step_interval_ms": 500, "step_percent": 20, "max_weight": 60, "min_requests": 5,
               "webhooks": [{"name": "chat", "type": "promoted", "url": hook.url}]}),
    )
    .await;
    let (_v1, _v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    let load = Load::start(nlb.listen[0], 6);
    eventually("the clients are served", DEADLINE, || async {
        load.answered() > 20
    })
    .await;

    let message = promote(&nlb, "alb", "v2").await.unwrap();
    assert!(
        message.contains("promoting v2 from 20 % by 20 %"),
        "{message}"
    );
    let during = active_version(&nlb, "alb").await.config.unwrap();
    assert_eq!(
        (during.blue_version.as_str(), during.green_version.as_str()),
        ("v1", "v2")
    );
    assert!(
        during.canary_enabled && during.deployment_started.is_some(),
        "{during:?}"
    );
    assert!(
        [20, 40, 60].contains(&during.canary_percent)
            && during.green_weight == during.canary_percent,
        "{during:?}"
    );
    // The first window may be judged by the NLB's connections alone (v2's request counters
    // were not known yet when it opened); a later one by v2's own counters.
    eventually(
        "an analysis of v2's own requests, all successful, is shown",
        DEADLINE,
        || async {
            let analysis = status(&nlb, "alb").await["rollout"]["last_analysis"].clone();
            analysis["result"] == "pass"
                && analysis["requests"].as_u64() >= Some(5)
                && analysis["success_ratio"] == 1.0
        },
    )
    .await;
    let shown = status(&nlb, "alb").await;
    assert_eq!(shown["rollout"]["stable_version"], "v1", "{shown}");

    wait_weight(&nlb, "alb", "v2", 100).await;
    let seen = load.finish().await;
    assert_eq!(seen.errors, 0);
    let log = events(&status(&nlb, "alb").await);
    let steps: Vec<&String> = log
        .iter()
        .filter(|e| e.starts_with("step ") || e.starts_with("started"))
        .collect();
    assert_eq!(
        steps.len(),
        3,
        "started at 20 %, then steps at 40 % and 60 %: {log:?}"
    );
    assert!(log[log.len() - 1].starts_with("promoted"), "{log:?}");
    assert!(log.iter().any(|e| e == "step 3: v2 at 60 %"), "{log:?}");
    let after = active_version(&nlb, "alb").await;
    assert_eq!(after.active_version, "v2");
    assert!(!after.config.unwrap().canary_enabled);
    eventually("the promoted webhook is told", DEADLINE, || async {
        hook.calls("promoted").len() == 1
    })
    .await;
    let told = &hook.calls("promoted")[0];
    assert_eq!(
        (told["kind"].as_str(), told["version"].as_str()),
        (Some("alb"), Some("v2"))
    );
    assert_eq!(told["weights"]["v2"], 100, "{told}");
    let metrics = metrics(&nlb).await;
    assert!(
        metrics.contains("nlb_rollouts_total{module_type=\"alb\",result=\"promoted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nlb_rollout_steps_total{module_type=\"alb\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_whose_errors_rise_to_30_percent_is_rolled_back_within_the_threshold() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    let hook = Hook::start(200).await;
    set_policy(
        &nlb,
        json!({"step_interval_ms": 300, "step_percent": 10, "min_requests": 5,
               "failed_checks_tolerated": 1,
               "webhooks": [{"name": "pager", "type": "rolled-back", "url": hook.url}]}),
    )
    .await;
    // The pager is briefly down: the notification is tried again.
    hook.refusals.store(2, Ordering::SeqCst);
    let (_v1, v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    let load = Load::start(nlb.listen[0], 6);
    promote(&nlb, "alb", "v2").await.unwrap();
    wait_weight(&nlb, "alb", "v2", 20).await;

    v2.configure(json!({"prefix": "v2:", "fail_ratio": 0.3}))
        .await;
    wait_weight(&nlb, "alb", "v2", 0).await;
    let shown = status(&nlb, "alb").await;
    let log = events(&shown);
    let failed: Vec<&String> = log
        .iter()
        .filter(|e| e.starts_with("analysis failed"))
        .collect();
    assert_eq!(
        failed.len(),
        2,
        "one tolerated, the second rolls back: {log:?}"
    );
    assert!(
        failed.iter().all(|e| e.contains("success ratio 0.")),
        "{log:?}"
    );
    let last = log.last().unwrap();
    assert!(
        last.starts_with("rolled back: 2 failed analyses") && last.contains("success ratio"),
        "{log:?}"
    );
    assert!(shown["rollout"].is_null(), "{shown}");
    assert_eq!(active_version(&nlb, "alb").await.version_weights["v1"], 100);
    let seen = load.finish().await;
    assert!(seen.errors > 0, "v2 did fail some requests");
    eventually(
        "the rolled-back webhook is told, at the third attempt",
        DEADLINE,
        || async {
            hook.calls("rolled-back").len() == 3 && hook.refusals.load(Ordering::SeqCst) == 0
        },
    )
    .await;
    assert!(
        hook.calls("rolled-back")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("success ratio")
    );
    let metrics = metrics(&nlb).await;
    assert!(
        metrics.contains("nlb_rollouts_total{module_type=\"alb\",result=\"rolled_back\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nlb_rollout_analyses_total{module_type=\"alb\",result=\"fail\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_version_is_rolled_back() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    set_policy(
        &nlb,
        json!({"step_interval_ms": 400, "step_percent": 20, "min_requests": 5,
               "max_p99_latency_ratio": 5, "failed_checks_tolerated": 0}),
    )
    .await;
    let (_v1, v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    v2.configure(json!({"prefix": "v2:", "delay_ms": 60})).await;
    let load = Load::start(nlb.listen[0], 6);
    eventually("the clients are served", DEADLINE, || async {
        load.answered() > 20
    })
    .await;
    promote(&nlb, "alb", "v2").await.unwrap();
    wait_weight(&nlb, "alb", "v2", 0).await;
    let log = events(&status(&nlb, "alb").await);
    let last = log.last().unwrap();
    assert!(
        last.starts_with("rolled back")
            && last.contains("p99 latency")
            && last.contains("stable version"),
        "{log:?}"
    );
    let seen = load.finish().await;
    assert_eq!(seen.errors, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_without_traffic_holds_then_is_rolled_back_at_the_deadline() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    // Only the DBLB's policy is short; the clients all reach the ALB (its route ranks higher).
    set_policy(
        &nlb,
        json!({"kinds": {"dblb": {"step_interval_ms": 300, "progress_deadline_ms": 1500}}}),
    )
    .await;
    let _alb = Standin::start(&nlb.url(), ModuleKind::Alb, "v1", 5).await;
    wait_weight(&nlb, "alb", "v1", 100).await;
    let (_v1, _v2) = two_versions(&nlb, ModuleKind::Dblb, 1).await;
    let load = Load::start(nlb.listen[0], 4);
    promote(&nlb, "dblb", "v2").await.unwrap();
    eventually("the step is held for want of traffic", DEADLINE, || async {
        status(&nlb, "dblb").await["rollout"]["phase"] == "held_for_traffic"
    })
    .await;
    assert_eq!(
        active_version(&nlb, "dblb").await.version_weights["v2"],
        10,
        "never promoted on silence"
    );
    wait_weight(&nlb, "dblb", "v2", 0).await;
    let log = events(&status(&nlb, "dblb").await);
    assert!(
        log.iter()
            .any(|e| e.starts_with("holding: too little traffic")),
        "{log:?}"
    );
    assert!(
        log.last()
            .unwrap()
            .starts_with("rolled back: no progress within the deadline"),
        "{log:?}"
    );
    let seen = load.finish().await;
    assert!(seen.versions.values().flatten().all(|v| v == "v1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_pre_rollout_webhook_blocks_the_start() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    let hook = Hook::start(503).await;
    set_policy(
        &nlb,
        json!({"webhooks": [{"name": "freeze", "type": "pre-rollout", "url": hook.url}]}),
    )
    .await;
    let (_v1, _v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    let refused = promote(&nlb, "alb", "v2").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("change freeze until Monday"),
        "{}",
        refused.message()
    );
    assert_eq!(active_version(&nlb, "alb").await.version_weights["v2"], 0);
    let asked = &hook.calls("pre-rollout")[0];
    assert_eq!(
        (asked["kind"].as_str(), asked["version"].as_str()),
        (Some("alb"), Some("v2"))
    );
    assert!(events(&status(&nlb, "alb").await)[0].starts_with("blocked by a pre-rollout webhook"));

    hook.status.store(200, Ordering::SeqCst);
    promote(&nlb, "alb", "v2").await.unwrap();
    assert_eq!(active_version(&nlb, "alb").await.version_weights["v2"], 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_holds_a_step_until_it_answers_2xx_and_a_pause_holds_everything() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    let gate = Hook::start(503).await;
    set_policy(
        &nlb,
        json!({"step_interval_ms": 300, "step_percent": 20, "max_weight": 100, "min_requests": 5,
               "webhooks": [{"name": "qa", "type": "gate", "url": gate.url}]}),
    )
    .await;
    let (_v1, _v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    let load = Load::start(nlb.listen[0], 6);
    promote(&nlb, "alb", "v2").await.unwrap();
    eventually("the gate is asked three times", DEADLINE, || async {
        gate.calls("gate").len() >= 3
    })
    .await;
    assert_eq!(
        active_version(&nlb, "alb").await.version_weights["v2"],
        20,
        "held at step 1"
    );
    let shown = status(&nlb, "alb").await;
    assert_eq!(shown["rollout"]["step"], 1, "{shown}");
    assert!(
        events(&shown)
            .iter()
            .any(|e| e.starts_with("held by a gate: webhook `qa` answered 503"))
    );
    assert_eq!(gate.calls("gate")[0]["next_weight"], 40);

    gate.status.store(200, Ordering::SeqCst);
    wait_weight(&nlb, "alb", "v2", 40).await;
    pause_alb(&nlb, true).await;
    let paused_at = active_version(&nlb, "alb").await.version_weights["v2"];
    let calls = gate.calls("gate").len();
    // Four intervals: nothing may move while paused.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        active_version(&nlb, "alb").await.version_weights["v2"],
        paused_at
    );
    assert_eq!(gate.calls("gate").len(), calls, "no analysis while paused");

    pause_alb(&nlb, false).await;
    wait_weight(&nlb, "alb", "v2", 100).await;
    let log = events(&status(&nlb, "alb").await);
    for expected in ["paused by the operator", "resumed by the operator"] {
        assert!(
            log.iter().any(|e| e == expected),
            "{expected} missing: {log:?}"
        );
    }
    load.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_affinity_every_client_stays_on_one_version_across_steps() {
    let dir = state_dir();
    let nlb = start_nlb(&dir).await;
    set_policy(
        &nlb,
        json!({"step_interval_ms": 400, "step_percent": 30, "max_weight": 100, "min_requests": 3,
               "affinity": true}),
    )
    .await;
    let (_v1, _v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    let load = Load::start(nlb.listen[0], 32);
    eventually("the clients are served", DEADLINE, || async {
        load.answered() > 50
    })
    .await;
    promote(&nlb, "alb", "v2").await.unwrap();
    // Requests from here on were routed during the rollout.
    let rollout = load.next_epoch();
    wait_weight(&nlb, "alb", "v2", 90).await;
    let seen = load.finish().await;
    let during: Vec<(&u8, &BTreeSet<String>)> = seen
        .versions
        .iter()
        .filter(|((epoch, _), _)| *epoch == rollout)
        .map(|((_, client), versions)| (client, versions))
        .collect();
    assert_eq!(
        during.len(),
        32,
        "every client connected during the rollout"
    );
    for (client, versions) in &during {
        assert_eq!(versions.len(), 1, "client {client} reached {versions:?}");
    }
    let on_v2 = during.iter().filter(|(_, v)| v.contains("v2")).count();
    assert!(
        (1..32).contains(&on_v2),
        "{on_v2} of 32 clients on v2: both versions served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_nlb_resumes_the_rollout_at_the_same_step_without_failing_a_connection() {
    let dir = state_dir();
    let (grpc, data) = (free_port(), free_port());
    let old = start_bound(nlb_config(&dir, grpc, data)).await;
    set_policy(
        &old,
        json!({"step_interval_ms": 500, "step_percent": 20, "max_weight": 100, "min_requests": 5}),
    )
    .await;
    let (_v1, _v2) = two_versions(&old, ModuleKind::Alb, 1).await;
    let load = Load::start(old.listen[0], 6);
    promote(&old, "alb", "v2").await.unwrap();
    wait_weight(&old, "alb", "v2", 40).await;
    // Paused, so the step cannot move on while the processes change places.
    pause_alb(&old, true).await;

    // The new process takes the old one's sockets, state and registrations while the clients
    // keep connecting; the old one drains and exits by itself.
    let new = start_bound(Config {
        takeover: true,
        ..nlb_config(&dir, grpc, data)
    })
    .await;
    let shown = status(&new, "alb").await;
    assert_eq!(
        (&shown["rollout"]["step"], &shown["rollout"]["weight"]),
        (&json!(2), &json!(40)),
        "{shown}"
    );
    assert_eq!(
        registered(&new).await,
        2,
        "the registrations moved with the state"
    );
    old.exits_by_itself(DEADLINE).await;
    pause_alb(&new, false).await;
    let answered = load.answered();
    eventually(
        "the clients are served by the new process",
        DEADLINE,
        || async { load.answered() > answered + 50 },
    )
    .await;
    wait_weight(&new, "alb", "v2", 100).await;
    let log = events(&status(&new, "alb").await);
    assert!(log.last().unwrap().starts_with("promoted"), "{log:?}");
    load.finish().await;
    let beside = marchproxy_nlb::Server::bind(nlb_config(&dir, free_port(), free_port()))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        beside
            .as_deref()
            .is_some_and(|e| e.contains("another NLB is running")),
        "a second NLB on the same state directory is refused: {beside:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_resumes_from_disk_after_a_cold_restart() {
    let dir = state_dir();
    let (grpc, data) = (free_port(), free_port());
    let nlb = start_bound(nlb_config(&dir, grpc, data)).await;
    set_policy(
        &nlb,
        json!({"step_interval_ms": 400, "step_percent": 20, "max_weight": 100, "min_requests": 5}),
    )
    .await;
    let (_v1, _v2) = two_versions(&nlb, ModuleKind::Alb, 1).await;
    let load = Load::start(nlb.listen[0], 6);
    promote(&nlb, "alb", "v2").await.unwrap();
    wait_weight(&nlb, "alb", "v2", 40).await;
    pause_alb(&nlb, true).await;
    // A stop and a start (a crash would do the same): clients are turned away meanwhile, so
    // they pause; what matters here is what the state directory brings back.
    load.finish().await;
    nlb.stop().await;

    let nlb = start_bound(nlb_config(&dir, grpc, data)).await;
    let shown = status(&nlb, "alb").await;
    assert_eq!(
        (
            &shown["rollout"]["step"],
            &shown["rollout"]["weight"],
            &shown["rollout"]["phase"]
        ),
        (&json!(2), &json!(40), &json!("paused")),
        "{shown}"
    );
    eventually("the modules register again", DEADLINE, || async {
        registered(&nlb).await == 2
    })
    .await;
    let load = Load::start(nlb.listen[0], 6);
    pause_alb(&nlb, false).await;
    wait_weight(&nlb, "alb", "v2", 100).await;
    let log = events(&status(&nlb, "alb").await);
    assert!(
        log.iter().any(|e| e == "step 3: v2 at 60 %"),
        "went on from step 2: {log:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|e| *e == "paused by the operator")
            .count(),
        1,
        "the pause is not announced again after the restart: {log:?}"
    );
    load.finish().await;
}
