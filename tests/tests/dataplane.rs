//! Data plane over real namespaces: wireguard-go on each host, agents as real processes.

use std::time::Duration;

use wirefence_tests::*;

const T: Duration = Duration::from_secs(15);

fn ping_ok(from: &Host, addr: &str) {
    wait_until(&format!("ping {addr} from {}", from.ns.name), T, || from.ns.ping(addr));
}

fn expected_routes(ifname: &str, dsts: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = dsts.iter().map(|d| format!("{d} main {ifname}")).collect();
    v.sort();
    v
}

#[test]
fn two_hosts_ping_over_the_tunnel_v4_and_v6() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    b.config().peer(a).write();
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    ping_ok(a, &b.overlay_v4);
    ping_ok(a, &b.overlay_v6);
    ping_ok(b, &a.overlay_v4);
    let st = a.status_json();
    assert_eq!(st["peers"][0]["public_key"], b.public_key.as_str());
    assert!(st["peers"][0]["handshake_age_secs"].is_u64(), "{st}");
    assert!(st["peers"][0]["rx_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(
        a.ns.owned_routes(PROTO),
        expected_routes(&a.ifname, &[&format!("{}/32", b.overlay_v4), &format!("{}/128", b.overlay_v6)])
    );
}

#[test]
fn second_run_changes_nothing() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    let first = a.run_once_ok();
    assert!(!first.contains("operations=0"), "{first}");
    let second = a.run_once_ok();
    assert!(second.contains("operations=0"), "second run was not a no-op: {second}");
}

#[test]
fn peers_added_changed_removed_while_traffic_flows() {
    let lab = Lab::new(3);
    let (a, b, c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    a.config().peer(b).write();
    b.config().peer(a).write();
    c.config().peer(a).write();
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    let _pc = c.spawn_agent();
    ping_ok(a, &b.overlay_v4);
    let handshake = latest_handshake(a, b).expect("a has a handshake with b");

    // Continuous traffic a -> b during all changes.
    let flood =
        a.ns.cmd("ping")
            .args(["-n", "-q", "-i", "0.05", "-w", "4", &b.overlay_v4])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();

    // Add c.
    a.config().peer(b).peer(c).write();
    ping_ok(a, &c.overlay_v4);
    ping_ok(a, &c.overlay_v6);
    // Change c: one more allowed-ip (a subnet behind c).
    a.config()
        .peer(b)
        .peer_with(c, &[&format!("{}/32", c.overlay_v4), &format!("{}/128", c.overlay_v6), "10.99.3.0/24"])
        .write();
    wait_until("route to 10.99.3.0/24 via the tunnel", T, || {
        a.ns.owned_routes(PROTO).contains(&format!("10.99.3.0/24 main {}", a.ifname))
    });
    // Remove c.
    a.config().peer(b).write();
    wait_until("c's routes gone", T, || {
        a.ns.owned_routes(PROTO)
            == expected_routes(&a.ifname, &[&format!("{}/32", b.overlay_v4), &format!("{}/128", b.overlay_v6)])
    });
    assert!(!a.ns.ping(&c.overlay_v4), "c still reachable after removal");

    let out = flood.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "traffic to the unchanged peer was disturbed: {text}");
    // The unchanged peer was never re-added: its session (handshake) is the same one.
    assert_eq!(latest_handshake(a, b), Some(handshake), "peer b was re-added (handshake reset)");
}

#[test]
fn kill9_then_restart_with_changed_config_leaves_nothing_stale() {
    let lab = Lab::new(3);
    let (a, b, c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    a.config().peer(b).peer_with(c, &["10.77.0.3/32", "10.66.0.0/16"]).extra("[routing]\ntable = 4242\n").write();
    b.config().peer(a).write();
    let agent = a.spawn_agent();
    let _pb = b.spawn_agent();
    ping_ok(a, &b.overlay_v4);
    // status names the running agent; down refuses while it runs and says what to do.
    let st = a.status_json();
    assert_eq!(st["agent_pid"], agent.pid());
    assert!(st["passes"]["converged_unix"].as_u64().is_some_and(|t| t > 0), "{st}");
    let down = run(a.agent().args(["down", "--config"]).arg(a.config_path()));
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(!down.status.success(), "down ran beside the agent");
    assert!(err.contains(&format!("pid {} holds", agent.pid())) && err.contains("stop it first"), "{err}");
    let pid = agent.pid();
    agent.kill9();
    let st = a.status_json();
    assert!(st["agent_pid"].is_null(), "agent {pid} shown as running after it was killed: {st}");

    // The tunnel survives the agent.
    assert!(a.ns.ping(&b.overlay_v4), "tunnel died with the agent");

    // New config: other interface name, c removed, one address changed, main table.
    let new_if = format!("wn{}", unique());
    a.config().ifname(&new_if).addresses(&["10.77.0.1/24", "fd77::100/64"]).peer(b).write();
    let _agent = a.spawn_agent();
    wait_until("converged on the new interface", T, || a.ns.link_exists(&new_if) && !a.ns.link_exists(&a.ifname));
    wait_until("exactly the desired routes", T, || {
        a.ns.owned_routes(PROTO)
            == expected_routes(&new_if, &[&format!("{}/32", b.overlay_v4), &format!("{}/128", b.overlay_v6)])
    });
    assert_eq!(a.ns.addresses(&new_if), vec!["10.77.0.1/24", "fd77::100/64"]);
    let st = a.status_json();
    let peers: Vec<&str> = st["peers"].as_array().unwrap().iter().map(|p| p["public_key"].as_str().unwrap()).collect();
    assert_eq!(peers, vec![b.public_key.as_str()]);
    assert!(a.ns.owned_rules(PROTO).is_empty());
    wait_until("old daemon socket gone", T, || !a.socket_path().exists());
    // b follows the renamed side via a's endpoint (same underlay address and port).
    ping_ok(a, &b.overlay_v4);
}

#[test]
fn foreign_routes_survive_reconcile_and_down() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    a.run_once_ok();
    // Foreign routes: one in the same table on the tunnel, one on the underlay, one in our
    // own policy table number range but another protocol.
    a.ns.ip(&["route", "add", "10.55.0.0/24", "dev", &a.ifname, "proto", "static"]);
    a.ns.ip(&["route", "add", "10.56.0.0/24", "dev", "eth0", "proto", "static"]);
    a.ns.ip(&["-6", "route", "add", "fd56::/64", "dev", "eth0"]);
    a.run_once_ok();
    let all = a.ns.ip(&["route", "show", "table", "all"]);
    assert!(all.contains("10.55.0.0/24"), "foreign route on the tunnel removed by a pass: {all}");
    assert!(all.contains("10.56.0.0/24"));
    a.down();
    let v4 = a.ns.ip(&["route", "show"]);
    assert!(v4.contains("10.56.0.0/24 dev eth0"), "foreign route removed by down: {v4}");
    assert!(a.ns.ip(&["-6", "route", "show"]).contains("fd56::/64 dev eth0"));
}

