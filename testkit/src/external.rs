//! Real servers from installed programs, started on free loopback ports in temporary
//! directories and stopped when dropped. A missing program fails the test with the command that
//! installs it (the README's test command installs them all).

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{eventually, http_request};

/// A loopback port nobody listens on right now, for a server that is told its port.
///
/// The port is taken below the kernel's ephemeral range: a port the kernel hands out for `:0`
/// can be handed out again, as the local port of some concurrent test's outgoing connection,
/// between this check and the server binding it (a CI run lost a test to exactly that). Ports
/// are handed out in turn from a start that depends on the process id, so parallel tests in one
/// binary never get the same port and two test binaries rarely start at the same place.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let below = ephemeral_range_start().clamp(FIRST_TEST_PORT + 1000, u16::MAX as u32 + 1);
    let span = below - FIRST_TEST_PORT;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (FIRST_TEST_PORT + offset) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST_TEST_PORT} and {below}")
}

/// The lowest port `free_port` hands out: above the well-known services a test machine runs.
const FIRST_TEST_PORT: u32 = 20_000;

/// The first port of Linux's ephemeral range (32768 where it cannot be read).
fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Fails the test unless `check` (a shell command) succeeds, naming `install`.
pub fn require(what: &str, check: &str, install: &str) {
    let present = Command::new("sh")
        .arg("-c")
        .arg(check)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        present,
        "{what} is missing; install it with: {install} (./scripts/test.sh does)"
    );
}

/// A self-signed P-256 certificate for `name` (also its DNS subject name) and its private key,
/// PEM files made by openssl in `dir`: (certificate, key).
pub fn self_signed_certificate(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    require(
        "openssl",
        "openssl version",
        "sudo apt-get install -y openssl",
    );
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "openssl could not make a certificate for {name}");
    (cert, key)
}

