//! What guards enrollment before a key or a node is looked at: proof-of-possession
//! challenges, rate limits per source address and per enrollment key, and the addresses a
//! node may not advertise as its endpoint (the overlay, the control plane's own).

pub mod challenge;
pub mod limit;

use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;
use std::time::Duration;

pub use challenge::Challenges;
pub use limit::{Buckets, Rate};

/// Enrollment rate limits (token buckets).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnrollLimits {
    /// Enrollment attempts and challenges per source address.
    pub per_source: Rate,
    /// Enrollments per enrollment key (counted once the key checks out).
    pub per_key: Rate,
}

impl Default for EnrollLimits {
    /// Enough for a fleet rolled out by a script from one address in bursts, slow for a
    /// leaked key or a client hammering the endpoint.
    fn default() -> EnrollLimits {
        EnrollLimits {
            per_source: Rate { burst: 20, every: Duration::from_secs(3) },
            per_key: Rate { burst: 20, every: Duration::from_secs(3) },
        }
    }
}

pub struct Gate {
    pub challenges: Challenges,
    pub per_source: Buckets<IpAddr>,
    pub per_key: Buckets<String>,
    control_plane: RwLock<Vec<IpAddr>>,
}

impl Gate {
    pub fn new(limits: EnrollLimits) -> Gate {
        Gate {
            challenges: Challenges::default(),
            per_source: Buckets::new(limits.per_source),
            per_key: Buckets::new(limits.per_key),
            control_plane: RwLock::new(Vec::new()),
        }
    }

    /// The control plane's own addresses, which no node may advertise as its endpoint.
    pub fn control_plane(&self) -> Vec<IpAddr> {
        self.control_plane.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the bound listen addresses: specific ones as they are, and for a wildcard
    /// (0.0.0.0, [::]) the host's own interface addresses.
    pub fn set_listen(&self, listen: &[SocketAddr]) {
        let mut addrs: Vec<IpAddr> = listen.iter().map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).collect();
        if listen.iter().any(|a| a.ip().is_unspecified()) {
            match nix::ifaddrs::getifaddrs() {
                Ok(ifs) => addrs.extend(ifs.filter_map(|i| i.address).filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the local addresses (endpoint checks use the listen addresses only)")
                }
            }
        }
        addrs.sort();
        addrs.dedup();
        *self.control_plane.write().unwrap_or_else(|e| e.into_inner()) = addrs;
    }
}
