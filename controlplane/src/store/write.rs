//! The statements of a change, run on a transaction from [`Store::begin`](super::Store::begin).

use ipnet::IpNet;

use super::{json, strings, Result, Tx};
use crate::model::{NodeRec, PublicKey};

/// Inserts a new node with its credential and the routes it may advertise.
pub async fn insert_node(tx: &mut Tx, n: &NodeRec, credential_hash: &[u8], granted_routes: &[IpNet]) -> Result<()> {
    sqlx::query(
        "INSERT INTO nodes (id, hostname, public_key, addresses, endpoints, routes, tags, credential_hash, \
         granted_routes, bound, claimed_hostname) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $2)",
    )
    .bind(&n.id)
    .bind(&n.hostname)
    .bind(n.public_key.to_vec())
    .bind(strings(&n.addresses))
    .bind(strings(&n.endpoints))
    .bind(strings(&n.routes))
    .bind(json(&n.tags))
    .bind(credential_hash.to_vec())
    .bind(strings(granted_routes))
    .bind(i64::from(n.bound))
    .execute(&mut **tx)
    .await?;
    for a in &n.addresses {
        // The primary key: one owner per address, whatever happens.
        sqlx::query("INSERT INTO addresses (address, node) VALUES ($1, $2)")
            .bind(a.to_string())
            .bind(&n.id)
            .execute(&mut **tx)
            .await?;
    }
    credentials_changed(tx, &n.id).await
}

/// Takes the version counter's row (a write that changes nothing) until the commit: no other
/// versioned change, on any server of the database, commits meanwhile. Takes the credential
/// counter's first: every change takes the two in that order (a removal marks the node,
/// then commits its version), so two servers never wait on each other.
pub async fn hold_versions(tx: &mut Tx) -> Result<()> {
    sqlx::query("UPDATE credential_counter SET seq = seq WHERE id = 1").execute(&mut **tx).await?;
    sqlx::query("UPDATE counter SET version = version WHERE id = 1").execute(&mut **tx).await?;
    Ok(())
}

