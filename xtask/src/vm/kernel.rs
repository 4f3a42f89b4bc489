//! The guest kernel: a Debian kernel image package, resolved with apt-cache, fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` into the cache (never installed).

use super::tools;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Kernel {
    /// The concrete package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel, the directory name under `lib/modules`.
    pub release: String,
    /// Unpacked package root (holds `boot/` and `lib/modules/`).
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
}

/// Resolves `wanted` (a metapackage such as `linux-image-cloud-amd64`, or a concrete
/// `linux-image-<release>` package) to the current package and makes sure it is unpacked
/// and depmod'ed under `<cache>/kernels/`. Falls back to the last kernel resolved for
/// `wanted` when apt cannot resolve it (no package lists, offline).
pub fn prepare(cache: &Path, wanted: &str) -> Result<Kernel> {
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels)?;
    let pointer = kernels.join(format!("{wanted}.resolved"));

    let (package, version) = match resolve(wanted) {
        Ok(resolved) => resolved,
        Err(err) => {
            let previous = fs::read_to_string(&pointer).ok();
            let usable = previous
                .as_deref()
                .and_then(|p| p.trim().split_once(' '))
                .filter(|(pkg, ver)| kernels.join(dir_name(pkg, ver)).is_dir());
            let Some((pkg, ver)) = usable else {
                return Err(
                    err.context(format!("cannot resolve the kernel package {wanted} (run `apt-get update` first?)"))
                );
            };
            eprintln!("vm-test: warning: {err:#}\nvm-test: using the cached {pkg} {ver}");
            (pkg.to_owned(), ver.to_owned())
        }
    };

    let root = kernels.join(dir_name(&package, &version));
    if !root.is_dir() {
        unpack(&kernels, &package, &version, &root)?;
    }
    // Drop the previous kernel of this flavour once a newer one is in place.
    if let Ok(previous) = fs::read_to_string(&pointer) {
        if let Some((pkg, ver)) = previous.trim().split_once(' ') {
            let old = kernels.join(dir_name(pkg, ver));
            if old != root && old.is_dir() {
                eprintln!("vm-test: removing superseded kernel {pkg} {ver}");
                fs::remove_dir_all(&old).ok();
            }
        }
    }
    fs::write(&pointer, format!("{package} {version}\n"))?;

    let release = release_of(&root)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no {}", package, vmlinuz.display());
    }
    Ok(Kernel { package, version, release, root, vmlinuz })
}

/// Module files (absolute paths inside the unpacked package) that load `modules` and all
/// of their dependencies, in load order, without duplicates. Built-in modules are skipped.
pub fn module_load_order(kernel: &Kernel, modules: &[String]) -> Result<Vec<PathBuf>> {
    let modprobe = tools::require(tools::MODPROBE)?;
    let mut order: Vec<PathBuf> = Vec::new();
    for module in modules {
        let out = tools::output(Command::new(&modprobe).arg("-d").arg(&kernel.root).args([
            "-S",
            &kernel.release,
            "--show-depends",
            module,
        ]))
        .with_context(|| format!("kernel {} has no module {module}", kernel.release))?;
        for line in out.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("insmod") => {
                    let path = PathBuf::from(words.next().context("modprobe: bare insmod line")?);
                    if !order.contains(&path) {
                        order.push(path);
                    }
                }
                Some("builtin") => {}
                _ => bail!("unexpected `modprobe --show-depends {module}` output: {line}"),
            }
        }
    }
    Ok(order)
}

fn dir_name(package: &str, version: &str) -> String {
    format!("{package}_{}", version.replace(':', "%3a"))
}

/// `(concrete package, candidate version)` for `wanted`.
fn resolve(wanted: &str) -> Result<(String, String)> {
    let show = |pkg: &str| -> Result<String> {
        let apt_cache = tools::require(tools::APT_CACHE)?;
        tools::output(Command::new(apt_cache).args(["show", "--no-all-versions", pkg]))
    };
    let field = |text: &str, name: &str| -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(|v| v.trim().to_owned())
    };

    let info = show(wanted)?;
    let concrete = if is_concrete(wanted) {
        wanted.to_owned()
    } else {
        // A metapackage such as linux-image-cloud-amd64 depends on exactly one concrete
        // image: "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)".
        let depends = field(&info, "Depends").unwrap_or_default();
        depends
            .split([',', '|'])
            .map(|dep| dep.split_whitespace().next().unwrap_or(""))
            .find(|name| is_concrete(name))
            .with_context(|| format!("{wanted} depends on no linux-image-<release> package ({depends:?})"))?
            .to_owned()
    };
    let info = if concrete == wanted { info } else { show(&concrete)? };
    let version = field(&info, "Version").with_context(|| format!("{concrete} has no Version"))?;
    Ok((concrete, version))
}

/// `linux-image-6.1.0-56-cloud-amd64` and `linux-image-6.12.118+deb12-cloud-amd64` are
/// concrete (a full release: major.minor.patch); the metapackages `linux-image-cloud-amd64`
/// and `linux-image-6.12-cloud-amd64` (which follows the 6.12 series) are not.
fn is_concrete(package: &str) -> bool {
    let Some(release) = package.strip_prefix("linux-image-").and_then(|rest| rest.split('-').next()) else {
        return false;
    };
    release.starts_with(|c: char| c.is_ascii_digit()) && release.matches('.').count() >= 2
}

fn unpack(kernels: &Path, package: &str, version: &str, root: &Path) -> Result<()> {
    let apt_get = tools::require(tools::APT_GET)?;
    let dpkg_deb = tools::require(tools::DPKG_DEB)?;
    let depmod = tools::require(tools::DEPMOD)?;

    let work = kernels.join(format!("{}.tmp", dir_name(package, version)));
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    let download = work.join("download");
    fs::create_dir_all(&download)?;

    eprintln!("vm-test: downloading {package} {version}");
    let mut cmd = Command::new(apt_get);
    cmd.current_dir(&download).arg("download").arg("--quiet");
    if is_root() {
        // apt drops to the _apt user for downloads, which cannot write into our cache.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    tools::status(cmd.arg(format!("{package}={version}")))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;

    let unpacked = work.join("root");
    eprintln!("vm-test: unpacking {}", deb.display());
    tools::status(Command::new(dpkg_deb).arg("-x").arg(&deb).arg(&unpacked))?;
    let release = release_of(&unpacked)?;
    tools::status(Command::new(depmod).arg("-b").arg(&unpacked).arg(&release))?;

    fs::rename(&unpacked, root)?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

fn release_of(root: &Path) -> Result<String> {
    let modules = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("{} is missing", modules.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.len() {
        1 => Ok(releases.pop().unwrap()),
        _ => bail!("expected one kernel release in {}, found {releases:?}", modules.display()),
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of the process looking at it.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::is_concrete;

    #[test]
    fn metapackages_are_told_from_images() {
        for concrete in ["linux-image-6.1.0-56-cloud-amd64", "linux-image-6.12.118+deb12-cloud-amd64"] {
            assert!(is_concrete(concrete), "{concrete}");
        }
        for meta in ["linux-image-cloud-amd64", "linux-image-6.12-cloud-amd64", "linux-image-amd64", "bash"] {
            assert!(!is_concrete(meta), "{meta}");
        }
    }
}
