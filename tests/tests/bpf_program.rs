//! Program tests of the classifiers (`ebpf/`) through BPF_PROG_TEST_RUN: crafted packets in,
//! exact verdicts and counters out. Needs root (loading programs, creating maps).
//!
//! Every test runs with the Ethernet offset (14, as on veth) and the L3 offset (0, as on
//! WireGuard). For SCHED_CLS programs the kernel's test runner always treats the input as
//! an Ethernet frame: it takes `skb->protocol` from bytes 12..14. With the L3 offset the IP
//! header starts at byte 0, so bytes 12..14 are the first two bytes of the IPv4 source
//! address, or bytes 4..6 of the IPv6 source address. The test addresses are chosen so these
//! read 0x0800 / 0x86dd: every IPv4 address here is in 8.0.0.0/16 and every IPv6 address in
//! fd00:0:86dd::/48, and the same tables run under both offsets.
//!
//! Maps are filled directly by a small test-only helper ([`fill`]) from rule-like inputs;
//! the real policy compiler lives in the agent and is tested on its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use aya::maps::PerCpuArray;
use aya::programs::{TestRun, TestRunOptions};
use wirefence_agent::bpf::Programs;
use wirefence_agent::enforce::sweep::Unfolded;
use wirefence_agent::enforce::trace::{disarm_orphan, TraceSpec};
use wirefence_common::trace::{path, TraceFilter, TraceRecord, TRACE_DROP, TRACE_PASS};
use wirefence_common::{
    self as common, stat, ClassValue, Counter, Event, FlowKey, PolicyState, PolicyValue, DIR_EGRESS, DIR_INGRESS,
};
use wirefence_tests::bpf::{mapped, TC_ACT_OK, TC_ACT_SHOT};
use wirefence_tests::packet::*;
use wirefence_tests::require_root_for;

const OFFSETS: [u32; 2] = [14, 0];

fn v4(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(8, 0, a, b))
}

fn v6(a: u16, b: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0x86dd, a, 0, 0, 0, b))
}

/// The hosts of the tests, per family: a peer, the local node, another peer with no rules,
/// a router (sends ICMP errors), a peer allowed everything.
struct Hosts {
    peer: IpAddr,
    local: IpAddr,
    stranger: IpAddr,
    router: IpAddr,
    trusted: IpAddr,
}

fn hosts(is_v6: bool) -> Hosts {
    if is_v6 {
        Hosts { peer: v6(0, 1), local: v6(1, 1), stranger: v6(0, 9), router: v6(0xfe, 1), trusted: v6(0, 7) }
    } else {
        Hosts { peer: v4(0, 1), local: v4(1, 1), stranger: v4(0, 9), router: v4(254, 1), trusted: v4(0, 7) }
    }
}

fn host(a: IpAddr) -> (IpAddr, u8) {
    (a, if a.is_ipv4() { 32 } else { 128 })
}

// ---------------------------------------------------------------------------------------
// Filling the maps from rule-like inputs (test-only).

#[derive(Clone, Debug)]
struct Rule {
    dir: u8,
    src: Vec<(IpAddr, u8)>,
    dst: Vec<(IpAddr, u8)>,
    /// None: any protocol.
    proto: Option<u8>,
    /// None: all ports (of `proto`). ICMP: type << 8 | code values.
    ports: Option<(u16, u16)>,
}

fn rule(dir: u8, src: &[IpAddr], dst: &[IpAddr], proto: Option<u8>, ports: Option<(u16, u16)>) -> Rule {
    Rule { dir, src: src.iter().map(|a| host(*a)).collect(), dst: dst.iter().map(|a| host(*a)).collect(), proto, ports }
}

fn normalize((addr, len): (IpAddr, u8)) -> (IpAddr, u8) {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (IpAddr::V4(Ipv4Addr::from(u32::from(a) & m)), len)
        }
        IpAddr::V6(a) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            (IpAddr::V6(Ipv6Addr::from(u128::from(a) & m)), len)
        }
    }
}

fn contains(outer: (IpAddr, u8), inner: (IpAddr, u8)) -> bool {
    outer.0.is_ipv4() == inner.0.is_ipv4() && outer.1 <= inner.1 && normalize((inner.0, outer.1)) == normalize(outer)
}

/// Port range -> (value, bits) prefixes covering it exactly.
fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let (mut start, end) = (lo as u32, hi as u32);
    let mut out = Vec::new();
    while start <= end {
        let mut size: u32 = if start == 0 { 1 << 16 } else { start & start.wrapping_neg() };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    out
}

/// Fills generation `gen` with `rules` (rule index = position): class maps (and their prefix lengths) for both roles
/// (a class is the set of rule prefixes containing an address, numbered per role across
/// families) and the policy entries.
fn fill(p: &mut Programs, gen: u8, rules: &[Rule]) {
    // (prefix length, key data, direction, rule)
    let mut policy_entries: Vec<(u32, [u8; 16], u8, u32)> = Vec::new();
    let mut classes_of_rule: Vec<[Vec<u32>; 2]> = vec![[Vec::new(), Vec::new()]; rules.len()];
    #[allow(clippy::needless_range_loop)] // role 0 = source, 1 = destination
    for role in 0..2 {
        let prefixes: Vec<(IpAddr, u8)> = {
            let mut v: Vec<_> = rules
                .iter()
                .flat_map(|r| if role == 0 { r.src.clone() } else { r.dst.clone() })
                .map(normalize)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut ids: BTreeMap<Vec<(IpAddr, u8)>, u32> = BTreeMap::new();
        let mut class_of: Vec<u32> = Vec::new();
        // The prefix lengths the programs probe, per family.
        let mut lens = [common::ClassLens::default(); 2];
        for &(a, len) in &prefixes {
            lens[usize::from(a.is_ipv6())].set(len);
        }
        let mut lens_map = p.class_lens().unwrap();
        for v6 in [false, true] {
            lens_map.set(common::class_lens_index(gen, role == 1, v6), lens[usize::from(v6)], 0).unwrap();
        }
        for &pfx in &prefixes {
            let set: Vec<_> = prefixes.iter().copied().filter(|q| contains(*q, pfx)).collect();
            let next = ids.len() as u32 + 1;
            let id = *ids.entry(set).or_insert(next);
            class_of.push(id);
            let value = ClassValue { class: id };
            match pfx.0 {
                IpAddr::V4(a) => {
                    let key = Key::new(8 + pfx.1 as u32, common::class_data_v4(gen, a.octets()));
                    let mut t = if role == 0 { p.src_v4().unwrap() } else { p.dst_v4().unwrap() };
                    t.insert(key, value, 0).unwrap();
                }
                IpAddr::V6(a) => {
                    let key = Key::new(8 + pfx.1 as u32, common::class_data_v6(gen, a.octets()));
                    let mut t = if role == 0 { p.src_v6().unwrap() } else { p.dst_v6().unwrap() };
                    t.insert(key, value, 0).unwrap();
                }
            }
        }
        for (i, r) in rules.iter().enumerate() {
            let mine = if role == 0 { &r.src } else { &r.dst };
            let mut cs: Vec<u32> = prefixes
                .iter()
                .zip(&class_of)
                .filter(|(pfx, _)| mine.iter().any(|m| contains(normalize(*m), **pfx)))
                .map(|(_, c)| *c)
                .collect();
            cs.sort();
            cs.dedup();
            classes_of_rule[i][role] = cs;
        }
    }
    for (i, r) in rules.iter().enumerate() {
        for &sc in &classes_of_rule[i][0] {
            for &dc in &classes_of_rule[i][1] {
                match (r.proto, r.ports) {
                    (None, _) => policy_entries.push((
                        common::POLICY_BITS_TO_DST,
                        common::policy_data(gen, sc, dc, 0, 0),
                        r.dir,
                        i as u32,
                    )),
                    (Some(pr), None) => policy_entries.push((
                        common::POLICY_BITS_TO_PROTO,
                        common::policy_data(gen, sc, dc, pr, 0),
                        r.dir,
                        i as u32,
                    )),
                    (Some(pr), Some((lo, hi))) => {
                        for (port, bits) in port_prefixes(lo, hi) {
                            policy_entries.push((
                                common::POLICY_BITS_TO_PROTO + bits,
                                common::policy_data(gen, sc, dc, pr, port),
                                r.dir,
                                i as u32,
                            ));
                        }
                    }
                }
            }
        }
    }
    // One entry per key: per direction the lowest rule, then the contract's inheritance.
    let mut merged: BTreeMap<(u128, u32), [u32; 2]> = BTreeMap::new();
    for (bits, data, dir, rule) in policy_entries {
        let slot = &mut merged.entry((u128::from_be_bytes(data), bits)).or_insert([common::NO_RULE; 2])[dir as usize];
        *slot = (*slot).min(rule);
    }
    let mut rows: Vec<common::PolicyRow> =
        merged.into_iter().map(|((data, prefixlen), rules)| common::PolicyRow { data, prefixlen, rules }).collect();
    common::inherit_directions(&mut rows);
    let mut policy = p.policy().unwrap();
    for r in rows {
        policy.insert(&Key::new(r.prefixlen, r.data.to_be_bytes()), PolicyValue { rules: r.rules }, 0).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Running packets.

struct Bed {
    p: Programs,
    off: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V {
    Pass,
    Drop,
}
use V::{Drop, Pass};

impl Bed {
    /// Loaded programs with generation 0 filled with `rules` and STATE initialised.
    fn new(off: u32, rules: &[Rule]) -> Bed {
        let mut bed = Bed::uninitialized(off);
        fill(&mut bed.p, 0, rules);
        bed.p.set_state(PolicyState { epoch: 0, initialized: 1 }).unwrap();
        bed
    }

    fn uninitialized(off: u32) -> Bed {
        require_root_for("loading eBPF programs needs root");
        Bed { p: Programs::load(off).unwrap_or_else(|e| panic!("load (l3 offset {off}): {e:?}")), off }
    }

    fn run_frame(&self, dir: u8, frame: &[u8], repeat: u32) -> u32 {
        let prog = self.p.program(dir).unwrap();
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..Default::default() };
        prog.test_run(opts)
            .unwrap_or_else(|e| panic!("test run of {} bytes {frame:02x?}: {e:?}", frame.len()))
            .return_value
    }

    fn stats(&mut self) -> Vec<Counter> {
        (0..stat::COUNT).map(|i| self.p.stat(i).unwrap()).collect()
    }

    /// Runs `frame` through the `dir` program; asserts the verdict and that exactly the
    /// STATS counters in `stats` went up, each by one packet of the frame's length.
    fn expect_frame(&mut self, what: &str, dir: u8, frame: &[u8], verdict: V, stats: &[u32]) {
        let before = self.stats();
        let ret = self.run_frame(dir, frame, 1);
        let after = self.stats();
        let want = match verdict {
            Pass => TC_ACT_OK,
            Drop => TC_ACT_SHOT,
        };
        let changed: Vec<_> =
            (0..stat::COUNT).filter(|i| after[*i as usize] != before[*i as usize]).map(stat_name).collect();
        assert_eq!(
            ret, want,
            "{what} (l3 offset {}): verdict {ret}, expected {verdict:?}; counted {changed:?}",
            self.off
        );
        for i in 0..stat::COUNT {
            let n = stats.iter().filter(|s| **s == i).count() as u64;
            let (b, a) = (before[i as usize], after[i as usize]);
            assert_eq!(
                (a.packets - b.packets, a.bytes - b.bytes),
                (n, n * frame.len() as u64),
                "{what} (l3 offset {}): STATS[{}] changed by {:?}, expected {n} packet(s)",
                self.off,
                stat_name(i),
                (a.packets - b.packets, a.bytes - b.bytes)
            );
        }
    }

    fn expect(&mut self, what: &str, dir: u8, pkt: &Packet, verdict: V, stats: &[u32]) {
        let mut frame = pkt.frame(self.off);
        if self.off == 0 {
            // The test runner wants a whole IP header after the first 14 bytes (it takes them
            // for an Ethernet header), i.e. 34 (IPv4) or 54 (IPv6) bytes at least. A shorter
            // complete packet gets trailing padding, as Ethernet pads short frames; a packet
            // cut short on purpose cannot be represented and runs under offsets 14/54 only.
            let min = if pkt.src.is_ipv4() { 34 } else { 54 };
            if frame.len() < min {
                if pkt.truncate.is_some() {
                    eprintln!(
                        "{what}: {} bytes, not representable with l3 offset 0; covered by the other offsets",
                        frame.len()
                    );
                    return;
                }
                frame.resize(min, 0);
            }
        }
        self.expect_frame(what, dir, &frame, verdict, stats);
    }

    /// The frame `pkt` becomes in [`Bed::expect`].
    fn frame(&self, pkt: &Packet) -> Vec<u8> {
        let mut frame = pkt.frame(self.off);
        let min = if pkt.src.is_ipv4() { 34 } else { 54 };
        if self.off == 0 && frame.len() < min {
            frame.resize(min, 0);
        }
        frame
    }

    fn rule(&mut self, rule: u32) -> Counter {
        self.p.rule_counter(rule).unwrap()
    }

    fn events(&mut self) -> Vec<Event> {
        let mut rb = self.p.events().unwrap();
        let mut out = Vec::new();
        while let Some(item) = rb.next() {
            assert_eq!(item.len(), std::mem::size_of::<Event>());
            // SAFETY: Event is a plain #[repr(C)] record of the size just checked.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
        }
        out
    }

    /// The table, each entry under its flow's first-packet tuple (it is filed under the
    /// canonical one).
    fn conntrack(&mut self) -> Vec<(FlowKey, common::FlowValue)> {
        self.p.conntrack().unwrap().iter().map(|r| r.unwrap()).map(|(k, v)| (v.first_packet(&k), v)).collect()
    }
}

fn stat_name(i: u32) -> &'static str {
    [
        "ALLOWED_NEW",
        "ALLOWED_ESTABLISHED",
        "DENIED",
        "MALFORMED",
        "UNINITIALIZED",
        "EVENTS_LOST",
        "FRAGMENTS",
        "NOT_IP",
        "CT_UNTRACKED",
    ][i as usize]
}

const NEW: &[u32] = &[stat::ALLOWED_NEW];
const EST: &[u32] = &[stat::ALLOWED_ESTABLISHED];
const DENIED: &[u32] = &[stat::DENIED];
const MALFORMED: &[u32] = &[stat::MALFORMED];

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn loads_verifies_and_names_match_common() {
    for off in OFFSETS {
        let mut bed = Bed::uninitialized(off);
        for name in common::MAPS.iter().chain([&common::FLOW_CACHE]) {
            assert!(bed.p.ebpf.map(name).is_some(), "map {name} missing");
        }
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let info = bed.p.program(dir).unwrap().info().unwrap();
            eprintln!(
                "l3 offset {off}: {:?}: {} instructions translated, {:?} verified",
                info.name_as_str(),
                info.size_translated().unwrap_or(0) / 8,
                info.verified_instruction_count()
            );
        }
        assert_eq!(bed.p.rule_counters().unwrap().len(), common::MAX_RULES);
        assert_eq!(bed.p.stats().unwrap().len(), stat::COUNT);
    }
}

#[test]
fn uninitialized_state_denies_everything() {
    for off in OFFSETS {
        let mut bed = Bed::uninitialized(off);
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let unini = &[stat::UNINITIALIZED][..];
            bed.expect("tcp", DIR_INGRESS, &Packet::tcp(h.peer, h.local, 1000, 22), Drop, unini);
            bed.expect("udp", DIR_EGRESS, &Packet::udp(h.local, h.peer, 1000, 53), Drop, unini);
            bed.expect("echo", DIR_EGRESS, &Packet::echo(h.local, h.peer, true, 7), Drop, unini);
            bed.expect(
                "truncated tcp",
                DIR_INGRESS,
                &Packet::tcp(h.peer, h.local, 1, 2).truncate(if is_v6 { 50 } else { 30 }),
                Drop,
                unini,
            );
        }
        // A filled policy does not help while STATE says uninitialised, whatever the epoch.
        let h = hosts(false);
        fill(&mut bed.p, 1, &[rule(DIR_INGRESS, &[h.peer], &[h.local], None, None)]);
        bed.p.set_state(PolicyState { epoch: 1, initialized: 0 }).unwrap();
        bed.expect(
            "filled, not initialised",
            DIR_INGRESS,
            &Packet::tcp(h.peer, h.local, 1, 2),
            Drop,
            &[stat::UNINITIALIZED],
        );
        bed.p.set_state(PolicyState { epoch: 1, initialized: 1 }).unwrap();
        bed.expect("initialised", DIR_INGRESS, &Packet::tcp(h.peer, h.local, 1, 2), Pass, NEW);
        if off == 14 {
            bed.p.set_state(PolicyState::default()).unwrap();
            bed.expect_frame("arp", DIR_INGRESS, &arp_frame(), Pass, &[stat::NOT_IP]);
        }
        assert!(bed.conntrack().len() == 1, "only the allowed flow is tracked");
    }
}

