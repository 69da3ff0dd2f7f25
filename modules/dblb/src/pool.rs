//! Logged-in PostgreSQL server connections shared between clients. A pool holds the
//! connections of one user, database and set of startup settings; a client takes one for each
//! transaction (transaction pooling) or for its whole session (session pooling, with a reset
//! before the next client), and gives it back when the server is idle again.
//!
//! Where connections come from is the pool's [`Origin`]:
//! - with passthrough authentication the servers check every client's password and the DBLB
//!   holds none, so connections are only ever made by a client's own login, on one server. A
//!   pool then never needs more connections than it has clients: a login connection beyond
//!   that is closed rather than pooled, a leaving client takes one idle connection with it,
//!   and the last client takes them all;
//! - when the DBLB authenticates clients itself (`module.auth_type`), it logs connections in
//!   itself, on whichever server the route picks, whenever a client finds none idle; they
//!   outlive their clients and close after `module.server_idle_timeout_ms` unused.
//!
//! Within a route's `max_connections`, a login that finds the servers full closes an idle
//! pooled connection (of a pool that can spare one) to take its place.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use marchproxy::names::Endpoint;
use prometheus::IntGauge;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::Notify};
use tracing::debug;

use crate::{
    Dblb,
    login::{self, LoginError, Recipe},
    table::{Lease, PoolMode},
};

/// How long resetting a session-pooled connection for its next client may take.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Which connections may serve a client: the same server (for clients' own logins), listener
/// and read-only wish (for the DBLB's, which the route places), user and database, and the
/// same startup settings (`options`, `client_encoding`, `DateStyle` ...; the application name
/// aside), so no client gets a connection set up for another's encoding or options.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The server, for pools of clients' own logins; None where the DBLB logs in.
    pub server: Option<String>,
    pub listener_port: u16,
    pub read_only: bool,
    pub user: String,
    pub database: String,
    /// The other startup parameters, sorted.
    pub settings: Vec<(String, String)>,
}

/// A logged-in server connection, holding its server slot (`max_connections`) while it lives.
pub struct ServerConn {
    pub stream: TcpStream,
    pub address: Endpoint,
    /// The server's cancel key for this connection.
    pub key: Option<(u32, u32)>,
    /// When it last went back to the pool.
    idle_since: Instant,
    _lease: Lease,
    pool: Arc<Pool>,
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Ordering::AcqRel);
        // Clients waiting for a connection learn there may be none left.
        self.pool.released.notify_waiters();
    }
}

/// Why a client got no server connection for its transaction.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("too many connections: every pooled server connection stayed busy for {0:?}")]
    Busy(Duration),
    #[error(
        "the pooled server connections are gone (the server restarted or closed them); reconnect"
    )]
    Gone,
    #[error("{0}")]
    Login(#[from] LoginError),
}

impl CheckoutError {
    /// The SQLSTATE a client is told.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            CheckoutError::Busy(_) => "53300",
            CheckoutError::Gone => "08006",
            CheckoutError::Login(error) => error.sqlstate(),
        }
    }
}

/// Where a pool's connections come from.
pub enum Origin {
    /// Clients' own logins (passthrough authentication), for transaction pooling.
    ClientLogins,
    /// Logins the DBLB makes itself for clients it authenticated.
    Dblb {
        mode: PoolMode,
        /// The ParameterStatus messages of the pool's first login: what a client is told at
        /// its start, as a server would.
        greeting: Vec<u8>,
        /// How to log in one more connection: the latest client's startup and password.
        recipe: Mutex<Arc<Recipe>>,
    },
}

pub struct Pool {
    pub route_id: String,
    pub origin: Origin,
    idle: Mutex<VecDeque<ServerConn>>,
    /// Connections alive, idle or serving a client.
    open: AtomicUsize,
    /// Clients logged in to this pool now.
    clients: AtomicUsize,
    /// Logins the DBLB is making for this pool now (it keeps its idle connections meanwhile:
    /// it is about to take them).
    logging_in: AtomicUsize,
    released: Notify,
    /// The DBLB's "a server slot may be free" signal: logins waiting for a full server look
    /// again at idle connections they may close.
    logins: Arc<Notify>,
    idle_gauge: IntGauge,
}

