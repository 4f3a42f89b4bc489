//! Text and JSON renderings of admin replies for the CLI.

use std::fmt::Write;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ipnet::IpNet;
use serde_json::{json, Value};
use wirefence_proto::v1::{
    Direction, DryRunPolicyReply, EnrollmentKey, GetPolicyReply, IpPrefix, ListFlowsReply, Node, Pairing,
    RouteGroupMember, RuleUsageReply, SocketAddress, Verdict, ViewSync,
};
use wirefence_proto::Escaped;

fn prefixes(v: &[IpPrefix]) -> Vec<String> {
    v.iter().map(|p| IpNet::try_from(p).map_or_else(|e| format!("<{e}>"), |n| n.to_string())).collect()
}

fn sockets(v: &[SocketAddress]) -> Vec<String> {
    v.iter().map(|s| std::net::SocketAddr::try_from(s).map_or_else(|e| format!("<{e}>"), |a| a.to_string())).collect()
}

/// Text an agent supplied (an apply error, a hostname stored by an older build), made safe
/// for a terminal. The JSON renderings carry values as they are, for programs to read.
fn shown(s: &str) -> String {
    Escaped(s).to_string()
}

/// Values joined for a text rendering, each escaped.
fn joined(v: &[String], sep: &str) -> String {
    v.iter().map(|s| shown(s)).collect::<Vec<_>>().join(sep)
}

pub fn key(k: &[u8]) -> String {
    STANDARD.encode(k)
}