#[test]
fn port_range_edges_and_protocols() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let icmp = if is_v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
            let echo_req: u16 = if is_v6 { 128 << 8 } else { 8 << 8 };
            let rules = [
                /* 0 */ rule(DIR_INGRESS, &[h.peer], &[h.local], Some(IPPROTO_TCP), Some((8000, 8080))),
                /* 1 */ rule(DIR_INGRESS, &[h.peer, h.stranger], &[h.local], Some(IPPROTO_UDP), Some((53, 53))),
                /* 2 */ rule(DIR_INGRESS, &[h.peer], &[h.local], Some(IPPROTO_SCTP), Some((9000, 9001))),
                /* 3 */ rule(DIR_INGRESS, &[h.peer], &[h.local], Some(IPPROTO_UDPLITE), Some((5000, 5000))),
                /* 4 */ rule(DIR_INGRESS, &[h.peer], &[h.local], Some(icmp), Some((echo_req, echo_req))),
                /* 5 */ rule(DIR_INGRESS, &[h.peer], &[h.local], Some(IPPROTO_GRE), None),
                /* 6 */ rule(DIR_INGRESS, &[h.trusted], &[h.local], None, None),
                /* 7 */ rule(DIR_EGRESS, &[h.local], &[h.peer], Some(IPPROTO_TCP), Some((0, 1023))),
            ];
            let mut bed = Bed::new(off, &rules);
            let (p, l) = (h.peer, h.local);
            let table: Vec<(&str, u8, Packet, V, &[u32])> = vec![
                ("tcp 7999 (below range)", DIR_INGRESS, Packet::tcp(p, l, 40000, 7999), Drop, DENIED),
                ("tcp 8000 (range start)", DIR_INGRESS, Packet::tcp(p, l, 40000, 8000), Pass, NEW),
                ("tcp 8040", DIR_INGRESS, Packet::tcp(p, l, 40000, 8040), Pass, NEW),
                ("tcp 8080 (range end)", DIR_INGRESS, Packet::tcp(p, l, 40000, 8080), Pass, NEW),
                ("tcp 8081 (above range)", DIR_INGRESS, Packet::tcp(p, l, 40000, 8081), Drop, DENIED),
                ("tcp 8000 egress (wrong direction)", DIR_EGRESS, Packet::tcp(p, l, 40001, 8000), Drop, DENIED),
                ("tcp 8000 from stranger", DIR_INGRESS, Packet::tcp(h.stranger, l, 40000, 8000), Drop, DENIED),
                ("tcp 8000 to stranger", DIR_INGRESS, Packet::tcp(p, h.stranger, 40000, 8000), Drop, DENIED),
                ("udp 8000 (wrong protocol)", DIR_INGRESS, Packet::udp(p, l, 40000, 8000), Drop, DENIED),
                ("udp 53", DIR_INGRESS, Packet::udp(p, l, 40000, 53), Pass, NEW),
                ("udp 53 from stranger", DIR_INGRESS, Packet::udp(h.stranger, l, 40000, 53), Pass, NEW),
                ("udp 54", DIR_INGRESS, Packet::udp(p, l, 40000, 54), Drop, DENIED),
                ("sctp 9001", DIR_INGRESS, Packet::sctp(p, l, 40000, 9001), Pass, NEW),
                ("sctp 9002", DIR_INGRESS, Packet::sctp(p, l, 40000, 9002), Drop, DENIED),
                ("udplite 5000", DIR_INGRESS, Packet::udplite(p, l, 40000, 5000), Pass, NEW),
                ("udplite 5001", DIR_INGRESS, Packet::udplite(p, l, 40000, 5001), Drop, DENIED),
                ("echo request", DIR_INGRESS, Packet::echo(p, l, true, 0x77), Pass, NEW),
                ("echo reply (not allowed inbound)", DIR_INGRESS, Packet::echo(p, l, false, 0x78), Drop, DENIED),
                (
                    "echo request code 1 (type<<8|code)",
                    DIR_INGRESS,
                    Packet::icmp(p, l, (echo_req >> 8) as u8, 1, [0, 9, 0, 1], b""),
                    Drop,
                    DENIED,
                ),
                ("gre (all ports of protocol)", DIR_INGRESS, Packet::new(p, l, IPPROTO_GRE, vec![0; 4]), Pass, NEW),
                ("gre from stranger", DIR_INGRESS, Packet::new(h.stranger, l, IPPROTO_GRE, vec![0; 4]), Drop, DENIED),
                ("trusted: tcp anything", DIR_INGRESS, Packet::tcp(h.trusted, l, 1, 65535), Pass, NEW),
                ("trusted: udp", DIR_INGRESS, Packet::udp(h.trusted, l, 1, 0), Pass, NEW),
                ("trusted: protocol 253", DIR_INGRESS, Packet::new(h.trusted, l, 253, vec![]), Pass, NEW),
                ("egress tcp 0 (range start)", DIR_EGRESS, Packet::tcp(l, p, 50000, 0), Pass, NEW),
                ("egress tcp 1023", DIR_EGRESS, Packet::tcp(l, p, 50000, 1023), Pass, NEW),
                ("egress tcp 1024", DIR_EGRESS, Packet::tcp(l, p, 50000, 1024), Drop, DENIED),
            ];
            for (what, dir, pkt, v, stats) in &table {
                bed.expect(&format!("{} {what}", if is_v6 { "v6" } else { "v4" }), *dir, pkt, *v, stats);
            }
            let tcp_len = bed.frame(&Packet::tcp(p, l, 1, 1)).len() as u64;
            assert_eq!(bed.rule(0), Counter { packets: 3, bytes: 3 * tcp_len });
            assert_eq!(bed.rule(1).packets, 2);
            assert_eq!(bed.rule(6).packets, 3);
            assert_eq!(bed.rule(7).packets, 2);
            // Each allowed packet above started a flow (distinct tuples).
            assert_eq!(bed.conntrack().len(), 14);
        }
    }
}

