//! `cargo xtask bench`: the agent's data-plane apply time against a hand-made baseline.
//!
//! For each peer count (default 1,000 and 10,000; each peer has a /32 and a /128 allowed-ip,
//! so two routes) and each repetition, in a fresh network namespace per side:
//!
//! - **from scratch**: agent: `wirefence-agent run --once --config <toml>` (userspace
//!   backend); baseline: `wg syncconf <if> <conf>` then one `ip -batch` that sets the link
//!   up, adds the two node addresses and every route (`proto 87`, as the agent's);
//! - **change**: from that converged state, 1% of the peers replaced by new ones (new keys,
//!   new addresses); agent: `run --once` with the new config; baseline: `wg syncconf` with
//!   the new full config plus an `ip -batch` deleting and adding only the changed routes.
//!
//! wireguard-go is started by the harness and answering on its socket before each timed
//! step on both sides (the agent adopts a running daemon), so daemon start-up is excluded
//! from both. After every timed step the namespace is checked: device key, port, peers and
//! allowed-ips, link up with its addresses, and exactly the expected owned routes.
//! Reported: the median of the runs, the ratio to the baseline, the change time as a share
//! of the agent's from-scratch time, the agent's CPU time and its peak RSS (wait4 rusage).

mod data;
mod sys;
mod verify;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use data::{NodeKey, Scenario};
use sys::{run_timed, Daemon, Netns, Sample};

/// The goals.
const GOAL_SCRATCH_RATIO: f64 = 1.0;
const GOAL_CHANGE_SHARE: f64 = 0.05;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Peer counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1000usize, 10000])]
    peers: Vec<usize>,

    /// Repetitions of every case; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,

    /// Share of the peers replaced in the change case, in percent.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,

    /// Agent binary to measure instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,

    /// Keep the work directory (configs, batch files, logs) after a successful run.
    #[arg(long)]
    keep: bool,

    /// Exit non-zero when a goal is missed (correctness failures always do).
    #[arg(long)]
    enforce_goals: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Agent,
    Baseline,
}

/// All samples of one peer count.
#[derive(Default)]
struct Results {
    peers: usize,
    changed: usize,
    agent_scratch: Vec<Sample>,
    agent_change: Vec<Sample>,
    /// The change written over the config of a running agent, until it reports it applied.
    agent_live_change: Vec<Duration>,
    /// Baseline steps kept apart: (`wg syncconf`, `ip -batch`).
    base_scratch: Vec<(Sample, Sample)>,
    base_change: Vec<(Sample, Sample)>,
    daemon_start: Vec<Duration>,
    /// wireguard-go's peak RSS at the end of each agent run, KiB.
    daemon_rss_kib: Vec<u64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    ensure!(!args.peers.is_empty() && args.peers.iter().all(|&n| n > 0), "--peers needs positive counts");
    ensure!((0.0..=100.0).contains(&args.change_percent), "--change-percent must be within 0..=100");
    preflight()?;
    let agent = match &args.agent {
        Some(p) => p.canonicalize().with_context(|| format!("no agent at {}", p.display()))?,
        None => crate::workspace::Workspace::locate()?.build_agent(true)?,
    };
    sys::remove_stale_namespaces();

