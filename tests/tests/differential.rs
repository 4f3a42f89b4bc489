//! Differential test of the data path: random policies and random packets; the eBPF
//! classifiers' verdict (BPF_PROG_TEST_RUN on maps written by the real compiler and the real
//! [`Enforcer`]) against the reference evaluator [`evaluate`], which walks the rules one by
//! one. At least 100,000 cases per run, zero mismatches. Needs root (bpffs, eBPF).
//!
//! - Policies come from a seeded RNG (printed; `WIREFENCE_DIFF_SEED=<n>` replays a run):
//!   IPv4 and IPv6 prefixes drawn around a few anchor addresses (so they nest and overlap
//!   and packets land on their edges), protocols any/tcp/udp/udplite/sctp/icmp/icmpv6 and
//!   other numbers, port ranges around interesting edges, directions both/ingress/egress.
//!   Many policies per run go through one `Enforcer` (a fresh one now and then, adopting the
//!   pins as a restarted agent does), so every apply fills the inactive generation by
//!   difference with what it held two policies ago and flips the epoch; rule ids are reused
//!   across policies (stable counter slots, stable class ids).
//! - Packets are the first packets of flows, both directions, IPv4 and IPv6: TCP, UDP,
//!   UDP-Lite, SCTP, ICMP/ICMPv6 echo, informational and error messages (errors quote a
//!   packet), other protocols, non-first fragments (decided without ports), first
//!   fragments, IPv4 options and IPv6 extension headers.
//! - Conntrack: an allowed tracked packet inserts an entry under its tuple, and a later packet
//!   with that tuple or its reverse (or an ICMP error quoting it) would pass as established
//!   whatever the policy says. The test mirrors every entry the program must have created
//!   and never sends a packet whose conntrack lookups could hit one (it draws another); at
//!   the end of each policy the kernel's table must equal the mirror, and it is flushed.
//! - Checks per case: the verdict (TC_ACT_OK = allow, TC_ACT_SHOT = deny); for every allowed
//!   case the deciding rule — the conntrack entry's rule (tracked packets) or the rule
//!   counter that went up (fragments, ICMP informational and error messages) — must be the
//!   counter slot of `Decision.rule`'s id. Per policy: STATS deltas (nothing established,
//!   nothing malformed) and per-rule counter deltas.
//!
//! On mismatch the test collects up to 10 reports (seed, policy, packet, frame, both verdicts
//! and `simulate` on the compiled maps, which tells compiler from writer/program), shrinks
//! the first one to a minimal policy and fails. When all agree, a self-check corrupts the live
//! policy entries and asserts that the same comparisons report it.
//!
//! The frames carry an Ethernet header and the programs run with the Ethernet offset 14: the
//! kernel's test runner takes `skb->protocol` from bytes 12..14, so any address can be used
//! (the L3 offset 0 is covered by `bpf_program.rs`). IPv4-mapped IPv6 addresses are never
//! generated: the parser drops them on purpose (they would alias IPv4 conntrack entries),
//! which the evaluator does not model.
//!
//! Environment: `WIREFENCE_DIFF_SEED`, `WIREFENCE_DIFF_POLICIES` (default 60),
//! `WIREFENCE_DIFF_PACKETS` (per policy, default 2000).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use ipnet::IpNet;
use wirefence_agent::enforce::{self, Enforcer};
use wirefence_agent::model::IfName;
use wirefence_agent::policy::model::has_ports;
use wirefence_agent::policy::{
    self as pol, compile, evaluate, simulate, Compiled, Decision, Direction, Policy, PortRange, Rule, RuleDirection,
};
use wirefence_common::{self as common, Counter, FlowKey, FlowValue, PolicyData, PolicyValue};
use wirefence_tests::packet as wire;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// IP header offset in the test frames (Ethernet).
const L3_OFFSET: u32 = 14;
const MAX_MISMATCHES: usize = 10;
/// Mismatches reported per policy before moving on to the next one.
const MAX_MISMATCHES_PER_POLICY: usize = 3;

// ---------------------------------------------------------------------------------------
// Randomness (SplitMix64: tiny, seedable, good enough for test data).

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len() as u64) as usize]
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// Fewer than `max` random bytes.
    fn bytes_below(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

// ---------------------------------------------------------------------------------------
// Addresses and prefixes.

const V4_ANCHORS: &[[u8; 4]] = &[
    [10, 0, 0, 0],
    [10, 0, 0, 1],
    [10, 0, 0, 2],
    [10, 0, 0, 7],
    [10, 0, 0, 128],
    [10, 0, 0, 255],
    [10, 0, 1, 0],
    [10, 0, 1, 1],
    [10, 0, 1, 255],
    [10, 1, 0, 1],
    [10, 1, 2, 3],
    [10, 255, 255, 255],
    [11, 0, 0, 1],
    [172, 16, 0, 1],
    [192, 168, 1, 1],
    [192, 168, 1, 2],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
];
const V4_LENS: &[u8] = &[0, 1, 7, 8, 9, 15, 16, 17, 23, 24, 25, 28, 30, 31, 32, 32, 32, 32];

const V6_ANCHORS: &[u128] = &[
    0xfd00_0000_0000_0000_0000_0000_0000_0000,
    0xfd00_0000_0000_0000_0000_0000_0000_0001,
    0xfd00_0000_0000_0000_0000_0000_0000_0002,
    0xfd00_0000_0000_0000_0000_0000_0000_00ff,
    0xfd00_0000_0000_0001_0000_0000_0000_0001,
    0xfd00_0000_0000_0001_0000_0000_0000_0002,
    0xfd00_0001_0000_0000_0000_0000_0000_0001,
    0xfd00_0000_0000_0000_8000_0000_0000_0001,
    0xfdff_ffff_ffff_ffff_ffff_ffff_ffff_ffff,
    0x2001_0db8_0000_0000_0000_0000_0000_0001,
    0x2001_0db8_0000_0001_0000_0000_0000_0001,
    0xfe80_0000_0000_0000_0000_0000_0000_0001,
    0x0000_0000_0000_0000_0000_0000_0000_0001,
    0x0000_0000_0000_0000_0000_0000_0000_0000,
    u128::MAX,
];
const V6_LENS: &[u8] = &[0, 1, 7, 8, 15, 16, 32, 47, 48, 63, 64, 65, 96, 112, 120, 126, 127, 128, 128, 128, 128];

fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_bits(v6: bool, b: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::from(b as u32))
    }
}

fn max_bits(v6: bool) -> u128 {
    if v6 {
        u128::MAX
    } else {
        u128::from(u32::MAX)
    }
}

fn host_mask(n: &IpNet) -> u128 {
    let width = if is_v6(n) { 128 } else { 32 };
    let host = width - u32::from(n.prefix_len());
    if host == 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    }
}

