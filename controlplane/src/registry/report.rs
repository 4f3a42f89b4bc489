//! Agent reports (applied versions, apply errors, peer statistics, flow records) and the
//! opening of Watch streams. The apply status is durable, flow records go to the database
//! through [`super::flows`]; the rest is observed in memory ([`super::observed`]).

use std::sync::Arc;

use wirefence_proto::v1::{agent_report, AgentReport, SocketAddress};
use wirefence_proto::Escaped;

use super::observed::{CertExpiry, Connection, PeerStatRow};
use super::Registry;
use crate::store::StoreError;
use crate::Error;

/// At most this many peer statistics are kept per node.
pub const MAX_PEER_STATS: usize = 4096;
/// Apply errors are kept up to this many bytes.
pub const MAX_REASON: usize = 1024;
/// Reported certificate expiries outside these Unix seconds (2000-01-01, the last second
/// X.509 can express: 9999-12-31T23:59:59Z) are not certificate times and are dropped.
pub const CERT_EXPIRY_RANGE: std::ops::RangeInclusive<i64> = 946_684_800..=253_402_300_799;

/// A reported expiry as kept: 0 means "not known"; anything else must be a certificate time.
fn reported_expiry(node: &str, family: &str, unix: i64) -> Option<i64> {
    match unix {
        0 => None,
        t if CERT_EXPIRY_RANGE.contains(&t) => Some(t),
        t => {
            tracing::warn!(node, family, value = t, "reported certificate expiry is not a certificate time; ignored");
            None
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

/// A report body that has to be written to the store (see [`Registry::record`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durable {
    Applied(u64),
    Failed(String),
}

/// A status write's outcome: while the database is unavailable the status is not kept
/// (the agent reports again with its next version) and the agent's streams go on.
fn status_written(node: &str, written: Result<(), StoreError>) -> Result<(), Error> {
    match written {
        Err(StoreError::Unavailable(e)) => {
            tracing::warn!(node, error = %e, "database unavailable: a node's apply status is not recorded");
            Ok(())
        }
        other => Ok(other?),
    }
}

impl Registry {
    /// Opens a Watch stream of `node`, counted until the guard drops. A `resume_from`
    /// between 1 and the current version is what the agent runs, so it is recorded as
    /// applied: its Applied report may have been lost with its previous session. That
    /// record is status, not a change (see [`Registry::status_turn`]), and skipped while the
    /// database is unavailable (the stream serves the state in memory).
    /// At most `limits.max_watches_per_node` streams per node (`TooManyWatches`).
    pub async fn connect(self: &Arc<Self>, node: &str, resume_from: u64) -> Result<Connection, Error> {
        let connection = Connection::open(self.clone(), node, self.limits.max_watches_per_node)?;
        if resume_from > 0 && resume_from <= self.current().version {
            let _turn = self.status_turn().await;
            status_written(node, self.store.acknowledge(node, resume_from).await)?;
        }
        Ok(connection)
    }

    /// Whether `node` is a live node of the current state.
    pub fn is_live(&self, node: &str) -> bool {
        self.current().node(node).is_some()
    }

    /// Records one report message of `node` in memory; returns what must still be
    /// written to the store with [`Registry::record`].
    pub fn report(&self, node: &str, report: AgentReport) -> Result<Option<Durable>, Error> {
        if !self.is_live(node) {
            return Err(Error::NodeRemoved(node.to_owned()));
        }
        let mut durable = None;
        let mut stats = None;
        let mut cert_expiry = None;
        match report.body {
            None => {}
            Some(agent_report::Body::Applied(a)) => {
                tracing::debug!(node, version = a.version, "applied");
                durable = Some(Durable::Applied(a.version));
            }
            Some(agent_report::Body::Failed(f)) => {
                let reason = truncate(&f.reason, MAX_REASON);
                tracing::warn!(node, version = f.version, reason = %Escaped(reason), "apply failed");
                durable = Some(Durable::Failed(reason.to_owned()));
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
                self.tunnel_stats(node, &rows);
                stats = Some(rows);
            }
            Some(agent_report::Body::CertExpiry(e)) => {
                cert_expiry = Some(CertExpiry {
                    ipv4: reported_expiry(node, "ipv4", e.ipv4_not_after_unix),
                    ipv6: reported_expiry(node, "ipv6", e.ipv6_not_after_unix),
                });
            }
            Some(agent_report::Body::RouteHealth(h)) => self.route_health(node, h),
            Some(agent_report::Body::RuleHits(h)) => self.take_rule_hits(node, h),
            Some(agent_report::Body::Flows(f)) => {
                tracing::debug!(node, records = f.records.len(), "flow records");
                self.take_flows(node, f.records);
            }
        }
        self.observed.seen(node, |o| {
            if let Some(mut rows) = stats {
                rows.sort_by(|a, b| a.public_key.cmp(&b.public_key));
                o.peer_stats = rows;
            }
            if let Some(e) = cert_expiry {
                o.cert_expiry = e;
            }
        });
        Ok(durable)
    }

    /// Writes a node's apply status (see [`Registry::status_turn`]); skipped while the
    /// database is unavailable.
    pub async fn record(&self, node: &str, d: &Durable) -> Result<(), Error> {
        let _turn = self.status_turn().await;
        let written = match d {
            Durable::Applied(v) => self.store.record_applied(node, *v).await,
            Durable::Failed(reason) => self.store.record_failed(node, reason).await,
        };
        status_written(node, written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Overlay, DEFAULT_HISTORY};

    #[test]
    fn reported_expiries_outside_certificate_times_are_dropped() {
        assert_eq!(reported_expiry("n", "ipv4", 0), None, "not known");
        assert_eq!(reported_expiry("n", "ipv4", 1_900_000_000), Some(1_900_000_000));
        for bad in [-1, 1, 946_684_799, 253_402_300_800, i64::MAX, i64::MIN] {
            assert_eq!(reported_expiry("n", "ipv6", bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_failed_connect_leaves_no_connection_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("control.db");
        let registry = Arc::new(Registry::open(&(&db).into(), Overlay::default(), DEFAULT_HISTORY).await.unwrap());
        let guard = registry.connect("n1", 0).await.unwrap();
        assert_eq!(registry.observed.get("n1").connected, 1);
        assert!(registry.observed.get("n1").last_seen > 0);
        drop(guard);
        assert_eq!(registry.observed.get("n1").connected, 0);
        // Make the store fail underneath: acknowledging version 1 has to write.
        sqlx::raw_sql("DROP TABLE nodes").execute(&registry.store().await.pool).await.unwrap();
        assert!(registry.connect("n1", 1).await.is_err());
        assert_eq!(registry.observed.get("n1").connected, 0, "a failed connect must not count");
    }
}
