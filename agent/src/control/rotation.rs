//! WireGuard key rotation, the agent's side (the control plane's is in its
//! `registry::rotation`). The order makes the peers switch last, so their new peer entry
//! handshakes at once with a node that already answers to the new key:
//!
//! 1. the next key is written beside the key file (`keys::next_or_generate`);
//! 2. RotateKey announces its public key with proof of possession (nothing changes yet);
//! 3. the credential is saved as issued for the next key: from here on, a restart finishes
//!    the rotation (`keys::settle`);
//! 4. the daemon renames the next key over the key and reconciles the interface to it;
//! 5. registering with the new key makes it the node's key at the control plane, whose next
//!    view gives every peer the new key.
//!
//! Interrupted before 3, the next start announces the same key again; after 3 it registers
//! with the new key. The private key never leaves the host.

use tokio::sync::oneshot;
use tonic::transport::Channel;
use wirefence_proto::v1::agent_service_client::AgentServiceClient;
use wirefence_proto::v1::EnrollChallengeRequest;

use super::client::{authed, ControlClient, SessionError};
use super::persist::{ControlStatus, Credential};
use crate::keys;
use crate::model::PrivateKey;

/// The daemon's part: make `key` the key on disk and in the kernel. `done` says whether the
/// key file now holds it (a failing kernel pass after that is the daemon's to retry).
pub struct KeySwitch {
    pub key: PrivateKey,
    pub done: oneshot::Sender<Result<(), String>>,
}

impl ControlClient {
    /// Rotates the key when a next key waits (`rotate-key` made it, or a rotation was
    /// interrupted) or the schedule (`rotate_key_days`) says the key is old; otherwise does
    /// nothing. A failed rotation leaves the next key for the next session to finish.
    pub(super) async fn rotate_if_due(
        &mut self,
        client: &mut AgentServiceClient<Channel>,
        cred: &mut Credential,
        status: &mut ControlStatus,
    ) -> Result<(), SessionError> {
        let next = match keys::load_next(&self.key_file)? {
            Some(next) => next,
            None if self.schedule_due() => keys::next_or_generate(&self.key_file)?,
            None => return Ok(()),
        };
        self.rotate_to(client, cred, next).await?;
        status.registered_key = Some(self.own);
        self.save_status(status);
        Ok(())
    }

    fn schedule_due(&self) -> bool {
        let age = keys::age(&self.key_file);
        self.config.rotate_key_every.is_some_and(|every| age.is_some_and(|age| age >= every))
    }

    async fn rotate_to(
        &mut self,
        client: &mut AgentServiceClient<Channel>,
        cred: &mut Credential,
        next: PrivateKey,
    ) -> Result<(), SessionError> {
        let new = next.public_key();
        tracing::info!(old = %self.own, new = %new, "rotating the WireGuard key");
        let challenge = client.enroll_challenge(EnrollChallengeRequest {}).await?.into_inner();
        let req = wirefence_proto::possession::rotation(&next.as_wg().0, &cred.node_id, &challenge)?;
        client.rotate_key(authed(cred, req)).await?;
        let taken = Credential { public_key: new, ..cred.clone() };
        self.files.set_credential(&taken)?;
        let (done, answer) = oneshot::channel();
        self.key_switch.send(KeySwitch { key: next.clone(), done }).await.map_err(|_| SessionError::DaemonGone)?;
        if let Err(e) = answer.await.map_err(|_| SessionError::DaemonGone)? {
            // The key file still holds the old key: so must the credential, or the next
            // start would take the node for a new one.
            self.files.set_credential(cred)?;
            return Err(SessionError::KeySwitch(e));
        }
        let old = std::mem::replace(&mut self.own, new);
        self.private_key = next;
        self.tracker.set_own(new);
        *cred = taken;
        // The control plane makes it the node's key now, and the peers follow.
        self.register(client).await?;
        tracing::info!(%old, new = %self.own, "WireGuard key rotated");
        Ok(())
    }
}
