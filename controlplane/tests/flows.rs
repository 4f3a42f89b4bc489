//! Flow records through a real in-process control plane: agents report over the Report
//! stream, the records are stored (SQLite here, PostgreSQL in the store's tests), paired by
//! their two ends, refused when they are not the reporting node's, and listed with
//! `ListFlows` and the `flows` command.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use tonic::Code;
use wirefence_control::flows::Retention;
use wirefence_proto::v1::{
    agent_report, AgentReport, Direction, DryRunPolicyRequest, FlowRecord, FlowRecords, ListFlowsReply,
    ListFlowsRequest, Pairing, RegisterResponse, RuleHit, RuleHits, RuleUsageRequest, Verdict,
};

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn v4(reg: &RegisterResponse) -> Vec<u8> {
    reg.addresses.iter().find(|p| p.addr.len() == 4).expect("an IPv4 overlay address").addr.clone()
}

fn record(src: &[u8], dst: &[u8], port: u32, direction: Direction, rule: &str) -> FlowRecord {
    FlowRecord {
        time_unix_ms: now_ms(),
        src: src.to_vec(),
        dst: dst.to_vec(),
        protocol: 6,
        src_port: 40000,
        dst_port: port,
        verdict: if rule.is_empty() { Verdict::Deny } else { Verdict::Allow }.into(),
        direction: direction.into(),
        rule_id: rule.into(),
        ..Default::default()
    }
}

async fn report(cp: &Cp, node: &RegisterResponse, records: Vec<FlowRecord>) {
    let msg = AgentReport { body: Some(agent_report::Body::Flows(FlowRecords { records })) };
    cp.agent().await.report(authed(tokio_stream::iter(vec![msg]), &node.credential)).await.expect("report");
}

async fn list(cp: &mut Cp, f: impl FnOnce(&mut ListFlowsRequest)) -> ListFlowsReply {
    cp.handle.registry().flush_flows().await.unwrap();
    let mut req = ListFlowsRequest::default();
    f(&mut req);
    cp.admin.list_flows(req).await.expect("list flows").into_inner()
}

/// (reporting hostname, destination port, pairing, other end's hostname), oldest first.
fn seen(r: &ListFlowsReply) -> Vec<(String, u32, Pairing, String)> {
    r.flows
        .iter()
        .map(|f| {
            let port = f.record.as_ref().unwrap().dst_port;
            (f.hostname.clone(), port, f.pairing(), f.peer_hostname.clone())
        })
        .collect()
}

#[tokio::test]
async fn both_ends_of_a_flow_pair_and_one_end_alone_is_one_sided() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let (a, b, c) = (cp.enroll("a", 1, &[]).await, cp.enroll("b", 2, &[]).await, cp.enroll("c", 3, &[]).await);
    let outside = [198, 51, 100, 7];
    // a -> b: both ends. a -> c: c reports nothing. a's deny leaving: nothing to expect.
    // a -> an address of no node: nothing to expect.
    report(
        &cp,
        &a,
        vec![
            record(&v4(&a), &v4(&b), 443, Direction::Egress, "web"),
            record(&v4(&a), &v4(&c), 444, Direction::Egress, "web"),
            record(&v4(&a), &v4(&b), 22, Direction::Egress, ""),
            record(&v4(&a), &outside, 445, Direction::Egress, "web"),
        ],
    )
    .await;
    report(&cp, &b, vec![record(&v4(&a), &v4(&b), 443, Direction::Ingress, "web")]).await;

    let all = list(&mut cp, |_| {}).await;
    let mut got = seen(&all);
    got.sort();
    let want = [
        ("a".into(), 22, Pairing::NoneExpected, "".into()),
        ("a".into(), 443, Pairing::Paired, "b".into()),
        ("a".into(), 444, Pairing::OneSided, "c".into()),
        ("a".into(), 445, Pairing::NoneExpected, "".into()),
        ("b".into(), 443, Pairing::Paired, "a".into()),
    ];
    assert_eq!(got, want);
    assert!(all.refused.is_empty(), "{:?}", all.refused);

    let one_sided = list(&mut cp, |q| q.one_sided = true).await;
    assert_eq!(seen(&one_sided), [("a".into(), 444, Pairing::OneSided, "c".into())]);
    let denies = list(&mut cp, |q| q.verdict = Verdict::Deny.into()).await;
    assert_eq!(seen(&denies), [("a".into(), 22, Pairing::NoneExpected, "".into())]);
    let of_b = list(&mut cp, |q| q.node = "b".into()).await;
    assert_eq!(seen(&of_b), [("b".into(), 443, Pairing::Paired, "a".into())]);
    assert_eq!(list(&mut cp, |q| q.rule_id = "web".into()).await.flows.len(), 4);
    assert_eq!(list(&mut cp, |q| q.since_unix_ms = now_ms() + 60_000).await.flows.len(), 0);
    assert_eq!(list(&mut cp, |q| q.limit = 2).await.flows.len(), 2);
}

