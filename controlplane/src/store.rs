//! SQLite persistence. Every versioned change runs in one transaction that also bumps the
//! persisted version counter, so versions stay monotonic across restarts. The database
//! file is created 0600 (SQLite gives its WAL files the same mode). Commits are
//! `synchronous=FULL`: changes are rare, and a committed change (a removed node, a new
//! policy) must survive a power loss, not only a crash of the process.
//!
//! Each database has an incarnation: a random id made when the database is created (or
//! first opened by a version that knows it). Versions count within one incarnation only; a
//! recreated or restored database starts a new one, so agents can tell their version
//! belongs to another history.

use std::fs::{self, OpenOptions, Permissions};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::credentials::{CredentialIndex, Entry};
use crate::model::{NodeRec, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("corrupt row: node {id}: {field}")]
    Corrupt { id: String, field: &'static str },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT OR IGNORE INTO counter (id, version) VALUES (1, 1);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    public_key BLOB NOT NULL,
    addresses TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    routes TEXT NOT NULL,
    tags TEXT NOT NULL,
    credential_hash BLOB NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0,
    applied_version INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_seen INTEGER NOT NULL DEFAULT 0,
    granted_routes TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS enrollment_keys (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    single_use INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    expires INTEGER NOT NULL,
    tags TEXT NOT NULL,
    routes TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS incarnation (id INTEGER PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    file_name TEXT NOT NULL,
    source TEXT NOT NULL,
    version INTEGER NOT NULL
);
-- Peer statistics and last_seen are observations kept in memory now (registry::observed);
-- nodes.last_seen stays for old databases but is no longer written.
DROP TABLE IF EXISTS peer_stats;
";

/// Columns added after the first schema: (table, column, definition, statement run once
/// after adding it). Nodes enrolled before route grants existed keep the routes they had.
const MIGRATIONS: &[(&str, &str, &str, &str)] = &[
    ("nodes", "granted_routes", "TEXT NOT NULL DEFAULT '[]'", "UPDATE nodes SET granted_routes = routes"),
    ("enrollment_keys", "routes", "TEXT NOT NULL DEFAULT '[]'", ""),
    // Use counts replace the single-use flag; old single-use keys allow one use.
    ("enrollment_keys", "uses", "INTEGER NOT NULL DEFAULT 0", "UPDATE enrollment_keys SET uses = used"),
    (
        "enrollment_keys",
        "max_uses",
        "INTEGER NOT NULL DEFAULT 0",
        "UPDATE enrollment_keys SET max_uses = 1 WHERE single_use = 1",
    ),
    ("enrollment_keys", "revoked", "INTEGER NOT NULL DEFAULT 0", ""),
    ("enrollment_keys", "hostname", "TEXT NOT NULL DEFAULT ''", ""),
    ("enrollment_keys", "created", "INTEGER NOT NULL DEFAULT 0", ""),
    // Live nodes enrolled before names were bound keep the names the policy knows them by.
    ("nodes", "bound", "INTEGER NOT NULL DEFAULT 0", "UPDATE nodes SET bound = 1 WHERE removed = 0"),
    ("nodes", "pending_credential_hash", "BLOB", ""),
    ("nodes", "rotate_requested", "INTEGER NOT NULL DEFAULT 0", ""),
    // The hostname the agent registers with, apart from the one an admin may set.
    ("nodes", "claimed_hostname", "TEXT NOT NULL DEFAULT ''", "UPDATE nodes SET claimed_hostname = hostname"),
    // A key announced with RotateKey, not in views until the node registers with it.
    ("nodes", "pending_public_key", "BLOB", ""),
    // A re-enrollment key: the node (id) whose identity it gives to a new key pair.
    ("enrollment_keys", "node", "TEXT NOT NULL DEFAULT ''", ""),
];

/// After the migrations: a bound name belongs to one node (live or removed) at a time.
const INDEXES: &str = "CREATE UNIQUE INDEX IF NOT EXISTS bound_names ON nodes (hostname) WHERE bound = 1;";

/// A node as stored (live or removed), with its reported apply status.
#[derive(Clone, Debug)]
pub struct NodeRow {
    pub rec: NodeRec,
    pub removed: bool,
    pub applied_version: u64,
    pub last_error: String,
    /// The prefixes its routes must lie in.
    pub granted_routes: Vec<IpNet>,
}

#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub hash: Vec<u8>,
    /// How many nodes the key may enroll; 0 = unlimited.
    pub max_uses: u32,
    pub uses: u32,
    pub revoked: bool,
    /// Unix seconds; 0 = never.
    pub expires: i64,
    pub created: i64,
    pub tags: Vec<String>,
    /// Prefixes nodes enrolled with the key may advertise routes within.
    pub routes: Vec<IpNet>,
    /// The hostname the enrolled node owns; `None`: its hostname is a label only.
    pub hostname: Option<String>,
    /// A re-enrollment key: the node whose identity (id, addresses, name, tags, grants) the
    /// key pair enrolled with it takes over.
    pub node: Option<String>,
}

const KEY_COLUMNS: &str = "id, hash, max_uses, uses, revoked, expires, created, tags, routes, hostname, node";

fn key_row(r: &rusqlite::Row) -> rusqlite::Result<(KeyRow, [String; 2])> {
    let hostname: String = r.get(9)?;
    let row = KeyRow {
        id: r.get(0)?,
        hash: r.get(1)?,
        max_uses: r.get(2)?,
        uses: r.get(3)?,
        revoked: r.get(4)?,
        expires: r.get(5)?,
        created: r.get(6)?,
        tags: vec![],
        routes: vec![],
        hostname: Some(hostname).filter(|h| !h.is_empty()),
        node: Some(r.get::<_, String>(10)?).filter(|n| !n.is_empty()),
    };
    Ok((row, [r.get(7)?, r.get(8)?]))
}

fn with_lists((mut row, [tags, routes]): (KeyRow, [String; 2])) -> Result<KeyRow> {
    row.tags = list::<String>(&row.id, "tags", &tags)?;
    row.routes = list::<IpNet>(&row.id, "routes", &routes)?;
    Ok(row)
}

pub struct Store {
    conn: Connection,
    /// Follows every committed change (see [`Store::change`]).
    credentials: Arc<CredentialIndex>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn json<T: serde::Serialize>(v: &[T]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn list<T: std::str::FromStr>(id: &str, field: &'static str, text: &str) -> Result<Vec<T>> {
    let strings: Vec<String> = serde_json::from_str(text).map_err(|_| StoreError::Corrupt { id: id.into(), field })?;
    strings.iter().map(|s| s.parse().map_err(|_| StoreError::Corrupt { id: id.into(), field })).collect()
}

fn strings<T: ToString>(v: &[T]) -> String {
    json(&v.iter().map(T::to_string).collect::<Vec<_>>())
}

impl Store {
    /// Opens (creating, 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let file_err = |source| StoreError::File { path: path.display().to_string(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(file_err)?;
        }
        OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(file_err)?;
        fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(file_err)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        conn.execute_batch(INDEXES)?;
        // A new database, or one made before incarnations, gets its id here (once).
        conn.execute("INSERT OR IGNORE INTO incarnation (id, value) VALUES (1, ?1)", [new_incarnation()])?;
        let credentials = Arc::new(CredentialIndex::default());
        credentials.replace(credential_rows(&conn)?);
        Ok(Store { conn, credentials })
    }

    /// The in-memory credential index, kept current by this store.
    pub fn credentials(&self) -> Arc<CredentialIndex> {
        self.credentials.clone()
    }

    /// This database's incarnation id (see the module docs).
    pub fn incarnation(&self) -> Result<String> {
        Ok(self.conn.query_row("SELECT value FROM incarnation WHERE id = 1", [], |r| r.get(0))?)
    }

    pub fn version(&self) -> Result<u64> {
        let v: i64 = self.conn.query_row("SELECT version FROM counter WHERE id = 1", [], |r| r.get(0))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// Runs `f` in a transaction; with `bump`, also increments the version counter.
    /// Returns `f`'s result and the version after the change.
    pub fn change<T>(&mut self, bump: bool, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<(T, u64)> {
        let tx = self.conn.transaction()?;
        let out = f(&tx)?;
        if bump {
            tx.execute("UPDATE counter SET version = version + 1 WHERE id = 1", [])?;
        }
        let v: i64 = tx.query_row("SELECT version FROM counter WHERE id = 1", [], |r| r.get(0))?;
        tx.commit()?;
        // Every committed change, whatever it touched: the index must never lag a removal
        // or a credential change. If reading back fails, fail closed (no node
        // authenticates) until the next change reloads it, rather than keep stale entries.
        match credential_rows(&self.conn) {
            Ok(rows) => self.credentials.replace(rows),
            Err(e) => {
                tracing::error!(error = %e, "reloading the credential index failed; refusing all node credentials");
                self.credentials.replace(Default::default());
            }
        }
        Ok((out, u64::try_from(v).unwrap_or(0)))
    }

    /// Every node, live and removed, ordered by id.
    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, hostname, public_key, addresses, endpoints, routes, tags, removed, applied_version, \
             last_error, bound, granted_routes FROM nodes ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                [r.get::<_, String>(3)?, r.get::<_, String>(4)?, r.get::<_, String>(5)?, r.get::<_, String>(6)?],
                r.get::<_, bool>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, String>(9)?,
                r.get::<_, bool>(10)?,
                r.get::<_, String>(11)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, hostname, key, [addresses, endpoints, routes, tags], removed, applied, last_error, bound, granted) =
                row?;
            let granted_routes = list::<IpNet>(&id, "granted_routes", &granted)?;
            let public_key = key.try_into().map_err(|_| StoreError::Corrupt { id: id.clone(), field: "public_key" })?;
            let rec = NodeRec {
                addresses: list::<IpNet>(&id, "addresses", &addresses)?,
                endpoints: list::<SocketAddr>(&id, "endpoints", &endpoints)?,
                routes: list::<IpNet>(&id, "routes", &routes)?,
                tags: list::<String>(&id, "tags", &tags)?,
                id,
                hostname,
                bound,
                public_key,
                refused_routes: vec![],
            };
            out.push(NodeRow {
                rec,
                removed,
                applied_version: u64::try_from(applied).unwrap_or(0),
                last_error,
                granted_routes,
            });
        }
        Ok(out)
    }

    /// The hostname the node's agent registers with (the one it enrolled with; an admin's
    /// rename does not change it).
    pub fn claimed_hostname(&self, id: &str) -> Result<String> {
        Ok(self.conn.query_row("SELECT claimed_hostname FROM nodes WHERE id = ?1", [id], |r| r.get(0))?)
    }

    /// The routes a live node may advertise (granted by its enrollment key).
    pub fn granted_routes(&self, id: &str) -> Result<Vec<IpNet>> {
        let text: String = self.conn.query_row("SELECT granted_routes FROM nodes WHERE id = ?1", [id], |r| r.get(0))?;
        list(id, "granted_routes", &text)
    }

    /// The id of a removed node with this public key, if any: removed rows are the
    /// denylist of keys that may not enroll again.
    pub fn removed_with_key(&self, public_key: &[u8]) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT id FROM nodes WHERE public_key = ?1 AND removed = 1 LIMIT 1", [public_key], |r| r.get(0))
            .optional()?)
    }

    pub fn key(&self, id: &str) -> Result<Option<KeyRow>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM enrollment_keys WHERE id = ?1");
        self.conn.query_row(&sql, [id], key_row).optional()?.map(with_lists).transpose()
    }

    /// Every enrollment key, oldest first.
    pub fn keys(&self) -> Result<Vec<KeyRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {KEY_COLUMNS} FROM enrollment_keys ORDER BY created, id"))?;
        let rows = st.query_map([], key_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(with_lists).collect()
    }

    pub fn insert_key(&self, k: &KeyRow) -> Result<()> {
        // single_use/used stay filled for databases read by older builds.
        self.conn.execute(
            "INSERT INTO enrollment_keys (id, hash, single_use, used, expires, tags, routes, max_uses, uses, \
             revoked, hostname, created, node) VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, 0, 0, ?8, ?9, ?10)",
            params![
                k.id,
                k.hash,
                k.max_uses == 1,
                k.expires,
                json(&k.tags),
                strings(&k.routes),
                k.max_uses,
                k.hostname.as_deref().unwrap_or(""),
                k.created,
                k.node.as_deref().unwrap_or("")
            ],
        )?;
        Ok(())
    }

    /// Revokes a key; false if there is no such key.
    pub fn revoke_key(&self, id: &str) -> Result<bool> {
        Ok(self.conn.execute("UPDATE enrollment_keys SET revoked = 1 WHERE id = ?1", [id])? > 0)
    }

    /// The node (live or removed) that owns `hostname`, and whether it was removed.
    pub fn name_owner(&self, hostname: &str) -> Result<Option<(String, bool)>> {
        Ok(self
            .conn
            .query_row("SELECT id, removed FROM nodes WHERE hostname = ?1 AND bound = 1", [hostname], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    /// Whether an admin asked the node to rotate its credential.
    /// The key a node announced with RotateKey and has not registered with yet.
    pub fn pending_public_key(&self, id: &str) -> Result<Option<PublicKey>> {
        let key: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT pending_public_key FROM nodes WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .flatten();
        Ok(key.and_then(|k| k.try_into().ok()))
    }

    /// The node (live or removed) that has or announced `public_key`, and whether it is removed.
    pub fn key_holder(&self, public_key: &[u8]) -> Result<Option<(String, bool)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, removed FROM nodes WHERE public_key = ?1 OR pending_public_key = ?1 LIMIT 1",
                [public_key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    pub fn rotate_requested(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT rotate_requested FROM nodes WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .unwrap_or(false))
    }

    /// The current policy file (name, source, version it was applied at), if any.
    pub fn policy(&self) -> Result<Option<(String, String, u64)>> {
        Ok(self
            .conn
            .query_row("SELECT file_name, source, version FROM policy WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0)))
            })
            .optional()?)
    }

    pub fn record_applied(&self, id: &str, version: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE nodes SET applied_version = ?2, last_error = '' WHERE id = ?1",
            params![id, to_i64(version)],
        )?;
        Ok(())
    }

    pub fn record_failed(&self, id: &str, reason: &str) -> Result<()> {
        self.conn.execute("UPDATE nodes SET last_error = ?2 WHERE id = ?1", params![id, reason])?;
        Ok(())
    }

    /// Records `version` as applied because the agent resumed its stream from it (its
    /// Applied report may have been lost with the old session). Writes nothing when
    /// already recorded, so reconnect storms cost no fsyncs; the error is cleared only
    /// when the version advances (a node still on the version before a failed one keeps
    /// showing the failure).
    pub fn acknowledge(&self, id: &str, version: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE nodes SET last_error = CASE WHEN applied_version < ?2 THEN '' ELSE last_error END, \
             applied_version = ?2 WHERE id = ?1 AND applied_version != ?2",
            params![id, to_i64(version)],
        )?;
        Ok(())
    }
}

