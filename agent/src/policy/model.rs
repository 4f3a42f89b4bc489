//! The validated access policy: rules with resolved prefixes, typed protocols and ports.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::PolicyError;

pub use wirefence_proto::iana::{
    has_ports, proto_allows_family, proto_name, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    PROTO_UDPLITE,
};
pub use wirefence_proto::policy::PortRange;
use wirefence_proto::policy::{normalize_ports, valid_name};

/// A protocol name or number ([`wirefence_proto::iana::parse_proto`]); `None` = any.
pub fn parse_proto(s: &str) -> Result<Option<u8>, String> {
    wirefence_proto::iana::parse_proto(s).ok_or_else(|| {
        format!("{s:?} is not a protocol (tcp, udp, icmp, icmpv6, sctp, udplite, any or a number 0-255)")
    })
}

/// The direction of a packet at the tunnel device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Arriving from the tunnel (decrypted, on its way into this machine).
    Ingress,
    /// Leaving into the tunnel (about to be encrypted).
    Egress,
}

impl Direction {
    /// The key byte ([`wirefence_common::DIR_INGRESS`] / [`wirefence_common::DIR_EGRESS`]).
    pub fn key_byte(self) -> u8 {
        match self {
            Direction::Ingress => wirefence_common::DIR_INGRESS,
            Direction::Egress => wirefence_common::DIR_EGRESS,
        }
    }
}

/// The packet directions a rule applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RuleDirection {
    #[default]
    Both,
    Ingress,
    Egress,
}

impl RuleDirection {
    pub fn parse(s: &str) -> Result<RuleDirection, String> {
        match s {
            "both" => Ok(RuleDirection::Both),
            "ingress" => Ok(RuleDirection::Ingress),
            "egress" => Ok(RuleDirection::Egress),
            _ => Err(format!("{s:?} is not \"both\", \"ingress\" or \"egress\"")),
        }
    }

    pub fn directions(self) -> &'static [Direction] {
        match self {
            RuleDirection::Both => &[Direction::Ingress, Direction::Egress],
            RuleDirection::Ingress => &[Direction::Ingress],
            RuleDirection::Egress => &[Direction::Egress],
        }
    }

    pub fn applies(self, d: Direction) -> bool {
        self.directions().contains(&d)
    }
}

/// One allow rule after resolution: selectors are prefixes, the protocol a number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `[A-Za-z0-9_.-]{1,64}`, unique in the policy.
    pub id: String,
    /// Source prefixes (canonical, sorted, no duplicates; either family).
    pub from: Vec<IpNet>,
    /// Destination prefixes (canonical, sorted, no duplicates).
    pub to: Vec<IpNet>,
    /// `None`: any protocol.
    pub proto: Option<u8>,
    /// Sorted, disjoint, non-adjacent ranges (normalized by [`Policy::new`]); empty = all
    /// ports. Only for [`has_ports`] protocols.
    pub ports: Vec<PortRange>,
    pub direction: RuleDirection,
}

impl Rule {
    /// Whether some source and destination prefix share a family the protocol allows.
    pub fn satisfiable(&self) -> bool {
        [false, true].into_iter().any(|v6| {
            proto_allows_family(self.proto, v6)
                && self.from.iter().any(|n| is_v6(n) == v6)
                && self.to.iter().any(|n| is_v6(n) == v6)
        })
    }
}

pub(crate) fn is_v6(n: &IpNet) -> bool {
    matches!(n, IpNet::V6(_))
}

pub(crate) fn addr_is_v6(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(_))
}

