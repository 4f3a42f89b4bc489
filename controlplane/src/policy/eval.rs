//! Packet decisions over compiled rules, and the policy file's `[[tests]]`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Deserialize;
use wirefence_proto::policy::specificity;

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

/// The deciding rule for a packet, `None` = denied. It is the rule the agents decide by
/// (and credit in their rule counters): the most specific matching rule in the agent's
/// order ([`specificity`]: any protocol < a protocol with all ports < port ranges, by the
/// length of the agent's port prefix containing the port, ranges taken merged), ties to
/// the first. A node receives the rules that concern it in the file's order, narrowed to
/// its side without changing what they match on its tunnel, so its choice is this one.
/// Source and destination of different families match nothing.
pub fn decide(
    rules: &[Arc<CompiledRule>],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: Option<u16>,
) -> Option<&CompiledRule> {
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    let mut best: Option<(u32, &CompiledRule)> = None;
    for r in rules {
        let Some(s) = specificity(r.protocol, &r.normal_ports, protocol, port) else { continue };
        if best.is_none_or(|(b, _)| s > b) && r.from_set.contains(src) && r.to_set.contains(dst) {
            best = Some((s, r));
        }
    }
    best.map(|(_, r)| r)
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
            .find(|n| n.bound && &n.hostname == h)
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
