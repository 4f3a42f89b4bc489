//! A per-CPU, direct-mapped cache in front of the policy lookup: the deciding rule (or
//! `NO_RULE`) of the (source, destination, protocol, policy port, direction) this CPU judged
//! last, one slot per hash of them, under one policy epoch.
//!
//! Why: a new flow's policy decision (two class probes and the policy LPM walk) is about a
//! quarter of its in-place cost, and new flows come in runs that share everything the
//! policy looks at but the source port: a client's connection pool, a resolver's queries,
//! a poller. Those flows' decisions are one lookup in a slot already in this CPU's cache.
//!
//! Safety of the verdicts: the decision is a function of the slot's key and of the live
//! generation's maps, and the agent never writes the live generation: it writes the other
//! one and flips the epoch (`Enforcer::apply`), so a slot of an older epoch is a miss. The
//! key holds every input of the lookup (addresses, protocol, port or none, direction,
//! family), so a hit is exactly what the lookup would have said. Slots are per CPU and a TC
//! program runs to completion on its CPU with bottom halves off, so none is read
//! half-written.
//!
//! The map (`wirefence_common::VERDICT_CACHE`) is not pinned: each loaded object has its
//! own, empty at load. Slot 0 is never used, so a copy loaded with one entry (bench-policy
//! does, to measure the lookup itself) never hits.

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// Slots per CPU (a power of two): 512 × 48 bytes = 24 KiB per CPU.
const SLOTS: u32 = 512;

#[repr(C, align(8))]
pub struct Slot {
    src: [u64; 2],
    dst: [u64; 2],
    /// The decision's `meta` (see `policy::wf_policy_rule`: port, protocol, direction,
    /// family, port known, epoch); 0, never a valid `meta`, in an empty slot.
    meta: u64,
    rule: u32,
    _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Slot>() == 48);

#[map(name = "WF_VERDICT_CACHE")]
static VERDICT_CACHE: PerCpuArray<Slot> = PerCpuArray::with_max_entries(SLOTS + 1, 0);

#[inline(always)]
fn slot_of(src: &[u64; 2], dst: &[u64; 2], meta: u64) -> u32 {
    let h = (src[0] ^ dst[0]).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (src[1] ^ dst[1].rotate_left(32)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ meta.wrapping_mul(0x1656_67b1_9e37_79f9);
    1 + ((h >> 40) as u32 & (SLOTS - 1))
}

/// The rule (or `NO_RULE`) this CPU's cache holds for the addresses `src`, `dst` (memory
/// order words) under `meta`.
#[inline(always)]
pub fn lookup(src: &[u64; 2], dst: &[u64; 2], meta: u64) -> Option<u32> {
    let s = VERDICT_CACHE.get_ptr(slot_of(src, dst, meta))?;
    // SAFETY: this CPU's slot; nothing else writes it while this program runs.
    let s = unsafe { &*s };
    if s.meta != meta || s.src[0] != src[0] || s.src[1] != src[1] || s.dst[0] != dst[0] || s.dst[1] != dst[1] {
        return None;
    }
    Some(s.rule)
}

/// Records the policy's decision `rule` for `src`, `dst` under `meta`.
#[inline(always)]
pub fn remember(src: &[u64; 2], dst: &[u64; 2], meta: u64, rule: u32) {
    let Some(s) = VERDICT_CACHE.get_ptr_mut(slot_of(src, dst, meta)) else { return };
    // SAFETY: this CPU's slot; nothing else reads or writes it while this program runs.
    let s = unsafe { &mut *s };
    s.src = *src;
    s.dst = *dst;
    s.meta = meta;
    s.rule = rule;
}
