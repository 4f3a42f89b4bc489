//! wirefence's data path: two TC classifiers, `wf_ingress` and `wf_egress`, sharing one
//! parser and one decision function. Map names, layouts and semantics are the contract in
//! `wirefence-common` (common/src/lib.rs); this crate implements it. This file holds the
//! entry points and the decision; the parser ([`parse`]), conntrack ([`conntrack`]), the
//! policy lookup ([`policy`]) and its cache ([`verdict_cache`]), counters and events
//! ([`events`]), the class probes ([`classes`]), the flow cache ([`flow_cache`]), MSS
//! clamping ([`mss`], also alone as a third classifier, `wf_mss`) and the live trace
//! ([`trace`]) are modules of their own.
//!
//! # Per packet
//!
//! 1. Not IPv4/IPv6 (by `skb->protocol`): `STATS[NOT_IP]`; dropped on an L3 device
//!    (`WF_L3_OFFSET` 0: WireGuard carries only IP), passed on Ethernet test devices (ARP).
//! 2. `STATE` is read once (one 8-byte load). Not initialised: drop, `STATS[UNINITIALIZED]`.
//! 3. Parse. The IP header starts at the load-time global `WF_L3_OFFSET` (0 on L3 devices
//!    such as WireGuard and tun, 14 on Ethernet). Plain TCP/UDP (no IPv4 options, no IPv6
//!    extension headers, not a non-first fragment, headers in the linear area) takes
//!    `parse_fast`: one bounds check, word loads. Everything else: header bytes in the
//!    linear area are read directly (bounds-checked), bytes beyond it through
//!    `bpf_skb_load_bytes`, so non-linear (GSO/GRO) skbs parse like linear ones; byte
//!    counters use `skb->len`. Any parse failure — short or bad IPv4 header (version, IHL,
//!    total length), short IPv6 header, v4-mapped IPv6 addresses (they would alias IPv4
//!    conntrack entries), truncated or more than [`parse::MAX_EXT_HEADERS`] IPv6 extension
//!    headers, truncated TCP/UDP/UDP-Lite/SCTP/ICMP header, TCP data offset < 5 — drops the
//!    packet and counts `STATS[MALFORMED]`: the entry points map `Err` to `TC_ACT_SHOT`,
//!    never to OK.
//! 4. Established: first the per-CPU flow cache ([`flow_cache`]: the verdict conntrack gave
//!    this tuple under the live epoch, less than 250 jiffies ago; never for a TCP SYN, FIN
//!    or RST, which change the flow's state), then the conntrack entry of the flow: one
//!    lookup of the canonical tuple, which a packet and its reply share. An entry past its
//!    state's lifetime ([`conntrack`])
//!    is deleted and the packet judged as new. A hit advances the TCP/answered state and
//!    refills the cache if the flow is not closing and lives long enough (a FIN or RST
//!    clears this CPU's slots of the flow). Each passed packet is counted for its flow: in
//!    the cache slot on a hit, and as the first count of the slot it fills on this path
//!    (folded into the entry, with atomic adds, when the slot is refilled, reused or
//!    cleared); in the entry directly when this path fills no slot (closing flows, short
//!    lifetimes).
//!    Current epoch: pass (`ALLOWED_ESTABLISHED`, `last_seen_ns` refreshed if older than 1 s). Older epoch: the
//!    entry's own tuple and direction (the flow's first packet) is judged under the live
//!    generation; still allowed => the entry gets the new epoch and rule and the packet
//!    passes; no longer allowed => the entry is deleted and the packet is judged as a new
//!    flow (for a flow the policy no longer allows in either direction, that drops it).
//! 5. New: this CPU's [`verdict_cache`] of recent policy decisions under the live epoch;
//!    on a miss, class of the source and of the destination ([`classes`]: hash probes at
//!    the prefix lengths present, longest first; class 0 on a miss), then one policy LPM
//!    lookup; the entry's rule for the packet's direction decides. Allowed: conntrack entry (TCP: only from a SYN; an ingress flow counts
//!    against its source's quota; over it, or with the table full, the packet passes
//!    untracked, `CT_UNTRACKED`), `ALLOWED_NEW`, `NEW_FLOW` event. Denied: drop, `DENIED`, `DENY` event (rule `NO_RULE`).
//!    Per-rule counters (`RULE_COUNTERS[rule]`, packets and `skb->len` bytes) count every
//!    packet passed under a rule: new, established (under the entry's rule), fragments.
//!
//! 6. A TCP SYN or SYN-ACK that passes (new or established) has its MSS option clamped to
//!    the tunnel's limit ([`mss`]); `wf_mss` does only that, on a device without a policy.
//! 7. Decided (steps 4-5; not a malformed, non-IP or uninitialised drop): the live trace's
//!    switch, a global, is loaded ([`trace`]); only while a tracer runs does a subprogram
//!    match its filter and send the path, verdict and rule. It cannot change the verdict.
//!
//! Per packet this is at most: 1 array read, 1 global load (the trace's switch), 1 flow-cache
//! slot, 1 conntrack lookup (of the packet's flow, or of the flow an ICMP error quotes), 1
//! verdict-cache slot, 2 class lookups (a hash probe per prefix length the policy uses) and
//! 1 policy lookup (the last four repeated once when an old-epoch entry is re-checked), a
//! conntrack insert or delete, and counter/event-budget updates: a number that does not
//! grow with the rule count.
//!
//! # Ports and ICMP
//!
//! TCP, UDP, UDP-Lite and SCTP: source/destination port; the policy port is the destination
//! port. ICMP (in IPv4) and ICMPv6 (in IPv6): the policy port is `type << 8 | code`. Echo
//! request/reply use the identifier as `sport` (request) / `dport` (reply), so the reply's
//! reversed tuple is the request's tuple. Other ICMP informational messages are not
//! connection-tracked: each is judged by the policy (an allowed one counts `ALLOWED_NEW`).
//! Other protocols: ports 0 (tracked by addresses and protocol).
//!
//! ICMP errors (IPv4: destination unreachable incl. fragmentation needed, time exceeded,
//! parameter problem; IPv6: destination unreachable, packet too big, time exceeded,
//! parameter problem) quote the offending packet: its IP header and first 8 bytes of L4 are
//! parsed, and the error passes as established (`ALLOWED_ESTABLISHED`) when that quoted
//! flow — which travelled in the direction opposite to the error — is in conntrack in
//! either orientation and the error goes back to the quoted packet's source (its outer
//! destination is the quoted source address). The quote neither advances nor refreshes
//! the entry. Otherwise (unknown flow, or the quote cannot be parsed) the error is
//! judged like any other ICMP message by its type and code.
//!
//! # Fragments (the choice)
//!
//! A first fragment (offset 0, more-fragments set) carries the L4 header and is judged
//! normally; its L4 header must be complete (a first fragment too short for the L4 header
//! is malformed, which defeats tiny-fragment tricks). A non-first fragment has no L4 header,
//! so its ports are unknown. It is counted in `STATS[FRAGMENTS]` and judged by the policy
//! without a port: the lookup key's prefix length is `POLICY_BITS_TO_PROTO`, and an LPM
//! lookup never matches an entry longer than the key's prefix length (the kernel compares
//! `min(entry, key)` bits and requires the entry's full prefix), so only rules for any
//! protocol or for all ports of the fragment's protocol can allow it — a port-specific
//! rule never lets a port-less fragment through. Allowed: pass (rule counter); otherwise:
//! drop, `DENIED` and a `DENY` event. Fragments do not consult or create conntrack (no
//! reassembly state is kept): return traffic that arrives fragmented needs a rule for its
//! protocol (or any protocol) in its own direction. The protocol of an IPv6 non-first
//! fragment is the fragment header's next header.
//!
//! # Events
//!
//! `NEW_FLOW` and `DENY` records go to the `EVENTS` ring buffer through a per-CPU token
//! bucket (`EVENT_RATE_PER_SEC`, `EVENT_BURST`); an empty bucket or a full ring buffer
//! counts `STATS[EVENTS_LOST]`.
#![no_std]
#![no_main]
// `atomic_xadd` for conntrack's shared counters (`conntrack::add`).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values go by reference: by value, each call site copies them onto the 512-byte
// BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod classes;
mod conntrack;
mod events;
mod flow_cache;
mod mss;
mod parse;
mod policy;
mod trace;
mod verdict_cache;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_coarse_ns,
    macros::classifier,
    programs::TcContext,
    Global,
};
use wirefence_common::{self as c, stat, trace::path, FlowValue};

