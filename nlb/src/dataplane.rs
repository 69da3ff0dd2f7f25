//! The NLB's data plane: accept client connections on the `--listen` listeners, recognise the
//! protocol (or take the listener's), route to a module instance, connect (trying another
//! instance when one fails), optionally send a PROXY protocol v2 header, and copy bytes both ways
//! until either side closes, each direction shut down on its own (half-close).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use marchproxy::{
    limiter::{Subject, Verdict},
    names, pb,
    route::Flow,
    serve::Bound,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    nlb::{Nlb, stopped},
    sniff::{self, Detected, MAX_SNIFF, Sniff},
};

/// Reads a client may take to show its protocol.
const MAX_SNIFF_READS: usize = 64;
/// Idle time before TCP keepalive probes start, so peers that vanished without a FIN free their
/// slot and their instance's count.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Attempts to connect (each to another instance) before a client is turned away.
const CONNECT_ATTEMPTS: usize = 3;

/// Data-plane settings from the command line.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest wait for enough bytes to recognise the protocol.
    pub sniff_timeout: Duration,
    pub connect_timeout: Duration,
    /// Open connections across all listeners; 0 for no limit.
    pub max_connections: usize,
    /// New connections per second from one client IP (0: no limit), and the burst above it.
    pub per_source_rate: u32,
    pub per_source_burst: u32,
    /// Send a PROXY protocol v2 header to modules on every connection (routes can ask for it
    /// on their own with `metadata.proxy_protocol = "v2"`).
    pub proxy_protocol: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sniff_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_connections: 0,
            per_source_rate: 0,
            per_source_burst: 0,
            proxy_protocol: false,
        }
    }
}

/// A listener and what it serves: a named protocol, or `None` to sniff.
pub struct Listener {
    pub protocol: Option<pb::Protocol>,
    /// Send a PROXY protocol v2 header to modules for this listener's connections.
    pub proxy_protocol: bool,
    pub bound: Bound,
}

/// Shared by every connection of the data plane.
pub struct DataPlane {
    nlb: Arc<Nlb>,
    limits: Limits,
    slots: Option<Arc<Semaphore>>,
    /// Connections open now, for the drain at shutdown.
    open: AtomicI64,
    /// `nlb_bytes_total` for each direction, resolved once.
    bytes_up: prometheus::IntCounter,
    bytes_down: prometheus::IntCounter,
    closed: tokio::sync::Notify,
}

/// Keeps an instance's live count (and its gauge) up while a connection is open; a drain
/// waiting on the count is woken when it closes.
struct Live {
    count: Arc<AtomicI64>,
    gauge: prometheus::IntGauge,
    nlb: Arc<Nlb>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
        self.nlb.activity.notify_waiters();
    }
}

/// Counts a connection as open until dropped.
struct Open<'a>(&'a DataPlane);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.closed.notify_waiters();
    }
}

/// Why a connection went nowhere.
#[derive(Debug)]
enum Refusal {
    Capacity,
    RateLimited,
    UnknownProtocol,
    SniffTimeout,
    ClientGone,
    NoRoute(crate::state::NoRoute),
    ConnectFailed,
}

impl Refusal {
    fn cause(&self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::RateLimited => "rate_limited",
            Refusal::UnknownProtocol => "unknown_protocol",
            Refusal::SniffTimeout => "sniff_timeout",
            Refusal::ClientGone => "client_closed",
            Refusal::NoRoute(no) => no.label(),
            Refusal::ConnectFailed => "all_connects_failed",
        }
    }
}

impl DataPlane {
    pub fn new(nlb: Arc<Nlb>, limits: Limits) -> Arc<Self> {
        if limits.per_source_rate > 0 {
            let limit = marchproxy::limiter::Limit::try_from_wire(pb::RateLimit {
                limit_id: "per-source".into(),
                target: "*".into(),
                requests_per_second: i64::from(limits.per_source_rate),
                burst_size: i64::from(limits.per_source_burst.max(limits.per_source_rate)),
                enabled: true,
                ..Default::default()
            });
            match limit {
                Ok(limit) => {
                    nlb.source_limiter.set(limit);
                }
                Err(error) => warn!(%error, "per-source connection rate ignored"),
            }
        }
        Arc::new(DataPlane {
            slots: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections))),
            bytes_up: nlb.metrics.bytes.with_label_values(&["client_to_module"]),
            bytes_down: nlb.metrics.bytes.with_label_values(&["module_to_client"]),
            nlb,
            limits,
            open: AtomicI64::new(0),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// Accepts on every listener until shutdown, then waits up to `drain` for open connections.
    pub async fn run(self: Arc<Self>, listeners: Vec<Listener>, drain: Duration) {
        let mut accepting = JoinSet::new();
        for listener in listeners {
            accepting.spawn(Arc::clone(&self).accept(listener));
        }
        while accepting.join_next().await.is_some() {}
        let left =
            marchproxy::serve::drain(|| self.open.load(Ordering::Acquire), &self.closed, drain)
                .await;
        if left > 0 {
            warn!(left, "drain timeout: closing the NLB with connections open");
        }
    }

