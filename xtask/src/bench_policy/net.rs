//! Network namespaces joined by a veth pair, and commands run inside them. Everything is
//! owned by a guard and removed on drop, also on error paths.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Every namespace this benchmark creates is named `<NS_PREFIX><pid>-<role>`.
pub const NS_PREFIX: &str = "wfbpol-";

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
            eprintln!("bench-policy: warning: {e:#}");
        }
    }
}

/// Deletes namespaces left by earlier runs that were killed (their pid is gone).
pub fn remove_stale_namespaces() {
    let Ok(list) = output(Command::new("ip").args(["netns", "list"])) else { return };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench-policy: deleting namespace {name} left by an earlier run (pid {pid} is gone)");
            let _ = output(Command::new("ip").args(["netns", "del", name]));
        }
    }
}

/// A child process, killed (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` until true, for at most `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
