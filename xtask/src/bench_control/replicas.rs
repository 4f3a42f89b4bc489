//! The replicas' goals: two control planes on one PostgreSQL (a cluster of its own, made
//! with initdb in a temporary directory).
//!
//! - Fan-out: simulated agents spread over both replicas (alternating connections), one
//!   change applied on the first; timed until every watcher has it. Goal: p99 < 1 s. The
//!   agents share HTTP/2 connections (as in the scale part): with one connection each, the
//!   bench's own client took about 70% of the 2 cores the replicas run on (4,000 agents:
//!   0.69 s, of which the replicas used 0.15 s of CPU each).
//! - Push latency across replicas: 3 agents in namespaces attached to replica B, changes
//!   applied on replica A, timed until the kernel runs them (as the single-server part).
//!   Goal: p99 < 50 ms.
//! - Failover: one agent behind HAProxy; the replica it uses is killed (SIGKILL), timed
//!   until it is connected to the other; the killed one is started again for the next
//!   round. Goal: p99 < 2 s. Streams that started with a snapshot are counted too (none
//!   is the goal: agents resume).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use wirefence_proto::v1;
use wirefence_tests::balancer::Balancer;
use wirefence_tests::control::{ControlPlane, CP_PORT, CP_V4, CP_V6};
use wirefence_tests::postgres::Postgres;
use wirefence_tests::{wait_until, Lab, TempDir};

use super::loopback::Loopback;
use super::{fan_out_setup, ms, pct, probe_policy, received, row, rss_kib, watchers, Pusher, Row, PER_CONNECTION};

/// A PostgreSQL cluster with one database for a bench; dropped with its directory.
pub struct Database {
    _pg: Postgres,
    pub url: String,
    _dir: TempDir,
}

pub fn database() -> Database {
    let dir = TempDir::new();
    let pg = Postgres::start(&dir.0.join("pg"));
    let url = pg.create_database("bench");
    Database { _pg: pg, url, _dir: dir }
}

pub async fn fan_out(control: &Path, n: usize) -> Result<Vec<Row>> {
    eprintln!(
        "bench-control: fan-out over 2 replicas on PostgreSQL, {n} simulated agents on loopback, \
         {PER_CONNECTION} per HTTP/2 connection"
    );
    let db = database();
    let a = Loopback::start_on(control, n, Some(&db.url)).await?;
    let b = Loopback::start_on(control, n, Some(&db.url)).await?;
    let mut admin = a.admin.clone();
    let key = fan_out_setup(&mut admin).await?;

    let (tasks, setup) = watchers(&[a.addr, b.addr], n, PER_CONNECTION, &key, Duration::from_secs(600)).await?;
    eprintln!("bench-control: {n} watchers ready after {:.0} s; applying the change", setup.as_secs_f64());
    // The setup's last status writes settle first (they are not part of the change).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let version = admin.apply_policy(probe_policy(2)).await?.into_inner().version;
    let latencies = received(tasks, t0, version).await?;
    let (p99, max) = (pct(&latencies, 0.99), latencies[latencies.len() - 1]);
    eprintln!(
        "bench-control: fan-out over 2 replicas: p50 {:.0} ms, p90 {:.0} ms",
        ms(pct(&latencies, 0.5)),
        ms(pct(&latencies, 0.9))
    );
    let (a_hwm, _) = rss_kib(a.pid)?;
    let (b_hwm, _) = rss_kib(b.pid)?;
    drop((a, b, db));
    Ok(vec![
        row(
            format!(
                "fan-out, 2 replicas: one change to {n} watchers ({PER_CONNECTION} per connection), p99 (setup {:.0} s)",
                setup.as_secs_f64()
            ),
            format!("{:.0} ms", ms(p99)),
            p99.as_secs_f64(),
            "< 1 s",
        ),
        (
            "fan-out, 2 replicas: the last watcher; replicas' peak RSS".into(),
            format!("{:.0} ms", ms(max)),
            format!("{}+{} MiB", a_hwm / 1024, b_hwm / 1024),
            "reported".into(),
        ),
    ])
}

