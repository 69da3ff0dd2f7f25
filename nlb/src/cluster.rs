//! Several NLB replicas as one load balancer: their state lives in etcd (`--store etcd://...`).
//!
//! Keys under the prefix (default `/marchproxy/`):
//! - `operator/{routes,config,scale,weights,previous,promotions,events}/NAME`: what operators
//!   set, one key per item, written with compare-and-swap transactions on each key's revision,
//!   so two replicas racing on the same item never lose an update silently (the loser answers
//!   `ABORTED` after taking the winner's state);
//! - `instances/ID`: a module registration under a lease as long as the expiry timeout, and
//!   `alive/ID` under a lease as long as the unhealthy timeout; a heartbeat at any replica
//!   renews both (no write per heartbeat), so every replica sees a silent module turn
//!   unhealthy, then disappear, when its leases run out;
//! - `replicas/ID` under each replica's own lease, and `leader`: the replica that runs the
//!   gradual-promotion stepper (whoever creates the key first; the next takes over when its
//!   lease ends).
//!
//! Every replica loads the prefix once, then watches from the next revision and applies each
//! change to its state (bursts coalesced for a few milliseconds); after a broken watch it
//! watches again from the last revision it saw, or loads everything again when that revision
//! was compacted. Cut off from etcd, a replica keeps routing with what it has and refuses
//! control-plane writes with `UNAVAILABLE`; it loads everything again when etcd answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use prometheus::{Histogram, HistogramOpts, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    error::NlbError,
    nlb::{Nlb, stopped},
    settings::Settings,
    state::{Leases, unix_ms},
    store::{PersistedState, SharedInstance, SharedStats},
};

/// How long a replica's own lease lasts without renewal: the time before a dead replica's
/// leadership passes to another.
const REPLICA_TTL_SECONDS: i64 = 5;
/// Changes arriving this close together are applied together (a registration storm is applied
/// in batches; a lone change waits no longer than this).
const COALESCE: Duration = Duration::from_millis(1);

/// Where the store is and how to reach it (`--store`, `--store-prefix` and friends).
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub user: Option<(String, String)>,
    pub ca_file: Option<std::path::PathBuf>,
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot reach etcd at {endpoints}: {source}; check --store and that the etcd members run"
    )]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("cannot read the TLS file {path}: {source}")]
    Tls {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the state in etcd under {prefix} is unusable: {reason}; fix or delete that key")]
    Corrupt { prefix: String, reason: String },
}

/// What this replica knows the store holds, and how far its own changes got there.
#[derive(Default)]
struct Synced {
    /// Operator keys (relative to the prefix) with their values and revisions.
    known: BTreeMap<String, Known>,
    /// The state generation last written (or taken from the store).
    generation: u64,
    /// Generations above `.0` up to `.1` were dropped for a concurrent change.
    discarded: (u64, u64),
    /// The newest revision of each `instances/ID` key seen or written here: older events
    /// (echoes of this replica's own earlier writes) are not applied over newer state.
    instance_revisions: BTreeMap<String, i64>,
}

struct Known {
    value: serde_json::Value,
    revision: i64,
}

impl Synced {
    /// The local state now holds the store's view at `generation`: local changes up to it
    /// that were not written are gone, and their callers must hear so.
    fn took_store_view(&mut self, generation: u64) {
        if generation > self.generation {
            let (above, upto) = self.discarded;
            self.discarded = if upto >= self.generation && upto > above {
                (above.min(self.generation), generation)
            } else {
                (self.generation, generation)
            };
            self.generation = generation;
        }
    }
}

/// Values as stored: who wrote them and when, around the value itself.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    at_ms: u64,
    by: String,
    value: T,
}

/// A registration to write, with its leases when it has some already.
type Unwritten = (SharedInstance, Option<Leases>);

/// What became of a heartbeat's leases.
pub enum Renewal {
    Renewed,
    /// The registration ran out: the module must register again.
    Expired,
    /// The store did not answer: another replica may reach it.
    StoreAway(NlbError),
}

/// What a change in the store does to this replica.
enum Change {
    Operator {
        key: String,
        value: Option<serde_json::Value>,
        revision: i64,
    },
    Instance {
        id: String,
        record: Option<(SharedInstance, i64)>,
        revision: i64,
    },
    Alive {
        id: String,
        /// The registration it belongs to and the liveness lease, or gone.
        lease: Option<(String, i64)>,
    },
    Replica {
        id: String,
        present: bool,
    },
    /// Stats of a heartbeat another replica received.
    Stats {
        id: String,
        record: SharedStats,
    },
    Leader(Option<String>),
}

/// The store's metrics, on the NLB's `/metrics`.
pub struct ClusterMetrics {
    request_seconds: prometheus::HistogramVec,
    watch_lag: Histogram,
    leader: IntGauge,
    replicas: IntGauge,
}

impl ClusterMetrics {
    fn new() -> Self {
        let buckets = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        // Fixed names and labels: construction cannot fail.
        ClusterMetrics {
            request_seconds: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "nlb_store_request_duration_seconds",
                    "etcd requests by operation (txn, get, put, keepalive, grant)",
                )
                .buckets(buckets.clone()),
                &["operation"],
            )
            .expect("fixed metric"),
            watch_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "nlb_store_watch_lag_seconds",
                    "From a write at any replica to its change applied here",
                )
                .buckets(buckets),
            )
            .expect("fixed metric"),
            leader: IntGauge::new(
                "nlb_store_leader",
                "1 while this replica runs the rollout stepper",
            )
            .expect("fixed metric"),
            replicas: IntGauge::new("nlb_cluster_replicas", "NLB replicas alive in the store")
                .expect("fixed metric"),
        }
    }

    pub fn register(&self, registry: &Registry) {
        let metrics: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(self.request_seconds.clone()),
            Box::new(self.watch_lag.clone()),
            Box::new(self.leader.clone()),
            Box::new(self.replicas.clone()),
        ];
        for metric in metrics {
            if let Err(error) = registry.register(metric) {
                warn!(%error, "store metric not registered");
            }
        }
    }
}

