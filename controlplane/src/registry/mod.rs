//! The registry: the one place that changes nodes, keys and policy. A versioned change is
//! written in one transaction with its version and its change log entry; states are
//! published only by applying the log in version order ([`follow`]), the server's own
//! changes included, so every server of one database publishes the same sequence.
//!
//! Methods that touch the store are async (sqlx): a slow disk or database waits without
//! holding a tokio worker. The store lock (an async mutex) is held across a change and its
//! publication.
//!
//! - [`register`]: enrollment and re-registration.
//! - [`admin`]: the administration operations.
//! - [`report`]: agent reports and Watch acknowledgements.
//! - [`observed`]: in-memory observations (connections, last contact, peer statistics).
//! - [`throttle`]: per-node rates (reports, coalesced re-registrations).
//! - [`flows`]: flow records from the agents into the database, and `flows` queries.
//! - [`groups`]: route groups: members' health in, the elected primaries out.

pub mod admin;
pub mod dry_run;
pub mod flows;
pub mod follow;
pub mod groups;
pub mod identity;
pub mod keys;
pub mod observed;
pub mod register;
pub mod report;
pub mod rotation;
pub mod routes;
pub mod sync;
pub mod throttle;
pub mod usage;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::auth;
use crate::credentials::CredentialIndex;
use crate::limits::Limits;
use crate::policy::{self, Policy};
use crate::state::{GlobalState, History};
use crate::store::{DbLocation, Store};
use crate::Error;

/// The overlay network: the ranges addresses are allocated from, and how its tunnels are
/// kept alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub v4: IpNet,
    pub v6: IpNet,
    /// Every peer's persistent keepalive in the views (seconds, at least 1): it keeps NAT
    /// mappings open, and it is what lets route group elections see a dead tunnel.
    pub keepalive: u16,
}

/// The default [`Overlay::keepalive`]: under the UDP timeouts of common NATs.
pub const DEFAULT_KEEPALIVE: u16 = 25;

impl Default for Overlay {
    fn default() -> Overlay {
        Overlay {
            v4: IpNet::V4("10.77.0.0/16".parse().expect("valid literal")),
            v6: IpNet::V6("fd77::/64".parse().expect("valid literal")),
            keepalive: DEFAULT_KEEPALIVE,
        }
    }
}

/// How many global states are kept for resuming streams.
pub const DEFAULT_HISTORY: usize = 256;

/// The least time between two database refreshes caused by unknown credentials.
const MISS_REFRESH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

pub struct Registry {
    store: Store,
    /// Held across a change (its checks, its transaction, its publication): one change at
    /// a time per server; the database orders the servers' changes.
    writer: tokio::sync::Mutex<()>,
    /// Held while applying the change log ([`follow`]).
    following: tokio::sync::Mutex<()>,
    /// When the last refresh after a credential miss started ([`Registry::check_credential`]).
    miss_refresh: tokio::sync::Mutex<Option<std::time::Instant>>,
    miss_refreshes: std::sync::atomic::AtomicU64,
    /// The database's incarnation: versions are only comparable within one.
    incarnation: Arc<str>,
    /// Read by authentication instead of the store (kept current by the store).
    credentials: Arc<CredentialIndex>,
    limits: Limits,
    overlay: Overlay,
    state: watch::Sender<Arc<GlobalState>>,
    history: Mutex<History>,
    observed: observed::Observations,
    /// Every overlay address ever allocated (removed nodes' included); changed only with
    /// the store lock held.
    allocated: Mutex<HashSet<IpAddr>>,
    /// Flow records on their way to the database ([`flows`]).
    flows: flows::FlowIntake,
    /// What this server sees of route group members ([`groups`]).
    observer: Mutex<crate::election::Observer>,
    /// The route groups' election, run on every server, committed by the elector only.
    election: Mutex<crate::election::Election>,
    /// This server among those of the database (random per start): names its shared
    /// observations and its elector's lease.
    server_id: String,
    /// Woken when a member's health may have changed (report, stream end).
    elect: tokio::sync::Notify,
    reports: throttle::Rates,
    reregistrations: throttle::Coalescer,
    shutdown: watch::Sender<bool>,
    /// Challenges, enrollment rate limits, addresses no endpoint may have.
    pub gate: crate::enroll::Gate,
    /// Prometheus metrics (`serve --metrics-listen`).
    pub metrics: crate::metrics::Metrics,
}

