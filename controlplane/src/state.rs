//! Immutable global states, one per version, shared as `Arc` by every stream, and the
//! bounded history used to resume streams with a delta.
//!
//! Memory: the compiled policy (prefix sets and node indices per rule) is most of a
//! state's size, and only recent states are asked for it (streams compute views of the
//! newest state; only a resume looks further back). So the history drops the compiled
//! data of all but the [`KEEP_COMPILED`] newest states; an older state recompiles it on
//! demand from its nodes and policy, which it shares (`Arc`) with its neighbours.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};

use ipnet::IpNet;

use crate::model::NodeRec;
use crate::peers::PeerTable;
use crate::policy::{compile, CompiledRule, Policy, PrefixSet};
use crate::registry::{lock, Overlay};
use crate::view::NodePolicy;

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
    /// Per node: its entry in `peer_sets`.
    node_peers: Vec<u32>,
    /// The far sides of the rules, one sorted list of node indices per distinct set of
    /// rule memberships: in a full mesh every node shares one (each skips itself).
    peer_sets: Vec<Arc<[u32]>>,
    /// Per entry of `peer_sets`: the policy of its nodes when none of their rules is
    /// narrowed ([`NodePolicy`]), made on first use; `None` when they are.
    policies: Vec<Option<OnceLock<NodePolicy>>>,
}

fn overlaps(set: &PrefixSet, n: &NodeRec) -> bool {
    n.prefixes().any(|p| set.overlaps(p))
}

