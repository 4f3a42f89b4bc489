//! What the agent remembers across restarts (which links it owns) and the lock that keeps
//! one agent per state directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::model::{IfName, PublicKey};
use crate::ownership::Owned;
use crate::plan::Op;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a wirefence state file: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("another wirefence agent holds {path} (stop it first)")]
    Locked { path: PathBuf },
    #[error("state directory: {0}")]
    Unsafe(#[from] crate::perms::UnsafePath),
}

pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates the directory (0700), or checks that an existing one is the agent's and
    /// closed to others, and takes its exclusive lock.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        crate::perms::private_dir(dir)?;
        let lock_path = dir.join("agent.lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        if !crate::sys::try_lock_exclusive(&lock) {
            return Err(StateError::Locked { path: lock_path });
        }
        Ok(StateDir { dir: dir.to_owned(), _lock: lock })
    }

    fn owned_path(&self) -> PathBuf {
        self.dir.join("owned.json")
    }

    /// The ownership record (see [`crate::ownership`], the one place that changes it).
    pub(crate) fn owned(&self) -> Result<Owned, StateError> {
        let path = self.owned_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Owned::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Replaces the record atomically and durably ([`crate::durable`]).
    pub(crate) fn set_owned(&self, owned: &Owned) -> Result<(), StateError> {
        write_atomic(&self.owned_path(), &serde_json::to_vec_pretty(owned).expect("serializable"))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    crate::durable::write_atomic(path, bytes, 0o600).map_err(|source| StateError::Io { path: path.to_owned(), source })
}

/// The endpoint this agent last wrote for each peer of one interface
/// (`<state_dir>/<ifname>.endpoints.json`). WireGuard moves a peer's endpoint to wherever
/// its authenticated packets come from; knowing what was written tells a roamed peer (leave
/// it) from a configured endpoint that changed (write it), across restarts too.
#[derive(Debug)]
pub struct EndpointRecord {
    pub ifname: IfName,
    path: PathBuf,
    endpoints: BTreeMap<PublicKey, SocketAddr>,
}

impl EndpointRecord {
    /// Missing: empty. Unreadable or not a record: empty too, with a warning naming the
    /// file; the configured endpoints are then written once more, which is harmless.
    pub fn load(state_dir: &Path, ifname: &IfName) -> EndpointRecord {
        let path = state_dir.join(format!("{ifname}.endpoints.json"));
        let endpoints = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "endpoint record is not valid; starting a new one");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the endpoint record; starting a new one");
                BTreeMap::new()
            }
        };
        EndpointRecord { ifname: ifname.clone(), path, endpoints }
    }

    pub fn endpoints(&self) -> &BTreeMap<PublicKey, SocketAddr> {
        &self.endpoints
    }

    /// Takes in what one applied WireGuard transaction wrote; saves when that changed the
    /// record. `new_device`: the device was created, so nothing older holds.
    pub fn record(&mut self, new_device: bool, ops: &[&Op]) -> Result<(), StateError> {
        // A new device starts from nothing: what was recorded moves out (no copy).
        let before = new_device.then(|| std::mem::take(&mut self.endpoints));
        let mut changed = before.as_ref().is_some_and(|b| !b.is_empty());
        for op in ops {
            match op {
                Op::UpsertPeer(u) => {
                    if let Some(e) = u.endpoint {
                        changed |= self.endpoints.insert(u.key, e) != Some(e);
                    }
                }
                Op::RemovePeer(key) => changed |= self.endpoints.remove(key).is_some(),
                _ => {}
            }
        }
        if !changed || before.as_ref() == Some(&self.endpoints) {
            return Ok(());
        }
        write_atomic(&self.path, &serde_json::to_vec(&self.endpoints).expect("serializable"))
    }

    /// Forgets the record (the interface is gone).
    pub fn remove(state_dir: &Path, ifname: &IfName) -> Result<(), StateError> {
        let path = state_dir.join(format!("{ifname}.endpoints.json"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StateError::Io { path, source: e }),
            _ => Ok(()),
        }
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
        let wf0: IfName = "wf0".parse().unwrap();
        s.set_owned(&Owned { interfaces: [wf0.clone()].into(), ..Default::default() }).unwrap();
        assert_eq!(s.owned().unwrap().interfaces, [wf0].into());
        drop(s);
        StateDir::open(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endpoint_record_follows_applied_peers_and_survives_reload() {
        use crate::plan::PeerUpdate;
        let dir = std::env::temp_dir().join(format!("wf-endpoints-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ifname: IfName = "wf0".parse().unwrap();
        let (a, b) =
            (crate::model::PrivateKey::generate().public_key(), crate::model::PrivateKey::generate().public_key());
        let (ea, eb): (SocketAddr, SocketAddr) =
            ("192.0.2.1:51820".parse().unwrap(), "[2001:db8::2]:1".parse().unwrap());
        let upsert =
            |key, endpoint| Op::UpsertPeer(PeerUpdate { key, endpoint, allowed_ips: None, persistent_keepalive: None });
        let mut r = EndpointRecord::load(&dir, &ifname);
        assert!(r.endpoints().is_empty());
        r.record(true, &[&upsert(a, Some(ea)), &upsert(b, Some(eb))]).unwrap();
        // An update without an endpoint keeps the recorded one.
        r.record(false, &[&upsert(a, None)]).unwrap();
        assert_eq!(EndpointRecord::load(&dir, &ifname).endpoints(), &BTreeMap::from([(a, ea), (b, eb)]));
        r.record(false, &[&Op::RemovePeer(b)]).unwrap();
        assert_eq!(EndpointRecord::load(&dir, &ifname).endpoints(), &BTreeMap::from([(a, ea)]));
        // A new device starts from nothing.
        r.record(true, &[&upsert(b, Some(eb))]).unwrap();
        assert_eq!(EndpointRecord::load(&dir, &ifname).endpoints(), &BTreeMap::from([(b, eb)]));
        // Broken or hostile content reads as empty (the endpoints are written again).
        for broken in [&b"{"[..], b"[1]", br#"{"not a key": "192.0.2.1:1"}"#, b"\xff"] {
            std::fs::write(dir.join("wf0.endpoints.json"), broken).unwrap();
            assert!(EndpointRecord::load(&dir, &ifname).endpoints().is_empty(), "{broken:?}");
        }
        EndpointRecord::remove(&dir, &ifname).unwrap();
        EndpointRecord::remove(&dir, &ifname).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
