//! Blue/green at the NLB with real backends behind two versions: a 20 % weight gets 20 % of
//! connections, a gradual promotion under continuous load drops none, a failing version is
//! rolled back by itself, and operators can roll back; bad requests are refused.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use marchproxy::{auth::AttachApiKey, listen::ListenSpec, pb, status::failure_of};
use marchproxy_nlb::Config;
use marchproxy_testkit::{backend::tagged_echo, *};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

type Gateway =
    pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";

async fn bluegreen_nlb(dir: &tempfile::TempDir, step_ms: u64) -> (TestNlb, Gateway) {
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        listen: vec![ListenSpec::parse("auto=127.0.0.1:0").unwrap()],
        ..Config::local()
    };
    // Short windows judged on little traffic: the tests' load is a few loops.
    config.settings.rollout = marchproxy_nlb::policy::RolloutSettings::from_json(
        serde_json::json!({"step_interval_ms": step_ms, "progress_deadline_ms": 600_000, "min_requests": 1, "failed_checks_tolerated": 0}),
    )
    .unwrap();
    let nlb = start_with(config).await;
    let gateway = pb::module_service_client::ModuleServiceClient::with_interceptor(
        nlb.channel().await,
        AttachApiKey::new(None).unwrap(),
    );
    (nlb, gateway)
}

/// One short connection through the NLB; the backend's name, or None when it failed.
async fn connect_once(nlb: &TestNlb) -> Option<String> {
    backend::first_line(nlb.listen[0], REQUEST).await
}

async fn two_versions(nlb: &TestNlb) -> (backend::Backend, backend::Backend, String, String) {
    let mut client = nlb.client().await;
    let (blue, green) = (tagged_echo("blue").await, tagged_echo("green").await);
    let web = || vec![route("web", pb::Protocol::Http, "*.example", "", 0)];
    let blue_reg = register(
        &mut client,
        instance(
            "alb-blue",
            pb::ModuleType::Alb,
            "v1",
            &blue.addr.to_string(),
        ),
        web(),
    )
    .await;
    let green_reg = register(
        &mut client,
        instance(
            "alb-green",
            pb::ModuleType::Alb,
            "v2",
            &green.addr.to_string(),
        ),
        web(),
    )
    .await;
    (blue, green, blue_reg, green_reg)
}

