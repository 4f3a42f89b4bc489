//! The eBPF object (the `ebpf/` crate, built by `build.rs` into `OUT_DIR` and embedded in
//! the binary) and a small typed handle on it: its two classifiers and its maps, by the
//! names of `wirefence-common`.
//!
//! [`load`] creates the maps (unpinned) and loads both programs into the kernel (so the
//! verifier has accepted them when it returns), attaching nothing. Enforcement on a device,
//! with pinning, lives in `crate::enforce`; this module is what tests and tools use to
//! exercise the programs directly (e.g. through `BPF_PROG_TEST_RUN`).

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use wirefence_common as common;
use wirefence_common::{
    ClassDataV4, ClassDataV6, ClassLens, ClassValue, Counter, CtConfig, EventBudget, FlowKey, FlowValue, PolicyData,
    PolicyState, PolicyValue,
};

/// The object file as built (`wirefence-ebpf`, for bpfel-unknown-none).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wirefence-ebpf"));

/// The embedded eBPF object; empty if the agent was built with `AYA_BUILD_SKIP=1`.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Names this build's object (FNV-1a of its bytes, hex): pins and attached programs left by
/// an agent with another object are told apart by it.
pub fn object_id() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("this binary was built without its eBPF programs (AYA_BUILD_SKIP was set); rebuild without it")]
    NotBuilt,
    #[error("loading the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: Box<ProgramError> },
    #[error(transparent)]
    Map(#[from] ObjectMapError),
}

/// A map of the object that could not be had or used: the one map error of the agent
/// (the enforcer, inspection, tests and tools all report this one).
#[derive(Debug, thiserror::Error)]
pub enum ObjectMapError {
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: Box<MapError> },
}

impl ObjectMapError {
    /// For `map_err`: an aya error on map `name`.
    pub fn on(name: &'static str) -> impl FnOnce(MapError) -> ObjectMapError {
        move |e| ObjectMapError::Map { name, source: Box::new(e) }
    }
}

/// Map `name` as pinned at `path` (by another process, or an earlier run), without loading
/// any object.
pub fn from_pin(path: &std::path::Path, name: &'static str) -> Result<aya::maps::Map, ObjectMapError> {
    let data = MapData::from_pin(path).map_err(ObjectMapError::on(name))?;
    aya::maps::Map::from_map_data(data).map_err(ObjectMapError::on(name))
}

/// A typed handle (`HashMap`, `Array`, ...) on map `name` of `ebpf`, for writing.
pub fn typed_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, ObjectMapError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(ObjectMapError::Missing { name })?;
    M::try_from(map).map_err(ObjectMapError::on(name))
}

/// A typed handle on map `name` of `ebpf`, for reading.
pub fn typed<'a, M>(ebpf: &'a Ebpf, name: &'static str) -> Result<M, ObjectMapError>
where
    M: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map(name).ok_or(ObjectMapError::Missing { name })?;
    M::try_from(map).map_err(ObjectMapError::on(name))
}

/// Loads the object with `WF_L3_OFFSET = l3_offset` (0 on L3 devices such as WireGuard, 14
/// on Ethernet) and loads the classifiers into the kernel. Maps are created, not pinned.
pub fn load(l3_offset: u32) -> Result<Ebpf, BpfError> {
    if OBJECT.is_empty() {
        return Err(BpfError::NotBuilt);
    }
    let mut ebpf = EbpfLoader::new()
        .override_global(common::GLOBAL_L3_OFFSET, &l3_offset, true)
        .load(OBJECT)
        .map_err(|e| BpfError::Object(Box::new(e)))?;
    for name in [common::PROG_INGRESS, common::PROG_EGRESS, common::PROG_MSS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram { name })?
            .try_into()
            .map_err(|e| BpfError::Program { name, source: Box::new(e) })?;
        prog.load().map_err(|e| BpfError::Program { name, source: Box::new(e) })?;
    }
    Ok(ebpf)
}

/// A loaded object with typed accessors by common's names.
pub struct Programs {
    pub ebpf: Ebpf,
}

impl Programs {
    pub fn load(l3_offset: u32) -> Result<Programs, BpfError> {
        Ok(Programs { ebpf: load(l3_offset)? })
    }

    /// `wf_ingress` or `wf_egress`, by [`common::DIR_INGRESS`] / [`common::DIR_EGRESS`].
    pub fn program(&self, direction: u8) -> Result<&SchedClassifier, BpfError> {
        self.classifier(if direction == common::DIR_INGRESS { common::PROG_INGRESS } else { common::PROG_EGRESS })
    }

    /// `wf_mss`, the clamp alone.
    pub fn mss(&self) -> Result<&SchedClassifier, BpfError> {
        self.classifier(common::PROG_MSS)
    }