/// Numbers a change of node `id`'s credential columns (hash, pending hash, removed) for
/// the servers' incremental reloads. The counter row stays locked until the commit, so such
/// changes commit in the order of their numbers and a reload never skips one.
async fn credentials_changed(tx: &mut Tx, id: &str) -> Result<()> {
    sqlx::query("UPDATE credential_counter SET seq = seq + 1 WHERE id = 1").execute(&mut **tx).await?;
    sqlx::query("UPDATE nodes SET credential_seq = (SELECT seq FROM credential_counter WHERE id = 1) WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Updates what a re-registration may change: endpoints and routes.
pub async fn update_node(tx: &mut Tx, n: &NodeRec) -> Result<()> {
    sqlx::query("UPDATE nodes SET endpoints = $2, routes = $3 WHERE id = $1")
        .bind(&n.id)
        .bind(strings(&n.endpoints))
        .bind(strings(&n.routes))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// An admin's edit: the node's hostname (bound or not, as given) and tags.
pub async fn set_identity(tx: &mut Tx, n: &NodeRec) -> Result<()> {
    sqlx::query("UPDATE nodes SET hostname = $2, bound = $3, tags = $4 WHERE id = $1")
        .bind(&n.id)
        .bind(&n.hostname)
        .bind(i64::from(n.bound))
        .bind(json(&n.tags))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Replaces the routes a node may advertise.
pub async fn set_granted_routes(tx: &mut Tx, id: &str, granted: &[IpNet]) -> Result<()> {
    sqlx::query("UPDATE nodes SET granted_routes = $2 WHERE id = $1")
        .bind(id)
        .bind(strings(granted))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn mark_removed(tx: &mut Tx, id: &str) -> Result<()> {
    sqlx::query("UPDATE nodes SET removed = 1 WHERE id = $1").bind(id).execute(&mut **tx).await?;
    credentials_changed(tx, id).await
}

/// Counts one enrollment against the key, if it has a use left; false if not (another
/// server may have taken the last one since the key was read: the row decides).
pub async fn use_key(tx: &mut Tx, id: &str) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE enrollment_keys SET uses = uses + 1, \
         used = CASE WHEN max_uses != 0 AND uses + 1 >= max_uses THEN 1 ELSE used END \
         WHERE id = $1 AND (max_uses = 0 OR uses < max_uses)",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The node owns its hostname from now on (the unique index refuses a second owner).
pub async fn bind_name(tx: &mut Tx, id: &str) -> Result<()> {
    sqlx::query("UPDATE nodes SET bound = 1 WHERE id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}

/// Frees a name a removed node reserves; the number of rows changed (0 or 1).
pub async fn release_name(tx: &mut Tx, hostname: &str) -> Result<u64> {
    let done = sqlx::query("UPDATE nodes SET bound = 0 WHERE hostname = $1 AND bound = 1 AND removed = 1")
        .bind(hostname)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected())
}

/// Stores a new credential beside the current one (both valid until [`promote_credential`]).
pub async fn set_pending_credential(tx: &mut Tx, id: &str, hash: &[u8]) -> Result<()> {
    sqlx::query("UPDATE nodes SET pending_credential_hash = $2, rotate_requested = 0 WHERE id = $1")
        .bind(id)
        .bind(hash.to_vec())
        .execute(&mut **tx)
        .await?;
    credentials_changed(tx, id).await
}

/// The pending credential becomes the only one.
pub async fn promote_credential(tx: &mut Tx, id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE nodes SET credential_hash = pending_credential_hash, pending_credential_hash = NULL \
         WHERE id = $1 AND pending_credential_hash IS NOT NULL",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    credentials_changed(tx, id).await
}

/// Records the key a node announced (replacing one it announced before).
pub async fn set_pending_key(tx: &mut Tx, id: &str, key: &PublicKey) -> Result<()> {
    sqlx::query("UPDATE nodes SET pending_public_key = $2 WHERE id = $1")
        .bind(id)
        .bind(key.to_vec())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A re-enrollment: the node's identity passes to a new key pair with a new credential
/// (the old key and credentials end), at its new endpoints and routes.
pub async fn reenroll_node(tx: &mut Tx, n: &NodeRec, credential_hash: &[u8]) -> Result<()> {
    sqlx::query(
        "UPDATE nodes SET public_key = $2, pending_public_key = NULL, credential_hash = $3, \
         pending_credential_hash = NULL, rotate_requested = 0, endpoints = $4, routes = $5 WHERE id = $1",
    )
    .bind(&n.id)
    .bind(n.public_key.to_vec())
    .bind(credential_hash.to_vec())
    .bind(strings(&n.endpoints))
    .bind(strings(&n.routes))
    .execute(&mut **tx)
    .await?;
    credentials_changed(tx, &n.id).await
}

/// The announced key becomes the node's key.
pub async fn commit_key(tx: &mut Tx, id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE nodes SET public_key = pending_public_key, pending_public_key = NULL \
         WHERE id = $1 AND pending_public_key IS NOT NULL",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn request_rotation(tx: &mut Tx, id: &str) -> Result<()> {
    sqlx::query("UPDATE nodes SET rotate_requested = 1 WHERE id = $1").bind(id).execute(&mut **tx).await?;
    Ok(())
}

/// Runs in a change committed with a bump, before the bump: the stored version is the one
/// the change gets.
pub async fn set_policy(tx: &mut Tx, file_name: &str, source: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO policy (id, file_name, source, version) VALUES (1, $1, $2, \
         (SELECT version + 1 FROM counter WHERE id = 1)) \
         ON CONFLICT (id) DO UPDATE SET file_name = excluded.file_name, source = excluded.source, \
         version = excluded.version",
    )
    .bind(file_name)
    .bind(source)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
