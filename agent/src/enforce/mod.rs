//! Policy enforcement on the tunnel device: the eBPF programs attached to it and the maps
//! they read, pinned under `<pin_dir>/<ifname>/` so they outlive the agent.
//!
//! A (re)started agent loads the object with every map pinned by name: existing pins are
//! reused (the live policy, conntrack and counters stay), missing ones are created and
//! pinned. Attachment is checked on the device itself; an agent finding its programs there
//! attaches nothing (no second copy). Pins another build left are taken over in place
//! ([`takeover`]): maps reused or migrated, the programs on the device replaced atomically.

mod apply;
mod attach;
pub mod bpffs;
pub mod clamp;
pub mod denies;
pub mod flowlog;
pub mod flows;
pub mod inspect;
mod migrate;
pub mod record;
pub mod sweep;
pub mod takeover;
pub mod trace;
pub mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use ipnet::IpNet;
use wirefence_common as common;

use crate::bpf::{typed, typed_mut, ObjectMapError};
use crate::model::IfName;
use crate::policy::Role;
pub use attach::AttachMode;
pub use denies::DenyRecord;
pub(crate) use record::{build_file, recorded_build};
use writer::{Generation, Ids};

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
    #[error(transparent)]
    Map(#[from] ObjectMapError),
    #[error("program {name} missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("pin {path}: {source}")]
    Pin { path: PathBuf, source: std::io::Error },
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    /// A pin directory another user owns or can write in: pins there could be planted or
    /// unlinked, so none is loaded from it.
    #[error("pin directory: {0}")]
    UnsafePins(#[from] crate::perms::UnsafePath),
    #[error("policy state file {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not on a bpffs; the agent does not mount one (a bpffs it mounted could be private to its \
         mount namespace, and its pins would vanish with it): mount the host's (systemd mounts /sys/fs/bpf \
         at boot; by hand: `mount -t bpf bpf /sys/fs/bpf`) and point policy.pin_dir into it"
    )]
    NoBpffs { path: PathBuf },
    #[error(
        "the bpffs at {path} is not the host's: {why}. Pins made there would vanish with this mount \
         namespace while the programs they hold kept enforcing, and the next agent would load a second copy; \
         run the agent in the host's mount namespace, or bind the host's /sys/fs/bpf into its own (systemd: \
         BindPaths=/sys/fs/bpf or ReadWritePaths=/sys/fs/bpf, with no bpffs mounted over it)"
    )]
    NotHostBpffs { path: PathBuf, why: String },
    #[error(
        "programs and maps are pinned for {ifname} but no build recorded them ({file} is missing): their \
         layouts are unknown, so nothing is taken over (the attached programs keep enforcing their last \
         policy); run `wirefence-agent down` and start again to replace them"
    )]
    NotRecorded { ifname: IfName, file: PathBuf },
    #[error(
        "map {map} pinned for {ifname} by build {build} has layout {found}; this build's is {ours} and it \
         knows no migration between them, so nothing is taken over (the attached programs keep enforcing \
         their last policy); start a build that knows that layout, or run `wirefence-agent down` to start \
         afresh (dropping the pinned state)"
    )]
    UnknownLayout { ifname: IfName, map: &'static str, build: String, found: String, ours: String },
    #[error(
        "the map pinned at {path} has keys of {} and values of {} bytes, not the {} and {} its build \
         record says: not adopted", found.0, found.1, ours.0, ours.1
    )]
    PinnedShape { path: PathBuf, found: (u32, u32), ours: (u32, u32) },
    #[error(transparent)]
    TooManyRules(#[from] writer::TooManyRules),
    #[error(transparent)]
    Sweep(#[from] sweep::SweepError),
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforceError {
    move |e| EnforceError::Map(ObjectMapError::on(name)(e))
}

/// What one policy apply did.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyStats {
    pub epoch: u32,
    /// Class-map and policy-map operations, plus the flip.
    pub map_writes: usize,
    /// Rule counters zeroed for rules new to their slot.
    pub counter_resets: usize,
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
    /// Per generation, the policy keys where it may differ from the live one (`None`:
    /// unknown, compare everything). The live generation's is empty.
    behind: [Option<BTreeSet<(common::PolicyData, u32)>>; 2],
    /// A flip happened since the last RCU grace period: packets may still be reading the
    /// generation that was live before it (see `apply.rs`).
    grace_due: bool,
    /// Counter slots known to hold zeros (a counter map this enforcer created, slots never
    /// used since): a new rule there needs no reset.
    zero_slots: Vec<bool>,
}

/// The pin directory of one interface.
pub fn pin_dir(root: &Path, ifname: &IfName) -> PathBuf {
    root.join(ifname.as_str())
}

/// Where map `name` is pinned in an interface's pin directory `dir`.
pub fn pin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(common::pin_name(name))
}