    fn classifier(&self, name: &'static str) -> Result<&SchedClassifier, BpfError> {
        self.ebpf
            .program(name)
            .ok_or(BpfError::MissingProgram { name })?
            .try_into()
            .map_err(|e| BpfError::Program { name, source: Box::new(e) })
    }

    fn typed<'a, M>(&'a mut self, name: &'static str) -> Result<M, BpfError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        Ok(typed_mut(&mut self.ebpf, name)?)
    }

    pub fn state(&mut self) -> Result<Array<&mut MapData, PolicyState>, BpfError> {
        self.typed(common::STATE)
    }

    pub fn set_state(&mut self, state: PolicyState) -> Result<(), BpfError> {
        Ok(self.state()?.set(0, state, 0).map_err(ObjectMapError::on(common::STATE))?)
    }

    /// A class map (source or destination, IPv4): masked prefixes as `Key`s, in a hash.
    pub fn src_v4(&mut self) -> Result<HashMap<&mut MapData, Key<ClassDataV4>, ClassValue>, BpfError> {
        self.typed(common::SRC_V4)
    }

    pub fn dst_v4(&mut self) -> Result<HashMap<&mut MapData, Key<ClassDataV4>, ClassValue>, BpfError> {
        self.typed(common::DST_V4)
    }

    pub fn src_v6(&mut self) -> Result<HashMap<&mut MapData, Key<ClassDataV6>, ClassValue>, BpfError> {
        self.typed(common::SRC_V6)
    }

    pub fn dst_v6(&mut self) -> Result<HashMap<&mut MapData, Key<ClassDataV6>, ClassValue>, BpfError> {
        self.typed(common::DST_V6)
    }

    /// The prefix lengths each class map holds, per generation ([`common::class_lens_index`]).
    pub fn class_lens(&mut self) -> Result<Array<&mut MapData, ClassLens>, BpfError> {
        self.typed(common::CLASS_LENS)
    }

    pub fn policy(&mut self) -> Result<LpmTrie<&mut MapData, PolicyData, PolicyValue>, BpfError> {
        self.typed(common::POLICY)
    }

    /// The conntrack hash.
    pub fn conntrack(&mut self) -> Result<HashMap<&mut MapData, FlowKey, FlowValue>, BpfError> {
        self.typed(common::CONNTRACK)
    }

    /// Live conntrack entries per remote source ([`common::quota_key`]).
    pub fn ct_quota(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], u64>, BpfError> {
        self.typed(common::CT_QUOTA)
    }

    /// Deletes expired conntrack entries and recounts the quotas (what the agent does
    /// periodically, see `crate::enforce::sweep`).
    pub fn sweep_conntrack(&mut self) -> Result<crate::enforce::sweep::SweepStats, crate::enforce::sweep::SweepError> {
        crate::enforce::sweep::sweep_object(&mut self.ebpf)
    }

    /// Conntrack lifetimes and quota (a zero field means its default).
    pub fn set_ct_config(&mut self, config: CtConfig) -> Result<(), BpfError> {
        let mut map: Array<&mut MapData, CtConfig> = self.typed(common::CT_CONFIG)?;
        Ok(map.set(0, config, 0).map_err(ObjectMapError::on(common::CT_CONFIG))?)
    }

    pub fn rule_counters(&mut self) -> Result<PerCpuArray<&mut MapData, Counter>, BpfError> {
        self.typed(common::RULE_COUNTERS)
    }

    pub fn stats(&mut self) -> Result<PerCpuArray<&mut MapData, Counter>, BpfError> {
        self.typed(common::STATS)
    }

    pub fn event_budget(&mut self) -> Result<PerCpuArray<&mut MapData, EventBudget>, BpfError> {
        self.typed(common::EVENT_BUDGET)
    }

    pub fn events(&mut self) -> Result<RingBuf<&mut MapData>, BpfError> {
        self.typed(common::EVENTS)
    }

    /// `STATS[index]` summed over CPUs.
    pub fn stat(&mut self, index: u32) -> Result<Counter, BpfError> {
        per_cpu_sum(&self.stats()?, index, common::STATS)
    }

    /// `RULE_COUNTERS[rule]` summed over CPUs.
    pub fn rule_counter(&mut self, rule: u32) -> Result<Counter, BpfError> {
        per_cpu_sum(&self.rule_counters()?, rule, common::RULE_COUNTERS)
    }
}

fn per_cpu_sum(map: &PerCpuArray<&mut MapData, Counter>, index: u32, name: &'static str) -> Result<Counter, BpfError> {
    let values = map.get(&index, 0).map_err(ObjectMapError::on(name))?;
    Ok(values
        .iter()
        .fold(Counter::default(), |a, v| Counter { packets: a.packets + v.packets, bytes: a.bytes + v.bytes }))
}
