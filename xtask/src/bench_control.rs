//! `cargo xtask bench-control`: the control plane's two goals, in one run.
//!
//! 1. Push latency: a control plane and 3 agents (release builds, wireguard-go) in
//!    namespaces; 100 policy applies, each changing every node's policy. Timed from the
//!    admin call to the moment all three agents' programs run the new policy, seen in the
//!    kernel: the bench polls each device's pinned policy-state map (its epoch flips when a
//!    new generation goes live). Goal: p99 < 50 ms.
//! 2. Fan-out: 1,000 simulated agents (one HTTP/2 connection, Register and Watch each) on
//!    one control plane over loopback; one policy change, timed until every watcher has
//!    received its update. Goal: < 1 s. The control plane's peak RSS is reported.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use wirefence_proto::v1;
use wirefence_tests::control::ControlPlane;
use wirefence_tests::{wait_until, Lab};

#[derive(clap::Args)]
pub struct BenchControlArgs {
    /// Policy changes timed for push latency.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Simulated agents for the fan-out.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Skip the push-latency part.
    #[arg(long)]
    no_push: bool,
    /// Skip the fan-out part.
    #[arg(long)]
    no_fanout: bool,
}

pub fn run(args: BenchControlArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-control creates network namespaces and needs root");
    }
    raise_fd_limit();
    let bins = crate::workspace::Workspace::locate()?.build_bins(true)?;
    std::env::set_var("WIREFENCE_AGENT_BIN", &bins.agent);
    std::env::set_var("WIREFENCE_CONTROL_BIN", &bins.control);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    let print = |rows: &[Row]| {
        println!("\n{:<58} {:>12} {:>10}  goal", "bench-control", "value", "ratio");
        for (name, value, ratio, goal) in rows {
            println!("{name:<58} {value:>12} {ratio:>10}  {goal}");
        }
    };
    if !args.no_push {
        rows.extend(push_latency(&rt, args.changes)?);
        print(&rows);
    }
    if !args.no_fanout {
        rows.extend(rt.block_on(fan_out(&bins.control, args.agents))?);
        print(&rows);
    }
    Ok(())
}

type Row = (String, String, String, String);

fn row(name: String, value: String, ratio: f64, goal: &str) -> Row {
    let verdict = if ratio <= 1.0 { "met" } else { "MISSED" };
    (name, value, format!("{ratio:.2}x"), format!("{goal} ({verdict})"))
}

/// Each change moves the web port, so every node's compiled policy differs.
fn policy(port: u16) -> String {
    format!(
        "[[rules]]\nid = \"ping\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n\n\
         [[rules]]\nid = \"web\"\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n"
    )
}

fn epoch_map(pin_root: &Path, ifname: &str) -> Result<Array<MapData, wirefence_common::PolicyState>> {
    let path = pin_root.join(ifname).join(wirefence_common::STATE);
    let data = MapData::from_pin(&path).with_context(|| format!("open pinned map {}", path.display()))?;
    Ok(Array::try_from(Map::Array(data))?)
}

fn epochs(maps: &[Array<MapData, wirefence_common::PolicyState>]) -> Result<Vec<u32>> {
    maps.iter().map(|m| Ok(m.get(&0, 0)?.epoch)).collect()
}

