//! One node's view of a global state, its wire snapshot, and deltas between two views.
//!
//! A node enforces the rules whose `from` or `to` overlaps one of its prefixes (overlay
//! addresses, advertised routes). Its peers are the other live nodes on the far side of
//! one of those rules (in either direction). Nothing else of the global state reaches it.
//!
//! A rule is narrowed to the node: when the node is only in `from`, `from` becomes the
//! node's own part of it (on its tunnel, an outgoing packet's source is always the node or
//! a subnet it routes: WireGuard peers drop anything else); likewise `to` when it is only
//! in `to`. Enforcement is the same, a node does not learn the other members of its own
//! side, and a node joining a group does not change the views of the group's members.

use std::collections::BTreeSet;
use std::sync::Arc;

use ipnet::IpNet;
use prost::bytes::Bytes;
use prost::Message;
use wirefence_proto::v1::{self, AddressList, IpPrefix, NodeView, RefusedRouteList, SocketAddress, ViewDelta};

use crate::model::{NodeRec, RefusedRoute};
use crate::peers::{PeerList, PeerTable, Refs};
use crate::policy::{CompiledRule, PrefixSet};
use crate::state::GlobalState;
use crate::wire::{Delta, Snapshot};

/// A rule as one node enforces it.
#[derive(Clone, Debug)]
pub struct NodeRule {
    pub rule: Arc<CompiledRule>,
    /// The narrowed side, `None` = the rule's own.
    from: Option<Vec<IpNet>>,
    to: Option<Vec<IpNet>>,
}

impl NodeRule {
    pub fn id(&self) -> &str {
        &self.rule.id
    }

    pub fn from(&self) -> &[IpNet] {
        self.from.as_deref().unwrap_or(&self.rule.from)
    }

    pub fn to(&self) -> &[IpNet] {
        self.to.as_deref().unwrap_or(&self.rule.to)
    }

    pub fn to_wire(&self) -> v1::Rule {
        v1::Rule {
            id: self.rule.id.clone(),
            from: prefixes(self.from()),
            to: prefixes(self.to()),
            protocol: self.rule.protocol.map(u32::from),
            ports: self.rule.ports.iter().map(|p| v1::PortRange::from(*p)).collect(),
        }
    }
}

/// The rules a node enforces with their wire encoding (`v1::Policy`), made once. Nodes on
/// both sides of each of their rules enforce them as compiled (nothing to narrow), so every
/// node with the same rules shares one (a full mesh: one for the fleet): a policy change
/// then encodes each rule once, not once per node.
#[derive(Clone, Debug)]
pub struct NodePolicy(Arc<(Vec<NodeRule>, Bytes)>);

impl NodePolicy {
    fn new(rules: Vec<NodeRule>) -> NodePolicy {
        let encoded = v1::Policy { rules: rules.iter().map(NodeRule::to_wire).collect() }.encode_to_vec();
        NodePolicy(Arc::new((rules, encoded.into())))
    }

    pub fn rules(&self) -> &[NodeRule] {
        &self.0 .0
    }

    pub fn encoded(&self) -> &Bytes {
        &self.0 .1
    }
}

/// Equal when they give the same wire policy.
impl PartialEq for NodePolicy {
    fn eq(&self, o: &NodePolicy) -> bool {
        Arc::ptr_eq(&self.0, &o.0) || self.encoded() == o.encoded()
    }
}

impl Eq for NodePolicy {}

#[derive(Clone, Debug)]
pub struct View {
    /// The node's position in its state's nodes: where the next state's view looks first.
    position: usize,
    /// The node itself: its addresses and refused routes are the view's.
    me: Arc<NodeRec>,
    pub peers: PeerList,
    pub policy: NodePolicy,
    /// What the mesh routes but this node does not: it never sends these out in clear
    /// (shared by every node that routes nothing).
    pub mesh_prefixes: Arc<[IpNet]>,
}

