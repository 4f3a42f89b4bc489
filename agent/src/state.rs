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
    #[error("{} holds {}: stop it first (systemctl stop wirefence-agent{})", holder(.pid), .path.display(), kill(.pid))]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error("state directory: {0}")]
    Unsafe(#[from] crate::perms::UnsafePath),
}

/// How long [`StateDir::open`] waits for a lock whose taker is gone.
const ORPHANED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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
        let deadline = std::time::Instant::now() + ORPHANED_LOCK_WAIT;
        while !crate::sys::try_lock_exclusive(&lock) {
            let pid = lock_holder(dir);
            // The kernel names the process that took the lock. If that one is gone, the
            // descriptor lives on in a process it was starting when it died (a child
            // between fork and exec), which lets go in a moment: a restart right after a
            // kill waits for that instead of failing. No holder listed: the lock was let go
            // between the two looks, so the next try takes it.
            let gone = pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists());
            if !gone || std::time::Instant::now() >= deadline {
                return Err(StateError::Locked { path: lock_path, pid });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Who holds it, for `status` and for the next agent refused (the kernel's lock
        // table is what counts; the number only names the process).
        let mut lock = lock;
        let pid = format!("{}\n", std::process::id());
        lock.set_len(0).and_then(|()| std::io::Write::write_all(&mut lock, pid.as_bytes())).map_err(io(&lock_path))?;
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

fn holder(pid: &Option<u32>) -> String {
    pid.map_or_else(|| "another wirefence agent".to_owned(), |p| format!("the wirefence agent with pid {p}"))
}

fn kill(pid: &Option<u32>) -> String {
    pid.map_or_else(String::new, |p| format!(" or kill {p}"))
}

/// The process holding the agent lock of `state_dir` (a running agent), from the
/// kernel's lock table (`/proc/locks`): the pid written in the file names the holder only
/// while the lock is held, and taking the lock to test it could refuse an agent starting
/// at that moment.
pub fn lock_holder(state_dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(state_dir.join("agent.lock")).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    flock_holder(&locks, libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino())
}

/// The pid of a process holding an exclusive `flock` on inode `ino` of device
/// `major:minor`, as `/proc/locks` lists it (`1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<ino>
/// 0 EOF`, device numbers in hex; waiting requests are marked `->` and skipped).
fn flock_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, "WRITE", pid, file, ..] = f.as_slice() else { return None };
        let mut parts = file.split(':');
        let (maj, min, i) = (parts.next()?, parts.next()?, parts.next()?);
        let same = u32::from_str_radix(maj, 16).ok()? == major
            && u32::from_str_radix(min, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        same.then(|| pid.parse().ok())?
    })
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
    fn a_lock_outliving_its_taker_is_waited_for() {
        let dir = std::env::temp_dir().join(format!("wf-state-orphan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::perms::private_dir(&dir).unwrap();
        // A shell takes the lock and exits; a child it started holds the descriptor on for
        // a moment, as a process the agent was starting when it was killed would.
        let lock = dir.join("agent.lock");
        let script = format!("exec 9>>'{}'; flock -x 9; sleep 0.5 & exit 0", lock.display());
        let status = std::process::Command::new("sh").args(["-c", &script]).status().unwrap();
        assert!(status.success());
        assert!(lock_holder(&dir).is_some(), "the lock is held after its taker exited");
        let started = std::time::Instant::now();
        let s = StateDir::open(&dir).expect("taken once the orphaned descriptor is closed");
        assert!(started.elapsed() < ORPHANED_LOCK_WAIT, "{:?}", started.elapsed());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lock_is_exclusive_and_record_roundtrips() {
        let dir = std::env::temp_dir().join(format!("wf-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(lock_holder(&dir), None, "no lock file yet");
        let s = StateDir::open(&dir).unwrap();
        // The second open is refused naming this process, as the kernel's lock table says.
        let me = std::process::id();
        match StateDir::open(&dir) {
            Err(e @ StateError::Locked { pid: Some(pid), .. }) if pid == me => {
                assert!(e.to_string().contains(&format!("pid {me}")), "{e}")
            }
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(std::fs::read_to_string(dir.join("agent.lock")).unwrap(), format!("{me}\n"));
        assert!(s.owned().unwrap().interfaces.is_empty());
        let wf0: IfName = "wf0".parse().unwrap();
        s.set_owned(&Owned { interfaces: [wf0.clone()].into(), ..Default::default() }).unwrap();
        assert_eq!(s.owned().unwrap().interfaces, [wf0].into());
        drop(s);
        assert_eq!(lock_holder(&dir), None, "released with the StateDir");
        StateDir::open(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_lock_holder_is_read_off_the_kernels_lock_table() {
        let table = "1: POSIX  ADVISORY  WRITE 77 fd:01:1234 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 88 fd:01:1234 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 99 00:2a:1234 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 100 fd:01:1234 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n";
        assert_eq!(flock_holder(table, 0xfd, 1, 1234), Some(4242));
        assert_eq!(flock_holder(table, 0, 0x2a, 1234), Some(99));
        assert_eq!(flock_holder(table, 0xfd, 1, 999), None);
        assert_eq!(flock_holder("garbage\n1: FLOCK\n", 0xfd, 1, 1234), None);
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
