//! `cargo xtask deb`: the Debian packages `wirefence-agent` and `wirefence-control`, built
//! with cargo-deb from release binaries into `target/debian/`.
//!
//! 1. `cargo build --release` of both binaries (the agent embeds its eBPF object);
//! 2. each binary's `generate-docs` writes its man pages and shell completions from its
//!    clap definition into `target/release/docgen/<package>/`;
//! 3. `cargo deb --no-build` packages them with the files of `packaging/` (units, sysusers,
//!    examples, rt_protos.d) as each crate's `[package.metadata.deb]` lists them.
//!
//! `--check` (and `cargo xtask test`) then verifies the packages ([`check`]).

pub mod check;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::vm::tools;
use crate::workspace::Workspace;

/// The cargo-deb release the packaging metadata is written for; scripts/install.sh
/// installs it.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

#[derive(clap::Args)]
pub struct DebArgs {
    /// Also check the packages: lintian, `systemd-analyze verify` of the units and their
    /// contents (what `cargo xtask test` runs).
    #[arg(long)]
    check: bool,
}

/// One package: its Cargo package (which holds the `[package.metadata.deb]`) and binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Package {
    Agent,
    Control,
}

impl Package {
    pub const ALL: [Package; 2] = [Package::Agent, Package::Control];

    /// The Cargo package, the Debian package and the binary: one name.
    pub fn name(self) -> &'static str {
        match self {
            Package::Agent => "wirefence-agent",
            Package::Control => "wirefence-control",
        }
    }
}

/// A built package.
#[derive(Debug)]
pub struct Deb {
    pub package: Package,
    pub path: PathBuf,
}

pub fn run(args: DebArgs) -> Result<()> {
    let ws = Workspace::locate()?;
    let started = Instant::now();
    let debs = build(&ws)?;
    eprintln!("xtask deb: built in {:.0} s", started.elapsed().as_secs_f64());
    if args.check {
        check::check_all(&ws, &debs)?;
        eprintln!("xtask deb: the packages pass lintian, systemd-analyze verify and the contents check");
    }
    // Last and on stdout, one per line: what scripts (the VM test, Vagrant) pick up.
    for deb in &debs {
        println!("{}", deb.path.display());
    }
    Ok(())
}

/// Builds both packages into `<target>/debian/` and returns their paths.
pub fn build(ws: &Workspace) -> Result<Vec<Deb>> {
    require_cargo_deb(ws)?;
    let bins = ws.build_bins(true).context("building the release binaries")?;
    let docgen = ws.target_dir.join("release/docgen");
    let out_dir = ws.target_dir.join("debian");
    let mut debs = Vec::new();
    for package in Package::ALL {
        let bin = match package {
            Package::Agent => &bins.agent,
            Package::Control => &bins.control,
        };
        generate_docs(bin, &docgen.join(package.name()))?;
        debs.push(Deb { package, path: cargo_deb(ws, package, &out_dir)? });
    }
    Ok(debs)
}

fn require_cargo_deb(ws: &Workspace) -> Result<()> {
    let version = match ws.cargo_cmd().args(["deb", "--version"]).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => bail!(
            "cargo-deb is not installed: run scripts/install.sh (cargo install --locked cargo-deb@{CARGO_DEB_VERSION})"
        ),
    };
    if !version.ends_with(CARGO_DEB_VERSION) {
        eprintln!("xtask deb: found {version:?}; the packaging is written for cargo-deb {CARGO_DEB_VERSION}");
    }
    Ok(())
}

/// Runs `BIN generate-docs` into a fresh `dir` (no page of a removed subcommand survives).
fn generate_docs(bin: &Path, dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => {}
    }
    let written = tools::output(std::process::Command::new(bin).arg("generate-docs").arg("--out").arg(dir))?;
    eprintln!("xtask deb: {} wrote {} man pages and completions", bin.display(), written.lines().count());
    // Debian wants man pages gzipped, and cargo-deb compresses only assets it did not find
    // under target/release. -n: no name or time stamp, so the same page gives the same bytes.
    let pages: Vec<&str> = written.lines().filter(|l| l.ends_with(".1")).collect();
    anyhow::ensure!(!pages.is_empty(), "{} generate-docs wrote no man page", bin.display());
    tools::output(std::process::Command::new("gzip").args(["-9nf"]).args(&pages))?;
    Ok(())
}

/// `cargo deb --no-build -p PACKAGE`; returns the path of the .deb it wrote.
fn cargo_deb(ws: &Workspace, package: Package, out_dir: &Path) -> Result<PathBuf> {
    let mut cmd = ws.cargo_cmd();
    cmd.args(["deb", "--locked", "--no-build", "-p", package.name(), "--output"]).arg(out_dir);
    eprintln!("xtask deb: {cmd:?}");
    let out = tools::output(&mut cmd)?;
    // cargo-deb prints the package's path last.
    let path = out.lines().rev().map(str::trim).find(|l| l.ends_with(".deb")).map(PathBuf::from);
    match path {
        Some(path) if path.is_file() => Ok(path),
        _ => bail!("cargo deb -p {} printed no .deb path that exists:\n{out}", package.name()),
    }
}
