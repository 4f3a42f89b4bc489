//! Scale: N simulated agents enroll and watch on one control plane over loopback (SQLite),
//! or spread over 2 replicas on one PostgreSQL; then a full-mesh policy (every node gains
//! N−1 peers), then a change of its port only (peers unchanged), applied on the first
//! server. Timed until every watcher has each version; the control planes' peak RSS (the
//! largest replica's) and their CPU time. The node counts are steps of one growing fleet.
//!
//! The simulated agents take updates in parts, as agents do, and decode only an update's
//! version and count the peers in it (a real agent's decoding would cost this process more
//! than the control plane under test).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use prost::bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use wirefence_proto::v1;

use super::loopback::Loopback;
use super::PER_CONNECTION;

/// Enrollments in flight at once.
const ENROLLING: usize = 64;

/// An update as the simulated agents read it: the version and the encoded body.
#[derive(Clone, PartialEq, prost::Message)]
struct UpdateHead {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(bytes = "bytes", optional, tag = "2")]
    snapshot: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "3")]
    delta: Option<Bytes>,
    #[prost(bool, tag = "5")]
    continued: bool,
}

/// How many entries field 2 (`NodeView.peers`, `ViewDelta.upsert_peers`) has in `body`.
fn peers_in(mut body: Bytes) -> Result<u32> {
    let mut n = 0;
    while body.has_remaining() {
        let key = prost::encoding::decode_varint(&mut body)?;
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut body)?;
                0
            }
            1 => 8,
            2 => prost::encoding::decode_varint(&mut body)? as usize,
            5 => 4,
            w => bail!("wire type {w} in an update"),
        };
        ensure!(body.remaining() >= skip, "truncated update");
        body.advance(skip);
        if key >> 3 == 2 && key & 7 == 2 {
            n += 1;
        }
    }
    Ok(n)
}

/// One update received by simulated agent `agent`.
struct Seen {
    agent: usize,
    version: u64,
    peers: u32,
    at: Instant,
}

pub struct Measured {
    pub nodes: usize,
    /// Servers the agents were spread over (1: SQLite, more: replicas on PostgreSQL).
    pub replicas: usize,
    pub enrolled_per_sec: f64,
    pub mesh: Duration,
    pub mesh_apply: Duration,
    /// The median of the port changes.
    pub change: Duration,
    pub change_apply: Duration,
    /// The control planes' CPU time (every thread of every server) for that change: the
    /// work the servers did, apart from the simulated agents sharing the machine's cores.
    pub change_cpu: Duration,
    pub peak_rss_kib: u64,
}

fn policy(port: u16) -> v1::ApplyPolicyRequest {
    v1::ApplyPolicyRequest {
        file_name: "mesh.toml".into(),
        source: format!(
            "[[rules]]\nid = \"mesh\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n"
        ),
    }
}

/// No rules: every node loses its peers, and new nodes join without any.
fn deny_all() -> v1::ApplyPolicyRequest {
    v1::ApplyPolicyRequest { file_name: "none.toml".into(), source: "# no rules\n".into() }
}