#[tokio::test]
async fn a_node_cannot_report_other_nodes_traffic_nor_date_it_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_with(dir.path(), |c| {
        relaxed(c);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (a, b, c) = (cp.enroll("a", 1, &[]).await, cp.enroll("b", 2, &[]).await, cp.enroll("c", 3, &[]).await);
    // c claims to have seen b's side of a flow between a and b (to make a look one-sided or
    // paired), and sends records that are malformed.
    let mut future = record(&v4(&c), &v4(&a), 80, Direction::Egress, "web");
    future.time_unix_ms = i64::MAX;
    let forged = vec![
        record(&v4(&a), &v4(&b), 443, Direction::Ingress, "web"),
        record(&v4(&b), &v4(&a), 443, Direction::Egress, "web"),
        FlowRecord { src: vec![1, 2, 3], ..record(&v4(&c), &v4(&a), 80, Direction::Egress, "web") },
        FlowRecord { verdict: 7, ..record(&v4(&c), &v4(&a), 80, Direction::Egress, "web") },
        FlowRecord { rule_id: "no such\nrule".into(), ..record(&v4(&c), &v4(&a), 80, Direction::Egress, "web") },
        future,
    ];
    report(&cp, &c, forged).await;
    let r = list(&mut cp, |_| {}).await;
    assert_eq!(r.flows.len(), 1, "only c's own, well-formed record: {:?}", seen(&r));
    let at = r.flows[0].record.as_ref().unwrap().time_unix_ms;
    assert!(at <= now_ms(), "a record dated ahead is kept at its arrival, not {at}");
    let refused: Vec<_> = r.refused.iter().map(|x| (x.hostname.as_str(), x.over_rate, x.invalid)).collect();
    assert_eq!(refused, [("c", 0, 5)]);
    let m = scrape(cp.handle.metrics_addr.unwrap()).await;
    assert!(m.contains("wirefence_control_flow_records_total{outcome=\"stored\"} 1\n"), "{m}");
    assert!(m.contains("wirefence_control_flow_records_total{outcome=\"invalid\"} 5\n"), "{m}");
}

#[tokio::test]
async fn queries_with_bad_arguments_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    for (req, says) in [
        (ListFlowsRequest { verdict: 9, ..Default::default() }, "verdict: 9"),
        (ListFlowsRequest { limit: 100_001, ..Default::default() }, "limit: 100001 is above 100000"),
        (ListFlowsRequest { rule_id: "a b".into(), ..Default::default() }, "rule_id"),
        (ListFlowsRequest { node: "nobody".into(), ..Default::default() }, "no node \"nobody\""),
    ] {
        let e = cp.admin.list_flows(req).await.expect_err(says);
        assert!(e.message().contains(says), "{e:?}");
        assert!(matches!(e.code(), Code::InvalidArgument | Code::NotFound), "{e:?}");
    }
}

#[tokio::test]
async fn records_beyond_the_retention_count_go_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start_with(dir.path(), |c| {
        relaxed(c);
        c.flow_retention = Retention { max_records: 3, ..Retention::default() };
    })
    .await;
    let a = cp.enroll("a", 1, &[]).await;
    for port in 1..=5 {
        report(&cp, &a, vec![record(&v4(&a), &[10, 77, 255, 1], port, Direction::Egress, "web")]).await;
        cp.handle.registry().flush_flows().await.unwrap();
    }
    let ports: Vec<u32> =
        list(&mut cp, |_| {}).await.flows.iter().map(|f| f.record.as_ref().unwrap().dst_port).collect();
    assert_eq!(ports, [3, 4, 5]);
}