/// 128 random bits, hex: unique across recreations and restores of a database.
fn new_incarnation() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// Every node's credential hashes and removed flag, for the [`CredentialIndex`].
fn credential_rows(conn: &Connection) -> Result<std::collections::HashMap<String, Entry>> {
    let mut st = conn.prepare_cached("SELECT id, credential_hash, pending_credential_hash, removed FROM nodes")?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, Entry { hash: r.get(1)?, pending: r.get(2)?, removed: r.get(3)? }))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn migrate(conn: &Connection) -> Result<()> {
    for (table, column, definition, then) in MIGRATIONS {
        let present: bool = conn.query_row(
            &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get(0),
        )?;
        if !present {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}; {then}"))?;
            tx.commit()?;
        }
    }
    Ok(())
}

// Statements used inside `Store::change`.

/// Inserts a new node with its credential and the routes it may advertise.
pub fn insert_node(tx: &Transaction, n: &NodeRec, credential_hash: &[u8], granted_routes: &[IpNet]) -> Result<()> {
    tx.execute(
        "INSERT INTO nodes (id, hostname, public_key, addresses, endpoints, routes, tags, credential_hash, \
         granted_routes, bound, claimed_hostname) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?2)",
        params![
            n.id,
            n.hostname,
            n.public_key.to_vec(),
            strings(&n.addresses),
            strings(&n.endpoints),
            strings(&n.routes),
            json(&n.tags),
            credential_hash,
            strings(granted_routes),
            n.bound
        ],
    )?;
    Ok(())
}