/// Measures every count of `sizes` (ascending) on one fleet that grows: the same servers
/// and simulated agents throughout, so the rows differ by the nodes only, not by what
/// differs between two processes (their memory layout, their hash seeds), which moved a
/// row by a third between runs. Before each count's nodes enroll, a policy without rules
/// takes the mesh away, so each row establishes its mesh from no peers.
pub async fn run(control: &Path, sizes: &[usize], port_changes: usize, replicas: usize) -> Result<Vec<Measured>> {
    let most = sizes.iter().copied().max().unwrap_or(0);
    eprintln!("bench-control: scale, up to {most} simulated agents, full mesh, {replicas} server(s)");
    let db = (replicas > 1).then(super::replicas::database);
    let mut cps = Vec::new();
    for _ in 0..replicas.max(1) {
        cps.push(Loopback::start_on(control, most, db.as_ref().map(|d| d.url.as_str())).await?);
    }
    let mut admin = cps[0].admin.clone();
    let key = admin
        .create_enrollment_key(v1::CreateEnrollmentKeyRequest { reusable: true, ..Default::default() })
        .await?
        .into_inner()
        .key;
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Seen>>();
    let enrolling = Arc::new(tokio::sync::Semaphore::new(ENROLLING));
    let pids: Vec<u32> = cps.iter().map(|c| c.pid).collect();
    let peak = {
        let pids = pids.clone();
        move || pids.iter().filter_map(|p| super::rss_kib(*p).ok()).max().unwrap_or_default()
    };
    let cpu = move || pids.iter().map(|p| cpu_time(*p)).sum::<Duration>();
    let mut tasks = Vec::new();
    let mut last = vec![0u64; most];
    let mut rows = Vec::new();
    for &n in sizes {
        let enrolled = tasks.len();
        ensure!(n > enrolled, "scale sizes must ascend: {sizes:?}");
        if enrolled > 0 {
            timed_change(&mut admin, &mut rx, &mut last[..enrolled], deny_all(), &cpu, |_| Ok(())).await?;
        }
        let started = Instant::now();
        // Connections of PER_CONNECTION agents each, spread over the servers in turn.
        for first in (enrolled..n).step_by(PER_CONNECTION) {
            let addr = cps[(first / PER_CONNECTION) % cps.len()].addr;
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
            for agent in first..(first + PER_CONNECTION).min(n) {
                let (channel, key, tx, enrolling) = (channel.clone(), key.clone(), tx.clone(), enrolling.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = sim_agent(channel, agent, key, &tx, enrolling).await {
                        let _ = tx.send(Err(e.context(format!("sim{agent}"))));
                    }
                }));
            }
        }
        // Every new agent has its snapshot.
        wait_all(&mut rx, &mut last[..n], 1, Duration::from_secs(600), |_| Ok(())).await?;
        let enrolled_per_sec = (n - enrolled) as f64 / started.elapsed().as_secs_f64();
        let rss = |phase: &str| {
            let (hwm, now) = peak();
            eprintln!("bench-control: {n} nodes, after {phase}: RSS {} MiB (peak {} MiB)", now / 1024, hwm / 1024);
        };
        rss("enrollment");
        let (mesh, mesh_apply, _) = timed_change(&mut admin, &mut rx, &mut last[..n], policy(443), &cpu, |s| {
            ensure!(s.peers as usize == n - 1, "sim{} got {} peers with the mesh, not {}", s.agent, s.peers, n - 1);
            Ok(())
        })
        .await?;
        rss("the mesh");
        // Port changes, each keeping every peer: the median is reported.
        let mut changes = Vec::with_capacity(port_changes);
        for i in 0..port_changes.max(1) {
            let port = 8443 + u16::try_from(i).unwrap_or(0);
            let timed = timed_change(&mut admin, &mut rx, &mut last[..n], policy(port), &cpu, |s| {
                ensure!(s.peers == 0, "sim{} got {} peers with a change that keeps them", s.agent, s.peers);
                Ok(())
            })
            .await?;
            let (all, _, cpu) = timed;
            eprintln!("bench-control: {n} nodes, port change {}: {all:.2?}, server CPU {cpu:.2?}", i + 1);
            changes.push(timed);
        }
        changes.sort();
        let (change, change_apply, change_cpu) = changes[changes.len() / 2];
        rows.push(Measured {
            nodes: n,
            replicas,
            enrolled_per_sec,
            mesh,
            mesh_apply,
            change,
            change_apply,
            change_cpu,
            peak_rss_kib: peak().0,
        });
    }
    drop(tx);
    for mut cp in cps {
        cp.child.kill().await?;
    }
    for t in tasks {
        t.abort();
    }
    drop(db);
    Ok(rows)
}

/// Applies `req`; returns how long until every agent had its version, the apply call's
/// time, and the CPU time `cpu` counted meanwhile.
async fn timed_change(
    admin: &mut wirefence_control::admin_client::AdminClient,
    rx: &mut mpsc::UnboundedReceiver<Result<Seen>>,
    last: &mut [u64],
    req: v1::ApplyPolicyRequest,
    cpu: impl Fn() -> Duration,
    check: impl Fn(&Seen) -> Result<()>,
) -> Result<(Duration, Duration, Duration)> {
    let cpu0 = cpu();
    let t0 = Instant::now();
    let version = admin.apply_policy(req).await?.into_inner().version;
    let applied = t0.elapsed();
    let done = wait_all(rx, last, version, Duration::from_secs(600), check).await?;
    Ok((done.saturating_duration_since(t0), applied, cpu().saturating_sub(cpu0)))
}

/// The CPU time of every thread of process `pid` so far, in nanoseconds from the scheduler
/// (`/proc/PID/task/TID/schedstat`, first field): the clock ticks of `/proc/PID/stat` are
/// too coarse for a change of tens of milliseconds. Zero for a process that is gone.
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Waits until every agent has an update of `version` or later; returns when the last did.
async fn wait_all(
    rx: &mut mpsc::UnboundedReceiver<Result<Seen>>,
    last: &mut [u64],
    version: u64,
    limit: Duration,
    check: impl Fn(&Seen) -> Result<()>,
) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut missing = last.iter().filter(|v| **v < version).count();
    let mut at = Instant::now();
    while missing > 0 {
        let seen = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(seen)) => seen?,
            Ok(None) => bail!("every simulated agent ended"),
            Err(_) => bail!("{missing} agents lack version {version} after {limit:?}"),
        };
        if seen.version >= version && last[seen.agent] < version {
            check(&seen)?;
            missing -= 1;
            at = seen.at;
        }
        last[seen.agent] = last[seen.agent].max(seen.version);
    }
    Ok(at)
}

