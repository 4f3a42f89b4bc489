//! `cargo xtask bench-policy`: the access policy's costs, in one run, against the
//! issue's goals.
//!
//! 1. Per-packet cost of the classifiers under BPF_PROG_TEST_RUN at 10 to 100,000 rules,
//!    IPv4 and IPv6, new and established flows, next to a no-op classifier
//!    ([`perpacket`]).
//! 2. iperf3 TCP throughput through a veth pair with 10,000 rules enforced on the receiver
//!    by the eBPF programs, by nftables as a linear chain and by an nftables set, and with
//!    no filter ([`throughput`]).
//! 3. Policy swap time for 100,000 rules and for a one-rule change on top ([`swap`]).
//! 4. MSS clamping's cost per packet, off against on ([`mss`]).
//! 5. The live trace's cost per packet: before it existed, no trace running, armed
//!    ([`trace`]).
//!
//! Rules are generated ([`rules`]), compiled by the agent's compiler and written by its
//! `Enforcer` into maps pinned under a bpffs the bench mounts (`/run/wirefence-bench-bpf`)
//! and cleans up. The compiler and writer are timed in-process, so the bench re-runs itself
//! as an optimized (release) build when started from a debug one. Needs root, iperf3, nft.

mod bpf;
mod flows;
mod mss;
mod net;
mod perpacket;
mod rules;
mod swap;
mod throughput;
mod trace;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const BPFFS: &str = "/run/wirefence-bench-bpf";

/// The goals.
const GOAL_RULE_SCALING: f64 = 1.5;
const GOAL_EST_VS_NOOP: f64 = 2.0;
const GOAL_TPUT_VS_NONE: f64 = 0.95;
const GOAL_TPUT_VS_LINEAR: f64 = 10.0;
/// New flows (conntrack insert included) against nftables' best ruleset for 10,000 rules.
const GOAL_NEW_FLOWS_VS_SET: f64 = 2.0;
const GOAL_SWAP_MS: f64 = 500.0;
const GOAL_CHANGE_MS: f64 = 5.0;

#[derive(clap::Args, Debug)]
pub struct BenchPolicyArgs {
    /// Rule counts of the per-packet benchmark (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 1000, 10000, 100000])]
    rules: Vec<u32>,

    /// BPF_PROG_TEST_RUN repetitions per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,

    /// Measurement rounds of the per-packet cases (interleaved); the median is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,

    /// Allowed new flows run one at a time (fresh source port each) per case.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=50000))]
    one_shots: u32,

    /// Rules enforced in the throughput benchmark.
    #[arg(long, default_value_t = 10_000)]
    iperf_rules: u32,

    /// Seconds per iperf3 run (after one omitted second).
    #[arg(long, default_value_t = 3)]
    iperf_seconds: u32,

    /// Seconds per connection-rate and per UDP new-flow run.
    #[arg(long, default_value_t = 1.5)]
    flow_seconds: f64,

    /// Throughput part: measure only UDP new flows/s (no iperf3 stream, no TCP connections).
    #[arg(long)]
    udp_only: bool,

    /// Rounds of the throughput cases (interleaved); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,

    /// Rules of the swap benchmark.
    #[arg(long, default_value_t = 100_000)]
    swap_rules: u32,

    /// Runs of the swap benchmark (each on a fresh enforcer).
    #[arg(long, default_value_t = 3)]
    swap_runs: u32,

    /// Steady-state one-rule changes per swap run.
    #[arg(long, default_value_t = 5)]
    steady_changes: u32,

    /// Run only these parts (per-packet, throughput, swap, mss, trace; comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,

    /// Measure in this (unoptimized) build instead of re-running as a release build.
    #[arg(long)]
    no_release: bool,

    /// Exit non-zero when a goal is missed.
    #[arg(long)]
    enforce_goals: bool,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Re-runs `cargo xtask bench-policy <same args>` from an optimized build.
fn rerun_release() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    eprintln!("bench-policy: the compiler and the map writer are timed in-process: re-running as a release build");
    let status = crate::workspace::Workspace::locate()?
        .cargo_cmd()
        .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(&args)
        .arg("--no-release")
        .status()
        .context("run cargo")?;
    ensure!(status.success(), "bench-policy (release build) failed ({status})");
    Ok(())
}

