//! Writes a compiled policy into the maps: fill the inactive generation (by difference with
//! what it holds), then flip the epoch. Class ids and rule slots are kept stable across
//! compiles so a one-rule change is a handful of map writes, not a rewrite.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::AsFd;

use aya::maps::{IterableMap, MapData};

use ipnet::IpNet;
use wirefence_common as common;

use crate::policy::{Compiled, EntryChange, PolicyEntry, Role};

/// One generation's content, as the writer last wrote (or read back) it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    /// (role, prefix) -> class id.
    pub classes: BTreeMap<(Role, IpNet), u32>,
    /// (policy data with generation byte 0, prefix length) -> rule slot per direction
    /// (`NO_RULE` for none).
    pub policy: BTreeMap<(common::PolicyData, u32), [u32; 2]>,
}

impl Generation {
    /// Records `d` as written.
    pub fn apply(&mut self, d: &Diff) {
        for k in &d.class_removes {
            self.classes.remove(k);
        }
        for (k, v) in &d.class_puts {
            self.classes.insert(*k, *v);
        }
        for k in &d.policy_removes {
            self.policy.remove(k);
        }
        for (k, v) in &d.policy_puts {
            self.policy.insert(*k, *v);
        }
    }
}

/// The map operations that turn one generation's content into another's.
#[derive(Debug, Default)]
pub struct Diff {
    pub class_removes: Vec<(Role, IpNet)>,
    pub class_puts: Vec<((Role, IpNet), u32)>,
    pub policy_removes: Vec<(common::PolicyData, u32)>,
    pub policy_puts: Vec<((common::PolicyData, u32), [u32; 2])>,
}

impl Diff {
    pub fn len(&self) -> usize {
        self.class_removes.len() + self.class_puts.len() + self.policy_removes.len() + self.policy_puts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The operations turning `have` into `want`: one merge pass over both (sorted) maps, so
/// every list is in key order.
pub fn diff(have: &Generation, want: &Generation) -> Diff {
    let mut d = Diff::default();
    merge(&have.classes, &want.classes, |k, h, w| match (h, w) {
        (Some(_), None) => d.class_removes.push(*k),
        (h, Some(w)) if h != Some(w) => d.class_puts.push((*k, *w)),
        _ => {}
    });
    merge(&have.policy, &want.policy, |k, h, w| match (h, w) {
        (Some(_), None) => d.policy_removes.push(*k),
        (h, Some(w)) if h != Some(w) => d.policy_puts.push((*k, *w)),
        _ => {}
    });
    d
}

/// Calls `f(key, have's value, want's value)` for every key of either map, in key order.
fn merge<K: Ord, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>, mut f: impl FnMut(&K, Option<&V>, Option<&V>)) {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        let order = match (h.peek(), w.peek()) {
            (None, None) => return,
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some((hk, _)), Some((wk, _))) => hk.cmp(wk),
        };
        match order {
            Less => {
                let (k, v) = h.next().expect("peeked");
                f(k, Some(v), None);
            }
            Greater => {
                let (k, v) = w.next().expect("peeked");
                f(k, None, Some(v));
            }
            Equal => {
                let ((k, hv), (_, wv)) = (h.next().expect("peeked"), w.next().expect("peeked"));
                f(k, Some(hv), Some(wv));
            }
        }
    }
}

/// A typed aya map handle: aya checked that the map's key and value sizes are those of
/// `K` and `V` when the handle was made, so a batch of them is what the kernel expects.
pub trait TypedMap {
    type K: aya::Pod;
    type V: aya::Pod;
    /// Values per key in a batch: 1, or the possible CPUs of a per-CPU map.
    fn values_per_key(&self) -> usize {
        1
    }
    fn data(&self) -> &MapData;
}

impl<K: aya::Pod, V: aya::Pod> TypedMap for aya::maps::HashMap<&mut MapData, K, V> {
    type K = K;
    type V = V;
    fn data(&self) -> &MapData {
        self.map()
    }
}

impl<K: aya::Pod, V: aya::Pod> TypedMap for aya::maps::LpmTrie<&mut MapData, K, V> {
    type K = aya::maps::lpm_trie::Key<K>;
    type V = V;
    fn data(&self) -> &MapData {
        self.map()
    }
}

impl TypedMap for aya::maps::PerCpuArray<&mut MapData, common::Counter> {
    type K = u32;
    type V = common::Counter;
    fn values_per_key(&self) -> usize {
        aya::util::nr_cpus().expect("possible CPUs")
    }
    fn data(&self) -> &MapData {
        self.map()
    }
}