use conntrack::{TCP_FIN, TCP_RST, TCP_SYN};
use events::{count, count_rule, event};
use parse::{Frame, Malformed, Pkt, KIND_FRAGMENT, KIND_ICMP_ERROR, KIND_TRACKED, PARSE_QUOTED, PARSE_V6};
use policy::{policy_rule, read_state};

/// Offset of the IP header in the frame (`GLOBAL_L3_OFFSET` in common), set at load time.
#[no_mangle]
static WF_L3_OFFSET: Global<u32> = Global::new(0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

// TC return codes as the classifiers return them (i32 on every target).
#[allow(clippy::unnecessary_cast)]
const PASS: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const DROP: i32 = TC_ACT_SHOT as i32;
const NEXT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn wf_ingress(ctx: TcContext) -> i32 {
    run(&ctx, c::DIR_INGRESS)
}

#[classifier]
pub fn wf_egress(ctx: TcContext) -> i32 {
    run(&ctx, c::DIR_EGRESS)
}

/// MSS clamping alone, for a tunnel device without a policy: it never judges a packet, and
/// hands every one on (`TC_ACT_UNSPEC`: the next tcx program or cls_bpf filter, else pass).
#[classifier]
pub fn wf_mss(ctx: TcContext) -> i32 {
    let v6 = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return NEXT,
    };
    let l3 = WF_L3_OFFSET.load();
    if !mss::maybe_syn(&ctx, l3, v6) {
        return NEXT;
    }
    if let Some(limits) = mss::limits() {
        mss::clamp(&ctx, l3, v6, &limits);
    }
    NEXT
}

