//! `marchctl` drives a live NLB: the real binary, run as an operator would, against an NLB
//! started in this process with a cluster key.

use std::{process::Stdio, time::Duration};

use marchproxy_nlb::{Config, Server};
use tokio::{io::AsyncBufReadExt, process::Command};

struct Ctl {
    url: String,
    key: Option<&'static str>,
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ctl {
    async fn run(&self, args: &[&str]) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_marchctl"));
        command
            .arg("--nlb")
            .arg(&self.url)
            .args(args)
            .env_remove("MARCHPROXY_API_KEY");
        if let Some(key) = self.key {
            command.env("MARCHPROXY_API_KEY", key);
        }
        let output = command.output().await.expect("marchctl runs");
        Run {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; returns its output.
    async fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args).await;
        assert!(
            run.ok,
            "marchctl {args:?} failed:\n{}{}",
            run.stdout, run.stderr
        );
        run.stdout
    }

    async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = args.to_vec();
        with_json.extend(["-o", "json"]);
        let out = self.ok(&with_json).await;
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("marchctl {args:?} -o json printed no JSON ({e}):\n{out}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn marchctl_operates_a_live_nlb() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(Config {
        state_dir: Some(dir.path().to_owned()),
        api_key: Some("ctl-key".into()),
        ..Config::local()
    })
    .await
    .unwrap();
    let url = format!("http://{}", server.grpc_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let nlb = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let anonymous = Ctl {
        url: url.clone(),
        key: None,
    };
    let denied = anonymous.run(&["status"]).await;
    assert!(!denied.ok);
    assert!(
        denied.stderr.contains("Unauthenticated") && denied.stderr.contains("API key"),
        "{}",
        denied.stderr
    );

    let ctl = Ctl {
        url,
        key: Some("ctl-key"),
    };
    let registered = ctl
        .ok(&[
            "modules",
            "register",
            "--id",
            "alb-1",
            "--type",
            "alb",
            "--address",
            "127.0.0.1:50051",
            "--version",
            "v1",
            "--data-address",
            "127.0.0.1:8080",
        ])
        .await;
    let registration = registered
        .lines()
        .find_map(|l| l.strip_prefix("registration id: "))
        .expect("the registration id is printed")
        .to_owned();
    let beat = ctl
        .ok(&[
            "modules",
            "heartbeat",
            "alb-1",
            "--registration-id",
            &registration,
            "--active-connections",
            "3",
        ])
        .await;
    assert!(beat.contains("acknowledged: true"), "{beat}");

    let listed = ctl.ok(&["modules", "list"]).await;
    let row = listed
        .lines()
        .find(|l| l.starts_with("alb-1"))
        .expect("alb-1 is listed");
    assert!(
        row.contains("healthy") && row.contains("100%") && row.contains(" 3 "),
        "{listed}"
    );
    let listed = ctl
        .json(&["modules", "list", "--type", "alb", "--filter", "version=v1"])
        .await;
    assert_eq!(listed["total_modules"], 1);
    assert_eq!(listed["modules"][0]["module_type"], "MODULE_TYPE_ALB");

    ctl.ok(&[
        "routes",
        "add",
        "--id",
        "web",
        "--protocol",
        "http",
        "--source",
        "*.example.com",
        "--destination",
        "alb",
        "--priority",
        "5",
    ])
    .await;
    let table = ctl.json(&["routes", "list"]).await;
    assert_eq!(table["entries"][0]["route"]["route_id"], "web");
    assert_eq!(table["entries"][0]["target_instance_id"], "alb-1");
    let resolved = ctl
        .ok(&[
            "routes",
            "resolve",
            "--protocol",
            "http",
            "--source",
            "api.example.com",
        ])
        .await;
    assert!(
        resolved.contains("-> alb-1 (alb) at 127.0.0.1:8080"),
        "{resolved}"
    );
    let missing = ctl.run(&["routes", "resolve", "--protocol", "rtmp"]).await;
    assert!(
        !missing.ok && missing.stdout.contains("not routed"),
        "{}",
        missing.stdout
    );
    let validated = ctl
        .ok(&[
            "routes",
            "validate",
            "--id",
            "x",
            "--protocol",
            "rtmp",
            "--destination",
            "rtmp",
        ])
        .await;
    assert!(
        validated.contains("valid: true  has handler: false"),
        "{validated}"
    );

    let file = dir.path().join("routes.json");
    std::fs::write(
        &file,
        r#"[{"route_id": "pg", "protocol": "PROTOCOL_POSTGRES", "destination_pattern": "dblb"}]"#,
    )
    .unwrap();
    ctl.ok(&[
        "routes",
        "apply",
        "--file",
        file.to_str().unwrap(),
        "--replace-all",
    ])
    .await;
    let routes = ctl.ok(&["routes", "list"]).await;
    assert!(
        routes.contains("pg") && !routes.contains("web "),
        "{routes}"
    );
    std::fs::write(
        &file,
        r#"[{"route_id": "bad", "source_port": 70000, "destination_pattern": "dblb"}]"#,
    )
    .unwrap();
    let rejected = ctl
        .run(&["routes", "apply", "--file", file.to_str().unwrap()])
        .await;
    assert!(
        !rejected.ok && rejected.stderr.contains("source_port"),
        "{}",
        rejected.stderr
    );

    ctl.ok(&[
        "config",
        "set",
        "heartbeat",
        "--data",
        r#"{"unhealthy_after_ms": 20000}"#,
    ])
    .await;
    let config = ctl.ok(&["config", "get", "heartbeat"]).await;
    assert!(config.contains("\"unhealthy_after_ms\":20000"), "{config}");
    let bad = ctl
        .run(&["config", "set", "heartbeat", "--data", r#"{"bogus": 1}"#])
        .await;
    assert!(!bad.ok && bad.stderr.contains("bogus"), "{}", bad.stderr);

    let scaled = ctl
        .ok(&["scale", "alb", "--action", "scale-up", "--target", "2"])
        .await;
    assert!(scaled.contains("alb: 1 -> 2 instances"), "{scaled}");
    let health = ctl.json(&["health"]).await;
    assert_eq!(health["status"], "HEALTH_STATUS_HEALTHY");
    let status = ctl.ok(&["status", "--modules"]).await;
    assert!(
        status.contains("modules: 1") && status.contains("alb-1"),
        "{status}"
    );
    let metrics = ctl.json(&["metrics"]).await;
    assert!(
        metrics["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "nlb_registered_modules")
    );
    let load = ctl.ok(&["load"]).await;
    assert!(
        load.contains("alb-1") && load.contains("balance score: 1.00"),
        "{load}"
    );
    let rebalanced = ctl
        .ok(&["rebalance", "--strategy", "random", "--force"])
        .await;
    assert!(
        rebalanced.contains("least_connections -> random"),
        "{rebalanced}"
    );
    ctl.ok(&["modules", "report-metrics", "alb-1", "cache_hits=12"])
        .await;
    let module_metrics = ctl
        .ok(&["modules", "metrics", "alb-1", "--names", "cache_hits"])
        .await;
    assert!(
        module_metrics.contains("cache_hits") && module_metrics.contains("12"),
        "{module_metrics}"
    );

    // Blue/green with a second version.
    ctl.ok(&[
        "modules",
        "register",
        "--id",
        "alb-2",
        "--type",
        "alb",
        "--address",
        "127.0.0.1:50052",
        "--version",
        "v2",
        "--data-address",
        "127.0.0.1:8081",
    ])
    .await;
    let split = ctl.ok(&["bluegreen", "active", "alb"]).await;
    assert!(
        split.contains("active: v1") && split.contains("v2       0%"),
        "{split}"
    );
    let weighted = ctl.ok(&["bluegreen", "weight", "alb", "v2", "30"]).await;
    assert!(weighted.contains("v2 now takes 30%"), "{weighted}");
    let split = ctl.json(&["bluegreen", "active", "alb"]).await;
    assert_eq!(split["version_weights"]["v2"], 30);
    assert_eq!(split["version_weights"]["v1"], 70);
    ctl.ok(&["bluegreen", "promote", "alb", "v2", "--immediate"])
        .await;
    let back = ctl.ok(&["bluegreen", "rollback", "alb"]).await;
    assert!(back.contains("v1 is active again (was v2)"), "{back}");
    let refused = ctl.run(&["bluegreen", "weight", "alb", "v9", "10"]).await;
    assert!(
        !refused.ok && refused.stderr.contains("no version `v9`"),
        "{}",
        refused.stderr
    );

    // A rollout nobody sends traffic to: status shows it, pause and resume steer it, and
    // `status --watch` follows it until the deadline rolls it back (exit status 1).
    ctl.ok(&[
        "config",
        "set",
        "rollout",
        "--data",
        r#"{"kinds": {"alb": {"step_interval_ms": 200, "progress_deadline_ms": 1500}}}"#,
    ])
    .await;
    ctl.ok(&["bluegreen", "promote", "alb", "v2", "--rate", "10"])
        .await;
    let shown = ctl.ok(&["rollout", "status", "alb"]).await;
    assert!(
        shown.contains("alb: v1 90%, v2 10%") && shown.contains("rollout: v1 -> v2, step 1 at 10%"),
        "{shown}"
    );
    let paused = ctl.ok(&["rollout", "pause", "alb"]).await;
    assert!(paused.contains("alb rollouts paused"), "{paused}");
    let config = ctl.ok(&["config", "get", "rollout"]).await;
    assert!(config.contains(r#""alb":{"paused":true"#), "{config}");
    ctl.ok(&["rollout", "resume", "alb"]).await;
    let watched = ctl
        .run(&["rollout", "status", "alb", "--watch", "--interval", "0.2"])
        .await;
    assert!(
        !watched.ok,
        "a rollback exits non-zero:\n{}",
        watched.stdout
    );
    assert!(
        watched.stdout.contains("holding: too little traffic")
            && watched
                .stdout
                .contains("rolled back: no progress within the deadline")
            && watched
                .stderr
                .contains("the rollout of alb was rolled back"),
        "{}{}",
        watched.stdout,
        watched.stderr
    );
    let status = ctl.json(&["rollout", "status", "alb"]).await;
    assert!(
        status["rollout"].is_null() && status["weights"]["v1"] == 100,
        "{status}"
    );
    let nothing = ctl.run(&["rollout", "status", "alb", "--watch"]).await;
    assert!(!nothing.ok && nothing.stderr.contains("no rollout running"));

    // --watch streams until stopped.
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_marchctl"))
        .args([
            "--nlb",
            &ctl.url,
            "--api-key",
            "ctl-key",
            "metrics",
            "--watch",
            "--interval",
            "1",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("a line each second")
            .unwrap()
            .unwrap();
        let message: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(message["metrics"].as_array().is_some_and(|m| !m.is_empty()));
    }
    watch.kill().await.unwrap();

    let gone = ctl
        .ok(&[
            "modules",
            "unregister",
            "alb-1",
            "--registration-id",
            &registration,
        ])
        .await;
    assert!(gone.contains("unregistered"), "{gone}");
    let unknown = ctl.run(&["modules", "info", "alb-1"]).await;
    assert!(
        !unknown.ok && unknown.stderr.contains("NotFound"),
        "{}",
        unknown.stderr
    );

    let _ = stop.send(());
    nlb.await.unwrap().unwrap();
}
