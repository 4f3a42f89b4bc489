//! Policy file errors (each kind, with positions), compilation and the test runner.

use std::sync::Arc;

use super::*;
use crate::model::NodeRec;

pub(crate) fn node(id: &str, hostname: &str, n: u8, tags: &[&str]) -> Arc<NodeRec> {
    Arc::new(NodeRec {
        id: id.into(),
        hostname: hostname.into(),
        bound: true,
        public_key: [n; 32],
        addresses: vec![format!("10.77.0.{n}/32").parse().unwrap(), format!("fd77::{n}/128").parse().unwrap()],
        endpoints: vec![format!("192.0.2.{n}:51820").parse().unwrap()],
        routes: vec![],
        tags: tags.iter().map(|t| t.to_string()).collect(),
        refused_routes: vec![],
    })
}

pub(crate) fn nodes() -> Vec<Arc<NodeRec>> {
    vec![node("n1", "laptop", 1, &[]), node("n2", "db1", 2, &[]), node("n3", "web1", 3, &["web"])]
}

const GOOD: &str = r#"
[groups]
web = ["tag:web", "node:db1"]
admins = ["node:laptop"]
everyone = ["group:web", "group:admins"]

[[rules]]
id = "admin-ssh"
from = ["group:admins"]
to = ["group:web", "10.88.0.0/24"]
proto = "tcp"
ports = ["22", "8000-8080", 443]

[[rules]]
id = "ping"
from = ["group:everyone"]
to = ["*"]
proto = "icmp"

[[tests]]
from = "laptop"
to = "db1"
proto = "tcp"
port = 22
expect = "allow"

[[tests]]
from = "db1"
to = "laptop"
port = 22
expect = "deny"

[[tests]]
from = "10.77.0.1"
to = "10.88.0.7"
port = 8080
expect = "allow"

[[tests]]
from = "web1"
to = "db1"
proto = "icmp"
expect = "allow"
"#;

/// The error for `src`, as `line:column: message` (file name checked separately).
fn err(src: &str) -> (usize, usize, Problem, String) {
    let e = parse("p.toml", src).unwrap_err();
    assert!(e.to_string().starts_with(&format!("p.toml:{}:{}: ", e.pos.line, e.pos.column)), "{e}");
    (e.pos.line, e.pos.column, e.problem.clone(), e.to_string())
}

fn rule(body: &str) -> String {
    format!("[[rules]]\nid = \"r\"\n{body}\n")
}

#[test]
fn a_good_file_parses_compiles_and_its_tests_pass() {
    let p = parse("p.toml", GOOD).unwrap();
    assert_eq!(p.rules.len(), 2);
    let ssh = &p.rules[0];
    assert_eq!(ssh.pos.line, 7);
    assert_eq!(ssh.from, vec![Selector::Node("laptop".into())]);
    assert_eq!(
        ssh.to,
        vec![Selector::Node("db1".into()), Selector::Tag("web".into()), Selector::Net("10.88.0.0/24".parse().unwrap())]
    );
    assert_eq!(ssh.protocol, Some(PROTO_TCP));
    assert_eq!(
        ssh.ports,
        vec![
            PortRange { first: 22, last: 22 },
            PortRange { first: 8000, last: 8080 },
            PortRange { first: 443, last: 443 }
        ]
    );
    let nodes = nodes();
    let rules = compile(&p, &nodes);
    assert_eq!(run_tests(&p, &rules, &nodes), Ok(4));

    // admin-ssh: the IPv6 source is dropped (the only IPv4-only destination keeps IPv4
    // and the nodes have both, so both families stay).
    let r = &rules[0];
    let s = |v: &[ipnet::IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(s(&r.from), ["10.77.0.1/32", "fd77::1/128"]);
    // Adjacent node addresses merge into one prefix.
    assert_eq!(s(&r.to), ["10.77.0.2/31", "10.88.0.0/24", "fd77::2/127"]);
    // ping is icmp: IPv4 only.
    assert_eq!(s(&rules[1].from), ["10.77.0.1/32", "10.77.0.2/31"]);
    assert!(rules[1].to.iter().all(|n| matches!(n, ipnet::IpNet::V4(_))));
}

#[test]
fn compile_drops_families_and_rules_that_cannot_match() {
    let src = rule("from = [\"node:laptop\"]\nto = [\"10.88.0.0/24\"]")
        + "[[rules]]\nid = \"ghost\"\nfrom = [\"node:nobody\"]\nto = [\"*\"]\n";
    let p = parse("p.toml", &src).unwrap();
    let rules = compile(&p, &nodes());
    assert_eq!(rules.len(), 1, "a rule whose nodes do not exist compiles to nothing");
    assert_eq!(rules[0].from, vec!["10.77.0.1/32".parse::<ipnet::IpNet>().unwrap()]);
    // With no nodes at all, nothing compiles.
    assert!(compile(&p, &[]).is_empty());
}

#[test]
fn route_selectors_name_a_nodes_subnets() {
    let mut router = (*node("n5", "router", 5, &[])).clone();
    router.routes = vec!["10.88.0.0/24".parse().unwrap(), "fd88::/64".parse().unwrap()];
    let mut all = nodes();
    all.push(Arc::new(router));
    let src = rule("from = [\"node:laptop\"]\nto = [\"route:router\"]");
    let p = parse("p.toml", &src).unwrap();
    let rules = compile(&p, &all);
    let s = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(s(&rules[0].to), ["10.88.0.0/24", "fd88::/64"], "the subnets, not the router's own addresses");
    assert!(unmatched_selectors(&p, &all).is_empty());
    // A node without routes, or none of that name: nothing to reach, and said so.
    let none = parse("p.toml", &rule("from = [\"*\"]\nto = [\"route:laptop\", \"route:ghost\"]")).unwrap();
    assert!(compile(&none, &all).is_empty());
    assert_eq!(unmatched_selectors(&none, &all), ["route:ghost", "route:laptop"]);
    let (_, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"route:\"]"));
    assert!(matches!(p, Problem::BadSelector { .. }));
}

