//! The access policy: model, resolution from the config, compilation to map entries
//! (following `wirefence_common`'s class/LPM model) and a reference evaluator.
//!
//! - [`model`]: [`Policy`] (validated rules; rule index = position), [`Rule`].
//! - [`resolve`]: the `[policy]` config section (groups, selectors) -> [`PolicyConfig`].
//! - [`classes`]: per role and family, the distinct rule prefixes and their class ids.
//! - [`compile`]: [`Policy`] -> [`Compiled`] (plain data for the map writer).
//! - [`edit`]: [`Editable`], one-rule replacements that recompute only the class pairs
//!   the rule touches (falls back to a full compile when the class sets would change).
//! - [`ports`]: port ranges -> minimal masked port prefixes. [`PortRange`] itself, rule-id
//!   validation and the specificity order are `wirefence_proto::policy`'s, shared with the
//!   control plane so its `[[tests]]` name the rule the agent's counters credit.
//! - [`check`]: the `policy check` command's parsing and verdict line.
//! - [`eval`]: [`evaluate`] walks the rules one by one; [`simulate`] runs the LPM lookups
//!   on a [`Compiled`] in userspace. Property tests hold them equal.
//!
//! Semantics: default deny; a packet is allowed when some rule matches it (direction,
//! source in `from`, destination in `to`, protocol, port). The deciding rule is the most
//! specific matching one — by protocol (any least specific), then by the length of the
//! rule's port prefix containing the port — ties to the lowest index. ICMP rules match
//! IPv4 packets only and ICMPv6 rules IPv6 packets only.

pub mod check;
pub mod classes;
pub mod compile;
pub mod edit;
pub mod eval;
pub mod model;
pub mod ports;
pub mod resolve;

#[cfg(test)]
mod equivalence;

pub use classes::Role;
pub use compile::{compile, compile_with_limits, Compiled, Limits, PolicyEntry};
pub use edit::{Editable, EntryChange};
pub use eval::{evaluate, simulate, Decision, Packet};
pub use model::{Direction, Policy, PortRange, Rule, RuleDirection};
pub use resolve::PolicyConfig;

use ipnet::IpNet;

/// Policy validation and compilation errors. Resolution errors (which carry config
/// positions) are [`resolve::ResolveError`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rules[{index}].id: {id:?} is not {chars}", chars = wirefence_proto::policy::NAME_CHARS)]
    InvalidId { index: usize, id: String },
    #[error("rules[{index}].id: duplicate rule id {id:?} (first used by rules[{first}])")]
    DuplicateId { index: usize, id: String, first: usize },
    #[error("rules[{index}] ({id:?}): {net} has host bits set")]
    HostBits { index: usize, id: String, net: IpNet },
    #[error("rules[{index}] ({id:?}).ports: {lo}-{hi} is inverted")]
    InvertedPortRange { index: usize, id: String, lo: u16, hi: u16 },
    #[error("rules[{index}] ({id:?}).ports: proto {proto} has no ports (ports need tcp, udp, sctp or udplite)")]
    PortsWithoutPortProtocol { index: usize, id: String, proto: String },
    #[error("rules[{index}] ({id:?}) can never match: {reason}")]
    Unsatisfiable { index: usize, id: String, reason: String },
    #[error("rules[{index}]: no such rule (the policy has {count})")]
    NoSuchRule { index: usize, count: usize },
    #[error("rules[{index}]: a replacement keeps the id {old:?}, got {new:?}")]
    IdChanged { index: usize, old: String, new: String },
    #[error("the policy has {count} rules; the limit is {max}")]
    TooManyRules { count: usize, max: u32 },
    #[error("the policy uses {count} distinct {map} prefixes; the map holds at most {max}")]
    TooManyClassEntries { map: &'static str, count: usize, max: u32 },
    #[error(
        "the policy expands to {count} policy-map entries (counted before merging identical \
         entries of different rules); the map holds at most {max}"
    )]
    TooManyEntries { count: u64, max: u32 },
}

impl PolicyError {
    /// The rule an error is about, if any.
    pub fn rule_index(&self) -> Option<usize> {
        match self {
            PolicyError::InvalidId { index, .. }
            | PolicyError::DuplicateId { index, .. }
            | PolicyError::HostBits { index, .. }
            | PolicyError::InvertedPortRange { index, .. }
            | PolicyError::PortsWithoutPortProtocol { index, .. }
            | PolicyError::Unsatisfiable { index, .. }
            | PolicyError::NoSuchRule { index, .. }
            | PolicyError::IdChanged { index, .. } => Some(*index),
            _ => None,
        }
    }
}
