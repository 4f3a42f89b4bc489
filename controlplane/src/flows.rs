//! Flow records as the control plane keeps them: a reported [`v1::FlowRecord`] checked
//! into a [`Flow`] (nothing malformed, and nothing about traffic that is not the reporting
//! node's), and which node should have seen the other end of it ([`FarEnds`]).
//!
//! Storage is [`crate::store`]'s (`flows`), intake and queries the registry's
//! (`registry::flows`).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use wirefence_proto::v1;

use crate::model::NodeRec;
use crate::state::GlobalState;

/// A record's time is the agent's, kept within this long before its arrival (and never
/// after it): a node cannot date records into the future to outlive the retention.
pub const MAX_REPORT_AGE_MS: i64 = 10 * 60 * 1000;
/// Two records of one flow from its two ends pair when their times are this close (agents
/// report on their statistics tick, and their clocks differ a little).
pub const PAIR_WINDOW_MS: i64 = 2 * 60 * 1000;
/// The window a dry run replays and `--usage` sums when the request names none.
pub const DEFAULT_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;
/// How long and how many records are kept (`serve --flow-retention`, `--flow-max-records`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_age: std::time::Duration,
    pub max_records: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention { max_age: std::time::Duration::from_secs(7 * 24 * 3600), max_records: 1_000_000 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Arriving from the tunnel: the destination is on the reporting node's side.
    Ingress,
    /// Leaving into the tunnel: the source is on the reporting node's side.
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn wire(self) -> v1::Verdict {
        match self {
            Verdict::Allow => v1::Verdict::Allow,
            Verdict::Deny => v1::Verdict::Deny,
        }
    }

    /// The stored code (the wire enum's numbers).
    pub fn code(self) -> i64 {
        self.wire() as i64
    }

    pub fn from_code(code: i64) -> Option<Verdict> {
        match i32::try_from(code).ok().and_then(|c| v1::Verdict::try_from(c).ok())? {
            v1::Verdict::Allow => Some(Verdict::Allow),
            v1::Verdict::Deny => Some(Verdict::Deny),
            v1::Verdict::Unspecified => None,
        }
    }
}

impl Direction {
    pub fn wire(self) -> v1::Direction {
        match self {
            Direction::Ingress => v1::Direction::Ingress,
            Direction::Egress => v1::Direction::Egress,
        }
    }

    /// The stored code (the wire enum's numbers).
    pub fn code(self) -> i64 {
        self.wire() as i64
    }

    pub fn from_code(code: i64) -> Option<Direction> {
        match i32::try_from(code).ok().and_then(|c| v1::Direction::try_from(c).ok())? {
            v1::Direction::Ingress => Some(Direction::Ingress),
            v1::Direction::Egress => Some(Direction::Egress),
            v1::Direction::Unspecified => None,
        }
    }
}

/// One checked flow record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Unix ms.
    pub at_ms: i64,
    pub direction: Direction,
    pub verdict: Verdict,
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// The deciding rule; empty for a deny.
    pub rule_id: String,
    /// Both directions; 0 until the flow's end is reported.
    pub packets: u64,
    pub bytes: u64,
    /// A flow's end ([`v1::FlowRecord::ended`]); read back: the record holds its end.
    pub ended: bool,
}

/// The records of one flow as a policy decides it: same source, destination, protocol and
/// destination port (the source port decides nothing), from either end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowKind {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub dst_port: u16,
    /// Distinct source ports: its connections, near enough.
    pub connections: u64,
    pub records: u64,
    /// Unix ms.
    pub last_ms: i64,
}

/// Why a reported record was not kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidFlow {
    #[error("{0} is not an IPv4 or IPv6 address (4 or 16 bytes)")]
    Address(&'static str),
    #[error("source and destination are of different families")]
    Families,
    #[error("protocol {0} is not 0-255")]
    Protocol(u32),
    #[error("port {0} is not 0-65535")]
    Port(u32),
    #[error("verdict {0} is neither allow nor deny")]
    Verdict(i32),
    #[error("direction {0} is neither ingress nor egress")]
    Direction(i32),
    #[error("rule id is not {chars}", chars = wirefence_proto::policy::NAME_CHARS)]
    RuleId,
    #[error("{0} is neither an address of the reporting node nor in its routes")]
    NotTheNodes(IpAddr),
    #[error("a denied packet is no flow that could end (ended set on a deny)")]
    EndOfDeny,
}

