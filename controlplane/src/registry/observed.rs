//! What agents are observed doing: connection count, last contact, peer statistics. These
//! are observations, not configuration, so they live in memory only: a restart forgets
//! them until the agents report again, and reports never write to the database for them
//! (at 1,000 agents the peer-stats reports alone would be ~100 transactions a second).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::{lock, Registry};
use crate::model::now_unix;
use crate::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatRow {
    pub public_key: Vec<u8>,
    pub last_handshake: i64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub endpoint: Option<SocketAddr>,
}

/// One node's observations.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Open Watch streams.
    pub connected: usize,
    /// Unix seconds of the last stream opened or report message; 0 = not since start.
    pub last_seen: i64,
    pub peer_stats: Vec<PeerStatRow>,
    /// The control plane's certificate expiry per address family, as the node last reported
    /// it (checked to be a plausible certificate time).
    pub cert_expiry: CertExpiry,
    /// Routes its last registration advertised (`None`: none since start).
    pub requested_routes: Option<Vec<ipnet::IpNet>>,
    /// Versions of the last updates sent on its Watch streams, oldest first
    /// ([`super::sync`]).
    pub sent: std::collections::VecDeque<u64>,
    /// Its last refused registration (Unix seconds, reason), cleared by a successful one.
    pub last_refusal: Option<(i64, String)>,
}

/// Unix seconds a certificate expires, per address family; `None`: not reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CertExpiry {
    pub ipv4: Option<i64>,
    pub ipv6: Option<i64>,
}

impl CertExpiry {
    /// The earlier of each family.
    pub fn earliest(self, other: CertExpiry) -> CertExpiry {
        let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        CertExpiry { ipv4: min(self.ipv4, other.ipv4), ipv6: min(self.ipv6, other.ipv6) }
    }
}

/// Observations of every node seen since start, by node id. Every stream updates its node's
/// per update sent: hashed with foldhash, not SipHash (node ids are the control plane's own,
/// nobody can choose them to collide).
#[derive(Debug, Default)]
pub struct Observations(Mutex<HashMap<String, Observed, foldhash::fast::RandomState>>);

impl Observations {
    /// Marks `node` as seen now and applies `f` to its observations.
    pub fn seen(&self, node: &str, f: impl FnOnce(&mut Observed)) {
        self.update(node, |o| {
            o.last_seen = now_unix();
            f(o);
        });
    }

    pub fn get(&self, node: &str) -> Observed {
        lock(&self.0).get(node).cloned().unwrap_or_default()
    }

    /// Applies `f` to `node`'s observations without counting it as a sign of life.
    pub fn update(&self, node: &str, f: impl FnOnce(&mut Observed)) {
        let mut all = lock(&self.0);
        // Every stream calls this per update sent: no key copied when the node is there.
        match all.get_mut(node) {
            Some(o) => f(o),
            None => f(all.entry(node.to_owned()).or_default()),
        }
    }

    pub fn forget(&self, node: &str) {
        lock(&self.0).remove(node);
    }

    fn disconnect(&self, node: &str) {
        if let Some(o) = lock(&self.0).get_mut(node) {
            o.connected = o.connected.saturating_sub(1);
        }
    }
}

/// Nodes by state and streams, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Live nodes with at least one Watch stream open.
    pub connected: usize,
    /// Live nodes without one.
    pub disconnected: usize,
    /// Removed nodes (kept, their names reserved).
    pub removed: usize,
    /// Open Watch streams.
    pub streams: usize,
    /// Version at which the current policy was applied (0: none).
    pub policy_version: u64,
    /// The earliest certificate expiry per family any live node reports.
    pub reported_cert_expiry: CertExpiry,
}

impl Registry {
    /// Counts the nodes: live ones from the current state and the observations, removed
    /// ones from the store.
    pub async fn node_counts(&self) -> Result<NodeCounts, Error> {
        let state = self.current();
        let mut c = NodeCounts::default();
        for n in state.nodes.iter() {
            let observed = self.observed.get(&n.id);
            c.reported_cert_expiry = c.reported_cert_expiry.earliest(observed.cert_expiry);
            let streams = observed.connected;
            c.streams += streams;
            if streams > 0 {
                c.connected += 1;
            } else {
                c.disconnected += 1;
            }
        }
        let store = self.store().await;
        c.removed = store.nodes().await?.iter().filter(|r| r.removed).count();
        c.policy_version = store.policy().await?.map_or(0, |(_, _, v)| v);
        Ok(c)
    }
}

/// Counts one Watch stream of a node until dropped.
pub struct Connection {
    registry: Arc<Registry>,
    node: String,
}

impl Connection {
    /// Counts a new stream of `node`, unless it already has `max`.
    pub(super) fn open(registry: Arc<Registry>, node: &str, max: usize) -> Result<Connection, Error> {
        let mut full = false;
        registry.observed.seen(node, |o| {
            full = o.connected >= max;
            if !full {
                o.connected += 1;
            }
        });
        if full {
            return Err(Error::TooManyWatches { node: node.to_owned(), max });
        }
        Ok(Connection { registry, node: node.to_owned() })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.observed.disconnect(&self.node);
    }
}
