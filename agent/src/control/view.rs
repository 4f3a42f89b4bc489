//! What the control plane says this node should be: addresses, peers and policy, validated
//! from the wire (`TryFrom`-style constructors) and changed by deltas. A view that exists
//! is whole and valid; an invalid update never produces one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::IpNet;
use wirefence_proto::v1;
use wirefence_proto::WireError;

use crate::model::PublicKey;
use crate::policy::{Policy, PolicyError, PortRange, Rule, RuleDirection};
use crate::primitives::PeerConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPeer {
    pub name: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlView {
    pub addresses: BTreeSet<IpNet>,
    pub peers: BTreeMap<PublicKey, ControlPeer>,
    pub policy: Policy,
    /// What the mesh routes and this node must not send out in clear (each becomes an
    /// unreachable route); the local guard keeps only those this node accepts.
    pub mesh_prefixes: BTreeSet<IpNet>,
    /// Routes this node advertised and the control plane refused: (route, reason).
    pub refused_routes: Vec<(IpNet, String)>,
}

/// At most this many refused routes (a registration advertises at most 256), each reason at
/// most this long: they end up in the status file.
const MAX_REFUSED: usize = 256;
const MAX_REASON: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("the update carries neither a snapshot nor a delta")]
    NoBody,
    #[error("version 0 is not a valid version")]
    ZeroVersion,
    #[error("the snapshot has no policy (an empty policy must be sent as present and empty)")]
    MissingPolicy,
    #[error("{field}: {source}")]
    Wire { field: String, source: WireError },
    #[error("{field}: a public key has 32 bytes, not {len}")]
    KeyLength { field: String, len: usize },
    #[error("peers: {0} is this node's own public key")]
    OwnKey(PublicKey),
    #[error("peers: {0} is listed twice")]
    DuplicatePeer(PublicKey),
    #[error("remove_peers: {0} is not a peer of version {1}")]
    RemoveUnknown(PublicKey, u64),
    #[error("peers: {key}: persistent_keepalive {value} is over 65535")]
    Keepalive { key: PublicKey, value: u32 },
    #[error("peers: {b}'s allowed-ip {net_b} overlaps {net_a} of {a}")]
    Overlap { a: PublicKey, net_a: IpNet, b: PublicKey, net_b: IpNet },
    #[error("policy.rules[{index}] ({id:?}): protocol {value} is over 255")]
    Protocol { index: usize, id: String, value: u32 },
    #[error("policy.rules[{index}] ({id:?}): port range {first}-{last} is not within 0-65535 in order")]
    Ports { index: usize, id: String, first: u32, last: u32 },
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("mesh_prefixes: {0} takes in every address")]
    MeshDefault(IpNet),
    #[error("refused_routes: more than {MAX_REFUSED} entries, or a reason over {MAX_REASON} bytes")]
    RefusedTooLarge,
    #[error("refused_routes[{0}]: no route")]
    RefusedNoRoute(usize),
}

/// The reasons of a registration reply's refused routes, capped as a view's are (a reply
/// is not refused for it: the registration itself stands).
pub(crate) fn refused_reasons(list: &[v1::RefusedRoute]) -> Vec<String> {
    list.iter()
        .take(MAX_REFUSED)
        .map(|r| {
            let mut end = r.reason.len().min(MAX_REASON);
            while !r.reason.is_char_boundary(end) {
                end -= 1;
            }
            r.reason[..end].to_owned()
        })
        .collect()
}

fn refused(list: &[v1::RefusedRoute]) -> Result<Vec<(IpNet, String)>, UpdateError> {
    if list.len() > MAX_REFUSED || list.iter().any(|r| r.reason.len() > MAX_REASON) {
        return Err(UpdateError::RefusedTooLarge);
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let p = r.route.as_ref().ok_or(UpdateError::RefusedNoRoute(i))?;
            let net = IpNet::try_from(p)
                .map_err(|source| UpdateError::Wire { field: format!("refused_routes[{i}]"), source })?;
            Ok((net, r.reason.clone()))
        })
        .collect()
}

