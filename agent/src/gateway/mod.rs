//! `[gateway]`: what a site gateway needs of the kernel besides the tunnel: IP forwarding
//! for the families in use, masquerade of LAN traffic entering the tunnel, and the source
//! address of the gateway's own traffic to remote sites.
//!
//! The config produces a [`DesiredGateway`]; the reconciler observes an [`ObservedGateway`]
//! through [`forward`] and [`nat`] (the only code here that touches the kernel, called by
//! the reconciler alone), and the planner compares the two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Family, IfName};

pub mod forward;
pub mod nat;
pub mod source;

/// The source address of the gateway's own packets to remote sites (`own_traffic`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnTraffic {
    /// The kernel's choice: the tunnel's (overlay) address. A remote policy must name this
    /// node (e.g. `node:<hostname>`) to let it in.
    #[default]
    Overlay,
    /// The gateway's address in its site prefix, so rules on `route:<hostname>` (its LAN)
    /// cover the gateway too.
    Lan,
}

/// One masquerade rule: LAN traffic from `src` leaving through the tunnel device `oif`
/// takes the tunnel's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Masquerade {
    pub src: IpNet,
    pub oif: IfName,
}

/// `own_traffic = "lan"`: where the preferred source comes from and which routes get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanSource {
    /// The site prefixes this gateway routes for the mesh; the source is the host's address
    /// inside one of them (per family).
    pub site: BTreeSet<IpNet>,
    /// Routes inside these (the overlay: other nodes' own addresses) keep the kernel's
    /// choice: a node that accepts no site routes could not answer a LAN source.
    pub overlay: BTreeSet<IpNet>,
}

/// The gateway part of the desired state. `Default`: the agent manages nothing here (and
/// gives back what it changed before).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredGateway {
    /// Families whose forwarding sysctl must be on.
    pub forward: BTreeSet<Family>,
    /// The content of the agent's nftables table; empty: no table.
    pub masquerade: BTreeSet<Masquerade>,
    pub lan_source: Option<LanSource>,
}

/// The gateway part of the kernel as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedGateway {
    /// Each family's forwarding sysctl (absent: the family is off in this kernel).
    pub forwarding: BTreeMap<Family, bool>,
    /// The values found before the agent first turned forwarding on (restored by `down`,
    /// or when the config stops asking for forwarding).
    pub recorded: BTreeMap<Family, bool>,
    pub nat: nat::NatState,
    /// Addresses of the host's links other than the tunnel (read only for `own_traffic = "lan"`).
    pub host_addresses: BTreeSet<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {found:?} is not 0 or 1")]
    BadValue { path: PathBuf, found: String },
    #[error("masquerade needs the `nft` program (Debian package `nftables`): cannot run {program}: {source}")]
    NftMissing { program: String, source: std::io::Error },
    #[error("nft {doing}: {detail}")]
    Nft { doing: &'static str, detail: String },
}
