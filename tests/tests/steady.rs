//! Steady state is silent: once converged, the agent writes nothing to the kernel, in every
//! mode. Daemons run with a one-second periodic pass (every pass observes and plans again);
//! for a fixed window `ip monitor` must see no link, address, route or rule change, the
//! agent must log no applied operation, and the WireGuard side (peers' endpoints,
//! allowed-ips, keepalive, latest handshake) must stay as it was. Then the daemon is killed
//! and a `run --once` must find nothing to do. Full-tunnel modes also prove that nothing to
//! an address outside the overlay leaves through the underlay in clear meanwhile.

use std::net::IpAddr;
use std::time::Duration;

use wirefence_tests::control::{ControlPlane, CP_V4, CP_V6};
use wirefence_tests::steady::{applied_ops, capture, wg_state, Capture, Monitor};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
const WINDOW: Duration = Duration::from_secs(4);

/// Addresses on the switch, reached through a's default route via the switch when they do
/// not go through the tunnel ("the internet" of a full-tunnel node).
const OUTSIDE_V4: &str = "198.51.100.10";
const OUTSIDE_V6: &str = "2001:db8:ff::10";

fn ping_ok(from: &Host, addr: &str) {
    wait_until(&format!("ping {addr} from {}", from.ns.name), T, || from.ns.ping(addr));
}

/// Watches the converged nodes for [`WINDOW`] (`during` runs meanwhile) and asserts that
/// their agents changed nothing.
fn assert_silent<R>(nodes: &[(&Host, &AgentProc)], during: impl FnOnce() -> R) -> R {
    // One periodic pass after convergence before watching: what it does must be nothing too.
    std::thread::sleep(Duration::from_millis(1500));
    let offsets: Vec<usize> = nodes.iter().map(|(_, p)| p.log_text().len()).collect();
    let monitors: Vec<Monitor> = nodes.iter().map(|(h, _)| Monitor::start(&h.ns)).collect();
    let wg_before: Vec<Vec<String>> = nodes.iter().map(|(h, _)| wg_state(h)).collect();
    let started = std::time::Instant::now();
    let result = during();
    if let Some(rest) = WINDOW.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    for (((host, agent), monitor), (offset, before)) in
        nodes.iter().zip(monitors).zip(offsets.into_iter().zip(wg_before))
    {
        let log = agent.log_text();
        let changes = monitor.stop();
        assert!(
            changes.is_empty(),
            "{}: the kernel changed after convergence:\n{}\nagent log since:\n{}",
            host.ns.name,
            changes.join("\n"),
            log.get(offset..).unwrap_or_default()
        );
        let ops = applied_ops(&log, offset);
        assert!(
            ops.is_empty(),
            "{}: the agent applied operations after convergence:\n{}",
            host.ns.name,
            ops.join("\n")
        );
        assert_eq!(wg_state(host), before, "{}: the WireGuard peers changed after convergence", host.ns.name);
        assert!(log[..offset].contains("converged"), "{}: the agent never said it converged", host.ns.name);
    }
    result
}

/// Kills the daemon and runs `run --once`: no operation, no kernel change.
fn assert_second_run_does_nothing(host: &Host, daemon: AgentProc) {
    daemon.kill9();
    let monitor = Monitor::start(&host.ns);
    let wg_before = wg_state(host);
    let out = host.run_once_ok();
    let changes = monitor.stop();
    assert!(out.contains("operations=0"), "{}: run --once after the daemon was not a no-op:\n{out}", host.ns.name);
    assert!(changes.is_empty(), "{}: run --once changed the kernel:\n{}\n{out}", host.ns.name, changes.join("\n"));
    assert_eq!(wg_state(host), wg_before, "{}: run --once changed the WireGuard peers", host.ns.name);
    assert!(!out.contains("policy applied"), "{}: run --once applied the unchanged policy again:\n{out}", host.ns.name);
}

