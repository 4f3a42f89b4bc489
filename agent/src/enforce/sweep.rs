//! The conntrack sweep: deletes the entries whose lifetime ran out (the programs delete an
//! expired entry only when a packet finds it) and recounts the per-source quota counters
//! from what stays. It changes no configuration: it removes what the programs would ignore
//! anyway and corrects counts the programs keep without atomic updates.
//!
//! An allowed flow's entry expiring is its end: the sweep hands back each such flow with
//! what it carried, the entry's counts plus what the flow cache counted and has not folded
//! into it yet ([`Unfolded`]), for the flow records.
//!
//! Time is the programs' clock: `bpf_ktime_get_coarse_ns` is CLOCK_MONOTONIC_COARSE.

use std::borrow::BorrowMut;
use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use wirefence_common::{self as common, CtConfig, FlowKey, FlowSlot, FlowValue};

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("reading CLOCK_MONOTONIC_COARSE: {0}")]
    Clock(#[source] std::io::Error),
    #[error("conntrack map {name}: {source}")]
    Map { name: &'static str, source: Box<MapError> },
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
}

fn on(name: &'static str) -> impl Fn(MapError) -> SweepError {
    move |e| SweepError::Map { name, source: Box::new(e) }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries deleted because their lifetime ran out.
    pub expired: usize,
    /// Entries left.
    pub live: usize,
    /// The flows of the expired entries.
    pub ended: Vec<EndedFlow>,
}

/// An allowed flow whose conntrack entry expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndedFlow {
    /// The tuple of its first packet.
    pub first: FlowKey,
    /// The counter slot of the rule that allowed it last.
    pub rule: u32,
    /// When its first packet passed, on the programs' clock.
    pub first_seen_ns: u64,
    /// Packets and bytes, both directions.
    pub packets: u64,
    pub bytes: u64,
}

/// What the flow cache's slots (every CPU's) counted and have not folded into conntrack,
/// by the tuple the slot holds.
#[derive(Debug, Default)]
pub struct Unfolded(HashMap<FlowKey, Vec<FlowSlot>>);

impl Unfolded {
    /// The slots of a loaded object's flow cache that hold counts.
    pub fn read(cache: &PerCpuArray<&MapData, FlowSlot>) -> Result<Unfolded, MapError> {
        let mut by_key: HashMap<FlowKey, Vec<FlowSlot>> = HashMap::new();
        for i in 0..cache.len() {
            for slot in cache.get(&i, 0)?.iter() {
                if slot.counts != 0 {
                    by_key.entry(slot.key).or_default().push(*slot);
                }
            }
        }
        Ok(Unfolded(by_key))
    }

    /// Packets and bytes the slots hold for the flow of entry `key` (canonical) first seen
    /// at `first_seen_ns`: slots of either orientation, filled while the entry was there.
    pub fn of(&self, key: &FlowKey, first_seen_ns: u64) -> (u64, u64) {
        let reversed = key.reversed();
        [key, &reversed]
            .into_iter()
            .filter_map(|k| self.0.get(k))
            .flatten()
            .filter(|s| s.counts_for(first_seen_ns))
            .fold((0, 0), |(p, b), s| (p + s.packets(), b + s.bytes()))
    }
}