/// Every pinned map of the object with its pin in `dir`, as a loader takes them.
pub fn pin_paths(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    common::MAPS.iter().map(|m| (*m, pin_path(dir, m))).collect()
}

impl Enforcer {
    /// Loads the programs with every map pinned under the interface's pin directory
    /// (adopting existing pins) and reads back what the policy maps hold. Attaches nothing.
    /// `state_dir` keeps the rule-id -> counter-slot table.
    pub fn open(pin_root: &Path, ifname: &IfName, l3_offset: u32, state_dir: &Path) -> Result<Enforcer, EnforceError> {
        bpffs::check_host_bpffs(pin_root)?;
        let dir = pin_dir(pin_root, ifname);
        crate::perms::private_dir(&dir)?;
        let build_file = record::build_file(state_dir, ifname);
        let previous = record::read(&build_file)?;
        let plan = takeover::plan(&dir, previous.as_ref(), &build_file, ifname)?;
        takeover::stage(&dir, &plan)?;
        let counters_new = !dir.join(common::RULE_COUNTERS).exists();
        let mut loader = aya::EbpfLoader::new();
        loader.override_global(common::GLOBAL_L3_OFFSET, &l3_offset, true);
        let paths = pin_paths(&dir);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(crate::bpf::object())
            .map_err(|e| EnforceError::Load { ifname: ifname.clone(), source: Box::new(e) })?;
        let mut migrated = takeover::migrate(&mut ebpf, &dir, &plan)?;
        if let Some(previous) = &plan.previous {
            let replaced = attach::replace(&mut ebpf, &dir, ifname)?;
            // Flows the old programs recorded between the copy and the swap.
            migrated += takeover::migrate(&mut ebpf, &dir, &plan)?;
            tracing::info!(%ifname, previous, this = crate::bpf::object_id(), replaced, migrated,
                "took over the pins of another build: programs replaced in place, maps kept or migrated");
        }
        // Last: until here the previous build stays recorded, so a crash retries the takeover.
        record::write(&build_file, &record::BuildRecord::ours())?;
        takeover::finish(&dir)?;
        let slots_file = slots_file(state_dir, ifname);
        let slots = read_slots(&slots_file);
        let mut e = Enforcer {
            dir,
            ebpf,
            gens: Default::default(),
            ids: Ids::default(),
            slots_file,
            applied: None,
            behind: [None, None],
            grace_due: true,
            zero_slots: vec![counters_new; common::MAX_RULES as usize],
        };
        e.gens = [e.read_generation(0)?, e.read_generation(1)?];
        // The prefix lengths follow from the class maps: rewritten from what they hold (the
        // same values, unless an agent stopped between writing a standby generation's classes
        // and its lengths).
        for generation in [0, 1] {
            e.write_lens(generation)?;
        }
        e.ids = Ids::recover(&e.gens, slots);
        Ok(e)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes the conntrack entries whose lifetime ran out and recounts the per-source
    /// quotas ([`sweep`]); the configured lifetimes are the programs' (`CT_CONFIG`). Also
    /// disarms a trace whose tracer died ([`trace::disarm_orphan`]).
    pub fn sweep_conntrack(&mut self) -> Result<sweep::SweepStats, EnforceError> {
        if trace::disarm_orphan(&mut self.ebpf)? {
            tracing::info!(dir = %self.dir.display(), "disarmed the trace of a tracer that is gone");
        }
        Ok(sweep::sweep_object(&mut self.ebpf)?)
    }

    /// Sets the conntrack lifetimes and per-source quota the programs use (zero fields:
    /// the defaults of `wirefence-common`).
    pub fn set_ct_config(&mut self, config: common::CtConfig) -> Result<(), EnforceError> {
        let mut map: Array<&mut MapData, common::CtConfig> = typed_mut(&mut self.ebpf, common::CT_CONFIG)?;
        map.set(0, config, 0).map_err(map_err(common::CT_CONFIG))
    }

    /// The MSS limits the programs clamp to (`CT_CONFIG`).
    pub fn mss(&self) -> Result<common::MssClamp, EnforceError> {
        let map: Array<&MapData, common::CtConfig> = crate::bpf::typed(&self.ebpf, common::CT_CONFIG)?;
        Ok(map.get(&0, 0).map_err(map_err(common::CT_CONFIG))?.mss_clamp)
    }

    /// Sets the MSS limits, keeping the rest of `CT_CONFIG`.
    pub fn set_mss(&mut self, mss: common::MssClamp) -> Result<(), EnforceError> {
        let mut map: Array<&mut MapData, common::CtConfig> = typed_mut(&mut self.ebpf, common::CT_CONFIG)?;
        let config = map.get(&0, 0).map_err(map_err(common::CT_CONFIG))?;
        map.set(0, common::CtConfig { mss_clamp: mss, ..config }, 0).map_err(map_err(common::CT_CONFIG))
    }

    /// A class map: masked prefixes (as LPM-style keys) -> class, in a hash.
    fn class_map<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, Key<K>, common::ClassValue>, EnforceError> {
        Ok(typed_mut(&mut self.ebpf, name)?)
    }

    fn policy_map(&mut self) -> Result<LpmTrie<&mut MapData, common::PolicyData, common::PolicyValue>, EnforceError> {
        Ok(typed_mut(&mut self.ebpf, common::POLICY)?)
    }

    pub fn state(&self) -> Result<common::PolicyState, EnforceError> {
        let arr: Array<&MapData, common::PolicyState> = typed(&self.ebpf, common::STATE)?;
        arr.get(&0, 0).map_err(map_err(common::STATE))
    }

    fn read_generation(&mut self, generation: u8) -> Result<Generation, EnforceError> {
        let mut g = Generation::default();
        for (name, role) in [(common::SRC_V4, Role::Src), (common::DST_V4, Role::Dst)] {
            let map = self.class_map::<common::ClassDataV4>(name)?;
            for item in map.iter() {
                let (k, v) = item.map_err(map_err(name))?;
                let (gen, addr) = common::class_data_v4_parts(&k.data());
                let Some(len) = common::class_prefix_len(k.prefix_len(), false) else { continue };
                if gen == generation {
                    if let Ok(net) = IpNet::new(addr.into(), len) {
                        g.classes.insert((role, net), v.class);
                    }
                }
            }
        }
        for (name, role) in [(common::SRC_V6, Role::Src), (common::DST_V6, Role::Dst)] {
            let map = self.class_map::<common::ClassDataV6>(name)?;
            for item in map.iter() {
                let (k, v) = item.map_err(map_err(name))?;
                let (gen, addr) = common::class_data_v6_parts(&k.data());
                let Some(len) = common::class_prefix_len(k.prefix_len(), true) else { continue };
                if gen == generation {
                    if let Ok(net) = IpNet::new(addr.into(), len) {
                        g.classes.insert((role, net), v.class);
                    }
                }
            }
        }
        let policy = self.policy_map()?;
        for item in policy.iter() {
            let (k, v) = item.map_err(map_err(common::POLICY))?;
            let (gen, data) = common::policy_data_parts(&k.data());
            if gen == generation {
                g.policy.insert((data, k.prefix_len()), v.rules);
            }
        }
        Ok(g)
    }

    pub fn applied(&self) -> Option<u64> {
        self.applied
    }

    /// Per-rule counters by rule id, and the global statistics.
    pub fn counters(&self) -> Result<Counters, EnforceError> {
        let rules = typed(&self.ebpf, common::RULE_COUNTERS)?;
        let stats = typed(&self.ebpf, common::STATS)?;
        read_counters(&rules, &stats, &self.ids.slots)
    }

    /// Whether both programs are attached to the interface (device `index`).
    pub fn attached(&self, ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
        attached_at(&self.dir, ifname, index)
    }

    /// Attaches both programs (replacing a defunct attachment), pinning tcx links.
    pub fn attach(&mut self, ifname: &IfName, index: u32) -> Result<AttachMode, EnforceError> {
        attach::attach(&mut self.ebpf, &self.dir, ifname, index)
    }
}

/// Sums the per-CPU counters: each rule's (by the id -> slot table) and the global statistics.
pub(crate) fn read_counters<T: std::borrow::Borrow<MapData>>(
    rules: &PerCpuArray<T, common::Counter>,
    stats: &PerCpuArray<T, common::Counter>,
    slots: &BTreeMap<String, u32>,
) -> Result<Counters, EnforceError> {
    let sum = |v: &aya::maps::PerCpuValues<common::Counter>| {
        v.iter().fold(Count::default(), |a, c| Count { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
    };
    let mut out = Counters::default();
    for (id, slot) in slots {
        out.rules.insert(id.clone(), sum(&rules.get(slot, 0).map_err(map_err(common::RULE_COUNTERS))?));
    }
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
        ("ct_untracked", CT_UNTRACKED),
    ] {
        out.stats.insert(name, sum(&stats.get(&i, 0).map_err(map_err(common::STATS))?));
    }
    Ok(out)
}

/// Whether the agent's programs (this one's or a previous agent's) are on the device, as the
/// kernel lists them: the tcx links pinned under `pin_root`, or the cls_bpf filters at the
/// agent's priority and handle.
pub fn attached_elsewhere(pin_root: &Path, ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
    attached_at(&pin_dir(pin_root, ifname), ifname, index)
}

/// [`attached_elsewhere`] for the interface's pin directory `dir`.
fn attached_at(dir: &Path, ifname: &IfName, index: u32) -> Result<bool, EnforceError> {
    match attach::mode() {
        AttachMode::Tcx => attach::attached_tcx(dir, ifname, index),
        AttachMode::Clsact => attach::attached_clsact(ifname, index),
    }
}

/// Where the rule-id -> counter-slot table of an interface is saved.
fn slots_file(state_dir: &Path, ifname: &IfName) -> PathBuf {
    state_dir.join(format!("{ifname}.policy-slots.json"))
}

/// The saved rule-id -> counter-slot table. Missing: empty. Unreadable or not a table:
/// empty too, with a warning naming the file; rules then get fresh slots (zeroed before
/// use), so enforcement goes on and only the counters of the running rules restart.
fn read_slots(path: &Path) -> BTreeMap<String, u32> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the rule counter slots; rule counters restart");
            return BTreeMap::new();
        }
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "rule counter slots file is not valid; rule counters restart");
        BTreeMap::new()
    })
}

/// Detaches and unpins everything under the interface's pin directory.
pub fn remove(pin_root: &Path, ifname: &IfName) -> Result<(), EnforceError> {
    attach::remove(&pin_dir(pin_root, ifname), ifname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_file_missing_or_broken_reads_as_empty() {
        let dir = std::env::temp_dir().join(format!("wf-slots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wg0.policy-slots.json");
        assert!(read_slots(&path).is_empty(), "missing");
        std::fs::write(&path, br#"{"web": 3, "ssh": 0}"#).unwrap();
        assert_eq!(read_slots(&path), BTreeMap::from([("web".to_owned(), 3), ("ssh".to_owned(), 0)]));
        for broken in [&b"{\"web\": 3"[..], b"[1, 2]", b"{\"web\": -1}", b""] {
            std::fs::write(&path, broken).unwrap();
            assert!(read_slots(&path).is_empty(), "{:?}", String::from_utf8_lossy(broken));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
