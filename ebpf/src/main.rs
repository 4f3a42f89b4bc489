//! wirefence's data path: two TC classifiers, `wf_ingress` and `wf_egress`, sharing one
//! parser and one decision function. Map names, layouts and semantics are the contract in
//! `wirefence-common` (common/src/lib.rs); this file implements it.
//!
//! # Per packet
//!
//! 1. Not IPv4/IPv6 (by `skb->protocol`; ARP on Ethernet test devices): pass, `STATS[NOT_IP]`.
//! 2. `STATE` is read once (one 8-byte load). Not initialised: drop, `STATS[UNINITIALIZED]`.
//! 3. Parse. The IP header starts at the load-time global `WF_L3_OFFSET` (0 on L3 devices
//!    such as WireGuard and tun, 14 on Ethernet). Plain TCP/UDP (no IPv4 options, no IPv6
//!    extension headers, not a non-first fragment, headers in the linear area) takes
//!    `parse_fast`: one bounds check, word loads. Everything else: header bytes in the
//!    linear area are read directly (bounds-checked), bytes beyond it through
//!    `bpf_skb_load_bytes`, so non-linear (GSO/GRO) skbs parse like linear ones; byte
//!    counters use `skb->len`. Any parse failure — short or bad IPv4 header (version, IHL,
//!    total length), short IPv6 header, v4-mapped IPv6 addresses (they would alias IPv4
//!    conntrack entries), truncated or more than [`MAX_EXT_HEADERS`] IPv6 extension headers,
//!    truncated TCP/UDP/UDP-Lite/SCTP/ICMP header, TCP data offset < 5 — drops the packet and
//!    counts `STATS[MALFORMED]`: the entry points map `Err` to `TC_ACT_SHOT`, never to OK.
//! 4. Established: first the per-CPU flow cache ([`flow_cache`]: the verdict conntrack gave
//!    this tuple under the live epoch, less than 250 jiffies ago), then the conntrack entry
//!    of the forward tuple, then of the reversed tuple; a conntrack hit refills the cache.
//!    Current epoch: pass (`ALLOWED_ESTABLISHED`, `last_seen_ns` refreshed if older than 1 s). Older epoch: the
//!    entry's own tuple and direction (the flow's first packet) is judged under the live
//!    generation; still allowed => the entry gets the new epoch and rule and the packet
//!    passes; no longer allowed => the entry is deleted and the packet is judged as a new
//!    flow (for a flow the policy no longer allows in either direction, that drops it).
//! 5. New: class of the source and of the destination ([`classes`]: hash probes at the
//!    prefix lengths present, longest first; class 0 on a miss), then one policy LPM lookup; the entry's rule for the packet's direction
//!    decides. Allowed: conntrack entry, `ALLOWED_NEW`,
//!    `NEW_FLOW` event. Denied: drop, `DENIED`, `DENY` event (rule `NO_RULE`).
//!    Per-rule counters (`RULE_COUNTERS[rule]`, packets and `skb->len` bytes) count every
//!    packet passed under a rule: new, established (under the entry's rule), fragments.
//!
//! Per packet this is at most: 1 array read, 1 flow-cache slot, 2 conntrack lookups (of
//! the packet's flow, or of the flow an ICMP error quotes), 2 class lookups (a hash probe
//! per prefix length the policy uses) and 1 policy lookup (all three repeated once when an
//! old-epoch entry is re-checked), a conntrack insert or delete, and counter/event-budget
//! updates: a number that does not grow with the rule count.
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
//! either orientation. Otherwise (unknown flow, or the quote cannot be parsed) the error is
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
// Map keys and values go by reference: by value, each call site copies them onto the 512-byte
// BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod classes;
mod flow_cache;

use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
    Global,
};
use wirefence_common::{
    self as c, stat, ClassDataV4, ClassDataV6, Counter, Event, EventBudget, FlowKey, FlowValue, PolicyData,
    PolicyState, PolicyValue,
};

/// Offset of the IP header in the frame (`GLOBAL_L3_OFFSET` in common), set at load time.
#[no_mangle]
static WF_L3_OFFSET: Global<u32> = Global::new(0);