/// Writes `keys[i] -> values[i * n .. (i + 1) * n]` (`n` values per key) into `map` with
/// `BPF_MAP_UPDATE_BATCH` ([`crate::sys::map_update_batch`]). Returns how many elements
/// were written (see there); the caller writes the rest one by one, which reports any real
/// error.
pub fn update_batch<M: TypedMap>(map: &M, keys: &[M::K], values: &[M::V]) -> usize {
    let per_key = map.values_per_key();
    // SAFETY: `M` is a typed aya handle whose key and value types are the map's; per-CPU
    // values are handed over for every possible CPU, and `Counter` (two u64) is a multiple
    // of 8 bytes as the kernel's per-CPU layout requires.
    unsafe { crate::sys::map_update_batch(map.data().fd().as_fd(), keys, values, per_key) }
}

/// Stable numbering: a prefix keeps its class id, a rule id keeps its counter slot, for as
/// long as either generation uses them.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    classes: HashMap<(Role, IpNet), u32>,
    next_class: u32,
    pub slots: BTreeMap<String, u32>,
    /// The last assignment's translation, for changes to that compilation ([`Ids::translate`]).
    last: Option<Mapping>,
    /// `slots` differs from what was last persisted (set by [`Ids::recover`] and by
    /// [`Ids::assign`] when it changes a slot; the owner clears it after saving).
    pub dirty: bool,
}

/// Compiler ids -> stable ids of one compilation.
#[derive(Clone, Debug, Default)]
struct Mapping {
    /// Stable class id by [role][is IPv6][compiler class id].
    remap: [[Vec<Option<u32>>; 2]; 2],
    /// Rule index -> counter slot.
    slot_of: Vec<u32>,
}

impl Mapping {
    /// A compiled entry's key (generation byte 0) and value in stable ids.
    fn entry(&self, e: &PolicyEntry) -> ((common::PolicyData, u32), [u32; 2]) {
        let mut data = e.data;
        data[0] = 0;
        let ids = |role: Role| &self.remap[role as usize][usize::from(e.v6)];
        let map = |role, c: u32| match c {
            0 => 0,
            c => ids(role).get(c as usize).copied().flatten().expect("every compiled class has an id"),
        };
        // policy_data layout: [generation, src class (4, BE), dst class (4, BE), ...].
        let src = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
        let dst = u32::from_be_bytes([data[5], data[6], data[7], data[8]]);
        data[1..5].copy_from_slice(&map(Role::Src, src).to_be_bytes());
        data[5..9].copy_from_slice(&map(Role::Dst, dst).to_be_bytes());
        let slot = |r: u32| if r == common::NO_RULE { r } else { self.slot_of[r as usize] };
        ((data, e.prefixlen), e.rules.map(slot))
    }
}

/// A set of rule slots: a bitmap over the counter map's range, plus any value outside it
/// (only ever read back from state written elsewhere).
struct SlotSet {
    bits: Vec<bool>,
    other: HashSet<u32>,
}

impl SlotSet {
    fn of(slots: impl Iterator<Item = u32>) -> SlotSet {
        let mut set = SlotSet { bits: vec![false; common::MAX_RULES as usize], other: HashSet::new() };
        for s in slots {
            match set.bits.get_mut(s as usize) {
                Some(b) => *b = true,
                None => {
                    set.other.insert(s);
                }
            }
        }
        set
    }

    fn contains(&self, s: u32) -> bool {
        self.bits.get(s as usize).copied().unwrap_or_else(|| self.other.contains(&s))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("policy has {rules} rules; at most {max} fit the counter map")]
pub struct TooManyRules {
    pub rules: usize,
    pub max: u32,
}

/// A policy-map key (data, prefix length) and its new value, or `None` for a removal.
pub type KeyChange = ((common::PolicyData, u32), Option<[u32; 2]>);

impl Ids {
    /// Translates a change to the compilation last given to [`Ids::assign`] (same rules,
    /// same class sets: see [`crate::policy::Editable`]): (key, new value or removal).
    /// `None` when there was no assignment to build on.
    pub fn translate(&self, change: &EntryChange) -> Option<Vec<KeyChange>> {
        let m = self.last.as_ref()?;
        let EntryChange::Entries { removed, put } = change else { return None };
        // Removed keys carry compiler class ids: translate them through a dummy entry.
        let key = |data: common::PolicyData, prefixlen: u32, v6| {
            m.entry(&PolicyEntry { data, prefixlen, rules: [common::NO_RULE; 2], v6 }).0
        };
        let mut out: Vec<_> = put.iter().map(|e| m.entry(e)).map(|(k, v)| (k, Some(v))).collect();
        // A removed key's family: its src class id says (ids never repeat between families).
        for (data, plen) in removed {
            let v6 = self.family_of(data);
            out.push((key(*data, *plen, v6), None));
        }
        Some(out)
    }

