//! Overlay address allocation: the lowest free host address of a range, never the network
//! address (nor, for IPv4, the broadcast address). Addresses are stable: once allocated a
//! node keeps its address, and addresses of removed nodes are not handed out again.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The lowest address of `net` not in `used`, or `None` when the range is full.
pub fn allocate(net: IpNet, used: &HashSet<IpAddr>) -> Option<IpAddr> {
    let (base, bits) = match net.network() {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32u32),
        IpAddr::V6(a) => (u128::from(a), 128u32),
    };
    let host_bits = bits - u32::from(net.prefix_len());
    // Usable offsets: 1 ..= last, where last excludes the IPv4 broadcast address.
    let size: u128 = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    let last = match net {
        IpNet::V4(_) if host_bits >= 2 => size - 1,
        _ => size,
    };
    // At most used.len() + 1 candidates need looking at.
    let tries = u128::try_from(used.len()).unwrap_or(u128::MAX).saturating_add(1);
    (1..=last.min(tries)).map(|off| to_ip(&net, base + off)).find(|ip| !used.contains(ip))
}

fn to_ip(net: &IpNet, v: u128) -> IpAddr {
    match net {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX))),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// The host prefix (/32 or /128) of an address.
pub fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> HashSet<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn lowest_free_address_skipping_network_and_broadcast() {
        let net: IpNet = "10.77.0.0/16".parse().unwrap();
        assert_eq!(allocate(net, &ips(&[])), Some("10.77.0.1".parse().unwrap()));
        assert_eq!(allocate(net, &ips(&["10.77.0.1", "10.77.0.2"])), Some("10.77.0.3".parse().unwrap()));
        assert_eq!(allocate(net, &ips(&["10.77.0.2"])), Some("10.77.0.1".parse().unwrap()));
        let v6: IpNet = "fd77::/64".parse().unwrap();
        assert_eq!(allocate(v6, &ips(&["fd77::1"])), Some("fd77::2".parse().unwrap()));
        assert_eq!(host("fd77::2".parse().unwrap()).to_string(), "fd77::2/128");
    }

    #[test]
    fn full_ranges_are_reported() {
        let net: IpNet = "10.0.0.0/30".parse().unwrap();
        assert_eq!(allocate(net, &ips(&["10.0.0.1"])), Some("10.0.0.2".parse().unwrap()));
        // .0 is the network, .3 the broadcast address.
        assert_eq!(allocate(net, &ips(&["10.0.0.1", "10.0.0.2"])), None);
        let p2p: IpNet = "10.0.0.0/31".parse().unwrap();
        assert_eq!(allocate(p2p, &ips(&[])), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(allocate(p2p, &ips(&["10.0.0.1"])), None);
        let single: IpNet = "fd00::/128".parse().unwrap();
        assert_eq!(allocate(single, &ips(&[])), None);
    }
}
