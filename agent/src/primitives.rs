//! Config primitives shared by the config file, the control-plane settings and the policy
//! resolver: endpoints, prefixes in canonical form, and a `[[peers]]` entry. Their own
//! module so that none of those depends on another's module to get them.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ipnet::IpNet;

use crate::model::PublicKey;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

impl Endpoint {
    pub(crate) fn parse(s: &str) -> Result<Endpoint, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Endpoint::Addr(addr));
        }
        let (host, port) =
            s.rsplit_once(':').ok_or_else(|| format!("endpoint {s:?} needs host:port (IPv6 as [addr]:port)"))?;
        let port: u16 =
            port.parse().map_err(|_| format!("endpoint {s:?}: port {port:?} is not a number from 0 to 65535"))?;
        if host.is_empty() || host.contains(':') || host.contains('[') {
            return Err(format!("endpoint {s:?} needs host:port (IPv6 as [addr]:port)"));
        }
        Ok(Endpoint::Host { host: host.to_owned(), port })
    }

    /// Resolves a host name (first address returned); a literal address is returned as is.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        match self {
            Endpoint::Addr(a) => Ok(*a),
            Endpoint::Host { host, port } => (host.as_str(), *port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{host} has no address"))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub name: Option<String>,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// 1-based line of the `[[peers]]` entry, for messages found later (e.g. DNS).
    pub line: usize,
}

/// A prefix in canonical form: host bits set is an error, not silently masked.
pub(crate) fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let net: IpNet = match s.parse() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("{s:?} is not a prefix (e.g. 10.77.0.2/32 or fd77::2/128)")),
        },
    };
    if net.trunc() != net {
        return Err(format!("{s:?} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Finds two prefixes of different peers where one contains the other.
/// Sorted by (network, length) a containing prefix precedes what it contains, so a stack
/// of the prefixes still "open" at each point holds exactly those containing it.
pub(crate) fn find_overlap(peers: &[PeerConfig]) -> Option<(usize, usize, IpNet, IpNet)> {
    let order = |n: &IpNet| match n {
        IpNet::V4(v4) => (0u8, u32::from(v4.network()) as u128, v4.prefix_len()),
        IpNet::V6(v6) => (1u8, u128::from(v6.network()), v6.prefix_len()),
    };
    // The sort key computed once per prefix, not per comparison (20,000 prefixes per load);
    // the same prefix in two peers: the earlier peer first, so the later one is named.
    let mut all: Vec<(_, IpNet, usize)> =
        peers.iter().enumerate().flat_map(|(i, p)| p.allowed_ips.iter().map(move |n| ((order(n), i), *n, i))).collect();
    all.sort_unstable_by_key(|(key, _, _)| *key);
    let mut open: Vec<(IpNet, usize)> = Vec::new();
    for (_, net, owner) in all {
        while let Some((top, _)) = open.last() {
            if top.contains(&net) {
                break;
            }
            open.pop();
        }
        if let Some((outer, o)) = open.iter().find(|(_, o)| *o != owner) {
            return Some((*o, owner, *outer, net));
        }
        open.push((net, owner));
    }
    None
}
