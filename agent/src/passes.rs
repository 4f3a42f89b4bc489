//! When the running agent last converged, for `status` (`state_dir/passes.json`). Written
//! after a pass whose outcome differs from the last one written, and otherwise at most
//! every [`RECORD_EVERY`], so an agent busy with events does not write on each pass.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// How stale the recorded time of the last converged pass may get while passes keep
/// converging.
pub const RECORD_EVERY: Duration = Duration::from_secs(10);

const FILE: &str = "passes.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassRecord {
    /// Unix seconds of the last pass that converged; 0 = none yet.
    pub converged_unix: u64,
    /// The last pass failed (later than `converged_unix`): when (Unix seconds) and why.
    pub failed: Option<(u64, String)>,
}

/// The daemon's side: takes each pass's outcome, writes the record when due.
#[derive(Debug)]
pub struct PassLog {
    path: PathBuf,
    record: PassRecord,
    written: Option<Instant>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl PassLog {
    pub fn new(state_dir: &Path) -> PassLog {
        PassLog { path: state_dir.join(FILE), record: load(state_dir).unwrap_or_default(), written: None }
    }

    pub fn converged(&mut self) {
        let changed = self.record.failed.take().is_some() || self.record.converged_unix == 0;
        self.record.converged_unix = now_unix();
        self.save(changed);
    }

    pub fn failed(&mut self, error: &str) {
        let changed = self.record.failed.as_ref().is_none_or(|(_, e)| e != error);
        self.record.failed = Some((now_unix(), error.to_owned()));
        self.save(changed);
    }

    fn save(&mut self, changed: bool) {
        if !changed && self.written.is_some_and(|t| t.elapsed() < RECORD_EVERY) {
            return;
        }
        let bytes = serde_json::to_vec(&self.record).expect("serializable");
        match crate::durable::write_atomic(&self.path, &bytes, 0o600) {
            Ok(()) => self.written = Some(Instant::now()),
            // Only `status` reads it: never a reason to stop converging.
            Err(error) => tracing::warn!(path = %self.path.display(), %error, "cannot record the pass"),
        }
    }
}

/// The record of the agent of `state_dir`; `None` when there is none or it is unreadable.
pub fn load(state_dir: &Path) -> Option<PassRecord> {
    serde_json::from_slice(&std::fs::read(state_dir.join(FILE)).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_recorded_at_once_repeats_at_most_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), None);
        let mut log = PassLog::new(dir.path());
        log.converged();
        let first = load(dir.path()).unwrap();
        assert!(first.converged_unix > 0 && first.failed.is_none());
        // A failure is written at once, with its reason; so is the recovery.
        log.failed("netlink said no");
        let failed = load(dir.path()).unwrap();
        assert_eq!(failed.failed.as_ref().map(|(_, e)| e.as_str()), Some("netlink said no"));
        assert_eq!(failed.converged_unix, first.converged_unix);
        log.converged();
        assert_eq!(load(dir.path()).unwrap().failed, None);
        // Another converged pass right away is not written (the file is not touched).
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        log.converged();
        assert_eq!(load(dir.path()), None);
        // A new agent starts from what was recorded.
        log.failed("again");
        assert_eq!(PassLog::new(dir.path()).record.failed.map(|(_, e)| e), Some("again".to_owned()));
    }
}