/// A child process killed (and reaped) on drop.
pub struct Process {
    pub child: Child,
    name: String,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            child,
            name: name.to_owned(),
        }
    }

    /// Starts a server quietly (no output) and waits until it accepts connections on
    /// 127.0.0.1:`port`.
    pub async fn listening(name: &str, port: u16, command: &mut Command) -> Self {
        let process = Process::spawn(name, command.stdout(Stdio::null()).stderr(Stdio::null()));
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        )
        .await;
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a `kill` name such as STOP, CONT, KILL, TERM).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -{signal} {} ({}) failed", self.pid(), self.name);
    }

    /// Waits until the process accepts connections on `addr`; if it exits first, fails at
    /// once with its exit status and the end of `log` (where its stderr goes), which says why.
    pub async fn wait_listening(&mut self, addr: SocketAddr, deadline: Duration, log: &Path) {
        let child = &mut self.child;
        let name = &self.name;
        eventually(
            &format!("{name} accepts connections on {addr}"),
            deadline,
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    let output = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = output.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    panic!(
                        "{name} exited ({status}) before listening on {addr}; the end of {}:\n{}",
                        log.display(),
                        tail.join("\n")
                    );
                }
                async move { tokio::net::TcpStream::connect(addr).await.is_ok() }
            },
        )
        .await;
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, deadline: Duration) {
    eventually(
        &format!("{addr} accepts connections"),
        deadline,
        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await;
}

/// moto's SQS-compatible server (PyPI `moto[server]`).
pub struct Moto {
    pub addr: SocketAddr,
    pub process: Process,
}

/// moto routes a request by the service in its credential scope; any signature passes.
const SQS_AUTH: &str = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0";

impl Moto {
    pub async fn start() -> Moto {
        require(
            "moto's server (an SQS-compatible queue)",
            "python3 -c 'import moto.server, flask'",
            "python3 -m pip install 'moto[server]'",
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let process = Process::listening(
            "moto_server",
            addr.port(),
            Command::new("python3")
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                .arg(addr.port().to_string()),
        )
        .await;
        let moto = Moto { addr, process };
        // Its port opens before its app answers: a first call too early gets an empty reply.
        eventually(
            "moto answers SQS calls",
            Duration::from_secs(30),
            || async { moto.try_call("Action=ListQueues").await.0 == 200 },
        )
        .await;
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One SQS query-protocol call; returns the XML answer.
    pub async fn call(&self, form: &str) -> String {
        let (status, body) = self.try_call(form).await;
        assert_eq!(status, 200, "moto answered {status}: {body}");
        body
    }

    /// One SQS query-protocol call: (status, body); status 0 when nothing came back.
    async fn try_call(&self, form: &str) -> (u16, String) {
        http_request(
            self.addr,
            "POST",
            "/",
            &[
                ("Authorization", SQS_AUTH),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            format!("{form}&Version=2012-11-05").as_bytes(),
        )
        .await
    }

    /// Creates queue `name` and returns its URL.
    pub async fn create_queue(&self, name: &str) -> String {
        let xml = self
            .call(&format!("Action=CreateQueue&QueueName={name}"))
            .await;
        xml_value(&xml, "QueueUrl").unwrap_or_else(|| panic!("no QueueUrl in {xml}"))
    }

    /// (visible, in flight) messages in the queue at `url`.
    pub async fn depth(&self, url: &str) -> (u64, u64) {
        let xml = self
            .call(&format!(
                "Action=GetQueueAttributes&QueueUrl={url}&AttributeName.1=All"
            ))
            .await;
        let attribute = |name: &str| {
            let at = xml
                .find(&format!("<Name>{name}</Name>"))
                .unwrap_or_else(|| panic!("no {name} in {xml}"));
            xml_value(&xml[at..], "Value")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no value for {name} in {xml}"))
        };
        (
            attribute("ApproximateNumberOfMessages"),
            attribute("ApproximateNumberOfMessagesNotVisible"),
        )
    }
}

fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].to_owned())
}

/// A Mosquitto MQTT broker (Debian `mosquitto`) on a free loopback port, without
/// persistence; [`Mosquitto::restart`] brings it back on the same port.
pub struct Mosquitto {
    pub port: u16,
    pub process: Process,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        require(
            "mosquitto (an MQTT broker)",
            "command -v mosquitto || test -x /usr/sbin/mosquitto",
            "sudo apt-get install -y mosquitto",
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("mosquitto.conf written");
        let process = Self::spawn(port, &config).await;
        Mosquitto { port, process, dir }
    }

    async fn spawn(port: u16, config: &std::path::Path) -> Process {
        let binary = if std::path::Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        Process::listening(
            "mosquitto",
            port,
            Command::new(binary).arg("-c").arg(config),
        )
        .await
    }

    /// Kills the broker and starts a fresh one on the same port (sessions are gone).
    pub async fn restart(&mut self) {
        self.process.signal("KILL");
        self.process.wait();
        self.process = Self::spawn(self.port, &self.dir.path().join("mosquitto.conf")).await;
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// A Redis server (Debian `redis-server`) on a free loopback port, without persistence;
/// [`Redis::restart`] brings it back on the same port.
pub struct Redis {
    pub port: u16,
    pub process: Process,
    dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Redis {
        require(
            "redis-server",
            "command -v redis-server",
            "sudo apt-get install -y redis-server",
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let process = Self::spawn(port, dir.path()).await;
        Redis { port, process, dir }
    }

    async fn spawn(port: u16, dir: &std::path::Path) -> Process {
        Process::listening(
            "redis-server",
            port,
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--port")
                .arg(port.to_string())
                .arg("--dir")
                .arg(dir),
        )
        .await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server and starts a fresh one on the same port (its data is gone).
    pub async fn restart(&mut self) {
        self.process.signal("KILL");
        self.process.wait();
        self.process = Self::spawn(self.port, self.dir.path()).await;
    }

    /// One command through `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

/// An OCI registry (Debian `docker-registry`) on a free loopback port, storing in a temporary
/// directory; optionally behind basic auth (htpasswd). Artifacts are pushed with ORAS (PyPI
/// `oras`), as `application/wasm` single-layer manifests.
pub struct OciRegistry {
    pub port: u16,
    pub process: Process,
    dir: tempfile::TempDir,
    credentials: Option<(String, String)>,
}

impl OciRegistry {
    pub async fn start(credentials: Option<(&str, &str)>) -> OciRegistry {
        require(
            "docker-registry (an OCI registry)",
            "command -v docker-registry",
            "sudo apt-get install -y docker-registry",
        );
        require(
            "ORAS for Python (pushes wasm artifacts)",
            "python3 -c 'import oras.client'",
            "python3 -m pip install oras",
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = credentials {
            require(
                "htpasswd",
                "command -v htpasswd",
                "sudo apt-get install -y apache2-utils",
            );
            let file = dir.path().join("htpasswd");
            let output = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd runs");
            std::fs::write(&file, output.stdout).expect("htpasswd file written");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).expect("registry config written");
        let process = Self::spawn(port, dir.path()).await;
        OciRegistry {
            port,
            process,
            dir,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }

    async fn spawn(port: u16, dir: &std::path::Path) -> Process {
        Process::listening(
            "docker-registry",
            port,
            Command::new("docker-registry")
                .arg("serve")
                .arg(dir.join("config.yml")),
        )
        .await
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `bytes` as `<host>/<repository>:<tag>` (an `application/wasm` layer).
    pub fn push(&self, repository_and_tag: &str, bytes: &[u8]) {
        let file = self.dir.path().join("module.wasm");
        std::fs::write(&file, bytes).expect("module written");
        let login = match &self.credentials {
            Some((user, password)) => format!(
                "c = oras.client.OrasClient(hostname={host:?}, insecure=True, auth_backend='basic')\nc.login(username={user:?}, password={password:?}, hostname={host:?}, tls_verify=False)\n",
                host = self.host()
            ),
            None => String::new(),
        };
        let script = format!(
            "import oras.client\nc = oras.client.OrasClient(hostname={host:?}, insecure=True)\n{login}r = c.push(target={target:?}, files=[{file:?} + ':application/wasm'], disable_path_validation=True)\nassert r.status_code in (200, 201), r.status_code\n",
            host = self.host(),
            target = format!("{}/{repository_and_tag}", self.host()),
            file = file.display().to_string(),
        );
        let output = Command::new("python3")
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "oras push failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn stop(&mut self) {
        self.process.signal("KILL");
        self.process.wait();
    }
}

/// An etcd cluster of several members on loopback ports (Debian `etcd-server`), each with its
/// own data directory; members can be killed (`kill -9`) and started again.
pub struct EtcdCluster {
    members: Vec<Option<Process>>,
    commands: Vec<Command>,
    client_ports: Vec<u16>,
    /// The CA that signed the members' certificates, when they speak TLS to clients.
    ca_file: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader.
    pub async fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, false).await
    }

    /// [`EtcdCluster::start`]; with `tls`, clients talk HTTPS to certificates signed by a CA of
    /// the test's own ([`EtcdCluster::ca_file`]).
    pub async fn start_with(size: usize, tls: bool) -> EtcdCluster {
        require(
            "etcd",
            "etcd --version && etcdctl version",
            "sudo apt-get install -y etcd-server etcd-client",
        );
        let dir = tempfile::tempdir().expect("a temporary directory");
        let certificate = tls.then(|| certificate_for_loopback(dir.path()));
        let scheme = if tls { "https" } else { "http" };
        let peers: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, port)| format!("m{i}=http://127.0.0.1:{port}"))
            .collect();
        let mut commands = Vec::new();
        for i in 0..size {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).expect("a log");
            let client_url = format!("{scheme}://127.0.0.1:{}", client_ports[i]);
            let peer_url = format!("http://127.0.0.1:{}", peers[i]);
            let mut command = Command::new("etcd");
            command
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "marchproxy-test"])
                .stdout(Stdio::null())
                .stderr(log);
            if let Some((_, cert, key)) = &certificate {
                command
                    .arg("--cert-file")
                    .arg(cert)
                    .arg("--key-file")
                    .arg(key);
            }
            commands.push(command);
        }
        let members = commands
            .iter_mut()
            .enumerate()
            .map(|(i, command)| Some(Process::spawn(&format!("etcd member m{i}"), command)))
            .collect();
        let cluster = EtcdCluster {
            members,
            commands,
            client_ports,
            ca_file: certificate.map(|(ca, _, _)| ca),
            _dir: dir,
        };
        for port in &cluster.client_ports {
            wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], *port)),
                Duration::from_secs(30),
            )
            .await;
        }
        eventually(
            "the etcd cluster has a leader",
            Duration::from_secs(30),
            || {
                let mut health = cluster.etcdctl();
                async move {
                    health
                        .args(["endpoint", "health"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                }
            },
        )
        .await;
        cluster
    }

    /// etcdctl for this cluster (API 3, its endpoints, its CA).
    pub fn etcdctl(&self) -> Command {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints()]);
        if let Some(ca) = &self.ca_file {
            command.arg("--cacert").arg(ca);
        }
        command
    }

    /// The CA file of a cluster started with TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// Turns authentication on, with user `root` and `password`.
    pub fn enable_auth(&self, password: &str) {
        let user = format!("root:{password}");
        for args in [
            vec!["user", "add", &user, "--interactive=false"],
            vec!["auth", "enable"],
        ] {
            let done = self
                .etcdctl()
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(done, "etcdctl {} failed", args.join(" "));
        }
    }

    /// `127.0.0.1:PORT,...` for every member.
    fn endpoints(&self) -> String {
        self.client_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Each member's client address.
    pub fn members(&self) -> Vec<SocketAddr> {
        self.client_ports
            .iter()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], *port)))
            .collect()
    }

    /// The NLB's `--store` value (with [`EtcdCluster::ca_file`] as `--store-ca-file` for TLS).
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints())
    }

    /// `etcdctl endpoint status` of every member, as JSON.
    fn statuses(&self) -> serde_json::Value {
        let output = self
            .etcdctl()
            .args(["endpoint", "status", "-w", "json"])
            .stderr(Stdio::null())
            .output()
            .expect("etcdctl runs");
        serde_json::from_slice(&output.stdout).expect("etcdctl prints JSON")
    }

    /// The index of the member that leads the cluster now.
    pub fn leader(&self) -> usize {
        let statuses = self.statuses();
        let statuses = statuses.as_array().expect("one status per member");
        statuses
            .iter()
            .find_map(|member| {
                let status = &member["Status"];
                let endpoint = member["Endpoint"].as_str()?;
                (status["header"]["member_id"] == status["leader"])
                    .then(|| {
                        self.client_ports
                            .iter()
                            .position(|port| endpoint.ends_with(&format!(":{port}")))
                    })
                    .flatten()
            })
            .expect("a member leads the cluster")
    }

    /// Compacts the history up to the current revision: watchers behind it must start over.
    pub fn compact(&self) {
        let revision = self.statuses()[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("a revision");
        let compacted = self
            .etcdctl()
            .args(["compact", &revision.to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(compacted, "etcdctl compact {revision} failed");
    }

    /// `kill -9` of member `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(member) = &self.members[index] {
            member.signal("KILL");
        }
        self.members[index] = None;
    }

    /// Starts member `index` again on its data directory.
    pub async fn restart(&mut self, index: usize) {
        self.members[index] = Some(Process::spawn(
            &format!("etcd member m{index}"),
            &mut self.commands[index],
        ));
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], self.client_ports[index])),
            Duration::from_secs(30),
        )
        .await;
    }
}

