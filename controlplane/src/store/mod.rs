//! Persistence, on SQLite (one machine, the default) or PostgreSQL, through one set of
//! statements run by sqlx's `Any` driver. Every versioned change runs in one transaction
//! that also bumps the persisted version counter, so versions stay monotonic across
//! restarts. Each engine has its own versioned migrations (`migrations/<engine>`), applied
//! when the store opens.
//!
//! SQLite: the database file is created 0600 (SQLite gives its WAL files the same mode).
//! Commits are `synchronous=FULL`: changes are rare, and a committed change (a removed
//! node, a new policy) must survive a power loss, not only a crash of the process.
//!
//! Each database has an incarnation: a random id made when the database is created (or
//! first opened by a version that knows it). Versions count within one incarnation only; a
//! recreated or restored database starts a new one, so agents can tell their version
//! belongs to another history.

mod flows;
mod legacy;
mod location;
mod routes;
mod usage;
mod write;

use std::fs::{self, OpenOptions, Permissions};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row};

use crate::change::Change;
use crate::credentials::{CredentialIndex, Entry};
use crate::model::{NodeRec, PublicKey};

pub use flows::{FlowQuery, Refused, StoredFlow};
pub use location::{DbLocation, Engine};
pub use usage::Hits;
pub use write::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(sqlx::Error),
    /// The database cannot be reached (down, restarting, connections exhausted): the
    /// change was not made, and may be tried again.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A unique constraint refused the change (another server made a conflicting one).
    #[error("database: {0}")]
    Conflict(sqlx::Error),
    #[error("database schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("corrupt row: node {id}: {field}")]
    Corrupt { id: String, field: &'static str },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        let unreachable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE class 08: connection exception; 57P0x: the server shuts down,
            // crashed or cannot take connections yet.
            sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P0")),
            _ => false,
        };
        if unreachable {
            return StoreError::Unavailable(e);
        }
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(e),
            _ => StoreError::Sql(e),
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A transaction of [`Store::begin`], finished by [`Store::commit`] (dropped: rolled back).
pub type Tx = sqlx::Transaction<'static, Any>;

/// The channel a commit notifies on PostgreSQL.
pub const NOTIFY_CHANNEL: &str = "wirefence_changes";
/// How many change log entries are kept (a server further behind reloads the whole state).
const LOG_KEPT: i64 = 10_000;
/// The log is pruned at every this many versions.
const LOG_PRUNE_EVERY: i64 = 1_000;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

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

/// What the database holds about a node beyond its record in the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    /// The hostname its agent registers with: the one it enrolled with (an admin's rename
    /// does not change it).
    pub claimed_hostname: String,
    /// The prefixes its routes must lie in.
    pub granted_routes: Vec<IpNet>,
    /// The key it announced with RotateKey and has not registered with yet.
    pub pending_public_key: Option<PublicKey>,
    /// An admin asked for a credential rotation.
    pub rotate_requested: bool,
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

macro_rules! key_columns {
    () => {
        "id, hash, max_uses, uses, revoked, expires, created, tags, routes, hostname, node"
    };
}

fn key_row(r: &AnyRow) -> Result<KeyRow> {
    let id: String = r.try_get(0)?;
    let hostname: String = r.try_get(9)?;
    let node: String = r.try_get(10)?;
    Ok(KeyRow {
        hash: r.try_get(1)?,
        max_uses: count(r.try_get(2)?),
        uses: count(r.try_get(3)?),
        revoked: flag(r.try_get(4)?),
        expires: r.try_get(5)?,
        created: r.try_get(6)?,
        tags: list::<String>(&id, "tags", &r.try_get::<String, _>(7)?)?,
        routes: list::<IpNet>(&id, "routes", &r.try_get::<String, _>(8)?)?,
        hostname: Some(hostname).filter(|h| !h.is_empty()),
        node: Some(node).filter(|n| !n.is_empty()),
        id,
    })
}

