//! What the agent owns across restarts, `state_dir/owned.json`: its tunnel links (by name),
//! the backend that made them, the protocol number its routes and rules carry, and where its
//! policy pins live. Every transition writes the record before the kernel changes, so a
//! crash in between leaves a record that over-approximates (the next start or `down`
//! removes the rest), never one that forgets something.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::IfName;
use crate::state::{StateDir, StateError};

/// Which WireGuard implementation made the links.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        }
    }
}

/// The record as stored (field names and values as earlier builds wrote them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Owned {
    pub interfaces: BTreeSet<IfName>,
    /// rtnetlink protocol number the owned routes and rules carry.
    #[serde(default)]
    pub protocol: Option<u8>,
    #[serde(default)]
    pub backend: Option<BackendKind>,
    /// bpffs directory holding the policy programs and maps of the links.
    #[serde(default)]
    pub pin_root: Option<PathBuf>,
}

/// What this run claims at start.
#[derive(Clone, Debug)]
pub struct Claim {
    pub ifname: IfName,
    pub backend: BackendKind,
    pub protocol: u8,
    pub pin_root: Option<PathBuf>,
}

/// What an earlier run owned that this one does not: to be removed from the kernel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Leftovers {
    /// Links of other names, and this name's link when another backend made it.
    pub links: Vec<IfName>,
    /// Routes and rules carrying this protocol number instead of the claimed one.
    pub protocol: Option<u8>,
}

/// The ownership record of one state directory, held under its lock (the `StateDir`).
pub struct Ownership {
    dir: StateDir,
    record: Owned,
}

impl Ownership {
    pub fn open(dir: StateDir) -> Result<Self, StateError> {
        Ok(Ownership { record: dir.owned()?, dir })
    }

    pub fn record(&self) -> &Owned {
        &self.record
    }

    fn save(&self) -> Result<(), StateError> {
        self.dir.set_owned(&self.record)
    }

    /// Start: takes `claim`, with `cleanup` removing what an earlier run owned and this one
    /// does not. The record covers both while `cleanup` runs, and only the claim after.
    pub async fn adopt<F, Fut, E>(&mut self, claim: &Claim, cleanup: F) -> Result<(), E>
    where
        F: FnOnce(Leftovers) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: From<StateError>,
    {
        let before = &self.record;
        let mut links: Vec<IfName> = before.interfaces.iter().filter(|n| **n != claim.ifname).cloned().collect();
        if before.backend.is_some_and(|b| b != claim.backend) && before.interfaces.contains(&claim.ifname) {
            links.push(claim.ifname.clone());
        }
        let leftovers = Leftovers { links, protocol: before.protocol.filter(|p| *p != claim.protocol) };
        // Pins of an earlier root are still found there until the config names another.
        let pin_root = claim.pin_root.clone().or(before.pin_root.clone());
        let mut covering = before.interfaces.clone();
        covering.insert(claim.ifname.clone());
        // The old protocol's routes stay owned under it until they are gone: keep it
        // recorded when a crash could interrupt their removal.
        let protocol = leftovers.protocol.or(Some(claim.protocol));
        self.record = Owned { interfaces: covering, protocol, backend: Some(claim.backend), pin_root };
        self.save()?;
        cleanup(leftovers).await?;
        self.record.interfaces = [claim.ifname.clone()].into();
        self.record.protocol = Some(claim.protocol);
        self.save()?;
        Ok(())
    }

    /// The interface is renamed from `old` to `new`; `remove_old` deletes the old link.
    pub async fn rename<Fut, E>(&mut self, old: &IfName, new: &IfName, remove_old: Fut) -> Result<(), E>
    where
        Fut: Future<Output = Result<(), E>>,
        E: From<StateError>,
    {
        self.record.interfaces.insert(new.clone());
        self.save()?;
        remove_old.await?;
        self.record.interfaces.remove(old);
        self.save()?;
        Ok(())
    }

