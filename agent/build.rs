//! Builds the eBPF programs (`../ebpf`, a workspace of its own) with aya-build, so the
//! object lands in `OUT_DIR/wirefence-ebpf` and `src/bpf/mod.rs` embeds it from there.
//! `cargo xtask build-ebpf` runs this same build.
//!
//! Needs: the `rust-src` component, `bpf-linker` (built against LLVM 22) and either a
//! nightly toolchain or stable with `RUSTC_BOOTSTRAP=1` (set here for the inner build, so a
//! plain `cargo build` on stable works). `scripts/install.sh` sets all of this up.
//! `AYA_BUILD_SKIP=1` skips the eBPF build: the agent embeds what an earlier build left in
//! OUT_DIR, or an empty object (and then refuses to load programs).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL: &str = "run scripts/install.sh (as root) to set up the eBPF toolchain";

fn main() {
    if let Err(msg) = build() {
        // Cargo prints a failed build script's stderr; make the cause the last thing shown.
        eprintln!("\nerror: building the eBPF programs (ebpf/) failed:\n  {msg}\n");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let ebpf_dir = manifest_dir.parent().ok_or("agent has no parent directory")?.join("ebpf");
    let common_dir = manifest_dir.parent().unwrap().join("common");
    println!("cargo:rerun-if-changed={}", common_dir.join("src").display());
    println!("cargo:rerun-if-changed={}", common_dir.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=WIREFENCE_EBPF_TOOLCHAIN");

    let object = out_dir.join("wirefence-ebpf");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning=AYA_BUILD_SKIP set: the agent is built without its eBPF programs");
        if !object.exists() {
            std::fs::write(&object, b"").map_err(|e| format!("{}: {e}", object.display()))?;
        }
        return Ok(());
    }

    let toolchain = toolchain();
    preflight(&toolchain)?;

    // aya-build runs `cargo build` in the current directory: the eBPF workspace.
    env::set_current_dir(&ebpf_dir).map_err(|e| format!("{}: {e}", ebpf_dir.display()))?;
    // -Z build-std=core on stable (aya-build honours RUSTC_BOOTSTRAP=1).
    env::set_var("RUSTC_BOOTSTRAP", "1");
    // aya-build turns every stderr line of the inner cargo into a cargo warning; keep only
    // real diagnostics (compiler messages come through its JSON output regardless).
    env::set_var("CARGO_TERM_QUIET", "true");
    let root_dir = ebpf_dir.to_str().ok_or("non-UTF-8 path")?;
    // The agent's `next-layout` feature builds the object with the same feature.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_NEXT_LAYOUT").is_some() { &["next-layout"] } else { &[] };
    let package = aya_build::Package { name: "wirefence-ebpf", root_dir, features, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
        .map_err(|e| format!("{e:#}\n  (toolchain {toolchain}; if a tool is missing: {INSTALL})"))?;
    if !object.exists() {
        return Err(format!("aya-build finished but {} is missing", object.display()));
    }
    Ok(())
}

/// The toolchain the outer build runs on (rustup sets RUSTUP_TOOLCHAIN for cargo's children),
/// unless WIREFENCE_EBPF_TOOLCHAIN names another one (e.g. nightly).
fn toolchain() -> String {
    env::var("WIREFENCE_EBPF_TOOLCHAIN")
        .or_else(|_| env::var("RUSTUP_TOOLCHAIN"))
        .unwrap_or_else(|_| "stable".to_owned())
}

/// Checks the tools the inner build needs, so a missing one is named with its fix instead of
/// surfacing as a linker error deep in cargo's output.
fn preflight(toolchain: &str) -> Result<(), String> {
    // bpf-linker lives in cargo's bin directory; LLVM 22's tools first on PATH, as the
    // install script builds it (bpf-linker itself links libLLVM by absolute path).
    let mut paths: Vec<PathBuf> = Vec::new();
    let llvm = Path::new("/usr/lib/llvm-22/bin");
    if llvm.is_dir() {
        paths.push(llvm.to_owned());
    }
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        paths.push(home.join("bin"));
    }
    let path = env::join_paths(&paths).map_err(|e| e.to_string())?;
    env::set_var("PATH", &path);

    if Command::new("rustup").arg("--version").output().is_err() {
        return Err(format!("rustup not found on PATH: the eBPF build needs rustup's toolchains; {INSTALL}"));
    }
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustup run {toolchain} rustc: {e}"))?;
    if !sysroot.status.success() {
        return Err(format!(
            "toolchain {toolchain} is not usable (`rustup run {toolchain} rustc` failed: {}); {INSTALL}",
            String::from_utf8_lossy(&sysroot.stderr).trim()
        ));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        return Err(format!(
            "the rust-src component is missing for toolchain {toolchain} (needed for -Z build-std=core): \
             run `rustup component add rust-src --toolchain {toolchain}`, or {INSTALL}"
        ));
    }
    match Command::new("bpf-linker").arg("--version").output() {
        Err(_) => Err(format!(
            "bpf-linker not found (looked in PATH, /usr/lib/llvm-22/bin and cargo's bin directory): \
             {INSTALL} (it installs llvm-22-dev and runs \
             `cargo install bpf-linker --no-default-features --features llvm-22`)"
        )),
        Ok(out) if !out.status.success() => Err(format!(
            "bpf-linker does not run ({}): is LLVM 22 (Debian llvm-22-dev) installed? {INSTALL}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}
