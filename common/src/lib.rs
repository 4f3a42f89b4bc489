//! Map layouts shared by the eBPF classifiers (`ebpf/`) and the agent. Every type is
//! `#[repr(C)]`, padding-free (explicit `_pad` fields, always zero) and made of fixed-width
//! integers; flags are `u32`, never `bool`.
//!
//! # The policy model in maps
//!
//! A packet's addresses map to *classes* (one map per role and family): the class of an
//! address is the set of rule prefixes (of that role) containing it, numbered by the
//! compiler, and is stored under the longest of those prefixes; class 0 means "no rule
//! prefix contains it". The class maps are hashes of masked prefixes, searched longest
//! prefix length first among the lengths the generation uses ([`ClassLens`]): a probe per
//! length present, however many prefixes (an LPM trie's walk grows with its size: 4,096
//! /24s already cost ~45 ns more per lookup than ten). One LPM lookup in [`POLICY`]
//! keyed by (generation, src class, dst class, protocol, port) then decides: the value names
//! the deciding rule per direction ([`PolicyValue`]), [`NO_RULE`] for a direction it does
//! not allow. Port ranges are expanded into masked port prefixes; a rule for any protocol
//! ends its prefix after the dst class, a rule for a protocol with all ports ends it after
//! the protocol.
//!
//! The key has no direction, so a rule for both directions costs one entry per key, not
//! two. Because the lookup returns only the longest matching entry, every entry carries, for
//! each direction it has no rule of its own, the rule of its longest shorter entry (same
//! classes) that has one ([`inherit_directions`]): the longest match then answers each
//! direction as a per-direction map would.
//!
//! # Generations
//!
//! Every policy map key starts with a generation byte (0 or 1). [`STATE`] holds the current
//! [`PolicyState`]; a packet reads it once, so it sees one whole policy. The agent fills the
//! inactive generation, then writes the state (one word flips which generation is live).
//!
//! # Connection tracking
//!
//! An allowed new flow is recorded in [`CONNTRACK`] (a preallocated hash: entries leave by
//! expiry or policy, never by eviction) under its canonical tuple ([`FlowKey::canonical`]:
//! the same for a packet and its reply, so one lookup finds the flow from either side; the
//! entry's [`FLOW_SWAPPED`] says which way its first packet went), with the policy epoch that
//! allowed it, its [`CtState`] and when it was last seen; past its state's lifetime
//! ([`CtConfig`]) an entry is ignored and deleted. Ingress-made entries count against their
//! source's quota ([`CT_QUOTA`]). A packet whose tuple, or reversed tuple, is in the
//! table is established: if the entry's epoch is the current one it passes at once; if not,
//! the flow's original direction is re-evaluated under the current policy and the entry is
//! refreshed (still allowed) or deleted and the packet dropped (no longer allowed).
#![no_std]

pub mod layout;
pub mod trace;

/// Map names (as in the object file and under the bpffs pin directory).
pub const STATE: &str = "WF_STATE";
pub const SRC_V4: &str = "WF_SRC4";
pub const DST_V4: &str = "WF_DST4";
pub const SRC_V6: &str = "WF_SRC6";
pub const DST_V6: &str = "WF_DST6";
pub const CLASS_LENS: &str = "WF_CLASS_LENS";
pub const POLICY: &str = "WF_POLICY";
pub const CONNTRACK: &str = "WF_CONNTRACK";
pub const RULE_COUNTERS: &str = "WF_RULE_COUNTERS";
pub const STATS: &str = "WF_STATS";
pub const EVENTS: &str = "WF_EVENTS";
pub const EVENT_BUDGET: &str = "WF_EVENT_BUDGET";
/// Conntrack lifetimes and the per-source quota ([`CtConfig`], one entry), written by the agent.
pub const CT_CONFIG: &str = "WF_CT_CONFIG";
/// Live conntrack entries per remote source ([`quota_key`] -> u64 count).
pub const CT_QUOTA: &str = "WF_CT_QUOTA";
/// The live trace's filter ([`trace::TraceFilter`], one entry), written by the tracer.
pub const TRACE: &str = "WF_TRACE";
/// The live trace's records ([`trace::TraceRecord`]), read by the tracer.
pub const TRACE_EVENTS: &str = "WF_TRACE_EVENTS";
/// The live trace's switch: the programs' data section holding `WF_TRACE_ARMED` (one u32,
/// non-zero while a tracer runs), an array of one entry as maps go. Pinned as
/// `WF_TRACE_ARMED` ([`pin_name`]).
pub const TRACE_ARMED: &str = ".bss.wf_trace";