fn ago(unix: i64, now: i64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let d = (now - unix).max(0);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

pub fn node_json(n: &Node) -> Value {
    json!({
        "node_id": n.node_id,
        "hostname": n.hostname,
        "name_bound": n.name_bound,
        "public_key": key(&n.public_key),
        "addresses": prefixes(&n.addresses),
        "endpoints": sockets(&n.endpoints),
        "routes": prefixes(&n.routes),
        "granted_routes": prefixes(&n.granted_routes),
        "refused_routes": n.refused_routes.iter().map(|r| json!({
            "route": r.route.as_ref().map(|p| prefixes(std::slice::from_ref(p)).remove(0)),
            "reason": r.reason,
        })).collect::<Vec<_>>(),
        "route_groups": n.route_groups.iter().map(|g| json!({
            "prefix": g.prefix.as_ref().map(|p| prefixes(std::slice::from_ref(p)).remove(0)),
            "primary": g.primary,
            "members": g.members.iter().map(|m| json!({
                "node_id": m.node_id,
                "hostname": m.hostname,
                "priority": m.priority,
                "healthy": m.healthy,
                "checked": m.checked,
                "tunnel_dead": m.tunnel_dead,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tags": n.tags,
        "applied_version": n.applied_version,
        "sync": match ViewSync::try_from(n.sync).unwrap_or(ViewSync::Unknown) {
            ViewSync::InSync => "in_sync",
            ViewSync::Behind => "behind",
            ViewSync::Unknown => "unknown",
        },
        "updates_behind": n.updates_behind,
        "removed": n.removed,
        "last_error": n.last_error,
        "last_refusal": n.last_refusal,
        "last_refusal_unix": n.last_refusal_unix,
        "last_seen_unix": n.last_seen_unix,
        "connected": n.connected,
        "peer_stats": n.peer_stats.iter().map(|s| json!({
            "public_key": key(&s.public_key),
            "name": s.name,
            "last_handshake_unix": s.last_handshake_unix,
            "rx_bytes": s.rx_bytes,
            "tx_bytes": s.tx_bytes,
            "endpoint": s.endpoint.as_ref().map(|e| sockets(std::slice::from_ref(e)).remove(0)),
        })).collect::<Vec<_>>(),
    })
}

/// One line per node under a header.
pub fn nodes_table(nodes: &[Node], now: i64) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "HOSTNAME".into(),
        "ADDRESSES".into(),
        "TAGS".into(),
        "CONNECTED".into(),
        "APPLIED".into(),
        "LAST SEEN".into(),
    ]];
    for n in nodes {
        rows.push([
            shown(&n.node_id),
            hostname(n),
            prefixes(&n.addresses).join(","),
            joined(&n.tags, ","),
            if n.connected { "yes" } else { "no" }.into(),
            applied(n),
            ago(n.last_seen_unix, now),
        ]);
    }
    table(&rows)
}

/// The applied version and whether it is the node's current view: `12 in sync`, `9 behind
/// 2` (updates), `9 behind` (not connected; how many unknown), `removed`, or the bare
/// version when not known; `(error)` when its last apply failed.
fn applied(n: &Node) -> String {
    let mut s = match (n.removed, ViewSync::try_from(n.sync).unwrap_or(ViewSync::Unknown), n.updates_behind) {
        (true, ..) => "removed".to_string(),
        (false, ViewSync::InSync, _) => format!("{} in sync", n.applied_version),
        (false, ViewSync::Behind, 0) => format!("{} behind", n.applied_version),
        (false, ViewSync::Behind, b) => format!("{} behind {b}", n.applied_version),
        (false, ViewSync::Unknown, _) => n.applied_version.to_string(),
    };
    if !n.last_error.is_empty() {
        s.push_str(" (error)");
    }
    s
}

/// Rows padded to columns.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The hostname, marked when it is only a label the node chose (not matched by `node:`).
fn hostname(n: &Node) -> String {
    if n.name_bound {
        shown(&n.hostname)
    } else {
        format!("{} (label)", Escaped(&n.hostname))
    }
}

fn uses_left(k: &EnrollmentKey) -> String {
    match k.max_uses {
        0 => "unlimited".into(),
        max => max.saturating_sub(k.uses).to_string(),
    }
}

fn until(unix: i64, now: i64) -> String {
    match unix {
        0 => "never".into(),
        t if t <= now => "expired".into(),
        t => format!("in {}", ago(now, t).trim_end_matches(" ago")),
    }
}

pub fn key_json(k: &EnrollmentKey) -> Value {
    json!({
        "key_id": k.key_id,
        "hostname": k.hostname,
        "reenroll_node": k.reenroll_node,
        "tags": k.tags,
        "routes": prefixes(&k.routes),
        "max_uses": k.max_uses,
        "uses": k.uses,
        "expires_unix": k.expires_unix,
        "created_unix": k.created_unix,
        "revoked": k.revoked,
    })
}

/// One line per enrollment key (never a secret: the server does not have them).
pub fn keys_table(keys: &[EnrollmentKey], now: i64) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "HOSTNAME".into(),
        "TAGS".into(),
        "ROUTES".into(),
        "USES LEFT".into(),
        "EXPIRES".into(),
        "CREATED".into(),
    ]];
    for k in keys {
        rows.push([
            shown(&k.key_id),
            match k.reenroll_node.as_str() {
                "" => shown(&k.hostname),
                node => format!("re-enrolls {}", shown(node)),
            },
            joined(&k.tags, ","),
            prefixes(&k.routes).join(","),
            if k.revoked { "revoked".into() } else { uses_left(k) },
            until(k.expires_unix, now),
            ago(k.created_unix, now),
        ]);
    }
    table(&rows)
}

pub fn node_text(n: &Node, now: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node:            {}", Escaped(&n.node_id));
    let _ = writeln!(out, "hostname:        {}", hostname(n));
    let _ = writeln!(out, "public key:      {}", key(&n.public_key));
    let _ = writeln!(out, "addresses:       {}", prefixes(&n.addresses).join(", "));
    let _ = writeln!(out, "endpoints:       {}", sockets(&n.endpoints).join(", "));
    let _ = writeln!(out, "routes:          {}", prefixes(&n.routes).join(", "));
    let _ = writeln!(out, "granted routes:  {}", prefixes(&n.granted_routes).join(", "));
    for r in &n.refused_routes {
        let _ = writeln!(out, "refused route:   {}", Escaped(&r.reason));
    }
    for g in &n.route_groups {
        let prefix = g.prefix.as_ref().map(|p| prefixes(std::slice::from_ref(p)).remove(0)).unwrap_or_default();
        let members: Vec<String> = g
            .members
            .iter()
            .map(|m| {
                let health = match (m.healthy, m.checked, m.tunnel_dead) {
                    (true, true, _) => "healthy",
                    (true, false, _) => "connected, no check",
                    (false, _, true) => "unhealthy: its peers receive nothing from it",
                    (false, _, false) => "unhealthy",
                };
                let mark = if m.node_id == g.primary { "*" } else { "" };
                format!("{mark}{} (priority {}, {health})", member_name(m), m.priority)
            })
            .collect();
        let primary = g
            .members
            .iter()
            .find(|m| m.node_id == g.primary)
            .map_or_else(|| Escaped(&g.primary).to_string(), member_name);
        let _ = writeln!(out, "route group:     {prefix} primary {primary}: {}", members.join(", "));
    }
    let _ = writeln!(out, "tags:            {}", joined(&n.tags, ", "));
    let _ = writeln!(out, "connected:       {}", if n.connected { "yes" } else { "no" });
    if n.removed {
        let _ = writeln!(out, "removed:         yes (in no view; its name and addresses stay reserved)");
    }
    let _ = writeln!(out, "applied version: {}", applied(n));
    if !n.last_refusal.is_empty() {
        let _ = writeln!(out, "last refusal:    {}: {}", ago(n.last_refusal_unix, now), Escaped(&n.last_refusal));
    }
    if !n.last_error.is_empty() {
        let _ = writeln!(out, "last error:      {}", Escaped(&n.last_error));
    }
    let _ = writeln!(out, "last seen:       {}", ago(n.last_seen_unix, now));
    for s in &n.peer_stats {
        let ep = s.endpoint.as_ref().map(|e| sockets(std::slice::from_ref(e)).remove(0)).unwrap_or_default();
        let who = match s.name.as_str() {
            "" => key(&s.public_key),
            name => format!("{} ({})", Escaped(name), key(&s.public_key)),
        };
        let _ = writeln!(
            out,
            "peer {who}  handshake {}  rx {}  tx {}  {ep}",
            ago(s.last_handshake_unix, now),
            s.rx_bytes,
            s.tx_bytes
        );
    }
    out
}

pub fn policy_json(p: &GetPolicyReply) -> Value {
    json!({ "file_name": p.file_name, "version": p.version, "source": p.source })
}

/// A route group member by hostname and node id, or by node id alone.
fn member_name(m: &RouteGroupMember) -> String {
    if m.hostname.is_empty() {
        Escaped(&m.node_id).to_string()
    } else {
        format!("{} ({})", Escaped(&m.hostname), Escaped(&m.node_id))
    }
}

/// A flow record's addresses as text (`<n bytes>` for a length no address has).
fn flow_ip(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or_default()).to_string(),
        n => format!("<{n} bytes>"),
    }
}

