//! Route groups in the database: the primaries in force (restored with the state), every
//! server's observations of the members, and the elector's lease. Times are read from the
//! database's clock, so servers on different machines need no synchronized clocks.

use std::collections::BTreeMap;

use ipnet::IpNet;
use sqlx::Row;

use super::{count, flag, Engine, Result, Store, StoreError, Tx};
use crate::election::{Observation, Observed, Tunnel};

/// A server's observations count this long after it last shared them (it shares at
/// least twice a second while groups exist).
pub const OBSERVATIONS_FRESH_MS: i64 = 2_000;
/// Rows of servers silent this long are deleted.
const FORGET_MS: i64 = 60_000;

/// `sql` with each `NOW_MS` replaced by the engine's expression for the database's clock
/// in ms since the epoch. Only that constant text is spliced in; values are bound.
fn clocked(engine: Engine, sql: &str) -> sqlx::AssertSqlSafe<String> {
    let now = match engine {
        Engine::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        Engine::Postgres => "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)",
    };
    sqlx::AssertSqlSafe(sql.replace("NOW_MS", now))
}

fn tunnel_code(t: Tunnel) -> i64 {
    match t {
        Tunnel::Unknown => 0,
        Tunnel::Dead => 1,
        Tunnel::Alive => 2,
    }
}

fn tunnel_of(code: i64) -> Tunnel {
    match code {
        1 => Tunnel::Dead,
        2 => Tunnel::Alive,
        _ => Tunnel::Unknown,
    }
}

fn prefix(node: &str, text: &str) -> Result<IpNet> {
    text.parse().map_err(|_| StoreError::Corrupt { id: node.to_owned(), field: "route group prefix" })
}

/// Replaces the stored primaries (inside the change that sets them).
pub(super) async fn save_primaries(tx: &mut Tx, primaries: &BTreeMap<IpNet, String>) -> Result<()> {
    sqlx::query("DELETE FROM primaries").execute(&mut **tx).await?;
    for (p, node) in primaries {
        sqlx::query("INSERT INTO primaries (prefix, node) VALUES ($1, $2)")
            .bind(p.to_string())
            .bind(node)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl Store {
    /// The primaries as the elector last set them.
    pub async fn primaries(&self) -> Result<BTreeMap<IpNet, String>> {
        let rows = sqlx::query("SELECT prefix, node FROM primaries").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let node: String = r.try_get(1)?;
                Ok((prefix(&node, &r.try_get::<String, _>(0)?)?, node))
            })
            .collect()
    }

    /// Replaces what `server` observes of the members, and marks it as having shared now.
    pub async fn share_observations(&self, server: &str, observed: &Observed) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM member_observations WHERE server = $1").bind(server).execute(&mut *tx).await?;
        for ((p, node), o) in observed {
            sqlx::query(
                "INSERT INTO member_observations (server, node, prefix, stream, healthy, checked, priority, tunnel) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(server)
            .bind(node)
            .bind(p.to_string())
            .bind(i64::from(o.stream))
            .bind(i64::from(o.healthy))
            .bind(i64::from(o.checked))
            .bind(i64::from(o.priority))
            .bind(tunnel_code(o.tunnel))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(clocked(
            self.engine,
            "INSERT INTO observers (server, shared_ms) VALUES ($1, NOW_MS) \
             ON CONFLICT (server) DO UPDATE SET shared_ms = excluded.shared_ms",
        ))
        .bind(server)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The observations of every server that shared within [`OBSERVATIONS_FRESH_MS`], one
    /// map per server.
    pub async fn observations(&self) -> Result<Vec<Observed>> {
        let rows = sqlx::query(clocked(
            self.engine,
            "SELECT o.server, o.node, o.prefix, o.stream, o.healthy, o.checked, o.priority, o.tunnel \
             FROM member_observations o JOIN observers s ON s.server = o.server \
             WHERE s.shared_ms >= NOW_MS - $1",
        ))
        .bind(OBSERVATIONS_FRESH_MS)
        .fetch_all(&self.pool)
        .await?;
        let mut by_server: BTreeMap<String, Observed> = BTreeMap::new();
        for r in &rows {
            let node: String = r.try_get(1)?;
            let o = Observation {
                stream: flag(r.try_get(3)?),
                healthy: flag(r.try_get(4)?),
                checked: flag(r.try_get(5)?),
                priority: count(r.try_get(6)?),
                tunnel: tunnel_of(r.try_get(7)?),
            };
            let p = prefix(&node, &r.try_get::<String, _>(2)?)?;
            by_server.entry(r.try_get(0)?).or_default().insert((p, node), o);
        }
        Ok(by_server.into_values().collect())
    }

    /// Takes or renews the elector's lease for `server` for `lease_ms`; `false` while
    /// another server's lease runs. On SQLite, whose file one server holds at a time
    /// (flock), the lease of a server before it (a restart) is taken at once. The holder
    /// also forgets servers long silent.
    pub async fn lease(&self, server: &str, lease_ms: i64) -> Result<bool> {
        let others_lapsed = match self.engine {
            Engine::Sqlite => "1 = 1",
            Engine::Postgres => "elector.until_ms < NOW_MS",
        };
        let upsert = format!(
            "INSERT INTO elector (id, server, until_ms) VALUES (1, $1, NOW_MS + $2) \
             ON CONFLICT (id) DO UPDATE SET server = excluded.server, until_ms = excluded.until_ms \
             WHERE elector.server = excluded.server OR {others_lapsed}"
        );
        let taken = sqlx::query(clocked(self.engine, &upsert))
            .bind(server)
            .bind(lease_ms)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1;
        if taken {
            for forget in [
                "DELETE FROM member_observations WHERE server IN \
                 (SELECT server FROM observers WHERE shared_ms < NOW_MS - $1)",
                "DELETE FROM observers WHERE shared_ms < NOW_MS - $1",
            ] {
                sqlx::query(clocked(self.engine, forget)).bind(FORGET_MS).execute(&self.pool).await?;
            }
        }
        Ok(taken)
    }

    /// Gives the lease up (a server shutting down): another takes it at once.
    pub async fn release_lease(&self, server: &str) -> Result<()> {
        sqlx::query("DELETE FROM elector WHERE id = 1 AND server = $1").bind(server).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether `server` still holds the elector's lease, checked inside the change that
    /// sets primaries: a server that lost it (cut off past its lease while another took
    /// over) cannot commit an election.
    pub async fn holds_lease(&self, tx: &mut Tx, server: &str) -> Result<bool> {
        let held = sqlx::query(clocked(
            self.engine,
            "UPDATE elector SET until_ms = until_ms WHERE id = 1 AND server = $1 AND until_ms >= NOW_MS",
        ))
        .bind(server)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(held == 1)
    }
}