fn address(bytes: &[u8], which: &'static str) -> Result<IpAddr, InvalidFlow> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| InvalidFlow::Address(which))?)),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|_| InvalidFlow::Address(which))?)),
        _ => Err(InvalidFlow::Address(which)),
    }
}

fn port(p: u32) -> Result<u16, InvalidFlow> {
    u16::try_from(p).map_err(|_| InvalidFlow::Port(p))
}

/// A reported rule id: empty (a deny) or a policy name.
pub fn rule_id_ok(id: &str) -> bool {
    id.is_empty() || wirefence_proto::policy::valid_name(id)
}

impl Flow {
    /// Checks a record `node` reported, which arrived at `received_ms`.
    pub fn from_wire(r: &v1::FlowRecord, node: &NodeRec, received_ms: i64) -> Result<Flow, InvalidFlow> {
        let (src, dst) = (address(&r.src, "source")?, address(&r.dst, "destination")?);
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(InvalidFlow::Families);
        }
        let direction = Direction::from_code(r.direction.into()).ok_or(InvalidFlow::Direction(r.direction))?;
        let verdict = Verdict::from_code(r.verdict.into()).ok_or(InvalidFlow::Verdict(r.verdict))?;
        if !rule_id_ok(&r.rule_id) {
            return Err(InvalidFlow::RuleId);
        }
        if r.ended && verdict != Verdict::Allow {
            return Err(InvalidFlow::EndOfDeny);
        }
        // An end is timed by its flow's start, which may be long ago.
        let oldest = if r.ended { 0 } else { received_ms - MAX_REPORT_AGE_MS };
        let flow = Flow {
            at_ms: r.time_unix_ms.clamp(oldest, received_ms),
            direction,
            verdict,
            protocol: u8::try_from(r.protocol).map_err(|_| InvalidFlow::Protocol(r.protocol))?,
            src,
            dst,
            src_port: port(r.src_port)?,
            dst_port: port(r.dst_port)?,
            rule_id: r.rule_id.clone(),
            packets: r.packets,
            bytes: r.bytes,
            ended: r.ended,
        };
        // A node speaks for its own traffic only: what it forwards for its LAN counts, a
        // flow between two other nodes does not.
        let mine = flow.near();
        if !holds(node, mine) {
            return Err(InvalidFlow::NotTheNodes(mine));
        }
        Ok(flow)
    }

    pub fn to_wire(&self) -> v1::FlowRecord {
        v1::FlowRecord {
            time_unix_ms: self.at_ms,
            src: wirefence_proto::ip_to_bytes(self.src),
            dst: wirefence_proto::ip_to_bytes(self.dst),
            protocol: self.protocol.into(),
            src_port: self.src_port.into(),
            dst_port: self.dst_port.into(),
            verdict: self.verdict.wire().into(),
            direction: self.direction.wire().into(),
            rule_id: self.rule_id.clone(),
            packets: self.packets,
            bytes: self.bytes,
            ended: self.ended,
        }
    }

    /// The address on the reporting node's side of the tunnel.
    pub fn near(&self) -> IpAddr {
        match self.direction {
            Direction::Egress => self.src,
            Direction::Ingress => self.dst,
        }
    }

    /// The address on the far side.
    pub fn far(&self) -> IpAddr {
        match self.direction {
            Direction::Egress => self.dst,
            Direction::Ingress => self.src,
        }
    }
}

/// Whether `ip` is one of `node`'s addresses or in one of its routes.
fn holds(node: &NodeRec, ip: IpAddr) -> bool {
    node.addresses.iter().chain(&node.routes).any(|p| p.contains(&ip))
}

