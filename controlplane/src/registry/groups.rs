//! Route groups in the registry. Every server feeds the report streams, health reports
//! and tunnel counters it receives into its [`Observer`](crate::election::Observer) and
//! shares the observations through the database; one server at a time, the holder of the
//! elector's lease, merges every server's and runs the
//! [`Election`](crate::election::Election). When that names another primary it commits a
//! [`Change::Primaries`], which every server publishes from the change log, so every
//! affected Watch stream sends its node a delta (the prefix moves from one peer's
//! allowed-ips to another's). With SQLite the one server is always the elector.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wirefence_proto::v1::RouteHealth;

use super::observed::PeerStatRow;
use super::{lock, Registry};
use crate::change::Change;
use crate::election::{merge, GroupStatus, Observed, Report, Sample};
use crate::Error;

/// Prefixes read from one health report; a node has at most this many routes anyway.
pub const MAX_HEALTH_ENTRIES: usize = super::register::MAX_ROUTES;
/// How often the election is re-evaluated without an event: heartbeat deadlines and
/// hold-downs expire on their own. Small against the failover budget (seconds).
pub const TICK: Duration = Duration::from_millis(100);

/// How long the elector's lease runs; renewed every [`SHARE_EVERY`]. A dead elector is
/// replaced after at most this long.
const LEASE: Duration = Duration::from_secs(3);
/// Observations are shared when they change, and at least this often (they expire after
/// [`crate::store::OBSERVATIONS_FRESH_MS`]).
const SHARE_EVERY: Duration = Duration::from_millis(500);

/// An open report stream of a node; its end counts as the node's members failing.
pub struct ReportStream {
    registry: Arc<Registry>,
    node: String,
}

impl Drop for ReportStream {
    fn drop(&mut self) {
        lock(&self.registry.observer).stream(&self.node, false);
        self.registry.elect.notify_one();
    }
}

/// The election loop's own memory.
#[derive(Default)]
struct Elector {
    /// What was shared last, and when.
    shared: Option<(Observed, Instant)>,
    /// When the lease was last renewed, if it is held.
    leased: Option<Instant>,
    /// The last round failed.
    failing: bool,
}

impl Registry {
    /// Marks a report stream of `node` open until the guard drops.
    pub fn report_stream(self: &Arc<Self>, node: &str) -> ReportStream {
        lock(&self.observer).stream(node, true);
        self.elect.notify_one();
        ReportStream { registry: self.clone(), node: node.to_owned() }
    }

    /// Sets how long a recovered member of higher priority waits before it takes over.
    pub fn with_hold_down(self, hold_down: Duration) -> Registry {
        lock(&self.election).set_hold_down(hold_down);
        self
    }

    /// Takes a node's health report: entries that are not prefixes are skipped, the
    /// observer ignores prefixes the node is no member of.
    pub(super) fn route_health(&self, node: &str, health: RouteHealth) {
        let now = Instant::now();
        let mut observer = lock(&self.observer);
        for h in health.prefixes.into_iter().take(MAX_HEALTH_ENTRIES) {
            let Some(prefix) = h.prefix.as_ref().and_then(|p| IpNet::try_from(p).ok()) else {
                tracing::debug!(node, "health report without a valid prefix; skipped");
                continue;
            };
            let interval = Duration::from_millis(h.interval_ms.into());
            observer.report(node, prefix, Report::new(h.healthy, h.priority, interval, now));
        }
        drop(observer);
        self.elect.notify_one();
    }

    /// Takes a node's WireGuard counters for those of its peers that are route group
    /// members (what it says about itself does not count).
    pub(super) fn tunnel_stats(&self, node: &str, rows: &[PeerStatRow]) {
        let state = self.current();
        if state.groups.is_empty() {
            return;
        }
        let now = Instant::now();
        let members: BTreeSet<&String> = state.groups.values().flatten().filter(|id| *id != node).collect();
        let mut observer = lock(&self.observer);
        for id in members {
            let Some(key) = state.node(id).map(|n| n.public_key) else { continue };
            if let Some(r) = rows.iter().find(|r| r.public_key == key) {
                observer.tunnel(node, id, Sample { rx_bytes: r.rx_bytes, last_handshake: r.last_handshake }, now);
            }
        }
        drop(observer);
        self.elect.notify_one();
    }

    /// The route groups as of this server's last evaluation.
    pub fn route_groups(&self) -> Vec<GroupStatus> {
        lock(&self.election).status()
    }

    /// One round: shares this server's observations, renews or takes the lease, and, as
    /// the elector, commits the primaries the election names if they differ from the
    /// state's. Every server evaluates (for [`Self::route_groups`]); only the elector
    /// writes. Returns the version it published, if any.
    async fn elect_round(&self, me: &mut Elector) -> Result<Option<u64>, Error> {
        let now = Instant::now();
        let state = self.current();
        let mine = {
            let mut observer = lock(&self.observer);
            observer.set_groups(&state.groups);
            observer.observe(now)
        };
        let due = me.shared.as_ref().is_none_or(|(last, at)| *last != mine || now.duration_since(*at) >= SHARE_EVERY);
        if due {
            self.store.share_observations(&self.server_id, &mine).await?;
            me.shared = Some((mine, now));
        }
        if me.leased.is_none_or(|at| now.duration_since(at) >= SHARE_EVERY) {
            let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
            me.leased = self.store.lease(&self.server_id, lease_ms).await?.then_some(now);
        }
        let observed = merge(self.store.observations().await?);
        let primaries = lock(&self.election).evaluate(now, &state.groups, state.primaries(), &observed);
        if me.leased.is_none() || primaries == *state.primaries() {
            return Ok(None);
        }
        let store = self.store().await;
        if self.current().version != state.version {
            // Decided on a state that is gone; the next round decides on the new one.
            self.elect.notify_one();
            return Ok(None);
        }
        let mut tx = store.begin().await?;
        if !store.holds_lease(&mut tx, &self.server_id).await? {
            me.leased = None;
            return Ok(None);
        }
        let version = store.commit(tx, Some(&Change::Primaries(primaries.clone()))).await?;
        drop(store);
        tracing::info!(version, primaries = ?primaries, "route group primaries changed");
        self.published(version).await;
        Ok(Some(version))
    }

    /// Runs election rounds on every health event and every [`TICK`] until shutdown.
    pub async fn run_election(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        let mut me = Elector::default();
        loop {
            if !self.current().groups.is_empty() {
                match self.elect_round(&mut me).await {
                    Ok(_) => me.failing = false,
                    // Every round fails while the database is down: said once.
                    Err(e) if !me.failing => {
                        tracing::warn!(error = %e, "route group election round failed; retrying");
                        (me.failing, me.shared) = (true, None);
                    }
                    Err(e) => tracing::debug!(error = %e, "route group election round failed again"),
                }
            }
            tokio::select! {
                _ = self.elect.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = super::stopped(&mut shutdown) => break,
            }
        }
        if me.leased.is_some() {
            if let Err(e) = self.store.release_lease(&self.server_id).await {
                tracing::debug!(error = %e, "giving up the elector's lease failed; it lapses");
            }
        }
    }
}
