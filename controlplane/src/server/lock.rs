//! One `serve` per database. Two servers on one database would each publish only their
//! own changes to their own agents (a policy applied through one never reaches the other's
//! agents while its `policy show` displays it), so the second is refused. SQLite: an
//! exclusive `flock` on `<db>.lock`, held for the life of the process: the kernel drops it
//! when the process dies, so a crash never leaves a stale lock behind. PostgreSQL: a
//! session advisory lock on a connection of its own, which the server drops when that
//! connection ends, for whatever reason.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sqlx::Connection;

use crate::store::DbLocation;
use crate::Error;

/// The advisory lock key of a served database ("WF" and 1).
const PG_LOCK_KEY: i64 = 0x5746_0001;

/// Held while the server runs; dropping it releases the database.
#[derive(Debug)]
pub enum DbLock {
    File(FileLock),
    Postgres(sqlx::AnyConnection),
}

impl DbLock {
    pub async fn acquire(db: &DbLocation) -> Result<DbLock, Error> {
        match db {
            DbLocation::Sqlite(path) => Ok(DbLock::File(FileLock::acquire(path)?)),
            DbLocation::Postgres(url) => {
                sqlx::any::install_default_drivers();
                let store_err = |e: sqlx::Error| Error::Store(e.into());
                let mut conn = sqlx::AnyConnection::connect(url).await.map_err(store_err)?;
                let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(PG_LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(store_err)?;
                match held {
                    true => Ok(DbLock::Postgres(conn)),
                    false => Err(Error::DatabaseServed { db: db.to_string() }),
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// The lock file beside `db`.
    pub fn path_for(db: &Path) -> PathBuf {
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes the lock without waiting, and writes our pid into the file so a refusal can
    /// name the holder.
    pub fn acquire(db: &Path) -> Result<FileLock, Error> {
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
        Ok(FileLock { _file: file, path })
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
        let held = FileLock::acquire(&db).unwrap();
        assert_eq!(held.path(), dir.path().join("control.db.lock"));
        // flock locks belong to the open file description: a second open in this process
        // conflicts just as another process would.
        let err = FileLock::acquire(&db).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::DatabaseInUse { pid: Some(p), .. } if p == std::process::id()), "{text}");
        assert!(text.contains("control.db.lock") && text.contains(&std::process::id().to_string()), "{text}");
        drop(held);
        FileLock::acquire(&db).expect("free again once the holder is gone");
    }
}