/// `addr:port`, an IPv6 address in brackets.
fn flow_end(b: &[u8], port: u32) -> String {
    match b.len() {
        16 => format!("[{}]:{port}", flow_ip(b)),
        _ => format!("{}:{port}", flow_ip(b)),
    }
}

fn protocol(p: u32) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        p => p.to_string(),
    }
}

fn verdict(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Allow) => "allow",
        Ok(Verdict::Deny) => "deny",
        _ => "?",
    }
}

fn direction(d: i32) -> &'static str {
    match Direction::try_from(d) {
        Ok(Direction::Ingress) => "in",
        Ok(Direction::Egress) => "out",
        _ => "?",
    }
}

fn pairing(p: i32) -> &'static str {
    match Pairing::try_from(p) {
        Ok(Pairing::Paired) => "paired",
        Ok(Pairing::OneSided) => "one-sided",
        Ok(Pairing::NoneExpected) => "none-expected",
        _ => "?",
    }
}

/// When, as UTC `YYYY-MM-DD HH:MM:SS`.
fn utc(unix_ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => unix_ms.to_string(),
    }
}

pub fn flows_json(r: &ListFlowsReply) -> Value {
    json!({
        "flows": r.flows.iter().map(|f| {
            let rec = f.record.clone().unwrap_or_default();
            json!({
                "node_id": f.node_id,
                "hostname": f.hostname,
                "time_unix_ms": rec.time_unix_ms,
                "direction": direction(rec.direction),
                "verdict": verdict(rec.verdict),
                "protocol": rec.protocol,
                "src": flow_ip(&rec.src),
                "src_port": rec.src_port,
                "dst": flow_ip(&rec.dst),
                "dst_port": rec.dst_port,
                "rule_id": rec.rule_id,
                "packets": rec.packets,
                "bytes": rec.bytes,
                "ended": rec.ended,
                "pairing": pairing(f.pairing),
                "peer_node_id": f.peer_node_id,
                "peer_hostname": f.peer_hostname,
            })
        }).collect::<Vec<_>>(),
        "refused": r.refused.iter().map(|x| json!({
            "node_id": x.node_id,
            "hostname": x.hostname,
            "over_rate": x.over_rate,
            "invalid": x.invalid,
        })).collect::<Vec<_>>(),
    })
}