pub struct Store {
    pub(crate) pool: AnyPool,
    engine: Engine,
    location: DbLocation,
    /// Follows every committed change (see [`Store::commit`]).
    credentials: Arc<CredentialIndex>,
    /// Held from reading the credentials to updating the index (of two reloads at once, the
    /// one that read later updates later: the index never goes back); the highest
    /// `credential_seq` read so far.
    reloading: tokio::sync::Mutex<i64>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Flags are stored as integers 0/1 on both engines (one statement set for both).
fn flag(v: i64) -> bool {
    v != 0
}

fn count(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
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
    /// Opens the database (a SQLite file is created 0600) and brings its schema up to date.
    pub async fn open(db: &DbLocation) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (pool, engine) = match db {
            DbLocation::Sqlite(path) => (open_sqlite(path).await?, Engine::Sqlite),
            DbLocation::Postgres(url) => (open_postgres(url).await?, Engine::Postgres),
        };
        match engine {
            Engine::Sqlite => {
                legacy::upgrade(&pool).await?;
                SQLITE_MIGRATIONS.run(&pool).await?;
            }
            // Replicas starting together: the migrator takes an advisory lock.
            Engine::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        // A new database, or one made before incarnations, gets its id here (once).
        sqlx::query("INSERT INTO incarnation (id, value) VALUES (1, $1) ON CONFLICT DO NOTHING")
            .bind(new_incarnation())
            .execute(&pool)
            .await?;
        let credentials = Arc::new(CredentialIndex::default());
        let (rows, seen) = credential_rows(&pool, -1).await?;
        credentials.replace(rows);
        Ok(Store { pool, engine, location: db.clone(), credentials, reloading: tokio::sync::Mutex::new(seen) })
    }

    /// Where the database is.
    pub fn location(&self) -> &DbLocation {
        &self.location
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The in-memory credential index, kept current by this store.
    pub fn credentials(&self) -> Arc<CredentialIndex> {
        self.credentials.clone()
    }

    /// This database's incarnation id (see the module docs).
    pub async fn incarnation(&self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT value FROM incarnation WHERE id = 1").fetch_one(&self.pool).await?)
    }

    pub async fn version(&self) -> Result<u64> {
        let v: i64 = sqlx::query_scalar("SELECT version FROM counter WHERE id = 1").fetch_one(&self.pool).await?;
        Ok(to_u64(v))
    }

    /// Starts a change: run the statements of [`write`] on it, then [`Store::commit`].
    pub async fn begin(&self) -> Result<Tx> {
        Ok(self.pool.begin().await?)
    }

    /// Commits a change. A versioned change (`Some`) takes the next version and goes into
    /// the change log under it. Taking the version locks the counter row until the commit,
    /// so concurrent changes (on any server of the database) get consecutive versions in
    /// the order they commit, and a change rolled back gives its version up. Returns the
    /// version after the change.
    pub async fn commit(&self, mut tx: Tx, change: Option<&Change>) -> Result<u64> {
        if change.is_some() {
            sqlx::query("UPDATE counter SET version = version + 1 WHERE id = 1").execute(&mut *tx).await?;
        }
        let v: i64 = sqlx::query_scalar("SELECT version FROM counter WHERE id = 1").fetch_one(&mut *tx).await?;
        if let Some(change) = change {
            sqlx::query("INSERT INTO changes (version, body) VALUES ($1, $2)")
                .bind(v)
                .bind(change.encode())
                .execute(&mut *tx)
                .await?;
            if let Change::Primaries(primaries) = change {
                routes::save_primaries(&mut tx, primaries).await?;
            }
            if v % LOG_PRUNE_EVERY == 0 {
                sqlx::query("DELETE FROM changes WHERE version <= $1").bind(v - LOG_KEPT).execute(&mut *tx).await?;
            }
        }
        if self.engine == Engine::Postgres {
            // Delivered at commit: other servers read the log (a versioned change) or
            // reload their credential index (any change may have touched a credential).
            sqlx::query("SELECT pg_notify($1, '')").bind(NOTIFY_CHANNEL).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        // The index must never lag a removal or a credential change: a versioned change is
        // read back with the change log entries it is published with (registry::follow).
        if change.is_none() {
            self.reload_credentials().await;
        }
        Ok(to_u64(v))
    }

    /// The change log's entries after `version`, in version order (at most `limit`).
    pub async fn changes_after(&self, version: u64, limit: u32) -> Result<Vec<(u64, String)>> {
        let rows = sqlx::query("SELECT version, body FROM changes WHERE version > $1 ORDER BY version LIMIT $2")
            .bind(to_i64(version))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((to_u64(r.try_get(0)?), r.try_get(1)?))).collect()
    }

    /// Reads the credentials changed since the last reload (by this server or another).
    /// On failure the index is emptied: no node authenticates until a reload (a full one)
    /// succeeds (fail closed).
    pub async fn reload_credentials(&self) {
        if let Err(e) = self.try_reload_credentials().await {
            tracing::error!(error = %e, "reloading the credential index failed; refusing all node credentials");
            self.credentials.replace(Default::default());
            *self.reloading.lock().await = -1;
        }
    }

    /// [`Store::reload_credentials`] that leaves the index as it is on failure: for
    /// refreshes anyone can cause (an unknown credential), which must not be able to lock
    /// every node out during a database hiccup.
    pub async fn try_reload_credentials(&self) -> Result<()> {
        let mut seen = self.reloading.lock().await;
        let (rows, last) = credential_rows(&self.pool, *seen).await?;
        self.credentials.update(rows);
        *seen = last.max(*seen);
        Ok(())
    }

    /// Every node, live and removed, ordered by id.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT id, hostname, public_key, addresses, endpoints, routes, tags, removed, applied_version, \
             last_error, bound, granted_routes FROM nodes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_row).collect()
    }

