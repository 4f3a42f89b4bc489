//! Immutable global states, one per version, shared as `Arc` by every stream, and the
//! bounded history used to resume streams with a delta.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use crate::model::NodeRec;
use crate::policy::{compile, CompiledRule, Policy, PrefixSet};

/// The policy compiled against the nodes of a state, with who is on which side of each
/// rule, so that a node's view costs its own rules and peers, not a scan of every node.
#[derive(Debug, Default)]
pub struct Compiled {
    pub rules: Vec<Arc<CompiledRule>>,
    /// Per rule: indices (into `GlobalState::nodes`) of the nodes overlapping `from`, `to`.
    pub from_nodes: Vec<Vec<usize>>,
    pub to_nodes: Vec<Vec<usize>>,
    /// Per node: (rule index, in `from`, in `to`) for every rule it is on a side of.
    pub node_rules: Vec<Vec<(usize, bool, bool)>>,
}

fn overlaps(set: &PrefixSet, n: &NodeRec) -> bool {
    n.prefixes().any(|p| set.overlaps(p))
}

impl Compiled {
    fn new(policy: &Policy, nodes: &[Arc<NodeRec>]) -> Compiled {
        let rules = compile(policy, nodes);
        let mut c = Compiled {
            from_nodes: vec![Vec::new(); rules.len()],
            to_nodes: vec![Vec::new(); rules.len()],
            node_rules: vec![Vec::new(); nodes.len()],
            rules,
        };
        for (ri, r) in c.rules.iter().enumerate() {
            for (ni, n) in nodes.iter().enumerate() {
                let (f, t) = (overlaps(&r.from_set, n), overlaps(&r.to_set, n));
                if f {
                    c.from_nodes[ri].push(ni);
                }
                if t {
                    c.to_nodes[ri].push(ni);
                }
                if f || t {
                    c.node_rules[ni].push((ri, f, t));
                }
            }
        }
        c
    }
}

/// Everything views are computed from at one version.
#[derive(Debug)]
pub struct GlobalState {
    pub version: u64,
    /// Live nodes, ordered by id.
    pub nodes: Arc<Vec<Arc<NodeRec>>>,
    pub policy: Arc<Policy>,
    compiled: OnceLock<Compiled>,
}

impl GlobalState {
    pub fn new(version: u64, mut nodes: Vec<Arc<NodeRec>>, policy: Arc<Policy>) -> GlobalState {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        GlobalState { version, nodes: Arc::new(nodes), policy, compiled: OnceLock::new() }
    }

    /// The same nodes under another policy.
    pub fn with_policy(&self, version: u64, policy: Arc<Policy>) -> GlobalState {
        GlobalState { version, nodes: self.nodes.clone(), policy, compiled: OnceLock::new() }
    }

    /// The same policy with other nodes.
    pub fn with_nodes(&self, version: u64, nodes: Vec<Arc<NodeRec>>) -> GlobalState {
        GlobalState::new(version, nodes, self.policy.clone())
    }

    pub fn node(&self, id: &str) -> Option<&Arc<NodeRec>> {
        self.index(id).map(|i| &self.nodes[i])
    }

    /// The position of node `id` in `nodes`.
    pub fn index(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.as_str().cmp(id)).ok()
    }

    /// The policy compiled against the nodes (computed once, on first use).
    pub fn compiled(&self) -> &Compiled {
        self.compiled.get_or_init(|| Compiled::new(&self.policy, &self.nodes))
    }

    pub fn rules(&self) -> &[Arc<CompiledRule>] {
        &self.compiled().rules
    }
}

/// The last `cap` states, oldest first.
#[derive(Debug)]
pub struct History {
    states: VecDeque<Arc<GlobalState>>,
    cap: usize,
}

impl History {
    pub fn new(cap: usize) -> History {
        History { states: VecDeque::with_capacity(cap.min(1024)), cap: cap.max(1) }
    }

    pub fn push(&mut self, s: Arc<GlobalState>) {
        if self.states.len() == self.cap {
            self.states.pop_front();
        }
        self.states.push_back(s);
    }

    pub fn get(&self, version: u64) -> Option<Arc<GlobalState>> {
        self.states.binary_search_by_key(&version, |s| s.version).ok().map(|i| self.states[i].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_states() {
        let mut h = History::new(3);
        for v in 1..=5 {
            h.push(Arc::new(GlobalState::new(v, vec![], Arc::new(Policy::default()))));
        }
        assert!(h.get(2).is_none());
        assert_eq!(h.get(3).unwrap().version, 3);
        assert_eq!(h.get(5).unwrap().version, 5);
        assert!(h.get(6).is_none());
    }
}
