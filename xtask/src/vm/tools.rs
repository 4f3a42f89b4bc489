//! Host tools the VM test needs, with the Debian package that provides each one.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `(tool, Debian package)` for every host tool the VM test runs.
pub const APT_GET: (&str, &str) = ("apt-get", "apt");
pub const APT_CACHE: (&str, &str) = ("apt-cache", "apt");
pub const DPKG_DEB: (&str, &str) = ("dpkg-deb", "dpkg");
pub const DEPMOD: (&str, &str) = ("depmod", "kmod");
pub const MODPROBE: (&str, &str) = ("modprobe", "kmod");
pub const BUSYBOX: (&str, &str) = ("busybox", "busybox-static");
pub const IP: (&str, &str) = ("ip", "iproute2");
pub const TC: (&str, &str) = ("tc", "iproute2");
pub const LDD: (&str, &str) = ("ldd", "libc-bin");
pub const QEMU: (&str, &str) = ("qemu-system-x86_64", "qemu-system-x86");
/// `vm-test --systemd`: the Debian root filesystem and its disk image.
pub const MMDEBSTRAP: (&str, &str) = ("mmdebstrap", "mmdebstrap");
pub const MKFS_EXT4: (&str, &str) = ("mkfs.ext4", "e2fsprogs");
/// Optional: the agent binary is copied unstripped when `strip` is missing.
pub const STRIP: (&str, &str) = ("strip", "binutils");
/// Optional: `wg` lets the in-VM scripts cross-check the kernel's WireGuard state.
pub const WG: (&str, &str) = ("wg", "wireguard-tools");

/// Every required tool, checked up front so a missing one fails before any slow step.
pub const REQUIRED: &[(&str, &str)] = &[APT_GET, APT_CACHE, DPKG_DEB, DEPMOD, MODPROBE, BUSYBOX, IP, TC, LDD, QEMU];

/// Finds `tool` on PATH (plus the sbin directories, which a non-root PATH often lacks).
pub fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

pub fn require((tool, package): (&str, &str)) -> Result<PathBuf> {
    find(tool).with_context(|| {
        format!(
            "`{tool}` not found on PATH; install it with \
             `apt-get install --no-install-recommends {package}`"
        )
    })
}

/// Checks every required tool and reports all missing ones at once.
pub fn require_all() -> Result<()> {
    let missing: Vec<_> = REQUIRED.iter().filter(|(tool, _)| find(tool).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, pkg)| *pkg).collect();
    packages.dedup();
    let tools: Vec<&str> = missing.iter().map(|(tool, _)| *tool).collect();
    bail!(
        "vm-test needs host tools that are missing: {}\n\
         install them with: apt-get install --no-install-recommends {}",
        tools.join(", "),
        packages.join(" ")
    )
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Runs a command to completion, failing with its stderr when it exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("failed to start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8 output"))
}

/// Runs a command with inherited stdout/stderr, failing when it exits non-zero.
pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("failed to start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