fn prefixes<'a>(field: &str, list: impl IntoIterator<Item = &'a v1::IpPrefix>) -> Result<BTreeSet<IpNet>, UpdateError> {
    list.into_iter()
        .map(|p| IpNet::try_from(p).map_err(|source| UpdateError::Wire { field: field.into(), source }))
        .collect()
}

pub(crate) fn key(field: &str, b: &[u8]) -> Result<PublicKey, UpdateError> {
    <[u8; 32]>::try_from(b).map(PublicKey).map_err(|_| UpdateError::KeyLength { field: field.into(), len: b.len() })
}

fn peer(p: &v1::Peer) -> Result<(PublicKey, ControlPeer), UpdateError> {
    let k = key("peers.public_key", &p.public_key)?;
    let endpoint = p
        .endpoint
        .as_ref()
        .map(|e| {
            SocketAddr::try_from(e)
                .map_err(|source| UpdateError::Wire { field: format!("peers[{k}].endpoint"), source })
        })
        .transpose()?;
    let persistent_keepalive = match u16::try_from(p.persistent_keepalive) {
        Ok(0) => None,
        Ok(s) => Some(s),
        Err(_) => return Err(UpdateError::Keepalive { key: k, value: p.persistent_keepalive }),
    };
    let allowed_ips = prefixes(&format!("peers[{k}].allowed_ips"), &p.allowed_ips)?;
    Ok((k, ControlPeer { name: p.name.clone(), endpoint, allowed_ips, persistent_keepalive }))
}

