//! Module lifecycle at the NLB over gRPC: registration and its validation, heartbeats,
//! re-registration, graceful drain, expiry of silent modules, listing with queries.

use std::time::Duration;

use marchproxy::{pb, status::failure_of};
use marchproxy_nlb::Config;
use marchproxy_testkit::*;
use tonic::Code;

fn alb(id: &str) -> pb::ModuleInstance {
    instance(id, pb::ModuleType::Alb, "v1", "127.0.0.1:8080")
}

async fn register_error(
    client: &mut NlbClient,
    request: pb::RegisterModuleRequest,
) -> (Code, String, pb::RegisterModuleResponse) {
    let status = client
        .register_module(request)
        .await
        .expect_err("registration must be refused");
    let body: pb::RegisterModuleResponse =
        failure_of(&status).expect("the failure body rides in the status details");
    (status.code(), status.message().to_owned(), body)
}

#[tokio::test]
async fn registration_validates_every_field() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;

    let with = |instance: pb::ModuleInstance| pb::RegisterModuleRequest {
        instance: Some(instance),
        ..Default::default()
    };
    let cases: Vec<(pb::RegisterModuleRequest, &str)> = vec![
        (pb::RegisterModuleRequest::default(), "instance is missing"),
        (with(alb("")), "instance_id is empty"),
        (
            with(pb::ModuleInstance {
                module_type: 0,
                ..alb("a")
            }),
            "module_type 0",
        ),
        (
            with(pb::ModuleInstance {
                module_type: pb::ModuleType::Nlb as i32,
                ..alb("a")
            }),
            "module_type 5",
        ),
        (
            with(pb::ModuleInstance {
                module_type: 99,
                ..alb("a")
            }),
            "module_type 99",
        ),
        (
            with(pb::ModuleInstance {
                address: "nohost".into(),
                ..alb("a")
            }),
            "not a host:port",
        ),
        (
            with(pb::ModuleInstance {
                address: "host:0".into(),
                ..alb("a")
            }),
            "port 0",
        ),
        (
            with(pb::ModuleInstance {
                max_connections: -1,
                ..alb("a")
            }),
            "max_connections",
        ),
        (
            with(pb::ModuleInstance {
                health_status: 42,
                ..alb("a")
            }),
            "health_status 42",
        ),
        (
            pb::RegisterModuleRequest {
                instance: Some(alb("a")),
                initial_routes: vec![
                    route("r", pb::Protocol::Http, "", "", 0),
                    route("r", pb::Protocol::Http, "", "", 0),
                ],
                ..Default::default()
            },
            "appears twice",
        ),
        (
            pb::RegisterModuleRequest {
                instance: Some(alb("a")),
                initial_routes: vec![route("r", pb::Protocol::Http, "10.0.0.0/40", "", 0)],
                ..Default::default()
            },
            "CIDR",
        ),
    ];
    for (request, expected) in cases {
        let (code, message, body) = register_error(&mut client, request).await;
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(
            message.contains(expected),
            "`{message}` should mention `{expected}`"
        );
        assert!(!body.success);
        let error = body.error.expect("error body");
        assert_eq!(error.code, pb::StatusCode::InvalidArgument as i32);
        assert_eq!(error.message, message);
    }
    let listed = client
        .list_modules(pb::ListModulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.total_modules, 0,
        "no refused registration may leave anything behind"
    );
}