#[test]
fn plain_mesh_with_a_roaming_peer_is_silent() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).resync_secs(1).write();
    // b knows a by its IPv6 underlay address; a talks to b over IPv4, so b's device roams
    // a's endpoint to IPv4. Writing the configured one back every pass would fight that.
    let a_v6 = format!("[{}]:51820", a.underlay_v6);
    let a_ips = [format!("{}/32", a.overlay_v4), format!("{}/128", a.overlay_v6)];
    b.config().peer_at(a, &a_v6, &[&a_ips[0], &a_ips[1]]).resync_secs(1).write();
    let (pa, pb) = (a.spawn_agent(), b.spawn_agent());
    ping_ok(a, &b.overlay_v4);
    ping_ok(a, &b.overlay_v6);
    let roamed = format!("endpoint={}:51820", a.underlay_v4);
    wait_until("b sees a at its IPv4 address", T, || wg_state(b).iter().any(|p| p.contains(&roamed)));
    // a keeps talking during the window: each packet re-confirms the roamed endpoint.
    assert_silent(&[(a, &pa), (b, &pb)], || {
        for _ in 0..8 {
            a.ns.ping(&b.overlay_v4);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert!(wg_state(b).iter().any(|p| p.contains(&roamed)), "b's peer a did not stay where it roamed");
    assert_second_run_does_nothing(b, pb);
    assert_second_run_does_nothing(a, pa);
}

#[test]
fn policy_is_silent_and_not_applied_again() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).resync_secs(1).write();
    let policy = format!(
        "[policy]\npin_dir = \"{}\"\n[[policy.rules]]\nid = \"ping\"\nfrom = [\"{}/32\"]\nto = [\"{}/32\"]\nproto = \"icmp\"\n",
        bpffs_root().display(),
        a.overlay_v4,
        b.overlay_v4
    );
    b.config().peer(a).extra(&policy).resync_secs(1).write();
    let (pa, pb) = (a.spawn_agent(), b.spawn_agent());
    ping_ok(a, &b.overlay_v4);
    assert!(!a.ns.ping(&b.overlay_v6), "the policy allows only IPv4 ping");
    let epoch = |h: &Host| h.status_json()["policy"]["epoch"].clone();
    let before = epoch(b);
    assert!(before.is_u64(), "status shows no policy epoch: {before}");
    assert_silent(&[(a, &pa), (b, &pb)], || ());
    assert_second_run_does_nothing(b, pb);
    assert_eq!(epoch(b), before, "the policy epoch moved without a policy change");
    ping_ok(a, &b.overlay_v4);
}

/// Gives the switch the outside addresses and a a default route to it (its "internet"),
/// and checks that the capture sees what a sends there in clear.
fn with_outside(lab: &Lab) {
    let a = &lab.hosts[0];
    lab.switch.ip(&["addr", "add", &format!("{CP_V4}/24"), "dev", "br0"]);
    lab.switch.ip(&["addr", "add", &format!("{CP_V6}/64"), "dev", "br0", "nodad"]);
    lab.switch.ip(&["addr", "add", &format!("{OUTSIDE_V4}/32"), "dev", "lo"]);
    lab.switch.ip(&["addr", "add", &format!("{OUTSIDE_V6}/128"), "dev", "lo"]);
    a.ns.ip(&["route", "add", "default", "via", CP_V4]);
    a.ns.ip(&["-6", "route", "add", "default", "via", CP_V6]);
    ping_ok(a, OUTSIDE_V4);
    ping_ok(a, OUTSIDE_V6);
    // The capture works: without the tunnel, what a sends to the outside is seen in clear.
    let seen = capture_while_sending(a, &[OUTSIDE_V4, OUTSIDE_V6], Duration::from_secs(1));
    for t in [OUTSIDE_V4, OUTSIDE_V6] {
        let n = seen.leaked.iter().filter(|l| l.ends_with(t)).count();
        assert!(n >= 10, "the capture saw {n} packets to {t} in clear: {seen:?}");
    }
}

