//! Checks of the built packages, run by `cargo xtask deb --check` and `cargo xtask test`:
//! lintian (clean at warning level; overrides in `packaging/*/lintian-overrides`, each
//! explained), `systemd-analyze verify` of every unit as packaged, and the contents: each
//! file the packages promise, the conffiles, the dependencies, maintainer scripts that
//! enable but never start a service, man pages and completions that name the real
//! subcommands, and example configs the binaries accept.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use super::{Deb, Package};
use crate::vm::tools;
use crate::workspace::Workspace;

/// A package unpacked: its files under `root`, its control files (`control`, `conffiles`,
/// `postinst`, ...) in `control`.
pub struct Unpacked {
    pub package: Package,
    pub root: PathBuf,
    pub control: PathBuf,
}

pub fn check_all(ws: &Workspace, debs: &[Deb]) -> Result<()> {
    let mut failures = Vec::new();
    for deb in debs {
        let dir = ws.target_dir.join("debian/check").join(deb.package.name());
        let result = unpack(deb, &dir).and_then(|u| {
            contents(&u)?;
            verify_units(&u, &dir)?;
            lintian(&deb.path)
        });
        if let Err(e) = result {
            failures.push(format!("{}: {e:#}", deb.path.display()));
        }
    }
    if !failures.is_empty() {
        bail!("the packages fail their checks:\n{}", failures.join("\n"));
    }
    Ok(())
}

fn unpack(deb: &Deb, dir: &Path) -> Result<Unpacked> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (root, control) = (dir.join("root"), dir.join("control"));
    tools::output(Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(&root))?;
    tools::output(Command::new("dpkg-deb").arg("-e").arg(&deb.path).arg(&control))?;
    Ok(Unpacked { package: deb.package, root, control })
}

/// What each package must ship, relative to its root.
fn expected_files(package: Package) -> Vec<String> {
    let name = package.name();
    let mut files = vec![
        format!("usr/bin/{name}"),
        format!("{UNITS}/{name}.service"),
        format!("usr/lib/sysusers.d/{name}.conf"),
        format!("usr/share/man/man1/{name}.1.gz"),
        format!("usr/share/bash-completion/completions/{name}"),
        format!("usr/share/zsh/vendor-completions/_{name}"),
        format!("usr/share/fish/vendor_completions.d/{name}.fish"),
        format!("usr/share/doc/{name}/copyright"),
        format!("usr/share/doc/{name}/changelog.Debian.gz"),
        format!("usr/share/lintian/overrides/{name}"),
    ];
    files.extend(subcommands(package).iter().map(|sub| format!("usr/share/man/man1/{name}-{sub}.1.gz")));
    match package {
        Package::Agent => files.extend([
            "etc/iproute2/rt_protos.d/wirefence.conf".to_owned(),
            "usr/share/doc/wirefence-agent/examples/agent.toml".to_owned(),
        ]),
        Package::Control => files.extend([
            "usr/lib/tmpfiles.d/wirefence-control.conf".to_owned(),
            "usr/share/doc/wirefence-control/examples/wirefence-control.default".to_owned(),
        ]),
    }
    files
}

/// The subcommands an operator uses, which the man pages and completions must name.
fn subcommands(package: Package) -> &'static [&'static str] {
    match package {
        Package::Agent => &["run", "down", "status", "keygen", "check", "policy"],
        Package::Control => &["serve", "policy", "nodes", "keys", "certs"],
    }
}

