//! Connection tracking: a hash of the flows the policy allowed, keyed by each flow's
//! canonical tuple (`FlowKey::canonical`: a packet and its reply share it, so one lookup
//! serves both directions; `FLOW_SWAPPED` records which way the first packet went) and
//! holding the rule and policy epoch that allowed it, its state and when it was last seen.
//! A packet whose flow is there, not expired, is established; an entry from an older epoch
//! is judged again under the live policy first.
//!
//! Lifetimes: each state has an idle timeout (`CT_CONFIG`, defaults in common). An expired
//! entry is deleted by the lookup that finds it (the agent's sweeper deletes the others), so
//! its flow's next packet is judged as new. TCP: only a SYN makes an entry, an answer
//! establishes it, a FIN or RST shortens its life, a fresh SYN on a closed entry reopens it.
//!
//! Isolation: the table is a preallocated hash, not an LRU, so no flood can evict another
//! flow; a full table refuses new flows instead. Entries made by ingress packets count
//! against their source's quota (`CT_QUOTA`), so one peer cannot fill the table either.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use core::intrinsics::AtomicOrdering;

use wirefence_common::{self as c, CtConfig, CtState, FlowKey, FlowSlot, FlowValue};

use crate::parse::Pkt;
use crate::policy::{self, policy_rule};

#[map(name = "WF_CONNTRACK")]
static CONNTRACK: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(c::MAX_CONNTRACK, 0);
#[map(name = "WF_CT_CONFIG")]
static CT_CONFIG: Array<CtConfig> = Array::with_max_entries(1, 0);
#[map(name = "WF_CT_QUOTA")]
static CT_QUOTA: LruHashMap<[u8; 16], u64> = LruHashMap::with_max_entries(c::MAX_CT_QUOTA_SOURCES, 0);

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IPPROTO_TCP: u8 = 6;

/// `last_seen_ns` is refreshed when older than a sixteenth of the lifetime, and at least
/// once a second: an entry shared by CPUs is not dirtied per packet.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// The flow cache may hold a verdict only for an entry that lives at least this long: a
/// slot is trusted for up to 250 jiffies (2.5 s at HZ=100) without consulting the entry.
const CACHE_MIN_LIFETIME_NS: u64 = 4_000_000_000;

/// `established` result bit: the flow cache may hold this verdict.
pub const CACHEABLE: u64 = 1 << 32;

const EEXIST: i64 = 17;

/// The lifetime in ns of a flow of `proto` in `state` under `cfg` (a zero field, or no
/// config, means the default).
#[inline(always)]
fn timeout_ns(cfg: Option<&CtConfig>, proto: u8, state: u32) -> u64 {
    let i = c::ct_timeout_index(proto, state) & (c::CT_TIMEOUTS - 1);
    let ms = match cfg {
        Some(cfg) if cfg.timeouts_ms[i] != 0 => cfg.timeouts_ms[i],
        _ => c::CT_DEFAULT_TIMEOUTS_MS[i],
    };
    ms as u64 * 1_000_000
}

/// `CT_CONFIG[0]`: conntrack lifetimes and quota, and the MSS clamp (`mss`).
#[inline(always)]
pub fn settings() -> Option<&'static CtConfig> {
    CT_CONFIG.get(0)
}

/// The rule of the established flow `pkt` belongs to (either way: one lookup of the
/// canonical tuple), after re-checking an entry of an older epoch, with [`CACHEABLE`] set
/// when the flow cache may keep it; `NO_RULE` if there is none (any more). `quoted`: `pkt`
/// is the packet an ICMP error quotes, which neither advances nor refreshes the entry nor
/// counts; any other is counted (`pkt.len` bytes): here, unless [`CACHEABLE`] (then the
/// caller counts it in the flow-cache slot it fills).
#[inline(never)]
pub fn established(pkt: &Pkt, epoch: u32, now: u64, quoted: bool) -> u64 {
    let swap = swaps(&pkt.key);
    let key = pkt.key.oriented(swap);
    let Some(v) = CONNTRACK.get_ptr_mut(&key) else { return c::NO_RULE as u64 };
    track(v, &key, pkt, swap, quoted, epoch, now)
}