/// Now on the programs' clock, in ns.
pub fn now_ns() -> Result<u64, SweepError> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return Err(SweepError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Whether `v` (an entry of protocol `proto`) has outlived its state's lifetime at `now`.
pub fn expired(config: &CtConfig, proto: u8, v: &FlowValue, now: u64) -> bool {
    // Signed, as in the programs: a stamp newer than `now` is not old.
    (now as i64 - v.last_seen_ns as i64) > config.timeout_ns(proto, v.state) as i64
}

/// [`sweep`] on the maps of a loaded object, with its configured lifetimes (`CT_CONFIG`)
/// at the programs' now.
pub fn sweep_object(ebpf: &mut aya::Ebpf) -> Result<SweepStats, SweepError> {
    let missing = |name| SweepError::Missing { name };
    let config: Array<&MapData, CtConfig> =
        Array::try_from(ebpf.map(common::CT_CONFIG).ok_or(missing(common::CT_CONFIG))?)
            .map_err(on(common::CT_CONFIG))?;
    let config = config.get(&0, 0).map_err(on(common::CT_CONFIG))?;
    let now = now_ns()?;
    let [ct, quota, cache] = ebpf.maps_disjoint_mut([common::CONNTRACK, common::CT_QUOTA, common::FLOW_CACHE]);
    let mut ct: BpfHashMap<&mut MapData, FlowKey, FlowValue> =
        BpfHashMap::try_from(ct.ok_or(missing(common::CONNTRACK))?).map_err(on(common::CONNTRACK))?;
    let mut quota: BpfHashMap<&mut MapData, [u8; 16], u64> =
        BpfHashMap::try_from(quota.ok_or(missing(common::CT_QUOTA))?).map_err(on(common::CT_QUOTA))?;
    let cache = cache.ok_or(missing(common::FLOW_CACHE))?;
    let unfolded = || {
        let cache: PerCpuArray<&MapData, FlowSlot> = PerCpuArray::try_from(&*cache).map_err(on(common::FLOW_CACHE))?;
        Unfolded::read(&cache).map_err(on(common::FLOW_CACHE))
    };
    sweep(&mut ct, &mut quota, &config, now, unfolded)
}

/// Deletes the entries of `conntrack` expired at `now` (their flows, with the counts
/// `unfolded` reads added, are [`SweepStats::ended`]) and rewrites `quota` with the count of
/// live quota-counted entries per source. `unfolded` is called only when some entry expired
/// (a walk of every CPU's flow-cache slots, one call per slot).
pub fn sweep<C, Q>(
    conntrack: &mut BpfHashMap<C, FlowKey, FlowValue>,
    quota: &mut BpfHashMap<Q, [u8; 16], u64>,
    config: &CtConfig,
    now: u64,
    unfolded: impl FnOnce() -> Result<Unfolded, SweepError>,
) -> Result<SweepStats, SweepError>
where
    C: BorrowMut<MapData>,
    Q: BorrowMut<MapData>,
{
    let mut stats = SweepStats::default();
    let mut counts: HashMap<[u8; 16], u64> = HashMap::new();
    let entries: Vec<(FlowKey, FlowValue)> =
        conntrack.iter().collect::<Result<_, _>>().map_err(on(common::CONNTRACK))?;
    let (gone, kept): (Vec<_>, Vec<_>) =
        entries.into_iter().partition(|(key, value)| expired(config, key.proto, value, now));
    let unfolded = if gone.is_empty() { Unfolded::default() } else { unfolded()? };
    for (key, value) in gone {
        // Gone already is fine: a packet found it expired first.
        absent(conntrack.remove(&key)).map_err(on(common::CONNTRACK))?;
        stats.expired += 1;
        let (packets, bytes) = unfolded.of(&key, value.first_seen_ns);
        stats.ended.push(EndedFlow {
            first: value.first_packet(&key),
            rule: value.rule,
            first_seen_ns: value.first_seen_ns,
            packets: value.packets + packets,
            bytes: value.bytes + bytes,
        });
    }
    for (key, value) in kept {
        stats.live += 1;
        if value.flags & common::FLOW_QUOTA_COUNTED != 0 {
            let source = value.first_packet(&key).src;
            *counts.entry(common::quota_key(&source)).or_default() += 1;
        }
    }
    let sources: Vec<[u8; 16]> = quota.keys().collect::<Result<_, _>>().map_err(on(common::CT_QUOTA))?;
    for source in sources {
        if !counts.contains_key(&source) {
            absent(quota.remove(&source)).map_err(on(common::CT_QUOTA))?;
        }
    }
    for (source, n) in counts {
        quota.insert(source, n, 0).map_err(on(common::CT_QUOTA))?;
    }
    Ok(stats)
}

/// A delete's result, with "no such key" (ENOENT) as success.
fn absent(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}
