//! Turns a validated config into the desired kernel state.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::config::{Config, Forward, TableChoice};
use crate::gateway::{DesiredGateway, LanSource, Masquerade, OwnTraffic};
use crate::model::{
    Desired, DesiredPolicy, DeviceSpec, Family, PeerSpec, PrivateKey, Route, RouteKind, Rule, RuleAction, MAIN_TABLE,
};

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("{path}:{line}: peers[{index}].endpoint: cannot resolve: {source}")]
    Resolve { path: std::path::PathBuf, line: usize, index: usize, source: std::io::Error },
    #[error("{path}:{line}: peers[{index}].public_key is this node's own public key")]
    OwnKey { path: std::path::PathBuf, line: usize, index: usize },
    #[error("{path}: policy: {source}")]
    Policy { path: std::path::PathBuf, source: crate::policy::PolicyError },
}

/// Builds the desired state. Host-name endpoints are resolved here, once per config load.
pub fn desired_state(config: &Config, private_key: &PrivateKey) -> Result<Desired, DesiredError> {
    let own = private_key.public_key();
    // Collected, then built in one pass (one sort) instead of 10,000 searching inserts.
    let mut peers = Vec::with_capacity(config.peers.len());
    for (index, p) in config.peers.iter().enumerate() {
        if p.public_key == own {
            return Err(DesiredError::OwnKey { path: config.path.clone(), line: p.line, index });
        }
        let endpoint = match &p.endpoint {
            None => None,
            Some(e) => Some(e.resolve().map_err(|source| DesiredError::Resolve {
                path: config.path.clone(),
                line: p.line,
                index,
                source,
            })?),
        };
        peers.push((
            p.public_key,
            PeerSpec { endpoint, allowed_ips: p.allowed_ips.clone(), persistent_keepalive: p.persistent_keepalive },
        ));
    }
    // Equal keys (never from a parsed config): the last one wins, as with inserts.
    let peers: BTreeMap<_, _> = peers.into_iter().collect();

    let r = &config.routing;
    let default_families: BTreeSet<Family> =
        peers.values().flat_map(|p| p.allowed_ips.iter()).filter(|n| n.prefix_len() == 0).map(Family::of).collect();
    // wg-quick's rule: a default route through the tunnel needs its own table and a fwmark
    // on the tunnel's packets, or the encrypted packets would loop back into the tunnel.
    let policy = r.table == TableChoice::Auto && !default_families.is_empty();
    let table = match r.table {
        TableChoice::Auto if policy => Some(r.policy_table),
        TableChoice::Auto | TableChoice::Main => Some(MAIN_TABLE),
        TableChoice::Id(t) => Some(t),
        TableChoice::Off => None,
    };
    let routes = match table {
        None => BTreeSet::new(),
        Some(table) => {
            let tunnel = peers.values().flat_map(|p| p.allowed_ips.iter()).map(|dst| Route {
                dst: *dst,
                table,
                kind: RouteKind::Tunnel,
                src: None,
            });
            // In the same table as the tunnel routes: there they sit below them, and a policy
            // table's default route cannot take what they refuse.
            let unreachable =
                r.mesh_prefixes.iter().map(|dst| Route { dst: *dst, table, kind: RouteKind::Unreachable, src: None });
            let mut routes: Vec<Route> = tunnel.chain(unreachable).collect();
            // Sorted on plain integers first (the order of `Route`'s `Ord`), so building the
            // set finds them in order: 20,000 routes, one cheap sort.
            routes.sort_unstable_by_key(|r| match r.dst {
                IpNet::V4(n) => (0u8, u32::from(n.addr()) as u128, n.prefix_len(), r.kind),
                IpNet::V6(n) => (1u8, u128::from(n.addr()), n.prefix_len(), r.kind),
            });
            routes.into_iter().collect()
        }
    };
    let mut rules = BTreeSet::new();
    let mut fwmark = config.interface.fwmark;
    if policy {
        let mark = *fwmark.get_or_insert(r.policy_table);
        for family in default_families {
            rules.insert(Rule { family, priority: r.rule_priority, action: RuleAction::MainSuppressDefault });
            rules.insert(Rule {
                family,
                priority: r.rule_priority + 1,
                action: RuleAction::NotFwmarkLookup { fwmark: mark, table: r.policy_table },
            });
        }
    }

    let policy = match &config.policy {
        None => None,
        Some(pc) => {
            let compiled = crate::policy::compile_with_limits(&pc.policy, &policy_limits())
                .map_err(|source| DesiredError::Policy { path: config.path.clone(), source })?;
            Some(DesiredPolicy {
                pin_root: pc.pin_dir.clone(),
                digest: digest(&compiled),
                compiled: Arc::new(compiled),
            })
        }
    };

    let gateway = gateway(config, &routes);
    Ok(Desired {
        gateway,
        policy,
        ifname: config.interface.name.clone(),
        mtu: config.interface.mtu,
        mss: config.interface.mss_clamp,
        device: DeviceSpec { private_key: private_key.clone(), listen_port: config.interface.listen_port, fwmark },
        addresses: config.interface.addresses.clone(),
        peers,
        routes,
        rules,
    })
}

