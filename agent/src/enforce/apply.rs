//! Writing generations: a full apply (a whole compilation, by difference with what the
//! standby generation holds), a change (only the keys it touches, plus those the standby
//! generation missed), and the standby's catch-up after a flip.
//!
//! Grace period: a packet reads the state word once and then looks up the generation it
//! named; after a flip, packets that read the old word may still be inside the old
//! generation. TC programs run under RCU (softirq or BH-disabled sections), so once an RCU
//! grace period has passed after the flip none is. `membarrier(MEMBARRIER_CMD_GLOBAL)` waits
//! for one (`synchronize_rcu`); writing the standby generation before that could show such
//! a packet half a policy. Hence [`Enforcer::settle`] before any write to it.

use std::collections::{BTreeSet, HashMap};

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, MapData, PerCpuArray};
use ipnet::IpNet;
use wirefence_common as common;

use super::writer::{self, diff, Diff};
use super::{map_err, ApplyStats, EnforceError, Enforcer};
use crate::bpf::typed_mut;
use crate::policy::{Compiled, Editable, EntryChange, Role};

impl Enforcer {
    /// Fills the inactive generation with `compiled`, then makes it live.
    pub fn apply(&mut self, compiled: &Compiled, digest: u64) -> Result<ApplyStats, EnforceError> {
        let state = self.state()?;
        let live = if state.initialized == 0 { 1 } else { state.generation() };
        let target = live ^ 1;
        let (want, fresh) = self.ids.assign(compiled, &self.gens[live as usize])?;
        let d = diff(&self.gens[target as usize], &want);
        self.settle()?;
        // Counters of slots newly given to a rule start from zero (unless known to be).
        let dirty: Vec<u32> = fresh.iter().copied().filter(|s| !self.zero_slots[*s as usize]).collect();
        self.reset_counters(&dirty)?;
        for s in fresh {
            self.zero_slots[s as usize] = false;
        }
        self.write_diff(target, &d)?;
        self.gens[target as usize] = want;
        self.write_lens_if(target, &d)?;
        self.persist_slots()?;
        let epoch = self.flip(state, target)?;
        self.behind[target as usize] = Some(BTreeSet::new());
        // Whatever the old live generation lacks, a full comparison finds it.
        self.behind[live as usize] = None;
        self.applied = Some(digest);
        Ok(ApplyStats { epoch, map_writes: d.len() + 1, counter_resets: dirty.len() })
    }

    /// Whether the live generation already holds exactly `compiled` (an agent restarted
    /// on the policy the previous one applied). If so, adopts it as applied under `digest`
    /// with its numbering, so a later change builds on it; changes nothing in the maps.
    pub fn holds(&mut self, compiled: &Compiled, digest: u64) -> Result<bool, EnforceError> {
        let state = self.state()?;
        if state.initialized == 0 {
            return Ok(false);
        }
        let live = &self.gens[state.generation() as usize];
        // On a copy: a policy that differs must not leave slots assigned (their counters
        // would skip the reset a real apply gives them).
        let mut ids = self.ids.clone();
        let (want, fresh) = ids.assign(compiled, live)?;
        if !fresh.is_empty() || !diff(live, &want).is_empty() {
            return Ok(false);
        }
        self.ids = ids;
        self.applied = Some(digest);
        Ok(true)
    }