fn is_v6(n: &IpNet) -> bool {
    matches!(n, IpNet::V6(_))
}

fn is_v4_mapped(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v) if v.to_ipv4_mapped().is_some())
}

fn anchor(rng: &mut Rng, v6: bool) -> u128 {
    if v6 {
        rng.pick(V6_ANCHORS)
    } else {
        u128::from(u32::from_be_bytes(rng.pick(V4_ANCHORS)))
    }
}

fn gen_prefix(rng: &mut Rng, v6: bool) -> IpNet {
    let bits = anchor(rng, v6);
    let len = rng.pick(if v6 { V6_LENS } else { V4_LENS });
    IpNet::new(from_bits(v6, bits), len).expect("valid length").trunc()
}

/// An address in or at the edge of `n`: network, broadcast, one outside either end, or a
/// random host.
fn near(rng: &mut Rng, n: &IpNet) -> IpAddr {
    let v6 = is_v6(n);
    let first = addr_bits(n.network());
    let last = first | host_mask(n);
    let bits = match rng.below(8) {
        0 => first,
        1 => last,
        2 => first.checked_sub(1).unwrap_or(first),
        3 if last < max_bits(v6) => last + 1,
        _ => first | (rng.u128() & host_mask(n)),
    };
    from_bits(v6, bits)
}

/// A packet address: near one of `focus` (the aimed-at rule's prefixes), near any rule
/// prefix of the family, an anchor, or an anchor with its low byte changed.
fn gen_addr(rng: &mut Rng, v6: bool, focus: &[IpNet], all: &[IpNet]) -> IpAddr {
    loop {
        // Percentages near the focus and near any rule prefix; the rest near anchors.
        let (p_focus, p_all) = if focus.is_empty() { (0, 70) } else { (75, 10) };
        let r = rng.below(100);
        let a = if r < p_focus {
            let n = focus[rng.below(focus.len() as u64) as usize];
            near(rng, &n)
        } else if r < p_focus + p_all && !all.is_empty() {
            let n = all[rng.below(all.len() as u64) as usize];
            near(rng, &n)
        } else if r < 90 {
            from_bits(v6, anchor(rng, v6))
        } else {
            from_bits(v6, anchor(rng, v6) ^ u128::from(rng.u8()))
        };
        if !is_v4_mapped(&a) {
            return a;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Policies.

const INTERESTING_PORTS: &[u16] =
    &[0, 1, 2, 21, 22, 23, 53, 79, 80, 81, 443, 1023, 1024, 1025, 8000, 8080, 32767, 32768, 49152, 65534, 65535];
/// Protocol numbers without a special meaning to the parser (in both families).
const OTHER_PROTOS: &[u8] = &[2, 47, 50, 59, 103, 253, 255];
/// IPv6 extension header numbers: never the final protocol of an IPv6 packet.
const V6_EXT: &[u8] = &[0, 43, 44, 51, 60];

fn gen_port(rng: &mut Rng) -> u16 {
    if rng.pct(70) {
        rng.pick(INTERESTING_PORTS)
    } else {
        rng.u16()
    }
}

fn gen_ports(rng: &mut Rng) -> Vec<PortRange> {
    if rng.pct(35) {
        return Vec::new();
    }
    (0..1 + rng.below(3))
        .map(|_| match rng.below(100) {
            0..40 => {
                let p = gen_port(rng);
                PortRange { first: p, last: p }
            }
            40..85 => {
                let (a, b) = (gen_port(rng), gen_port(rng));
                PortRange { first: a.min(b), last: a.max(b) }
            }
            85..90 => PortRange { first: 0, last: 65535 },
            90..95 => PortRange { first: gen_port(rng), last: 65535 },
            _ => PortRange { first: 0, last: gen_port(rng) },
        })
        .collect()
}

fn gen_proto(rng: &mut Rng) -> Option<u8> {
    Some(match rng.below(100) {
        0..14 => return None,
        14..36 => 6,
        36..52 => 17,
        52..61 => 1,
        61..70 => 58,
        70..76 => 132,
        76..81 => 136,
        81..84 => 0,
        _ => rng.pick(OTHER_PROTOS),
    })
}

/// A prefix of the family: half the time derived from a prefix other rules already use (the
/// same, a shorter one containing it, or a longer one inside it), so rules overlap and tie.
fn gen_related_prefix(rng: &mut Rng, v6: bool, existing: &[IpNet]) -> IpNet {
    let same = of_family(existing, v6);
    if same.is_empty() || rng.pct(50) {
        return gen_prefix(rng, v6);
    }
    let n = same[rng.below(same.len() as u64) as usize];
    let width = if v6 { 128 } else { 32 };
    let len = match rng.below(3) {
        0 => n.prefix_len(),
        1 => (n.prefix_len() + 1 + rng.below(8) as u8).min(width),
        _ => n.prefix_len().saturating_sub(1 + rng.below(8) as u8),
    };
    let inside = addr_bits(n.network()) | (rng.u128() & host_mask(&n));
    IpNet::new(from_bits(v6, inside), len).expect("valid length").trunc()
}

fn gen_rule(rng: &mut Rng, id: String, existing: &[Rule]) -> Rule {
    let from_pool: Vec<IpNet> = existing.iter().flat_map(|r| r.from.iter().copied()).collect();
    let to_pool: Vec<IpNet> = existing.iter().flat_map(|r| r.to.iter().copied()).collect();
    loop {
        // Sometimes the protocol and ports of another rule (identical keys: the lower index wins).
        let copy = if !existing.is_empty() && rng.pct(25) {
            Some(&existing[rng.below(existing.len() as u64) as usize])
        } else {
            None
        };
        let proto = match copy {
            Some(r) => r.proto,
            None => gen_proto(rng),
        };
        // Mostly one family per rule; some rules mix both.
        let fams: &[bool] = match rng.below(10) {
            0..4 => &[false],
            4..8 => &[true],
            _ => &[false, true],
        };
        let nets = |rng: &mut Rng, pool: &[IpNet]| -> Vec<IpNet> {
            (0..1 + rng.below(3))
                .map(|_| {
                    let v6 = rng.pick(fams);
                    gen_related_prefix(rng, v6, pool)
                })
                .collect()
        };
        let from = nets(rng, &from_pool);
        let to = nets(rng, &to_pool);
        let ports = match copy {
            Some(r) => r.ports.clone(),
            None if proto.is_some_and(has_ports) => gen_ports(rng),
            None => Vec::new(),
        };
        let direction = match rng.below(4) {
            0 | 1 => RuleDirection::Both,
            2 => RuleDirection::Ingress,
            _ => RuleDirection::Egress,
        };
        let rule = Rule { id: id.clone(), from, to, proto, ports, direction };
        if rule.satisfiable() {
            return rule;
        }
    }
}

/// Rule ids come from a small pool, so later policies reuse them (stable counter slots).
const ID_POOL: u64 = 96;

fn fresh_id(rng: &mut Rng, rules: &[Rule]) -> String {
    loop {
        let id = format!("r{}", rng.below(ID_POOL));
        if rules.iter().all(|r| r.id != id) {
            return id;
        }
    }
}

fn gen_policy(rng: &mut Rng) -> Policy {
    let n = match rng.below(100) {
        0..4 => 0,
        4..10 => 40 + rng.below(40),
        _ => 1 + rng.below(24),
    };
    let mut rules: Vec<Rule> = Vec::new();
    for _ in 0..n {
        let id = fresh_id(rng, &rules);
        let rule = gen_rule(rng, id, &rules);
        rules.push(rule);
    }
    Policy::new(rules).expect("generated rules are valid")
}

/// A small change of `prev`: rules removed, added, rewritten, swapped (tie order) or renamed.
fn mutate(rng: &mut Rng, prev: &Policy) -> Policy {
    let mut rules = prev.rules().to_vec();
    for _ in 0..1 + rng.below(3) {
        let n = rules.len() as u64;
        match rng.below(5) {
            0 if n > 0 => {
                rules.remove(rng.below(n) as usize);
            }
            1 if n > 0 => {
                let i = rng.below(n) as usize;
                let id = rules[i].id.clone();
                rules[i] = gen_rule(rng, id, &rules);
            }
            2 if n > 1 => rules.swap(rng.below(n) as usize, rng.below(n) as usize),
            3 if n > 0 => {
                let i = rng.below(n) as usize;
                rules[i].id = fresh_id(rng, &rules);
            }
            _ => {
                let id = fresh_id(rng, &rules);
                let rule = gen_rule(rng, id, &rules);
                rules.insert(rng.below(n + 1) as usize, rule);
            }
        }
    }
    Policy::new(rules).expect("mutated rules are valid")
}

// ---------------------------------------------------------------------------------------
// Packets.

fn mapped(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn family_icmp(v6: bool) -> u8 {
    if v6 {
        wire::IPPROTO_ICMPV6
    } else {
        wire::IPPROTO_ICMP
    }
}

fn echo_types(v6: bool) -> (u8, u8) {
    if v6 {
        (128, 129)
    } else {
        (8, 0)
    }
}

fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 11 | 12)
    }
}

/// The conntrack key the program derives for a whole (non-fragment) packet travelling in
/// `dir`, if it is connection-tracked (the `FlowKey` contract in `wirefence-common`).
fn tracked_key(v6: bool, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], dir: u8) -> Option<FlowKey> {
    let (sport, dport) = if has_ports(proto) {
        (be16(&l4[0..2]), be16(&l4[2..4]))
    } else if proto == family_icmp(v6) {
        let (req, rep) = echo_types(v6);
        let id = be16(&l4[4..6]);
        match l4[0] {
            t if t == req => (id, 0),
            t if t == rep => (0, id),
            _ => return None,
        }
    } else {
        (0, 0)
    };
    Some(FlowKey { src: mapped(src), dst: mapped(dst), sport, dport, proto, direction: dir, _pad: [0; 2] })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// TCP/UDP/UDP-Lite/SCTP, ICMP echo, other protocols: connection-tracked.
    Tracked,
    /// ICMP informational other than echo.
    Untracked,
    /// ICMP error (quoting a packet that is never in conntrack).
    IcmpError,
    /// Non-first fragment.
    Fragment,
}

