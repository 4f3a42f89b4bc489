//! The guest userland: an uncompressed cpio (newc) archive holding busybox-static,
//! iproute2's `ip` and `tc`, the binaries under test with their shared libraries, the kernel
//! modules in load order and the scripts from `xtask/vm/`.
//!
//! The archive is written here rather than by `cpio`, so it can carry `/dev/console`
//! without root privileges and is byte-for-byte reproducible. It is left uncompressed:
//! under TCG, inflating costs more than copying.

use super::kernel::Kernel;
use super::tools;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where things land inside the guest.
pub const GUEST_DIR: &str = "wirefence-vm";
const GUEST_BIN: &str = "usr/local/bin";

pub struct Spec<'a> {
    pub kernel: &'a Kernel,
    /// Module files inside `kernel.root`, in load order.
    pub modules: &'a [PathBuf],
    /// Binaries copied (debug info stripped) to /usr/local/bin, with their guest names.
    pub binaries: &'a [(PathBuf, String)],
    /// `xtask/vm/`: `init.sh` becomes /init, every other file goes to /wirefence-vm/.
    pub scripts_dir: &'a Path,
    /// File name (inside `scripts_dir`) of the test the guest runs.
    pub test: &'a str,
    /// The guest's environment file (`env_file`).
    pub env: &'a str,
}

/// Builds `<cache>/initramfs.cpio` from a fresh staging tree and returns its path.
pub fn build(cache: &Path, spec: &Spec) -> Result<PathBuf> {
    let stage = cache.join("initramfs.d");
    if stage.exists() {
        fs::remove_dir_all(&stage).context("cannot clear the old initramfs staging tree")?;
    }
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", GUEST_BIN, "etc", "proc", "sys", "dev", "run", "tmp", "root", "var",
        "mnt", GUEST_DIR,
    ] {
        fs::create_dir_all(stage.join(dir))?;
    }
    symlink("../run", stage.join("var/run"))?;
    fs::set_permissions(stage.join("tmp"), fs::Permissions::from_mode(0o1777))?;

    let mut libs = BTreeSet::new();
    let mut shipped = BTreeSet::new();

    // iproute2's ip and tc: busybox's ip cannot do network namespaces, and its tc cannot
    // show clsact qdiscs or cls_bpf filters.
    for (tool, name) in [(tools::IP, "ip"), (tools::TC, "tc")] {
        let path = tools::require(tool)?;
        copy_file(&path, &stage.join("sbin").join(name), 0o755)?;
        libs.extend(shared_libraries(&path)?);
        shipped.insert(name.to_owned());
    }

    // wg, when the host has it, lets the scripts cross-check the kernel's view.
    if let Some(wg) = tools::find(tools::WG.0) {
        copy_file(&wg, &stage.join("usr/bin/wg"), 0o755)?;
        libs.extend(shared_libraries(&wg)?);
        shipped.insert("wg".to_owned());
    }

    for (binary, name) in spec.binaries {
        copy_stripped(binary, &stage.join(GUEST_BIN).join(name))?;
        libs.extend(shared_libraries(binary)?);
        shipped.insert(name.clone());
    }

    for lib in &libs {
        let dest = stage.join(lib.strip_prefix("/").unwrap_or(lib));
        fs::create_dir_all(dest.parent().unwrap())?;
        // Follow symlinks: the guest gets the real file under the name the loader asks for.
        copy_file(lib, &dest, 0o755)?;
    }

    install_busybox(&stage, &shipped)?;

    // Kernel modules, keeping their paths under /lib/modules/<release>/.
    let mut load_order = String::new();
    for module in spec.modules {
        let rel = module
            .strip_prefix(&spec.kernel.root)
            .with_context(|| format!("{} is outside the kernel tree", module.display()))?;
        let dest = stage.join(rel);
        fs::create_dir_all(dest.parent().unwrap())?;
        copy_file(module, &dest, 0o644)?;
        load_order.push_str(&format!("/{}\n", rel.display()));
    }
    fs::write(stage.join(GUEST_DIR).join("modules"), load_order)?;

    // Scripts.
    let mut found_test = false;
    let mut found_init = false;
    for entry in
        fs::read_dir(spec.scripts_dir).with_context(|| format!("cannot read {}", spec.scripts_dir.display()))?
    {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "init.sh" {
            copy_file(&path, &stage.join("init"), 0o755)?;
            found_init = true;
        } else {
            copy_file(&path, &stage.join(GUEST_DIR).join(&name), 0o755)?;
            found_test |= name == spec.test;
        }
    }
    if !found_init {
        bail!("{} has no init.sh", spec.scripts_dir.display());
    }
    if !found_test {
        bail!("test script {} is not in {}", spec.test, spec.scripts_dir.display());
    }

    fs::write(stage.join(GUEST_DIR).join("env"), spec.env)?;

    fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(stage.join("etc/group"), "root:x:0:\n")?;
    fs::write(stage.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    fs::write(stage.join("etc/hostname"), "wirefence-vm\n")?;

    let archive = cache.join("initramfs.cpio");
    let tmp = cache.join("initramfs.cpio.tmp");
    write_cpio(&stage, &tmp)?;
    fs::rename(&tmp, &archive)?;
    Ok(archive)
}

