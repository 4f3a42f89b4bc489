//! Address classes: per role (source, destination) and family, the distinct rule prefixes
//! and the class id of each.
//!
//! The class maps hold every distinct prefix of the role and family, each with its class id;
//! a lookup (hash probes at the lengths present, longest first) returns the class of the
//! longest prefix containing the address, or misses (class 0: no rule prefix contains it). Because the set of a role's
//! rule prefixes containing an address is exactly that longest prefix and its ancestors in
//! the set, "one class per distinct prefix" is the `wirefence_common` model (class = set of
//! containing rule prefixes) with the set named by its longest member.
//!
//! A rule prefix P therefore matches the classes of the prefixes Q in the set with P ⊇ Q:
//! P itself and its descendants. Sorted by (network, length), those are one contiguous run
//! starting at P, so a rule's classes are a few id ranges. Each rule prefix's position in
//! the sorted set is recorded while sorting (no per-rule searches).
//!
//! Numbering: per role, across both families: IPv4 prefixes get 1..=n4 in sorted order,
//! IPv6 prefixes n4+1..=n4+n6. The policy key carries no family, so ids must not repeat
//! between the families of a role (with per-family numbering, an IPv4 pair (1, 1) and an
//! IPv6 pair (1, 1) would share keys).
//!
//! Only prefixes that produce policy entries are in the sets: a rule contributes a family
//! when it has source and destination prefixes of it and its protocol allows it (ICMP is
//! IPv4 only, ICMPv6 IPv6 only).

use std::ops::Range;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::model::{is_v6, proto_allows_family, Policy, Rule};
use super::PolicyError;

/// A prefix with its address left-aligned in 128 bits (IPv4 in the top 32), so one code
/// path serves both families; ordered by (network, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Pfx {
    pub(crate) bits: u128,
    pub(crate) len: u8,
}

impl Pfx {
    pub(crate) fn of(net: &IpNet) -> Pfx {
        match net {
            IpNet::V4(n) => Pfx { bits: u128::from(u32::from(n.network())) << 96, len: n.prefix_len() },
            IpNet::V6(n) => Pfx { bits: u128::from(n.network()), len: n.prefix_len() },
        }
    }

    /// The last address of the prefix, left-aligned.
    pub(crate) fn last(&self) -> u128 {
        self.bits | u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0)
    }

    fn to_v4(self) -> Ipv4Net {
        Ipv4Net::new(((self.bits >> 96) as u32).into(), self.len).expect("valid length")
    }

    fn to_v6(self) -> Ipv6Net {
        Ipv6Net::new(self.bits.into(), self.len).expect("valid length")
    }
}

/// Which class map a prefix belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Src,
    Dst,
}

/// The distinct prefixes of one role and family; `prefixes[i]` has class `base + i + 1`.
#[derive(Clone, Debug, Default)]
pub struct ClassSet {
    prefixes: Vec<Pfx>,
    base: u32,
}

impl ClassSet {
    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    pub fn v4_entries(&self) -> Vec<(Ipv4Net, u32)> {
        self.prefixes.iter().zip(self.base + 1..).map(|(p, c)| (p.to_v4(), c)).collect()
    }

    pub fn v6_entries(&self) -> Vec<(Ipv6Net, u32)> {
        self.prefixes.iter().zip(self.base + 1..).map(|(p, c)| (p.to_v6(), c)).collect()
    }
}

/// The four class sets of a policy.
#[derive(Clone, Debug, Default)]
pub struct Classes {
    pub src_v4: ClassSet,
    pub src_v6: ClassSet,
    pub dst_v4: ClassSet,
    pub dst_v6: ClassSet,
}

/// A rule's classes in one family: index ranges into [`RuleClasses::ranges`], each
/// holding sorted, disjoint class-id ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub rule: u32,
    pub v6: bool,
    pub src: Range<usize>,
    pub dst: Range<usize>,
}

impl Part {
    /// Number of (src, dst) class pairs.
    pub fn pairs(&self, ranges: &[Range<u32>]) -> u64 {
        let n = |r: &Range<usize>| ranges[r.clone()].iter().map(|c| u64::from(c.end - c.start)).sum::<u64>();
        n(&self.src).saturating_mul(n(&self.dst))
    }
}

