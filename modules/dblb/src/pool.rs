//! Server connections shared between clients at transaction boundaries (transaction pooling
//! for PostgreSQL). A pool holds the logged-in connections of one server for one user,
//! database and set of startup settings; a client takes one for each transaction and gives it
//! back when the server is idle again.
//!
//! Connections are only ever made by a client's own login (the servers check every client's
//! password; the DBLB holds none), so a pool never needs more connections than it has clients:
//! a login connection beyond that is closed rather than pooled, a leaving client takes one
//! idle connection with it, and the last client takes them all. Within a route's
//! `max_connections`, a login that finds the servers full closes an idle pooled connection
//! (of a pool that can spare one) to take its place.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use marchproxy::names::Endpoint;
use prometheus::IntGauge;
use tokio::{net::TcpStream, sync::Notify};

use crate::table::Lease;

/// Which connections may serve a client: the same server, user and database, and the same
/// startup settings (`options`, `client_encoding`, `DateStyle` ...; the application name
/// aside), so no client gets a connection set up for another's encoding or options.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub server: String,
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
}

pub struct Pool {
    pub route_id: String,
    idle: Mutex<VecDeque<ServerConn>>,
    /// Connections alive, idle or serving a client.
    open: AtomicUsize,
    /// Clients logged in to this pool now.
    clients: AtomicUsize,
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
        // Keep no more connections than clients: they could serve nobody else.
        while pool.spare_one(|open, clients| open > clients) {}
        pool.logins.notify_waiters();
    }
}

impl Pool {
    /// Takes a client's freshly logged-in connection: into the pool, or closed when the pool
    /// already has a connection for each of its clients.
    pub fn adopt(self: &Arc<Self>, stream: TcpStream, lease: Lease, key: Option<(u32, u32)>) {
        self.open.fetch_add(1, Ordering::AcqRel);
        let conn = ServerConn {
            stream,
            address: lease.backend.address.clone(),
            key,
            _lease: lease,
            pool: Arc::clone(self),
        };
        if self.open.load(Ordering::Acquire) > self.clients.load(Ordering::Acquire) {
            drop(conn);
            self.logins.notify_waiters();
        } else {
            self.release(conn);
        }
    }

    /// Gives back a connection whose server is idle (ReadyForQuery `I`, nothing pending).
    pub fn release(&self, conn: ServerConn) {
        self.lock().push_back(conn);
        self.idle_gauge.inc();
        self.released.notify_one();
        self.logins.notify_waiters();
    }

    /// An idle connection still open (one the server closed, or that got an unasked message
    /// such as a shutdown notice, is dropped), or None.
    fn take(&self) -> Option<ServerConn> {
        loop {
            let conn = self.lock().pop_front()?;
            self.idle_gauge.dec();
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                _ => drop(conn),
            }
        }
    }

    /// A connection for one transaction, waiting up to `wait` for one to be given back.
    pub async fn checkout(&self, wait: Duration) -> Result<ServerConn, CheckoutError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(conn) = self.take() {
                return Ok(conn);
            }
            if self.open.load(Ordering::Acquire) == 0 {
                return Err(CheckoutError::Gone);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(CheckoutError::Busy(wait));
            }
        }
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

/// Every pool, by key.
#[derive(Default)]
pub struct Pools {
    pools: DashMap<PoolKey, Arc<Pool>>,
}

impl Pools {
    /// Counts a logged-in client in the pool for `key` (made on first use). The count is taken
    /// under the map's entry lock, so [`Pools::make_room`] never forgets a pool being joined.
    pub fn join(
        &self,
        key: PoolKey,
        route_id: &str,
        logins: &Arc<Notify>,
        idle_gauge: impl FnOnce() -> IntGauge,
    ) -> PoolClient {
        let entry = self.pools.entry(key).or_insert_with(|| {
            Arc::new(Pool {
                route_id: route_id.to_owned(),
                idle: Mutex::new(VecDeque::new()),
                open: AtomicUsize::new(0),
                clients: AtomicUsize::new(0),
                released: Notify::new(),
                logins: Arc::clone(logins),
                idle_gauge: idle_gauge(),
            })
        });
        entry.clients.fetch_add(1, Ordering::AcqRel);
        PoolClient(Arc::clone(entry.value()))
    }

    /// Closes one idle connection of `routes` so a login can take its slot, from a pool that
    /// keeps another connection for its clients. Pools with no client left are forgotten.
    pub fn make_room(&self, routes: &[String]) -> bool {
        self.pools
            .retain(|_, pool| pool.clients.load(Ordering::Acquire) > 0);
        let candidates: Vec<Arc<Pool>> = self
            .pools
            .iter()
            .filter(|p| routes.contains(&p.route_id))
            .map(|p| Arc::clone(p.value()))
            .collect();
        candidates
            .iter()
            .any(|pool| pool.spare_one(|open, _| open > 1))
    }
}
