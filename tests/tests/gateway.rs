//! `[gateway]`: forwarding turned on and given back, masquerade of LAN traffic entering the
//! tunnel (and its answers), the agent's nftables table beside a foreign ruleset that must
//! stay exactly as it was, the source of the gateway's own traffic, and config errors.
//!
//! Two sites over a real tunnel (wireguard-go): h1 is the gateway, with a LAN host in a
//! namespace of its own behind a veth (192.168.10.0/24); h2 is the far side, with a LAN
//! address of its own (10.20.2.1/24) and a TCP server that answers each connection with the
//! source address it saw.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
const LAN: &str = "192.168.10.0/24";
const LAN_GW: &str = "192.168.10.1";
const LAN_HOST: &str = "192.168.10.2";
const FAR_LAN: &str = "10.20.2.0/24";
const FAR_HOST: &str = "10.20.2.1";
const PORT: u16 = 7000;

/// A server in `ns` at `addr` that writes each client's source address and closes.
fn source_server(ns: &Netns, addr: SocketAddr) {
    let listener = in_netns(ns, move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let seen = conn.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
            let _ = conn.write_all(seen.as_bytes());
        }
    });
}

/// The source address the server at `addr` saw for a connection from `ns` (`None`: no answer).
fn seen_source(ns: &Netns, addr: SocketAddr) -> Option<String> {
    let mut stream = connect(ns, addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    Some(out)
}

fn wait_for_source(ns: &Netns, addr: SocketAddr, want: &str) {
    let mut last = None;
    wait_until(&format!("{addr} sees {want} as the source"), T, || {
        last = seen_source(ns, addr);
        last.as_deref() == Some(want)
    });
}

fn sysctl(ns: &Netns, key: &str) -> String {
    run_ok(ns.cmd("sysctl").args(["-n", key])).trim().to_owned()
}

fn set_sysctl(ns: &Netns, key: &str, value: &str) {
    run_ok(ns.cmd("sysctl").args(["-qw", &format!("{key}={value}")]));
}

const V4: &str = "net.ipv4.ip_forward";
const V6: &str = "net.ipv6.conf.all.forwarding";

/// The gateway's LAN: a host in its own namespace behind a veth, routed by h1.
fn lan_host(h1: &Host) -> Netns {
    lan_behind(h1, LAN_GW, LAN_HOST)
}

/// The far side: h2 with its LAN address, knowing h1 and h1's LAN, and the source server
/// on its overlay and LAN addresses.
fn far_side(h1: &Host, h2: &Host) {
    h2.ns.ip(&["link", "add", "far0", "type", "veth", "peer", "name", "far1"]);
    h2.ns.ip(&["addr", "add", &format!("{FAR_HOST}/24"), "dev", "far0"]);
    h2.ns.ip(&["link", "set", "far0", "up"]);
    h2.ns.ip(&["link", "set", "far1", "up"]);
    h2.config().peer_with(h1, &[&format!("{}/32", h1.overlay_v4), LAN]).write();
    h2.run_once_ok();
    source_server(&h2.ns, SocketAddr::new(h2.overlay_v4.parse().unwrap(), PORT));
    source_server(&h2.ns, SocketAddr::new(FAR_HOST.parse().unwrap(), PORT));
}

fn gateway_config(h1: &Host, h2: &Host, gateway: &str) {
    h1.config()
        .peer_with(h2, &[&format!("{}/32", h2.overlay_v4), &format!("{}/128", h2.overlay_v6), FAR_LAN])
        .extra(&format!("[gateway]\n{gateway}"))
        .write();
}

/// A ruleset as Docker (iptables-nft) and ufw leave it: NAT with a MASQUERADE rule and a
/// DOCKER chain, a forward filter with a counter, ufw's chains jumped to from FORWARD.
const FOREIGN: &str = r#"
table ip nat {
	chain DOCKER {
		iifname "docker0" counter return
	}
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 172.17.0.0/16 oifname != "docker0" counter masquerade
	}
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local counter jump DOCKER
	}
}
table inet filter {
	chain forward {
		type filter hook forward priority filter; policy accept;
		counter
	}
}
table ip filter {
	chain ufw-before-forward {
		ct state related,established counter accept
	}
	chain ufw-user-forward {
	}
	chain FORWARD {
		type filter hook forward priority filter; policy accept;
		counter jump ufw-before-forward
		counter jump ufw-user-forward
	}
}
"#;

fn load_foreign(ns: &Netns) {
    ns.nft_load(FOREIGN);
}

