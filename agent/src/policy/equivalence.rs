//! Property tests: the compiled maps, looked up as the eBPF program does, decide every
//! packet exactly as the rule-by-rule evaluator does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use super::model::{has_ports, PortRange, Rule, RuleDirection};
use super::{compile, evaluate, simulate, Direction, Packet, Policy};

// Small address pools so that prefixes nest and probes land in them.
fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        8 => (0u32..3, prop::sample::select(vec![0u32, 1, 2, 3, 64, 127, 128, 255]))
            .prop_map(|(a, b)| Ipv4Addr::from(0x0a00_0000 | (a << 8) | b)),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        8 => (0u128..3, prop::sample::select(vec![0u128, 1, 2, 3, 64, 127, 128, 255]))
            .prop_map(|(a, b)| Ipv6Addr::from((0xfd00u128 << 112) | (a << 8) | b)),
        1 => any::<u128>().prop_map(Ipv6Addr::from),
    ]
}

fn prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        3 => (v4_addr(), prop::sample::select(vec![0u8, 8, 16, 22, 23, 24, 25, 30, 31, 32]))
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a, l).unwrap().trunc())),
        2 => (v6_addr(), prop::sample::select(vec![0u8, 8, 64, 118, 119, 120, 121, 126, 128]))
            .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a, l).unwrap().trunc())),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 0u16..48, 1 => prop::sample::select(vec![0u16, 1, 1023, 1024, 8080, 65534, 65535])]
}

fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        4 => (0u16..40, 0u16..24).prop_map(|(first, n)| PortRange { first, last: first + n }),
        1 => (port(), port()).prop_map(|(a, b)| PortRange { first: a.min(b), last: a.max(b) }),
    ]
}

const PROTOS: [u8; 6] = [6, 17, 1, 58, 47, 0];

fn rule() -> impl Strategy<Value = Rule> {
    let proto = prop_oneof![2 => Just(None), 5 => prop::sample::select(PROTOS.to_vec()).prop_map(Some)];
    let direction = prop::sample::select(vec![RuleDirection::Both, RuleDirection::Ingress, RuleDirection::Egress]);
    (
        prop::collection::vec(prefix(), 1..4),
        prop::collection::vec(prefix(), 1..4),
        proto,
        prop::collection::vec(port_range(), 0..4),
        direction,
    )
        .prop_map(|(from, to, proto, ports, direction)| Rule {
            id: String::new(),
            from,
            to,
            ports: if proto.is_some_and(has_ports) { ports } else { vec![] },
            proto,
            direction,
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    prop::collection::vec(rule(), 0..7).prop_map(|rules| {
        let rules = rules
            .into_iter()
            .filter(Rule::satisfiable)
            .enumerate()
            .map(|(i, r)| Rule { id: format!("r{i}"), ..r })
            .collect();
        Policy::new(rules).unwrap()
    })
}

fn packet() -> impl Strategy<Value = Packet> {
    let addrs = prop_oneof![
        5 => (v4_addr(), v4_addr()).prop_map(|(s, d)| (IpAddr::V4(s), IpAddr::V4(d))),
        4 => (v6_addr(), v6_addr()).prop_map(|(s, d)| (IpAddr::V6(s), IpAddr::V6(d))),
        // Never on the wire, but it checks that class ids do not collide across families.
        1 => (v4_addr(), v6_addr()).prop_map(|(s, d)| (IpAddr::V4(s), IpAddr::V6(d))),
    ];
    let port = prop_oneof![8 => port().prop_map(Some), 1 => Just(None)];
    (any::<bool>(), addrs, prop::sample::select(PROTOS.to_vec()), port).prop_map(
        |(ingress, (src, dst), proto, port)| Packet {
            direction: if ingress { Direction::Ingress } else { Direction::Egress },
            src,
            dst,
            proto,
            port,
        },
    )
}

/// Packets aimed at the policy's own prefixes (first/last address), so that most match.
fn aimed(policy: &Policy, pick: &[(usize, bool, bool)], base: &Packet) -> Vec<Packet> {
    let rules = policy.rules();
    let mut out = Vec::new();
    for &(i, first_src, first_dst) in pick {
        if rules.is_empty() {
            break;
        }
        let r = &rules[i % rules.len()];
        let edge = |n: &IpNet, first: bool| if first { n.network() } else { n.broadcast() };
        for s in &r.from {
            for d in r.to.iter().filter(|d| d.network().is_ipv6() == s.network().is_ipv6()) {
                let proto = r.proto.unwrap_or(base.proto);
                let port = match (r.ports.first(), base.port) {
                    (Some(p), Some(_)) => Some(if first_src { p.first } else { p.last }),
                    _ => base.port,
                };
                out.push(Packet { src: edge(s, first_src), dst: edge(d, first_dst), proto, port, ..*base });
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_decide_like_the_rules(
        policy in policy(),
        packets in prop::collection::vec(packet(), 48),
        pick in prop::collection::vec((0usize..8, any::<bool>(), any::<bool>()), 8),
    ) {
        let compiled = compile(&policy).unwrap();
        // Sorted, one entry per key, no class 0, every class id in a trie.
        for w in compiled.entries.windows(2) {
            prop_assert!((w[0].data, w[0].prefixlen) < (w[1].data, w[1].prefixlen));
        }
        let base = packets[0];
        for pkt in packets.iter().chain(&aimed(&policy, &pick, &base)) {
            prop_assert_eq!(evaluate(&policy, pkt), simulate(&compiled, pkt), "{:?}", pkt);
        }
    }
}
