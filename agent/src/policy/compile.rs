//! Policy -> plain map contents (class maps and policy-map entries), no map handles.
//!
//! Entries: for each rule, each family it uses, each pair (src class, dst class) its
//! prefixes match (see [`super::classes`]), and each of its protocol/port prefixes: any
//! protocol -> prefix length [`POLICY_BITS_TO_DST`]; a protocol with all ports ->
//! [`POLICY_BITS_TO_PROTO`]; port ranges -> their minimal port prefixes,
//! `POLICY_BITS_TO_PROTO + n`. The key has no direction: the rule goes into the entry's
//! slot of each direction it applies to, so a rule for both directions costs one entry per
//! key. Key data is [`policy_data`] with generation 0 (the map writer sets the generation
//! byte). Identical keys from several rules keep, per direction, the lowest rule index;
//! then each entry inherits, for a direction it has no rule of, the rule of its longest
//! containing entry ([`inherit_directions`]), so the longest match answers every direction.

use std::ops::Range;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wirefence_common::{
    inherit_directions, policy_data, PolicyData, PolicyRow, MAX_CLASS_ENTRIES, MAX_POLICY_ENTRIES, MAX_RULES, NO_RULE,
    POLICY_BITS_TO_DST, POLICY_BITS_TO_PROTO,
};

use super::classes::{Classes, Role};
use super::model::{Policy, Rule};
use super::ports::expand;
use super::PolicyError;

/// Capacity limits; [`Limits::default`] is `wirefence_common`'s map sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub rules: u32,
    /// Per class map (each of the four).
    pub class_entries: u32,
    pub policy_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { rules: MAX_RULES, class_entries: MAX_CLASS_ENTRIES, policy_entries: MAX_POLICY_ENTRIES }
    }
}

/// One policy-map entry: LPM key (`data`, `prefixlen`) -> rule per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    /// Generation byte 0.
    pub data: PolicyData,
    pub prefixlen: u32,
    /// Index `DIR_INGRESS`/`DIR_EGRESS`: the deciding rule, `NO_RULE` for none.
    pub rules: [u32; 2],
    /// The family of the classes in `data` (class ids already differ between families;
    /// for writers that renumber classes per role and family).
    pub v6: bool,
}

/// What the map writer stores. Class-map keys are `class_data_v4/v6(generation, network)`
/// with prefix length `8 + prefix length`; values are the class ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Index = rule index (the policy map's values and the rule counters).
    pub rule_ids: Vec<String>,
    pub src_v4: Vec<(Ipv4Net, u32)>,
    pub dst_v4: Vec<(Ipv4Net, u32)>,
    pub src_v6: Vec<(Ipv6Net, u32)>,
    pub dst_v6: Vec<(Ipv6Net, u32)>,
    /// Sorted by (data, prefixlen); one entry per key.
    pub entries: Vec<PolicyEntry>,
}

/// The last bytes of a key: protocol, port and the key's prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tail {
    pub proto: u8,
    pub port: u16,
    pub prefixlen: u32,
}

impl Compiled {
    /// Every class-map entry: (role, is IPv6, prefix, class id).
    pub fn class_lists<'a>(&'a self) -> impl Iterator<Item = (Role, bool, IpNet, u32)> + 'a {
        let v4 = |role, list: &'a [(Ipv4Net, u32)]| list.iter().map(move |(n, c)| (role, false, IpNet::V4(*n), *c));
        let v6 = |role, list: &'a [(Ipv6Net, u32)]| list.iter().map(move |(n, c)| (role, true, IpNet::V6(*n), *c));
        v4(Role::Src, &self.src_v4)
            .chain(v4(Role::Dst, &self.dst_v4))
            .chain(v6(Role::Src, &self.src_v6))
            .chain(v6(Role::Dst, &self.dst_v6))
    }
}