/// The gateway part: forwarding for the families in use (tunnel addresses and routes),
/// masquerade on the tunnel device, the LAN source for remote routes.
fn gateway(config: &Config, routes: &BTreeSet<Route>) -> DesiredGateway {
    let g = &config.gateway;
    let forward = match &g.forward {
        Forward::Off => BTreeSet::new(),
        Forward::Families(families) => families.clone(),
        Forward::InUse => {
            config.interface.addresses.iter().chain(routes.iter().map(|r| &r.dst)).map(Family::of).collect()
        }
    };
    let oif = &config.interface.name;
    let masquerade = g.masquerade.iter().map(|src| Masquerade { src: *src, oif: oif.clone() }).collect();
    let lan_source = (g.own_traffic == OwnTraffic::Lan).then(|| {
        let site = match &g.site_prefixes {
            Some(s) => s.clone(),
            None => config.control.iter().flat_map(|c| c.advertise_routes.iter().copied()).collect(),
        };
        // The overlay: the networks of the tunnel addresses, and in control mode the ranges
        // the local guard holds them to.
        let overlay = config
            .interface
            .addresses
            .iter()
            .map(IpNet::trunc)
            .chain(config.control.iter().flat_map(|c| c.guard.overlay.iter().flatten().copied()))
            .collect();
        LanSource { site, overlay }
    });
    DesiredGateway { forward, masquerade, lan_source }
}

/// Half of each map's capacity: during a swap the map holds the live generation and the
/// one being filled.
fn policy_limits() -> crate::policy::Limits {
    use wirefence_common as c;
    crate::policy::Limits {
        rules: c::MAX_RULES,
        class_entries: c::MAX_CLASS_ENTRIES / 2,
        policy_entries: c::MAX_POLICY_ENTRIES / 2,
    }
}

fn digest(c: &crate::policy::Compiled) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.rule_ids.hash(&mut h);
    c.src_v4.hash(&mut h);
    c.dst_v4.hash(&mut h);
    c.src_v6.hash(&mut h);
    c.dst_v6.hash(&mut h);
    c.entries.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str, peer_ips: &str) -> Config {
        let peer = PrivateKey::generate().public_key();
        Config::parse(
            Path::new("t.toml"),
            &format!(
                "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n{extra}\n[[peers]]\npublic_key = \"{peer}\"\nallowed_ips = {peer_ips}\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn routes_go_to_main_without_default_route() {
        let d = desired_state(&config("", r#"["10.0.0.2/32", "fd00::2/128"]"#), &PrivateKey::generate()).unwrap();
        assert_eq!(d.routes.len(), 2);
        assert!(d.routes.iter().all(|r| r.table == MAIN_TABLE));
        assert!(d.rules.is_empty());
        assert_eq!(d.device.fwmark, None);
    }

    #[test]
    fn default_route_turns_on_policy_routing_per_family() {
        let d = desired_state(&config("", r#"["0.0.0.0/0", "fd00::2/128"]"#), &PrivateKey::generate()).unwrap();
        assert!(d.routes.iter().all(|r| r.table == 51820));
        assert_eq!(d.rules.len(), 2);
        assert!(d.rules.iter().all(|r| r.family == Family::V4));
        assert_eq!(d.device.fwmark, Some(51820));
    }

    #[test]
    fn table_off_means_no_routes() {
        let d = desired_state(&config("[routing]\ntable = \"off\"\n", r#"["0.0.0.0/0"]"#), &PrivateKey::generate());
        // [routing] after [interface] but before [[peers]] is valid TOML.
        let d = d.unwrap();
        assert!(d.routes.is_empty() && d.rules.is_empty());
    }

    #[test]
    fn gateway_forwards_the_families_in_use_and_masquerades_on_the_tunnel() {
        let c = config(
            "addresses = [\"10.77.0.1/24\"]\n[gateway]\nforward = true\nmasquerade = [\"192.168.10.0/24\"]\n\
             own_traffic = \"lan\"\nsite_prefixes = [\"192.168.10.0/24\"]\n",
            r#"["10.77.0.2/32", "10.20.2.0/24"]"#,
        );
        let d = desired_state(&c, &PrivateKey::generate()).unwrap();
        assert_eq!(d.gateway.forward, [Family::V4].into());
        let m: Vec<_> = d.gateway.masquerade.iter().map(|m| (m.src.to_string(), m.oif.to_string())).collect();
        assert_eq!(m, [("192.168.10.0/24".to_owned(), "wf0".to_owned())]);
        let lan = d.gateway.lan_source.unwrap();
        assert_eq!(lan.overlay, ["10.77.0.0/24".parse().unwrap()].into());
        // An IPv6 route puts IPv6 in use too; no [gateway] section manages nothing.
        let d = desired_state(
            &config("addresses = [\"10.77.0.1/24\"]\n[gateway]\nforward = true\n", r#"["fd00::2/128"]"#),
            &PrivateKey::generate(),
        )
        .unwrap();
        assert_eq!(d.gateway.forward, [Family::V4, Family::V6].into());
        let d = desired_state(&config("", r#"["10.0.0.2/32"]"#), &PrivateKey::generate()).unwrap();
        assert_eq!(d.gateway, DesiredGateway::default());
    }

    #[test]
    fn own_key_as_peer_is_rejected() {
        let k = PrivateKey::generate();
        let c = Config::parse(
            Path::new("t.toml"),
            &format!(
                "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n[[peers]]\npublic_key = \"{}\"\n",
                k.public_key()
            ),
        )
        .unwrap();
        let e = desired_state(&c, &k).unwrap_err().to_string();
        assert!(e.contains("t.toml:4") && e.contains("own public key"), "{e}");
    }
}
