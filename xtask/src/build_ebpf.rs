//! `cargo xtask build-ebpf`: builds the eBPF programs exactly as the agent's build does —
//! by running the agent's build script (agent/build.rs, aya-build), which checks the
//! toolchain, builds `ebpf/` for bpfel-unknown-none into its OUT_DIR and is where the agent
//! embeds the object from — then copies the object to `<target>/bpf/wirefence-ebpf.o` for
//! inspection (llvm-objdump, bpftool, veristat).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct BuildEbpfArgs {
    /// Build the agent's release profile (the object itself is always optimised).
    #[arg(long)]
    release: bool,
}

pub fn run(args: BuildEbpfArgs) -> anyhow::Result<()> {
    let ws = crate::workspace::Workspace::locate()?;
    let object = build(&ws, args.release)?;
    let dest_dir = ws.target_dir.join("bpf");
    std::fs::create_dir_all(&dest_dir).with_context(|| dest_dir.display().to_string())?;
    let dest = dest_dir.join("wirefence-ebpf.o");
    std::fs::copy(&object, &dest).with_context(|| format!("copy {} to {}", object.display(), dest.display()))?;
    let size = std::fs::metadata(&dest)?.len();
    println!("eBPF object: {} ({size} bytes; built in {})", dest.display(), object.display());
    Ok(())
}

/// Runs the agent's build script; returns the object in its OUT_DIR.
fn build(ws: &crate::workspace::Workspace, release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = ws.cargo_cmd();
    cmd.args(["build", "-p", "wirefence-agent", "--lib", "--message-format=json-render-diagnostics"]);
    if release {
        cmd.arg("--release");
    }
    // The script's own failure message (e.g. bpf-linker or rust-src missing, with how to
    // install it) goes to stderr, which stays on the terminal.
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("spawn cargo")?;
    let mut out_dir = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if msg["reason"] == "build-script-executed"
            && msg["package_id"].as_str().is_some_and(|id| id.contains("wirefence-agent"))
        {
            out_dir = msg["out_dir"].as_str().map(PathBuf::from);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "building the eBPF programs failed ({status}); the cause is printed above. \
             A missing toolchain piece (bpf-linker, LLVM 22, rust-src) is installed by scripts/install.sh"
        );
    }
    let out_dir = out_dir.context("cargo did not report the agent's build script output directory")?;
    let object = out_dir.join("wirefence-ebpf");
    match std::fs::metadata(&object) {
        Ok(m) if m.len() > 0 => Ok(object),
        Ok(_) => bail!("{} is empty: AYA_BUILD_SKIP is set; unset it to build the eBPF programs", object.display()),
        Err(e) => bail!("{}: {e}", object.display()),
    }
}
