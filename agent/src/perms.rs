//! Local users must not be able to steer the agent through its files: the state directory,
//! the private key, the control-plane credential and enrollment key, and the bpffs pin
//! directories must belong to the agent's user (for root also the packaged service user) and
//! be closed to group and others. A path
//! that is not is refused (never silently fixed: someone else may already have written
//! into it), with an error naming the path, its owner and its mode.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UnsafePath {
    #[error("{path}: owned by uid {owner}, not by the agent's uid {uid}; refusing to use it (chown it or remove it)")]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error("{path}: mode {mode:04o} lets group or others {access} it; refusing to use it (chmod {fix:o} it)")]
    Mode { path: PathBuf, mode: u32, access: &'static str, fix: u32 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What a path holds, which decides the bits group and others must not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Private {
    /// A directory of agent state or pins: nobody else may create, rename or unlink in it.
    Dir,
    /// A directory others may write in only with the sticky bit (as a bpffs root, 1777):
    /// they cannot then rename or unlink what the agent made in it.
    StickyDir,
    /// Key material: nobody else may read or write it.
    Secret,
}

/// Checks `path` (following symlinks: what is read is the target).
pub fn check(path: &Path, what: Private) -> Result<(), UnsafePath> {
    let meta = std::fs::metadata(path).map_err(|source| UnsafePath::Io { path: path.to_owned(), source })?;
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid && !(uid == 0 && Some(meta.uid()) == service_uid()) {
        return Err(UnsafePath::Owner { path: path.to_owned(), owner: meta.uid(), uid });
    }
    let mode = meta.mode() & 0o7777;
    let (bad, access, fix) = match what {
        Private::Dir => (mode & 0o022 != 0, "write in", 0o700),
        Private::StickyDir => (mode & 0o022 != 0 && mode & 0o1000 == 0, "rename or unlink in", 0o700),
        Private::Secret => (mode & 0o077 != 0, "read or write", 0o600),
    };
    if bad {
        return Err(UnsafePath::Mode { path: path.to_owned(), mode, access, fix });
    }
    Ok(())
}

/// The packaged unit runs the agent as this system user; root (an operator's `status`,
/// `down`) may use its files too: nobody but root can act as that account, and it could
/// reprogram the data plane with its capabilities anyway.
pub const SERVICE_USER: &str = "wirefence";

fn service_uid() -> Option<u32> {
    nix::unistd::User::from_name(SERVICE_USER).ok().flatten().map(|u| u.uid.as_raw())
}

/// As [`check`]; a missing path is fine (nothing to trust or distrust yet).
pub fn check_if_exists(path: &Path, what: Private) -> Result<(), UnsafePath> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => check(path, what),
    }
}

/// Creates `dir` (and missing parents) 0700, or checks the existing one as
/// [`Private::Dir`] and then closes it to group and others (it may be an older agent's
/// 0755, which nobody else could write in).
pub fn private_dir(dir: &Path) -> Result<(), UnsafePath> {
    let io = |source| UnsafePath::Io { path: dir.to_owned(), source };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            return Ok(());
        }
        Err(e) => return Err(io(e)),
    }
    check(dir, Private::Dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn foreign_owners_and_open_modes_are_refused_naming_path_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        // An older agent's 0755 directory is ours and closed to writers: kept, tightened.
        chmod(&d, 0o755);
        private_dir(&d).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);

        chmod(&d, 0o770);
        let e = private_dir(&d).unwrap_err().to_string();
        assert!(e.contains(&d.display().to_string()) && e.contains("0770") && e.contains("group or others"), "{e}");
        chmod(&d, 0o1777);
        assert!(check(&d, Private::Dir).is_err());
        check(&d, Private::StickyDir).expect("a sticky directory keeps what we made in it");
        chmod(&d, 0o777);
        assert!(check(&d, Private::StickyDir).is_err());

        let key = dir.path().join("private.key");
        std::fs::write(&key, "k").unwrap();
        chmod(&key, 0o600);
        check(&key, Private::Secret).unwrap();
        chmod(&key, 0o640);
        assert!(check(&key, Private::Secret).unwrap_err().to_string().contains("0640"));

        // Needs root (as the agent's tests do): chown to another user.
        chmod(&key, 0o600);
        std::os::unix::fs::chown(&key, Some(65534), None).expect("chown needs root");
        let e = check(&key, Private::Secret).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534") && e.contains("private.key"), "{e}");
        check_if_exists(&dir.path().join("missing"), Private::Secret).unwrap();
    }
}
