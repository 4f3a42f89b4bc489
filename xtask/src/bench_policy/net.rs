//! Network namespaces joined by a veth pair, and commands run inside them. Everything is
//! owned by a guard and removed on drop, also on error paths.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use crate::netns::{output, Netns};

/// Every namespace this benchmark creates is named `<NS_PREFIX><pid>-<role>`.
pub const NS_PREFIX: &str = "wfbpol-";

/// Deletes namespaces a killed earlier run of this benchmark left behind.
pub fn remove_stale_namespaces() {
    crate::netns::remove_stale_namespaces(NS_PREFIX);
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
