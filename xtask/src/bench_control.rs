//! `cargo xtask bench-control`: the control plane's two goals, in one run.
//!
//! 1. Push latency: a control plane and 3 agents (release builds, wireguard-go) in
//!    namespaces; 100 policy applies, each changing every node's policy. Timed from the
//!    admin call to the moment all three agents' programs run the new policy, seen in the
//!    kernel: the bench polls each device's pinned policy-state map (its epoch flips when a
//!    new generation goes live). Goal: p99 < 50 ms. Then the same again while a 4th
//!    namespace floods the listener (idle TCP connections, half-open TLS handshakes,
//!    bad-credential Watch calls from 16 source addresses): goal flooded p99 <= 2x the
//!    unflooded p99; the control plane's peak RSS before and after the flood is reported.
//! 2. Fan-out: 1,000 simulated agents (one HTTP/2 connection, Register and Watch each) on
//!    one control plane over loopback; one policy change, timed until every watcher has
//!    received its update. Goal: < 1 s. The control plane's peak RSS is reported.
//! 3. Replicas on PostgreSQL (`replicas.rs`): fan-out over two, push latency from one to
//!    agents on the other, failover of an agent behind HAProxy when its replica is killed.
//! 4. Scale (`scale.rs`): a full mesh of simulated agents, 2,000 and 4,000 nodes.
//! 5. Flow-record ingest (`ingest.rs`): records stored per second, SQLite and PostgreSQL.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData};
use wirefence_proto::v1;
use wirefence_tests::control::ControlPlane;
use wirefence_tests::{wait_until, Lab};

mod ingest;
mod loopback;
mod replicas;
mod scale;

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
    /// Skip the flooded push-latency run (idle TCP, half-open TLS and bad-credential Watch
    /// calls from another namespace).
    #[arg(long)]
    no_flood: bool,
    /// Skip the fan-out part.
    #[arg(long)]
    no_fanout: bool,
    /// Node counts of the scale part (simulated agents, full mesh), comma-separated,
    /// ascending: one fleet grows through them.
    #[arg(long, value_delimiter = ',', default_value = "2000,4000")]
    scale: Vec<usize>,
    /// Servers of the scale part, comma-separated: 1 (SQLite) and/or more (replicas on
    /// PostgreSQL, the agents spread over them).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    scale_servers: Vec<usize>,
    /// Port changes timed per node count (the median is reported).
    #[arg(long, default_value_t = 5)]
    scale_changes: usize,
    /// Skip the scale part.
    #[arg(long)]
    no_scale: bool,
    /// Skip the replicas' part (PostgreSQL: fan-out over 2 replicas, push latency across
    /// replicas, failover).
    #[arg(long)]
    no_replicas: bool,
    /// Simulated agents of the fan-out over 2 replicas (the goal is stated for 10,000).
    #[arg(long, default_value_t = 2000)]
    replica_agents: usize,
    /// Replicas killed in the failover part.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Skip the flow-record ingest part.
    #[arg(long)]
    no_ingest: bool,
    /// Flow records sent in the ingest part (by 20 simulated nodes).
    #[arg(long, default_value_t = 200_000)]
    ingest_records: usize,
    /// Use debug builds (quicker to build; the numbers are not the release goals').
    #[arg(long)]
    debug: bool,
}

pub fn run(args: BenchControlArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-control creates network namespaces and needs root");
    }
    raise_fd_limit();
    let bins = crate::workspace::Workspace::locate()?.build_bins(!args.debug)?;
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
        rows.extend(push_latency(&rt, args.changes, !args.no_flood)?);
        print(&rows);
    }
    if !args.no_fanout {
        rows.extend(rt.block_on(fan_out(&bins.control, args.agents))?);
        print(&rows);
    }
    if !args.no_replicas {
        rows.extend(rt.block_on(replicas::fan_out(&bins.control, args.replica_agents))?);
        print(&rows);
        if !args.no_push {
            rows.extend(replicas::push_latency(&rt, args.changes)?);
            print(&rows);
        }
        rows.extend(replicas::failover(&rt, args.kills)?);
        print(&rows);
    }
    if !args.no_ingest {
        rows.extend(rt.block_on(ingest::run(&bins.control, 20, args.ingest_records))?);
        print(&rows);
    }
    if !args.no_scale {
        let mut measured = Vec::new();
        for servers in &args.scale_servers {
            measured.extend(rt.block_on(scale::run(&bins.control, &args.scale, args.scale_changes, *servers))?);
            scale::print(&measured);
        }
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

/// Timed policy changes: each from the admin call until all agents enforce it.
struct Pusher<'a> {
    rt: &'a tokio::runtime::Runtime,
    admin: wirefence_control::admin_client::AdminClient,
    maps: Vec<Array<MapData, wirefence_common::PolicyState>>,
    before: Vec<u32>,
    port: u16,
}

