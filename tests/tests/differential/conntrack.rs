//! The reference conntrack of the differential test: per tuple, the state the program must
//! hold (TCP by flags: only a SYN opens, an answer establishes, FIN closing, RST closed, a
//! fresh SYN reopens a closing or closed tuple; the other protocols: new until answered),
//! the rule that allowed it and when it was last stamped, on a virtual clock; and the packets
//! that continue flows (answers and more packets of earlier flows, with TCP flags).
//!
//! # Time
//!
//! The program ages an entry by `bpf_ktime_get_coarse_ns() - last_seen_ns`. The test never
//! sleeps: virtual time advances in steps of [`TICK_MS`], and before each packet the stamps of
//! the entries its lookups can meet are rewritten to `CLOCK_MONOTONIC_COARSE now - virtual
//! age` (`Bed::restamp`), so the program sees the virtual age plus the few microseconds
//! between that write and the run. That noise never decides anything because
//! - the lifetimes the test writes to `WF_CT_CONFIG` ([`LIFETIMES_MS`]) lie 50 ms off a
//!   multiple of the tick, so "age > lifetime" never sits on an edge, and
//! - the stamp refresh threshold (a sixteenth of the lifetime) lies 40 to 90 ms above a
//!   multiple of the tick, so "age > granularity" never does either;
//! - every lifetime is under the flow cache's 4 s threshold, so no verdict is ever cached
//!   (the per-CPU cache is trusted by real jiffies, which the virtual clock does not move).
//!
//! Rewriting the stamps of exactly the entries a packet meets (rather than all entries at each
//! advance) keeps the real age equal to the modelled one, and the program's own stamp writes
//! are checked (refreshed or left alone, as modelled) before they are overwritten.
//! The defaults of zero fields are not exercised here (their lifetimes are minutes, and would
//! let the flow cache in): `bpf_program.rs` covers them.

use std::collections::HashMap;

use wirefence_agent::policy::model::has_ports;
use wirefence_agent::policy::{self as pol, Direction};
use wirefence_common::{CtConfig, CtState, FlowKey, CT_TIMEOUTS, DIR_INGRESS};
use wirefence_tests::packet as wire;

use super::generate::{tracked_key, Case, Kind, Rng};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
const IPPROTO_TCP: u8 = 6;

/// The virtual clock's step.
pub const TICK_MS: u64 = 100;

/// Lifetimes the test configures: 50 ms off a tick, with a sixteenth 40..90 ms past a tick,
/// and all under the flow cache's 4 s (see the module comment).
pub const LIFETIMES_MS: &[u32] = &[750, 950, 1150, 1350, 2350, 2550, 2850, 3950];

/// A random `WF_CT_CONFIG` for a policy (quota 0: the default, far above a policy's flows).
pub fn gen_config(rng: &mut Rng) -> CtConfig {
    let mut timeouts_ms = [0; CT_TIMEOUTS];
    for t in &mut timeouts_ms {
        *t = rng.pick(LIFETIMES_MS);
    }
    CtConfig { timeouts_ms, quota: 0, mss_clamp: wirefence_common::MssClamp::OFF }
}

/// Virtual time before a packet: mostly none, sometimes up to 3 s.
pub fn gen_advance(rng: &mut Rng) -> u64 {
    if rng.pct(88) {
        0
    } else {
        TICK_MS * (1 + rng.below(30))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The policy's rule index.
    pub rule: u32,
    pub state: CtState,
    pub last_ms: u64,
}

/// What the program's conntrack lookup does with a tracked packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No entry for the tuple either way.
    Miss,
    /// The entry `key` had outlived its state: deleted, the packet is judged as new.
    Expired { key: FlowKey, age_ms: u64 },
    /// Established under the entry `key`'s rule; `stamped`: its stamp is now.
    Hit { key: FlowKey, rule: u32, stamped: bool },
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let tuple = |k: &FlowKey| {
            format!("{}:{}>{}:{} proto {} dir {}", ip(&k.src), k.sport, ip(&k.dst), k.dport, k.proto, k.direction)
        };
        match self {
            Lookup::Miss => write!(f, "no entry"),
            Lookup::Expired { key, age_ms } => write!(f, "expired entry {} ({age_ms} ms old)", tuple(key)),
            Lookup::Hit { key, rule, stamped } => {
                write!(f, "entry {} of rule {rule}, stamp {}", tuple(key), if *stamped { "refreshed" } else { "kept" })
            }
        }
    }
}

fn ip(a: &[u8; 16]) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(*a);
    v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
}

pub struct Mirror {
    pub entries: HashMap<FlowKey, Entry>,
    pub now_ms: u64,
    pub cfg: CtConfig,
}