#[test]
fn fragments_are_judged_without_ports() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let rules = [
                /* 0 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((80, 80))),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_UDP), None),
                /* 2 */ rule(DIR_INGRESS, &[h.trusted], &[l], None, None),
                /* 3 */ rule(DIR_INGRESS, &[h.stranger], &[l], Some(IPPROTO_UDP), Some((0, 65535))),
                // Port prefix 0/6: its key bits equal a port-less lookup's (port 0), so only
                // the lookup's prefix length keeps it from matching a fragment.
                /* 4 */
                rule(DIR_INGRESS, &[h.stranger], &[l], Some(IPPROTO_TCP), Some((0, 1023))),
            ];
            let mut bed = Bed::new(off, &rules);
            let frag = &[stat::FRAGMENTS][..];
            let frag_denied = &[stat::FRAGMENTS, stat::DENIED][..];
            // A non-first fragment carries payload bytes where the L4 header would be.
            let tail = |src: IpAddr, proto: u8| Packet::new(src, l, proto, vec![0x1f; 64]).fragment(185, false);
            let table: Vec<(&str, Packet, V, &[u32])> = vec![
                ("first tcp fragment to 80", Packet::tcp(p, l, 40000, 80).fragment(0, true), Pass, NEW),
                ("first tcp fragment to 81", Packet::tcp(p, l, 40000, 81).fragment(0, true), Drop, DENIED),
                ("non-first tcp fragment (port-specific rule only)", tail(p, IPPROTO_TCP), Drop, frag_denied),
                ("non-first udp fragment (all-ports rule)", tail(p, IPPROTO_UDP), Pass, frag),
                ("non-first fragment, any-protocol rule", tail(h.trusted, IPPROTO_TCP), Pass, frag),
                ("non-first udp fragment, rule 0-65535 as a port prefix /0", tail(h.stranger, IPPROTO_UDP), Pass, frag),
                ("tcp 22 from stranger (rule 0-1023)", Packet::tcp(h.stranger, l, 40000, 22), Pass, NEW),
                (
                    "non-first tcp fragment from stranger (rule 0-1023 only)",
                    tail(h.stranger, IPPROTO_TCP),
                    Drop,
                    frag_denied,
                ),
                (
                    "middle fragment (more set)",
                    Packet::new(p, l, IPPROTO_UDP, vec![0; 64]).fragment(8, true),
                    Pass,
                    frag,
                ),
                (
                    "first fragment too short for its tcp header",
                    Packet::tcp(p, l, 40000, 80).fragment(0, true).truncate(if is_v6 { 40 + 8 + 10 } else { 30 }),
                    Drop,
                    MALFORMED,
                ),
            ];
            for (what, pkt, v, stats) in &table {
                bed.expect(&format!("{} {what}", if is_v6 { "v6" } else { "v4" }), DIR_INGRESS, pkt, *v, stats);
            }
            assert_eq!(bed.rule(0).packets, 1);
            assert_eq!(bed.rule(1).packets, 2);
            assert_eq!(bed.rule(2).packets, 1);
            assert_eq!(bed.rule(3).packets, 1);
            assert_eq!(bed.rule(4).packets, 1);
            assert_eq!(bed.conntrack().len(), 2, "fragments do not create flows");
        }
    }
}

#[test]
fn malformed_headers_drop() {
    for off in OFFSETS {
        let h4 = hosts(false);
        let h6 = hosts(true);
        let rules = [
            rule(DIR_INGRESS, &[h4.peer], &[h4.local], Some(IPPROTO_TCP), Some((443, 443))),
            rule(DIR_INGRESS, &[h6.peer], &[h6.local], Some(IPPROTO_TCP), Some((443, 443))),
            rule(DIR_INGRESS, &[h4.trusted], &[h4.local], None, None),
            rule(DIR_INGRESS, &[h6.trusted], &[h6.local], None, None),
        ];
        let mut bed = Bed::new(off, &rules);
        let (p4, l4, t4) = (h4.peer, h4.local, h4.trusted);
        let (p6, l6, t6) = (h6.peer, h6.local, h6.trusted);
        let dst_opts = |pkt: Packet, n: usize| (0..n).fold(pkt, |p, _| p.ext(EXT_DEST_OPTS));
        let mut tcp_doff4 = Packet::tcp(t4, l4, 1, 443);
        tcp_doff4.l4[12] = 4 << 4;
        let mut hbh_long = ext_header(EXT_HOP_BY_HOP);
        hbh_long[1] = 1; // claims 16 bytes, 8 present, nothing after it
        let table: Vec<(&str, Packet, V, &[u32])> = vec![
            // IPv4 (any-protocol rule for `trusted`, so only parsing can drop these).
            ("v4 IHL 4", Packet::tcp(t4, l4, 1, 443).ihl(4), Drop, MALFORMED),
            ("v4 IHL 15 beyond the packet", Packet::new(t4, l4, 253, vec![0; 8]).ihl(15), Drop, MALFORMED),
            ("v4 truncated tcp (10 bytes)", Packet::tcp(t4, l4, 1, 443).truncate(30), Drop, MALFORMED),
            ("v4 tcp data offset 4", tcp_doff4, Drop, MALFORMED),
            ("v4 truncated udp", Packet::udp(t4, l4, 1, 53).truncate(26), Drop, MALFORMED),
            ("v4 truncated sctp", Packet::sctp(t4, l4, 1, 53).truncate(30), Drop, MALFORMED),
            ("v4 truncated icmp", Packet::echo(t4, l4, true, 1).truncate(24), Drop, MALFORMED),
            ("v4 with options, tcp 443", Packet::tcp(p4, l4, 1, 443).options(&[1, 1, 1, 1, 7, 3, 4]), Pass, NEW),
            ("v4 with options, tcp 444", Packet::tcp(p4, l4, 1, 444).options(&[1, 1, 1, 1]), Drop, DENIED),
            ("v4 protocol without L4 parse, empty payload", Packet::new(t4, l4, 253, vec![]), Pass, NEW),
            // IPv6.
            ("v6 truncated tcp", Packet::tcp(t6, l6, 1, 443).truncate(50), Drop, MALFORMED),
            ("v6 truncated icmpv6", Packet::echo(t6, l6, true, 1).truncate(44), Drop, MALFORMED),
            ("v6 7 extension headers", dst_opts(Packet::tcp(t6, l6, 1, 443), 7), Drop, MALFORMED),
            ("v6 7 extension headers, non-TCP", dst_opts(Packet::new(t6, l6, 253, vec![]), 7), Drop, MALFORMED),
            (
                "v6 extension header cut short",
                Packet::new(t6, l6, 253, vec![]).ext_raw(EXT_HOP_BY_HOP, hbh_long),
                Drop,
                MALFORMED,
            ),
            (
                "v6 extension chain cut inside",
                Packet::tcp(t6, l6, 1, 443).ext(EXT_HOP_BY_HOP).ext(EXT_AH).truncate(40 + 8 + 6),
                Drop,
                MALFORMED,
            ),
            // (A v4-mapped source cannot carry 0x86dd in bytes 4..6; it is tested below.)
            (
                "v6 v4-mapped destination",
                Packet::tcp(t6, IpAddr::V6(Ipv4Addr::new(8, 0, 1, 1).to_ipv6_mapped()), 1, 443),
                Drop,
                MALFORMED,
            ),
            // Fine chains: 6 headers of every kind, then the port decides.
            (
                "v6 6 extension headers, tcp 443",
                Packet::tcp(p6, l6, 1, 443)
                    .ext(EXT_HOP_BY_HOP)
                    .ext(EXT_DEST_OPTS)
                    .ext(EXT_ROUTING)
                    .fragment(0, false)
                    .ext(EXT_AH)
                    .ext(EXT_DEST_OPTS),
                Pass,
                NEW,
            ),
            ("v6 6 extension headers, tcp 444", dst_opts(Packet::tcp(p6, l6, 1, 444), 6), Drop, DENIED),
            ("v6 hop-by-hop, tcp 443", Packet::tcp(p6, l6, 2, 443).ext(EXT_HOP_BY_HOP), Pass, NEW),
            ("v6 atomic fragment, tcp 443", Packet::tcp(p6, l6, 3, 443).fragment(0, false), Pass, NEW),
        ];
        for (what, pkt, v, stats) in &table {
            bed.expect(what, DIR_INGRESS, pkt, *v, stats);
        }
        if off == 14 {
            // The ethertype says IPv4, the header is IPv6 (and the reverse).
            let v6_bytes = Packet::tcp(t6, l6, 1, 443).ip_bytes();
            bed.expect_frame("ethertype IPv4, version 6", DIR_INGRESS, &ethernet(0x0800, &v6_bytes), Drop, MALFORMED);
            let v4_bytes = Packet::tcp(t4, l4, 1, 443).ip_bytes();
            bed.expect_frame("ethertype IPv6, version 4", DIR_INGRESS, &ethernet(0x86dd, &v4_bytes), Drop, MALFORMED);
            bed.expect_frame("arp", DIR_EGRESS, &arp_frame(), Pass, &[stat::NOT_IP]);
            let mapped_src = IpAddr::V6(Ipv4Addr::new(8, 0, 0, 7).to_ipv6_mapped());
            bed.expect("v6 v4-mapped source", DIR_EGRESS, &Packet::tcp(mapped_src, l6, 1, 443), Drop, MALFORMED);
        }
    }
}

/// IP headers cut short. BPF_PROG_TEST_RUN rejects a frame without a whole IP header after
/// its Ethernet header, so these run with a 40-byte filler before the IP header (L3 offset
/// 54); the parser is the same for every offset.
#[test]
fn short_ip_headers_drop() {
    const SHIM: u32 = 14 + 40;
    let (h4, h6) = (hosts(false), hosts(true));
    let rules = [
        rule(DIR_INGRESS, &[h4.trusted], &[h4.local], None, None),
        rule(DIR_INGRESS, &[h6.trusted], &[h6.local], None, None),
    ];
    let mut bed = Bed::new(SHIM, &rules);
    let (t4, l4, t6, l6) = (h4.trusted, h4.local, h6.trusted, h6.local);
    let table: Vec<(&str, Packet, V, &[u32])> = vec![
        ("v4 whole (the filler works)", Packet::tcp(t4, l4, 1, 443), Pass, NEW),
        ("v6 whole (the filler works)", Packet::tcp(t6, l6, 1, 443), Pass, NEW),
        ("v4 header cut to 16 bytes", Packet::tcp(t4, l4, 1, 443).truncate(16), Drop, MALFORMED),
        ("v4 header cut to 19 bytes", Packet::new(t4, l4, 253, vec![]).truncate(19), Drop, MALFORMED),
        ("v4 nothing at the L3 offset", Packet::tcp(t4, l4, 1, 443).truncate(0), Drop, MALFORMED),
        ("v4 options cut", Packet::new(t4, l4, 253, vec![]).options(&[1, 1, 1, 1]).truncate(22), Drop, MALFORMED),
        ("v6 header cut to 30 bytes", Packet::tcp(t6, l6, 1, 443).truncate(30), Drop, MALFORMED),
        ("v6 header cut to 39 bytes", Packet::new(t6, l6, 253, vec![]).truncate(39), Drop, MALFORMED),
        ("v6 nothing at the L3 offset", Packet::tcp(t6, l6, 1, 443).truncate(0), Drop, MALFORMED),
    ];
    for (what, pkt, v, stats) in &table {
        bed.expect(what, DIR_INGRESS, pkt, *v, stats);
        if *v == Drop {
            bed.expect(what, DIR_EGRESS, pkt, *v, stats);
        }
    }
}