    /// Makes `ed`'s policy live after `change` (the result of [`Editable::replace`] on the
    /// editable whose compilation this enforcer last applied): writes only the changed keys
    /// and those the standby generation missed. Falls back to [`Enforcer::apply`] for a full
    /// change or when there is nothing to build on.
    pub fn apply_change(
        &mut self,
        ed: &Editable,
        change: &EntryChange,
        digest: u64,
    ) -> Result<ApplyStats, EnforceError> {
        let state = self.state()?;
        let changes = match self.ids.translate(change) {
            Some(c) if state.initialized != 0 => c,
            _ => return self.apply(ed.compiled(), digest),
        };
        let live = state.generation();
        let target = live ^ 1;
        let changed: HashMap<_, _> = changes.into_iter().collect();
        let d = match &self.behind[target as usize] {
            None => {
                let mut want = self.gens[live as usize].clone();
                for (k, v) in &changed {
                    match v {
                        Some(v) => want.policy.insert(*k, *v),
                        None => want.policy.remove(k),
                    };
                }
                diff(&self.gens[target as usize], &want)
            }
            Some(missed) => {
                let live_gen = &self.gens[live as usize];
                let keys: BTreeSet<_> = missed.iter().chain(changed.keys()).copied().collect();
                let want = |k: &(common::PolicyData, u32)| {
                    changed.get(k).copied().unwrap_or_else(|| live_gen.policy.get(k).copied())
                };
                self.keyed_diff(target, keys.iter(), want)
            }
        };
        self.settle()?;
        self.write_diff(target, &d)?;
        self.gens[target as usize].apply(&d);
        self.write_lens_if(target, &d)?;
        let epoch = self.flip(state, target)?;
        self.behind[target as usize] = Some(BTreeSet::new());
        if let Some(b) = &mut self.behind[live as usize] {
            b.extend(changed.keys().copied());
        }
        self.applied = Some(digest);
        Ok(ApplyStats { epoch, map_writes: d.len() + 1, counter_resets: 0 })
    }

    /// Brings the standby generation up to date with the live one (after a grace period),
    /// so the next change writes only itself. The daemon runs it after each apply, off the
    /// apply's path; returns the map operations written.
    pub fn sync_standby(&mut self) -> Result<usize, EnforceError> {
        let state = self.state()?;
        if state.initialized == 0 {
            return Ok(0);
        }
        let live = state.generation();
        let standby = live ^ 1;
        let d = match &self.behind[standby as usize] {
            Some(b) if b.is_empty() => return Ok(0),
            None => diff(&self.gens[standby as usize], &self.gens[live as usize]),
            Some(missed) => {
                let live_gen = &self.gens[live as usize];
                self.keyed_diff(standby, missed.iter(), |k: &(common::PolicyData, u32)| live_gen.policy.get(k).copied())
            }
        };
        self.settle()?;
        self.write_diff(standby, &d)?;
        self.gens[standby as usize].apply(&d);
        self.write_lens_if(standby, &d)?;
        self.behind[standby as usize] = Some(BTreeSet::new());
        Ok(d.len())
    }

