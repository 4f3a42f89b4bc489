//! Network namespaces for benchmarks: created with `lo` up, entered by `setns(2)` (children
//! between fork and exec, so no `ip netns exec` work is timed), deleted on drop.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown}: output is not UTF-8"))
}

/// A fresh network namespace with `lo` up, deleted on drop.
pub struct Netns {
    pub name: String,
    fd: File,
}

impl Netns {
    pub fn create(name: String) -> Result<Netns> {
        output(Command::new("ip").args(["netns", "add", &name]))?;
        let fd = match File::open(Path::new("/run/netns").join(&name)) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = output(Command::new("ip").args(["netns", "del", &name]));
                return Err(e).with_context(|| format!("open /run/netns/{name}"));
            }
        };
        let ns = Netns { name, fd };
        output(ns.command("ip").args(["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// A command that runs inside this namespace (setns between fork and exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the descriptor stays open while `self` lives.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.fd.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on a valid namespace descriptor affects only this thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::Error::from(std::io::Error::last_os_error()).context("setns"));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = output(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("xtask: warning: {e:#}");
        }
    }
}

/// Deletes namespaces left by earlier runs that were killed (their pid is gone).
pub fn remove_stale_namespaces(prefix: &str) {
    let Ok(list) = output(Command::new("ip").args(["netns", "list"])) else { return };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("xtask: deleting namespace {name} left by an earlier run (pid {pid} is gone)");
            let _ = output(Command::new("ip").args(["netns", "del", name]));
        }
    }
}