pub fn push_latency(rt: &tokio::runtime::Runtime, changes: usize) -> Result<Vec<Row>> {
    eprintln!("bench-control: push latency across replicas, applied on A, 3 agents on B, {changes} changes");
    let db = database();
    let lab = Lab::new(3);
    // B takes the agents at the lab's control-plane addresses; A only has its admin socket.
    let b = ControlPlane::start_on(
        &lab,
        &db.url,
        1,
        None,
        vec![format!("{CP_V4}:{CP_PORT}"), format!("[{CP_V6}]:{CP_PORT}")],
    );
    let a = ControlPlane::start_on(&lab, &db.url, 0, Some(b.tls_dir().to_owned()), vec!["127.0.0.1:7450".into()]);
    let (mut pusher, agents) = Pusher::start(rt, &lab.hosts, &b, &a)?;
    let measured = pusher.measure(changes)?;
    let (p50, p99) = (pct(&measured, 0.50), pct(&measured, 0.99));
    drop(agents);
    for h in &lab.hosts {
        h.down();
    }
    drop((a, b, db));
    Ok(vec![
        row(
            "push latency p50, applied on replica A, 3 agents on replica B".into(),
            format!("{:.1} ms", ms(p50)),
            ms(p50) / 50.0,
            "p99 < 50 ms",
        ),
        row(
            "push latency p99, applied on replica A, 3 agents on replica B".into(),
            format!("{:.1} ms", ms(p99)),
            ms(p99) / 50.0,
            "< 50 ms",
        ),
    ])
}

/// Whether `hostname` has a stream open on `cp` (each replica knows its own streams).
fn attached(
    rt: &tokio::runtime::Runtime,
    admin: &mut wirefence_control::admin_client::AdminClient,
    hostname: &str,
) -> bool {
    rt.block_on(admin.list_nodes(v1::ListNodesRequest::default()))
        .is_ok_and(|r| r.into_inner().nodes.iter().any(|n| n.hostname == hostname && n.connected))
}

fn snapshots(lab: &Lab, cp: &ControlPlane) -> f64 {
    let text = wirefence_tests::metrics::scrape(&lab.switch, cp.metrics_addr());
    wirefence_tests::metrics::find_sample(&text, "wirefence_control_watch_starts_total{first=\"snapshot\"}")
        .unwrap_or(0.0)
}

pub fn failover(rt: &tokio::runtime::Runtime, kills: usize) -> Result<Vec<Row>> {
    eprintln!("bench-control: failover, 1 agent behind HAProxy, 2 replicas, {kills} kills");
    let db = database();
    let lab = Lab::new(1);
    let mut cps = ControlPlane::replicas(&lab, &db.url, 2);
    let _lb = Balancer::start(&lab, &cps);
    let h1 = &lab.hosts[0];
    h1.write_bound_control_config(&cps[0], &[]);
    let _agent = h1.spawn_agent();
    let connect = |cp: &ControlPlane| rt.block_on(wirefence_control::admin_client::connect(&cp.admin_socket()));
    let mut admins = [connect(&cps[0])?, connect(&cps[1])?];
    wait_until("h1 attached to a replica", Duration::from_secs(30), || {
        attached(rt, &mut admins[0], "h1") || attached(rt, &mut admins[1], "h1")
    });
    let mut times = Vec::with_capacity(kills);
    let mut snapshot_starts = 0.0;
    for round in 1..=kills {
        let dead = if attached(rt, &mut admins[0], "h1") { 0 } else { 1 };
        let alive = 1 - dead;
        let before = snapshots(&lab, &cps[alive]);
        cps[dead].kill();
        let t0 = Instant::now();
        while !attached(rt, &mut admins[alive], "h1") {
            ensure!(t0.elapsed() < Duration::from_secs(30), "round {round}: h1 not on the other replica within 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = t0.elapsed();
        snapshot_starts += snapshots(&lab, &cps[alive]) - before;
        eprintln!("bench-control: failover round {round}: {took:?}");
        times.push(took);
        cps[dead].restart();
        admins[dead] = connect(&cps[dead])?;
        // Replicas do not die back to back: the agent's session is a healthy one by then.
        std::thread::sleep(Duration::from_secs(1));
    }
    times.sort();
    let (p50, p99, max) = (pct(&times, 0.5), pct(&times, 0.99), times[times.len() - 1]);
    Ok(vec![
        row(
            format!("failover: replica killed -> agent on another, p99 of {kills}"),
            format!("{:.2} s", p99.as_secs_f64()),
            p99.as_secs_f64() / 2.0,
            "< 2 s",
        ),
        (
            "failover: p50, max; streams restarted with a snapshot".into(),
            format!("{:.2} s", p50.as_secs_f64()),
            format!("{:.2} s", max.as_secs_f64()),
            format!("reported ({snapshot_starts} snapshots)"),
        ),
    ])
}
