//! Administration: policy, nodes, enrollment keys.

use std::collections::HashMap;
use std::fmt;

use wirefence_proto::v1::{self, IpPrefix, PeerStat, SocketAddress};

use super::sync::ViewSync;
use super::Registry;
use crate::model::NodeRec;
use crate::policy;
use crate::store::{self, NodeRow};
use crate::Error;

/// An applied policy: the version it took effect at, its rule and passed test counts, and
/// the `node:`/`tag:` selectors no node matches yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub rules: usize,
    pub tests_passed: usize,
    pub unmatched: Vec<String>,
}

/// The current policy file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyFile {
    pub file_name: String,
    pub source: String,
    /// The version it was applied at; 0 = none applied yet.
    pub version: u64,
}

/// A created enrollment key (the key is shown once).
pub struct NewKey {
    pub key_id: String,
    pub key: String,
    /// Unix seconds; 0 = never.
    pub expires_unix: i64,
}

/// Leaves the secret out, so the key can only reach the admin's terminal.
impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("key_id", &self.key_id)
            .field("key", &"<redacted>")
            .field("expires_unix", &self.expires_unix)
            .finish()
    }
}

impl Registry {
    /// Validates `source` (syntax, references, satisfiability, then the tests against the
    /// current nodes) and, only if all pass, makes it the policy of every node.
    pub async fn apply_policy(&self, file_name: &str, source: &str) -> Result<Applied, Error> {
        let policy = policy::parse(file_name, source)?;
        let store = self.store().await;
        let state = self.current();
        let rules = policy::compile(&policy, &state.nodes);
        let tests_passed = policy::run_tests(&policy, &rules, &state.nodes)?;
        let unmatched = policy::unmatched_selectors(&policy, &state.nodes);
        let mut tx = store.begin().await?;
        store::set_policy(&mut tx, file_name, source).await?;
        let change = crate::change::Change::Policy { file_name: file_name.to_owned(), source: source.to_owned() };
        let version = store.commit(tx, Some(&change)).await?;
        let rule_count = policy.rules.len();
        self.published(version).await;
        tracing::info!(version, rules = rule_count, tests_passed, file = file_name, ?unmatched, "policy applied");
        Ok(Applied { version, rules: rule_count, tests_passed, unmatched })
    }

    pub async fn policy_file(&self) -> Result<PolicyFile, Error> {
        Ok(self
            .store()
            .await
            .policy()
            .await?
            .map(|(file_name, source, version)| PolicyFile { file_name, source, version })
            .unwrap_or_default())
    }

    /// Live nodes (and removed ones with `include_removed`), as the admin API shows them.
    pub async fn list_nodes(&self, include_removed: bool) -> Result<Vec<v1::Node>, Error> {
        let rows = self.store().await.nodes().await?;
        Ok(rows.into_iter().filter(|r| include_removed || !r.removed).map(|r| self.node_info(r)).collect())
    }

    /// A live node by id or hostname, else a removed one by id or hostname.
    pub async fn get_node(&self, sel: &str) -> Result<v1::Node, Error> {
        let rows = self.store().await.nodes().await?;
        Ok(self.node_info(find_any(rows, sel)?))
    }

    /// Removes a live node: its credential stops working, its streams end, and it leaves
    /// every other node's view. Returns the new version.
    pub async fn remove_node(&self, sel: &str) -> Result<u64, Error> {
        let store = self.store().await;
        let row = find(store.nodes().await?, sel)?;
        let id = row.rec.id;
        let mut tx = store.begin().await?;
        store::mark_removed(&mut tx, &id).await?;
        let version = store.commit(tx, Some(&crate::change::Change::Removed(id.clone()))).await?;
        self.published(version).await;
        tracing::info!(node = %id, version, "node removed");
        Ok(version)
    }