    /// The family of a compiled key's classes (a src class id names one prefix of one family).
    fn family_of(&self, data: &common::PolicyData) -> bool {
        let m = self.last.as_ref().expect("checked by the caller");
        let src = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        m.remap[Role::Src as usize][0].get(src).copied().flatten().is_none()
    }

    /// Rebuilds the numbering from what the maps hold and the saved slots.
    pub fn recover(gens: &[Generation; 2], slots: BTreeMap<String, u32>) -> Ids {
        let mut ids = Ids { slots, dirty: true, ..Default::default() };
        for g in gens {
            for (k, v) in &g.classes {
                ids.classes.insert(*k, *v);
                ids.next_class = ids.next_class.max(*v);
            }
        }
        ids
    }

    /// Translates a compilation into stable ids. Returns the generation content and the
    /// slots newly given to a rule (their counters must be zeroed before use).
    pub fn assign(&mut self, compiled: &Compiled, live: &Generation) -> Result<(Generation, Vec<u32>), TooManyRules> {
        // The slots the compiled rules already have; the ids this compilation does not use.
        let index: HashMap<&str, usize> = compiled.rule_ids.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
        let mut slot_of: Vec<Option<u32>> = vec![None; compiled.rule_ids.len()];
        let mut unused = Vec::new();
        for (id, slot) in &self.slots {
            match index.get(id.as_str()) {
                Some(&i) => slot_of[i] = Some(*slot),
                None => unused.push((id.clone(), *slot)),
            }
        }
        // Forget ids that neither the live generation nor this compilation uses.
        if !unused.is_empty() {
            let live_slots =
                SlotSet::of(live.policy.values().flat_map(|r| r.iter().copied()).filter(|&s| s != common::NO_RULE));
            for (id, slot) in unused {
                if !live_slots.contains(slot) {
                    self.slots.remove(&id);
                    self.dirty = true;
                }
            }
        }
        // New ids take the lowest free slots.
        let mut free = None;
        let mut fresh = Vec::new();
        for (id, slot) in compiled.rule_ids.iter().zip(slot_of.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            *slot = Some(match self.slots.get(id) {
                Some(s) => *s, // an id repeated in the compilation
                None => {
                    let free = free.get_or_insert_with(|| {
                        let used = SlotSet::of(self.slots.values().copied());
                        (0..common::MAX_RULES).filter(move |s| !used.contains(*s))
                    });
                    let s =
                        free.next().ok_or(TooManyRules { rules: compiled.rule_ids.len(), max: common::MAX_RULES })?;
                    self.slots.insert(id.clone(), s);
                    fresh.push(s);
                    s
                }
            });
        }
        let slot_of: Vec<u32> = slot_of.into_iter().map(|s| s.expect("every rule has a slot")).collect();
        self.dirty |= !fresh.is_empty();

        let mut out = Generation::default();
        // Compiler class id -> stable id, by [role][is IPv6][compiler id].
        let mut remap: [[Vec<Option<u32>>; 2]; 2] = Default::default();
        let mut classes = Vec::new();
        for (role, v6, net, cid) in compiled.class_lists() {
            let key = (role, net);
            let stable = match self.classes.get(&key) {
                Some(s) => *s,
                None => {
                    self.next_class += 1;
                    self.classes.insert(key, self.next_class);
                    self.next_class
                }
            };
            let ids = &mut remap[role as usize][usize::from(v6)];
            if ids.len() <= cid as usize {
                ids.resize(cid as usize + 1, None);
            }
            ids[cid as usize] = Some(stable);
            classes.push((key, stable));
        }
        // Sorted, then built in bulk (keys are distinct: one per role and prefix).
        out.classes = classes.into_iter().collect();
        // Every key of `out.classes` is in `self.classes`: equal sizes mean all are in use.
        if self.classes.len() != out.classes.len() {
            self.classes.retain(|k, _| out.classes.contains_key(k) || live.classes.contains_key(k));
        }

        let mapping = Mapping { remap, slot_of };
        let mut policy: Vec<_> = compiled.entries.iter().map(|e| mapping.entry(e)).collect();
        self.last = Some(mapping);
        // Lowest rule index wins on equal keys (the compiler already deduplicated): a stable
        // sort keeps the entries' order among equal keys and `dedup_by` keeps the first.
        // The u128 key orders as the bytes do (big endian), compared faster.
        policy.sort_by_key(|((data, plen), _)| (u128::from_be_bytes(*data), *plen));
        policy.dedup_by(|later, first| later.0 == first.0);
        // Sorted and distinct: the map is built in bulk.
        out.policy = policy.into_iter().collect();
        Ok((out, fresh))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, Policy, PortRange, Rule, RuleDirection};