#[test]
fn syntax_errors_and_unknown_fields_have_positions() {
    let (l, _, p, msg) = err("[groups]\nweb = [\"tag:web\"\n");
    assert_eq!(l, 2, "{msg}");
    assert!(matches!(p, Problem::Syntax(_)));
    assert!(msg.contains("unclosed array"), "{msg}");
    let (l, c, p, msg) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nprot = \"tcp\""));
    assert_eq!((l, c), (5, 1), "{msg}");
    assert!(msg.contains("unknown field `prot`"), "{msg}");
    assert!(matches!(p, Problem::Syntax(_)));
    let (l, _, _, msg) = err("[[rules]]\nid = \"r\"\nfrom = [\"*\"]\n");
    assert_eq!(l, 1);
    assert!(msg.contains("missing field `to`"), "{msg}");
    let (_, _, _, msg) = err("[[tests]]\nfrom = \"a\"\nto = \"b\"\nport = 1\nexpect = \"maybe\"\n");
    assert!(msg.starts_with("p.toml:5:"), "{msg}");
}

#[test]
fn unknown_groups_and_bad_selectors() {
    let (l, c, p, _) = err(&rule("from = [\"*\", \"group:nope\"]\nto = [\"*\"]"));
    assert_eq!((l, c), (3, 14));
    assert_eq!(p, Problem::UnknownGroup { field: "rules[0].from[1]".into(), name: "nope".into() });
    let (l, _, p, _) = err("[groups]\na = [\"group:b\"]\n");
    assert_eq!(l, 2);
    assert!(matches!(p, Problem::UnknownGroup { .. }));
    let (l, _, p, msg) = err("[groups]\na = [\"group:b\"]\nb = [\"group:a\"]\n");
    assert_eq!(l, 3, "{msg}");
    assert!(matches!(p, Problem::GroupCycle { .. }), "{msg}");
    let (l, _, p, _) = err(&rule("from = [\"laptop\"]\nto = [\"*\"]"));
    assert_eq!(l, 3);
    assert!(matches!(p, Problem::BadSelector { .. }));
    let (l, _, p, msg) = err(&rule("from = [\"*\"]\nto = [\"10.0.0.1/24\"]"));
    assert_eq!(l, 4);
    assert!(matches!(p, Problem::HostBits { .. }));
    assert!(msg.contains("did you mean 10.0.0.0/24"), "{msg}");
    // node: and tag: that match no node are fine.
    parse("p.toml", &rule("from = [\"node:future\"]\nto = [\"tag:later\", \"fd00::1\"]")).unwrap();
}