    let pid = std::process::id();
    let work = std::env::temp_dir().join(format!("wirefence-bench-{pid}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("logs")).with_context(|| format!("create {}", work.display()))?;
    let ifname = format!("wfb{pid}");
    let key = data::node_key()?;
    let key_file = work.join("node.key");
    write_private(&key_file, &format!("{}\n", key.private))?;
    let bench = Bench { agent, work: work.clone(), ifname, key, key_file, pid };

    let mut all = Vec::new();
    let result = (|| -> Result<()> {
        for &n in &args.peers {
            all.push(bench_peer_count(&bench, n, &args)?);
        }
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("bench: work directory with configs and logs kept: {}", work.display());
        return Err(e);
    }

    let missed = print_report(&all, args.runs, started.elapsed());
    if args.keep {
        println!("work directory (configs, batch files, logs): {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    if args.enforce_goals && missed > 0 {
        bail!("{missed} goal(s) missed");
    }
    Ok(())
}

struct Bench {
    agent: PathBuf,
    work: PathBuf,
    ifname: String,
    key: NodeKey,
    key_file: PathBuf,
    pid: u32,
}

/// The files of one peer count.
struct Files {
    agent_before: PathBuf,
    agent_after: PathBuf,
    wg_before: PathBuf,
    wg_after: PathBuf,
    ip_scratch: PathBuf,
    ip_change: PathBuf,
    state_dir: PathBuf,
}

fn bench_peer_count(b: &Bench, n: usize, args: &BenchArgs) -> Result<Results> {
    let changed = ((n as f64 * args.change_percent / 100.0).round() as usize).clamp(1, n);
    let t = Instant::now();
    let sc = Scenario::generate(n, changed)?;
    eprintln!("bench: {n} peers: {} key pairs generated in {:.0?}", n + changed, t.elapsed());

    let dir = b.work.join(format!("peers-{n}"));
    std::fs::create_dir_all(&dir)?;
    let state_dir = b.work.join("agent-state");
    let cfg = data::AgentConfig { ifname: &b.ifname, private_key_file: &b.key_file, state_dir: &state_dir };
    let files = Files {
        agent_before: dir.join("agent-before.toml"),
        agent_after: dir.join("agent-after.toml"),
        wg_before: dir.join("wg-before.conf"),
        wg_after: dir.join("wg-after.conf"),
        ip_scratch: dir.join("ip-from-scratch.batch"),
        ip_change: dir.join("ip-change.batch"),
        state_dir: state_dir.clone(),
    };
    write(&files.agent_before, &data::agent_config(&cfg, &sc.before))?;
    write(&files.agent_after, &data::agent_config(&cfg, &sc.after))?;
    write_private(&files.wg_before, &data::wg_config(&b.key, &sc.before))?;
    write_private(&files.wg_after, &data::wg_config(&b.key, &sc.after))?;
    write(&files.ip_scratch, &data::ip_batch_from_scratch(&b.ifname, &sc.before))?;
    write(&files.ip_change, &data::ip_batch_change(&b.ifname, &sc))?;
    let before = data::expected(&sc.before);
    let after = data::expected(&sc.after);

    let mut res = Results { peers: n, changed, ..Default::default() };
    for run in 0..args.runs {
        // Alternate which side goes first, so neither always runs on a warmer machine.
        let order = if run % 2 == 0 { [Side::Agent, Side::Baseline] } else { [Side::Baseline, Side::Agent] };
        for side in order {
            let seq = next_seq();
            let ns = Netns::create(format!("{}{}-{seq}", sys::NS_PREFIX, b.pid))?;
            let tag = format!("{}-{n}-run{run}", if side == Side::Agent { "agent" } else { "baseline" });
            let log = b.work.join("logs").join(format!("{tag}.log"));
            let (daemon, start) =
                Daemon::start(&ns, &b.ifname, &b.work.join("logs").join(format!("{tag}.wireguard-go.log")))?;
            res.daemon_start.push(start);
            match side {
                Side::Agent => {
                    let _ = std::fs::remove_dir_all(&files.state_dir);
                    let s = run_timed(agent_cmd(b, &ns, &files.agent_before), &log)?;
                    verify::check(&ns, &b.ifname, &b.key, &before).context("after the agent's from-scratch run")?;
                    let c = run_timed(agent_cmd(b, &ns, &files.agent_after), &log)?;
                    verify::check(&ns, &b.ifname, &b.key, &after).context("after the agent's change run")?;
                    // The same change delivered to a running agent (its normal life).
                    let live = dir.join("agent-live.toml");
                    std::fs::copy(&files.agent_after, &live)?;
                    let l = live_change(b, &ns, &live, &files.agent_before, &log)?;
                    verify::check(&ns, &b.ifname, &b.key, &before).context("after the running agent's change")?;
                    res.agent_scratch.push(s);
                    res.agent_change.push(c);
                    res.agent_live_change.push(l);
                    res.daemon_rss_kib.extend(daemon.peak_rss_kib());
                }
                Side::Baseline => {
                    let s = baseline(b, &ns, &files.wg_before, &files.ip_scratch, &log)?;
                    verify::check(&ns, &b.ifname, &b.key, &before).context("after the baseline's from-scratch run")?;
                    let c = baseline(b, &ns, &files.wg_after, &files.ip_change, &log)?;
                    verify::check(&ns, &b.ifname, &b.key, &after).context("after the baseline's change run")?;
                    res.base_scratch.push(s);
                    res.base_change.push(c);
                }
            }
            eprintln!(
                "bench: {n} peers, run {}/{}, {}: from scratch {:.1} ms, change {:.1} ms (state checked)",
                run + 1,
                args.runs,
                if side == Side::Agent { "agent" } else { "baseline" },
                ms(match side {
                    Side::Agent => res.agent_scratch.last().unwrap().wall,
                    Side::Baseline => res.base_scratch.last().map(|(w, i)| w.then(*i).wall).unwrap(),
                }),
                ms(match side {
                    Side::Agent => res.agent_change.last().unwrap().wall,
                    Side::Baseline => res.base_change.last().map(|(w, i)| w.then(*i).wall).unwrap(),
                }),
            );
            // Daemon first (SIGTERM, socket removed), then the namespace with the routes.
            drop(daemon);
            drop(ns);
        }
    }
    let _ = std::fs::remove_dir_all(&files.state_dir);
    Ok(res)
}

fn next_seq() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Starts `run` on an already converged config, waits for its first pass, renames `next`
/// over the config and times until the agent reports the change applied.
fn live_change(b: &Bench, ns: &Netns, config: &Path, next: &Path, log: &Path) -> Result<Duration> {
    use std::io::{BufRead, BufReader, Write};
    let mut cmd = ns.command(&b.agent);
    cmd.args(["run", "--config"]).arg(config).env("WIREFENCE_LOG", "info").env("NO_COLOR", "1");
    cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().context("start the agent daemon")?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut logf = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(logf, "{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).with_context(|| format!("agent daemon: no \"{what}\" line"))?;
            if line.contains("config rejected") || line.contains("partly applied") {
                bail!("agent daemon: {line}");
            }
            if line.contains(what) {
                return Ok(());
            }
        }
    };
    let result = (|| {
        wait_for("converged")?;
        let tmp = config.with_extension("tmp");
        std::fs::copy(next, &tmp)?;
        let t = Instant::now();
        std::fs::rename(&tmp, config)?;
        wait_for("config change applied")?;
        Ok(t.elapsed())
    })();
    let _ = nix_kill(child.id());
    let _ = child.wait();
    result
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    // SAFETY: kill(2) with a pid we spawned.
    match unsafe { libc::kill(pid as i32, libc::SIGTERM) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn agent_cmd(b: &Bench, ns: &Netns, config: &Path) -> Command {
    let mut cmd = ns.command(&b.agent);
    cmd.args(["run", "--once", "--config"]).arg(config);
    cmd
}

/// `wg syncconf` then `ip -batch`, each timed.
fn baseline(b: &Bench, ns: &Netns, wg_conf: &Path, batch: &Path, log: &Path) -> Result<(Sample, Sample)> {
    let mut wg = ns.command("wg");
    wg.args(["syncconf", &b.ifname]).arg(wg_conf);
    let w = run_timed(wg, log)?;
    let mut ip = ns.command("ip");
    ip.arg("-batch").arg(batch);
    let i = run_timed(ip, log)?;
    Ok((w, i))
}

fn preflight() -> Result<()> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench creates network namespaces and tunnels: run it as root");
    }
    for (tool, package) in [("ip", "iproute2"), ("wg", "wireguard-tools"), ("wireguard-go", "wireguard-go")] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` not found on PATH; install it with `apt-get install --no-install-recommends {package}`");
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// Writes a file holding a private key, readable by the owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("write {}", path.display()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints the table; returns how many goals were missed.
fn print_report(all: &[Results], runs: u32, took: Duration) -> usize {
    let wall = |v: &[Sample]| median(&v.iter().map(|s| ms(s.wall)).collect::<Vec<_>>());
    let cpu = |v: &[Sample]| median(&v.iter().map(|s| ms(s.cpu)).collect::<Vec<_>>());
    let rss = |v: &[Sample]| median(&v.iter().map(|s| s.max_rss_kib).collect::<Vec<_>>());
    let base = |v: &[(Sample, Sample)]| v.iter().map(|(w, i)| w.then(*i)).collect::<Vec<_>>();
    let daemon_start = median(&all.iter().flat_map(|r| r.daemon_start.iter().map(|d| ms(*d))).collect::<Vec<_>>());

    println!();
    println!(
        "wirefence bench: userspace backend (wireguard-go), median of {runs} run(s), 2 allowed-ips = 2 routes per peer"
    );
    println!("  agent:    wirefence-agent run --once --config <toml>          (release build); \"running\": the change renamed over");
    println!(
        "            the config of a running `wirefence-agent run`, timed until it logs \"config change applied\""
    );
    println!("  baseline: wg syncconf <if> <conf> + ip -batch <file>          (from scratch: link up, 2 addresses, all routes;");
    println!("            change: wg syncconf with the new full config, ip -batch deleting/adding only the changed peers' routes)");
    println!(
        "  daemon start-up EXCLUDED from both: wireguard-go is started and answering before every timed step \
         (the agent adopts it); it takes {daemon_start:.1} ms (median)"
    );
    println!(
        "  every timed step is followed by a state check (peers, allowed-ips, link, addresses, routes): all passed"
    );
    println!("  chg % scratch: a side's change time as % of its own from-scratch time (the goal is on the agent's; the baseline's is context)");
    println!();
    println!(
        "{:<28} {:>9} {:>11} {:>10} {:>10} {:>9}  {:<36} {:>6} {:>9} {:>9}",
        "case",
        "agent ms",
        "baseline ms",
        "agent/base",
        "agent chg",
        "base chg",
        "goal",
        "result",
        "agent CPU",
        "agent RSS"
    );
    println!(
        "{:<28} {:>9} {:>11} {:>10} {:>10} {:>9}  {:<36} {:>6} {:>9} {:>9}",
        "", "", "", "", "% scratch", "% scratch", "", "", "ms", "MiB"
    );
    let mut missed = 0;
    for r in all {
        let (a, bs) = (wall(&r.agent_scratch), wall(&base(&r.base_scratch)));
        let ratio = a / bs;
        let ok = ratio <= GOAL_SCRATCH_RATIO;
        missed += usize::from(!ok);
        println!(
            "{:<28} {:>9.1} {:>11.1} {:>9.2}x {:>10} {:>9}  {:<36} {:>6} {:>9.1} {:>9.1}",
            format!("from scratch, {} peers", r.peers),
            a,
            bs,
            ratio,
            "-",
            "-",
            format!("agent <= {GOAL_SCRATCH_RATIO:.1}x baseline"),
            if ok { "met" } else { "MISSED" },
            cpu(&r.agent_scratch),
            mib(rss(&r.agent_scratch)),
        );
        let (c, bc) = (wall(&r.agent_change), wall(&base(&r.base_change)));
        println!(
            "{:<28} {:>9.1} {:>11.1} {:>9.2}x {:>9.1}% {:>8.1}%  {:<36} {:>6} {:>9.1} {:>9.1}",
            format!("{} of {} changed, --once", r.changed, r.peers),
            c,
            bc,
            c / bc,
            c / a * 100.0,
            bc / bs * 100.0,
            "(context: new process, full observe)",
            "-",
            cpu(&r.agent_change),
            mib(rss(&r.agent_change)),
        );
        let l = median(&r.agent_live_change.iter().map(|d| ms(*d)).collect::<Vec<_>>());
        let share = l / a;
        let ok = share < GOAL_CHANGE_SHARE;
        missed += usize::from(!ok);
        println!(
            "{:<28} {:>9.1} {:>11.1} {:>9.2}x {:>9.1}% {:>8.1}%  {:<36} {:>6} {:>9} {:>9}",
            format!("{} of {} changed, running", r.changed, r.peers),
            l,
            bc,
            l / bc,
            share * 100.0,
            bc / bs * 100.0,
            format!("change < {:.0}% of agent from scratch", GOAL_CHANGE_SHARE * 100.0),
            if ok { "met" } else { "MISSED" },
            "-",
            "-",
        );
    }
    if let Some(big) = all.iter().max_by_key(|r| r.peers) {
        let peak = big.agent_scratch.iter().map(|s| s.max_rss_kib).max().unwrap_or(0);
        println!();
        println!(
            "agent peak RSS at {} peers, from scratch: {:.1} MiB (median {:.1} MiB over {} runs; wait4 ru_maxrss)",
            big.peers,
            mib(peak),
            mib(rss(&big.agent_scratch)),
            big.agent_scratch.len()
        );
        if let Some(d) = big.daemon_rss_kib.iter().max() {
            println!("wireguard-go peak RSS at {} peers (for comparison, VmHWM): {:.1} MiB", big.peers, mib(*d));
        }
    }
    println!();
    println!("samples (wall ms; baseline as wg syncconf + ip -batch):");
    let list = |v: Vec<f64>| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
    for r in all {
        let split = |v: &[(Sample, Sample)]| {
            v.iter().map(|(w, i)| format!("{:.1}+{:.1}", ms(w.wall), ms(i.wall))).collect::<Vec<_>>().join(", ")
        };
        println!(
            "  {:>6} peers  from scratch: agent [{}]  baseline [{}]",
            r.peers,
            list(r.agent_scratch.iter().map(|s| ms(s.wall)).collect()),
            split(&r.base_scratch)
        );
        println!(
            "  {:>6} peers  change:       agent [{}]  running agent [{}]  baseline [{}]",
            r.peers,
            list(r.agent_change.iter().map(|s| ms(s.wall)).collect()),
            list(r.agent_live_change.iter().map(|d| ms(*d)).collect()),
            split(&r.base_change)
        );
    }
    println!();
    println!(
        "goals: {}; total bench time {:.1} s",
        if missed == 0 { "all met".to_owned() } else { format!("{missed} MISSED") },
        took.as_secs_f64()
    );
    missed
}