/// The file map `name` is pinned under: its name, but for a data section's map (bpffs
/// refuses names with a dot).
pub fn pin_name(name: &str) -> &str {
    if name == TRACE_ARMED {
        "WF_TRACE_ARMED"
    } else {
        name
    }
}

/// The programs' per-CPU flow cache (`ebpf/src/flow_cache.rs`, slots [`FlowSlot`]): not
/// pinned; each loaded object has its own, which the agent only reads (the counts not yet
/// folded into conntrack). Tools may load a copy with 1 slot
/// to measure the conntrack path.
pub const FLOW_CACHE: &str = "WF_FLOW_CACHE";
/// The programs' per-CPU cache of policy decisions (`ebpf/src/verdict_cache.rs`): not
/// pinned, never touched by the agent. It relies on the agent never writing the live
/// generation's maps (write the other generation, then flip the epoch). Loaded with 1 entry
/// it never hits (tools measure the policy lookup so).
pub const VERDICT_CACHE: &str = "WF_VERDICT_CACHE";

/// Every pinned map of the object (the agent pins each under the interface's pin directory).
pub const MAPS: [&str; 17] = [
    STATE,
    SRC_V4,
    DST_V4,
    SRC_V6,
    DST_V6,
    CLASS_LENS,
    POLICY,
    CONNTRACK,
    RULE_COUNTERS,
    STATS,
    EVENTS,
    EVENT_BUDGET,
    CT_CONFIG,
    CT_QUOTA,
    TRACE,
    TRACE_EVENTS,
    TRACE_ARMED,
];

/// Program names (functions in the object file).
pub const PROG_INGRESS: &str = "wf_ingress";
pub const PROG_EGRESS: &str = "wf_egress";
/// MSS clamping alone (`CT_CONFIG[0].mss_clamp`), for a device without a policy; the two
/// policy programs clamp too. Returns `TC_ACT_UNSPEC` (next program or filter, else pass).
pub const PROG_MSS: &str = "wf_mss";

/// Load-time global (aya `EbpfLoader::set_global`): offset of the IP header in the frame,
/// 0 on L3 devices (WireGuard, tun), 14 on Ethernet (veth), for tests and benchmarks.
pub const GLOBAL_L3_OFFSET: &str = "WF_L3_OFFSET";

pub const MAX_RULES: u32 = 1 << 17; // 131072
/// Per class map (both generations). The maps are hashes without preallocation, but their
/// bucket arrays (16 bytes a bucket) are allocated at creation: 4 MiB each at 2^18.
pub const MAX_CLASS_ENTRIES: u32 = 1 << 18;
pub const MAX_POLICY_ENTRIES: u32 = 1 << 22;
/// Conntrack entries (a preallocated hash: entries leave by expiry or policy, never by
/// eviction, so no flood can push out another flow).
pub const MAX_CONNTRACK: u32 = 1 << 17;
/// Sources with a quota counter (an LRU: a source with no live entries is forgotten).
pub const MAX_CT_QUOTA_SOURCES: u32 = 1 << 16;
/// Rule index meaning "no rule" (verdicts reached without the policy map).
pub const NO_RULE: u32 = u32::MAX;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// `STATE[0]`. Generation `epoch & 1` is live. `initialized == 0` denies everything (fail
/// closed): an object loaded but never filled lets nothing through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Bumped by every policy swap; conntrack entries of an older epoch are re-checked.
    pub epoch: u32,
    pub initialized: u32,
}

impl PolicyState {
    pub fn generation(&self) -> u8 {
        (self.epoch & 1) as u8
    }
}

/// Data of an IPv4 class-map key: [generation, 4 address bytes in network order, masked
/// to the prefix, 3 zero bytes]. The key is laid out as aya's `lpm_trie::Key<ClassDataV4>`
/// (a u32 prefix length, 8 + the address prefix length, then the data), in a hash map.
pub type ClassDataV4 = [u8; 8];
/// Data of an IPv6 class-map key: [generation, 16 address bytes (masked), 3 zero bytes];
/// prefix length 8 + the address prefix length.
pub type ClassDataV6 = [u8; 20];

/// `CLASS_LENS[class_lens_index(..)]`: the address prefix lengths (bit `n` = some prefix
/// of length `n`, 0..=128) one generation's class map of one role and family holds, so a
/// lookup probes only those, longest first. Written with the class entries, before the
/// flip that makes the generation live.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassLens {
    pub bits: [u64; 3],
}