    /// A node row with what is observed of it (kept in memory, see `observed`).
    fn node_info(&self, r: NodeRow) -> v1::Node {
        let observed = self.observed.get(&r.rec.id);
        let current = self.current();
        // Only a name the node owns: an unbound hostname is a label the agent chose itself.
        let hostname = |id: &str| current.node(id).filter(|n| n.bound).map(|n| n.hostname.clone()).unwrap_or_default();
        let by_key: HashMap<&[u8], &NodeRec> = match observed.peer_stats.is_empty() {
            true => HashMap::new(),
            false => current.nodes.iter().map(|n| (&n.public_key[..], &**n)).collect(),
        };
        let peer_name = |key: &[u8]| {
            let n = by_key.get(key)?;
            Some(if n.bound { n.hostname.clone() } else { n.id.clone() })
        };
        let peer_stats = observed
            .peer_stats
            .iter()
            .map(|s| PeerStat {
                name: peer_name(&s.public_key).unwrap_or_default(),
                public_key: s.public_key.clone(),
                last_handshake_unix: s.last_handshake,
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
                endpoint: s.endpoint.map(SocketAddress::from),
            })
            .collect();
        // Kept in the live record only (see NodeRec::refused_routes).
        let refused = current.node(&r.rec.id).map(|n| n.refused_routes.clone()).unwrap_or_default();
        let sync = match r.removed {
            true => ViewSync::Unknown,
            false => self.view_sync(&r.rec.id, r.applied_version, &observed),
        };
        let (last_refusal_unix, last_refusal) = observed.last_refusal.clone().unwrap_or_default();
        let route_groups = self
            .route_groups()
            .into_iter()
            .filter(|g| g.members.iter().any(|m| m.node == r.rec.id))
            .map(|g| v1::RouteGroup {
                prefix: Some(g.prefix.into()),
                primary: g.primary.unwrap_or_default(),
                members: g
                    .members
                    .into_iter()
                    .map(|m| v1::RouteGroupMember {
                        hostname: hostname(&m.node),
                        node_id: m.node,
                        priority: m.priority,
                        healthy: m.healthy,
                        checked: m.checked,
                        tunnel_dead: m.tunnel_dead,
                    })
                    .collect(),
            })
            .collect();
        let n = r.rec;
        v1::Node {
            node_id: n.id,
            hostname: n.hostname,
            public_key: n.public_key.to_vec(),
            addresses: n.addresses.iter().map(|a| IpPrefix::from(*a)).collect(),
            endpoints: n.endpoints.iter().map(|e| SocketAddress::from(*e)).collect(),
            tags: n.tags,
            routes: n.routes.iter().map(|a| IpPrefix::from(*a)).collect(),
            applied_version: r.applied_version,
            last_error: r.last_error,
            last_seen_unix: observed.last_seen,
            connected: observed.connected > 0,
            peer_stats,
            name_bound: n.bound,
            refused_routes: refused.iter().map(|r| r.to_wire()).collect(),
            granted_routes: r.granted_routes.iter().map(|a| IpPrefix::from(*a)).collect(),
            route_groups,
            sync: match sync {
                ViewSync::Unknown => v1::ViewSync::Unknown,
                ViewSync::InSync => v1::ViewSync::InSync,
                ViewSync::Behind(_) => v1::ViewSync::Behind,
            }
            .into(),
            updates_behind: match sync {
                ViewSync::Behind(n) => n,
                ViewSync::Unknown | ViewSync::InSync => 0,
            },
            removed: r.removed,
            last_refusal,
            last_refusal_unix,
        }
    }
}

/// A removed node by id, else one that had the hostname (several may have had it: the
/// lowest id; its id picks another).
pub(super) fn find_removed(rows: Vec<NodeRow>, sel: &str) -> Option<NodeRow> {
    let (by_id, rest): (Vec<_>, Vec<_>) = rows.into_iter().filter(|r| r.removed).partition(|r| r.rec.id == sel);
    by_id.into_iter().next().or_else(|| rest.into_iter().find(|r| r.rec.hostname == sel))
}

/// A live node as [`find`] picks it, else a removed one as [`find_removed`] does.
pub(super) fn find_any(rows: Vec<NodeRow>, sel: &str) -> Result<NodeRow, Error> {
    match find(rows.clone(), sel) {
        Ok(row) => Ok(row),
        Err(e) => find_removed(rows, sel).ok_or(e),
    }
}

/// A live node by id, else the live node that owns the hostname, else a live node with
/// that label.
pub(super) fn find(rows: Vec<NodeRow>, sel: &str) -> Result<NodeRow, Error> {
    let mut live = rows.into_iter().filter(|r| !r.removed);
    let (by_id, mut rest): (Vec<_>, Vec<_>) = live.by_ref().partition(|r| r.rec.id == sel);
    rest.sort_by_key(|r| !r.rec.bound);
    by_id
        .into_iter()
        .next()
        .or_else(|| rest.into_iter().find(|r| r.rec.hostname == sel))
        .ok_or_else(|| Error::UnknownNode(sel.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_keys_do_not_show_the_secret_in_debug() {
        let k = NewKey { key_id: "kabc".into(), key: "kabc.s3cr3t-material".into(), expires_unix: 0 };
        let shown = format!("{k:?} {k:#?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("kabc"), "{shown}");
        let reply = v1::CreateEnrollmentKeyReply { key_id: k.key_id, key: k.key, expires_unix: 0 };
        let shown = format!("{reply:?} {reply:#?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("<redacted>"), "{shown}");
    }
}
