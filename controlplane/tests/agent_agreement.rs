//! The control plane's evaluator (`policy::decide`, which names the deciding rule of a
//! failed `[[tests]]` case) against the agent's reference evaluator (`policy::evaluate`,
//! which the agent's compiled maps and so its rule counters follow): for random policies
//! and random cases both give the same verdict and the same deciding rule,
//!
//! - on the whole compiled policy, converted rule by rule into the agent's model;
//! - at every node that enforces the case (the source's node on egress, the destination's
//!   on ingress), on the view the control plane sends it, read back through the agent's
//!   own wire validation (`ControlView::from_snapshot`): narrowing, rule order, wire
//!   encoding and the agent's normalization of port lists included.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use proptest::prelude::*;
use wirefence_agent::control::ControlView;
use wirefence_agent::model::PublicKey;
use wirefence_agent::policy::{self as agent, Direction, Packet};
use wirefence_control::model::NodeRec;
use wirefence_control::policy::{self as cp, PortRange, RuleDef, Selector};
use wirefence_control::state::GlobalState;
use wirefence_control::view::node_view;
use wirefence_proto::iana::has_ports;

const TAGS: [&str; 2] = ["a", "b"];

/// TCP and UDP mostly (rules with ports), SCTP, ICMP of each family and GRE (no ports).
fn proto() -> impl Strategy<Value = u8> {
    prop_oneof![6 => Just(6u8), 3 => Just(17u8), 1 => Just(132u8), 1 => Just(1u8), 1 => Just(58u8), 1 => Just(47u8)]
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Four nodes (overlay 10.77.0.i/32 and fd77::i/128), each with some of the tags and
/// perhaps routes 10.88.i.0/24 and fd88:i::/64 (disjoint, as the registry ensures).
fn nodes() -> impl Strategy<Value = Vec<Arc<NodeRec>>> {
    prop::collection::vec((any::<[bool; 2]>(), any::<[bool; 2]>()), 4).prop_map(|spec| {
        spec.into_iter()
            .enumerate()
            .map(|(i, (tags, routes))| {
                let n = i as u8 + 1;
                let mut r = vec![];
                if routes[0] {
                    r.push(net(&format!("10.88.{n}.0/24")));
                }
                if routes[1] {
                    r.push(net(&format!("fd88:{n}::/64")));
                }
                Arc::new(NodeRec {
                    id: format!("n{n}"),
                    hostname: format!("h{n}"),
                    bound: true,
                    public_key: [n; 32],
                    addresses: vec![net(&format!("10.77.0.{n}/32")), net(&format!("fd77::{n}/128"))],
                    endpoints: vec![format!("192.0.2.{n}:51820").parse().unwrap()],
                    routes: r,
                    tags: TAGS.iter().zip(tags).filter(|(_, on)| *on).map(|(t, _)| t.to_string()).collect(),
                    refused_routes: vec![],
                })
            })
            .collect()
    })
}

/// Prefixes that nest with each other, the nodes' addresses and their routes, and some
/// that hold no node.
const NETS: [&str; 16] = [
    "0.0.0.0/0",
    "10.77.0.0/16",
    "10.77.0.0/30",
    "10.77.0.2/32",
    "10.88.0.0/16",
    "10.88.1.0/24",
    "10.88.1.128/25",
    "10.88.2.5/32",
    "192.0.2.0/24",
    "::/0",
    "fd77::/64",
    "fd77::3/128",
    "fd88::/16",
    "fd88:1::/64",
    "fd88:2::5/128",
    "2001:db8::/32",
];

fn selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        3 => Just(Selector::All),
        4 => (1u8..=5).prop_map(|n| Selector::Node(format!("h{n}"))), // h5 does not exist
        3 => prop::sample::select(TAGS.to_vec()).prop_map(|t| Selector::Tag(t.into())),
        4 => prop::sample::select(NETS.to_vec()).prop_map(|s| Selector::Net(net(s))),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 0u16..48, 1 => prop::sample::select(vec![0u16, 1, 1023, 1024, 8080, 32767, 32768, 65534, 65535])]
}

/// Mostly small ranges in 0-63, so that rules' ranges overlap, nest and touch.
fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        6 => (0u16..40, 0u16..24).prop_map(|(first, n)| PortRange { first, last: first + n }),
        2 => (port(), port()).prop_map(|(a, b)| PortRange { first: a.min(b), last: a.max(b) }),
        // Halves of every port: merged, they are all ports.
        1 => prop::sample::select(vec![PortRange { first: 0, last: 32767 }, PortRange { first: 32768, last: 65535 }]),
    ]
}

fn rule() -> impl Strategy<Value = RuleDef> {
    (
        prop::collection::vec(selector(), 1..4),
        prop::collection::vec(selector(), 1..4),
        prop::option::weighted(0.75, proto()),
        prop::collection::vec(port_range(), 0..4),
    )
        .prop_map(|(from, to, protocol, ports)| RuleDef {
            id: String::new(),
            from,
            to,
            ports: if protocol.is_some_and(has_ports) { ports } else { vec![] },
            protocol,
            pos: cp::Pos::default(),
        })
}

fn policy() -> impl Strategy<Value = cp::Policy> {
    prop::collection::vec(rule(), 0..10).prop_map(|rules| cp::Policy {
        rules: rules.into_iter().enumerate().map(|(i, r)| RuleDef { id: format!("r{i}"), ..r }).collect(),
        ..cp::Policy::default()
    })
}

