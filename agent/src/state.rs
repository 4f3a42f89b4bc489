//! What the agent remembers across restarts (which links it owns) and the lock that keeps
//! one agent per state directory.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::IfName;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a wirefence state file: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("another wirefence agent holds {path} (stop it first)")]
    Locked { path: PathBuf },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Owned {
    pub interfaces: BTreeSet<String>,
    /// rtnetlink protocol number the owned routes and rules carry.
    #[serde(default)]
    pub protocol: Option<u8>,
    /// Backend that created the links ("kernel" or "userspace").
    #[serde(default)]
    pub backend: Option<String>,
    /// bpffs directory holding the policy programs and maps of the links.
    #[serde(default)]
    pub pin_root: Option<std::path::PathBuf>,
}

impl Owned {
    pub fn ifnames(&self) -> Vec<IfName> {
        self.interfaces.iter().filter_map(|s| s.parse().ok()).collect()
    }
}

pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates the directory (0700) and takes its exclusive lock.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let lock_path = dir.join("agent.lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StateError::Locked { path: lock_path });
        }
        Ok(StateDir { dir: dir.to_owned(), _lock: lock })
    }

    fn owned_path(&self) -> PathBuf {
        self.dir.join("owned.json")
    }

    pub fn owned(&self) -> Result<Owned, StateError> {
        let path = self.owned_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Owned::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Replaces the record atomically (write, fsync, rename).
    pub fn set_owned(&self, owned: &Owned) -> Result<(), StateError> {
        let path = self.owned_path();
        let tmp = self.dir.join("owned.json.tmp");
        let io = |source| StateError::Io { path: tmp.clone(), source };
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(owned).expect("serializable")).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|source| StateError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_record_roundtrips() {
        let dir = std::env::temp_dir().join(format!("wf-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = StateDir::open(&dir).unwrap();
        assert!(matches!(StateDir::open(&dir), Err(StateError::Locked { .. })));
        assert!(s.owned().unwrap().interfaces.is_empty());
        s.set_owned(&Owned { interfaces: ["wf0".to_string()].into(), ..Default::default() }).unwrap();
        assert_eq!(s.owned().unwrap().ifnames(), vec!["wf0".parse::<IfName>().unwrap()]);
        drop(s);
        StateDir::open(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
