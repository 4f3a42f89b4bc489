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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;
use wirefence_proto::v1::{self, AddressList, IpPrefix, NodeView, RefusedRouteList, SocketAddress, ViewDelta};

use crate::model::{NodeRec, PublicKey, RefusedRoute};
use crate::policy::{CompiledRule, PrefixSet};
use crate::state::GlobalState;

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

/// Equal when they give the same wire rule.
impl PartialEq for NodeRule {
    fn eq(&self, o: &NodeRule) -> bool {
        self.rule.id == o.rule.id
            && self.rule.protocol == o.rule.protocol
            && self.rule.ports == o.rule.ports
            && self.from() == o.from()
            && self.to() == o.to()
    }
}

impl Eq for NodeRule {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub addresses: Vec<IpNet>,
    pub peers: BTreeMap<PublicKey, Arc<NodeRec>>,
    pub rules: Vec<NodeRule>,
    /// What the mesh routes but this node does not: it never sends these out in clear.
    pub mesh_prefixes: Vec<IpNet>,
    /// The routes it advertised and did not get.
    pub refused_routes: Vec<RefusedRoute>,
    /// Every peer's persistent keepalive (seconds): the mesh's, fixed while it runs.
    pub keepalive: u16,
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

/// The view of node `id`, `None` when it is not a live node of `state`.
pub fn node_view(state: &GlobalState, id: &str) -> Option<View> {
    let me_ix = state.index(id)?;
    let me = &state.nodes[me_ix];
    let compiled = state.compiled();
    let mut rules = Vec::new();
    let mut peers = BTreeMap::new();
    for &(ri, in_from, in_to) in &compiled.node_rules[me_ix] {
        let r = &compiled.rules[ri];
        let from = (!in_to).then(|| narrow(&r.from, &r.from_set, me));
        let to = (!in_from).then(|| narrow(&r.to, &r.to_set, me));
        rules.push(NodeRule { rule: r.clone(), from, to });
        // The far side of the rule, in either direction.
        let far =
            in_from.then_some(&compiled.to_nodes[ri]).into_iter().chain(in_to.then_some(&compiled.from_nodes[ri]));
        for &ni in far.flatten() {
            if ni != me_ix {
                let n = &state.nodes[ni];
                peers.entry(n.public_key).or_insert_with(|| state.as_peer(n, me));
            }
        }
    }
    let mesh_prefixes = state.mesh_prefixes.iter().filter(|p| !me.routes.contains(p)).copied().collect();
    Some(View {
        addresses: me.addresses.clone(),
        peers,
        rules,
        mesh_prefixes,
        refused_routes: me.refused_routes.clone(),
        keepalive: state.overlay().keepalive,
    })
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

/// Whether two records give the same wire peer.
fn same_peer(a: &NodeRec, b: &NodeRec) -> bool {
    a.public_key == b.public_key
        && a.hostname == b.hostname
        && a.bound == b.bound
        && a.endpoints.first() == b.endpoints.first()
        && a.addresses == b.addresses
        && a.routes == b.routes
}

fn policy(rules: &[NodeRule]) -> v1::Policy {
    v1::Policy { rules: rules.iter().map(NodeRule::to_wire).collect() }
}

impl View {
    pub fn snapshot(&self) -> NodeView {
        NodeView {
            addresses: prefixes(&self.addresses),
            peers: self.peers.values().map(|n| peer(n, self.keepalive)).collect(),
            policy: Some(policy(&self.rules)),
            mesh_prefixes: prefixes(&self.mesh_prefixes),
            refused_routes: self.refused_routes.iter().map(RefusedRoute::to_wire).collect(),
        }
    }
}

/// The changes from `old` to `new` on top of `base_version`; `None` when they give the
/// same wire view.
pub fn delta(old: &View, new: &View, base_version: u64) -> Option<ViewDelta> {
    let upsert_peers: Vec<v1::Peer> = new
        .peers
        .iter()
        .filter(|(k, n)| {
            old.keepalive != new.keepalive || old.peers.get(*k).is_none_or(|o| !(Arc::ptr_eq(o, n) || same_peer(o, n)))
        })
        .map(|(_, n)| peer(n, new.keepalive))
        .collect();
    let remove_peers: Vec<Vec<u8>> =
        old.peers.keys().filter(|k| !new.peers.contains_key(*k)).map(|k| k.to_vec()).collect();
    let addresses = (old.addresses != new.addresses).then(|| AddressList { prefixes: prefixes(&new.addresses) });
    let policy = (old.rules != new.rules).then(|| policy(&new.rules));
    let mesh_prefixes =
        (old.mesh_prefixes != new.mesh_prefixes).then(|| AddressList { prefixes: prefixes(&new.mesh_prefixes) });
    let refused_routes = (old.refused_routes != new.refused_routes)
        .then(|| RefusedRouteList { routes: new.refused_routes.iter().map(RefusedRoute::to_wire).collect() });
    if upsert_peers.is_empty()
        && remove_peers.is_empty()
        && addresses.is_none()
        && policy.is_none()
        && mesh_prefixes.is_none()
        && refused_routes.is_none()
    {
        return None;
    }
    Some(ViewDelta { base_version, upsert_peers, remove_peers, addresses, policy, mesh_prefixes, refused_routes })
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

    fn names(v: &View) -> Vec<&str> {
        let mut n: Vec<&str> = v.peers.values().map(|n| n.hostname.as_str()).collect();
        n.sort();
        n
    }

    #[test]
    fn a_node_sees_only_the_peers_and_rules_that_concern_it() {
        let s = state(5, four(), POLICY);
        let laptop = node_view(&s, "n1").unwrap();
        assert_eq!(names(&laptop), ["db1", "web1"]);
        assert_eq!(laptop.rules.len(), 1);
        let db1 = node_view(&s, "n2").unwrap();
        assert_eq!(names(&db1), ["laptop"]);
        assert_eq!(db1.rules[0].id(), "admin-ssh");
        let other = node_view(&s, "n4").unwrap();
        assert!(other.peers.is_empty() && other.rules.is_empty());
        // An empty but present policy: deny everything.
        let snap = other.snapshot();
        assert_eq!(snap.policy, Some(v1::Policy { rules: vec![] }));
        assert_eq!(snap.addresses.len(), 2);
        assert!(node_view(&s, "n9").is_none());

        let snap = db1.snapshot();
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
        // laptop is only in `from`: the whole `to`, its own `from`.
        let rule = laptop.rules[0].to_wire();
        assert_eq!((rule.from.len(), rule.to.len()), (2, 4));
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
        let snap = laptop.snapshot();
        assert_eq!(snap.peers[0].allowed_ips.len(), 3, "addresses and the route");
        let router = node_view(&s, "n5").unwrap();
        assert_eq!(names(&router), ["laptop"]);
        assert_eq!(router.rules[0].id(), "lan");
        assert_eq!(router.rules[0].to(), ["10.88.0.5/32".parse::<IpNet>().unwrap()]);
        assert!(node_view(&s, "n2").unwrap().rules.is_empty());
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
        assert_eq!(node_view(&s1, "n2").unwrap().mesh_prefixes, [overlay.v4, net("10.88.0.0/24"), overlay.v6]);
        assert_eq!(node_view(&s1, "n5").unwrap().mesh_prefixes, [overlay.v4, overlay.v6]);
        let snap = node_view(&s1, "n2").unwrap().snapshot();
        assert_eq!(snap.mesh_prefixes.len(), 3);

        // The router leaves: its subnet stops being the mesh's, in a delta of its own.
        nodes.pop();
        let s2 = s1.with_nodes(2, nodes);
        let d = delta(&node_view(&s1, "n2").unwrap(), &node_view(&s2, "n2").unwrap(), 1).unwrap();
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
            v.peers.values().filter(|p| p.routes.contains(&net)).map(|p| p.hostname.clone()).collect()
        };
        let s1 = s.with_primaries(2, [(net, "n6".to_string())].into());
        let laptop = node_view(&s1, "n1").unwrap();
        assert_eq!(names(&laptop), ["gw1", "gw2"], "both members stay peers (the rule covers both)");
        assert_eq!(routed(&s1, "n1"), ["gw2"]);
        // A member routes its own LAN: no peer gets the prefix in its view.
        assert!(routed(&s1, "n5").is_empty());
        // Failover: one delta upserts both gateways' peers, nothing else.
        let s2 = s1.with_primaries(3, [(net, "n5".to_string())].into());
        assert_eq!(routed(&s2, "n1"), ["gw1"]);
        let d = delta(&node_view(&s1, "n1").unwrap(), &node_view(&s2, "n1").unwrap(), 2).unwrap();
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
        assert!(delta(&v(&s1, "n1"), &v(&s2, "n1"), 5).is_none());
        // db1: web1 becomes a peer and the policy gains a rule.
        let d = delta(&v(&s1, "n2"), &v(&s2, "n2"), 5).unwrap();
        assert_eq!(d.base_version, 5);
        assert_eq!(d.upsert_peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web1"]);
        assert!(d.remove_peers.is_empty() && d.addresses.is_none());
        assert_eq!(d.policy.unwrap().rules.len(), 2);
        // other: untouched.
        assert!(delta(&v(&s1, "n4"), &v(&s2, "n4"), 5).is_none());

        // web1 removed: laptop drops the peer, and the rule loses web1's addresses.
        let nodes: Vec<_> = s2.nodes.iter().filter(|n| n.id != "n3").cloned().collect();
        let s3 = s2.with_nodes(7, nodes);
        let d = delta(&v(&s2, "n1"), &v(&s3, "n1"), 6).unwrap();
        assert_eq!(d.remove_peers, vec![vec![3u8; 32]]);
        assert!(d.upsert_peers.is_empty());
        assert_eq!(d.policy.unwrap().rules[0].to.len(), 2);

        // db1 moves: laptop gets an upsert of db1 only.
        let mut moved = (*s3.node("n2").unwrap().clone()).clone();
        moved.endpoints = vec!["[2001:db8::2]:51820".parse().unwrap()];
        let nodes: Vec<_> =
            s3.nodes.iter().map(|n| if n.id == "n2" { Arc::new(moved.clone()) } else { n.clone() }).collect();
        let s4 = s3.with_nodes(8, nodes);
        let d = delta(&v(&s3, "n1"), &v(&s4, "n1"), 7).unwrap();
        assert_eq!(d.upsert_peers.len(), 1);
        assert_eq!(d.upsert_peers[0].endpoint.as_ref().unwrap().ip.len(), 16);
        assert!(d.policy.is_none() && d.remove_peers.is_empty() && d.addresses.is_none());
        // A tag change on a node laptop does not deal with changes nothing for laptop.
        let mut tagged = (*s4.node("n4").unwrap().clone()).clone();
        tagged.tags = vec!["db".into()];
        let nodes: Vec<_> =
            s4.nodes.iter().map(|n| if n.id == "n4" { Arc::new(tagged.clone()) } else { n.clone() }).collect();
        let s5 = s4.with_nodes(9, nodes);
        assert!(delta(&v(&s4, "n1"), &v(&s5, "n1"), 8).is_none());
    }

    #[test]
    fn joining_a_group_does_not_disturb_its_members() {
        let src = "[[rules]]\nid = \"probe\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"tag:sim\"]\nproto = \"tcp\"\n";
        let sims = |n: u8| (1..=n).map(|i| node(&format!("n{i}"), &format!("sim{i}"), i, &["sim"])).collect::<Vec<_>>();
        let s1 = state(1, sims(3), src);
        let s2 = state(2, sims(4), src);
        let before = node_view(&s1, "n1").unwrap();
        let after = node_view(&s2, "n1").unwrap();
        assert!(delta(&before, &after, 1).is_none());
        assert!(after.peers.is_empty());
        let rule = after.rules[0].to_wire();
        // Only its own address (IPv4: the source range is IPv4 only).
        assert_eq!(rule.to, vec![IpPrefix::from("10.77.0.1/32".parse::<IpNet>().unwrap())]);
        assert_eq!(rule.from, vec![IpPrefix::from("10.99.0.0/24".parse::<IpNet>().unwrap())]);
    }
}