/// Whether `flags` may open a TCP flow (SYN alone); any packet opens the other protocols'.
pub fn may_start(proto: u8, flags: u8) -> bool {
    proto != IPPROTO_TCP || flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The state after a packet of an entry in `old` (`reply`: against the entry's direction).
pub fn next_state(proto: u8, old: CtState, flags: u8, reply: bool) -> CtState {
    let tcp = proto == IPPROTO_TCP;
    if tcp && flags & TCP_RST != 0 {
        CtState::Closed
    } else if tcp && flags & TCP_FIN != 0 {
        if old == CtState::Closed {
            old
        } else {
            CtState::Closing
        }
    } else if tcp && !reply && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if old >= CtState::Closing {
            CtState::New
        } else {
            old
        }
    } else if reply && old == CtState::New {
        CtState::Established
    } else {
        old
    }
}

impl Mirror {
    pub fn new(cfg: CtConfig) -> Mirror {
        Mirror { entries: HashMap::new(), now_ms: 0, cfg }
    }

    pub fn lifetime_ms(&self, proto: u8, state: CtState) -> u64 {
        self.cfg.timeout_ns(proto, state as u32) / 1_000_000
    }

    /// The entry a packet with tuple `key` meets first (its own tuple, then the reversed one).
    pub fn found(&self, key: &FlowKey) -> Option<(FlowKey, bool)> {
        if self.entries.contains_key(key) {
            return Some((*key, false));
        }
        let rev = key.reversed();
        self.entries.contains_key(&rev).then_some((rev, true))
    }

    /// The program's `established` for a tracked packet of tuple `key` with TCP `flags`.
    pub fn established(&mut self, key: &FlowKey, flags: u8) -> Lookup {
        let Some((k, reply)) = self.found(key) else { return Lookup::Miss };
        let e = self.entries[&k];
        let age_ms = self.now_ms - e.last_ms;
        let life = self.lifetime_ms(k.proto, e.state);
        if age_ms > life {
            self.entries.remove(&k);
            return Lookup::Expired { key: k, age_ms };
        }
        let state = next_state(k.proto, e.state, flags, reply);
        let granularity_ns = ((life * 1_000_000) >> 4).min(1_000_000_000);
        let stamped = state != e.state || age_ms * 1_000_000 > granularity_ns;
        let last_ms = if stamped { self.now_ms } else { e.last_ms };
        self.entries.insert(k, Entry { rule: e.rule, state, last_ms });
        Lookup::Hit { key: k, rule: e.rule, stamped }
    }

    pub fn insert(&mut self, key: FlowKey, rule: u32) {
        let old = self.entries.insert(key, Entry { rule, state: CtState::New, last_ms: self.now_ms });
        assert!(old.is_none(), "the reference inserted over a live entry");
    }
}

/// The TCP flags of a case (0 for other protocols).
pub fn flags_of(case: &Case) -> u8 {
    if case.eval.proto == IPPROTO_TCP && case.kind == Kind::Tracked {
        case.wire.l4[13]
    } else {
        0
    }
}

/// TCP flags for packets: mostly the handshake and teardown, some odd combinations.
pub fn gen_flags(rng: &mut Rng) -> u8 {
    rng.pick(&[0x02, 0x02, 0x12, 0x10, 0x10, 0x18, 0x11, 0x11, 0x01, 0x04, 0x14, 0x00, 0x03, 0x06])
}

/// Another packet of the flow `first` started: an answer or one more in its direction.
pub fn gen_follow_up(rng: &mut Rng, first: &Case) -> Case {
    let k = first.track.expect("a tracked case");
    let reply = rng.pct(60);
    let e = &first.eval;
    let (src, dst, sport, dport) =
        if reply { (e.dst, e.src, k.dport, k.sport) } else { (e.src, e.dst, k.sport, k.dport) };
    let direction = match (e.direction, reply) {
        (d, false) => d,
        (Direction::Ingress, true) => Direction::Egress,
        (Direction::Egress, true) => Direction::Ingress,
    };
    let proto = e.proto;
    let (p, port, what) = if has_ports(proto) {
        let mut p = wire::Packet::ported(src, dst, proto, sport, dport);
        let mut what = format!("proto {proto} {sport}->{dport}");
        if proto == IPPROTO_TCP {
            p.l4[13] = gen_flags(rng);
            what += &format!(" flags {:#04x}", p.l4[13]);
        }
        (p, Some(dport), what)
    } else if k.sport != 0 || k.dport != 0 {
        // ICMP echo: the request's id is its sport, the reply's its dport.
        let request = k.sport != 0;
        let request = request != reply;
        let id = if request { sport } else { dport };
        let p = wire::Packet::echo(src, dst, request, id);
        let ty = p.l4[0];
        (p, Some(u16::from(ty) << 8), format!("icmp echo type {ty} id {id}"))
    } else {
        (wire::Packet::new(src, dst, proto, vec![]), Some(0), format!("proto {proto}"))
    };
    let what = format!("{} {what}", if reply { "answer:" } else { "again:" });
    let dir = direction.key_byte();
    let track = tracked_key(src.is_ipv6(), src, dst, proto, &p.l4, dir);
    let probes = track.map(|t| vec![t, t.reversed()]).unwrap_or_default();
    Case { eval: pol::Packet { direction, src, dst, proto, port }, wire: p, what, kind: Kind::Tracked, track, probes }
}

/// Whether an entry of `key` counts against its source's quota (made by an ingress packet).
pub fn counted(key: &FlowKey) -> bool {
    key.direction == DIR_INGRESS
}
