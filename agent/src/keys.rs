//! The node's private key on disk: created here with mode 0600, read back, never logged.
//!
//! A key rotation (control mode) writes the next key beside it, `<key file>.next`, before
//! the control plane hears of it, and renames it over the key file once the control plane
//! took it ([`crate::control::rotation`]); a crash at any point leaves either file usable.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::model::{InvalidKey, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("private key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("private key file {path}: {source}")]
    Invalid { path: PathBuf, source: InvalidKey },
    #[error("private key file {path} exists already; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("private key file: {0}")]
    Unsafe(#[from] crate::perms::UnsafePath),
}

/// Writes a new key to `path` (which must not exist), readable by the owner only.
pub fn generate(path: &Path) -> Result<PrivateKey, KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let key = PrivateKey::generate();
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(
        |source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_owned() },
            _ => io(source),
        },
    )?;
    writeln!(file, "{}", key.to_base64()).and_then(|_| file.sync_all()).map_err(io)?;
    // The new directory entry must reach the disk too, or a power loss loses the key that
    // the control plane already knows by its public half.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::durable::sync_dir(dir).map_err(io)?;
    Ok(key)
}

pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    // Checked before reading: a key others can read is no secret, one they can write or
    // own is not ours.
    crate::perms::check(path, crate::perms::Private::Secret)?;
    let text = std::fs::read_to_string(path).map_err(io)?;
    PrivateKey::from_base64(&text).map_err(|source| KeyError::Invalid { path: path.to_owned(), source })
}

/// Loads the key, creating it first when the file does not exist.
pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
    match generate(path) {
        Ok(key) => {
            tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new private key");
            Ok(key)
        }
        Err(KeyError::Exists { .. }) => load(path),
        Err(e) => Err(e),
    }
}

/// Where the next key waits during a rotation.
pub fn next_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".next");
    path.with_file_name(name)
}

/// The next key of a rotation in progress, if there is one. One that does not parse never
/// reached the control plane (announcing it needs it): it is set aside as `.next.bad`.
pub fn load_next(path: &Path) -> Result<Option<PrivateKey>, KeyError> {
    let next = next_path(path);
    match std::fs::symlink_metadata(&next) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => match load(&next) {
            Err(KeyError::Invalid { source, .. }) => {
                tracing::warn!(path = %next.display(), error = %source, "setting an unreadable next key aside");
                let mut bad = next.clone().into_os_string();
                bad.push(".bad");
                crate::durable::rename(&next, Path::new(&bad)).map_err(|source| KeyError::Io { path: next, source })?;
                Ok(None)
            }
            other => other.map(Some),
        },
    }
}

/// The next key: the one a rotation in progress has, or a new one (written atomically, so
/// a crash never leaves half a key).
pub fn next_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
    if let Some(next) = load_next(path)? {
        return Ok(next);
    }
    let next = next_path(path);
    let key = PrivateKey::generate();
    crate::durable::write_atomic(&next, format!("{}\n", key.to_base64()).as_bytes(), 0o600)
        .map_err(|source| KeyError::Io { path: next, source })?;
    Ok(key)
}

/// Makes the next key the key (atomically and durably); `expected` guards against a next
/// key replaced meanwhile.
pub fn promote(path: &Path, expected: &PrivateKey) -> Result<(), KeyError> {
    let next = next_path(path);
    if load(&next)? != *expected {
        let source = std::io::Error::other("it changed during the rotation");
        return Err(KeyError::Io { path: next, source });
    }
    crate::durable::rename(&next, path).map_err(|source| KeyError::Io { path: path.to_owned(), source })
}

/// Finishes a rotation a crash interrupted: when the control-plane credential was already
/// issued for the next key (saved only once the control plane took it), that key is the key.
pub fn settle(path: &Path, credential_key: Option<&crate::model::PublicKey>) -> Result<(), KeyError> {
    let (Some(next), Some(cred)) = (load_next(path)?, credential_key) else { return Ok(()) };
    if next.public_key() == *cred {
        promote(path, &next)?;
        tracing::info!(public_key = %cred, "finished an interrupted key rotation");
    }
    Ok(())
}

/// How long ago the key file was written (its age as a key).
pub fn age(path: &Path) -> Option<std::time::Duration> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()?.elapsed().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_key_is_0600_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("wf-keys-{}", std::process::id()));
        let path = dir.join("k");
        let _ = std::fs::remove_dir_all(&dir);
        let key = generate(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load(&path).unwrap(), key);
        assert!(matches!(generate(&path), Err(KeyError::Exists { .. })));
        assert_eq!(load_or_generate(&path).unwrap(), key);
        // Readable by others: no longer a secret, refused (not merely warned about).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()) && e.contains("0644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()) && !e.contains("garbage"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rotation_keeps_a_usable_key_at_every_step() {
        let dir = std::env::temp_dir().join(format!("wf-keys-rot-{}", std::process::id()));
        let path = dir.join("k");
        let _ = std::fs::remove_dir_all(&dir);
        let old = generate(&path).unwrap();
        assert_eq!(load_next(&path).unwrap(), None);
        let next = next_or_generate(&path).unwrap();
        assert_eq!(next_path(&path), dir.join("k.next"));
        // Asked again (an interrupted rotation): the same next key.
        assert_eq!(next_or_generate(&path).unwrap(), next);
        assert_eq!(std::fs::metadata(next_path(&path)).unwrap().permissions().mode() & 0o777, 0o600);
        // Not taken by the control plane yet (credential of the old key): nothing moves.
        settle(&path, Some(&old.public_key())).unwrap();
        settle(&path, None).unwrap();
        assert_eq!((load(&path).unwrap(), load_next(&path).unwrap()), (old.clone(), Some(next.clone())));
        // Another key than the one expected is not promoted.
        assert!(promote(&path, &old).is_err());
        // Taken (the credential names the next key): the next key becomes the key.
        settle(&path, Some(&next.public_key())).unwrap();
        assert_eq!((load(&path).unwrap(), load_next(&path).unwrap()), (next, None));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(age(&path).unwrap() < std::time::Duration::from_secs(60));
        // A next key that does not parse (never announced) is set aside, not fatal.
        crate::durable::write_atomic(&next_path(&path), b"", 0o600).unwrap();
        assert_eq!(load_next(&path).unwrap(), None);
        assert!(dir.join("k.next.bad").exists() && !next_path(&path).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
