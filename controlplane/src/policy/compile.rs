//! Selectors -> prefixes against the current nodes. A node contributes its overlay host
//! prefixes (`*`, `node:`, `tag:`); a CIDR stays as written. Prefixes of a family that
//! cannot match (the other side has none of it, or ICMP/ICMPv6) are dropped, and a rule
//! left with an empty side is dropped: the agent only ever receives satisfiable rules.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use wirefence_proto::policy::normalize_ports;

use super::{Policy, PortRange, RuleDef, Selector};
use crate::model::NodeRec;

/// A set of prefixes answering membership and overlap in time independent of its size
/// (one hash lookup per prefix length present, and one ordered lookup): compiling a policy
/// asks it once per rule and node.
#[derive(Clone, Debug, Default)]
pub struct PrefixSet {
    /// Every prefix, by its (truncated) network.
    nets: HashSet<IpNet>,
    /// The prefix lengths present, per family.
    lens_v4: BTreeSet<u8>,
    lens_v6: BTreeSet<u8>,
    /// Every prefix's network address, for "some prefix lies inside this one".
    starts: BTreeSet<IpAddr>,
}

impl PrefixSet {
    pub fn new(prefixes: &[IpNet]) -> PrefixSet {
        let mut s = PrefixSet::default();
        for p in prefixes.iter().map(IpNet::trunc) {
            s.nets.insert(p);
            s.starts.insert(p.network());
            match p {
                IpNet::V4(_) => s.lens_v4.insert(p.prefix_len()),
                IpNet::V6(_) => s.lens_v6.insert(p.prefix_len()),
            };
        }
        s
    }

    fn lens(&self, ip: IpAddr) -> &BTreeSet<u8> {
        if ip.is_ipv4() {
            &self.lens_v4
        } else {
            &self.lens_v6
        }
    }

    /// Whether a prefix of the set of length <= `max_len` contains `ip`.
    fn covers(&self, ip: IpAddr, max_len: u8) -> bool {
        self.lens(ip).range(..=max_len).any(|len| IpNet::new(ip, *len).is_ok_and(|n| self.nets.contains(&n.trunc())))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.covers(ip, u8::MAX)
    }

    /// Whether some address is in both `p` and the set: a prefix of the set contains `p`,
    /// or starts inside it.
    pub fn overlaps(&self, p: &IpNet) -> bool {
        let p = p.trunc();
        self.covers(p.network(), p.prefix_len()) || self.starts.range(p.network()..=p.broadcast()).next().is_some()
    }
}

/// A rule with prefixes: what a node enforces.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    pub id: String,
    pub from: Vec<IpNet>,
    pub to: Vec<IpNet>,
    pub protocol: Option<u8>,
    /// As written (what is sent to the agents).
    pub ports: Vec<PortRange>,
    /// `ports` in the form the agent holds them ([`normalize_ports`]: sorted, merged,
    /// every port = empty), which ranks matching rules ([`super::decide`]).
    pub normal_ports: Vec<PortRange>,
    pub from_set: PrefixSet,
    pub to_set: PrefixSet,
}

impl PartialEq for CompiledRule {
    fn eq(&self, o: &CompiledRule) -> bool {
        self.id == o.id
            && self.from == o.from
            && self.to == o.to
            && self.protocol == o.protocol
            && self.ports == o.ports
    }
}

impl Eq for CompiledRule {}

/// Resolves every rule of `policy` against `nodes` (the live nodes). `node:<name>` matches
/// only the node that owns the name ([`NodeRec::bound`]); another node's label never does.
pub fn compile(policy: &Policy, nodes: &[Arc<NodeRec>]) -> Vec<Arc<CompiledRule>> {
    let by_host: HashMap<&str, &NodeRec> =
        nodes.iter().filter(|n| n.bound).map(|n| (n.hostname.as_str(), &**n)).collect();
    policy.rules.iter().filter_map(|r| compile_rule(r, nodes, &by_host)).map(Arc::new).collect()
}

/// The `node:`, `route:` and `tag:` selectors of `policy`'s rules (groups expanded) that
/// match none of `nodes` (a `route:` one: no routes), as written, sorted, each once. Not an error (they take effect when such a
/// node enrolls), but worth telling whoever applies the policy: it may be a typo.
pub fn unmatched_selectors(policy: &Policy, nodes: &[Arc<NodeRec>]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for s in policy.rules.iter().flat_map(|r| r.from.iter().chain(&r.to)) {
        match s {
            Selector::Node(h) if !nodes.iter().any(|n| n.bound && &n.hostname == h) => out.insert(format!("node:{h}")),
            Selector::Routes(h) if !nodes.iter().any(|n| n.bound && &n.hostname == h && !n.routes.is_empty()) => {
                out.insert(format!("route:{h}"))
            }
            Selector::Tag(t) if !nodes.iter().any(|n| n.tags.contains(t)) => out.insert(format!("tag:{t}")),
            _ => false,
        };
    }
    out.into_iter().collect()
}

/// The prefixes of `side`, unordered and possibly repeated ([`IpNet::aggregate`] sorts and
/// merges them: an ordered set here cost more than the rest of a full mesh's compilation).
fn resolve(side: &[Selector], nodes: &[Arc<NodeRec>], by_host: &HashMap<&str, &NodeRec>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for s in side {
        match s {
            Selector::All => out.extend(nodes.iter().flat_map(|n| n.addresses.iter().copied())),
            Selector::Node(h) => {
                if let Some(n) = by_host.get(h.as_str()) {
                    out.extend(n.addresses.iter().copied());
                }
            }
            Selector::Routes(h) => {
                if let Some(n) = by_host.get(h.as_str()) {
                    out.extend(n.routes.iter().copied());
                }
            }
            Selector::Tag(t) => out.extend(
                nodes.iter().filter(|n| n.tags.iter().any(|x| x == t)).flat_map(|n| n.addresses.iter().copied()),
            ),
            Selector::Net(n) => out.push(*n),
        }
    }
    out
}

fn compile_rule(r: &RuleDef, nodes: &[Arc<NodeRec>], by_host: &HashMap<&str, &NodeRec>) -> Option<CompiledRule> {
    let from = resolve(&r.from, nodes, by_host);
    let to = resolve(&r.to, nodes, by_host);
    let has = |s: &[IpNet], v6: bool| s.iter().any(|n| matches!(n, IpNet::V6(_)) == v6);
    let keep = |v6: bool| wirefence_proto::iana::proto_allows_family(r.protocol, v6) && has(&from, v6) && has(&to, v6);
    let (k4, k6) = (keep(false), keep(true));
    let filter = |mut s: Vec<IpNet>| -> Vec<IpNet> {
        s.retain(|n| if matches!(n, IpNet::V6(_)) { k6 } else { k4 });
        s
    };
    // Merged into the fewest prefixes covering the same addresses: `*` over sequentially
    // allocated addresses becomes a handful of prefixes, so a rule's size on the wire and in
    // the agent's maps stops growing with the fleet. Rules allow only and rank by protocol
    // and ports, never by prefix length, so merging changes no decision.
    let (from, to) = (IpNet::aggregate(&filter(from)), IpNet::aggregate(&filter(to)));
    if from.is_empty() || to.is_empty() {
        return None;
    }
    Some(CompiledRule {
        id: r.id.clone(),
        from_set: PrefixSet::new(&from),
        to_set: PrefixSet::new(&to),
        from,
        to,
        protocol: r.protocol,
        ports: r.ports.clone(),
        normal_ports: normalize_ports(r.ports.clone()),
    })
}
