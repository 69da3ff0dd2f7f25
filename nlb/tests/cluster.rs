//! NLB replicas sharing one state through a real three-member etcd cluster: a module
//! registered through one replica is routed by another, weights set on one apply on the
//! other, racing operators never lose an update silently, a silent module leaves every
//! replica within its timeouts; replicas as processes: `kill -9` of one under load fails no
//! connection and loses no module, a gradual promotion finishes after the replica running it
//! dies, `kill -9` of the etcd leader expires nothing and loses nothing, and a replica cut off
//! from etcd keeps forwarding, refuses writes (its modules move their heartbeats to another
//! replica) and catches up (also past a compaction); etcd
//! with a password and with TLS. Needs the `etcd` feature (`./scripts/test.sh` turns it on).

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

    use marchproxy::{auth::AttachApiKey, listen::ListenSpec, names::ModuleKind, pb};
    use marchproxy_nlb::{Config, config::StoreSpec};
    use marchproxy_testkit::{
        backend::{self, tagged_echo},
        cutter::Cutter,
        external::EtcdCluster,
        standin::{Load, Standin},
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

    /// Operator routes that send to the ALB kind, by id.
    async fn routes_to_alb(nlb: &TestNlb) -> Vec<String> {
        let mut ids: Vec<String> = nlb
            .client()
            .await
            .get_routing_table(pb::GetRoutingTableRequest::default())
            .await
            .map(|t| t.into_inner().entries)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| e.route)
            .filter(|r| r.destination_pattern == "alb")
            .map(|r| r.route_id)
            .collect();
        ids.sort();
        ids
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
                a.update_nlb_config(
                    "heartbeat",
                    serde_json::json!({ "unhealthy_after_ms": 10_000 + round * 2 })
                ),
                b.update_nlb_config(
                    "heartbeat",
                    serde_json::json!({ "unhealthy_after_ms": 10_001 + round * 2 })
                )
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

    /// An NLB replica as its own process, on `etcd`, with 2 s / 4 s liveness timeouts.
    async fn replica_process(etcd: &EtcdCluster, dir: &tempfile::TempDir, name: &str) -> TestNlb {
        let args: Vec<String> = [
            "--store",
            &etcd.url(),
            "--replica-id",
            name,
            "--unhealthy-after",
            "2s",
            "--expire-after",
            "4s",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        spawn_process(
            env!("CARGO_BIN_EXE_marchproxy-nlb"),
            &args,
            &dir.path().join(format!("{name}.log")),
        )
        .await
    }

    /// The replica that runs gradual promotions, by its status.
    async fn leader_of<'a>(replicas: &[&'a TestNlb]) -> Option<&'a TestNlb> {
        for nlb in replicas {
            if nlb.status_details().await["rollout_leader"] == "true" {
                return Some(nlb);
            }
        }
        None
    }

    /// Longer than the expiry timeout (4 s): a registration that depended on what was lost
    /// would be gone by the end of it.
    const PAST_EXPIRY: Duration = Duration::from_secs(5);

    #[tokio::test(flavor = "multi_thread")]
    async fn killing_a_replica_keeps_its_modules_and_the_other_serves_on_without_a_failure() {
        let etcd = EtcdCluster::start(3).await;
        let logs = tempfile::tempdir().unwrap();
        let mut a = replica_process(&etcd, &logs, "a").await;
        let b = replica_process(&etcd, &logs, "b").await;
        // The module talks to A first and moves to B when A is gone.
        let _module = Standin::start(
            &format!("{},{}", a.url(), b.url()),
            ModuleKind::Alb,
            "v1",
            1,
        )
        .await;
        b.wait_healthy(pb::ModuleType::Alb, Duration::from_secs(10))
            .await;
        let load = Load::start(b.listen[0], 4);
        eventually(
            "clients are served through B",
            Duration::from_secs(10),
            || async { load.answered() > 50 },
        )
        .await;

        a.kill();
        let before = load.answered();
        tokio::time::sleep(PAST_EXPIRY).await;
        assert!(
            load.answered() > before + 50,
            "clients went on being served"
        );
        let healthy = vec![("alb-v1".to_string(), pb::HealthStatus::Healthy as i32)];
        assert_eq!(
            modules(&b).await,
            healthy,
            "the module is still registered, healthy"
        );
        let details = b.status_details().await;
        eventually(
            "B is the only replica left",
            Duration::from_secs(10),
            || async { b.status_details().await["replicas"] == "b" },
        )
        .await;
        assert_eq!(details["store"].split_whitespace().next(), Some("etcd"));
        let seen = load.finish().await;
        assert_eq!(seen.errors, 0, "every answer was the module's own");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_gradual_promotion_finishes_after_the_replica_running_it_dies() {
        let etcd = EtcdCluster::start(3).await;
        let logs = tempfile::tempdir().unwrap();
        let a = replica_process(&etcd, &logs, "a").await;
        let b = replica_process(&etcd, &logs, "b").await;
        eventually(
            "a replica leads the rollouts",
            Duration::from_secs(10),
            || async { leader_of(&[&a, &b]).await.is_some() },
        )
        .await;
        let a_leads = leader_of(&[&a, &b]).await.map(|nlb| nlb.grpc) == Some(a.grpc);
        let (mut first, second) = if a_leads { (a, b) } else { (b, a) };
        // The modules heartbeat to the follower: the leader judges v2 by the stats it passes on.
        let endpoints = format!("{},{}", second.url(), first.url());
        let _v1 = Standin::start(&endpoints, ModuleKind::Alb, "v1", 1).await;
        // v1 serves first, so v2 joins at 0 %.
        eventually("v1 serves", Duration::from_secs(10), || async {
            split(&second).await.get("v1") == Some(&100)
        })
        .await;
        let _v2 = Standin::start(&endpoints, ModuleKind::Alb, "v2", 1).await;
        let policy = serde_json::json!({"step_interval_ms": 500, "step_percent": 10, "max_weight": 60,
            "min_requests": 1, "progress_deadline_ms": 600_000});
        let answer = second
            .update_nlb_config("rollout", policy)
            .await
            .expect("the policy is set through the follower");
        assert!(answer.success, "{}", answer.message);
        eventually(
            "both versions are routed",
            Duration::from_secs(10),
            || async { split(&second).await.len() == 2 },
        )
        .await;
        let load = Load::start(second.listen[0], 4);
        eventually("clients are served", Duration::from_secs(10), || async {
            load.answered() > 20
        })
        .await;

        let promoted = gateway(&second)
            .await
            .promote_version(pb::PromoteVersionRequest {
                instance_id: "alb".into(),
                version: "v2".into(),
                immediate: false,
                promotion_rate: 10,
            })
            .await
            .expect("PromoteVersion through the follower")
            .into_inner();
        assert!(promoted.success, "{}", promoted.message);
        eventually(
            "the leader takes a step",
            Duration::from_secs(20),
            || async { split(&second).await.get("v2").copied().unwrap_or(0) >= 20 },
        )
        .await;

        first.kill();
        eventually(
            "the other replica takes over and finishes the promotion",
            Duration::from_secs(40),
            || async { split(&second).await.get("v2") == Some(&100) },
        )
        .await;
        assert_eq!(second.status_details().await["rollout_leader"], "true");
        let seen = load.finish().await;
        assert_eq!(seen.errors, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn killing_the_etcd_leader_expires_no_module_and_loses_no_state() {
        let mut etcd = EtcdCluster::start(3).await;
        let a = replica(&etcd, 2_000, 4_000).await;
        let b = replica(&etcd, 2_000, 4_000).await;
        let _module = Standin::start(
            &format!("{},{}", a.url(), b.url()),
            ModuleKind::Alb,
            "v1",
            1,
        )
        .await;
        let mut operator = b.client().await;
        let written = operator
            .update_routing(pb::UpdateRoutingRequest {
                routes: vec![route("shop", pb::Protocol::Http, "shop.example", "alb", 5)],
                ..Default::default()
            })
            .await
            .expect("an operator route")
            .into_inner();
        assert!(written.success, "{}", written.message);
        let healthy = vec![("alb-v1".to_string(), pb::HealthStatus::Healthy as i32)];
        for nlb in [&a, &b] {
            eventually(
                "the module is listed everywhere",
                Duration::from_secs(10),
                || async { modules(nlb).await == healthy },
            )
            .await;
        }

        let leader = etcd.leader();
        etcd.kill(leader);
        tokio::time::sleep(PAST_EXPIRY).await;
        let stored = etcd
            .etcdctl()
            .args([
                "get",
                "--print-value-only",
                "/marchproxy/operator/routes/shop",
            ])
            .output()
            .expect("etcdctl runs");
        assert!(
            String::from_utf8_lossy(&stored.stdout).contains("shop.example"),
            "etcd kept the operator route: {stored:?}"
        );
        for (name, nlb) in [("A", &a), ("B", &b)] {
            assert_eq!(
                modules(nlb).await,
                healthy,
                "replica {name} kept the module, healthy"
            );
            let table = nlb
                .client()
                .await
                .get_routing_table(pb::GetRoutingTableRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert!(
                table
                    .entries
                    .iter()
                    .any(|e| e.route.as_ref().is_some_and(|r| r.route_id == "shop")),
                "replica {name} kept the operator route"
            );
        }
        eventually(
            "writes work again once etcd elected a new leader",
            Duration::from_secs(10),
            || async {
                a.client()
                    .await
                    .update_routing(pb::UpdateRoutingRequest {
                        routes: vec![route("shop-2", pb::Protocol::Http, "two.example", "alb", 5)],
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            },
        )
        .await;
        eventually(
            "B sees the write made on A",
            Duration::from_secs(5),
            || async {
                b.client()
                    .await
                    .get_routing_table(pb::GetRoutingTableRequest::default())
                    .await
                    .is_ok_and(|t| {
                        t.into_inner()
                            .entries
                            .iter()
                            .any(|e| e.route.as_ref().is_some_and(|r| r.route_id == "shop-2"))
                    })
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_replica_cut_off_from_etcd_keeps_forwarding_refuses_writes_then_catches_up() {
        let etcd = EtcdCluster::start(3).await;
        let mut cutters = Vec::new();
        for member in etcd.members() {
            cutters.push(Cutter::start(member).await);
        }
        let through_cutters = cutters
            .iter()
            .map(|c| c.addr.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let a = start_with(Config {
            store: Some(
                StoreSpec::parse(
                    &format!("etcd://{through_cutters}"),
                    None,
                    None,
                    None,
                    None,
                    None,
                )
                .unwrap(),
            ),
            listen: vec![ListenSpec::parse("tcp=127.0.0.1:0").unwrap()],
            ..Config::local()
        })
        .await;
        let b = replica(&etcd, 30_000, 120_000).await;
        // The module heartbeats to A first, and to B when A cannot pass its heartbeats on.
        let _module = Standin::start(
            &format!("{},{}", a.url(), b.url()),
            ModuleKind::Alb,
            "v1",
            1,
        )
        .await;
        a.wait_healthy(pb::ModuleType::Alb, Duration::from_secs(10))
            .await;
        let acknowledged_at_b = || async {
            let (_, page) = http_get(b.admin, "/metrics").await;
            metric_value(&page, "nlb_heartbeats_total", r#"result="acknowledged""#).unwrap_or(0.0)
        };
        assert_eq!(acknowledged_at_b().await, 0.0, "the module heartbeats to A");
        let load = Load::start(a.listen[0], 4);
        eventually(
            "clients are served through A",
            Duration::from_secs(10),
            || async { load.answered() > 20 },
        )
        .await;

        for cutter in &cutters {
            cutter.cut();
        }
        let refused = a
            .client()
            .await
            .update_routing(pb::UpdateRoutingRequest {
                routes: vec![route("lost", pb::Protocol::Http, "lost.example", "alb", 5)],
                ..Default::default()
            })
            .await
            .expect_err("a write on a replica cut off from etcd is refused");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("unreachable"), "{refused:?}");
        let written = b
            .client()
            .await
            .update_routing(pb::UpdateRoutingRequest {
                routes: vec![route("kept", pb::Protocol::Http, "kept.example", "alb", 5)],
                ..Default::default()
            })
            .await
            .expect("B still writes")
            .into_inner();
        assert!(written.success);
        eventually(
            "the module moves its heartbeats to B, which reaches etcd",
            Duration::from_secs(10),
            || async { acknowledged_at_b().await > 0.0 },
        )
        .await;
        let before = load.answered();
        eventually(
            "A goes on forwarding while cut off",
            Duration::from_secs(10),
            || async { load.answered() > before + 50 },
        )
        .await;

        for cutter in &cutters {
            cutter.mend().await;
        }
        eventually(
            "A catches up: B's write is there, its own refused one is not",
            Duration::from_secs(15),
            || async { routes_to_alb(&a).await == ["kept"] },
        )
        .await;
        assert_eq!(routes_to_alb(&b).await, ["kept"]);

        // Cut off again while B writes and etcd compacts its history: A cannot watch on from
        // where it was, and loads everything instead.
        for cutter in &cutters {
            cutter.cut();
        }
        let written = b
            .client()
            .await
            .update_routing(pb::UpdateRoutingRequest {
                routes: vec![route(
                    "after",
                    pb::Protocol::Http,
                    "after.example",
                    "alb",
                    5,
                )],
                ..Default::default()
            })
            .await
            .expect("B still writes")
            .into_inner();
        assert!(written.success);
        etcd.compact();
        for cutter in &cutters {
            cutter.mend().await;
        }
        eventually(
            "A catches up past the compaction",
            Duration::from_secs(15),
            || async { routes_to_alb(&a).await == ["after", "kept"] },
        )
        .await;
        load.finish().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn etcd_with_a_password_is_used_with_store_auth_and_refused_without() {
        let etcd = EtcdCluster::start(1).await;
        etcd.enable_auth("s3cret");
        let config = |auth: Option<&str>| Config {
            store: Some(
                StoreSpec::parse(&etcd.url(), None, auth.map(str::to_owned), None, None, None)
                    .unwrap(),
            ),
            ..Config::local()
        };
        let refused = match marchproxy_nlb::Server::bind(config(None)).await {
            Ok(_) => panic!("an NLB without the password started"),
            Err(error) => error.to_string(),
        };
        assert!(refused.contains("--store-auth"), "{refused}");
        let nlb = start_with(config(Some("root:s3cret"))).await;
        registers_into(&nlb, &etcd, &["--user", "root:s3cret"]).await;
    }

    /// Registers a module through `nlb` and finds it in `etcd` (etcdctl with `flags`).
    async fn registers_into(nlb: &TestNlb, etcd: &EtcdCluster, flags: &[&str]) {
        register(
            &mut nlb.client().await,
            instance("alb-1", pb::ModuleType::Alb, "v1", "127.0.0.1:9"),
            vec![],
        )
        .await;
        let stored = etcd
            .etcdctl()
            .args(flags)
            .args(["get", "/marchproxy/instances/alb-1"])
            .output()
            .expect("etcdctl runs");
        assert!(
            String::from_utf8_lossy(&stored.stdout).contains("registration_id"),
            "the registration is in etcd: {stored:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn etcd_over_tls_is_used_with_its_ca() {
        let etcd = EtcdCluster::start_with(1, true).await;
        let ca = etcd.ca_file().expect("a CA").to_owned();
        let store = StoreSpec::parse(&etcd.url(), None, None, Some(ca), None, None).unwrap();
        assert!(store.endpoints[0].starts_with("https://"), "{store:?}");
        let nlb = start_with(Config {
            store: Some(store),
            ..Config::local()
        })
        .await;
        registers_into(&nlb, &etcd, &[]).await;
    }
}
