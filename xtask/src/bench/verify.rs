//! Checks, after every timed step, that the namespace holds exactly what was asked for:
//! the device's key, port and peers with their allowed-ips, the link up with the node's
//! addresses, and exactly one owned route per allowed-ip, on the tunnel, in the main table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};

use super::data::{Expected, NodeKey, Prefix, LISTEN_PORT, NODE_ADDRESSES, PROTO};
use super::sys::{output, Netns};

fn parse_prefix(s: &str) -> Result<Prefix> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().with_context(|| format!("{s:?} is not an address"))?;
    let len = match len {
        Some(l) => l.parse().with_context(|| format!("{s:?}: bad prefix length"))?,
        None if addr.is_ipv4() => 32,
        None => 128,
    };
    Ok((addr, len))
}

fn diff<T: Ord + Debug>(what: &str, want: &BTreeSet<T>, have: &BTreeSet<T>) -> Option<String> {
    let missing: Vec<_> = want.difference(have).collect();
    let extra: Vec<_> = have.difference(want).collect();
    if missing.is_empty() && extra.is_empty() {
        return None;
    }
    Some(format!(
        "{what}: want {}, have {}; {} missing (e.g. {:?}), {} unexpected (e.g. {:?})",
        want.len(),
        have.len(),
        missing.len(),
        &missing[..missing.len().min(3)],
        extra.len(),
        &extra[..extra.len().min(3)],
    ))
}

/// Everything wrong with the namespace's state, or Ok with the counts checked.
pub fn check(ns: &Netns, ifname: &str, key: &NodeKey, want: &Expected) -> Result<(usize, usize)> {
    let mut problems = Vec::new();

    // WireGuard device: `wg show <if> dump` prints the interface, then one line per peer:
    // public-key preshared-key endpoint allowed-ips latest-handshake rx tx keepalive.
    let dump = output(ns.command("wg").args(["show", ifname, "dump"]))?;
    let mut lines = dump.lines();
    let head: Vec<&str> = lines.next().context("`wg show dump` printed nothing")?.split('\t').collect();
    if head.get(1) != Some(&key.public.as_str()) {
        problems.push(format!("device public key is {:?}, want {}", head.get(1), key.public));
    }
    if head.get(2) != Some(&LISTEN_PORT.to_string().as_str()) {
        problems.push(format!("device listen port is {:?}, want {LISTEN_PORT}", head.get(2)));
    }
    let mut peers: BTreeMap<String, BTreeSet<Prefix>> = BTreeMap::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let (Some(k), Some(ips)) = (f.first(), f.get(3)) else { bail!("odd `wg show dump` line {line:?}") };
        let ips = match *ips {
            "(none)" => BTreeSet::new(),
            list => list.split(',').map(parse_prefix).collect::<Result<_>>()?,
        };
        peers.insert(k.to_string(), ips);
    }
    let want_keys: BTreeSet<&String> = want.peers.keys().collect();
    let have_keys: BTreeSet<&String> = peers.keys().collect();
    if let Some(d) = diff("peers", &want_keys, &have_keys) {
        problems.push(d);
    } else {
        let wrong: Vec<_> = want.peers.iter().filter(|(k, ips)| peers.get(*k) != Some(ips)).map(|(k, _)| k).collect();
        if !wrong.is_empty() {
            problems.push(format!("{} peers have wrong allowed-ips (e.g. {})", wrong.len(), wrong[0]));
        }
    }

    // Link and addresses.
    let link: serde_json::Value =
        serde_json::from_str(&output(ns.command("ip").args(["-json", "address", "show", "dev", ifname]))?)
            .context("parse `ip -json address show`")?;
    let link = &link[0];
    let up = link["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP"));
    if !up {
        problems.push(format!("{ifname} is not up"));
    }
    let have_addrs: BTreeSet<Prefix> = link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] != "link")
        .filter_map(|a| Some((a["local"].as_str()?.parse().ok()?, a["prefixlen"].as_u64()? as u8)))
        .collect();
    let want_addrs: BTreeSet<Prefix> = NODE_ADDRESSES.iter().map(|a| parse_prefix(a)).collect::<Result<_>>()?;
    if let Some(d) = diff("addresses", &want_addrs, &have_addrs) {
        problems.push(d);
    }

    // Routes with our protocol number, in every table, both families.
    let mut routes = BTreeSet::new();
    let mut misplaced = Vec::new();
    for family in ["-4", "-6"] {
        let text = output(ns.command("ip").args([
            family,
            "-json",
            "route",
            "show",
            "table",
            "all",
            "proto",
            &PROTO.to_string(),
        ]))?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&text).context("parse `ip -json route show`")?;
        for r in list {
            let dst = r["dst"].as_str().context("route without dst")?;
            let dst = if dst == "default" {
                if family == "-4" {
                    "0.0.0.0/0"
                } else {
                    "::/0"
                }
            } else {
                dst
            };
            let prefix = parse_prefix(dst)?;
            // ip omits "table" for the main table.
            if r["dev"] != ifname || r.get("table").is_some_and(|t| t != "main") {
                misplaced.push(format!("{dst} dev {} table {}", r["dev"], r.get("table").unwrap_or(&"main".into())));
            }
            if !routes.insert(prefix) {
                misplaced.push(format!("{dst} twice"));
            }
        }
    }
    if let Some(d) = diff(&format!("proto {PROTO} routes"), &want.routes, &routes) {
        problems.push(d);
    }
    if !misplaced.is_empty() {
        problems.push(format!("{} routes in the wrong place (e.g. {})", misplaced.len(), misplaced[0]));
    }

    if !problems.is_empty() {
        bail!("wrong state in namespace {}:\n  {}", ns.name, problems.join("\n  "));
    }
    Ok((peers.len(), routes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_with_and_without_length() {
        assert_eq!(parse_prefix("10.1.0.1").unwrap(), ("10.1.0.1".parse().unwrap(), 32));
        assert_eq!(parse_prefix("fd00:0:0:1::1/128").unwrap(), ("fd00:0:0:1::1".parse().unwrap(), 128));
        assert_eq!(parse_prefix("fd00::1/64").unwrap(), ("fd00::1".parse().unwrap(), 64));
    }
}