/// Who should have seen the other end of a flow, for one state: the node with the far
/// address, else the one routing it (the longest route; of a route group, its primary).
/// Built once per listing, so each record costs a lookup, not a scan of the nodes.
pub struct FarEnds<'a> {
    by_address: HashMap<IpAddr, &'a NodeRec>,
    /// Longest first; of a group's prefix, the primary's only.
    routes: Vec<(IpNet, &'a NodeRec)>,
}

impl<'a> FarEnds<'a> {
    pub fn new(state: &'a GlobalState) -> FarEnds<'a> {
        let mut by_address = HashMap::new();
        let mut routes = Vec::new();
        for n in state.nodes.iter() {
            for a in &n.addresses {
                by_address.entry(a.addr()).or_insert(&**n);
            }
            let primary = |r: &IpNet| state.primaries().get(r).is_none_or(|p| *p == n.id);
            routes.extend(n.routes.iter().filter(|r| primary(r)).map(|r| (*r, &**n)));
        }
        // Stable: of equally long routes, the first node's.
        routes.sort_by_key(|(r, _)| std::cmp::Reverse(r.prefix_len()));
        FarEnds { by_address, routes }
    }

    /// The node that should have seen the other end of `flow`, reported by node
    /// `reporter`. `None` when nothing is expected there: a packet denied on its way out
    /// never crossed, and an address of no node has no agent.
    pub fn of(&self, reporter: &str, flow: &Flow) -> Option<&'a NodeRec> {
        if flow.direction == Direction::Egress && flow.verdict == Verdict::Deny {
            return None;
        }
        let far = flow.far();
        let node = self
            .by_address
            .get(&far)
            .copied()
            .or_else(|| self.routes.iter().find(|(r, _)| r.contains(&far)).map(|(_, n)| *n))?;
        (node.id != reporter).then_some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addr: &str, routes: &[&str]) -> NodeRec {
        NodeRec {
            addresses: vec![format!("{addr}/32").parse().unwrap()],
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            ..(*crate::policy::tests::node("n1", "n1", 1, &[])).clone()
        }
    }

