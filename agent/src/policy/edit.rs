//! One-rule replacements at the cost of what they touch.
//!
//! A policy entry's key names one (src class, dst class) pair, and the folding of equal keys
//! and the direction inheritance ([`super::compile`]) never cross pairs. So when a rule
//! changes but keeps its prefixes (same families used), the class sets and their ids stay
//! as they are, and only the pairs of that rule can change: each is recomputed from its
//! contributors — the rules with a source prefix containing the pair's source prefix and a
//! destination prefix containing its destination prefix — found through a sorted index of
//! prefix occurrences (one binary search per ancestor length), not by walking the rules.
//!
//! Anything else (prefixes or families changed) changes class ids, so [`Editable::replace`]
//! compiles in full and says so ([`EntryChange::Full`]).

use wirefence_common::{policy_data, PolicyData};

use super::classes::{for_each_use, of_family, rule_uses_family, Pfx};
use super::compile::{compile_with_limits, finish, push_tails, Compiled, Limits, PolicyEntry, Tail};
use super::model::{Policy, Rule};
use super::PolicyError;

/// (IPv6?, (source prefix, class), (destination prefix, class)).
type ClassPair = (bool, (Pfx, u32), (Pfx, u32));

/// What a replacement changed in [`Compiled::entries`] (compiler class ids, rule indices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryChange {
    /// These keys left, these entries were added or changed; class maps unchanged.
    Entries { removed: Vec<(PolicyData, u32)>, put: Vec<PolicyEntry> },
    /// Recompiled in full (the class sets changed): write the whole [`Compiled`].
    Full,
}

/// A policy with its compilation and the index that makes one-rule changes local.
#[derive(Clone, Debug)]
pub struct Editable {
    policy: Policy,
    compiled: Compiled,
    limits: Limits,
    /// Per set (src v4, src v6, dst v4, dst v6): (prefix, class id), sorted by prefix.
    classes: [Vec<(Pfx, u32)>; 4],
    /// Per set: (prefix, rule index) for each prefix of a rule in a family it uses, sorted.
    users: [Vec<(Pfx, u32)>; 4],
}

/// The sets a rule's prefixes go to: (set, prefix), in a fixed order.
fn occurrences(rule: &Rule) -> Vec<(usize, Pfx)> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if rule_uses_family(rule, v6) {
            let f = usize::from(v6);
            out.extend(of_family(&rule.from, v6).map(|n| (f, Pfx::of(n))));
            out.extend(of_family(&rule.to, v6).map(|n| (2 + f, Pfx::of(n))));
        }
    }
    out
}

fn contains(outer: Pfx, inner: Pfx) -> bool {
    outer.len <= inner.len && outer.bits <= inner.bits && inner.bits <= outer.last()
}

/// `p` shortened to `len` bits.
fn ancestor(p: Pfx, len: u8) -> Pfx {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Pfx { bits: p.bits & mask, len }
}

/// Index range of `entries` (sorted) holding the keys of the pair (s, d).
fn pair_range(entries: &[PolicyEntry], s: u32, d: u32) -> std::ops::Range<usize> {
    let lo = u128::from_be_bytes(policy_data(0, s, d, 0, 0));
    let hi = lo + (1u128 << 56); // the bytes after the dst class: protocol, port, padding
    let at = |x: u128| entries.partition_point(|e| u128::from_be_bytes(e.data) < x);
    at(lo)..at(hi)
}

impl Editable {
    /// Compiles `policy` in full and indexes it.
    pub fn new(policy: Policy, limits: Limits) -> Result<Editable, PolicyError> {
        let compiled = compile_with_limits(&policy, &limits)?;
        Ok(Editable::index(policy, compiled, limits))
    }