impl ClassLens {
    pub fn set(&mut self, len: u8) {
        self.bits[(len / 64) as usize] |= 1 << (len % 64);
    }
}

/// Entries of [`CLASS_LENS`]: generation × role × family.
pub const CLASS_LENS_ENTRIES: u32 = 8;

/// Index in [`CLASS_LENS`] of a generation's class map of one role (`dst`: the destination
/// role) and family.
pub const fn class_lens_index(generation: u8, dst: bool, v6: bool) -> u32 {
    (generation as u32 & 1) * 4 + (dst as u32) * 2 + v6 as u32
}

pub fn class_data_v4(generation: u8, addr: [u8; 4]) -> ClassDataV4 {
    [generation, addr[0], addr[1], addr[2], addr[3], 0, 0, 0]
}

pub fn class_data_v6(generation: u8, addr: [u8; 16]) -> ClassDataV6 {
    let mut d = [0u8; 20];
    d[0] = generation;
    let mut i = 0;
    while i < 16 {
        d[1 + i] = addr[i];
        i += 1;
    }
    d
}

/// The generation and address of an IPv4 class-map key's data ([`class_data_v4`]).
pub fn class_data_v4_parts(d: &ClassDataV4) -> (u8, [u8; 4]) {
    (d[0], [d[1], d[2], d[3], d[4]])
}

/// The generation and address of an IPv6 class-map key's data ([`class_data_v6`]).
pub fn class_data_v6_parts(d: &ClassDataV6) -> (u8, [u8; 16]) {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = d[1 + i];
        i += 1;
    }
    (d[0], a)
}

/// The address prefix length of a class-map key of prefix length `key_len` (which counts
/// the generation byte too); `None` for a key no writer makes.
pub const fn class_prefix_len(key_len: u32, v6: bool) -> Option<u8> {
    let max = if v6 { 128 } else { 32 };
    if key_len < 8 || key_len - 8 > max {
        return None;
    }
    Some((key_len - 8) as u8)
}

/// Bits of [`PolicyData`] before the protocol: generation, src, dst class.
pub const POLICY_BITS_TO_DST: u32 = 8 + 32 + 32;
/// ... through the protocol.
pub const POLICY_BITS_TO_PROTO: u32 = POLICY_BITS_TO_DST + 8;
/// ... through the whole port.
pub const POLICY_BITS_ALL: u32 = POLICY_BITS_TO_PROTO + 16;

/// Data of a policy-map LPM key: [generation, src class (4 bytes, big endian), dst class
/// (4, BE), protocol, port (2, BE), 4 zero bytes]. The key's prefix length is
/// [`POLICY_BITS_TO_DST`] (any protocol), [`POLICY_BITS_TO_PROTO`] (all ports) or
/// `POLICY_BITS_TO_PROTO + n` for a port prefix of n bits.
///
/// Ports: TCP, UDP, SCTP, UDP-Lite use the destination port; ICMP and ICMPv6 use the type
/// in the high byte and the code in the low byte; other protocols use 0.
pub type PolicyData = [u8; 16];

pub fn policy_data(generation: u8, src: u32, dst: u32, proto: u8, port: u16) -> PolicyData {
    let s = src.to_be_bytes();
    let d = dst.to_be_bytes();
    let p = port.to_be_bytes();
    [generation, s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], proto, p[0], p[1], 0, 0, 0, 0]
}

/// The generation of a policy key's data ([`policy_data`]), and the data with generation 0
/// (the same entry in either generation).
pub fn policy_data_parts(d: &PolicyData) -> (u8, PolicyData) {
    let mut rest = *d;
    rest[0] = 0;
    (d[0], rest)
}

/// Value of the policy map: the deciding rule's index per direction, [`NO_RULE`] where the
/// entry allows nothing in that direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    /// Index [`DIR_INGRESS`], [`DIR_EGRESS`].
    pub rules: [u32; 2],
}

impl Default for PolicyValue {
    fn default() -> Self {
        PolicyValue { rules: [NO_RULE; 2] }
    }
}

/// One policy-map entry as [`inherit_directions`] sees it: the key data as a big-endian
/// u128 (generation byte included), its prefix length and the rule per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRow {
    pub data: u128,
    pub prefixlen: u32,
    pub rules: [u32; 2],
}

/// Deepest nesting of policy entries: any protocol, the protocol, then port prefixes of 0
/// to 16 bits.
const MAX_POLICY_DEPTH: usize = 19;

