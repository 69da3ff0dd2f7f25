//! Restart without dropping a connection: a new NLB process started with `--takeover` on the
//! same `--state-dir` takes the running one's listening sockets and state, then the old one
//! stops accepting, drains what it has open and exits (what HAProxy's seamless reload and
//! Envoy's hot restart do).
//!
//! The running NLB answers on `<state-dir>/handover.sock`. The newcomer asks; the old process
//! stops changing state (its rollout stepper and disk writes pause), saves it, and sends it
//! with its registered modules and its listening sockets (SCM_RIGHTS) in one message. The
//! sockets are the same kernel objects, so connections waiting in their accept queues are
//! simply accepted by whichever process is there. Once the newcomer serves, it says `ready`
//! and the old process shuts down; if it never does (it failed to start), the old one carries
//! on as if nothing happened.
//!
//! Modules notice nothing: their registrations (ids included) move with the state, and their
//! gRPC connections move to the new process when the old one closes them.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::{
        fd::{AsFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{nlb::Nlb, store::PersistedState};

const SOCKET: &str = "handover.sock";
const ASK: &[u8] = b"take-over\n";
const READY: &[u8] = b"ready\n";
/// The old process's last word: it stops now.
const BYE: &[u8] = b"bye\n";
/// Listening sockets sent at most (gRPC, admin and the data listeners).
const MAX_LISTENERS: usize = 64;
/// How long the old process waits for the newcomer to serve.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Any other step of the exchange.
const STEP_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "another NLB is running on state directory {0} (it answers on its handover.sock); stop it, or start this one with --takeover to take its place without dropping connections"
    )]
    Running(PathBuf),
    #[error("--takeover needs --state-dir: the running NLB is found through it")]
    NoStateDir,
    #[error("taking over from the NLB on {dir} failed: {reason}; it carries on serving")]
    Failed { dir: PathBuf, reason: String },
    #[error(
        "the NLB this one replaces did not confirm that it stops ({0}); this one exits so that only one serves"
    )]
    NotConfirmed(String),
}

/// Where a listening socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Grpc,
    Admin,
    Data,
}

/// A module registration as it moves to the new process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MovedInstance {
    /// `RegisterModuleRequest` (protobuf) with the instance's current routes.
    pub registration: Vec<u8>,
    pub registration_id: String,
    pub registered_at_ms: u64,
    /// Time since its last heartbeat, so a silent module stays as close to unhealthy.
    pub silent_ms: u64,
    /// Its last heartbeat's `ModuleStats` (protobuf), if any.
    pub stats: Option<Vec<u8>>,
    /// When its last heartbeat came (Unix ms), if one did.
    pub last_heartbeat_at_ms: Option<u64>,
}

/// A client pinned to a version by rollout affinity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MovedPin {
    pub kind: String,
    pub client: std::net::IpAddr,
    pub version: String,
    pub idle_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    /// The listening sockets' roles and addresses, in the order of the passed descriptors.
    listeners: Vec<(Role, SocketAddr)>,
    state: PersistedState,
    instances: Vec<MovedInstance>,
    pins: Vec<MovedPin>,
}

/// What a newcomer got from the process it replaces.
pub struct Inherited {
    listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    pub state: PersistedState,
    pub instances: Vec<MovedInstance>,
    pub pins: Vec<MovedPin>,
    /// Told `ready` once the newcomer serves.
    old: UnixStream,
}

impl Inherited {
    /// The inherited listening socket for `role` at `addr`, if the old process had one.
    pub fn take(&mut self, role: Role, addr: SocketAddr) -> Option<tokio::net::TcpListener> {
        let at = self
            .listeners
            .iter()
            .position(|(r, a, _)| *r == role && *a == addr)?;
        let (_, _, listener) = self.listeners.remove(at);
        listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .inspect_err(
                |error| warn!(%addr, %error, "an inherited listener is unusable; binding afresh"),
            )
            .ok()
    }

