//! What the control plane takes of a node's `RuleHits`, so the agent can send only that:
//! one report per [`MIN_GAP`], and per rule at most what a 100 Gbit/s link carries in the
//! agents' 10 s report interval (of 64-byte packets; bytes). An agent holding more (it was
//! disconnected) sends it in reports of that size; the control plane drops an entry above.

use std::time::Duration;

pub const MAX_PACKETS: u64 = 2_000_000_000;
pub const MAX_BYTES: u64 = 125_000_000_000;
/// A node's reports are taken at most this often (agents send one every 10 s).
pub const MIN_GAP: Duration = Duration::from_secs(5);