fn push_latency(rt: &tokio::runtime::Runtime, changes: usize) -> Result<Vec<Row>> {
    eprintln!("bench-control: push latency, control plane + 3 agents in namespaces, {changes} changes");
    let lab = Lab::new(3);
    let cp = ControlPlane::start(&lab);
    let key = cp.enrollment_key_file(&[]);
    let mut agents = Vec::new();
    for h in &lab.hosts {
        h.write_control_config(&cp, &key);
        agents.push(h.spawn_agent());
    }
    let mut admin = rt.block_on(wirefence_control::admin_client::connect(&cp.admin_socket()))?;
    let apply = |admin: &mut wirefence_control::admin_client::AdminClient, port: u16| -> Result<u64> {
        let req = v1::ApplyPolicyRequest { file_name: "bench.toml".into(), source: policy(port) };
        Ok(rt.block_on(admin.apply_policy(req))?.into_inner().version)
    };
    wait_until("3 nodes enrolled", Duration::from_secs(30), || {
        rt.block_on(admin.list_nodes(v1::ListNodesRequest {})).is_ok_and(|r| r.into_inner().nodes.len() == 3)
    });
    apply(&mut admin, 1000)?;
    let root = wirefence_tests::bpffs_root();
    let mut maps = Vec::new();
    for h in &lab.hosts {
        let ifname = h.ifname.clone();
        wait_until("policy pinned", Duration::from_secs(30), || epoch_map(&root, &ifname).is_ok());
        maps.push(epoch_map(&root, &ifname)?);
    }
    let mut before = epochs(&maps)?;
    // Let the first policy settle everywhere (agents' first passes).
    std::thread::sleep(Duration::from_secs(2));
    before = epochs(&maps).unwrap_or(before);

    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        let t0 = Instant::now();
        apply(&mut admin, 1001 + i as u16)?;
        loop {
            let now = epochs(&maps)?;
            if now.iter().zip(&before).all(|(n, b)| n != b) {
                latencies.push(t0.elapsed());
                before = now;
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change {i}: not enforced on all agents within 10 s (epochs {before:?} -> {now:?})");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99) = (pct(0.50), pct(0.99));
    drop(agents);
    for h in &lab.hosts {
        h.down();
    }
    Ok(vec![
        row(
            format!("push latency p50, {changes} changes, 3 agents"),
            format!("{:.1} ms", ms(p50)),
            ms(p50) / 50.0,
            "p99 < 50 ms",
        ),
        row(
            format!("push latency p99, {changes} changes, 3 agents"),
            format!("{:.1} ms", ms(p99)),
            ms(p99) / 50.0,
            "< 50 ms",
        ),
    ])
}

async fn fan_out(control: &Path, n: usize) -> Result<Vec<Row>> {
    eprintln!("bench-control: fan-out, {n} simulated agents on loopback");
    let dir = wirefence_tests::TempDir::new();
    let admin_socket = dir.0.join("admin.sock");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let mut child = tokio::process::Command::new(control)
        .arg("--admin-socket")
        .arg(&admin_socket)
        .arg("serve")
        .arg("--db")
        .arg(dir.0.join("control.db"))
        .args(["--listen", &addr.to_string(), "--insecure", "--overlay-v4", "10.64.0.0/16"])
        // Every simulated agent enrolls from 127.0.0.1 with one key.
        .args(["--enroll-burst", "1000000"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start wirefence-control")?;
    let pid = child.id().context("control plane pid")?;
    let admin_path: PathBuf = admin_socket.clone();
    let mut admin = loop {
        match wirefence_control::admin_client::connect(&admin_path).await {
            Ok(a) => break a,
            Err(_) if child.try_wait()?.is_none() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => bail!("control plane exited: {e}"),
        }
    };
    let apply = |port: u16| {
        v1::ApplyPolicyRequest {
        file_name: "fanout.toml".into(),
        source: format!(
            "[[rules]]\nid = \"probe\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"tag:sim\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n"
        ),
    }
    };
    admin.apply_policy(apply(1)).await?;
    let key = admin
        .create_enrollment_key(v1::CreateEnrollmentKeyRequest {
            tags: vec!["sim".into()],
            reusable: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .key;

    // Every simulated agent: connect, enroll, watch; say when it has its snapshot, then
    // return the time it receives a version >= the target. A failure anywhere ends the run.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<()>>(n);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (ready, key) = (ready_tx.clone(), key.clone());
        tasks.push(tokio::spawn(async move { sim_agent(addr, i, key, ready).await }));
    }
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => bail!("a simulated agent failed: {e:#}"),
            Ok(None) | Err(_) => bail!("simulated agents did not all get their snapshot within 120 s"),
        }
    }
    let setup = started.elapsed();
    let t0 = Instant::now();
    let version = admin.apply_policy(apply(2)).await?.into_inner().version;
    let mut last = Duration::ZERO;
    for t in tasks {
        let (received, got) =
            tokio::time::timeout(Duration::from_secs(30), t).await.context("fan-out timed out")???;
        anyhow::ensure!(got == version, "a watcher got version {got}, not the change's {version}");
        last = last.max(received.saturating_duration_since(t0));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
    };
    let (hwm, rss) = (kib("VmHWM:"), kib("VmRSS:"));
    child.kill().await?;
    Ok(vec![
        row(
            format!("fan-out: one change to {n} watchers (setup {:.1} s)", setup.as_secs_f64()),
            format!("{:.0} ms", last.as_secs_f64() * 1e3),
            last.as_secs_f64(),
            "< 1 s",
        ),
        (
            format!("control plane RSS with {n} watchers (peak)"),
            format!("{} MiB", rss / 1024),
            format!("{} MiB", hwm / 1024),
            "reported".into(),
        ),
    ])
}

async fn sim_agent(
    addr: std::net::SocketAddr,
    i: usize,
    key: String,
    ready: tokio::sync::mpsc::Sender<Result<()>>,
) -> Result<(Instant, u64)> {
    let mut stream = match watching(addr, i, key).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("sim{i}: {e:#}"))).await;
            return Err(e);
        }
    };
    let _ = ready.send(Ok(())).await;
    // Nothing else changes meanwhile: the first update after the snapshot is the change.
    let u = stream.message().await?.context("stream ended before the change")?;
    Ok((Instant::now(), u.version))
}

/// Connects, enrolls and opens a Watch; returns the stream after its snapshot.
async fn watching(addr: std::net::SocketAddr, i: usize, key: String) -> Result<tonic::Streaming<v1::Update>> {
    use v1::agent_service_client::AgentServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = AgentServiceClient::new(channel);
    let private: [u8; 32] = rand::random();
    let mut req = v1::RegisterRequest {
        public_key: wirefence_proto::possession::public_key(&private).to_vec(),
        hostname: format!("sim{i}"),
        enrollment_key: key,
        ..Default::default()
    };
    let challenge = client.enroll_challenge(v1::EnrollChallengeRequest {}).await?.into_inner();
    wirefence_proto::possession::answer(&mut req, &private, &challenge)?;
    let reg = client.register(req).await?.into_inner();
    let mut req = tonic::Request::new(v1::WatchRequest { resume_from: 0, ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {}", reg.credential).parse()?);
    let mut stream = client.watch(req).await?.into_inner();
    let first = stream.message().await?.context("no snapshot")?;
    anyhow::ensure!(matches!(first.body, Some(v1::update::Body::Snapshot(_))), "first update is not a snapshot");
    Ok(stream)
}

/// 1,000 connections on each side need more than the default 1,024 descriptors.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