/// Per family: the nodes' addresses (most draws), addresses inside their routes, of no
/// node, and outside everything.
const V4: [&str; 9] = [
    "10.77.0.1",
    "10.77.0.2",
    "10.77.0.3",
    "10.77.0.4",
    "10.88.1.5",
    "10.88.1.200",
    "10.88.2.5",
    "10.77.0.9",
    "192.0.2.7",
];
const V6: [&str; 8] =
    ["fd77::1", "fd77::2", "fd77::3", "fd77::4", "fd88:1::5", "fd88:2::5", "fd88:4::1", "2001:db8::1"];

fn addr(list: &'static [&'static str]) -> impl Strategy<Value = IpAddr> {
    prop_oneof![4 => 0usize..4, 2 => 4..list.len() - 2, 1 => list.len() - 2..list.len()]
        .prop_map(move |i| list[i].parse().unwrap())
}

/// A `[[tests]]` case: source and destination of one family, a concrete protocol, a port
/// exactly when the protocol has ports.
#[derive(Clone, Copy, Debug)]
struct Case {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: Option<u16>,
}

/// A case as drawn, and perhaps a rule to aim it at (rule, range, offset): that rule's
/// protocol and a port at or next to the edges of one of its ranges, or inside it.
type Draw = (IpAddr, IpAddr, u8, u16, Option<(usize, usize, u16)>);

fn draw() -> impl Strategy<Value = Draw> {
    let aim = prop::option::weighted(0.7, (0usize..10, 0usize..4, any::<u16>()));
    let v4 = (addr(&V4), addr(&V4), proto(), port(), aim.clone());
    let v6 = (addr(&V6), addr(&V6), proto(), port(), aim);
    prop_oneof![3 => v4, 2 => v6]
}

fn aim(policy: &cp::Policy, (src, dst, proto, port, aim): Draw) -> Case {
    let (mut proto, mut port) = (proto, port);
    if let Some((i, j, k)) = aim.filter(|_| !policy.rules.is_empty()) {
        let r = &policy.rules[i % policy.rules.len()];
        proto = r.protocol.unwrap_or(proto);
        if !r.ports.is_empty() {
            let p = r.ports[j % r.ports.len()];
            port = match k % 5 {
                0 => p.first,
                1 => p.last,
                2 => p.first.wrapping_sub(1),
                3 => p.last.wrapping_add(1),
                _ => p.first + (u32::from(k) % (u32::from(p.last - p.first) + 1)) as u16,
            };
        }
    }
    Case { src, dst, proto, port: has_ports(proto).then_some(port) }
}

/// The control plane's rules in the agent's model (both directions, as a view carries them).
fn agent_policy(rules: &[Arc<cp::CompiledRule>]) -> agent::Policy {
    agent::Policy::new(
        rules
            .iter()
            .map(|r| agent::Rule {
                id: r.id.clone(),
                from: r.from.clone(),
                to: r.to.clone(),
                proto: r.protocol,
                ports: r.ports.clone(),
                direction: agent::RuleDirection::Both,
            })
            .collect(),
    )
    .expect("compiled rules are valid agent rules")
}

/// The agent's deciding rule, by id.
fn agent_decides(policy: &agent::Policy, c: &Case, direction: Direction) -> Option<String> {
    let d = agent::evaluate(policy, &Packet { direction, src: c.src, dst: c.dst, proto: c.proto, port: c.port });
    assert_eq!(d.allowed, d.rule.is_some());
    d.rule.map(|i| policy.rules()[i as usize].id.clone())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn the_control_plane_names_the_rule_the_agent_decides_by(
        nodes in nodes(),
        policy in policy(),
        draws in prop::collection::vec(draw(), 64),
    ) {
        let cases: Vec<Case> = draws.into_iter().map(|d| aim(&policy, d)).collect();
        let state = GlobalState::new(1, nodes.clone(), Arc::new(policy), Default::default());
        let compiled = state.compiled();
        let whole = agent_policy(&compiled.rules);
        // Each node's policy as its agent holds it after the wire.
        let mut at: BTreeMap<&str, agent::Policy> = BTreeMap::new();
        for n in &nodes {
            let snap = node_view(&state, &n.id).unwrap().snapshot().to_wire();
            let view = ControlView::from_snapshot(&snap, &PublicKey(n.public_key)).expect("a valid view");
            at.insert(n.id.as_str(), view.policy);
        }
        for c in &cases {
            let named = cp::decide(&compiled.rules, c.src, c.dst, c.proto, c.port).map(|r| r.id.clone());
            prop_assert_eq!(&agent_decides(&whole, c, Direction::Ingress), &named, "whole policy, {:?}", c);
            for n in &nodes {
                let mine = |a: IpAddr| n.prefixes().any(|p| p.contains(&a));
                for (ends_here, direction) in [(mine(c.src), Direction::Egress), (mine(c.dst), Direction::Ingress)] {
                    if ends_here {
                        prop_assert_eq!(
                            &agent_decides(&at[n.id.as_str()], c, direction),
                            &named,
                            "{} ({:?}), {:?}",
                            n.hostname,
                            direction,
                            c
                        );
                    }
                }
            }
        }
    }
}
