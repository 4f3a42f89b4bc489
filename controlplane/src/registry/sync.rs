//! Whether a node runs the view the control plane has for it now, for `nodes list` and
//! `nodes show`. A node's applied version alone does not say: versions count every change
//! of the mesh, and a node is sent (and applies) only those that change its own view.

use super::observed::Observed;
use super::Registry;
use crate::view::{delta, node_view};

/// Versions of the updates sent to a node that are remembered (more behind is shown as
/// this many).
pub const SENT_KEPT: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewSync {
    /// Never applied a view, or what it applied is older than the history while it is
    /// not connected.
    Unknown,
    InSync,
    /// Updates of its view it has not applied; 0 = not known how many.
    Behind(u32),
}

impl Registry {
    /// Notes that an update of `version` went out to `node` on its Watch stream.
    pub fn sent(&self, node: &str, version: u64) {
        self.observed.update(node, |o| {
            if o.sent.len() == SENT_KEPT {
                o.sent.pop_front();
            }
            o.sent.push_back(version);
        });
    }

    /// Whether node `id`, which applied `applied`, runs its current view.
    pub(super) fn view_sync(&self, id: &str, applied: u64, observed: &Observed) -> ViewSync {
        if applied == 0 {
            return ViewSync::Unknown;
        }
        if observed.connected > 0 {
            // Its stream sends every change of its view: it lacks what went out after the
            // version it applied.
            let behind = observed.sent.iter().filter(|v| **v > applied).count();
            return match u32::try_from(behind).unwrap_or(u32::MAX) {
                0 => ViewSync::InSync,
                n => ViewSync::Behind(n),
            };
        }
        let current = self.current();
        if applied >= current.version {
            return ViewSync::InSync;
        }
        let Some(then) = self.at_version(applied) else { return ViewSync::Unknown };
        match (node_view(&then, id), node_view(&current, id)) {
            (Some(old), Some(new)) if delta(&old, &new, applied).is_none() => ViewSync::InSync,
            (_, Some(_)) => ViewSync::Behind(0),
            (_, None) => ViewSync::Unknown,
        }
    }
}