/// 1 if `key`'s canonical form is its reversal (`FlowKey::canonical`), else 0.
#[inline(always)]
fn swaps(key: &FlowKey) -> u64 {
    let (s, d) = (key.src_words(), key.dst_words());
    let rest = key.sport as u64 | (key.dport as u64) << 16 | (key.direction as u64) << 32;
    wf_flow_swaps(s[0], s[1], d[0], d[1], rest)
}

/// `wirefence_common::tuple_swaps` as 0 or 1 (`rest`: source port | destination port << 16
/// | direction << 32).
/// A global function: its result is opaque to the verifier, which so walks the rest of
/// the conntrack path once, not once per orientation of the tuple.
#[no_mangle]
#[inline(never)]
pub extern "C" fn wf_flow_swaps(s0: u64, s1: u64, d0: u64, d1: u64, rest: u64) -> u64 {
    c::tuple_swaps([s0, s1], [d0, d1], rest as u16, (rest >> 16) as u16, (rest >> 32) as u8) as u64
}

/// `key` is the entry's (canonical) key; `swap`: 1 if `pkt`'s tuple is its reversal.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn track(v: *mut FlowValue, key: &FlowKey, pkt: &Pkt, swap: u64, quoted: bool, epoch: u32, now: u64) -> u64 {
    // SAFETY: a conntrack value pointer from a lookup, valid for this program run.
    let v = unsafe { &mut *v };
    // `pkt` goes the other way from the flow's first packet.
    let reply = swap != (v.flags & c::FLOW_SWAPPED) as u64 >> 1;
    let cfg = settings();
    let lifetime = timeout_ns(cfg, key.proto, v.state);
    // Signed: another CPU may have stamped the entry after this packet read the clock.
    let age = now as i64 - v.last_seen_ns as i64;
    if age > lifetime as i64 {
        remove(key, v.flags);
        return c::NO_RULE as u64;
    }
    if v.epoch != epoch {
        // The flow's first packet is judged again: its tuple and its policy port.
        let port = if reply { pkt.reply_port } else { pkt.port };
        let mut flags = policy::PORT_KNOWN;
        if pkt.v6 != 0 {
            flags |= policy::V6;
        }
        if v.flags & c::FLOW_SWAPPED != 0 {
            flags |= policy::REVERSED;
        }
        let rule = policy_rule(key, port, epoch, flags);
        if rule == c::NO_RULE {
            remove(key, v.flags);
            return c::NO_RULE as u64;
        }
        v.epoch = epoch;
        v.rule = rule;
    }
    if quoted {
        return v.rule as u64;
    }
    let old = v.state;
    let mut state = old;
    let f = pkt.tcp_flags;
    if key.proto == IPPROTO_TCP && f & TCP_RST != 0 {
        state = CtState::Closed as u32;
    } else if key.proto == IPPROTO_TCP && f & TCP_FIN != 0 {
        if state != CtState::Closed as u32 {
            state = CtState::Closing as u32;
        }
    } else if key.proto == IPPROTO_TCP && !reply && f & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection on the same tuple after the old one closed.
        if state >= CtState::Closing as u32 {
            state = CtState::New as u32;
        }
    } else if reply && state == CtState::New as u32 {
        state = CtState::Established as u32;
    }
    let mut lifetime = lifetime;
    if state != old {
        v.state = state;
        v.last_seen_ns = now;
        lifetime = timeout_ns(cfg, key.proto, state);
    } else {
        let mut gran = lifetime >> 4;
        if gran > LAST_SEEN_GRANULARITY_NS {
            gran = LAST_SEEN_GRANULARITY_NS;
        }
        if age > gran as i64 {
            v.last_seen_ns = now;
        }
    }
    // Closing flows are left to conntrack (their lives are short and ending); the others'
    // state only changes on a SYN, FIN or RST (never cached) or an answer (its own slot).
    let cacheable = state <= CtState::Established as u32 && lifetime > CACHE_MIN_LIFETIME_NS;
    if cacheable {
        // Counted in the flow-cache slot the caller fills (`flow_cache::remember`).
        return v.rule as u64 | CACHEABLE;
    }
    add(&mut v.packets, 1);
    add(&mut v.bytes, pkt.len as u64);
    v.rule as u64
}