#[test]
fn return_traffic_of_allowed_flows() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let rules = [
                /* 0 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_TCP), Some((443, 443))),
                /* 1 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_UDP), Some((53, 53))),
                /* 2 */
                rule(DIR_EGRESS, &[l], &[p], Some(if is_v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }), None),
                /* 3 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22))),
            ];
            let mut bed = Bed::new(off, &rules);
            let fam = if is_v6 { "v6" } else { "v4" };
            let table: Vec<(&str, u8, Packet, V, &[u32])> = vec![
                ("reply before any request", DIR_INGRESS, Packet::tcp_ack(p, l, 443, 40000), Drop, DENIED),
                ("egress SYN to 443", DIR_EGRESS, Packet::tcp(l, p, 40000, 443), Pass, NEW),
                ("reply", DIR_INGRESS, Packet::tcp_ack(p, l, 443, 40000), Pass, EST),
                ("second egress packet", DIR_EGRESS, Packet::tcp_ack(l, p, 40000, 443), Pass, EST),
                ("unsolicited: other local port", DIR_INGRESS, Packet::tcp_ack(p, l, 443, 40001), Drop, DENIED),
                ("unsolicited: ports swapped", DIR_INGRESS, Packet::tcp(p, l, 40000, 443), Drop, DENIED),
                (
                    "unsolicited: from another host",
                    DIR_INGRESS,
                    Packet::tcp_ack(h.stranger, l, 443, 40000),
                    Drop,
                    DENIED,
                ),
                ("forward tuple seen on ingress", DIR_INGRESS, Packet::tcp(l, p, 40000, 443), Drop, DENIED),
                ("udp query", DIR_EGRESS, Packet::udp(l, p, 5353, 53), Pass, NEW),
                ("udp answer", DIR_INGRESS, Packet::udp(p, l, 53, 5353), Pass, EST),
                ("udp answer to another port", DIR_INGRESS, Packet::udp(p, l, 53, 5354), Drop, DENIED),
                ("echo request out", DIR_EGRESS, Packet::echo(l, p, true, 0x1234), Pass, NEW),
                ("echo reply in", DIR_INGRESS, Packet::echo(p, l, false, 0x1234), Pass, EST),
                ("echo reply with another id", DIR_INGRESS, Packet::echo(p, l, false, 0x1235), Drop, DENIED),
                ("echo request in (not allowed)", DIR_INGRESS, Packet::echo(p, l, true, 0x1234), Drop, DENIED),
                ("ingress SYN to 22", DIR_INGRESS, Packet::tcp(p, l, 50000, 22), Pass, NEW),
                ("reply out from 22", DIR_EGRESS, Packet::tcp_ack(l, p, 22, 50000), Pass, EST),
                ("egress from 22 to another port", DIR_EGRESS, Packet::tcp_ack(l, p, 22, 50001), Drop, DENIED),
            ];
            for (what, dir, pkt, v, stats) in &table {
                bed.expect(&format!("{fam} {what}"), *dir, pkt, *v, stats);
            }
            // Rule counters count every packet passed under the rule, established included.
            assert_eq!(bed.rule(0).packets, 3);
            assert_eq!(bed.rule(1).packets, 2);
            assert_eq!(bed.rule(2).packets, 2);
            assert_eq!(bed.rule(3).packets, 2);
            let ct = bed.conntrack();
            assert_eq!(ct.len(), 4);
            let key = FlowKey {
                src: mapped(l),
                dst: mapped(p),
                sport: 40000,
                dport: 443,
                proto: IPPROTO_TCP,
                direction: DIR_EGRESS,
                _pad: [0; 2],
            };
            let (_, value) = ct.iter().find(|(k, _)| *k == key).expect("conntrack entry of the egress SYN");
            assert_eq!((value.epoch, value.rule), (0, 0));
            assert!(value.last_seen_ns > 0);
            let echo = FlowKey {
                src: mapped(l),
                dst: mapped(p),
                sport: 0x1234,
                dport: 0,
                proto: key_icmp(is_v6),
                direction: DIR_EGRESS,
                _pad: [0; 2],
            };
            assert!(ct.iter().any(|(k, _)| *k == echo), "echo flow keyed by identifier as sport: {ct:?}");
        }
    }
}

fn key_icmp(is_v6: bool) -> u8 {
    if is_v6 {
        IPPROTO_ICMPV6
    } else {
        IPPROTO_ICMP
    }
}

#[test]
fn icmp_errors_of_tracked_flows_pass() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l, r) = (h.peer, h.local, h.router);
            let rules = [
                /* 0 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_TCP), Some((443, 443))),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22))),
                /* 2 */ rule(DIR_EGRESS, &[l], &[p], Some(key_icmp(is_v6)), None),
            ];
            let mut bed = Bed::new(off, &rules);
            let fam = if is_v6 { "v6" } else { "v4" };
            let syn = Packet::tcp(l, p, 40000, 443);
            let unknown = Packet::tcp(l, p, 40000, 444);
            let ssh_reply = Packet::tcp_ack(l, p, 22, 50000);
            let ping = Packet::echo(l, p, true, 0x4321);
            // (type, code, rest) of the errors of this family.
            let errors: Vec<(&str, u8, u8, [u8; 4])> = if is_v6 {
                vec![
                    ("packet too big", 2, 0, 1280u32.to_be_bytes()),
                    ("dest unreachable", 1, 4, [0; 4]),
                    ("time exceeded", 3, 0, [0; 4]),
                ]
            } else {
                vec![
                    ("frag needed", 3, 4, [0, 0, 0x05, 0x78]),
                    ("port unreachable", 3, 3, [0; 4]),
                    ("time exceeded", 11, 0, [0; 4]),
                ]
            };
            bed.expect(&format!("{fam} SYN"), DIR_EGRESS, &syn, Pass, NEW);
            bed.expect(&format!("{fam} ssh SYN in"), DIR_INGRESS, &Packet::tcp(p, l, 50000, 22), Pass, NEW);
            bed.expect(&format!("{fam} ping out"), DIR_EGRESS, &ping, Pass, NEW);
            for (name, ty, code, rest) in &errors {
                let what = format!("{fam} {name}");
                bed.expect(
                    &format!("{what} from router, allowed flow"),
                    DIR_INGRESS,
                    &Packet::icmp_error(r, l, *ty, *code, *rest, &syn),
                    Pass,
                    EST,
                );
                bed.expect(
                    &format!("{what} from peer, allowed flow"),
                    DIR_INGRESS,
                    &Packet::icmp_error(p, l, *ty, *code, *rest, &syn),
                    Pass,
                    EST,
                );
                bed.expect(
                    &format!("{what} about a reply of an inbound flow"),
                    DIR_INGRESS,
                    &Packet::icmp_error(r, l, *ty, *code, *rest, &ssh_reply),
                    Pass,
                    EST,
                );
                bed.expect(
                    &format!("{what} about a ping"),
                    DIR_INGRESS,
                    &Packet::icmp_error(r, l, *ty, *code, *rest, &ping),
                    Pass,
                    EST,
                );
                bed.expect(
                    &format!("{what} about an unknown flow"),
                    DIR_INGRESS,
                    &Packet::icmp_error(r, l, *ty, *code, *rest, &unknown),
                    Drop,
                    DENIED,
                );
                // The quote must be the flow's own direction: the same error quoting the
                // peer's packets to us is not related to anything we sent.
                let inverted = Packet::tcp(p, l, 443, 40000);
                bed.expect(
                    &format!("{what} quoting the reverse tuple"),
                    DIR_INGRESS,
                    &Packet::icmp_error(r, l, *ty, *code, *rest, &inverted),
                    Drop,
                    DENIED,
                );
                let mut cut = Packet::icmp_error(r, l, *ty, *code, *rest, &syn);
                cut.l4.truncate(8 + 12);
                bed.expect(&format!("{what} with a quote too short"), DIR_INGRESS, &cut, Drop, DENIED);
            }
            // An outbound error (we tell the peer its packet to us was too big) for the
            // inbound ssh flow, quoting the peer's packet.
            let (ty, code, rest) = if is_v6 { (2, 0, 1280u32.to_be_bytes()) } else { (3, 4, [0, 0, 5, 0x78]) };
            bed.expect(
                &format!("{fam} outbound error about inbound flow"),
                DIR_EGRESS,
                &Packet::icmp_error(l, p, ty, code, rest, &Packet::tcp(p, l, 50000, 22)),
                Pass,
                EST,
            );
        }
    }
}