/// This replica's handle on the shared store.
pub struct Cluster {
    client: Client,
    prefix: String,
    endpoints: String,
    pub replica_id: String,
    /// Settings from flags and file: what config sections in the store apply over.
    base: Settings,
    synced: tokio::sync::Mutex<Synced>,
    /// The replica's own lease (0 until granted).
    replica_lease: AtomicI64,
    leader: AtomicBool,
    replicas: Mutex<BTreeSet<String>>,
    /// When each instance's stats were last passed on to the leader.
    stats_passed: Mutex<std::collections::HashMap<String, Instant>>,
    /// A write failed for want of etcd: load everything again once it answers.
    reload_needed: AtomicBool,
    /// The store's revision at the last full load.
    loaded_at: AtomicI64,
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Connects (trying every endpoint) and names this replica.
    pub async fn connect(
        options: EtcdOptions,
        base: Settings,
        replica_id: String,
    ) -> Result<Self, ClusterError> {
        let endpoints = options.endpoints.join(",");
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user, password);
        }
        if options.ca_file.is_some() || options.cert_file.is_some() {
            let read = |path: &std::path::PathBuf| {
                std::fs::read(path).map_err(|source| ClusterError::Tls {
                    path: path.clone(),
                    source,
                })
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca_file {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&options.cert_file, &options.key_file) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            connect = connect.with_tls(tls);
        }
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|source| ClusterError::Connect {
                endpoints: endpoints.clone(),
                source,
            })?;
        Ok(Cluster {
            client,
            prefix: options.prefix,
            endpoints,
            replica_id,
            base,
            synced: tokio::sync::Mutex::new(Synced::default()),
            replica_lease: AtomicI64::new(0),
            leader: AtomicBool::new(false),
            replicas: Mutex::new(BTreeSet::new()),
            stats_passed: Mutex::default(),
            reload_needed: AtomicBool::new(false),
            loaded_at: AtomicI64::new(0),
            metrics: ClusterMetrics::new(),
        })
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Whether this replica runs the gradual-promotion stepper now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The replicas alive in the store, this one included once it is known there.
    pub fn replicas(&self) -> Vec<String> {
        lock(&self.replicas).iter().cloned().collect()
    }

    fn key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    /// A heartbeat this replica could not pass on to etcd, in words for the module.
    fn heartbeat_not_passed(&self, error: &etcd_client::Error) -> NlbError {
        NlbError::Unavailable(format!(
            "this NLB replica cannot reach the state store (etcd at {}) to renew the registration ({error}); heartbeat another replica",
            self.endpoints
        ))
    }

    /// A failed etcd call, in words that say what to do.
    fn store_failed(&self, error: &etcd_client::Error) -> NlbError {
        if let etcd_client::Error::GRpcStatus(status) = error {
            let refused = matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || status.message().contains("user name")
                || status.message().contains("authentication");
            if refused {
                return NlbError::Unavailable(format!(
                    "etcd at {} refused this NLB ({}): give --store-auth USER:PASSWORD of a user that may read and write {}",
                    self.endpoints,
                    status.message(),
                    self.prefix
                ));
            }
        }
        NlbError::Unavailable(format!(
            "the state store (etcd at {}) is unreachable ({error}); the change is not kept: retry once it is back",
            self.endpoints
        ))
    }

    fn envelope<T: Serialize>(&self, value: T) -> Vec<u8> {
        // Plain data: serialising it cannot fail.
        serde_json::to_vec(&Envelope {
            at_ms: unix_ms(SystemTime::now()),
            by: self.replica_id.clone(),
            value,
        })
        .expect("serialisable value")
    }

    fn timed(&self, operation: &str, since: Instant) {
        self.metrics
            .request_seconds
            .with_label_values(&[operation])
            .observe(since.elapsed().as_secs_f64());
    }

    /// Loads everything under the prefix into `nlb`'s state; returns the store's revision.
    /// Local changes not yet stored are replaced by the store's view.
    pub async fn load(&self, nlb: &Nlb) -> Result<i64, NlbError> {
        let mut synced = self.synced.lock().await;
        self.load_locked(nlb, &mut synced).await
    }

    async fn load_locked(&self, nlb: &Nlb, synced: &mut Synced) -> Result<i64, NlbError> {
        let since = Instant::now();
        let response = self
            .client
            .kv_client()
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.store_failed(&e))?;
        self.timed("get", since);
        let revision = response.header().map_or(0, |h| h.revision());
        let changes: Vec<Change> = response
            .kvs()
            .iter()
            .filter_map(|kv| self.decode(kv, EventType::Put, false))
            .collect();
        let mut known = BTreeMap::new();
        let mut instances = BTreeMap::new();
        let mut alive = BTreeMap::new();
        let mut replicas = BTreeSet::new();
        let mut leader = None;
        let mut instance_revisions = BTreeMap::new();
        for change in changes {
            match change {
                Change::Operator {
                    key,
                    value: Some(value),
                    revision,
                } => {
                    known.insert(key, Known { value, revision });
                }
                Change::Instance {
                    id,
                    record: Some(record),
                    revision,
                } => {
                    instance_revisions.insert(id.clone(), revision);
                    instances.insert(id, record);
                }
                Change::Alive {
                    id,
                    lease: Some(lease),
                } => {
                    alive.insert(id, lease);
                }
                Change::Replica { id, present: true } => {
                    replicas.insert(id);
                }
                Change::Leader(id) => leader = id,
                _ => {}
            }
        }
        let persisted = join(&known).map_err(|reason| {
            NlbError::Unavailable(format!("the state in etcd is unusable: {reason}"))
        })?;
        {
            let now = Instant::now();
            let mut state = nlb.state();
            state.adopt(persisted, &self.base).map_err(|reason| {
                NlbError::Unavailable(format!("the state in etcd is unusable: {reason}"))
            })?;
            // Registrations the store no longer has ran out (or left) while this replica
            // was away; ones never written yet stay and are written next.
            let gone: Vec<String> = state
                .instances
                .values()
                .filter(|i| i.leases.is_some() && !instances.contains_key(&i.id))
                .map(|i| i.id.clone())
                .collect();
            for id in gone {
                state.forget(&id);
            }
            for (id, (record, lease)) in instances {
                let registration_id = record.registration_id.clone();
                let liveness = alive
                    .get(&id)
                    .filter(|(registration, _)| *registration == registration_id);
                let leases = Leases {
                    registration: lease,
                    liveness: liveness.map_or(0, |(_, lease)| *lease),
                    alive: liveness.is_some(),
                };
                if let Err(error) = state.mirror(record, leases, now) {
                    warn!(instance = %id, %error, "a shared registration is unusable: skipped");
                    continue;
                }
                state.set_alive(&id, &registration_id, liveness.map(|(_, lease)| *lease));
            }
            synced.took_store_view(state.generation);
        }
        synced.known = known;
        synced.instance_revisions = instance_revisions;
        self.metrics.replicas.set(replicas.len() as i64);
        *lock(&self.replicas) = replicas;
        self.leader.store(
            leader.as_deref() == Some(self.replica_id.as_str()),
            Ordering::SeqCst,
        );
        self.metrics.leader.set(i64::from(self.is_leader()));
        self.reload_needed.store(false, Ordering::SeqCst);
        self.loaded_at.store(revision, Ordering::SeqCst);
        nlb.activity.notify_waiters();
        Ok(revision)
    }

    /// Writes what changed in `nlb`'s state since the last write: operator keys with
    /// compare-and-swap, registrations (granting their leases when new).
    pub async fn write(&self, nlb: &Nlb) -> Result<(), NlbError> {
        let generation = nlb.state().generation;
        let mut synced = self.synced.lock().await;
        if self.reload_needed.load(Ordering::SeqCst) {
            // Changes refused while etcd was away must not reach it later: the store's state
            // first, which drops them (and this one with them).
            self.load_locked(nlb, &mut synced).await?;
            if generation <= synced.discarded.1 && generation > synced.discarded.0 {
                return Err(NlbError::Unavailable(
                    "this NLB replica was catching up with the state store (etcd) after losing it; the change is not kept: retry".into(),
                ));
            }
        }
        let dirty = !nlb.state().shared_dirty.is_empty();
        if synced.generation >= generation && !dirty {
            return check_kept(&synced, generation);
        }
        self.write_locked(nlb, &mut synced).await?;
        check_kept(&synced, generation)
    }

    async fn write_locked(&self, nlb: &Nlb, synced: &mut Synced) -> Result<(), NlbError> {
        // A race lost to a replica that wrote the same values loses nothing: write the rest
        // (registrations) again.
        for _ in 0..3 {
            if !self.write_once(nlb, synced).await? {
                break;
            }
        }
        Ok(())
    }

    /// One transaction of what changed; true when it lost a race to identical values and
    /// what else it carried must be written again.
    async fn write_once(&self, nlb: &Nlb, synced: &mut Synced) -> Result<bool, NlbError> {
        let (generation, persisted, dirty) = {
            let mut state = nlb.state();
            let ids = std::mem::take(&mut state.shared_dirty);
            let dirty: Vec<(String, Option<Unwritten>)> = ids
                .into_iter()
                .map(|id| {
                    let record = state.shared(&id).map(|record| {
                        let leases = state.instances.get(&id).and_then(|i| i.leases);
                        (record, leases)
                    });
                    (id, record)
                })
                .collect();
            (state.generation, state.persisted(), dirty)
        };
        let restore_dirty = |nlb: &Nlb, dirty: &[(String, _)]| {
            let mut state = nlb.state();
            for (id, _) in dirty {
                state.shared_dirty.insert(id.clone());
            }
        };
        let (ttl_registration, ttl_alive) = {
            let state = nlb.state();
            (
                lease_seconds(state.settings.heartbeat.expire_after()),
                lease_seconds(state.settings.heartbeat.unhealthy_after()),
            )
        };
        let mut compares = Vec::new();
        let mut operations = Vec::new();
        let mut written = Vec::new();
        let desired = split(&persisted);
        for (key, value) in &desired {
            let known = synced.known.get(key);
            if known.is_some_and(|k| same(key, &k.value, value)) {
                continue;
            }
            compares.push(Compare::mod_revision(
                self.key(key),
                CompareOp::Equal,
                known.map_or(0, |k| k.revision),
            ));
            operations.push(TxnOp::put(self.key(key), self.envelope(value), None));
            written.push((key.clone(), Some(value.clone())));
        }
        for (key, known) in &synced.known {
            if !desired.contains_key(key) {
                compares.push(Compare::mod_revision(
                    self.key(key),
                    CompareOp::Equal,
                    known.revision,
                ));
                operations.push(TxnOp::delete(self.key(key), None));
                written.push((key.clone(), None));
            }
        }
        let mut granted = Vec::new();
        for (id, record) in &dirty {
            match record {
                Some((record, leases)) => {
                    let leases = match leases {
                        Some(leases) => *leases,
                        None => {
                            let (registration, liveness) =
                                tokio::join!(self.grant(ttl_registration), self.grant(ttl_alive));
                            match (registration, liveness) {
                                (Ok(registration), Ok(liveness)) => Leases {
                                    registration,
                                    liveness,
                                    alive: true,
                                },
                                (Err(error), _) | (_, Err(error)) => {
                                    restore_dirty(nlb, &dirty);
                                    self.reload_needed.store(true, Ordering::SeqCst);
                                    return Err(self.store_failed(&error));
                                }
                            }
                        }
                    };
                    operations.push(TxnOp::put(
                        self.key(&format!("instances/{id}")),
                        self.envelope(record),
                        Some(PutOptions::new().with_lease(leases.registration)),
                    ));
                    if leases.alive {
                        operations.push(TxnOp::put(
                            self.key(&format!("alive/{id}")),
                            self.envelope(&record.registration_id),
                            Some(PutOptions::new().with_lease(leases.liveness)),
                        ));
                    }
                    granted.push((id.clone(), record.registration_id.clone(), leases));
                }
                None => {
                    operations.push(TxnOp::delete(self.key(&format!("instances/{id}")), None));
                    operations.push(TxnOp::delete(self.key(&format!("alive/{id}")), None));
                }
            }
        }
        if operations.is_empty() {
            synced.generation = generation;
            return Ok(false);
        }
        let since = Instant::now();
        let outcome = self
            .client
            .kv_client()
            .txn(Txn::new().when(compares).and_then(operations))
            .await;
        self.timed("txn", since);
        match outcome {
            Ok(response) if response.succeeded() => {
                let revision = response.header().map_or(0, |h| h.revision());
                for (key, value) in written {
                    match value {
                        Some(value) => {
                            synced.known.insert(key, Known { value, revision });
                        }
                        None => {
                            synced.known.remove(&key);
                        }
                    }
                }
                for (id, _) in &dirty {
                    synced.instance_revisions.insert(id.clone(), revision);
                }
                let mut state = nlb.state();
                for (id, registration_id, leases) in granted {
                    state.leased(&id, &registration_id, leases);
                }
                synced.generation = synced.generation.max(generation);
                Ok(false)
            }
            Ok(_) => {
                // Someone else changed one of these items first: take the store's view (the
                // other change wins, whole) and say so, unless it wrote what this one wanted.
                restore_dirty(nlb, &dirty);
                let earlier_discards = synced.discarded;
                self.load_locked(nlb, synced).await?;
                let same_values =
                    written
                        .iter()
                        .all(|(key, value)| match (value, synced.known.get(key)) {
                            (Some(value), Some(known)) => same(key, &known.value, value),
                            (None, None) => true,
                            _ => false,
                        });
                if same_values {
                    // Only local changes made after this write's snapshot were dropped.
                    synced.discarded = if synced.generation > generation {
                        (generation, synced.generation)
                    } else {
                        earlier_discards
                    };
                    return Ok(true);
                }
                warn!(
                    generation,
                    "a change lost a race with another replica's change of the same item: not kept"
                );
                Ok(false)
            }
            Err(error) => {
                restore_dirty(nlb, &dirty);
                self.reload_needed.store(true, Ordering::SeqCst);
                Err(self.store_failed(&error))
            }
        }
    }

    async fn grant(&self, ttl: i64) -> Result<i64, etcd_client::Error> {
        let since = Instant::now();
        let response = self.client.lease_client().grant(ttl, None).await?;
        self.timed("grant", since);
        Ok(response.id())
    }

    /// Renews a lease once; false when it has run out.
    async fn renew(&self, lease: i64) -> Result<bool, etcd_client::Error> {
        let since = Instant::now();
        let outcome = self.client.lease_client().keep_alive(lease).await;
        self.timed("keepalive", since);
        match outcome {
            Ok(_) => Ok(true),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A heartbeat arrived here for `id`: renews its leases, and starts a new liveness lease
    /// when the old one ran out. A store that does not answer makes nobody look dead: the
    /// heartbeat counts here, and the module is told to try another replica, which may reach
    /// the store (a module with one NLB just keeps serving and tries again).
    pub async fn heartbeat(&self, nlb: &Nlb, id: &str) -> Renewal {
        let Some((registration_id, leases)) = nlb
            .state()
            .instances
            .get(id)
            .and_then(|i| i.leases.map(|l| (i.registration_id.clone(), l)))
        else {
            // Not written yet: the next write grants its leases.
            return Renewal::Renewed;
        };
        match self.renew(leases.registration).await {
            Ok(true) => {}
            Ok(false) => {
                let mut state = nlb.state();
                let same = state
                    .instances
                    .get(id)
                    .is_some_and(|i| i.registration_id == registration_id);
                if same && state.forget(id).is_some() {
                    info!(instance = %id, "module registration ran out in the store: asked to register again");
                }
                return Renewal::Expired;
            }
            Err(error) => {
                // One line per heartbeat would flood the log in an outage; the watch reports it.
                debug!(instance = %id, %error, "heartbeat not passed on to etcd");
                return Renewal::StoreAway(self.heartbeat_not_passed(&error));
            }
        }
        let renewed = if leases.alive {
            self.renew(leases.liveness).await
        } else {
            Ok(false)
        };
        self.pass_stats_on(nlb, id, &registration_id, leases.registration);
        match renewed {
            Ok(true) => Renewal::Renewed,
            Ok(false) => match self.revive(nlb, id, &registration_id).await {
                Ok(()) => Renewal::Renewed,
                Err(error) => {
                    debug!(instance = %id, %error, "liveness not renewed in etcd");
                    Renewal::StoreAway(self.heartbeat_not_passed(&error))
                }
            },
            Err(error) => {
                debug!(instance = %id, %error, "heartbeat not passed on to etcd");
                Renewal::StoreAway(self.heartbeat_not_passed(&error))
            }
        }
    }

    /// While its kind is being promoted, passes a heartbeat's stats on to the leader (which
    /// judges the new version by them), at most once a second per instance.
    fn pass_stats_on(&self, nlb: &Nlb, id: &str, registration_id: &str, lease: i64) {
        if self.is_leader() {
            return;
        }
        let stats = {
            let state = nlb.state();
            let Some(instance) = state.instances.get(id) else {
                return;
            };
            if !state.promotions.contains_key(&instance.kind) {
                return;
            }
            instance.stats.clone()
        };
        let Some(stats) = stats else {
            return;
        };
        {
            let mut passed = lock(&self.stats_passed);
            let now = Instant::now();
            if passed
                .get(id)
                .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(1))
            {
                return;
            }
            passed.insert(id.to_owned(), now);
            if passed.len() > 1024 {
                // Instances come and go (pods are renamed): forget the quiet ones.
                passed.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
            }
        }
        let record = SharedStats {
            registration_id: registration_id.to_owned(),
            stats: prost::Message::encode_to_vec(&stats),
        };
        // Off the heartbeat's path: a slow store must not delay the module's answer.
        let (mut kv, key, value) = (
            self.client.kv_client(),
            self.key(&format!("stats/{id}")),
            self.envelope(&record),
        );
        let (id, timing) = (id.to_owned(), self.metrics.request_seconds.clone());
        tokio::spawn(async move {
            let since = Instant::now();
            let put = kv
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await;
            timing
                .with_label_values(&["put"])
                .observe(since.elapsed().as_secs_f64());
            if let Err(error) = put {
                debug!(instance = %id, %error, "heartbeat stats not passed on to the rollout leader");
            }
        });
    }

    /// A module heard from again after its liveness lease ran out: a new lease and key.
    async fn revive(
        &self,
        nlb: &Nlb,
        id: &str,
        registration_id: &str,
    ) -> Result<(), etcd_client::Error> {
        let ttl = lease_seconds(nlb.state().settings.heartbeat.unhealthy_after());
        let lease = self.grant(ttl).await?;
        let instance_key = self.key(&format!("instances/{id}"));
        let since = Instant::now();
        let response = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::version(instance_key, CompareOp::Greater, 0)])
                    .and_then([TxnOp::put(
                        self.key(&format!("alive/{id}")),
                        self.envelope(registration_id),
                        Some(PutOptions::new().with_lease(lease)),
                    )]),
            )
            .await?;
        self.timed("txn", since);
        if response.succeeded()
            && nlb
                .state()
                .set_alive(id, registration_id, Some(lease))
                .is_some()
        {
            info!(instance = %id, "module heartbeating again: healthy on every replica");
        }
        Ok(())
    }

    /// Keeps this replica's lease and key, competes for leadership, and follows the store
    /// until shutdown.
    pub async fn run(self: Arc<Self>, nlb: Arc<Nlb>, grpc: std::net::SocketAddr) {
        let keeper = tokio::spawn(Arc::clone(&self).keep_replica(Arc::clone(&nlb), grpc));
        self.follow(&nlb).await;
        keeper.abort();
        // Leaving: the replica's key and any leadership go with its lease.
        let lease = self.replica_lease.load(Ordering::SeqCst);
        if lease != 0 {
            let _ = self.client.lease_client().revoke(lease).await;
        }
    }

    /// The replica's lease: granted, kept alive, granted again after a loss.
    async fn keep_replica(self: Arc<Self>, nlb: Arc<Nlb>, grpc: std::net::SocketAddr) {
        let mut shutdown = nlb.shutdown.clone();
        loop {
            if let Err(error) = self.join_as_replica(grpc).await {
                warn!(%error, "cannot register this replica in etcd; trying again");
                self.lose_leadership();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = stopped(&mut shutdown) => return,
                }
            }
            self.campaign().await;
            let lease = self.replica_lease.load(Ordering::SeqCst);
            let kept = async {
                let (mut keeper, mut responses) =
                    self.client.lease_client().keep_alive(lease).await?;
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    keeper.keep_alive().await?;
                    match tokio::time::timeout(Duration::from_secs(3), responses.message()).await {
                        Ok(Ok(Some(response))) if response.ttl() > 0 => {}
                        Ok(Err(error)) => return Err(error),
                        _ => return Ok::<(), etcd_client::Error>(()),
                    }
                    // A campaign whose answer was lost, or one every replica failed during an
                    // etcd failover, is tried again (a leader's key is never taken from it);
                    // briefly, so the lease's renewal never waits for it.
                    if !self.is_leader() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), self.campaign()).await;
                    }
                }
            };
            tokio::select! {
                outcome = kept => {
                    match outcome {
                        Ok(()) => warn!("this replica's lease in etcd ran out: joining again"),
                        Err(error) => warn!(%error, "this replica's lease in etcd is not renewed: joining again"),
                    }
                    self.lose_leadership();
                }
                () = stopped(&mut shutdown) => return,
            }
        }
    }

    async fn join_as_replica(&self, grpc: std::net::SocketAddr) -> Result<(), etcd_client::Error> {
        let lease = self.grant(REPLICA_TTL_SECONDS).await?;
        self.client
            .kv_client()
            .put(
                self.key(&format!("replicas/{}", self.replica_id)),
                self.envelope(serde_json::json!({ "grpc": grpc.to_string() })),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        self.replica_lease.store(lease, Ordering::SeqCst);
        info!(replica = %self.replica_id, lease, "joined the NLB cluster");
        Ok(())
    }

    fn take_leadership(&self) {
        if !self.leader.swap(true, Ordering::SeqCst) {
            info!(replica = %self.replica_id, "this replica now runs gradual promotions (rollout leader)");
        }
        self.metrics.leader.set(1);
    }

    fn lose_leadership(&self) {
        if self.leader.swap(false, Ordering::SeqCst) {
            warn!(replica = %self.replica_id, "no longer the rollout leader");
        }
        self.metrics.leader.set(0);
    }

    /// Takes the `leader` key if nobody holds it.
    async fn campaign(&self) {
        let lease = self.replica_lease.load(Ordering::SeqCst);
        if lease == 0 {
            return;
        }
        let key = self.key("leader");
        let outcome = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key,
                        self.envelope(&self.replica_id),
                        Some(PutOptions::new().with_lease(lease)),
                    )]),
            )
            .await;
        match outcome {
            Ok(response) if response.succeeded() => self.take_leadership(),
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot compete for the rollout leadership"),
        }
    }

    /// Loads the prefix, then applies every change as it comes.
    async fn follow(&self, nlb: &Nlb) {
        let mut shutdown = nlb.shutdown.clone();
        // From where the load at start left off.
        let mut next = match self.loaded_at.load(Ordering::SeqCst) {
            0 => None,
            revision => Some(revision + 1),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let from = match next {
                Some(revision) if !self.reload_needed.load(Ordering::SeqCst) => revision,
                _ => match self.load(nlb).await {
                    Ok(revision) => {
                        backoff = Duration::from_millis(100);
                        revision + 1
                    }
                    Err(error) => {
                        warn!(%error, "cannot load the shared state; routing goes on with what this replica has");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = stopped(&mut shutdown) => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            next = Some(from);
            let watched = self
                .client
                .watch_client()
                .watch(
                    self.prefix.as_str(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(from)
                            .with_progress_notify(),
                    ),
                )
                .await;
            let mut stream = match watched {
                Ok(stream) => stream,
                Err(error) => {
                    warn!(%error, "cannot watch the shared state; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stopped(&mut shutdown) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        if self.reload_needed.load(Ordering::SeqCst) {
                            break;
                        }
                        continue;
                    }
                    () = stopped(&mut shutdown) => return,
                };
                let mut batch = Vec::new();
                match message {
                    Ok(Some(response)) => {
                        if response.canceled() {
                            if response.compact_revision() > 0 {
                                warn!(
                                    from,
                                    compacted = response.compact_revision(),
                                    "missed changes were compacted away: loading everything again"
                                );
                                next = None;
                            }
                            break;
                        }
                        batch.push(response);
                    }
                    Ok(None) => break,
                    Err(error) => {
                        warn!(%error, "the watch on the shared state broke; watching again from the last change seen");
                        break;
                    }
                }
                // A burst of changes is applied at once.
                let until = tokio::time::Instant::now() + COALESCE;
                while let Ok(Ok(Some(response))) =
                    tokio::time::timeout_at(until, stream.message()).await
                {
                    if response.canceled() {
                        break;
                    }
                    batch.push(response);
                }
                let mut changes = Vec::new();
                for response in &batch {
                    for event in response.events() {
                        if let Some(kv) = event.kv() {
                            next = Some(next.unwrap_or(0).max(kv.mod_revision() + 1));
                            if let Some(change) = self.decode(kv, event.event_type(), true) {
                                changes.push(change);
                            }
                        }
                    }
                    if let Some(header) = response.header() {
                        next = Some(next.unwrap_or(0).max(header.revision() + 1));
                    }
                }
                if !changes.is_empty() {
                    self.apply(nlb, changes).await;
                }
                if self.reload_needed.load(Ordering::SeqCst) {
                    break;
                }
            }
            // Watch again from `next` (or load, when it was compacted or writes failed), after
            // a pause: a watch etcd keeps refusing must not turn into a busy loop.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = stopped(&mut shutdown) => return,
            }
        }
    }

    /// Turns a key-value (or its deletion) into a change; keys outside the layout are
    /// ignored, unreadable values logged. `watched`: it came from the watch just now (its
    /// lag counts), not from a load of keys written whenever.
    fn decode(&self, kv: &KeyValue, event: EventType, watched: bool) -> Option<Change> {
        let key = std::str::from_utf8(kv.key())
            .ok()?
            .strip_prefix(&self.prefix)?;
        let put = event == EventType::Put;
        if key.starts_with("operator/") {
            return Some(Change::Operator {
                key: key.to_owned(),
                value: self.value_of(key, kv, put, watched)?,
                revision: kv.mod_revision(),
            });
        }
        if let Some(id) = key.strip_prefix("instances/") {
            let record = self.value_of(key, kv, put, watched)?;
            return Some(Change::Instance {
                id: id.to_owned(),
                record: record.map(|record| (record, kv.lease())),
                revision: kv.mod_revision(),
            });
        }
        if let Some(id) = key.strip_prefix("alive/") {
            let registration = self.value_of(key, kv, put, watched)?;
            return Some(Change::Alive {
                id: id.to_owned(),
                lease: registration.map(|registration| (registration, kv.lease())),
            });
        }
        if let Some(id) = key.strip_prefix("stats/") {
            return Some(Change::Stats {
                id: id.to_owned(),
                record: self.value_of(key, kv, put, watched)??,
            });
        }
        if let Some(id) = key.strip_prefix("replicas/") {
            if put {
                // Read for its lag only: the replica's presence is the key's.
                let _ = self.opened::<serde::de::IgnoredAny>(kv, watched);
            }
            return Some(Change::Replica {
                id: id.to_owned(),
                present: put,
            });
        }
        if key == "leader" {
            let holder = put
                .then(|| self.opened::<String>(kv, watched).ok())
                .flatten();
            return Some(Change::Leader(holder));
        }
        None
    }

    /// The value a put stored (Some(None) for a deletion); None, logged, when it is unreadable.
    fn value_of<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        kv: &KeyValue,
        put: bool,
        watched: bool,
    ) -> Option<Option<T>> {
        if !put {
            return Some(None);
        }
        match self.opened(kv, watched) {
            Ok(value) => Some(Some(value)),
            Err(error) => {
                warn!(key, %error, "unreadable value in etcd: ignored");
                None
            }
        }
    }

    /// A stored value out of its envelope; when `watched`, the time from its write to here
    /// is observed.
    fn opened<T: serde::de::DeserializeOwned>(
        &self,
        kv: &KeyValue,
        watched: bool,
    ) -> Result<T, serde_json::Error> {
        let written: Envelope<T> = serde_json::from_slice(kv.value())?;
        if watched {
            let lag = unix_ms(SystemTime::now()).saturating_sub(written.at_ms);
            self.metrics.watch_lag.observe(lag as f64 / 1000.0);
        }
        Ok(written.value)
    }

    /// Applies changes from the store. This replica's own changes not yet written go first,
    /// so the store's view never silently replaces them.
    async fn apply(&self, nlb: &Nlb, changes: Vec<Change>) {
        let mut synced = self.synced.lock().await;
        if self.reload_needed.load(Ordering::SeqCst) {
            // Local changes were refused while etcd was away: they are not written now. The
            // store's whole state replaces them (these changes included).
            if let Err(error) = self.load_locked(nlb, &mut synced).await {
                warn!(%error, "cannot load the shared state; changes are applied when it answers");
            }
            return;
        }
        for _ in 0..3 {
            let pending = {
                let state = nlb.state();
                state.generation > synced.generation || !state.shared_dirty.is_empty()
            };
            if !pending {
                break;
            }
            if let Err(error) = self.write_locked(nlb, &mut synced).await {
                warn!(%error, "local changes not written before applying the store's");
                break;
            }
        }
        let mut operator_changed = false;
        let mut campaign = false;
        let now = Instant::now();
        {
            let mut state = nlb.state();
            for change in changes {
                match change {
                    Change::Operator {
                        key,
                        value,
                        revision,
                    } => {
                        if synced
                            .known
                            .get(&key)
                            .is_some_and(|k| k.revision >= revision)
                        {
                            continue;
                        }
                        match value {
                            Some(value) => {
                                synced.known.insert(key, Known { value, revision });
                            }
                            None => {
                                synced.known.remove(&key);
                            }
                        }
                        operator_changed = true;
                    }
                    Change::Instance { id, revision, .. }
                        if synced
                            .instance_revisions
                            .get(&id)
                            .is_some_and(|seen| *seen >= revision) => {}
                    Change::Instance {
                        id,
                        record: Some((record, lease)),
                        revision,
                    } => {
                        synced.instance_revisions.insert(id.clone(), revision);
                        let alive = state
                            .instances
                            .get(&id)
                            .filter(|i| i.registration_id == record.registration_id)
                            .and_then(|i| i.leases)
                            .map_or((0, true), |l| (l.liveness, l.alive));
                        let leases = Leases {
                            registration: lease,
                            liveness: alive.0,
                            alive: alive.1,
                        };
                        match state.mirror(record, leases, now) {
                            Ok(true) => {
                                if let Some(instance) = state.instances.get(&id) {
                                    info!(instance = %id, module_type = %instance.kind, version = %instance.version, "module registered at another replica: routed here too");
                                }
                            }
                            Ok(false) => {}
                            Err(error) => {
                                warn!(instance = %id, %error, "a shared registration is unusable: skipped");
                            }
                        }
                    }
                    Change::Instance {
                        id,
                        record: None,
                        revision,
                    } => {
                        // Kept as a tombstone: an older put of this key (an echo of this
                        // replica's own earlier write) must not bring the instance back.
                        synced.instance_revisions.insert(id.clone(), revision);
                        if synced.instance_revisions.len() > 4 * state.instances.len() + 1024 {
                            let present = &state.instances;
                            synced
                                .instance_revisions
                                .retain(|id, _| present.contains_key(id));
                        }
                        if let Some(instance) = state.forget(&id) {
                            info!(instance = %id, module_type = %instance.kind, "module unregistered or expired (at any replica): removed with its routes");
                            nlb.metrics
                                .liveness
                                .with_label_values(&[instance.kind.name(), "removed"])
                                .inc();
                        }
                    }
                    Change::Alive { id, lease } => {
                        let registration_id = match &lease {
                            Some((registration, _)) => registration.clone(),
                            None => state
                                .instances
                                .get(&id)
                                .map(|i| i.registration_id.clone())
                                .unwrap_or_default(),
                        };
                        let alive = lease.as_ref().map(|(_, lease)| *lease);
                        if let Some(kind) = state.set_alive(&id, &registration_id, alive) {
                            if alive.is_some() {
                                info!(instance = %id, module_type = %kind, "module heartbeating again: healthy");
                            } else {
                                warn!(instance = %id, module_type = %kind, "module missed its heartbeats (its liveness lease ran out): unhealthy, no new connections");
                                nlb.metrics
                                    .liveness
                                    .with_label_values(&[kind.name(), "unhealthy"])
                                    .inc();
                            }
                        }
                    }
                    Change::Replica { id, present } => {
                        let mut replicas = lock(&self.replicas);
                        let changed = if present {
                            replicas.insert(id.clone())
                        } else {
                            replicas.remove(&id)
                        };
                        if changed {
                            info!(replica = %id, joined = present, replicas = replicas.len(), "NLB replicas changed");
                        }
                        self.metrics.replicas.set(replicas.len() as i64);
                    }
                    Change::Stats { id, record } => {
                        // Only the leader analyses rollouts; the others keep their own samples.
                        if self.is_leader() {
                            if let Ok(stats) =
                                <marchproxy::pb::ModuleStats as prost::Message>::decode(
                                    record.stats.as_slice(),
                                )
                            {
                                state.shared_stats(&id, &record.registration_id, stats, now);
                            }
                        }
                    }
                    Change::Leader(holder) => {
                        let mine = holder.as_deref() == Some(self.replica_id.as_str());
                        if mine {
                            self.take_leadership();
                        } else {
                            self.lose_leadership();
                        }
                        campaign = holder.is_none();
                    }
                }
            }
            if operator_changed {
                match join(&synced.known).and_then(|persisted| state.adopt(persisted, &self.base)) {
                    Ok(()) => synced.took_store_view(state.generation),
                    Err(reason) => {
                        warn!(%reason, "the operator state in etcd is unusable: this replica keeps its own until it is fixed");
                    }
                }
            }
        }
        drop(synced);
        nlb.activity.notify_waiters();
        if campaign {
            self.campaign().await;
        }
    }
}