/// Gives every row, for each direction it has no rule of (`NO_RULE`), the rule of its
/// longest containing row that has one. `rows` must be sorted by (data, prefixlen) with
/// distinct keys, data masked to the prefix (as the compiler makes them): that order visits
/// every row after the rows containing it, so a stack of the open ones suffices.
pub fn inherit_directions(rows: &mut [PolicyRow]) {
    let mut stack = [(0u128, 0u32, [NO_RULE; 2]); MAX_POLICY_DEPTH + 1];
    let mut depth = 0;
    for row in rows.iter_mut() {
        while depth > 0 {
            let (data, plen, _) = stack[depth - 1];
            let mask = u128::MAX.checked_shl(128 - plen).unwrap_or(0);
            if plen <= row.prefixlen && (data ^ row.data) & mask == 0 {
                break;
            }
            depth -= 1;
        }
        if depth > 0 {
            for (mine, parent) in row.rules.iter_mut().zip(stack[depth - 1].2) {
                if *mine == NO_RULE {
                    *mine = parent;
                }
            }
        }
        // Deeper nesting than the key layout allows cannot happen; keep the last level.
        let at = depth.min(MAX_POLICY_DEPTH);
        stack[at] = (row.data, row.prefixlen, row.rules);
        depth = at + 1;
    }
}

/// Value of the class maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassValue {
    pub class: u32,
}

/// A flow as seen in one packet. IPv4 addresses are IPv4-mapped into 16 bytes
/// (::ffff:a.b.c.d). For ICMP echo, `sport` is the identifier in requests and `dport` the
/// identifier in replies, so a reply's reversed tuple is its request's tuple. Aligned to 8
/// (no padding: 40 bytes either way) so the programs can read it in words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Direction of the packet that created the entry ([`DIR_INGRESS`]/[`DIR_EGRESS`]).
    pub direction: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The tuple of a packet going the other way (a reply), in the other direction.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            direction: self.direction ^ 1,
            _pad: [0; 2],
        }
    }

    /// The source address as two native-endian words (one load each).
    #[inline(always)]
    pub fn src_words(&self) -> [u64; 2] {
        // SAFETY: FlowKey is align(8) and `src` sits at offset 0: 16 aligned bytes.
        unsafe { *(self.src.as_ptr() as *const [u64; 2]) }
    }

    /// The destination address as two native-endian words (one load each).
    #[inline(always)]
    pub fn dst_words(&self) -> [u64; 2] {
        // SAFETY: FlowKey is align(8) and `dst` sits at offset 16: 16 aligned bytes.
        unsafe { *(self.dst.as_ptr() as *const [u64; 2]) }
    }

    /// The key conntrack files this tuple's flow under, and whether it is [`reversed`]:
    /// of the tuple and its reversal, the one whose (source address, source port) orders
    /// first ([`tuple_swaps`]). A packet and its reply give the same key.
    ///
    /// [`reversed`]: FlowKey::reversed
    pub fn canonical(&self) -> (FlowKey, bool) {
        let swap = tuple_swaps(self.src_words(), self.dst_words(), self.sport, self.dport, self.direction);
        (self.oriented(swap as u64), swap)
    }

    /// This tuple, [`reversed`] if `swap` is 1 (0: as it is), without a branch (the
    /// programs' verifier would walk what follows once per orientation).
    ///
    /// [`reversed`]: FlowKey::reversed
    #[inline(always)]
    pub fn oriented(&self, swap: u64) -> FlowKey {
        let (s, d) = (self.src_words(), self.dst_words());
        let (sp, dp) = (self.sport as u64, self.dport as u64);
        let m = (swap & 1).wrapping_neg();
        let pick = |a: u64, b: u64| a & !m | b & m;
        FlowKey {
            src: unwords([pick(s[0], d[0]), pick(s[1], d[1])]),
            dst: unwords([pick(d[0], s[0]), pick(d[1], s[1])]),
            sport: pick(sp, dp) as u16,
            dport: pick(dp, sp) as u16,
            proto: self.proto,
            direction: self.direction ^ (swap & 1) as u8,
            _pad: [0; 2],
        }
    }
}

/// Whether a flow's canonical key is the reversal of the tuple (source `s`, port `sport`;
/// destination `d`, port `dport`; addresses as native-endian words of their bytes;
/// `direction`): the source orders after the destination, or, for a tuple whose two ends
/// are the same (a host talking to itself), the direction is egress, so that such a
/// packet and its answer share a key too. The order is arbitrary but fixed (the programs
/// and the agent both use this function).
#[inline(always)]
pub fn tuple_swaps(s: [u64; 2], d: [u64; 2], sport: u16, dport: u16, direction: u8) -> bool {
    (s[0], s[1], sport, direction & 1) > (d[0], d[1], dport, (direction & 1) ^ 1)
}

