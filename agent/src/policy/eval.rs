//! Deciding a packet: [`evaluate`] walks the rules one by one (the reference semantics);
//! [`simulate`] performs the eBPF program's lookups on a [`Compiled`] policy in userspace.

use std::net::IpAddr;

use ipnet::{Ipv4Net, Ipv6Net};
use wirefence_common::{policy_data, NO_RULE, POLICY_BITS_ALL, POLICY_BITS_TO_PROTO};
use wirefence_proto::policy::specificity;

use super::compile::Compiled;
use super::model::{addr_is_v6, proto_allows_family, Direction, Policy};

/// A packet as the classifier sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub direction: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// TCP/UDP/SCTP/UDP-Lite: destination port; ICMP/ICMPv6: `type << 8 | code`; others: 0.
    /// `None`: a non-first fragment (no transport header), decided without ports.
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding rule's index, when allowed.
    pub rule: Option<u32>,
}

impl Decision {
    pub const DENY: Decision = Decision { allowed: false, rule: None };

    fn allow(rule: u32) -> Decision {
        Decision { allowed: true, rule: Some(rule) }
    }
}

/// The reference decision. A rule matches when it applies to the direction, the source is
/// in one of its `from` prefixes and the destination in one of its `to` prefixes (same
/// family), the protocol matches (any; or equal, ICMP only for IPv4 and ICMPv6 only for
/// IPv6), and, if it lists ports, the port is in one of them (a fragment without ports
/// matches no such rule). The deciding rule is the most specific match: any protocol <
/// a protocol with all ports < a protocol with a port prefix, longer port prefixes more
/// specific (the prefix of the rule's minimal cover containing the port); ties go to the
/// lowest index ([`wirefence_proto::policy::specificity`], which the control plane's
/// evaluator of `[[tests]]` uses too).
pub fn evaluate(policy: &Policy, pkt: &Packet) -> Decision {
    let v6 = addr_is_v6(&pkt.src);
    if v6 != addr_is_v6(&pkt.dst) {
        return Decision::DENY;
    }
    let mut best: Option<(u32, u32)> = None; // (specificity, index)
    for (index, rule) in policy.rules().iter().enumerate() {
        if !rule.direction.applies(pkt.direction)
            || !proto_allows_family(rule.proto, v6)
            || !rule.from.iter().any(|n| n.contains(&pkt.src))
            || !rule.to.iter().any(|n| n.contains(&pkt.dst))
        {
            continue;
        }
        let Some(specificity) = specificity(rule.proto, &rule.ports, pkt.proto, pkt.port) else { continue };
        if best.is_none_or(|(s, _)| specificity > s) {
            best = Some((specificity, index as u32));
        }
    }
    best.map_or(Decision::DENY, |(_, index)| Decision::allow(index))
}