#[test]
fn generation_flip_rechecks_old_flows() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let gen0 = [
                /* 0 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22))),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((80, 80))),
                /* 2 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((443, 443))),
            ];
            let mut bed = Bed::new(off, &gen0);
            let fam = if is_v6 { "v6" } else { "v4" };
            for port in [22, 80, 443] {
                bed.expect(
                    &format!("{fam} SYN to {port} (gen 0)"),
                    DIR_INGRESS,
                    &Packet::tcp(p, l, 40000, port),
                    Pass,
                    NEW,
                );
            }
            assert_eq!(bed.conntrack().len(), 3);

            // Generation 1: 22 is gone, 80 and 443 are allowed by (renumbered) rules.
            let gen1 = [
                /* 0 */ rule(DIR_INGRESS, &[h.stranger], &[l], Some(IPPROTO_UDP), None),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((80, 80))),
                /* 2 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((443, 444))),
            ];
            fill(&mut bed.p, 1, &gen1);
            // Filled but not live: nothing changes.
            bed.expect(
                &format!("{fam} ssh before the flip"),
                DIR_INGRESS,
                &Packet::tcp_ack(p, l, 40000, 22),
                Pass,
                EST,
            );
            bed.p.set_state(PolicyState { epoch: 1, initialized: 1 }).unwrap();

            let table: Vec<(&str, u8, Packet, V, &[u32])> = vec![
                ("ssh (revoked), forward", DIR_INGRESS, Packet::tcp_ack(p, l, 40000, 22), Drop, DENIED),
                ("ssh reply after revocation", DIR_EGRESS, Packet::tcp_ack(l, p, 22, 40000), Drop, DENIED),
                ("new ssh SYN", DIR_INGRESS, Packet::tcp(p, l, 40001, 22), Drop, DENIED),
                ("http, forward (still allowed)", DIR_INGRESS, Packet::tcp_ack(p, l, 40000, 80), Pass, EST),
                ("http reply", DIR_EGRESS, Packet::tcp_ack(l, p, 80, 40000), Pass, EST),
                // First packet after the flip is a reply: re-checked through the reversed tuple.
                ("https reply first (still allowed)", DIR_EGRESS, Packet::tcp_ack(l, p, 443, 40000), Pass, EST),
                ("https forward", DIR_INGRESS, Packet::tcp_ack(p, l, 40000, 443), Pass, EST),
                ("new 444 (gen 1 only)", DIR_INGRESS, Packet::tcp(p, l, 40000, 444), Pass, NEW),
            ];
            for (what, dir, pkt, v, stats) in &table {
                bed.expect(&format!("{fam} {what}"), *dir, pkt, *v, stats);
            }
            let ct = bed.conntrack();
            assert_eq!(ct.len(), 3, "the revoked ssh entry is deleted: {ct:?}");
            assert!(ct.iter().all(|(k, v)| v.epoch == 1 && k.dport != 22), "{ct:?}");
            let https = ct.iter().find(|(k, _)| k.dport == 443).unwrap();
            assert_eq!(https.1.rule, 2, "re-checked entries carry the new rule");

            // Flip back to generation 0 (epoch 2): ssh would be allowed again as a new flow.
            bed.p.set_state(PolicyState { epoch: 2, initialized: 1 }).unwrap();
            bed.expect(
                &format!("{fam} ssh SYN under gen 0 again"),
                DIR_INGRESS,
                &Packet::tcp(p, l, 40002, 22),
                Pass,
                NEW,
            );
            bed.expect(
                &format!("{fam} 444 re-checked under gen 0"),
                DIR_INGRESS,
                &Packet::tcp_ack(p, l, 40000, 444),
                Drop,
                DENIED,
            );
        }
    }
}

/// ICMP's flow key holds an echo's identifier where ports go (and another message's type
/// and code in `dport`), so only the event's policy port tells what was denied.
#[test]
fn deny_events_carry_the_icmp_type_and_code() {
    for is_v6 in [false, true] {
        let h = hosts(is_v6);
        let (p, l) = (h.peer, h.local);
        let mut bed = Bed::new(0, &[rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22)))]);
        let (request, reply) = if is_v6 { (128u32, 129u32) } else { (8, 0) };
        // A reply whose identifier reads as type 3 code 4.
        bed.expect("echo request", DIR_INGRESS, &Packet::echo(p, l, true, 0x0304), Drop, DENIED);
        bed.expect("echo reply", DIR_INGRESS, &Packet::echo(p, l, false, 0x0304), Drop, DENIED);
        bed.expect("type 200 code 1", DIR_INGRESS, &Packet::icmp(p, l, 200, 1, [0; 4], b"x"), Drop, DENIED);
        let events = bed.events();
        let ports: Vec<u32> = events.iter().map(|e| e.port).collect();
        let ep = common::EVENT_PORT;
        assert_eq!(ports, [ep | request << 8, ep | reply << 8, ep | 200 << 8 | 1], "v6 {is_v6}: {events:?}");
        assert_eq!((events[0].flow.sport, events[1].flow.dport), (0x0304, 0x0304));
    }
}

#[test]
fn events_report_flows_and_denials_within_budget() {
    for off in OFFSETS {
        let h = hosts(false);
        let (p, l) = (h.peer, h.local);
        let mut bed = Bed::new(off, &[rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22)))]);
        let start = std::time::Instant::now();
        bed.expect("allowed", DIR_INGRESS, &Packet::tcp(p, l, 40000, 22), Pass, NEW);
        bed.expect("established: no event", DIR_INGRESS, &Packet::tcp_ack(p, l, 40000, 22), Pass, EST);
        bed.expect("denied", DIR_INGRESS, &Packet::udp(p, l, 40000, 53), Drop, DENIED);
        let events = bed.events();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].kind, common::EVENT_NEW_FLOW);
        assert_eq!(events[0].rule, 0);
        assert_eq!(events[0].len, bed.frame(&Packet::tcp(p, l, 40000, 22)).len() as u32);
        assert_eq!(
            events[0].flow,
            FlowKey {
                src: mapped(p),
                dst: mapped(l),
                sport: 40000,
                dport: 22,
                proto: IPPROTO_TCP,
                direction: DIR_INGRESS,
                _pad: [0; 2]
            }
        );
        assert_eq!(events[1].kind, common::EVENT_DENY);
        assert_eq!(events[1].rule, common::NO_RULE);
        assert_eq!((events[1].flow.proto, events[1].flow.dport), (IPPROTO_UDP, 53));
        assert_eq!((events[0].port, events[1].port), (common::EVENT_PORT | 22, common::EVENT_PORT | 53));

        // A burst of denials: at most the bucket (EVENT_BURST, minus the 2 above, plus
        // what refills while the burst runs) gets through; the rest is counted as lost.
        let n = 400u32;
        let frame = bed.frame(&Packet::udp(p, l, 40000, 53));
        let before = bed.stats();
        assert_eq!(bed.run_frame(DIR_INGRESS, &frame, n), TC_ACT_SHOT);
        let elapsed_ms = start.elapsed().as_millis() as u64;
        let after = bed.stats();
        let lost = after[stat::EVENTS_LOST as usize].packets - before[stat::EVENTS_LOST as usize].packets;
        assert_eq!(after[stat::DENIED as usize].packets - before[stat::DENIED as usize].packets, n as u64);
        let sent = bed.events().len() as u64;
        assert_eq!(sent + lost, n as u64, "every denial is either an event or counted lost");
        // Tokens refill from the first event on (at most EVENT_BURST are banked). The program
        // reads the coarse clock, which moves in jiffies (up to 10 ms at HZ=100): the time it
        // sees pass can exceed ours by one.
        let jiffy_ms = 10;
        let max = common::EVENT_BURST - 2 + (elapsed_ms + jiffy_ms) * common::EVENT_RATE_PER_SEC / 1000 + 1;
        assert!(sent <= max, "{sent} events sent, budget allows {max}");
        assert!(sent >= common::EVENT_BURST - 2, "the bucket's burst was available: {sent}");
    }
}

/// Established packets are decided by the per-CPU flow cache in front of conntrack (see
/// `ebpf/src/flow_cache.rs`): with more flows than the cache has slots (so slots are shared
/// and overwritten), every packet of every flow, repeated, in both directions, passes as
/// established under its own rule; a tuple next to a cached one (one field changed) is
/// still judged as new; and after a flip a cached verdict the new policy revokes is gone.
#[test]
fn flow_cache_keeps_verdicts_exact() {
    const FLOWS: u16 = 3000;
    const REPEAT: u32 = 50;
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let fam = if is_v6 { "v6" } else { "v4" };
            let rules = [
                /* 0 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((1000, 1999))),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((2000, 2999))),
            ];
            let mut bed = Bed::new(off, &rules);
            let port = |i: u16| 1000 + i % 2000;
            // (run_frame: the event budget makes EVENTS_LOST move during this burst.)
            let new_before = bed.stats()[stat::ALLOWED_NEW as usize].packets;
            for i in 0..FLOWS {
                let syn = bed.frame(&Packet::tcp(p, l, 30000 + i, port(i)));
                assert_eq!(bed.run_frame(DIR_INGRESS, &syn, 1), TC_ACT_OK, "{fam} SYN {i}");
            }
            assert_eq!(bed.stats()[stat::ALLOWED_NEW as usize].packets - new_before, FLOWS as u64);
            let before = (bed.rule(0), bed.rule(1), bed.stats());
            for round in 0..2 {
                for i in 0..FLOWS {
                    let fwd = bed.frame(&Packet::tcp_ack(p, l, 30000 + i, port(i)));
                    let reply = bed.frame(&Packet::tcp_ack(l, p, port(i), 30000 + i));
                    assert_eq!(bed.run_frame(DIR_INGRESS, &fwd, REPEAT), TC_ACT_OK, "{fam} round {round} flow {i}");
                    assert_eq!(bed.run_frame(DIR_EGRESS, &reply, REPEAT), TC_ACT_OK, "{fam} round {round} reply {i}");
                }
            }
            let after = (bed.rule(0), bed.rule(1), bed.stats());
            let per_rule = |r: u16| (0..FLOWS).filter(|i| (port(*i) >= 2000) == (r == 1)).count() as u64;
            let est = |s: &[Counter]| s[stat::ALLOWED_ESTABLISHED as usize].packets;
            let each = 2 * 2 * REPEAT as u64;
            assert_eq!(est(&after.2) - est(&before.2), FLOWS as u64 * each, "{fam} (l3 offset {off})");
            assert_eq!(after.0.packets - before.0.packets, per_rule(0) * each, "{fam}: rule 0 counts its flows");
            assert_eq!(after.1.packets - before.1.packets, per_rule(1) * each, "{fam}: rule 1 counts its flows");
            assert_eq!(after.2[stat::DENIED as usize], before.2[stat::DENIED as usize]);

            // Next to flow 7 (cached just now): other source port, other direction.
            bed.expect(&format!("{fam} unseen sport"), DIR_INGRESS, &Packet::tcp_ack(p, l, 29999, port(7)), Pass, NEW);
            bed.expect(&format!("{fam} egress copy"), DIR_EGRESS, &Packet::tcp_ack(p, l, 30007, port(7)), Drop, DENIED);
            bed.expect(
                &format!("{fam} other peer"),
                DIR_INGRESS,
                &Packet::tcp_ack(h.stranger, l, 30007, port(7)),
                Drop,
                DENIED,
            );

            // Generation 1 keeps rule 0's ports only: cached flows of rule 1 are cut.
            fill(&mut bed.p, 1, &rules[..1]);
            bed.p.set_state(PolicyState { epoch: 1, initialized: 1 }).unwrap();
            for i in [7, 1007, 1500, 2999] {
                let (v, stats) = if port(i) < 2000 { (Pass, EST) } else { (Drop, DENIED) };
                bed.expect(
                    &format!("{fam} flow {i} after the flip"),
                    DIR_INGRESS,
                    &Packet::tcp_ack(p, l, 30000 + i, port(i)),
                    v,
                    stats,
                );
                bed.expect(
                    &format!("{fam} reply {i} after the flip"),
                    DIR_EGRESS,
                    &Packet::tcp_ack(l, p, port(i), 30000 + i),
                    v,
                    stats,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Conntrack lifetimes, quotas and what may claim to be established.

/// Keeps this test thread on one CPU: the flow cache is per CPU, and a test that checks
/// what the cache must not keep needs its packets to meet the same slots.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "sched_setaffinity");
    }
}

/// Short lifetimes for the unanswered and closing states (`short` ms), long ones (60 s,
/// past the flow cache's minimum) for answered flows.
fn short_lifetimes(short: u32, quota: u32) -> common::CtConfig {
    common::CtConfig {
        timeouts_ms: [short, 60_000, short, short, short, 60_000, short, 60_000],
        quota,
        mss_clamp: common::MssClamp::OFF,
    }
}

fn ct_state(bed: &mut Bed, key: &FlowKey) -> Option<common::CtState> {
    bed.conntrack().iter().find(|(k, _)| k == key).map(|(_, v)| common::CtState::from_u32(v.state).unwrap())
}

fn tcp_flags(mut pkt: Packet, flags: u8) -> Packet {
    pkt.l4[13] = flags;
    pkt
}

const FIN_ACK: u8 = 0x11;
const SYN_ACK: u8 = 0x12;
const RST: u8 = 0x04;

/// Entries expire per protocol and state (a thread on one CPU, short lifetimes set through
/// `CT_CONFIG`): only a SYN opens a TCP entry; an unanswered SYN or UDP query expires
/// quickly, an answered flow lives on; a FIN or RST shortens the life, a fresh SYN reopens
/// a closed tuple. An expired entry is deleted by the lookup that finds it, and the per-CPU
/// flow cache keeps no closing flow alive.
#[test]
fn conntrack_entries_expire_by_state() {
    pin_to_one_cpu();
    let short = std::time::Duration::from_millis(150);
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let fam = if is_v6 { "v6" } else { "v4" };
            let rules = [
                /* 0 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_TCP), Some((443, 443))),
                /* 1 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_UDP), Some((53, 53))),
            ];
            let mut bed = Bed::new(off, &rules);
            bed.p.set_ct_config(short_lifetimes(100, 0)).unwrap();
            let key = |sport: u16| FlowKey {
                src: mapped(l),
                dst: mapped(p),
                sport,
                dport: 443,
                proto: IPPROTO_TCP,
                direction: DIR_EGRESS,
                _pad: [0; 2],
            };
            let out = |sport: u16, flags: u8| tcp_flags(Packet::tcp(l, p, sport, 443), flags);
            let back = |sport: u16, flags: u8| tcp_flags(Packet::tcp(p, l, 443, sport), flags);
            let w = |s: &str| format!("{fam} {s}");

            bed.expect(&w("ACK without an entry (policy allows)"), DIR_EGRESS, &out(40000, 0x10), Pass, NEW);
            assert!(bed.conntrack().is_empty(), "{fam}: a non-SYN opened an entry");
            bed.expect(&w("its answer"), DIR_INGRESS, &back(40000, 0x10), Drop, DENIED);

            bed.expect(&w("SYN"), DIR_EGRESS, &out(40000, 0x02), Pass, NEW);
            assert_eq!(ct_state(&mut bed, &key(40000)), Some(common::CtState::New));
            std::thread::sleep(short);
            bed.expect(&w("SYN-ACK after the SYN expired"), DIR_INGRESS, &back(40000, SYN_ACK), Drop, DENIED);
            assert!(bed.conntrack().is_empty(), "{fam}: the expired entry was not deleted");

            bed.expect(&w("SYN again"), DIR_EGRESS, &out(40000, 0x02), Pass, NEW);
            bed.expect(&w("SYN-ACK"), DIR_INGRESS, &back(40000, SYN_ACK), Pass, EST);
            assert_eq!(ct_state(&mut bed, &key(40000)), Some(common::CtState::Established));
            bed.expect(&w("ACK"), DIR_EGRESS, &out(40000, 0x10), Pass, EST);
            bed.expect(&w("data back (cached)"), DIR_INGRESS, &back(40000, 0x10), Pass, EST);
            std::thread::sleep(short);
            bed.expect(&w("established outlives the short states"), DIR_EGRESS, &out(40000, 0x10), Pass, EST);
            bed.expect(&w("data back"), DIR_INGRESS, &back(40000, 0x10), Pass, EST);
            bed.expect(&w("FIN"), DIR_EGRESS, &out(40000, FIN_ACK), Pass, EST);
            assert_eq!(ct_state(&mut bed, &key(40000)), Some(common::CtState::Closing));
            std::thread::sleep(short);
            // Within the cache's trust window of the slots the ACKs filled: a slot kept
            // would pass this.
            bed.expect(&w("data back after FIN + lifetime"), DIR_INGRESS, &back(40000, 0x10), Drop, DENIED);

            bed.expect(&w("SYN 2"), DIR_EGRESS, &out(40001, 0x02), Pass, NEW);
            bed.expect(&w("SYN-ACK 2"), DIR_INGRESS, &back(40001, SYN_ACK), Pass, EST);
            bed.expect(&w("data back 2"), DIR_INGRESS, &back(40001, 0x10), Pass, EST);
            bed.expect(&w("RST"), DIR_INGRESS, &back(40001, RST), Pass, EST);
            assert_eq!(ct_state(&mut bed, &key(40001)), Some(common::CtState::Closed));
            bed.expect(&w("SYN reopens the closed tuple"), DIR_EGRESS, &out(40001, 0x02), Pass, EST);
            assert_eq!(ct_state(&mut bed, &key(40001)), Some(common::CtState::New));
            bed.expect(&w("RST again"), DIR_INGRESS, &back(40001, RST), Pass, EST);
            std::thread::sleep(short);
            bed.expect(&w("data back after RST + lifetime"), DIR_INGRESS, &back(40001, 0x10), Drop, DENIED);

            bed.expect(&w("udp query"), DIR_EGRESS, &Packet::udp(l, p, 5353, 53), Pass, NEW);
            std::thread::sleep(short);
            bed.expect(&w("late answer"), DIR_INGRESS, &Packet::udp(p, l, 53, 5353), Drop, DENIED);
            bed.expect(&w("udp query 2"), DIR_EGRESS, &Packet::udp(l, p, 5353, 53), Pass, NEW);
            bed.expect(&w("answer"), DIR_INGRESS, &Packet::udp(p, l, 53, 5353), Pass, EST);
            std::thread::sleep(short);
            bed.expect(&w("answered flow lives on"), DIR_INGRESS, &Packet::udp(p, l, 53, 5353), Pass, EST);
        }
    }
}

/// Entries made by a source's ingress packets count against its quota: over it, a new flow
/// passes untracked (`CT_UNTRACKED`: no entry, so its answers are judged by the policy)
/// while other sources and the local host's own flows
/// still get entries; an entry that expires gives its place back.
#[test]
fn per_source_quota_leaves_new_flows_over_it_untracked() {
    let short = std::time::Duration::from_millis(150);
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            // Another source: for IPv6 in another /64 (a /64 is one quota source).
            let (p, l, t) = (h.peer, h.local, if is_v6 { v6(2, 1) } else { h.trusted });
            let fam = if is_v6 { "v6" } else { "v4" };
            let rules = [
                /* 0 */ rule(DIR_INGRESS, &[p, t], &[l], Some(IPPROTO_UDP), None),
                /* 1 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_UDP), None),
            ];
            let mut bed = Bed::new(off, &rules);
            bed.p.set_ct_config(short_lifetimes(100, 3)).unwrap();
            for port in 1..=3 {
                bed.expect(
                    &format!("{fam} flow {port} of the peer"),
                    DIR_INGRESS,
                    &Packet::udp(p, l, port, 9),
                    Pass,
                    NEW,
                );
            }
            let untracked = &[stat::ALLOWED_NEW, stat::CT_UNTRACKED][..];
            bed.expect(&format!("{fam} flow 4 of the peer"), DIR_INGRESS, &Packet::udp(p, l, 4, 9), Pass, untracked);
            bed.expect(&format!("{fam} another source"), DIR_INGRESS, &Packet::udp(t, l, 4, 9), Pass, NEW);
            for port in 1..=5 {
                bed.expect(&format!("{fam} local flow {port}"), DIR_EGRESS, &Packet::udp(l, p, port, 9), Pass, NEW);
            }
            bed.expect(
                &format!("{fam} an established flow of the peer"),
                DIR_EGRESS,
                &Packet::udp(l, p, 9, 2),
                Pass,
                EST,
            );
            let qk = common::quota_key(&mapped(p));
            assert_eq!(bed.p.ct_quota().unwrap().get(&qk, 0).unwrap(), 3, "{fam}: the peer's count");
            let from_peer = bed.conntrack().iter().filter(|(k, _)| k.src == mapped(p)).count();
            assert_eq!(from_peer, 3, "{fam}: the untracked flow has no entry");
            std::thread::sleep(short);
            // The answer finds flow 1 expired: deleted, the place is free again.
            bed.expect(&format!("{fam} late answer"), DIR_EGRESS, &Packet::udp(l, p, 9, 1), Pass, NEW);
            bed.expect(&format!("{fam} flow 5 of the peer"), DIR_INGRESS, &Packet::udp(p, l, 5, 9), Pass, NEW);
            bed.expect(&format!("{fam} flow 6 of the peer"), DIR_INGRESS, &Packet::udp(p, l, 6, 9), Pass, untracked);
        }
    }
}

/// An ICMP error passes as established only when it goes back to the host that sent the
/// packet it quotes; addressed elsewhere it is judged by the policy like any ICMP message.
#[test]
fn icmp_errors_must_return_to_the_quoted_sender() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l, r, s) = (h.peer, h.local, h.router, h.stranger);
            let fam = if is_v6 { "v6" } else { "v4" };
            let icmp = key_icmp(is_v6);
            let (ty, code, rest) = if is_v6 { (1, 4, [0; 4]) } else { (3, 3, [0; 4]) };
            let rules = [
                /* 0 */ rule(DIR_EGRESS, &[l], &[p], Some(IPPROTO_TCP), Some((443, 443))),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22))),
                /* 2 */ rule(DIR_INGRESS, &[r], &[h.trusted], Some(icmp), None),
            ];
            let mut bed = Bed::new(off, &rules);
            let syn = Packet::tcp(l, p, 40000, 443);
            bed.expect(&format!("{fam} SYN"), DIR_EGRESS, &syn, Pass, NEW);
            bed.expect(&format!("{fam} ssh SYN"), DIR_INGRESS, &Packet::tcp(p, l, 50000, 22), Pass, NEW);
            let err = |src, dst, quoted: &Packet| Packet::icmp_error(src, dst, ty, code, rest, quoted);
            bed.expect(&format!("{fam} error back to the sender"), DIR_INGRESS, &err(r, l, &syn), Pass, EST);
            bed.expect(&format!("{fam} error to another host"), DIR_INGRESS, &err(r, s, &syn), Drop, DENIED);
            bed.expect(
                &format!("{fam} error to a host the policy allows"),
                DIR_INGRESS,
                &err(r, h.trusted, &syn),
                Pass,
                NEW,
            );
            let inbound = Packet::tcp(p, l, 50000, 22);
            bed.expect(&format!("{fam} outbound error to the sender"), DIR_EGRESS, &err(l, p, &inbound), Pass, EST);
            bed.expect(&format!("{fam} outbound error elsewhere"), DIR_EGRESS, &err(l, s, &inbound), Drop, DENIED);
        }
    }
}

