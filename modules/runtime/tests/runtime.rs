//! The runtime with a real NLB, in-process: a module (the echo) registers, heartbeats carry its
//! live stats, all 22 ModuleService RPCs answer with real data and refuse bad input, a rate limit
//! set over gRPC holds on live traffic, the module re-registers after an NLB restart, and a
//! shutdown drains open connections before the module exits.

use std::{net::SocketAddr, time::Duration};

use marchproxy::{auth::AttachApiKey, names::ModuleKind, pb, status::failure_of};
use marchproxy_nlb::Config;
use marchproxy_runtime::{ListenSpec, Runtime, RuntimeConfig, RuntimeError, echo::EchoModule};
use marchproxy_testkit::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};
use tokio_stream::StreamExt;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

type ModuleClient =
    pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

const KEY: &str = "runtime-key";

struct TestModule {
    grpc: SocketAddr,
    admin: SocketAddr,
    data: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RuntimeError>>,
}

impl TestModule {
    async fn client(&self) -> ModuleClient {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::module_service_client::ModuleServiceClient::with_interceptor(
            channel,
            AttachApiKey::new(Some(KEY)).unwrap(),
        )
    }

    /// Triggers the shutdown (what SIGTERM does in a binary) without waiting.
    fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn module_config(nlb: &TestNlb, id: &str) -> RuntimeConfig {
    let mut config = RuntimeConfig::local(ModuleKind::Alb, id);
    config.nlb = Some(nlb.url());
    config.api_key = Some(KEY.into());
    config.heartbeat_interval = Duration::from_millis(100);
    config.drain_timeout = Duration::from_secs(10);
    config.listen = vec![ListenSpec::parse("tcp=127.0.0.1:0").unwrap()];
    config
}

async fn start_module(config: RuntimeConfig) -> TestModule {
    let runtime = Runtime::bind(EchoModule::new(ModuleKind::Alb), config)
        .await
        .expect("the module binds");
    let (grpc, admin, data) = (
        runtime.grpc_addr(),
        runtime.admin_addr(),
        runtime.data_addrs()[0],
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async move {
        let _ = stopped.await;
    }));
    TestModule {
        grpc,
        admin,
        data,
        stop: Some(stop),
        task,
    }
}

async fn start_nlb_with_key(dir: &tempfile::TempDir) -> TestNlb {
    start_with(Config {
        state_dir: Some(dir.path().to_owned()),
        api_key: Some(KEY.into()),
        ..Config::local()
    })
    .await
}