/// A validated policy: default deny, each rule allows; a rule's index is its position
/// (rule counters and the policy map's values use it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Validates and normalizes: ids valid and unique, ports only for port protocols and
    /// not inverted, every rule satisfiable, prefixes canonical. Prefix lists are sorted
    /// and deduplicated; port ranges are merged (overlapping or adjacent) and a set
    /// covering 0-65535 becomes "all ports" (empty).
    pub fn new(mut rules: Vec<Rule>) -> Result<Policy, PolicyError> {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (index, r) in rules.iter().enumerate() {
            if !valid_name(&r.id) {
                return Err(PolicyError::InvalidId { index, id: r.id.clone() });
            }
            if let Some(first) = seen.insert(&r.id, index) {
                return Err(PolicyError::DuplicateId { index, id: r.id.clone(), first });
            }
        }
        for (index, r) in rules.iter_mut().enumerate() {
            normalize(index, r)?;
        }
        Ok(Policy { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Replaces rule `index` by `rule` (same id), validated and normalized as
    /// [`Policy::new`] does; returns the rule it replaced. The cost of one rule, not of
    /// the policy: the incremental path ([`super::edit`]) starts here.
    pub fn replace(&mut self, index: usize, mut rule: Rule) -> Result<Rule, PolicyError> {
        let Some(old) = self.rules.get(index) else {
            return Err(PolicyError::NoSuchRule { index, count: self.rules.len() });
        };
        if old.id != rule.id {
            return Err(PolicyError::IdChanged { index, old: old.id.clone(), new: rule.id });
        }
        normalize(index, &mut rule)?;
        Ok(std::mem::replace(&mut self.rules[index], rule))
    }

    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }
}

/// One rule's checks beyond its id, and its normal form (sorted, deduplicated prefixes,
/// merged ports).
fn normalize(index: usize, r: &mut Rule) -> Result<(), PolicyError> {
    let rule = |r: &Rule| (index, r.id.clone());
    if let Some(n) = r.from.iter().chain(&r.to).find(|n| n.trunc() != **n) {
        let (index, id) = rule(r);
        return Err(PolicyError::HostBits { index, id, net: *n });
    }
    if let Some(p) = r.ports.iter().find(|p| p.first > p.last) {
        let (index, id) = rule(r);
        return Err(PolicyError::InvertedPortRange { index, id, lo: p.first, hi: p.last });
    }
    if !r.ports.is_empty() && !r.proto.is_some_and(has_ports) {
        let (index, id) = rule(r);
        return Err(PolicyError::PortsWithoutPortProtocol { index, id, proto: proto_name(r.proto) });
    }
    r.from.sort_by_key(|n| (is_v6(n), n.network(), n.prefix_len()));
    r.from.dedup();
    r.to.sort_by_key(|n| (is_v6(n), n.network(), n.prefix_len()));
    r.to.dedup();
    r.ports = normalize_ports(std::mem::take(&mut r.ports));
    if !r.satisfiable() {
        let (index, id) = rule(r);
        return Err(PolicyError::Unsatisfiable { index, id, reason: unsatisfiable_reason(r) });
    }
    Ok(())
}

fn unsatisfiable_reason(r: &Rule) -> String {
    let fams = |v: &[IpNet]| match (v.iter().any(|n| !is_v6(n)), v.iter().any(is_v6)) {
        (false, false) => "no prefixes",
        (true, false) => "only IPv4 prefixes",
        (false, true) => "only IPv6 prefixes",
        (true, true) => "IPv4 and IPv6 prefixes",
    };
    let base = format!("from has {} and to has {}", fams(&r.from), fams(&r.to));
    match r.proto {
        Some(PROTO_ICMP) => format!("{base}; proto icmp matches IPv4 only (use icmpv6 for IPv6)"),
        Some(PROTO_ICMPV6) => format!("{base}; proto icmpv6 matches IPv6 only (use icmp for IPv4)"),
        _ => format!("{base}: no source and destination of the same address family"),
    }
}

/// A rule in both directions from text prefixes, for tests.
#[cfg(test)]
pub(crate) fn test_rule(id: &str, from: &[&str], to: &[&str], proto: Option<u8>, ports: &[(u16, u16)]) -> Rule {
    Rule {
        id: id.into(),
        from: from.iter().map(|s| s.parse().unwrap()).collect(),
        to: to.iter().map(|s| s.parse().unwrap()).collect(),
        proto,
        ports: ports.iter().map(|&(first, last)| PortRange { first, last }).collect(),
        direction: RuleDirection::Both,
    }
}