/// WireGuard carries only IP: on the L3 device (offset 0) anything else is dropped; on
/// Ethernet test devices ARP passes. Counted in `NOT_IP` either way.
#[test]
fn non_ip_is_dropped_on_l3_devices() {
    for off in OFFSETS {
        let h = hosts(false);
        let mut bed = Bed::new(off, &[rule(DIR_INGRESS, &[h.peer], &[h.local], None, None)]);
        let v = if off == 0 { Drop } else { Pass };
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            bed.expect_frame(&format!("arp (l3 offset {off})"), dir, &arp_frame(), v, &[stat::NOT_IP]);
        }
    }
}

/// The agent's sweep (`enforce::sweep`) deletes the entries whose lifetime ran out on the
/// programs' clock, keeps the live ones, and recounts the quota counters from what stays
/// (a drifted count is corrected, a source without entries forgotten).
#[test]
fn sweep_deletes_expired_entries_and_recounts_quotas() {
    let short = std::time::Duration::from_millis(150);
    for is_v6 in [false, true] {
        let h = hosts(is_v6);
        let (p, l, t) = (h.peer, h.local, if is_v6 { v6(2, 1) } else { h.trusted });
        let fam = if is_v6 { "v6" } else { "v4" };
        let rules = [rule(DIR_INGRESS, &[p, t], &[l], Some(IPPROTO_UDP), None)];
        let mut bed = Bed::new(14, &rules);
        bed.p.set_ct_config(short_lifetimes(100, 0)).unwrap();
        for port in 1..=3 {
            bed.expect(&format!("{fam} peer flow {port}"), DIR_INGRESS, &Packet::udp(p, l, port, 9), Pass, NEW);
        }
        bed.expect(&format!("{fam} other flow"), DIR_INGRESS, &Packet::udp(t, l, 1, 9), Pass, NEW);
        // Answered: 60 s.
        bed.expect(&format!("{fam} answer"), DIR_EGRESS, &Packet::udp(l, p, 9, 3), Pass, EST);
        let (qp, qt) = (common::quota_key(&mapped(p)), common::quota_key(&mapped(t)));
        bed.p.ct_quota().unwrap().insert(qp, 40, 0).unwrap();
        let stats = bed.p.sweep_conntrack().unwrap();
        assert_eq!((stats.expired, stats.live), (0, 4), "{fam}: nothing expired yet");
        assert_eq!(bed.p.ct_quota().unwrap().get(&qp, 0).unwrap(), 3, "{fam}: drifted count corrected");
        std::thread::sleep(short);
        let stats = bed.p.sweep_conntrack().unwrap();
        assert_eq!((stats.expired, stats.live), (3, 1), "{fam}: the unanswered flows are swept");
        let ct = bed.conntrack();
        assert_eq!(ct.len(), 1);
        assert_eq!(ct[0].0.sport, 3, "{fam}: the answered flow stays");
        let quota = bed.p.ct_quota().unwrap();
        assert_eq!(quota.get(&qp, 0).unwrap(), 1, "{fam}: peer count");
        assert!(quota.get(&qt, 0).is_err(), "{fam}: a source without entries is forgotten");
    }
}