async fn split(gateway: &mut Gateway) -> std::collections::HashMap<String, i32> {
    gateway
        .get_active_version(pb::GetActiveVersionRequest {
            instance_id: "alb".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version_weights
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20_percent_weight_gets_20_percent_of_connections() {
    let dir = state_dir();
    let (nlb, mut gateway) = bluegreen_nlb(&dir, 30_000).await;
    let (blue, green, _, _) = two_versions(&nlb).await;
    assert_eq!(
        split(&mut gateway).await,
        [("v1".to_string(), 100), ("v2".to_string(), 0)].into(),
        "a new version starts at 0 %"
    );

    let set = gateway
        .set_traffic_weight(pb::SetTrafficWeightRequest {
            instance_id: "alb".into(),
            version: "v2".into(),
            weight: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(set.success);
    let config = set.current_config.unwrap();
    assert_eq!(
        (
            config.blue_version.as_str(),
            config.blue_weight,
            config.green_version.as_str(),
            config.green_weight
        ),
        ("v1", 80, "v2", 20)
    );

    for _ in 0..1000 {
        assert!(
            connect_once(&nlb).await.is_some(),
            "every connection is served"
        );
    }
    let (to_blue, to_green) = (blue.connections(), green.connections());
    assert_eq!(to_blue + to_green, 1000);
    assert!(
        (160..=240).contains(&to_green),
        "v2 got {to_green} of 1000 connections at 20 %"
    );
    let metrics = http_get(nlb.admin, "/metrics").await.1;
    assert!(
        metrics.contains("nlb_bluegreen_traffic_split{module_type=\"alb\",version=\"v2\"} 20"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("nlb_routed_connections_total{{module_type=\"alb\",protocol=\"http\",version=\"v2\"}} {to_green}")), "{metrics}");

    // The split survives a restart.
    nlb.stop().await;
    let (nlb, mut gateway) = bluegreen_nlb(&dir, 30_000).await;
    two_versions(&nlb).await;
    assert_eq!(
        split(&mut gateway).await,
        [("v1".to_string(), 80), ("v2".to_string(), 20)].into()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gradual_promotion_under_load_drops_no_connection() {
    let dir = state_dir();
    let (nlb, mut gateway) = bluegreen_nlb(&dir, 150).await;
    let (_blue, green, _, _) = two_versions(&nlb).await;
    let nlb = Arc::new(nlb);
    let (stop, failures, served) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut load = Vec::new();
    for _ in 0..4 {
        let (nlb, stop, failures, served) = (
            Arc::clone(&nlb),
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&served),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match connect_once(&nlb).await {
                    Some(_) => served.fetch_add(1, Ordering::Relaxed),
                    None => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let promoted = gateway
        .promote_version(pb::PromoteVersionRequest {
            instance_id: "alb-green".into(),
            version: "v2".into(),
            immediate: false,
            promotion_rate: 25,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(promoted.success, "{}", promoted.message);
    eventually(
        "the promotion reaches 100 %",
        Duration::from_secs(20),
        || {
            let mut gateway = gateway.clone();
            async move { split(&mut gateway).await.get("v2") == Some(&100) }
        },
    )
    .await;
    let green_before = green.connections();
    eventually(
        "new connections all go to v2",
        Duration::from_secs(10),
        || async { green.connections() > green_before + 20 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no connection failed during the promotion"
    );
    assert!(served.load(Ordering::Relaxed) > 100);
    let metrics = http_get(nlb.admin, "/metrics").await.1;
    assert!(
        metrics.contains("nlb_rollouts_total{module_type=\"alb\",result=\"promoted\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_version_is_rolled_back_by_itself() {
    let dir = state_dir();
    let (nlb, mut gateway) = bluegreen_nlb(&dir, 200).await;
    let (_blue, _green, _, green_reg) = two_versions(&nlb).await;
    let mut client = nlb.client().await;
    // Modules report their counters from their first heartbeat on.
    heartbeat_requests(&mut client, "alb-green", &green_reg, 0, 0).await;
    gateway
        .promote_version(pb::PromoteVersionRequest {
            instance_id: "alb".into(),
            version: "v2".into(),
            immediate: false,
            promotion_rate: 10,
        })
        .await
        .unwrap();
    assert_eq!(
        split(&mut gateway).await["v2"],
        10,
        "the first step is taken at once"
    );
    // v2 reports that a third of its requests fail.
    heartbeat_requests(&mut client, "alb-green", &green_reg, 300, 100).await;
    eventually(
        "the promotion rolls back to where it began",
        Duration::from_secs(10),
        || {
            let mut gateway = gateway.clone();
            async move {
                split(&mut gateway).await == [("v1".to_string(), 100), ("v2".to_string(), 0)].into()
            }
        },
    )
    .await;
    let metrics = http_get(nlb.admin, "/metrics").await.1;
    assert!(
        metrics.contains("nlb_rollouts_total{module_type=\"alb\",result=\"rolled_back\"} 1"),
        "{metrics}"
    );
    assert_eq!(connect_once(&nlb).await.as_deref(), Some("blue"));
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_roll_back_and_bad_requests_are_refused() {
    let dir = state_dir();
    let (nlb, mut gateway) = bluegreen_nlb(&dir, 30_000).await;
    two_versions(&nlb).await;
    gateway
        .promote_version(pb::PromoteVersionRequest {
            instance_id: "alb".into(),
            version: "v2".into(),
            immediate: true,
            promotion_rate: 0,
        })
        .await
        .unwrap();
    assert_eq!(connect_once(&nlb).await.as_deref(), Some("green"));
    let active = gateway
        .get_active_version(pb::GetActiveVersionRequest {
            instance_id: "alb-blue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.active_version, "v2");
    let back = gateway
        .rollback(pb::RollbackRequest {
            instance_id: "alb".into(),
            target_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            back.previous_version.as_str(),
            back.current_version.as_str()
        ),
        ("v2", "v1")
    );
    assert_eq!(connect_once(&nlb).await.as_deref(), Some("blue"));

    let weight = |instance_id: &str, version: &str, weight: i32| pb::SetTrafficWeightRequest {
        instance_id: instance_id.into(),
        version: version.into(),
        weight,
    };
    for (request, code) in [
        (weight("alb", "v2", 150), Code::InvalidArgument),
        (weight("alb", "v2", -1), Code::InvalidArgument),
        (weight("alb", "v9", 10), Code::NotFound),
        (weight("", "v2", 10), Code::InvalidArgument),
        (weight("no-such-instance", "v2", 10), Code::NotFound),
        (weight("rtmp", "v1", 10), Code::NotFound),
    ] {
        let status = gateway.set_traffic_weight(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(failure_of::<pb::SetTrafficWeightResponse>(&status).is_some_and(|b| !b.success));
    }
    let status = gateway
        .promote_version(pb::PromoteVersionRequest {
            instance_id: "alb".into(),
            version: "v2".into(),
            immediate: false,
            promotion_rate: 101,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = gateway
        .rollback(pb::RollbackRequest {
            instance_id: "dblb".into(),
            target_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    // Calls for one instance are forwarded to it; without an instance they are refused.
    let status = gateway
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