/// Adds what the flow-cache slot `s` counted to the entry of its flow, if that entry was
/// there when the slot was filled (else the counts were an earlier flow's on the same
/// tuple, whose entry is gone: dropped). The caller zeroes the slot's counts.
#[inline(never)]
pub fn fold(s: &FlowSlot) {
    let swap = swaps(&s.key);
    let key = s.key.oriented(swap);
    let Some(v) = CONNTRACK.get_ptr_mut(&key) else { return };
    // SAFETY: a conntrack value pointer from a lookup, valid for this program run.
    let v = unsafe { &mut *v };
    if s.counts_for(v.first_seen_ns) {
        add(&mut v.packets, s.packets());
        add(&mut v.bytes, s.bytes());
    }
}

/// `*n += d`, atomically: other CPUs count into the same entry. (The atomic types have no
/// `fetch_add` on this target; the intrinsic, its result unused, is BPF's `lock +=`, which
/// every kernel's verifier takes.)
#[inline(always)]
fn add(n: &mut u64, d: u64) {
    // SAFETY: an aligned u64 in a map value, valid for this program run.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, d) };
}

/// Deletes the entry `key` (canonical), releasing its quota count if this call deleted it.
#[inline(always)]
fn remove(key: &FlowKey, flags: u32) {
    if CONNTRACK.remove(key).is_ok() && flags & c::FLOW_QUOTA_COUNTED != 0 {
        // The count is the first packet's source's.
        quota_release(if flags & c::FLOW_SWAPPED != 0 { &key.dst } else { &key.src });
    }
}

/// Whether a new flow from `pkt` may make an entry: only a TCP SYN (no ACK) starts a TCP
/// flow; any packet starts the others.
#[inline(always)]
pub fn may_start(pkt: &Pkt) -> bool {
    pkt.key.proto != IPPROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Records the allowed new flow `key` (an ingress flow against its source's quota);
/// `false` if it cannot be tracked (over quota, table full). (The caller builds `value`: built in
/// here, it moves the caller's stack slots.)
#[inline(never)]
pub fn insert(key: &FlowKey, value: &mut FlowValue) -> bool {
    let counted = key.direction == c::DIR_INGRESS;
    if counted {
        if !quota_take(&key.src) {
            return false;
        }
        value.flags = c::FLOW_QUOTA_COUNTED;
    }
    let swap = swaps(key);
    let canonical = key.oriented(swap);
    value.flags |= (swap as u32 & 1) * c::FLOW_SWAPPED;
    match CONNTRACK.insert(&canonical, value, BPF_NOEXIST as u64) {
        Ok(()) => true,
        Err(e) => {
            if counted {
                quota_release(&key.src);
            }
            // Another CPU made the entry of this flow in the meantime: tracked all the same.
            e as i64 == -EEXIST
        }
    }
}

/// One more live entry for `src`, unless it is at its quota.
///
/// The count is read and written, not atomically added (this target has no atomic
/// read-modify-write in Rust): CPUs racing on one source may lose an update, so the count
/// may drift by a few; the agent's sweep recounts it from the table.
#[inline(always)]
fn quota_take(src: &[u8; 16]) -> bool {
    let k = c::quota_key(src);
    let limit = match settings() {
        Some(cfg) => cfg.quota(),
        None => c::CT_DEFAULT_QUOTA,
    };
    if let Some(n) = CT_QUOTA.get_ptr_mut(&k) {
        // SAFETY: a u64 map value, valid for this program run.
        let count = unsafe { core::ptr::read_volatile(n) };
        if count >= limit as u64 {
            return false;
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(n, count + 1) };
        return true;
    }
    let _ = CT_QUOTA.insert(&k, &1, 0);
    true
}

#[inline(always)]
fn quota_release(src: &[u8; 16]) {
    let k = c::quota_key(src);
    if let Some(n) = CT_QUOTA.get_ptr_mut(&k) {
        // SAFETY: as in `quota_take`.
        let count = unsafe { core::ptr::read_volatile(n) };
        if count > 0 {
            // SAFETY: as in `quota_take`.
            unsafe { core::ptr::write_volatile(n, count - 1) };
        }
    }
}
