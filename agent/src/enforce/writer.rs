//! Writes a compiled policy into the maps: fill the inactive generation (by difference with
//! what it holds), then flip the epoch. Class ids and rule slots are kept stable across
//! compiles so a one-rule change is a handful of map writes, not a rewrite.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipnet::IpNet;
use wirefence_common as common;

use crate::policy::{Compiled, Role};

/// One generation's content, as the writer last wrote (or read back) it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    /// (role, prefix) -> class id.
    pub classes: BTreeMap<(Role, IpNet), u32>,
    /// (policy data with generation byte 0, prefix length) -> rule slot.
    pub policy: BTreeMap<(common::PolicyData, u32), u32>,
}

/// The map operations that turn one generation's content into another's.
#[derive(Debug, Default)]
pub struct Diff {
    pub class_removes: Vec<(Role, IpNet)>,
    pub class_puts: Vec<((Role, IpNet), u32)>,
    pub policy_removes: Vec<(common::PolicyData, u32)>,
    pub policy_puts: Vec<((common::PolicyData, u32), u32)>,
}

impl Diff {
    pub fn len(&self) -> usize {
        self.class_removes.len() + self.class_puts.len() + self.policy_removes.len() + self.policy_puts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn diff(have: &Generation, want: &Generation) -> Diff {
    let mut d = Diff::default();
    for (k, v) in &have.classes {
        if !want.classes.contains_key(k) {
            d.class_removes.push(*k);
        } else if want.classes[k] != *v {
            d.class_puts.push((*k, want.classes[k]));
        }
    }
    for (k, v) in &want.classes {
        if !have.classes.contains_key(k) {
            d.class_puts.push((*k, *v));
        }
    }
    for (k, v) in &have.policy {
        match want.policy.get(k) {
            None => d.policy_removes.push(*k),
            Some(w) if w != v => d.policy_puts.push((*k, *w)),
            Some(_) => {}
        }
    }
    for (k, v) in &want.policy {
        if !have.policy.contains_key(k) {
            d.policy_puts.push((*k, *v));
        }
    }
    d
}

/// Stable numbering: a prefix keeps its class id, a rule id keeps its counter slot, for as
/// long as either generation uses them.
#[derive(Debug, Default)]
pub struct Ids {
    classes: HashMap<(Role, IpNet), u32>,
    next_class: u32,
    pub slots: BTreeMap<String, u32>,
}

#[derive(Debug, thiserror::Error)]
#[error("policy has {rules} rules; at most {max} fit the counter map")]
pub struct TooManyRules {
    pub rules: usize,
    pub max: u32,
}

impl Ids {
    /// Rebuilds the numbering from what the maps hold and the saved slots.
    pub fn recover(gens: &[Generation; 2], slots: BTreeMap<String, u32>) -> Ids {
        let mut ids = Ids { slots, ..Default::default() };
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
        // Forget ids that neither the live generation nor this compilation uses.
        let wanted: HashSet<&str> = compiled.rule_ids.iter().map(|s| s.as_str()).collect();
        let live_slots: HashSet<u32> = live.policy.values().copied().collect();
        self.slots.retain(|id, slot| wanted.contains(id.as_str()) || live_slots.contains(slot));
        let used: HashSet<u32> = self.slots.values().copied().collect();
        let mut free = (0..common::MAX_RULES).filter(|s| !used.contains(s));
        let mut fresh = Vec::new();
        let mut slot_of = Vec::with_capacity(compiled.rule_ids.len());
        for id in &compiled.rule_ids {
            let slot = match self.slots.get(id) {
                Some(s) => *s,
                None => {
                    let s =
                        free.next().ok_or(TooManyRules { rules: compiled.rule_ids.len(), max: common::MAX_RULES })?;
                    self.slots.insert(id.clone(), s);
                    fresh.push(s);
                    s
                }
            };
            slot_of.push(slot);
        }

        let live_classes: HashSet<&(Role, IpNet)> = live.classes.keys().collect();
        let mut compiled_keys = HashSet::new();
        let mut out = Generation::default();
        // Compiler class id (per role and family) -> stable id.
        let mut remap: HashMap<(Role, bool, u32), u32> = HashMap::new();
        let lists = compiled.class_lists();
        for (role, v6, net, cid) in lists {
            let key = (role, net);
            compiled_keys.insert(key);
            let stable = match self.classes.get(&key) {
                Some(s) => *s,
                None => {
                    self.next_class += 1;
                    self.classes.insert(key, self.next_class);
                    self.next_class
                }
            };
            remap.insert((role, v6, cid), stable);
            out.classes.insert(key, stable);
        }
        self.classes.retain(|k, _| compiled_keys.contains(k) || live_classes.contains(k));

        for e in &compiled.entries {
            let mut data = e.data;
            data[0] = 0;
            let v6 = e.v6;
            let src = u32::from_be_bytes([data[2], data[3], data[4], data[5]]);
            let dst = u32::from_be_bytes([data[6], data[7], data[8], data[9]]);
            let map = |role, c: u32| if c == 0 { 0 } else { remap[&(role, v6, c)] };
            data[2..6].copy_from_slice(&map(Role::Src, src).to_be_bytes());
            data[6..10].copy_from_slice(&map(Role::Dst, dst).to_be_bytes());
            let slot = slot_of[e.rule as usize];
            // Lowest rule index wins on equal keys: the compiler already deduplicated.
            out.policy.entry((data, e.prefixlen)).or_insert(slot);
        }
        Ok((out, fresh))
    }
}
