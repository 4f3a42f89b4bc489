//! The node credentials in memory: node id -> (credential hash, removed). Authentication
//! reads only this index, under a read lock, so a flood of bad or unknown tokens never
//! touches SQLite or waits for the store lock that every change holds.
//!
//! The [`crate::store::Store`] owns the writing side: after every commit (its own or, read
//! from the change log or woken by a notification, another server's) it reads the nodes
//! whose credential columns changed since its last reload and updates their entries, so
//! enrollment, removal and any later credential change are followed without each call
//! site having to remember it, at a cost in proportion to what changed.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::auth::Token;
use crate::Error;

/// What authentication needs to know about one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hash: Vec<u8>,
    /// A rotated credential, valid beside `hash` until the node registers with it (so a
    /// crash while the agent saves it never locks the node out).
    pub pending: Option<Vec<u8>>,
    pub removed: bool,
}

#[derive(Debug, Default)]
pub struct CredentialIndex(RwLock<HashMap<String, Entry>>);

impl CredentialIndex {
    /// Checks a node credential: `CredentialInvalid` when unknown or tampered (the same
    /// answer for both), `NodeRemoved` when it was right but the node is gone.
    pub fn check(&self, token: &Token) -> Result<(), Error> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        let entry = map.get(&token.id).ok_or(Error::CredentialInvalid)?;
        if !token.matches(&entry.hash) && !entry.pending.as_ref().is_some_and(|p| token.matches(p)) {
            return Err(Error::CredentialInvalid);
        }
        if entry.removed {
            return Err(Error::NodeRemoved(token.id.clone()));
        }
        Ok(())
    }

    /// Whether `token` is the node's rotated credential, not yet in use.
    pub fn is_pending(&self, token: &Token) -> bool {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        map.get(&token.id).and_then(|e| e.pending.as_ref()).is_some_and(|p| token.matches(p))
    }

    /// Replaces the whole index (a full reload from the store).
    pub fn replace(&self, entries: HashMap<String, Entry>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = entries;
    }

    /// Replaces the entries of the nodes in `changed` (an incremental reload).
    pub fn update(&self, changed: HashMap<String, Entry>) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).extend(changed);
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