impl Compiled {
    /// `same_nodes`: a compilation of another policy over the same nodes, whose peer lists
    /// are taken where this one's are equal (views then see the same list, and compare no
    /// position).
    fn new(policy: &Policy, nodes: &[Arc<NodeRec>], same_nodes: Option<&Compiled>) -> Compiled {
        let rules = compile(policy, nodes);
        let mut c = Compiled {
            from_nodes: vec![Vec::new(); rules.len()],
            to_nodes: vec![Vec::new(); rules.len()],
            node_rules: vec![Vec::new(); nodes.len()],
            rules,
            node_peers: Vec::new(),
            peer_sets: Vec::new(),
            policies: Vec::new(),
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
        c.group_peers();
        if let Some(prev) = same_nodes {
            let known: HashMap<&[u32], &Arc<[u32]>> = prev.peer_sets.iter().map(|s| (&s[..], s)).collect();
            for set in &mut c.peer_sets {
                if let Some(k) = known.get(&set[..]) {
                    *set = Arc::clone(k);
                }
            }
        }
        c
    }

    /// Fills `node_peers` and `peer_sets`: costs the far sides of each distinct set of
    /// memberships once, not once per node.
    fn group_peers(&mut self) {
        let mut sets: HashMap<&[(usize, bool, bool)], u32> = HashMap::new();
        let mut peer_sets = Vec::new();
        let mut policies = Vec::new();
        let mut node_peers = Vec::with_capacity(self.node_rules.len());
        for memberships in &self.node_rules {
            let set = *sets.entry(memberships.as_slice()).or_insert_with(|| {
                let mut far: Vec<u32> = Vec::new();
                for &(ri, in_from, in_to) in memberships {
                    let sides =
                        in_from.then_some(&self.to_nodes[ri]).into_iter().chain(in_to.then_some(&self.from_nodes[ri]));
                    far.extend(sides.flatten().map(|&ni| u32::try_from(ni).unwrap_or(u32::MAX)));
                }
                far.sort_unstable();
                far.dedup();
                peer_sets.push(Arc::from(far));
                let unnarrowed = memberships.iter().all(|&(_, in_from, in_to)| in_from && in_to);
                policies.push(unnarrowed.then(OnceLock::new));
                u32::try_from(peer_sets.len() - 1).unwrap_or(u32::MAX)
            });
            node_peers.push(set);
        }
        (self.node_peers, self.peer_sets, self.policies) = (node_peers, peer_sets, policies);
    }

    /// Node `ni`'s peers, as indices into the state's nodes (may include `ni` itself).
    pub fn peers_of(&self, ni: usize) -> &Arc<[u32]> {
        &self.peer_sets[self.node_peers[ni] as usize]
    }

    /// The policy node `ni` shares with every node with its rules, `None` when a rule is
    /// narrowed to the node (each has its own then).
    pub fn shared_policy(&self, ni: usize) -> Option<&OnceLock<NodePolicy>> {
        self.policies[self.node_peers[ni] as usize].as_ref()
    }
}

/// Everything views are computed from at one version.
#[derive(Debug)]
pub struct GlobalState {
    pub version: u64,
    /// Live nodes, ordered by id.
    pub nodes: Arc<Vec<Arc<NodeRec>>>,
    pub policy: Arc<Policy>,
    /// The overlay ranges and every live node's routes: what the mesh routes, which a
    /// node must never send out in clear (each view carries it, minus the node's own routes).
    pub mesh_prefixes: Arc<[IpNet]>,
    /// Route groups: prefixes routed by several live nodes, with their node ids.
    pub groups: Arc<BTreeMap<IpNet, BTreeSet<String>>>,
    /// Each group's primary, the one node other nodes route the prefix to (set by the
    /// registry's election when the state is published).
    primaries: Arc<BTreeMap<IpNet, String>>,
    overlay: Overlay,
    /// Computed on first use; dropped by the history once the state is old.
    compiled: Mutex<Option<Arc<Compiled>>>,
    /// The previous state's compilation when only the policy changed, until this one's is
    /// made (see [`Compiled::new`]).
    same_nodes: Mutex<Option<Arc<Compiled>>>,
    /// The nodes as peers of a node that routes no group prefix; made on first use, and
    /// shared with the next state when only the policy changes.
    peer_table: Mutex<Option<Arc<PeerTable>>>,
    /// When this state was made (just before it was committed and published): push
    /// latency is measured from here.
    pub created: std::time::Instant,
}

impl GlobalState {
    pub fn new(version: u64, mut nodes: Vec<Arc<NodeRec>>, policy: Arc<Policy>, overlay: Overlay) -> GlobalState {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let mut mesh_prefixes: BTreeSet<IpNet> = [overlay.v4, overlay.v6].into();
        mesh_prefixes.extend(nodes.iter().flat_map(|n| n.routes.iter().copied()));
        let mut routers: BTreeMap<IpNet, BTreeSet<String>> = BTreeMap::new();
        for n in &nodes {
            for r in &n.routes {
                routers.entry(*r).or_default().insert(n.id.clone());
            }
        }
        routers.retain(|_, ids| ids.len() > 1);
        GlobalState {
            version,
            nodes: Arc::new(nodes),
            policy,
            mesh_prefixes: mesh_prefixes.into_iter().collect(),
            groups: Arc::new(routers),
            primaries: Arc::default(),
            overlay,
            compiled: Mutex::default(),
            same_nodes: Mutex::default(),
            peer_table: Mutex::default(),
            created: std::time::Instant::now(),
        }
    }

    pub fn primaries(&self) -> &BTreeMap<IpNet, String> {
        &self.primaries
    }

    /// Makes the primaries those of `in_force` that are still members of their groups; a
    /// group without one starts with its lowest node id (what the election picks when no
    /// member reported) until the elector decides. A function of the state and `in_force`
    /// only, so every server derives the same primaries for a version.
    pub fn settle_primaries(&mut self, in_force: &BTreeMap<IpNet, String>) {
        let settled = self
            .groups
            .iter()
            .filter_map(|(prefix, ids)| {
                let kept = in_force.get(prefix).filter(|id| ids.contains(*id));
                kept.or_else(|| ids.first()).map(|id| (*prefix, id.clone()))
            })
            .collect();
        self.set_primaries(settled);
    }