#[test]
fn rule_ids_protocols_and_ports() {
    let (l, _, p, _) = err("[[rules]]\nid = \"bad id\"\nfrom = [\"*\"]\nto = [\"*\"]\n");
    assert_eq!((l, p), (2, Problem::BadRuleId { index: 0, id: "bad id".into() }));
    let dup = rule("from = [\"*\"]\nto = [\"*\"]") + &rule("from = [\"*\"]\nto = [\"*\"]");
    let (l, _, p, _) = err(&dup);
    assert_eq!((l, p), (6, Problem::DuplicateRuleId { index: 1, id: "r".into(), first_line: 1 }));
    let (l, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nproto = \"tpc\""));
    assert_eq!((l, p), (5, Problem::BadProto { field: "rules[0].proto".into(), text: "tpc".into() }));
    let (l, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nproto = 256"));
    assert_eq!((l, matches!(p, Problem::BadProto { .. })), (5, true));
    parse("p.toml", &rule("from = [\"*\"]\nto = [\"*\"]\nproto = 47")).unwrap();
    let (l, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\nports = [\"22\"]"));
    assert_eq!((l, p), (6, Problem::PortsWithoutPortProtocol { index: 0, proto: "icmp".into() }));
    let (l, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nports = [\"22\"]"));
    assert_eq!((l, p), (5, Problem::PortsWithoutPortProtocol { index: 0, proto: "any".into() }));
    let (l, c, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nproto = \"udp\"\nports = [\"53\", \"8080-80\"]"));
    assert_eq!((l, c, p), (6, 16, Problem::InvertedRange { field: "rules[0].ports[1]".into(), first: 8080, last: 80 }));
    let (l, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"http\"]"));
    assert_eq!((l, matches!(p, Problem::BadPort { .. })), (6, true));
    let (_, _, p, _) = err(&rule("from = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [70000]"));
    assert!(matches!(p, Problem::BadPort { .. }));
}

#[test]
fn unsatisfiable_rules() {
    let (l, _, p, msg) = err(&format!("\n{}", rule("from = [\"10.0.0.0/8\"]\nto = [\"fd00::/8\"]")));
    assert_eq!(l, 2, "{msg}");
    assert!(matches!(p, Problem::Unsatisfiable { index: 0, .. }));
    assert!(msg.contains("from has only IPv4 and to has only IPv6"), "{msg}");
    let (_, _, p, msg) = err(&rule("from = [\"*\"]\nto = [\"fd00::/64\"]\nproto = \"icmp\""));
    assert!(matches!(p, Problem::Unsatisfiable { .. }));
    assert!(msg.contains("icmp matches IPv4 only"), "{msg}");
    let (_, _, p, msg) = err(&rule("from = [\"10.1.0.0/16\"]\nto = [\"*\"]\nproto = \"icmpv6\""));
    assert!(matches!(p, Problem::Unsatisfiable { .. }), "{msg}");
    let (_, _, p, msg) = err(&rule("from = []\nto = [\"*\"]"));
    assert!(matches!(p, Problem::Unsatisfiable { .. }));
    assert!(msg.contains("from has nothing"), "{msg}");
    // Nodes have both families: fine with either.
    parse("p.toml", &rule("from = [\"tag:x\"]\nto = [\"fd00::/64\"]\nproto = \"icmpv6\"")).unwrap();
}

#[test]
fn test_cases_shape_unknown_nodes_and_failures() {
    let base = rule("from = [\"node:laptop\"]\nto = [\"node:db1\"]\nproto = \"tcp\"\nports = [\"22\"]");
    let with = |t: &str| format!("{base}[[tests]]\n{t}\n");
    let run = |src: &str| {
        let p = parse("p.toml", src)?;
        let n = nodes();
        run_tests(&p, &compile(&p, &n), &n)
    };
    assert_eq!(run(&with("from = \"laptop\"\nto = \"db1\"\nport = 22\nexpect = \"allow\"")), Ok(1));

    let e = run(&with("from = \"laptop\"\nto = \"db9\"\nport = 22\nexpect = \"allow\"")).unwrap_err();
    assert_eq!(e.pos.line, 9);
    assert_eq!(e.problem, Problem::UnknownTestNode { index: 0, field: "to", name: "db9".into() });

    let e = run(&with("from = \"laptop\"\nto = \"db1\"\nport = 22\nexpect = \"deny\"")).unwrap_err();
    assert_eq!(e.pos.line, 7);
    let msg = e.to_string();
    assert!(
        msg.starts_with("p.toml:7:1: tests[0] (laptop -> db1 tcp/22, 10.77.0.1 -> 10.77.0.2) failed: expected deny, got allow (allowed by rule \"r\")"),
        "{msg}"
    );
    let e = run(&with("from = \"db1\"\nto = \"laptop\"\nport = 22\nexpect = \"allow\"")).unwrap_err();
    assert!(e.to_string().contains("expected allow, got deny (no rule allows it)"), "{e}");
    let e = run(&with("from = \"laptop\"\nto = \"db1\"\nproto = \"any\"\nexpect = \"deny\"")).unwrap_err();
    assert_eq!(e.problem, Problem::TestAnyProto { index: 0 });
    let e = run(&with("from = \"laptop\"\nto = \"db1\"\nexpect = \"deny\"")).unwrap_err();
    assert!(matches!(e.problem, Problem::TestPort { index: 0, .. }));
    let e = run(&with("from = \"laptop\"\nto = \"db1\"\nproto = \"icmp\"\nport = 1\nexpect = \"deny\"")).unwrap_err();
    assert!(matches!(e.problem, Problem::TestPort { index: 0, .. }));
    let e = run(&with("from = \"10.0.0.1\"\nto = \"fd00::1\"\nport = 1\nexpect = \"deny\"")).unwrap_err();
    assert!(matches!(e.problem, Problem::TestNoPair { index: 0, .. }));
    let e = run(&with("from = \"la ptop\"\nto = \"db1\"\nport = 1\nexpect = \"deny\"")).unwrap_err();
    assert!(matches!(e.problem, Problem::BadTestEndpoint { index: 0, field: "from", .. }));
}