#[tokio::test]
async fn the_flows_command_lists_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let (a, b) = (cp.enroll("a", 1, &[]).await, cp.enroll("b", 2, &[]).await);
    report(&cp, &a, vec![record(&v4(&a), &v4(&b), 443, Direction::Egress, "web")]).await;
    report(&cp, &b, vec![record(&v4(&a), &v4(&b), 5432, Direction::Ingress, "")]).await;
    cp.handle.registry().flush_flows().await.unwrap();
    let sock = cp.handle.admin_socket.clone();

    let out = cli(&sock, &["flows"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("TIME (UTC)"), "{table}");
    assert!(table.contains("10.77.0.1:40000") && table.contains("web") && table.contains("b one-sided"), "{table}");

    let out = cli(&sock, &["flows", "--json", "--verdict", "deny", "--since", "10m", "--node", "b"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = j["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 1, "{j:#}");
    assert_eq!(flows[0]["hostname"], "b");
    assert_eq!(flows[0]["dst_port"], 5432);
    assert_eq!(flows[0]["verdict"], "deny");
    assert_eq!(flows[0]["direction"], "in");
    assert_eq!(flows[0]["pairing"], "one-sided", "a reported another port");
    assert_eq!(flows[0]["peer_hostname"], "a");

    let out = cli(&sock, &["flows", "--verdict", "maybe"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("maybe"));
    let out = cli(&sock, &["flows", "--limit", "100001"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit: 100001 is above 100000"));
}

const DB: &str =
    "[[rules]]\nid = \"db\"\nfrom = [\"tag:dev\"]\nto = [\"tag:db\"]\nproto = \"tcp\"\nports = [\"5432\"]\n";
const WEB: &str = "[[rules]]\nid = \"web\"\nfrom = [\"*\"]\nto = [\"tag:web\"]\nproto = \"tcp\"\nports = [\"443\"]\n";
const SSH: &str = "[[rules]]\nid = \"ssh\"\nfrom = [\"tag:dev\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"22\"]\n";

/// Enrolls laptop (dev), db1 (db) and web1 (web) and applies db, web and ssh; the
/// policy's version.
async fn laptop_db_web(cp: &mut Cp) -> (RegisterResponse, RegisterResponse, RegisterResponse, u64) {
    let a = cp.enroll("laptop", 1, &["dev"]).await;
    let b = cp.enroll("db1", 2, &["db"]).await;
    let c = cp.enroll("web1", 3, &["web"]).await;
    let applied = cp.apply(&format!("{DB}{WEB}{SSH}")).await.unwrap();
    (a, b, c, applied)
}

#[tokio::test]
async fn a_dry_run_lists_exactly_the_flows_a_removed_rule_allowed_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let (a, b, c, applied) = laptop_db_web(&mut cp).await;
    let from = |src_port, r: FlowRecord| FlowRecord { src_port, ..r };
    // ssh from the laptop to db1: three connections, two reported at both ends; to web1: one.
    let mut of_a = Vec::new();
    let mut of_b = Vec::new();
    for port in [50001, 50002, 50003] {
        of_a.push(from(port, record(&v4(&a), &v4(&b), 22, Direction::Egress, "ssh")));
    }
    for port in [50001, 50002] {
        of_b.push(from(port, record(&v4(&a), &v4(&b), 22, Direction::Ingress, "ssh")));
    }
    of_a.push(record(&v4(&a), &v4(&c), 22, Direction::Egress, "ssh"));
    // Flows the other rules allow, and a deny: none of them changes.
    of_a.push(record(&v4(&a), &v4(&b), 5432, Direction::Egress, "db"));
    of_b.push(record(&v4(&b), &v4(&c), 443, Direction::Egress, "web"));
    of_b.push(record(&v4(&b), &v4(&a), 22, Direction::Egress, ""));
    report(&cp, &a, of_a).await;
    report(&cp, &b, of_b).await;
    cp.handle.registry().flush_flows().await.unwrap();

    let candidate = dir.path().join("candidate.toml");
    let tests = "[[tests]]\nfrom = \"laptop\"\nto = \"db1\"\nproto = \"tcp\"\nport = 5432\nexpect = \"allow\"\n";
    std::fs::write(&candidate, format!("{DB}{WEB}{tests}")).unwrap();
    let sock = cp.handle.admin_socket.clone();
    let out = cli(&sock, &["policy", "apply", "--dry-run", "--json", candidate.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((j["rules"].as_u64(), j["tests_passed"].as_u64()), (Some(2), Some(1)), "{j:#}");
    assert_eq!((j["flows_evaluated"].as_u64(), j["records"].as_u64()), (Some(5), Some(9)), "{j:#}");
    let changes = j["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{j:#}");
    let ch = &changes[0];
    assert_eq!((ch["old_verdict"].as_str(), ch["old_rule"].as_str()), (Some("allow"), Some("ssh")));
    assert_eq!((ch["new_verdict"].as_str(), ch["new_rule"].as_str()), (Some("deny"), Some("")));
    assert_eq!(
        (ch["flows_total"].as_u64(), ch["connections"].as_u64(), ch["records"].as_u64()),
        (Some(2), Some(4), Some(6))
    );
    let mut flows: Vec<(String, u64, u64)> = ch["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (f["dst"].as_str().unwrap().to_owned(), f["connections"].as_u64().unwrap(), f["records"].as_u64().unwrap())
        })
        .collect();
    flows.sort();
    assert_eq!(flows, [("10.77.0.2".into(), 3, 5), ("10.77.0.3".into(), 1, 1)]);

    let text = cli(&sock, &["policy", "apply", "--dry-run", candidate.to_str().unwrap()]).await;
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("replayed 5 flows (9 records)"), "{text}");
    assert!(text.contains("2 flows would change verdict:\n\nallow (ssh) -> deny: 2 flows, 4 connections"), "{text}");
    assert!(text.contains("10.77.0.2:22"), "{text}");

    // Nothing changed: no version, the same policy.
    assert_eq!(cp.handle.registry().current().version, applied);
    let shown = cp.admin.get_policy(wirefence_proto::v1::GetPolicyRequest {}).await.unwrap().into_inner();
    assert_eq!(shown.source, format!("{DB}{WEB}{SSH}"));

    // A candidate whose test fails is refused as an apply would refuse it.
    std::fs::write(&candidate, format!("{WEB}{tests}")).unwrap();
    let out = cli(&sock, &["policy", "apply", "--dry-run", candidate.to_str().unwrap()]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy rejected; nothing applied") && err.contains("candidate.toml:"), "{err}");
    // A window with nothing in it replays nothing.
    let source = format!("{DB}{WEB}");
    let later = DryRunPolicyRequest { source, since_unix_ms: now_ms() + 60_000, ..Default::default() };
    let r = cp.admin.dry_run_policy(later).await.unwrap().into_inner();
    assert_eq!((r.flows_evaluated, r.changes.len()), (0, 0));
    let out = cli(&sock, &["policy", "apply", "--since", "1h", candidate.to_str().unwrap()]).await;
    assert!(!out.status.success(), "--since without --dry-run");
    assert_eq!(cp.handle.registry().current().version, applied);
}

#[tokio::test]
async fn rule_usage_sums_the_nodes_and_refuses_counts_for_rules_that_are_not_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp = start(dir.path()).await;
    let (a, b, c, _) = laptop_db_web(&mut cp).await;
    let hits = |v: &[(&str, u64)]| {
        let rules = v.iter().map(|(id, n)| RuleHit { rule_id: id.to_string(), packets: *n, bytes: n * 100 }).collect();
        AgentReport { body: Some(agent_report::Body::RuleHits(RuleHits { rules })) }
    };
    for (node, msg) in [
        // A rule named twice counts once with both parts.
        (&a, hits(&[("db", 10), ("ssh", 2), ("ssh", 3)])),
        (&b, hits(&[("db", 10)])),
        // Within 5 s of a's last report: refused.
        (&a, hits(&[("db", 1)])),
        // web1 is on no side of `db`; a rule that does not exist; a count no link carries,
        // also when split into parts.
        (&c, hits(&[("db", 1_000_000), ("nope", 5), ("web", 1_500_000_000), ("web", 1_500_000_000)])),
    ] {
        cp.agent().await.report(authed(tokio_stream::iter(vec![msg]), &node.credential)).await.expect("report");
    }
    cp.handle.registry().flush_flows().await.unwrap();
    let r = cp.admin.get_rule_usage(RuleUsageRequest::default()).await.unwrap().into_inner();
    let got: Vec<_> = r.rules.iter().map(|u| (u.rule_id.as_str(), u.packets, u.bytes)).collect();
    assert_eq!(got, [("db", 20, 2_000), ("web", 0, 0), ("ssh", 5, 500)], "in the file's order");

    let sock = cp.handle.admin_socket.clone();
    let text = String::from_utf8(cli(&sock, &["policy", "show", "--usage"]).await.stdout).unwrap();
    assert!(text.contains("1 rule matched nothing: web"), "{text}");
    let out = cli(&sock, &["policy", "show", "--since", "1h"]).await;
    assert!(!out.status.success(), "--since without --usage");
}
