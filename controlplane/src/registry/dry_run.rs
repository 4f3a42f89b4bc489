//! `policy apply --dry-run`: a candidate policy checked as an apply checks it, then the
//! recorded flows of a window replayed against it ([`crate::policy::replay`]). Reads only:
//! no version, no store lock, nothing sent to any node.

use wirefence_proto::v1;

use super::flows::window_start;
use super::Registry;
use crate::flows::{FlowKind, Verdict};
use crate::policy::{self, replay};
use crate::Error;

/// Distinct flows replayed at most: the most recently seen.
pub const MAX_FLOWS: u32 = 200_000;
/// Flows listed per change group at most (the reply carries the group's totals).
pub const MAX_LISTED: usize = 1_000;

impl Registry {
    /// Checks `source` against the current nodes (syntax, references, its tests: an error
    /// here is the error `apply` would give) and replays the flows recorded since
    /// `req.since_unix_ms` under the policy in force and under the candidate.
    pub async fn dry_run_policy(
        &self,
        file_name: &str,
        req: &v1::DryRunPolicyRequest,
    ) -> Result<v1::DryRunPolicyReply, Error> {
        let candidate = policy::parse(file_name, &req.source)?;
        let state = self.current();
        let rules = policy::compile(&candidate, &state.nodes);
        let tests_passed = policy::run_tests(&candidate, &rules, &state.nodes)?;
        let unmatched_selectors = policy::unmatched_selectors(&candidate, &state.nodes);
        let since = window_start(req.since_unix_ms);
        let mut flows = self.store.flow_kinds(since, MAX_FLOWS + 1).await?;
        let truncated = flows.len() > MAX_FLOWS as usize;
        flows.truncate(MAX_FLOWS as usize);
        let (flows_evaluated, records) = (flows.len() as u64, flows.iter().map(|f| f.records).sum());
        let changes = replay::replay(&state.compiled().rules, &rules, flows);
        Ok(v1::DryRunPolicyReply {
            rules: u32::try_from(candidate.rules.len()).unwrap_or(u32::MAX),
            tests_passed: u32::try_from(tests_passed).unwrap_or(u32::MAX),
            unmatched_selectors,
            since_unix_ms: since,
            flows_evaluated,
            records,
            truncated,
            changes: changes.into_iter().map(group).collect(),
        })
    }
}

/// A change group as the reply carries it: its totals, and its [`MAX_LISTED`] flows with
/// the most records.
fn group(mut c: replay::VerdictChange) -> v1::VerdictChange {
    let verdict = |rule: &Option<String>| match rule {
        Some(_) => Verdict::Allow.wire(),
        None => Verdict::Deny.wire(),
    };
    let flows_total = c.flows.len() as u64;
    let connections = c.flows.iter().map(|f| f.connections).sum();
    let records = c.flows.iter().map(|f| f.records).sum();
    c.flows.sort_by_key(|f| std::cmp::Reverse(f.records));
    c.flows.truncate(MAX_LISTED);
    v1::VerdictChange {
        old_verdict: verdict(&c.old_rule).into(),
        new_verdict: verdict(&c.new_rule).into(),
        old_rule: c.old_rule.unwrap_or_default(),
        new_rule: c.new_rule.unwrap_or_default(),
        flows: c.flows.iter().map(replayed).collect(),
        flows_total,
        connections,
        records,
    }
}

fn replayed(f: &FlowKind) -> v1::ReplayedFlow {
    v1::ReplayedFlow {
        src: wirefence_proto::ip_to_bytes(f.src),
        dst: wirefence_proto::ip_to_bytes(f.dst),
        protocol: f.protocol.into(),
        dst_port: f.dst_port.into(),
        connections: f.connections,
        records: f.records,
        last_seen_unix_ms: f.last_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_group_lists_the_flows_with_the_most_records_and_counts_them_all() {
        let flows = (0..=MAX_LISTED as u64)
            .map(|i| FlowKind {
                src: "10.77.0.1".parse().unwrap(),
                dst: "10.77.0.2".parse().unwrap(),
                protocol: 6,
                dst_port: i as u16,
                connections: 2,
                records: i,
                last_ms: 0,
            })
            .collect();
        let g = group(replay::VerdictChange { old_rule: Some("web".into()), new_rule: None, flows });
        assert_eq!((g.flows_total, g.connections), (MAX_LISTED as u64 + 1, 2 * (MAX_LISTED as u64 + 1)));
        assert_eq!(g.records, (0..=MAX_LISTED as u64).sum::<u64>());
        assert_eq!(g.flows.len(), MAX_LISTED);
        assert_eq!(g.flows[0].records, MAX_LISTED as u64);
        assert!(g.flows.iter().all(|f| f.records > 0), "the flow with the fewest records is the one left out");
        assert_eq!(
            (g.old_verdict(), g.new_verdict(), g.old_rule.as_str()),
            (v1::Verdict::Allow, v1::Verdict::Deny, "web")
        );
    }
}
