//! A userspace WireGuard daemon (wireguard-go, boringtun) serving the UAPI on
//! /var/run/wireguard/<ifname>.sock. The agent starts it, waits for its socket by inotify
//! (never a blind sleep), and restarts it when it dies.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchMask};
use wireguard_control::{Backend, Device, DeviceUpdate};

use super::kernel::wg_name;
use super::{io_err, DeviceInfo, WgBackend, WgError};
use crate::model::IfName;

const SOCKET_DIR: &str = "/var/run/wireguard";
/// How long a daemon may take to open its socket before start-up counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct UserspaceBackend {
    command: String,
    log_dir: PathBuf,
    /// Woken when a daemon this agent started exits, so the reconciler restarts it at once.
    wake: Arc<tokio::sync::Notify>,
}

fn socket_path(ifname: &IfName) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{ifname}.sock"))
}

impl UserspaceBackend {
    pub fn new(command: String, log_dir: PathBuf, wake: Arc<tokio::sync::Notify>) -> Self {
        UserspaceBackend { command, log_dir, wake }
    }

    fn start_err(&self, ifname: &IfName, reason: impl Into<String>) -> WgError {
        WgError::Start { command: self.command.clone(), ifname: ifname.clone(), reason: reason.into() }
    }

    fn answering(ifname: &IfName) -> bool {
        UnixStream::connect(socket_path(ifname)).is_ok()
    }

    fn log_path(&self, ifname: &IfName) -> PathBuf {
        self.log_dir.join(format!("{ifname}.userspace.log"))
    }

    fn log_tail(&self, ifname: &IfName) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path(ifname)) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

impl WgBackend for UserspaceBackend {
    fn kind(&self) -> crate::ownership::BackendKind {
        crate::ownership::BackendKind::Userspace
    }

    fn ensure_device(&self, ifname: &IfName) -> Result<(), WgError> {
        if Self::answering(ifname) {
            return Ok(()); // adopt a running daemon (for example after an agent restart)
        }
        let sock = socket_path(ifname);
        let _ = std::fs::remove_file(&sock); // stale: nobody answers on it
        std::fs::create_dir_all(SOCKET_DIR).map_err(io_err("userspace", "create /var/run/wireguard", ifname))?;
        std::fs::create_dir_all(&self.log_dir).map_err(io_err("userspace", "create log directory", ifname))?;

        // Watch before spawning so the socket's creation cannot be missed.
        let mut inotify = Inotify::init().map_err(io_err("userspace", "inotify", ifname))?;
        inotify.watches().add(SOCKET_DIR, WatchMask::CREATE | WatchMask::MOVED_TO).map_err(io_err(
            "userspace",
            "inotify watch",
            ifname,
        ))?;

        let log = OpenOptions::new().create(true).append(true).open(self.log_path(ifname)).map_err(io_err(
            "userspace",
            "open daemon log",
            ifname,
        ))?;
        let log2 = log.try_clone().map_err(io_err("userspace", "open daemon log", ifname))?;
        let mut cmd = Command::new(&self.command);
        cmd.arg("-f")
            .arg(ifname.as_str())
            .stdin(Stdio::null())
            // A file, not a pipe: the daemon must outlive the agent without dying of SIGPIPE.
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid is async-signal-safe; the daemon gets its own session so signals
        // aimed at the agent's terminal or process group do not stop the tunnel.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| self.start_err(ifname, e.to_string()))?;
        let pidfd = crate::sys::pidfd_open(child.id()).map_err(io_err("userspace", "pidfd_open", ifname))?;
        tracing::info!(%ifname, command = %self.command, pid = child.id(), "started userspace WireGuard daemon");

        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = [0u8; 4096];
        // The daemon binds (inotify sees the file) and then listens; between the two a connect
        // is refused, so once the file exists the wait falls back to a short doubling retry.
        let mut retry = Duration::from_millis(1);
        loop {
            if Self::answering(ifname) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let left = if sock.exists() {
                retry = (retry * 2).min(Duration::from_millis(100));
                left.min(retry)
            } else {
                left
            };
            if left.is_zero() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.start_err(ifname, format!("no socket at {} after {START_TIMEOUT:?}", sock.display())));
            }
            let mut fds = [
                libc::pollfd { fd: inotify.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of two pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis().min(i32::MAX as u128) as i32) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io_err("userspace", "poll", ifname)(e));
                }
            }
            if fds[1].revents != 0 {
                let status = child.wait().map_err(io_err("userspace", "wait for daemon", ifname))?;
                return Err(self.start_err(
                    ifname,
                    format!("exited with {status} before opening its socket: {}", self.log_tail(ifname)),
                ));
            }
            if fds[0].revents != 0 {
                let _ = inotify.read_events(&mut buf); // drain; the loop re-checks the socket
            }
        }

        let wake = self.wake.clone();
        let name = ifname.clone();
        std::thread::Builder::new()
            .name(format!("supervise-{ifname}"))
            .spawn(move || {
                let status = child.wait();
                tracing::warn!(ifname = %name, ?status, "userspace WireGuard daemon exited");
                wake.notify_one();
            })
            .map_err(io_err("userspace", "spawn supervisor thread", ifname))?;
        Ok(())
    }

    fn read(&self, ifname: &IfName) -> Result<Option<DeviceInfo>, WgError> {
        if !socket_path(ifname).exists() {
            return Ok(None);
        }
        match Device::get(&wg_name(ifname), Backend::Userspace) {
            Ok(d) => Ok(Some(d)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) => Err(io_err("userspace", "read device", ifname)(e)),
        }
    }

    fn apply(&self, ifname: &IfName, update: DeviceUpdate) -> Result<(), WgError> {
        if !Self::answering(ifname) {
            // Never let wireguard-control start a daemon itself (it would sleep blindly).
            return Err(io_err("userspace", "configure device", ifname)(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "daemon is not answering on its socket",
            )));
        }
        update.apply(&wg_name(ifname), Backend::Userspace).map_err(io_err("userspace", "configure device", ifname))
    }

    fn cleanup(&self, ifname: &IfName) -> Result<(), WgError> {
        // With its tun link deleted the daemon exits; a leftover socket file is stale.
        if !Self::answering(ifname) {
            let _ = std::fs::remove_file(socket_path(ifname));
        }
        Ok(())
    }
}
