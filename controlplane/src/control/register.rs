//! Register: enrollment of a new node with an enrollment key, re-enrollment of a known
//! public key, and re-registration with a node credential.

use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;
use wirefence_proto::v1::{IpPrefix, RegisterRequest, RegisterResponse};

use super::{lock, Control, Overlay};
use crate::alloc::{allocate, host};
use crate::auth::{self, Token};
use crate::model::{now_unix, valid_hostname, NodeRec, PublicKey};
use crate::store::{self, KeyRow};
use crate::Error;

pub const MAX_ENDPOINTS: usize = 16;
pub const MAX_ROUTES: usize = 256;

/// A validated RegisterRequest (without the enrollment key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub public_key: PublicKey,
    pub hostname: String,
    pub endpoints: Vec<SocketAddr>,
    pub routes: Vec<IpNet>,
}

/// Validates the request's fields; errors name the field.
pub fn validate(req: &RegisterRequest, overlay: &Overlay) -> Result<Registration, Error> {
    let public_key: PublicKey =
        req.public_key.as_slice().try_into().map_err(|_| Error::PublicKeyLength(req.public_key.len()))?;
    if public_key == [0; 32] {
        return Err(Error::PublicKeyZero);
    }
    if !valid_hostname(&req.hostname) {
        return Err(Error::Hostname(req.hostname.clone()));
    }
    if req.endpoints.len() > MAX_ENDPOINTS {
        return Err(Error::TooMany { field: "endpoints", max: MAX_ENDPOINTS });
    }
    if req.routes.len() > MAX_ROUTES {
        return Err(Error::TooMany { field: "routes", max: MAX_ROUTES });
    }
    let endpoints = req
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| SocketAddr::try_from(e).map_err(Error::wire(format!("endpoints[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut routes = Vec::with_capacity(req.routes.len());
    for (index, r) in req.routes.iter().enumerate() {
        let route = IpNet::try_from(r).map_err(Error::wire(format!("routes[{index}]")))?;
        for overlay in [overlay.v4, overlay.v6] {
            if route.contains(&overlay) || overlay.contains(&route) {
                return Err(Error::RouteOverlapsOverlay { index, route, overlay });
            }
        }
        if !routes.contains(&route) {
            routes.push(route);
        }
    }
    Ok(Registration { public_key, hostname: req.hostname.clone(), endpoints, routes })
}

fn response(node: &NodeRec, credential: String) -> RegisterResponse {
    RegisterResponse {
        node_id: node.id.clone(),
        credential,
        addresses: node.addresses.iter().map(|a| IpPrefix::from(*a)).collect(),
    }
}

impl Control {
    /// Handles a Register call; `meta` may carry a node credential.
    pub fn register(
        &self,
        meta: &tonic::metadata::MetadataMap,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, Error> {
        let reg = validate(req, &self.overlay)?;
        match auth::bearer(meta)? {
            Some(token) => self.reregister(token, reg),
            None => self.enroll(&req.enrollment_key, reg),
        }
    }

    fn reregister(&self, token: Token, reg: Registration) -> Result<RegisterResponse, Error> {
        let mut store = self.store();
        super::check_credential(&store, &token)?;
        let state = self.current();
        let old = state.node(&token.id).ok_or_else(|| Error::NodeRemoved(token.id.clone()))?.clone();
        check_unique(&state.nodes, &old.id, &reg)?;
        let new = NodeRec {
            public_key: reg.public_key,
            hostname: reg.hostname,
            endpoints: reg.endpoints,
            routes: reg.routes,
            ..(*old).clone()
        };
        if new != *old {
            let ((), version) = store.change(true, |tx| store::update_node(tx, &new))?;
            tracing::info!(node = %new.id, version, "node re-registered with changes");
            let nodes = replace(&state.nodes, Arc::new(new.clone()));
            self.publish(state.with_nodes(version, nodes));
        }
        Ok(response(&new, token.expose()))
    }

    fn enroll(&self, key: &str, reg: Registration) -> Result<RegisterResponse, Error> {
        if key.trim().is_empty() {
            return Err(Error::EnrollmentKeyMissing);
        }
        let token = Token::parse(key).ok_or(Error::EnrollmentKeyUnknown)?;
        let mut store = self.store();
        let key = store.key(&token.id)?.ok_or(Error::EnrollmentKeyUnknown)?;
        if !token.matches(&key.hash) {
            return Err(Error::EnrollmentKeyUnknown);
        }
        check_key(&key)?;
        let state = self.current();
        let existing = state.nodes.iter().find(|n| n.public_key == reg.public_key).cloned();
        let (node, changed) = match &existing {
            // Re-enrollment of a live node's public key: the same node, a new credential.
            Some(old) => {
                check_unique(&state.nodes, &old.id, &reg)?;
                let new = NodeRec {
                    hostname: reg.hostname,
                    endpoints: reg.endpoints,
                    routes: reg.routes,
                    tags: key.tags.clone(),
                    ..(**old).clone()
                };
                let changed = new != **old;
                (new, changed)
            }
            None => {
                check_unique(&state.nodes, "", &reg)?;
                let used = lock(&self.allocated);
                let v4 = allocate(self.overlay.v4, &used).ok_or(Error::PoolExhausted(self.overlay.v4))?;
                let v6 = allocate(self.overlay.v6, &used).ok_or(Error::PoolExhausted(self.overlay.v6))?;
                let node = NodeRec {
                    id: auth::new_id('n'),
                    hostname: reg.hostname,
                    public_key: reg.public_key,
                    addresses: vec![host(v4), host(v6)],
                    endpoints: reg.endpoints,
                    routes: reg.routes,
                    tags: key.tags.clone(),
                };
                (node, true)
            }
        };
        let credential = Token::generate(node.id.clone());
        let ((), version) = store.change(changed, |tx| {
            if existing.is_some() {
                store::update_node(tx, &node)?;
                store::set_credential(tx, &node.id, &credential.hash())?;
            } else {
                store::insert_node(tx, &node, &credential.hash())?;
            }
            if key.single_use {
                store::mark_key_used(tx, &key.id)?;
            }
            Ok(())
        })?;
        if existing.is_none() {
            lock(&self.allocated).extend(node.addresses.iter().map(|a| a.addr()));
        }
        tracing::info!(
            node = %node.id,
            hostname = %node.hostname,
            key = %key.id,
            version,
            reenrolled = existing.is_some(),
            "node enrolled"
        );
        if changed {
            let rec = Arc::new(node.clone());
            let nodes = match existing {
                Some(_) => replace(&state.nodes, rec),
                None => state.nodes.iter().cloned().chain(std::iter::once(rec)).collect(),
            };
            self.publish(state.with_nodes(version, nodes));
        }
        Ok(response(&node, credential.expose()))
    }
}

fn check_key(key: &KeyRow) -> Result<(), Error> {
    if key.single_use && key.used {
        return Err(Error::EnrollmentKeyUsed(key.id.clone()));
    }
    if key.expires != 0 && now_unix() >= key.expires {
        return Err(Error::EnrollmentKeyExpired(key.id.clone()));
    }
    Ok(())
}

/// Hostname and public key must not belong to another live node than `me`.
fn check_unique(nodes: &[Arc<NodeRec>], me: &str, reg: &Registration) -> Result<(), Error> {
    for n in nodes.iter().filter(|n| n.id != me) {
        if n.hostname == reg.hostname {
            return Err(Error::HostnameTaken(reg.hostname.clone()));
        }
        if n.public_key == reg.public_key {
            return Err(Error::PublicKeyTaken);
        }
    }
    Ok(())
}

/// `nodes` with the node of `new.id` replaced by `new`.
fn replace(nodes: &[Arc<NodeRec>], new: Arc<NodeRec>) -> Vec<Arc<NodeRec>> {
    nodes.iter().map(|n| if n.id == new.id { new.clone() } else { n.clone() }).collect()
}
