//! Packet decisions over compiled rules, and the policy file's `[[tests]]`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;

use super::{CompiledRule, Policy, PolicyError, Problem, TestDef, TestEnd};
use crate::model::NodeRec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// The deciding rule for a packet, `None` = denied. Among matching rules the most specific
/// decides: a named protocol before any, then the narrowest port range, then the first.
pub fn decide(
    rules: &[Arc<CompiledRule>],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: Option<u16>,
) -> Option<&CompiledRule> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.protocol.is_none_or(|p| p == protocol)
                && (r.ports.is_empty() || port.is_some_and(|x| r.ports.iter().any(|p| (p.first..=p.last).contains(&x))))
                && r.from_set.contains(src)
                && r.to_set.contains(dst)
        })
        .min_by_key(|(i, r)| {
            let width = match port {
                Some(x) if !r.ports.is_empty() => r
                    .ports
                    .iter()
                    .filter(|p| (p.first..=p.last).contains(&x))
                    .map(|p| u32::from(p.last - p.first))
                    .min()
                    .unwrap_or(u32::MAX),
                _ => u32::MAX,
            };
            (r.protocol.is_none(), width, *i)
        })
        .map(|(_, r)| &**r)
}

/// Runs every test of `policy` against `rules` (compiled from it) and `nodes`; the number
/// of tests passed, or the first failure.
pub fn run_tests(policy: &Policy, rules: &[Arc<CompiledRule>], nodes: &[Arc<NodeRec>]) -> Result<usize, PolicyError> {
    for (index, t) in policy.tests.iter().enumerate() {
        run_test(policy, index, t, rules, nodes)?;
    }
    Ok(policy.tests.len())
}

fn addresses(
    policy: &Policy,
    index: usize,
    end: &TestEnd,
    field: &'static str,
    pos: super::Pos,
    nodes: &[Arc<NodeRec>],
) -> Result<Vec<IpAddr>, PolicyError> {
    match end {
        TestEnd::Ip(ip) => Ok(vec![*ip]),
        TestEnd::Node(h) => nodes
            .iter()
            .find(|n| &n.hostname == h)
            .map(|n| n.addresses.iter().map(|a| a.addr()).collect())
            .ok_or_else(|| policy.error(pos, Problem::UnknownTestNode { index, field, name: h.clone() })),
    }
}

fn run_test(
    policy: &Policy,
    index: usize,
    t: &TestDef,
    rules: &[Arc<CompiledRule>],
    nodes: &[Arc<NodeRec>],
) -> Result<(), PolicyError> {
    let from = addresses(policy, index, &t.from, "from", t.from_pos, nodes)?;
    let to = addresses(policy, index, &t.to, "to", t.to_pos, nodes)?;
    let family_ok = |a: &IpAddr| wirefence_proto::iana::proto_allows_family(Some(t.protocol), a.is_ipv6());
    let pairs: Vec<(IpAddr, IpAddr)> = from
        .iter()
        .flat_map(|s| to.iter().map(move |d| (*s, *d)))
        .filter(|(s, d)| s.is_ipv4() == d.is_ipv4() && family_ok(s))
        .collect();
    if pairs.is_empty() {
        return Err(policy.error(t.pos, Problem::TestNoPair { index, case: t.describe() }));
    }
    for (src, dst) in pairs {
        let rule = decide(rules, src, dst, t.protocol, t.port);
        let got = if rule.is_some() { Verdict::Allow } else { Verdict::Deny };
        if got != t.expect {
            let mut case = t.describe();
            if !matches!((&t.from, &t.to), (TestEnd::Ip(_), TestEnd::Ip(_))) {
                case = format!("{case}, {src} -> {dst}");
            }
            let rule = rule.map(|r| r.id.clone());
            return Err(policy.error(t.pos, Problem::TestFailed { index, case, expected: t.expect, got, rule }));
        }
    }
    Ok(())
}