/// A flow's packets and bytes, both directions, whichever path each took (the new-flow
/// path, conntrack, the per-CPU flow cache): the entry's counts plus what the cache holds
/// unfolded add up to every packet, a FIN folds the cache into the entry, and the sweep
/// hands the ended flow back with its first packet's tuple, its rule and every packet.
#[test]
fn conntrack_counts_every_packet_of_a_flow() {
    pin_to_one_cpu();
    const EACH: u32 = 40;
    for is_v6 in [false, true] {
        let h = hosts(is_v6);
        let (p, l) = (h.peer, h.local);
        let fam = if is_v6 { "v6" } else { "v4" };
        let rules = [rule(DIR_INGRESS, &[p], &[l], None, None)];
        let mut bed = Bed::new(14, &rules);
        let unfolded = |bed: &Bed, key: &FlowKey, v: &common::FlowValue| {
            let cache = PerCpuArray::try_from(bed.p.ebpf.map(common::FLOW_CACHE).unwrap()).unwrap();
            Unfolded::read(&cache).unwrap().of(key, v.first_seen_ns)
        };
        let entry = |bed: &mut Bed, first: &Packet| {
            // One flow per protocol in this test.
            let found = bed.p.conntrack().unwrap().iter().map(|r| r.unwrap()).find(|(k, _)| k.proto == first.proto);
            found.unwrap_or_else(|| panic!("{fam}: no entry of protocol {}", first.proto))
        };

        // UDP: a query, its answer, then EACH more each way: the cache passes most.
        let (q, a) = (Packet::udp(p, l, 5000, 53), Packet::udp(l, p, 53, 5000));
        let (qf, af) = (bed.frame(&q), bed.frame(&a));
        assert_eq!(bed.run_frame(DIR_INGRESS, &qf, 1), TC_ACT_OK);
        assert_eq!(bed.run_frame(DIR_EGRESS, &af, 1), TC_ACT_OK);
        assert_eq!(bed.run_frame(DIR_INGRESS, &qf, EACH), TC_ACT_OK);
        assert_eq!(bed.run_frame(DIR_EGRESS, &af, EACH), TC_ACT_OK);
        let sent = (2 * (EACH as u64 + 1), (EACH as u64 + 1) * (qf.len() + af.len()) as u64);
        let (k, v) = entry(&mut bed, &q);
        let (up, ub) = unfolded(&bed, &k, &v);
        assert!(up > 0, "{fam}: the cache passed packets the entry has not counted yet: {v:?}");
        assert_eq!((v.packets + up, v.bytes + ub), sent, "{fam} udp: entry {v:?} + unfolded ({up}, {ub})");

        // TCP: the handshake, EACH acks each way, a FIN: the FIN folds this CPU's slots.
        let (syn, synack) = (Packet::tcp(p, l, 40000, 22), tcp_flags(Packet::tcp(l, p, 22, 40000), SYN_ACK));
        let (fwd, back) = (Packet::tcp_ack(p, l, 40000, 22), Packet::tcp_ack(l, p, 22, 40000));
        let fin = tcp_flags(Packet::tcp(p, l, 40000, 22), FIN_ACK);
        let mut total = (0, 0);
        for (dir, pkt, n) in [
            (DIR_INGRESS, &syn, 1),
            (DIR_EGRESS, &synack, 1),
            (DIR_INGRESS, &fwd, EACH),
            (DIR_EGRESS, &back, EACH),
            (DIR_INGRESS, &fin, 1),
        ] {
            let frame = bed.frame(pkt);
            assert_eq!(bed.run_frame(dir, &frame, n), TC_ACT_OK, "{fam} tcp");
            total = (total.0 + n as u64, total.1 + n as u64 * frame.len() as u64);
        }
        let (tk, tv) = entry(&mut bed, &syn);
        assert_eq!((tv.packets, tv.bytes), total, "{fam} tcp: the FIN folded the cache's counts into the entry");
        assert_eq!(unfolded(&bed, &tk, &tv), (0, 0), "{fam} tcp");

        // Both end (short lifetimes): the sweep hands them back with every packet.
        bed.p
            .set_ct_config(common::CtConfig {
                timeouts_ms: [50; common::CT_TIMEOUTS],
                quota: 0,
                mss_clamp: common::MssClamp::OFF,
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(120));
        let mut ended = bed.p.sweep_conntrack().unwrap().ended;
        ended.sort_by_key(|f| f.first.proto);
        let got: Vec<_> = ended.iter().map(|f| (f.first, f.rule, f.packets, f.bytes)).collect();
        assert_eq!(
            got,
            [(tv.first_packet(&tk), 0, total.0, total.1), (v.first_packet(&k), 0, sent.0, sent.1)],
            "{fam}: ended flows"
        );
        assert!(ended.iter().all(|f| f.first_seen_ns > 0 && f.first.direction == DIR_INGRESS), "{fam}: {ended:?}");
    }
}

/// Conntrack files a flow once, under its canonical tuple (`FlowKey::canonical`), whichever
/// of its two endpoints orders first: for a peer whose flows are stored as sent and one
/// whose flows are stored reversed, the answer is established, the table holds one entry
/// per flow, the quota (also after a sweep's recount) is the first packet's source's, and
/// after a flip the entry is judged again as its first packet (still allowed: stays; no
/// longer: removed, its quota count released).
#[test]
fn conntrack_files_each_flow_once_whichever_side_orders_first() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let fam = if is_v6 { "v6" } else { "v4" };
            let l = h.local;
            let key = |x: IpAddr| FlowKey {
                src: mapped(x),
                dst: mapped(l),
                sport: 5000,
                dport: 53,
                proto: IPPROTO_UDP,
                direction: DIR_INGRESS,
                _pad: [0; 2],
            };
            let peers = [h.peer, h.stranger, h.trusted, h.router];
            let kept = *peers.iter().find(|x| !key(**x).canonical().1).expect("a peer stored as sent");
            let moved = *peers.iter().find(|x| key(**x).canonical().1).expect("a peer stored reversed");
            let to_l = |x| rule(DIR_INGRESS, &[x], &[l], Some(IPPROTO_UDP), None);
            let mut bed = Bed::new(off, &[to_l(kept), to_l(moved)]);
            for x in [kept, moved] {
                let what = format!("{fam} {x}");
                bed.expect(&format!("{what} query"), DIR_INGRESS, &Packet::udp(x, l, 5000, 53), Pass, NEW);
                bed.expect(&format!("{what} answer"), DIR_EGRESS, &Packet::udp(l, x, 53, 5000), Pass, EST);
                bed.expect(&format!("{what} next query"), DIR_INGRESS, &Packet::udp(x, l, 5000, 53), Pass, EST);
            }
            let raw: Vec<(FlowKey, common::FlowValue)> =
                bed.p.conntrack().unwrap().iter().map(|r| r.unwrap()).collect();
            assert_eq!(raw.len(), 2, "{fam}: one entry per flow");
            for x in [kept, moved] {
                let (canonical, swapped) = key(x).canonical();
                let (_, v) = raw.iter().find(|(k, _)| *k == canonical).expect("entry under the canonical key");
                assert_eq!(v.flags & common::FLOW_SWAPPED != 0, swapped, "{fam} {x}: orientation recorded");
                assert_eq!(v.first_packet(&canonical), key(x));
            }
            let count =
                |bed: &mut Bed, x: IpAddr| bed.p.ct_quota().unwrap().get(&common::quota_key(&mapped(x)), 0).ok();
            for x in [kept, moved] {
                assert_eq!(count(&mut bed, x), Some(1), "{fam} {x}: counted against the first packet's source");
            }
            assert_eq!(count(&mut bed, l), None, "{fam}: nothing counted against the local end");
            bed.p.sweep_conntrack().unwrap();
            for x in [kept, moved] {
                assert_eq!(count(&mut bed, x), Some(1), "{fam} {x}: the sweep recounts the first packet's source");
            }
            assert_eq!(count(&mut bed, l), None, "{fam}: the sweep counts nothing for the local end");

            // Generation 1 keeps one of the two rules: each entry is judged as its first packet.
            for (stays, goes) in [(kept, moved), (moved, kept)] {
                let mut bed = Bed::new(off, &[to_l(kept), to_l(moved)]);
                for x in [kept, moved] {
                    bed.expect(&format!("{fam} {x} query"), DIR_INGRESS, &Packet::udp(x, l, 5000, 53), Pass, NEW);
                }
                fill(&mut bed.p, 1, &[to_l(stays)]);
                bed.p.set_state(PolicyState { epoch: 1, initialized: 1 }).unwrap();
                let what = format!("{fam} after the flip");
                bed.expect(
                    &format!("{what}: answer to {stays}"),
                    DIR_EGRESS,
                    &Packet::udp(l, stays, 53, 5000),
                    Pass,
                    EST,
                );
                bed.expect(
                    &format!("{what}: answer to {goes}"),
                    DIR_EGRESS,
                    &Packet::udp(l, goes, 53, 5000),
                    Drop,
                    DENIED,
                );
                assert_eq!(bed.conntrack().len(), 1, "{what}: the revoked flow's entry is gone");
                assert_eq!(count(&mut bed, stays), Some(1), "{what}: {stays} still counted");
                assert_eq!(count(&mut bed, goes), Some(0), "{what}: {goes}'s count released");
            }
        }
    }
}