#[map(name = "WF_STATE")]
static STATE: Array<PolicyState> = Array::with_max_entries(1, 0);
#[map(name = "WF_POLICY")]
static POLICY: LpmTrie<PolicyData, PolicyValue> = LpmTrie::with_max_entries(c::MAX_POLICY_ENTRIES, 0);
#[map(name = "WF_CONNTRACK")]
static CONNTRACK: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(c::MAX_CONNTRACK, 0);
#[map(name = "WF_RULE_COUNTERS")]
static RULE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(c::MAX_RULES, 0);
#[map(name = "WF_STATS")]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map(name = "WF_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map(name = "WF_EVENT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// IPv6 extension headers walked before giving up (more => malformed).
const MAX_EXT_HEADERS: u32 = 6;

/// Offsets at or beyond this are read with `bpf_skb_load_bytes` only (a bound the verifier
/// can check; headers never start this deep in the linear area).
const MAX_DIRECT_OFFSET: u32 = 0x2000;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

// TC return codes as the classifiers return them (i32 on every target).
#[allow(clippy::unnecessary_cast)]
const PASS: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const DROP: i32 = TC_ACT_SHOT as i32;

/// `FlowValue::last_seen_ns` is refreshed when older than this.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

const NS_PER_EVENT_TOKEN: u64 = 1_000_000_000 / c::EVENT_RATE_PER_SEC;

/// A header could not be parsed: the packet is dropped and counted as malformed.
struct Malformed;

#[classifier]
pub fn wf_ingress(ctx: TcContext) -> i32 {
    run(&ctx, c::DIR_INGRESS)
}

