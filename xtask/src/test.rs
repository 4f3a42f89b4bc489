//! `cargo xtask test`: the whole suite, as CI runs it. Privileged: it needs root.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::workspace::Workspace;

/// How long the suite fuzzes the update decoder (`cargo xtask fuzz` runs longer).
const FUZZ_SECS: u64 = 40;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the qemu VM test of the kernel backend (for quick local runs; CI runs it).
    #[arg(long)]
    no_vm: bool,
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    /// The names of the libtest tests that failed, repeated after the summary: CI shows only
    /// the end of a long log.
    failures: Vec<String>,
    /// Where each failed test panicked and the panic's first line, from libtest's failure
    /// report ("---- name stdout ----", then "thread 'name' panicked at file:line:col:").
    panics: Vec<(String, String)>,
    /// The test whose failure report is being read, and whether its panic line was just seen.
    reading: Option<(String, bool)>,
}

impl Tally {
    /// Adds a libtest summary line ("test result: ok. 9 passed; 0 failed; ...").
    fn add(&mut self, line: &str) {
        if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
            self.failures.push(name.to_string());
        }
        if let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) {
            self.reading = Some((name.to_string(), false));
        } else if let Some((name, at_panic)) = &mut self.reading {
            if *at_panic {
                // The line after the location: the assertion or the panic message.
                let (_, place) = self.panics.last_mut().expect("pushed with the location");
                *place = format!("{place} {line}");
                self.reading = None;
            } else if let Some((_, place)) = line.split_once(" panicked at ") {
                self.panics.push((name.clone(), place.to_string()));
                *at_panic = true;
            }
        }
        let Some(rest) = line.strip_prefix("test result: ") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else { continue };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the test suite creates network namespaces and needs root: run it as root (CI does)");
    }
    let ws = Workspace::locate()?;
    let mut tally = Tally::default();
    // Seconds, before minutes of building: a dependency that breaks the policy fails fast.
    if let Err(e) = crate::deny::check(&ws) {
        println!("xtask test: 0 passed, 1 failed");
        return Err(e.context("the dependency policy"));
    }
    tally.passed += 1;
    // The integration tests run the agent and control-plane binaries, so build them first
    // (the upgrade tests' second agent build before: the plain build's binary is the last one).
    ws.build_next_layout_agent().context("building the agent's next-layout build")?;
    ws.build_bins(false).context("building the agent and the control plane")?;

    // Every test binary runs even after one fails, so the tally counts the whole suite.
    let mut child = ws
        .cargo_cmd()
        .args(["test", "--workspace", "--no-fail-fast"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cargo test")?;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        tally.add(&line);
    }
    let tests_ok = child.wait()?.success();

    // One test: the fuzz target builds and finds no failing input in FUZZ_SECS.
    let fuzz = crate::fuzz::fuzz(&ws, FUZZ_SECS);
    if let Err(e) = &fuzz {
        eprintln!("xtask test: fuzzing failed: {e:#}");
    }
    match fuzz.is_ok() {
        true => tally.passed += 1,
        false => tally.failed += 1,
    }

    // HA subnet routers: 20 failovers of a route group timed against the 3 s (the
    // benchmark, run here with its goal enforced; about a minute). One test.
    let failover = Command::new(std::env::current_exe()?)
        .args(["bench-failover", "--failovers", "20", "--enforce-goal"])
        .status()
        .map_err(anyhow::Error::from)
        .and_then(|s| if s.success() { Ok(()) } else { Err(anyhow::anyhow!("bench-failover: {s}")) });
    if let Err(e) = &failover {
        eprintln!("xtask test: the failover benchmark failed: {e:#}");
    }
    match failover.is_ok() {
        true => tally.passed += 1,
        false => tally.failed += 1,
    }

    // The Debian packages (release build, ~8 minutes more on 2 cores) and their checks:
    // lintian, systemd-analyze verify, contents. One test.
    let debs = crate::deb::build(&ws);
    let packages = match &debs {
        Ok(debs) => crate::deb::check::check_all(&ws, debs),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    if let Err(e) = &packages {
        eprintln!("xtask test: the Debian packages failed: {e:#}");
    }
    match packages.is_ok() {
        true => tally.passed += 1,
        false => tally.failed += 1,
    }

    // The control plane's benches, smaller: push latency (20 changes, SQLite and across two
    // replicas on PostgreSQL), fan-out over two replicas (500 watchers), 5 failovers behind
    // HAProxy, 50,000 flow records ingested on each engine, and 1,000 and 2,000 simulated
    // agents in a full mesh, on the release builds the packages made (a few minutes). Fails
    // when an agent or watcher misses a change or the mesh, a failover does not complete, or
    // records go missing; the times and rates are reported. One test.
    let scale = Command::new(std::env::current_exe()?)
        .args(["bench-control", "--no-flood", "--no-fanout", "--changes", "20"])
        .args(["--replica-agents", "500", "--kills", "5", "--scale", "1000,2000"])
        .args(["--ingest-records", "50000"])
        .status()
        .map_err(anyhow::Error::from)
        .and_then(|s| if s.success() { Ok(()) } else { Err(anyhow::anyhow!("bench-control: {s}")) });
    if let Err(e) = &scale {
        eprintln!("xtask test: the control plane's scale benchmark failed: {e:#}");
    }
    match scale.is_ok() {
        true => tally.passed += 1,
        false => tally.failed += 1,
    }

    // The Vagrant lab's definition (provider options are checked only where a provider runs).
    let lab_ok = crate::lab::validate(&ws);
    if let Err(e) = &lab_ok {
        eprintln!("xtask test: vagrant validate failed: {e:#}");
    }
    match lab_ok.is_ok() {
        true => tally.passed += 1,
        false => tally.failed += 1,
    }

    let vm_ok = if args.no_vm {
        eprintln!("xtask test: VM tests skipped (--no-vm); the full suite includes them");
        true
    } else if debs.is_err() {
        // The guests run what the packages ship: without packages there is nothing to test.
        eprintln!("xtask test: VM tests not run: the Debian packages did not build");
        tally.failed += 3;
        false
    } else {
        // The packaged binaries: the kernel backend and policy on both attach paths, clsact
        // (6.1) and tcx (6.12), and the Vagrant lab's scenario on a Debian 12 machine with
        // its own kernel, the packages installed with dpkg and run by systemd.
        let debs_dir = ws.target_dir.join("debian");
        let mut all_ok = true;
        let runs: [(&str, &str, &[&str]); 3] = [
            ("6.1", "kernel-backend.sh", &[]),
            ("6.12", "kernel-backend.sh", &[]),
            // A whole Debian boot and four daemons under TCG: some 3 minutes here.
            ("6.1", "lab-vm.sh", &["--systemd", "--timeout", "600"]),
        ];
        for (kernel, script, extra) in runs {
            let ok = Command::new(std::env::current_exe()?)
                .args(["vm-test", "--kernel", kernel, "--script", script, "--debs"])
                .arg(&debs_dir)
                .args(extra)
                .status()?
                .success();
            match ok {
                true => tally.passed += 1,
                false => tally.failed += 1,
            }
            all_ok &= ok;
        }
        all_ok
    };
    for name in &tally.failures {
        match tally.panics.iter().find(|(n, _)| n == name) {
            Some((_, place)) => println!("xtask test: FAILED {name}: panicked at {place}"),
            None => println!("xtask test: FAILED {name}"),
        }
    }
    println!("xtask test: {} passed, {} failed", tally.passed, tally.failed);
    anyhow::ensure!(tests_ok, "cargo test failed");
    fuzz.context("fuzzing the update decoder")?;
    failover.context("the failover benchmark")?;
    scale.context("the control plane's scale benchmark")?;
    packages.context("the Debian packages")?;
    lab_ok.context("the Vagrant lab")?;
    anyhow::ensure!(vm_ok, "a VM test failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn the_tally_counts_summaries_and_names_failures() {
        let mut tally = Tally::default();
        for line in [
            "test store::a ... ok",
            "test ha::kill_one ... FAILED",
            "failures:",
            "",
            "---- ha::kill_one stdout ----",
            "a line the test printed",
            "thread 'ha::kill_one' (4711) panicked at tests/ha.rs:90:5:",
            "assertion failed: resumed",
            "note: run with `RUST_BACKTRACE=1`",
            "test result: FAILED. 9 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "test result: ok. 3 passed; 0 failed; 1 ignored",
        ] {
            tally.add(line);
        }
        assert_eq!((tally.passed, tally.failed), (12, 1));
        assert_eq!(tally.failures, ["ha::kill_one"]);
        let place = ("ha::kill_one".to_string(), "tests/ha.rs:90:5: assertion failed: resumed".to_string());
        assert_eq!(tally.panics, [place]);
    }
}
