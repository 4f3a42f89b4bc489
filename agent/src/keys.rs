//! The node's private key on disk: created here with mode 0600, read back, never logged.

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
}