#[classifier]
pub fn wf_egress(ctx: TcContext) -> i32 {
    run(&ctx, c::DIR_EGRESS)
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

// Stack: BPF allows 512 bytes for the whole call chain. The parser, the conntrack check, the
// policy lookup and the event writer are subprograms (`#[inline(never)]`, at most five
// register arguments each), so their temporaries live in frames of their own, and the
// parser fills a [`Pkt`] owned by the caller.

/// What the decision needs about a packet, or about the packet an ICMP error quotes.
#[repr(C, align(8))]
struct Pkt {
    /// Forward tuple; `direction` is the packet's direction. IPv4 addresses are v4-mapped.
    key: FlowKey,
    /// Policy port of this packet (destination port, or ICMP type << 8 | code).
    port: u16,
    /// Policy port of the packet this one would answer (its reversed tuple): the source
    /// port, or the ICMP echo type of the other side.
    reply_port: u16,
    kind: u8,
    v6: u8,
    _pad: [u8; 2],
    /// [`KIND_ICMP_ERROR`]: offset of the quoted packet.
    quoted: u32,
}

/// Looked up in and recorded into conntrack.
const KIND_TRACKED: u8 = 0;
/// ICMP informational message other than echo: judged by the policy every time.
const KIND_UNTRACKED: u8 = 1;
/// ICMP error quoting a packet at `Pkt::quoted`.
const KIND_ICMP_ERROR: u8 = 2;
/// Non-first fragment: no L4 header, ports 0.
const KIND_FRAGMENT: u8 = 3;

impl Pkt {
    /// Zeroes `slot` in place (kind [`KIND_TRACKED`]) with 8-byte word stores, and returns
    /// it. A zero initialiser by value becomes a call to a byte-loop memset.
    #[inline(always)]
    fn init(slot: &mut core::mem::MaybeUninit<Pkt>) -> &mut Pkt {
        const WORDS: usize = core::mem::size_of::<Pkt>() / 8;
        const _: () = assert!(core::mem::size_of::<Pkt>().is_multiple_of(8));
        let p = slot.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < WORDS {
            // SAFETY: within the (8-byte aligned) Pkt; volatile so it stays word stores.
            unsafe { core::ptr::write_volatile(p.add(i), 0) };
            i += 1;
        }
        // SAFETY: every byte is written; all-zero is a valid Pkt.
        unsafe { &mut *slot.as_mut_ptr() }
    }
}

/// `parse` flags.
const PARSE_V6: u32 = 1;
/// The packet quoted by an ICMP error: only its first 8 L4 bytes are there, and it must be
/// something conntrack can hold.
const PARSE_QUOTED: u32 = 2;

#[inline(always)]
fn try_classify(ctx: &TcContext, dir: u8) -> Result<i32, Malformed> {
    let len = ctx.len();
    // __sk_buff.protocol holds the ethertype in network byte order.
    let v6 = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => {
            count(stat::NOT_IP, len);
            return Ok(PASS);
        }
    };
    let Some(st) = read_state() else {
        count(stat::UNINITIALIZED, len);
        return Ok(DROP);
    };
    let flags = if v6 { PARSE_V6 } else { 0 };
    let mut slot = core::mem::MaybeUninit::uninit();
    let frame = Frame::of(ctx);
    let off = WF_L3_OFFSET.load();
    let pkt = match parse_fast(&frame, off, v6, dir, &mut slot) {
        Some(pkt) => pkt,
        None => {
            let pkt = Pkt::init(&mut slot);
            // The general parser, inlined here; the packet an ICMP error quotes goes
            // through `parse`.
            parse_into(&frame, off, flags, dir, pkt)?;
            pkt
        }
    };
    let tick = flow_cache::jiffies();
    if pkt.kind == KIND_TRACKED {
        if let Some(rule) = flow_cache::lookup(&pkt.key, st.epoch, tick) {
            return Ok(pass_established(rule, len));
        }
    }
    // The coarse clock (jiffies resolution) is a plain load; the precise one reads the TSC.
    // Both users (conntrack age, event bucket) are fine with milliseconds.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let gen = st.generation();

    if pkt.kind == KIND_FRAGMENT {
        count(stat::FRAGMENTS, len);
        let rule = policy_rule(&pkt.key, v6, 0, gen, false);
        if rule == c::NO_RULE {
            return Ok(deny(&pkt.key, len, now));
        }
        count_rule(rule, len);
        return Ok(PASS);
    }
    if pkt.kind == KIND_TRACKED {
        let rule = established(pkt, st.epoch, now);
        if rule != c::NO_RULE {
            flow_cache::remember(&pkt.key, st.epoch, rule, tick);
            return Ok(pass_established(rule, len));
        }
    } else if pkt.kind == KIND_ICMP_ERROR {
        let mut slot = core::mem::MaybeUninit::uninit();
        let quoted = Pkt::init(&mut slot);
        // The quoted packet travelled the other way.
        if parse(&frame, pkt.quoted, flags | PARSE_QUOTED, dir ^ 1, quoted) {
            let rule = established(quoted, st.epoch, now);
            if rule != c::NO_RULE {
                return Ok(pass_established(rule, len));
            }
        }
    }

    let rule = policy_rule(&pkt.key, v6, pkt.port, gen, true);
    if rule == c::NO_RULE {
        return Ok(deny(&pkt.key, len, now));
    }
    if pkt.kind == KIND_TRACKED {
        let value = FlowValue { epoch: st.epoch, rule, last_seen_ns: now };
        // An LRU insert only fails on allocation failure; the packet is allowed anyway (and
        // the next one is judged as new again).
        if CONNTRACK.insert(&pkt.key, &value, BPF_ANY as u64).is_ok() {
            flow_cache::remember(&pkt.key, st.epoch, rule, tick);
        }
    }
    count(stat::ALLOWED_NEW, len);
    count_rule(rule, len);
    event(c::EVENT_NEW_FLOW, rule, &pkt.key, len, now);
    Ok(PASS)
}

/// `STATE[0]`, read with one 8-byte load; `None` if not initialised.
#[inline(always)]
fn read_state() -> Option<PolicyState> {
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

#[inline(always)]
fn pass_established(rule: u32, len: u32) -> i32 {
    count(stat::ALLOWED_ESTABLISHED, len);
    count_rule(rule, len);
    PASS
}

#[inline(always)]
fn deny(key: &FlowKey, len: u32, now: u64) -> i32 {
    count(stat::DENIED, len);
    event(c::EVENT_DENY, c::NO_RULE, key, len, now);
    DROP
}

/// The packet as the parser reads it: its context and `skb->len`, read once. (The linear
/// area's bounds are re-read from the context at each access: kept in registers they spill
/// to the stack across the parser's helper calls, which measured slower.)
struct Frame<'a> {
    ctx: &'a TcContext,
    len: u32,
}

