//! Following the change log. A server publishes a state only by applying the log's next
//! entry to the state before it, whoever wrote the entry: its own changes right after
//! they commit ([`Registry::published`]), other servers' when PostgreSQL notifies, and
//! every [`POLL`] in any case (a notification lost while the listener reconnects, or a
//! server that was cut off from the database for a while). Entries are applied strictly
//! in version order; a server further behind than the log reaches reloads the whole
//! state.

use std::sync::Arc;
use std::time::Duration;

use super::{load, lock, stopped, Registry};
use crate::change::Change;
use crate::store::{DbLocation, NOTIFY_CHANNEL};
use crate::Error;

/// How often the log is read without a notification.
pub const POLL: Duration = Duration::from_secs(1);
/// Entries read per query.
const BATCH: u32 = 1_000;

impl Registry {
    /// Right after committing `version`: applies the log up to it (and any other server's
    /// entries before it). A failure to read the log is logged, not returned: the change
    /// is committed, and the follower applies it within [`POLL`].
    pub(super) async fn published(&self, version: u64) {
        if let Err(e) = self.catch_up().await {
            tracing::warn!(version, error = %e, "publishing from the change log failed; the follower retries");
        }
    }

    /// Applies every log entry after the current state's version, in order; returns how
    /// many states were published.
    pub async fn catch_up(&self) -> Result<usize, Error> {
        let _following = self.following.lock().await;
        let mut published = 0;
        loop {
            let from = self.current().version;
            let entries = self.store.changes_after(from, BATCH).await?;
            let Some(&(first, _)) = entries.first() else { break };
            // Before the states: a node they add must be able to authenticate, and one they
            // remove must not.
            self.store.reload_credentials().await;
            if first != from + 1 {
                // What came after our version was pruned from the log.
                let (state, allocated) = load(&self.store, self.overlay).await?;
                tracing::warn!(from, version = state.version, "behind the change log: reloaded the whole state");
                lock(&self.allocated).extend(allocated);
                self.publish(state);
                published += 1;
                continue;
            }
            for (version, body) in &entries {
                let change = Change::decode(*version, body)?;
                let state = change.apply(&self.current(), *version)?;
                lock(&self.allocated).extend(change.addresses().iter().map(|a| a.addr()));
                if let Change::Removed(id) = &change {
                    self.observed.forget(id);
                }
                self.publish(state);
                published += 1;
            }
            if entries.len() < BATCH as usize {
                break;
            }
        }
        Ok(published)
    }

    /// Follows the other servers of the database until shutdown (see the module docs).
    pub async fn run_follower(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        let mut listener = None;
        loop {
            if listener.is_none() {
                listener = self.listen().await;
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            let mut woken = true;
            tokio::select! {
                r = notified => if let Err(e) = r {
                    tracing::warn!(error = %e, "change notifications lost; polling until they are back");
                    listener = None;
                },
                _ = tokio::time::sleep(POLL) => woken = false,
                _ = stopped(&mut shutdown) => return,
            }
            match self.catch_up().await {
                // Another server's change may have touched a credential without a version.
                Ok(0) if woken => self.store.reload_credentials().await,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the change log failed; retrying"),
            }
        }
    }

    /// A listener for commit notifications (PostgreSQL only).
    async fn listen(&self) -> Option<sqlx::postgres::PgListener> {
        let DbLocation::Postgres(url) = self.store.location() else { return None };
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(url).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "listening for change notifications failed; polling");
                None
            }
        }
    }
}
