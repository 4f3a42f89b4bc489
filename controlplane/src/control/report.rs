//! Agent reports (applied versions, apply errors, peer statistics, flow records) and the
//! connection count behind `Node.connected`.

use wirefence_proto::v1::{agent_report, AgentReport, SocketAddress};

use super::{lock, Control, FLOW_LOG};
use crate::model::now_unix;
use crate::store::PeerStatRow;
use crate::Error;

/// At most this many peer statistics are kept per node.
pub const MAX_PEER_STATS: usize = 4096;
/// Apply errors are kept up to this many bytes.
pub const MAX_REASON: usize = 1024;

/// Decrements the node's connection count when dropped.
pub struct Connection<'a> {
    control: &'a Control,
    node: String,
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.control.connected);
        if let Some(c) = map.get_mut(&self.node) {
            *c -= 1;
            if *c == 0 {
                map.remove(&self.node);
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Control {
    /// Counts a Watch stream of `node` until the guard drops; records it as seen.
    pub fn connect(&self, node: &str) -> Result<Connection<'_>, Error> {
        // Touch first: counting only once the guard exists means an error leaves no count.
        self.store().touch(node, now_unix())?;
        *lock(&self.connected).entry(node.to_owned()).or_default() += 1;
        Ok(Connection { control: self, node: node.to_owned() })
    }

    /// Whether `node` is a live node of the current state.
    pub fn is_live(&self, node: &str) -> bool {
        self.current().node(node).is_some()
    }

    /// Records one report message of `node`.
    pub fn report(&self, node: &str, report: AgentReport) -> Result<(), Error> {
        if !self.is_live(node) {
            return Err(Error::NodeRemoved(node.to_owned()));
        }
        let now = now_unix();
        match report.body {
            None => self.store().touch(node, now)?,
            Some(agent_report::Body::Applied(a)) => {
                tracing::debug!(node, version = a.version, "applied");
                self.store().record_applied(node, a.version, now)?;
            }
            Some(agent_report::Body::Failed(f)) => {
                tracing::warn!(node, version = f.version, reason = %truncate(&f.reason, MAX_REASON), "apply failed");
                self.store().record_failed(node, truncate(&f.reason, MAX_REASON), now)?;
            }
            Some(agent_report::Body::Stats(s)) => {
                let rows: Vec<PeerStatRow> = s
                    .peers
                    .into_iter()
                    .take(MAX_PEER_STATS)
                    .map(|p| PeerStatRow {
                        public_key: p.public_key,
                        last_handshake: p.last_handshake_unix,
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        endpoint: p.endpoint.as_ref().and_then(|e: &SocketAddress| e.try_into().ok()),
                    })
                    .collect();
                self.store().set_peer_stats(node, &rows, now)?;
            }
            Some(agent_report::Body::Flows(f)) => {
                tracing::debug!(node, records = f.records.len(), "flow records");
                let mut log = lock(&self.flows);
                for r in f.records {
                    if log.len() == FLOW_LOG {
                        log.pop_front();
                    }
                    log.push_back((node.to_owned(), r));
                }
                drop(log);
                self.store().touch(node, now)?;
            }
        }
        Ok(())
    }

    /// The most recent flow records (node id, record), oldest first.
    pub fn recent_flows(&self) -> Vec<(String, wirefence_proto::v1::FlowRecord)> {
        lock(&self.flows).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Overlay, DEFAULT_HISTORY};

    #[test]
    fn a_failed_connect_leaves_no_connection_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("control.db");
        let control = Control::open(&db, Overlay::default(), DEFAULT_HISTORY).unwrap();
        let guard = control.connect("n1").unwrap();
        assert_eq!(lock(&control.connected).get("n1"), Some(&1));
        drop(guard);
        assert!(lock(&control.connected).is_empty());
        // Make the store fail underneath.
        rusqlite::Connection::open(&db).unwrap().execute_batch("DROP TABLE nodes").unwrap();
        assert!(control.connect("n1").is_err());
        assert!(lock(&control.connected).is_empty(), "a failed connect must not count");
    }
}