    fn generation(classes: &[(&str, u32)], policy: &[(u8, u32, u32)]) -> Generation {
        Generation {
            classes: classes.iter().map(|(n, c)| ((Role::Src, n.parse().unwrap()), *c)).collect(),
            policy: policy.iter().map(|&(b, plen, slot)| (([b; 16], plen), [slot, common::NO_RULE])).collect(),
        }
    }

    /// The diff as the obvious lookups compute it, each list in key order.
    fn naive(have: &Generation, want: &Generation) -> Diff {
        Diff {
            class_removes: have.classes.keys().filter(|k| !want.classes.contains_key(k)).copied().collect(),
            class_puts: want
                .classes
                .iter()
                .filter(|(k, v)| have.classes.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect(),
            policy_removes: have.policy.keys().filter(|k| !want.policy.contains_key(k)).copied().collect(),
            policy_puts: want
                .policy
                .iter()
                .filter(|(k, v)| have.policy.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect(),
        }
    }

    #[test]
    fn diff_is_the_difference_in_key_order() {
        let a = generation(
            &[("10.0.0.0/8", 1), ("10.1.0.0/16", 2), ("fd00::/64", 3)],
            &[(1, 90, 0), (2, 90, 1), (4, 96, 2)],
        );
        let b = generation(
            &[("10.1.0.0/16", 5), ("10.2.0.0/16", 6), ("fd00::/64", 3)],
            &[(0, 90, 0), (2, 90, 7), (4, 96, 2), (9, 80, 1)],
        );
        for (have, want) in [(&a, &b), (&b, &a), (&a, &a), (&Generation::default(), &b), (&a, &Generation::default())] {
            let (d, n) = (diff(have, want), naive(have, want));
            assert_eq!(d.class_removes, n.class_removes);
            assert_eq!(d.class_puts, n.class_puts);
            assert_eq!(d.policy_removes, n.policy_removes);
            assert_eq!(d.policy_puts, n.policy_puts);
        }
        assert!(diff(&a, &a).is_empty());
    }

    fn rule(id: &str, from: &str, to: &str, port: u16) -> Rule {
        Rule {
            id: id.into(),
            from: vec![from.parse().unwrap()],
            to: vec![to.parse().unwrap()],
            proto: Some(6),
            ports: vec![PortRange { first: port, last: port }],
            direction: RuleDirection::Both,
        }
    }

    #[test]
    fn assign_keeps_ids_and_marks_slot_changes() {
        let p1 = vec![rule("a", "10.0.0.1/32", "10.1.0.0/24", 80), rule("b", "fd00::1/128", "fd01::/64", 443)];
        let c1 = compile(&Policy::new(p1.clone()).unwrap()).unwrap();
        let mut ids = Ids::recover(&Default::default(), BTreeMap::new());
        let (g1, fresh) = ids.assign(&c1, &Generation::default()).unwrap();
        assert_eq!(fresh.len(), 2);
        assert!(ids.dirty);
        ids.dirty = false;
        assert_eq!(g1.classes.len(), 4);
        assert_eq!(g1.policy.len(), c1.entries.len());

        // Same ids, a port edited: same classes and slots, nothing to persist.
        let mut p2 = p1.clone();
        p2[0].ports = vec![PortRange { first: 8080, last: 8080 }];
        let c2 = compile(&Policy::new(p2).unwrap()).unwrap();
        let (g2, fresh) = ids.assign(&c2, &g1).unwrap();
        assert!(fresh.is_empty() && !ids.dirty);
        assert_eq!(g2.classes, g1.classes);
        let d = diff(&g1, &g2);
        // One key per port for both directions.
        assert_eq!((d.policy_removes.len(), d.policy_puts.len(), d.class_puts.len()), (1, 1, 0));

        // A new rule id: a fresh slot, to be persisted; every entry names a known slot.
        let mut p3 = p1;
        p3.push(rule("c", "10.0.0.2/32", "10.1.0.0/24", 22));
        let c3 = compile(&Policy::new(p3).unwrap()).unwrap();
        let (g3, fresh) = ids.assign(&c3, &g2).unwrap();
        assert_eq!(fresh.len(), 1);
        assert!(ids.dirty);
        let slots: HashSet<u32> = ids.slots.values().copied().collect();
        assert!(g3.policy.values().all(|r| r.iter().all(|s| slots.contains(s))));
        assert_eq!(g3.policy.len(), c3.entries.len());
    }
}