/// Every rule's classes, in rule order (then IPv4 before IPv6).
#[derive(Clone, Debug, Default)]
pub struct RuleClasses {
    pub ranges: Vec<Range<u32>>,
    pub parts: Vec<Part>,
}

/// Whether `rule` produces entries for the family.
pub fn rule_uses_family(rule: &Rule, v6: bool) -> bool {
    proto_allows_family(rule.proto, v6)
        && rule.from.iter().any(|n| is_v6(n) == v6)
        && rule.to.iter().any(|n| is_v6(n) == v6)
}

/// Calls `f(rule index, rule, v6)` for every family a rule uses, in a fixed order.
pub(crate) fn for_each_use(policy: &Policy, mut f: impl FnMut(usize, &Rule, bool)) {
    for (index, rule) in policy.rules().iter().enumerate() {
        for v6 in [false, true] {
            if rule_uses_family(rule, v6) {
                f(index, rule, v6);
            }
        }
    }
}

pub(crate) fn of_family(nets: &[IpNet], v6: bool) -> impl Iterator<Item = &IpNet> {
    nets.iter().filter(move |n| is_v6(n) == v6)
}

/// One set under construction: its prefixes, the position of each occurrence (in
/// [`for_each_use`] order) and the end of each prefix's descendant run.
struct Builder {
    prefixes: Vec<Pfx>,
    position: Vec<u32>,
    end: Vec<u32>,
}

impl Builder {
    fn new(mut occurrences: Vec<(Pfx, u32)>) -> Builder {
        occurrences.sort_unstable_by_key(|o| o.0);
        let mut prefixes: Vec<Pfx> = Vec::new();
        let mut position = vec![0u32; occurrences.len()];
        for (p, seq) in occurrences {
            if prefixes.last() != Some(&p) {
                prefixes.push(p);
            }
            position[seq as usize] = prefixes.len() as u32 - 1;
        }
        // A prefix's run ends at the first later prefix it does not contain.
        let mut end = vec![prefixes.len() as u32; prefixes.len()];
        let mut open: Vec<usize> = Vec::new();
        for (i, p) in prefixes.iter().enumerate() {
            while let Some(&top) = open.last() {
                if p.bits <= prefixes[top].last() {
                    break;
                }
                end[top] = i as u32;
                open.pop();
            }
            open.push(i);
        }
        Builder { prefixes, position, end }
    }

    /// The class ranges of the next `count` occurrences, merged, appended to `out`.
    fn ranges(&self, base: u32, next: &mut usize, count: usize, out: &mut Vec<Range<u32>>) {
        let start = out.len();
        for seq in *next..*next + count {
            let i = self.position[seq];
            out.push(base + i + 1..base + self.end[i as usize] + 1);
        }
        *next += count;
        // Descendant runs nest or are disjoint; merge nested and adjacent ones.
        out[start..].sort_unstable_by_key(|r| r.start);
        let mut w = start;
        for i in start..out.len() {
            let r = out[i].clone();
            if w > start && r.start <= out[w - 1].end {
                out[w - 1].end = out[w - 1].end.max(r.end);
            } else {
                out[w] = r;
                w += 1;
            }
        }
        out.truncate(w);
    }
}

