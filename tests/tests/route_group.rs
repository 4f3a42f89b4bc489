//! HA subnet routers end to end (the lab: `wirefence_tests::route_group`): h2 and h3 route
//! the same subnet, h2 by priority. When h2's LAN link goes down, its agent is killed, or
//! its whole namespace goes, h1's TCP exchanges with the LAN host resume through h3 within
//! the failover budget; h2 takes the subnet back only after the control plane's hold-down,
//! once.
//! When only h2's tunnels die (its checks pass, its control connection lives), h1's stale
//! counters for it fail it over.

use std::time::{Duration, Instant};

use wirefence_tests::route_group::GroupLab;
use wirefence_tests::wait_until;

const T: Duration = Duration::from_secs(30);
/// The goal: traffic resumes through the standby within this.
const FAILOVER: Duration = Duration::from_secs(3);

#[test]
fn traffic_fails_over_to_the_standby_and_back_after_the_hold_down() {
    let mut g = GroupLab::start(&[]);

    // 1. h2's LAN link goes down: its check fails, h3 takes over.
    let down = Instant::now();
    g.lan_link(2, false);
    wait_until("h1 routes the subnet to h3", T, || g.routed_to(3));
    g.until_reachable(T);
    let took = down.elapsed();
    assert!(took <= FAILOVER, "LAN link down: traffic resumed after {took:?}");
    eprintln!("failover on LAN link down: {took:?}");

    // h2 recovers: no move back before the hold-down (10 s), then one move.
    g.lan_link(2, true);
    g.h2_back_after_the_hold_down("recovered");

    // 2. h2's agent dies: its report stream ends with its connection.
    let killed = Instant::now();
    g.agents[1].take().expect("h2's agent").kill9();
    wait_until("h3 has the subnet", T, || g.routed_to(3));
    g.until_reachable(T);
    let took = killed.elapsed();
    assert!(took <= FAILOVER, "agent killed: traffic resumed after {took:?}");
    eprintln!("failover on agent kill: {took:?}");

    // h2 back; then its machine dies: the namespace with everything in it, no FIN.
    g.agents[1] = Some(g.host(2).spawn_agent());
    wait_until("h2 takes the subnet back after the hold-down", T, || g.routed_to(2));
    g.until_reachable(T);
    let gone = Instant::now();
    g.crash(2);
    wait_until("h3 has the subnet", T, || g.routed_to(3));
    g.until_reachable(T);
    let took = gone.elapsed();
    assert!(took <= FAILOVER, "namespace gone: traffic resumed after {took:?}");
    eprintln!("failover on namespace loss: {took:?}");

    // It boots again on its kept state: the same node, back after the hold-down, once.
    g.boot(2);
    g.h2_back_after_the_hold_down("booted");
    let groups = g.cp.admin_ok(&["nodes", "list"]);
    assert_eq!(groups.matches("h2").count(), 1, "one node h2, not a second enrollment:\n{groups}");
}

#[test]
fn a_primary_whose_tunnels_die_is_failed_over_though_its_checks_pass() {
    // Keepalives every second: a tunnel is dead after 3 s without a byte, which the control
    // plane sees at the agents' 10 s statistics.
    let g = GroupLab::start(&["--persistent-keepalive", "1s"]);
    let blocked = Instant::now();
    g.block_tunnels(2, true);
    wait_until("h1 routes the subnet to h3", Duration::from_secs(45), || g.routed_to(3));
    g.until_reachable(T);
    eprintln!("failover on dead tunnels: {:?}", blocked.elapsed());
    let shown = g.cp.admin_ok(&["nodes", "show", "h2"]);
    assert!(shown.contains("*h3") && shown.contains("its peers receive nothing from it"), "{shown}");
    // h2's agent stayed connected (and its check passing): only the tunnels said it.
    assert!(shown.contains("connected:       yes"), "{shown}");

    // The tunnels carry traffic again: back after the hold-down.
    g.block_tunnels(2, false);
    wait_until("h2 takes the subnet back", Duration::from_secs(45), || g.routed_to(2));
    g.until_reachable(T);
    let shown = g.cp.admin_ok(&["nodes", "show", "h2"]);
    assert!(!shown.contains("receive nothing"), "{shown}");
}
