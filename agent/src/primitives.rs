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

/// Why an endpoint is not `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// An address or host name alone: the most common slip, so it is said as such.
    #[error("endpoint {endpoint:?} has no port (write {example})")]
    MissingPort { endpoint: String, example: String },
    #[error("endpoint {endpoint:?}: port {port:?} is not a number from 0 to 65535")]
    BadPort { endpoint: String, port: String },
    #[error("endpoint {0:?} needs host:port (IPv6 as [addr]:port)")]
    Malformed(String),
}

impl Endpoint {
    pub(crate) fn parse(s: &str) -> Result<Endpoint, EndpointError> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Endpoint::Addr(addr));
        }
        let missing =
            |host: &str| EndpointError::MissingPort { endpoint: s.to_owned(), example: format!("{host}:PORT") };
        // An address alone, IPv6 with or without its brackets.
        let unbracketed = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
        match unbracketed.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => return Err(missing(&format!("[{a}]"))),
            Ok(IpAddr::V4(a)) => return Err(missing(&a.to_string())),
            Err(_) => {}
        }
        if let Some((ip, port)) = s.strip_prefix('[').and_then(|r| r.split_once("]:")) {
            if ip.parse::<std::net::Ipv6Addr>().is_ok() {
                return Err(match port {
                    "" => missing(&format!("[{ip}]")),
                    _ => EndpointError::BadPort { endpoint: s.to_owned(), port: port.to_owned() },
                });
            }
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(if s.is_empty() || s.contains('[') {
                EndpointError::Malformed(s.to_owned())
            } else {
                missing(s)
            });
        };
        if host.is_empty() || host.contains(':') || host.contains('[') {
            return Err(EndpointError::Malformed(s.to_owned()));
        }
        if port.is_empty() {
            return Err(missing(host));
        }
        let port: u16 =
            port.parse().map_err(|_| EndpointError::BadPort { endpoint: s.to_owned(), port: port.to_owned() })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(s: &str) -> String {
        match Endpoint::parse(s) {
            Err(e @ EndpointError::MissingPort { .. }) => e.to_string(),
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn an_endpoint_without_a_port_says_so() {
        assert_eq!(missing("[fd00::1]"), "endpoint \"[fd00::1]\" has no port (write [fd00::1]:PORT)");
        assert_eq!(missing("fd00::1"), "endpoint \"fd00::1\" has no port (write [fd00::1]:PORT)");
        assert_eq!(missing("[fd00::1]:"), "endpoint \"[fd00::1]:\" has no port (write [fd00::1]:PORT)");
        assert_eq!(missing("1.2.3.4"), "endpoint \"1.2.3.4\" has no port (write 1.2.3.4:PORT)");
        assert_eq!(missing("1.2.3.4:"), "endpoint \"1.2.3.4:\" has no port (write 1.2.3.4:PORT)");
        assert_eq!(missing("gw.example"), "endpoint \"gw.example\" has no port (write gw.example:PORT)");
    }

    #[test]
    fn other_endpoint_errors() {
        let bad_port = |s: &str| matches!(Endpoint::parse(s), Err(EndpointError::BadPort { .. }));
        assert!(bad_port("h:99999") && bad_port("[fd00::1]:x") && bad_port("1.2.3.4:http"));
        assert_eq!(Endpoint::parse("fd00::1:51820"), Err(EndpointError::Malformed("fd00::1:51820".into())));
        assert_eq!(Endpoint::parse(""), Err(EndpointError::Malformed(String::new())));
        assert_eq!(Endpoint::parse("[fd00::1]:443"), Ok(Endpoint::Addr("[fd00::1]:443".parse().unwrap())));
    }
}