#[derive(Clone, Debug)]
struct Case {
    eval: pol::Packet,
    wire: wire::Packet,
    what: String,
    kind: Kind,
    /// The conntrack entry an allowed packet creates.
    track: Option<FlowKey>,
    /// Conntrack keys whose presence would make the packet established.
    probes: Vec<FlowKey>,
}

impl Case {
    fn dir(&self) -> u8 {
        self.eval.direction.key_byte()
    }
}

struct PolicyView<'a> {
    rules: &'a [Rule],
    /// All rule prefixes by [role][family].
    nets: [[Vec<IpNet>; 2]; 2],
    ports: Vec<PortRange>,
}

impl<'a> PolicyView<'a> {
    fn new(policy: &'a Policy) -> PolicyView<'a> {
        let mut nets: [[Vec<IpNet>; 2]; 2] = Default::default();
        let mut ports = Vec::new();
        for r in policy.rules() {
            for n in &r.from {
                nets[0][usize::from(is_v6(n))].push(*n);
            }
            for n in &r.to {
                nets[1][usize::from(is_v6(n))].push(*n);
            }
            ports.extend_from_slice(&r.ports);
        }
        PolicyView { rules: policy.rules(), nets, ports }
    }
}

fn of_family(nets: &[IpNet], v6: bool) -> Vec<IpNet> {
    nets.iter().copied().filter(|n| is_v6(n) == v6).collect()
}

fn gen_dport(rng: &mut Rng, focus: &[PortRange], all: &[PortRange]) -> u16 {
    let r = rng.below(100);
    let ranges = if r < 60 && !focus.is_empty() {
        focus
    } else if r < 75 && !all.is_empty() {
        all
    } else {
        return gen_port(rng);
    };
    let p = ranges[rng.below(ranges.len() as u64) as usize];
    match rng.below(6) {
        0 => p.first,
        1 => p.last,
        2 => p.first.wrapping_sub(1),
        3 => p.last.wrapping_add(1),
        _ => p.first + (rng.below(u64::from(p.last - p.first) + 1) as u16),
    }
}

/// A packet for the quoted part of an ICMP error: (the error's body, the quoted packet's
/// conntrack key as the program would look it up, if it parses as a tracked flow).
fn gen_quoted(rng: &mut Rng, v6: bool, view: &PolicyView, dir: u8) -> (Vec<u8>, String, Option<FlowKey>) {
    let qv6 = if rng.pct(95) { v6 } else { !v6 };
    let qs = gen_addr(rng, qv6, &[], &view.nets[0][usize::from(qv6)]);
    let qd = gen_addr(rng, qv6, &[], &view.nets[1][usize::from(qv6)]);
    let q = match rng.below(9) {
        0 => wire::Packet::tcp(qs, qd, rng.u16(), gen_port(rng)),
        1 => wire::Packet::udp(qs, qd, rng.u16(), gen_port(rng)),
        2 => wire::Packet::sctp(qs, qd, rng.u16(), gen_port(rng)),
        3 => wire::Packet::udplite(qs, qd, rng.u16(), gen_port(rng)),
        4 => wire::Packet::echo(qs, qd, rng.pct(50), rng.u16()),
        5 => wire::Packet::icmp(qs, qd, if qv6 { 1 } else { 3 }, 0, [0; 4], b"x"),
        6 => wire::Packet::new(qs, qd, rng.pick(OTHER_PROTOS), rng.bytes_below(12)),
        // Not a packet: version 0 (or nothing at all).
        _ => {
            let n = rng.below(30) as usize;
            let mut b = rng.bytes(n);
            if let Some(first) = b.first_mut() {
                *first &= 0x0f;
            }
            return (b, format!("quoting {n} garbage bytes"), None);
        }
    };
    let bytes = q.ip_bytes();
    let cut = (bytes.len() - q.l4.len() + 8).min(bytes.len());
    let what = format!(
        "quoting {} {qs}->{qd} proto {} l4 {:02x?}",
        if qv6 { "v6" } else { "v4" },
        q.proto,
        &q.l4[..q.l4.len().min(8)]
    );
    // The quoted packet travelled the other way; only a same-family quote parses.
    let key = if qv6 == v6 { tracked_key(qv6, qs, qd, q.proto, &q.l4, dir ^ 1) } else { None };
    (bytes[..cut].to_vec(), what, key)
}

fn gen_case(rng: &mut Rng, view: &PolicyView) -> Case {
    // Most packets aim at a rule (its prefixes, protocol, port edges, direction).
    let aim = if !view.rules.is_empty() && rng.pct(65) {
        Some(&view.rules[rng.below(view.rules.len() as u64) as usize])
    } else {
        None
    };
    let v6 = match aim {
        Some(r) => {
            let fams: Vec<bool> = [false, true]
                .into_iter()
                .filter(|v6| {
                    pol::model::proto_allows_family(r.proto, *v6)
                        && r.from.iter().any(|n| is_v6(n) == *v6)
                        && r.to.iter().any(|n| is_v6(n) == *v6)
                })
                .collect();
            rng.pick(&fams)
        }
        None => rng.pct(50),
    };
    let direction = match aim {
        Some(r) if rng.pct(85) => rng.pick(r.direction.directions()),
        _ => rng.pick(&[Direction::Ingress, Direction::Egress]),
    };
    let dir = direction.key_byte();
    let fam = usize::from(v6);
    let (focus_src, focus_dst) = match aim {
        Some(r) => (of_family(&r.from, v6), of_family(&r.to, v6)),
        None => (Vec::new(), Vec::new()),
    };
    let src = gen_addr(rng, v6, &focus_src, &view.nets[0][fam]);
    let dst = gen_addr(rng, v6, &focus_dst, &view.nets[1][fam]);
    let icmp = family_icmp(v6);
    let mut proto = match aim.and_then(|r| r.proto) {
        Some(p) if rng.pct(85) => p,
        _ => rng.pick(&[6, 6, 17, 17, 136, 132, icmp, icmp, icmp, family_icmp(!v6), 0, 47, 50, 59, 253, 255]),
    };
    if v6 && V6_EXT.contains(&proto) {
        proto = 253;
    }
    let focus_ports = aim.map(|r| r.ports.as_slice()).unwrap_or(&[]);

    let fragment = rng.pct(8);
    let mut probes = Vec::new();
    let (mut p, port, kind, mut what) = if fragment {
        let payload = rng.bytes_below(24);
        (wire::Packet::new(src, dst, proto, payload), None, Kind::Fragment, format!("non-first fragment proto {proto}"))
    } else if has_ports(proto) {
        let sport = if rng.pct(80) { rng.u16() } else { gen_port(rng) };
        let dport = gen_dport(rng, focus_ports, &view.ports);
        let p = match proto {
            wire::IPPROTO_TCP => wire::Packet::tcp(src, dst, sport, dport),
            wire::IPPROTO_UDP => wire::Packet::udp(src, dst, sport, dport),
            wire::IPPROTO_SCTP => wire::Packet::sctp(src, dst, sport, dport),
            _ => wire::Packet::udplite(src, dst, sport, dport),
        };
        (p, Some(dport), Kind::Tracked, format!("proto {proto} {sport}->{dport}"))
    } else if proto == icmp {
        let (req, rep) = echo_types(v6);
        let errors: &[u8] = if v6 { &[1, 2, 3, 4] } else { &[3, 11, 12] };
        let infos: &[u8] = if v6 { &[130, 131, 133, 134, 135, 136, 137, 200] } else { &[9, 10, 13, 14, 15, 17] };
        let ty = match rng.below(100) {
            0..40 => {
                if rng.pct(50) {
                    req
                } else {
                    rep
                }
            }
            40..65 => rng.pick(errors),
            65..80 => rng.pick(infos),
            _ => rng.u8(),
        };
        let code = match rng.below(100) {
            0..85 => 0,
            85..95 => rng.below(16) as u8,
            _ => rng.u8(),
        };
        let port = Some(u16::from(ty) << 8 | u16::from(code));
        if ty == req || ty == rep {
            let id = rng.u16().to_be_bytes();
            let p = wire::Packet::icmp(src, dst, ty, code, [id[0], id[1], 0, 1], b"ping-payload");
            (p, port, Kind::Tracked, format!("icmp echo type {ty} code {code} id {}", be16(&id)))
        } else if is_icmp_error(v6, ty) {
            let (body, qwhat, key) = gen_quoted(rng, v6, view, dir);
            if let Some(k) = key {
                probes.push(k);
                probes.push(k.reversed());
            }
            let rest = [0, 0, rng.u8(), rng.u8()];
            let p = wire::Packet::icmp(src, dst, ty, code, rest, &body);
            (p, port, Kind::IcmpError, format!("icmp error type {ty} code {code} {qwhat}"))
        } else {
            let body = rng.bytes_below(16);
            let p = wire::Packet::icmp(src, dst, ty, code, [rng.u8(), rng.u8(), 0, 0], &body);
            (p, port, Kind::Untracked, format!("icmp type {ty} code {code}"))
        }
    } else {
        let payload = rng.bytes_below(16);
        (wire::Packet::new(src, dst, proto, payload), Some(0), Kind::Tracked, format!("proto {proto}"))
    };

    // Decorations the parser must see through.
    if v6 {
        if rng.pct(15) {
            let mut chain = Vec::new();
            if rng.pct(40) {
                chain.push(wire::EXT_HOP_BY_HOP);
            }
            for _ in 0..rng.below(3) {
                chain.push(rng.pick(&[wire::EXT_DEST_OPTS, wire::EXT_ROUTING, wire::EXT_AH]));
            }
            for e in &chain {
                p = p.ext(*e);
            }
            what += &format!(" +ext{chain:?}");
        }
    } else if rng.pct(5) {
        p = p.options(&[1, 1, 1, 1, 7, 3, 4][..1 + rng.below(7) as usize]);
        what += " +options";
    }
    if fragment {
        // The fragment header goes last: its next header is the packet's protocol.
        let offset = 1 + rng.below(0x1fff) as u16;
        let more = rng.pct(50);
        p = p.fragment(offset, more);
        what += &format!(" offset {offset} more {more}");
    } else if rng.pct(5) {
        let more = rng.pct(60);
        p = p.fragment(0, more);
        what += if more { " +first fragment" } else { " +atomic fragment" };
    }

    let track = if kind == Kind::Tracked { tracked_key(v6, src, dst, proto, &p.l4, dir) } else { None };
    if let Some(k) = track {
        probes.push(k);
        probes.push(k.reversed());
    }
    let eval = pol::Packet { direction, src, dst, proto, port };
    Case { eval, wire: p, what, kind, track, probes }
}

// ---------------------------------------------------------------------------------------
// The bed: a bpffs of its own, the real Enforcer, and the programs on its pinned maps.

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "privileged test: mounting bpffs and loading eBPF programs need root; CI runs it as root"
    );
}

