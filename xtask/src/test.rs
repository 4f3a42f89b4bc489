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
}

impl Tally {
    /// Adds a libtest summary line ("test result: ok. 9 passed; 0 failed; ...").
    fn add(&mut self, line: &str) {
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

    let mut child =
        ws.cargo_cmd().args(["test", "--workspace"]).stdout(Stdio::piped()).spawn().context("cargo test")?;
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

    // The Debian packages (release build, ~8 minutes more on 2 cores) and their checks:
    // lintian, systemd-analyze verify, contents. One test.
    let packages = crate::deb::build(&ws).and_then(|debs| crate::deb::check::check_all(&ws, &debs));
    if let Err(e) = &packages {
        eprintln!("xtask test: the Debian packages failed: {e:#}");
    }
    match packages.is_ok() {
        true => tally.passed += 1,
        false => tally.failed += 1,
    }

    let vm_ok = if args.no_vm {
        eprintln!("xtask test: VM test skipped (--no-vm); the full suite includes it");
        true
    } else {
        // Both attach paths of the policy: clsact (6.1) and tcx (6.12), one test each.
        let mut all_ok = true;
        for kernel in ["6.1", "6.12"] {
            let ok = Command::new(std::env::current_exe()?).args(["vm-test", "--kernel", kernel]).status()?.success();
            match ok {
                true => tally.passed += 1,
                false => tally.failed += 1,
            }
            all_ok &= ok;
        }
        all_ok
    };
    println!("xtask test: {} passed, {} failed", tally.passed, tally.failed);
    anyhow::ensure!(tests_ok, "cargo test failed");
    fuzz.context("fuzzing the update decoder")?;
    packages.context("the Debian packages")?;
    anyhow::ensure!(vm_ok, "kernel backend VM test failed");
    Ok(())
}
