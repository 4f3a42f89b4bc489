//! No cleartext fallback: traffic for a prefix of the mesh never leaves by the WAN in clear,
//! whether its peer was revoked, is down, or the agent restarts. Two sites in control mode:
//! h2 advertises the subnet 10.20.2.0/24 (answered by an address on a veth of its own), h1
//! accepts it and has a default route to the "WAN", the switch namespace, which counts every
//! packet arriving there for a mesh prefix (nftables, prerouting).

use std::time::Duration;

use wirefence_tests::control::{wg_peers, ControlPlane, CP_V4, CP_V6};
use wirefence_tests::*;

const T: Duration = Duration::from_secs(30);
const SUBNET: &str = "10.20.2.0/24";
const SUBNET_HOST: &str = "10.20.2.1";
/// The harness's overlay ranges (`ControlPlane::start`).
const OVERLAY_V4: &str = "10.77.0.0/24";
const OVERLAY_V6: &str = "fd77::/64";
const TABLE: &str = "wft_wan";

const ALLOW: &str = r#"
[[rules]]
id = "site-to-site"
from = ["node:h1"]
to = ["10.20.2.0/24", "node:h2"]
proto = "icmp"
"#;
/// No rule between the sites: h2 stops being h1's peer, and so do its routes.
const REVOKED: &str = r#"
[[rules]]
id = "nothing"
from = ["node:h1"]
to = ["node:h1"]
proto = "icmp"
"#;

/// Counts, in the WAN (switch) namespace, packets addressed to the mesh's prefixes.
fn count_mesh_packets_on_the_wan(lab: &Lab) {
    let rules = format!(
        "table inet {TABLE} {{\n chain pre {{\n  type filter hook prerouting priority 0; policy accept;\n  \
         ip daddr {{ {SUBNET}, {OVERLAY_V4} }} counter\n  ip6 daddr {OVERLAY_V6} counter\n }}\n}}\n"
    );
    lab.switch.nft_load(&rules);
}

fn wan_packets(lab: &Lab) -> u64 {
    lab.switch.nft_counters(TABLE).iter().sum()
}

fn pings_through(h1: &Host) -> bool {
    h1.ns.ping(SUBNET_HOST)
}

/// Sends traffic for the mesh prefixes that h1 has no peer for, each of which would follow
/// the default route out of the WAN without the unreachable routes.
fn probe_mesh(h1: &Host, h2_overlay: &str) {
    for addr in [SUBNET_HOST, "10.20.2.77", h2_overlay, "10.77.0.200", "fd77::c8"] {
        assert!(!h1.ns.ping(addr), "{addr} answered, though no peer of h1 carries it now");
    }
}