pub fn flows_table(r: &ListFlowsReply) -> String {
    let mut rows = vec![[
        "TIME (UTC)".to_string(),
        "NODE".into(),
        "DIR".into(),
        "VERDICT".into(),
        "PROTO".into(),
        "SOURCE".into(),
        "DESTINATION".into(),
        "RULE".into(),
        "PACKETS".into(),
        "BYTES".into(),
        "OTHER END".into(),
    ]];
    for f in &r.flows {
        let rec = f.record.clone().unwrap_or_default();
        let other = match Pairing::try_from(f.pairing) {
            Ok(Pairing::NoneExpected) => "-".to_string(),
            _ => format!("{} {}", shown(&f.peer_hostname), pairing(f.pairing)),
        };
        rows.push([
            utc(rec.time_unix_ms),
            shown(&f.hostname),
            direction(rec.direction).into(),
            verdict(rec.verdict).into(),
            protocol(rec.protocol),
            flow_end(&rec.src, rec.src_port),
            flow_end(&rec.dst, rec.dst_port),
            if rec.rule_id.is_empty() { "-".into() } else { shown(&rec.rule_id) },
            // Counted once the flow's end is reported.
            if rec.ended { rec.packets.to_string() } else { "-".into() },
            if rec.ended { rec.bytes.to_string() } else { "-".into() },
            other,
        ]);
    }
    let mut out = table(&rows);
    for x in &r.refused {
        let _ =
            writeln!(out, "refused from {}: {} over its rate, {} invalid", shown(&x.hostname), x.over_rate, x.invalid);
    }
    out
}

/// A side of a verdict change: `allow (rule)` or `deny`.
fn decided(v: i32, rule: &str) -> String {
    match rule {
        "" => verdict(v).to_string(),
        r => format!("{} ({})", verdict(v), shown(r)),
    }
}

fn plural(n: usize, one: &str) -> String {
    format!("{n} {one}{}", if n == 1 { "" } else { "s" })
}

