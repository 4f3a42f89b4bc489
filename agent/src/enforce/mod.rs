//! Policy enforcement on the tunnel device: the eBPF programs attached to it and the maps
//! they read, pinned under `<pin_dir>/<ifname>/` so they outlive the agent.
//!
//! A (re)started agent loads the object with every map pinned by name: existing pins are
//! reused (the live policy, conntrack and counters stay), missing ones are created and
//! pinned. Attachment is checked on the device itself; an agent finding its programs there
//! attaches nothing (no second copy).

mod attach;
pub mod denies;
pub mod writer;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, IterableMap, MapData, PerCpuArray};
use ipnet::IpNet;
use wirefence_common as common;

use crate::model::IfName;
use crate::policy::Compiled;
use crate::policy::Role;
pub use attach::AttachMode;
pub use denies::DenyRecord;
use writer::{diff, Generation, Ids};

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("eBPF object for {ifname}: {source}")]
    Load { ifname: IfName, source: Box<aya::EbpfError> },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("link of {name}: {source}")]
    Link { name: &'static str, source: Box<aya::programs::links::LinkError> },
    #[error("filters on {ifname}: {source}")]
    Query { ifname: IfName, source: std::io::Error },
    #[error("clsact qdisc on {ifname}: {source}")]
    Qdisc { ifname: IfName, source: Box<aya::programs::TcError> },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: Box<aya::maps::MapError> },
    #[error("map {name} missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("pin {path}: {source}")]
    Pin { path: PathBuf, source: std::io::Error },
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("policy state file {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    TooManyRules(#[from] writer::TooManyRules),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforceError {
    move |e| EnforceError::Map { name, source: Box::new(e) }
}

/// What one policy apply did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyStats {
    pub epoch: u32,
    pub map_writes: usize,
}

/// Packets and bytes, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-rule counters and global statistics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    pub rules: BTreeMap<String, Count>,
    pub stats: BTreeMap<&'static str, Count>,
}

pub struct Enforcer {
    dir: PathBuf,
    ebpf: aya::Ebpf,
    gens: [Generation; 2],
    ids: Ids,
    slots_file: PathBuf,
    /// Digest of the policy this enforcer made live (not known after a restart).
    applied: Option<u64>,
}

/// The pin directory of one interface.
pub fn pin_dir(root: &Path, ifname: &IfName) -> PathBuf {
    root.join(ifname.as_str())
}