/// The store while holding the writer's turn.
struct Writing<'a> {
    _turn: tokio::sync::MutexGuard<'a, ()>,
    store: &'a Store,
}

impl std::ops::Deref for Writing<'_> {
    type Target = Store;

    fn deref(&self) -> &Store {
        self.store
    }
}

/// The current state as the database holds it, and every address ever given out.
async fn load(store: &Store, overlay: Overlay) -> Result<(GlobalState, HashSet<IpAddr>), Error> {
    let version = store.version().await?;
    let policy = match store.policy().await? {
        Some((file, source, _)) => policy::parse(&file, &source)?,
        None => Policy::default(),
    };
    let rows = store.nodes().await?;
    let allocated = rows.iter().flat_map(|r| r.rec.addresses.iter().map(|a| a.addr())).collect();
    let live = rows.into_iter().filter(|r| !r.removed).map(|r| Arc::new(r.rec)).collect();
    let mut state = GlobalState::new(version, live, Arc::new(policy), overlay);
    state.settle_primaries(&store.primaries().await?);
    Ok((state, allocated))
}

/// Locks a mutex, recovering the data if a holder panicked (every critical section leaves
/// its data consistent or changes nothing).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Opens the store and rebuilds the current state from it, with the default limits.
    pub async fn open(db: &DbLocation, overlay: Overlay, history: usize) -> Result<Registry, Error> {
        Registry::open_with(db, overlay, history, Limits::default()).await
    }

    /// [`Registry::open`] with the given limits.
    pub async fn open_with(
        db: &DbLocation,
        overlay: Overlay,
        history: usize,
        limits: Limits,
    ) -> Result<Registry, Error> {
        let store = Store::open(db).await?;
        let incarnation = store.incarnation().await?;
        let (state, allocated) = load(&store, overlay).await?;
        let keepalive = std::time::Duration::from_secs(overlay.keepalive.into());
        let state = Arc::new(state);
        let mut hist = History::new(history);
        hist.push(state.clone());
        Ok(Registry {
            credentials: store.credentials(),
            store,
            writer: tokio::sync::Mutex::new(()),
            following: tokio::sync::Mutex::new(()),
            miss_refresh: tokio::sync::Mutex::new(None),
            miss_refreshes: Default::default(),
            incarnation: incarnation.into(),
            limits,
            overlay,
            state: watch::Sender::new(state),
            history: Mutex::new(hist),
            observed: observed::Observations::default(),
            allocated: Mutex::new(allocated),
            flows: flows::FlowIntake::new(limits.flows_per_sec, limits.flow_burst, crate::flows::Retention::default()),
            observer: Mutex::new(crate::election::Observer::new(keepalive)),
            election: Mutex::new(crate::election::Election::new(crate::election::DEFAULT_HOLD_DOWN)),
            server_id: format!("{:016x}", rand::random::<u64>()),
            elect: tokio::sync::Notify::new(),
            reports: throttle::Rates::new(limits.reports_per_sec, limits.report_burst),
            reregistrations: throttle::Coalescer::new(limits.reregister_interval),
            shutdown: watch::Sender::new(false),
            gate: crate::enroll::Gate::new(crate::enroll::EnrollLimits::default()),
            metrics: crate::metrics::Metrics::default(),
        })
    }

    pub fn with_enroll_limits(mut self, limits: crate::enroll::EnrollLimits) -> Registry {
        self.gate = crate::enroll::Gate::new(limits);
        self
    }

    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// [`Registry::incarnation`], for messages that carry it.
    pub fn incarnation_shared(&self) -> Arc<str> {
        self.incarnation.clone()
    }

    pub fn overlay(&self) -> Overlay {
        self.overlay
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn current(&self) -> Arc<GlobalState> {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<GlobalState>> {
        self.state.subscribe()
    }

    /// A state still in the history.
    pub fn at_version(&self, version: u64) -> Option<Arc<GlobalState>> {
        lock(&self.history).get(version)
    }

    /// Called by [`follow`] only, in version order.
    fn publish(&self, state: GlobalState) -> u64 {
        let version = state.version;
        let state = Arc::new(state);
        lock(&self.history).push(state.clone());
        self.state.send_replace(state);
        tracing::debug!(version, "published state");
        version
    }

    /// The store, for a change: one at a time (see [`Registry::writer`]), checked against
    /// the latest state (other servers' changes applied first).
    async fn store(&self) -> Writing<'_> {
        let turn = self.writer.lock().await;
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "catching up with the change log failed");
        }
        Writing { _turn: turn, store: &self.store }
    }

    /// The turn a status write (an agent's applied version or error: not a change) takes.
    /// On PostgreSQL none: it locks one row, and a replica's agents reconnecting at once do
    /// not queue behind each other or behind the log. On SQLite the writer's turn, without
    /// catching up: a write waiting for the file's lock would hold one of the pool's
    /// connections, which the writer may need to finish the change that holds the lock.
    async fn status_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.store.engine() {
            crate::store::Engine::Sqlite => Some(self.writer.lock().await),
            crate::store::Engine::Postgres => None,
        }
    }

    /// Holds the store lock, as a long write would: lets tests prove that authentication
    /// does not wait for it.
    #[doc(hidden)]
    pub async fn hold_store_lock(&self) -> impl Sized + '_ {
        self.store().await
    }

    /// Holds the change log's follower, as a slow or lost notification would: lets tests
    /// prove that a node known only to the database still authenticates here.
    #[doc(hidden)]
    pub async fn hold_following(&self) -> impl Sized + '_ {
        self.following.lock().await
    }

    /// The node id behind the request's bearer credential: refused when missing,
    /// malformed, unknown or tampered (`Unauthenticated`) or removed (`PermissionDenied`).
    /// Reads the in-memory index, never waiting for a change's store lock.
    pub async fn authenticate(&self, meta: &MetadataMap) -> Result<String, Error> {
        let token = auth::bearer(meta)?.ok_or(Error::CredentialMissing)?;
        self.check_credential(&token).await?;
        Ok(token.id)
    }

    /// Checks a node credential against the in-memory index. On PostgreSQL a node that
    /// enrolled (or rotated its credential) through another replica may arrive here before
    /// this server's follower has read the change: an unknown credential first brings this
    /// server up to date with the database, then is checked again.
    async fn check_credential(&self, token: &auth::Token) -> Result<(), Error> {
        match self.credentials.check(token) {
            Err(Error::CredentialInvalid) if self.store.engine() == crate::store::Engine::Postgres => {
                self.refresh_after_miss().await;
                self.credentials.check(token)
            }
            checked => checked,
        }
    }

    /// Reloads the credential index and applies the change log (so a node that now
    /// authenticates is also in the published state). Misses share refreshes, which start
    /// at most every [`MISS_REFRESH_EVERY`]: unknown credentials sent in a flood cost the
    /// database a few cheap queries a second, and each one waits its turn.
    async fn refresh_after_miss(&self) {
        let asked = std::time::Instant::now();
        let mut last = self.miss_refresh.lock().await;
        if let Some(started) = *last {
            if started >= asked {
                // A refresh that started after this miss has finished: it covers it.
                return;
            }
            tokio::time::sleep_until((started + MISS_REFRESH_EVERY).into()).await;
        }
        *last = Some(std::time::Instant::now());
        self.miss_refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.store.try_reload_credentials().await {
            tracing::warn!(error = %e, "reading credentials after an unknown one failed");
        }
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "catching up after an unknown credential failed");
        }
    }

    /// How many refreshes unknown credentials have caused (tests: misses share them).
    #[doc(hidden)]
    pub fn miss_refreshes(&self) -> u64 {
        self.miss_refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Registry {
    /// Ends every stream (they return `Unavailable`); used when the server stops.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Runs registry work (anything touching the store) as a task of its own: a caller that
/// gives up (a deadline, a client gone) must not cancel a change between its commit and
/// its publication, or a committed version would never be published.
pub async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(work).await.map_err(|e| Error::Task(e.to_string()))?
}

/// Resolves once `signal` (from [`Registry::shutdown_signal`]) says shutting down.
pub async fn stopped(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|s| *s).await;
}