struct Bed {
    root: PathBuf,
    ifname: IfName,
    state_dir: PathBuf,
    enforcer: Enforcer,
    /// The classifiers, loaded on the enforcer's pinned maps.
    programs: aya::Ebpf,
    conntrack: BpfHashMap<MapData, FlowKey, FlowValue>,
    counters: PerCpuArray<MapData, Counter>,
    /// For the self-check only (the writer owns the policy maps).
    policy_map: LpmTrie<MapData, PolicyData, PolicyValue>,
}

impl Bed {
    fn new() -> Bed {
        let tag = format!("{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() % 1_000_000);
        // Not under /sys/fs/bpf: `Enforcer::open` mounts a bpffs of its own at this root.
        let root = PathBuf::from(format!("/run/wirefence-diff-{tag}"));
        let state_dir = PathBuf::from(format!("/tmp/wirefence-diff-{tag}"));
        std::fs::create_dir_all(&state_dir).unwrap();
        let ifname: IfName = format!("wfd{:x}", std::process::id() % 0xffff).parse().unwrap();
        let enforcer = Enforcer::open(&root, &ifname, L3_OFFSET, &state_dir)
            .unwrap_or_else(|e| panic!("Enforcer::open({}): {e}", root.display()));
        let (programs, conntrack, counters, policy_map) = load_programs(enforcer.dir());
        Bed { root, ifname, state_dir, enforcer, programs, conntrack, counters, policy_map }
    }

    /// A new Enforcer adopting the pins, as a restarted agent opens them.
    fn reopen(&mut self) {
        self.enforcer = Enforcer::open(&self.root, &self.ifname, L3_OFFSET, &self.state_dir)
            .unwrap_or_else(|e| panic!("Enforcer::open again: {e}"));
    }

    fn apply(&mut self, compiled: &Compiled, digest: u64) -> (u32, BTreeMap<String, u32>) {
        let stats = self.enforcer.apply(compiled, digest).unwrap_or_else(|e| panic!("apply: {e}"));
        let state = self.enforcer.state().unwrap();
        assert_eq!((state.epoch, state.initialized), (stats.epoch, 1), "state after apply");
        // The writer's rule id -> counter slot table, as persisted for `status`.
        let file = self.state_dir.join(format!("{}.policy-slots.json", self.ifname));
        let slots: BTreeMap<String, u32> = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        (stats.epoch, slots)
    }

    fn run(&self, dir: u8, frame: &[u8]) -> u32 {
        let name = if dir == common::DIR_INGRESS { common::PROG_INGRESS } else { common::PROG_EGRESS };
        let prog: &SchedClassifier = self.programs.program(name).unwrap().try_into().unwrap();
        let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() };
        prog.test_run(opts).unwrap_or_else(|e| panic!("test run of {name}: {e:?}")).return_value
    }

