//! Migrations of a pinned map from another build's layout to this build's: the entries of
//! the old map (its pin moved aside by [`super::takeover`]) are read in their layout,
//! converted and written into this build's map. Only maps whose content must survive an
//! upgrade and whose layouts are known have one; anything else is an error naming the map
//! and the versions (policy is never dropped in silence).
//!
//! Conntrack, the one so far: its entries are what keeps established connections up across
//! an upgrade. Every known layout is read (1, 2, 4 and 5: each build knows the others, so
//! an upgrade and a downgrade between them both carry the flows over) into this build's. A
//! layout without counts (1, 2) gives an entry counted from the migration on, first seen
//! when it was last seen.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use wirefence_common as common;
use wirefence_common::layout::{CONNTRACK_V1, CONNTRACK_V2, CONNTRACK_V4, CONNTRACK_V5};
use wirefence_common::{FlowKey, FlowValue};

use super::{map_err, EnforceError};

/// Map update flag: create only, leave an existing entry as it is (`linux/bpf.h`).
const BPF_NOEXIST: u64 = 1;

/// [`FlowValue`] in conntrack layouts 1 and 2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlowValueV2 {
    epoch: u32,
    rule: u32,
    last_seen_ns: u64,
    state: u32,
    flags: u32,
}

/// [`FlowValue`] in conntrack layout 4: first seen, packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlowValueV4 {
    v2: FlowValueV2,
    first_seen_ns: u64,
    packets: u64,
    bytes: u64,
}

/// [`FlowValue`] in conntrack layout 5 (the `next-layout` test build): one more word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlowValueV5 {
    v4: FlowValueV4,
    next: u64,
}

// SAFETY: #[repr(C)], padding-free (4+4+8+4+4, then whole u64s), every bit pattern valid.
unsafe impl aya::Pod for FlowValueV2 {}
// SAFETY: as FlowValueV2, plus u64s.
unsafe impl aya::Pod for FlowValueV4 {}
// SAFETY: as FlowValueV4, plus a u64.
unsafe impl aya::Pod for FlowValueV5 {}

impl From<FlowValueV2> for FlowValueV4 {
    fn from(v2: FlowValueV2) -> FlowValueV4 {
        FlowValueV4 { first_seen_ns: v2.last_seen_ns, v2, packets: 0, bytes: 0 }
    }
}

/// Whether map `name` can be migrated from layout version `from` to `to`.
pub fn supported(name: &str, from: u32, to: u32) -> bool {
    let known = [CONNTRACK_V1, CONNTRACK_V2, CONNTRACK_V4, CONNTRACK_V5];
    name == common::CONNTRACK && known.contains(&from) && known.contains(&to) && to != CONNTRACK_V1
}

/// Copies the entries of the map pinned at `old` (layout version `from`) into `new`, this
/// build's map `name`. Entries `new` holds already win (the running programs made them);
/// returns how many were written.
pub fn run(name: &'static str, old: &Path, from: u32, new: &mut Map) -> Result<usize, EnforceError> {
    debug_assert_eq!(name, common::CONNTRACK, "only conntrack has migrations");
    let old = crate::bpf::from_pin(old, name)?;
    let entries: Vec<(FlowKey, FlowValueV4)> = match from {
        CONNTRACK_V5 => read::<FlowValueV5>(name, old)?.into_iter().map(|(k, v)| (k, v.v4)).collect(),
        CONNTRACK_V4 => read::<FlowValueV4>(name, old)?,
        CONNTRACK_V1 => read::<FlowValueV2>(name, old)?.into_iter().map(|(k, v)| canonical(k, v)).collect(),
        _ => read::<FlowValueV2>(name, old)?.into_iter().map(|(k, v)| (k, v.into())).collect(),
    };
    let mut new: HashMap<&mut MapData, FlowKey, FlowValue> = HashMap::try_from(new).map_err(map_err(name))?;
    let mut written = 0;
    for (key, v) in entries {
        let value = FlowValue {
            epoch: v.v2.epoch,
            rule: v.v2.rule,
            last_seen_ns: v.v2.last_seen_ns,
            state: v.v2.state,
            flags: v.v2.flags,
            first_seen_ns: v.first_seen_ns,
            packets: v.packets,
            bytes: v.bytes,
            #[cfg(feature = "next-layout")]
            next: 0,
        };
        match new.insert(key, value, BPF_NOEXIST) {
            Ok(()) => written += 1,
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(written)
}

fn read<V: aya::Pod>(name: &'static str, old: Map) -> Result<Vec<(FlowKey, V)>, EnforceError> {
    let old: HashMap<MapData, FlowKey, V> = HashMap::try_from(old).map_err(map_err(name))?;
    let mut out = Vec::new();
    for item in old.iter() {
        match item {
            Ok(kv) => out.push(kv),
            // An entry deleted (expired) between the walk's steps: nothing to carry.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(out)
}

/// A layout-1 entry (keyed by its flow's first packet) under its canonical key, marked
/// [`common::FLOW_SWAPPED`] when that key is the reversal. Entries already canonical (a
/// build between the two layouts recorded as layout 1) stay as they are.
fn canonical(key: FlowKey, value: FlowValueV2) -> (FlowKey, FlowValueV4) {
    let (canon, swapped) = key.canonical();
    let mut value = FlowValueV4::from(value);
    if swapped {
        value.v2.flags |= common::FLOW_SWAPPED;
    }
    (canon, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_match_the_values_read() {
        assert_eq!(std::mem::size_of::<FlowValueV2>(), 24);
        assert_eq!(std::mem::size_of::<FlowValueV4>(), 48);
        assert_eq!(std::mem::size_of::<FlowValueV5>(), 56);
        let this = common::layout::of(common::CONNTRACK).unwrap();
        assert_eq!(this.value_size as usize, std::mem::size_of::<FlowValue>());
    }

    #[test]
    fn only_conntrack_between_known_layouts_and_never_back_to_the_first() {
        assert!(supported(common::CONNTRACK, CONNTRACK_V1, CONNTRACK_V4));
        assert!(supported(common::CONNTRACK, CONNTRACK_V2, CONNTRACK_V4));
        assert!(supported(common::CONNTRACK, CONNTRACK_V5, CONNTRACK_V4));
        assert!(supported(common::CONNTRACK, CONNTRACK_V4, CONNTRACK_V5));
        assert!(!supported(common::CONNTRACK, CONNTRACK_V2, CONNTRACK_V1));
        assert!(!supported(common::CONNTRACK, 3, CONNTRACK_V4), "the old builds' stand-in, never shipped");
        assert!(!supported(common::CONNTRACK, 9, CONNTRACK_V4));
        assert!(!supported(common::POLICY, 1, 2));
    }

    #[test]
    fn first_packet_keys_become_canonical_and_canonical_ones_stay() {
        let key =
            FlowKey { src: [9; 16], dst: [1; 16], sport: 40000, dport: 443, proto: 6, direction: 1, _pad: [0; 2] };
        let old = FlowValueV2 { flags: common::FLOW_QUOTA_COUNTED, last_seen_ns: 77, ..Default::default() };
        let (k, v) = canonical(key, old);
        assert_eq!(k, key.reversed());
        assert_eq!(v.v2.flags, common::FLOW_QUOTA_COUNTED | common::FLOW_SWAPPED);
        assert_eq!((v.first_seen_ns, v.packets, v.bytes), (77, 0, 0), "counted from the migration on");
        let (again, v2) = canonical(k, v.v2);
        assert_eq!((again, v2.v2.flags), (k, v.v2.flags), "idempotent");
    }
}
