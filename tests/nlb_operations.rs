//! Operating the NLB over gRPC and HTTP: metrics (reported, aggregated, streamed), health with
//! module checks, status, live config sections, load distribution and rebalancing, scaling with a
//! real hook command, persistence across a restart, the cluster API key, health and reflection,
//! and the admin endpoints.

use std::time::Duration;

use marchproxy::{pb, status::failure_of};
use marchproxy_nlb::Config;
use marchproxy_testkit::*;
use tokio_stream::StreamExt;
use tonic::Code;

fn point(name: &str, value: f64) -> pb::MetricDataPoint {
    pb::MetricDataPoint {
        name: name.into(),
        value,
        ..Default::default()
    }
}

fn config_update(section: &str, json: &str) -> pb::ConfigUpdate {
    pb::ConfigUpdate {
        config_type: section.into(),
        config_data: json.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_are_reported_aggregated_and_streamed() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let one = register(
        &mut client,
        instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:1"),
        vec![],
    )
    .await;
    register(
        &mut client,
        instance("alb-2", pb::ModuleType::Alb, "v1", "127.0.0.1:2"),
        vec![],
    )
    .await;
    heartbeat(&mut client, "alb-1", &one, 4).await;
    for (id, value) in [("alb-1", 10.0), ("alb-2", 32.0)] {
        let ack = client
            .report_metrics(pb::ReportMetricsRequest {
                instance_id: id.into(),
                metrics: Some(pb::ModuleMetrics {
                    metrics: vec![point("http_requests", value), point("cache_hits", 1.0)],
                    ..Default::default()
                }),
                reported_at: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(ack.acknowledged);
    }
    let module = client
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            metric_names: vec!["http_requests".into(), "active_connections".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    let value = |name: &str| {
        module
            .metrics
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value)
    };
    assert_eq!(value("http_requests"), Some(10.0));
    assert_eq!(
        value("active_connections"),
        Some(4.0),
        "heartbeat stats appear as metrics"
    );
    assert_eq!(module.metrics.len(), 2, "only the asked names");

    // A time range in the past excludes everything.
    let past = prost_types::Timestamp {
        seconds: 1_000,
        nanos: 0,
    };
    let old = client
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "alb-1".into(),
            end_time: Some(past),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(old.metrics.unwrap().metrics.is_empty());

    let all = client
        .get_nlb_metrics(pb::GetNlbMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.module_metrics.len(), 2);
    assert!(
        all.metrics
            .iter()
            .any(|p| p.name == "nlb_registered_modules" && p.labels.is_empty() && p.value == 2.0)
    );
    let summed = client
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            metric_names: vec!["http_requests".into()],
            aggregate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let total = summed
        .metrics
        .iter()
        .find(|p| p.name == "modules.http_requests")
        .expect("aggregated point");
    assert_eq!(total.value, 42.0);
    assert_eq!(total.labels["module_type"], "alb");
    assert!(summed.module_metrics.is_empty());

    let mut stream = client
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            interval_seconds: 1,
            metric_names: vec![],
            include_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("a message each second")
            .unwrap()
            .unwrap();
        assert!(
            message
                .metrics
                .iter()
                .any(|p| p.name == "nlb_uptime_seconds")
        );
        assert_eq!(message.module_metrics.len(), 2);
    }

    // Bad input.
    let unknown = client
        .report_metrics(pb::ReportMetricsRequest {
            instance_id: "ghost".into(),
            metrics: Some(pb::ModuleMetrics::default()),
            reported_at: None,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    for bad in [
        pb::ReportMetricsRequest {
            instance_id: "alb-1".into(),
            metrics: None,
            reported_at: None,
        },
        pb::ReportMetricsRequest {
            instance_id: "alb-1".into(),
            metrics: Some(pb::ModuleMetrics {
                metrics: vec![point("", 1.0)],
                ..Default::default()
            }),
            reported_at: None,
        },
        pb::ReportMetricsRequest {
            instance_id: "alb-1".into(),
            metrics: Some(pb::ModuleMetrics {
                metrics: vec![point("x", f64::NAN)],
                ..Default::default()
            }),
            reported_at: None,
        },
        pb::ReportMetricsRequest {
            instance_id: "alb-1".into(),
            metrics: Some(pb::ModuleMetrics {
                instance_id: "alb-2".into(),
                ..Default::default()
            }),
            reported_at: None,
        },
    ] {
        assert_eq!(
            client.report_metrics(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    let status = client
        .stream_nlb_metrics(pb::StreamNlbMetricsRequest {
            interval_seconds: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .get_nlb_metrics(pb::GetNlbMetricsRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: 2_000,
                nanos: 0,
            }),
            end_time: Some(past),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .get_module_metrics(pb::GetModuleMetricsRequest {
            instance_id: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn health_checks_reach_the_modules() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let healthy = fake_module::serve(vec![pb::Protocol::Http], pb::HealthStatus::Healthy).await;
    let degraded = fake_module::serve(vec![pb::Protocol::Http], pb::HealthStatus::Degraded).await;
    let mut live = instance("alb-ok", pb::ModuleType::Alb, "v1", "127.0.0.1:1");
    live.address = healthy.to_string();
    register(&mut client, live, vec![]).await;

    let shallow = client
        .check_health(pb::CheckHealthRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shallow.status, pb::HealthStatus::Healthy as i32);
    let deep = client
        .check_health(pb::CheckHealthRequest {
            deep_check: true,
            check_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        deep.status,
        pb::HealthStatus::Healthy as i32,
        "{}",
        deep.message
    );
    assert_eq!(deep.checks["state_dir"], "writable");
    assert_eq!(deep.checks["module.alb-ok"], "double says healthy");
    assert_eq!(
        deep.module_health["alb-ok"],
        pb::HealthStatus::Healthy as i32
    );

    let mut slow = instance("alb-degraded", pb::ModuleType::Alb, "v1", "127.0.0.1:1");
    slow.address = degraded.to_string();
    register(&mut client, slow, vec![]).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut gone = instance("alb-gone", pb::ModuleType::Alb, "v1", "127.0.0.1:1");
    gone.address = closed.to_string();
    register(&mut client, gone, vec![]).await;
    let checked = client
        .check_health(pb::CheckHealthRequest {
            deep_check: false,
            check_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        checked.module_health["alb-degraded"],
        pb::HealthStatus::Degraded as i32
    );
    assert_eq!(
        checked.module_health["alb-gone"],
        pb::HealthStatus::Unhealthy as i32
    );
    assert!(
        checked.checks["module.alb-gone"].contains("cannot reach"),
        "{:?}",
        checked.checks
    );
    assert_eq!(checked.status, pb::HealthStatus::Degraded as i32);

    let status = client
        .get_nlb_status(pb::GetNlbStatusRequest {
            include_modules: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.registered_modules, 3);
    assert_eq!(status.modules_by_type["alb"], 3);
    assert_eq!(status.modules.len(), 3);
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert!(status.started_at.is_some());
    let without = client
        .get_nlb_status(pb::GetNlbStatusRequest {
            include_modules: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(without.modules.is_empty());
}

#[tokio::test]
async fn config_sections_validate_apply_and_persist() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;

    let all = client
        .get_nlb_config(pb::GetNlbConfigRequest::default())
        .await
        .unwrap()
        .into_inner();
    let types: Vec<_> = all.configs.iter().map(|c| c.config_type.as_str()).collect();
    assert_eq!(types, ["heartbeat", "scaling", "balancing", "rollout"]);

    // validate_only: both outcomes, nothing changes.
    let mut request = pb::UpdateNlbConfigRequest {
        config: Some(config_update(
            "heartbeat",
            r#"{"unhealthy_after_ms": 400, "expire_after_ms": 800}"#,
        )),
        validate_only: true,
        restart_required: false,
    };
    let checked = client
        .update_nlb_config(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(checked.success && checked.validation_passed);
    let still = client
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: "heartbeat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let data: serde_json::Value = serde_json::from_slice(&still.configs[0].config_data).unwrap();
    assert_eq!(data["unhealthy_after_ms"], 30000);

    let invalid = pb::UpdateNlbConfigRequest {
        config: Some(config_update(
            "heartbeat",
            r#"{"unhealthy_after_ms": "soon"}"#,
        )),
        validate_only: true,
        restart_required: false,
    };
    let checked = client
        .update_nlb_config(invalid.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!checked.validation_passed);
    assert!(
        checked.validation_errors[0].contains("heartbeat.unhealthy_after_ms"),
        "{:?}",
        checked.validation_errors
    );

    // Each kind of bad config is refused with the field named and nothing applied.
    for (section, data, expected) in [
        (
            "heartbeat",
            r#"{"unhealthy_after_ms": "soon"}"#,
            "heartbeat.unhealthy_after_ms",
        ),
        ("heartbeat", r#"{"expire_after_ms": 5}"#, "expire_after_ms"),
        ("scaling", r#"{"comand": "true"}"#, "comand"),
        (
            "balancing",
            r#"{"strategy": "fastest"}"#,
            "balancing.strategy",
        ),
        ("colour", r#"{}"#, "unknown config_type"),
        ("heartbeat", "{garbage", "not JSON"),
        ("heartbeat", "[1,2]", "JSON object"),
    ] {
        let status = client
            .update_nlb_config(pb::UpdateNlbConfigRequest {
                config: Some(config_update(section, data)),
                validate_only: false,
                restart_required: false,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(expected),
            "`{}` should name `{expected}`",
            status.message()
        );
        let body: pb::UpdateNlbConfigResponse = failure_of(&status).unwrap();
        assert!(!body.validation_passed && !body.validation_errors.is_empty());
    }
    let mut wrong_sum = config_update("balancing", r#"{"strategy": "round_robin"}"#);
    wrong_sum.checksum = "00".into();
    let status = client
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(wrong_sum),
            validate_only: false,
            restart_required: false,
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("checksum"));
    assert_eq!(
        client
            .update_nlb_config(pb::UpdateNlbConfigRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client
            .get_nlb_config(pb::GetNlbConfigRequest {
                config_type: "colour".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Applied for real, with an effect: a silent module now expires within a second.
    request.validate_only = false;
    let applied = client
        .update_nlb_config(request)
        .await
        .unwrap()
        .into_inner();
    assert!(applied.success && !applied.requires_restart);
    register(
        &mut client,
        instance("quiet", pb::ModuleType::Alb, "v1", "127.0.0.1:1"),
        vec![],
    )
    .await;
    eventually(
        "the module expires under the new heartbeat timeouts",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            async move {
                client
                    .list_modules(pb::ListModulesRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .total_modules
                    == 0
            }
        },
    )
    .await;
    let heartbeat_section = client
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: "heartbeat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(heartbeat_section.configs[0].metadata["source"], "api");

    // The section survives a restart.
    nlb.stop().await;
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let back = client
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: "heartbeat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let data: serde_json::Value = serde_json::from_slice(&back.configs[0].config_data).unwrap();
    assert_eq!(data["unhealthy_after_ms"], 400);
    assert_eq!(data["expire_after_ms"], 800);
}

#[tokio::test]
async fn flags_govern_the_keys_the_api_never_set() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    client
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(config_update("heartbeat", r#"{"expire_after_ms": 600000}"#)),
            ..Default::default()
        })
        .await
        .unwrap();
    nlb.stop().await;

    // Restarted with another --unhealthy-after: the flag applies, the API's key is kept.
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::local()
    };
    config.settings.heartbeat.unhealthy_after_ms = 5000;
    let nlb = start_with(config).await;
    let mut client = nlb.client().await;
    let section = client
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: "heartbeat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let data: serde_json::Value = serde_json::from_slice(&section.configs[0].config_data).unwrap();
    assert_eq!(data["unhealthy_after_ms"], 5000);
    assert_eq!(data["expire_after_ms"], 600000);
    assert_eq!(section.configs[0].metadata["api_keys"], "expire_after_ms");
}

#[tokio::test]
async fn load_distribution_and_rebalancing() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let busy = register(
        &mut client,
        instance("alb-busy", pb::ModuleType::Alb, "v1", "127.0.0.1:1"),
        vec![],
    )
    .await;
    let idle = register(
        &mut client,
        instance("alb-idle", pb::ModuleType::Alb, "v1", "127.0.0.1:2"),
        vec![],
    )
    .await;
    register(
        &mut client,
        instance("db-1", pb::ModuleType::Dblb, "v1", "127.0.0.1:3"),
        vec![],
    )
    .await;
    heartbeat(&mut client, "alb-busy", &busy, 90).await;
    heartbeat(&mut client, "alb-idle", &idle, 10).await;

    let load = client
        .get_load_distribution(pb::GetLoadDistributionRequest {
            module_type_filter: pb::ModuleType::Alb as i32,
            include_historical: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(load.distribution.len(), 2);
    assert_eq!(load.distribution["alb-busy"].active_connections, 90);
    assert_eq!(
        load.distribution["alb-busy"].load_score, 90.0,
        "90 of max 100 connections"
    );
    assert!(
        load.balance_score < 0.7,
        "90/10 is unbalanced: {}",
        load.balance_score
    );

    let rebalanced = client
        .rebalance_load(pb::RebalanceLoadRequest {
            force: false,
            target_instances: vec!["alb-busy".into(), "alb-idle".into()],
            strategy: "round_robin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rebalanced.success);
    assert_eq!(rebalanced.previous_distribution["alb-busy"], 90);
    assert_eq!(rebalanced.new_distribution["alb-busy"], 50);
    assert_eq!(rebalanced.new_distribution["alb-idle"], 50);
    let told = heartbeat(&mut client, "alb-busy", &busy, 90).await;
    assert_eq!(told.instructions["action"], "rebalance");
    assert_eq!(told.instructions["shed_connections"], "40");
    assert!(
        !heartbeat(&mut client, "alb-busy", &busy, 50)
            .await
            .instructions
            .contains_key("action"),
        "told once"
    );
    let balancing = client
        .get_nlb_config(pb::GetNlbConfigRequest {
            config_type: "balancing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8_lossy(&balancing.configs[0].config_data).contains("round_robin"));

    let historical = client
        .get_load_distribution(pb::GetLoadDistributionRequest {
            module_type_filter: 0,
            include_historical: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(historical.distribution.len(), 3);
    assert_eq!(
        historical.distribution["alb-busy"].active_connections, 77,
        "mean of 90, 90 and 50"
    );

    let status = client
        .rebalance_load(pb::RebalanceLoadRequest {
            strategy: "fastest".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .rebalance_load(pb::RebalanceLoadRequest {
            target_instances: vec!["ghost".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(failure_of::<pb::RebalanceLoadResponse>(&status).is_some());
    let status = client
        .get_load_distribution(pb::GetLoadDistributionRequest {
            module_type_filter: 77,
            include_historical: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn scaling_records_tells_modules_and_runs_the_hook() {
    let dir = state_dir();
    let hook_log = dir.path().join("hook.log");
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::local()
    };
    config.settings.scaling.command = format!(
        "echo \"$MARCHPROXY_MODULE_TYPE $MARCHPROXY_SCALING_ACTION $MARCHPROXY_CURRENT_INSTANCES $MARCHPROXY_DESIRED_INSTANCES\" >> {}; echo started",
        hook_log.display()
    );
    let nlb = start_with(config).await;
    let mut client = nlb.client().await;
    let one = register(
        &mut client,
        instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:1"),
        vec![],
    )
    .await;
    let scaled = client
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "alb-1".into(),
            scaling_action: "scale-up".into(),
            target_instances: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(scaled.success, "{}", scaled.message);
    assert_eq!((scaled.current_instances, scaled.target_instances), (1, 3));
    assert!(scaled.message.contains("started"), "{}", scaled.message);
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap(),
        "alb scale-up 1 3\n"
    );
    let told = heartbeat(&mut client, "alb-1", &one, 0).await;
    assert!(told.should_scale);
    assert_eq!(told.instructions["desired_instances"], "3");

    // auto: 250 connections at 100 per instance need 3; already asked for, so nothing to tell
    // once they are there.
    heartbeat(&mut client, "alb-1", &one, 250).await;
    let auto = client
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Alb as i32,
            scaling_action: "auto".into(),
            config: Some(pb::ScalingConfig {
                target_connections: 100,
                max_instances: 5,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(auto.target_instances, 3);

    // A cooldown refuses a change too soon after the last one.
    let status = client
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Alb as i32,
            scaling_action: "scale-down".into(),
            config: Some(pb::ScalingConfig {
                cooldown_seconds: 600,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(failure_of::<pb::TriggerScalingResponse>(&status).is_some());

    for bad in [
        pb::TriggerScalingRequest {
            scaling_action: "scale-up".into(),
            ..Default::default()
        },
        pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Alb as i32,
            scaling_action: "sideways".into(),
            ..Default::default()
        },
        pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Alb as i32,
            scaling_action: "scale-up".into(),
            target_instances: -2,
            ..Default::default()
        },
        pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Dblb as i32,
            instance_id: "alb-1".into(),
            scaling_action: "scale-up".into(),
            ..Default::default()
        },
        pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Dblb as i32,
            scaling_action: "auto".into(),
            config: Some(pb::ScalingConfig {
                min_instances: 5,
                max_instances: 2,
                ..Default::default()
            }),
            ..Default::default()
        },
    ] {
        let status = client.trigger_scaling(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    let status = client
        .trigger_scaling(pb::TriggerScalingRequest {
            instance_id: "ghost".into(),
            scaling_action: "scale-up".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Commands come from the NLB's own flags, never from an API caller.
    let refused = client
        .update_nlb_config(pb::UpdateNlbConfigRequest {
            config: Some(config_update(
                "scaling",
                r#"{"command": "touch /tmp/pwned"}"#,
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("--scaler-command"),
        "{}",
        refused.message()
    );
    nlb.stop().await;

    // A failing hook is reported; the desired count is still recorded for heartbeats.
    let mut config = Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::local()
    };
    config.settings.scaling.command = "echo out of capacity >&2; exit 2".into();
    let nlb = start_with(config).await;
    let mut client = nlb.client().await;
    let failed = client
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Dblb as i32,
            scaling_action: "scale-up".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!failed.success);
    assert!(
        failed.message.contains("out of capacity"),
        "{}",
        failed.message
    );
    assert_eq!(failed.target_instances, 1);
    let metrics = http_get(nlb.admin, "/metrics").await.1;
    assert!(
        metrics.contains("nlb_desired_instances{module_type=\"dblb\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("result=\"hook_failed\"} 1"), "{metrics}");
}

#[tokio::test]
async fn operator_state_survives_a_restart() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    client
        .update_routing(pb::UpdateRoutingRequest {
            routes: vec![
                route("web", pb::Protocol::Http, "*.example.com", "alb", 7),
                route("pg", pb::Protocol::Postgres, "10.0.0.0/8", "dblb", 1),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .trigger_scaling(pb::TriggerScalingRequest {
            module_type: pb::ModuleType::Rtmp as i32,
            scaling_action: "scale-up".into(),
            target_instances: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    nlb.stop().await;

    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    let table = client
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut routes: Vec<_> = table
        .entries
        .iter()
        .map(|e| e.route.clone().unwrap())
        .collect();
    routes.sort_by(|a, b| a.route_id.cmp(&b.route_id));
    assert_eq!(routes.len(), 2);
    assert_eq!(
        (
            routes[0].route_id.as_str(),
            routes[0].source_pattern.as_str(),
            routes[0].priority
        ),
        ("pg", "10.0.0.0/8", 1)
    );
    assert_eq!(
        (routes[1].route_id.as_str(), routes[1].protocol),
        ("web", pb::Protocol::Http as i32)
    );
    let one = register(
        &mut client,
        instance("rtmp-1", pb::ModuleType::Rtmp, "v1", "127.0.0.1:1935"),
        vec![],
    )
    .await;
    let told = heartbeat(&mut client, "rtmp-1", &one, 0).await;
    assert_eq!(
        told.instructions["desired_instances"], "2",
        "desired scale came back"
    );
    let file = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(file.contains("\"*.example.com\""));
}

#[tokio::test]
async fn the_cluster_key_guards_every_call_but_health() {
    let dir = state_dir();
    let nlb = start_with(Config {
        state_dir: Some(dir.path().to_owned()),
        api_key: Some("s3cret-key".into()),
        ..Config::local()
    })
    .await;
    let mut anonymous = nlb.client_with_key(None).await;
    let status = anonymous
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("API key"));
    let status = anonymous
        .get_routing_table(pb::GetRoutingTableRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "reads are guarded too"
    );
    let mut wrong = nlb.client_with_key(Some("guess")).await;
    assert_eq!(
        wrong
            .list_modules(pb::ListModulesRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut right = nlb.client().await;
    assert!(
        right
            .get_nlb_status(pb::GetNlbStatusRequest::default())
            .await
            .is_ok()
    );

    // grpc.health.v1 stays open; reflection lists both our service and health.
    let mut health = tonic_health::pb::health_client::HealthClient::new(nlb.channel().await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "marchproxy.NLBService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut anonymous_reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            nlb.channel().await,
        );
    let status = anonymous_reflection
        .server_reflection_info(tokio_stream::iter([request.clone()]))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "reflection maps the API: it needs the key"
    );
    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::with_interceptor(
        nlb.channel().await,
        marchproxy::auth::AttachApiKey::new(Some("s3cret-key")).unwrap(),
    );
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = answer.message_response
    else {
        panic!("reflection did not list services");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"marchproxy.NLBService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let dir = state_dir();
    let nlb = start(&dir).await;
    let mut client = nlb.client().await;
    register(
        &mut client,
        instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:1"),
        vec![],
    )
    .await;
    assert_eq!(http_get(nlb.admin, "/healthz").await.0, 200);
    assert_eq!(
        http_get(nlb.admin, "/readyz").await,
        (200, "ready\n".to_owned())
    );
    let (code, body) = http_get(nlb.admin, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["registered_modules"], 1);
    assert_eq!(status["modules"][0]["instance_id"], "alb-1");
    assert_eq!(status["modules"][0]["health"], "healthy");
    let (code, metrics) = http_get(nlb.admin, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("nlb_modules{health=\"healthy\",module_type=\"alb\",version=\"v1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nlb_registrations_total{module_type=\"alb\",outcome=\"new\"} 1"),
        "{metrics}"
    );
    assert_eq!(http_get(nlb.admin, "/nope").await.0, 404);
}
