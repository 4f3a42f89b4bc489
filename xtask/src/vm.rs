//! `cargo xtask vm-test`: the kernel WireGuard backend tested inside a qemu VM.
//!
//! The build host has no WireGuard module, so the agent's kernel backend runs in a guest:
//!
//! 1. kernel: a Debian 12 kernel image (`--kernel 6.1`: whatever `linux-image-cloud-amd64`
//!    currently depends on; `6.12`: `linux-image-6.12-cloud-amd64`; `all`: both in turn),
//!    fetched with `apt-get download` and unpacked with `dpkg-deb -x` into
//!    `<workspace>/.cache/vm/kernels/` — never installed on the host;
//! 2. initramfs: busybox-static, iproute2's `ip` and `tc`, the agent and its shared libraries,
//!    wireguard.ko and the other modules with their dependencies in load order, and the
//!    scripts of `xtask/vm/` (`init.sh` becomes /init);
//! 3. qemu under TCG, serial console streamed to the terminal and to
//!    `.cache/vm/console-<release>.log`; the run passes only if /init prints
//!    `WIREFENCE-VM-RESULT: PASS`.
//!
//! Every step is idempotent: the kernel is fetched once per package version, the
//! initramfs is rebuilt each run (a second or two).

mod initramfs;
mod kernel;
mod qemu;
mod rootfs;
pub(crate) mod tools;

use anyhow::{bail, Context, Result};

use crate::workspace::Workspace;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Modules every guest loads: WireGuard, veth and bridge for the namespaces' underlay (the
/// lab's machines share one), and the clsact qdisc plus cls_bpf for the eBPF attach path of
/// 6.1 kernels (no tcx there).
const DEFAULT_MODULES: &[&str] = &["wireguard", "veth", "bridge", "sch_ingress", "cls_bpf"];

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// Test script to run in the guest, a file in xtask/vm/.
    #[arg(long, default_value = "kernel-backend.sh")]
    script: String,

    /// Check the VM pipeline alone: run xtask/vm/smoke.sh without building the agent.
    #[arg(long, conflicts_with_all = ["script", "agent"])]
    smoke: bool,

    /// Agent binary to test instead of building one with `cargo build -p wirefence-agent`.
    #[arg(long, value_name = "PATH", conflicts_with = "debs")]
    agent: Option<PathBuf>,

    /// Test the binaries of the Debian packages in DIR (`cargo xtask deb` writes them to
    /// target/debian): wirefence-agent_*.deb and wirefence-control_*.deb, unpacked with
    /// dpkg-deb; the control plane joins the guest's binaries.
    #[arg(long, value_name = "DIR", conflicts_with = "smoke")]
    debs: Option<PathBuf>,

    /// Boot a Debian 12 machine with systemd as PID 1 (see xtask/src/vm/rootfs.rs) instead of
    /// the initramfs' busybox userland; the packages of --debs wait in /root/debs for the test
    /// to install. Needs root and, the first time, the Debian mirror.
    #[arg(long, requires = "debs")]
    systemd: bool,

    /// Build the agent in release mode.
    #[arg(long)]
    release: bool,

    /// Which Debian 12 kernel(s) to boot: 6.1 (its own cloud kernel; the clsact attach path),
    /// 6.12 (its backported cloud kernel; tcx) or all of them, one after the other.
    #[arg(long, value_enum, default_value = "6.1", conflicts_with = "kernel_package")]
    kernel: KernelChoice,

    /// A Debian kernel package instead of --kernel: a metapackage (resolved to the image it
    /// depends on) or a concrete linux-image-<release> package.
    #[arg(long, value_name = "PACKAGE", env = "WIREFENCE_VM_KERNEL")]
    kernel_package: Option<String>,

    /// Another module to load in the guest (with its dependencies). Repeatable.
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,

    /// Another binary to put in the guest's /usr/local/bin (same file name). Repeatable.
    #[arg(long = "bin", value_name = "PATH")]
    binaries: Vec<PathBuf>,

    /// Environment variable for the test script (KEY=VALUE). Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,

    /// Give up after this many seconds (boot included).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    timeout: u64,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,

    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,

    /// Extra kernel command line.
    #[arg(long, value_name = "ARGS", default_value = "")]
    append: String,
}