/// The eBPF lookups, simulated on the compiled maps: the longest source prefix of the
/// packet's family (class 0 on a miss), the same for the destination, then the longest
/// policy entry matching (direction, classes, protocol, port) — for a fragment, only
/// entries ending at or before the protocol. Linear scans: for tests, not for speed.
pub fn simulate(compiled: &Compiled, pkt: &Packet) -> Decision {
    let class = |v4: &[(Ipv4Net, u32)], v6: &[(Ipv6Net, u32)], addr: IpAddr| -> u32 {
        let best = match addr {
            IpAddr::V4(a) => v4.iter().filter(|(n, _)| n.contains(&a)).max_by_key(|(n, _)| n.prefix_len()).map(|e| e.1),
            IpAddr::V6(a) => v6.iter().filter(|(n, _)| n.contains(&a)).max_by_key(|(n, _)| n.prefix_len()).map(|e| e.1),
        };
        best.unwrap_or(0)
    };
    let sc = class(&compiled.src_v4, &compiled.src_v6, pkt.src);
    let dc = class(&compiled.dst_v4, &compiled.dst_v6, pkt.dst);
    let (port, key_len) = match pkt.port {
        Some(p) => (p, POLICY_BITS_ALL),
        None => (0, POLICY_BITS_TO_PROTO),
    };
    let key = u128::from_be_bytes(policy_data(0, sc, dc, pkt.proto, port));
    let mut best: Option<(u32, u32)> = None;
    for e in &compiled.entries {
        if e.prefixlen > key_len {
            continue;
        }
        let mask = u128::MAX.checked_shl(128 - e.prefixlen).unwrap_or(0);
        if (u128::from_be_bytes(e.data) ^ key) & mask != 0 {
            continue;
        }
        match best {
            Some((len, _)) if len > e.prefixlen => {}
            Some((len, _)) if len == e.prefixlen => panic!("two policy entries with one key: {e:?}"),
            _ => best = Some((e.prefixlen, e.rules[pkt.direction.key_byte() as usize])),
        }
    }
    match best {
        Some((_, rule)) if rule != NO_RULE => Decision::allow(rule),
        _ => Decision::DENY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::model::{PortRange, Rule, RuleDirection};

    fn rule(id: &str, from: &str, to: &str, proto: Option<u8>, ports: &[(u16, u16)]) -> Rule {
        Rule {
            id: id.into(),
            from: vec![from.parse().unwrap()],
            to: vec![to.parse().unwrap()],
            proto,
            ports: ports.iter().map(|&(first, last)| PortRange { first, last }).collect(),
            direction: RuleDirection::Both,
        }
    }

    fn pkt(src: &str, dst: &str, proto: u8, port: Option<u16>) -> Packet {
        Packet { direction: Direction::Ingress, src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto, port }
    }

    fn both(p: &Policy, k: &Packet) -> Decision {
        let d = evaluate(p, k);
        assert_eq!(d, simulate(&compile(p).unwrap(), k), "{k:?}");
        d
    }

    #[test]
    fn specificity_and_ties() {
        let p = Policy::new(vec![
            rule("any", "10.0.0.0/8", "10.0.0.0/8", None, &[]),
            rule("tcp", "10.0.0.0/8", "10.0.0.0/8", Some(6), &[]),
            rule("range", "10.0.0.0/8", "10.0.0.0/8", Some(6), &[(8000, 8080)]),
            rule("exact", "10.0.0.0/8", "10.0.0.0/8", Some(6), &[(8070, 8070)]),
            rule("same", "10.1.0.0/16", "10.0.0.0/8", Some(6), &[(8070, 8070)]),
        ])
        .unwrap();
        let at = |proto, port| both(&p, &pkt("10.1.0.1", "10.2.0.1", proto, port)).rule;
        assert_eq!(at(17, Some(53)), Some(0));
        assert_eq!(at(6, Some(22)), Some(1));
        assert_eq!(at(6, Some(8001)), Some(2));
        assert_eq!(at(6, Some(8070)), Some(3), "/16 beats /12; the tie with \"same\" goes to the lower index");
        assert_eq!(at(6, Some(8080)), Some(2), "8080 is a /16 of 8000-8080");
        assert_eq!(at(6, None), Some(1), "a fragment never matches port rules");
        assert_eq!(both(&p, &pkt("11.0.0.1", "10.0.0.1", 6, Some(80))), Decision::DENY);
        assert_eq!(both(&p, &pkt("10.0.0.1", "fd00::1", 6, Some(80))), Decision::DENY);
    }

    #[test]
    fn icmp_is_per_family_and_directions_apply() {
        let mut egress = rule("e", "::/0", "::/0", Some(58), &[]);
        egress.direction = RuleDirection::Egress;
        let p = Policy::new(vec![rule("icmp", "0.0.0.0/0", "0.0.0.0/0", Some(1), &[]), egress]).unwrap();
        assert!(both(&p, &pkt("10.0.0.1", "10.0.0.2", 1, Some(0x0800))).allowed);
        assert!(!both(&p, &pkt("fd00::1", "fd00::2", 1, Some(0x0800))).allowed);
        assert!(!both(&p, &pkt("fd00::1", "fd00::2", 58, Some(0x8000))).allowed);
        let out = Packet { direction: Direction::Egress, ..pkt("fd00::1", "fd00::2", 58, Some(0x8000)) };
        assert_eq!(both(&p, &out).rule, Some(1));
    }

    #[test]
    fn empty_policy_denies() {
        let p = Policy::new(vec![]).unwrap();
        assert_eq!(both(&p, &pkt("10.0.0.1", "10.0.0.2", 6, Some(80))), Decision::DENY);
    }
}
