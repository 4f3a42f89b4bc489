//! What each pinned map holds, per build: a layout version per map (bumped whenever the
//! map's keys, values or their meaning change) with its key and value sizes. The agent
//! records the layouts beside the build it pinned, so a later build taking the pins over
//! knows which maps it can reuse as they are and which it must migrate (see the agent's
//! `enforce::takeover`).

use core::mem::size_of;

use crate::*;

/// One map's layout: its name, version and key and value sizes in bytes (0 for a ring
/// buffer, which has neither).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub version: u32,
    pub key_size: u32,
    pub value_size: u32,
}

const fn layout<K, V>(name: &'static str, version: u32) -> MapLayout {
    MapLayout { name, version, key_size: size_of::<K>() as u32, value_size: size_of::<V>() as u32 }
}

/// [`CONNTRACK`]'s layout versions: 1, keyed by each flow's first packet (looked up by the
/// tuple and its reversal); 2, keyed by the canonical tuple ([`FlowKey::canonical`], with
/// [`FLOW_SWAPPED`]); 4, as 2 with the flow's first-seen time and its packet and byte
/// counts; 5, as 4 with [`FlowValue`] grown by a word, built only with the `next-layout`
/// feature (a stand-in for a future build, so the upgrade tests run a real migration).
/// 3 was that stand-in in the builds before counts: skipped, so that those builds refuse
/// the counting layout by its number instead of reading it as their stand-in's.
pub const CONNTRACK_V1: u32 = 1;
pub const CONNTRACK_V2: u32 = 2;
pub const CONNTRACK_V4: u32 = 4;
pub const CONNTRACK_V5: u32 = 5;

#[cfg(not(feature = "next-layout"))]
const CONNTRACK_VERSION: u32 = CONNTRACK_V4;
#[cfg(feature = "next-layout")]
const CONNTRACK_VERSION: u32 = CONNTRACK_V5;

/// This build's layouts, one per pinned map, in [`MAPS`] order.
pub const LAYOUTS: [MapLayout; 17] = [
    layout::<u32, PolicyState>(STATE, 1),
    layout::<[u32; 3], ClassValue>(SRC_V4, 1),
    layout::<[u32; 3], ClassValue>(DST_V4, 1),
    layout::<[u64; 3], ClassValue>(SRC_V6, 1),
    layout::<[u64; 3], ClassValue>(DST_V6, 1),
    layout::<u32, ClassLens>(CLASS_LENS, 1),
    // An LPM key: a u32 prefix length, then the data.
    MapLayout { name: POLICY, version: 1, key_size: 4 + size_of::<PolicyData>() as u32, value_size: 8 },
    layout::<FlowKey, FlowValue>(CONNTRACK, CONNTRACK_VERSION),
    layout::<u32, Counter>(RULE_COUNTERS, 1),
    layout::<u32, Counter>(STATS, 1),
    MapLayout { name: EVENTS, version: 1, key_size: 0, value_size: 0 },
    layout::<u32, EventBudget>(EVENT_BUDGET, 1),
    layout::<u32, CtConfig>(CT_CONFIG, 1),
    layout::<[u8; 16], u64>(CT_QUOTA, 1),
    layout::<u32, trace::TraceFilter>(TRACE, 1),
    MapLayout { name: TRACE_EVENTS, version: 1, key_size: 0, value_size: 0 },
    layout::<u32, u32>(TRACE_ARMED, 1),
];

/// This build's layout of map `name`.
pub fn of(name: &str) -> Option<&'static MapLayout> {
    LAYOUTS.iter().find(|l| l.name.as_bytes() == name.as_bytes())
}

/// Maps whose content is only in transit (the event rings, the events' rate budget and the
/// trace's filter and switch): a build finding them in another layout starts them afresh
/// instead of migrating them.
pub fn transient(name: &str) -> bool {
    [EVENTS, EVENT_BUDGET, TRACE, TRACE_EVENTS, TRACE_ARMED].contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_layout_per_pinned_map_in_order() {
        for (l, name) in LAYOUTS.iter().zip(MAPS) {
            assert_eq!(l.name, name);
        }
        assert_eq!(of(POLICY).map(|l| (l.key_size, l.value_size)), Some((20, 8)));
        assert_eq!(of(SRC_V6).map(|l| l.key_size), Some(24));
    }
}
