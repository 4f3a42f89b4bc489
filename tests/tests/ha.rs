//! Control-plane replicas on one PostgreSQL behind a real L4 balancer (HAProxy, TCP mode,
//! TLS terminated at the replicas): agents in namespaces on wireguard-go enroll through
//! the balancer; the replica an agent is attached to is killed (SIGKILL); the agent
//! resumes on the other one without a snapshot and enforces throughout; a change made on
//! the survivor reaches it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wirefence_tests::balancer::Balancer;
use wirefence_tests::control::ControlPlane;
use wirefence_tests::metrics::{find_sample, scrape};
use wirefence_tests::postgres::Postgres;
use wirefence_tests::*;

const T: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(700);

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!("{addr}:{port}").parse().unwrap()
}

fn tcp_echoes(from: &Host, to: SocketAddr) -> bool {
    connect(&from.ns, to, SHORT).is_some_and(|mut s| echoes(&mut s, SHORT))
}

/// h1 may reach h2 on `ports` (tcp), nothing else.
fn policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[[rules]]\nid = \"app\"\nfrom = [\"node:h1\"]\nto = [\"node:h2\"]\nproto = \"tcp\"\nports = [{}]\n",
        ports.join(", ")
    )
}

/// The hostnames with an open Watch stream on `cp` (each replica knows its own streams).
fn connected(cp: &ControlPlane) -> Vec<String> {
    let out = cp.admin(&["nodes", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["connected"].as_bool() == Some(true))
        .filter_map(|n| n["hostname"].as_str().map(str::to_owned))
        .collect()
}

fn snapshots(lab: &Lab, cp: &ControlPlane) -> f64 {
    find_sample(&scrape(&lab.switch, cp.metrics_addr()), "wirefence_control_watch_starts_total{first=\"snapshot\"}")
        .unwrap_or(0.0)
}

#[test]
fn an_agent_behind_haproxy_fails_over_to_another_replica_and_enforces_throughout() {
    require_root();
    let lab = Lab::new(2);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let pg_dir = TempDir::new();
    let pg = Postgres::start(&pg_dir.0.join("pg"));
    let url = pg.create_database("control");
    let mut cps = ControlPlane::replicas(&lab, &url, 2);
    let lb = Balancer::start(&lab, &cps);

    // Enrollment goes through the balancer to either replica; keys from either work.
    for (h, cp) in [(h1, &cps[0]), (h2, &cps[1])] {
        h.write_bound_control_config(cp, &[]);
    }
    let _agents: Vec<AgentProc> = lab.hosts.iter().map(Host::spawn_agent).collect();
    wait_until("both nodes connected, one replica or the other", T, || {
        let mut all = connected(&cps[0]);
        all.extend(connected(&cps[1]));
        all.sort();
        all == ["h1", "h2"]
    });
    for port in [80, 81] {
        echo_server(&h2.ns, sock("0.0.0.0", port));
    }
    let applied = cps[1].apply_policy(&policy(&[80]));
    assert!(applied.status.success(), "policy apply: {}", String::from_utf8_lossy(&applied.stderr));
    let (h2_v4, _) = cps[0].node_addresses("h2");
    wait_until("h1 reaches h2:80", T, || tcp_echoes(h1, sock(&h2_v4, 80)));
    assert!(!tcp_echoes(h1, sock(&h2_v4, 81)), "h1 -> h2:81 is not allowed");

    // Kill the replica h1 is attached to; the survivor takes it.
    let (dead, alive) = if connected(&cps[0]).contains(&"h1".to_owned()) { (0, 1) } else { (1, 0) };
    let before = snapshots(&lab, &cps[alive]);
    cps[dead].kill();
    let killed = Instant::now();
    let mut checks = 0;
    while !connected(&cps[alive]).contains(&"h1".to_owned()) {
        assert!(killed.elapsed() < T, "h1 did not reach the other replica\n{}", lb.log());
        // The data plane does not wait for the control plane.
        assert!(tcp_echoes(h1, sock(&h2_v4, 80)), "h1 -> h2:80 broke during the failover");
        assert!(!tcp_echoes(h1, sock(&h2_v4, 81)), "h1 -> h2:81 opened during the failover");
        checks += 1;
    }
    let took = killed.elapsed();
    assert!(checks > 0 || took < SHORT, "the traffic was checked while failing over");
    assert_eq!(snapshots(&lab, &cps[alive]), before, "h1 resumed without a snapshot (delta or current)");
    eprintln!("h1 resumed on replica {alive} {took:?} after replica {dead} was killed");

    // A change on the survivor reaches h1 there.
    let applied = cps[alive].apply_policy(&policy(&[80, 81]));
    assert!(applied.status.success(), "policy apply: {}", String::from_utf8_lossy(&applied.stderr));
    wait_until("h1 reaches h2:81 after the change", T, || tcp_echoes(h1, sock(&h2_v4, 81)));
    assert!(tcp_echoes(h1, sock(&h2_v4, 80)));
}