/// A client counted in its pool while it is connected.
pub struct PoolClient(Arc<Pool>);

impl std::ops::Deref for PoolClient {
    type Target = Arc<Pool>;

    fn deref(&self) -> &Arc<Pool> {
        &self.0
    }
}

impl Drop for PoolClient {
    fn drop(&mut self) {
        let pool = &self.0;
        pool.clients.fetch_sub(1, Ordering::AcqRel);
        if matches!(pool.origin, Origin::ClientLogins) {
            // Keep no more connections than clients: they could serve nobody else.
            while pool.spare_one(|open, clients| open > clients) {}
        }
        pool.logins.notify_waiters();
    }
}

impl Pool {
    pub fn new(
        route_id: &str,
        origin: Origin,
        logins: &Arc<Notify>,
        idle_gauge: IntGauge,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            route_id: route_id.to_owned(),
            origin,
            idle: Mutex::new(VecDeque::new()),
            open: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            logging_in: AtomicUsize::new(0),
            released: Notify::new(),
            logins: Arc::clone(logins),
            idle_gauge,
        })
    }

    /// A connection of this pool, counted in `open` by the caller.
    fn wrap(
        self: &Arc<Self>,
        stream: TcpStream,
        lease: Lease,
        key: Option<(u32, u32)>,
    ) -> ServerConn {
        ServerConn {
            stream,
            address: lease.backend.address.clone(),
            key,
            idle_since: Instant::now(),
            _lease: lease,
            pool: Arc::clone(self),
        }
    }

    /// Takes a freshly logged-in connection: into the pool, or, for clients' own logins,
    /// closed when the pool already has a connection for each of its clients.
    pub fn adopt(self: &Arc<Self>, stream: TcpStream, lease: Lease, key: Option<(u32, u32)>) {
        self.open.fetch_add(1, Ordering::AcqRel);
        let conn = self.wrap(stream, lease, key);
        if matches!(self.origin, Origin::ClientLogins)
            && self.open.load(Ordering::Acquire) > self.clients.load(Ordering::Acquire)
        {
            drop(conn);
            self.logins.notify_waiters();
        } else {
            self.release(conn);
        }
    }

    /// Whether clients are served by the whole session rather than by the transaction.
    pub fn holds_sessions(&self) -> bool {
        matches!(
            self.origin,
            Origin::Dblb {
                mode: PoolMode::Session,
                ..
            }
        )
    }

    /// Gives back a connection whose server is idle (ReadyForQuery `I`, nothing pending).
    pub fn release(&self, mut conn: ServerConn) {
        conn.idle_since = Instant::now();
        self.lock().push_back(conn);
        self.idle_gauge.inc();
        self.released.notify_one();
        self.logins.notify_waiters();
    }

    /// An idle connection still open (one the server closed, or that got an unasked message
    /// such as a shutdown notice, is dropped), or None. The most recently used goes first, so
    /// under light load the others stay idle long enough to be closed.
    fn take(&self) -> Option<ServerConn> {
        loop {
            let conn = self.lock().pop_back()?;
            self.idle_gauge.dec();
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                _ => drop(conn),
            }
        }
    }

    /// A connection for one transaction (or session), waiting up to `wait` for one to be
    /// given back. Where the DBLB logs in itself, a client that finds none idle gets a new
    /// login while the pool has fewer connections than clients and a server has room;
    /// otherwise it waits for one of the pool's own to come back (or, with none, for room).
    pub async fn checkout(
        self: &Arc<Self>,
        dblb: &Dblb,
        wait: Duration,
    ) -> Result<ServerConn, CheckoutError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = self.released.notified();
            let room = dblb.freed().notified();
            tokio::pin!(released, room);
            released.as_mut().enable();
            room.as_mut().enable();
            if let Some(conn) = self.take() {
                return Ok(conn);
            }
            match &self.origin {
                Origin::ClientLogins if self.open.load(Ordering::Acquire) == 0 => {
                    return Err(CheckoutError::Gone);
                }
                Origin::Dblb { recipe, .. } => {
                    if let Some(reservation) = LoggingIn::reserve(self) {
                        let recipe = Arc::clone(&recipe.lock().unwrap_or_else(|e| e.into_inner()));
                        match login::log_in(dblb, &recipe, false).await? {
                            Some(login) => {
                                reservation.keep();
                                return Ok(self.wrap(login.stream, login.lease, login.key));
                            }
                            None => reservation.servers_full(),
                        }
                    }
                }
                _ => {}
            }
            // A transaction pool with connections of its own waits for one to come back; a
            // session pool (whose connections come back only as sessions end) or one with
            // none also waits for room on a server.
            let waited = if self.open.load(Ordering::Acquire) == 0 || self.holds_sessions() {
                tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        () = released => {}
                        () = room => {}
                    }
                })
                .await
            } else {
                tokio::time::timeout_at(deadline, released).await
            };
            if waited.is_err() {
                return Err(CheckoutError::Busy(wait));
            }
        }
    }

    /// The latest client's way in: later logins use its startup and password.
    pub fn update_recipe(&self, newer: Arc<Recipe>) {
        if let Origin::Dblb { recipe, .. } = &self.origin {
            *recipe.lock().unwrap_or_else(|e| e.into_inner()) = newer;
        }
    }

    /// Gives back a session-pooled connection once `DISCARD ALL` has reset it for the next
    /// client (PgBouncer's `server_reset_query`); a connection that fails the reset is closed.
    pub fn reset_and_release(self: &Arc<Self>, conn: ServerConn) {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let mut conn = conn;
            let reset = tokio::time::timeout(RESET_TIMEOUT, reset(&mut conn.stream)).await;
            match reset {
                Ok(Ok(())) => pool.release(conn),
                Ok(Err(error)) => {
                    debug!(server = %conn.address, %error, "a pooled connection failed its reset; closed")
                }
                Err(_) => {
                    debug!(server = %conn.address, "a pooled connection did not answer its reset; closed")
                }
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<ServerConn>> {
        // The queue is only pushed and popped under the lock; a panic cannot tear it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes one idle connection when `spare(open, clients)` says the pool can do without
    /// it. Decided and done under the idle lock, so two callers never both take the last one.
    fn spare_one(&self, spare: impl Fn(usize, usize) -> bool) -> bool {
        let mut idle = self.lock();
        if !spare(
            self.open.load(Ordering::Acquire),
            self.clients.load(Ordering::Acquire),
        ) {
            return false;
        }
        match idle.pop_front() {
            Some(conn) => {
                self.idle_gauge.dec();
                // Dropped under the lock, so `open` is current for the next caller.
                drop(conn);
                true
            }
            None => false,
        }
    }
}

/// A login in progress for a pool: counted in its open connections (so concurrent checkouts
/// do not log in more than it has clients) and in its logins, until it is kept as a
/// connection or fails, or the checkout making it is dropped.
struct LoggingIn<'a> {
    pool: &'a Pool,
    kept: bool,
    /// The servers had no room: nobody else can log in either, so nobody is woken to try.
    full: bool,
}

impl<'a> LoggingIn<'a> {
    /// A reservation, if the pool has fewer connections than clients.
    fn reserve(pool: &'a Pool) -> Option<Self> {
        let clients = pool.clients.load(Ordering::Acquire);
        pool.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < clients).then_some(open + 1)
            })
            .ok()?;
        pool.logging_in.fetch_add(1, Ordering::AcqRel);
        Some(LoggingIn {
            pool,
            kept: false,
            full: false,
        })
    }

    /// The login became a connection, which now counts itself.
    fn keep(mut self) {
        self.kept = true;
    }

    fn servers_full(mut self) {
        self.full = true;
    }
}