/// `nft list ruleset` without counters (traffic moves them) and without our table.
fn foreign_ruleset(ns: &Netns) -> String {
    let text = run_ok(ns.cmd("nft").args(["-s", "list", "ruleset"]));
    let mut out = String::new();
    let mut ours = false;
    for line in text.lines() {
        if line.starts_with("table inet wirefence ") {
            ours = true;
        }
        if !ours {
            out.push_str(line);
            out.push('\n');
        }
        if ours && line == "}" {
            ours = false;
        }
    }
    out
}

/// Our table, with rule handles (a replaced table gets new ones); `None` if absent.
fn our_table(ns: &Netns) -> Option<String> {
    let out = run(ns.cmd("nft").args(["-a", "list", "table", "inet", "wirefence"]));
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn forwarding_is_turned_on_and_given_back_by_down_only() {
    let lab = Lab::new(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    for (v4_before, v6_before) in [("0", "1"), ("1", "0")] {
        set_sysctl(&h1.ns, V4, v4_before);
        set_sysctl(&h1.ns, V6, v6_before);
        h1.config().peer(h2).extra("[gateway]\nforward = true\n").write();
        h1.run_once_ok();
        assert_eq!((sysctl(&h1.ns, V4).as_str(), sysctl(&h1.ns, V6).as_str()), ("1", "1"));
        let st = h1.status_json();
        let changed = |v: &str| if v == "0" { serde_json::json!(false) } else { serde_json::Value::Null };
        assert_eq!(st["gateway"]["forwarding"]["ipv4"]["previous"], changed(v4_before), "{st}");
        assert_eq!(st["gateway"]["forwarding"]["ipv6"]["previous"], changed(v6_before), "{st}");
        // A restart keeps forwarding on, and finds nothing to do.
        assert!(h1.run_once_ok().contains("operations=0"));
        assert_eq!((sysctl(&h1.ns, V4).as_str(), sysctl(&h1.ns, V6).as_str()), ("1", "1"));
        h1.down();
        assert_eq!(
            (sysctl(&h1.ns, V4).as_str(), sysctl(&h1.ns, V6).as_str()),
            (v4_before, v6_before),
            "down did not give back the values found"
        );
    }
    // forward = ["ipv4"]: only that family; dropping the key gives it back without a `down`.
    set_sysctl(&h1.ns, V4, "0");
    set_sysctl(&h1.ns, V6, "0");
    h1.config().peer(h2).extra("[gateway]\nforward = [\"ipv4\"]\n").write();
    h1.run_once_ok();
    assert_eq!((sysctl(&h1.ns, V4).as_str(), sysctl(&h1.ns, V6).as_str()), ("1", "0"));
    h1.config().peer(h2).write();
    h1.run_once_ok();
    assert_eq!(sysctl(&h1.ns, V4), "0", "forwarding stayed on after the config stopped asking for it");
    h1.down();
}

#[test]
fn lan_traffic_is_masqueraded_into_the_tunnel_and_answered() {
    let lab = Lab::new(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let lan = lan_host(h1);
    far_side(h1, h2);
    // Beside Docker's and ufw's rules, as on a real gateway.
    load_foreign(&h1.ns);
    set_sysctl(&h1.ns, V4, "0");
    let far = SocketAddr::new(h2.overlay_v4.parse().unwrap(), PORT);

    gateway_config(h1, h2, &format!("forward = true\nmasquerade = [\"{LAN}\"]\n"));
    h1.run_once_ok();
    // The far side sees the gateway's overlay address, and its answers come back.
    wait_for_source(&lan, far, &h1.overlay_v4);
    let st = h1.status_json();
    assert_eq!(st["gateway"]["nat_table"], "present", "{st}");
    assert_eq!(st["gateway"]["masquerade"][0]["src"], LAN, "{st}");
    assert!(h1.run_once_ok().contains("operations=0"), "a converged gateway did something again");

    // Without masquerade the far side sees the LAN host itself (it routes the LAN back).
    gateway_config(h1, h2, "forward = true\n");
    h1.run_once_ok();
    assert_eq!(our_table(&h1.ns), None, "the table outlived the masquerade");
    wait_for_source(&lan, far, LAN_HOST);
    h1.down();
    assert_eq!(sysctl(&h1.ns, V4), "0");
    assert!(seen_source(&lan, far).is_none(), "the LAN reached the far side after down");
}

#[test]
fn a_foreign_ruleset_stays_exactly_as_it_was() {
    let lab = Lab::new(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let _lan = lan_host(h1);
    load_foreign(&h1.ns);
    let before = foreign_ruleset(&h1.ns);
    assert!(before.contains("chain DOCKER") && before.contains("ufw-before-forward"), "{before}");
    let unchanged = |when: &str| assert_eq!(foreign_ruleset(&h1.ns), before, "the foreign ruleset changed {when}");

    gateway_config(h1, h2, &format!("forward = true\nmasquerade = [\"{LAN}\"]\n"));
    h1.run_once_ok();
    unchanged("after run --once");
    let table = our_table(&h1.ns).expect("no table inet wirefence");
    assert!(table.contains("oifname") && table.contains(LAN) && table.contains("masquerade"), "{table}");

    // A reload of the running agent applies a [gateway] change, no restart.
    let mut daemon = h1.spawn_agent();
    gateway_config(h1, h2, &format!("forward = true\nmasquerade = [\"{LAN}\", \"192.168.20.0/24\"]\n"));
    wait_until("the reloaded masquerade rules", T, || our_table(&h1.ns).is_some_and(|t| t.contains("192.168.20.0/24")));
    unchanged("after a config change");
    gateway_config(h1, h2, "forward = true\n");
    wait_until("the table removed by a reload", T, || our_table(&h1.ns).is_none());
    unchanged("after masquerade was dropped");
    gateway_config(h1, h2, &format!("forward = true\nmasquerade = [\"{LAN}\"]\n"));
    wait_until("the table back", T, || our_table(&h1.ns).is_some());
    assert!(daemon.running(), "the agent exited: {}", daemon.log_text());
    daemon.kill9();

    h1.down();
    unchanged("after down");
    assert_eq!(our_table(&h1.ns), None, "down left table inet wirefence");
    // The comparison sees a change in a foreign table.
    run_ok(h1.ns.cmd("nft").args(["add", "rule", "ip", "nat", "DOCKER", "counter"]));
    assert_ne!(foreign_ruleset(&h1.ns), before);
}

#[test]
fn own_traffic_takes_the_lan_or_the_overlay_source() {
    let lab = Lab::new(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let _lan = lan_host(h1);
    far_side(h1, h2);
    let far = SocketAddr::new(FAR_HOST.parse().unwrap(), PORT);
    let overlay = SocketAddr::new(h2.overlay_v4.parse().unwrap(), PORT);

    let lan = format!("forward = true\nmasquerade = [\"{LAN}\"]\nown_traffic = \"lan\"\nsite_prefixes = [\"{LAN}\"]\n");
    gateway_config(h1, h2, &lan);
    h1.run_once_ok();
    wait_for_source(&h1.ns, far, LAN_GW);
    // Only routes to remote sites: the far node's own address keeps the overlay source.
    assert_eq!(seen_source(&h1.ns, overlay).as_deref(), Some(h1.overlay_v4.as_str()));
    let st = h1.status_json();
    let routes = st["routes"].as_array().unwrap();
    let far_route = routes.iter().find(|r| r["route"]["dst"] == FAR_LAN).expect("route to the far LAN");
    assert_eq!(far_route["route"]["src"], LAN_GW, "{st}");
    assert!(h1.run_once_ok().contains("operations=0"), "a converged LAN source moved again");

    gateway_config(h1, h2, "forward = true\nown_traffic = \"overlay\"\n");
    h1.run_once_ok();
    wait_for_source(&h1.ns, far, &h1.overlay_v4);
    assert!(h1.run_once_ok().contains("operations=0"));
    h1.down();
}

#[test]
fn bad_gateway_config_is_refused_with_file_line_and_field() {
    let lab = Lab::new(1);
    let h = &lab.hosts[0];
    for (gateway, field, want) in [
        ("forward = true\nmasquerade = [\"192.168.10.1/24\"]\n", "gateway.masquerade", "did you mean 192.168.10.0/24"),
        ("masquerade = [\"192.168.10.0/24\"]\n", "gateway.masquerade", "needs gateway.forward = true"),
        ("forward = [\"ipv4\", \"ipx\"]\n", "gateway.forward", "is not \"ipv4\" or \"ipv6\""),
        ("own_traffic = \"lan\"\n", "gateway.own_traffic", "site_prefixes"),
        ("own_traffic = \"wan\"\n", "gateway.own_traffic", "is not \"overlay\" or \"lan\""),
    ] {
        h.config().extra(&format!("[gateway]\n{gateway}")).write();
        let text = std::fs::read_to_string(h.config_path()).unwrap();
        let line = text.lines().position(|l| l.starts_with("[gateway]")).unwrap() + 1;
        let out = run(h.agent().args(["check", "--config"]).arg(h.config_path()));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {gateway}");
        let at = format!("{}:", h.config_path().display());
        let line_ok = (line..=line + 2).any(|l| err.contains(&format!("{at}{l}:")));
        assert!(line_ok && err.contains(field) && err.contains(want), "{gateway}: {err}");
    }
    // Nothing was touched.
    assert!(!h.ns.link_exists(&h.ifname));
}
