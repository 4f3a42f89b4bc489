//! Rule usage for `policy show --usage`: the agents' [`v1::RuleHits`] (increments of their
//! per-rule counters) are kept only for rules of the policy in force that concern the
//! reporting node (a node cannot make a rule between two other nodes look used), summed in
//! memory and written each second with the flow records, per minute.

use std::collections::{HashMap, HashSet};

use wirefence_proto::v1;

use super::flows::now_ms;
use super::{lock, Registry};
use crate::store::Hits;
use crate::Error;

/// The window `--usage` sums when the request names none.
pub const DEFAULT_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;
/// More packets than a 100 Gbit/s link carries in a 10 s report interval (of 64-byte
/// packets): an increment above is not a count, and is dropped.
const MAX_PACKETS: u64 = 2_000_000_000;
const MAX_BYTES: u64 = MAX_PACKETS * 65_536;
const MINUTE_MS: i64 = 60_000;

impl Registry {
    /// Adds what `node` counted, for the rules it is on a side of.
    pub(super) fn take_rule_hits(&self, node: &str, hits: v1::RuleHits) {
        let state = self.current();
        let Some(index) = state.index(node) else { return };
        let compiled = state.compiled();
        let concerns: HashSet<&str> =
            compiled.node_rules[index].iter().map(|(rule, _, _)| compiled.rules[*rule].id.as_str()).collect();
        let mut pending = lock(&self.flows.usage);
        for h in hits.rules {
            if !concerns.contains(h.rule_id.as_str()) || h.packets > MAX_PACKETS || h.bytes > MAX_BYTES {
                tracing::debug!(node, rule = %wirefence_proto::Escaped(&h.rule_id), "rule hits refused");
                continue;
            }
            let sum = pending.entry(h.rule_id).or_default();
            sum.packets += h.packets;
            sum.bytes += h.bytes;
        }
    }

    /// Writes the hits summed since the last call into the current minute.
    pub(super) async fn write_rule_usage(&self) -> Result<(), Error> {
        let pending: HashMap<String, Hits> = std::mem::take(&mut *lock(&self.flows.usage));
        if pending.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        Ok(self.store.add_rule_usage(now - now.rem_euclid(MINUTE_MS), &pending).await?)
    }

    /// Every rule of the policy in force with its hits since `req.since_unix_ms` (whole
    /// minutes: the one containing it included).
    pub async fn rule_usage(&self, req: &v1::RuleUsageRequest) -> Result<v1::RuleUsageReply, Error> {
        let since = match req.since_unix_ms {
            0 => now_ms().saturating_sub(DEFAULT_WINDOW_MS),
            s => s,
        };
        let hits = self.store.rule_usage(since - since.rem_euclid(MINUTE_MS)).await?;
        let policy = self.current().policy.clone();
        let rules = policy
            .rules
            .iter()
            .map(|r| {
                let h = hits.get(&r.id).copied().unwrap_or_default();
                v1::RuleUsage { rule_id: r.id.clone(), packets: h.packets, bytes: h.bytes }
            })
            .collect();
        Ok(v1::RuleUsageReply { since_unix_ms: since, rules })
    }
}
