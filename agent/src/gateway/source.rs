//! `own_traffic = "lan"`: the tunnel routes to remote sites get a preferred source, the
//! gateway's address inside its site prefix, so the gateway's own packets to a remote LAN
//! leave with that address (and the remote policy's rules on this gateway's routes cover
//! them). Resolved against the host's addresses at each pass: the planner compares routes
//! with the source they should have now.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::LanSource;
use crate::model::{Family, Route, RouteKind};

/// The source for `family`: the lowest host address inside a site prefix of that family.
pub fn lan_address(lan: &LanSource, host_addresses: &BTreeSet<IpNet>, family: Family) -> Option<IpAddr> {
    host_addresses
        .iter()
        .filter(|a| Family::of(a) == family)
        .map(|a| a.addr())
        .find(|addr| lan.site.iter().any(|s| s.contains(addr)))
}

/// Whether a route takes the LAN source: a tunnel route to somewhere beyond the overlay
/// (a remote site), not a default route (an exit node's internet stays the kernel's choice).
fn remote(lan: &LanSource, route: &Route) -> bool {
    route.kind == RouteKind::Tunnel
        && route.dst.prefix_len() > 0
        && !lan.overlay.iter().any(|o| o.contains(&route.dst))
        && !lan.site.iter().any(|s| s.contains(&route.dst) || route.dst.contains(s))
}

/// `routes` with the preferred source they should carry (borrowed when none does).
pub fn with_source<'a>(
    routes: &'a BTreeSet<Route>,
    lan: Option<&LanSource>,
    host_addresses: &BTreeSet<IpNet>,
) -> Cow<'a, BTreeSet<Route>> {
    let Some(lan) = lan else { return Cow::Borrowed(routes) };
    let v4 = lan_address(lan, host_addresses, Family::V4);
    let v6 = lan_address(lan, host_addresses, Family::V6);
    if v4.is_none() && v6.is_none() {
        return Cow::Borrowed(routes);
    }
    Cow::Owned(
        routes
            .iter()
            .map(|r| {
                let src = match Family::of(&r.dst) {
                    Family::V4 => v4,
                    Family::V6 => v6,
                };
                Route { src: src.filter(|_| remote(lan, r)), ..*r }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn tunnel(dst: &str) -> Route {
        Route { dst: net(dst), table: 254, kind: RouteKind::Tunnel, src: None }
    }

    #[test]
    fn remote_site_routes_get_the_lan_address_overlay_and_default_do_not() {
        let lan = LanSource { site: [net("192.168.10.0/24")].into(), overlay: [net("10.77.0.0/24")].into() };
        let hosts: BTreeSet<IpNet> = [net("172.31.255.1/24"), net("192.168.10.1/24"), net("fd10::1/64")].into();
        let routes: BTreeSet<Route> =
            [tunnel("10.77.0.2/32"), tunnel("10.20.2.0/24"), tunnel("0.0.0.0/0"), tunnel("fd20::/64")].into();
        let out = with_source(&routes, Some(&lan), &hosts);
        let src = |dst: &str| out.iter().find(|r| r.dst == net(dst)).unwrap().src;
        assert_eq!(src("10.20.2.0/24"), Some("192.168.10.1".parse().unwrap()));
        assert_eq!(src("10.77.0.2/32"), None);
        assert_eq!(src("0.0.0.0/0"), None);
        assert_eq!(src("fd20::/64"), None, "no IPv6 site prefix");
        // No LAN address on the host (yet): the routes stay as they are.
        assert!(matches!(with_source(&routes, Some(&lan), &BTreeSet::new()), Cow::Borrowed(_)));
        assert!(matches!(with_source(&routes, None, &hosts), Cow::Borrowed(_)));
    }
}