#[test]
fn down_leaves_nothing_with_policy_routing() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    // A default route through the tunnel turns on wg-quick style policy routing.
    a.config().peer_with(b, &["0.0.0.0/0", "fd77::2/128"]).write();
    b.config().peer(a).write();
    a.run_once_ok();
    b.run_once_ok();
    let rules = a.ns.owned_rules(PROTO);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(rules.iter().any(|r| r.contains("suppress_prefixlength 0")), "{rules:?}");
    assert!(rules.iter().any(|r| r.contains("not from all fwmark 0xca6c lookup 51820")), "{rules:?}");
    assert!(a.ns.owned_routes(PROTO).contains(&format!("default 51820 {}", a.ifname)));
    // The underlay keeps working (encrypted packets are marked and skip the tunnel table),
    // and overlay traffic crosses the tunnel through the default route.
    ping_ok(a, &b.overlay_v4);
    ping_ok(a, &b.underlay_v4);
    // status shows the mark, the table and the rules.
    let text = run_ok(a.agent().args(["status", "--config"]).arg(a.config_path()));
    assert!(text.contains("  fwmark: 0xca6c ("), "{text}");
    assert!(text.contains("0.0.0.0/0 dev") && text.contains("table 51820"), "{text}");
    assert!(text.contains("not fwmark 0xca6c lookup 51820"), "{text}");
    assert_eq!(a.status_json()["fwmark"], 0xca6c);

    a.down();
    assert!(!a.ns.link_exists(&a.ifname));
    assert!(a.ns.owned_routes(PROTO).is_empty());
    assert!(a.ns.owned_rules(PROTO).is_empty());
    wait_until("userspace daemon gone", T, || !a.socket_path().exists());
    let procs = run(std::process::Command::new("pgrep").args(["-f", &format!("wireguard-go -f {}$", a.ifname)]));
    assert!(!procs.status.success(), "wireguard-go still running: {}", String::from_utf8_lossy(&procs.stdout));
    // down twice is fine.
    a.down();
}

#[test]
fn route_deleted_by_hand_comes_back() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    let _pa = a.spawn_agent();
    let route = format!("{}/32 main {}", b.overlay_v4, a.ifname);
    wait_until("route installed", T, || a.ns.owned_routes(PROTO).contains(&route));
    a.ns.ip(&["route", "del", &format!("{}/32", b.overlay_v4), "dev", &a.ifname]);
    // Event-driven: well before the 30 s periodic resync.
    wait_until("route restored", Duration::from_secs(5), || a.ns.owned_routes(PROTO).contains(&route));
}

#[test]
fn userspace_daemon_is_restarted_when_it_dies() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    b.config().peer(a).write();
    let _pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    ping_ok(a, &b.overlay_v4);
    run_ok(std::process::Command::new("pkill").args(["-9", "-f", &format!("wireguard-go -f {}$", a.ifname)]));
    wait_until("tunnel link gone", T, || !a.ns.link_exists(&a.ifname) || !a.ns.ping(&b.overlay_v4));
    ping_ok(a, &b.overlay_v4);
    assert_eq!(a.ns.owned_routes(PROTO).len(), 2);
}

#[test]
fn invalid_config_is_rejected_and_running_state_kept() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    b.config().peer(a).write();
    let pa = a.spawn_agent();
    let _pb = b.spawn_agent();
    ping_ok(a, &b.overlay_v4);
    let routes = a.ns.owned_routes(PROTO);

    let good = a.config().peer(b).render();
    let bad = good.replace(&b.public_key, "not-a-key");
    a.write_config(&bad);
    wait_until("agent logs the rejection", T, || pa.log_text().contains("config rejected"));
    let log = pa.log_text();
    assert!(log.contains("peers[0].public_key"), "{log}");
    assert_eq!(a.ns.owned_routes(PROTO), routes);
    assert!(a.ns.ping(&b.overlay_v4));

    // The same config on the command line: a clear error naming file, line and field.
    let out = a.run_once();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = bad.lines().position(|l| l.contains("not-a-key")).unwrap() + 1;
    assert!(err.contains(&format!("agent.toml:{line}:")) && err.contains("peers[0].public_key"), "{err}");
    let out = run(a.agent().args(["check", "--config"]).arg(a.config_path()));
    assert!(!out.status.success());
    assert_eq!(a.ns.owned_routes(PROTO), routes, "a failed run --once touched the kernel");
}
