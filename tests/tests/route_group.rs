//! HA subnet routers end to end: h2 and h3 advertise the same subnet (a route group), h2
//! with the higher priority, both on one LAN (a bridge in the LAN host's namespace; each
//! gateway masquerades into it, so replies go back through whichever forwarded), each
//! checking a TCP service on the LAN host. h1, a remote site, pings the LAN host. When h2's LAN link goes down, its agent is killed, or its underlay goes away,
//! h1's traffic resumes through h3 within the failover budget; h2 takes the subnet back
//! only after the control plane's hold-down.

use std::time::{Duration, Instant};

use wirefence_tests::control::{ControlPlane, CP_V4, CP_V6};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(30);
const SUBNET: &str = "10.20.2.0/24";
const LAN_HOST: &str = "10.20.2.100";
const CHECK_PORT: u16 = 7;
/// The issue's goal: traffic resumes through the standby within this.
const FAILOVER: Duration = Duration::from_secs(3);

const ALLOW: &str = r#"
[[rules]]
id = "site"
from = ["node:h1"]
to = ["10.20.2.0/24", "node:h2", "node:h3"]
proto = "icmp"
"#;

fn control_config(h: &Host, cp: &ControlPlane, key: &std::path::Path, extra: &str) {
    h.write_control_config(cp, key);
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    h.write_config(&format!("{text}{extra}\n"));
}

/// The LAN: a bridge in the LAN host's namespace, the host's address on it, a TCP service.
fn lan() -> Netns {
    let ns = Netns::new("lan");
    ns.ip(&["link", "add", "brlan", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{LAN_HOST}/24"), "dev", "brlan"]);
    ns.ip(&["link", "set", "brlan", "up"]);
    echo_server(&ns, format!("{LAN_HOST}:{CHECK_PORT}").parse().unwrap());
    ns
}

/// `h` as a gateway of the subnet: lan0 on the LAN (10.20.2.<index>), forwarding and
/// masquerading into it, a check of the LAN host's service.
fn gateway(h: &Host, lan: &Netns, cp: &ControlPlane, priority: u32) {
    let port = format!("lp{}", h.index);
    h.ns.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", &port, "netns", &lan.name]);
    lan.ip(&["link", "set", &port, "master", "brlan", "up"]);
    h.ns.ip(&["addr", "add", &format!("10.20.2.{}/24", h.index), "dev", "lan0"]);
    h.ns.ip(&["link", "set", "lan0", "up"]);
    run_ok(h.ns.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    let rules = "table ip wft_nat {\n chain post {\n  type nat hook postrouting priority 100;\n  \
                 oifname \"lan0\" masquerade\n }\n}\n";
    let path = std::env::temp_dir().join(format!("wft-nat-{}.nft", unique()));
    std::fs::write(&path, rules).unwrap();
    run_ok(h.ns.cmd("nft").arg("-f").arg(&path));
    std::fs::remove_file(&path).ok();
    let advertise = format!(
        "\n[[control.advertise]]\nprefix = \"{SUBNET}\"\npriority = {priority}\n\
         check = \"tcp:{LAN_HOST}:{CHECK_PORT}\"\ninterval_ms = 300\nfail_after = 2\n"
    );
    control_config(h, cp, &cp.routed_key_file(&format!("h{}", h.index), &[SUBNET]), &advertise);
}

/// The gateway h1's WireGuard routes the subnet to (by its public key's position).
fn routed_by(h1: &Host) -> String {
    let out = run(h1.ns.cmd("wg").args(["show", &h1.ifname, "allowed-ips"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(SUBNET))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

/// Pings until an answer; returns how long that took (panics after `T`).
fn until_answered(h1: &Host) -> Duration {
    let start = Instant::now();
    while !h1.ns.ping(LAN_HOST) {
        assert!(start.elapsed() < T, "{LAN_HOST} unreachable from h1 for {T:?}");
    }
    start.elapsed()
}

#[test]
fn traffic_fails_over_to_the_standby_and_back_after_the_hold_down() {
    let lab = Lab::new(3);
    let cp = ControlPlane::start(&lab);
    let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    assert!(cp.apply_policy(ALLOW).status.success());
    let lan = lan();
    gateway(h2, &lan, &cp, 200);
    gateway(h3, &lan, &cp, 100);
    h1.ns.ip(&["route", "add", "default", "via", CP_V4]);
    h1.ns.ip(&["-6", "route", "add", "default", "via", CP_V6]);
    control_config(h1, &cp, &cp.bound_key_file("h1", &[]), "accept_routes = [\"10.20.0.0/16\"]");
    let mut a2 = h2.spawn_agent();
    let _a3 = h3.spawn_agent();
    let _a1 = h1.spawn_agent();
    let (k2, k3) = (h2.public_key.clone(), h3.public_key.clone());
    // Both start healthy; h2 wins on priority (after the hold-down at the latest).
    wait_until("h1 routes the subnet to h2", T, || routed_by(h1) == k2);
    until_answered(h1);

    // 1. h2's LAN link goes down: its check fails, h3 takes over.
    let down = Instant::now();
    h2.ns.ip(&["link", "set", "lan0", "down"]);
    wait_until("h1 routes the subnet to h3", T, || routed_by(h1) == k3);
    until_answered(h1);
    let took = down.elapsed();
    assert!(took <= FAILOVER, "LAN link down: traffic resumed after {took:?}");
    eprintln!("failover on LAN link down: {took:?}");

    // h2 recovers: no move back before the hold-down (10 s), then one move.
    h2.ns.ip(&["link", "set", "lan0", "up"]);
    let up = Instant::now();
    while up.elapsed() < Duration::from_secs(8) {
        assert_eq!(routed_by(h1), k3, "h2 took the subnet back {:?} after it recovered", up.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until("h2 takes the subnet back after the hold-down", T, || routed_by(h1) == k2);
    until_answered(h1);

    // 2. h2's agent dies: its report stream ends with its connection.
    let killed = Instant::now();
    a2.kill9();
    until_answered(h1);
    wait_until("h3 has the subnet", T, || routed_by(h1) == k3);
    let took = killed.elapsed();
    assert!(took <= FAILOVER, "agent killed: traffic resumed after {took:?}");
    eprintln!("failover on agent kill: {took:?}");

    // h2 back; then its whole underlay goes away (no FIN reaches the control plane).
    a2 = h2.spawn_agent();
    wait_until("h2 takes the subnet back after the hold-down", T, || routed_by(h1) == k2);
    until_answered(h1);
    let gone = Instant::now();
    h2.ns.ip(&["link", "set", "eth0", "down"]);
    until_answered(h1);
    let took = gone.elapsed();
    assert_eq!(routed_by(h1), k3);
    assert!(took <= FAILOVER, "underlay gone: traffic resumed after {took:?}");
    eprintln!("failover on underlay loss: {took:?}");
    drop(a2);
}
