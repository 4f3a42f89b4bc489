//! The local guard: what a control plane may not do to this host, whatever it sends. A
//! view is judged whole before it becomes desired state and before it is saved; one
//! violation refuses all of it (the previous state stays, nothing is persisted).
//!
//! - Tunnel addresses lie inside the overlay ranges (`control.overlay`, else the ranges the
//!   control plane announced at enrollment, pinned with the credential).
//! - A peer's allowed-ip (a route through the tunnel) lies inside the overlay or inside one
//!   of `control.accept_routes`; a default route (`/0`) needs `control.accept_default_route`.
//! - No address or route (other than an accepted default route, which covers everything by
//!   design) covers or equals a network of the host's other interfaces, or contains a
//!   control-plane address or a peer's endpoint: that would cut the host off its LAN, its
//!   control channel or the tunnel's own underlay. Prefixes *inside* a host network are not
//!   refused here (an operator may route part of a LAN through a peer via `accept_routes`).
//! - Peer endpoints pass [`wirefence_proto::endpoint::check`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use wirefence_proto::endpoint::{self, EndpointProblem};

use super::view::ControlView;
use crate::model::{IfName, PublicKey};

/// The operator's `[control]` settings the guard applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// Ranges tunnel addresses must lie in; `None`: the ranges pinned at enrollment.
    pub overlay: Option<Vec<IpNet>>,
    /// Prefixes beyond the overlay that peers may route for (site routes).
    pub accept_routes: Vec<IpNet>,
    /// Accept `0.0.0.0/0` and `::/0` from a peer (use it as an exit node).
    pub accept_default_route: bool,
}

/// What a view is judged against, read when it arrives (the host's networks change).
#[derive(Clone, Debug, Default)]
pub struct Surroundings {
    pub overlay: Vec<IpNet>,
    pub control_plane: Vec<IpAddr>,
    /// Networks of the host's interfaces other than the tunnel, with the interface's name.
    pub host_networks: Vec<(String, IpNet)>,
}

/// Where in a view a prefix sits, for the error message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Addresses,
    AllowedIps(PublicKey),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Addresses => f.write_str("addresses"),
            Place::AllowedIps(k) => write!(f, "peers[{k}].allowed_ips"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("{place}: {prefix}: no overlay range is known (set control.overlay; the control plane announced none)")]
    NoOverlay { place: Place, prefix: IpNet },
    #[error("addresses: {prefix} is outside the overlay ranges {}", list(.overlay))]
    AddressOutsideOverlay { prefix: IpNet, overlay: Vec<IpNet> },
    #[error(
        "{place}: {prefix} is a default route; only an exit-node opt-in (control.accept_default_route = true) \
         accepts it"
    )]
    DefaultRoute { place: Place, prefix: IpNet },
    #[error("{place}: {prefix} is neither inside the overlay {} nor in control.accept_routes", list(.overlay))]
    RouteNotAccepted { place: Place, prefix: IpNet, overlay: Vec<IpNet> },
    #[error("{place}: {prefix} covers the control plane's address {addr}")]
    CoversControlPlane { place: Place, prefix: IpNet, addr: IpAddr },
    #[error("{place}: {prefix} covers the endpoint {endpoint} of peer {peer}")]
    CoversPeerEndpoint { place: Place, prefix: IpNet, peer: PublicKey, endpoint: SocketAddr },
    #[error("{place}: {prefix} covers {network}, a network of this host's interface {ifname}")]
    CoversHostNetwork { place: Place, prefix: IpNet, network: IpNet, ifname: String },
    #[error("peers[{peer}].endpoint {endpoint}: {problem}")]
    Endpoint { peer: PublicKey, endpoint: SocketAddr, problem: EndpointProblem },
    #[error("overlay range {range} announced by the control plane: {why}")]
    BadOverlay { range: IpNet, why: &'static str },
    #[error("reading this host's interface addresses: {0}")]
    HostNetworks(nix::Error),
}