    /// Sets the route groups' primaries; a peer table made for others is dropped.
    fn set_primaries(&mut self, primaries: BTreeMap<IpNet, String>) {
        if *self.primaries != primaries {
            self.primaries = Arc::new(primaries);
            *lock(&self.peer_table) = None;
        }
    }

    /// The nodes as peers of any node that routes no group prefix (see [`Self::as_peer`]),
    /// in the order of `nodes`.
    pub fn peer_table(&self) -> Arc<PeerTable> {
        lock(&self.peer_table)
            .get_or_insert_with(|| {
                let recs = self.nodes.iter().map(|n| self.as_peer(n, &[])).collect();
                Arc::new(PeerTable::new(recs, self.overlay.keepalive))
            })
            .clone()
    }

    /// Whether `me` routes a prefix several nodes route (its peers look different to it).
    pub fn routes_a_group(&self, me: &NodeRec) -> bool {
        !self.groups.is_empty() && me.routes.iter().any(|r| self.groups.contains_key(r))
    }

    /// The same nodes under another policy.
    pub fn with_policy(&self, version: u64, policy: Arc<Policy>) -> GlobalState {
        GlobalState {
            version,
            nodes: self.nodes.clone(),
            policy,
            mesh_prefixes: self.mesh_prefixes.clone(),
            groups: self.groups.clone(),
            primaries: self.primaries.clone(),
            overlay: self.overlay,
            compiled: Mutex::default(),
            same_nodes: Mutex::new(lock(&self.compiled).clone()),
            peer_table: Mutex::new(lock(&self.peer_table).clone()),
            created: std::time::Instant::now(),
        }
    }

    /// The same nodes and policy with other route group primaries, settled against this
    /// state's groups (an election decided on an older state may name a node that left
    /// since). The compiled policy does not depend on them, so it is shared: a failover
    /// costs no recompilation.
    pub fn with_primaries(&self, version: u64, primaries: &BTreeMap<IpNet, String>) -> GlobalState {
        let mut state = GlobalState {
            version,
            nodes: self.nodes.clone(),
            policy: self.policy.clone(),
            mesh_prefixes: self.mesh_prefixes.clone(),
            groups: self.groups.clone(),
            primaries: Arc::default(),
            overlay: self.overlay,
            compiled: Mutex::new(lock(&self.compiled).clone()),
            same_nodes: Mutex::default(),
            peer_table: Mutex::default(),
            created: std::time::Instant::now(),
        };
        state.settle_primaries(primaries);
        state
    }

    /// Node `n` as a peer of a node routing `my_routes`: without the group prefixes it is
    /// not the primary of, nor those the viewer routes itself (a member reaches its LAN
    /// directly, and WireGuard takes a prefix from one peer only).
    pub fn as_peer(&self, n: &Arc<NodeRec>, my_routes: &[IpNet]) -> Arc<NodeRec> {
        let keep = |r: &IpNet| {
            !self.groups.contains_key(r) || (self.primaries.get(r) == Some(&n.id) && !my_routes.contains(r))
        };
        if self.groups.is_empty() || n.routes.iter().all(keep) {
            return n.clone();
        }
        Arc::new(NodeRec { routes: n.routes.iter().copied().filter(keep).collect(), ..(**n).clone() })
    }

    /// The same policy with other nodes; the primaries carry over (see
    /// [`Self::settle_primaries`]).
    pub fn with_nodes(&self, version: u64, nodes: Vec<Arc<NodeRec>>) -> GlobalState {
        let mut state = GlobalState::new(version, nodes, self.policy.clone(), self.overlay);
        state.settle_primaries(&self.primaries);
        state
    }

    /// The overlay network this state was made for.
    pub fn overlay(&self) -> Overlay {
        self.overlay
    }

    pub fn node(&self, id: &str) -> Option<&Arc<NodeRec>> {
        self.index(id).map(|i| &self.nodes[i])
    }

    /// The position of node `id` in `nodes`.
    pub fn index(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.as_str().cmp(id)).ok()
    }