impl<'a> Frame<'a> {
    #[inline(always)]
    fn of(ctx: &'a TcContext) -> Frame<'a> {
        Frame { ctx, len: ctx.len() }
    }
}

/// Reads a `T` at `off`: straight from the linear part of the skb when it holds those bytes
/// (a bounds-checked direct load, a few instructions), else through `bpf_skb_load_bytes`
/// (paged GSO/GRO data), so both kinds of skb parse alike.
#[inline(always)]
fn load<T: Copy>(f: &Frame, off: u32) -> Result<T, Malformed> {
    // The verifier needs the variable offset bounded before it is added to a packet pointer.
    if off < MAX_DIRECT_OFFSET {
        let p = f.ctx.data() + off as usize;
        if p + core::mem::size_of::<T>() <= f.ctx.data_end() {
            // SAFETY: [p, p + size_of::<T>()) is inside the packet's linear data (checked
            // above); `T` is a plain byte array or integer.
            return Ok(unsafe { core::ptr::read_unaligned(p as *const T) });
        }
    }
    // Through an 8-byte aligned stack buffer: the object is built with misaligned access
    // allowed (packet reads in words, see build.rs), and the verifier rejects misaligned
    // stack access, which copying out of a byte-aligned `T` could produce.
    #[repr(C, align(8))]
    struct Aligned<T>(T);
    let mut buf = core::mem::MaybeUninit::<Aligned<T>>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes into `buf` or fails.
    let r = unsafe {
        bpf_skb_load_bytes(f.ctx.skb.skb as *const _, off, buf.as_mut_ptr() as *mut _, core::mem::size_of::<T>() as u32)
    };
    if r != 0 {
        return Err(Malformed);
    }
    // SAFETY: initialised by the helper (r == 0); `T` is a plain byte array or integer.
    Ok(unsafe { buf.assume_init() }.0)
}

/// ::ffff:0:0/96 (IPv4-mapped), in the wire-order words of `byte`.
#[inline(always)]
fn is_v4_mapped(a: [u64; 2]) -> bool {
    a[0] == 0 && a[1] as u32 == 0xffff_0000
}

// Header fields are read in words (the object allows misaligned access, see build.rs) and
// taken apart here. A word holds wire bytes in memory order, so on this little-endian
// target wire byte `i` of a word is bits `8 * i ..`.

/// Wire byte `i` of `w`.
#[inline(always)]
fn byte(w: u64, i: u32) -> u8 {
    (w >> (8 * i)) as u8
}

/// The big-endian 16-bit field at wire bytes `i`, `i + 1` of `w`.
#[inline(always)]
fn be16(w: u64, i: u32) -> u16 {
    u16::from_be((w >> (8 * i)) as u16)
}

/// Bytes 8-15 of `::ffff:a` (`a` in wire order), as a word.
#[inline(always)]
fn v4_mapped_word(a: u32) -> u64 {
    (0xffffu64 << 16) | (a as u64) << 32
}

/// `::ffff:s` and `::ffff:d` (`s`, `d` in wire order) into a zeroed key, in words.
#[inline(always)]
fn set_v4_addrs(k: &mut FlowKey, s: u32, d: u32) {
    // SAFETY: words 1 of `src` and `dst` (bytes 8-15) of the 8-byte aligned key.
    unsafe {
        (k.src.as_mut_ptr().add(8) as *mut u64).write(v4_mapped_word(s));
        (k.dst.as_mut_ptr().add(8) as *mut u64).write(v4_mapped_word(d));
    }
}

/// IPv6 addresses (wire-order words) into the key, in words.
#[inline(always)]
fn set_v6_addrs(k: &mut FlowKey, s: [u64; 2], d: [u64; 2]) {
    // SAFETY: 16 bytes each at offsets 0 and 16 of the 8-byte aligned key.
    unsafe {
        (k.src.as_mut_ptr() as *mut [u64; 2]).write(s);
        (k.dst.as_mut_ptr() as *mut [u64; 2]).write(d);
    }
}

/// The common case behind one bounds check: an IPv4 header without options or an IPv6
/// header without extension headers, not a non-first fragment, carrying TCP or UDP, with a
/// TCP header's worth of L4 bytes in the linear area. Then it writes the whole `Pkt` that
/// [`parse_into`] would have produced (in words, no zeroing pass first); for anything else
/// it returns `None` having written nothing, and `parse_into` decides, rejections included.
#[inline(always)]
fn parse_fast<'s>(
    f: &Frame,
    off: u32,
    v6: bool,
    dir: u8,
    slot: &'s mut core::mem::MaybeUninit<Pkt>,
) -> Option<&'s mut Pkt> {
    if off >= MAX_DIRECT_OFFSET {
        return None;
    }
    let p = f.ctx.data() + off as usize;
    let end = f.ctx.data_end();
    // SAFETY (every read): callers pass offsets inside the range checked before.
    let rd = |at: usize| unsafe { core::ptr::read_unaligned((p + at) as *const u64) };
    // Per family: the key's address words, the protocol, the first 8 L4 bytes and L4
    // bytes 8-15 (TCP's data offset is byte 12).
    let (addrs, proto, l4, l4_more) = if v6 {
        if p + 40 + 20 > end {
            return None;
        }
        let h = rd(0);
        let (src, dst) = ([rd(8), rd(16)], [rd(24), rd(32)]);
        if byte(h, 0) >> 4 != 6 || is_v4_mapped(src) || is_v4_mapped(dst) {
            return None;
        }
        ([src[0], src[1], dst[0], dst[1]], byte(h, 6), rd(40), rd(48))
    } else {
        if p + 20 + 20 > end {
            return None;
        }
        let (w0, w1) = (rd(0), rd(8));
        let total = be16(w0, 2);
        // Version 4, IHL 5; total length 0 (BIG TCP) or covering the header; fragment
        // offset 0.
        if byte(w0, 0) != 0x45 || (total != 0 && total < 20) || be16(w0, 6) & 0x1fff != 0 {
            return None;
        }
        let (src, dst) = ((w1 >> 32) as u32, rd(16) as u32);
        ([0, v4_mapped_word(src), 0, v4_mapped_word(dst)], byte(w1, 1), rd(20), rd(28))
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    // TCP with a data offset below 5 words is malformed: parse_into says so.
    if proto == IPPROTO_TCP && byte(l4_more, 4) >> 4 < 5 {
        return None;
    }
    let (sport, dport) = (be16(l4, 0) as u64, be16(l4, 2) as u64);
    // The Pkt's words (layout checked below): key, then port = dport, reply_port = sport,
    // kind KIND_TRACKED, v6; quoted 0.
    let words: [u64; 7] = [
        addrs[0],
        addrs[1],
        addrs[2],
        addrs[3],
        sport | dport << 16 | (proto as u64) << 32 | (dir as u64) << 40,
        dport | sport << 16 | (KIND_TRACKED as u64) << 32 | (v6 as u64) << 40,
        0,
    ];
    // SAFETY: Pkt is 7 words, 8-byte aligned, and every bit pattern of its fields is valid.
    unsafe {
        (slot.as_mut_ptr() as *mut [u64; 7]).write(words);
        Some(slot.assume_init_mut())
    }
}