pub(crate) fn push_tails(rule: &Rule, out: &mut Vec<Tail>) {
    match rule.proto {
        None => out.push(Tail { proto: 0, port: 0, prefixlen: POLICY_BITS_TO_DST }),
        Some(proto) if rule.ports.is_empty() => out.push(Tail { proto, port: 0, prefixlen: POLICY_BITS_TO_PROTO }),
        Some(proto) => {
            for range in &rule.ports {
                out.extend(expand(*range).map(|p| Tail {
                    proto,
                    port: p.port,
                    prefixlen: POLICY_BITS_TO_PROTO + u32::from(p.bits),
                }))
            }
        }
    }
}

pub fn compile(policy: &Policy) -> Result<Compiled, PolicyError> {
    compile_with_limits(policy, &Limits::default())
}

/// Compiles, checking every limit before building anything large: the entry count is
/// computed from class-range sizes first (it counts identical keys of different rules
/// separately, so it is an upper bound).
pub fn compile_with_limits(policy: &Policy, limits: &Limits) -> Result<Compiled, PolicyError> {
    let rules = policy.rules();
    if rules.len() > limits.rules as usize {
        return Err(PolicyError::TooManyRules { count: rules.len(), max: limits.rules });
    }
    let (classes, rc) = Classes::build(policy, limits.class_entries)?;

    // Count first: per rule, its key tails; per rule and family, its class pairs.
    let mut tails: Vec<Tail> = Vec::new();
    let mut tail_of: Vec<Range<usize>> = Vec::with_capacity(rules.len());
    for rule in rules {
        let t = tails.len();
        push_tails(rule, &mut tails);
        tail_of.push(t..tails.len());
    }
    let mut total: u64 = 0;
    for part in &rc.parts {
        let per_pair = tail_of[part.rule as usize].len() as u64;
        total = total.saturating_add(part.pairs(&rc.ranges).saturating_mul(per_pair));
    }
    if total > u64::from(limits.policy_entries) {
        return Err(PolicyError::TooManyEntries { count: total, max: limits.policy_entries });
    }

    let mut entries = Vec::with_capacity(total as usize);
    for part in &rc.parts {
        let tails = &tails[tail_of[part.rule as usize].clone()];
        let mut mine = [NO_RULE; 2];
        for dir in rules[part.rule as usize].direction.directions() {
            mine[dir.key_byte() as usize] = part.rule;
        }
        for s in rc.ranges[part.src.clone()].iter().flat_map(|r| r.clone()) {
            for d in rc.ranges[part.dst.clone()].iter().flat_map(|r| r.clone()) {
                for t in tails {
                    entries.push(PolicyEntry {
                        data: policy_data(0, s, d, t.proto, t.port),
                        prefixlen: t.prefixlen,
                        rules: mine,
                        v6: part.v6,
                    });
                }
            }
        }
    }
    finish(&mut entries);

    Ok(Compiled {
        rule_ids: rules.iter().map(|r| r.id.clone()).collect(),
        src_v4: classes.src_v4.v4_entries(),
        dst_v4: classes.dst_v4.v4_entries(),
        src_v6: classes.src_v6.v6_entries(),
        dst_v6: classes.dst_v6.v6_entries(),
        entries,
    })
}

