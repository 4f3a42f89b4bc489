//! A versioned change as the change log keeps it: enough for any server to derive state N
//! from state N−1 exactly as the server that made the change did. Every server publishes
//! states only by applying log entries in version order, its own changes included, so all
//! of them publish the same sequence (see docs/ARCHITECTURE.md, "Versions, the change log
//! and failover").

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::NodeRec;
use crate::policy;
use crate::state::GlobalState;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A node enrolled, or a live node's record changed (replaced whole).
    Node(NodeRec),
    /// A node removed.
    Removed(String),
    /// A new policy file (validated when applied; parsed again by every server).
    Policy { file_name: String, source: String },
    /// Other route group primaries.
    Primaries(BTreeMap<IpNet, String>),
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("change log entry {version}: {source}")]
    Decode { version: u64, source: serde_json::Error },
    #[error("change log entry {version}: its policy does not parse: {source}")]
    Policy { version: u64, source: Box<policy::PolicyError> },
}

impl Change {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a change serializes")
    }

    pub fn decode(version: u64, body: &str) -> Result<Change, ChangeError> {
        serde_json::from_str(body).map_err(|source| ChangeError::Decode { version, source })
    }

    /// State `version` from its predecessor `state`.
    pub fn apply(&self, state: &GlobalState, version: u64) -> Result<GlobalState, ChangeError> {
        Ok(match self {
            Change::Node(rec) => {
                let new = Arc::new(rec.clone());
                let mut nodes: Vec<Arc<NodeRec>> = state.nodes.iter().filter(|n| n.id != rec.id).cloned().collect();
                nodes.push(new);
                state.with_nodes(version, nodes)
            }
            Change::Removed(id) => {
                state.with_nodes(version, state.nodes.iter().filter(|n| n.id != *id).cloned().collect())
            }
            Change::Policy { file_name, source } => {
                let policy = policy::parse(file_name, source)
                    .map_err(|e| ChangeError::Policy { version, source: Box::new(e) })?;
                state.with_policy(version, Arc::new(policy))
            }
            Change::Primaries(primaries) => state.with_primaries(version, primaries),
        })
    }

    /// The addresses a change gives out.
    pub fn addresses(&self) -> &[IpNet] {
        match self {
            Change::Node(rec) => &rec.addresses,
            _ => &[],
        }
    }
}