// The word layout `parse_fast` writes.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Pkt>() == 56 && core::mem::align_of::<Pkt>() == 8);
    assert!(offset_of!(FlowKey, sport) == 32 && offset_of!(FlowKey, dport) == 34);
    assert!(offset_of!(FlowKey, proto) == 36 && offset_of!(FlowKey, direction) == 37);
    assert!(offset_of!(Pkt, port) == 40 && offset_of!(Pkt, reply_port) == 42);
    assert!(offset_of!(Pkt, kind) == 44 && offset_of!(Pkt, v6) == 45 && offset_of!(Pkt, quoted) == 48);
};

/// Parses the packet whose IP header is at `off` into `out` (`flags`: [`PARSE_V6`],
/// [`PARSE_QUOTED`]); `false` if it cannot be parsed (or, quoted, cannot be tracked).
#[inline(never)]
fn parse(f: &Frame, off: u32, flags: u32, dir: u8, out: &mut Pkt) -> bool {
    parse_into(f, off, flags, dir, out).is_ok()
}

#[inline(always)]
fn parse_into(f: &Frame, off: u32, flags: u32, dir: u8, out: &mut Pkt) -> Result<(), Malformed> {
    let v6 = flags & PARSE_V6 != 0;
    let quoted = flags & PARSE_QUOTED != 0;
    out.v6 = v6 as u8;
    out.key.direction = dir;
    let (l4, nonfirst) = if v6 { parse_v6(f, off, out)? } else { parse_v4(f, off, out)? };
    if nonfirst {
        if quoted {
            return Err(Malformed);
        }
        out.kind = KIND_FRAGMENT;
        return Ok(());
    }
    let proto = out.key.proto;
    let icmp = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    // Bytes of L4 header that must be present.
    let need = match proto {
        _ if quoted => 8,
        IPPROTO_TCP => 20,
        IPPROTO_SCTP => 12,
        _ => 8,
    };
    if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP) && proto != icmp {
        // Other protocols: tracked by addresses and protocol, ports 0.
        return Ok(());
    }
    if l4 + need > f.len {
        return Err(Malformed);
    }
    let h: u64 = load(f, l4)?;
    if proto != icmp {
        if proto == IPPROTO_TCP && !quoted {
            // Two bytes, not one: for a 1-byte direct read LLVM turns the bounds check into
            // `p < data_end`, which the verifier does not take as a range.
            let doff: u16 = load(f, l4 + 12)?;
            if byte(doff as u64, 0) >> 4 < 5 {
                return Err(Malformed);
            }
        }
        let sport = be16(h, 0);
        let dport = be16(h, 2);
        out.key.sport = sport;
        out.key.dport = dport;
        out.port = dport;
        out.reply_port = sport;
        return Ok(());
    }
    let (ty, code) = (byte(h, 0), byte(h, 1));
    let id = be16(h, 4);
    let port = (ty as u16) << 8 | code as u16;
    out.port = port;
    out.reply_port = port;
    let (req, rep) = if v6 { (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY) } else { (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) };
    if ty == req {
        out.key.sport = id;
        out.reply_port = (rep as u16) << 8;
        return Ok(());
    }
    if ty == rep {
        out.key.dport = id;
        out.reply_port = (req as u16) << 8;
        return Ok(());
    }
    if quoted {
        // Nothing conntrack holds (and no error about an error).
        return Err(Malformed);
    }
    out.key.dport = port;
    let error = if v6 {
        matches!(ty, ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAMETER_PROBLEM)
    } else {
        matches!(ty, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
    };
    if error {
        out.kind = KIND_ICMP_ERROR;
        out.quoted = l4 + 8;
    } else {
        out.kind = KIND_UNTRACKED;
    }
    Ok(())
}