impl Enforcer {
    /// Loads the programs with every map pinned under the interface's pin directory
    /// (adopting existing pins) and reads back what the policy maps hold. Attaches nothing.
    /// `state_dir` keeps the rule-id -> counter-slot table.
    pub fn open(pin_root: &Path, ifname: &IfName, l3_offset: u32, state_dir: &Path) -> Result<Enforcer, EnforceError> {
        attach::ensure_bpffs(pin_root)?;
        let dir = pin_dir(pin_root, ifname);
        std::fs::create_dir_all(&dir).map_err(|source| EnforceError::Pin { path: dir.clone(), source })?;
        let paths: Vec<(&'static str, PathBuf)> = common::MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        let mut loader = aya::EbpfLoader::new();
        loader.override_global(common::GLOBAL_L3_OFFSET, &l3_offset, true);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader
            .load(crate::bpf::object())
            .map_err(|e| EnforceError::Load { ifname: ifname.clone(), source: Box::new(e) })?;
        let slots_file = state_dir.join(format!("{ifname}.policy-slots.json"));
        let slots: BTreeMap<String, u32> = match std::fs::read(&slots_file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        let mut e = Enforcer { dir, ebpf, gens: Default::default(), ids: Ids::default(), slots_file, applied: None };
        e.gens = [e.read_generation(0)?, e.read_generation(1)?];
        e.ids = Ids::recover(&e.gens, slots);
        Ok(e)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn trie<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, common::ClassValue>, EnforceError> {
        let map = self.ebpf.map_mut(name).ok_or(EnforceError::MissingMap { name })?;
        LpmTrie::try_from(map).map_err(map_err(name))
    }

    fn policy_map(&mut self) -> Result<LpmTrie<&mut MapData, common::PolicyData, common::PolicyValue>, EnforceError> {
        let map = self.ebpf.map_mut(common::POLICY).ok_or(EnforceError::MissingMap { name: common::POLICY })?;
        LpmTrie::try_from(map).map_err(map_err(common::POLICY))
    }

    pub fn state(&self) -> Result<common::PolicyState, EnforceError> {
        let map = self.ebpf.map(common::STATE).ok_or(EnforceError::MissingMap { name: common::STATE })?;
        let arr: Array<&MapData, common::PolicyState> = Array::try_from(map).map_err(map_err(common::STATE))?;
        arr.get(&0, 0).map_err(map_err(common::STATE))
    }

    fn read_generation(&mut self, generation: u8) -> Result<Generation, EnforceError> {
        let mut g = Generation::default();
        for (name, role) in [(common::SRC_V4, Role::Src), (common::DST_V4, Role::Dst)] {
            let trie = self.trie::<common::ClassDataV4>(name)?;
            for item in trie.iter() {
                let (k, v) = item.map_err(map_err(name))?;
                let d = k.data();
                if d[0] != generation {
                    continue;
                }
                if let Ok(net) = IpNet::new([d[1], d[2], d[3], d[4]].into(), (k.prefix_len() - 8) as u8) {
                    g.classes.insert((role, net), v.class);
                }
            }
        }
        for (name, role) in [(common::SRC_V6, Role::Src), (common::DST_V6, Role::Dst)] {
            let trie = self.trie::<common::ClassDataV6>(name)?;
            for item in trie.iter() {
                let (k, v) = item.map_err(map_err(name))?;
                let d = k.data();
                if d[0] != generation {
                    continue;
                }
                let mut a = [0u8; 16];
                a.copy_from_slice(&d[1..17]);
                if let Ok(net) = IpNet::new(a.into(), (k.prefix_len() - 8) as u8) {
                    g.classes.insert((role, net), v.class);
                }
            }
        }
        let policy = self.policy_map()?;
        for item in policy.iter() {
            let (k, v) = item.map_err(map_err(common::POLICY))?;
            let mut d = k.data();
            if d[0] != generation {
                continue;
            }
            d[0] = 0;
            g.policy.insert((d, k.prefix_len()), v.rules);
        }
        Ok(g)
    }

    pub fn applied(&self) -> Option<u64> {
        self.applied
    }

    /// Fills the inactive generation with `compiled`, then makes it live.
    pub fn apply(&mut self, compiled: &Compiled, digest: u64) -> Result<ApplyStats, EnforceError> {
        let state = self.state()?;
        let live = if state.initialized == 0 { 1 } else { state.generation() };
        let target = live ^ 1;
        let (want, fresh) = self.ids.assign(compiled, &self.gens[live as usize])?;
        let d = diff(&self.gens[target as usize], &want);
        let writes = d.len();

        // Counters of slots newly given to a rule start from zero.
        if !fresh.is_empty() {
            let ncpus = aya::util::nr_cpus().map_err(|(_, source)| EnforceError::State {
                path: "/sys/devices/system/cpu/possible".into(),
                source,
            })?;
            let map = self
                .ebpf
                .map_mut(common::RULE_COUNTERS)
                .ok_or(EnforceError::MissingMap { name: common::RULE_COUNTERS })?;
            let mut counters: PerCpuArray<&mut MapData, common::Counter> =
                PerCpuArray::try_from(map).map_err(map_err(common::RULE_COUNTERS))?;
            let zeros = vec![common::Counter::default(); fresh.len() * ncpus];
            let done = writer::update_batch(counters.map().fd().as_fd(), &fresh, &zeros, ncpus);
            for slot in &fresh[done..] {
                let zero = aya::maps::PerCpuValues::try_from(vec![common::Counter::default(); ncpus])
                    .map_err(|e| EnforceError::State { path: "per-cpu values".into(), source: e })?;
                counters.set(*slot, zero, 0).map_err(map_err(common::RULE_COUNTERS))?;
            }
        }

        // Removals first: the generation is not live, so order only matters for capacity.
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
            let done = writer::update_batch(policy.map().fd().as_fd(), &keys, &values, 1);
            for (k, v) in keys[done..].iter().zip(&values[done..]) {
                policy.insert(k, v, 0).map_err(map_err(common::POLICY))?;
            }
        }
        self.gens[target as usize] = want;

        // Persist the slot table before the flip, so `status` never names a rule wrongly
        // (when it changed: an edit that keeps every rule id keeps every slot).
        if self.ids.dirty {
            let json = serde_json::to_vec(&self.ids.slots).expect("serializable");
            std::fs::write(&self.slots_file, json)
                .map_err(|source| EnforceError::State { path: self.slots_file.clone(), source })?;
            self.ids.dirty = false;
        }

        // The flip: one array element; packets read it once.
        let epoch = if state.initialized == 0 { target as u32 } else { state.epoch.wrapping_add(1) };
        debug_assert_eq!(epoch & 1, target as u32);
        let map = self.ebpf.map_mut(common::STATE).ok_or(EnforceError::MissingMap { name: common::STATE })?;
        let mut arr: Array<&mut MapData, common::PolicyState> = Array::try_from(map).map_err(map_err(common::STATE))?;
        arr.set(0, common::PolicyState { epoch, initialized: 1 }, 0).map_err(map_err(common::STATE))?;
        self.applied = Some(digest);
        Ok(ApplyStats { epoch, map_writes: writes + 1 })
    }

    /// Class-trie insertions into generation `generation`: one batch per trie, then single
    /// inserts for anything a batch did not write.
    fn class_puts(&mut self, generation: u8, puts: &[((Role, IpNet), u32)]) -> Result<(), EnforceError> {
        let tries = [
            (Role::Src, false, common::SRC_V4),
            (Role::Dst, false, common::DST_V4),
            (Role::Src, true, common::SRC_V6),
            (Role::Dst, true, common::DST_V6),
        ];
        for (role, v6, name) in tries {
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
                    let t = self.trie::<common::ClassDataV4>(name)?;
                    writer::update_batch(t.map().fd().as_fd(), &keys, &values, 1)
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
                    let t = self.trie::<common::ClassDataV6>(name)?;
                    writer::update_batch(t.map().fd().as_fd(), &keys, &values, 1)
                }
            };
            for (net, class) in &mine[done..] {
                self.class_op(generation, role, *net, Some(*class))?;
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
                let mut t = self.trie::<common::ClassDataV4>(name)?;
                let key = Key::new(plen, common::class_data_v4(generation, n.network().octets()));
                match class {
                    Some(c) => t.insert(&key, common::ClassValue { class: c }, 0),
                    None => t.remove(&key),
                }
            }
            IpNet::V6(n) => {
                let mut t = self.trie::<common::ClassDataV6>(name)?;
                let key = Key::new(plen, common::class_data_v6(generation, n.network().octets()));
                match class {
                    Some(c) => t.insert(&key, common::ClassValue { class: c }, 0),
                    None => t.remove(&key),
                }
            }
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Per-rule counters by rule id, and the global statistics.
    pub fn counters(&self) -> Result<Counters, EnforceError> {
        let sum = |v: &aya::maps::PerCpuValues<common::Counter>| {
            v.iter().fold(Count::default(), |a, c| Count { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
        };
        let map =
            self.ebpf.map(common::RULE_COUNTERS).ok_or(EnforceError::MissingMap { name: common::RULE_COUNTERS })?;
        let rc: PerCpuArray<&MapData, common::Counter> =
            PerCpuArray::try_from(map).map_err(map_err(common::RULE_COUNTERS))?;
        let mut out = Counters::default();
        for (id, slot) in &self.ids.slots {
            out.rules.insert(id.clone(), sum(&rc.get(slot, 0).map_err(map_err(common::RULE_COUNTERS))?));
        }
        let map = self.ebpf.map(common::STATS).ok_or(EnforceError::MissingMap { name: common::STATS })?;
        let st: PerCpuArray<&MapData, common::Counter> = PerCpuArray::try_from(map).map_err(map_err(common::STATS))?;
        use common::stat::*;
        for (name, i) in [
            ("allowed_new", ALLOWED_NEW),
            ("allowed_established", ALLOWED_ESTABLISHED),
            ("denied", DENIED),
            ("malformed", MALFORMED),
            ("uninitialized", UNINITIALIZED),
            ("events_lost", EVENTS_LOST),
            ("fragments", FRAGMENTS),
            ("not_ip", NOT_IP),
        ] {
            out.stats.insert(name, sum(&st.get(&i, 0).map_err(map_err(common::STATS))?));
        }
        Ok(out)
    }

    /// Whether both programs are attached to the interface (device `index`).
    pub fn attached(&self, ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
        attached_elsewhere(ifname, index)
    }

    /// Attaches both programs (replacing a defunct attachment), pinning tcx links.
    pub fn attach(&mut self, ifname: &IfName, _index: u32) -> Result<AttachMode, EnforceError> {
        attach::attach(&mut self.ebpf, &self.dir, ifname)
    }
}

/// Whether the agent's programs (this one's or a previous agent's) are on the device, as the
/// kernel lists them: tcx programs by name, or the cls_bpf filters at the agent's priority
/// and handle.
pub fn attached_elsewhere(ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
    match attach::mode() {
        AttachMode::Tcx => attach::attached_tcx(ifname),
        AttachMode::Clsact => attach::attached_clsact(ifname, index),
    }
}

/// Detaches and unpins everything under the interface's pin directory.
pub fn remove(pin_root: &Path, ifname: &IfName) -> Result<(), EnforceError> {
    attach::remove(&pin_dir(pin_root, ifname), ifname)
}
