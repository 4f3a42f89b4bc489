//! Deny and new-flow events from the programs' ring buffer: the running agent keeps the
//! latest denies in `<state_dir>/<ifname>.denies.json` (for `status`), and queues every
//! event for the control plane ([`super::flows`]).

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aya::maps::RingBuf;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use wirefence_common as common;

use super::flows::FlowEvent;
use crate::model::IfName;

const KEEP: usize = 32;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenyRecord {
    /// Seconds since the Unix epoch, when the agent read the event.
    pub at: u64,
    pub direction: String,
    pub src: String,
    pub dst: String,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub len: u32,
    /// The policy port the packet was judged by: for ICMP/ICMPv6 `type << 8 | code`, which
    /// the ports do not hold (an echo's identifier is there). `None` in records of older
    /// programs and for fragments without ports.
    #[serde(default)]
    pub port: Option<u16>,
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

impl DenyRecord {
    /// IPv6 link-local control traffic of the tunnel itself: the router and neighbour
    /// solicitations and MLD reports the kernel sends on every IPv6 link (ICMPv6 types
    /// 130-143, from `fe80::/10` or `::` to `ff02::/16` or `fe80::/10`). WireGuard routes
    /// by allowed-ips, so it means nothing there; it is dropped like anything no rule
    /// allows, but it is no deny an operator needs to see.
    pub fn is_link_local_control(&self) -> bool {
        let (Ok(src), Ok(dst)) = (self.src.parse::<std::net::Ipv6Addr>(), self.dst.parse::<std::net::Ipv6Addr>())
        else {
            return false;
        };
        let link_local = |a: std::net::Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
        let control_type = self.port.is_none_or(|p| (130..=143).contains(&(p >> 8)));
        self.proto == IPPROTO_ICMPV6
            && control_type
            && (link_local(src) || src.is_unspecified())
            && (dst.segments()[0] == 0xff02 || link_local(dst))
    }
}

impl fmt::Display for DenyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        write!(f, "{}s ago {}", now.saturating_sub(self.at), PacketText(self))
    }
}

/// The packet of a record without its age: `in 10.0.0.2:5353 -> 10.0.0.1:53 udp (60 bytes)`.
pub struct PacketText<'a>(pub &'a DenyRecord);

impl fmt::Display for PacketText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        write!(f, "{} ", d.direction)?;
        match d.proto {
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                write!(f, "{} -> {} {}", d.src, d.dst, Icmp(d))?;
            }
            // The protocols whose ports the programs read.
            p if wirefence_proto::iana::has_ports(p) => {
                write!(f, "{} -> {} {}", with_port(&d.src, d.sport), with_port(&d.dst, d.dport), proto_name(d.proto))?
            }
            other => write!(f, "{} -> {} proto {other}", d.src, d.dst)?,
        }
        write!(f, " ({} bytes)", d.len)
    }
}

/// `addr:port`, an IPv6 address in brackets; a text that is no address as it is.
fn with_port(addr: &str, port: u16) -> String {
    match addr.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{addr}:{port}"),
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        6 => "tcp",
        17 => "udp",
        132 => "sctp",
        _ => "udplite",
    }
}

/// An ICMP or ICMPv6 message by its type and code (`icmp echo-request`, `icmpv6 type 1 code 3`).
struct Icmp<'a>(&'a DenyRecord);

impl fmt::Display for Icmp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let v6 = d.proto == IPPROTO_ICMPV6;
        f.write_str(if v6 { "icmpv6" } else { "icmp" })?;
        let (ty, code) = match d.port {
            Some(port) => ((port >> 8) as u8, port as u8),
            // An older program's record: only an echo request is certain (its identifier
            // is the source port); a reply's identifier and another type share `dport`.
            None if d.sport != 0 && d.dport == 0 => (if v6 { 128 } else { 8 }, 0),
            None => return Ok(()),
        };
        let name = match (v6, ty, code) {
            (false, 8, 0) | (true, 128, 0) => Some("echo-request"),
            (false, 0, 0) | (true, 129, 0) => Some("echo-reply"),
            _ => None,
        };
        match name {
            Some(name) => write!(f, " {name}"),
            None => write!(f, " type {ty} code {code}"),
        }
    }
}