    fn rule_counter(&self, slot: u32) -> Counter {
        let v = self.counters.get(&slot, 0).unwrap();
        v.iter().fold(Counter::default(), |a, c| Counter { packets: a.packets + c.packets, bytes: a.bytes + c.bytes })
    }

    fn conntrack_entries(&self) -> HashMap<FlowKey, FlowValue> {
        self.conntrack.iter().map(|r| r.unwrap()).collect()
    }

    fn flush_conntrack(&mut self) {
        let keys: Vec<FlowKey> = self.conntrack.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            match self.conntrack.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => panic!("conntrack remove: {e}"),
            }
        }
    }

    fn stats(&self) -> BTreeMap<&'static str, (u64, u64)> {
        let c = self.enforcer.counters().unwrap();
        c.stats.iter().map(|(k, v)| (*k, (v.packets, v.bytes))).collect()
    }
}

type Loaded = (
    aya::Ebpf,
    BpfHashMap<MapData, FlowKey, FlowValue>,
    PerCpuArray<MapData, Counter>,
    LpmTrie<MapData, PolicyData, PolicyValue>,
);

fn load_programs(dir: &Path) -> Loaded {
    let paths: Vec<(&str, PathBuf)> = common::MAPS.iter().map(|m| (*m, dir.join(m))).collect();
    let mut loader = aya::EbpfLoader::new();
    loader.override_global(common::GLOBAL_L3_OFFSET, &L3_OFFSET, true);
    for (name, path) in &paths {
        assert!(path.exists(), "{} is not pinned", path.display());
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(wirefence_agent::bpf::object()).expect("load the eBPF object on the pinned maps");
    for name in [common::PROG_INGRESS, common::PROG_EGRESS] {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
    }
    let conntrack = BpfHashMap::try_from(ebpf.take_map(common::CONNTRACK).unwrap()).unwrap();
    let counters = PerCpuArray::try_from(ebpf.take_map(common::RULE_COUNTERS).unwrap()).unwrap();
    let policy_map = LpmTrie::try_from(ebpf.take_map(common::POLICY).unwrap()).unwrap();
    (ebpf, conntrack, counters, policy_map)
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Err(e) = enforce::remove(&self.root, &self.ifname) {
            eprintln!("cleanup: removing pins under {}: {e}", self.root.display());
        }
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; MNT_DETACH so open map fds do not keep it busy.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.root);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

// ---------------------------------------------------------------------------------------
// Checking.

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

fn describe_policy(policy: &Policy) -> String {
    if policy.rules().is_empty() {
        return "  (no rules)\n".into();
    }
    let mut s = String::new();
    for (i, r) in policy.rules().iter().enumerate() {
        let nets = |v: &[IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
        let ports = r.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
        s += &format!(
            "  [{i}] {:?} from {} to {} proto {} ports [{ports}] {:?}\n",
            r.id,
            nets(&r.from),
            nets(&r.to),
            pol::model::proto_name(r.proto),
            r.direction
        );
    }
    s
}

struct Ctx<'a> {
    policy: &'a Policy,
    slots: &'a BTreeMap<String, u32>,
    epoch: u32,
}

impl Ctx<'_> {
    fn slot_of(&self, rule: u32) -> u32 {
        let id = &self.policy.rules()[rule as usize].id;
        *self.slots.get(id).unwrap_or_else(|| panic!("no counter slot for rule id {id:?}"))
    }

    fn id_of_slot(&self, slot: u32) -> String {
        self.slots.iter().find(|(_, s)| **s == slot).map_or_else(|| format!("slot {slot}"), |(id, _)| id.clone())
    }
}