    async fn accept(self: Arc<Self>, listener: Listener) {
        // Accepted sockets inherit these from the listener (Linux): set once, not per connection.
        tune_listener(socket2::SockRef::from(&listener.bound.listener));
        let label = listener
            .protocol
            .map_or_else(|| "auto".to_owned(), names::protocol_name);
        let accepted = self
            .nlb
            .metrics
            .accepted
            .with_label_values(&[label.as_str()]);
        let mut shutdown = self.nlb.shutdown.clone();
        loop {
            let (stream, peer) = tokio::select! {
                result = listener.bound.listener.accept() => match result {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopped(&mut shutdown) => return,
            };
            accepted.inc();
            let plane = Arc::clone(&self);
            // IPv4 clients of a dual-stack listener as plain IPv4, so PROXY headers and CIDR
            // limits see what they expect.
            let bound = listener.bound.addr;
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let (protocol, proxy_protocol) = (listener.protocol, listener.proxy_protocol);
            tokio::spawn(async move {
                plane.open.fetch_add(1, Ordering::AcqRel);
                let _open = Open(&plane);
                if let Err(refusal) = plane
                    .serve(stream, peer, bound, protocol, proxy_protocol)
                    .await
                {
                    plane
                        .nlb
                        .metrics
                        .routing_errors
                        .with_label_values(&[refusal.cause()])
                        .inc();
                    let detail = match &refusal {
                        Refusal::NoRoute(no) => no.message(),
                        other => format!("{other:?}"),
                    };
                    debug!(%peer, cause = refusal.cause(), %detail, "connection not routed");
                }
            });
        }
    }

    async fn serve(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        listener: SocketAddr,
        protocol: Option<pb::Protocol>,
        listener_proxy: bool,
    ) -> Result<(), Refusal> {
        let _slot: Option<OwnedSemaphorePermit> = match &self.slots {
            Some(slots) => Some(
                Arc::clone(slots)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Capacity)?,
            ),
            None => None,
        };
        if let Verdict::Limited { .. } = self.nlb.source_limiter.check(&Subject {
            client_ip: Some(peer.ip()),
            ..Subject::default()
        }) {
            return Err(Refusal::RateLimited);
        }
        let mut head = Vec::new();
        let detected = match protocol {
            // Clients of these speak first and name their host (Host header, TLS SNI): read
            // it so host routes work on a named listener too. Whatever else arrives, the
            // listener's protocol stands, and the bytes read are passed on.
            Some(
                protocol @ (pb::Protocol::Http
                | pb::Protocol::Https
                | pb::Protocol::Grpc
                | pb::Protocol::Websocket),
            ) => {
                let sniffed = tokio::time::timeout(
                    self.limits.sniff_timeout,
                    read_head(&mut client, &mut head),
                )
                .await;
                if let Ok(Err(Refusal::ClientGone)) = sniffed {
                    return Err(Refusal::ClientGone);
                }
                Detected {
                    protocol,
                    label: "named",
                    name: sniffed.ok().and_then(Result::ok).and_then(|d| d.name),
                }
            }
            Some(protocol) => Detected {
                protocol,
                label: "named",
                name: None,
            },
            None => {
                tokio::time::timeout(self.limits.sniff_timeout, read_head(&mut client, &mut head))
                    .await
                    .map_err(|_| Refusal::SniffTimeout)??
            }
        };
        let flow = Flow {
            protocol: Some(detected.protocol),
            listener_port: listener.port(),
            name: detected.name.clone(),
            client_ip: Some(peer.ip()),
        };

        let mut excluded = Vec::new();
        for _ in 0..CONNECT_ATTEMPTS {
            let decision = {
                let mut state = self.nlb.state();
                state.decide_excluding(
                    &flow,
                    false,
                    Instant::now(),
                    SystemTime::now(),
                    &excluded,
                    true,
                )
            };
            let decision = decision.map_err(Refusal::NoRoute)?;
            // The decision raised the instance's live count; this lowers it however we leave.
            let kind = decision.kind.name();
            let gauge = self.nlb.metrics.active.with_label_values(&[
                kind,
                decision.version.as_str(),
                decision.instance_id.as_str(),
            ]);
            gauge.inc();
            let _live = Live {
                count: Arc::clone(&decision.live),
                gauge,
                nlb: Arc::clone(&self.nlb),
            };
            let started = Instant::now();
            let connected = tokio::time::timeout(
                self.limits.connect_timeout,
                TcpStream::connect(&decision.target_address),
            )
            .await;
            let mut upstream = match connected {
                Ok(Ok(upstream)) => upstream,
                Ok(Err(_)) | Err(_) => {
                    let ejected = self
                        .nlb
                        .state()
                        .connect_failed(&decision.instance_id, Instant::now());
                    warn!(instance = %decision.instance_id, target = %decision.target_address, ejected, "connect to module failed; trying another instance");
                    self.nlb
                        .metrics
                        .routing_errors
                        .with_label_values(&["connect_failed"])
                        .inc();
                    excluded.push(decision.instance_id);
                    continue;
                }
            };
            self.nlb
                .metrics
                .connect_seconds
                .observe(started.elapsed().as_secs_f64());
            if decision.recovering {
                self.nlb.state().connect_succeeded(&decision.instance_id);
            }
            // Small writes go out at once; keepalive comes later, for long connections only.
            let _ = upstream.set_nodelay(true);
            self.nlb
                .metrics
                .routed
                .with_label_values(&[
                    names::protocol_name(detected.protocol).as_str(),
                    kind,
                    decision.version.as_str(),
                ])
                .inc();

            let proxy_header = self.limits.proxy_protocol
                || listener_proxy
                || decision
                    .route
                    .metadata
                    .get("proxy_protocol")
                    .is_some_and(|v| v == "v2");
            let mut preamble = if proxy_header {
                // The address the client reached (not 0.0.0.0), asked of the socket only here.
                let local = if listener.ip().is_unspecified() {
                    client.local_addr().unwrap_or(listener)
                } else {
                    listener
                };
                let local = SocketAddr::new(local.ip().to_canonical(), local.port());
                marchproxy::proxy_protocol::header(peer, local)
            } else {
                Vec::new()
            };
            preamble.extend_from_slice(&head);
            if !preamble.is_empty() && upstream.write_all(&preamble).await.is_err() {
                return Ok(());
            }
            let opened = Instant::now();
            let (up, down) = crate::relay::relay(&mut client, &mut upstream, keep_alive).await;
            self.bytes_up.inc_by(up + head.len() as u64);
            self.bytes_down.inc_by(down);
            self.nlb
                .metrics
                .connection_seconds
                .observe(opened.elapsed().as_secs_f64());
            return Ok(());
        }
        Err(Refusal::ConnectFailed)
    }
}

