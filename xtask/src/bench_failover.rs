//! `cargo xtask bench-failover`: how fast a route group fails over, against the goal.
//!
//! The lab of `tests/tests/route_group.rs` (`wirefence_tests::route_group`): h2 (priority
//! 200) and h3 (100) route one subnet, each with a TCP check every 300 ms that fails after
//! two misses; h1, a remote site, exchanges a line with a TCP service on the LAN host. Each
//! round takes h2's LAN link down and times, from that moment, until h1's exchange (probed
//! every 100 ms, a fresh connection each) succeeds again, through h3; then brings the link
//! back and waits until the control plane gives the subnet back to h2 after its hold-down
//! (short here, `--hold-down`, so rounds are quick). Reported: p50, p99 and max over the
//! rounds, against the goal (3 s) and beside headscale's probe (every 10 s, 5 s timeout).

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use wirefence_tests::route_group::GroupLab;
use wirefence_tests::wait_until;

/// The goal for traffic to resume through the standby.
const GOAL: Duration = Duration::from_secs(3);
/// headscale's HA subnet-router probe: every 10 s, 5 s timeout (so a failure is seen
/// 5-15 s after it happens).
const HEADSCALE_BEST: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct BenchFailoverArgs {
    /// Failovers timed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    failovers: u32,
    /// The control plane's hold-down before the recovered primary takes its subnet back.
    #[arg(long, default_value = "1s")]
    hold_down: String,
    /// Use release builds (the default is debug: the failover time is network and timer
    /// bound, and debug builds are what the test suite has built already).
    #[arg(long)]
    release: bool,
    /// Exit non-zero when the goal is missed.
    #[arg(long)]
    enforce_goal: bool,
}

pub fn run(args: BenchFailoverArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-failover creates network namespaces and needs root");
    }
    let bins = crate::workspace::Workspace::locate()?.build_bins(args.release)?;
    std::env::set_var("WIREFENCE_AGENT_BIN", &bins.agent);
    std::env::set_var("WIREFENCE_CONTROL_BIN", &bins.control);
    let g = GroupLab::start(&["--route-hold-down", &args.hold_down]);
    let limit = Duration::from_secs(30);
    let mut times = Vec::new();
    for round in 1..=args.failovers {
        ensure!(g.routed_to(2), "round {round}: h2 is not the primary at the start");
        g.lan_link(2, false);
        let took = g.until_reachable(limit);
        ensure!(g.routed_to(3), "round {round}: the subnet reached h1 but not through h3");
        eprintln!("bench-failover: round {round}: {took:?}");
        times.push(took);
        g.lan_link(2, true);
        wait_until("h2 takes the subnet back after the hold-down", limit, || g.routed_to(2));
        g.until_reachable(limit);
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
    let (p50, p99, max) = (pct(0.50), pct(0.99), *times.last().expect("at least one round"));
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "\nbench-failover: {} failovers (h2's LAN link down, TCP check every 300 ms, 2 misses), \
         {} builds, hold-down {}",
        times.len(),
        if args.release { "release" } else { "debug" },
        args.hold_down
    );
    println!("{:<44} {:>10} {:>10}  goal", "traffic resumed through the standby", "value", "ratio");
    for (name, d) in [("p50", p50), ("p99", p99), ("max", max)] {
        let verdict = if d <= GOAL { "met" } else { "MISSED" };
        println!("{name:<44} {:>10} {:>9.2}x  <= 3 s ({verdict})", ms(d), d.as_secs_f64() / GOAL.as_secs_f64());
    }
    println!(
        "{:<44} {:>10} {:>9.2}x  (headscale sees a failure 5-15 s after it, before any route moves)",
        "p99 vs headscale's fastest detection",
        ms(HEADSCALE_BEST),
        p99.as_secs_f64() / HEADSCALE_BEST.as_secs_f64()
    );
    if args.enforce_goal && p99 > GOAL {
        bail!("failover p99 {p99:?} is over the goal of {GOAL:?}");
    }
    Ok(())
}