/// New flows are judged through the per-CPU verdict cache (`ebpf/src/verdict_cache.rs`),
/// which must answer exactly as the policy: flows that differ only in source port share a
/// decision, a neighbour that differs in anything the policy reads (destination port,
/// protocol, direction, either address, family) gets its own, and after a flip no decision
/// of the old epoch answers.
#[test]
fn verdict_cache_answers_exactly_as_the_policy() {
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let fam = if is_v6 { "v6" } else { "v4" };
            let rules = [
                /* 0 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((443, 443))),
                /* 1 */ rule(DIR_INGRESS, &[h.trusted], &[l], Some(IPPROTO_UDP), Some((53, 53))),
            ];
            let mut bed = Bed::new(off, &rules);
            for sport in 40000..40040 {
                bed.expect(&format!("{fam} SYN from {sport}"), DIR_INGRESS, &Packet::tcp(p, l, sport, 443), Pass, NEW);
            }
            // Each differs from the cached decision in one input the policy reads.
            let neighbours = [
                ("other port", DIR_INGRESS, Packet::tcp(p, l, 40000, 444)),
                ("other protocol", DIR_INGRESS, Packet::udp(p, l, 40001, 443)),
                ("other direction", DIR_EGRESS, Packet::tcp(p, l, 40002, 443)),
                ("other source", DIR_INGRESS, Packet::tcp(h.stranger, l, 40003, 443)),
                ("other destination", DIR_INGRESS, Packet::tcp(p, h.trusted, 40004, 443)),
                ("reversed", DIR_INGRESS, Packet::tcp(l, p, 40005, 443)),
            ];
            for round in 0..2 {
                for (what, dir, pkt) in &neighbours {
                    bed.expect(&format!("{fam} {what}"), *dir, pkt, Drop, DENIED);
                }
                let dns = Packet::udp(h.trusted, l, 5353 + round, 53);
                bed.expect(&format!("{fam} dns"), DIR_INGRESS, &dns, Pass, NEW);
            }
            // The other family's packet with the same addresses cannot exist (IPv4 is
            // IPv4-mapped, and a mapped IPv6 packet is malformed), so the family is covered
            // by the key; the epoch next.
            fill(&mut bed.p, 1, &rules[1..]);
            bed.p.set_state(PolicyState { epoch: 1, initialized: 1 }).unwrap();
            bed.expect(&format!("{fam} SYN after the flip"), DIR_INGRESS, &Packet::tcp(p, l, 40040, 443), Drop, DENIED);
            fill(&mut bed.p, 0, &rules);
            bed.p.set_state(PolicyState { epoch: 2, initialized: 1 }).unwrap();
            bed.expect(
                &format!("{fam} SYN after the flip back"),
                DIR_INGRESS,
                &Packet::tcp(p, l, 40041, 443),
                Pass,
                NEW,
            );
        }
    }
}

#[test]
fn passed_syns_and_syn_acks_have_their_mss_clamped() {
    // The clamp's own cases (option orders, malformed options ...) are in mss_clamp.rs;
    // here: the policy programs clamp what they pass, in both directions, and only that.
    let limits = common::MssClamp::for_mtu(1420);
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let limit = if is_v6 { limits.v6 } else { limits.v4 };
            let rules = [rule(DIR_INGRESS, &[h.peer], &[h.local], Some(IPPROTO_TCP), Some((443, 443)))];
            let mut bed = Bed::new(off, &rules);
            bed.p.set_ct_config(common::CtConfig { mss_clamp: limits, ..Default::default() }).unwrap();
            let mss_1460 = [2, 4, 0x05, 0xb4];
            let run = |bed: &Bed, dir: u8, pkt: Packet| -> (u32, Vec<u8>) {
                let frame = bed.frame(&pkt.with_tcp_checksum());
                let mut out = vec![0u8; frame.len() + 64];
                let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
                let r = bed.p.program(dir).unwrap().test_run(opts).unwrap();
                out.truncate(r.data_size_out as usize);
                (r.return_value, out.split_off(off as usize))
            };
            let what = if is_v6 { "IPv6" } else { "IPv4" };
            let syn = Packet::tcp(h.peer, h.local, 40000, 443).tcp_options(&mss_1460);
            let (verdict, out) = run(&bed, DIR_INGRESS, syn);
            assert_eq!((verdict, tcp_mss(&out)), (TC_ACT_OK, Some(limit)), "{what}: allowed SYN (offset {off})");
            assert!(tcp_checksum_ok(&out), "{what}: checksum of the clamped SYN");
            // The answer is established: clamped on its way out too.
            let syn_ack = Packet::tcp(h.local, h.peer, 443, 40000).tcp_options(&mss_1460).tcp_flags(0x12);
            let (verdict, out) = run(&bed, DIR_EGRESS, syn_ack);
            assert_eq!((verdict, tcp_mss(&out)), (TC_ACT_OK, Some(limit)), "{what}: SYN-ACK (offset {off})");
            assert!(tcp_checksum_ok(&out), "{what}: checksum of the clamped SYN-ACK");
            // A denied SYN is dropped (whatever it says), an ACK is not rewritten.
            let denied = Packet::tcp(h.peer, h.local, 40001, 80).tcp_options(&mss_1460);
            assert_eq!(run(&bed, DIR_INGRESS, denied).0, TC_ACT_SHOT, "{what}: denied SYN");
            let ack = Packet::tcp(h.peer, h.local, 40000, 443).tcp_options(&mss_1460).tcp_flags(0x10);
            let (verdict, out) = run(&bed, DIR_INGRESS, ack);
            assert_eq!((verdict, tcp_mss(&out)), (TC_ACT_OK, Some(1460)), "{what}: ACK left alone");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The live trace.

fn set_trace(bed: &mut Bed, filter: TraceFilter, on: u32) {
    let map = bed.p.ebpf.map_mut(common::TRACE).expect("TRACE map");
    aya::maps::Array::<_, TraceFilter>::try_from(map).unwrap().set(0, filter, 0).unwrap();
    let map = bed.p.ebpf.map_mut(common::TRACE_ARMED).expect("TRACE_ARMED map");
    aya::maps::Array::<_, u32>::try_from(map).unwrap().set(0, on, 0).unwrap();
}

fn arm_trace(bed: &mut Bed, spec: &TraceSpec) {
    set_trace(bed, spec.filter(std::process::id()), 1);
}

fn disarm_trace(bed: &mut Bed) {
    set_trace(bed, TraceFilter::default(), 0);
}

fn traced(bed: &mut Bed) -> Vec<TraceRecord> {
    let map = bed.p.ebpf.map_mut(common::TRACE_EVENTS).expect("TRACE_EVENTS map");
    let mut ring = aya::maps::RingBuf::try_from(map).unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), std::mem::size_of::<TraceRecord>());
        // SAFETY: a plain #[repr(C)] record of the size just checked.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const TraceRecord) });
    }
    out
}

/// Only an armed trace sends records, only of the packets its filter matches (source
/// prefix, protocol, a port at either end), each with the path that decided it (new,
/// conntrack, flow cache), the verdict and the deciding rule.
#[test]
fn trace_reports_path_verdict_and_rule_of_matching_packets() {
    pin_to_one_cpu(); // the flow-cache hit below needs the CPU that cached the flow
    for off in OFFSETS {
        for is_v6 in [false, true] {
            let h = hosts(is_v6);
            let (p, l) = (h.peer, h.local);
            let what = format!("v6 {is_v6}, l3 offset {off}");
            let rules = [
                /* 0 */ rule(DIR_INGRESS, &[h.trusted], &[l], None, None),
                /* 1 */ rule(DIR_INGRESS, &[p], &[l], Some(IPPROTO_TCP), Some((22, 22))),
            ];
            let mut bed = Bed::new(off, &rules);
            bed.expect("not armed", DIR_INGRESS, &Packet::tcp(p, l, 40000, 22), Pass, NEW);
            assert_eq!(traced(&mut bed), [], "{what}: nothing is sent while no trace runs");

            let peer = ipnet::IpNet::from(p);
            arm_trace(&mut bed, &TraceSpec::new(Some(peer), None, None, Some(22)).unwrap());
            bed.expect("syn", DIR_INGRESS, &Packet::tcp(p, l, 40001, 22), Pass, NEW);
            bed.expect("ack", DIR_INGRESS, &Packet::tcp_ack(p, l, 40001, 22), Pass, EST);
            bed.expect("ack again", DIR_INGRESS, &Packet::tcp_ack(p, l, 40001, 22), Pass, EST);
            // Not from the peer; not port 22; another peer's traffic.
            bed.expect("reply", DIR_EGRESS, &Packet::tcp_ack(l, p, 22, 40001), Pass, EST);
            bed.expect("port 23", DIR_INGRESS, &Packet::tcp(p, l, 40002, 23), Drop, DENIED);
            bed.expect("trusted", DIR_INGRESS, &Packet::tcp(h.trusted, l, 40003, 22), Pass, NEW);
            let got = traced(&mut bed);
            let summary: Vec<(u8, u8, u32, u16, u8)> =
                got.iter().map(|r| (r.path, r.verdict, r.rule, r.flow.sport, r.tcp_flags)).collect();
            assert_eq!(
                summary,
                [
                    (path::NEW, TRACE_PASS, 1, 40001, 0x02),
                    (path::CONNTRACK, TRACE_PASS, 1, 40001, 0x10),
                    (path::FLOW_CACHE, TRACE_PASS, 1, 40001, 0x10),
                ],
                "{what}: {got:?}"
            );
            let syn = bed.frame(&Packet::tcp(p, l, 40001, 22));
            assert_eq!(got[0].len, syn.len() as u32, "{what}");
            assert_eq!(got[0].port, common::EVENT_PORT | 22, "{what}");
            assert_eq!(
                got[0].flow,
                FlowKey {
                    src: mapped(p),
                    dst: mapped(l),
                    sport: 40001,
                    dport: 22,
                    proto: IPPROTO_TCP,
                    direction: DIR_INGRESS,
                    _pad: [0; 2]
                },
                "{what}: the packet's own tuple"
            );

            // A denial names no rule; the trusted peer's packets name rule 0; the egress
            // reply matches a destination filter and either end's port.
            let any = TraceSpec::new(None, Some(ipnet::IpNet::from(p)), None, Some(22)).unwrap();
            arm_trace(&mut bed, &any);
            bed.expect("reply", DIR_EGRESS, &Packet::tcp_ack(l, p, 22, 40001), Pass, EST);
            arm_trace(&mut bed, &TraceSpec::new(None, None, Some(IPPROTO_UDP), None).unwrap());
            bed.expect("udp", DIR_INGRESS, &Packet::udp(p, l, 40004, 53), Drop, DENIED);
            bed.expect("tcp: other protocol", DIR_INGRESS, &Packet::tcp(p, l, 40005, 22), Pass, NEW);
            bed.expect("trusted udp", DIR_INGRESS, &Packet::udp(h.trusted, l, 40006, 53), Pass, NEW);
            let got: Vec<(u8, u8, u32, u8)> =
                traced(&mut bed).iter().map(|r| (r.path, r.verdict, r.rule, r.flow.direction)).collect();
            assert_eq!(
                got,
                [
                    (path::FLOW_CACHE, TRACE_PASS, 1, DIR_EGRESS),
                    (path::NEW, TRACE_DROP, common::NO_RULE, DIR_INGRESS),
                    (path::NEW, TRACE_PASS, 0, DIR_INGRESS),
                ],
                "{what}"
            );

            // The agent's sweep leaves a live tracer's filter alone and disarms a dead one's.
            assert!(!disarm_orphan(&mut bed.p.ebpf).unwrap(), "{what}: this process traces");
            bed.expect("still armed", DIR_INGRESS, &Packet::udp(p, l, 40007, 53), Drop, DENIED);
            assert_eq!(traced(&mut bed).len(), 1, "{what}");
            let mut gone = TraceSpec::new(None, None, None, None).unwrap().filter(std::process::id());
            gone.tracer = 1 << 23; // beyond pid_max: no such process
            set_trace(&mut bed, gone, 1);
            assert!(disarm_orphan(&mut bed.p.ebpf).unwrap(), "{what}: the tracer is gone");
            bed.expect("orphan disarmed", DIR_INGRESS, &Packet::udp(p, l, 40008, 53), Drop, DENIED);
            assert_eq!(traced(&mut bed), [], "{what}: nothing once the orphan is disarmed");

            arm_trace(&mut bed, &TraceSpec::new(None, None, None, None).unwrap());
            disarm_trace(&mut bed);
            bed.expect("disarmed", DIR_INGRESS, &Packet::udp(p, l, 40009, 53), Drop, DENIED);
            assert_eq!(traced(&mut bed), [], "{what}: nothing after disarming");
        }
    }
}