    /// The id of a removed node with this public key, if any: removed rows are the
    /// denylist of keys that may not enroll again.
    pub async fn removed_with_key(&self, public_key: &[u8]) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT id FROM nodes WHERE public_key = $1 AND removed = 1 LIMIT 1")
            .bind(public_key.to_vec())
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRow>> {
        let sql = concat!("SELECT ", key_columns!(), " FROM enrollment_keys WHERE id = $1");
        sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?.as_ref().map(key_row).transpose()
    }

    /// Every enrollment key, oldest first.
    pub async fn keys(&self) -> Result<Vec<KeyRow>> {
        let sql = concat!("SELECT ", key_columns!(), " FROM enrollment_keys ORDER BY created, id");
        sqlx::query(sql).fetch_all(&self.pool).await?.iter().map(key_row).collect()
    }

    pub async fn insert_key(&self, k: &KeyRow) -> Result<()> {
        // single_use/used stay filled for databases read by older builds.
        sqlx::query(
            "INSERT INTO enrollment_keys (id, hash, single_use, used, expires, tags, routes, max_uses, uses, \
             revoked, hostname, created, node) VALUES ($1, $2, $3, 0, $4, $5, $6, $7, 0, 0, $8, $9, $10)",
        )
        .bind(&k.id)
        .bind(k.hash.clone())
        .bind(i64::from(k.max_uses == 1))
        .bind(k.expires)
        .bind(json(&k.tags))
        .bind(strings(&k.routes))
        .bind(i64::from(k.max_uses))
        .bind(k.hostname.clone().unwrap_or_default())
        .bind(k.created)
        .bind(k.node.clone().unwrap_or_default())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Revokes a key; false if there is no such key.
    pub async fn revoke_key(&self, id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE enrollment_keys SET revoked = 1 WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    /// The node (live or removed) that owns `hostname`, and whether it was removed.
    pub async fn name_owner(&self, hostname: &str) -> Result<Option<(String, bool)>> {
        let row = sqlx::query("SELECT id, removed FROM nodes WHERE hostname = $1 AND bound = 1")
            .bind(hostname)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, flag(r.try_get(1)?)))).transpose()
    }

    /// The node (live or removed) that has or announced `public_key`, and whether it is removed.
    pub async fn key_holder(&self, public_key: &[u8]) -> Result<Option<(String, bool)>> {
        let row = sqlx::query("SELECT id, removed FROM nodes WHERE public_key = $1 OR pending_public_key = $1 LIMIT 1")
            .bind(public_key.to_vec())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, flag(r.try_get(1)?)))).transpose()
    }

    /// What a re-registration of live node `id` is checked against beyond the state, in
    /// one query.
    pub async fn standing(&self, id: &str) -> Result<Standing> {
        let r = sqlx::query(
            "SELECT claimed_hostname, granted_routes, pending_public_key, rotate_requested FROM nodes WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        let pending: Option<Vec<u8>> = r.try_get(2)?;
        Ok(Standing {
            claimed_hostname: r.try_get(0)?,
            granted_routes: list(id, "granted_routes", &r.try_get::<String, _>(1)?)?,
            pending_public_key: pending.and_then(|k| k.try_into().ok()),
            rotate_requested: flag(r.try_get(3)?),
        })
    }

    /// The current policy file (name, source, version it was applied at), if any.
    pub async fn policy(&self) -> Result<Option<(String, String, u64)>> {
        let row = sqlx::query("SELECT file_name, source, version FROM policy WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?, to_u64(r.try_get(2)?)))).transpose()
    }

    pub async fn record_applied(&self, id: &str, version: u64) -> Result<()> {
        sqlx::query("UPDATE nodes SET applied_version = $2, last_error = '' WHERE id = $1")
            .bind(id)
            .bind(to_i64(version))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn record_failed(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE nodes SET last_error = $2 WHERE id = $1").bind(id).bind(reason).execute(&self.pool).await?;
        Ok(())
    }

    /// Records `version` as applied because the agent resumed its stream from it (its
    /// Applied report may have been lost with the old session). Writes nothing when
    /// already recorded, so reconnect storms cost no fsyncs; the error is cleared only
    /// when the version advances (a node still on the version before a failed one keeps
    /// showing the failure).
    pub async fn acknowledge(&self, id: &str, version: u64) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET last_error = CASE WHEN applied_version < $2 THEN '' ELSE last_error END, \
             applied_version = $2 WHERE id = $1 AND applied_version != $2",
        )
        .bind(id)
        .bind(to_i64(version))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn node_row(r: &AnyRow) -> Result<NodeRow> {
    let id: String = r.try_get(0)?;
    let key: Vec<u8> = r.try_get(2)?;
    let public_key = key.try_into().map_err(|_| StoreError::Corrupt { id: id.clone(), field: "public_key" })?;
    let text = |i: usize| r.try_get::<String, _>(i);
    let rec = NodeRec {
        hostname: text(1)?,
        addresses: list::<IpNet>(&id, "addresses", &text(3)?)?,
        endpoints: list::<SocketAddr>(&id, "endpoints", &text(4)?)?,
        routes: list::<IpNet>(&id, "routes", &text(5)?)?,
        tags: list::<String>(&id, "tags", &text(6)?)?,
        bound: flag(r.try_get(10)?),
        public_key,
        refused_routes: vec![],
        id: id.clone(),
    };
    Ok(NodeRow {
        rec,
        removed: flag(r.try_get(7)?),
        applied_version: to_u64(r.try_get(8)?),
        last_error: text(9)?,
        granted_routes: list::<IpNet>(&id, "granted_routes", &text(11)?)?,
    })
}

/// Creates the file 0600 (and its directory 0700) before SQLite opens it.
async fn open_sqlite(path: &Path) -> Result<AnyPool> {
    let file_err = |source| StoreError::File { path: path.display().to_string(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(file_err)?;
    }
    OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(file_err)?;
    fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(file_err)?;
    let url = location::sqlite_url(path);
    let options: AnyConnectOptions = url.parse()?;
    Ok(AnyPoolOptions::new()
        // One writer at a time anyway; the registry serializes its changes.
        .max_connections(2)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql("PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await?)
}

async fn open_postgres(url: &str) -> Result<AnyPool> {
    let options: AnyConnectOptions = url.parse()?;
    // A database that does not answer fails a change within seconds, not the pool's 30.
    Ok(AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(options)
        .await?)
}

/// 128 random bits, hex: unique across recreations and restores of a database.
fn new_incarnation() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// The credential hashes and removed flag of the nodes whose credentials changed after
/// `after` (a `credential_seq`; -1: every node), and the highest number read.
async fn credential_rows(pool: &AnyPool, after: i64) -> Result<(std::collections::HashMap<String, Entry>, i64)> {
    let rows = sqlx::query(
        "SELECT id, credential_hash, pending_credential_hash, removed, credential_seq FROM nodes \
         WHERE credential_seq > $1",
    )
    .bind(after)
    .fetch_all(pool)
    .await?;
    let mut last = after;
    let mut entries = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        let entry = Entry { hash: r.try_get(1)?, pending: r.try_get(2)?, removed: flag(r.try_get(3)?) };
        entries.insert(r.try_get(0)?, entry);
        last = last.max(r.try_get(4)?);
    }
    Ok((entries, last))
}

#[cfg(test)]
mod tests;