    fn index(policy: Policy, compiled: Compiled, limits: Limits) -> Editable {
        let mut classes: [Vec<(Pfx, u32)>; 4] = Default::default();
        for (role, v6, net, id) in compiled.class_lists() {
            classes[role as usize * 2 + usize::from(v6)].push((Pfx::of(&net), id));
        }
        let mut users: [Vec<(Pfx, u32)>; 4] = Default::default();
        for_each_use(&policy, |i, rule, v6| {
            let f = usize::from(v6);
            users[f].extend(of_family(&rule.from, v6).map(|n| (Pfx::of(n), i as u32)));
            users[2 + f].extend(of_family(&rule.to, v6).map(|n| (Pfx::of(n), i as u32)));
        });
        for set in classes.iter_mut().chain(users.iter_mut()) {
            set.sort_unstable();
        }
        Editable { policy, compiled, limits, classes, users }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// Replaces rule `index` (same id). On an error nothing changed.
    pub fn replace(&mut self, index: usize, rule: Rule) -> Result<EntryChange, PolicyError> {
        let old = self.policy.replace(index, rule)?;
        let new = &self.policy.rules()[index];
        if occurrences(&old) != occurrences(new) {
            return match compile_with_limits(&self.policy, &self.limits) {
                Ok(compiled) => {
                    let policy = std::mem::take(&mut self.policy);
                    *self = Editable::index(policy, compiled, self.limits);
                    Ok(EntryChange::Full)
                }
                Err(e) => {
                    self.policy.replace(index, old).expect("the old rule was valid");
                    Err(e)
                }
            };
        }
        let pairs = self.pairs(new);
        let mut fresh = Vec::new();
        for &(v6, (sp, s), (dp, d)) in &pairs {
            self.pair_entries(v6, sp, s, dp, d, &mut fresh);
        }
        finish(&mut fresh);

        let old_count: usize =
            pairs.iter().map(|&(_, (_, s), (_, d))| pair_range(&self.compiled.entries, s, d).len()).sum();
        let total = self.compiled.entries.len() - old_count + fresh.len();
        if total > self.limits.policy_entries as usize {
            self.policy.replace(index, old).expect("the old rule was valid");
            return Err(PolicyError::TooManyEntries { count: total as u64, max: self.limits.policy_entries });
        }
        // Splice pair by pair, from the last, so earlier ranges keep their positions.
        let (mut removed, mut put) = (Vec::new(), Vec::new());
        let mut by_pair: Vec<(u32, u32)> = pairs.iter().map(|&(_, (_, s), (_, d))| (s, d)).collect();
        by_pair.sort_unstable();
        for &(s, d) in by_pair.iter().rev() {
            let range = pair_range(&self.compiled.entries, s, d);
            let mine = pair_range(&fresh, s, d);
            let (was, now) = (&self.compiled.entries[range.clone()], &fresh[mine]);
            let key = |e: &PolicyEntry| (u128::from_be_bytes(e.data), e.prefixlen);
            removed.extend(
                was.iter().filter(|w| now.binary_search_by_key(&key(w), key).is_err()).map(|w| (w.data, w.prefixlen)),
            );
            put.extend(now.iter().filter(|n| was.binary_search_by_key(&key(n), key).map_or(true, |i| was[i] != **n)));
            let now = now.to_vec();
            self.compiled.entries.splice(range, now);
        }
        Ok(EntryChange::Entries { removed, put })
    }

    /// The (family, (src prefix, class), (dst prefix, class)) pairs a rule's entries use.
    fn pairs(&self, rule: &Rule) -> Vec<ClassPair> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            if !rule_uses_family(rule, v6) {
                continue;
            }
            let f = usize::from(v6);
            let classes = |set: usize, nets: &[ipnet::IpNet]| {
                let list = &self.classes[set];
                let mut got: Vec<(Pfx, u32)> = of_family(nets, v6)
                    .flat_map(|n| {
                        let p = Pfx::of(n);
                        let start = list.partition_point(|(q, _)| *q < p);
                        let end = list.partition_point(|(q, _)| q.bits <= p.last());
                        list[start..end.max(start)].iter().copied()
                    })
                    .collect();
                got.sort_unstable();
                got.dedup();
                got
            };
            let (src, dst) = (classes(f, &rule.from), classes(2 + f, &rule.to));
            for s in &src {
                out.extend(dst.iter().map(|d| (v6, *s, *d)));
            }
        }
        out
    }

    /// The unfolded entries of one pair from all its contributors, appended to `out`.
    fn pair_entries(&self, v6: bool, sp: Pfx, s: u32, dp: Pfx, d: u32, out: &mut Vec<PolicyEntry>) {
        let f = usize::from(v6);
        let users = &self.users[f];
        let mut rules: Vec<u32> = Vec::new();
        for len in 0..=sp.len {
            let a = ancestor(sp, len);
            let start = users.partition_point(|(q, _)| *q < a);
            rules.extend(users[start..].iter().take_while(|(q, _)| *q == a).map(|(_, r)| *r));
        }
        rules.sort_unstable();
        rules.dedup();
        let mut tails: Vec<Tail> = Vec::new();
        for r in rules {
            let rule = &self.policy.rules()[r as usize];
            if !of_family(&rule.to, v6).any(|n| contains(Pfx::of(n), dp)) {
                continue;
            }
            let mut mine = [wirefence_common::NO_RULE; 2];
            for dir in rule.direction.directions() {
                mine[dir.key_byte() as usize] = r;
            }
            tails.clear();
            push_tails(rule, &mut tails);
            out.extend(tails.iter().map(|t| PolicyEntry {
                data: policy_data(0, s, d, t.proto, t.port),
                prefixlen: t.prefixlen,
                rules: mine,
                v6,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::compile;
    use crate::policy::model::RuleDirection;

    use crate::policy::model::test_rule as rule;

    fn base() -> Vec<Rule> {
        vec![
            rule("any", &["10.0.0.0/8", "fd00::/8"], &["10.1.0.0/16", "fd01::/16"], None, &[]),
            rule("web", &["10.0.0.0/24"], &["10.1.2.0/24"], Some(6), &[(80, 80), (8000, 8080)]),
            rule("dns", &["10.0.0.5/32", "fd00::5/128"], &["10.1.0.0/16", "fd01::/16"], Some(17), &[(53, 53)]),
            rule("ssh", &["10.0.0.0/24"], &["10.1.2.3/32"], Some(6), &[(22, 22)]),
            rule("icmp", &["10.0.0.0/8"], &["10.1.2.0/24"], Some(1), &[]),
        ]
    }

    /// Every replacement leaves exactly what a full compile of the edited policy gives,
    /// and the reported change turns the old entries into the new ones.
    #[test]
    fn replacements_equal_a_full_compile() {
        let mut ed = Editable::new(Policy::new(base()).unwrap(), Limits::default()).unwrap();
        let edits = [
            (1, rule("web", &["10.0.0.0/24"], &["10.1.2.0/24"], Some(6), &[(443, 443)])),
            (3, rule("ssh", &["10.0.0.0/24"], &["10.1.2.3/32"], None, &[])),
            (0, rule("any", &["10.0.0.0/8", "fd00::/8"], &["10.1.0.0/16", "fd01::/16"], Some(17), &[(1, 1000)])),
            (2, Rule { direction: RuleDirection::Egress, ..base()[2].clone() }),
            (4, rule("icmp", &["10.0.0.0/8"], &["10.1.2.0/24"], Some(6), &[(0, 65535)])),
            // New prefixes: a full compile.
            (1, rule("web", &["10.0.0.0/25"], &["10.1.2.0/24"], Some(6), &[(443, 443)])),
            (3, rule("ssh", &["10.0.0.0/24"], &["10.1.2.3/32"], Some(6), &[(2222, 2222)])),
        ];
        for (i, (index, r)) in edits.into_iter().enumerate() {
            let before = ed.compiled().entries.clone();
            let change = ed.replace(index, r).unwrap();
            let want = compile(ed.policy()).unwrap();
            assert_eq!(ed.compiled(), &want, "edit {i}");
            match change {
                EntryChange::Full => assert_eq!(i, 5, "only the prefix change recompiles"),
                EntryChange::Entries { removed, put } => {
                    let mut got: std::collections::BTreeMap<_, _> =
                        before.iter().map(|e| ((e.data, e.prefixlen), *e)).collect();
                    for k in removed {
                        assert!(got.remove(&k).is_some(), "edit {i}: removed a key that was not there");
                    }
                    for e in put {
                        got.insert((e.data, e.prefixlen), e);
                    }
                    assert_eq!(got.into_values().collect::<Vec<_>>(), want.entries, "edit {i}");
                }
            }
        }
    }

    #[test]
    fn failed_replacements_change_nothing() {
        let mut ed = Editable::new(Policy::new(base()).unwrap(), Limits::default()).unwrap();
        let before = ed.compiled().clone();
        assert!(ed.replace(1, rule("other", &["10.0.0.0/24"], &["10.1.2.0/24"], None, &[])).is_err());
        assert!(ed.replace(9, base()[0].clone()).is_err());
        ed.limits.policy_entries = before.entries.len() as u32;
        let wide = rule("web", &["10.0.0.0/24"], &["10.1.2.0/24"], Some(6), &[(1, 65000)]);
        assert!(matches!(ed.replace(1, wide), Err(PolicyError::TooManyEntries { .. })));
        assert_eq!(ed.compiled(), &before);
        assert_eq!(ed.policy(), &Policy::new(base()).unwrap());
    }
}
