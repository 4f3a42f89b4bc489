//! Address -> class: one hash map of masked prefixes per role and family, probed at the
//! prefix lengths the live generation uses (`CLASS_LENS`), longest first; the first hit is
//! the longest matching prefix, whose class the compiler gave every address under it. No
//! hit: class 0. A probe costs one hash lookup whatever the map holds, so the cost follows
//! the number of distinct prefix lengths in the policy (at most 33 / 129, a handful in
//! practice), not the number of rules.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap},
};
use wirefence_common::{self as c, ClassDataV4, ClassDataV6, ClassLens, ClassValue};

// Keys as words, laid out as common's `Key<ClassDataV4>` (12 bytes) / `Key<ClassDataV6>`
// (24 bytes): prefix length (8 + address bits), generation, masked address, zero padding.
// (Assembling them as byte arrays makes LLVM call a byte-loop memset for the zero runs.)
// Not preallocated: the maps are sized for the largest policy, and most stay small.
const _: () = assert!(core::mem::size_of::<Key<ClassDataV4>>() == 12);
const _: () = assert!(core::mem::size_of::<Key<ClassDataV6>>() == 24);
#[map(name = "WF_SRC4")]
static SRC_V4: HashMap<[u32; 3], ClassValue> = HashMap::with_max_entries(c::MAX_CLASS_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "WF_DST4")]
static DST_V4: HashMap<[u32; 3], ClassValue> = HashMap::with_max_entries(c::MAX_CLASS_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "WF_SRC6")]
static SRC_V6: HashMap<[u64; 3], ClassValue> = HashMap::with_max_entries(c::MAX_CLASS_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "WF_DST6")]
static DST_V6: HashMap<[u64; 3], ClassValue> = HashMap::with_max_entries(c::MAX_CLASS_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "WF_CLASS_LENS")]
static CLASS_LENS: Array<ClassLens> = Array::with_max_entries(c::CLASS_LENS_ENTRIES, 0);

/// The class of address `a` (IPv4-mapped unless `v6`; its 16 bytes as two words in memory
/// order) in the source (`dst == false`) or destination map of generation `gen`.
#[inline(always)]
pub fn class_of(dst: bool, v6: bool, gen: u8, a: &[u64; 2]) -> u32 {
    // Wire order -> numbers.
    let (hi, lo) = (u64::from_be(a[0]), u64::from_be(a[1]));
    wf_class_of(dst as u32, v6 as u32, gen as u32, hi, lo)
}

/// [`class_of`] on the address as numbers (`hi`, `lo`: big-endian halves; IPv4 in the low
/// 32 bits of `lo`). A global function (exported, scalar arguments), so the verifier checks
/// it once: as a static subprogram its probe loops would be walked again in every calling
/// context, past the verifier's instruction budget.
#[no_mangle]
#[inline(never)]
pub extern "C" fn wf_class_of(dst: u32, v6: u32, gen: u32, hi: u64, lo: u64) -> u32 {
    let gen = gen as u8 & 1;
    let Some(lens) = CLASS_LENS.get(c::class_lens_index(gen, dst != 0, v6 != 0)) else { return 0 };
    if v6 != 0 {
        let map = if dst != 0 { &DST_V6 } else { &SRC_V6 };
        probe_v6(map, lens, gen, hi, lo)
    } else {
        let map = if dst != 0 { &DST_V4 } else { &SRC_V4 };
        probe_v4(map, lens.bits[0] & ((1 << 33) - 1), gen, lo as u32)
    }
}

/// A word with its top `bits` (0..=64) bits set. Branch-free, as everything in the probe
/// loops: each branch there would multiply the states the verifier walks per probe. (Two
/// shifts, each by at most 32: a shift by 64 is undefined in BPF.)
#[inline(always)]
fn top_mask(bits: u32) -> u64 {
    let half = bits >> 1;
    !((u64::MAX >> half) >> (bits - half))
}

/// The highest set bit of `bits` (not 0), cleared; its index. Branch-free (smear the bits
/// below it, count them): a `leading_zeros` becomes branches the verifier would explore per
/// probe of every loop.
#[inline(always)]
fn pop_highest(bits: &mut u64) -> u32 {
    let mut v = *bits;
    v |= v >> 1;
    v |= v >> 2;
    v |= v >> 4;
    v |= v >> 8;
    v |= v >> 16;
    v |= v >> 32;
    // v = 2^(top + 1) - 1: its population count is top + 1.
    v -= (v >> 1) & 0x5555_5555_5555_5555;
    v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
    v = (v + (v >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    let top = (v.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32 - 1;
    *bits &= !(1u64 << (top & 63));
    top & 63
}

#[inline(always)]
fn probe_v4(map: &HashMap<[u32; 3], ClassValue>, mut lens: u64, gen: u8, addr: u32) -> u32 {
    let mut probes = 0;
    while lens != 0 && probes < 33 {
        let len = pop_highest(&mut lens);
        let b = (addr & (top_mask(len) >> 32) as u32).to_be_bytes();
        let key = [8 + len, u32::from_le_bytes([gen, b[0], b[1], b[2]]), b[3] as u32];
        // SAFETY: a hash map value pointer, read at once.
        if let Some(v) = unsafe { map.get(&key) } {
            return v.class;
        }
        probes += 1;
    }
    0
}

/// Probes the lengths of `lens` longest first: bit 128, then word 1 (64-127), then word 0
/// (0-63), each word in a loop of its own (bounded apart, so the verifier walks them one
/// after the other, not one per exit point of the other).
#[inline(always)]
fn probe_v6(map: &HashMap<[u64; 3], ClassValue>, lens: &ClassLens, gen: u8, hi: u64, lo: u64) -> u32 {
    if lens.bits[2] & 1 != 0 {
        if let Some(c) = probe_v6_key(map, 128, gen, hi, lo) {
            return c;
        }
    }
    // Lengths 64 + n keep all of `hi` and the top n bits of `lo`.
    let mut bits = lens.bits[1];
    let mut probes = 0;
    while bits != 0 && probes < 64 {
        let n = pop_highest(&mut bits);
        if let Some(c) = probe_v6_key(map, 64 + n, gen, hi, lo & top_mask(n)) {
            return c;
        }
        probes += 1;
    }
    // Lengths n < 64: the top n bits of `hi`.
    let mut bits = lens.bits[0];
    let mut probes = 0;
    while bits != 0 && probes < 64 {
        let n = pop_highest(&mut bits);
        if let Some(c) = probe_v6_key(map, n, gen, hi & top_mask(n), 0) {
            return c;
        }
        probes += 1;
    }
    0
}

/// Looks up the (already masked) prefix `hi`/`lo` of length `len`.
#[inline(always)]
fn probe_v6_key(map: &HashMap<[u64; 3], ClassValue>, len: u32, gen: u8, hi: u64, lo: u64) -> Option<u32> {
    // Back to wire order (memory order of the key bytes).
    let (h, l) = (hi.to_be(), lo.to_be());
    let key = [(8 + len as u64) | (gen as u64) << 32 | h << 40, h >> 24 | l << 40, l >> 24];
    // SAFETY: a hash map value pointer, read at once.
    unsafe { map.get(&key) }.map(|v| v.class)
}