/// IPv4 header at `off` into `out.key`; returns (L4 offset, non-first fragment).
#[inline(always)]
fn parse_v4(f: &Frame, off: u32, out: &mut Pkt) -> Result<(u32, bool), Malformed> {
    // Wire bytes 0-7, 8-15, 16-19 (see `byte`).
    let w0: u64 = load(f, off)?;
    let w1: u64 = load(f, off + 8)?;
    let dst: u32 = load(f, off + 16)?;
    if byte(w0, 0) >> 4 != 4 {
        return Err(Malformed);
    }
    let hdr_len = (byte(w0, 0) & 0x0f) as u32 * 4;
    if hdr_len < 20 {
        return Err(Malformed);
    }
    // Total length 0 is legal for BIG TCP GSO packets; otherwise it covers the header.
    let total = be16(w0, 2) as u32;
    if total != 0 && total < hdr_len {
        return Err(Malformed);
    }
    // Options, if any, must be present.
    if off + hdr_len > f.len {
        return Err(Malformed);
    }
    set_v4_addrs(&mut out.key, (w1 >> 32) as u32, dst);
    out.key.proto = byte(w1, 1);
    let frag = be16(w0, 6);
    Ok((off + hdr_len, frag & 0x1fff != 0))
}

/// IPv6 header and extension headers at `off` into `out.key`; returns (L4 offset, non-first
/// fragment).
#[inline(always)]
fn parse_v6(f: &Frame, off: u32, out: &mut Pkt) -> Result<(u32, bool), Malformed> {
    let h: u64 = load(f, off)?;
    if byte(h, 0) >> 4 != 6 {
        return Err(Malformed);
    }
    let src: [u64; 2] = load(f, off + 8)?;
    let dst: [u64; 2] = load(f, off + 24)?;
    if is_v4_mapped(src) || is_v4_mapped(dst) {
        return Err(Malformed);
    }
    set_v6_addrs(&mut out.key, src, dst);
    let (proto, l4, nonfirst) = walk_ext(f, byte(h, 6), off + 40)?;
    out.key.proto = proto;
    Ok((l4, nonfirst))
}

