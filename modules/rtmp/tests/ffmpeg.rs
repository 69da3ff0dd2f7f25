//! The RTMP module with real ffmpeg: a generated H.264/AAC test stream published over RTMP,
//! read back by ffmpeg and ffprobe players directly, several at once, late, and through the
//! NLB; publishers refused by key and by the `on_publish` callback; a stream re-sent to a second
//! instance of the module.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use marchproxy::pb;
use marchproxy_testkit::{
    eventually,
    external::{Process, free_port, require},
    http_get,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn require_ffmpeg() {
    require(
        "ffmpeg",
        "command -v ffmpeg && command -v ffprobe",
        "sudo apt-get install -y ffmpeg",
    );
}

/// The module binary on free ports with `config` as its file.
struct Module {
    rtmp: SocketAddr,
    admin: SocketAddr,
    _process: Process,
}

impl Module {
    async fn start(dir: &Path, name: &str, config: &str, args: &[&str]) -> Module {
        let [rtmp, grpc, admin] = [(); 3].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut process = Process::spawn(
            name,
            Command::new(env!("CARGO_BIN_EXE_marchproxy-rtmp"))
                .arg("--config")
                .arg(&file)
                .arg("--listen")
                .arg(rtmp.to_string())
                .arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string())
                .arg("--instance-id")
                .arg(name)
                .args(args)
                .env_remove("MARCHPROXY_NLB")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        process.wait_listening(rtmp, DEADLINE, &log).await;
        process.wait_listening(admin, DEADLINE, &log).await;
        Module {
            rtmp,
            admin,
            _process: process,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("rtmp://{}/{path}", self.rtmp)
    }

    async fn stats(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/stats").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn wait_publishing(&self, key: &str) {
        eventually(&format!("{key} is published"), DEADLINE, || async {
            self.stats().await["streams"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["key"] == key && s["publishing"] == true)
        })
        .await;
    }

    async fn metric(&self, name: &str, labels: &str) -> f64 {
        marchproxy_testkit::metric(self.admin, name, labels).await
    }
}

/// ffmpeg publishing a generated stream (25 fps, a keyframe each second, AAC audio) for
/// `seconds`, killed when dropped.
fn publish(url: &str, seconds: u32) -> tokio::process::Child {
    require_ffmpeg();
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ])
        .args(["-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac"])
        .args(["-t", &seconds.to_string(), "-f", "flv", url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg starts")
}

/// Plays `url` with ffmpeg until `count` video frames were decoded; returns how many were.
async fn play(url: &str, count: u32) -> usize {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-i", url])
            .args([
                "-map",
                "0:v",
                "-frames:v",
                &count.to_string(),
                "-f",
                "framecrc",
                "-",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the player finished in time")
    .expect("ffmpeg runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .count()
}

/// The first video packets a player gets, as ffprobe reads them (`K` in the flags: keyframe).
async fn first_video_packet_flags(url: &str) -> String {
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v"])
            .args(["-show_entries", "packet=flags", "-of", "csv=p=0"])
            .args(["-read_intervals", "%+#5", url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ffprobe finished in time")
    .expect("ffprobe runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Waits for a publisher that should be refused; returns its exit status.
async fn refused(mut publisher: tokio::process::Child) -> std::process::ExitStatus {
    tokio::time::timeout(DEADLINE, publisher.wait())
        .await
        .expect("a refused publisher gives up in time")
        .unwrap()
}

#[tokio::test]
async fn players_get_the_stream_directly_late_and_through_the_nlb() {
    require_ffmpeg();
    let state = marchproxy_testkit::state_dir();
    let nlb = marchproxy_testkit::start_with(marchproxy_nlb::Config {
        state_dir: Some(state.path().to_owned()),
        listen: vec![marchproxy::listen::ListenSpec::parse("rtmp=127.0.0.1:0").unwrap()],
        ..marchproxy_nlb::Config::local()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = "[module]\nallowed_keys = [\"cam1\"]\n\
                  [[routes]]\nroute_id = \"live\"\nprotocol = \"rtmp\"\n";
    let module = Module::start(
        dir.path(),
        "rtmp-a",
        config,
        &["--nlb", &nlb.url(), "--heartbeat-interval", "1s"],
    )
    .await;
    nlb.wait_healthy(pb::ModuleType::Rtmp, DEADLINE).await;

    let mut publisher = publish(&module.url("live/cam1"), 60);
    module.wait_publishing("cam1").await;

    // Several players at once, each decoding 50 frames.
    let url = module.url("live/cam1");
    let players: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { play(&url, 50).await })
        })
        .collect();
    for player in players {
        assert_eq!(player.await.unwrap(), 50);
    }

    // A late joiner starts on a keyframe (the sequence headers and the GOP are replayed).
    for _ in 0..3 {
        let flags = first_video_packet_flags(&url).await;
        assert!(flags.starts_with('K'), "first video packet flags `{flags}`");
    }

    // Through the NLB's RTMP listener.
    let through_nlb = format!("rtmp://{}/live/cam1", nlb.listen[0]);
    assert_eq!(play(&through_nlb, 50).await, 50);

    // A key that is not allowed is refused.
    let intruder = refused(publish(&module.url("live/intruder"), 10)).await;
    assert!(!intruder.success());
    assert_eq!(
        module
            .metric("rtmp_publish_refused_total", "reason=\"key\"")
            .await,
        1.0
    );

    let stats = module.stats().await;
    let stream = &stats["streams"][0];
    assert_eq!(stream["key"], "cam1", "{stats}");
    assert!(stream["bitrate_kbps"].as_u64().unwrap() > 0, "{stats}");
    assert!(stream["bytes_out"].as_u64().unwrap() > 0, "{stats}");
    assert!(module.metric("rtmp_bytes_sent_total", "").await > 0.0);
    assert_eq!(module.metric("rtmp_publishers_active", "").await, 1.0);

    // The encoder reconnects: a player keeps playing across it.
    let watching = tokio::spawn({
        let url = url.clone();
        async move { play(&url, 150).await }
    });
    eventually("the player is attached", DEADLINE, || async {
        module.metric("rtmp_players_active", "").await >= 1.0
    })
    .await;
    publisher.kill().await.unwrap();
    eventually("the publisher is gone", DEADLINE, || async {
        module.metric("rtmp_publishers_active", "").await == 0.0
    })
    .await;
    let _again = publish(&module.url("live/cam1"), 60);
    assert_eq!(watching.await.unwrap(), 150, "frames from both publishers");
}

#[tokio::test]
async fn restreaming_and_the_publish_callback() {
    require_ffmpeg();
    // The callback: allows cam1 only, and records what it was asked.
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback = listener.local_addr().unwrap();
    let recorded = Arc::clone(&asked);
    let app = axum::Router::new().route(
        "/on_publish",
        axum::routing::post(move |body: String| {
            let recorded = Arc::clone(&recorded);
            async move {
                let allowed = body.contains("name=cam1&") || body.ends_with("&token=s3cret");
                recorded.lock().unwrap().push(body);
                if allowed {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::FORBIDDEN
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let second = Module::start(
        dir.path(),
        "rtmp-b",
        &format!("[module]\non_publish = \"http://{callback}/on_publish\"\n"),
        &[],
    )
    .await;
    let first = Module::start(
        dir.path(),
        "rtmp-a",
        &format!(
            "[[module.restream]]\nkey = \"cam1\"\nurl = \"rtmp://{}/live/{{key}}\"\n",
            second.rtmp
        ),
        &[],
    )
    .await;

    let mut publisher = publish(&first.url("live/cam1"), 60);
    first.wait_publishing("cam1").await;
    second.wait_publishing("cam1").await;
    assert_eq!(
        play(&second.url("live/cam1"), 50).await,
        50,
        "re-streamed frames"
    );
    assert_eq!(
        first
            .metric("rtmp_restream_connects_total", "outcome=\"ok\"")
            .await,
        1.0
    );
    assert_eq!(
        asked.lock().unwrap().first().map(String::as_str),
        Some("call=publish&app=live&name=cam1&addr=127.0.0.1")
    );

    let denied = refused(publish(&second.url("live/other"), 10)).await;
    assert!(!denied.success());
    assert_eq!(
        second
            .metric("rtmp_publish_refused_total", "reason=\"callback\"")
            .await,
        1.0
    );

    // The publisher's query arguments go to the callback; the stream is named by the key alone.
    let _with_token = publish(&second.url("live/cam2?token=s3cret"), 60);
    second.wait_publishing("cam2").await;
    assert_eq!(play(&second.url("live/cam2"), 10).await, 10);
    assert!(
        asked
            .lock()
            .unwrap()
            .contains(&"call=publish&app=live&name=cam2&addr=127.0.0.1&token=s3cret".to_owned())
    );

    // The publisher leaves: its stream ends here and at the re-streaming destination.
    publisher.kill().await.unwrap();
    for (module, publishers) in [(&first, 0.0), (&second, 1.0)] {
        eventually("cam1 is gone", DEADLINE, || async {
            module.metric("rtmp_publishers_active", "").await == publishers
        })
        .await;
    }
    assert_eq!(first.metric("rtmp_streams_active", "").await, 0.0);
    assert_eq!(first.metric("rtmp_players_active", "").await, 0.0);
}