/// Updates what a re-registration may change: endpoints and routes.
pub fn update_node(tx: &Transaction, n: &NodeRec) -> Result<()> {
    tx.execute(
        "UPDATE nodes SET endpoints = ?2, routes = ?3 WHERE id = ?1",
        params![n.id, strings(&n.endpoints), strings(&n.routes)],
    )?;
    Ok(())
}

/// An admin's edit: the node's hostname (bound or not, as given) and tags.
pub fn set_identity(tx: &Transaction, n: &NodeRec) -> Result<()> {
    tx.execute(
        "UPDATE nodes SET hostname = ?2, bound = ?3, tags = ?4 WHERE id = ?1",
        params![n.id, n.hostname, n.bound, json(&n.tags)],
    )?;
    Ok(())
}

/// Replaces the routes a node may advertise.
pub fn set_granted_routes(tx: &Transaction, id: &str, granted: &[IpNet]) -> Result<()> {
    tx.execute("UPDATE nodes SET granted_routes = ?2 WHERE id = ?1", params![id, strings(granted)])?;
    Ok(())
}

pub fn mark_removed(tx: &Transaction, id: &str) -> Result<()> {
    tx.execute("UPDATE nodes SET removed = 1 WHERE id = ?1", [id])?;
    Ok(())
}

