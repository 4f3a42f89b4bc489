//! `cargo xtask fuzz`: builds and runs the cargo-fuzz target `update_decoder` (fuzz/, the
//! control-plane update decoder and version tracker) for a fixed time. `cargo xtask test`
//! runs it briefly as one test.
//!
//! cargo-fuzz needs nightly flags (`-Z sanitizer`, ...): the stable toolchain takes them with
//! RUSTC_BOOTSTRAP=1. The target does not load eBPF programs, so AYA_BUILD_SKIP=1 skips their
//! build. New corpus entries go to `fuzz/target/corpus/update_decoder` (the seeds in
//! `fuzz/corpus/update_decoder` stay as generated), failing inputs to `fuzz/artifacts/`.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::workspace::Workspace;

const TARGET: &str = "update_decoder";

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long to fuzz, in seconds.
    #[arg(long, default_value_t = 600)]
    secs: u64,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    fuzz(&Workspace::locate()?, args.secs)
}

/// Builds the target and fuzzes it for `secs` seconds: an error if cargo-fuzz is missing, the
/// target does not build or the fuzzer finds a failing input.
pub fn fuzz(ws: &Workspace, secs: u64) -> Result<()> {
    let cargo_fuzz = |args: &[&str]| -> Command {
        let mut cmd = ws.cargo_cmd();
        cmd.arg("fuzz").args(args).env("RUSTC_BOOTSTRAP", "1").env("AYA_BUILD_SKIP", "1");
        cmd
    };
    let installed = cargo_fuzz(&["--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !installed.is_ok_and(|s| s.success()) {
        bail!("cargo-fuzz is not installed: run scripts/install.sh (`cargo install cargo-fuzz --locked`)");
    }
    eprintln!("xtask fuzz: building fuzz target {TARGET}");
    if !cargo_fuzz(&["build", TARGET]).status().context("cargo fuzz build")?.success() {
        bail!("FUZZ TARGET {TARGET} DOES NOT BUILD (cargo fuzz build {TARGET}; errors above)");
    }
    let work = ws.root.join("fuzz/target/corpus").join(TARGET);
    std::fs::create_dir_all(&work).with_context(|| work.display().to_string())?;
    let seeds = ws.root.join("fuzz/corpus").join(TARGET);
    eprintln!("xtask fuzz: fuzzing {TARGET} for {secs} s");
    let status = cargo_fuzz(&["run", TARGET])
        .arg(&work)
        .arg(&seeds)
        .args(["--", &format!("-max_total_time={secs}"), "-timeout=10", "-print_final_stats=1"])
        .status()
        .context("cargo fuzz run")?;
    if !status.success() {
        bail!(
            "FUZZER FOUND A FAILING INPUT in {TARGET} ({status}; details above): reproduce with \
             `RUSTC_BOOTSTRAP=1 AYA_BUILD_SKIP=1 cargo fuzz run {TARGET} fuzz/artifacts/{TARGET}/<input>`"
        );
    }
    Ok(())
}
