//! The live verdict trace (see `wirefence_common::trace`): while a tracer has set the
//! `WF_TRACE_ARMED` word, every decided packet the filter in `TRACE[0]` matches goes to
//! `TRACE_EVENTS` with the path taken, the verdict and the deciding rule. Disarmed, a packet
//! costs one load of that word; loaded with `WF_TRACE_BUILT = 0`, not even that (the
//! verifier drops the branch).

use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
    Global,
};
use wirefence_common::{
    self as c,
    trace::{TraceFilter, TraceRecord, MATCH_PORT, MATCH_PROTO, TRACE_DROP, TRACE_PASS},
};

use crate::parse::{Pkt, IPPROTO_ICMP, IPPROTO_ICMPV6, KIND_FRAGMENT};

/// [`c::trace::GLOBAL_TRACE`]: 1 unless a loader sets it to 0.
#[no_mangle]
static WF_TRACE_BUILT: Global<u32> = Global::new(1);

/// The switch (`wirefence_common::TRACE_ARMED` names its data section, so its map is this
/// word alone): non-zero while a tracer runs. A global, not a map entry: its load is
/// one instruction, no lookup, no key on the stack.
#[no_mangle]
#[link_section = ".bss.wf_trace"]
static mut WF_TRACE_ARMED: u32 = 0;

#[map(name = "WF_TRACE")]
static TRACE: Array<TraceFilter> = Array::with_max_entries(1, 0);
#[map(name = "WF_TRACE_EVENTS")]
static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Whether a tracer is running.
#[inline(always)]
pub fn armed() -> bool {
    if WF_TRACE_BUILT.load() == 0 {
        return false;
    }
    // SAFETY: a plain word the tracer writes at any time, hence volatile.
    unsafe { core::ptr::read_volatile(&raw const WF_TRACE_ARMED) != 0 }
}

/// Sends the record of a decided packet (`decided`: `main`'s `Decided` word: dropped in bit
/// 0, the path in bits 8-15, the rule in 32-63) if the filter matches it; a full ring
/// buffer counts in `TRACE[0].lost` (approximately: see below).
#[inline(never)]
pub fn emit(pkt: &Pkt, decided: u64, len: u32) {
    let (pass, path, rule) = (decided & 1 == 0, (decided >> 8) as u8, (decided >> 32) as u32);
    let Some(f) = TRACE.get_ptr_mut(0) else { return };
    // SAFETY: the array's one value.
    if !matches(unsafe { &*f }, pkt) {
        return;
    }
    match TRACE_EVENTS.reserve::<TraceRecord>(0) {
        Some(mut e) => {
            let r = e.as_mut_ptr();
            let port = if pkt.kind == KIND_FRAGMENT { 0 } else { pkt.port as u32 | c::EVENT_PORT };
            // SAFETY: `r` points to reserved, writable room for one record; every field is
            // written (the padding byte too), so nothing stale reaches the reader.
            unsafe {
                core::ptr::addr_of_mut!((*r).flow).write(pkt.key);
                core::ptr::addr_of_mut!((*r).rule).write(rule);
                core::ptr::addr_of_mut!((*r).len).write(len);
                core::ptr::addr_of_mut!((*r).port).write(port);
                core::ptr::addr_of_mut!((*r).path).write(path);
                core::ptr::addr_of_mut!((*r).verdict).write(if pass { TRACE_PASS } else { TRACE_DROP });
                core::ptr::addr_of_mut!((*r).tcp_flags).write(pkt.tcp_flags);
                core::ptr::addr_of_mut!((*r)._pad).write(0);
            }
            e.submit(0);
        }
        None => {
            // Read and written, not atomically added (this target has no atomic
            // read-modify-write in Rust): CPUs racing here may lose a count.
            // SAFETY: `lost` is an aligned u64 inside the map value.
            unsafe {
                let lost = core::ptr::addr_of_mut!((*f).lost);
                core::ptr::write_volatile(lost, core::ptr::read_volatile(lost) + 1);
            }
        }
    }
}

#[inline(always)]
fn matches(f: &TraceFilter, pkt: &Pkt) -> bool {
    let (s, d) = (pkt.key.src_words(), pkt.key.dst_words());
    if s[0] & f.src_mask[0] != f.src[0] || s[1] & f.src_mask[1] != f.src[1] {
        return false;
    }
    if d[0] & f.dst_mask[0] != f.dst[0] || d[1] & f.dst_mask[1] != f.dst[1] {
        return false;
    }
    if f.proto & MATCH_PROTO != 0 && f.proto as u8 != pkt.key.proto {
        return false;
    }
    if f.port & MATCH_PORT != 0 {
        let want = f.port as u16;
        // ICMP has no ports (the tuple's hold an echo's identifier); a non-first fragment
        // carries none.
        let icmp = pkt.key.proto == IPPROTO_ICMP || pkt.key.proto == IPPROTO_ICMPV6;
        if icmp || pkt.kind == KIND_FRAGMENT || (pkt.key.sport != want && pkt.key.dport != want) {
            return false;
        }
    }
    true
}
