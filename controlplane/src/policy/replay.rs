//! Replaying recorded flows against a candidate policy (`policy apply --dry-run`): each
//! flow is decided under the policy in force and under the candidate by [`decide`], the
//! evaluator of `[[tests]]` (differentially tested against the agent's own), and the
//! flows whose verdict differs are grouped by their deciding rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use wirefence_proto::iana::proto_allows_family;

use super::{decide, CompiledRule};
use crate::flows::FlowKind;

/// Flows whose verdict changes: the rule deciding them now and the one deciding them under
/// the candidate (`None`: denied; exactly one of the two is `None`).
#[derive(Debug, PartialEq, Eq)]
pub struct VerdictChange {
    pub old_rule: Option<String>,
    pub new_rule: Option<String>,
    /// In the order given to [`replay`].
    pub flows: Vec<FlowKind>,
}

/// Decides every flow under both rule sets; the changes ordered by old rule (denials
/// first), then new rule.
pub fn replay(old: &[Arc<CompiledRule>], new: &[Arc<CompiledRule>], flows: Vec<FlowKind>) -> Vec<VerdictChange> {
    let mut groups: BTreeMap<(Option<String>, Option<String>), Vec<FlowKind>> = BTreeMap::new();
    for f in flows {
        let (was, would) = (deciding_rule(old, &f), deciding_rule(new, &f));
        if was.is_some() != would.is_some() {
            groups.entry((was, would)).or_default().push(f);
        }
    }
    groups.into_iter().map(|((old_rule, new_rule), flows)| VerdictChange { old_rule, new_rule, flows }).collect()
}

/// The id of the rule allowing `f`, `None` when denied. ICMP of the other family matches
/// no rule, as on the agent.
fn deciding_rule(rules: &[Arc<CompiledRule>], f: &FlowKind) -> Option<String> {
    if !proto_allows_family(Some(f.protocol), f.src.is_ipv6()) {
        return None;
    }
    decide(rules, f.src, f.dst, f.protocol, Some(f.dst_port)).map(|r| r.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::nodes;
    use crate::policy::{compile, parse, PROTO_ICMP, PROTO_TCP};

    fn rules(src: &str) -> Vec<Arc<CompiledRule>> {
        compile(&parse("p.toml", src).unwrap(), &nodes())
    }

    fn flow(src: &str, dst: &str, protocol: u8, dst_port: u16) -> FlowKind {
        let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
        FlowKind { src, dst, protocol, dst_port, connections: 1, records: 2, last_ms: 0 }
    }

    const SSH: &str =
        "[[rules]]\nid = \"ssh\"\nfrom = [\"node:laptop\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"22\"]\n";
    const WEB: &str =
        "[[rules]]\nid = \"web\"\nfrom = [\"*\"]\nto = [\"tag:web\"]\nproto = \"tcp\"\nports = [\"443\"]\n";
    const ALL: &str = "[[rules]]\nid = \"all\"\nfrom = [\"node:laptop\"]\nto = [\"node:db1\"]\n";

    #[test]
    fn a_removed_rule_lists_exactly_the_flows_it_alone_allowed() {
        let old = rules(&format!("{SSH}{WEB}{ALL}"));
        let new = rules(&format!("{WEB}{ALL}"));
        let ssh_to_web = flow("10.77.0.1", "10.77.0.3", PROTO_TCP, 22);
        let flows = vec![
            ssh_to_web.clone(),
            // Still allowed by `all`: its verdict stays, though its rule changes.
            flow("10.77.0.1", "10.77.0.2", PROTO_TCP, 22),
            flow("10.77.0.2", "10.77.0.3", PROTO_TCP, 443),
            flow("10.77.0.2", "10.77.0.3", PROTO_TCP, 80),
        ];
        let changes = replay(&old, &new, flows);
        let want = VerdictChange { old_rule: Some("ssh".into()), new_rule: None, flows: vec![ssh_to_web] };
        assert_eq!(changes, [want]);
    }

    #[test]
    fn newly_allowed_flows_are_grouped_by_the_rule_that_allows_them() {
        let old = rules(WEB);
        let new = rules(&format!("{WEB}{SSH}{ALL}"));
        let a = flow("10.77.0.1", "10.77.0.2", PROTO_TCP, 5432);
        let b = flow("fd77::1", "fd77::3", PROTO_TCP, 22);
        let c = flow("10.77.0.1", "10.77.0.2", PROTO_ICMP, 0x0800);
        let changes = replay(&old, &new, vec![a.clone(), b.clone(), c.clone()]);
        let got: Vec<_> =
            changes.iter().map(|c| (c.old_rule.as_deref(), c.new_rule.as_deref(), c.flows.len())).collect();
        assert_eq!(got, [(None, Some("all"), 2), (None, Some("ssh"), 1)]);
        assert_eq!(changes[0].flows, [a, c]);
    }

    #[test]
    fn icmp_of_the_other_family_stays_denied() {
        let changes = replay(&[], &rules(ALL), vec![flow("fd77::1", "fd77::2", PROTO_ICMP, 0)]);
        assert!(changes.is_empty(), "{changes:?}");
    }
}
