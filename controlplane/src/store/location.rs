//! Where the store lives: `--db` names a SQLite file (a path, or `sqlite:PATH`) or a
//! PostgreSQL database (`postgres://` or `postgresql://` URL).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

#[derive(Clone, PartialEq, Eq)]
pub enum DbLocation {
    Sqlite(PathBuf),
    /// A connection URL; it may hold a password, so it is never printed whole.
    Postgres(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("the database location is empty")]
    Empty,
    #[error("{0:?}: not a database URL this build knows (sqlite:PATH, postgres://...) nor a file path")]
    UnknownScheme(String),
}

impl FromStr for DbLocation {
    type Err = LocationError;

    fn from_str(s: &str) -> Result<DbLocation, LocationError> {
        if s.is_empty() {
            return Err(LocationError::Empty);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(DbLocation::Postgres(s.to_string()));
        }
        if let Some(path) = s.strip_prefix("sqlite://").or_else(|| s.strip_prefix("sqlite:")) {
            return match path {
                "" => Err(LocationError::Empty),
                p => Ok(DbLocation::Sqlite(PathBuf::from(p))),
            };
        }
        // "mysql://" and the like: a scheme is not a file name anyone means.
        match s.split_once("://") {
            Some((scheme, _)) if !scheme.contains('/') => Err(LocationError::UnknownScheme(s.to_string())),
            _ => Ok(DbLocation::Sqlite(PathBuf::from(s))),
        }
    }
}

impl From<PathBuf> for DbLocation {
    fn from(p: PathBuf) -> DbLocation {
        DbLocation::Sqlite(p)
    }
}

impl From<&PathBuf> for DbLocation {
    fn from(p: &PathBuf) -> DbLocation {
        DbLocation::Sqlite(p.clone())
    }
}

impl From<&Path> for DbLocation {
    fn from(p: &Path) -> DbLocation {
        DbLocation::Sqlite(p.to_path_buf())
    }
}

impl DbLocation {
    pub fn engine(&self) -> Engine {
        match self {
            DbLocation::Sqlite(_) => Engine::Sqlite,
            DbLocation::Postgres(_) => Engine::Postgres,
        }
    }

    /// The SQLite file, if it is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            DbLocation::Sqlite(p) => Some(p),
            DbLocation::Postgres(_) => None,
        }
    }
}

/// The file path, or the URL without its password.
impl fmt::Display for DbLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbLocation::Sqlite(p) => write!(f, "{}", p.display()),
            DbLocation::Postgres(url) => f.write_str(&redacted(url)),
        }
    }
}

impl fmt::Debug for DbLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbLocation({self})")
    }
}

impl DbLocation {
    /// Whether the URL holds a password (better kept in `PGPASSWORD` or a `PGPASSFILE`: a
    /// command line is readable by every local user).
    pub fn has_password(&self) -> bool {
        matches!(self, DbLocation::Postgres(url) if split_password(url).is_some())
    }
}

/// The URL around its password, if it has one: (before, after).
fn split_password(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let (userinfo, _) = authority.rsplit_once('@')?;
    let colon = userinfo.find(':')?;
    let start = scheme.len() + 3 + colon + 1;
    Some((&url[..start], &url[start + (userinfo.len() - colon - 1)..]))
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redacted(url: &str) -> String {
    match split_password(url) {
        Some((before, after)) => format!("{before}***{after}"),
        None => url.to_string(),
    }
}

/// The URL sqlx opens a SQLite file by: created if missing, the path percent-encoded (so a
/// `?`, `#` or `%` in it stays part of the name).
pub(super) fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite://");
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'-' | b'~' => url.push(char::from(*b)),
            _ => url.push_str(&format!("%{b:02X}")),
        }
    }
    url.push_str("?mode=rwc");
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_by_scheme_and_never_print_a_password() {
        assert_eq!("/var/lib/wirefence/control.db".parse::<DbLocation>().unwrap().engine(), Engine::Sqlite);
        assert_eq!("sqlite:/tmp/c.db".parse::<DbLocation>().unwrap(), DbLocation::Sqlite("/tmp/c.db".into()));
        assert_eq!("sqlite:///tmp/c.db".parse::<DbLocation>().unwrap(), DbLocation::Sqlite("/tmp/c.db".into()));
        let pg: DbLocation = "postgres://wf:hunter2@db.example:5432/wirefence".parse().unwrap();
        assert_eq!(pg.engine(), Engine::Postgres);
        assert_eq!(pg.to_string(), "postgres://wf:***@db.example:5432/wirefence");
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!(pg.has_password());
        let no_password: DbLocation = "postgres://wf@db.example/wirefence?host=/run/postgresql".parse().unwrap();
        assert!(!no_password.has_password());
        assert_eq!(no_password.to_string(), "postgres://wf@db.example/wirefence?host=/run/postgresql");
        let odd: DbLocation = "postgresql://wf:p%40ss:w@h?sslmode=require".parse().unwrap();
        assert_eq!(odd.to_string(), "postgresql://wf:***@h?sslmode=require");
        assert!(matches!("mysql://x/y".parse::<DbLocation>(), Err(LocationError::UnknownScheme(_))));
        assert!(matches!("".parse::<DbLocation>(), Err(LocationError::Empty)));
        assert!(matches!("sqlite:".parse::<DbLocation>(), Err(LocationError::Empty)));
    }

    #[test]
    fn odd_file_names_survive_the_url() {
        assert_eq!(sqlite_url(Path::new("/tmp/a b?c#d%e.db")), "sqlite:///tmp/a%20b%3Fc%23d%25e.db?mode=rwc");
    }
}