fn file(state_dir: &Path, ifname: &IfName) -> PathBuf {
    state_dir.join(format!("{ifname}.denies.json"))
}

/// The saved denies (empty when there are none or the file is unreadable).
pub fn load(state_dir: &Path, ifname: &IfName) -> Vec<DenyRecord> {
    std::fs::read(file(state_dir, ifname)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn addr(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if bytes[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => IpAddr::V6(v6),
    }
}

fn record(e: &common::Event) -> DenyRecord {
    packet_record(&e.flow, e.len, e.port)
}

/// A packet the programs reported (its tuple, `skb->len` and policy port as they send it),
/// read now.
pub(super) fn packet_record(flow: &common::FlowKey, len: u32, port: u32) -> DenyRecord {
    DenyRecord {
        at: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
        direction: if flow.direction == common::DIR_INGRESS { "in" } else { "out" }.into(),
        src: addr(flow.src).to_string(),
        dst: addr(flow.dst).to_string(),
        proto: flow.proto,
        sport: flow.sport,
        dport: flow.dport,
        len,
        port: (port & common::EVENT_PORT != 0).then_some(port as u16),
    }
}

/// The event as it goes to the control plane (`rule`: the deciding rule's id).
fn flow_event(e: &common::Event, rule: String) -> FlowEvent {
    tuple_event(&e.flow, unix_ms(), e.kind == common::EVENT_NEW_FLOW, rule)
}

/// An ended flow as it goes to the control plane: timed by its first packet, as the record
/// of its start is (give or take the moment the agent read that), with its counts.
fn ended_event(f: &super::sweep::EndedFlow, rule: String, now_unix_ms: i64, now_ns: u64) -> FlowEvent {
    let age_ms = i64::try_from(now_ns.saturating_sub(f.first_seen_ns) / 1_000_000).unwrap_or(i64::MAX);
    FlowEvent {
        packets: f.packets,
        bytes: f.bytes,
        ..tuple_event(&f.first, now_unix_ms.saturating_sub(age_ms), true, rule)
    }
}

/// An event of the tuple `flow` as the programs have it, without counts.
fn tuple_event(flow: &common::FlowKey, at_ms: i64, allowed: bool, rule: String) -> FlowEvent {
    FlowEvent {
        at_ms,
        allowed,
        rule,
        ingress: flow.direction == common::DIR_INGRESS,
        src: addr(flow.src),
        dst: addr(flow.dst),
        proto: flow.proto,
        sport: flow.sport,
        dport: flow.dport,
        packets: 0,
        bytes: 0,
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Where flow events go: the control plane's queue, and the local log if configured. A
/// log that cannot be opened or written is reported and left off: the denies and the
/// control plane's records do not depend on it.
struct Sinks {
    flows: std::sync::Arc<super::flows::FlowQueue>,
    log: Option<super::flowlog::FlowLog>,
}

impl Sinks {
    fn push(&mut self, event: FlowEvent) {
        if let Some(Err(e)) = self.log.as_mut().map(|l| l.write(&event)) {
            tracing::error!(error = %e, "flow log not written from now on");
            self.log = None;
        }
        self.flows.push(event);
    }

    fn flush(&mut self) {
        if let Some(Err(e)) = self.log.as_mut().map(|l| l.flush()) {
            tracing::error!(error = %e, "flow log not written from now on");
            self.log = None;
        }
    }
}

/// Reads the pinned ring buffer of `pin_dir` until the task is dropped: denies are kept
/// for `status`, and every event but link-local control traffic, and every ended flow the
/// sweep handed to `flows`, is queued for the control plane in `flows` and written to
/// `flow_log` when there is one.
pub async fn follow(
    pin_dir: PathBuf,
    state_dir: PathBuf,
    ifname: IfName,
    flows: std::sync::Arc<super::flows::FlowQueue>,
    flow_log: Option<PathBuf>,
) -> anyhow::Result<()> {
    let log = flow_log.and_then(|path| {
        super::flowlog::FlowLog::open(&path).inspect_err(|e| tracing::error!(error = %e, "flow log not written")).ok()
    });
    let mut out = Sinks { flows, log };
    let mut rules = super::flows::RuleNames::new(super::slots_file(&state_dir, &ifname));
    let ring = RingBuf::try_from(crate::bpf::from_pin(&super::pin_path(&pin_dir, common::EVENTS), common::EVENTS)?)?;
    // SAFETY: the ring buffer owns its descriptor and outlives the registration (it moves
    // into the AsyncFd and is dropped with it).
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("register ring buffer: {e}"))?;
    let mut recent: VecDeque<DenyRecord> = load(&state_dir, &ifname).into();
    let mut last_write = Instant::now() - Duration::from_secs(1);
    let mut dirty = false;
    loop {
        // Wake for events, or at least once a second to write what was held back.
        let ready = tokio::time::timeout(Duration::from_secs(1), fd.readable_mut()).await;
        if let Ok(guard) = ready {
            let mut guard = guard?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<common::Event>() {
                    continue;
                }
                // SAFETY: the program writes whole `Event`s; read_unaligned copes with alignment.
                let e: common::Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const common::Event) };
                let r = record(&e);
                match e.kind {
                    common::EVENT_DENY if r.is_link_local_control() => {
                        tracing::trace!(deny = %r, "denied link-local control traffic");
                    }
                    common::EVENT_DENY => {
                        tracing::debug!(deny = %r, "denied");
                        out.push(flow_event(&e, String::new()));
                        recent.push_back(r);
                        if recent.len() > KEEP {
                            recent.pop_front();
                        }
                        dirty = true;
                    }
                    _ => {
                        let rule = rules.name(e.rule);
                        tracing::debug!(flow = %r, rule, "new flow");
                        out.push(flow_event(&e, rule));
                    }
                }
            }
            guard.clear_ready();
            out.flush();
        }
        let ended = out.flows.take_ended();
        if !ended.is_empty() {
            let (now_ms, now_ns) = (unix_ms(), super::sweep::now_ns()?);
            // An entry migrated from a build that did not count has nothing to tell.
            for f in ended.iter().filter(|f| f.packets > 0) {
                out.push(ended_event(f, rules.name(f.rule), now_ms, now_ns));
            }
            out.flush();
        }
        if dirty && last_write.elapsed() >= Duration::from_secs(1) {
            let path = file(&state_dir, &ifname);
            crate::durable::write_atomic(&path, &serde_json::to_vec(&recent)?, 0o600)?;
            last_write = Instant::now();
            dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, port: Option<u16>) -> String {
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let d = DenyRecord {
            at,
            direction: "in".into(),
            src: src.into(),
            dst: dst.into(),
            proto,
            sport,
            dport,
            len: 60,
            port,
        };
        // Without the age, which may tick between the record and its text.
        d.to_string().split_once("s ago ").unwrap().1.to_owned()
    }

    #[test]
    fn ports_follow_addresses_ipv6_in_brackets() {
        assert_eq!(
            deny("fd00::2", "fd00::1", 6, 40000, 443, Some(443)),
            "in [fd00::2]:40000 -> [fd00::1]:443 tcp (60 bytes)"
        );
        assert_eq!(
            deny("10.0.0.2", "10.0.0.1", 17, 5353, 53, Some(53)),
            "in 10.0.0.2:5353 -> 10.0.0.1:53 udp (60 bytes)"
        );
        assert_eq!(deny("10.0.0.2", "10.0.0.1", 47, 0, 0, None), "in 10.0.0.2 -> 10.0.0.1 proto 47 (60 bytes)");
    }

    #[test]
    fn the_tunnels_own_link_local_control_traffic_is_no_deny_to_show() {
        let rec = |src: &str, dst: &str, proto, port| DenyRecord {
            at: 0,
            direction: "out".into(),
            src: src.into(),
            dst: dst.into(),
            proto,
            sport: 0,
            dport: 0,
            len: 56,
            port,
        };
        // Router solicitation, MLDv2 report, DAD neighbour solicitation, an older record.
        assert!(rec("fe80::1", "ff02::2", 58, Some(133 << 8)).is_link_local_control());
        assert!(rec("fe80::1", "ff02::16", 58, Some(143 << 8)).is_link_local_control());
        assert!(rec("::", "ff02::1:ff00:1", 58, Some(135 << 8)).is_link_local_control());
        assert!(rec("fe80::1", "ff02::2", 58, None).is_link_local_control());
        // An echo between link-local addresses, ND to a global address, other protocols
        // and families: shown.
        assert!(!rec("fe80::1", "ff02::1", 58, Some(128 << 8)).is_link_local_control());
        assert!(!rec("fe80::1", "fd00::1", 58, Some(135 << 8)).is_link_local_control());
        assert!(!rec("fd77::1", "ff02::2", 58, Some(133 << 8)).is_link_local_control());
        assert!(!rec("fe80::1", "ff02::fb", 17, None).is_link_local_control());
        assert!(!rec("10.0.0.1", "224.0.0.22", 2, None).is_link_local_control());
    }

    #[test]
    fn icmp_shows_type_and_code_not_ports() {
        // An echo request: the identifier is in `sport`, type 8 code 0 in the policy port.
        assert_eq!(
            deny("10.0.0.2", "10.0.0.1", 1, 0x1234, 0, Some(8 << 8)),
            "in 10.0.0.2 -> 10.0.0.1 icmp echo-request (60 bytes)"
        );
        assert_eq!(
            deny("fd00::2", "fd00::1", 58, 0, 0x0100, Some(129 << 8)),
            "in fd00::2 -> fd00::1 icmpv6 echo-reply (60 bytes)"
        );
        assert_eq!(
            deny("fd00::2", "fd00::1", 58, 0, 0x0103, Some(0x0103)),
            "in fd00::2 -> fd00::1 icmpv6 type 1 code 3 (60 bytes)"
        );
        assert_eq!(
            deny("10.0.0.2", "10.0.0.1", 1, 0, 0x0304, Some(0x0304)),
            "in 10.0.0.2 -> 10.0.0.1 icmp type 3 code 4 (60 bytes)"
        );
        // Records of programs that did not send the policy port.
        assert_eq!(deny("10.0.0.2", "10.0.0.1", 1, 7, 0, None), "in 10.0.0.2 -> 10.0.0.1 icmp echo-request (60 bytes)");
        assert_eq!(deny("10.0.0.2", "10.0.0.1", 1, 0, 7, None), "in 10.0.0.2 -> 10.0.0.1 icmp (60 bytes)");
    }

    #[test]
    fn the_policy_port_is_taken_only_when_the_program_marked_it() {
        let mut e = common::Event { kind: common::EVENT_DENY, ..Default::default() };
        e.flow.proto = 1;
        assert_eq!(record(&e).port, None);
        e.port = common::EVENT_PORT | 8 << 8;
        assert_eq!(record(&e).port, Some(8 << 8));
        // Saved records of an older agent have no `port` and still load.
        let old =
            r#"[{"at":1,"direction":"in","src":"10.0.0.2","dst":"10.0.0.1","proto":6,"sport":1,"dport":2,"len":3}]"#;
        let records: Vec<DenyRecord> = serde_json::from_str(old).unwrap();
        assert_eq!(records[0].port, None);
    }
}