#[inline(always)]
fn run(ctx: &TcContext, dir: u8) -> i32 {
    match try_classify(ctx, dir) {
        Ok(verdict) => verdict,
        Err(Malformed) => {
            count(stat::MALFORMED, ctx.len());
            DROP
        }
    }
}

/// A parsed packet's decision, traced when a tracer runs: the trace's one load per packet
/// (everything else happens only while armed). At each exit rather than once after
/// `try_classify`: a join of every exit's decision took the entry points a spill slot
/// past the stack the deepest call chain leaves them on 6.1.
#[inline(always)]
fn decided(pkt: &Pkt, d: Decided, len: u32) -> i32 {
    if trace::armed() {
        trace::emit(pkt, d.0, len);
    }
    d.code()
}

/// How a parsed packet was decided, in one register: dropped or passed (bit 0) and, for the
/// trace, the path taken (bits 8-15) and the deciding rule (bits 32-63).
#[derive(Clone, Copy)]
struct Decided(u64);

impl Decided {
    const DROPPED: u64 = 1;

    #[inline(always)]
    fn pass(rule: u32, path: u8) -> Decided {
        Decided(((rule as u64) << 32) | ((path as u64) << 8))
    }

    #[inline(always)]
    fn drop(path: u8) -> Decided {
        Decided(((c::NO_RULE as u64) << 32) | ((path as u64) << 8) | Self::DROPPED)
    }

    #[inline(always)]
    fn code(self) -> i32 {
        if self.0 & Self::DROPPED != 0 {
            DROP
        } else {
            PASS
        }
    }
}

// Stack: BPF allows 512 bytes for the whole call chain. The parser, the conntrack check, the
// policy lookup and the event writer are subprograms (`#[inline(never)]`, at most five
// register arguments each), so their temporaries live in frames of their own, and the
// parser fills a [`Pkt`] owned by the caller.

