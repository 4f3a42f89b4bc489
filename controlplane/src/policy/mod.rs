//! The policy file: TOML with `[groups]`, `[[rules]]` and `[[tests]]`.
//!
//! - [`file`]: parse and validate a file into a [`Policy`] (selectors still symbolic);
//!   every error carries `file:line:column`.
//! - [`compile`]: resolve selectors against the current nodes into prefixes
//!   ([`CompiledRule`]), dropping address families that cannot match.
//! - [`eval`]: decide a packet against compiled rules and run the file's `[[tests]]`.
//! - [`replay`]: decide recorded flows under the policy in force and a candidate.
//!
//! Semantics (the agent's): default deny; a packet is allowed when some rule matches
//! (source in `from`, destination in `to`, protocol, destination port). ICMP rules match
//! IPv4 only and ICMPv6 rules IPv6 only. The deciding rule (named by a failed test) is the
//! one the agent picks: `wirefence_proto::policy::specificity`, ties to the first rule.

pub mod compile;
pub mod eval;
pub mod file;
pub mod replay;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub use compile::{compile, unmatched_selectors, CompiledRule, PrefixSet};
pub use eval::{decide, run_tests, Verdict};
pub use file::parse;

pub use wirefence_proto::iana::{
    has_ports, proto_name, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PROTO_UDPLITE,
};
pub use wirefence_proto::policy::PortRange;
use wirefence_proto::policy::NAME_CHARS;

/// A line and column (both from 1) in the policy file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// A rejected policy file: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{}:{}: {problem}", pos.line, pos.column)]
pub struct PolicyError {
    pub file: String,
    pub pos: Pos,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{0}")]
    Syntax(String),
    #[error("groups: {0:?} is not {chars}", chars = NAME_CHARS)]
    BadGroupName(String),
    #[error("{field}: unknown group {name:?}")]
    UnknownGroup { field: String, name: String },
    #[error("groups.{group}: the group contains itself ({path})")]
    GroupCycle { group: String, path: String },
    #[error(
        "{field}: {text:?} is not a selector (node:<hostname>, tag:<tag>, group:<group>, a CIDR or address, or \"*\")"
    )]
    BadSelector { field: String, text: String },
    #[error("{field}: {net} has host bits set (did you mean {trunc}?)")]
    HostBits { field: String, net: IpNet, trunc: IpNet },
    #[error("rules[{index}].id: {id:?} is not {chars}", chars = NAME_CHARS)]
    BadRuleId { index: usize, id: String },
    #[error("rules[{index}].id: duplicate rule id {id:?} (first defined on line {first_line})")]
    DuplicateRuleId { index: usize, id: String, first_line: usize },
    #[error("{field}: unknown protocol {text:?} (tcp, udp, icmp, icmpv6, sctp, udplite, any or 0-255)")]
    BadProto { field: String, text: String },
    #[error("{field}: {text:?} is not a port (0-65535) or a port range (first-last)")]
    BadPort { field: String, text: String },
    #[error("{field}: port range {first}-{last} is inverted")]
    InvertedRange { field: String, first: u16, last: u16 },
    #[error("rules[{index}].ports: protocol {proto} has no ports (ports need tcp, udp, sctp or udplite)")]
    PortsWithoutPortProtocol { index: usize, proto: String },
    #[error("rules[{index}] ({id:?}) can never match: {reason}")]
    Unsatisfiable { index: usize, id: String, reason: String },
    #[error("tests[{index}].{field}: {text:?} is neither a node hostname nor an IP address")]
    BadTestEndpoint { index: usize, field: &'static str, text: String },
    #[error("tests[{index}].{field}: unknown node {name:?}")]
    UnknownTestNode { index: usize, field: &'static str, name: String },
    #[error("tests[{index}].proto: a test needs a concrete protocol, not any")]
    TestAnyProto { index: usize },
    #[error("tests[{index}].port: {reason}")]
    TestPort { index: usize, reason: &'static str },
    #[error("tests[{index}] ({case}): no source and destination address of the same family")]
    TestNoPair { index: usize, case: String },
    #[error("tests[{index}] ({case}) failed: expected {expected}, got {got}{}", decided(rule, *got))]
    TestFailed { index: usize, case: String, expected: Verdict, got: Verdict, rule: Option<String> },
}

fn decided(rule: &Option<String>, got: Verdict) -> String {
    match (rule, got) {
        (Some(id), _) => format!(" (allowed by rule {id:?})"),
        (None, Verdict::Deny) => " (no rule allows it)".into(),
        (None, Verdict::Allow) => String::new(),
    }
}

/// A rule selector after group expansion.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    /// `*`: every node.
    All,
    Node(String),
    /// `route:<hostname>`: the subnets the node owning that hostname routes (as granted;
    /// they follow its grant and advertisements).
    Routes(String),
    Tag(String),
    Net(IpNet),
}

/// A validated rule, selectors not yet resolved to prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDef {
    pub id: String,
    pub from: Vec<Selector>,
    pub to: Vec<Selector>,
    /// `None` = any protocol.
    pub protocol: Option<u8>,
    /// Empty = all ports.
    pub ports: Vec<PortRange>,
    pub pos: Pos,
}

/// One end of a test case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestEnd {
    Node(String),
    Ip(IpAddr),
}

impl fmt::Display for TestEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestEnd::Node(h) => f.write_str(h),
            TestEnd::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestDef {
    pub from: TestEnd,
    pub to: TestEnd,
    pub protocol: u8,
    pub port: Option<u16>,
    pub expect: Verdict,
    pub pos: Pos,
    pub from_pos: Pos,
    pub to_pos: Pos,
}

impl TestDef {
    /// `laptop -> db1 tcp/22`
    pub fn describe(&self) -> String {
        let port = self.port.map(|p| format!("/{p}")).unwrap_or_default();
        format!("{} -> {} {}{port}", self.from, self.to, proto_name(Some(self.protocol)))
    }
}

/// A validated policy file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub file_name: String,
    pub source: String,
    pub rules: Vec<RuleDef>,
    pub tests: Vec<TestDef>,
}

impl Policy {
    pub fn error(&self, pos: Pos, problem: Problem) -> PolicyError {
        PolicyError { file: self.file_name.clone(), pos, problem }
    }
}

#[cfg(test)]
pub(crate) mod tests;
