//! Stand-in modules and client load for end-to-end tests: an echo module of one kind and
//! version that registers with an NLB (or several replicas) and heartbeats real stats, and
//! clients that connect through the NLB in a loop and record every answer and failure.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use marchproxy::{auth::AttachApiKey, names::ModuleKind, pb};
use marchproxy_runtime::{Runtime, RuntimeConfig, echo::EchoModule};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpSocket,
    sync::oneshot,
};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

pub type ModuleClient =
    pb::module_service_client::ModuleServiceClient<InterceptedService<Channel, AttachApiKey>>;

/// An echo module of one kind and version, answering `<version>:<line>`.
pub struct Standin {
    pub grpc: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Standin {
    pub async fn start(nlb_url: &str, kind: ModuleKind, version: &str, priority: i32) -> Standin {
        let id = format!("{kind}-{version}");
        let mut config = RuntimeConfig::local(kind, &id);
        config.nlb = Some(nlb_url.to_owned());
        config.version = version.to_owned();
        config.heartbeat_interval = Duration::from_millis(100);
        config.listen = vec![marchproxy_runtime::ListenSpec::parse("tcp=127.0.0.1:0").unwrap()];
        config.module_section = json!({ "prefix": format!("{version}:") });
        config.routes = vec![
            serde_json::from_value(
                json!({"route_id": "echo", "protocol": "tcp", "priority": priority}),
            )
            .unwrap(),
        ];
        let runtime = Runtime::bind(EchoModule::new(kind), config)
            .await
            .expect("the stand-in module binds");
        let grpc = runtime.grpc_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(runtime.run(async move {
            let _ = stopped.await;
        }));
        Standin {
            grpc,
            stop: Some(stop),
        }
    }

    pub async fn client(&self) -> ModuleClient {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::module_service_client::ModuleServiceClient::with_interceptor(
            channel,
            AttachApiKey::new(None).unwrap(),
        )
    }

    /// Changes the echo's behaviour (`fail_ratio`, `delay_ms`) through its ModuleService.
    pub async fn configure(&self, module: Value) {
        let answer = self
            .client()
            .await
            .update_config(pb::UpdateConfigRequest {
                instance_id: String::new(),
                config: Some(pb::ConfigUpdate {
                    config_type: "module".into(),
                    config_data: module.to_string().into_bytes(),
                    ..Default::default()
                }),
                validate_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.success, "{}", answer.message);
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What the clients saw.
#[derive(Default)]
pub struct Seen {
    pub answered: u64,
    pub errors: u64,
    pub failed: Vec<String>,
    /// Versions each client reached, per epoch (the test moves the epoch on).
    pub versions: BTreeMap<(u64, u8), BTreeSet<String>>,
}

/// Clients, each from its own loopback address, connecting through the NLB in a loop: one line
/// per connection.
pub struct Load {
    stop: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(target: SocketAddr, clients: u8) -> Load {
        let (stop, epoch, seen) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(Seen::default())),
        );
        let tasks = (0..clients)
            .map(|client| {
                let (stop, epoch, seen) =
                    (Arc::clone(&stop), Arc::clone(&epoch), Arc::clone(&seen));
                tokio::spawn(async move {
                    let source = Ipv4Addr::new(127, 0, 0, 10 + client);
                    while !stop.load(Ordering::Relaxed) {
                        let at = epoch.load(Ordering::SeqCst);
                        let answer = round_trip(source, target).await;
                        {
                            let mut seen = seen.lock().unwrap();
                            match answer {
                                Ok((version, ok)) => {
                                    seen.answered += 1;
                                    seen.errors += u64::from(!ok);
                                    seen.versions
                                        .entry((at, client))
                                        .or_default()
                                        .insert(version);
                                }
                                Err(why) => seen.failed.push(why),
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            epoch,
            seen,
            tasks,
        }
    }

    pub fn answered(&self) -> u64 {
        self.seen.lock().unwrap().answered
    }

    /// Requests started from now on are counted in a new epoch.
    pub fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Stops the clients; asserts none of their connections failed.
    pub async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let seen = Arc::try_unwrap(self.seen)
            .ok()
            .expect("the clients are done")
            .into_inner()
            .unwrap();
        assert!(
            seen.failed.is_empty(),
            "{} of {} client connections failed, e.g. {:?}",
            seen.failed.len(),
            seen.answered + seen.failed.len() as u64,
            seen.failed.first()
        );
        assert!(
            seen.answered > 50,
            "the clients did run ({})",
            seen.answered
        );
        seen
    }
}

/// One connection from `source`: a line out, the answer back. Ok((version, not an error)).
pub async fn round_trip(source: Ipv4Addr, target: SocketAddr) -> Result<(String, bool), String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (reader, mut writer) = stream.into_split();
    writer
        .write_all(b"hello\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(reader).read_line(&mut line),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_owned())?
    .map_err(|e| format!("read: {e}"))?;
    let (version, text) = line
        .trim_end()
        .split_once(':')
        .ok_or_else(|| format!("closed without an answer ({line:?})"))?;
    Ok((version.to_owned(), text != "ERR"))
}
