//! Server connections shared between clients at transaction boundaries (transaction pooling
//! for PostgreSQL). A pool holds the logged-in connections of one server for one user,
//! database and `options`; a client takes one for each transaction and gives it back when the
//! server is idle again. Connections are only ever made by a client's own login (the servers
//! check every client's password; the DBLB holds none), so a pool grows with logins up to the
//! route's `max_connections`, and a login that finds the servers full closes an idle pooled
//! connection to make room.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
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

impl Drop for PoolClient {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// Takes a freshly logged-in connection into the pool's count.
    pub fn adopt(
        self: &Arc<Self>,
        stream: TcpStream,
        lease: Lease,
        key: Option<(u32, u32)>,
    ) -> ServerConn {
        self.open.fetch_add(1, Ordering::AcqRel);
        ServerConn {
            stream,
            address: lease.backend.address.clone(),
            key,
            _lease: lease,
            pool: Arc::clone(self),
        }
    }

    pub fn client(self: &Arc<Self>) -> PoolClient {
        self.clients.fetch_add(1, Ordering::AcqRel);
        PoolClient(Arc::clone(self))
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

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ServerConn>> {
        // The queue is only pushed and popped under the lock; a panic cannot tear it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes one idle connection if this pool can spare it: any when no client uses the
    /// pool, else only while another connection remains for its clients.
    fn spare_one(&self) -> bool {
        let spare =
            self.clients.load(Ordering::Acquire) == 0 || self.open.load(Ordering::Acquire) > 1;
        if !spare {
            return false;
        }
        let closed = self.lock().pop_front();
        match closed {
            Some(conn) => {
                self.idle_gauge.dec();
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
    pub fn pool(
        &self,
        key: PoolKey,
        route_id: &str,
        logins: &Arc<Notify>,
        idle_gauge: impl FnOnce() -> IntGauge,
    ) -> Arc<Pool> {
        Arc::clone(
            self.pools
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(Pool {
                        route_id: route_id.to_owned(),
                        idle: Mutex::new(VecDeque::new()),
                        open: AtomicUsize::new(0),
                        clients: AtomicUsize::new(0),
                        released: Notify::new(),
                        logins: Arc::clone(logins),
                        idle_gauge: idle_gauge(),
                    })
                })
                .value(),
        )
    }

    /// Closes one idle connection of `routes` so a login can take its slot: from a pool no
    /// client uses first, then from one that keeps another connection. Pools left with no
    /// connection and no client are forgotten.
    pub fn make_room(&self, routes: &[String]) -> bool {
        self.pools.retain(|_, pool| {
            pool.open.load(Ordering::Acquire) > 0 || pool.clients.load(Ordering::Acquire) > 0
        });
        let candidates: Vec<Arc<Pool>> = self
            .pools
            .iter()
            .filter(|p| routes.contains(&p.route_id))
            .map(|p| Arc::clone(p.value()))
            .collect();
        let (unused, used): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|p| p.clients.load(Ordering::Acquire) == 0);
        unused.iter().chain(&used).any(|pool| pool.spare_one())
    }
}
