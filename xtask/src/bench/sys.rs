//! Network namespaces, the userspace WireGuard daemon, and timed child processes.
//!
//! Children enter a namespace by `setns(2)` between fork and exec instead of through
//! `ip netns exec`, so no extra process or mount work is timed on either side.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use crate::netns::{output, Netns};

pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Every namespace this harness creates is named `<NS_PREFIX><pid>-<n>`.
pub const NS_PREFIX: &str = "wfbench-";

pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

fn answering(sock: &Path) -> bool {
    UnixStream::connect(sock).is_ok()
}

/// Deletes namespaces a killed earlier run of this harness left behind.
pub fn remove_stale_namespaces() {
    crate::netns::remove_stale_namespaces(NS_PREFIX);
}

/// wireguard-go serving `ifname` inside a namespace; stopped on drop, its socket removed.
pub struct Daemon {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon and returns once its UAPI socket accepts a connection, with the
    /// time that took.
    pub fn start(ns: &Netns, ifname: &str, log: &Path) -> Result<(Daemon, Duration)> {
        let sock = socket_path(ifname);
        if sock.exists() {
            if answering(&sock) {
                bail!("{} answers already: another wireguard-go serves {ifname}", sock.display());
            }
            std::fs::remove_file(&sock).with_context(|| format!("remove stale {}", sock.display()))?;
        }
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let started = Instant::now();
        let child = ns
            .command("wireguard-go")
            .args(["-f", ifname])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("cannot start wireguard-go (apt-get install wireguard-go)")?;
        let mut daemon = Daemon { child, sock, log: log.to_owned() };
        let deadline = started + Duration::from_secs(10);
        loop {
            if answering(&daemon.sock) {
                return Ok((daemon, started.elapsed()));
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("wireguard-go {ifname} exited with {status} before answering: {}", tail(&daemon.log));
            }
            if Instant::now() > deadline {
                bail!("wireguard-go {ifname}: no answer on {} after 10s", daemon.sock.display());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Peak resident set of the daemon so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        if self.sock.exists() && !answering(&self.sock) {
            let _ = std::fs::remove_file(&self.sock);
        }
    }
}

fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(2000)));
        let _ = f.read_to_string(&mut s);
    }
    s.trim().to_owned()
}

/// One timed child process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub wall: Duration,
    /// User plus system CPU time of the child (and children it waited for).
    pub cpu: Duration,
    /// Peak resident set size, KiB.
    pub max_rss_kib: u64,
}

impl Sample {
    /// Several processes run one after the other: times add up, the peak is the largest.
    pub fn then(self, next: Sample) -> Sample {
        Sample {
            wall: self.wall + next.wall,
            cpu: self.cpu + next.cpu,
            max_rss_kib: self.max_rss_kib.max(next.max_rss_kib),
        }
    }
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Runs `cmd` to completion and measures it: wall time from spawn to exit, and the
/// child's own rusage from wait4(2) (CPU time, peak RSS). Output goes to `log` (appended);
/// a non-zero exit is an error quoting the log's tail.
pub fn run_timed(mut cmd: Command, log: &Path) -> Result<Sample> {
    let out = File::options().create(true).append(true).open(log).with_context(|| format!("open {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("cannot start {shown}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        // SAFETY: waiting for our own child; `child` is never waited on by std afterwards.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    let wall = started.elapsed();
    drop(child);
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("wait for {shown}"));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{shown} failed (wait status {status:#x}); output ({}):\n{}", log.display(), tail(log));
    }
    Ok(Sample {
        wall,
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        // ru_maxrss is in KiB on Linux.
        max_rss_kib: usage.ru_maxrss as u64,
    })
}