fn preflight(parts: &Parts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "bench-policy needs root (bpf, namespaces, nftables)");
    ensure!(!wirefence_agent::bpf::object().is_empty(), "the agent was built without its eBPF object (AYA_BUILD_SKIP)");
    if parts.throughput {
        for tool in ["iperf3", "nft", "ss"] {
            ensure!(
                std::process::Command::new(tool).arg("--version").output().is_ok(),
                "{tool} is missing (apt-get install iperf3 nftables iproute2)"
            );
        }
    }
    Ok(())
}

struct Parts {
    per_packet: bool,
    throughput: bool,
    swap: bool,
    mss: bool,
    trace: bool,
}

pub fn run(args: BenchPolicyArgs) -> Result<()> {
    if cfg!(debug_assertions) && !args.no_release {
        return rerun_release();
    }
    let started = Instant::now();
    let want = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let parts = Parts {
        per_packet: want("per-packet"),
        throughput: want("throughput"),
        swap: want("swap"),
        mss: want("mss"),
        trace: want("trace"),
    };
    for o in &args.only {
        ensure!(
            ["per-packet", "throughput", "swap", "mss", "trace"].contains(&o.as_str()),
            "--only: unknown part {o:?}"
        );
    }
    ensure!(args.rules.iter().all(|&n| n >= 1), "--rules: counts must be positive");
    ensure!(args.iperf_rules >= 2 && args.swap_rules >= 2, "--iperf-rules and --swap-rules need at least 2");
    ensure!(args.repeat >= 1 && args.reps >= 1, "--repeat and --reps must be positive");
    preflight(&parts)?;
    net::remove_stale_namespaces();
    let load_before = loadavg();

    let work = std::env::temp_dir().join(format!("wirefence-bench-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let result = (|| -> Result<Report> {
        let fs = bpf::Bpffs::mount(Path::new(BPFFS))?;
        let root: PathBuf = fs.root.join(format!("bench-{}", std::process::id()));
        let mut report = Report::default();
        if parts.per_packet {
            let p = perpacket::Params { repeat: args.repeat, reps: args.reps, one_shots: args.one_shots };
            report.per_packet = perpacket::run(&root, &work, &args.rules, &p)?;
        }
        if parts.throughput {
            let p = throughput::Params {
                rules: args.iperf_rules,
                seconds: args.iperf_seconds,
                rounds: args.rounds,
                flow_seconds: args.flow_seconds,
                udp_only: args.udp_only,
            };
            report.throughput = Some(throughput::run(&root, &work, &p)?);
        }
        if parts.swap {
            report.swap = Some(swap::run(&root, &work, args.swap_rules, args.swap_runs, args.steady_changes)?);
        }
        if parts.mss {
            report.mss = Some(mss::run(&root, &work, args.repeat, args.reps, args.one_shots)?);
        }
        if parts.trace {
            report.trace = Some(trace::run(&root, &work, args.repeat, args.reps)?);
        }
        let _ = std::fs::remove_dir(&root);
        drop(fs);
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    let missed = report.print(&args, started.elapsed(), &load_before, &loadavg());
    if args.enforce_goals && missed > 0 {
        bail!("{missed} goal(s) missed");
    }
    Ok(())
}

#[derive(Default)]
struct Report {
    per_packet: Vec<perpacket::Row>,
    throughput: Option<throughput::Results>,
    swap: Option<swap::Swap>,
    mss: Option<mss::Results>,
    trace: Option<trace::Results>,
}

fn verdict(ok: bool, missed: &mut usize) -> &'static str {
    if ok {
        "met"
    } else {
        *missed += 1;
        "MISSED"
    }
}

impl Report {
    /// Prints the tables; returns how many goals were missed.
    fn print(&self, args: &BenchPolicyArgs, took: Duration, load_before: &str, load_after: &str) -> usize {
        let mut missed = 0;
        println!();
        println!(
            "wirefence bench-policy: kernel {}, {} CPUs, load average {load_before} (start) / {load_after} (end); \
             other work on the machine makes every number noisy: medians throughout",
            kernel_release(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        );
        if !self.per_packet.is_empty() {
            self.print_per_packet(args, &mut missed);
        }
        if let Some(t) = &self.throughput {
            throughput::print(t, args, &mut missed);
        }
        if let Some(s) = &self.swap {
            self.print_swap(s, &mut missed);
        }
        if let Some(m) = &self.mss {
            mss::print(m, args.reps, args.repeat, args.one_shots);
        }
        if let Some(t) = &self.trace {
            trace::print(t, args.reps, args.repeat);
        }
        println!();
        println!(
            "goals: {}; total bench time {:.1} s",
            if missed == 0 { "all met".to_owned() } else { format!("{missed} MISSED") },
            took.as_secs_f64()
        );
        missed
    }

    fn print_per_packet(&self, args: &BenchPolicyArgs, missed: &mut usize) {
        println!();
        println!(
            "1. per-packet cost, BPF_PROG_TEST_RUN of wf_ingress (reply: wf_egress) on Ethernet frames (l3 offset 14); \
             kernel-timed ns/packet, median of {} interleaved rounds of {} repetitions",
            args.reps, args.repeat
        );
        println!(
            "   new (denied): SYN on a port no rule allows, from the last rule's source to its destination, through a copy \
             without the per-CPU caches: full path (1 conntrack miss, 2 class hash probes + 1 policy LPM lookup), \
             nothing inserted; cached: the same through the programs as loaded, where the verdict cache answers the \
             policy lookup (as for a run of new flows differing only in source port)"
        );
        println!(
            "   est fwd / est reply: ACK of a conntrack entry of the current epoch, repeated: the per-CPU flow cache hits; \
             no cache: the same through the copy without caches (the conntrack path: one lookup of the canonical tuple); \
             no-op: r0 = TC_ACT_OK; exit; not-IP: ARP through wf_ingress"
        );
        println!(
            "   new allowed 1-shot: SYNs the last rule allows, fresh source port each (inserts the conntrack entry), one \
             repetition per run, median of {}; includes the runner's timer (no-op 1-shot beside it)",
            args.one_shots
        );
        println!(
            "   rules: distinct /32 (/128) sources, /24 (/64) destinations out of <= 4096, tcp single ports 70%, ranges 30%, \
             direction both; compiled by the agent's compiler, written by Enforcer::apply"
        );
        println!();
        println!(
            "{:<6} {:>7} {:>8} {:>9} {:>9} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>11} {:>14} {:>9} {:>9}",
            "family",
            "rules",
            "entries",
            "compile",
            "apply",
            "no-op",
            "not-IP",
            "new",
            "new",
            "est fwd",
            "est",
            "no cache",
            "new allowed",
            "new vs",
            "est"
        );
        println!(
            "{:<6} {:>7} {:>8} {:>9} {:>9} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>11} {:>14} {:>9} {:>9}",
            "",
            "",
            "",
            "ms",
            "ms",
            "ns",
            "ns",
            "denied",
            "cached",
            "ns",
            "reply ns",
            "fwd/rep ns",
            "1-shot ns",
            "fewest",
            "/ no-op"
        );
        let min_rules = self.per_packet.iter().map(|r| r.rules).min().unwrap_or(0);
        let max_rules = self.per_packet.iter().map(|r| r.rules).max().unwrap_or(0);
        for r in &self.per_packet {
            let base = self
                .per_packet
                .iter()
                .find(|b| b.v6 == r.v6 && b.rules == min_rules)
                .map(|b| b.denied_new)
                .unwrap_or(f64::NAN);
            println!(
                "{:<6} {:>7} {:>8} {:>9.1} {:>9.1} {:>6.1} {:>7.1} {:>7.1} {:>7.1} {:>8.1} {:>8.1} {:>11} {:>7.0} ({:>4.0}) {:>8.2}x {:>8.2}x",
                perpacket::fam(r.v6),
                r.rules,
                r.entries,
                ms(r.compile),
                ms(r.apply),
                r.noop,
                r.not_ip,
                r.denied_new,
                r.denied_cached,
                r.est_fwd,
                r.est_reply,
                format!("{:.0}/{:.0}", r.est_fwd_ct, r.est_reply_ct),
                r.new_1shot,
                r.noop_1shot,
                r.denied_new / base,
                r.est() / r.noop,
            );
        }
        println!();
        for v6 in [false, true] {
            let of = |n: u32| self.per_packet.iter().find(|r| r.v6 == v6 && r.rules == n);
            if let (Some(lo), Some(hi)) = (of(min_rules), of(max_rules)) {
                if min_rules != max_rules {
                    let ratio = hi.denied_new / lo.denied_new;
                    let shot = hi.new_1shot / lo.new_1shot;
                    println!(
                        "   goal {}: new flow at {max_rules} rules <= {GOAL_RULE_SCALING}x at {min_rules}: {:.1} / {:.1} ns = {ratio:.2}x  {}   \
                         (allowed 1-shot: {shot:.2}x; est fwd: {:.2}x)",
                        perpacket::fam(v6),
                        hi.denied_new,
                        lo.denied_new,
                        verdict(ratio <= GOAL_RULE_SCALING, missed),
                        hi.est_fwd / lo.est_fwd,
                    );
                }
            }
            let rows: Vec<_> = self.per_packet.iter().filter(|r| r.v6 == v6).collect();
            if let Some(worst) = rows.iter().max_by(|a, b| (a.est() / a.noop).total_cmp(&(b.est() / b.noop))) {
                let ratio = worst.est() / worst.noop;
                println!(
                    "   goal {}: established <= {GOAL_EST_VS_NOOP}x no-op: worst {:.1} / {:.1} ns = {ratio:.2}x (at {} rules, \
                     the slower direction)  {}   (conntrack path, no cache: fwd {:.2}x, reply {:.2}x)",
                    perpacket::fam(v6),
                    worst.est(),
                    worst.noop,
                    worst.rules,
                    verdict(ratio <= GOAL_EST_VS_NOOP, missed),
                    worst.est_fwd_ct / worst.noop,
                    worst.est_reply_ct / worst.noop,
                );
            }
        }
    }

    fn print_swap(&self, s: &swap::Swap, missed: &mut usize) {
        println!();
        let entries = s.swap.first().map(|x| x.entries).unwrap_or(0);
        println!(
            "3. policy swap, {} IPv4 rules ({} policy-map entries): compile = Policy::new + Editable::new (full \
             compile and edit index) or Editable::replace (one rule); apply = Enforcer::apply or apply_change (ids, \
             diff, bpf(2) writes, counter resets, slot file, flip); sync = Enforcer::sync_standby after it (RCU grace \
             period, then the standby generation brought up to date; background in the daemon, not in the total); \
             median of {} run(s)",
            s.rules,
            entries,
            s.swap.len()
        );
        println!();
        println!(
            "{:<36} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}  {:>8} {:>9}  {:<16} {:>6}",
            "step", "compile", "apply", "total", "map ops", "counter", "us per", "sync", "sync", "goal", "result"
        );
        println!(
            "{:<36} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}  {:>8} {:>9}",
            "", "ms", "ms", "ms", "", "resets", "map op", "ms", "map ops"
        );
        let m = |v: &[swap::Step], f: &dyn Fn(&swap::Step) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let mut line = |name: &str, v: &[swap::Step], goal: f64| {
            if v.is_empty() {
                return;
            }
            let (c, a) = (m(v, &|x| ms(x.compile)), m(v, &|x| ms(x.apply)));
            let t = m(v, &|x| ms(x.compile + x.apply));
            let ops = |x: &swap::Step| (x.map_ops + x.counter_resets + 1) as f64;
            // Per operation only where there are enough of them to divide by.
            let per = if m(v, &ops) >= 1000.0 {
                format!("{:.2}", m(v, &|x| ms(x.apply) * 1e3 / ops(x)))
            } else {
                "-".to_owned()
            };
            println!(
                "{name:<36} {c:>8.1} {a:>8.1} {t:>8.1} {:>9.0} {:>8.0} {per:>8}  {:>8.1} {:>9.0}  {:<16} {:>6}",
                m(v, &|x| x.map_ops as f64),
                m(v, &|x| x.counter_resets as f64),
                m(v, &|x| ms(x.sync)),
                m(v, &|x| x.sync_ops as f64),
                format!("total < {goal:.0} ms"),
                verdict(t < goal, missed),
            );
        };
        line(&format!("swap 10 -> {} rules", s.rules), &s.swap, GOAL_SWAP_MS);
        line("1-rule change, first after the swap", &s.first_change, GOAL_CHANGE_MS);
        line("1-rule change, steady state", &s.steady_change, GOAL_CHANGE_MS);
        println!();
        let list = |v: &[swap::Step]| {
            v.iter().map(|x| format!("{:.1}+{:.1}", ms(x.compile), ms(x.apply))).collect::<Vec<_>>().join(", ")
        };
        println!("   samples (compile+apply ms): swap [{}]", list(&s.swap));
        println!("   first change [{}]", list(&s.first_change));
        println!("   steady changes [{}]", list(&s.steady_change));
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "?".into())
}