async fn sim_agent(
    channel: tonic::transport::Channel,
    agent: usize,
    key: String,
    tx: &mpsc::UnboundedSender<Result<Seen>>,
    enrolling: Arc<tokio::sync::Semaphore>,
) -> Result<()> {
    let permit = enrolling.acquire_owned().await?;
    let reg = super::loopback::enroll(channel.clone(), format!("sim{agent}"), key).await?;
    drop(permit);
    let mut req = tonic::Request::new(v1::WatchRequest { resume_from: 0, accepts_parts: true, ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {}", reg.credential).parse()?);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<v1::WatchRequest, UpdateHead>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/wirefence.v1.AgentService/Watch");
    let mut stream = grpc.server_streaming(req, path, codec).await?.into_inner();
    // Peers of the update being received (it may come in parts).
    let mut peers = 0;
    while let Some(u) = stream.message().await? {
        peers += match (u.snapshot, u.delta) {
            (Some(b), _) | (None, Some(b)) => peers_in(b)?,
            (None, None) => 0,
        };
        if u.continued {
            continue;
        }
        if tx.send(Ok(Seen { agent, version: u.version, peers, at: Instant::now() })).is_err() {
            break;
        }
        peers = 0;
    }
    bail!("the stream ended")
}

/// The rows so far side by side, then the goals: a change that keeps peers grows at most
/// 1.1x as fast as the nodes (2x nodes <= 2.2x time); at 10,000 nodes it takes < 2 s and
/// the control plane's peak RSS stays < 2 GiB.
pub fn print(rows: &[Measured]) {
    let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    println!(
        "\n{:<28} {:>10} {:>12} {:>12} {:>17} {:>14} {:>12} {:>10}",
        "scale: full mesh, tcp/443",
        "enroll/s",
        "mesh",
        "(apply)",
        "port change, p50",
        "(apply)",
        "(server CPU)",
        "peak RSS"
    );
    for m in rows {
        let servers = if m.replicas > 1 { format!("{} replicas", m.replicas) } else { "single node".into() };
        println!(
            "{:<28} {:>10.0} {:>12} {:>12} {:>17} {:>14} {:>12} {:>6} MiB",
            format!("{} nodes, {servers}", m.nodes),
            m.enrolled_per_sec,
            s(m.mesh),
            s(m.mesh_apply),
            s(m.change),
            s(m.change_apply),
            s(m.change_cpu),
            m.peak_rss_kib / 1024
        );
    }
    let mut kinds: Vec<usize> = rows.iter().map(|m| m.replicas).collect();
    kinds.sort();
    kinds.dedup();
    let pairs = kinds.iter().flat_map(|k| {
        let same: Vec<&Measured> = rows.iter().filter(|m| m.replicas == *k).collect();
        same.windows(2).map(|w| (w[0], w[1])).collect::<Vec<_>>()
    });
    for (a, b) in pairs {
        let nodes = b.nodes as f64 / a.nodes as f64;
        let time = b.change.as_secs_f64() / a.change.as_secs_f64().max(1e-6);
        let goal = nodes * 1.1;
        let cpu = b.change_cpu.as_secs_f64() / a.change_cpu.as_secs_f64().max(1e-6);
        let verdict = if time <= goal { "met" } else { "MISSED" };
        println!(
            "port change, {} -> {} nodes, {} server(s): {nodes:.1}x nodes, {time:.2}x time (goal <= {goal:.1}x: {verdict}), {cpu:.2}x server CPU",
            a.nodes, b.nodes, a.replicas
        );
    }
    for m in rows.iter().filter(|m| m.nodes >= 10_000) {
        let t = m.change.as_secs_f64() / 2.0;
        let r = m.peak_rss_kib as f64 / (2.0 * 1024.0 * 1024.0);
        let v = |x: f64| if x <= 1.0 { "met" } else { "MISSED" };
        println!("port change at {} nodes, {} server(s): {t:.2}x of the 2 s goal ({})", m.nodes, m.replicas, v(t));
        println!("peak RSS at {} nodes, {} server(s): {r:.2}x of the 2 GiB goal ({})", m.nodes, m.replicas, v(r));
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn counts_the_peers_of_an_encoded_update() {
        let peer = v1::Peer { public_key: vec![1; 32], name: "a".into(), ..Default::default() };
        let view =
            v1::NodeView { peers: vec![peer.clone(), peer], policy: Some(Default::default()), ..Default::default() };
        let u = v1::Update {
            version: 7,
            body: Some(v1::update::Body::Snapshot(view)),
            incarnation: "x".into(),
            continued: false,
        };
        let head = UpdateHead::decode(u.encode_to_vec().as_slice()).unwrap();
        assert_eq!(head.version, 7);
        assert_eq!(peers_in(head.snapshot.unwrap()).unwrap(), 2);
    }
}