/// The kernels CI boots: both attach paths of the policy (clsact before 6.6, tcx after).
#[derive(Clone, Copy, clap::ValueEnum)]
enum KernelChoice {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

impl KernelChoice {
    /// The Debian 12 metapackages that follow each kernel's security updates.
    fn packages(self) -> &'static [&'static str] {
        const V6_1: &str = "linux-image-cloud-amd64";
        const V6_12: &str = "linux-image-6.12-cloud-amd64";
        match self {
            KernelChoice::V6_1 => &[V6_1],
            KernelChoice::V6_12 => &[V6_12],
            KernelChoice::All => &[V6_1, V6_12],
        }
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

pub fn run(args: VmTestArgs) -> Result<()> {
    let started = Instant::now();
    tools::require_all()?;
    let ws = Workspace::locate()?;
    let cache = ws.root.join(".cache/vm");
    std::fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

    let scripts_dir = ws.root.join("xtask/vm");
    let script = if args.smoke { "smoke.sh".to_owned() } else { args.script.clone() };
    if script.contains('/') || !scripts_dir.join(&script).is_file() {
        bail!("--script {script}: no such file in {}", scripts_dir.display());
    }
    let mut binaries = Vec::new();
    let mut debs = Vec::new();
    if let Some(dir) = &args.debs {
        for package in ["wirefence-agent", "wirefence-control"] {
            if args.systemd {
                // Installed by the test with dpkg -i; the initramfs only hands over to systemd.
                debs.push(find_deb(dir, package)?);
            } else {
                let bin = unpack_deb(&cache, dir, package)?;
                binaries.push((bin, package.to_owned()));
            }
        }
    } else if !args.smoke {
        let agent = match &args.agent {
            Some(path) => path.canonicalize().with_context(|| format!("no agent at {}", path.display()))?,
            None => ws.build_agent(args.release)?,
        };
        binaries.push((agent, "wirefence-agent".to_owned()));
    }
    // The kernel-backend script's upgrade step needs a second build with another eBPF
    // object (the upgrade tests' next-layout build).
    if script == "kernel-backend.sh" {
        let next = ws.target_dir.join("debug/wirefence-agent-next-layout");
        anyhow::ensure!(
            next.is_file(),
            "{} is missing: run `cargo xtask build-next-agent` (kernel-backend.sh tests an upgrade)",
            next.display()
        );
        binaries.push((next, "wirefence-agent-next-layout".to_owned()));
    }
    for bin in &args.binaries {
        let path = bin.canonicalize().with_context(|| format!("no binary at {}", bin.display()))?;
        let name = path.file_name().context("binary path without a file name")?;
        binaries.push((path.clone(), name.to_string_lossy().into_owned()));
    }
    if args.systemd && !binaries.is_empty() {
        let names: Vec<&str> = binaries.iter().map(|(_, name)| name.as_str()).collect();
        bail!(
            "--systemd: the guest runs what the packages install; {} would stay in the initramfs \
             systemd leaves behind (use the initramfs guest, without --systemd)",
            names.join(", ")
        );
    }

    let packages: Vec<String> = match &args.kernel_package {
        Some(package) => vec![package.clone()],
        None => args.kernel.packages().iter().map(|p| p.to_string()).collect(),
    };
    // Every kernel is booted even when one fails, so one run reports them all.
    let mut failed = Vec::new();
    for package in &packages {
        if let Err(e) = boot_one(&args, &cache, package, &scripts_dir, &script, &binaries, &debs) {
            eprintln!("{e:#}");
            failed.push(package.as_str());
        }
    }
    eprintln!("vm-test: {} kernel(s) in {:.1}s", packages.len(), started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Unpacks the one `<package>_*.deb` in `dir` (as `dpkg -i` would lay it out) under
/// `<cache>/debs/<package>/` and returns its `/usr/bin/<package>`.
fn unpack_deb(cache: &std::path::Path, dir: &std::path::Path, package: &str) -> Result<PathBuf> {
    let deb = find_deb(dir, package)?;
    let root = cache.join("debs").join(package);
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    std::fs::create_dir_all(&root)?;
    let dpkg_deb = tools::require(tools::DPKG_DEB)?;
    tools::output(std::process::Command::new(dpkg_deb).arg("-x").arg(&deb).arg(&root))?;
    let bin = root.join("usr/bin").join(package);
    anyhow::ensure!(bin.is_file(), "{} has no /usr/bin/{package}", deb.display());
    eprintln!("vm-test: {package} from {}", deb.display());
    Ok(bin)
}

/// The one `<package>_*.deb` in `dir`.
fn find_deb(dir: &std::path::Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--debs {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .collect();
    let deb = match found.len() {
        1 => found.remove(0),
        0 => bail!("--debs {}: no {prefix}*.deb (run `cargo xtask deb`)", dir.display()),
        _ => bail!("--debs {}: more than one {prefix}*.deb: {found:?}", dir.display()),
    };
    Ok(deb)
}

/// Boots one kernel package with the initramfs and runs `script`; its console goes to
/// `<cache>/console-<release>.log`.
fn boot_one(
    args: &VmTestArgs,
    cache: &std::path::Path,
    package: &str,
    scripts_dir: &std::path::Path,
    script: &str,
    binaries: &[(PathBuf, String)],
    debs: &[PathBuf],
) -> Result<()> {
    let started = Instant::now();
    let kernel = kernel::prepare(cache, package)?;
    eprintln!("vm-test: kernel {} {} ({})", kernel.package, kernel.version, kernel.release);

    let mut module_names: Vec<String> = DEFAULT_MODULES.iter().map(|m| m.to_string()).collect();
    module_names.extend(args.modules.iter().cloned());
    let mut env = args.env.clone();
    if args.systemd {
        module_names.extend(rootfs::ROOT_MODULES.iter().map(|m| m.to_string()));
        env.push(("WF_VM_ROOT".to_owned(), rootfs::ROOT_DEVICE.to_owned()));
    }
    let modules = kernel::module_load_order(&kernel, &module_names)?;
    let env = initramfs::env_file(script, &kernel, &env)?;

    let initrd = initramfs::build(
        cache,
        &initramfs::Spec { kernel: &kernel, modules: &modules, binaries, scripts_dir, test: script, env: &env },
    )?;
    let disk = match args.systemd {
        true => {
            let image = rootfs::build(cache, &rootfs::Spec { kernel: &kernel, scripts_dir, env: &env, debs })?;
            eprintln!("vm-test: Debian root filesystem {}", image.display());
            Some(image)
        }
        false => None,
    };
    eprintln!(
        "vm-test: initramfs {} ({} MiB), running {script}",
        initrd.display(),
        std::fs::metadata(&initrd)?.len() >> 20
    );

    let boot = qemu::Boot {
        kernel: kernel.vmlinuz.clone(),
        initrd,
        disk,
        append: format!("console=ttyS0 panic=-1 quiet {}", args.append).trim().to_owned(),
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
        log: cache.join(format!("console-{}.log", kernel.release)),
    };
    let mut outcome = qemu::run(&boot)?;
    // A guest that dies before the test script starts says nothing about wirefence; the
    // emulated boot has done so once in CI. It gets one more boot, and both are reported.
    if let qemu::Outcome::NotStarted(reason) = &outcome {
        eprintln!("vm-test: {} did not boot: {reason}\nvm-test: booting it once more", kernel.release);
        outcome = qemu::run(&boot)?;
    }
    let took = started.elapsed().as_secs_f64();
    match outcome {
        qemu::Outcome::Pass => {
            eprintln!("vm-test: PASS ({script} on {}, {took:.1}s)", kernel.release);
            Ok(())
        }
        qemu::Outcome::Fail(reason) | qemu::Outcome::NotStarted(reason) => {
            bail!("vm-test: FAIL ({script} on {}, {took:.1}s): {reason}", kernel.release)
        }
    }
}