/// A CA and a certificate it signed for 127.0.0.1 (an IP subject name, as loopback servers
/// need), made by openssl in `dir`: (CA certificate, certificate, key).
fn certificate_for_loopback(
    dir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    require(
        "openssl",
        "openssl version",
        "sudo apt-get install -y openssl",
    );
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (ca_key, ca, key, request, cert, extensions) = (
        path("ca.key"),
        path("ca.pem"),
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
        path("server.ext"),
    );
    std::fs::write(&extensions, "subjectAltName=IP:127.0.0.1\n").expect("writes a file");
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &new_key,
            &["-days", "1", "-subj", "/CN=marchproxy-test-ca"],
        ]
        .concat()
        .into_iter()
        .chain(["-keyout", &ca_key, "-out", &ca])
        .collect(),
        [&["req"][..], &new_key, &["-subj", "/CN=127.0.0.1"]]
            .concat()
            .into_iter()
            .chain(["-keyout", &key, "-out", &request])
            .collect(),
        vec![
            "x509",
            "-req",
            "-days",
            "1",
            "-CAcreateserial",
            "-in",
            &request,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-extfile",
            &extensions,
            "-out",
            &cert,
        ],
    ];
    for step in steps {
        let made = Command::new("openssl")
            .args(&step)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "openssl {} failed", step.join(" "));
    }
    (ca.into(), cert.into(), key.into())
}
