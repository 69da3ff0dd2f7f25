//! Shared harness for the end-to-end tests: a real NLB on loopback ports in a temporary state
//! directory, generated clients, a module double, and waiting on conditions with a deadline.

pub mod backend;
pub mod cutter;
pub mod databases;
pub mod external;
pub mod fake_module;
pub mod standin;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use marchproxy::{auth::AttachApiKey, pb};
use marchproxy_nlb::{Config, Server, StartError};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, sync::oneshot, task::JoinHandle};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

pub type NlbClient =
    pb::nlb_service_client::NlbServiceClient<InterceptedService<Channel, AttachApiKey>>;

/// A running NLB; dropped or stopped, it shuts down.
pub struct TestNlb {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The data-plane listeners, in `Config::listen` order.
    pub listen: Vec<SocketAddr>,
    pub state_dir: PathBuf,
    pub api_key: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StartError>>>,
    /// When the NLB runs as its own process (it can then be killed with -9).
    process: Option<external::Process>,
}

/// A state directory that outlives restarts within one test.
pub fn state_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// Starts an NLB with `config` (ports are forced to loopback port 0).
pub async fn start_with(mut config: Config) -> TestNlb {
    config.grpc_listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    start_bound(config).await
}

/// Starts an NLB on exactly the addresses `config` names (a restart on the same ports).
pub async fn start_bound(config: Config) -> TestNlb {
    let api_key = config.api_key.clone();
    let state_dir = config.state_dir.clone().unwrap_or_default();
    let server = Server::bind(config).await.expect("the NLB binds");
    let (grpc, admin, listen) = (
        server.grpc_addr(),
        server.admin_addr(),
        server.listen_addrs(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let nlb = TestNlb {
        grpc,
        admin,
        listen,
        state_dir,
        api_key,
        stop: Some(stop),
        task: Some(task),
        process: None,
    };
    let client = nlb.client().await;
    eventually("the NLB answers", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            client
                .get_nlb_status(pb::GetNlbStatusRequest::default())
                .await
                .is_ok()
        }
    })
    .await;
    nlb
}

/// Starts the NLB binary `program` as its own process with `args` (gRPC, admin and one `tcp`
/// data listener on free loopback ports are added), its log in `log`.
pub async fn spawn_process(program: &str, args: &[String], log: &std::path::Path) -> TestNlb {
    let (grpc, admin, data) = (
        SocketAddr::from(([127, 0, 0, 1], external::free_port())),
        SocketAddr::from(([127, 0, 0, 1], external::free_port())),
        SocketAddr::from(([127, 0, 0, 1], external::free_port())),
    );
    let output = std::fs::File::create(log).expect("a log file");
    let mut process = external::Process::spawn(
        "marchproxy-nlb",
        std::process::Command::new(program)
            .args(["--grpc-listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--listen", &format!("tcp={data}")])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(output),
    );
    process
        .wait_listening(grpc, Duration::from_secs(30), log)
        .await;
    TestNlb {
        grpc,
        admin,
        listen: vec![data],
        state_dir: PathBuf::new(),
        api_key: None,
        stop: None,
        task: None,
        process: Some(process),
    }
}

/// Starts an NLB on `dir` with default settings.
pub async fn start(dir: &tempfile::TempDir) -> TestNlb {
    start_with(Config {
        state_dir: Some(dir.path().to_owned()),
        ..Config::local()
    })
    .await
}