fn list(nets: &[IpNet]) -> String {
    let v: Vec<String> = nets.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

impl GuardConfig {
    /// The overlay ranges in force: configured, else pinned at enrollment.
    pub fn overlay<'a>(&'a self, pinned: &'a [IpNet]) -> &'a [IpNet] {
        self.overlay.as_deref().unwrap_or(pinned)
    }

    /// Judges a whole view; the first violation found is the answer.
    pub fn check(&self, view: &ControlView, s: &Surroundings) -> Result<(), GuardError> {
        let endpoints: Vec<(PublicKey, SocketAddr)> =
            view.peers.iter().filter_map(|(k, p)| p.endpoint.map(|e| (*k, e))).collect();
        for (peer, e) in &endpoints {
            endpoint::check(*e, &s.overlay, &s.control_plane).map_err(|problem| GuardError::Endpoint {
                peer: *peer,
                endpoint: *e,
                problem,
            })?;
        }
        for prefix in &view.addresses {
            if s.overlay.is_empty() {
                return Err(GuardError::NoOverlay { place: Place::Addresses, prefix: *prefix });
            }
            // `contains` compares whole ranges: an address's prefix length must fit too.
            if !s.overlay.iter().any(|o| o.contains(prefix)) {
                return Err(GuardError::AddressOutsideOverlay { prefix: *prefix, overlay: s.overlay.clone() });
            }
            clear_of_host(Place::Addresses, prefix, s, &endpoints)?;
        }
        for (k, p) in &view.peers {
            for prefix in &p.allowed_ips {
                let place = Place::AllowedIps(*k);
                if prefix.prefix_len() == 0 {
                    if !self.accept_default_route {
                        return Err(GuardError::DefaultRoute { place, prefix: *prefix });
                    }
                    // An exit node takes everything by choice; the policy-routing rules keep
                    // the host's more specific routes (its LAN, the control plane) in front.
                    continue;
                }
                if s.overlay.is_empty() && self.accept_routes.is_empty() {
                    return Err(GuardError::NoOverlay { place, prefix: *prefix });
                }
                if !s.overlay.iter().chain(&self.accept_routes).any(|o| o.contains(prefix)) {
                    return Err(GuardError::RouteNotAccepted { place, prefix: *prefix, overlay: s.overlay.clone() });
                }
                clear_of_host(place, prefix, s, &endpoints)?;
            }
        }
        Ok(())
    }

    /// Judges a whole view ([`GuardConfig::check`]), then narrows its mesh prefixes to those
    /// this host may refuse traffic for: inside the overlay or `control.accept_routes`,
    /// clear of the control plane's address and the peers' endpoints (an unreachable route
    /// over them would cut the host off), and overlapping none of the host's networks (there
    /// the host's own LAN is the way when no peer carries the prefix, not the WAN). The rest
    /// is left out, not refused: every node hears of every site's subnets, and routes only
    /// those it accepts.
    pub fn admit(&self, view: &mut ControlView, s: &Surroundings) -> Result<(), GuardError> {
        self.check(view, s)?;
        let endpoints: Vec<IpAddr> = view.peers.values().filter_map(|p| p.endpoint.map(|e| e.ip())).collect();
        view.mesh_prefixes.retain(|p| {
            s.overlay.iter().chain(&self.accept_routes).any(|o| o.contains(p))
                && !s.control_plane.iter().chain(&endpoints).any(|a| p.contains(a))
                && !s.host_networks.iter().any(|(_, n)| p.contains(n) || n.contains(p))
        });
        Ok(())
    }

    /// Checks ranges a control plane announced before they are pinned: a range that takes
    /// in everything, the control plane itself or the host's own networks is no overlay.
    pub fn check_announced(announced: &[IpNet], s: &Surroundings) -> Result<(), GuardError> {
        for range in announced {
            if range.prefix_len() == 0 {
                return Err(GuardError::BadOverlay { range: *range, why: "it takes in every address" });
            }
            if s.control_plane.iter().any(|a| range.contains(a)) {
                return Err(GuardError::BadOverlay { range: *range, why: "it contains the control plane's address" });
            }
            if s.host_networks.iter().any(|(_, n)| range.contains(n) || n.contains(range)) {
                return Err(GuardError::BadOverlay { range: *range, why: "it overlaps a network of this host" });
            }
        }
        Ok(())
    }
}

fn clear_of_host(
    place: Place,
    prefix: &IpNet,
    s: &Surroundings,
    endpoints: &[(PublicKey, SocketAddr)],
) -> Result<(), GuardError> {
    if let Some(addr) = s.control_plane.iter().find(|a| prefix.contains(*a)) {
        return Err(GuardError::CoversControlPlane { place, prefix: *prefix, addr: *addr });
    }
    if let Some((peer, e)) = endpoints.iter().find(|(_, e)| prefix.contains(&e.ip())) {
        return Err(GuardError::CoversPeerEndpoint { place, prefix: *prefix, peer: *peer, endpoint: *e });
    }
    if let Some((ifname, n)) = s.host_networks.iter().find(|(_, n)| prefix.contains(n)) {
        return Err(GuardError::CoversHostNetwork { place, prefix: *prefix, network: *n, ifname: ifname.clone() });
    }
    Ok(())
}

/// Admits a view saved by an earlier run against today's config and host (the config may
/// have tightened). Control-plane host names are not resolved here, only literal addresses.
pub fn admit_saved(
    view: &mut ControlView,
    config: &super::ControlConfig,
    pinned: &[IpNet],
    tunnel: &IfName,
) -> Result<(), GuardError> {
    let control_plane = config
        .endpoints
        .iter()
        .filter_map(|e| match e {
            crate::primitives::Endpoint::Addr(a) => Some(a.ip()),
            crate::primitives::Endpoint::Host { .. } => None,
        })
        .collect();
    let s = Surroundings {
        overlay: config.guard.overlay(pinned).to_vec(),
        control_plane,
        host_networks: host_networks(tunnel)?,
    };
    config.guard.admit(view, &s)
}

/// The networks of every interface address but the tunnel's, as the kernel reports them now
/// (getifaddrs: an RTM_GETADDR dump; reading only).
pub fn host_networks(tunnel: &IfName) -> Result<Vec<(String, IpNet)>, GuardError> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(GuardError::HostNetworks)? {
        if ifa.interface_name == tunnel.as_str() {
            continue;
        }
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else { continue };
        let net = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::new(IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones() as u8)
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            IpNet::new(IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones() as u8)
        } else {
            continue;
        };
        if let Ok(net) = net {
            out.push((ifa.interface_name.clone(), net.trunc()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::view::ControlPeer;
    use crate::model::PrivateKey;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn surroundings() -> Surroundings {
        Surroundings {
            overlay: vec![net("100.64.0.0/24"), net("fd7a::/64")],
            control_plane: vec!["192.0.2.10".parse().unwrap()],
            host_networks: vec![("eth0".into(), net("192.168.1.0/24")), ("lo".into(), net("127.0.0.0/8"))],
        }
    }

    fn view(addresses: &[&str], allowed: &[&str], endpoint: Option<&str>) -> (ControlView, PublicKey) {
        let k = PrivateKey::generate().public_key();
        let peer = ControlPeer {
            name: "p".into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: allowed.iter().map(|a| net(a)).collect(),
            persistent_keepalive: None,
        };
        let v = ControlView {
            addresses: addresses.iter().map(|a| net(a)).collect(),
            peers: [(k, peer)].into(),
            ..Default::default()
        };
        (v, k)
    }

    fn refused(g: &GuardConfig, addresses: &[&str], allowed: &[&str], endpoint: Option<&str>) -> String {
        let (v, _) = view(addresses, allowed, endpoint);
        g.check(&v, &surroundings()).expect_err("refused").to_string()
    }

    #[test]
    fn a_legitimate_view_passes() {
        let g = GuardConfig { accept_routes: vec![net("10.88.0.0/16")], ..Default::default() };
        let (v, _) =
            view(&["100.64.0.1/32", "fd7a::1/128"], &["100.64.0.2/32", "10.88.1.0/24"], Some("192.0.2.7:51820"));
        g.check(&v, &surroundings()).unwrap();
    }

    #[test]
    fn mesh_prefixes_are_narrowed_to_what_this_host_may_refuse() {
        let g = GuardConfig { accept_routes: vec![net("10.88.0.0/16")], ..Default::default() };
        let (mut v, _) = view(&["100.64.0.1/32"], &["100.64.0.2/32"], Some("203.0.113.7:51820"));
        let kept = ["100.64.0.0/24", "fd7a::/64", "10.88.1.0/24"];
        let dropped = [
            "10.99.0.0/24",   // another site's subnet this node does not accept
            "192.168.1.0/25", // inside the host's LAN: the LAN is the way there
            "10.88.0.0/16",   // accepted, but takes in the host's LAN below
        ];
        v.mesh_prefixes = kept.iter().chain(&dropped).map(|p| net(p)).collect();
        let mut s = surroundings();
        s.host_networks.push(("eth1".into(), net("10.88.200.0/24")));
        g.admit(&mut v, &s).unwrap();
        assert_eq!(v.mesh_prefixes, kept.iter().map(|p| net(p)).collect());

        // Over the control plane or a peer's endpoint: left out, the host stays reachable.
        let wide = GuardConfig { accept_routes: vec![net("192.0.2.0/24"), net("203.0.113.0/24")], ..g };
        v.mesh_prefixes = [net("192.0.2.0/25"), net("203.0.113.0/28"), net("203.0.113.128/25")].into();
        wide.admit(&mut v, &surroundings()).unwrap();
        assert_eq!(v.mesh_prefixes, [net("203.0.113.128/25")].into());
    }

    #[test]
    fn each_rule_is_named() {
        let g = GuardConfig::default();
        let e = refused(&g, &["10.0.0.1/8"], &[], None);
        assert!(e.contains("addresses: 10.0.0.1/8 is outside the overlay"), "{e}");
        let e = refused(&g, &["100.64.0.1/16"], &[], None);
        assert!(e.contains("outside the overlay"), "a wide address inside a range still is too wide: {e}");
        let e = refused(&g, &[], &["0.0.0.0/0"], None);
        assert!(e.contains("0.0.0.0/0 is a default route") && e.contains("accept_default_route"), "{e}");
        let e = refused(&g, &[], &["10.88.0.0/24"], None);
        assert!(e.contains("10.88.0.0/24 is neither inside the overlay"), "{e}");
        let e = refused(&g, &[], &["100.64.0.2/32"], Some("127.0.0.1:51820"));
        assert!(e.contains("endpoint 127.0.0.1:51820: a loopback address"), "{e}");
        let e = refused(&g, &[], &["100.64.0.2/32"], Some("100.64.0.9:51820"));
        assert!(e.contains("inside the overlay"), "{e}");
        let e = refused(&g, &[], &["100.64.0.2/32"], Some("192.0.2.10:51820"));
        assert!(e.contains("control plane"), "{e}");

        let wide = GuardConfig { accept_routes: vec![net("0.0.0.0/1"), net("192.0.0.0/8")], ..Default::default() };
        let e = refused(&wide, &[], &["192.168.0.0/16"], None);
        assert!(e.contains("192.168.0.0/16 covers 192.168.1.0/24, a network of this host's interface eth0"), "{e}");
        let e = refused(&wide, &[], &["192.168.1.0/24"], None);
        assert!(e.contains("covers 192.168.1.0/24"), "equal is covering: {e}");
        let e = refused(&wide, &[], &["192.0.2.0/24"], None);
        assert!(e.contains("covers the control plane's address 192.0.2.10"), "{e}");
        let e = refused(&wide, &[], &["0.0.0.0/1"], Some("100.99.0.1:51820"));
        assert!(e.contains("covers the endpoint 100.99.0.1:51820"), "{e}");
        // Inside a host network is the operator's choice.
        let (v, _) = view(&[], &["192.168.1.128/25"], None);
        wide.check(&v, &surroundings()).unwrap();
    }

    #[test]
    fn default_routes_need_the_opt_in_and_overlay_must_be_known() {
        let g = GuardConfig { accept_default_route: true, ..Default::default() };
        let (v, _) = view(&[], &["0.0.0.0/0", "::/0"], Some("192.0.2.7:51820"));
        g.check(&v, &surroundings()).unwrap();
        let (v, _) = view(&["100.64.0.1/32"], &[], None);
        let e = g.check(&v, &Surroundings { overlay: vec![], ..surroundings() }).unwrap_err();
        assert!(matches!(e, GuardError::NoOverlay { .. }), "{e}");
    }

    #[test]
    fn announced_overlays_are_checked_before_pinning() {
        let s = surroundings();
        assert!(GuardConfig::check_announced(&[net("100.64.0.0/10")], &s).is_ok());
        for bad in ["0.0.0.0/0", "192.0.2.0/24", "192.168.0.0/16", "192.168.1.0/25"] {
            assert!(GuardConfig::check_announced(&[net(bad)], &s).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_networks_come_from_the_kernel_without_the_tunnel() {
        let lo = host_networks(&"wf-none0".parse().unwrap()).unwrap();
        assert!(lo.iter().any(|(i, n)| i == "lo" && *n == net("127.0.0.0/8")), "{lo:?}");
        let without = host_networks(&"lo".parse().unwrap()).unwrap();
        assert!(without.iter().all(|(i, _)| i != "lo"), "{without:?}");
    }
}
