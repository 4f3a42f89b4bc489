//! Read-only inspection of an interface's pinned policy state, for `status`: the pinned
//! maps it needs are opened by path; no object is loaded, no map, pin or state file is
//! written, so it never races a running agent filling a generation. It works whatever
//! build made the pins (the state and counter maps keep their layout across builds; a map
//! that does not is an error naming it) and says when that build is another one.

use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray};
use wirefence_common as common;

use super::{
    build_file, map_err, pin_dir, read_counters, read_slots, recorded_build, slots_file, Counters, EnforceError,
};
use crate::model::IfName;

/// What the pins of one interface hold.
#[derive(Debug)]
pub struct Inspection {
    pub state: common::PolicyState,
    pub counters: Counters,
    /// The MSS limits the programs clamp to (`CT_CONFIG`).
    pub mss: common::MssClamp,
    /// The build that made the pins, when it is not this one ("not recorded" if unknown).
    pub other_build: Option<String>,
}

fn pinned(dir: &Path, name: &'static str) -> Result<Map, EnforceError> {
    Ok(crate::bpf::from_pin(&super::pin_path(dir, name), name)?)
}

/// What is pinned for an interface.
#[derive(Debug)]
pub enum Pins {
    /// No policy state: nothing is enforced (or was ever loaded) on the interface.
    Absent,
    /// An agent is loading the programs: it creates and pins the maps one after another
    /// (a large map can take seconds on a busy host), and these are not there yet.
    Loading {
        missing: Vec<&'static str>,
    },
    Ready(Inspection),
}

/// The maps inspection reads.
const READ: [&str; 4] = [common::STATE, common::RULE_COUNTERS, common::STATS, common::CT_CONFIG];

/// The interface's pinned policy state.
pub fn inspect(pin_root: &Path, ifname: &IfName, state_dir: &Path) -> Result<Pins, EnforceError> {
    let dir = pin_dir(pin_root, ifname);
    if !dir.join(common::STATE).exists() {
        return Ok(Pins::Absent);
    }
    let missing: Vec<&'static str> = READ.into_iter().filter(|name| !dir.join(name).exists()).collect();
    if !missing.is_empty() {
        return Ok(Pins::Loading { missing });
    }
    let state: Array<MapData, common::PolicyState> =
        Array::try_from(pinned(&dir, common::STATE)?).map_err(map_err(common::STATE))?;
    let state = state.get(&0, 0).map_err(map_err(common::STATE))?;
    let rules: PerCpuArray<MapData, common::Counter> =
        PerCpuArray::try_from(pinned(&dir, common::RULE_COUNTERS)?).map_err(map_err(common::RULE_COUNTERS))?;
    let stats: PerCpuArray<MapData, common::Counter> =
        PerCpuArray::try_from(pinned(&dir, common::STATS)?).map_err(map_err(common::STATS))?;
    let counters = read_counters(&rules, &stats, &read_slots(&slots_file(state_dir, ifname)))?;
    let config: Array<MapData, common::CtConfig> =
        Array::try_from(pinned(&dir, common::CT_CONFIG)?).map_err(map_err(common::CT_CONFIG))?;
    let mss = config.get(&0, 0).map_err(map_err(common::CT_CONFIG))?.mss_clamp;
    let found = recorded_build(&build_file(state_dir, ifname))?;
    let other_build = (found != crate::bpf::object_id()).then_some(found);
    Ok(Pins::Ready(Inspection { state, counters, mss, other_build }))
}