pub fn contents(u: &Unpacked) -> Result<()> {
    let name = u.package.name();
    let missing: Vec<String> = expected_files(u.package).into_iter().filter(|f| !u.root.join(f).is_file()).collect();
    ensure!(missing.is_empty(), "missing from the package: {}", missing.join(", "));
    let bin = u.root.join("usr/bin").join(name);
    let mode = std::os::unix::fs::PermissionsExt::mode(&bin.metadata()?.permissions());
    ensure!(mode & 0o777 == 0o755, "{}: mode {:o}, not 755", bin.display(), mode & 0o777);

    let control = read(&u.control.join("control"))?;
    let depends = field(&control, "Depends").context("control has no Depends")?;
    ensure!(depends.contains("libc6"), "Depends lacks libc6 (shlibdeps did not run?): {depends}");
    ensure!(depends.contains("systemd"), "Depends lacks systemd (systemd-sysusers): {depends}");
    if u.package == Package::Agent {
        // A gateway's masquerade runs `nft`; the agent names the package when it is missing.
        let recommends = field(&control, "Recommends").unwrap_or_default();
        ensure!(recommends.contains("nftables"), "Recommends lacks nftables (`nft` for masquerade): {recommends}");
    }

    let overrides = read(&u.root.join(format!("usr/share/lintian/overrides/{name}")))?;
    unexplained_overrides(&overrides)?;

    let version = field(&control, "Version").context("control has no Version")?;
    let changelog = gunzip(&u.root.join(format!("usr/share/doc/{name}/changelog.Debian.gz")))?;
    let entry = changelog.lines().next().unwrap_or_default();
    ensure!(
        entry.contains(&format!("({version})")),
        "packaging/changelog's first entry is {entry:?}, not version {version}: add an entry"
    );

    // Installed and enabled, never started by the package: the unit waits for its config.
    let postinst = read(&u.control.join("postinst"))?;
    ensure!(postinst.contains("systemd-sysusers"), "postinst does not create the service user");
    ensure!(postinst.contains("deb-systemd-helper enable"), "postinst does not enable {name}.service");
    ensure!(
        !postinst.contains("_dh_action=start") && !postinst.contains("deb-systemd-invoke start"),
        "postinst starts {name}.service on installation:\n{postinst}"
    );
    let unit = read(&u.root.join(format!("{UNITS}/{name}.service")))?;
    if u.package == Package::Agent {
        // /proc/sys stays read-only but for exactly the forwarding switches the agent writes.
        let writable: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ReadWritePaths="))
            .flat_map(str::split_whitespace)
            .filter(|p| p.trim_start_matches('-').starts_with("/proc/"))
            .collect();
        ensure!(
            writable == ["/proc/sys/net/ipv4/ip_forward", "-/proc/sys/net/ipv6/conf/all/forwarding"],
            "the agent's unit makes other /proc paths writable than the two forwarding switches: {writable:?}"
        );
    }
    let config = match u.package {
        Package::Agent => "/etc/wirefence/agent.toml",
        Package::Control => "/etc/default/wirefence-control",
    };
    ensure!(
        unit.lines().any(|l| l.trim() == format!("ConditionPathExists={config}")),
        "{name}.service does not wait for {config}"
    );

    let docs = [
        gunzip(&u.root.join(format!("usr/share/man/man1/{name}.1.gz")))?,
        read(&u.root.join(format!("usr/share/bash-completion/completions/{name}")))?,
        read(&u.root.join(format!("usr/share/zsh/vendor-completions/_{name}")))?,
        read(&u.root.join(format!("usr/share/fish/vendor_completions.d/{name}.fish")))?,
    ];
    for (doc, text) in ["man page", "bash completion", "zsh completion", "fish completion"].iter().zip(&docs) {
        let absent: Vec<&str> = subcommands(u.package).iter().copied().filter(|s| !text.contains(s)).collect();
        ensure!(absent.is_empty(), "the {doc} of {name} does not name {}", absent.join(", "));
    }

    match u.package {
        Package::Agent => agent_files(u),
        Package::Control => control_files(u),
    }
}

fn agent_files(u: &Unpacked) -> Result<()> {
    let conffiles = read(&u.control.join("conffiles"))?;
    ensure!(
        conffiles.lines().any(|l| l.trim() == "/etc/iproute2/rt_protos.d/wirefence.conf"),
        "rt_protos.d/wirefence.conf is not a conffile: {conffiles:?}"
    );
    let protos = read(&u.root.join("etc/iproute2/rt_protos.d/wirefence.conf"))?;
    let mapping: Vec<(&str, &str)> = protos
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(n, name)| (n, name.trim()))
        .collect();
    let default = wirefence_agent::config::DEFAULT_ROUTE_PROTOCOL.to_string();
    ensure!(
        mapping == [(default.as_str(), "wirefence")],
        "rt_protos.d/wirefence.conf must map the agent's route protocol {default} to `wirefence`, it maps {mapping:?}"
    );
    let example = u.root.join("usr/share/doc/wirefence-agent/examples/agent.toml");
    let text = read(&example)?;
    let config = wirefence_agent::config::Config::parse(&example, &text).context("the example agent.toml")?;
    ensure!(
        config.agent.state_dir == Path::new("/var/lib/wirefence"),
        "the example's state_dir is not the unit's StateDirectory"
    );
    ensure!(
        config.interface.private_key_file.starts_with("/var/lib/wirefence"),
        "the example's private key is outside the state directory, where the unit cannot write"
    );
    Ok(())
}