/// Two words back into a 16-byte address (memory order).
#[inline(always)]
fn unwords(w: [u64; 2]) -> [u8; 16] {
    // SAFETY: 16 plain bytes either way.
    unsafe { core::mem::transmute(w) }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Policy epoch under which the flow was last found allowed.
    pub epoch: u32,
    pub rule: u32,
    /// bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC) of the flow's last packet, refreshed when
    /// older than a sixteenth of its lifetime (at most once a second).
    pub last_seen_ns: u64,
    /// [`CtState`] as a u32 (see [`CtState::from_u32`]).
    pub state: u32,
    /// [`FLOW_QUOTA_COUNTED`]: the entry counts against its source's quota.
    pub flags: u32,
    /// bpf_ktime_get_coarse_ns() of the flow's first packet.
    pub first_seen_ns: u64,
    /// Packets and bytes (`skb->len`) of the flow, both directions: the first packet's,
    /// those the conntrack path passes without filling a flow-cache slot (closing flows,
    /// short lifetimes) and, folded in, what the per-CPU [`FlowSlot`]s counted (the packet
    /// that filled the slot and its hits) when a slot is refilled, taken by another flow or
    /// dropped. Added atomically: CPUs share the entry.
    pub packets: u64,
    pub bytes: u64,
    /// Only in the `next-layout` test build ([`layout::CONNTRACK_V5`]): a word a future
    /// layout adds, always zero, so that build's conntrack map has another value size.
    #[cfg(feature = "next-layout")]
    pub next: u64,
}

/// `FlowValue::flags`: the entry was counted in [`CT_QUOTA`] under the packet source of the
/// flow's first (ingress) packet, so whoever deletes it takes one off that count.
pub const FLOW_QUOTA_COUNTED: u32 = 1;
/// `FlowValue::flags`: the entry's key is the reversal of its flow's first packet
/// ([`FlowKey::canonical`] swapped it).
pub const FLOW_SWAPPED: u32 = 2;

/// One slot of the flow cache (`FLOW_CACHE`, a per-CPU array the programs keep and the
/// agent only reads): the verdict conntrack gave the packets of one tuple (`key`, as the
/// packet had it, not canonical), and what this CPU passed on it since it was filled, not
/// yet folded into the conntrack entry.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub key: FlowKey,
    pub epoch: u32,
    pub rule: u32,
    /// Low 32 bits of jiffies when filled, with bit 0 set; 0: empty (matches no packet).
    pub stamp: u32,
    /// [`slot_time`] of when the slot was filled: its counts belong to a conntrack entry
    /// only if that entry's flow was first seen no later.
    pub since: u32,
    /// Packets (high 32 bits) and bytes (low 32 bits) counted and not yet folded: one word,
    /// so a hit counts with one add. Bytes stay below 2^31 (a slot past that sends its next
    /// packet through conntrack, which folds it), so they never carry into the packets.
    pub counts: u64,
}

/// A coarse ns time as the flow cache records it: in units of 2^20 ns (about a
/// millisecond), wrapping after 52 days.
#[inline(always)]
pub const fn slot_time(ns: u64) -> u32 {
    (ns >> 20) as u32
}

/// What one packet of `len` bytes adds to [`FlowSlot::counts`].
#[inline(always)]
pub const fn slot_count(len: u32) -> u64 {
    1 << 32 | len as u64
}

/// [`FlowSlot::counts`] past which a slot is folded first.
pub const SLOT_MAX_BYTES: u64 = 1 << 31;

impl FlowSlot {
    #[inline(always)]
    pub const fn packets(&self) -> u64 {
        self.counts >> 32
    }

    #[inline(always)]
    pub const fn bytes(&self) -> u64 {
        self.counts & 0xffff_ffff
    }

    /// Whether this slot's counts were made while the entry of a flow first seen at
    /// `first_seen_ns` existed (not by an earlier flow of the same tuple).
    #[inline(always)]
    pub fn counts_for(&self, first_seen_ns: u64) -> bool {
        self.since.wrapping_sub(slot_time(first_seen_ns)) as i32 >= 0
    }
}

impl FlowValue {
    /// The tuple of the first packet of the flow filed under `key` (the canonical key).
    pub fn first_packet(&self, key: &FlowKey) -> FlowKey {
        if self.flags & FLOW_SWAPPED != 0 {
            key.reversed()
        } else {
            *key
        }
    }
}

