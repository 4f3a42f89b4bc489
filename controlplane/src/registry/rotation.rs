//! A node's identity passing to a new key pair: key rotation, and re-enrollment of a node
//! that lost its state.
//!
//! Key rotation runs in two steps, so that the node's peers switch last.
//!
//! 1. RotateKey: the node announces its next public key with its credential and a proof of
//!    possession of the new private key. The key is recorded as pending; views do not change.
//! 2. The node switches its own interface to the new key and registers with it: that
//!    registration makes it the node's key in one version, and every peer's next view
//!    carries it. A new peer entry handshakes at once (its persistent keepalive), with a node
//!    that already answers to the new key, so the gap is one view's trip.
//!
//! Either step may be repeated: an agent interrupted anywhere announces again or registers
//! with whichever key it holds, and the control plane ends with the key the node uses.
//!
//! Re-enrollment needs an admin: `nodes reenroll` makes a single-use key naming the node,
//! and an enrollment with it (a new key pair, proven as in any enrollment, under the node's
//! hostname) takes over the node's id, addresses, name, tags and grants with a new credential.

use wirefence_proto::v1::RotateKeyRequest;

use wirefence_proto::v1::RegisterResponse;

use super::register::{response, Registration};
use super::routes::split_routes;
use super::Registry;
use crate::auth::Token;
use crate::model::{NodeRec, PublicKey};
use crate::store::{self, KeyRow, Store};
use crate::Error;

impl Registry {
    /// Records the key announced by the node behind `meta`'s credential as its pending key.
    pub async fn rotate_key(&self, meta: &tonic::metadata::MetadataMap, req: &RotateKeyRequest) -> Result<(), Error> {
        let token = crate::auth::bearer(meta)?.ok_or(Error::CredentialMissing)?;
        self.check_credential(&token).await?;
        let id = token.id;
        let key: PublicKey =
            req.new_public_key.as_slice().try_into().map_err(|_| Error::PublicKeyLength(req.new_public_key.len()))?;
        if key == [0; 32] {
            return Err(Error::PublicKeyZero);
        }
        let challenge = self.take_challenge(&req.challenge_id)?;
        wirefence_proto::possession::verify_rotation(&challenge, &key, &req.challenge_id, &id, &req.proof)?;
        let store = self.store().await;
        let state = self.current();
        let node = state.node(&id).ok_or_else(|| Error::NodeRemoved(id.clone()))?;
        if node.public_key == key {
            return Err(Error::KeyUnchanged);
        }
        // A key another node has, had or announced never becomes this node's: views would
        // name two nodes by one key, and a removed node's key stays retired.
        match store.key_holder(&key).await? {
            Some((holder, _)) if holder == id => {} // announced again (an interrupted rotation)
            Some((holder, true)) => return Err(Error::PublicKeyRemoved(holder)),
            Some(_) => return Err(Error::PublicKeyEnrolled),
            None => {}
        }
        let mut tx = store.begin().await?;
        store::set_pending_key(&mut tx, &id, &key).await?;
        store.commit(tx, None).await?;
        tracing::info!(node = %id, new_key = %crate::output::key(&key), "key rotation announced");
        Ok(())
    }

    /// A registration with the pending key: it becomes the node's key, published at once.
    /// Returns the node as it is now.
    pub(super) async fn commit_key(&self, old: &NodeRec, key: PublicKey) -> Result<NodeRec, Error> {
        let store = self.store().await;
        let mut tx = store.begin().await?;
        store::commit_key(&mut tx, &old.id).await?;
        let new = NodeRec { public_key: key, ..old.clone() };
        let version = store.commit(tx, Some(&crate::change::Change::Node(new.clone()))).await?;
        self.published(version).await;
        tracing::info!(node = %old.id, version, new_key = %crate::output::key(&key), "key rotated");
        Ok(new)
    }

    /// An enrollment with a re-enrollment key of node `id` (the key and the proof checked).
    pub(super) async fn reenroll(
        &self,
        store: &Store,
        key: &KeyRow,
        id: &str,
        reg: Registration,
    ) -> Result<RegisterResponse, Error> {
        let state = self.current();
        let old = state.node(id).ok_or_else(|| Error::NodeRemoved(id.to_owned()))?;
        let standing = store.standing(id).await?;
        if reg.hostname != standing.claimed_hostname {
            let name = standing.claimed_hostname;
            return Err(Error::HostnameNotBound { name, key: key.id.clone(), wanted: reg.hostname });
        }
        match store.key_holder(&reg.public_key).await? {
            Some((holder, true)) => return Err(Error::PublicKeyRemoved(holder)),
            Some(_) => return Err(Error::PublicKeyEnrolled),
            None => {}
        }
        let (routes, refused) = split_routes(&reg.routes, &standing.granted_routes, &state.nodes, id);
        let new = NodeRec {
            public_key: reg.public_key,
            endpoints: reg.endpoints,
            routes,
            refused_routes: refused.clone(),
            ..(**old).clone()
        };
        let credential = Token::generate(id.to_owned());
        let mut tx = store.begin().await?;
        if !store::use_key(&mut tx, &key.id).await? {
            return Err(Error::EnrollmentKeyExhausted {
                id: key.id.clone(),
                uses: key.max_uses,
                max_uses: key.max_uses,
            });
        }
        store::reenroll_node(&mut tx, &new, &credential.hash()).await?;
        let version = store.commit(tx, Some(&crate::change::Change::Node(new.clone()))).await?;
        self.published(version).await;
        self.advertised(id, &reg.routes, &refused);
        tracing::info!(node = %id, key = %key.id, version, new_key = %crate::output::key(&new.public_key), "node re-enrolled");
        Ok(response(&new, credential.expose(), false, &self.overlay, &refused))
    }
}