    /// Tells the old process this one serves, and waits for its word that it stops. Without
    /// that word this process must not serve: the old one may carry on.
    pub async fn ready(self) -> Result<(), HandoverError> {
        for (role, addr, _) in &self.listeners {
            info!(?role, %addr, "a listener of the old NLB is not configured here: closed");
        }
        let mut old = self.old;
        tokio::task::spawn_blocking(move || {
            old.set_read_timeout(Some(STEP_WITHIN))
                .and_then(|()| old.write_all(READY))
                .map_err(|e| format!("telling it: {e}"))?;
            let mut bye = [0u8; BYE.len()];
            old.read_exact(&mut bye)
                .map_err(|e| format!("waiting for its answer: {e}"))?;
            if bye == BYE {
                Ok(())
            } else {
                Err("it answered something else".to_owned())
            }
        })
        .await
        .map_err(|e| HandoverError::NotConfirmed(e.to_string()))?
        .map_err(HandoverError::NotConfirmed)
    }
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

/// Before binding anything: with `takeover`, takes the running NLB's sockets and state;
/// without, refuses to start beside a running one.
pub async fn before_bind(
    dir: Option<&Path>,
    takeover: bool,
) -> Result<Option<Inherited>, HandoverError> {
    let Some(dir) = dir else {
        return if takeover {
            Err(HandoverError::NoStateDir)
        } else {
            Ok(None)
        };
    };
    let Ok(old) = UnixStream::connect(socket_path(dir)) else {
        // Nobody there (or a socket file left by a process that died).
        return Ok(None);
    };
    if !takeover {
        return Err(HandoverError::Running(dir.to_owned()));
    }
    let failed = |reason: String| HandoverError::Failed {
        dir: dir.to_owned(),
        reason,
    };
    tokio::task::spawn_blocking(move || ask(old))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)
        .map(Some)
}

/// The newcomer's side of the exchange (blocking).
fn ask(mut old: UnixStream) -> Result<Inherited, String> {
    old.set_read_timeout(Some(READY_WITHIN))
        .and_then(|()| old.set_write_timeout(Some(STEP_WITHIN)))
        .map_err(|e| e.to_string())?;
    old.write_all(ASK).map_err(|e| format!("asking: {e}"))?;
    let mut length = [0u8; 8];
    let mut fds = [-1 as RawFd; MAX_LISTENERS];
    let (got, fd_count) = old
        .recv_with_fd(&mut length, &mut fds)
        .map_err(|e| format!("receiving the sockets: {e}"))?;
    // SAFETY: the kernel just installed these descriptors in this process, for us alone; each
    // is owned exactly once here and closed on any failure below.
    let received: Vec<OwnedFd> = fds[..fd_count]
        .iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    // recvmsg gave them without close-on-exec: duplicates with it, so a scaling hook's shell
    // never inherits a listening socket.
    let owned = received
        .iter()
        .map(|fd| fd.try_clone())
        .collect::<Result<Vec<OwnedFd>, _>>()
        .map_err(|e| format!("keeping the sockets: {e}"))?;
    drop(received);
    if got == 0 {
        return Err("the old NLB closed the connection without an answer".into());
    }
    old.read_exact(&mut length[got..])
        .map_err(|e| format!("receiving the offer: {e}"))?;
    let length = u64::from_be_bytes(length) as usize;
    if length > 256 << 20 {
        return Err(format!("an offer of {length} bytes is not believable"));
    }
    let mut body = vec![0u8; length];
    old.read_exact(&mut body)
        .map_err(|e| format!("receiving the offer: {e}"))?;
    let offer: Offer =
        serde_json::from_slice(&body).map_err(|e| format!("the offer is unreadable: {e}"))?;
    if offer.listeners.len() != owned.len() {
        return Err(format!(
            "{} listeners announced, {} sockets received",
            offer.listeners.len(),
            owned.len()
        ));
    }
    let listeners = offer
        .listeners
        .into_iter()
        .zip(owned)
        .map(|((role, addr), fd)| (role, addr, std::net::TcpListener::from(fd)))
        .collect();
    Ok(Inherited {
        listeners,
        state: offer.state,
        instances: offer.instances,
        pins: offer.pins,
        old,
    })
}