impl Drop for LoggingIn<'_> {
    fn drop(&mut self) {
        self.pool.logging_in.fetch_sub(1, Ordering::AcqRel);
        if !self.kept {
            self.pool.open.fetch_sub(1, Ordering::AcqRel);
            if !self.full {
                // Clients that waited because this login counted as a connection (it failed
                // or was given up) may make their own.
                self.pool.released.notify_waiters();
            }
        }
    }
}

/// Sends `DISCARD ALL` and reads up to its answer and the ReadyForQuery after it, which must
/// say idle. Answers still due to the client that left come first and are skipped; a server
/// inside a transaction refuses the reset, and one still waiting for COPY data or a Sync
/// never answers it (the caller's timeout closes the connection).
async fn reset(stream: &mut TcpStream) -> std::io::Result<()> {
    const QUERY: &[u8] = b"DISCARD ALL\0";
    stream.write_all(&login::message(b'Q', &[QUERY])).await?;
    let mut answer = bytes::BytesMut::with_capacity(256);
    let mut discarded = false;
    loop {
        let (kind, body) = login::read_message(stream, &mut answer).await?;
        match (kind, body.first()) {
            (b'C', _) if &body[..] == QUERY => discarded = true,
            (b'Z', Some(b'I')) if discarded => return Ok(()),
            (b'Z', _) if discarded => break,
            (b'E', _) => break,
            _ => {}
        }
    }
    Err(std::io::Error::other(
        "the server did not reset the session",
    ))
}

