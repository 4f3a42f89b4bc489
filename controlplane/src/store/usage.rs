//! Rule usage in the database (`rule_usage`): the agents' rule counter increments summed
//! per rule and minute, so any window of minutes can be summed on any replica.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;

use super::{to_i64, to_u64, Engine, Result, Store};

/// Packets and bytes counted under one rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    pub packets: u64,
    pub bytes: u64,
}

/// Adds without overflowing: a lying node's counts saturate instead.
impl std::ops::AddAssign for Hits {
    fn add_assign(&mut self, other: Hits) {
        self.packets = self.packets.saturating_add(other.packets);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

impl Store {
    /// Adds `hits` to the minute starting at `minute_ms`, in one transaction, rule by rule
    /// in order (so that concurrent servers lock the rows in one order).
    pub async fn add_rule_usage(&self, minute_ms: i64, hits: &BTreeMap<String, Hits>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (rule, h) in hits {
            sqlx::query(
                "INSERT INTO rule_usage (rule_id, minute_ms, packets, bytes) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (rule_id, minute_ms) DO UPDATE SET packets = rule_usage.packets + excluded.packets, \
                 bytes = rule_usage.bytes + excluded.bytes",
            )
            .bind(rule)
            .bind(minute_ms)
            .bind(to_i64(h.packets))
            .bind(to_i64(h.bytes))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Each rule's hits in the minutes from `since_ms` on (rules with none are absent).
    pub async fn rule_usage(&self, since_ms: i64) -> Result<HashMap<String, Hits>> {
        // Sums that cannot overflow, clamped to an i64: PostgreSQL sums BIGINT as NUMERIC;
        // SQLite's TOTAL is a float where its SUM would fail.
        let sql = match self.engine {
            Engine::Postgres => {
                "SELECT rule_id, CAST(LEAST(SUM(packets), 9223372036854775807) AS BIGINT), \
                 CAST(LEAST(SUM(bytes), 9223372036854775807) AS BIGINT) FROM rule_usage \
                 WHERE minute_ms >= $1 GROUP BY rule_id"
            }
            Engine::Sqlite => {
                "SELECT rule_id, CAST(MIN(TOTAL(packets), 9.2e18) AS INTEGER), \
                 CAST(MIN(TOTAL(bytes), 9.2e18) AS INTEGER) FROM rule_usage \
                 WHERE minute_ms >= $1 GROUP BY rule_id"
            }
        };
        let rows = sqlx::query(sql).bind(since_ms).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, Hits { packets: to_u64(r.try_get(1)?), bytes: to_u64(r.try_get(2)?) })))
            .collect()
    }

    /// Deletes the minutes before `before_ms`; returns how many rows went.
    pub async fn prune_rule_usage(&self, before_ms: i64) -> Result<u64> {
        let gone =
            sqlx::query("DELETE FROM rule_usage WHERE minute_ms < $1").bind(before_ms).execute(&self.pool).await?;
        Ok(gone.rows_affected())
    }
}