/// Counts one enrollment against the key.
pub fn use_key(tx: &Transaction, id: &str) -> Result<()> {
    tx.execute(
        "UPDATE enrollment_keys SET uses = uses + 1, \
         used = CASE WHEN max_uses != 0 AND uses + 1 >= max_uses THEN 1 ELSE used END WHERE id = ?1",
        [id],
    )?;
    Ok(())
}

/// The node owns its hostname from now on (the unique index refuses a second owner).
pub fn bind_name(tx: &Transaction, id: &str) -> Result<()> {
    tx.execute("UPDATE nodes SET bound = 1 WHERE id = ?1", [id])?;
    Ok(())
}

/// Frees a name a removed node reserves; the number of rows changed (0 or 1).
pub fn release_name(tx: &Transaction, hostname: &str) -> Result<usize> {
    Ok(tx.execute("UPDATE nodes SET bound = 0 WHERE hostname = ?1 AND bound = 1 AND removed = 1", [hostname])?)
}

/// Stores a new credential beside the current one (both valid until [`promote_credential`]).
pub fn set_pending_credential(tx: &Transaction, id: &str, hash: &[u8]) -> Result<()> {
    tx.execute("UPDATE nodes SET pending_credential_hash = ?2, rotate_requested = 0 WHERE id = ?1", params![id, hash])?;
    Ok(())
}

