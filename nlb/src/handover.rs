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
        fd::{FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{nlb::Nlb, store::PersistedState};

const SOCKET: &str = "handover.sock";
const ASK: &[u8] = b"take-over\n";
const READY: &[u8] = b"ready\n";
/// Listening sockets sent at most (gRPC, admin and the data listeners).
const MAX_LISTENERS: usize = 64;
/// How long the old process waits for the newcomer to serve.
const READY_WITHIN: Duration = Duration::from_secs(60);

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
}

#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    /// The listening sockets' roles and addresses, in the order of the passed descriptors.
    listeners: Vec<(Role, SocketAddr)>,
    state: PersistedState,
    instances: Vec<MovedInstance>,
}

/// What a newcomer got from the process it replaces.
pub struct Inherited {
    listeners: Vec<(Role, SocketAddr, std::net::TcpListener)>,
    pub state: PersistedState,
    pub instances: Vec<MovedInstance>,
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

    /// Tells the old process this one serves: it stops accepting and drains.
    pub fn ready(mut self) {
        if let Err(error) = self.old.write_all(READY) {
            warn!(%error, "the old NLB did not hear that this one serves; it stops when its handover wait ends");
        }
        // Sockets nobody configured any more close here, in this process; the old one closes
        // its copies as it stops.
        for (role, addr, _) in &self.listeners {
            info!(?role, %addr, "a listener of the old NLB is not configured here: closed");
        }
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
    let path = socket_path(dir);
    let Ok(old) = UnixStream::connect(&path) else {
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
}

/// The newcomer's side of the exchange (blocking).
fn ask(mut old: UnixStream) -> Result<Option<Inherited>, String> {
    old.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    old.write_all(ASK).map_err(|e| format!("asking: {e}"))?;
    let mut length = [0u8; 8];
    let mut fds = [0 as RawFd; MAX_LISTENERS];
    let (got, fd_count) = old
        .recv_with_fd(&mut length, &mut fds)
        .map_err(|e| format!("receiving the sockets: {e}"))?;
    // Owned at once, so they close on any failure below.
    // SAFETY: the kernel just installed these descriptors in this process for us alone.
    let owned: Vec<OwnedFd> = fds[..fd_count]
        .iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
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
    old.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(Some(Inherited {
        listeners,
        state: offer.state,
        instances: offer.instances,
        old,
    }))
}

/// The running NLB's side: answers newcomers on `<dir>/handover.sock` until one takes over,
/// then flips `stop`.
pub async fn serve(
    nlb: Arc<Nlb>,
    dir: PathBuf,
    listeners: Vec<(Role, SocketAddr, RawFd)>,
    stop: Arc<watch::Sender<bool>>,
) {
    let path = socket_path(&dir);
    // A newcomer that took over from another process left its own socket here: this process is
    // that newcomer now, and binds a fresh one under the same name.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(path = %path.display(), %error, "no handover socket: a restart with --takeover will not find this NLB");
            return;
        }
    };
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%error, "no handover socket");
            return;
        }
    };
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
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        if hand_over(&nlb, stream, &listeners).await {
            info!("a new NLB process took over the listeners: no new connections here; draining");
            let _ = stop.send(true);
            return;
        }
    }
}

/// One newcomer: true once it serves in this process's place.
async fn hand_over(
    nlb: &Arc<Nlb>,
    stream: UnixStream,
    listeners: &[(Role, SocketAddr, RawFd)],
) -> bool {
    nlb.handing_over.store(true, Ordering::SeqCst);
    // What is on disk is what moves: a change made here from now on would be lost.
    if let Err(error) = nlb.persist_now().await {
        warn!(%error, "cannot save the state before handing over; the newcomer gets it in the offer anyway");
    }
    let offer = {
        let state = nlb.state();
        Offer {
            listeners: listeners
                .iter()
                .map(|(role, addr, _)| (*role, *addr))
                .collect(),
            state: state.persisted(),
            instances: state.moving_instances(),
        }
    };
    let fds: Vec<RawFd> = listeners.iter().map(|(_, _, fd)| *fd).collect();
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || offer_and_wait(stream, &offer, &fds))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match outcome {
        Ok(()) => {
            info!(
                took_ms = started.elapsed().as_millis() as u64,
                at = ?SystemTime::now(),
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

/// Sends the offer and waits for `ready` (blocking).
fn offer_and_wait(mut stream: UnixStream, offer: &Offer, fds: &[RawFd]) -> Result<(), String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut ask = [0u8; ASK.len()];
    stream
        .read_exact(&mut ask)
        .map_err(|e| format!("reading the request: {e}"))?;
    if ask != ASK {
        return Err("not a takeover request".into());
    }
    let body = serde_json::to_vec(offer).map_err(|e| e.to_string())?;
    let length = (body.len() as u64).to_be_bytes();
    let sent = stream
        .send_with_fd(&length, fds)
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
    if ready == READY {
        Ok(())
    } else {
        Err("the newcomer answered something else than ready".into())
    }
}
