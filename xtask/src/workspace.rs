//! Where the workspace is and how to build in it: `cargo metadata`, asked once, through the
//! cargo that runs xtask.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::vm::tools;

pub struct Bins {
    pub agent: PathBuf,
    pub control: PathBuf,
}

pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub cargo: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        // `cargo xtask` runs us through cargo, which tells us which cargo it is.
        let cargo = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let out = tools::output(
            Command::new(&cargo)
                .args(["metadata", "--format-version", "1", "--no-deps", "--manifest-path"])
                .arg(&manifest),
        )?;
        let meta: serde_json::Value = serde_json::from_str(&out).context("cannot parse `cargo metadata` output")?;
        let path = |key: &str| -> Result<PathBuf> {
            meta[key].as_str().map(PathBuf::from).with_context(|| format!("`cargo metadata` has no {key}"))
        };
        Ok(Self { root: path("workspace_root")?, target_dir: path("target_directory")?, cargo })
    }

    pub fn build_agent(&self, release: bool) -> Result<PathBuf> {
        Ok(self.build_bins(release)?.agent)
    }

    /// Builds the agent and the control plane binaries (one cargo run).
    pub fn build_bins(&self, release: bool) -> Result<Bins> {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.root).args(["build", "-p", "wirefence-agent", "-p", "wirefence-control", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        eprintln!("xtask: building the agent and the control plane: {cmd:?}");
        tools::status(&mut cmd)?;
        let dir = self.target_dir.join(if release { "release" } else { "debug" });
        let bins = Bins { agent: dir.join("wirefence-agent"), control: dir.join("wirefence-control") };
        for bin in [&bins.agent, &bins.control] {
            if !bin.is_file() {
                bail!("cargo build succeeded but {} does not exist", bin.display());
            }
        }
        Ok(bins)
    }

    /// The agent built with `--features next-layout` (another eBPF object, conntrack in its
    /// next layout) for the upgrade tests, copied to `target/debug/wirefence-agent-next-layout`.
    /// Built with the same packages as [`Workspace::build_bins`] so every dependency is shared
    /// (only the agent and `wirefence-common` build again); run `build_bins` after it, since
    /// this build leaves its binary at `target/debug/wirefence-agent` too.
    pub fn build_next_layout_agent(&self) -> Result<PathBuf> {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.root).args([
            "build",
            "-p",
            "wirefence-agent",
            "-p",
            "wirefence-control",
            "--bins",
            "--features",
            "wirefence-agent/next-layout",
        ]);
        eprintln!("xtask: building the agent's next-layout build for the upgrade tests: {cmd:?}");
        tools::status(&mut cmd)?;
        let dir = self.target_dir.join("debug");
        let out = dir.join("wirefence-agent-next-layout");
        std::fs::copy(dir.join("wirefence-agent"), &out).with_context(|| format!("copying to {}", out.display()))?;
        Ok(out)
    }

    /// A cargo command run in the workspace root (the cargo that runs xtask).
    pub fn cargo_cmd(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.root);
        cmd
    }
}