/// The pending credential becomes the only one.
pub fn promote_credential(tx: &Transaction, id: &str) -> Result<()> {
    tx.execute(
        "UPDATE nodes SET credential_hash = pending_credential_hash, pending_credential_hash = NULL \
         WHERE id = ?1 AND pending_credential_hash IS NOT NULL",
        [id],
    )?;
    Ok(())
}

/// Records the key a node announced (replacing one it announced before).
pub fn set_pending_key(tx: &Transaction, id: &str, key: &PublicKey) -> Result<()> {
    tx.execute("UPDATE nodes SET pending_public_key = ?2 WHERE id = ?1", params![id, key.to_vec()])?;
    Ok(())
}

/// A re-enrollment: the node's identity passes to a new key pair with a new credential
/// (the old key and credentials end), at its new endpoints and routes.
pub fn reenroll_node(tx: &Transaction, n: &NodeRec, credential_hash: &[u8]) -> Result<()> {
    tx.execute(
        "UPDATE nodes SET public_key = ?2, pending_public_key = NULL, credential_hash = ?3, \
         pending_credential_hash = NULL, rotate_requested = 0, endpoints = ?4, routes = ?5 WHERE id = ?1",
        params![n.id, n.public_key.to_vec(), credential_hash, strings(&n.endpoints), strings(&n.routes)],
    )?;
    Ok(())
}

/// The announced key becomes the node's key.
pub fn commit_key(tx: &Transaction, id: &str) -> Result<()> {
    tx.execute(
        "UPDATE nodes SET public_key = pending_public_key, pending_public_key = NULL \
         WHERE id = ?1 AND pending_public_key IS NOT NULL",
        [id],
    )?;
    Ok(())
}

pub fn request_rotation(tx: &Transaction, id: &str) -> Result<()> {
    tx.execute("UPDATE nodes SET rotate_requested = 1 WHERE id = ?1", [id])?;
    Ok(())
}