#[inline(always)]
fn is_ext(nh: u8) -> bool {
    matches!(nh, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS | IPPROTO_AH)
}

/// Walks at most [`MAX_EXT_HEADERS`] IPv6 extension headers from `off`; returns the upper
/// protocol, its offset and whether this is a non-first fragment (then the protocol is the
/// fragment header's next header and the offset is meaningless).
#[inline(always)]
fn walk_ext(f: &Frame, first: u8, off: u32) -> Result<(u8, u32, bool), Malformed> {
    let len = f.len;
    let mut nh = first;
    let mut off = off;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match nh {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e: u16 = load(f, off)?;
                nh = byte(e as u64, 0);
                off += (byte(e as u64, 1) as u32 + 1) * 8;
            }
            IPPROTO_AH => {
                let e: u16 = load(f, off)?;
                nh = byte(e as u64, 0);
                off += (byte(e as u64, 1) as u32 + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let e: u64 = load(f, off)?;
                nh = byte(e, 0);
                off += 8;
                if be16(e, 2) & 0xfff8 != 0 {
                    return Ok((nh, off, true));
                }
            }
            _ => return Ok((nh, off, false)),
        }
        // The whole extension header must be present.
        if off > len {
            return Err(Malformed);
        }
        i += 1;
    }
    if is_ext(nh) {
        return Err(Malformed);
    }
    Ok((nh, off, false))
}

/// The rule of the established flow `pkt` belongs to (forward or reversed tuple), after
/// re-checking an entry of an older epoch; `NO_RULE` if there is none (any more).
#[inline(never)]
fn established(pkt: &Pkt, epoch: u32, now: u64) -> u32 {
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

/// The deciding rule for the flow `key` (its addresses, protocol and direction) with policy
/// port `port` under generation `gen`; `NO_RULE` if none matches (so a policy value holding
/// `NO_RULE` denies, too). `port_known == false` limits the match to rules for any protocol
/// or all ports.
#[inline(never)]
fn policy_rule(key: &FlowKey, v6: bool, port: u16, gen: u8, port_known: bool) -> u32 {
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

// Map keys are built as words (the prefix length, then the data bytes of common's
// `class_data_v4`/`class_data_v6`/`policy_data` layouts, in memory order): assembling the
// byte arrays directly makes LLVM call a byte-loop memset for their zero runs.
const _: () = assert!(core::mem::size_of::<Key<ClassDataV4>>() == 12);
const _: () = assert!(core::mem::size_of::<Key<ClassDataV6>>() == 24);
#[cfg(not(target_endian = "little"))]
compile_error!("map keys and header fields are assembled as little-endian words");
const _: () = assert!(core::mem::size_of::<Key<PolicyData>>() == 20);

/// Four key bytes as the u32 that holds them in memory.
#[inline(always)]
fn word(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

#[inline(always)]
fn count(index: u32, len: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value of this CPU.
        let p = unsafe { &mut *p };
        p.packets += 1;
        p.bytes += len as u64;
    }
}

#[inline(always)]
fn count_rule(rule: u32, len: u32) {
    if let Some(p) = RULE_COUNTERS.get_ptr_mut(rule) {
        // SAFETY: per-CPU value of this CPU.
        let p = unsafe { &mut *p };
        p.packets += 1;
        p.bytes += len as u64;
    }
}

/// Sends an event if this CPU's token bucket allows; counts `EVENTS_LOST` otherwise.
#[inline(never)]
fn event(kind: u32, rule: u32, flow: &FlowKey, len: u32, now: u64) {
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
                core::ptr::addr_of_mut!((*p).flow).write(*flow);
                core::ptr::addr_of_mut!((*p).len).write(len);
                core::ptr::addr_of_mut!((*p)._pad).write(0);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
