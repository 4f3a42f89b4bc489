//! A per-CPU, direct-mapped cache in front of the conntrack LRU hash: the verdict of the
//! established flows this CPU saw last, one slot per hash of the packet's own tuple.
//!
//! Why: an LRU hash lookup (hash the 40-byte key, walk the bucket, compare, set the LRU
//! reference bit) is most of an established packet's cost, and a reply pays it twice (the
//! forward tuple misses, the reversed one hits). A per-CPU array lookup is inlined by the
//! verifier into a few instructions, so a hit costs one multiply-fold of the key and five
//! word compares, in either direction.
//!
//! Safety of the verdicts:
//! - A slot is filled only with a verdict conntrack just gave (a current-epoch entry, or
//!   one an allowed new flow just inserted) and is valid only while the policy epoch is the
//!   one it was filled under: any flip sends every flow back through conntrack, where an
//!   older entry is re-judged. So a hit never passes what the live policy would not have
//!   passed through conntrack.
//! - Slots are per CPU and a TC program runs to completion on its CPU with bottom halves
//!   off, so a slot is never read half-written.
//! - A slot is trusted for [`REFRESH_JIFFIES`] only: then the packet takes the conntrack
//!   path again, which keeps an active flow's LRU entry referenced (not evicted as idle)
//!   and its `last_seen_ns` fresh.
//!
//! Counts: a hit counts its packet in the slot (this CPU's, so plain adds); the slot's counts
//! go into the flow's conntrack entry when the slot is refilled, taken by another flow or
//! dropped (`conntrack::fold`), and only into an entry that was there when the slot was
//! filled. The agent's sweep reads what is still in the slots when a flow ends.
//!
//! The map (`wirefence_common::FLOW_CACHE`) is not pinned (the agent only reads it, through
//! the object it loaded): a loaded object has its own, empty at load. Loaded with fewer than [`SLOTS`] entries
//! (bench-policy does, with 1) the out-of-range slots simply miss.

use aya_ebpf::{helpers::bpf_jiffies64, macros::map, maps::PerCpuArray};
use wirefence_common::{slot_count, slot_time, FlowKey, FlowSlot, SLOT_MAX_BYTES};

use crate::conntrack;

/// Slots per CPU (a power of two): 2,048 × 64 bytes = 128 KiB per CPU.
const SLOTS: u32 = 2048;

/// Jiffies a slot is trusted (0.25 s at HZ=1000, 1 s at HZ=250, 2.5 s at HZ=100).
const REFRESH_JIFFIES: u32 = 250;

const _: () = assert!(core::mem::size_of::<FlowSlot>() == 64);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

#[map(name = "WF_FLOW_CACHE")]
static FLOW_CACHE: PerCpuArray<FlowSlot> = PerCpuArray::with_max_entries(SLOTS, 0);

/// The key as five words (its layout is 40 bytes, 8-byte aligned in every holder here).
#[inline(always)]
fn words(key: &FlowKey) -> &[u64; 5] {
    // SAFETY: FlowKey is 40 plain bytes; callers pass keys in 8-byte aligned storage
    // (the stack `Pkt`, a map value); unaligned reads would still be correct on BPF.
    unsafe { &*(key as *const FlowKey as *const [u64; 5]) }
}

#[inline(always)]
fn slot_of(key: &FlowKey) -> u32 {
    let w = words(key);
    let h = (w[0] ^ w[2]).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (w[1] ^ w[3]).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ w[4].wrapping_mul(0x1656_67b1_9e37_79f9);
    (h >> 40) as u32 & (SLOTS - 1)
}

/// Low 32 bits of jiffies (an inlined load on 64-bit JITs).
#[inline(always)]
pub fn jiffies() -> u32 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() as u32 }
}

/// The cached rule of the established flow `key` under `epoch`, if this CPU has one; the
/// packet (`len` bytes) is counted in the slot.
#[inline(always)]
pub fn lookup(key: &FlowKey, epoch: u32, now: u32, len: u32) -> Option<u32> {
    let s = FLOW_CACHE.get_ptr_mut(slot_of(key))?;
    // SAFETY: this CPU's slot; nothing else writes it while this program runs.
    let s = unsafe { &mut *s };
    // Both stamps with bit 0 set (a stamp is never ahead of `now`).
    if s.stamp == 0
        || s.epoch != epoch
        || (now | 1).wrapping_sub(s.stamp) >= REFRESH_JIFFIES
        || s.bytes() >= SLOT_MAX_BYTES
    {
        return None;
    }
    let (a, b) = (words(&s.key), words(key));
    if a[0] != b[0] || a[1] != b[1] || a[2] != b[2] || a[3] != b[3] || a[4] != b[4] {
        return None;
    }
    s.counts += slot_count(len);
    Some(s.rule)
}

/// Records that packets with tuple `key` belong to an established flow under `rule` in
/// `epoch` (only after conntrack said so, at coarse time `now_ns`), first folding what the
/// slot counted into its flow's entry; the packet conntrack passed (`len` bytes) is the
/// slot's first count (conntrack leaves cacheable packets to the slot: no atomic adds on
/// that path). A copy loaded with fewer slots (bench-policy's) counts no such packet.
#[inline(always)]
pub fn remember(key: &FlowKey, epoch: u32, rule: u32, now: u32, now_ns: u64, len: u32) {
    let Some(s) = FLOW_CACHE.get_ptr_mut(slot_of(key)) else { return };
    // SAFETY: this CPU's slot; nothing else reads or writes it while this program runs.
    let s = unsafe { &mut *s };
    if s.counts != 0 {
        conntrack::fold(s);
    }
    s.key = *key;
    s.epoch = epoch;
    s.rule = rule;
    s.stamp = now | 1;
    s.since = slot_time(now_ns);
    s.counts = slot_count(len);
}

/// Drops this CPU's slots of the flow `key` in both directions (a FIN or RST ends it, and its
/// closing state is left to conntrack), folding their counts into its entry. Other CPUs'
/// slots of it expire within [`REFRESH_JIFFIES`]; their counts are folded when the slot is
/// reused, and read by the agent meanwhile.
#[inline(never)]
pub fn forget_flow(key: &FlowKey) {
    forget(key);
    let rev = key.reversed();
    forget(&rev);
}

#[inline(always)]
fn forget(key: &FlowKey) {
    if let Some(s) = FLOW_CACHE.get_ptr_mut(slot_of(key)) {
        // SAFETY: this CPU's slot; nothing else reads or writes it while this program runs.
        let s = unsafe { &mut *s };
        // Whichever flow's counts the slot holds: folded into that flow's entry.
        if s.counts != 0 {
            conntrack::fold(s);
            s.counts = 0;
        }
        s.stamp = 0;
    }
}
