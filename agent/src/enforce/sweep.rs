//! The conntrack sweep: deletes the entries whose lifetime ran out (the programs delete an
//! expired entry only when a packet finds it) and recounts the per-source quota counters
//! from what stays. It changes no configuration: it removes what the programs would ignore
//! anyway and corrects counts the programs keep without atomic updates.
//!
//! Time is the programs' clock: `bpf_ktime_get_coarse_ns` is CLOCK_MONOTONIC_COARSE.

use std::borrow::BorrowMut;
use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use wirefence_common::{self as common, CtConfig, FlowKey, FlowValue};

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries deleted because their lifetime ran out.
    pub expired: usize,
    /// Entries left.
    pub live: usize,
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
    let [ct, quota] = ebpf.maps_disjoint_mut([common::CONNTRACK, common::CT_QUOTA]);
    let mut ct: BpfHashMap<&mut MapData, FlowKey, FlowValue> =
        BpfHashMap::try_from(ct.ok_or(missing(common::CONNTRACK))?).map_err(on(common::CONNTRACK))?;
    let mut quota: BpfHashMap<&mut MapData, [u8; 16], u64> =
        BpfHashMap::try_from(quota.ok_or(missing(common::CT_QUOTA))?).map_err(on(common::CT_QUOTA))?;
    sweep(&mut ct, &mut quota, &config, now)
}

/// Deletes the entries of `conntrack` expired at `now` and rewrites `quota` with the count
/// of live quota-counted entries per source.
pub fn sweep<C, Q>(
    conntrack: &mut BpfHashMap<C, FlowKey, FlowValue>,
    quota: &mut BpfHashMap<Q, [u8; 16], u64>,
    config: &CtConfig,
    now: u64,
) -> Result<SweepStats, SweepError>
where
    C: BorrowMut<MapData>,
    Q: BorrowMut<MapData>,
{
    let mut stats = SweepStats::default();
    let mut counts: HashMap<[u8; 16], u64> = HashMap::new();
    let entries: Vec<(FlowKey, FlowValue)> =
        conntrack.iter().collect::<Result<_, _>>().map_err(on(common::CONNTRACK))?;
    for (key, value) in entries {
        if expired(config, key.proto, &value, now) {
            // Gone already is fine: a packet found it expired first.
            absent(conntrack.remove(&key)).map_err(on(common::CONNTRACK))?;
            stats.expired += 1;
            continue;
        }
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
