//! Route groups in the registry: members' health reports and report streams go into the
//! [`Election`](crate::election::Election); [`Registry::run_election`] publishes a new
//! version whenever it names another primary, so every affected Watch stream sends its
//! node a delta at once (the prefix moves from one peer's allowed-ips to another's).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wirefence_proto::v1::RouteHealth;

use super::observed::PeerStatRow;
use super::{lock, Registry};
use crate::election::{GroupStatus, Report, Sample};
use crate::Error;

/// Prefixes read from one health report; a node has at most this many routes anyway.
pub const MAX_HEALTH_ENTRIES: usize = super::register::MAX_ROUTES;
/// How often the election is re-evaluated without an event: heartbeat deadlines and
/// hold-downs expire on their own. Small against the failover budget (seconds).
pub const TICK: Duration = Duration::from_millis(100);

/// An open report stream of a node; its end counts as the node's members failing.
pub struct ReportStream {
    registry: Arc<Registry>,
    node: String,
}

impl Drop for ReportStream {
    fn drop(&mut self) {
        lock(&self.registry.election).stream(&self.node, false);
        self.registry.elect.notify_one();
    }
}

impl Registry {
    /// Marks a report stream of `node` open until the guard drops.
    pub fn report_stream(self: &Arc<Self>, node: &str) -> ReportStream {
        lock(&self.election).stream(node, true);
        self.elect.notify_one();
        ReportStream { registry: self.clone(), node: node.to_owned() }
    }

    /// Sets how long a recovered member of higher priority waits before it takes over.
    pub fn with_hold_down(self, hold_down: Duration) -> Registry {
        lock(&self.election).set_hold_down(hold_down);
        self
    }

    /// Takes a node's health report: entries that are not prefixes are skipped, the
    /// election ignores prefixes the node is no member of.
    pub(super) fn route_health(&self, node: &str, health: RouteHealth) {
        let now = Instant::now();
        let mut election = lock(&self.election);
        for h in health.prefixes.into_iter().take(MAX_HEALTH_ENTRIES) {
            let Some(prefix) = h.prefix.as_ref().and_then(|p| IpNet::try_from(p).ok()) else {
                tracing::debug!(node, "health report without a valid prefix; skipped");
                continue;
            };
            let interval = Duration::from_millis(h.interval_ms.into());
            election.report(node, prefix, Report::new(h.healthy, h.priority, interval, now));
        }
        drop(election);
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
        let mut election = lock(&self.election);
        for id in members {
            let Some(key) = state.node(id).map(|n| n.public_key) else { continue };
            if let Some(r) = rows.iter().find(|r| r.public_key == key) {
                election.tunnel(node, id, Sample { rx_bytes: r.rx_bytes, last_handshake: r.last_handshake }, now);
            }
        }
        drop(election);
        self.elect.notify_one();
    }

    /// The primaries for `groups` now. Called when a state is published.
    pub(super) fn elected(&self, groups: &BTreeMap<IpNet, BTreeSet<String>>) -> BTreeMap<IpNet, String> {
        let mut election = lock(&self.election);
        election.set_groups(groups);
        election.evaluate(Instant::now())
    }

    /// The route groups as of the last evaluation.
    pub fn route_groups(&self) -> Vec<GroupStatus> {
        lock(&self.election).status()
    }

    /// Publishes a new version if the election names other primaries than the current
    /// state's. Writes to the store only then.
    pub async fn reelect(&self) -> Result<Option<u64>, Error> {
        let changed = |s: &crate::state::GlobalState| *s.primaries() != lock(&self.election).evaluate(Instant::now());
        if !changed(&self.current()) {
            return Ok(None);
        }
        let store = self.store().await;
        let state = self.current();
        if !changed(&state) {
            return Ok(None);
        }
        let primaries = lock(&self.election).evaluate(Instant::now());
        let version =
            store.commit(store.begin().await?, Some(&crate::change::Change::Primaries(primaries.clone()))).await?;
        tracing::info!(version, primaries = ?primaries, "route group primaries changed");
        self.published(version).await;
        Ok(Some(version))
    }

    /// Re-evaluates the election on every health event and every [`TICK`] until shutdown.
    pub async fn run_election(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        loop {
            if !self.current().groups.is_empty() {
                if let Err(e) = self.reelect().await {
                    tracing::warn!(error = %e, "route group election not published; retrying");
                }
            }
            tokio::select! {
                _ = self.elect.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = super::stopped(&mut shutdown) => return,
            }
        }
    }
}