#[test]
fn mesh_prefixes_never_leave_by_the_wan_in_clear() {
    let lab = Lab::new(2);
    let cp = ControlPlane::start(&lab);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(cp.apply_policy(ALLOW).status.success());

    // h2: the site gateway, its LAN stood in for by a veth pair of its own.
    h2.ns.ip(&["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"]);
    h2.ns.ip(&["addr", "add", &format!("{SUBNET_HOST}/24"), "dev", "lan0"]);
    h2.ns.ip(&["link", "set", "lan0", "up"]);
    h2.ns.ip(&["link", "set", "lan1", "up"]);
    h2.write_control_config_with(
        &cp,
        &cp.routed_key_file("h2", &[SUBNET]),
        &format!("advertise_routes = [\"{SUBNET}\"]"),
    );
    // h1: the other site, its default route to the WAN.
    h1.ns.ip(&["route", "add", "default", "via", CP_V4]);
    h1.ns.ip(&["-6", "route", "add", "default", "via", CP_V6]);
    h1.write_control_config_with(&cp, &cp.bound_key_file("h1", &[]), "accept_routes = [\"10.20.0.0/16\"]");
    let _a2 = h2.spawn_agent();
    let a1 = h1.spawn_agent();
    wait_until("h1 reaches h2's subnet through the tunnel", T, || pings_through(h1));
    let (h2_v4, _) = cp.node_addresses("h2");

    // The unreachable routes sit below the tunnel's: the subnet (h2's), the overlay ranges.
    let routes = h1.ns.owned_routes(PROTO);
    for want in [
        format!("{SUBNET} main {}", h1.ifname),
        format!("{SUBNET} main unreachable"),
        format!("{OVERLAY_V4} main unreachable"),
        format!("{OVERLAY_V6} main unreachable"),
    ] {
        assert!(routes.contains(&want), "h1 lacks route {want}: {routes:?}");
    }
    // h2 routes its own subnet itself: no unreachable route for it there.
    let routes2 = h2.ns.owned_routes(PROTO);
    assert!(!routes2.iter().any(|r| r.starts_with(SUBNET)), "h2 refuses its own subnet: {routes2:?}");
    count_mesh_packets_on_the_wan(&lab);

    // 1. Revoked: h2 is no longer h1's peer; its subnet and address are refused, not leaked.
    assert!(cp.apply_policy(REVOKED).status.success());
    wait_until("h1 drops h2 as a peer", T, || wg_peers(h1).is_empty());
    probe_mesh(h1, &h2_v4);
    assert_eq!(wan_packets(&lab), 0, "mesh traffic left h1 by the WAN after the revoke");

    // 2. The remote gateway is down: its peer and routes stay, traffic goes into the tunnel.
    assert!(cp.apply_policy(ALLOW).status.success());
    wait_until("h1 reaches h2's subnet again", T, || pings_through(h1));
    h2.ns.ip(&["link", "set", "eth0", "down"]);
    assert!(!h1.ns.ping(SUBNET_HOST), "h2 answered while down");
    assert_eq!(wan_packets(&lab), 0, "mesh traffic left h1 by the WAN while h2 was down");
    h2.ns.ip(&["link", "set", "eth0", "up"]);

    // 3. The agent restarts, and the view it comes back to has lost h2 (revoked meanwhile).
    a1.kill9();
    assert!(!h1.ns.ping("10.77.0.200"), "an overlay address no node has answered");
    assert!(cp.apply_policy(REVOKED).status.success());
    let restarted = h1.spawn_agent();
    wait_until("the restarted h1 drops h2", T, || wg_peers(h1).is_empty());
    probe_mesh(h1, &h2_v4);
    assert_eq!(wan_packets(&lab), 0, "mesh traffic left h1 by the WAN around its restart");

    // `down` removes the unreachable routes with everything else.
    restarted.kill9();
    h1.down();
    assert!(h1.ns.owned_routes(PROTO).is_empty(), "down left routes: {:?}", h1.ns.owned_routes(PROTO));
    // And without them, this test's WAN counter sees the leak it guards against.
    let _ = h1.ns.ping(SUBNET_HOST);
    assert!(wan_packets(&lab) > 0, "the WAN counter missed a packet sent by the default route");
}

#[test]
fn static_mesh_prefixes_are_refused_when_no_peer_carries_them() {
    let lab = Lab::new(2);
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);
    lab.switch.ip(&["addr", "add", &format!("{CP_V4}/24"), "dev", "br0"]);
    a.ns.ip(&["route", "add", "default", "via", CP_V4]);
    let with_peer = |on: bool| {
        let c = a.config().extra("[routing]\nmesh_prefixes = [\"10.20.0.0/16\"]\n");
        let c = if on { c.peer_with(b, &[&format!("{}/32", b.overlay_v4), SUBNET]) } else { c };
        c.write();
    };
    with_peer(true);
    a.run_once_ok();
    let routes = a.ns.owned_routes(PROTO);
    assert!(routes.contains(&"10.20.0.0/16 main unreachable".to_owned()), "{routes:?}");
    assert!(routes.contains(&format!("{SUBNET} main {}", a.ifname)), "{routes:?}");
    count_mesh_packets_on_the_wan(&lab);

    with_peer(false);
    a.run_once_ok();
    assert!(!a.ns.ping(SUBNET_HOST));
    assert_eq!(wan_packets(&lab), 0, "a static mesh prefix left by the WAN once its peer was removed");
    // Unchanged config: nothing to do (the unreachable route is recognised as ours).
    assert!(a.run_once_ok().contains("operations=0"));
    a.down();
    assert!(a.ns.owned_routes(PROTO).is_empty());
}