/// Sorts `entries`, folds equal keys (per direction the lowest rule) and lets each entry
/// inherit the directions it lacks. Works on any set of whole class pairs: the folding and
/// the inheritance never cross a (src class, dst class) pair.
pub(crate) fn finish(entries: &mut Vec<PolicyEntry>) {
    // As u128: the same order as the bytes (big endian), compared faster.
    entries.sort_unstable_by_key(|e| (u128::from_be_bytes(e.data), e.prefixlen));
    // Equal keys are adjacent: fold them into the first, per direction the lowest rule
    // (NO_RULE is u32::MAX, so `min` keeps any rule over none).
    entries.dedup_by(|later, first| {
        let same = later.data == first.data && later.prefixlen == first.prefixlen;
        if same {
            for d in 0..2 {
                first.rules[d] = first.rules[d].min(later.rules[d]);
            }
        }
        same
    });
    let mut rows: Vec<PolicyRow> = entries
        .iter()
        .map(|e| PolicyRow { data: u128::from_be_bytes(e.data), prefixlen: e.prefixlen, rules: e.rules })
        .collect();
    inherit_directions(&mut rows);
    for (e, r) in entries.iter_mut().zip(&rows) {
        e.rules = r.rules;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{RuleDirection, PROTO_TCP};

    use crate::policy::model::test_rule as rule;

    #[test]
    fn small_policy_entries() {
        let mut web = rule("web", &["10.0.0.0/24"], &["10.0.1.2/32"], Some(PROTO_TCP), &[(80, 80), (8000, 8080)]);
        web.direction = RuleDirection::Ingress;
        let all = rule("all", &["10.0.0.0/8"], &["10.0.1.2/32", "fd00::/64"], None, &[]);
        let c = compile(&Policy::new(vec![web, all]).unwrap()).unwrap();
        assert_eq!(c.rule_ids, ["web", "all"]);
        // src: 10.0.0.0/8 = 1, 10.0.0.0/24 = 2; dst: 10.0.1.2/32 = 1. "all" has no IPv6 source.
        assert_eq!(
            c.src_v4.iter().map(|(n, c)| (n.to_string(), *c)).collect::<Vec<_>>(),
            [("10.0.0.0/8".to_string(), 1), ("10.0.0.0/24".to_string(), 2)]
        );
        assert!(c.src_v6.is_empty() && c.dst_v6.is_empty());
        assert_eq!(c.dst_v4.len(), 1);
        let e = |s, proto, port, prefixlen, rules| PolicyEntry {
            data: policy_data(0, s, 1, proto, port),
            prefixlen,
            rules,
            v6: false,
        };
        // "web" (ingress only) entries answer egress with the "all" entry they lie in.
        let mut want = vec![
            e(2, 6, 80, POLICY_BITS_TO_PROTO + 16, [0, 1]),
            e(2, 6, 8000, POLICY_BITS_TO_PROTO + 10, [0, 1]),
            e(2, 6, 8064, POLICY_BITS_TO_PROTO + 12, [0, 1]),
            e(2, 6, 8080, POLICY_BITS_TO_PROTO + 16, [0, 1]),
        ];
        for s in [1, 2] {
            want.push(e(s, 0, 0, POLICY_BITS_TO_DST, [1, 1]));
        }
        want.sort();
        assert_eq!(c.entries, want);
    }

    #[test]
    fn identical_keys_keep_the_lowest_rule() {
        let a = rule("a", &["10.0.0.0/8"], &["10.0.0.1/32"], Some(17), &[]);
        let b = rule("b", &["10.0.0.0/8"], &["10.0.0.1/32"], Some(17), &[]);
        let c = compile(&Policy::new(vec![a, b]).unwrap()).unwrap();
        assert_eq!(c.entries.len(), 1);
        assert!(c.entries.iter().all(|e| e.rules == [0, 0]));
    }

    #[test]
    fn limits_are_checked_with_numbers() {
        let many = rule("m", &["10.0.0.0/8", "10.1.0.0/16"], &["::/0", "0.0.0.0/0"], Some(6), &[(1, 65534)]);
        let p = Policy::new(vec![many]).unwrap();
        // 2 src classes x 1 dst class x 30 port prefixes (both directions share each key).
        assert_eq!(compile(&p).unwrap().entries.len(), 60);
        let small = Limits { policy_entries: 59, ..Limits::default() };
        assert_eq!(compile_with_limits(&p, &small).unwrap_err(), PolicyError::TooManyEntries { count: 60, max: 59 });
        let few = Limits { rules: 0, ..Limits::default() };
        assert_eq!(compile_with_limits(&p, &few).unwrap_err().to_string(), "the policy has 1 rules; the limit is 0");
    }
}
