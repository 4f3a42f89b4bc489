//! Register: enrollment of a new node with an enrollment key, and re-registration with a
//! node credential. Public keys are not secret, so a key pair that is already enrolled
//! (or was removed) never enrolls again: only the node's credential speaks for it.
//!
//! Enrollment also needs the answer to a challenge (proof that the node holds the private
//! key, [`wirefence_proto::possession`]) and passes the rate limits per source address and
//! per key. A node owns its hostname only when its key was bound to that name; otherwise
//! the name is a label `node:` selectors never match (until `nodes approve`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use tonic::Code;
use wirefence_proto::v1::{IpPrefix, RegisterRequest, RegisterResponse};
use wirefence_proto::Escaped;

use super::routes::split_routes;
use super::throttle::{Admit, Change};
use super::{lock, Overlay, Registry};
use crate::alloc::{allocate, host};
use crate::auth::{self, Token};
use crate::model::{now_unix, valid_hostname, NodeRec, PublicKey, RefusedRoute};
use crate::store::{self, KeyRow, StoreError};
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

/// Validates the request's fields; errors name the field. Endpoints must be unicast,
/// outside the overlay and not one of `control_plane`'s addresses.
pub fn validate(req: &RegisterRequest, overlay: &Overlay, control_plane: &[IpAddr]) -> Result<Registration, Error> {
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
        .map(|(index, e)| {
            let addr = SocketAddr::try_from(e).map_err(Error::wire(format!("endpoints[{index}]")))?;
            wirefence_proto::endpoint::check(addr, &[overlay.v4, overlay.v6], control_plane)
                .map_err(|problem| Error::Endpoint { index, addr, problem })?;
            Ok(addr)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut routes = Vec::with_capacity(req.routes.len());
    for (index, r) in req.routes.iter().enumerate() {
        let route = IpNet::try_from(r).map_err(Error::wire(format!("routes[{index}]")))?;
        check_route(index, route, overlay)?;
        if !routes.contains(&route) {
            routes.push(route);
        }
    }
    Ok(Registration { public_key, hostname: req.hostname.clone(), endpoints, routes })
}

/// Routes broader than this are refused: no node may claim (a large part of) the Internet.
pub const MIN_ROUTE_V4: u8 = 8;
pub const MIN_ROUTE_V6: u8 = 16;

/// A route (advertised, or granted by a key) must be narrow enough and stay clear of the
/// overlay ranges.
pub fn check_route(index: usize, route: IpNet, overlay: &Overlay) -> Result<(), Error> {
    let min = match route {
        IpNet::V4(_) => MIN_ROUTE_V4,
        IpNet::V6(_) => MIN_ROUTE_V6,
    };
    if route.prefix_len() < min {
        return Err(Error::RouteTooBroad { index, route, min });
    }
    for overlay in [overlay.v4, overlay.v6] {
        if route.contains(&overlay) || overlay.contains(&route) {
            return Err(Error::RouteOverlapsOverlay { index, route, overlay });
        }
    }
    Ok(())
}

pub(super) fn response(
    node: &NodeRec,
    credential: String,
    rotate_credential: bool,
    overlay: &Overlay,
    refused: &[RefusedRoute],
) -> RegisterResponse {
    RegisterResponse {
        node_id: node.id.clone(),
        credential,
        addresses: node.addresses.iter().map(|a| IpPrefix::from(*a)).collect(),
        rotate_credential,
        // Agents without configured ranges pin these at enrollment (their local guard).
        overlay: [overlay.v4, overlay.v6].into_iter().map(IpPrefix::from).collect(),
        refused_routes: refused.iter().map(RefusedRoute::to_wire).collect(),
    }
}

/// A fresh proof-of-possession challenge (counted against the source's enrollment rate).
pub struct Challenge {
    pub id: String,
    pub server_public_key: [u8; 32],
}

impl Registry {
    /// Handles a Register call; `meta` may carry a node credential. Enrollment attempts
    /// are limited per source address through the challenges they need.
    pub async fn register(
        &self,
        meta: &tonic::metadata::MetadataMap,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, Error> {
        match auth::bearer(meta)? {
            Some(token) => {
                self.check_credential(&token).await?;
                let id = token.id.clone();
                let result = match validate(req, &self.overlay, &self.gate.control_plane()) {
                    Ok(reg) => self.reregister(token, reg).await,
                    Err(e) => Err(e),
                };
                self.note_registration(&id, &result);
                result
            }
            None => {
                let reg = validate(req, &self.overlay, &self.gate.control_plane())?;
                if req.enrollment_key.trim().is_empty() {
                    return Err(Error::EnrollmentKeyMissing);
                }
                // Taken first: a challenge is good for one attempt, whatever its outcome.
                let challenge = (req.challenge_id.as_str(), self.take_challenge(&req.challenge_id)?);
                self.enroll(&req.enrollment_key, reg, challenge, &req.proof).await
            }
        }
    }

    fn limit_source(&self, source: Option<IpAddr>) -> Result<(), Error> {
        match source {
            Some(ip) if !self.gate.per_source.take(&ip, Instant::now()) => Err(Error::EnrollRateSource),
            _ => Ok(()),
        }
    }

    /// A challenge for EnrollChallenge, counted against `source`'s enrollment rate (an
    /// enrollment needs one, so this limits enrollment attempts per address).
    pub fn challenge(&self, source: Option<IpAddr>) -> Result<Challenge, Error> {
        self.limit_source(source)?;
        let c = self.gate.challenges.issue(Instant::now()).ok_or(Error::ChallengesBusy)?;
        Ok(Challenge { id: c.id, server_public_key: c.server_public_key })
    }

    /// The secret of challenge `id` (from EnrollChallenge), which it ends: a challenge
    /// answers one enrollment or key rotation, whatever its outcome.
    pub(super) fn take_challenge(&self, id: &str) -> Result<x25519_dalek::StaticSecret, Error> {
        match id {
            "" => Err(Error::ChallengeMissing),
            id => self.gate.challenges.take(id, Instant::now()).ok_or(Error::ChallengeUnknown),
        }
    }

    /// Issues a new credential for the node behind `meta`'s credential; the old one stays
    /// valid until the node registers with the new one.
    pub async fn rotate_credential(&self, meta: &tonic::metadata::MetadataMap) -> Result<String, Error> {
        let token = auth::bearer(meta)?.ok_or(Error::CredentialMissing)?;
        self.check_credential(&token).await?;
        let new = Token::generate(token.id.clone());
        let store = self.store().await;
        let mut tx = store.begin().await?;
        store::set_pending_credential(&mut tx, &token.id, &new.hash()).await?;
        store.commit(tx, None).await?;
        tracing::info!(node = %token.id, "credential rotation started");
        Ok(new.expose())
    }

    /// Re-registration may update endpoints and routes (within the grant); the hostname
    /// and public key are what policy and peers know the node by, so they stay fixed.
    /// A change comes into effect at once, or, when the node changed something less than
    /// an interval ago, once that interval is over ([`super::throttle::Coalescer`]).
    /// Call with a checked credential.
    async fn reregister(&self, token: Token, reg: Registration) -> Result<RegisterResponse, Error> {
        // Registering with the rotated credential completes the rotation: the old one ends.
        if self.credentials.is_pending(&token) {
            let store = self.store().await;
            let mut tx = store.begin().await?;
            store::promote_credential(&mut tx, &token.id).await?;
            store.commit(tx, None).await?;
            tracing::info!(node = %token.id, "credential rotated");
        }
        let state = self.current();
        let old = state.node(&token.id).ok_or_else(|| Error::NodeRemoved(token.id.clone()))?.clone();
        // Read without the writer's turn: nothing here depends on the order of changes.
        let standing = match self.store.standing(&old.id).await {
            Ok(s) => s,
            Err(StoreError::Unavailable(e)) if reg.public_key == old.public_key && reg.hostname == old.hostname => {
                // The database is down and a node comes back (its replica died, its agent
                // restarted): it gets its record as the state in memory has it; new
                // endpoints or routes take effect at a later registration.
                tracing::warn!(node = %old.id, error = %e, "database unavailable: registered from the state in memory");
                return Ok(response(&old, token.expose(), false, &self.overlay, &old.refused_routes));
            }
            Err(e) => return Err(e.into()),
        };
        // Compared with what it enrolled with: an admin may have renamed the node since.
        if reg.hostname != standing.claimed_hostname {
            return Err(Error::Immutable("hostname"));
        }
        // The node switched to the key it announced: now its key for every peer.
        let old = match reg.public_key == old.public_key {
            true => old,
            false if standing.pending_public_key == Some(reg.public_key) => {
                Arc::new(self.commit_key(&old, reg.public_key).await?)
            }
            false => return Err(Error::KeyNotAnnounced),
        };
        let (routes, refused) = split_routes(&reg.routes, &standing.granted_routes, &state.nodes, &old.id);
        self.advertised(&old.id, &reg.routes, &refused);
        let change = Change { endpoints: reg.endpoints, routes, refused_routes: refused.clone() };
        let changed = (change.endpoints != old.endpoints
            || change.routes != old.routes
            || change.refused_routes != old.refused_routes)
            .then_some(change.clone());
        if self.reregistrations.offer(&old.id, changed) == Admit::Now {
            self.apply_reregistration(&old.id, change).await?;
        }
        Ok(response(&old, token.expose(), standing.rotate_requested, &self.overlay, &refused))
    }

    /// Keeps a refused registration of a known node for `nodes show` (and logs it: an
    /// operator must act on a refusal that is not a passing condition); a success clears it.
    fn note_registration<T>(&self, id: &str, result: &Result<T, Error>) {
        match result {
            Ok(_) => self.observed.update(id, |o| o.last_refusal = None),
            Err(e) if matches!(e.code(), Code::Internal | Code::Unavailable | Code::DeadlineExceeded) => {}
            Err(e) => {
                let reason = e.to_string();
                tracing::info!(node = %id, reason = %Escaped(&reason), "registration refused");
                self.observed.update(id, |o| o.last_refusal = Some((now_unix(), reason)));
            }
        }
    }

    /// Writes and publishes a node's new endpoints and routes, checked again against the
    /// state at this moment (it may be applied an interval after it was asked for).
    pub(super) async fn apply_reregistration(&self, id: &str, change: Change) -> Result<(), Error> {
        let store = self.store().await;
        let state = self.current();
        let old = state.node(id).ok_or_else(|| Error::NodeRemoved(id.to_owned()))?;
        // Checked again: another node may have taken a route since it was asked for.
        let (routes, later) = split_routes(&change.routes, &store.standing(id).await?.granted_routes, &state.nodes, id);
        self.log_refused(id, &later);
        let mut refused_routes = change.refused_routes;
        refused_routes.extend(later);
        let new = NodeRec { endpoints: change.endpoints, routes, refused_routes, ..(**old).clone() };
        if new != **old {
            let mut tx = store.begin().await?;
            store::update_node(&mut tx, &new).await?;
            let version = store.commit(tx, Some(&crate::change::Change::Node(new.clone()))).await?;
            tracing::info!(node = %new.id, version, "node re-registered with changes");
            self.published(version).await;
        }
        Ok(())
    }

    async fn enroll(
        &self,
        key: &str,
        reg: Registration,
        (challenge_id, challenge): (&str, x25519_dalek::StaticSecret),
        proof: &[u8],
    ) -> Result<RegisterResponse, Error> {
        if key.trim().is_empty() {
            return Err(Error::EnrollmentKeyMissing);
        }
        let token = Token::parse(key).ok_or(Error::EnrollmentKeyUnknown)?;
        let store = self.store().await;
        let key = store.key(&token.id).await?.ok_or(Error::EnrollmentKeyUnknown)?;
        if !token.matches(&key.hash) {
            return Err(Error::EnrollmentKeyUnknown);
        }
        check_key(&key)?;
        if !self.gate.per_key.take(&key.id, Instant::now()) {
            return Err(Error::EnrollRateKey(key.id));
        }
        wirefence_proto::possession::verify(&challenge, &reg.public_key, challenge_id, &reg.hostname, proof)?;
        if let Some(node) = key.node.clone() {
            return self.reenroll(&store, &key, &node, reg).await;
        }
        // Only after the key checks out, so key pairs cannot be probed without one.
        if let Some(id) = store.removed_with_key(&reg.public_key).await? {
            return Err(Error::PublicKeyRemoved(id));
        }
        let bound = match &key.hostname {
            Some(name) if *name != reg.hostname => {
                return Err(Error::HostnameNotBound { name: name.clone(), key: key.id, wanted: reg.hostname });
            }
            Some(name) => match store.name_owner(name).await? {
                Some((node, removed)) => return Err(Error::HostnameOwned { name: name.clone(), node, removed }),
                None => true,
            },
            None => false,
        };
        let state = self.current();
        for n in state.nodes.iter() {
            if n.public_key == reg.public_key {
                return Err(Error::PublicKeyEnrolled);
            }
            // A label may not copy a live owner's name (a bound key wins over labels).
            if n.hostname == reg.hostname && n.bound && !bound {
                return Err(Error::HostnameTaken(reg.hostname.clone()));
            }
        }
        let requested = reg.routes.clone();
        let (routes, refused) = split_routes(&reg.routes, &key.routes, &state.nodes, "");
        let mut node = NodeRec {
            id: auth::new_id('n'),
            hostname: reg.hostname,
            bound,
            public_key: reg.public_key,
            addresses: vec![],
            endpoints: reg.endpoints,
            routes,
            tags: key.tags.clone(),
            refused_routes: refused.clone(),
        };
        let credential = Token::generate(node.id.clone());
        let mut tx = store.begin().await?;
        // Holding the version row, no other server commits a change until this one does:
        // once caught up, the addresses given out are all known here.
        store::hold_versions(&mut tx).await?;
        self.catch_up().await?;
        node.addresses = {
            let used = lock(&self.allocated);
            let v4 = allocate(self.overlay.v4, &used).ok_or(Error::PoolExhausted(self.overlay.v4))?;
            vec![host(v4), host(allocate(self.overlay.v6, &used).ok_or(Error::PoolExhausted(self.overlay.v6))?)]
        };
        if !store::use_key(&mut tx, &key.id).await? {
            return Err(Error::EnrollmentKeyExhausted { id: key.id, uses: key.max_uses, max_uses: key.max_uses });
        }
        store::insert_node(&mut tx, &node, &credential.hash(), &key.routes).await?;
        let version = store.commit(tx, Some(&crate::change::Change::Node(node.clone()))).await?;
        tracing::info!(node = %node.id, hostname = %Escaped(&node.hostname), bound, key = %key.id, version, "node enrolled");
        self.published(version).await;
        self.advertised(&node.id, &requested, &refused);
        Ok(response(&node, credential.expose(), false, &self.overlay, &refused))
    }
}

fn check_key(key: &KeyRow) -> Result<(), Error> {
    if key.revoked {
        return Err(Error::EnrollmentKeyRevoked(key.id.clone()));
    }
    if key.max_uses != 0 && key.uses >= key.max_uses {
        return Err(Error::EnrollmentKeyExhausted { id: key.id.clone(), uses: key.uses, max_uses: key.max_uses });
    }
    if key.expires != 0 && now_unix() >= key.expires {
        return Err(Error::EnrollmentKeyExpired(key.id.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_messages_do_not_show_secrets_in_debug() {
        let req = RegisterRequest {
            hostname: "db1".into(),
            enrollment_key: "kabc.enrollment-s3cr3t".into(),
            ..Default::default()
        };
        let resp = RegisterResponse {
            node_id: "nabc".into(),
            credential: "nabc.credential-s3cr3t".into(),
            ..Default::default()
        };
        for shown in [format!("{req:?}"), format!("{req:#?}"), format!("{resp:?}"), format!("{resp:#?}")] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains("<redacted>") && (shown.contains("db1") || shown.contains("nabc")), "{shown}");
        }
        assert!(format!("{:?}", RegisterRequest::default()).contains("enrollment_key: <empty>"));
    }

    #[test]
    fn routes_are_narrow_and_clear_of_the_overlay() {
        let o = Overlay::default();
        let ok = |s: &str| check_route(0, s.parse().unwrap(), &o).is_ok();
        assert!(ok("11.0.0.0/8") && ok("10.88.0.0/24") && ok("2001::/16") && ok("fd88::/48"));
        assert!(!ok("0.0.0.0/0") && !ok("8.0.0.0/7") && !ok("2000::/15") && !ok("::/0"));
        assert!(!ok("10.77.1.0/24") && !ok("fd77::/48"));
    }
}