/// Runs one case and compares; `Err` describes a mismatch.
fn check_case(bed: &mut Bed, ctx: &Ctx, case: &Case, frame: &[u8]) -> Result<Decision, String> {
    let want = evaluate(ctx.policy, &case.eval);
    // The rule counter is read around the run when it is the only witness of the rule.
    let counter_slot = match (want.rule, case.kind) {
        (Some(rule), kind) if kind != Kind::Tracked => Some(ctx.slot_of(rule)),
        _ => None,
    };
    let before = counter_slot.map(|s| bed.rule_counter(s));
    let ret = bed.run(case.dir(), frame);
    let allowed = match ret {
        TC_ACT_OK => true,
        TC_ACT_SHOT => false,
        other => return Err(format!("program returned {other} (neither TC_ACT_OK nor TC_ACT_SHOT)")),
    };
    let entry = case.track.map(|k| (k, bed.conntrack.get(&k, 0)));
    if allowed != want.allowed {
        // Keep the conntrack table equal to the mirror.
        if let Some((k, Ok(_))) = &entry {
            let _ = bed.conntrack.remove(k);
        }
        let prog = if allowed { "ALLOW" } else { "DENY" };
        return Err(format!("verdict: program {prog}, evaluator {want:?}"));
    }
    let Some(rule) = want.rule else { return Ok(want) };
    let slot = ctx.slot_of(rule);
    let rule_text = |got: u32| {
        format!(
            "deciding rule: program slot {got} ({}), evaluator rule {rule} ({:?}, slot {slot})",
            ctx.id_of_slot(got),
            ctx.policy.rules()[rule as usize].id
        )
    };
    match entry {
        Some((_, Ok(v))) => {
            if v.rule != slot {
                return Err(rule_text(v.rule));
            }
            if v.epoch != ctx.epoch {
                return Err(format!("conntrack entry epoch {} (live epoch {})", v.epoch, ctx.epoch));
            }
        }
        Some((_, Err(MapError::KeyNotFound))) => {
            return Err("allowed tracked packet left no conntrack entry (or another key than modelled)".into())
        }
        Some((_, Err(e))) => panic!("conntrack lookup: {e}"),
        None => {
            let (s, before) = (counter_slot.unwrap(), before.unwrap());
            let after = bed.rule_counter(s);
            let want = (1, frame.len() as u64);
            let got = (after.packets - before.packets, after.bytes - before.bytes);
            if got != want {
                return Err(format!(
                    "deciding rule: counter of rule {rule} ({:?}, slot {s}) changed by {got:?}, expected {want:?}",
                    ctx.policy.rules()[rule as usize].id
                ));
            }
        }
    }
    Ok(want)
}

fn report(
    seed: u64,
    index: usize,
    policy: &Policy,
    compiled: &Compiled,
    case: &Case,
    frame: &[u8],
    why: &str,
) -> String {
    let sim = simulate(compiled, &case.eval);
    let hint = if sim == evaluate(policy, &case.eval) {
        "agrees with the evaluator: look at the map writer or the program"
    } else {
        "differs from the evaluator: look at the compiler (or the evaluator)"
    };
    format!(
        "MISMATCH (seed {seed}, policy #{index}): {why}\n  packet: {:?}\n  wire: {}\n  frame ({} bytes): {:02x?}\n  \
         simulate(compiled) = {sim:?}: the userspace LPM simulation {hint}\n\
         policy:\n{}",
        case.eval,
        case.what,
        frame.len(),
        frame,
        describe_policy(policy)
    )
}

/// Greedily drops rules, prefixes and port ranges while the case still mismatches.
fn shrink(bed: &mut Bed, policy: &Policy, case: &Case, digest: &mut u64) -> Option<(Policy, String)> {
    let frame = case.wire.frame(L3_OFFSET);
    let mut still = |bed: &mut Bed, p: &Policy| -> Option<String> {
        let compiled = compile(p).ok()?;
        *digest += 1;
        bed.flush_conntrack();
        let (epoch, slots) = bed.apply(&compiled, *digest);
        let ctx = Ctx { policy: p, slots: &slots, epoch };
        let r = check_case(bed, &ctx, case, &frame).err();
        bed.flush_conntrack();
        r
    };
    let mut why = still(bed, policy)?;
    let mut cur = policy.rules().to_vec();
    let mut progress = true;
    while progress {
        progress = false;
        let mut candidates: Vec<Vec<Rule>> = Vec::new();
        for i in 0..cur.len() {
            let mut c = cur.clone();
            c.remove(i);
            candidates.push(c);
            for field in 0..3 {
                let len = match field {
                    0 => cur[i].from.len(),
                    1 => cur[i].to.len(),
                    _ => cur[i].ports.len(),
                };
                for j in 0..len {
                    let mut c = cur.clone();
                    match field {
                        0 => {
                            c[i].from.remove(j);
                        }
                        1 => {
                            c[i].to.remove(j);
                        }
                        _ => {
                            c[i].ports.remove(j);
                        }
                    }
                    if field < 2 || !c[i].ports.is_empty() {
                        candidates.push(c);
                    }
                }
            }
        }
        for c in candidates {
            let Ok(p) = Policy::new(c.clone()) else { continue };
            if let Some(w) = still(bed, &p) {
                cur = c;
                why = w;
                progress = true;
                break;
            }
        }
    }
    Some((Policy::new(cur).unwrap(), why))
}

#[derive(Default)]
struct Tally {
    cases: u64,
    allowed: u64,
    by_kind: BTreeMap<(Kind, bool), (u64, u64)>,
    /// Allowed cases by the deciding rule's specificity: any protocol, all ports, port prefix.
    by_specificity: [u64; 3],
    rule_checks: u64,
    /// Allowed cases that more than one rule matches (specificity and ties decide).
    contested: u64,
    redrawn: u64,
    entries: u64,
    rules: u64,
}

