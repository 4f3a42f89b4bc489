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
}

/// Observations of every node seen since start, by node id.
#[derive(Debug, Default)]
pub struct Observations(Mutex<HashMap<String, Observed>>);

impl Observations {
    /// Marks `node` as seen now and applies `f` to its observations.
    pub fn seen(&self, node: &str, f: impl FnOnce(&mut Observed)) {
        let mut map = lock(&self.0);
        let o = map.entry(node.to_owned()).or_default();
        o.last_seen = now_unix();
        f(o);
    }

    pub fn get(&self, node: &str) -> Observed {
        lock(&self.0).get(node).cloned().unwrap_or_default()
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