/// Where a tracked flow is in its life; each state has its own idle timeout ([`CtConfig`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtState {
    /// Only the first direction has been seen (TCP: a SYN; UDP: no answer yet).
    New = 0,
    /// The other side answered.
    Established = 1,
    /// TCP: a FIN was seen.
    Closing = 2,
    /// TCP: a RST was seen.
    Closed = 3,
}

impl CtState {
    pub const fn from_u32(v: u32) -> Option<CtState> {
        match v {
            0 => Some(CtState::New),
            1 => Some(CtState::Established),
            2 => Some(CtState::Closing),
            3 => Some(CtState::Closed),
            _ => None,
        }
    }
}

/// Index in [`CtConfig::timeouts_ms`] of the lifetime of a flow of protocol `proto` in
/// `state`: TCP by state, UDP-like (UDP, UDP-Lite, SCTP) and everything else (ICMP echo,
/// other protocols) by whether the flow was answered.
pub const fn ct_timeout_index(proto: u8, state: u32) -> usize {
    match proto {
        6 => (state & 3) as usize,
        17 | 136 | 132 => 4 + (state != 0) as usize,
        _ => 6 + (state != 0) as usize,
    }
}

pub const CT_TIMEOUTS: usize = 8;

/// Default idle lifetimes in ms, in the spirit of nftables' conntrack: TCP unanswered SYN
/// 120 s, established 5 days, after FIN 120 s, after RST 10 s; UDP-like 30 s unanswered,
/// 120 s answered; ICMP echo and other protocols 30 s unanswered, 600 s answered.
pub const CT_DEFAULT_TIMEOUTS_MS: [u32; CT_TIMEOUTS] =
    [120_000, 432_000_000, 120_000, 10_000, 30_000, 120_000, 30_000, 600_000];

/// Default [`CtConfig::quota`]: live entries one remote source may create (1/16 of the table).
pub const CT_DEFAULT_QUOTA: u32 = MAX_CONNTRACK / 16;

/// `CT_CONFIG[0]`: the programs' settings. A zero conntrack field means its default (so an
/// object the agent has not configured yet still tracks with the defaults); a zero
/// `mss_clamp` clamps nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtConfig {
    /// Idle lifetime per [`ct_timeout_index`], in ms.
    pub timeouts_ms: [u32; CT_TIMEOUTS],
    /// Live entries created by ingress packets of one source ([`quota_key`]); a new flow
    /// over it passes untracked (its answers are judged by the policy), counted in
    /// `STATS[CT_UNTRACKED]`.
    pub quota: u32,
    /// Largest TCP MSS a SYN or SYN-ACK crossing the device may announce ([`MssClamp`]).
    /// Was padding in layout version 1, so always 0 (no clamping) where no agent set it.
    pub mss_clamp: MssClamp,
}

/// The MSS limits of [`CtConfig::mss_clamp`], per family; 0 leaves that family alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MssClamp {
    pub v4: u16,
    pub v6: u16,
}

impl MssClamp {
    pub const OFF: MssClamp = MssClamp { v4: 0, v6: 0 };

    /// What a tunnel MTU allows: MTU less the IPv4 (20) or IPv6 (40) header and TCP's (20).
    pub const fn for_mtu(mtu: u32) -> MssClamp {
        const fn fit(v: u32) -> u16 {
            if v > u16::MAX as u32 {
                u16::MAX
            } else {
                v as u16
            }
        }
        MssClamp { v4: fit(mtu.saturating_sub(40)), v6: fit(mtu.saturating_sub(60)) }
    }
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig { timeouts_ms: CT_DEFAULT_TIMEOUTS_MS, quota: CT_DEFAULT_QUOTA, mss_clamp: MssClamp::OFF }
    }
}

impl CtConfig {
    /// The lifetime in ns of a flow of `proto` in `state` (defaults for zero fields).
    pub fn timeout_ns(&self, proto: u8, state: u32) -> u64 {
        let i = ct_timeout_index(proto, state);
        let ms = if self.timeouts_ms[i] == 0 { CT_DEFAULT_TIMEOUTS_MS[i] } else { self.timeouts_ms[i] };
        ms as u64 * 1_000_000
    }

    pub fn quota(&self) -> u32 {
        if self.quota == 0 {
            CT_DEFAULT_QUOTA
        } else {
            self.quota
        }
    }
}