async fn registered(nlb: &TestNlb, id: &str) -> Option<pb::ModuleInstance> {
    let mut client = nlb.client().await;
    client
        .get_module_info(pb::GetModuleInfoRequest {
            instance_id: id.into(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().instance)
}

/// One echo round trip on an open connection.
async fn echo(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    text: &str,
) -> Option<String> {
    writer
        .write_all(format!("{text}\n").as_bytes())
        .await
        .ok()?;
    tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .ok()?
        .ok()?
}

async fn connect(
    addr: SocketAddr,
) -> (
    tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let (reader, writer) = TcpStream::connect(addr)
        .await
        .expect("the data plane accepts")
        .into_split();
    (BufReader::new(reader).lines(), writer)
}

#[tokio::test]
async fn registers_and_heartbeats_carry_live_stats() {
    let dir = state_dir();
    let nlb = start_nlb_with_key(&dir).await;
    let mut config = module_config(&nlb, "echo-1");
    config.routes = vec![
        serde_json::from_value(
            serde_json::json!({"route_id": "echo", "protocol": "tcp", "priority": 3}),
        )
        .unwrap(),
    ];
    let module = start_module(config).await;
    eventually("the module registers", Duration::from_secs(10), || async {
        registered(&nlb, "echo-1").await.is_some()
    })
    .await;
    assert_eq!(
        http_get(module.admin, "/readyz").await.0,
        200,
        "ready once registered"
    );
    let shown = registered(&nlb, "echo-1").await.unwrap();
    assert_eq!(shown.address, module.grpc.to_string());
    assert_eq!(shown.metadata["data_address"], module.data.to_string());
    assert_eq!(shown.metadata["data_address.tcp"], module.data.to_string());

    // The NLB routes TCP to the module's data address, from the route it registered.
    let mut nlb_client = nlb.client().await;
    let routed = nlb_client
        .route_request(pb::RouteRequestRequest {
            route: Some(pb::Route {
                protocol: pb::Protocol::Tcp as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            routed.target_instance_id.as_str(),
            routed.target_address.clone()
        ),
        ("echo-1", module.data.to_string())
    );

    let (mut lines, mut writer) = connect(module.data).await;
    for text in ["one", "two", "three"] {
        assert_eq!(
            echo(&mut lines, &mut writer, text).await.as_deref(),
            Some(text)
        );
    }
    eventually(
        "heartbeats bring the stats to the NLB",
        Duration::from_secs(10),
        || {
            let mut client = nlb_client.clone();
            async move {
                let info = client
                    .get_module_info(pb::GetModuleInfoRequest {
                        instance_id: "echo-1".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                info.stats.is_some_and(|s| {
                    s.total_requests == 3 && s.active_connections == 1 && s.bytes_sent > 0
                })
            }
        },
    )
    .await;
    let metrics = http_get(module.admin, "/metrics").await.1;
    assert!(metrics.contains("marchproxy_module_requests_total{instance=\"echo-1\",module_type=\"alb\",result=\"success\"} 3"), "{metrics}");
}

#[tokio::test]
async fn every_module_service_rpc_answers() {
    let dir = state_dir();
    let nlb = start_nlb_with_key(&dir).await;
    let config_file = dir.path().join("echo.toml");
    std::fs::write(
        &config_file,
        "[[routes]]\nroute_id = \"from-file\"\nprotocol = \"tcp\"\n[module]\nprefix = \"> \"\n",
    )
    .unwrap();
    // Flags and the file, as a module binary reads them.
    let args = marchproxy_runtime::CommonArgs {
        config: Some(config_file.clone()),
        nlb: Some(nlb.url()),
        api_key: Some(KEY.into()),
        instance_id: Some("echo-rpc".into()),
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        listen: vec!["tcp=127.0.0.1:0".into()],
        heartbeat_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let module = start_module(RuntimeConfig::from_args(ModuleKind::Alb, args).unwrap()).await;
    eventually("the module registers", Duration::from_secs(10), || async {
        registered(&nlb, "echo-rpc").await.is_some()
    })
    .await;
    let mut client = module.client().await;

    // GetStatus, and requests naming another instance.
    let status = client
        .get_status(pb::GetStatusRequest {
            instance_id: "echo-rpc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, pb::HealthStatus::Healthy as i32);
    assert_eq!(status.instance.unwrap().instance_id, "echo-rpc");
    assert_eq!(status.details["registered"], "true");
    let other = client
        .get_status(pb::GetStatusRequest {
            instance_id: "someone-else".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);

    // CanHandle, delegated to the module.
    let tcp = client
        .can_handle(pb::CanHandleRequest {
            route: Some(pb::Route {
                protocol: pb::Protocol::Tcp as i32,
                ..Default::default()
            }),
            context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tcp.can_handle);
    let rtmp = client
        .can_handle(pb::CanHandleRequest {
            route: Some(pb::Route {
                protocol: pb::Protocol::Rtmp as i32,
                ..Default::default()
            }),
            context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!rtmp.can_handle);
    assert_eq!(
        client
            .can_handle(pb::CanHandleRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Routes: update (relayed to the NLB), page, delete, refuse bad ones whole.
    let route = |id: &str| pb::Route {
        route_id: id.into(),
        protocol: pb::Protocol::Tcp as i32,
        ..Default::default()
    };
    let updated = client
        .update_routes(pb::UpdateRoutesRequest {
            instance_id: String::new(),
            routes: vec![route("a"), route("b"), route("c")],
            replace_all: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.routes_updated, 3);
    let page = client
        .get_routes(pb::GetRoutesRequest {
            instance_id: String::new(),
            query: Some(pb::Query {
                sort_by: "route_id".into(),
                sort_desc: true,
                pagination: Some(pb::Pagination {
                    page: 1,
                    page_size: 2,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.routes
            .iter()
            .map(|r| r.route_id.as_str())
            .collect::<Vec<_>>(),
        ["c", "b"]
    );
    assert_eq!(page.total_routes, 3);
    let mut nlb_client = nlb.client().await;
    let table = nlb_client
        .get_routing_table(pb::GetRoutingTableRequest {
            destination_filter: "echo-rpc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(table.total_entries, 3, "routes are relayed to the NLB");
    let mut bad = route("d");
    bad.source_pattern = "10.0.0.0/99".into();
    let refused = client
        .update_routes(pb::UpdateRoutesRequest {
            instance_id: String::new(),
            routes: vec![route("d"), bad],
            replace_all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("routes[1]"),
        "{}",
        refused.message()
    );
    assert!(failure_of::<pb::UpdateRoutesResponse>(&refused).is_some_and(|b| !b.success));
    assert_eq!(
        client
            .get_routes(pb::GetRoutesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .total_routes,
        3,
        "nothing half-applied"
    );
    assert!(
        client
            .delete_route(pb::DeleteRouteRequest {
                instance_id: String::new(),
                route_id: "a".into()
            })
            .await
            .unwrap()
            .into_inner()
            .success
    );
    let missing = client
        .delete_route(pb::DeleteRouteRequest {
            instance_id: String::new(),
            route_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        client
            .delete_route(pb::DeleteRouteRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Rate limits.
    let limit = pb::RateLimit {
        limit_id: "l1".into(),
        target: "10.0.0.0/8".into(),
        requests_per_second: 5,
        burst_size: 10,
        enabled: true,
        ..Default::default()
    };
    assert!(
        client
            .set_rate_limit(pb::SetRateLimitRequest {
                instance_id: String::new(),
                limit: Some(limit)
            })
            .await
            .unwrap()
            .into_inner()
            .success
    );
    let limits = client
        .get_rate_limits(pb::GetRateLimitsRequest {
            instance_id: String::new(),
            target: "10.0.0.0/8".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limits.total_limits, 1);
    assert_eq!(limits.limits[0].burst_size, 10);
    for bad in [
        pb::RateLimit {
            target: "*".into(),
            requests_per_second: -1,
            ..Default::default()
        },
        pb::RateLimit {
            target: "nonsense".into(),
            requests_per_second: 1,
            ..Default::default()
        },
        pb::RateLimit {
            target: "*".into(),
            ..Default::default()
        },
    ] {
        let status = client
            .set_rate_limit(pb::SetRateLimitRequest {
                instance_id: String::new(),
                limit: Some(bad),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    assert_eq!(
        client
            .set_rate_limit(pb::SetRateLimitRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert!(
        client
            .remove_rate_limit(pb::RemoveRateLimitRequest {
                instance_id: String::new(),
                limit_id: "l1".into()
            })
            .await
            .unwrap()
            .into_inner()
            .success
    );
    let gone = client
        .remove_rate_limit(pb::RemoveRateLimitRequest {
            instance_id: String::new(),
            limit_id: "l1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Traffic, then metrics, stats (with reset) and the metrics stream.
    let (mut lines, mut writer) = connect(module.data).await;
    assert_eq!(
        echo(&mut lines, &mut writer, "hi").await.as_deref(),
        Some("> hi"),
        "the [module] prefix from the file applies"
    );
    let metrics = client
        .get_metrics(pb::GetMetricsRequest {
            instance_id: String::new(),
            metric_names: vec!["total_requests".into(), "echo_lines".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    let value = |name: &str| {
        metrics
            .metrics
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value)
    };
    assert_eq!(value("total_requests"), Some(1.0));
    assert_eq!(value("echo_lines"), Some(1.0));
    let stats = client
        .get_stats(pb::GetStatsRequest {
            instance_id: String::new(),
            reset_counters: true,
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(
        (
            stats.total_requests,
            stats.successful_requests,
            stats.active_connections
        ),
        (1, 1, 1)
    );
    assert!(stats.p99_latency_ms > 0.0 && stats.memory_usage_mb > 0.0);
    let after = client
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(
        after.total_requests, 0,
        "reset_counters starts a new window"
    );
    assert_eq!(
        after.active_connections, 1,
        "live connections are not a counter"
    );
    let mut stream = client
        .stream_metrics(pb::StreamMetricsRequest {
            instance_id: String::new(),
            interval_seconds: 1,
            metric_names: vec!["active_connections".into()],
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(message.metrics.unwrap().metrics[0].value, 1.0);
    }
    assert_eq!(
        client
            .stream_metrics(pb::StreamMetricsRequest {
                interval_seconds: -3,
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Health, shallow and deep.
    let health = client
        .health_check(pb::HealthCheckRequest {
            instance_id: String::new(),
            deep_check: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, pb::HealthStatus::Healthy as i32);
    assert_eq!(health.checks["echo"], "1 lines answered");

    // Config: runtime and module sections, validate_only, bad input.
    let configs = client
        .get_config(pb::GetConfigRequest::default())
        .await
        .unwrap()
        .into_inner();
    let types: Vec<_> = configs
        .configs
        .iter()
        .map(|c| c.config_type.as_str())
        .collect();
    assert_eq!(types, ["module", "runtime"]);
    let update = |config_type: &str, data: &str, validate_only: bool| pb::UpdateConfigRequest {
        instance_id: String::new(),
        config: Some(pb::ConfigUpdate {
            config_type: config_type.into(),
            config_data: data.as_bytes().to_vec(),
            ..Default::default()
        }),
        validate_only,
    };
    let checked = client
        .update_config(update("module", r#"{"prefix": "<< "}"#, true))
        .await
        .unwrap()
        .into_inner();
    assert!(checked.validation_passed);
    assert_eq!(
        echo(&mut lines, &mut writer, "x").await.as_deref(),
        Some("> x"),
        "validate_only changed nothing"
    );
    assert!(
        client
            .update_config(update("module", r#"{"prefix": "<< "}"#, false))
            .await
            .unwrap()
            .into_inner()
            .success
    );
    assert_eq!(
        echo(&mut lines, &mut writer, "x").await.as_deref(),
        Some("<< x")
    );
    let checked = client
        .update_config(update("runtime", r#"{"heartbeat_interval_ms": -5}"#, true))
        .await
        .unwrap()
        .into_inner();
    assert!(!checked.validation_passed && !checked.validation_errors.is_empty());
    for (config_type, data, expected) in [
        ("module", r#"{"prefix": 5}"#, "module"),
        ("module", r#"{"colour": "red"}"#, "colour"),
        (
            "runtime",
            r#"{"heartbeat_interval_ms": 1}"#,
            "heartbeat_interval_ms",
        ),
        ("weather", "{}", "unknown config_type"),
        ("module", "not json", "not JSON"),
    ] {
        let status = client
            .update_config(update(config_type, data, false))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(expected),
            "`{}` should mention `{expected}`",
            status.message()
        );
        assert!(failure_of::<pb::UpdateConfigResponse>(&status).is_some());
    }
    assert_eq!(
        client
            .get_config(pb::GetConfigRequest {
                instance_id: String::new(),
                config_type: "weather".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Reload re-reads the file: its routes and its [module] section.
    std::fs::write(
        &config_file,
        "[[routes]]\nroute_id = \"reloaded\"\nprotocol = \"tcp\"\n[module]\nprefix = \"re: \"\n",
    )
    .unwrap();
    let reloaded = client
        .reload(pb::ReloadRequest {
            instance_id: String::new(),
            graceful: true,
            timeout_seconds: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reloaded.success, "{}", reloaded.message);
    let routes = client
        .get_routes(pb::GetRoutesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        routes
            .routes
            .iter()
            .map(|r| r.route_id.as_str())
            .collect::<Vec<_>>(),
        ["reloaded"]
    );
    assert_eq!(
        echo(&mut lines, &mut writer, "y").await.as_deref(),
        Some("re: y")
    );
    std::fs::write(&config_file, "[module]\nprefix = 7\n").unwrap();
    let broken = client
        .reload(pb::ReloadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(broken.code(), Code::InvalidArgument);
    assert_eq!(
        echo(&mut lines, &mut writer, "z").await.as_deref(),
        Some("re: z"),
        "a broken file changes nothing"
    );

    // Relayed to the NLB: instances and scaling.
    let instances = client
        .get_instances(pb::GetInstancesRequest {
            module_type: pb::ModuleType::Alb as i32,
            status_filter: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        instances
            .instances
            .iter()
            .map(|i| i.instance_id.as_str())
            .collect::<Vec<_>>(),
        ["echo-rpc"]
    );
    let scaled = client
        .scale(pb::ScaleRequest {
            instance_id: String::new(),
            config: Some(pb::ScalingConfig {
                min_instances: 2,
                max_instances: 4,
                ..Default::default()
            }),
            immediate: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(scaled.success, "{}", scaled.message);
    assert_eq!((scaled.current_instances, scaled.desired_instances), (1, 2));
    assert_eq!(
        client
            .scale(pb::ScaleRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Blue/green calls are relayed to the NLB, which owns that state, and its answer returned.
    let active = client
        .get_active_version(pb::GetActiveVersionRequest::default())
        .await
        .expect("relayed to the NLB")
        .into_inner();
    assert_eq!(active.active_version, "v1");
    assert_eq!(active.version_weights["v1"], 100);
    let refused = client
        .set_traffic_weight(pb::SetTrafficWeightRequest {
            instance_id: String::new(),
            version: "v1".into(),
            weight: 50,
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().starts_with("NLB: ") && refused.message().contains("only version"),
        "{refused:?}"
    );
    let rollback = client
        .rollback(pb::RollbackRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        rollback.code(),
        Code::InvalidArgument,
        "no previous version yet: {rollback:?}"
    );
    let promoted = client
        .promote_version(pb::PromoteVersionRequest {
            instance_id: String::new(),
            version: "v1".into(),
            immediate: true,
            promotion_rate: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(promoted.success);

    // The NLB's ModuleService forwards calls that name this instance.
    let mut gateway = pb::module_service_client::ModuleServiceClient::with_interceptor(
        nlb.channel().await,
        AttachApiKey::new(Some(KEY)).unwrap(),
    );
    let through_nlb = gateway
        .get_status(pb::GetStatusRequest {
            instance_id: "echo-rpc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(through_nlb.instance.unwrap().instance_id, "echo-rpc");

    // Shutdown over gRPC: answered, then the module drains and exits.
    drop((lines, writer));
    let bye = client
        .shutdown(pb::ShutdownRequest {
            instance_id: String::new(),
            graceful: true,
            timeout_seconds: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(bye.success);
    tokio::time::timeout(Duration::from_secs(15), module.task)
        .await
        .expect("the module exits after Shutdown")
        .unwrap()
        .unwrap();
    eventually(
        "the module unregistered",
        Duration::from_secs(5),
        || async { registered(&nlb, "echo-rpc").await.is_none() },
    )
    .await;
}

#[tokio::test]
async fn a_rate_limit_set_over_grpc_holds_on_live_traffic() {
    let dir = state_dir();
    let nlb = start_nlb_with_key(&dir).await;
    let module = start_module(module_config(&nlb, "echo-limited")).await;
    let mut client = module.client().await;
    let limit = pb::RateLimit {
        limit_id: "loopback".into(),
        target: "127.0.0.1".into(),
        requests_per_second: 1,
        burst_size: 2,
        enabled: true,
        ..Default::default()
    };
    client
        .set_rate_limit(pb::SetRateLimitRequest {
            instance_id: String::new(),
            limit: Some(limit),
        })
        .await
        .unwrap();

    let mut served = 0;
    let mut refused = 0;
    for _ in 0..4 {
        let (mut lines, mut writer) = connect(module.data).await;
        match echo(&mut lines, &mut writer, "ping").await {
            Some(reply) => {
                assert_eq!(reply, "ping");
                served += 1;
            }
            None => refused += 1,
        }
    }
    assert_eq!(
        (served, refused),
        (2, 2),
        "a burst of 2, then refused at once"
    );
    let metrics = http_get(module.admin, "/metrics").await.1;
    assert!(
        metrics.contains(
            "marchproxy_module_rate_limited_total{instance=\"echo-limited\",module_type=\"alb\"} 2"
        ),
        "{metrics}"
    );

    client
        .remove_rate_limit(pb::RemoveRateLimitRequest {
            instance_id: String::new(),
            limit_id: "loopback".into(),
        })
        .await
        .unwrap();
    let (mut lines, mut writer) = connect(module.data).await;
    assert_eq!(
        echo(&mut lines, &mut writer, "again").await.as_deref(),
        Some("again")
    );
}

#[tokio::test]
async fn the_module_registers_again_after_the_nlb_restarts() {
    let dir = state_dir();
    let nlb = start_nlb_with_key(&dir).await;
    let port = nlb.grpc.port();
    let module = start_module(module_config(&nlb, "echo-loyal")).await;
    eventually("the module registers", Duration::from_secs(10), || async {
        registered(&nlb, "echo-loyal").await.is_some()
    })
    .await;
    nlb.stop().await;

    // The same address, a fresh NLB that has never heard of the module.
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        api_key: Some(KEY.into()),
        ..Config::local()
    };
    config.grpc_listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = marchproxy_nlb::Server::bind(config)
        .await
        .expect("the port is free again");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = pb::nlb_service_client::NlbServiceClient::with_interceptor(
        channel,
        AttachApiKey::new(Some(KEY)).unwrap(),
    );
    eventually(
        "the module registers with the new NLB by itself",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            async move {
                client
                    .get_module_info(pb::GetModuleInfoRequest {
                        instance_id: "echo-loyal".into(),
                    })
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    let _ = module.admin;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_drains_open_connections_before_exit() {
    let dir = state_dir();
    let nlb = start_nlb_with_key(&dir).await;
    let mut module = start_module(module_config(&nlb, "echo-drain")).await;
    eventually("the module registers", Duration::from_secs(10), || async {
        registered(&nlb, "echo-drain").await.is_some()
    })
    .await;
    let (mut lines, mut writer) = connect(module.data).await;
    assert_eq!(
        echo(&mut lines, &mut writer, "before").await.as_deref(),
        Some("before")
    );

    module.begin_shutdown();
    eventually(
        "the NLB sees the module draining",
        Duration::from_secs(5),
        || async {
            registered(&nlb, "echo-drain")
                .await
                .is_some_and(|i| i.health_status == pb::HealthStatus::Stopping as i32)
        },
    )
    .await;
    assert_eq!(
        http_get(module.admin, "/readyz").await.0,
        503,
        "not ready while draining"
    );
    // New connections are no longer accepted; the open one still works.
    eventually(
        "the listener stops accepting",
        Duration::from_secs(5),
        || async {
            match TcpStream::connect(module.data).await {
                Err(_) => true,
                Ok(mut stream) => {
                    let _ = stream.write_all(b"new\n").await;
                    let mut buf = [0u8; 8];
                    matches!(
                        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf))
                            .await,
                        Ok(Ok(0)) | Ok(Err(_))
                    )
                }
            }
        },
    )
    .await;
    assert_eq!(
        echo(&mut lines, &mut writer, "during").await.as_deref(),
        Some("during"),
        "open connections keep working"
    );
    assert!(
        !module.task.is_finished(),
        "the module waits for its open connection"
    );

    drop((lines, writer));
    let exited = tokio::time::timeout(Duration::from_secs(10), module.task)
        .await
        .expect("exits once the connection closed");
    exited.unwrap().expect("a clean exit");
    eventually(
        "the module unregistered",
        Duration::from_secs(5),
        || async { registered(&nlb, "echo-drain").await.is_none() },
    )
    .await;
}