#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u8) -> Result<i32, Malformed> {
    let len = ctx.len();
    // __sk_buff.protocol holds the ethertype in network byte order.
    let v6 = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => {
            count(stat::NOT_IP, len);
            // WireGuard carries only IP: on an L3 device anything else is dropped. (Ethernet
            // test devices need ARP.)
            return Ok(if WF_L3_OFFSET.load() == 0 { DROP } else { PASS });
        }
    };
    let Some(st) = read_state() else {
        count(stat::UNINITIALIZED, len);
        return Ok(DROP);
    };
    let flags = if v6 { PARSE_V6 } else { 0 };
    let family = if v6 { policy::V6 } else { 0 };
    let mut slot = core::mem::MaybeUninit::uninit();
    let frame = Frame::of(ctx);
    let off = WF_L3_OFFSET.load();
    let pkt = match parse::parse_fast(&frame, off, v6, dir, &mut slot) {
        Some(pkt) => pkt,
        None => {
            let pkt = Pkt::init(&mut slot);
            // The general parser, inlined here; the packet an ICMP error quotes goes
            // through `parse`.
            parse::parse_into(&frame, off, flags, dir, pkt)?;
            pkt
        }
    };
    pkt.len = len;
    let tick = flow_cache::jiffies();
    // SYN, FIN and RST change a flow's state: they always go through conntrack.
    if pkt.kind == KIND_TRACKED && pkt.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        if let Some(rule) = flow_cache::lookup(&pkt.key, st.epoch, tick, len) {
            return Ok(decided(pkt, pass_established(rule, len, path::FLOW_CACHE), len));
        }
    }
    // The coarse clock (jiffies resolution) is a plain load; the precise one reads the TSC.
    // Both users (conntrack age, event bucket) are fine with milliseconds.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    if pkt.kind == KIND_FRAGMENT {
        count(stat::FRAGMENTS, len);
        let rule = policy_rule(&pkt.key, 0, st.epoch, family);
        if rule == c::NO_RULE {
            return Ok(decided(pkt, deny(pkt, len, now, path::FRAGMENT), len));
        }
        count_rule(rule, len);
        return Ok(decided(pkt, Decided::pass(rule, path::FRAGMENT), len));
    }
    if pkt.kind == KIND_TRACKED {
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flow_cache::forget_flow(&pkt.key);
        }
        let found = conntrack::established(pkt, st.epoch, now, false);
        let rule = found as u32;
        if rule != c::NO_RULE {
            if found & conntrack::CACHEABLE != 0 {
                flow_cache::remember(&pkt.key, st.epoch, rule, tick, now, len);
            }
            clamp_syn(ctx, pkt, off, v6);
            return Ok(decided(pkt, pass_established(rule, len, path::CONNTRACK), len));
        }
    } else if pkt.kind == KIND_ICMP_ERROR {
        let mut slot = core::mem::MaybeUninit::uninit();
        let quoted = Pkt::init(&mut slot);
        // The quoted packet travelled the other way, from the host the error goes back to:
        // an error addressed anywhere else is not about that packet.
        if parse::parse(&frame, pkt.quoted, flags | PARSE_QUOTED, dir ^ 1, quoted)
            && same_addr(&pkt.key.dst, &quoted.key.src)
        {
            let rule = conntrack::established(quoted, st.epoch, now, true) as u32;
            if rule != c::NO_RULE {
                return Ok(decided(pkt, pass_established(rule, len, path::ICMP_ERROR), len));
            }
        }
    }

    let rule = policy_rule(&pkt.key, pkt.port, st.epoch, family | policy::PORT_KNOWN);
    if rule == c::NO_RULE {
        return Ok(decided(pkt, deny(pkt, len, now, path::NEW), len));
    }
    // A TCP packet other than a SYN opens no entry: allowed by the policy in its own
    // direction it passes, but its answers are judged by the policy too.
    if pkt.kind == KIND_TRACKED && conntrack::may_start(pkt) {
        let mut value = FlowValue {
            epoch: st.epoch,
            rule,
            last_seen_ns: now,
            state: 0,
            flags: 0,
            first_seen_ns: now,
            packets: 1,
            bytes: len as u64,
            #[cfg(feature = "next-layout")]
            next: 0,
        };
        // An allowed flow that cannot be tracked (its source is over quota, the table is
        // full) still passes, as the policy says, but untracked: its answers are judged by
        // the policy, and it takes no entry another flow could have had.
        if !conntrack::insert(&pkt.key, &mut value) {
            count(stat::CT_UNTRACKED, len);
        }
    }
    count(stat::ALLOWED_NEW, len);
    count_rule(rule, len);
    event(c::EVENT_NEW_FLOW, rule, pkt, len, now);
    clamp_syn(ctx, pkt, off, v6);
    Ok(decided(pkt, Decided::pass(rule, path::NEW), len))
}

/// A TCP SYN or SYN-ACK that passes has its MSS clamped ([`mss`]). Other packets (their
/// flags are 0 unless TCP) cost one test.
#[inline(always)]
fn clamp_syn(ctx: &TcContext, pkt: &Pkt, off: u32, v6: bool) {
    if pkt.tcp_flags & TCP_SYN != 0 {
        if let Some(limits) = mss::limits() {
            mss::clamp(ctx, off, v6, &limits);
        }
    }
}

/// Two addresses of flow keys, compared as words.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    // SAFETY: addresses inside 8-byte aligned keys (FlowKey is align(8), `src`/`dst` at 0/16).
    let (a, b) = unsafe { (&*(a as *const [u8; 16] as *const [u64; 2]), &*(b as *const [u8; 16] as *const [u64; 2])) };
    a[0] == b[0] && a[1] == b[1]
}

#[inline(always)]
fn pass_established(rule: u32, len: u32, path: u8) -> Decided {
    count(stat::ALLOWED_ESTABLISHED, len);
    count_rule(rule, len);
    Decided::pass(rule, path)
}

#[inline(always)]
fn deny(pkt: &Pkt, len: u32, now: u64, path: u8) -> Decided {
    count(stat::DENIED, len);
    event(c::EVENT_DENY, c::NO_RULE, pkt, len, now);
    Decided::drop(path)
}

#[cfg(not(target_endian = "little"))]
compile_error!("map keys and header fields are assembled as little-endian words");

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
