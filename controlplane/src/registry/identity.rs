//! Who owns a name, and the credential a node speaks with: approving a node binds its
//! hostname to it (one owner at a time; a removed owner keeps the name reserved until an
//! admin releases it), and an admin may ask a node to rotate its credential.

use wirefence_proto::policy::valid_name;

use super::admin::find;
use super::Registry;
use crate::model::valid_hostname;
use crate::store;
use crate::Error;

impl Registry {
    /// Binds the node's hostname to it, so `node:<hostname>` selectors match it; returns
    /// the version (the policy may now resolve differently).
    pub async fn approve_node(&self, sel: &str) -> Result<u64, Error> {
        let store = self.store().await;
        let row = find(store.nodes().await?, sel)?;
        if row.rec.bound {
            return Ok(self.current().version);
        }
        if let Some((node, removed)) = store.name_owner(&row.rec.hostname).await? {
            return Err(Error::HostnameOwned { name: row.rec.hostname, node, removed });
        }
        let id = row.rec.id.clone();
        let mut tx = store.begin().await?;
        store::bind_name(&mut tx, &id).await?;
        let approved = crate::model::NodeRec {
            bound: true,
            ..(**self.current().node(&id).ok_or_else(|| Error::NodeRemoved(id.clone()))?).clone()
        };
        let version = store.commit(tx, Some(&crate::change::Change::Node(approved))).await?;
        self.published(version).await;
        tracing::info!(node = %id, hostname = %row.rec.hostname, version, "node approved: owns its hostname");
        Ok(version)
    }

    /// An admin's edit of a node's tags and/or hostname (which it then owns), in one
    /// version; returns it and the node.
    pub async fn set_node(
        &self,
        sel: &str,
        tags: Option<Vec<String>>,
        hostname: Option<String>,
    ) -> Result<(u64, wirefence_proto::v1::Node), Error> {
        if let Some(bad) = tags.iter().flatten().find(|t| !valid_name(t)) {
            return Err(Error::Tag(bad.clone()));
        }
        if let Some(h) = hostname.as_ref().filter(|h| !valid_hostname(h)) {
            return Err(Error::Hostname(h.clone()));
        }
        let store = self.store().await;
        let id = find(store.nodes().await?, sel)?.rec.id;
        let state = self.current();
        let old = state.node(&id).ok_or_else(|| Error::NodeRemoved(id.clone()))?.clone();
        let mut new = (*old).clone();
        if let Some(mut tags) = tags {
            tags.sort();
            tags.dedup();
            new.tags = tags;
        }
        if let Some(h) = hostname {
            match store.name_owner(&h).await? {
                Some((node, removed)) if node != id => return Err(Error::HostnameOwned { name: h, node, removed }),
                _ => {}
            }
            new.hostname = h;
            new.bound = true;
        }
        if new == *old {
            drop(store);
            return Ok((state.version, self.get_node(&id).await?));
        }
        let mut tx = store.begin().await?;
        store::set_identity(&mut tx, &new).await?;
        let version = store.commit(tx, Some(&crate::change::Change::Node(new.clone()))).await?;
        tracing::info!(node = %id, version, hostname = %new.hostname, tags = ?new.tags, "node edited");
        self.published(version).await;
        drop(store);
        Ok((version, self.get_node(&id).await?))
    }

    /// The node behind `meta`'s credential leaves: removed as by an admin. Returns the
    /// version without it.
    pub async fn leave(&self, meta: &tonic::metadata::MetadataMap) -> Result<u64, Error> {
        let token = crate::auth::bearer(meta)?.ok_or(Error::CredentialMissing)?;
        self.check_credential(&token).await?;
        let version = self.remove_node(&token.id).await?;
        tracing::info!(node = %token.id, version, "node left the mesh");
        Ok(version)
    }

    /// Frees a name a removed node still reserves.
    pub async fn release_name(&self, hostname: &str) -> Result<(), Error> {
        let store = self.store().await;
        let mut tx = store.begin().await?;
        let changed = store::release_name(&mut tx, hostname).await?;
        store.commit(tx, None).await?;
        if changed == 0 {
            return Err(Error::NameNotReserved(hostname.to_owned()));
        }
        tracing::info!(%hostname, "name released");
        Ok(())
    }

    /// The node is told to rotate its credential at its next registration.
    pub async fn request_rotation(&self, sel: &str) -> Result<(), Error> {
        let store = self.store().await;
        let id = find(store.nodes().await?, sel)?.rec.id;
        let mut tx = store.begin().await?;
        store::request_rotation(&mut tx, &id).await?;
        store.commit(tx, None).await?;
        tracing::info!(node = %id, "credential rotation requested");
        Ok(())
    }
}