    /// The policy operations turning generation `target` into `want` on `keys` (sorted).
    fn keyed_diff<'k>(
        &self,
        target: u8,
        keys: impl Iterator<Item = &'k (common::PolicyData, u32)>,
        want: impl Fn(&(common::PolicyData, u32)) -> Option<[u32; 2]>,
    ) -> Diff {
        let have = &self.gens[target as usize].policy;
        let mut d = Diff::default();
        for k in keys {
            match (have.get(k), want(k)) {
                (Some(_), None) => d.policy_removes.push(*k),
                (h, Some(w)) if h != Some(&w) => d.policy_puts.push((*k, w)),
                _ => {}
            }
        }
        d
    }

    /// Waits, if a flip happened since the last wait, until no packet can still be reading
    /// the generation that was live before it (see the module docs).
    fn settle(&mut self) -> Result<(), EnforceError> {
        if !self.grace_due {
            return Ok(());
        }
        if !crate::sys::membarrier_global() {
            // nohz_full kernels refuse it: a TC program runs for microseconds; 20 ms is a
            // wide margin, though not the kernel's guarantee.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.grace_due = false;
        Ok(())
    }

    fn reset_counters(&mut self, fresh: &[u32]) -> Result<(), EnforceError> {
        if !fresh.is_empty() {
            let ncpus = aya::util::nr_cpus().map_err(|(_, source)| EnforceError::State {
                path: "/sys/devices/system/cpu/possible".into(),
                source,
            })?;
            let mut counters: PerCpuArray<&mut MapData, common::Counter> =
                typed_mut(&mut self.ebpf, common::RULE_COUNTERS)?;
            let zeros = vec![common::Counter::default(); fresh.len() * ncpus];
            let done = writer::update_batch(&counters, fresh, &zeros);
            for slot in &fresh[done..] {
                let zero = aya::maps::PerCpuValues::try_from(vec![common::Counter::default(); ncpus])
                    .map_err(|e| EnforceError::State { path: "per-cpu values".into(), source: e })?;
                counters.set(*slot, zero, 0).map_err(map_err(common::RULE_COUNTERS))?;
            }
        }
        Ok(())
    }

    /// Persists the slot table before the flip, so `status` never names a rule wrongly
    /// (when it changed: an edit that keeps every rule id keeps every slot).
    fn persist_slots(&mut self) -> Result<(), EnforceError> {
        if self.ids.dirty {
            let json = serde_json::to_vec(&self.ids.slots).expect("serializable");
            crate::durable::write_atomic(&self.slots_file, &json, 0o600)
                .map_err(|source| EnforceError::State { path: self.slots_file.clone(), source })?;
            self.ids.dirty = false;
        }
        Ok(())
    }

    /// The flip: one array element; packets read it once.
    fn flip(&mut self, state: common::PolicyState, target: u8) -> Result<u32, EnforceError> {
        let epoch = if state.initialized == 0 { target as u32 } else { state.epoch.wrapping_add(1) };
        debug_assert_eq!(epoch & 1, target as u32);
        let mut arr: Array<&mut MapData, common::PolicyState> = typed_mut(&mut self.ebpf, common::STATE)?;
        arr.set(0, common::PolicyState { epoch, initialized: 1 }, 0).map_err(map_err(common::STATE))?;
        self.grace_due = true;
        Ok(epoch)
    }

    /// Writes `d` into generation `target` (not live: order only matters for capacity, so
    /// removals go first).
    fn write_diff(&mut self, target: u8, d: &Diff) -> Result<(), EnforceError> {
        for (role, net) in &d.class_removes {
            self.class_op(target, *role, *net, None)?;
        }
        {
            let mut policy = self.policy_map()?;
            for (data, plen) in &d.policy_removes {
                let mut k = *data;
                k[0] = target;
                match policy.remove(&Key::new(*plen, k)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(common::POLICY)(e)),
                }
            }
        }
        // Insertions go in batches (one bpf(2) call per batch); what a batch did not write
        // (an error, or a kernel without batch operations) goes one by one, reporting errors.
        self.class_puts(target, &d.class_puts)?;
        {
            let keys: Vec<Key<common::PolicyData>> = d
                .policy_puts
                .iter()
                .map(|((data, plen), _)| {
                    let mut k = *data;
                    k[0] = target;
                    Key::new(*plen, k)
                })
                .collect();
            let values: Vec<common::PolicyValue> =
                d.policy_puts.iter().map(|(_, rules)| common::PolicyValue { rules: *rules }).collect();
            let mut policy = self.policy_map()?;
            let done = writer::update_batch(&policy, &keys, &values);
            for (k, v) in keys[done..].iter().zip(&values[done..]) {
                policy.insert(k, v, 0).map_err(map_err(common::POLICY))?;
            }
        }
        Ok(())
    }

    /// Class-map insertions into generation `generation`: one batch per map, then single
    /// inserts for anything a batch did not write.
    fn class_puts(&mut self, generation: u8, puts: &[((Role, IpNet), u32)]) -> Result<(), EnforceError> {
        let maps = [
            (Role::Src, false, common::SRC_V4),
            (Role::Dst, false, common::DST_V4),
            (Role::Src, true, common::SRC_V6),
            (Role::Dst, true, common::DST_V6),
        ];
        for (role, v6, name) in maps {
            let mine: Vec<(IpNet, u32)> = puts
                .iter()
                .filter(|((r, n), _)| *r == role && matches!(n, IpNet::V6(_)) == v6)
                .map(|((_, n), c)| (*n, *c))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let values: Vec<common::ClassValue> = mine.iter().map(|(_, c)| common::ClassValue { class: *c }).collect();
            let plen = |n: &IpNet| 8 + u32::from(n.prefix_len());
            let done = match v6 {
                false => {
                    let keys: Vec<Key<common::ClassDataV4>> = mine
                        .iter()
                        .filter_map(|(n, _)| match n {
                            IpNet::V4(a) => {
                                Some(Key::new(plen(n), common::class_data_v4(generation, a.network().octets())))
                            }
                            IpNet::V6(_) => None,
                        })
                        .collect();
                    let t = self.class_map::<common::ClassDataV4>(name)?;
                    writer::update_batch(&t, &keys, &values)
                }
                true => {
                    let keys: Vec<Key<common::ClassDataV6>> = mine
                        .iter()
                        .filter_map(|(n, _)| match n {
                            IpNet::V6(a) => {
                                Some(Key::new(plen(n), common::class_data_v6(generation, a.network().octets())))
                            }
                            IpNet::V4(_) => None,
                        })
                        .collect();
                    let t = self.class_map::<common::ClassDataV6>(name)?;
                    writer::update_batch(&t, &keys, &values)
                }
            };
            for (net, class) in &mine[done..] {
                self.class_op(generation, role, *net, Some(*class))?;
            }
        }
        Ok(())
    }

    /// After `d` was written into `generation` (and recorded in `self.gens`): its class maps'
    /// prefix lengths, if `d` changed class entries.
    fn write_lens_if(&mut self, generation: u8, d: &Diff) -> Result<(), EnforceError> {
        if d.class_puts.is_empty() && d.class_removes.is_empty() {
            return Ok(());
        }
        self.write_lens(generation)
    }

    /// Writes the prefix lengths `self.gens` records for `generation`'s four class maps
    /// (`CLASS_LENS`, which the programs probe by). Before a flip makes the generation live.
    pub(super) fn write_lens(&mut self, generation: u8) -> Result<(), EnforceError> {
        let mut lens = [[common::ClassLens::default(); 2]; 2];
        for (role, net) in self.gens[generation as usize].classes.keys() {
            lens[usize::from(*role == Role::Dst)][usize::from(matches!(net, IpNet::V6(_)))].set(net.prefix_len());
        }
        let mut arr: Array<&mut MapData, common::ClassLens> = typed_mut(&mut self.ebpf, common::CLASS_LENS)?;
        for dst in [false, true] {
            for v6 in [false, true] {
                let i = common::class_lens_index(generation, dst, v6);
                arr.set(i, lens[usize::from(dst)][usize::from(v6)], 0).map_err(map_err(common::CLASS_LENS))?;
            }
        }
        Ok(())
    }

    fn class_op(&mut self, generation: u8, role: Role, net: IpNet, class: Option<u32>) -> Result<(), EnforceError> {
        let name = match (role, &net) {
            (Role::Src, IpNet::V4(_)) => common::SRC_V4,
            (Role::Dst, IpNet::V4(_)) => common::DST_V4,
            (Role::Src, IpNet::V6(_)) => common::SRC_V6,
            (Role::Dst, IpNet::V6(_)) => common::DST_V6,
        };
        let plen = 8 + net.prefix_len() as u32;
        let result = match net {
            IpNet::V4(n) => {
                let mut t = self.class_map::<common::ClassDataV4>(name)?;
                let key = Key::new(plen, common::class_data_v4(generation, n.network().octets()));
                match class {
                    Some(c) => t.insert(key, common::ClassValue { class: c }, 0),
                    None => t.remove(&key),
                }
            }
            IpNet::V6(n) => {
                let mut t = self.class_map::<common::ClassDataV6>(name)?;
                let key = Key::new(plen, common::class_data_v6(generation, n.network().octets()));
                match class {
                    Some(c) => t.insert(key, common::ClassValue { class: c }, 0),
                    None => t.remove(&key),
                }
            }
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(name)(e)),
        }
    }
}