/// Whether the change of `generation` was kept (not dropped for a concurrent one).
fn check_kept(synced: &Synced, generation: u64) -> Result<(), NlbError> {
    let (above, upto) = synced.discarded;
    if generation > above && generation <= upto {
        return Err(NlbError::Conflict(
            "another NLB replica changed the same item at the same time and its change won; yours is not kept: read the state again and retry".into(),
        ));
    }
    Ok(())
}

/// Lease time-to-live in whole seconds (etcd's unit), at least one.
fn lease_seconds(duration: Duration) -> i64 {
    (duration.as_millis().div_ceil(1000) as i64).max(1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded sets are valid after any panic: carry on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Two values of `key` are the same for the store: a promotion's time held for traffic
/// counts on by itself and is written with the promotion's next real change.
fn same(key: &str, a: &serde_json::Value, b: &serde_json::Value) -> bool {
    if key.starts_with("operator/promotions/") {
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            if let Some(held) = v.get_mut("held_for_ms").filter(|h| !h.is_null()) {
                *held = serde_json::Value::from(0);
            }
            v
        };
        return strip(a) == strip(b);
    }
    a == b
}

/// The operator state as one key per item.
fn split(state: &PersistedState) -> BTreeMap<String, serde_json::Value> {
    fn json<T: Serialize>(value: &T) -> serde_json::Value {
        // Persisted types are plain data with string keys: they always serialise.
        serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
    }
    let mut keys = BTreeMap::new();
    for route in &state.operator_routes {
        keys.insert(format!("operator/routes/{}", route.route.id), json(route));
    }
    for (name, section) in &state.config {
        keys.insert(format!("operator/config/{name}"), json(section));
    }
    for (kind, count) in &state.desired_instances {
        keys.insert(format!("operator/scale/{kind}"), json(count));
    }
    for (kind, weights) in &state.version_weights {
        keys.insert(format!("operator/weights/{kind}"), json(weights));
    }
    for (kind, version) in &state.previous_active {
        keys.insert(format!("operator/previous/{kind}"), json(version));
    }
    for (kind, promotion) in &state.promotions {
        keys.insert(format!("operator/promotions/{kind}"), json(promotion));
    }
    for (kind, events) in &state.rollout_events {
        keys.insert(format!("operator/events/{kind}"), json(events));
    }
    keys
}

/// The operator state from its keys.
fn join(keys: &BTreeMap<String, Known>) -> Result<PersistedState, String> {
    let mut state = PersistedState::default();
    for (key, known) in keys {
        let value = known.value.clone();
        let bad = |e: serde_json::Error| format!("key {key}: {e}");
        let Some((section, name)) = key
            .strip_prefix("operator/")
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        let name = name.to_owned();
        fn item<T: serde::de::DeserializeOwned>(
            into: &mut BTreeMap<String, T>,
            name: String,
            value: serde_json::Value,
        ) -> Result<(), serde_json::Error> {
            into.insert(name, serde_json::from_value(value)?);
            Ok(())
        }
        match section {
            "routes" => state
                .operator_routes
                .push(serde_json::from_value(value).map_err(bad)?),
            "config" => item(&mut state.config, name, value).map_err(bad)?,
            "scale" => item(&mut state.desired_instances, name, value).map_err(bad)?,
            "weights" => item(&mut state.version_weights, name, value).map_err(bad)?,
            "previous" => item(&mut state.previous_active, name, value).map_err(bad)?,
            "promotions" => item(&mut state.promotions, name, value).map_err(bad)?,
            "events" => item(&mut state.rollout_events, name, value).map_err(bad)?,
            _ => {}
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_state_splits_into_items_and_joins_back() {
        let mut state = PersistedState::default();
        state.desired_instances.insert("alb".into(), 3);
        state.version_weights.insert(
            "alb".into(),
            BTreeMap::from([("v1".into(), 80), ("v2".into(), 20)]),
        );
        state.previous_active.insert("alb".into(), "v1".into());
        let keys = split(&state);
        assert_eq!(
            keys.keys().collect::<Vec<_>>(),
            [
                "operator/previous/alb",
                "operator/scale/alb",
                "operator/weights/alb"
            ]
        );
        let known = keys
            .into_iter()
            .map(|(k, value)| (k, Known { value, revision: 1 }))
            .collect();
        let back = join(&known).unwrap();
        assert_eq!(back.desired_instances["alb"], 3);
        assert_eq!(back.version_weights["alb"]["v2"], 20);
        assert_eq!(back.previous_active["alb"], "v1");
    }

    #[test]
    fn time_held_alone_is_no_change_but_holding_is() {
        let held = |ms: Option<u64>| serde_json::json!({ "version": "v2", "held_for_ms": ms });
        let key = "operator/promotions/alb";
        assert!(same(key, &held(Some(10)), &held(Some(5000))));
        assert!(!same(key, &held(None), &held(Some(5000))));
        assert!(!same(
            "operator/scale/alb",
            &serde_json::json!(1),
            &serde_json::json!(2)
        ));
    }

    #[test]
    fn a_dropped_change_is_reported_and_later_ones_are_not() {
        let synced = Synced {
            discarded: (4, 6),
            ..Synced::default()
        };
        assert!(check_kept(&synced, 4).is_ok());
        assert!(matches!(check_kept(&synced, 5), Err(NlbError::Conflict(_))));
        assert!(check_kept(&synced, 7).is_ok());
    }

    #[test]
    fn leases_last_whole_seconds() {
        assert_eq!(lease_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(10)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(120)), 120);
    }
}