/// Set on listeners, which accepted sockets inherit them from: small writes go out at once, and
/// dead peers are found by keepalive probes. Best-effort: a socket that refuses still works.
fn tune_listener(socket: socket2::SockRef<'_>) {
    let _ = socket.set_tcp_nodelay(true);
    keep_alive(socket);
}

/// Keepalive probes after [`KEEPALIVE_IDLE`], so a peer that vanished without a FIN frees its
/// slot. Best-effort.
fn keep_alive(socket: socket2::SockRef<'_>) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(Duration::from_secs(10));
    let _ = socket.set_tcp_keepalive(&keepalive);
}

/// Reads until the first bytes say what protocol this is.
async fn read_head(client: &mut TcpStream, head: &mut Vec<u8>) -> Result<Detected, Refusal> {
    let mut buffer = [0u8; 4096];
    // Every read re-reads the head: a client trickling a byte at a time would make that
    // quadratic, so it gets a bounded number of reads (real clients need one or two).
    for _ in 0..MAX_SNIFF_READS {
        match sniff::sniff(head) {
            Sniff::Known(detected) => return Ok(detected),
            Sniff::Unknown => return Err(Refusal::UnknownProtocol),
            Sniff::Incomplete if head.len() >= MAX_SNIFF => return Err(Refusal::UnknownProtocol),
            Sniff::Incomplete => {}
        }
        let room = buffer.len().min(MAX_SNIFF - head.len());
        let read = client
            .read(&mut buffer[..room])
            .await
            .map_err(|_| Refusal::ClientGone)?;
        if read == 0 {
            return Err(Refusal::ClientGone);
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Err(Refusal::UnknownProtocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_keepalive_and_nodelay_from_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tune_listener(socket2::SockRef::from(&listener));
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert!(socket.tcp_nodelay().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        drop(client);
    }
}
