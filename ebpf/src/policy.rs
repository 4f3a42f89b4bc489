//! The policy of the live generation: the state word (epoch, initialised) read once per
//! packet, and the one policy LPM lookup keyed by (generation, source class, destination
//! class, protocol, port) that yields the deciding rule per direction, behind the per-CPU
//! [`verdict_cache`].

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use wirefence_common::{self as c, FlowKey, PolicyData, PolicyState, PolicyValue};

use crate::{classes, verdict_cache};

#[map(name = "WF_STATE")]
static STATE: Array<PolicyState> = Array::with_max_entries(1, 0);
#[map(name = "WF_POLICY")]
static POLICY: LpmTrie<PolicyData, PolicyValue> = LpmTrie::with_max_entries(c::MAX_POLICY_ENTRIES, 0);

/// `STATE[0]`, read with one 8-byte load; `None` if not initialised.
#[inline(always)]
pub fn read_state() -> Option<PolicyState> {
    let p = STATE.get_ptr(0)?;
    // SAFETY: array values are 8-byte aligned and 8 bytes long; one load sees one write.
    let word = unsafe { core::ptr::read_volatile(p as *const u64) };
    // PolicyState is { epoch, initialized }: epoch is the low half in little-endian memory.
    let (first, second) = if cfg!(target_endian = "little") {
        (word as u32, (word >> 32) as u32)
    } else {
        ((word >> 32) as u32, word as u32)
    };
    let st = PolicyState { epoch: first, initialized: second };
    if st.initialized == 0 {
        return None;
    }
    Some(st)
}

/// [`policy_rule`]'s `flags`: the addresses are IPv6.
pub const V6: u32 = 1;
/// [`policy_rule`]'s `flags`: the port is known (not a non-first fragment).
pub const PORT_KNOWN: u32 = 2;
/// [`policy_rule`]'s `flags`: judge the reversal of `key` (the other way, the other
/// direction), as for an entry filed under its flow's reversed tuple.
pub const REVERSED: u32 = 4;

/// The deciding rule for the flow `key` (its addresses, protocol and direction; reversed
/// with [`REVERSED`]) with policy port `port` under the live `epoch` (its generation);
/// `NO_RULE` if none matches (so a policy value holding `NO_RULE` denies, too). Without
/// [`PORT_KNOWN`] the match is limited to rules for any protocol or all ports.
#[inline(always)]
pub fn policy_rule(key: &FlowKey, port: u16, epoch: u32, flags: u32) -> u32 {
    let rev = flags & REVERSED != 0;
    let (s, d) = if rev { (key.dst_words(), key.src_words()) } else { (key.src_words(), key.dst_words()) };
    let known = flags & PORT_KNOWN != 0;
    let port = if known { port } else { 0 };
    let meta = port as u64
        | (key.proto as u64) << 16
        | ((key.direction ^ rev as u8) as u64 & 1) << 24
        | ((flags & V6 != 0) as u64) << 25
        | (known as u64) << 26
        | 1 << 27
        | (epoch as u64) << 32;
    wf_policy_rule(s[0], s[1], d[0], d[1], meta)
}

/// [`policy_rule`] on the addresses as memory-order words and `meta`: port (bits 0-15),
/// protocol (16-23), direction (24), IPv6 (25), port known (26), always 1 (27: no `meta`
/// is 0, the tag of an empty cache slot), epoch (32-63). Answered
/// from this CPU's [`verdict_cache`] when it holds the decision. A global function (scalar
/// arguments), so the verifier checks it once, not again in every calling context.
#[no_mangle]
#[inline(never)]
pub extern "C" fn wf_policy_rule(s0: u64, s1: u64, d0: u64, d1: u64, meta: u64) -> u32 {
    let (src, dst) = ([s0, s1], [d0, d1]);
    if let Some(rule) = verdict_cache::lookup(&src, &dst, meta) {
        return rule;
    }
    let rule = lookup(&src, &dst, meta);
    verdict_cache::remember(&src, &dst, meta, rule);
    rule
}

/// [`wf_policy_rule`] without the cache: the class probes and the policy LPM lookup.
#[inline(always)]
fn lookup(src: &[u64; 2], dst: &[u64; 2], meta: u64) -> u32 {
    let gen = (meta >> 32) as u8 & 1;
    let v6 = meta >> 25 & 1 != 0;
    let known = meta >> 26 & 1 != 0;
    let (proto, port) = ((meta >> 16) as u8, meta as u16);
    let sc = classes::class_of(false, v6, gen, src);
    let dc = classes::class_of(true, v6, gen, dst);
    let bits = if known { c::POLICY_BITS_ALL } else { c::POLICY_BITS_TO_PROTO };
    let (s, d, p) = (sc.to_be_bytes(), dc.to_be_bytes(), port.to_be_bytes());
    let k = [bits, word([gen, s[0], s[1], s[2]]), word([s[3], d[0], d[1], d[2]]), word([d[3], proto, p[0], p[1]]), 0];
    // SAFETY: same size and layout as the packed Key<PolicyData> (alignment 1).
    match POLICY.get(unsafe { &*(k.as_ptr() as *const Key<PolicyData>) }) {
        // The entry names a rule per direction (the key has none).
        Some(v) if (meta >> 24) as u8 & 1 == c::DIR_INGRESS => v.rules[0],
        Some(v) => v.rules[1],
        None => c::NO_RULE,
    }
}

// The key is built as words (the prefix length, then the data bytes of common's
// `policy_data` layout, in memory order): assembling the byte array directly makes LLVM call
// a byte-loop memset for its zero runs.
const _: () = assert!(core::mem::size_of::<Key<PolicyData>>() == 20);

/// Four key bytes as the u32 that holds them in memory.
#[inline(always)]
fn word(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}