/// The part of a rule side (`side`, indexed as `set`) inside the node's prefixes.
fn narrow(side: &[IpNet], set: &PrefixSet, me: &NodeRec) -> Vec<IpNet> {
    let mut out = BTreeSet::new();
    for q in me.prefixes() {
        if q.prefix_len() == q.max_prefix_len() {
            if set.contains(q.addr()) {
                out.insert(*q);
            }
            continue;
        }
        for p in side {
            if p.contains(q) {
                out.insert(*q);
            } else if q.contains(p) {
                out.insert(*p);
            }
        }
    }
    out.into_iter().collect()
}

/// The view of node `id`, `None` when it is not a live node of `state`. Costs the node's
/// own rules: its peers are a list the state shares between every node with the same rules.
pub fn node_view(state: &GlobalState, id: &str) -> Option<View> {
    Some(view_at(state, state.index(id)?))
}

/// The view of node `id` in `state`, which follows `prev`'s state: found at `prev`'s
/// position unless nodes came or went. Each of N streams searching N nodes would read
/// log N nodes scattered in memory; this reads one.
pub fn next_view(state: &GlobalState, id: &str, prev: &View) -> Option<View> {
    match state.nodes.get(prev.position) {
        Some(n) if n.id == id => Some(view_at(state, prev.position)),
        _ => node_view(state, id),
    }
}

/// The view of the node at `me_ix` in `state.nodes`.
fn view_at(state: &GlobalState, me_ix: usize) -> View {
    let me = &state.nodes[me_ix];
    let compiled = state.compiled();
    let rules = || {
        let rules = compiled.node_rules[me_ix].iter().map(|&(ri, in_from, in_to)| {
            let r = &compiled.rules[ri];
            let from = (!in_to).then(|| narrow(&r.from, &r.from_set, me));
            let to = (!in_from).then(|| narrow(&r.to, &r.to_set, me));
            NodeRule { rule: r.clone(), from, to }
        });
        NodePolicy::new(rules.collect())
    };
    let policy = match compiled.shared_policy(me_ix) {
        Some(shared) => shared.get_or_init(rules).clone(),
        None => rules(),
    };
    let members = compiled.peers_of(me_ix);
    let me_pos = u32::try_from(me_ix).ok();
    let peers = if state.routes_a_group(me) {
        // A member of a route group sees the group's prefixes differently from everyone
        // else (it routes them itself): its own table.
        let recs = members
            .iter()
            .filter(|&&i| Some(i) != me_pos)
            .map(|&i| state.as_peer(&state.nodes[i as usize], &me.routes))
            .collect::<Vec<_>>();
        let members = (0..u32::try_from(recs.len()).unwrap_or(u32::MAX)).collect();
        PeerList { table: Arc::new(PeerTable::new(recs, state.overlay().keepalive)), members, me: None }
    } else {
        PeerList { table: state.peer_table(), members: members.clone(), me: me_pos }
    };
    let mesh_prefixes = match me.routes.is_empty() {
        true => state.mesh_prefixes.clone(),
        false => state.mesh_prefixes.iter().filter(|p| !me.routes.contains(p)).copied().collect(),
    };
    View { position: me_ix, me: me.clone(), peers, policy, mesh_prefixes }
}

fn prefixes<'a>(v: impl IntoIterator<Item = &'a IpNet>) -> Vec<IpPrefix> {
    v.into_iter().map(|n| IpPrefix::from(*n)).collect()
}

/// A node as a peer on the wire.
pub fn peer(n: &NodeRec, keepalive: u16) -> v1::Peer {
    v1::Peer {
        public_key: n.public_key.to_vec(),
        name: n.peer_name(),
        endpoint: n.endpoints.first().map(|e| SocketAddress::from(*e)),
        allowed_ips: prefixes(n.prefixes()),
        persistent_keepalive: keepalive.into(),
    }
}

