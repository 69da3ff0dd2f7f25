//! Shared by the SQS proxy's end-to-end tests: the real binary on free ports, a load of
//! numbered messages from concurrent senders, and the puller binary read line by line.

#![allow(dead_code)] // each test file uses its own part of this module

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use marchproxy_testkit::external::{Process, free_port};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_marchproxy-sqs-proxy");

/// Variables from the test's own environment that would change what the binary does.
const INHERITED: [&str; 9] = [
    "SQS_QUEUE_URL",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_PROFILE",
    "MARCHPROXY_QUEUE",
    "MARCHPROXY_QUEUE_DIR",
    "MARCHPROXY_NLB",
    "MARCHPROXY_CONFIG",
    "KEEP_FAILED_MESSAGES",
];

pub fn command(envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    for name in INHERITED {
        command.env_remove(name);
    }
    command.envs(envs.iter().copied()).env("RUST_LOG", "info");
    command
}

/// AWS settings that point the SDK at moto.
pub fn moto_env(endpoint: &str, queue_url: &str) -> Vec<(String, String)> {
    [
        ("SQS_QUEUE_URL", queue_url),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

pub fn borrowed(envs: &[(String, String)]) -> Vec<(&str, &str)> {
    envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A running proxy binary.
pub struct Proxy {
    pub data: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub process: Process,
}

impl Proxy {
    pub async fn start(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Proxy {
        let [data, grpc, admin] = [(); 3].map(|()| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let log = dir.join(format!("proxy-{}.log", data.port()));
        let mut process = Process::spawn(
            "marchproxy-sqs-proxy",
            command(envs)
                .arg("--listen")
                .arg(data.to_string())
                .arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--admin-listen")
                .arg(admin.to_string())
                .args(args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file")),
        );
        process
            .wait_listening(data, Duration::from_secs(30), &log)
            .await;
        Proxy {
            data,
            grpc,
            admin,
            log,
            process,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of metric `name` on /metrics, on the series whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        marchproxy_testkit::metric(self.admin, name, labels).await
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.process.signal("TERM");
        self.process.wait()
    }
}

/// POSTs `body` to /send; `None` when the connection failed or broke.
pub async fn try_send(addr: SocketAddr, body: &str) -> Option<(u16, serde_json::Value)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "POST /send HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8(response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, serde_json::from_str(body).ok()?))
}

pub async fn send(addr: SocketAddr, body: &str) -> (u16, serde_json::Value) {
    try_send(addr, body)
        .await
        .unwrap_or_else(|| panic!("no HTTP answer from {addr} to {body}"))
}

/// A sensor reading as the edge sends it, numbered by `sequence`.
pub fn reading(sequence: u64) -> String {
    serde_json::json!({
        "job_id": "job-1", "execution_id": format!("exec-{sequence}"),
        "hostname": format!("node-{sequence}"), "job_submission_time": 1_700_000_000,
        "icon_name": "sun", "timestamp": 1_700_000_001, "color": "orange",
        "sequence": sequence, "region": "eu"
    })
    .to_string()
}

/// What a load run saw: the sequences the proxy acknowledged, and the refusals.
#[derive(Default)]
pub struct Load {
    pub acked: Mutex<BTreeSet<u64>>,
    pub unavailable: AtomicUsize,
    pub broken: AtomicUsize,
    next: AtomicU64,
}

impl Load {
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// `senders` tasks POST numbered readings to `addr` until `stop` turns true.
pub fn start_load(
    addr: SocketAddr,
    senders: usize,
    stop: watch::Receiver<bool>,
) -> (Arc<Load>, tokio::task::JoinSet<()>) {
    let load = Arc::new(Load::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let (load, stop) = (Arc::clone(&load), stop.clone());
        tasks.spawn(async move {
            while !*stop.borrow() {
                let sequence = load.next.fetch_add(1, Ordering::Relaxed);
                match try_send(addr, &reading(sequence)).await {
                    Some((200, answer)) if answer["message_id"].is_string() => {
                        load.acked.lock().unwrap().insert(sequence);
                    }
                    Some((503, _)) => {
                        load.unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        load.broken.fetch_add(1, Ordering::Relaxed);
                        assert!(other.is_none(), "unexpected answer under load: {other:?}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    (load, tasks)
}

/// The puller binary, its stdout collected line by line.
pub struct Puller {
    pub process: Process,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Puller {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Puller {
        let mut process = Process::spawn(
            "marchproxy-sqs-proxy puller",
            command(envs)
                .arg("puller")
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let stdout = process.child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                collected.lock().unwrap().push(line);
            }
        });
        Puller { process, lines }
    }

    /// The `sequence` of every reading printed so far.
    pub fn sequences(&self) -> BTreeSet<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|v| v["sequence"].as_u64())
            .collect()
    }

    /// SIGTERM: the batch in hand is finished (deleted) first.
    pub fn stop(&mut self) {
        self.process.signal("TERM");
        let status = self.process.wait();
        assert!(status.success(), "the puller exited with {status}");
    }
}