    /// `down`: `also` (the configured interface) joins the record first; `teardown` then
    /// removes everything the record names, and the record is emptied once it succeeded.
    pub async fn release<F, Fut, E>(&mut self, also: &IfName, teardown: F) -> Result<(), E>
    where
        F: FnOnce(Owned) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: From<StateError>,
    {
        if self.record.interfaces.insert(also.clone()) {
            self.save()?;
        }
        teardown(self.record.clone()).await?;
        self.record.interfaces.clear();
        self.record.pin_root = None;
        self.save()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> IfName {
        s.parse().unwrap()
    }

    fn dir(tag: &str) -> (PathBuf, StateDir) {
        let path = std::env::temp_dir().join(format!("wf-owned-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        let dir = StateDir::open(&path).unwrap();
        (path, dir)
    }

    /// The record as stored right now.
    fn stored(path: &std::path::Path) -> Owned {
        serde_json::from_slice(&std::fs::read(path.join("owned.json")).unwrap()).unwrap()
    }

    fn claim(ifname: &str, backend: BackendKind, protocol: u8) -> Claim {
        Claim { ifname: name(ifname), backend, protocol, pin_root: None }
    }

    #[test]
    fn transitions_write_the_record_before_the_kernel_changes() {
        let (path, state) = dir("transitions");
        let mut own = Ownership::open(state).unwrap();
        let p = path.clone();
        let state = move || stored(&p);
        futures::executor::block_on(async {
            // First start: nothing left over.
            own.adopt(&claim("wf0", BackendKind::Userspace, 87), |left| async move {
                assert_eq!(left, Leftovers::default());
                Ok::<_, StateError>(())
            })
            .await
            .unwrap();
            // Restart under another name, backend and protocol: during the cleanup the record
            // still names the old link and protocol, after it only the new ones.
            own.adopt(&claim("wf1", BackendKind::Kernel, 99), |left| {
                let during = state();
                async move {
                    assert_eq!(left.links, vec![name("wf0")]);
                    assert_eq!(left.protocol, Some(87));
                    assert_eq!(during.interfaces, [name("wf0"), name("wf1")].into());
                    assert_eq!(during.protocol, Some(87));
                    Ok::<_, StateError>(())
                }
            })
            .await
            .unwrap();
            let after = state();
            assert_eq!(
                (after.interfaces, after.protocol, after.backend),
                ([name("wf1")].into(), Some(99), Some(BackendKind::Kernel))
            );
            // Same name, other backend: the link itself is a leftover.
            own.adopt(&claim("wf1", BackendKind::Userspace, 99), |left| async move {
                assert_eq!(left.links, vec![name("wf1")]);
                Ok::<_, StateError>(())
            })
            .await
            .unwrap();
            // A failed cleanup leaves the covering record.
            let failed = own
                .adopt(&claim("wf2", BackendKind::Userspace, 99), |_| async {
                    Err(StateError::Locked { path: "x".into(), pid: None })
                })
                .await;
            assert!(failed.is_err());
            assert_eq!(state().interfaces, [name("wf1"), name("wf2")].into());
            // Rename: both while the old link goes, then the new one.
            let during = async {
                assert_eq!(state().interfaces, [name("wf1"), name("wf2"), name("wf3")].into());
                Ok::<_, StateError>(())
            };
            own.rename(&name("wf2"), &name("wf3"), during).await.unwrap();
            assert_eq!(state().interfaces, [name("wf1"), name("wf3")].into());
            // Release: the configured name joins the record before the teardown sees it.
            own.release(&name("wf9"), |owned| async move {
                assert!(owned.interfaces.contains(&name("wf9")));
                Ok::<_, StateError>(())
            })
            .await
            .unwrap();
            assert!(state().interfaces.is_empty());
        });
        drop(own);
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn records_of_earlier_builds_read_and_bad_ones_are_refused() {
        let (path, state) = dir("compat");
        let file = path.join("owned.json");
        std::fs::write(
            &file,
            br#"{"interfaces":["wf0"],"protocol":87,"backend":"kernel","pin_root":"/sys/fs/bpf/wirefence"}"#,
        )
        .unwrap();
        let o = state.owned().unwrap();
        assert_eq!(o.backend, Some(BackendKind::Kernel));
        assert_eq!(o.interfaces, [name("wf0")].into());
        std::fs::write(&file, br#"{"interfaces":["wf0"]}"#).unwrap();
        assert_eq!(state.owned().unwrap().backend, None);
        for bad in [&br#"{"interfaces":["a/b"]}"#[..], br#"{"interfaces":[],"backend":"boringtun"}"#] {
            std::fs::write(&file, bad).unwrap();
            let e = state.owned().unwrap_err().to_string();
            assert!(e.contains("owned.json") && e.contains("not a wirefence state file"), "{e}");
        }
        drop(state);
        std::fs::remove_dir_all(&path).unwrap();
    }
}