impl View {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            view: NodeView {
                addresses: prefixes(&self.me.addresses),
                peers: vec![],
                policy: None,
                mesh_prefixes: prefixes(self.mesh_prefixes.iter()),
                refused_routes: self.me.refused_routes.iter().map(RefusedRoute::to_wire).collect(),
            },
            peers: Refs::all(&self.peers),
            policy: self.policy.encoded().clone(),
        }
    }
}

/// The changes from `old` to `new` on top of `base_version`; `None` when they give the
/// same wire view. Peers cost nothing when both views share their list, and their
/// difference is computed once for every view making the same move.
pub fn delta(old: &View, new: &View, base_version: u64) -> Option<Delta> {
    let (upserts, removes) = if old.peers.shares(&new.peers) {
        (Refs::new(&new.peers.table, &Arc::from([]), None), Refs::new(&old.peers.table, &Arc::from([]), None))
    } else {
        let d = new.peers.table.diff(&old.peers, &new.peers);
        (Refs::new(&new.peers.table, &d.upserts, new.peers.me), Refs::new(&old.peers.table, &d.removes, old.peers.me))
    };
    // The same record (a change elsewhere) has the same addresses and refused routes.
    let same_me = Arc::ptr_eq(&old.me, &new.me);
    let (was, is) = (&old.me, &new.me);
    let addresses =
        (!same_me && was.addresses != is.addresses).then(|| AddressList { prefixes: prefixes(&is.addresses) });
    let policy = (old.policy != new.policy).then(|| new.policy.encoded().clone());
    let mesh_prefixes = (!Arc::ptr_eq(&old.mesh_prefixes, &new.mesh_prefixes)
        && old.mesh_prefixes != new.mesh_prefixes)
        .then(|| AddressList { prefixes: prefixes(new.mesh_prefixes.iter()) });
    let refused_routes = (!same_me && was.refused_routes != is.refused_routes)
        .then(|| RefusedRouteList { routes: is.refused_routes.iter().map(RefusedRoute::to_wire).collect() });
    if upserts.is_empty()
        && removes.is_empty()
        && addresses.is_none()
        && policy.is_none()
        && mesh_prefixes.is_none()
        && refused_routes.is_none()
    {
        return None;
    }
    let delta = ViewDelta {
        base_version,
        upsert_peers: vec![],
        remove_peers: vec![],
        addresses,
        policy: None,
        mesh_prefixes,
        refused_routes,
    };
    Some(Delta { delta, upserts, removes, policy })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;
    use crate::policy::tests::node;
    use crate::registry::Overlay;

    const POLICY: &str = r#"
[groups]
web = ["tag:web", "node:db1"]
[[rules]]
id = "admin-ssh"
from = ["node:laptop"]
to = ["group:web"]
proto = "tcp"
ports = ["22"]
"#;

    fn state(version: u64, nodes: Vec<Arc<NodeRec>>, src: &str) -> GlobalState {
        GlobalState::new(version, nodes, Arc::new(parse("p.toml", src).unwrap()), Overlay::default())
    }

    fn four() -> Vec<Arc<NodeRec>> {
        vec![
            node("n1", "laptop", 1, &[]),
            node("n2", "db1", 2, &[]),
            node("n3", "web1", 3, &["web"]),
            node("n4", "other", 4, &[]),
        ]
    }

    fn wdelta(old: &View, new: &View, base: u64) -> Option<ViewDelta> {
        delta(old, new, base).map(|d| d.to_wire())
    }

    fn names(v: &View) -> Vec<&str> {
        let mut n: Vec<&str> = v.peers.iter().map(|n| n.hostname.as_str()).collect();
        n.sort();
        n
    }

    #[test]
    fn a_node_sees_only_the_peers_and_rules_that_concern_it() {
        let s = state(5, four(), POLICY);
        let laptop = node_view(&s, "n1").unwrap();
        assert_eq!(names(&laptop), ["db1", "web1"]);
        assert_eq!(laptop.policy.rules().len(), 1);
        let db1 = node_view(&s, "n2").unwrap();
        assert_eq!(names(&db1), ["laptop"]);
        assert_eq!(db1.policy.rules()[0].id(), "admin-ssh");
        let other = node_view(&s, "n4").unwrap();
        assert!(other.peers.is_empty() && other.policy.rules().is_empty());
        // An empty but present policy: deny everything.
        let snap = other.snapshot().to_wire();
        assert_eq!(snap.policy, Some(v1::Policy { rules: vec![] }));
        assert_eq!(snap.addresses.len(), 2);
        assert!(node_view(&s, "n9").is_none());

        let snap = db1.snapshot().to_wire();
        let p = &snap.peers[0];
        assert_eq!(p.name, "laptop");
        assert_eq!(p.public_key, vec![1; 32]);
        assert_eq!(p.persistent_keepalive, 25);
        assert_eq!(p.endpoint, Some(SocketAddress::from("192.0.2.1:51820".parse::<std::net::SocketAddr>().unwrap())));
        let allowed: Vec<IpNet> = p.allowed_ips.iter().map(|x| IpNet::try_from(x).unwrap()).collect();
        assert_eq!(allowed, ["10.77.0.1/32".parse::<IpNet>().unwrap(), "fd77::1/128".parse().unwrap()]);
        let rule = &snap.policy.as_ref().unwrap().rules[0];
        assert_eq!((rule.protocol, rule.ports.len()), (Some(6), 1));
        // db1 is only in `to`: it gets its own part of it, not web1's addresses.
        assert_eq!(rule.from.len(), 2);
        assert_eq!(rule.to, snap.addresses);
        // laptop is only in `from`: the whole `to` (db1's and web1's adjacent addresses,
        // merged), its own `from`.
        let rule = laptop.policy.rules()[0].to_wire();
        assert_eq!((rule.from.len(), rule.to.len()), (2, 2));
        // db1 and web1 are on the same side of the same rule, narrowed to each: not shared.
        assert_ne!(db1.policy, node_view(&s, "n3").unwrap().policy);
    }

    #[test]
    fn routes_make_a_node_a_peer_and_give_it_the_rules_for_its_subnet() {
        let mut router = (*node("n5", "router", 5, &[])).clone();
        router.routes = vec!["10.88.0.0/24".parse().unwrap()];
        let mut nodes = four();
        nodes.push(Arc::new(router));
        let src = "[[rules]]\nid = \"lan\"\nfrom = [\"node:laptop\"]\nto = [\"10.88.0.5\"]\n";
        let s = state(1, nodes, src);
        let laptop = node_view(&s, "n1").unwrap();
        assert_eq!(names(&laptop), ["router"]);
        let snap = laptop.snapshot().to_wire();
        assert_eq!(snap.peers[0].allowed_ips.len(), 3, "addresses and the route");
        let router = node_view(&s, "n5").unwrap();
        assert_eq!(names(&router), ["laptop"]);
        assert_eq!(router.policy.rules()[0].id(), "lan");
        assert_eq!(router.policy.rules()[0].to(), ["10.88.0.5/32".parse::<IpNet>().unwrap()]);
        assert!(node_view(&s, "n2").unwrap().policy.rules().is_empty());
    }

    #[test]
    fn every_node_learns_the_mesh_prefixes_but_its_own_routes() {
        let mut router = (*node("n5", "router", 5, &[])).clone();
        router.routes = vec!["10.88.0.0/24".parse().unwrap()];
        let mut nodes = four();
        nodes.push(Arc::new(router));
        let s1 = state(1, nodes.clone(), POLICY);
        let overlay = Overlay::default();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        // Not a peer of the router (no rule), and still told its subnet is the mesh's.
        assert_eq!(*node_view(&s1, "n2").unwrap().mesh_prefixes, [overlay.v4, net("10.88.0.0/24"), overlay.v6]);
        assert_eq!(*node_view(&s1, "n5").unwrap().mesh_prefixes, [overlay.v4, overlay.v6]);
        let snap = node_view(&s1, "n2").unwrap().snapshot().to_wire();
        assert_eq!(snap.mesh_prefixes.len(), 3);

        // The router leaves: its subnet stops being the mesh's, in a delta of its own.
        nodes.pop();
        let s2 = s1.with_nodes(2, nodes);
        let d = wdelta(&node_view(&s1, "n2").unwrap(), &node_view(&s2, "n2").unwrap(), 1).unwrap();
        assert!(d.upsert_peers.is_empty() && d.remove_peers.is_empty() && d.policy.is_none());
        assert_eq!(d.mesh_prefixes.unwrap().prefixes, prefixes(&[overlay.v4, overlay.v6]));
    }

    #[test]
    fn a_route_group_prefix_goes_to_the_primary_peer_only() {
        let net: IpNet = "10.88.0.0/24".parse().unwrap();
        let router = |id: &str, name: &str, n: u8| {
            let mut r = (*node(id, name, n, &[])).clone();
            r.routes = vec![net];
            Arc::new(r)
        };
        let mut nodes = four();
        nodes.push(router("n5", "gw1", 5));
        nodes.push(router("n6", "gw2", 6));
        let src = "[[rules]]\nid = \"lan\"\nfrom = [\"node:laptop\"]\nto = [\"10.88.0.5\"]\n";
        let s = state(1, nodes, src);
        assert_eq!(s.groups[&net].len(), 2);
        let routed = |s: &GlobalState, id: &str| -> Vec<String> {
            let v = node_view(s, id).unwrap();
            v.peers.iter().filter(|p| p.routes.contains(&net)).map(|p| p.hostname.clone()).collect()
        };
        let s1 = s.with_primaries(2, &[(net, "n6".to_string())].into());
        let laptop = node_view(&s1, "n1").unwrap();
        assert_eq!(names(&laptop), ["gw1", "gw2"], "both members stay peers (the rule covers both)");
        assert_eq!(routed(&s1, "n1"), ["gw2"]);
        // A member routes its own LAN: no peer gets the prefix in its view.
        assert!(routed(&s1, "n5").is_empty());
        // Failover: one delta upserts both gateways' peers, nothing else.
        let s2 = s1.with_primaries(3, &[(net, "n5".to_string())].into());
        assert_eq!(routed(&s2, "n1"), ["gw1"]);
        let d = wdelta(&node_view(&s1, "n1").unwrap(), &node_view(&s2, "n1").unwrap(), 2).unwrap();
        assert_eq!(d.upsert_peers.len(), 2);
        assert!(d.policy.is_none() && d.mesh_prefixes.is_none() && d.remove_peers.is_empty());
        assert!(s2.is_compiled(), "the compiled policy is shared across an election");
    }

    #[test]
    fn deltas_carry_only_what_changed() {
        let s1 = state(5, four(), POLICY);
        let more = format!(
            "{POLICY}[[rules]]\nid = \"pg\"\nfrom = [\"tag:web\"]\nto = [\"node:db1\"]\nproto = \"tcp\"\nports = [\"5432\"]\n"
        );
        let s2 = s1.with_policy(6, Arc::new(parse("p.toml", &more).unwrap()));
        let v = |s: &GlobalState, id| node_view(s, id).unwrap();

        // laptop: same peers, same rules -> nothing to send.
        assert!(wdelta(&v(&s1, "n1"), &v(&s2, "n1"), 5).is_none());
        // db1: web1 becomes a peer and the policy gains a rule.
        let d = wdelta(&v(&s1, "n2"), &v(&s2, "n2"), 5).unwrap();
        assert_eq!(d.base_version, 5);
        assert_eq!(d.upsert_peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web1"]);
        assert!(d.remove_peers.is_empty() && d.addresses.is_none());
        assert_eq!(d.policy.unwrap().rules.len(), 2);
        // other: untouched.
        assert!(wdelta(&v(&s1, "n4"), &v(&s2, "n4"), 5).is_none());

        // web1 removed: laptop drops the peer, and the rule loses web1's addresses.
        let nodes: Vec<_> = s2.nodes.iter().filter(|n| n.id != "n3").cloned().collect();
        let s3 = s2.with_nodes(7, nodes);
        let d = wdelta(&v(&s2, "n1"), &v(&s3, "n1"), 6).unwrap();
        assert_eq!(d.remove_peers, vec![vec![3u8; 32]]);
        assert!(d.upsert_peers.is_empty());
        assert_eq!(d.policy.unwrap().rules[0].to.len(), 2);

        // db1 moves: laptop gets an upsert of db1 only.
        let mut moved = (*s3.node("n2").unwrap().clone()).clone();
        moved.endpoints = vec!["[2001:db8::2]:51820".parse().unwrap()];
        let nodes: Vec<_> =
            s3.nodes.iter().map(|n| if n.id == "n2" { Arc::new(moved.clone()) } else { n.clone() }).collect();
        let s4 = s3.with_nodes(8, nodes);
        let d = wdelta(&v(&s3, "n1"), &v(&s4, "n1"), 7).unwrap();
        assert_eq!(d.upsert_peers.len(), 1);
        assert_eq!(d.upsert_peers[0].endpoint.as_ref().unwrap().ip.len(), 16);
        assert!(d.policy.is_none() && d.remove_peers.is_empty() && d.addresses.is_none());
        // A tag change on a node laptop does not deal with changes nothing for laptop.
        let mut tagged = (*s4.node("n4").unwrap().clone()).clone();
        tagged.tags = vec!["db".into()];
        let nodes: Vec<_> =
            s4.nodes.iter().map(|n| if n.id == "n4" { Arc::new(tagged.clone()) } else { n.clone() }).collect();
        let s5 = s4.with_nodes(9, nodes);
        assert!(wdelta(&v(&s4, "n1"), &v(&s5, "n1"), 8).is_none());
    }

    #[test]
    fn joining_a_group_does_not_disturb_its_members() {
        let src = "[[rules]]\nid = \"probe\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"tag:sim\"]\nproto = \"tcp\"\n";
        let sims = |n: u8| (1..=n).map(|i| node(&format!("n{i}"), &format!("sim{i}"), i, &["sim"])).collect::<Vec<_>>();
        let s1 = state(1, sims(3), src);
        let s2 = state(2, sims(4), src);
        let before = node_view(&s1, "n1").unwrap();
        let after = node_view(&s2, "n1").unwrap();
        assert!(wdelta(&before, &after, 1).is_none());
        assert!(after.peers.is_empty());
        let rule = after.policy.rules()[0].to_wire();
        // Only its own address (IPv4: the source range is IPv4 only).
        assert_eq!(rule.to, vec![IpPrefix::from("10.77.0.1/32".parse::<IpNet>().unwrap())]);
        assert_eq!(rule.from, vec![IpPrefix::from("10.99.0.0/24".parse::<IpNet>().unwrap())]);
    }

    fn full_mesh(port: u16) -> String {
        format!("[[rules]]\nid = \"mesh\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n")
    }

    #[test]
    fn a_full_mesh_shares_its_peers_and_a_change_that_keeps_them_costs_no_peer_work() {
        let nodes: Vec<_> = (1..=50).map(|i| node(&format!("n{i:02}"), &format!("h{i}"), i, &[])).collect();
        let s1 = state(1, nodes, &full_mesh(443));
        let (a1, b1) = (node_view(&s1, "n01").unwrap(), node_view(&s1, "n02").unwrap());
        assert!(Arc::ptr_eq(&a1.peers.table, &b1.peers.table), "one table");
        assert!(Arc::ptr_eq(&a1.peers.members, &b1.peers.members), "one list, each node skips itself");
        assert_eq!((a1.peers.len(), a1.peers.iter().filter(|p| p.id == "n01").count()), (49, 0));
        // `*` over 50 nearby addresses per family: merged, far fewer than 100 prefixes.
        assert!(a1.policy.rules()[0].to().len() < 25, "{:?}", a1.policy.rules()[0].to());
        // Nothing narrowed (every node is on both sides): one policy, encoded once.
        assert!(Arc::ptr_eq(&a1.policy.0, &b1.policy.0), "one policy for the fleet");
        assert_eq!(a1.snapshot().policy.as_ptr(), b1.snapshot().policy.as_ptr(), "and one encoding");

        // The port changes: the same table and lists, no peer in any delta.
        let s2 = s1.with_policy(2, Arc::new(parse("p.toml", &full_mesh(8443)).unwrap()));
        let (a2, b2) = (node_view(&s2, "n01").unwrap(), node_view(&s2, "n02").unwrap());
        assert!(Arc::ptr_eq(&a1.peers.table, &a2.peers.table), "the previous state's table");
        assert!(Arc::ptr_eq(&a1.peers.members, &a2.peers.members), "and its peer list");
        let d = wdelta(&a1, &a2, 1).unwrap();
        assert!(d.upsert_peers.is_empty() && d.remove_peers.is_empty());
        assert_eq!(d.policy.unwrap().rules[0].ports, vec![v1::PortRange { first: 8443, last: 8443 }]);

        // A node joins: the difference is computed once for every node, one peer each.
        let mut more = s2.nodes.to_vec();
        more.push(node("n51", "h51", 51, &[]));
        let s3 = s2.with_nodes(3, more);
        let (a3, b3) = (node_view(&s3, "n01").unwrap(), node_view(&s3, "n02").unwrap());
        let (da, db) = (delta(&a2, &a3, 2).unwrap(), delta(&b2, &b3, 2).unwrap());
        assert!(Arc::ptr_eq(&da.upserts.positions, &db.upserts.positions), "one shared difference");
        let wire = da.to_wire();
        assert_eq!((wire.upsert_peers.len(), wire.upsert_peers[0].name.as_str()), (1, "h51"));
        assert!(wire.remove_peers.is_empty());
        // `*` now covers its address too.
        let to: Vec<IpNet> = wire.policy.unwrap().rules[0].to.iter().map(|p| IpNet::try_from(p).unwrap()).collect();
        assert!(to.iter().any(|p| p.contains(&"10.77.0.51".parse::<std::net::IpAddr>().unwrap())));
        // The newcomer's own snapshot has the 50 others.
        assert_eq!(node_view(&s3, "n51").unwrap().snapshot().to_wire().peers.len(), 50);

        // A node ahead of n02 leaves: n02's position moves, and its next view still finds it.
        let s4 = s3.with_nodes(4, s3.nodes.iter().filter(|n| n.id != "n01").cloned().collect());
        let b4 = next_view(&s4, "n02", &b3).unwrap();
        assert_eq!((b4.me.id.as_str(), b4.position, b3.position), ("n02", 0, 1));
        assert_eq!(wdelta(&b3, &b4, 3).unwrap().remove_peers, vec![vec![1u8; 32]]);
        assert!(next_view(&s4, "n01", &a3).is_none(), "a removed node has no view");
        // Nothing changed: the same view at the same position, no delta.
        let s5 = s4.with_policy(5, s4.policy.clone());
        let b5 = next_view(&s5, "n02", &b4).unwrap();
        assert_eq!(b5.position, 0);
        assert!(!Arc::ptr_eq(&b4.policy.0, &b5.policy.0) && wdelta(&b4, &b5, 4).is_none(), "compared by encoding");
    }
}
