//! The one way the agent replaces a file in its state directory: write a temporary file
//! beside it, fsync it, rename it over the target, fsync the directory. Without the last
//! step a power loss after the rename can bring back the old file (or none): the rename
//! lives in the directory, which the file's own fsync does not flush.
//!
//! Every writer of agent state (credential, view, status, ownership record, endpoint
//! record, build record, counter slots, deny log) goes through [`write_atomic`]; a test
//! below keeps it that way.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The directory holding `path` ("." for a bare name).
fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Flushes a directory's entries (created, renamed, removed files) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes`, atomically and durably; the file gets `mode` (the
/// temporary file is created with it, so the content is never readable by others). On an
/// error the target is unchanged and no temporary file stays behind.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_path(path);
    // A temporary file left by a crash may have another mode: start from nothing.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent(path))
}

/// Renames `from` to `to` (same directory) durably.
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(parent(to))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent(path).join(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_with_its_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned.json");
        // A crash left a temporary file readable by everyone.
        std::fs::write(temp_path(&path), b"stale").unwrap();
        std::fs::set_permissions(temp_path(&path), std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["owned.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("view.pb");
        write_atomic(&path, b"old", 0o600).unwrap();
        // The target is a non-empty directory now: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomic(&blocked, b"new", 0o600).is_err());
        assert!(!temp_path(&blocked).exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    /// Every file the agent replaces goes through this module (so through the directory
    /// fsync, which no test can observe directly): no other code renames files or writes
    /// whole files in place.
    #[test]
    fn every_state_writer_goes_through_this_module() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                // takeover.rs renames pins on bpffs, which lives in memory: nothing to sync.
                // flowlog.rs rotates a log, which is no state the agent reads back.
                if path.extension().is_none_or(|e| e != "rs")
                    || path.ends_with("durable.rs")
                    || path.ends_with("enforce/takeover.rs")
                    || path.ends_with("enforce/flowlog.rs")
                {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Tests write fixtures as they like.
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                for (n, line) in code.lines().enumerate() {
                    if ["fs::rename(", "fs::write("].iter().any(|p| line.contains(p)) {
                        offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "write state through durable::write_atomic:\n{}", offenders.join("\n"));
    }
}
