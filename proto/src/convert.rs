//! Wire addresses <-> `std::net` / `ipnet`. Decoding validates: a prefix with host bits set,
//! an address of the wrong length or a zero port is an error, never silently fixed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::v1::{IpPrefix, SocketAddress};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("address has {0} bytes (want 4 or 16)")]
    AddressLength(usize),
    #[error("prefix length {len} is too long for {addr}")]
    PrefixLength { addr: IpAddr, len: u32 },
    #[error("prefix {0} has host bits set")]
    HostBits(IpNet),
    #[error("port {0} is out of range (1-65535)")]
    Port(u32),
}

pub fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, WireError> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).expect("length checked")))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("length checked")))),
        n => Err(WireError::AddressLength(n)),
    }
}

pub fn ip_to_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl From<IpNet> for IpPrefix {
    fn from(n: IpNet) -> IpPrefix {
        IpPrefix { addr: ip_to_bytes(n.addr()), prefix_len: n.prefix_len().into() }
    }
}

impl TryFrom<&IpPrefix> for IpNet {
    type Error = WireError;
    fn try_from(p: &IpPrefix) -> Result<IpNet, WireError> {
        let addr = ip_from_bytes(&p.addr)?;
        let len = u8::try_from(p.prefix_len).map_err(|_| WireError::PrefixLength { addr, len: p.prefix_len })?;
        let net = IpNet::new(addr, len).map_err(|_| WireError::PrefixLength { addr, len: p.prefix_len })?;
        if net.trunc() != net {
            return Err(WireError::HostBits(net));
        }
        Ok(net)
    }
}

impl From<SocketAddr> for SocketAddress {
    fn from(s: SocketAddr) -> SocketAddress {
        SocketAddress { ip: ip_to_bytes(s.ip()), port: s.port().into() }
    }
}

impl TryFrom<&SocketAddress> for SocketAddr {
    type Error = WireError;
    fn try_from(s: &SocketAddress) -> Result<SocketAddr, WireError> {
        let ip = ip_from_bytes(&s.ip)?;
        match u16::try_from(s.port) {
            Ok(port) if port != 0 => Ok(SocketAddr::new(ip, port)),
            _ => Err(WireError::Port(s.port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_roundtrip_and_reject_bad_input() {
        for s in ["10.1.2.0/24", "0.0.0.0/0", "fd77::1/128", "::/0"] {
            let n: IpNet = s.parse().unwrap();
            assert_eq!(IpNet::try_from(&IpPrefix::from(n)).unwrap(), n);
        }
        let bad = |addr: &[u8], len| IpNet::try_from(&IpPrefix { addr: addr.to_vec(), prefix_len: len }).unwrap_err();
        assert_eq!(bad(&[1, 2, 3], 8), WireError::AddressLength(3));
        assert!(matches!(bad(&[10, 0, 0, 0], 33), WireError::PrefixLength { .. }));
        assert!(matches!(bad(&[10, 0, 0, 1], 24), WireError::HostBits(_)));
        assert!(matches!(bad(&[0; 16], u32::MAX), WireError::PrefixLength { .. }));
    }

    #[test]
    fn socket_addresses_need_a_port() {
        let s: SocketAddr = "[fd00::1]:51820".parse().unwrap();
        assert_eq!(SocketAddr::try_from(&SocketAddress::from(s)).unwrap(), s);
        assert_eq!(
            SocketAddr::try_from(&SocketAddress { ip: vec![1, 2, 3, 4], port: 0 }).unwrap_err(),
            WireError::Port(0)
        );
        assert_eq!(
            SocketAddr::try_from(&SocketAddress { ip: vec![1, 2, 3, 4], port: 70000 }).unwrap_err(),
            WireError::Port(70000)
        );
    }
}
