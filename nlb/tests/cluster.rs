//! NLB replicas sharing one state through a real three-member etcd cluster: a module
//! registered through one replica is routed by another, weights set on one apply on the
//! other, racing operators never lose an update silently, and a silent module leaves every
//! replica within its timeouts. Needs the `etcd` feature (`./scripts/test.sh` turns it on).

#[cfg(not(feature = "etcd"))]
#[test]
fn cluster_tests_need_the_etcd_feature() {
    panic!(
        "the NLB cluster tests need etcd support: run ./scripts/test.sh, or cargo test -p marchproxy-nlb --features etcd (with protoc: apt-get install protobuf-compiler)"
    );
}

#[cfg(feature = "etcd")]
mod with_etcd {
    use std::{collections::HashMap, time::Duration};

    use marchproxy::{auth::AttachApiKey, listen::ListenSpec, pb};
    use marchproxy_nlb::{Config, config::StoreSpec};
    use marchproxy_testkit::{
        backend::{self, tagged_echo},
        external::EtcdCluster,
        *,
    };
    use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

    type Gateway =
        pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

    fn store(etcd: &EtcdCluster) -> StoreSpec {
        StoreSpec::parse(&etcd.url(), None, None, None, None, None).expect("a store URL")
    }

    async fn replica(etcd: &EtcdCluster, unhealthy_after_ms: u64, expire_after_ms: u64) -> TestNlb {
        let mut config = Config {
            store: Some(store(etcd)),
            listen: vec![ListenSpec::parse("auto=127.0.0.1:0").unwrap()],
            ..Config::local()
        };
        config.settings.heartbeat.unhealthy_after_ms = unhealthy_after_ms;
        config.settings.heartbeat.expire_after_ms = expire_after_ms;
        start_with(config).await
    }

    async fn gateway(nlb: &TestNlb) -> Gateway {
        pb::module_service_client::ModuleServiceClient::with_interceptor(
            nlb.channel().await,
            AttachApiKey::new(None).unwrap(),
        )
    }

    async fn split(nlb: &TestNlb) -> HashMap<String, i32> {
        gateway(nlb)
            .await
            .get_active_version(pb::GetActiveVersionRequest {
                instance_id: "alb".into(),
            })
            .await
            .map(|r| r.into_inner().version_weights)
            .unwrap_or_default()
    }

    async fn modules(nlb: &TestNlb) -> Vec<(String, i32)> {
        let mut listed: Vec<(String, i32)> = nlb
            .client()
            .await
            .list_modules(pb::ListModulesRequest::default())
            .await
            .expect("ListModules answers")
            .into_inner()
            .modules
            .into_iter()
            .map(|m| (m.instance_id, m.health_status))
            .collect();
        listed.sort();
        listed
    }

    /// One short connection through `nlb`'s listener: the backend's name, or None.
    async fn connect_once(nlb: &TestNlb) -> Option<String> {
        backend::first_line(
            nlb.listen[0],
            b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n",
        )
        .await
    }

