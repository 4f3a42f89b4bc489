//! Who owns a name, and the credential a node speaks with: approving a node binds its
//! hostname to it (one owner at a time; a removed owner keeps the name reserved until an
//! admin releases it), and an admin may ask a node to rotate its credential.

use std::sync::Arc;

use wirefence_proto::policy::valid_name;

use super::admin::find;
use super::Registry;
use crate::model::valid_hostname;
use crate::store;
use crate::Error;

impl Registry {
    /// Binds the node's hostname to it, so `node:<hostname>` selectors match it; returns
    /// the version (the policy may now resolve differently).
    pub fn approve_node(&self, sel: &str) -> Result<u64, Error> {
        let mut store = self.store();
        let row = find(store.nodes()?, sel)?;
        if row.rec.bound {
            return Ok(self.current().version);
        }
        if let Some((node, removed)) = store.name_owner(&row.rec.hostname)? {
            return Err(Error::HostnameOwned { name: row.rec.hostname, node, removed });
        }
        let id = row.rec.id.clone();
        let ((), version) = store.change(true, |tx| store::bind_name(tx, &id))?;
        let state = self.current();
        let nodes = state
            .nodes
            .iter()
            .map(|n| {
                if n.id == id {
                    std::sync::Arc::new(crate::model::NodeRec { bound: true, ..(**n).clone() })
                } else {
                    n.clone()
                }
            })
            .collect();
        self.publish(state.with_nodes(version, nodes));
        tracing::info!(node = %id, hostname = %row.rec.hostname, version, "node approved: owns its hostname");
        Ok(version)
    }

    /// An admin's edit of a node's tags and/or hostname (which it then owns), in one
    /// version; returns it and the node.
    pub fn set_node(
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
        let mut store = self.store();
        let id = find(store.nodes()?, sel)?.rec.id;
        let state = self.current();
        let old = state.node(&id).ok_or_else(|| Error::NodeRemoved(id.clone()))?.clone();
        let mut new = (*old).clone();
        if let Some(mut tags) = tags {
            tags.sort();
            tags.dedup();
            new.tags = tags;
        }
        if let Some(h) = hostname {
            match store.name_owner(&h)? {
                Some((node, removed)) if node != id => return Err(Error::HostnameOwned { name: h, node, removed }),
                _ => {}
            }
            new.hostname = h;
            new.bound = true;
        }
        if new == *old {
            drop(store);
            return Ok((state.version, self.get_node(&id)?));
        }
        let ((), version) = store.change(true, |tx| store::set_identity(tx, &new))?;
        tracing::info!(node = %id, version, hostname = %new.hostname, tags = ?new.tags, "node edited");
        self.publish(state.with_nodes(version, super::register::replace(&state.nodes, Arc::new(new))));
        drop(store);
        Ok((version, self.get_node(&id)?))
    }

    /// The node behind `meta`'s credential leaves: removed as by an admin. Returns the
    /// version without it.
    pub fn leave(&self, meta: &tonic::metadata::MetadataMap) -> Result<u64, Error> {
        let token = crate::auth::bearer(meta)?.ok_or(Error::CredentialMissing)?;
        self.check_credential(&token)?;
        let version = self.remove_node(&token.id)?;
        tracing::info!(node = %token.id, version, "node left the mesh");
        Ok(version)
    }

    /// Frees a name a removed node still reserves.
    pub fn release_name(&self, hostname: &str) -> Result<(), Error> {
        let mut store = self.store();
        let (changed, _) = store.change(false, |tx| store::release_name(tx, hostname))?;
        if changed == 0 {
            return Err(Error::NameNotReserved(hostname.to_owned()));
        }
        tracing::info!(%hostname, "name released");
        Ok(())
    }

    /// The node is told to rotate its credential at its next registration.
    pub fn request_rotation(&self, sel: &str) -> Result<(), Error> {
        let mut store = self.store();
        let id = find(store.nodes()?, sel)?.rec.id;
        store.change(false, |tx| store::request_rotation(tx, &id))?;
        tracing::info!(node = %id, "credential rotation requested");
        Ok(())
    }
}
