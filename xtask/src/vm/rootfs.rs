//! The Debian 12 machine of `vm-test --systemd`: a root filesystem with systemd as PID 1 on a
//! virtio disk, for the tests that need what a real gateway has (the packages installed with
//! `dpkg -i`, their units run by systemd) rather than the initramfs' busybox userland.
//!
//! 1. base: `mmdebstrap --variant=minbase` of bookworm with systemd and the tools the guest
//!    scripts use, cached as a tarball under `<cache>/rootfs/` and rebuilt when the package
//!    list changes;
//! 2. per run: the tarball unpacked, plus the kernel's modules, the scripts of `xtask/vm/`, the
//!    .deb files under test in /root/debs and a oneshot unit that runs the test once the
//!    machine is up and reports on the serial console as /init does;
//! 3. `mkfs.ext4 -d` turns that tree into the disk image; the initramfs loads the virtio
//!    modules, mounts it and hands over to systemd (`init.sh`, `WF_VM_ROOT`).

use super::initramfs::GUEST_DIR;
use super::kernel::Kernel;
use super::tools;
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's root device: the only disk qemu attaches (virtio-blk).
pub const ROOT_DEVICE: &str = "/dev/vda";

/// Modules the initramfs loads to reach the root disk.
pub const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// What the base system has beyond minbase: systemd as init, and the tools the scripts in
/// `xtask/vm/` run (busybox for the lab's httpd and nc, as in the initramfs guest).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "iproute2",
    "kmod",
    "procps",
    "iputils-ping",
    "busybox-static",
    "wireguard-tools",
];

/// The unit that runs the test in the guest; `init.sh under-systemd` prints the result line.
const TEST_UNIT: &str = "wirefence-vm-test.service";
const TEST_UNIT_TEXT: &str = "\
[Unit]
Description=wirefence VM test
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh /wirefence-vm/init.sh under-systemd
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

/// Units a test machine must not run: logins on the console the test writes to, the
/// first-boot prompt, and apt's timers (a dpkg of their own beside the test's).
const MASKED: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
];

pub struct Spec<'a> {
    pub kernel: &'a Kernel,
    /// `xtask/vm/`: every file goes to /wirefence-vm/.
    pub scripts_dir: &'a Path,
    /// The guest environment file the initramfs also carries (`WF_VM_TEST`, ...).
    pub env: &'a str,
    /// Packages copied to /root/debs for the test to install.
    pub debs: &'a [PathBuf],
}

/// Builds `<cache>/rootfs.img` for this run and returns its path.
pub fn build(cache: &Path, spec: &Spec) -> Result<PathBuf> {
    // Unpacked by anyone else, the files would be that user's and the image a broken system.
    if !is_root()? {
        bail!("vm-test --systemd lays out a Debian root filesystem with its owners: run it as root");
    }
    let base = base_tarball(cache)?;
    let stage = cache.join("rootfs.d");
    if stage.exists() {
        fs::remove_dir_all(&stage).context("cannot clear the old root filesystem tree")?;
    }
    fs::create_dir_all(&stage)?;
    // Owners and modes as in the tarball: only root can lay them out, and the image keeps them.
    tools::status(Command::new("tar").arg("-C").arg(&stage).arg("--numeric-owner").arg("-xpf").arg(&base))?;

    // The kernel's modules, so that modprobe and udev work as on an installed machine.
    let modules = stage.join("lib/modules");
    fs::create_dir_all(&modules)?;
    tools::status(
        Command::new("cp").arg("-a").arg(spec.kernel.root.join("lib/modules").join(&spec.kernel.release)).arg(&modules),
    )?;

    let guest = stage.join(GUEST_DIR);
    fs::create_dir_all(&guest)?;
    for entry in
        fs::read_dir(spec.scripts_dir).with_context(|| format!("cannot read {}", spec.scripts_dir.display()))?
    {
        let path = entry?.path();
        if path.is_file() {
            fs::copy(&path, guest.join(path.file_name().unwrap()))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    fs::write(guest.join("env"), spec.env)?;

    let debs = stage.join("root/debs");
    fs::create_dir_all(&debs)?;
    for deb in spec.debs {
        fs::copy(deb, debs.join(deb.file_name().unwrap())).with_context(|| format!("cannot copy {}", deb.display()))?;
    }

    let units = stage.join("etc/systemd/system");
    fs::write(units.join(TEST_UNIT), TEST_UNIT_TEXT)?;
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    symlink(format!("/etc/systemd/system/{TEST_UNIT}"), wants.join(TEST_UNIT))?;
    for unit in MASKED {
        let link = units.join(unit);
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link)?;
        }
        symlink("/dev/null", link)?;
    }
    fs::write(stage.join("etc/hostname"), "wirefence-vm\n")?;
    fs::write(stage.join("etc/hosts"), "127.0.0.1 localhost wirefence-vm\n::1 localhost\n")?;

    let image = cache.join("rootfs.img");
    let mkfs = tools::require(tools::MKFS_EXT4)?;
    tools::output(Command::new(mkfs).args(["-q", "-F", "-L", "wirefence-vm", "-d"]).arg(&stage).arg(&image).arg("2G"))?;
    fs::remove_dir_all(&stage).ok();
    Ok(image)
}

/// The cached mmdebstrap tarball, made when missing or when `PACKAGES` changed.
fn base_tarball(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("rootfs");
    fs::create_dir_all(&dir)?;
    let tarball = dir.join(format!("{SUITE}.tar"));
    let recorded = dir.join(format!("{SUITE}.packages"));
    let wanted = PACKAGES.join(",");
    if tarball.is_file() && fs::read_to_string(&recorded).is_ok_and(|r| r.trim() == wanted) {
        return Ok(tarball);
    }
    let mmdebstrap = tools::require(tools::MMDEBSTRAP)?;
    eprintln!("vm-test: building the Debian {SUITE} root filesystem ({wanted})");
    let tmp = dir.join(format!("{SUITE}.tar.tmp"));
    tools::status(
        Command::new(mmdebstrap)
            .args(["--quiet", "--variant=minbase", "--format=tar"])
            .arg(format!("--include={wanted}"))
            .args([SUITE])
            .arg(&tmp)
            .arg(MIRROR),
    )?;
    fs::rename(&tmp, &tarball)?;
    fs::write(&recorded, format!("{wanted}\n"))?;
    Ok(tarball)
}

fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).context("no Uid line in /proc/self/status")?;
    Ok(uid.split_whitespace().nth(1) == Some("0"))
}