/// Every pool, by key.
#[derive(Default)]
pub struct Pools {
    pools: DashMap<PoolKey, Arc<Pool>>,
}

impl Pools {
    /// Counts a logged-in client in the pool for `key`, made by `new` on first use. The count
    /// is taken under the map's entry lock, so [`Pools::make_room`] never forgets a pool
    /// being joined.
    pub fn join(&self, key: PoolKey, new: impl FnOnce() -> Arc<Pool>) -> PoolClient {
        let entry = self.pools.entry(key).or_insert_with(new);
        entry.clients.fetch_add(1, Ordering::AcqRel);
        PoolClient(Arc::clone(entry.value()))
    }

    /// Joins the pool for `key` if it exists.
    pub fn join_existing(&self, key: &PoolKey) -> Option<PoolClient> {
        let entry = self.pools.get(key)?;
        entry.clients.fetch_add(1, Ordering::AcqRel);
        Some(PoolClient(Arc::clone(entry.value())))
    }

    /// Closes one idle connection of `routes` so a login can take its slot, from a pool that
    /// keeps another connection for its clients (or has none). Pools with neither clients nor
    /// connections are forgotten.
    pub fn make_room(&self, routes: &[String]) -> bool {
        self.forget_unused();
        let candidates: Vec<Arc<Pool>> = self
            .pools
            .iter()
            .filter(|p| routes.contains(&p.route_id))
            .map(|p| Arc::clone(p.value()))
            .collect();
        candidates
            .iter()
            .filter(|pool| pool.logging_in.load(Ordering::Acquire) == 0)
            .any(|pool| pool.spare_one(|open, clients| open > 1 || clients == 0))
    }

    /// Closes the DBLB's logins idle for longer than `timeout`; returns how many.
    pub fn close_idle(&self, timeout: Duration) -> usize {
        let mut closed = 0;
        for pool in self.pools.iter() {
            if matches!(pool.origin, Origin::ClientLogins) {
                continue;
            }
            let mut idle = pool.lock();
            let before = idle.len();
            idle.retain(|conn| conn.idle_since.elapsed() < timeout);
            let gone = before - idle.len();
            pool.idle_gauge.sub(gone as i64);
            closed += gone;
        }
        self.forget_unused();
        closed
    }

    fn forget_unused(&self) {
        self.pools.retain(|_, pool| {
            pool.clients.load(Ordering::Acquire) > 0 || pool.open.load(Ordering::Acquire) > 0
        });
    }
}