/// A listening socket the handover offers: its role, address and a duplicate of its
/// descriptor, open as long as the offer may be made.
pub struct Offered {
    pub role: Role,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

impl Offered {
    pub fn of(role: Role, addr: SocketAddr, listener: &impl AsFd) -> std::io::Result<Self> {
        Ok(Offered {
            role,
            addr,
            fd: listener.as_fd().try_clone_to_owned()?,
        })
    }
}

/// The running NLB's side: answers newcomers on `<dir>/handover.sock` until one takes over,
/// then flips `stop`.
pub async fn serve(
    nlb: Arc<Nlb>,
    dir: PathBuf,
    listeners: Vec<Offered>,
    stop: Arc<watch::Sender<bool>>,
) {
    let path = socket_path(&dir);
    // This process just took over from another (whose socket file this is) or follows one that
    // died: either way the name is this process's now.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::UnixListener::from_std)
    {
        Ok(listener) => listener,
        Err(error) => {
            warn!(path = %path.display(), %error, "no handover socket: a restart with --takeover will not find this NLB");
            return;
        }
    };
    let listeners = Arc::new(listeners);
    let mut shutdown = nlb.shutdown.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "handover socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::nlb::stopped(&mut shutdown) => return,
        };
        // The exchange is a few blocking reads and writes, each with a timeout.
        let Ok(stream) = stream
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
        else {
            continue;
        };
        if hand_over(&nlb, stream, Arc::clone(&listeners)).await {
            info!("a new NLB process took over the listeners: no new connections here; draining");
            let _ = stop.send(true);
            return;
        }
    }
}

/// One caller of the handover socket: true once a newcomer serves in this process's place.
async fn hand_over(nlb: &Arc<Nlb>, stream: UnixStream, listeners: Arc<Vec<Offered>>) -> bool {
    let asked = tokio::task::spawn_blocking(move || {
        let mut stream = stream;
        stream.set_read_timeout(Some(STEP_WITHIN))?;
        stream.set_write_timeout(Some(STEP_WITHIN))?;
        let mut ask = [0u8; ASK.len()];
        stream.read_exact(&mut ask)?;
        Ok::<_, std::io::Error>((ask == ASK).then_some(stream))
    })
    .await;
    // Anything but a takeover request (a starting NLB only checking that this one runs).
    let Ok(Ok(Some(stream))) = asked else {
        return false;
    };
    let started = Instant::now();
    // No rollout step may be half taken when the state is saved.
    let stepping = nlb.stepping.lock().await;
    nlb.handing_over.store(true, Ordering::SeqCst);
    // Notifications of what the state already says (an operator's rollback) go from here.
    nlb.send_notifications();
    if let Err(error) = nlb.persist_now().await {
        warn!(%error, "cannot save the state before handing over; the newcomer gets it in the offer anyway");
    }
    let offer = {
        let state = nlb.state();
        Offer {
            listeners: listeners.iter().map(|l| (l.role, l.addr)).collect(),
            state: state.persisted(),
            instances: state.moving_instances(Instant::now()),
            pins: state.moving_pins(Instant::now()),
        }
    };
    drop(stepping);
    let outcome = tokio::task::spawn_blocking(move || offer_and_wait(stream, &offer, &listeners))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match outcome {
        Ok(()) => {
            info!(
                took_ms = started.elapsed().as_millis() as u64,
                "handed over"
            );
            true
        }
        Err(reason) => {
            warn!(%reason, "a takeover did not complete; this NLB carries on");
            nlb.handing_over.store(false, Ordering::SeqCst);
            false
        }
    }
}

/// Sends the offer, waits for `ready` and confirms with `bye` (blocking).
fn offer_and_wait(
    mut stream: UnixStream,
    offer: &Offer,
    listeners: &[Offered],
) -> Result<(), String> {
    let body = serde_json::to_vec(offer).map_err(|e| e.to_string())?;
    let length = (body.len() as u64).to_be_bytes();
    let fds: Vec<RawFd> = listeners
        .iter()
        .map(|l| std::os::fd::AsRawFd::as_raw_fd(&l.fd))
        .collect();
    let sent = stream
        .send_with_fd(&length, &fds)
        .map_err(|e| format!("sending the sockets: {e}"))?;
    stream
        .write_all(&length[sent..])
        .and_then(|()| stream.write_all(&body))
        .map_err(|e| format!("sending the offer: {e}"))?;
    stream
        .set_read_timeout(Some(READY_WITHIN))
        .map_err(|e| e.to_string())?;
    let mut ready = [0u8; READY.len()];
    stream
        .read_exact(&mut ready)
        .map_err(|e| format!("the newcomer did not say it serves: {e}"))?;
    if ready != READY {
        return Err("the newcomer answered something else than ready".into());
    }
    stream
        .write_all(BYE)
        .map_err(|e| format!("the newcomer is gone before the last word: {e}"))
}
