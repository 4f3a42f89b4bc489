//! Connection tracking: an LRU hash of the flows the policy allowed, keyed by the tuple of
//! each flow's first packet and holding the rule and policy epoch that allowed it. A packet
//! whose tuple or reversed tuple is there is established; an entry from an older epoch is
//! judged again under the live policy first.

use aya_ebpf::{bindings::BPF_ANY, macros::map, maps::LruHashMap};
use wirefence_common::{self as c, FlowKey, FlowValue};

use crate::parse::Pkt;
use crate::policy::policy_rule;

#[map(name = "WF_CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(c::MAX_CONNTRACK, 0);

/// `FlowValue::last_seen_ns` is refreshed when older than this.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// The rule of the established flow `pkt` belongs to (forward or reversed tuple), after
/// re-checking an entry of an older epoch; `NO_RULE` if there is none (any more).
#[inline(never)]
pub fn established(pkt: &Pkt, epoch: u32, now: u64) -> u32 {
    if let Some(v) = CONNTRACK.get_ptr_mut(&pkt.key) {
        return revalidate(v, &pkt.key, pkt.v6 != 0, pkt.port, epoch, now);
    }
    let rev = pkt.key.reversed();
    if let Some(v) = CONNTRACK.get_ptr_mut(&rev) {
        return revalidate(v, &rev, pkt.v6 != 0, pkt.reply_port, epoch, now);
    }
    c::NO_RULE
}

/// `key` is the entry's key (the flow's first packet), `port` that packet's policy port.
#[inline(always)]
fn revalidate(v: *mut FlowValue, key: &FlowKey, v6: bool, port: u16, epoch: u32, now: u64) -> u32 {
    // SAFETY: a conntrack value pointer from a lookup, valid for this program run.
    let v = unsafe { &mut *v };
    if v.epoch == epoch {
        // Only a stale stamp is written: an entry shared by CPUs is not dirtied per packet.
        if now.wrapping_sub(v.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            v.last_seen_ns = now;
        }
        return v.rule;
    }
    let rule = policy_rule(key, v6, port, (epoch & 1) as u8, true);
    if rule == c::NO_RULE {
        let _ = CONNTRACK.remove(key);
        return c::NO_RULE;
    }
    v.epoch = epoch;
    v.rule = rule;
    v.last_seen_ns = now;
    rule
}

/// Records the allowed new flow `key`; `false` if the entry could not be made. (The caller
/// builds `value`: built in here, it moves the caller's stack slots.)
#[inline(always)]
pub fn insert(key: &FlowKey, value: &FlowValue) -> bool {
    CONNTRACK.insert(key, value, BPF_ANY as u64).is_ok()
}