    /// The policy compiled against the nodes (computed on first use, and again after
    /// [`GlobalState::release`]). Computed under the lock, so concurrent streams wait for
    /// one compilation instead of each doing their own.
    pub fn compiled(&self) -> Arc<Compiled> {
        lock(&self.compiled)
            .get_or_insert_with(|| {
                let same_nodes = lock(&self.same_nodes).take();
                Arc::new(Compiled::new(&self.policy, &self.nodes, same_nodes.as_deref()))
            })
            .clone()
    }

    /// Drops the cached compilation and peer table (holders of them keep theirs). Skipped
    /// while someone is making them, so a publish never waits for that; the next push retries.
    fn release(&self) {
        fn take<T>(m: &Mutex<Option<T>>) {
            match m.try_lock() {
                Ok(mut c) => drop(c.take()),
                Err(TryLockError::Poisoned(e)) => drop(e.into_inner().take()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        take(&self.compiled);
        take(&self.same_nodes);
        // Views still holding the table keep it; the state makes another if asked.
        take(&self.peer_table);
    }

    pub fn is_compiled(&self) -> bool {
        lock(&self.compiled).is_some()
    }
}

/// How many of the newest states keep their compiled policy in the history. More than
/// one, so streams still working on the previous state when a new one is published do
/// not recompile it.
pub const KEEP_COMPILED: usize = 4;

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
        // Old states rarely need it again (a resume from far back), so recompiling then
        // is cheaper than keeping it for every version.
        let old = self.states.len().saturating_sub(KEEP_COMPILED);
        for s in self.states.range(..old) {
            s.release();
        }
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
            h.push(Arc::new(GlobalState::new(v, vec![], Arc::new(Policy::default()), Overlay::default())));
        }
        assert!(h.get(2).is_none());
        assert_eq!(h.get(3).unwrap().version, 3);
        assert_eq!(h.get(5).unwrap().version, 5);
        assert!(h.get(6).is_none());
    }

    #[test]
    fn primaries_are_settled_against_the_groups() {
        let node = |id: &str| {
            let mut n = (*crate::policy::tests::node(id, id, id.as_bytes()[0], &[])).clone();
            n.routes = vec!["10.88.0.0/24".parse().unwrap()];
            Arc::new(n)
        };
        let net: IpNet = "10.88.0.0/24".parse().unwrap();
        let two = GlobalState::new(1, vec![node("b"), node("c")], Arc::new(Policy::default()), Overlay::default());
        let elected = two.with_primaries(2, &[(net, "c".to_string())].into());
        assert_eq!(elected.primaries()[&net], "c");
        // c leaves: the group's lowest id until the elector decides.
        let left = elected.with_nodes(3, vec![node("b"), node("a")]);
        assert_eq!(left.primaries()[&net], "a");
        // An election made before c left, committed after: settled the same way.
        let late = left.with_primaries(4, &[(net, "c".to_string())].into());
        assert_eq!(late.primaries()[&net], "a");
        // A prefix that is no group (one router) has no primary.
        let alone = late.with_nodes(5, vec![node("b")]);
        assert!(alone.primaries().is_empty());
    }

    #[test]
    fn only_recent_states_keep_their_compilation() {
        let policy =
            Arc::new(crate::policy::parse("p", "[[rules]]\nid = \"r\"\nfrom = [\"*\"]\nto = [\"*\"]\n").unwrap());
        let mut h = History::new(16);
        for v in 1..=10 {
            let s = Arc::new(GlobalState::new(v, vec![], policy.clone(), Overlay::default()));
            s.compiled();
            h.push(s);
        }
        let kept: Vec<u64> = (1..=10).filter(|v| h.get(*v).unwrap().is_compiled()).collect();
        assert_eq!(kept, (11 - KEEP_COMPILED as u64..=10).collect::<Vec<_>>());
        // An old state still answers, recompiling on demand.
        assert_eq!(h.get(1).unwrap().compiled().rules.len(), h.get(10).unwrap().compiled().rules.len());
    }
}
