//! One `serve` per SQLite file. Servers of one database learn each other's changes from the
//! change log (see `registry::follow`); on SQLite a second server would also contend for
//! the single writer and share one disk, which buys nothing, so it is refused (replicas
//! are for PostgreSQL). The lock is an
//! exclusive `flock` on `<db>.lock`, held for the life of the process: the kernel drops it
//! when the process dies, so a crash never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// Held while the server runs; dropping it releases the database.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
    path: PathBuf,
}

impl DbLock {
    /// The lock file beside `db`.
    pub fn path_for(db: &Path) -> PathBuf {
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes the lock without waiting, and writes our pid into the file so a refusal can
    /// name the holder.
    pub fn acquire(db: &Path) -> Result<DbLock, Error> {
        let path = Self::path_for(db);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(dir)
                .map_err(Error::io("create directory", dir))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io("open lock file", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim().parse::<u32>().ok();
                return Err(Error::DatabaseInUse { db: db.to_owned(), lock: path, pid });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &path)(e)),
        }
        let write_pid = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())
        };
        write_pid(&mut file).map_err(Error::io("write lock file", &path))?;
        Ok(DbLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("control.db");
        let held = DbLock::acquire(&db).unwrap();
        assert_eq!(held.path(), dir.path().join("control.db.lock"));
        // flock locks belong to the open file description: a second open in this process
        // conflicts just as another process would.
        let err = DbLock::acquire(&db).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::DatabaseInUse { pid: Some(p), .. } if p == std::process::id()), "{text}");
        assert!(text.contains("control.db.lock") && text.contains(&std::process::id().to_string()), "{text}");
        drop(held);
        DbLock::acquire(&db).expect("free again once the holder is gone");
    }
}