impl Classes {
    /// Collects and numbers the prefixes and lists every rule's classes; each of the four
    /// sets may hold at most `max_entries` prefixes (one class-map entry each).
    pub fn build(policy: &Policy, max_entries: u32) -> Result<(Classes, RuleClasses), PolicyError> {
        // Sets: src v4, src v6, dst v4, dst v6.
        let mut occurrences: [Vec<(Pfx, u32)>; 4] = Default::default();
        for_each_use(policy, |_, rule, v6| {
            let f = usize::from(v6);
            for (set, nets) in [(f, &rule.from), (2 + f, &rule.to)] {
                let occ = &mut occurrences[set];
                for n in of_family(nets, v6) {
                    occ.push((Pfx::of(n), occ.len() as u32));
                }
            }
        });
        let builders = occurrences.map(Builder::new);
        const NAMES: [&str; 4] = ["source IPv4", "source IPv6", "destination IPv4", "destination IPv6"];
        for (b, map) in builders.iter().zip(NAMES) {
            if b.prefixes.len() > max_entries as usize {
                return Err(PolicyError::TooManyClassEntries { map, count: b.prefixes.len(), max: max_entries });
            }
        }
        // Ids per role across both families (see the module docs).
        let bases = [0, builders[0].prefixes.len() as u32, 0, builders[2].prefixes.len() as u32];

        let mut rc = RuleClasses::default();
        let mut next = [0usize; 4];
        for_each_use(policy, |index, rule, v6| {
            let f = usize::from(v6);
            let s = rc.ranges.len();
            builders[f].ranges(bases[f], &mut next[f], of_family(&rule.from, v6).count(), &mut rc.ranges);
            let d = rc.ranges.len();
            builders[2 + f].ranges(bases[2 + f], &mut next[2 + f], of_family(&rule.to, v6).count(), &mut rc.ranges);
            rc.parts.push(Part { rule: index as u32, v6, src: s..d, dst: d..rc.ranges.len() });
        });

        let [s4, s6, d4, d6] = builders.map(|b| b.prefixes);
        let classes = Classes {
            src_v4: ClassSet { prefixes: s4, base: bases[0] },
            src_v6: ClassSet { prefixes: s6, base: bases[1] },
            dst_v4: ClassSet { prefixes: d4, base: bases[2] },
            dst_v6: ClassSet { prefixes: d6, base: bases[3] },
        };
        Ok((classes, rc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Rule, RuleDirection};

    fn rule(from: &[&str], to: &[&str]) -> Rule {
        Rule {
            id: format!("r{}", from.len() * 10 + to.len()),
            from: from.iter().map(|s| s.parse().unwrap()).collect(),
            to: to.iter().map(|s| s.parse().unwrap()).collect(),
            proto: None,
            ports: vec![],
            direction: RuleDirection::Both,
        }
    }

    #[test]
    fn descendants_are_contiguous_and_ids_span_families() {
        let policy = Policy::new(vec![
            rule(
                &["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.2.0.0/16", "11.0.0.0/8", "fd00::/8", "fd00::/64"],
                &["0.0.0.0/0", "::/0"],
            ),
            rule(&["10.1.0.0/16"], &["0.0.0.0/0"]),
            rule(&["10.1.2.0/24", "10.0.0.0/8", "11.0.0.0/8"], &["::/0", "0.0.0.0/0"]),
            rule(&["fd00::/64", "10.0.0.0/8", "12.0.0.0/8"], &["::/0"]),
        ])
        .unwrap();
        let (c, rc) = Classes::build(&policy, 100).unwrap();
        let pairs = |r: &[Range<u32>]| r.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>();
        let ids: Vec<_> = c.src_v4.v4_entries().into_iter().map(|(n, c)| (n.to_string(), c)).collect();
        assert_eq!(
            ids,
            [("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("10.1.2.0/24", 3), ("10.2.0.0/16", 4), ("11.0.0.0/8", 5)]
                .map(|(n, c)| (n.to_string(), c))
        );
        assert_eq!(c.src_v6.v6_entries().iter().map(|e| e.1).collect::<Vec<_>>(), [6, 7]);
        assert_eq!(c.dst_v4.v4_entries()[0].1, 1);
        assert_eq!(c.dst_v6.v6_entries()[0].1, 2);
        let parts: Vec<_> = rc
            .parts
            .iter()
            .map(|p| (p.rule, p.v6, pairs(&rc.ranges[p.src.clone()]), pairs(&rc.ranges[p.dst.clone()])))
            .collect();
        assert_eq!(
            parts,
            [
                (0, false, vec![(1, 6)], vec![(1, 2)]),
                (0, true, vec![(6, 8)], vec![(2, 3)]),
                (1, false, vec![(2, 4)], vec![(1, 2)]),
                (2, false, vec![(1, 6)], vec![(1, 2)]),
                (3, true, vec![(7, 8)], vec![(2, 3)]),
            ]
        );
        assert_eq!(rc.parts[0].pairs(&rc.ranges), 5);
    }

    #[test]
    fn class_limit_is_checked() {
        let r = rule(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"], &["10.0.0.0/24"]);
        let e = Classes::build(&Policy::new(vec![r]).unwrap(), 2).unwrap_err();
        assert_eq!(e.to_string(), "the policy uses 3 distinct source IPv4 prefixes; the map holds at most 2");
    }
}