    async fn set_unhealthy_after(
        nlb: &TestNlb,
        value: u64,
    ) -> Result<tonic::Response<pb::UpdateNlbConfigResponse>, tonic::Status> {
        nlb.client()
            .await
            .update_nlb_config(pb::UpdateNlbConfigRequest {
                config: Some(pb::ConfigUpdate {
                    config_type: "heartbeat".into(),
                    config_data: serde_json::json!({ "unhealthy_after_ms": value })
                        .to_string()
                        .into_bytes(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
    }

    async fn unhealthy_after_on(nlb: &TestNlb) -> Option<u64> {
        let config = nlb
            .client()
            .await
            .get_nlb_config(pb::GetNlbConfigRequest {
                config_type: "heartbeat".into(),
            })
            .await
            .ok()?
            .into_inner();
        let data: serde_json::Value =
            serde_json::from_slice(&config.configs.first()?.config_data).ok()?;
        data["unhealthy_after_ms"].as_u64()
    }

    fn web() -> Vec<pb::Route> {
        vec![route("web", pb::Protocol::Http, "*.example", "", 0)]
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn registered_through_one_replica_routed_by_another_with_weights_from_either() {
        let etcd = EtcdCluster::start(3).await;
        let a = replica(&etcd, 30_000, 120_000).await;
        let b = replica(&etcd, 30_000, 120_000).await;
        let (blue, green) = (tagged_echo("blue").await, tagged_echo("green").await);
        let mut through_a = a.client().await;
        register(
            &mut through_a,
            instance(
                "alb-blue",
                pb::ModuleType::Alb,
                "v1",
                &blue.addr.to_string(),
            ),
            web(),
        )
        .await;

        eventually(
            "replica B routes to the module registered through A",
            Duration::from_secs(5),
            || async { connect_once(&b).await.as_deref() == Some("blue") },
        )
        .await;
        assert_eq!(modules(&b).await, modules(&a).await, "both list the same");

        register(
            &mut through_a,
            instance(
                "alb-green",
                pb::ModuleType::Alb,
                "v2",
                &green.addr.to_string(),
            ),
            web(),
        )
        .await;
        let expected: HashMap<String, i32> = [("v1".into(), 100), ("v2".into(), 0)].into();
        eventually("B sees v2 at 0 %", Duration::from_secs(5), || async {
            split(&b).await == expected
        })
        .await;

        let set = gateway(&b)
            .await
            .set_traffic_weight(pb::SetTrafficWeightRequest {
                instance_id: "alb".into(),
                version: "v2".into(),
                weight: 20,
            })
            .await
            .expect("SetTrafficWeight on B")
            .into_inner();
        assert!(set.success, "{}", set.message);
        let expected: HashMap<String, i32> = [("v1".into(), 80), ("v2".into(), 20)].into();
        eventually(
            "the weight set on B is in effect on A",
            Duration::from_secs(5),
            || async { split(&a).await == expected },
        )
        .await;
        let mut green_at_a = 0;
        for _ in 0..500 {
            match connect_once(&a).await.as_deref() {
                Some("green") => green_at_a += 1,
                Some("blue") => {}
                other => panic!("a connection through A failed: {other:?}"),
            }
        }
        // 20 % of 500 is 100; the binomial spread is about 9.
        assert!(
            (65..=135).contains(&green_at_a),
            "A sends {green_at_a} of 500 connections to v2 at 20 %"
        );

        let details = b.status_details().await;
        let replicas = details["replicas"].split(',').count();
        assert_eq!(replicas, 2, "both replicas are listed: {details:?}");
        let mut leading = 0;
        for nlb in [&a, &b] {
            if nlb.status_details().await["rollout_leader"] == "true" {
                leading += 1;
            }
        }
        assert_eq!(leading, 1, "exactly one replica runs the rollout stepper");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn operators_racing_on_two_replicas_never_lose_an_update_silently() {
        let etcd = EtcdCluster::start(3).await;
        let a = replica(&etcd, 30_000, 120_000).await;
        let b = replica(&etcd, 30_000, 120_000).await;
        let mut kept = Vec::new();
        let mut refused = 0;
        for round in 0..20u64 {
            let (on_a, on_b) = tokio::join!(
                set_unhealthy_after(&a, 10_000 + round * 2),
                set_unhealthy_after(&b, 10_001 + round * 2)
            );
            for (value, answer) in [(10_000 + round * 2, on_a), (10_001 + round * 2, on_b)] {
                match answer {
                    Ok(_) => kept.push(value),
                    Err(status) => {
                        assert_eq!(status.code(), Code::Aborted, "{status:?}");
                        assert!(status.message().contains("another NLB replica"));
                        refused += 1;
                    }
                }
            }
        }
        assert!(!kept.is_empty());
        eventually("both replicas agree", Duration::from_secs(5), || async {
            let (on_a, on_b) = (unhealthy_after_on(&a).await, unhealthy_after_on(&b).await);
            on_a.is_some() && on_a == on_b
        })
        .await;
        let agreed = unhealthy_after_on(&a).await;
        let agreed = agreed.unwrap();
        assert!(
            kept.contains(&agreed),
            "the value both hold ({agreed}) is one a caller was told was kept ({kept:?}; {refused} refused)"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn heartbeats_at_any_replica_keep_a_module_and_silence_removes_it_everywhere() {
        let etcd = EtcdCluster::start(3).await;
        let a = replica(&etcd, 2_000, 4_000).await;
        let b = replica(&etcd, 2_000, 4_000).await;
        let mut through_a = a.client().await;
        let registration = register(
            &mut through_a,
            instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:9"),
            vec![],
        )
        .await;
        let healthy = vec![("alb-1".to_string(), pb::HealthStatus::Healthy as i32)];
        eventually("B lists the module", Duration::from_secs(5), || async {
            modules(&b).await == healthy
        })
        .await;
        // Heartbeats to B alone, for longer than both timeouts: the leases A granted hold.
        let mut through_b = b.client().await;
        for _ in 0..12 {
            let answer = heartbeat(&mut through_b, "alb-1", &registration, 0).await;
            assert!(answer.acknowledged, "{}", answer.message);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(modules(&a).await, healthy, "A still has it, healthy");
        assert_eq!(modules(&b).await, healthy);

        let unhealthy = vec![("alb-1".to_string(), pb::HealthStatus::Unhealthy as i32)];
        for (name, nlb) in [("A", &a), ("B", &b)] {
            eventually(
                &format!("replica {name} marks the silent module unhealthy"),
                Duration::from_secs(5),
                || async { modules(nlb).await == unhealthy },
            )
            .await;
        }
        for (name, nlb) in [("A", &a), ("B", &b)] {
            eventually(
                &format!("replica {name} removes the silent module"),
                Duration::from_secs(6),
                || async { modules(nlb).await.is_empty() },
            )
            .await;
        }
        let answer = heartbeat(&mut through_b, "alb-1", &registration, 0).await;
        assert!(
            !answer.acknowledged,
            "an expired module is asked to register"
        );
        assert_eq!(answer.instructions["action"], "register");
    }
}
