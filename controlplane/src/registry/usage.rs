//! Rule usage for `policy show --usage`: the agents' [`v1::RuleHits`] (increments of their
//! per-rule counters) are kept only for rules of the policy in force that concern the
//! reporting node (a node cannot make a rule between two other nodes look used), summed in
//! memory and written each second with the flow records, per minute.

use std::collections::{HashMap, HashSet};

use wirefence_proto::rule_hits::{MAX_BYTES, MAX_PACKETS, MIN_GAP};
use wirefence_proto::v1;

use super::flows::{now_ms, window_start};
use super::{lock, Registry};
use crate::store::Hits;
use crate::Error;

const MINUTE_MS: i64 = 60_000;

impl Registry {
    /// Adds what `node` counted, for the rules it is on a side of. A rule's increment above
    /// the caps is not a count and is dropped; one report per node per `MIN_GAP`. With both,
    /// one minute's row stays far inside an i64 even if every node lies.
    pub(super) fn take_rule_hits(&self, node: &str, hits: v1::RuleHits) {
        {
            let mut last = lock(&self.flows.usage_reports);
            let now = std::time::Instant::now();
            if last.get(node).is_some_and(|at| now.duration_since(*at) < MIN_GAP) {
                tracing::debug!(node, "rule hits refused: too soon after the last");
                return;
            }
            last.insert(node.to_owned(), now);
        }
        let state = self.current();
        let Some(index) = state.index(node) else { return };
        let compiled = state.compiled();
        let concerns: HashSet<&str> =
            compiled.node_rules[index].iter().map(|(rule, _, _)| compiled.rules[*rule].id.as_str()).collect();
        // Each rule once per report, however often the message names it.
        let mut per_rule: HashMap<&str, Hits> = HashMap::new();
        for h in &hits.rules {
            *per_rule.entry(h.rule_id.as_str()).or_default() += Hits { packets: h.packets, bytes: h.bytes };
        }
        let mut pending = lock(&self.flows.usage);
        for (rule, h) in per_rule {
            if !concerns.contains(rule) || h.packets > MAX_PACKETS || h.bytes > MAX_BYTES {
                tracing::debug!(node, rule = %wirefence_proto::Escaped(rule), "rule hits refused");
                continue;
            }
            *pending.entry(rule.to_owned()).or_default() += h;
        }
    }

    /// Writes the hits summed since the last call into the current minute; what fails to
    /// be written goes back for the next call.
    pub(super) async fn write_rule_usage(&self) -> Result<(), Error> {
        let pending: HashMap<String, Hits> = std::mem::take(&mut *lock(&self.flows.usage));
        if pending.is_empty() {
            return Ok(());
        }
        // In one order on every server: two replicas' upserts never wait on each other's
        // rows in opposite orders.
        let rows: std::collections::BTreeMap<String, Hits> = pending.into_iter().collect();
        let now = now_ms();
        if let Err(e) = self.store.add_rule_usage(now - now.rem_euclid(MINUTE_MS), &rows).await {
            let mut back = lock(&self.flows.usage);
            for (rule, h) in rows {
                *back.entry(rule).or_default() += h;
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Every rule of the policy in force with its hits since `req.since_unix_ms`, in whole
    /// minutes: the reply's window starts with the minute containing it.
    pub async fn rule_usage(&self, req: &v1::RuleUsageRequest) -> Result<v1::RuleUsageReply, Error> {
        let since = window_start(req.since_unix_ms);
        let since = since - since.rem_euclid(MINUTE_MS);
        let hits = self.store.rule_usage(since).await?;
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
