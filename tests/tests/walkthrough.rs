//! The README's "Site-to-site gateways" walkthrough, step by step, in namespaces: a control
//! plane and three sites. Site A (10.10.1.0/24) behind gw-a, site B (10.10.2.0/24) behind
//! the HA pair gw-b1 (priority 200) and gw-b2 (100), site C (10.10.3.0/24) behind gw-c. The
//! subnets are granted on the enrollment keys, advertised, accepted, forwarded by the agents
//! (`[gateway] forward = true`) and named in the policy: site A may reach site B's web
//! server on tcp/80 (not 8080), site C may ping site A, nothing else crosses. Then gw-b1's
//! LAN link fails and site A's traffic goes on through gw-b2.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wirefence_tests::control::ControlPlane;
use wirefence_tests::route_group::join_lan;
use wirefence_tests::*;

const T: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(800);

/// The README's policy (step 5).
const POLICY: &str = r#"
[[rules]]
id = "a-to-b-web"
from = ["route:gw-a"]
to = ["route:gw-b1", "route:gw-b2"]
proto = "tcp"
ports = ["80"]

[[rules]]
id = "c-pings-a"
from = ["route:gw-c"]
to = ["route:gw-a"]
proto = "icmp"
"#;

/// A gateway's control-mode config as the README writes it (steps 2-4): `hostname`, the
/// site it advertises (`advertise` lines), the sites it accepts, forwarding.
fn gateway_config(h: &Host, cp: &ControlPlane, hostname: &str, site: &str, advertise: &str) {
    h.write_control_config(cp, &cp.routed_key_file(hostname, &[site]));
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    let text = text.replace(&format!("hostname = \"h{}\"", h.index), &format!("hostname = \"{hostname}\""));
    h.write_config(&format!("{text}accept_routes = [\"10.10.0.0/16\"]\n{advertise}\n[gateway]\nforward = true\n"));
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{addr}:{port}").parse().unwrap()
}

/// A TCP exchange from `ns` with `addr`.
fn exchanges(ns: &Netns, addr: SocketAddr, timeout: Duration) -> bool {
    connect(ns, addr, timeout).is_some_and(|mut s| echoes(&mut s, timeout))
}

#[test]
fn three_sites_with_an_ha_pair_as_the_readme_walks_through() {
    let lab = Lab::new(4);
    let cp = ControlPlane::start(&lab);
    let (gw_a, gw_b1, gw_b2, gw_c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2], &lab.hosts[3]);

    // The sites' LANs. B's is one bridge both gateways join; each masquerades into it, so
    // the LAN host's answers go back through whichever gateway forwarded (README, step 6).
    let lan_a = lan_behind(gw_a, "10.10.1.1", "10.10.1.10");
    let lan_c = lan_behind(gw_c, "10.10.3.1", "10.10.3.10");
    let lan_b = Netns::new("lanb");
    lan_b.add_bridge("br0");
    lan_b.ip(&["addr", "add", "10.10.2.10/24", "dev", "br0"]);
    join_lan(gw_b1, &lan_b, "br0", "10.10.2.1");
    join_lan(gw_b2, &lan_b, "br0", "10.10.2.2");
    for port in [80, 8080] {
        echo_server(&lan_b, sock("10.10.2.10", port));
    }

    // Steps 1-4: keys granting each site, the gateways' configs.
    gateway_config(gw_a, &cp, "gw-a", "10.10.1.0/24", "advertise_routes = [\"10.10.1.0/24\"]");
    gateway_config(gw_c, &cp, "gw-c", "10.10.3.0/24", "advertise_routes = [\"10.10.3.0/24\"]");
    for (gw, name, priority) in [(gw_b1, "gw-b1", 200), (gw_b2, "gw-b2", 100)] {
        let advertise = format!(
            "\n[[control.advertise]]\nprefix = \"10.10.2.0/24\"\npriority = {priority}\n\
             check = \"tcp:10.10.2.10:80\"\ninterval_ms = 300\nfail_after = 2\n"
        );
        gateway_config(gw, &cp, name, "10.10.2.0/24", &advertise);
    }
    // Step 5: the policy.
    let out = cp.apply_policy(POLICY);
    assert!(out.status.success(), "policy: {}", String::from_utf8_lossy(&out.stderr));
    let _agents: Vec<AgentProc> = lab.hosts.iter().map(|h| h.spawn_agent()).collect();

    // Every gateway turned forwarding on.
    for gw in &lab.hosts {
        wait_until("forwarding turned on by the agent", T, || {
            run_ok(gw.ns.cmd("sysctl").args(["-n", "net.ipv4.ip_forward"])).trim() == "1"
        });
    }
    // Site A reaches site B's web server, through the primary, gw-b1.
    let web = sock("10.10.2.10", 80);
    wait_until("site A reaches site B's tcp/80", T, || exchanges(&lan_a, web, SHORT));
    let routes_b = |gw: &Host| {
        let out = run(gw_a.ns.cmd("wg").args(["show", &gw_a.ifname, "allowed-ips"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(gw.public_key.as_str()) && l.contains("10.10.2.0/24"))
    };
    // The higher priority wins: at once, or (when gw-b2 came first) after the hold-down.
    // Before both members' report streams are seen, the lower id is primary without any
    // word from them, and the first to report may take over: stable only once both are
    // healthy and gw-b1 leads.
    wait_until("both members healthy, gw-b1 primary", T, || {
        let show = cp.admin_ok(&["nodes", "show", "gw-b2"]);
        show.contains("route group:     10.10.2.0/24 primary gw-b1 (")
            && show.contains("(priority 100, healthy)")
            && show.contains("(priority 200, healthy)")
    });
    wait_until("gw-a routes site B to gw-b1", T, || routes_b(gw_b1));
    wait_until("site A reaches site B through gw-b1", T, || exchanges(&lan_a, web, SHORT));
    // Nothing else crosses: B's 8080, C to B, B back to A.
    assert!(!exchanges(&lan_a, sock("10.10.2.10", 8080), SHORT), "site A reached site B's tcp/8080");
    assert!(!exchanges(&lan_c, web, SHORT), "site C reached site B's web server");
    // Site C pings site A (and its first ping may wait for the peers' handshake).
    wait_until("site C pings site A", T, || lan_c.ping("10.10.1.10"));
    assert!(!lan_a.ping("10.10.3.10"), "site A pinged site C (the rule is one way)");
    // The control plane names the group's primary.
    let show = cp.admin_ok(&["nodes", "show", "gw-b2"]);
    assert!(show.contains("route group:     10.10.2.0/24 primary gw-b1 ("), "nodes show gw-b2: {show}");

    // Step 6: gw-b1's LAN link fails; site A's new connections go through gw-b2 in < 3 s.
    let down = Instant::now();
    gw_b1.ns.ip(&["link", "set", "lan0", "down"]);
    while !exchanges(&lan_a, web, Duration::from_millis(100)) {
        assert!(down.elapsed() < T, "site B unreachable from site A after gw-b1's LAN link went down");
    }
    let took = down.elapsed();
    assert!(took <= Duration::from_secs(3), "failover to gw-b2 took {took:?}");
    assert!(routes_b(gw_b2), "gw-a does not route site B to gw-b2 after the failover");
    eprintln!("walkthrough: site A's traffic to site B resumed through gw-b2 after {took:?}");
}
