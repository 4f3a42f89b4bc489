//! The differential test's random data: a seedable RNG, policies (rules around a few anchor
//! addresses, so prefixes nest, overlap and tie; small mutations of the previous policy) and
//! first packets of flows aimed at those rules, each with the conntrack keys the program
//! derives for it. Everything is drawn from one [`Rng`], so a seed replays a whole run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use wirefence_agent::policy::model::has_ports;
use wirefence_agent::policy::{self as pol, Direction, Policy, PortRange, Rule, RuleDirection};
use wirefence_common::FlowKey;
use wirefence_tests::bpf::mapped;
use wirefence_tests::packet as wire;

// ---------------------------------------------------------------------------------------
// Randomness (SplitMix64: tiny, seedable, good enough for test data).

pub struct Rng(pub u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn pick<T: Copy>(&mut self, s: &[T]) -> T {
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

pub fn gen_policy(rng: &mut Rng) -> Policy {
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
pub fn mutate(rng: &mut Rng, prev: &Policy) -> Policy {
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
pub fn tracked_key(v6: bool, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8], dir: u8) -> Option<FlowKey> {
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
pub enum Kind {
    /// TCP/UDP/UDP-Lite/SCTP, ICMP echo, other protocols: connection-tracked.
    Tracked,
    /// ICMP informational other than echo.
    Untracked,
    /// ICMP error (quoting a packet that is never in conntrack: the test redraws those).
    IcmpError,
    /// Non-first fragment.
    Fragment,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub eval: pol::Packet,
    pub wire: wire::Packet,
    pub what: String,
    pub kind: Kind,
    /// The conntrack entry an allowed packet creates.
    pub track: Option<FlowKey>,
    /// Conntrack keys whose presence would make the packet established.
    pub probes: Vec<FlowKey>,
}

impl Case {
    pub fn dir(&self) -> u8 {
        self.eval.direction.key_byte()
    }
}

pub struct PolicyView<'a> {
    rules: &'a [Rule],
    /// All rule prefixes by [role][family].
    nets: [[Vec<IpNet>; 2]; 2],
    ports: Vec<PortRange>,
}

impl<'a> PolicyView<'a> {
    pub fn new(policy: &'a Policy) -> PolicyView<'a> {
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

pub fn gen_case(rng: &mut Rng, view: &PolicyView) -> Case {
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
        let mut p = wire::Packet::ported(src, dst, proto, sport, dport);
        let mut what = format!("proto {proto} {sport}->{dport}");
        // Mostly a SYN (it opens an entry); sometimes other flags (they open none).
        if proto == wire::IPPROTO_TCP && rng.pct(20) {
            p.l4[13] = super::conntrack::gen_flags(rng);
            what += &format!(" flags {:#04x}", p.l4[13]);
        }
        (p, Some(dport), Kind::Tracked, what)
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
