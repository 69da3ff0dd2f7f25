//! `marchproxy up` as a user runs it: the real binary prints what listens where, answers gRPC,
//! and exits 0 on SIGTERM.

use std::{process::Stdio, time::Duration};

use marchproxy::pb;
use tokio::{io::AsyncBufReadExt, process::Command};

#[tokio::test]
async fn up_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("marchproxy.toml");
    std::fs::write(
        &config,
        "grpc_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nlisten = [\"auto=127.0.0.1:0\"]\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_marchproxy"))
        .args([
            "up",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("marchproxy up prints its table")
            .unwrap()
            .expect("marchproxy up keeps running");
        printed.push(line.clone());
        if let Some(rest) = line.trim().strip_prefix("try: marchctl --nlb ") {
            break rest.trim_end_matches(" status").to_owned();
        }
    };
    assert!(
        printed
            .iter()
            .any(|l| l.contains("nlb") && l.contains("gRPC NLBService")),
        "{printed:?}"
    );
    assert!(
        printed.iter().any(|l| l.contains("/metrics"))
            && printed.iter().any(|l| l.contains("data plane (auto)")),
        "{printed:?}"
    );

    let mut client = pb::nlb_service_client::NlbServiceClient::connect(url)
        .await
        .expect("the NLB answers");
    let status = client
        .get_nlb_status(pb::GetNlbStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, pb::HealthStatus::Healthy as i32);

    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within 10 s")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
    let last = lines.next_line().await.unwrap();
    assert_eq!(last.as_deref(), Some("MarchProxy stopped"));
}