#[tokio::test]
async fn registration_heartbeat_and_reregistration() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;

    let web = route("web", pb::Protocol::Http, "*.example.com", "10.0.0.5:80", 5);
    let first = register(&mut client, alb("alb-1"), vec![web.clone()]).await;
    let info = client
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: "alb-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let shown = info.instance.unwrap();
    assert_eq!(shown.health_status, pb::HealthStatus::Healthy as i32);
    assert_eq!(
        shown.traffic_weight, 100,
        "a lone version serves everything"
    );
    assert_eq!(info.routes.len(), 1);
    assert_eq!(info.routes[0].source_pattern, "*.example.com");
    assert_eq!(info.deployment_config.unwrap().active_version, "v1");

    // Heartbeats carry stats that the NLB shows.
    let mut beat = pb::HeartbeatRequest {
        instance_id: "alb-1".into(),
        registration_id: first.clone(),
        status: pb::HealthStatus::Degraded as i32,
        current_stats: Some(pb::ModuleStats {
            total_requests: 1200,
            active_connections: 7,
            p99_latency_ms: 12.5,
            ..Default::default()
        }),
        timestamp: None,
    };
    let ack = client.heartbeat(beat.clone()).await.unwrap().into_inner();
    assert!(ack.acknowledged);
    assert!(ack.server_time.is_some());
    let info = client
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: "alb-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.stats.unwrap().total_requests, 1200);
    let shown = info.instance.unwrap();
    assert_eq!(shown.current_connections, 7);
    assert_eq!(shown.health_status, pb::HealthStatus::Degraded as i32);

    // Bad heartbeats are refused, not recorded.
    let mut negative = beat.clone();
    negative.current_stats.as_mut().unwrap().active_connections = -1;
    let status = client.heartbeat(negative).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("active_connections"));
    let mut bad_status = beat.clone();
    bad_status.status = 77;
    assert_eq!(
        client.heartbeat(bad_status).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // The module restarts and registers again: a new registration replaces the old one.
    let second = register(&mut client, alb("alb-1"), vec![web]).await;
    assert_ne!(first, second);
    let stale = client.heartbeat(beat.clone()).await.unwrap().into_inner();
    assert!(!stale.acknowledged);
    assert_eq!(
        stale.instructions.get("action").map(String::as_str),
        Some("register")
    );
    beat.registration_id = second.clone();
    assert!(
        client
            .heartbeat(beat.clone())
            .await
            .unwrap()
            .into_inner()
            .acknowledged
    );

    // An unknown instance is told to register.
    beat.instance_id = "never-seen".into();
    let unknown = client.heartbeat(beat).await.unwrap().into_inner();
    assert!(!unknown.acknowledged);
    assert_eq!(unknown.instructions["action"], "register");

    // Unregistering needs the current registration id.
    let wrong = client
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: first,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    let body: pb::UnregisterModuleResponse = failure_of(&wrong).unwrap();
    assert_eq!(
        body.error.unwrap().code,
        pb::StatusCode::PermissionDenied as i32
    );
    let missing = client
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "ghost".into(),
            registration_id: second.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let done = client
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-1".into(),
            registration_id: second,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.success);
    let status = client
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: "alb-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn graceful_unregister_drains_open_connections() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let registration = register(
        &mut client,
        alb("alb-drain"),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    heartbeat(&mut client, "alb-drain", &registration, 3).await;

    let mut unregistering = client.clone();
    let reg = registration.clone();
    let drain = tokio::spawn(async move {
        unregistering
            .unregister_module(pb::UnregisterModuleRequest {
                instance_id: "alb-drain".into(),
                registration_id: reg,
                graceful: true,
                drain_timeout_seconds: 20,
            })
            .await
    });
    // While draining: STOPPING, and no new traffic is routed to it.
    eventually(
        "the instance shows STOPPING",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                let info = client
                    .get_module_info(pb::GetModuleInfoRequest {
                        instance_id: "alb-drain".into(),
                    })
                    .await;
                info.is_ok_and(|i| {
                    i.into_inner().instance.unwrap().health_status
                        == pb::HealthStatus::Stopping as i32
                })
            }
        },
    )
    .await;
    let routed = client
        .route_request(pb::RouteRequestRequest {
            route: Some(route("", pb::Protocol::Http, "", "", 0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !routed.routed,
        "a draining instance gets no new connections"
    );
    assert!(!drain.is_finished(), "the drain waits for open connections");

    // The module's connections finish; its heartbeats say so.
    heartbeat(&mut client, "alb-drain", &registration, 1).await;
    heartbeat(&mut client, "alb-drain", &registration, 0).await;
    let done = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drain ends once connections are gone");
    let done = done.unwrap().unwrap().into_inner();
    assert!(done.success);
    assert_eq!(done.active_connections_drained, 3);

    // A drain past its timeout reports what finished in time.
    let registration = register(&mut client, alb("alb-slow"), vec![]).await;
    heartbeat(&mut client, "alb-slow", &registration, 4).await;
    let timed_out = client
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "alb-slow".into(),
            registration_id: registration,
            graceful: true,
            drain_timeout_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(timed_out.active_connections_drained, 0);
    // A caller that gives up mid-drain does not leave the instance stuck: the drain finishes.
    let registration = register(&mut client, alb("alb-abandoned"), vec![]).await;
    heartbeat(&mut client, "alb-abandoned", &registration, 2).await;
    let mut impatient = pb::nlb_service_client::NlbServiceClient::new(nlb.channel().await);
    let mut request = tonic::Request::new(pb::UnregisterModuleRequest {
        instance_id: "alb-abandoned".into(),
        registration_id: registration,
        graceful: true,
        drain_timeout_seconds: 1,
    });
    request.set_timeout(Duration::from_millis(200));
    let gave_up = impatient.unregister_module(request).await.unwrap_err();
    assert!(
        matches!(gave_up.code(), Code::Cancelled | Code::DeadlineExceeded),
        "the caller's deadline passed: {gave_up:?}"
    );
    eventually(
        "the abandoned drain still removes the instance",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                client
                    .get_module_info(pb::GetModuleInfoRequest {
                        instance_id: "alb-abandoned".into(),
                    })
                    .await
                    .is_err_and(|s| s.code() == Code::NotFound)
            }
        },
    )
    .await;

    let bad = client
        .unregister_module(pb::UnregisterModuleRequest {
            instance_id: "x".into(),
            registration_id: "y".into(),
            graceful: true,
            drain_timeout_seconds: -5,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("drain_timeout_seconds"),
        "{}",
        bad.message()
    );
}

#[tokio::test]
async fn silent_modules_turn_unhealthy_then_expire() {
    let dir = state_dir();
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::local()
    };
    config.settings.heartbeat.unhealthy_after_ms = 300;
    config.settings.heartbeat.expire_after_ms = 1200;
    let nlb = start_with(config).await;
    let mut client = nlb.client().await;
    let quiet = register(
        &mut client,
        alb("quiet"),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    let chatty = register(
        &mut client,
        alb("chatty"),
        vec![route("web", pb::Protocol::Http, "", "", 0)],
    )
    .await;
    let _ = quiet;

    // Keep one module heartbeating while the other stays silent.
    let mut beating = client.clone();
    let keep_alive = tokio::spawn(async move {
        loop {
            heartbeat(&mut beating, "chatty", &chatty, 0).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let observer = client.clone();
    let health_of = |id: &'static str| {
        let mut client = observer.clone();
        async move {
            client
                .list_modules(pb::ListModulesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .modules
                .into_iter()
                .find(|m| m.instance_id == id)
                .map(|m| m.health_status)
        }
    };
    eventually(
        "the silent module is UNHEALTHY",
        Duration::from_secs(5),
        || async { health_of("quiet").await == Some(pb::HealthStatus::Unhealthy as i32) },
    )
    .await;
    for _ in 0..5 {
        let routed = client
            .route_request(pb::RouteRequestRequest {
                route: Some(route("", pb::Protocol::Http, "", "", 0)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            routed.target_instance_id, "chatty",
            "only the live module gets traffic"
        );
    }
    let unhealthy_only = client
        .list_modules(pb::ListModulesRequest {
            status_filter: pb::HealthStatus::Unhealthy as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unhealthy_only.modules.len(), 1);
    eventually(
        "the silent module is removed",
        Duration::from_secs(5),
        || async { health_of("quiet").await.is_none() },
    )
    .await;
    assert_eq!(
        health_of("chatty").await,
        Some(pb::HealthStatus::Healthy as i32)
    );
    let (code, metrics) = http_get(nlb.admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("nlb_liveness_events_total{event=\"removed\",module_type=\"alb\"} 1"),
        "{metrics}"
    );
    keep_alive.abort();
}

#[tokio::test]
async fn listing_filters_sorts_and_pages() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    for (id, kind) in [
        ("alb-a", pb::ModuleType::Alb),
        ("alb-b", pb::ModuleType::Alb),
        ("db-1", pb::ModuleType::Dblb),
        ("ai-1", pb::ModuleType::Ailb),
    ] {
        register(
            &mut client,
            instance(id, kind, "v1", "127.0.0.1:9000"),
            vec![],
        )
        .await;
    }
    let albs = client
        .list_modules(pb::ListModulesRequest {
            module_type_filter: pb::ModuleType::Alb as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(albs.total_modules, 2);

    let page = client
        .list_modules(pb::ListModulesRequest {
            query: Some(pb::Query {
                filters: vec![],
                sort_by: "instance_id".into(),
                sort_desc: true,
                pagination: Some(pb::Pagination {
                    page: 2,
                    page_size: 3,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = page
        .modules
        .iter()
        .map(|m| m.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["ai-1"]);
    let pagination = page.pagination.unwrap();
    assert_eq!((pagination.total_items, pagination.total_pages), (4, 2));

    let filtered = client
        .list_modules(pb::ListModulesRequest {
            query: Some(pb::Query {
                filters: vec![pb::Filter {
                    field: "module_type".into(),
                    operator: "in".into(),
                    value: "dblb,ailb".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.total_modules, 2);

    for bad in [
        pb::ListModulesRequest {
            module_type_filter: 42,
            ..Default::default()
        },
        pb::ListModulesRequest {
            status_filter: 42,
            ..Default::default()
        },
        pb::ListModulesRequest {
            query: Some(pb::Query {
                filters: vec![pb::Filter {
                    field: "colour".into(),
                    operator: "=".into(),
                    value: "red".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
        pb::ListModulesRequest {
            query: Some(pb::Query {
                pagination: Some(pb::Pagination {
                    page_size: -1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ] {
        let status = client.list_modules(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    let status = client
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
