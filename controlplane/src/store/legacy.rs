//! SQLite databases made before versioned migrations: their tables lack the columns added
//! since, which `CREATE TABLE IF NOT EXISTS` in the first migration cannot add. They get
//! them here, once, before the migrator runs.

use sqlx::AnyPool;

use super::Result;

/// (table, column, definition, statement run once after adding it), in the order they
/// were added. Nodes enrolled before route grants existed keep the routes they had.
const COLUMNS: &[(&str, &str, &str, &str)] = &[
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

async fn exists(pool: &AnyPool, table: &str) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1")
        .bind(table)
        .fetch_one(pool)
        .await?;
    Ok(n > 0)
}

/// Adds the missing columns of a pre-migration database; does nothing to a new database or
/// one the migrator already manages.
pub(super) async fn upgrade(pool: &AnyPool) -> Result<()> {
    if exists(pool, "_sqlx_migrations").await? {
        return Ok(());
    }
    for (table, column, definition, then) in COLUMNS {
        if !exists(pool, table).await? {
            continue;
        }
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2")
            .bind(*table)
            .bind(*column)
            .fetch_one(pool)
            .await?;
        if n == 0 {
            let mut tx = pool.begin().await?;
            let add = format!("ALTER TABLE {table} ADD COLUMN {column} {definition}; {then}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(add)).execute(&mut *tx).await?;
            tx.commit().await?;
        }
    }
    Ok(())
}