/// Runs inside `Store::change(true, ..)`, before the bump: the stored version is the one
/// the change gets.
pub fn set_policy(tx: &Transaction, file_name: &str, source: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO policy (id, file_name, source, version) VALUES (1, ?1, ?2, \
         (SELECT version + 1 FROM counter WHERE id = 1)) \
         ON CONFLICT(id) DO UPDATE SET file_name = excluded.file_name, source = excluded.source, \
         version = excluded.version",
        params![file_name, source],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeRec {
        NodeRec {
            id: id.into(),
            hostname: format!("h-{id}"),
            bound: true,
            public_key: [7; 32],
            addresses: vec!["10.77.0.1/32".parse().unwrap(), "fd77::1/128".parse().unwrap()],
            endpoints: vec!["192.0.2.1:51820".parse().unwrap(), "[2001:db8::1]:51820".parse().unwrap()],
            routes: vec!["10.88.0.0/24".parse().unwrap()],
            tags: vec!["web".into()],
            refused_routes: vec![],
        }
    }

    #[test]
    fn roundtrip_versions_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/control.db");
        {
            let mut s = Store::open(&path).unwrap();
            assert_eq!(s.version().unwrap(), 1);
            let ((), v) = s
                .change(true, |tx| insert_node(tx, &node("n1"), &[1; 32], &["10.88.0.0/16".parse().unwrap()]))
                .unwrap();
            assert_eq!(v, 2);
            let ((), v) = s.change(true, |tx| set_policy(tx, "p.toml", "# empty")).unwrap();
            assert_eq!(v, 3);
            s.record_applied("n1", 3).unwrap();
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s = Store::open(&path).unwrap();
        let sync: i64 = s.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        assert_eq!(s.version().unwrap(), 3);
        let rows = s.nodes().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].rec, node("n1"));
        assert_eq!(rows[0].applied_version, 3);
        assert_eq!(s.policy().unwrap(), Some(("p.toml".into(), "# empty".into(), 3)));
        let credentials = credential_rows(&s.conn).unwrap();
        assert_eq!(credentials.get("n1"), Some(&Entry { hash: vec![1; 32], pending: None, removed: false }));
        assert_eq!(credentials.get("n2"), None);
        assert_eq!(s.granted_routes("n1").unwrap(), vec!["10.88.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(s.removed_with_key(&[7; 32]).unwrap(), None);
        assert_eq!(s.claimed_hostname("n1").unwrap(), "h-n1", "what it enrolled with");
    }

    #[test]
    fn old_databases_gain_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE nodes (id TEXT PRIMARY KEY, hostname TEXT NOT NULL, public_key BLOB NOT NULL, \
                 addresses TEXT NOT NULL, endpoints TEXT NOT NULL, routes TEXT NOT NULL, tags TEXT NOT NULL, \
                 credential_hash BLOB NOT NULL, removed INTEGER NOT NULL DEFAULT 0, \
                 applied_version INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', \
                 last_seen INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO nodes (id, hostname, public_key, addresses, endpoints, routes, tags, credential_hash) \
                 VALUES ('n1', 'h', zeroblob(32), '[]', '[]', '[\"10.88.0.0/24\"]', '[]', x'00');
                 CREATE TABLE enrollment_keys (id TEXT PRIMARY KEY, hash BLOB NOT NULL, \
                 single_use INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0, expires INTEGER NOT NULL, \
                 tags TEXT NOT NULL);
                 INSERT INTO enrollment_keys (id, hash, single_use, expires, tags) VALUES ('k1', x'00', 0, 0, '[]');",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.granted_routes("n1").unwrap(), vec!["10.88.0.0/24".parse::<IpNet>().unwrap()]);
        let k1 = s.key("k1").unwrap().unwrap();
        assert!(k1.routes.is_empty());
        assert_eq!((k1.max_uses, k1.uses, k1.revoked, k1.hostname), (0, 0, false, None));
        // Live nodes of old databases keep their names, and register with them.
        assert!(s.nodes().unwrap()[0].rec.bound);
        assert_eq!(s.claimed_hostname("n1").unwrap(), "h");
        let incarnation = s.incarnation().unwrap();
        assert_eq!(incarnation.len(), 32);
        drop(s);
        assert_eq!(Store::open(&path).unwrap().incarnation().unwrap(), incarnation, "kept across opens");
    }

    #[test]
    fn a_recreated_database_is_a_new_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.db");
        let first = Store::open(&path).unwrap().incarnation().unwrap();
        assert_eq!(Store::open(&path).unwrap().incarnation().unwrap(), first);
        for f in ["control.db", "control.db-wal", "control.db-shm"] {
            let _ = fs::remove_file(dir.path().join(f));
        }
        let second = Store::open(&path).unwrap();
        assert_eq!(second.version().unwrap(), 1);
        assert_ne!(second.incarnation().unwrap(), first);
    }
}
