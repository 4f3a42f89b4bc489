//! MSS clamping on the real path: a host on a 1500-byte LAN behind gateway h1 opens TCP
//! connections through the tunnel (wireguard-go, MTU 1420) to h2. Its SYN announces an MSS
//! of 1460; what arrives on h2's tunnel device is counted by nftables in h2 (prerouting,
//! which sees a packet after the tc ingress hook). The clamp runs alone on a device without
//! a policy and in the policy programs with one, on egress (h1) and on ingress (h2).

use std::net::SocketAddr;
use std::time::Duration;

use wirefence_tests::*;

const LAN: &str = "10.30.1.0/24";
const LAN_GW: &str = "10.30.1.1";
const LAN_HOST: &str = "10.30.1.2";
const PORT: u16 = 5001;
const T: Duration = Duration::from_secs(15);
const TABLE: &str = "wft_mss";

/// SYNs arriving on h2's tunnel device: all of them, and those announcing more than the
/// tunnel allows (1380 for IPv4 at MTU 1420).
fn count_syns(h2: &Host) {
    let rules = format!(
        "table inet {TABLE} {{\n chain pre {{\n  type filter hook prerouting priority -400; policy accept;\n  \
         iifname \"{tun}\" tcp flags & (syn | ack) == syn counter\n  \
         iifname \"{tun}\" tcp flags & (syn | ack) == syn tcp option maxseg size > 1380 counter\n }}\n}}\n",
        tun = h2.ifname
    );
    h2.ns.nft_load(&rules);
}

/// (SYNs, SYNs over 1380) counted on h2 so far.
fn syn_totals(h2: &Host) -> (u64, u64) {
    let counts = h2.ns.nft_counters(TABLE);
    assert_eq!(counts.len(), 2, "counters of {TABLE}: {counts:?}");
    (counts[0], counts[1])
}

/// One connection from the LAN host to h2 (which must echo); returns (SYNs, SYNs over 1380)
/// that arrived on h2's tunnel meanwhile.
fn syns_of_a_connection(lan: &Netns, h2: &Host) -> (u64, u64) {
    let before = syn_totals(h2);
    connect_from_lan(lan, h2);
    let after = syn_totals(h2);
    (after.0 - before.0, after.1 - before.1)
}

/// A connection from the LAN host to h2, which must echo.
fn connect_from_lan(lan: &Netns, h2: &Host) {
    let addr: SocketAddr = format!("{}:{PORT}", h2.overlay_v4).parse().unwrap();
    let mut s = connect(lan, addr, T).unwrap_or_else(|| panic!("the LAN host cannot connect to {addr}"));
    assert!(echoes(&mut s, T), "no echo from {addr}");
}

#[test]
fn syns_from_a_1500_byte_lan_cross_the_tunnel_clamped() {
    let lab = Lab::new(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    // The LAN behind h1: a namespace with a 1500-byte veth, routed through h1.
    let lan = lan_behind(h1, LAN_GW, LAN_HOST);
    run_ok(h1.ns.cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    echo_server(&h2.ns, format!("0.0.0.0:{PORT}").parse().unwrap());

    // Neither side clamps: the detector sees the LAN's 1460 arrive (it would see a leak).
    write_pair(h1, h2, "\"off\"", "", "\"off\"");
    wait_until("h1 and h2 connected", T, || h1.ns.ping(&h2.overlay_v4));
    count_syns(h2);
    let (all, over) = syns_of_a_connection(&lan, h2);
    assert!(all >= 1 && over == all, "unclamped SYNs should arrive with MSS 1460: {all} SYNs, {over} over 1380");

    // The clamp alone on h1 (no policy), on its tunnel's egress.
    write_pair(h1, h2, "\"auto\"", "", "\"off\"");
    let (all, over) = syns_of_a_connection(&lan, h2);
    assert!(all >= 1 && over == 0, "h1's clamp (alone, egress): {all} SYNs, {over} over 1380");
    let mss = &h1.status_json()["mss_clamp"];
    assert_eq!((&mss["ipv4"], &mss["ipv6"], &mss["by"]), (&1380.into(), &1360.into(), &"clamp alone".into()), "{mss}");

    // The clamp alone on h2, on its tunnel's ingress.
    write_pair(h1, h2, "\"off\"", "", "\"auto\"");
    let (all, over) = syns_of_a_connection(&lan, h2);
    assert!(all >= 1 && over == 0, "h2's clamp (alone, ingress): {all} SYNs, {over} over 1380");

    // h1 with a policy: its programs clamp, and the clamp alone is gone from the device.
    let policy = format!(
        "[policy]\npin_dir = \"{}\"\n[[policy.rules]]\nid = \"lan-to-h2\"\n\
         from = [\"{LAN}\"]\nto = [\"{}/32\"]\nproto = \"tcp\"\nports = [\"{PORT}\"]\n\
         [[policy.rules]]\nid = \"ping\"\nfrom = [\"{}/32\"]\nto = [\"{}/32\"]\nproto = \"icmp\"\n",
        bpffs_root().display(),
        h2.overlay_v4,
        h1.overlay_v4,
        h2.overlay_v4,
    );
    write_pair(h1, h2, "\"auto\"", &policy, "\"off\"");
    assert!(!clamp_filters(h1), "the clamp alone stayed beside the policy programs");
    let (all, over) = syns_of_a_connection(&lan, h2);
    assert!(all >= 1 && over == 0, "h1's policy programs: {all} SYNs, {over} over 1380");
    let mss = &h1.status_json()["mss_clamp"];
    assert_eq!((&mss["ipv4"], &mss["by"]), (&1380.into(), &"policy programs".into()), "{mss}");
    // A fixed MSS, written into the policy's maps.
    write_pair(h1, h2, "1300", &policy, "\"off\"");
    assert_eq!(h1.status_json()["mss_clamp"]["ipv6"], 1300, "{}", h1.status_json());

    // `down` takes everything off.
    write_pair(h1, h2, "\"auto\"", "", "\"off\"");
    assert!(clamp_filters(h1), "no clamp filter on h1's device");
    h1.down();
    assert!(!h1.ns.link_exists(&h1.ifname));
}

/// Writes both configs (h1's `mss_clamp` and extra sections, h2's `mss_clamp`) and runs one
/// pass of each agent.
fn write_pair(h1: &Host, h2: &Host, h1_mss: &str, h1_extra: &str, h2_mss: &str) {
    let h1_text = h1.config().peer(h2).extra(h1_extra).render();
    h1.write_config(&h1_text.replacen("[interface]\n", &format!("[interface]\nmss_clamp = {h1_mss}\n"), 1));
    let h2_text =
        h2.config().peer_with(h1, &[&format!("{}/32", h1.overlay_v4), &format!("{}/128", h1.overlay_v6), LAN]).render();
    h2.write_config(&h2_text.replacen("[interface]\n", &format!("[interface]\nmss_clamp = {h2_mss}\n"), 1));
    h1.run_once_ok();
    h2.run_once_ok();
}

/// Whether the clamp's cls_bpf filters (`wf_mss`) are on h1's tunnel device.
fn clamp_filters(h1: &Host) -> bool {
    let out = run_ok(h1.ns.cmd("tc").args(["filter", "show", "dev", &h1.ifname, "egress"]));
    out.contains("wf_mss")
}
