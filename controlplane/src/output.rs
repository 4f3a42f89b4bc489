//! Text and JSON renderings of admin replies for the CLI.

use std::fmt::Write;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ipnet::IpNet;
use serde_json::{json, Value};
use wirefence_proto::v1::{GetPolicyReply, IpPrefix, Node, SocketAddress};
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

fn key(k: &[u8]) -> String {
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
        "public_key": key(&n.public_key),
        "addresses": prefixes(&n.addresses),
        "endpoints": sockets(&n.endpoints),
        "routes": prefixes(&n.routes),
        "tags": n.tags,
        "applied_version": n.applied_version,
        "last_error": n.last_error,
        "last_seen_unix": n.last_seen_unix,
        "connected": n.connected,
        "peer_stats": n.peer_stats.iter().map(|s| json!({
            "public_key": key(&s.public_key),
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
            shown(&n.hostname),
            prefixes(&n.addresses).join(","),
            joined(&n.tags, ","),
            if n.connected { "yes" } else { "no" }.into(),
            if n.last_error.is_empty() {
                n.applied_version.to_string()
            } else {
                format!("{} (error)", n.applied_version)
            },
            ago(n.last_seen_unix, now),
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

pub fn node_text(n: &Node, now: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node:            {}", Escaped(&n.node_id));
    let _ = writeln!(out, "hostname:        {}", Escaped(&n.hostname));
    let _ = writeln!(out, "public key:      {}", key(&n.public_key));
    let _ = writeln!(out, "addresses:       {}", prefixes(&n.addresses).join(", "));
    let _ = writeln!(out, "endpoints:       {}", sockets(&n.endpoints).join(", "));
    let _ = writeln!(out, "routes:          {}", prefixes(&n.routes).join(", "));
    let _ = writeln!(out, "tags:            {}", joined(&n.tags, ", "));
    let _ = writeln!(out, "connected:       {}", if n.connected { "yes" } else { "no" });
    let _ = writeln!(out, "applied version: {}", n.applied_version);
    if !n.last_error.is_empty() {
        let _ = writeln!(out, "last error:      {}", Escaped(&n.last_error));
    }
    let _ = writeln!(out, "last seen:       {}", ago(n.last_seen_unix, now));
    for s in &n.peer_stats {
        let ep = s.endpoint.as_ref().map(|e| sockets(std::slice::from_ref(e)).remove(0)).unwrap_or_default();
        let _ = writeln!(
            out,
            "peer {}  handshake {}  rx {}  tx {}  {ep}",
            key(&s.public_key),
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
            ..Default::default()
        };
        let table = nodes_table(std::slice::from_ref(&n), 100);
        assert!(table.lines().nth(1).unwrap().starts_with("n1  db1       10.77.0.1/32"), "{table}");
        assert!(table.contains("10s ago"));
        let j = node_json(&n);
        assert_eq!(j["addresses"][0], "10.77.0.1/32");
        assert_eq!(j["public_key"], "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(node_text(&n, 100).contains("hostname:        db1"));
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
