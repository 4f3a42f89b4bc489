//! WireGuard backends behind one trait: the kernel module (generic netlink) and a userspace
//! daemon serving the cross-platform UAPI (wireguard-go, boringtun).

mod kernel;
mod userspace;

use std::path::PathBuf;
use std::sync::Arc;

use wireguard_control::{AllowedIp, DeviceUpdate, PeerConfigBuilder};

use crate::config::BackendChoice;
use crate::model::{Desired, DeviceState, IfName, PeerSpec, PublicKey};
use crate::ownership::BackendKind;
use crate::plan::Op;

pub use kernel::{kernel_wireguard_available, KernelBackend};
pub use userspace::UserspaceBackend;

/// Device information including per-peer statistics (for `status`).
pub type DeviceInfo = wireguard_control::Device;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("{what} on {ifname} ({backend} backend): {source}")]
    Io { what: &'static str, ifname: IfName, backend: &'static str, source: std::io::Error },
    #[error("cannot start {command:?} for {ifname}: {reason}")]
    Start { command: String, ifname: IfName, reason: String },
    #[error("backend = \"kernel\" but the kernel has no usable WireGuard module (modprobe wireguard failed); use backend = \"userspace\" or \"auto\"")]
    NoKernelModule,
}

/// Wraps an I/O error with what was being done, on which interface, by which backend.
fn io_err<'a>(
    backend: &'static str,
    what: &'static str,
    ifname: &'a IfName,
) -> impl FnOnce(std::io::Error) -> WgError + 'a {
    move |source| WgError::Io { what, ifname: ifname.clone(), backend, source }
}

/// One WireGuard implementation. Calls block (they talk to a socket); the reconciler runs
/// them off the async executor.
pub trait WgBackend: Send + Sync {
    fn kind(&self) -> BackendKind;
    fn name(&self) -> &'static str {
        self.kind().as_str()
    }
    /// Makes the device exist (kernel: the link; userspace: a running, answering daemon).
    fn ensure_device(&self, ifname: &IfName) -> Result<(), WgError>;
    /// The device, or `None` when there is none.
    fn read(&self, ifname: &IfName) -> Result<Option<DeviceInfo>, WgError>;
    /// Applies one update as one transaction of the backend.
    fn apply(&self, ifname: &IfName, update: DeviceUpdate) -> Result<(), WgError>;
    /// Releases what remains once the link is deleted (userspace: the daemon's socket).
    fn cleanup(&self, ifname: &IfName) -> Result<(), WgError>;
}

/// Picks the backend. `auto` prefers the kernel module when it is loaded or loadable.
pub fn select(
    choice: BackendChoice,
    userspace_command: &str,
    log_dir: PathBuf,
    wake: Arc<tokio::sync::Notify>,
) -> Result<Arc<dyn WgBackend>, WgError> {
    let kernel = || -> Arc<dyn WgBackend> { Arc::new(KernelBackend) };
    let userspace =
        || -> Arc<dyn WgBackend> { Arc::new(UserspaceBackend::new(userspace_command.into(), log_dir, wake)) };
    match choice {
        BackendChoice::Kernel if kernel_wireguard_available() => Ok(kernel()),
        BackendChoice::Kernel => Err(WgError::NoKernelModule),
        BackendChoice::Userspace => Ok(userspace()),
        BackendChoice::Auto if kernel_wireguard_available() => Ok(kernel()),
        BackendChoice::Auto => Ok(userspace()),
    }
}

/// A backend for `down`: only its cleanup runs, so nothing is probed or loaded.
pub fn for_cleanup(recorded: Option<BackendKind>, config: &crate::config::Config) -> Arc<dyn WgBackend> {
    match recorded {
        Some(BackendKind::Kernel) => Arc::new(KernelBackend),
        Some(BackendKind::Userspace) | None => Arc::new(UserspaceBackend::new(
            config.interface.userspace_command.clone(),
            config.agent.state_dir.clone(),
            Default::default(),
        )),
    }
}

pub fn device_state(dev: &DeviceInfo) -> DeviceState {
    let now = std::time::SystemTime::now();
    let session = std::time::Duration::from_secs(crate::model::SESSION_SECS);
    // A handshake "in the future" (the clock stepped back) counts as current.
    let live = |t: std::time::SystemTime| now.duration_since(t).map_or(true, |age| age < session);
    DeviceState {
        live: dev
            .peers
            .iter()
            .filter(|p| p.stats.last_handshake_time.is_some_and(live))
            .map(|p| PublicKey(p.config.public_key.0))
            .collect(),
        public_key: dev.public_key.as_ref().map(|k| PublicKey(k.0)),
        listen_port: dev.listen_port,
        fwmark: dev.fwmark.filter(|m| *m != 0),
        peers: dev
            .peers
            .iter()
            .map(|p| {
                let c = &p.config;
                (
                    PublicKey(c.public_key.0),
                    PeerSpec {
                        endpoint: c.endpoint,
                        allowed_ips: c
                            .allowed_ips
                            .iter()
                            .filter_map(|a| ipnet::IpNet::new(a.address, a.cidr).ok())
                            .collect(),
                        persistent_keepalive: c.persistent_keepalive_interval.filter(|k| *k != 0),
                    },
                )
            })
            .collect(),
    }
}

/// Builds one device update from the WireGuard operations of a plan (others are ignored).
#[must_use]
pub fn device_update<'a>(desired: &Desired, ops: impl IntoIterator<Item = &'a Op>) -> DeviceUpdate {
    let mut update = DeviceUpdate::new();
    for op in ops {
        match op {
            Op::ConfigureDevice { private_key, listen_port, fwmark } => {
                if *private_key {
                    update = update.set_private_key(desired.device.private_key.as_wg());
                }
                if let Some(p) = listen_port {
                    update = update.set_listen_port(*p);
                }
                if let Some(m) = fwmark {
                    update = update.set_fwmark(*m);
                }
            }
            Op::RemovePeer(key) => {
                update = update.add_peer(PeerConfigBuilder::new(&wireguard_control::Key(key.0)).remove());
            }
            Op::UpsertPeer(u) => {
                let mut peer = PeerConfigBuilder::new(&wireguard_control::Key(u.key.0));
                if let Some(e) = u.endpoint {
                    peer = peer.set_endpoint(e);
                }
                if let Some(k) = u.persistent_keepalive {
                    peer = peer.set_persistent_keepalive_interval(k);
                }
                if let Some(ips) = &u.allowed_ips {
                    let ips: Vec<AllowedIp> =
                        ips.iter().map(|n| AllowedIp { address: n.network(), cidr: n.prefix_len() }).collect();
                    peer = peer.replace_allowed_ips().add_allowed_ips(&ips);
                }
                update = update.add_peer(peer);
            }
            _ => {}
        }
    }
    update
}