impl TestNlb {
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connects to the NLB")
    }

    /// Waits until an instance of `kind` is registered and healthy; fails the test at `deadline`.
    pub async fn wait_healthy(&self, kind: pb::ModuleType, deadline: Duration) {
        let client = self.client().await;
        eventually(
            &format!("a {kind:?} module registered and healthy"),
            deadline,
            || {
                let mut client = client.clone();
                async move {
                    client
                        .list_modules(pb::ListModulesRequest::default())
                        .await
                        .map(|r| r.into_inner().modules)
                        .unwrap_or_default()
                        .iter()
                        .any(|m| {
                            m.module_type == kind as i32
                                && m.health_status == pb::HealthStatus::Healthy as i32
                        })
                }
            },
        )
        .await;
    }

    /// `GetNLBStatus` details: uptime, store, replicas, rollout status per kind ...
    pub async fn status_details(&self) -> std::collections::HashMap<String, String> {
        self.client()
            .await
            .get_nlb_status(pb::GetNlbStatusRequest::default())
            .await
            .expect("GetNLBStatus answers")
            .into_inner()
            .details
    }

    /// `UpdateNLBConfig` of one section with `data` (the keys to change).
    pub async fn update_nlb_config(
        &self,
        section: &str,
        data: serde_json::Value,
    ) -> Result<pb::UpdateNlbConfigResponse, tonic::Status> {
        self.client()
            .await
            .update_nlb_config(pb::UpdateNlbConfigRequest {
                config: Some(pb::ConfigUpdate {
                    config_type: section.into(),
                    config_data: data.to_string().into_bytes(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A client carrying the NLB's key, if it has one.
    pub async fn client(&self) -> NlbClient {
        self.client_with_key(self.api_key.as_deref()).await
    }

    pub async fn client_with_key(&self, key: Option<&str>) -> NlbClient {
        pb::nlb_service_client::NlbServiceClient::with_interceptor(
            self.channel().await,
            AttachApiKey::new(key).unwrap(),
        )
    }

    /// `kill -9` of an NLB started with [`spawn_process`].
    pub fn kill(&mut self) {
        let process = self
            .process
            .take()
            .expect("only an NLB started as a process can be killed");
        process.signal("KILL");
    }

    /// Stops the NLB and waits for it to exit cleanly.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    /// Waits for the NLB to exit by itself (a takeover), cleanly, within `deadline`.
    pub async fn exits_by_itself(mut self, deadline: Duration) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(deadline, task)
                .await
                .unwrap_or_else(|_| panic!("the NLB did not exit by itself within {deadline:?}"))
                .expect("the NLB task did not panic")
                .expect("the NLB exits without error");
        }
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the NLB stops within 10 s");
            result
                .expect("the NLB task did not panic")
                .expect("the NLB exits without error");
        }
    }
}

impl Drop for TestNlb {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits until `check` is true, polling every 20 ms; fails the test with `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A module instance as a module would register it.
pub fn instance(
    id: &str,
    kind: pb::ModuleType,
    version: &str,
    data_address: &str,
) -> pb::ModuleInstance {
    pb::ModuleInstance {
        instance_id: id.into(),
        module_type: kind as i32,
        address: "127.0.0.1:50051".into(),
        version: version.into(),
        metadata: [("data_address".to_string(), data_address.to_string())].into(),
        max_connections: 100,
        ..Default::default()
    }
}

pub fn route(
    id: &str,
    protocol: pb::Protocol,
    source: &str,
    destination: &str,
    priority: i32,
) -> pb::Route {
    pb::Route {
        route_id: id.into(),
        protocol: protocol as i32,
        source_pattern: source.into(),
        destination_pattern: destination.into(),
        priority,
        ..Default::default()
    }
}

/// A healthy heartbeat reporting `total` requests of which `failed` failed (counters since the
/// module started, as modules send them).
pub async fn heartbeat_requests(
    client: &mut NlbClient,
    id: &str,
    registration_id: &str,
    total: i64,
    failed: i64,
) {
    healthy_heartbeat(
        client,
        id,
        registration_id,
        pb::ModuleStats {
            total_requests: total,
            successful_requests: total - failed,
            failed_requests: failed,
            ..Default::default()
        },
    )
    .await;
}

/// Registers an instance; returns its registration id.
pub async fn register(
    client: &mut NlbClient,
    instance: pb::ModuleInstance,
    routes: Vec<pb::Route>,
) -> String {
    let response = client
        .register_module(pb::RegisterModuleRequest {
            instance: Some(instance),
            initial_routes: routes,
            ..Default::default()
        })
        .await
        .expect("registration succeeds")
        .into_inner();
    assert!(response.success, "{}", response.message);
    assert!(!response.registration_id.is_empty());
    response.registration_id
}

pub async fn heartbeat(
    client: &mut NlbClient,
    id: &str,
    registration: &str,
    active: i64,
) -> pb::HeartbeatResponse {
    healthy_heartbeat(
        client,
        id,
        registration,
        pb::ModuleStats {
            active_connections: active,
            ..Default::default()
        },
    )
    .await
}

/// One HEALTHY heartbeat carrying `stats`.
async fn healthy_heartbeat(
    client: &mut NlbClient,
    id: &str,
    registration: &str,
    stats: pb::ModuleStats,
) -> pb::HeartbeatResponse {
    client
        .heartbeat(pb::HeartbeatRequest {
            instance_id: id.into(),
            registration_id: registration.into(),
            status: pb::HealthStatus::Healthy as i32,
            current_stats: Some(stats),
            timestamp: None,
        })
        .await
        .expect("heartbeat answered")
        .into_inner()
}

/// The value of metric `name` in a Prometheus text `page`, on the first series that has every
/// label of `labels` (`a="x",b="y"` in any order; `""` for any).
pub fn metric_value(page: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted: Vec<String> = labels
        .split("\",")
        .filter(|pair| !pair.is_empty())
        .map(|pair| format!("{}\"", pair.trim_end_matches('"')))
        .collect();
    page.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| wanted.iter().all(|pair| line.contains(pair.as_str())))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// [`metric_value`] of `http://<addr>/metrics`; fails the test, showing the page, when absent.
pub async fn metric(addr: SocketAddr, name: &str, labels: &str) -> f64 {
    let (_, page) = http_get(addr, "/metrics").await;
    metric_value(&page, name, labels)
        .unwrap_or_else(|| panic!("no {name} with {labels} on /metrics:\n{page}"))
}

/// One plain HTTP/1.1 GET; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], b"").await
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); returns (status code,
/// body). `Host` is the address unless `headers` name one; `Content-Length` is added for a
/// non-empty body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    // The server may answer (413) and close before reading all of a large body.
    let _ = stream.write_all(&bytes).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