pub fn dry_run_json(r: &DryRunPolicyReply) -> Value {
    json!({
        "rules": r.rules,
        "tests_passed": r.tests_passed,
        "unmatched_selectors": r.unmatched_selectors,
        "since_unix_ms": r.since_unix_ms,
        "flows_evaluated": r.flows_evaluated,
        "records": r.records,
        "truncated": r.truncated,
        "changes": r.changes.iter().map(|c| json!({
            "old_verdict": verdict(c.old_verdict),
            "old_rule": c.old_rule,
            "new_verdict": verdict(c.new_verdict),
            "new_rule": c.new_rule,
            "flows_total": c.flows_total,
            "connections": c.connections,
            "records": c.records,
            "flows": c.flows.iter().map(|f| json!({
                "src": flow_ip(&f.src),
                "dst": flow_ip(&f.dst),
                "protocol": f.protocol,
                "dst_port": f.dst_port,
                "connections": f.connections,
                "records": f.records,
                "last_seen_unix_ms": f.last_seen_unix_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// What a dry run found: the candidate's counts, the window, then one table per change of
/// verdict (old -> new, with the deciding rules).
pub fn dry_run_text(r: &DryRunPolicyReply, file_name: &str) -> String {
    let mut out = format!(
        "dry run of {}: {}, {} passed; nothing applied\n",
        shown(file_name),
        plural(r.rules as usize, "rule"),
        plural(r.tests_passed as usize, "test")
    );
    if !r.unmatched_selectors.is_empty() {
        let _ = writeln!(out, "note: no node matches {} yet", r.unmatched_selectors.join(", "));
    }
    let _ = writeln!(
        out,
        "replayed {} ({}) recorded since {} UTC",
        plural(r.flows_evaluated as usize, "flow"),
        plural(r.records as usize, "record"),
        utc(r.since_unix_ms)
    );
    if r.truncated {
        let _ = writeln!(out, "note: only the {} most recently seen flows were replayed", r.flows_evaluated);
    }
    let changed: usize = r.changes.iter().map(|c| c.flows_total as usize).sum();
    if changed == 0 {
        out += "no flow would change verdict\n";
        return out;
    }
    let _ = writeln!(out, "{} would change verdict:", plural(changed, "flow"));
    for c in &r.changes {
        let _ = writeln!(
            out,
            "\n{} -> {}: {}, {}",
            decided(c.old_verdict, &c.old_rule),
            decided(c.new_verdict, &c.new_rule),
            plural(c.flows_total as usize, "flow"),
            plural(c.connections as usize, "connection")
        );
        if c.flows.len() < c.flows_total as usize {
            let _ = writeln!(out, "(the {} with the most records)", c.flows.len());
        }
        let mut rows = vec![[
            "SOURCE".to_string(),
            "DESTINATION".into(),
            "PROTO".into(),
            "CONNECTIONS".into(),
            "RECORDS".into(),
            "LAST SEEN (UTC)".into(),
        ]];
        for f in &c.flows {
            rows.push([
                flow_ip(&f.src),
                flow_end(&f.dst, f.dst_port),
                protocol(f.protocol),
                f.connections.to_string(),
                f.records.to_string(),
                utc(f.last_seen_unix_ms),
            ]);
        }
        out += &table(&rows);
    }
    out
}

pub fn usage_json(r: &RuleUsageReply) -> Value {
    json!({
        "since_unix_ms": r.since_unix_ms,
        "rules": r.rules.iter().map(|u| json!({
            "rule_id": u.rule_id,
            "packets": u.packets,
            "bytes": u.bytes,
        })).collect::<Vec<_>>(),
        "unused": r.rules.iter().filter(|u| u.packets == 0).map(|u| u.rule_id.as_str()).collect::<Vec<_>>(),
    })
}

/// The policy's rules with their hits, then the ones that matched nothing.
pub fn usage_text(r: &RuleUsageReply) -> String {
    if r.rules.is_empty() {
        return "no policy applied (every node denies everything)\n".into();
    }
    let mut out = format!(
        "rule usage since {} UTC, summed over the nodes (a packet between two nodes counts at both ends)\n",
        utc(r.since_unix_ms)
    );
    let mut rows = vec![["RULE".to_string(), "PACKETS".into(), "BYTES".into()]];
    for u in &r.rules {
        rows.push([shown(&u.rule_id), u.packets.to_string(), u.bytes.to_string()]);
    }
    out += &table(&rows);
    let unused: Vec<String> = r.rules.iter().filter(|u| u.packets == 0).map(|u| shown(&u.rule_id)).collect();
    match unused.len() {
        0 => out += "every rule matched traffic\n",
        n => {
            let _ = writeln!(out, "{} matched nothing: {}", plural(n, "rule"), unused.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nodes() {
        let n = Node {
            node_id: "n1".into(),
            hostname: "db1".into(),
            public_key: vec![0; 32],
            addresses: vec![IpPrefix::from("10.77.0.1/32".parse::<IpNet>().unwrap())],
            connected: true,
            last_seen_unix: 90,
            name_bound: true,
            ..Default::default()
        };
        let table = nodes_table(std::slice::from_ref(&n), 100);
        assert!(table.lines().nth(1).unwrap().starts_with("n1  db1       10.77.0.1/32"), "{table}");
        assert!(table.contains("10s ago"));
        let j = node_json(&n);
        assert_eq!(j["addresses"][0], "10.77.0.1/32");
        assert_eq!(j["public_key"], "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(node_text(&n, 100).contains("hostname:        db1\n"));
        let label = Node { name_bound: false, ..n };
        assert!(node_text(&label, 100).contains("hostname:        db1 (label)"));
    }

    #[test]
    fn renders_keys_without_secrets() {
        let k = EnrollmentKey {
            key_id: "k1".into(),
            hostname: "db1".into(),
            max_uses: 3,
            uses: 1,
            expires_unix: 7300,
            created_unix: 90,
            ..Default::default()
        };
        let t = keys_table(std::slice::from_ref(&k), 100);
        let line = t.lines().nth(1).unwrap();
        assert!(line.starts_with("k1  db1") && line.contains("  2  ") && line.contains("in 2h"), "{t}");
        let revoked = EnrollmentKey { revoked: true, expires_unix: 0, ..k };
        let t = keys_table(std::slice::from_ref(&revoked), 100);
        assert!(t.contains("revoked") && t.contains("never"), "{t}");
        assert_eq!(key_json(&revoked)["max_uses"], 3);
        let reenroll = EnrollmentKey { reenroll_node: "n7".into(), hostname: String::new(), ..revoked };
        assert!(keys_table(std::slice::from_ref(&reenroll), 100).contains("k1  re-enrolls n7"));
    }

    #[test]
    fn text_from_agents_is_escaped() {
        let n = Node {
            node_id: "n1".into(),
            hostname: "db1\x1b[31m\u{202e}".into(),
            tags: vec!["web\nFAKE".into()],
            last_error: "boom\r\nn2  db2  10.77.0.2/32\x1b]0;owned\x07".into(),
            ..Default::default()
        };
        for text in [nodes_table(std::slice::from_ref(&n), 100), node_text(&n, 100)] {
            assert!(!text.chars().any(|c| c == '\x1b' || c == '\r' || c == '\x07' || c == '\u{202e}'), "{text:?}");
            assert!(text.contains(r"db1\u{1b}[31m\u{202e}") && text.contains(r"web\nFAKE"), "{text}");
        }
        let table = nodes_table(std::slice::from_ref(&n), 100);
        assert_eq!(table.lines().count(), 2, "one header and one row: {table}");
        assert!(node_text(&n, 100).contains(r"last error:      boom\r\nn2  db2  10.77.0.2/32\u{1b}]0;owned\u{7}"));
    }
}