fn control_files(u: &Unpacked) -> Result<()> {
    use clap::Parser;
    let example = read(&u.root.join("usr/share/doc/wirefence-control/examples/wirefence-control.default"))?;
    let opts = example
        .lines()
        .find_map(|l| l.strip_prefix("WIREFENCE_CONTROL_OPTS="))
        .context("the example environment file sets no WIREFENCE_CONTROL_OPTS")?
        .trim_matches('"');
    let argv = ["wirefence-control", "serve"].into_iter().chain(opts.split_whitespace());
    let cli = wirefence_control::cli::Cli::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("the example WIREFENCE_CONTROL_OPTS do not parse: {e}"))?;
    let wirefence_control::cli::Command::Serve(serve) = cli.command else { unreachable!("parsed as serve") };
    ensure!(
        serve.db.file().is_some_and(|f| f.starts_with("/var/lib/wirefence-control")),
        "the default database is outside the StateDirectory"
    );
    ensure!(
        cli.admin_socket.starts_with("/run/wirefence-control"),
        "the default admin socket is outside the RuntimeDirectory"
    );
    Ok(())
}

/// `systemd-analyze verify` of the package's unit, in a root of its own (`--root`): the
/// unit and binaries as packaged, plus what the units refer to from the host (systemd's
/// targets, `kill`, `chmod`, `install`), so a missing binary or a typo in a key fails. Man pages are not
/// looked up (`--man=no`): the contents check reads them.
fn verify_units(u: &Unpacked, dir: &Path) -> Result<()> {
    let name = u.package.name();
    let root = dir.join("verify");
    let units = root.join("lib/systemd/system");
    let bins = root.join("usr/bin");
    for d in [&units, &bins] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).context("link bin -> usr/bin")?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display())).map(|_| ())
    };
    copy(&u.root.join(format!("usr/bin/{name}")), &bins.join(name))?;
    // The host's tools the units run: ExecReload's kill, the agent's ExecStartPre.
    for tool in ["kill", "chmod", "install"] {
        copy(&Path::new("/usr/bin").join(tool), &bins.join(tool))?;
    }
    let host_units = Path::new(HOST_UNITS);
    for entry in std::fs::read_dir(host_units).with_context(|| format!("read {HOST_UNITS}"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "target") && path.is_file() {
            copy(&path, &units.join(path.file_name().expect("a file")))?;
        }
    }
    let unit = units.join(format!("{name}.service"));
    copy(&u.root.join(format!("{UNITS}/{name}.service")), &unit)?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg(&unit)
        .output()
        .context("run systemd-analyze (Debian package systemd)")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Warnings (an unknown key: "ignoring") leave the exit status 0: any output fails.
    ensure!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify {name}.service:\n{text}");
    Ok(())
}

/// Where the packages install their units.
const UNITS: &str = "usr/lib/systemd/system";

/// Where the host's systemd keeps its own units (Debian 12; /lib is /usr/lib).
const HOST_UNITS: &str = "/lib/systemd/system";

/// lintian at warning level and above; an override must come with a comment saying why.
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--display-level", ">=warning", "--no-tag-display-limit"])
        .arg(deb)
        .output()
        .context("run lintian (Debian package lintian)")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "lintian:\n{text}");
    Ok(())
}

/// Every lintian override must follow a comment that says why.
fn unexplained_overrides(text: &str) -> Result<()> {
    let mut explained = false;
    let mut bare = Vec::new();
    for line in text.lines().map(str::trim) {
        match line {
            "" => explained = false,
            l if l.starts_with('#') => explained = true,
            l if !explained => bare.push(l.to_owned()),
            _ => {}
        }
    }
    ensure!(bare.is_empty(), "lintian overrides without a comment saying why: {}", bare.join(", "));
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

fn gunzip(path: &Path) -> Result<String> {
    tools::output(Command::new("gzip").arg("-dc").arg(path))
}

/// A field of a Debian control file (single line).
fn field<'a>(control: &'a str, name: &str) -> Option<&'a str> {
    control.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_needs_a_comment_right_above_it() {
        assert!(unexplained_overrides("# why\np: tag-a\np: tag-b\n").is_ok());
        let e = unexplained_overrides("# why\np: tag-a\n\np: tag-b\n").unwrap_err().to_string();
        assert!(e.contains("p: tag-b") && !e.contains("tag-a"), "{e}");
    }

    #[test]
    fn control_fields() {
        let control = "Package: wirefence-agent\nVersion: 0.1.0-1\nDepends: libc6 (>= 2.34), systemd\n";
        assert_eq!(field(control, "Version"), Some("0.1.0-1"));
        assert_eq!(field(control, "Depends"), Some("libc6 (>= 2.34), systemd"));
        assert_eq!(field(control, "Recommends"), None);
    }
}