/// The quota counter key of a remote source address (16 bytes as in [`FlowKey`]): IPv4
/// addresses whole, IPv6 addresses by their /64 (one host can use a whole /64).
pub fn quota_key(src: &[u8; 16]) -> [u8; 16] {
    let mut k = *src;
    let v4 = k[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if !v4 {
        let mut i = 8;
        while i < 16 {
            k[i] = 0;
            i += 1;
        }
    }
    k
}

/// Per-CPU, per-rule counter (index = rule index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Indices of the per-CPU [`STATS`] array ([`Counter`] each).
pub mod stat {
    pub const ALLOWED_NEW: u32 = 0;
    pub const ALLOWED_ESTABLISHED: u32 = 1;
    pub const DENIED: u32 = 2;
    /// Dropped: headers could not be parsed (truncated, malformed, too many extension headers).
    pub const MALFORMED: u32 = 3;
    /// Dropped: the policy was never initialised (fail closed).
    pub const UNINITIALIZED: u32 = 4;
    /// Events not sent: ring buffer full or over the rate limit.
    pub const EVENTS_LOST: u32 = 5;
    /// Non-first fragments seen (decided without ports, see `ebpf/`).
    pub const FRAGMENTS: u32 = 6;
    /// Passed: not IPv4 or IPv6 (ARP on Ethernet test devices); WireGuard carries only IP.
    /// Not IPv4 or IPv6: passed on an Ethernet test device (ARP), dropped on an L3 device
    /// (WireGuard carries only IP, so anything else there is forged or broken).
    pub const NOT_IP: u32 = 7;
    /// Passed untracked: an allowed new flow got no conntrack entry (its source is over
    /// its quota, or the table is full), so its answers are judged by the policy. Also
    /// counted in `ALLOWED_NEW`.
    pub const CT_UNTRACKED: u32 = 8;
    pub const COUNT: u32 = 9;
}

pub const EVENT_DENY: u32 = 1;
pub const EVENT_NEW_FLOW: u32 = 2;
/// Set in [`Event::port`] when it holds the packet's policy port.
pub const EVENT_PORT: u32 = 1 << 16;

/// A ring buffer record: a denied packet or a newly allowed flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub rule: u32,
    pub flow: FlowKey,
    pub len: u32,
    /// The policy port the packet was judged by (destination port, or ICMP/ICMPv6
    /// `type << 8 | code`, which `flow` does not hold) with [`EVENT_PORT`] set; 0 for a
    /// fragment without ports and from programs built before it was recorded.
    pub port: u32,
}

/// Per-CPU token bucket limiting events: `tokens` refill at [`EVENT_RATE_PER_SEC`] up to
/// [`EVENT_BURST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub last_ns: u64,
    pub tokens: u64,
}

pub const EVENT_RATE_PER_SEC: u64 = 1000;
pub const EVENT_BURST: u64 = 100;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)], padding-free, every bit pattern valid.
    unsafe impl aya::Pod for PolicyState {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for ClassValue {}
    unsafe impl aya::Pod for ClassLens {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FlowSlot {}
    unsafe impl aya::Pod for CtConfig {}
    unsafe impl aya::Pod for MssClamp {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for EventBudget {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PolicyState>(), 8);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), if cfg!(feature = "next-layout") { 56 } else { 48 });
        assert_eq!(size_of::<FlowSlot>(), 64);
        assert_eq!(size_of::<CtConfig>(), 40);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<Event>(), 56);
        assert_eq!(size_of::<EventBudget>(), 16);
        assert_eq!(size_of::<PolicyValue>(), 8);
    }

    #[test]
    fn policy_key_layout() {
        let k = policy_data(1, 0x01020304, 0x0a0b0c0d, 6, 0x1f90);
        assert_eq!(k, [1, 1, 2, 3, 4, 10, 11, 12, 13, 6, 0x1f, 0x90, 0, 0, 0, 0]);
        assert_eq!(POLICY_BITS_ALL, 96);
        assert_eq!(
            class_data_v6(1, [0xfd; 16])[..17],
            [1, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd, 0xfd]
        );
    }
}

#[cfg(test)]
mod inherit_tests {
    use super::*;

    fn row(port: u16, plen: u32, rules: [u32; 2]) -> PolicyRow {
        PolicyRow { data: u128::from_be_bytes(policy_data(0, 1, 1, 6, port)), prefixlen: plen, rules }
    }

