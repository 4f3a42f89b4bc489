//! The policy of the live generation: the state word (epoch, initialised) read once per
//! packet, and the one policy LPM lookup keyed by (generation, source class, destination
//! class, protocol, port) that yields the deciding rule per direction.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use wirefence_common::{self as c, FlowKey, PolicyData, PolicyState, PolicyValue};

use crate::classes;

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

/// The deciding rule for the flow `key` (its addresses, protocol and direction) with policy
/// port `port` under generation `gen`; `NO_RULE` if none matches (so a policy value holding
/// `NO_RULE` denies, too). `port_known == false` limits the match to rules for any protocol
/// or all ports.
#[inline(never)]
pub fn policy_rule(key: &FlowKey, v6: bool, port: u16, gen: u8, port_known: bool) -> u32 {
    let sc = classes::class_of(false, v6, gen, &key.src);
    let dc = classes::class_of(true, v6, gen, &key.dst);
    let bits = if port_known { c::POLICY_BITS_ALL } else { c::POLICY_BITS_TO_PROTO };
    let port = if port_known { port } else { 0 };
    let (s, d, p) = (sc.to_be_bytes(), dc.to_be_bytes(), port.to_be_bytes());
    let k = [
        bits,
        word([gen, s[0], s[1], s[2]]),
        word([s[3], d[0], d[1], d[2]]),
        word([d[3], key.proto, p[0], p[1]]),
        0,
    ];
    // SAFETY: same size and layout as the packed Key<PolicyData> (alignment 1).
    match POLICY.get(unsafe { &*(k.as_ptr() as *const Key<PolicyData>) }) {
        // The entry names a rule per direction (the key has none).
        Some(v) if key.direction == c::DIR_INGRESS => v.rules[0],
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