#[test]
fn ebpf_verdicts_match_the_reference_evaluator() {
    require_root();
    let seed = env_u64("WIREFENCE_DIFF_SEED")
        .unwrap_or_else(|| std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos() as u64 ^ u64::from(std::process::id()));
    let n_policies = env_u64("WIREFENCE_DIFF_POLICIES").unwrap_or(60) as usize;
    let n_packets = env_u64("WIREFENCE_DIFF_PACKETS").unwrap_or(2000) as usize;
    // The mirror must stay exact: far fewer live flows than the LRU conntrack holds.
    assert!(n_packets <= 20_000, "WIREFENCE_DIFF_PACKETS: at most 20000 per policy (use more policies)");
    eprintln!(
        "differential: seed {seed} (WIREFENCE_DIFF_SEED={seed} replays it), {n_policies} policies x {n_packets} packets"
    );
    let start = Instant::now();
    let mut rng = Rng(seed);
    let mut bed = Bed::new();
    let mut tally = Tally::default();
    let mut mismatches: Vec<String> = Vec::new();
    let mut first: Option<(Policy, Case, usize)> = None;
    let mut prev: Option<Policy> = None;

    'policies: for index in 0..n_policies {
        let policy = match &prev {
            Some(p) if rng.pct(40) => mutate(&mut rng, p),
            _ => gen_policy(&mut rng),
        };
        let compiled = compile(&policy).unwrap_or_else(|e| panic!("compile (seed {seed}, policy #{index}): {e}"));
        tally.entries += compiled.entries.len() as u64;
        tally.rules += policy.rules().len() as u64;
        if index % 20 == 19 {
            bed.reopen();
        }
        let (epoch, slots) = bed.apply(&compiled, index as u64);
        let ctx = Ctx { policy: &policy, slots: &slots, epoch };
        let stats_before = bed.stats();
        let counters_before: BTreeMap<u32, Counter> =
            policy.rules().iter().map(|r| (slots[&r.id], bed.rule_counter(slots[&r.id]))).collect();
        let view = PolicyView::new(&policy);
        let mut mirror: HashMap<FlowKey, u32> = HashMap::new();
        let mut want_stats: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
        let mut want_counters: BTreeMap<u32, Counter> = BTreeMap::new();
        let mut clean = true;
        let mut policy_mismatches = 0;

        for _ in 0..n_packets {
            let case = loop {
                let c = gen_case(&mut rng, &view);
                // A packet that could meet a live conntrack entry is not a first packet.
                if c.probes.iter().all(|k| !mirror.contains_key(k)) {
                    break c;
                }
                tally.redrawn += 1;
            };
            let frame = case.wire.frame(L3_OFFSET);
            let len = frame.len() as u64;
            tally.cases += 1;
            match check_case(&mut bed, &ctx, &case, &frame) {
                Err(why) => {
                    clean = false;
                    mismatches.push(report(seed, index, &policy, &compiled, &case, &frame, &why));
                    if first.is_none() {
                        first = Some((policy.clone(), case.clone(), index));
                    }
                    if mismatches.len() >= MAX_MISMATCHES {
                        break 'policies;
                    }
                    policy_mismatches += 1;
                    if policy_mismatches >= MAX_MISMATCHES_PER_POLICY {
                        break;
                    }
                }
                Ok(d) => {
                    let e = tally.by_kind.entry((case.kind, d.allowed)).or_default();
                    e.0 += 1;
                    e.1 += u64::from(case.eval.src.is_ipv6());
                    let mut add = |name: &'static str| {
                        let s = want_stats.entry(name).or_default();
                        s.0 += 1;
                        s.1 += len;
                    };
                    if case.kind == Kind::Fragment {
                        add("fragments");
                    }
                    let Some(rule) = d.rule else {
                        add("denied");
                        continue;
                    };
                    if case.kind != Kind::Fragment {
                        add("allowed_new");
                    }
                    tally.allowed += 1;
                    tally.rule_checks += 1;
                    tally.contested += u64::from(matching_rules(&policy, &case.eval) > 1);
                    let r = &policy.rules()[rule as usize];
                    tally.by_specificity[match (r.proto, r.ports.is_empty()) {
                        (None, _) => 0,
                        (Some(_), true) => 1,
                        (Some(_), false) => 2,
                    }] += 1;
                    let slot = ctx.slot_of(rule);
                    let c = want_counters.entry(slot).or_default();
                    c.packets += 1;
                    c.bytes += len;
                    if let Some(k) = case.track {
                        mirror.insert(k, slot);
                    }
                }
            }
        }

        // Per policy: STATS and rule counters add up, conntrack holds exactly the mirror.
        if clean {
            let after = bed.stats();
            let mut problems = Vec::new();
            for (name, (p, b)) in &after {
                let (p0, b0) = stats_before[name];
                let got = (p - p0, b - b0);
                let want = want_stats.get(name).copied().unwrap_or((0, 0));
                // Events are rate-limited: EVENTS_LOST is whatever the budget left.
                if *name != "events_lost" && got != want {
                    problems.push(format!("STATS {name}: changed by {got:?}, expected {want:?}"));
                }
            }
            for (slot, c0) in &counters_before {
                let c = bed.rule_counter(*slot);
                let got = (c.packets - c0.packets, c.bytes - c0.bytes);
                let w = want_counters.get(slot).copied().unwrap_or_default();
                if got != (w.packets, w.bytes) {
                    problems.push(format!(
                        "rule counter {} (slot {slot}): changed by {got:?}, expected {:?}",
                        ctx.id_of_slot(*slot),
                        (w.packets, w.bytes)
                    ));
                }
            }
            let table = bed.conntrack_entries();
            let extra: Vec<_> = table.keys().filter(|k| !mirror.contains_key(k)).collect();
            let missing = mirror.keys().filter(|k| !table.contains_key(k)).count();
            let wrong = table.iter().filter(|(k, v)| mirror.get(k).is_some_and(|s| *s != v.rule)).count();
            if !extra.is_empty() || missing > 0 || wrong > 0 {
                problems.push(format!(
                    "conntrack: {} entries not expected (e.g. {:?}), {missing} missing, {wrong} with another rule",
                    extra.len(),
                    extra.first()
                ));
            }
            if !problems.is_empty() {
                mismatches.push(format!(
                    "MISMATCH (seed {seed}, policy #{index}) in the per-policy totals:\n  {}\npolicy:\n{}",
                    problems.join("\n  "),
                    describe_policy(&policy)
                ));
                if mismatches.len() >= MAX_MISMATCHES {
                    break 'policies;
                }
            }
        }
        bed.flush_conntrack();
        prev = Some(policy);
    }
    let elapsed = start.elapsed();

    let kinds: Vec<String> = tally
        .by_kind
        .iter()
        .map(|((k, allowed), (n, v6))| format!("{k:?}/{}: {n} ({v6} v6)", if *allowed { "allow" } else { "deny" }))
        .collect();
    eprintln!(
        "differential: {} cases under {} policies ({} rules, {} policy entries) in {:.1?}: {} allowed \
         (deciding rule: any-protocol {}, all-ports {}, port-prefix {}; {} matched by several rules), {} denied; \
         deciding rule checked for {} allowed cases; {} draws redone to keep flows fresh\n  {}",
        tally.cases,
        n_policies,
        tally.rules,
        tally.entries,
        elapsed,
        tally.allowed,
        tally.by_specificity[0],
        tally.by_specificity[1],
        tally.by_specificity[2],
        tally.contested,
        tally.cases - tally.allowed,
        tally.rule_checks,
        tally.redrawn,
        kinds.join("\n  ")
    );

    if mismatches.is_empty() {
        assert!(tally.cases >= 100_000 || n_packets * n_policies < 100_000, "fewer cases than planned");
        let by = |k: Kind| tally.by_kind.iter().filter(|((kind, _), _)| *kind == k).map(|(_, (n, _))| n).sum::<u64>();
        for k in [Kind::Tracked, Kind::Untracked, Kind::IcmpError, Kind::Fragment] {
            assert!(by(k) > 0 || tally.cases < 10_000, "no {k:?} cases: the generator is broken");
        }
        let share = tally.allowed as f64 / tally.cases.max(1) as f64;
        assert!(
            tally.cases < 10_000 || (0.1..0.9).contains(&share),
            "allowed share {share:.2}: too one-sided to test much"
        );
        self_check(&mut bed);
        return;
    }
    let mut text = mismatches.join("\n");
    if let Some((policy, case, index)) = first {
        let mut digest = 1 << 32;
        match shrink(&mut bed, &policy, &case, &mut digest) {
            Some((small, why)) => {
                text += &format!(
                    "\nMINIMAL REPRODUCTION of the first mismatch (policy #{index} shrunk, applied alone after the run): \
                     {why}\n  packet: {:?}\n  wire: {}\npolicy:\n{}",
                    case.eval,
                    case.what,
                    describe_policy(&small)
                );
            }
            None => text += "\n(the first mismatch does not reproduce with its policy applied again alone)",
        }
    }
    panic!(
        "{} mismatch(es) between the eBPF programs and the reference evaluator (seed {seed}):\n{text}",
        mismatches.len()
    );
}