impl Pusher<'_> {
    /// Agents on `hosts` enrolled at `agents_at`, changes applied through `admin_at`'s admin
    /// socket; returns once the first policy runs everywhere.
    fn start<'a>(
        rt: &'a tokio::runtime::Runtime,
        hosts: &[wirefence_tests::Host],
        agents_at: &ControlPlane,
        admin_at: &ControlPlane,
    ) -> Result<(Pusher<'a>, Vec<wirefence_tests::AgentProc>)> {
        let key = agents_at.enrollment_key_file(&[]);
        let mut agents = Vec::new();
        for h in hosts {
            h.write_control_config(agents_at, &key);
            agents.push(h.spawn_agent());
        }
        let mut admin = rt.block_on(wirefence_control::admin_client::connect(&admin_at.admin_socket()))?;
        wait_until("every node enrolled", Duration::from_secs(30), || {
            rt.block_on(admin.list_nodes(v1::ListNodesRequest::default()))
                .is_ok_and(|r| r.into_inner().nodes.len() == hosts.len())
        });
        let mut pusher = Pusher { rt, admin, maps: Vec::new(), before: Vec::new(), port: 999 };
        pusher.apply()?;
        let root = wirefence_tests::bpffs_root();
        for h in hosts {
            let ifname = h.ifname.clone();
            wait_until("policy pinned", Duration::from_secs(30), || epoch_map(&root, &ifname).is_ok());
            pusher.maps.push(epoch_map(&root, &ifname)?);
        }
        // Let the first policy settle everywhere (agents' first passes).
        std::thread::sleep(Duration::from_secs(2));
        pusher.before = epochs(&pusher.maps)?;
        Ok((pusher, agents))
    }

    fn apply(&mut self) -> Result<u64> {
        self.port += 1;
        let req = v1::ApplyPolicyRequest { file_name: "bench.toml".into(), source: policy(self.port) };
        Ok(self.rt.block_on(self.admin.apply_policy(req))?.into_inner().version)
    }

    /// `changes` latencies, sorted.
    fn measure(&mut self, changes: usize) -> Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(changes);
        for i in 0..changes {
            let t0 = Instant::now();
            self.apply()?;
            loop {
                let now = epochs(&self.maps)?;
                if now.iter().zip(&self.before).all(|(n, b)| n != b) {
                    latencies.push(t0.elapsed());
                    self.before = now;
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("change {i}: not enforced on all agents within 10 s (epochs {:?} -> {now:?})", self.before);
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        latencies.sort();
        Ok(latencies)
    }
}

fn pct(latencies: &[Duration], p: f64) -> Duration {
    latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Peak and current RSS of a process, KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> u64 {
        status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
    };
    Ok((kib("VmHWM:"), kib("VmRSS:")))
}

/// Source addresses of the flood (on the flooding host's underlay).
const FLOOD_SOURCES: u8 = 16;

fn push_latency(rt: &tokio::runtime::Runtime, changes: usize, flood: bool) -> Result<Vec<Row>> {
    eprintln!("bench-control: push latency, control plane + 3 agents in namespaces, {changes} changes");
    // The 4th host runs no agent: it is where the flood comes from.
    let lab = Lab::new(4);
    let cp = ControlPlane::start(&lab);
    let pid = cp.pid().context("control plane pid")?;
    let agent_hosts = &lab.hosts[..3];
    let (mut pusher, agents) = Pusher::start(rt, agent_hosts, &cp, &cp)?;

    let calm = pusher.measure(changes)?;
    let (calm_hwm, _) = rss_kib(pid)?;
    let (p50, p99) = (pct(&calm, 0.50), pct(&calm, 0.99));
    let mut rows = vec![
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
    ];
    if flood {
        rows.extend(flooded(&lab, &cp, &mut pusher, changes, p99, calm_hwm, pid)?);
    }
    drop(agents);
    for h in agent_hosts {
        h.down();
    }
    Ok(rows)
}

/// The same pushes again while `lab.hosts[3]` floods the listener.
fn flooded(
    lab: &Lab,
    cp: &ControlPlane,
    pusher: &mut Pusher<'_>,
    changes: usize,
    calm_p99: Duration,
    calm_hwm: u64,
    pid: u32,
) -> Result<Vec<Row>> {
    let flooder = &lab.hosts[3];
    let mut sources: Vec<std::net::IpAddr> = Vec::new();
    for i in 0..FLOOD_SOURCES + 2 {
        let ip = format!("172.31.255.{}", 100 + i);
        flooder.ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        sources.push(ip.parse()?);
    }
    let watch_sources = sources.split_off(usize::from(FLOOD_SOURCES));
    let plan = crate::bench_flood::Plan {
        sources,
        watch_sources,
        // Past the per-source cap (64), so refusals are part of the load too.
        idle_per_source: 48,
        half_open_per_source: 32,
        watch_loops: 8,
        target: format!("{}:{}", wirefence_tests::control::CP_V4, wirefence_tests::control::CP_PORT).parse()?,
        ca_file: cp.ca_file(),
        domain: wirefence_tests::control::CP_V4.into(),
    };
    eprintln!(
        "bench-control: flooding from {} sources: {} idle + {} half-open TLS connections each, {} bad-credential Watch loops from {} more",
        plan.sources.len(),
        plan.idle_per_source,
        plan.half_open_per_source,
        plan.watch_loops,
        plan.watch_sources.len()
    );
    let flood = crate::bench_flood::Flood::start(&flooder.ns.name, plan)?;
    // Let the flood fill the listener's slots before timing.
    std::thread::sleep(Duration::from_secs(3));
    let measured = pusher.measure(changes);
    let (hwm, rss) = rss_kib(pid)?;
    let counts = flood.stop();
    let hot = measured?;
    let p99 = pct(&hot, 0.99);
    let ratio = ms(p99) / ms(calm_p99).max(0.001);
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(
        n(&counts.unexpected) == 0,
        "{} bad-credential Watch calls were not refused",
        n(&counts.unexpected)
    );
    Ok(vec![
        row(
            format!("push latency p99 under flood, {changes} changes"),
            format!("{:.1} ms", ms(p99)),
            ms(p99) / 50.0,
            "< 50 ms",
        ),
        row("flooded p99 / unflooded p99".into(), format!("{ratio:.2}x"), ratio / 2.0, "<= 2x"),
        (
            format!(
                "flood: {} connections ({} closed by the server), {} bad Watch calls refused",
                n(&counts.connections),
                n(&counts.closed_by_server),
                n(&counts.bad_watches)
            ),
            String::new(),
            String::new(),
            "reported".into(),
        ),
        (
            "control plane peak RSS, unflooded -> flooded".into(),
            format!("{} MiB", calm_hwm / 1024),
            format!("{} MiB", hwm / 1024),
            format!("reported (RSS now {} MiB)", rss / 1024),
        ),
    ])
}

async fn fan_out(control: &Path, n: usize) -> Result<Vec<Row>> {
    eprintln!("bench-control: fan-out, {n} simulated agents on loopback");
    let cp = loopback::Loopback::start(control, n).await?;
    let (mut child, pid, addr, mut admin) = (cp.child, cp.pid, cp.addr, cp.admin);
    let key = fan_out_setup(&mut admin).await?;

    let (tasks, setup) = watchers(&[addr], n, 1, &key, Duration::from_secs(120)).await?;
    let t0 = Instant::now();
    let version = admin.apply_policy(probe_policy(2)).await?.into_inner().version;
    let last = *received(tasks, t0, version).await?.last().context("no watchers")?;
    let (hwm, rss) = rss_kib(pid)?;
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

/// The fan-out's policy: probes from outside the mesh to the simulated agents on `port`
/// (every watcher's rules change with it, no peers do).
fn probe_policy(port: u16) -> v1::ApplyPolicyRequest {
    v1::ApplyPolicyRequest {
        file_name: "fanout.toml".into(),
        source: format!(
            "[[rules]]\nid = \"probe\"\nfrom = [\"10.99.0.0/24\"]\nto = [\"tag:sim\"]\nproto = \"tcp\"\nports = [\"{port}\"]\n"
        ),
    }
}

/// Applies the first probe policy; returns a reusable key tagging nodes `sim`.
async fn fan_out_setup(admin: &mut wirefence_control::admin_client::AdminClient) -> Result<String> {
    admin.apply_policy(probe_policy(1)).await?;
    let req = v1::CreateEnrollmentKeyRequest { tags: vec!["sim".into()], reusable: true, ..Default::default() };
    Ok(admin.create_enrollment_key(req).await?.into_inner().key)
}

/// Simulated agents sharing one HTTP/2 connection where a bench multiplexes them (the
/// control plane allows 16 streams per connection).
const PER_CONNECTION: usize = 10;

type Watcher = tokio::task::JoinHandle<Result<(Instant, u64)>>;

/// `n` simulated agents, `per_connection` of them sharing one HTTP/2 connection (1: each
/// its own, as real agents; more: the bench's own client costs less of the 2 cores the
/// servers share with it), connection c to `addrs[c % addrs.len()]`: each enrolls with
/// `key` and watches. Returns once every one has its snapshot (a failure anywhere ends the
/// run), with how long that took.
async fn watchers(
    addrs: &[std::net::SocketAddr],
    n: usize,
    per_connection: usize,
    key: &str,
    limit: Duration,
) -> Result<(Vec<Watcher>, Duration)> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<()>>(n);
    // Enrollments in flight at once, as a fleet's agents spread theirs out (thousands at
    // once only queue behind each other until their requests time out).
    let enrolling = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for first in (0..n).step_by(per_connection) {
        let addr = addrs[(first / per_connection) % addrs.len()];
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        for i in first..(first + per_connection).min(n) {
            let (channel, ready, key, enrolling) =
                (channel.clone(), ready_tx.clone(), key.to_owned(), enrolling.clone());
            tasks.push(tokio::spawn(async move { sim_agent(channel, i, key, ready, enrolling).await }));
        }
    }
    for _ in 0..n {
        match tokio::time::timeout(limit, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => bail!("a simulated agent failed: {e:#}"),
            Ok(None) | Err(_) => bail!("simulated agents did not all get their snapshot within {limit:?}"),
        }
    }
    Ok((tasks, started.elapsed()))
}

/// How long after `t0` each watcher received `version` (the next update it gets), sorted.
async fn received(tasks: Vec<Watcher>, t0: Instant, version: u64) -> Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (at, got) = tokio::time::timeout(Duration::from_secs(60), t).await.context("fan-out timed out")???;
        anyhow::ensure!(got == version, "a watcher got version {got}, not the change's {version}");
        latencies.push(at.saturating_duration_since(t0));
    }
    latencies.sort();
    Ok(latencies)
}

async fn sim_agent(
    channel: tonic::transport::Channel,
    i: usize,
    key: String,
    ready: tokio::sync::mpsc::Sender<Result<()>>,
    enrolling: std::sync::Arc<tokio::sync::Semaphore>,
) -> Result<(Instant, u64)> {
    let permit = enrolling.acquire_owned().await?;
    let watched = watching(channel, i, key).await;
    drop(permit);
    let mut stream = match watched {
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
async fn watching(channel: tonic::transport::Channel, i: usize, key: String) -> Result<tonic::Streaming<v1::Update>> {
    use v1::agent_service_client::AgentServiceClient;
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
