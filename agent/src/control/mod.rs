//! Control mode: the agent takes its addresses, peers and policy from a control plane over
//! gRPC (`wirefence.v1`). The client produces desired state only; the daemon applies it
//! through the reconciler and the client acknowledges what was applied.

pub mod checks;
pub mod client;
pub mod config;
pub mod connect;
pub mod guard;
pub mod health;
pub mod hits;
pub mod parts;
pub mod persist;
pub mod rotation;
mod sniff;
pub mod tracker;
pub mod view;

pub use client::{ApplyRequest, ControlClient, ViewError, ViewRejected};
pub use config::{Advertised, ControlConfig};
pub use guard::{GuardConfig, GuardError};
pub use health::ControlHealth;
pub use persist::{ControlFiles, ControlStatus};
pub use rotation::KeySwitch;
pub use tracker::{Applied, Offer, Tracker};
pub use view::{ControlView, UpdateError};

use crate::config::Config;
use crate::policy::resolve::DEFAULT_PIN_DIR;
use crate::policy::PolicyConfig;

/// The config the desired state is built from: in control mode the view's peers, its
/// addresses and mesh prefixes (beside any configured ones) and its policy, which is always
/// enforced; without a view yet, no peers and a policy that denies everything. A static
/// config as it is.
pub fn effective_config(mut config: Config, view: Option<&ControlView>) -> Config {
    if config.control.is_none() {
        return config;
    }
    let empty = ControlView::default();
    let view = view.unwrap_or(&empty);
    config.peers = view.peer_configs();
    config.interface.addresses.extend(view.addresses.iter().copied());
    config.routing.mesh_prefixes.extend(view.mesh_prefixes.iter().copied());
    let pin_dir = config.policy.as_ref().map_or_else(|| DEFAULT_PIN_DIR.into(), |p| p.pin_dir.clone());
    config.policy = Some(PolicyConfig { pin_dir, policy: view.policy.clone() });
    config
}