#[test]
fn the_most_specific_rule_decides() {
    let src = rule("from = [\"*\"]\nto = [\"*\"]")
        + "[[rules]]\nid = \"web\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"1-1000\", \"80\"]\n";
    let p = parse("p.toml", &src).unwrap();
    let n = nodes();
    let rules = compile(&p, &n);
    let a = "10.77.0.1".parse().unwrap();
    let b = "10.77.0.2".parse().unwrap();
    assert_eq!(decide(&rules, a, b, PROTO_TCP, Some(80)).unwrap().id, "web");
    assert_eq!(decide(&rules, a, b, PROTO_TCP, Some(2000)).unwrap().id, "r");
    assert_eq!(decide(&rules, a, b, PROTO_UDP, Some(80)).unwrap().id, "r");
    assert!(decide(&rules, a, "10.99.0.1".parse().unwrap(), PROTO_TCP, Some(80)).is_none());
}

#[test]
fn ties_are_broken_as_the_agent_breaks_them() {
    // The agent ranks port rules by the aligned port block around the port in the rule's
    // merged ranges, not by the width of a range: 8080 is a block of its own in 8000-8080,
    // so "wide" and "exact" tie and the first decides; 0-3 and 4-7 merge into 0-7, where 4
    // sits in a block of 8, wider than "mid"'s block 4-5; two halves are all ports.
    let all = |id: &str, proto: &str, ports: &str| {
        format!("[[rules]]\nid = \"{id}\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"{proto}\"\n{ports}\n")
    };
    let src = [
        all("wide", "tcp", "ports = [\"8000-8080\"]"),
        all("exact", "tcp", "ports = [\"8080\"]"),
        all("split", "tcp", "ports = [\"0-3\", \"4-7\"]"),
        all("mid", "tcp", "ports = [\"2-5\"]"),
        all("udp", "udp", ""),
        all("halves", "udp", "ports = [\"0-32767\", \"32768-65535\"]"),
    ]
    .concat();
    let p = parse("p.toml", &src).unwrap();
    let n = nodes();
    let rules = compile(&p, &n);
    let a = "10.77.0.1".parse().unwrap();
    let b = "10.77.0.2".parse().unwrap();
    let at = |proto, port| decide(&rules, a, b, proto, Some(port)).map(|r| r.id.as_str());
    assert_eq!(at(PROTO_TCP, 8080), Some("wide"));
    assert_eq!(at(PROTO_TCP, 4), Some("mid"));
    assert_eq!(at(PROTO_TCP, 1), Some("split"));
    assert_eq!(at(PROTO_UDP, 53), Some("udp"), "\"halves\" is every port as the agent holds it: a tie");
    let failing = format!("{src}[[tests]]\nfrom = \"laptop\"\nto = \"db1\"\nport = 8080\nexpect = \"deny\"\n");
    let p = parse("p.toml", &failing).unwrap();
    let e = run_tests(&p, &compile(&p, &n), &n).unwrap_err();
    assert!(e.to_string().ends_with("expected deny, got allow (allowed by rule \"wide\")"), "{e}");
}
