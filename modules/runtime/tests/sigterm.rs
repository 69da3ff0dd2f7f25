//! A module process (the echo example binary) drains on SIGTERM: the NLB sees it stopping, open
//! connections keep working until they close, then the process exits 0.

use std::{path::PathBuf, process::Stdio, time::Duration};

use marchproxy::pb;
use marchproxy_nlb::Config;
use marchproxy_testkit::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Command,
};

/// The example binary next to this test's directory, built on demand when only this test ran.
fn echo_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("examples").join("echo");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "marchproxy-runtime", "--example", "echo"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --example echo failed");
    }
    binary
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_open_connections_then_exits_zero() {
    let dir = state_dir();
    let nlb = start_with(Config {
        state_dir: Some(dir.path().to_owned()),
        api_key: Some("sig-key".into()),
        ..Config::local()
    })
    .await;
    let mut child = Command::new(echo_binary())
        .args([
            "--nlb",
            &nlb.url(),
            "--api-key",
            "sig-key",
            "--instance-id",
            "echo-proc",
        ])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--listen",
            "tcp=127.0.0.1:0",
        ])
        .args(["--heartbeat-interval", "100ms", "--drain-timeout", "20s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the echo module starts");
    let client = nlb.client().await;
    let info = |client: &NlbClient| {
        let mut client = client.clone();
        async move {
            client
                .get_module_info(pb::GetModuleInfoRequest {
                    instance_id: "echo-proc".into(),
                })
                .await
                .ok()
                .and_then(|i| i.into_inner().instance)
        }
    };
    eventually("the process registers", Duration::from_secs(20), || async {
        info(&client).await.is_some()
    })
    .await;
    let data = info(&client).await.unwrap().metadata["data_address"].clone();
    let (reader, mut writer) = TcpStream::connect(&data).await.unwrap().into_split();
    let mut lines = BufReader::new(reader).lines();
    writer.write_all(b"hello\n").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("hello"));

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    eventually(
        "the NLB sees the module stopping",
        Duration::from_secs(10),
        || async {
            info(&client)
                .await
                .is_some_and(|i| i.health_status == pb::HealthStatus::Stopping as i32)
        },
    )
    .await;
    writer.write_all(b"still here\n").await.unwrap();
    assert_eq!(
        lines.next_line().await.unwrap().as_deref(),
        Some("still here"),
        "the open connection is served during the drain"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the process waits for its open connection"
    );

    drop((lines, writer));
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits once the connection closed")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    eventually(
        "the module left the NLB",
        Duration::from_secs(5),
        || async { info(&client).await.is_none() },
    )
    .await;
}
