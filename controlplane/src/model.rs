//! In-memory node records shared (behind `Arc`) by the global states.

use std::net::SocketAddr;

use ipnet::IpNet;

/// A raw X25519 public key.
pub type PublicKey = [u8; 32];

/// A live node as the views see it. Holds no credential material.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRec {
    pub id: String,
    pub hostname: String,
    /// The node owns `hostname` (bound enrollment key or admin approval), so `node:`
    /// selectors and policy tests may name it. Otherwise the hostname is a label only.
    pub bound: bool,
    pub public_key: PublicKey,
    /// Overlay host prefixes: one IPv4 /32 and one IPv6 /128.
    pub addresses: Vec<IpNet>,
    pub endpoints: Vec<SocketAddr>,
    /// Subnets this node routes for the mesh.
    pub routes: Vec<IpNet>,
    pub tags: Vec<String>,
    /// Routes it advertised and did not get, with why (in memory: the node's next
    /// registration after a restart of the control plane says them again). Its own view
    /// carries them, so the agent's status stays true when an admin changes the grant.
    pub refused_routes: Vec<RefusedRoute>,
}

impl NodeRec {
    /// Overlay addresses and advertised routes: everything routed to this node.
    pub fn prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.addresses.iter().chain(self.routes.iter())
    }

    /// The name other nodes see: the hostname it owns, else its id (a label chosen by the
    /// node itself must not pass for another node's name).
    pub fn peer_name(&self) -> String {
        if self.bound {
            self.hostname.clone()
        } else {
            self.id.clone()
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Hostnames: dot-separated DNS labels (1-63 of A-Z a-z 0-9 -, not starting or ending
/// with `-`), at most 253 characters.
pub fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["db1", "laptop-2", "a.b.c", "X"] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "a_b", &"x".repeat(64)] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }
}

/// An advertised route the control plane did not take, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum RefusedRoute {
    #[error("{route} is not within the routes granted to this node ({}; keys create --route)", prefix_list(.granted))]
    NotGranted { route: IpNet, granted: Vec<IpNet> },
    #[error("{route} overlaps route {theirs} of node {node}")]
    Taken { route: IpNet, theirs: IpNet, node: String },
}

impl RefusedRoute {
    pub fn route(&self) -> IpNet {
        match self {
            RefusedRoute::NotGranted { route, .. } | RefusedRoute::Taken { route, .. } => *route,
        }
    }

    pub fn to_wire(&self) -> wirefence_proto::v1::RefusedRoute {
        wirefence_proto::v1::RefusedRoute {
            route: Some(wirefence_proto::v1::IpPrefix::from(self.route())),
            reason: self.to_string(),
        }
    }
}

/// Prefixes for a message: "a, b", or "none".
pub fn prefix_list(nets: &[IpNet]) -> String {
    match nets {
        [] => "none".to_owned(),
        _ => nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
    }
}