/// The guest's /wirefence-vm/env, sourced by init.sh: the test to run, the kernel release
/// and the `--env` variables.
pub fn env_file(test: &str, kernel: &Kernel, extra: &[(String, String)]) -> Result<String> {
    let mut env = format!("WF_VM_TEST=/{GUEST_DIR}/{}\n", test);
    env.push_str(&format!("WF_VM_KERNEL={}\n", kernel.release));
    for (key, value) in extra {
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("invalid environment variable name {key:?}");
        }
        env.push_str(&format!("{key}='{}'\n", value.replace('\'', r"'\''")));
    }
    Ok(env)
}

/// busybox-static as /bin/busybox plus a symlink per applet (except the names of real
/// tools shipped alongside, such as `ip`).
fn install_busybox(stage: &Path, shipped: &BTreeSet<String>) -> Result<()> {
    let busybox = tools::require(tools::BUSYBOX)?;
    if !shared_libraries(&busybox)?.is_empty() {
        bail!(
            "{} is dynamically linked; install the static one with \
             `apt-get install --no-install-recommends busybox-static`",
            busybox.display()
        );
    }
    copy_file(&busybox, &stage.join("bin/busybox"), 0o755)?;
    let applets = tools::output(Command::new(&busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet == "busybox" || applet.contains('/') || shipped.contains(applet) {
            continue;
        }
        symlink("busybox", stage.join("bin").join(applet))?;
    }
    if !stage.join("bin/sh").exists() {
        bail!("{} has no sh applet", busybox.display());
    }
    Ok(())
}

/// The shared libraries (and the dynamic loader) `binary` needs, as named by `ldd`.
/// Empty for static binaries.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let ldd = tools::require(tools::LDD)?;
    let out =
        Command::new(ldd).arg(binary).output().with_context(|| format!("cannot run ldd on {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed:\n{text}", binary.display());
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        // "linux-vdso.so.1 (0x...)" (provided by the kernel).
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!("{}: shared library {} not found", binary.display(), name.trim());
                }
                target.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies a binary without its debug info (a debug build shrinks several-fold), falling
/// back to a plain copy when binutils' strip is missing.
fn copy_stripped(from: &Path, to: &Path) -> Result<()> {
    if let Some(strip) = tools::find(tools::STRIP.0) {
        let ok =
            Command::new(strip).arg("--strip-debug").arg("-o").arg(to).arg(from).status().is_ok_and(|s| s.success());
        if ok {
            fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
            return Ok(());
        }
        eprintln!("vm-test: warning: strip failed on {}, copying it as is", from.display());
    }
    copy_file(from, to, 0o755)
}

/// Writes `stage` as a newc cpio archive owned by root, plus a /dev/console node.
fn write_cpio(stage: &Path, archive: &Path) -> Result<()> {
    let mut out = BufWriter::new(fs::File::create(archive)?);
    let mut ino = 1u32;
    let mut entry =
        |out: &mut BufWriter<fs::File>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| -> Result<()> {
            let header = format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                ino,
                mode,
                0, // uid
                0, // gid
                1, // nlink
                0, // mtime
                data.len(),
                0, // devmajor
                0, // devminor
                rdev.0,
                rdev.1,
                name.len() + 1,
                0, // check
            );
            ino += 1;
            out.write_all(header.as_bytes())?;
            out.write_all(name.as_bytes())?;
            out.write_all(&[0])?;
            pad(out, header.len() + name.len() + 1)?;
            out.write_all(data)?;
            pad(out, data.len())?;
            Ok(())
        };

    let mut paths = Vec::new();
    walk(stage, &mut paths)?;
    for path in paths {
        let rel = path.strip_prefix(stage).unwrap();
        let name = rel.to_str().with_context(|| format!("non-UTF-8 path {}", rel.display()))?;
        let meta = fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(&path)?;
            entry(&mut out, name, 0o120777, (0, 0), target.as_os_str().as_encoded_bytes())?;
        } else if kind.is_dir() {
            entry(&mut out, name, 0o040000 | (meta.mode() & 0o7777), (0, 0), &[])?;
        } else if kind.is_file() {
            let data = fs::read(&path)?;
            entry(&mut out, name, 0o100000 | (meta.mode() & 0o7777), (0, 0), &data)?;
        } else {
            bail!("unexpected file type at {}", path.display());
        }
    }
    entry(&mut out, "dev/console", 0o020600, (5, 1), &[])?;
    entry(&mut out, "TRAILER!!!", 0, (0, 0), &[])?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

fn pad(out: &mut impl Write, len: usize) -> std::io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

/// Every path below `dir`, parents before children, sorted for reproducibility.
fn walk(dir: &Path, paths: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        let is_dir = fs::symlink_metadata(&path)?.is_dir();
        paths.push(path.clone());
        if is_dir {
            walk(&path, paths)?;
        }
    }
    Ok(())
}
