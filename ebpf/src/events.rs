//! What the programs report: per-CPU packet and byte counters (`STATS` by outcome,
//! `RULE_COUNTERS` by deciding rule) and `NEW_FLOW`/`DENY` records in the `EVENTS` ring
//! buffer, rate-limited by a per-CPU token bucket so a flood cannot fill it.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use wirefence_common::{self as c, stat, Counter, Event, EventBudget};

use crate::parse::{Pkt, KIND_FRAGMENT};

#[map(name = "WF_RULE_COUNTERS")]
static RULE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(c::MAX_RULES, 0);
#[map(name = "WF_STATS")]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map(name = "WF_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map(name = "WF_EVENT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

const NS_PER_EVENT_TOKEN: u64 = 1_000_000_000 / c::EVENT_RATE_PER_SEC;

#[inline(always)]
pub fn count(index: u32, len: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value of this CPU.
        let p = unsafe { &mut *p };
        p.packets += 1;
        p.bytes += len as u64;
    }
}

#[inline(always)]
pub fn count_rule(rule: u32, len: u32) {
    if let Some(p) = RULE_COUNTERS.get_ptr_mut(rule) {
        // SAFETY: per-CPU value of this CPU.
        let p = unsafe { &mut *p };
        p.packets += 1;
        p.bytes += len as u64;
    }
}

/// Sends an event if this CPU's token bucket allows; counts `EVENTS_LOST` otherwise.
#[inline(never)]
pub fn event(kind: u32, rule: u32, pkt: &Pkt, len: u32, now: u64) {
    if !take_event_token(now) {
        count(stat::EVENTS_LOST, len);
        return;
    }
    match EVENTS.reserve::<Event>(0) {
        Some(mut e) => {
            // Written field by field in the ring buffer (no Event on the stack).
            let p = e.as_mut_ptr();
            // SAFETY: `p` points to reserved, writable room for one Event.
            unsafe {
                core::ptr::addr_of_mut!((*p).kind).write(kind);
                core::ptr::addr_of_mut!((*p).rule).write(rule);
                core::ptr::addr_of_mut!((*p).flow).write(pkt.key);
                core::ptr::addr_of_mut!((*p).len).write(len);
                // A fragment without its first part has no ports: judged by port 0, unknown.
                let port = if pkt.kind == KIND_FRAGMENT { 0 } else { pkt.port as u32 | c::EVENT_PORT };
                core::ptr::addr_of_mut!((*p).port).write(port);
            }
            e.submit(0);
        }
        None => count(stat::EVENTS_LOST, len),
    }
}

#[inline(always)]
fn take_event_token(now: u64) -> bool {
    let Some(b) = EVENT_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU value of this CPU.
    let b = unsafe { &mut *b };
    let elapsed = now.wrapping_sub(b.last_ns);
    if elapsed >= c::EVENT_BURST * NS_PER_EVENT_TOKEN {
        b.tokens = c::EVENT_BURST;
        b.last_ns = now;
    } else {
        // Whole tokens only; the remainder stays in (now - last_ns) for the next packet.
        let add = elapsed / NS_PER_EVENT_TOKEN;
        if add > 0 {
            b.tokens = (b.tokens + add).min(c::EVENT_BURST);
            b.last_ns += add * NS_PER_EVENT_TOKEN;
        }
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}
