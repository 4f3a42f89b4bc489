//! Tells a service manager (systemd, `Type=notify`) how the daemon is doing: READY=1 once
//! the first pass converged, RELOADING=1/READY=1 around a config reload, STOPPING=1 on the
//! way out. Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

use sd_notify::NotifyState;

/// The readiness protocol's state: READY=1 is sent once, and reload notices only after it
/// (a reload before the first convergence must not make systemd think startup finished).
#[derive(Debug, Default)]
pub struct Supervisor {
    ready: bool,
}

impl Supervisor {
    /// A pass converged; the first time, startup is finished.
    pub fn converged(&mut self) {
        if !self.ready {
            self.ready = true;
            send(&[NotifyState::Ready, NotifyState::Status("converged")]);
        }
    }

    /// A reload (SIGHUP or a changed config file) begins.
    pub fn reloading(&self) {
        if !self.ready {
            return;
        }
        // systemd 253+ requires the monotonic timestamp with RELOADING=1.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(error) => tracing::warn!(%error, "cannot read the monotonic clock for the reload notice"),
        }
    }

    /// The reload was applied or refused: the daemon runs again either way.
    pub fn reloaded(&self) {
        if self.ready {
            send(&[NotifyState::Ready, NotifyState::Status("converged")]);
        }
    }

    pub fn stopping(&self) {
        send(&[NotifyState::Stopping]);
    }
}

fn send(state: &[NotifyState]) {
    // A supervisor that cannot be told is no reason to stop enforcing: log and go on.
    if let Err(error) = sd_notify::notify(state) {
        tracing::warn!(%error, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}