    fn record(src: [u8; 4], dst: [u8; 4], direction: v1::Direction) -> v1::FlowRecord {
        v1::FlowRecord {
            time_unix_ms: 1_000_000,
            src: src.to_vec(),
            dst: dst.to_vec(),
            protocol: 6,
            src_port: 40000,
            dst_port: 443,
            verdict: v1::Verdict::Allow.into(),
            direction: direction.into(),
            rule_id: "web".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_reports_only_its_own_traffic() {
        let gw = node("10.77.0.1", &["192.168.1.0/24"]);
        let out = record([10, 77, 0, 1], [10, 77, 0, 2], v1::Direction::Egress);
        assert!(Flow::from_wire(&out, &gw, 1_000_000).is_ok());
        let lan = record([192, 168, 1, 5], [10, 77, 0, 2], v1::Direction::Egress);
        assert!(Flow::from_wire(&lan, &gw, 1_000_000).is_ok(), "forwarded for its LAN");
        let theirs = record([10, 77, 0, 3], [10, 77, 0, 2], v1::Direction::Egress);
        assert_eq!(
            Flow::from_wire(&theirs, &gw, 1_000_000),
            Err(InvalidFlow::NotTheNodes("10.77.0.3".parse().unwrap()))
        );
        let inbound = record([10, 77, 0, 3], [10, 77, 0, 1], v1::Direction::Ingress);
        assert!(Flow::from_wire(&inbound, &gw, 1_000_000).is_ok());
    }

    #[test]
    fn malformed_records_are_named() {
        let n = node("10.77.0.1", &[]);
        let ok = record([10, 77, 0, 1], [10, 77, 0, 2], v1::Direction::Egress);
        let bad = |f: &dyn Fn(&mut v1::FlowRecord)| {
            let mut r = ok.clone();
            f(&mut r);
            Flow::from_wire(&r, &n, 1_000_000).unwrap_err()
        };
        assert_eq!(bad(&|r| r.src = vec![1, 2, 3]), InvalidFlow::Address("source"));
        assert_eq!(bad(&|r| r.dst = vec![0; 16]), InvalidFlow::Families);
        assert_eq!(bad(&|r| r.protocol = 256), InvalidFlow::Protocol(256));
        assert_eq!(bad(&|r| r.dst_port = 70000), InvalidFlow::Port(70000));
        assert_eq!(bad(&|r| r.verdict = 0), InvalidFlow::Verdict(0));
        assert_eq!(bad(&|r| r.direction = 9), InvalidFlow::Direction(9));
        assert_eq!(bad(&|r| r.rule_id = "a b".into()), InvalidFlow::RuleId);
        assert_eq!(bad(&|r| r.rule_id = "x".repeat(65)), InvalidFlow::RuleId);
        assert_eq!(
            bad(&|r| {
                r.verdict = v1::Verdict::Deny.into();
                r.rule_id.clear();
                r.ended = true;
            }),
            InvalidFlow::EndOfDeny
        );
    }

    #[test]
    fn the_far_end_is_the_address_owner_else_the_longest_route_else_none() {
        use std::sync::Arc;
        let mk = |id: &str, addr: &str, routes: &[&str]| Arc::new(NodeRec { id: id.into(), ..node(addr, routes) });
        let nodes = vec![
            mk("a", "10.77.0.1", &[]),
            mk("b", "10.77.0.2", &["192.168.0.0/16"]),
            mk("c", "10.77.0.3", &["192.168.1.0/24"]),
        ];
        let state = GlobalState::new(1, nodes, Arc::default(), crate::registry::Overlay::default());
        let ends = FarEnds::new(&state);
        let flow = |dst: [u8; 4], verdict: v1::Verdict| {
            let mut r = record([10, 77, 0, 1], dst, v1::Direction::Egress);
            r.verdict = verdict.into();
            Flow::from_wire(&r, &state.nodes[0], 1_000_000).unwrap()
        };
        let end = |f: &Flow| ends.of("a", f).map(|n| n.id.clone());
        assert_eq!(end(&flow([10, 77, 0, 2], v1::Verdict::Allow)), Some("b".into()));
        assert_eq!(end(&flow([192, 168, 1, 9], v1::Verdict::Allow)), Some("c".into()), "the longest route");
        assert_eq!(end(&flow([192, 168, 7, 9], v1::Verdict::Allow)), Some("b".into()));
        assert_eq!(end(&flow([198, 51, 100, 1], v1::Verdict::Allow)), None, "no node's address");
        assert_eq!(end(&flow([10, 77, 0, 2], v1::Verdict::Deny)), None, "denied on its way out");
        assert_eq!(end(&flow([10, 77, 0, 1], v1::Verdict::Allow)), None, "not the reporter itself");
    }

    #[test]
    fn times_are_kept_within_the_arrival() {
        let n = node("10.77.0.1", &[]);
        let mut r = record([10, 77, 0, 1], [10, 77, 0, 2], v1::Direction::Egress);
        r.time_unix_ms = i64::MAX;
        assert_eq!(Flow::from_wire(&r, &n, 5_000_000).unwrap().at_ms, 5_000_000, "not from the future");
        r.time_unix_ms = 0;
        assert_eq!(Flow::from_wire(&r, &n, 5_000_000).unwrap().at_ms, 5_000_000 - MAX_REPORT_AGE_MS);
        // An end is timed by its flow's start, however long ago.
        r.ended = true;
        r.time_unix_ms = 1_000;
        assert_eq!(Flow::from_wire(&r, &n, 5_000_000 + MAX_REPORT_AGE_MS).unwrap().at_ms, 1_000);
        let back = Flow::from_wire(&record([10, 77, 0, 1], [10, 77, 0, 2], v1::Direction::Egress), &n, 1_000_000);
        assert_eq!(back.unwrap().to_wire(), record([10, 77, 0, 1], [10, 77, 0, 2], v1::Direction::Egress));
    }
}