fn policy(p: &v1::Policy) -> Result<Policy, UpdateError> {
    let mut rules = Vec::with_capacity(p.rules.len());
    for (index, r) in p.rules.iter().enumerate() {
        let proto = match r.protocol {
            None => None,
            Some(v) => {
                Some(u8::try_from(v).map_err(|_| UpdateError::Protocol { index, id: r.id.clone(), value: v })?)
            }
        };
        let ports = r
            .ports
            .iter()
            .map(|pr| {
                PortRange::try_from(pr).map_err(|_| UpdateError::Ports {
                    index,
                    id: r.id.clone(),
                    first: pr.first,
                    last: pr.last,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.push(Rule {
            id: r.id.clone(),
            from: prefixes(&format!("policy.rules[{index}].from"), &r.from)?.into_iter().collect(),
            to: prefixes(&format!("policy.rules[{index}].to"), &r.to)?.into_iter().collect(),
            proto,
            ports,
            direction: RuleDirection::Both,
        });
    }
    Ok(Policy::new(rules)?)
}

impl ControlView {
    /// Validates a snapshot for the node whose public key is `own`.
    pub fn from_snapshot(s: &v1::NodeView, own: &PublicKey) -> Result<ControlView, UpdateError> {
        let mut peers = BTreeMap::new();
        for p in &s.peers {
            let (k, p) = peer(p)?;
            if peers.insert(k, p).is_some() {
                return Err(UpdateError::DuplicatePeer(k));
            }
        }
        let view = ControlView {
            addresses: prefixes("addresses", &s.addresses)?,
            peers,
            policy: policy(s.policy.as_ref().ok_or(UpdateError::MissingPolicy)?)?,
            mesh_prefixes: prefixes("mesh_prefixes", &s.mesh_prefixes)?,
            refused_routes: refused(&s.refused_routes)?,
        };
        view.check(own)?;
        Ok(view)
    }

    /// The view `d` makes of this one (whose version is `base`). Removing a peer that is not
    /// there, or naming one peer twice, means the delta was made for another base: an error.
    pub fn with_delta(&self, d: &v1::ViewDelta, own: &PublicKey) -> Result<ControlView, UpdateError> {
        let mut next = self.clone();
        let mut touched = BTreeSet::new();
        for raw in &d.remove_peers {
            let k = key("remove_peers", raw)?;
            if !touched.insert(k) {
                return Err(UpdateError::DuplicatePeer(k));
            }
            if next.peers.remove(&k).is_none() {
                return Err(UpdateError::RemoveUnknown(k, d.base_version));
            }
        }
        for p in &d.upsert_peers {
            let (k, p) = peer(p)?;
            if !touched.insert(k) {
                return Err(UpdateError::DuplicatePeer(k));
            }
            next.peers.insert(k, p);
        }
        if let Some(a) = &d.addresses {
            next.addresses = prefixes("addresses", &a.prefixes)?;
        }
        if let Some(p) = &d.policy {
            next.policy = policy(p)?;
        }
        if let Some(m) = &d.mesh_prefixes {
            next.mesh_prefixes = prefixes("mesh_prefixes", &m.prefixes)?;
        }
        if let Some(r) = &d.refused_routes {
            next.refused_routes = refused(&r.routes)?;
        }
        next.check(own)?;
        Ok(next)
    }

    fn check(&self, own: &PublicKey) -> Result<(), UpdateError> {
        if self.peers.contains_key(own) {
            return Err(UpdateError::OwnKey(*own));
        }
        if let Some(p) = self.mesh_prefixes.iter().find(|p| p.prefix_len() == 0) {
            return Err(UpdateError::MeshDefault(*p));
        }
        let configs = self.peer_configs();
        if let Some((a, b, net_a, net_b)) = crate::primitives::find_overlap(&configs) {
            return Err(UpdateError::Overlap { a: configs[a].public_key, net_a, b: configs[b].public_key, net_b });
        }
        Ok(())
    }

    /// The peers as config entries, so a control-mode node builds its desired state the way
    /// a static config does.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers
            .iter()
            .map(|(k, p)| PeerConfig {
                public_key: *k,
                name: (!p.name.is_empty()).then(|| p.name.clone()),
                endpoint: p.endpoint.map(crate::primitives::Endpoint::Addr),
                allowed_ips: p.allowed_ips.clone(),
                persistent_keepalive: p.persistent_keepalive,
                line: 0,
            })
            .collect()
    }

    /// The wire form (what is persisted as the last known good state).
    pub fn to_snapshot(&self) -> v1::NodeView {
        v1::NodeView {
            addresses: self.addresses.iter().map(|n| (*n).into()).collect(),
            peers: self
                .peers
                .iter()
                .map(|(k, p)| v1::Peer {
                    public_key: k.0.to_vec(),
                    name: p.name.clone(),
                    endpoint: p.endpoint.map(Into::into),
                    allowed_ips: p.allowed_ips.iter().map(|n| (*n).into()).collect(),
                    persistent_keepalive: p.persistent_keepalive.map_or(0, u32::from),
                })
                .collect(),
            policy: Some(v1::Policy {
                rules: self
                    .policy
                    .rules()
                    .iter()
                    .map(|r| v1::Rule {
                        id: r.id.clone(),
                        from: r.from.iter().map(|n| (*n).into()).collect(),
                        to: r.to.iter().map(|n| (*n).into()).collect(),
                        protocol: r.proto.map(u32::from),
                        ports: r.ports.iter().map(|p| v1::PortRange::from(*p)).collect(),
                    })
                    .collect(),
            }),
            mesh_prefixes: self.mesh_prefixes.iter().map(|n| (*n).into()).collect(),
            refused_routes: self
                .refused_routes
                .iter()
                .map(|(net, reason)| v1::RefusedRoute { route: Some((*net).into()), reason: reason.clone() })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_route(reason: &str) -> v1::RefusedRoute {
        v1::RefusedRoute { route: Some("10.30.0.0/24".parse::<IpNet>().unwrap().into()), reason: reason.into() }
    }

    #[test]
    fn refused_routes_are_bounded_in_views_and_capped_in_replies() {
        let huge = "é".repeat(MAX_REASON); // two bytes each: a cut inside a character is avoided
        let list = vec![refused_route(&huge); MAX_REFUSED + 1];
        let capped = refused_reasons(&list);
        assert_eq!(capped.len(), MAX_REFUSED);
        assert!(capped[0].len() <= MAX_REASON && capped[0].chars().all(|c| c == 'é'));
        assert_eq!(refused(&list[..1]), Err(UpdateError::RefusedTooLarge));
        assert_eq!(
            refused(&[v1::RefusedRoute { route: None, reason: "x".into() }]),
            Err(UpdateError::RefusedNoRoute(0))
        );
        let ok = refused(&[refused_route("10.30.0.0/24 is not within the routes granted")]).unwrap();
        assert_eq!(ok[0].0.to_string(), "10.30.0.0/24");
    }
}
