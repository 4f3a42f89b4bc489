//! Which socket addresses may be a WireGuard endpoint of the mesh. Both ends apply it: the
//! control plane to what a node advertises, the agent to what it advertises and to the peer
//! endpoints a view hands it. An endpoint is where other hosts send encrypted packets, so a
//! wrong one sends a peer's traffic to this host itself, to a group, or into the overlay.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Why an address cannot be an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndpointProblem {
    #[error("port 0 is not a port")]
    PortZero,
    #[error("the unspecified address is not an endpoint")]
    Unspecified,
    #[error("a loopback address is not an endpoint")]
    Loopback,
    #[error("a multicast address is not an endpoint")]
    Multicast,
    #[error("the IPv4 broadcast address is not an endpoint")]
    Broadcast,
    #[error("an endpoint inside the overlay would carry the tunnel through itself")]
    InsideOverlay,
    #[error("the control plane's own address is not a node's endpoint")]
    ControlPlane,
}

/// The checks that need no context: a unicast, routable-in-principle address and a port.
/// (IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.)
pub fn check_intrinsic(addr: SocketAddr) -> Result<(), EndpointProblem> {
    if addr.port() == 0 {
        return Err(EndpointProblem::PortZero);
    }
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if ip.is_unspecified() {
        return Err(EndpointProblem::Unspecified);
    }
    if ip.is_loopback() {
        return Err(EndpointProblem::Loopback);
    }
    if ip.is_multicast() {
        return Err(EndpointProblem::Multicast);
    }
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return Err(EndpointProblem::Broadcast);
        }
    }
    Ok(())
}

/// [`check_intrinsic`], then: not inside any of the `overlay` ranges, and not one of the
/// `control_plane` addresses (compared by IP: any port of the control plane's host is its).
pub fn check(addr: SocketAddr, overlay: &[IpNet], control_plane: &[IpAddr]) -> Result<(), EndpointProblem> {
    check_intrinsic(addr)?;
    if overlay.iter().any(|net| net.contains(&addr.ip())) {
        return Err(EndpointProblem::InsideOverlay);
    }
    if control_plane.contains(&addr.ip()) {
        return Err(EndpointProblem::ControlPlane);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unicast_addresses_pass() {
        for s in ["192.0.2.1:51820", "[2001:db8::1]:51820", "10.1.2.3:1", "[fe80::1]:9"] {
            assert_eq!(check_intrinsic(sa(s)), Ok(()), "{s}");
        }
    }

    #[test]
    fn each_problem_is_named() {
        let cases = [
            ("192.0.2.1:0", EndpointProblem::PortZero),
            ("0.0.0.0:51820", EndpointProblem::Unspecified),
            ("[::]:51820", EndpointProblem::Unspecified),
            ("127.0.0.2:51820", EndpointProblem::Loopback),
            ("[::1]:51820", EndpointProblem::Loopback),
            ("[::ffff:127.0.0.1]:51820", EndpointProblem::Loopback),
            ("224.0.0.1:51820", EndpointProblem::Multicast),
            ("[ff02::1]:51820", EndpointProblem::Multicast),
            ("255.255.255.255:51820", EndpointProblem::Broadcast),
        ];
        for (s, want) in cases {
            assert_eq!(check_intrinsic(sa(s)), Err(want), "{s}");
        }
    }

    #[test]
    fn overlay_and_control_plane_are_refused() {
        let overlay: Vec<IpNet> = vec!["100.64.0.0/10".parse().unwrap(), "fd7a::/48".parse().unwrap()];
        let cp: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap()];
        assert_eq!(check(sa("100.64.0.5:51820"), &overlay, &cp), Err(EndpointProblem::InsideOverlay));
        assert_eq!(check(sa("[fd7a::9]:51820"), &overlay, &cp), Err(EndpointProblem::InsideOverlay));
        assert_eq!(check(sa("192.0.2.10:51820"), &overlay, &cp), Err(EndpointProblem::ControlPlane));
        assert_eq!(check(sa("192.0.2.11:51820"), &overlay, &cp), Ok(()));
    }
}