/// Sends a UDP datagram from `a` to every target every 20 ms while capturing a's underlay
/// link (UDP: nothing that comes back, such as an ICMP error, stops the sender).
fn capture_while_sending(a: &Host, targets: &[&str], window: Duration) -> Capture {
    let watched: Vec<IpAddr> = targets.iter().map(|t| t.parse().unwrap()).collect();
    let to: Vec<std::net::SocketAddr> = watched.iter().map(|ip| (*ip, 9).into()).collect();
    let socks = in_netns(&a.ns, move || {
        to.into_iter()
            .map(|t| {
                let any: std::net::SocketAddr = if t.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
                (std::net::UdpSocket::bind(any).expect("bind udp"), t)
            })
            .collect::<Vec<_>>()
    });
    let sender = std::thread::spawn(move || {
        let end = std::time::Instant::now() + window;
        while std::time::Instant::now() < end {
            for (s, t) in &socks {
                let _ = s.send_to(b"wirefence leak probe", t);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let seen = capture(&a.ns, "eth0", window, watched, 51820);
    sender.join().unwrap();
    seen
}

/// a sends everything of `families` through b (wg-quick's full tunnel): silent, and
/// nothing to the outside leaves a's underlay in clear.
fn full_tunnel(allowed: &[&str], outside: &[&str], extra: &str) {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    with_outside(&lab);
    a.config().peer_with(b, allowed).extra(extra).resync_secs(1).write();
    b.config().peer(a).resync_secs(1).write();
    let (pa, pb) = (a.spawn_agent(), b.spawn_agent());
    ping_ok(a, &b.overlay_v4);
    ping_ok(a, &b.overlay_v6);
    assert_eq!(a.ns.owned_rules(PROTO).len(), 2 * outside.len(), "{:?}", a.ns.owned_rules(PROTO));
    let seen = assert_silent(&[(a, &pa), (b, &pb)], || capture_while_sending(a, outside, WINDOW));
    assert!(seen.leaked.is_empty(), "packets to the outside left the underlay in clear: {:?}", seen.leaked);
    // Every probe (50 a second per target) went into the tunnel, sealed.
    assert!(seen.wireguard > 100 * outside.len(), "the probes did not go through the tunnel: {seen:?}");
    // The underlay itself stays reachable outside the tunnel.
    ping_ok(a, &b.underlay_v4);
    assert_second_run_does_nothing(a, pa);
}

#[test]
fn full_tunnel_ipv4_is_silent_and_does_not_leak() {
    full_tunnel(&["0.0.0.0/0", "fd77::2/128"], &[OUTSIDE_V4], "");
}

#[test]
fn full_tunnel_ipv6_is_silent_and_does_not_leak() {
    full_tunnel(&["10.77.0.2/32", "::/0"], &[OUTSIDE_V6], "");
}

#[test]
fn full_tunnel_both_families_is_silent_and_does_not_leak() {
    full_tunnel(&["0.0.0.0/0", "::/0"], &[OUTSIDE_V4, OUTSIDE_V6], "");
}

#[test]
fn policy_routing_with_a_custom_table_and_priority_is_silent() {
    let extra = "[routing]\npolicy_table = 4242\nrule_priority = 1000\n";
    full_tunnel(&["0.0.0.0/0", "::/0"], &[OUTSIDE_V4, OUTSIDE_V6], extra);
}

/// A gateway with every `[gateway]` key: forwarding, masquerade (its nftables table must not
/// be replaced: the rules keep their handles) and a LAN source on the route to the far site.
#[test]
fn gateway_is_silent() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.ns.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"]);
    a.ns.ip(&["addr", "add", "192.168.10.1/24", "dev", "lan0"]);
    a.ns.ip(&["link", "set", "lan0", "up"]);
    let gateway = "[gateway]\nforward = true\nmasquerade = [\"192.168.10.0/24\"]\nown_traffic = \"lan\"\n\
                   site_prefixes = [\"192.168.10.0/24\"]\n";
    let far = [format!("{}/32", b.overlay_v4), "10.20.2.0/24".to_owned()];
    a.config().peer_with(b, &[&far[0], &far[1]]).extra(gateway).resync_secs(1).write();
    b.config().peer_with(a, &[&format!("{}/32", a.overlay_v4), "192.168.10.0/24"]).resync_secs(1).write();
    let (pa, pb) = (a.spawn_agent(), b.spawn_agent());
    ping_ok(a, &b.overlay_v4);
    let table = || run_ok(a.ns.cmd("nft").args(["-a", "list", "table", "inet", "wirefence"]));
    wait_until("the LAN source on the far route", T, || {
        a.ns.ip(&["route", "show", "10.20.2.0/24"]).contains("src 192.168.10.1")
    });
    let before = table();
    assert_silent(&[(a, &pa), (b, &pb)], || ());
    assert_eq!(table(), before, "the masquerade table was rewritten after convergence");
    assert_second_run_does_nothing(a, pa);
    assert_eq!(table(), before, "run --once rewrote the masquerade table");
    drop(pb);
}

#[test]
fn control_mode_is_silent() {
    let lab = Lab::new(2);
    let cp = ControlPlane::start(&lab);
    let key = cp.enrollment_key_file(&["server"]);
    let policy = "[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n";
    let out = cp.apply_policy(policy);
    assert!(out.status.success(), "policy apply: {}", String::from_utf8_lossy(&out.stderr));
    let mut agents = Vec::new();
    for h in &lab.hosts {
        h.write_control_config(&cp, &key);
        let text = std::fs::read_to_string(h.config_path()).unwrap();
        h.write_config(&text.replacen("[agent]\n", "[agent]\nresync_interval_secs = 1\n", 1));
        agents.push(h.spawn_agent());
    }
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    wait_until("both nodes enrolled", T, || {
        let out = cp.admin(&["nodes", "list", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v.as_array().map(|a| a.len()))
            == Some(2)
    });
    let (b_v4, _) = cp.node_addresses("h2");
    let (a_v4, _) = cp.node_addresses("h1");
    ping_ok(a, &b_v4);
    ping_ok(b, &a_v4);
    assert_silent(&[(a, &agents[0]), (b, &agents[1])], || ());
    let pb = agents.pop().unwrap();
    assert_second_run_does_nothing(b, pb);
}

#[test]
fn a_change_undone_over_and_over_is_rate_limited_and_named() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    a.config().peer(b).write();
    let pa = a.spawn_agent();
    let route = format!("{}/32 main {}", b.overlay_v4, a.ifname);
    wait_until("route installed", T, || a.ns.owned_routes(PROTO).contains(&route));
    // Another tool deletes the agent's route every 20 ms for 6 s.
    let fight = format!(
        "end=$(($(date +%s) + 6)); while [ $(date +%s) -lt $end ]; do \
         ip route del {}/32 dev {} 2>/dev/null; sleep 0.02; done",
        b.overlay_v4, a.ifname
    );
    run_ok(a.ns.cmd("sh").args(["-c", &fight]));
    let log = pa.log_text();
    let adds = log.lines().filter(|l| l.contains("applied") && l.contains("add route")).count();
    assert!(log.contains("keeps undoing"), "no hot-loop warning:\n{log}");
    assert!(log.lines().any(|l| l.contains("keeps undoing") && l.contains("add route")), "warning names no op:\n{log}");
    // Unguarded, every deletion is answered at once (about 250 adds in 6 s).
    assert!(adds <= 20, "{adds} route adds in 6 s: passes were not held apart");
    // Once left alone, the route comes back (after at most one hold).
    wait_until("route restored after the fight", Duration::from_secs(40), || a.ns.owned_routes(PROTO).contains(&route));
}