    #[test]
    fn directions_are_inherited_from_the_longest_container() {
        let n = NO_RULE;
        let any = PolicyRow {
            data: u128::from_be_bytes(policy_data(0, 1, 1, 0, 0)),
            prefixlen: POLICY_BITS_TO_DST,
            rules: [n, 5],
        };
        let mut rows = [
            any,
            row(0, POLICY_BITS_TO_PROTO, [3, n]),
            row(8000, POLICY_BITS_TO_PROTO + 10, [n, 2]),
            row(8000, POLICY_BITS_TO_PROTO + 16, [1, n]),
            row(9000, POLICY_BITS_TO_PROTO + 16, [n, n]),
        ];
        inherit_directions(&mut rows);
        let got: [[u32; 2]; 5] = core::array::from_fn(|i| rows[i].rules);
        assert_eq!(got, [[n, 5], [3, 5], [3, 2], [1, 2], [3, 5]]);
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    fn key(src: u8, sport: u16, dst: u8, dport: u16, direction: u8) -> FlowKey {
        let addr = |b: u8| core::array::from_fn(|i| if i == 15 { b } else { 0xfd });
        FlowKey { src: addr(src), dst: addr(dst), sport, dport, proto: 17, direction, _pad: [0; 2] }
    }

    #[test]
    fn a_tuple_and_its_reply_share_one_canonical_key() {
        for k in [key(1, 5000, 2, 53, 0), key(2, 53, 1, 5000, 1), key(9, 1, 9, 2, 0), key(9, 2, 9, 1, 1)] {
            let (c, swapped) = k.canonical();
            let (r, rswapped) = k.reversed().canonical();
            assert_eq!(c, r, "{k:?}");
            assert_ne!(swapped, rswapped, "{k:?}: exactly one of the two orientations is swapped");
            let value = FlowValue { flags: if swapped { FLOW_SWAPPED } else { 0 }, ..Default::default() };
            assert_eq!(value.first_packet(&c), k);
        }
        // The direction is part of the flow: the same tuple the other way in is another flow.
        assert_ne!(key(1, 5000, 2, 53, 0).canonical().0, key(1, 5000, 2, 53, 1).canonical().0);
        // A packet to itself (same address and port) and its answer: the ingress one is
        // the canonical key.
        assert_eq!(key(3, 7, 3, 7, 0).canonical(), (key(3, 7, 3, 7, 0), false));
        assert_eq!(key(3, 7, 3, 7, 1).canonical(), (key(3, 7, 3, 7, 0), true));
    }

    #[test]
    fn a_slots_counts_belong_only_to_an_entry_first_seen_by_its_fill() {
        let ms = 1u64 << 20;
        let slot = FlowSlot { since: slot_time(50 * ms), ..Default::default() };
        assert!(slot.counts_for(50 * ms) && slot.counts_for(10 * ms));
        assert!(!slot.counts_for(51 * ms), "an entry made after the slot was filled: an earlier flow's counts");
        // Across the wrap of the 32-bit time (52 days).
        let wrap = (1u64 << 52) * 2;
        let late = FlowSlot { since: slot_time(wrap + 3 * ms), ..Default::default() };
        assert!(late.counts_for(wrap - 3 * ms) && !late.counts_for(wrap + 4 * ms));
    }

    #[test]
    fn the_source_decides_then_the_source_port() {
        let (lo, hi) = (key(1, 9, 2, 1, 0), key(2, 1, 1, 9, 0));
        assert!(!lo.canonical().1 && hi.canonical().1);
        let (lo, hi) = (key(5, 1, 5, 9, 0), key(5, 9, 5, 1, 0));
        assert!(!lo.canonical().1 && hi.canonical().1);
        assert_eq!(hi.oriented(0), hi);
        assert_eq!(hi.oriented(1), hi.reversed());
    }

    #[test]
    fn key_decoders_invert_the_constructors() {
        let a4 = [10, 77, 0, 0];
        assert_eq!(class_data_v4_parts(&class_data_v4(1, a4)), (1, a4));
        let a6 = core::array::from_fn(|i| i as u8 * 3);
        assert_eq!(class_data_v6_parts(&class_data_v6(0, a6)), (0, a6));
        assert_eq!(class_prefix_len(8 + 24, false), Some(24));
        assert_eq!(class_prefix_len(8 + 33, false), None);
        assert_eq!(class_prefix_len(8 + 128, true), Some(128));
        assert_eq!(class_prefix_len(7, true), None);
        let d = policy_data(1, 7, 9, 6, 443);
        assert_eq!(policy_data_parts(&d), (1, policy_data(0, 7, 9, 6, 443)));
    }
}