/// How many rules match `pkt` (for the coverage summary only; `evaluate` is the reference).
fn matching_rules(policy: &Policy, pkt: &pol::Packet) -> usize {
    let v6 = pkt.src.is_ipv6();
    policy
        .rules()
        .iter()
        .filter(|r| {
            r.direction.applies(pkt.direction)
                && pol::model::proto_allows_family(r.proto, v6)
                && r.from.iter().any(|n| n.contains(&pkt.src))
                && r.to.iter().any(|n| n.contains(&pkt.dst))
                && match r.proto {
                    None => true,
                    Some(p) if p != pkt.proto => false,
                    Some(_) if r.ports.is_empty() => true,
                    Some(_) => pkt.port.is_some_and(|port| r.ports.iter().any(|x| x.contains(port))),
                }
        })
        .count()
}

/// The checker checks: with the live policy entries rewritten behind the writer's back, the
/// same comparisons must report mismatches (a wrong deciding rule through the conntrack
/// entry and through the rule counter, then a wrong verdict).
fn self_check(bed: &mut Bed) {
    let net = |s: &str| -> IpNet { s.parse().unwrap() };
    let rule = |id: &str, proto, ports: Vec<PortRange>| Rule {
        id: id.into(),
        from: vec![net("10.0.0.0/8")],
        to: vec![net("10.0.0.0/8")],
        proto,
        ports,
        direction: RuleDirection::Both,
    };
    let policy = Policy::new(vec![
        rule("self-check-tcp", Some(6), vec![PortRange { first: 80, last: 80 }]),
        rule("self-check-icmp", Some(1), vec![]),
    ])
    .unwrap();
    bed.flush_conntrack();
    let (epoch, slots) = bed.apply(&compile(&policy).unwrap(), u64::MAX);
    let ctx = Ctx { policy: &policy, slots: &slots, epoch };
    let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    let tcp = |sport| Case {
        eval: pol::Packet { direction: Direction::Ingress, src: a, dst: b, proto: 6, port: Some(80) },
        wire: wire::Packet::tcp(a, b, sport, 80),
        what: format!("self-check tcp {sport}->80"),
        kind: Kind::Tracked,
        track: tracked_key(false, a, b, 6, &wire::Packet::tcp(a, b, sport, 80).l4, common::DIR_INGRESS),
        probes: Vec::new(),
    };
    let timestamp = Case {
        eval: pol::Packet { direction: Direction::Ingress, src: a, dst: b, proto: 1, port: Some(13 << 8) },
        wire: wire::Packet::icmp(a, b, 13, 0, [0; 4], &[0; 12]),
        what: "self-check icmp timestamp".into(),
        kind: Kind::Untracked,
        track: None,
        probes: Vec::new(),
    };
    let check = |bed: &mut Bed, case: &Case| check_case(bed, &ctx, case, &case.wire.frame(L3_OFFSET));
    assert!(check(bed, &tcp(1000)).is_ok_and(|d| d.allowed), "self-check: tcp to 80 must pass");
    assert!(check(bed, &timestamp).is_ok_and(|d| d.allowed), "self-check: icmp must pass");

    let gen = (epoch & 1) as u8;
    let live: Vec<(Key<PolicyData>, PolicyValue)> =
        bed.policy_map.iter().map(|r| r.unwrap()).filter(|(k, _)| k.data()[0] == gen).collect();
    assert!(!live.is_empty(), "self-check: no live policy entries");
    let unused = (0..common::MAX_RULES).find(|s| !slots.values().any(|v| v == s)).unwrap();
    for (k, _) in &live {
        bed.policy_map.insert(k, PolicyValue { rules: [unused; 2] }, 0).unwrap();
    }
    let e = check(bed, &tcp(1001)).expect_err("self-check: a wrong rule in conntrack must be reported");
    assert!(e.starts_with("deciding rule"), "{e}");
    let e = check(bed, &timestamp).expect_err("self-check: a wrong rule counter must be reported");
    assert!(e.starts_with("deciding rule"), "{e}");
    for (k, _) in &live {
        bed.policy_map.remove(k).unwrap();
    }
    let e = check(bed, &tcp(1002)).expect_err("self-check: a wrong verdict must be reported");
    assert!(e.starts_with("verdict"), "{e}");
    eprintln!(
        "differential: self-check: corrupted live entries are reported (rule via conntrack, rule via counter, verdict)"
    );
}
