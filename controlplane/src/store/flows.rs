//! Flow records in the database (`flows`, `flows_refused`): written in batches, read
//! newest first with whether the other end of each flow reported it too, pruned by age and
//! count. The same statements run on both engines.

use std::net::IpAddr;

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{to_i64, to_u64, Result, Store, StoreError};
use crate::flows::{Direction, Flow, FlowKind, Verdict, PAIR_WINDOW_MS};

/// Rows of one INSERT (13 parameters each). Binding grows faster than linearly with the
/// parameters of a statement on SQLite (10,000 rows: 0.09 s in statements of 20 rows,
/// 0.15 s of 50, 0.9 s of 500), while one row per statement costs PostgreSQL a round trip
/// each.
const ROWS_PER_INSERT: usize = 20;
const INSERT_COLUMNS: usize = 13;

/// `INSERT INTO flows ... VALUES ($1, ..., $13), ($14, ...)` for `rows` rows: only
/// placeholders are generated, never values.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO flows (node, at_ms, direction, verdict, protocol, src, dst, src_port, dst_port, rule_id, \
         packets, bytes, ended) VALUES ",
    );
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..INSERT_COLUMNS {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * INSERT_COLUMNS + col + 1));
        }
        sql.push(')');
    }
    sql
}

/// What [`Store::flows`] returns.
#[derive(Clone, Debug, Default)]
pub struct FlowQuery {
    /// A node id; `None`: every node.
    pub node: Option<String>,
    /// Unix ms.
    pub since_ms: i64,
    pub verdict: Option<Verdict>,
    pub rule_id: Option<String>,
    /// Only records no other node reported the other end of.
    pub unpaired: bool,
    pub limit: u32,
}

/// A stored record: the reporting node, the flow, and whether another node reported the
/// same flow from the other side (same addresses, protocol and ports, the other direction,
/// within [`PAIR_WINDOW_MS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFlow {
    pub node: String,
    pub flow: Flow,
    pub paired: bool,
}

/// Records refused per node, summed over every server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refused {
    pub over_rate: u64,
    pub invalid: u64,
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds the record's node, time, direction, verdict and tuple (in that order) to `q`.
fn bind_flow<'q>(q: Query<'q>, node: &'q str, f: &Flow) -> Query<'q> {
    q.bind(node)
        .bind(f.at_ms)
        .bind(f.direction.code())
        .bind(f.verdict.code())
        .bind(i64::from(f.protocol))
        .bind(f.src.to_string())
        .bind(f.dst.to_string())
        .bind(i64::from(f.src_port))
        .bind(i64::from(f.dst_port))
}

/// Inserts `rows`, [`ROWS_PER_INSERT`] per statement.
async fn insert_rows(tx: &mut sqlx::Transaction<'_, sqlx::Any>, rows: &[&(String, Flow)]) -> Result<()> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(insert_sql(chunk.len())));
        for (node, f) in chunk.iter().copied() {
            q = bind_flow(q, node, f)
                .bind(&f.rule_id)
                .bind(to_i64(f.packets))
                .bind(to_i64(f.bytes))
                .bind(i64::from(f.ended));
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

fn corrupt(node: &str) -> StoreError {
    StoreError::Corrupt { id: node.to_owned(), field: "flow record" }
}

fn stored(r: &AnyRow) -> Result<StoredFlow> {
    let node: String = r.try_get(0)?;
    let ip = |i: usize| -> Result<IpAddr> { r.try_get::<String, _>(i)?.parse().map_err(|_| corrupt(&node)) };
    let small = |i: usize| -> Result<i64> { r.try_get::<i64, _>(i).map_err(StoreError::from) };
    let flow = Flow {
        at_ms: r.try_get(1)?,
        direction: Direction::from_code(small(2)?).ok_or_else(|| corrupt(&node))?,
        verdict: Verdict::from_code(small(3)?).ok_or_else(|| corrupt(&node))?,
        protocol: u8::try_from(small(4)?).map_err(|_| corrupt(&node))?,
        src: ip(5)?,
        dst: ip(6)?,
        src_port: u16::try_from(small(7)?).map_err(|_| corrupt(&node))?,
        dst_port: u16::try_from(small(8)?).map_err(|_| corrupt(&node))?,
        rule_id: r.try_get(9)?,
        packets: to_u64(r.try_get(10)?),
        bytes: to_u64(r.try_get(11)?),
        ended: small(12)? != 0,
    };
    Ok(StoredFlow { paired: small(13)? != 0, node, flow })
}

impl Store {
    /// Adds `batch` (records with their reporting nodes) in one transaction, up to
    /// [`ROWS_PER_INSERT`] rows per statement (one round trip each, not one per record).
    /// A flow's end ([`Flow::ended`]) goes on the record of its start instead (one
    /// statement each, after the batch's starts): the same node, tuple, direction and
    /// verdict, not ended yet, within [`PAIR_WINDOW_MS`] of the end's time (its first
    /// packet's), the nearest; it is added as a record of its own when there is none (its
    /// start was not reported).
    pub async fn insert_flows(&self, batch: &[(String, Flow)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let (ends, starts): (Vec<_>, Vec<_>) = batch.iter().partition(|(_, f)| f.ended);
        insert_rows(&mut tx, &starts).await?;
        let mut alone = Vec::new();
        for end in ends {
            let (node, f) = end;
            let update = sqlx::query(
                "UPDATE flows SET packets = $10, bytes = $11, ended = 1 WHERE id = (\
                   SELECT id FROM flows WHERE node = $1 AND direction = $3 AND verdict = $4 AND protocol = $5 \
                   AND src = $6 AND dst = $7 AND src_port = $8 AND dst_port = $9 AND ended = 0 \
                   AND at_ms BETWEEN $2 - $12 AND $2 + $12 ORDER BY ABS(at_ms - $2), id LIMIT 1)",
            );
            let updated = bind_flow(update, node, f)
                .bind(to_i64(f.packets))
                .bind(to_i64(f.bytes))
                .bind(PAIR_WINDOW_MS)
                .execute(&mut *tx)
                .await?;
            if updated.rows_affected() == 0 {
                alone.push(end);
            }
        }
        insert_rows(&mut tx, &alone).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds to the counts of `node`'s refused records.
    pub async fn add_refused(&self, node: &str, r: &Refused) -> Result<()> {
        sqlx::query(
            "INSERT INTO flows_refused (node, over_rate, invalid) VALUES ($1, $2, $3) \
             ON CONFLICT (node) DO UPDATE SET over_rate = flows_refused.over_rate + excluded.over_rate, \
             invalid = flows_refused.invalid + excluded.invalid",
        )
        .bind(node)
        .bind(to_i64(r.over_rate))
        .bind(to_i64(r.invalid))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every node's refused records.
    pub async fn refused(&self) -> Result<Vec<(String, Refused)>> {
        let rows = sqlx::query("SELECT node, over_rate, invalid FROM flows_refused ORDER BY node")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, Refused { over_rate: to_u64(r.try_get(1)?), invalid: to_u64(r.try_get(2)?) })))
            .collect()
    }

    /// The newest `q.limit` records matching `q`, oldest first.
    pub async fn flows(&self, q: &FlowQuery) -> Result<Vec<StoredFlow>> {
        let rows = sqlx::query(
            "SELECT node, at_ms, direction, verdict, protocol, src, dst, src_port, dst_port, rule_id, packets, \
             bytes, ended, paired FROM (\
               SELECT f.id, f.node, f.at_ms, f.direction, f.verdict, f.protocol, f.src, f.dst, f.src_port, \
               f.dst_port, f.rule_id, f.packets, f.bytes, f.ended, \
               CASE WHEN EXISTS (SELECT 1 FROM flows g WHERE g.src = f.src AND g.dst = f.dst \
                 AND g.dst_port = f.dst_port AND g.src_port = f.src_port AND g.protocol = f.protocol \
                 AND g.direction <> f.direction AND g.node <> f.node \
                 AND g.at_ms BETWEEN f.at_ms - $6 AND f.at_ms + $6) THEN 1 ELSE 0 END AS paired \
               FROM flows f \
               WHERE f.at_ms >= $1 AND ($2 = '' OR f.node = $2) AND ($3 = 0 OR f.verdict = $3) \
                 AND ($4 = '' OR f.rule_id = $4)\
             ) q WHERE ($7 = 0 OR q.paired = 0) ORDER BY q.at_ms DESC, q.id DESC LIMIT $5",
        )
        .bind(q.since_ms)
        .bind(q.node.as_deref().unwrap_or(""))
        .bind(q.verdict.map_or(0, Verdict::code))
        .bind(q.rule_id.as_deref().unwrap_or(""))
        .bind(i64::from(q.limit))
        .bind(PAIR_WINDOW_MS)
        .bind(i64::from(q.unpaired))
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows.iter().map(stored).collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    /// The distinct flows (source, destination, protocol, destination port) of the records
    /// since `since_ms`, the most recently seen first, at most `limit`.
    pub async fn flow_kinds(&self, since_ms: i64, limit: u32) -> Result<Vec<FlowKind>> {
        let rows = sqlx::query(
            "SELECT src, dst, protocol, dst_port, COUNT(DISTINCT src_port), COUNT(*), MAX(at_ms) FROM flows \
             WHERE at_ms >= $1 GROUP BY src, dst, protocol, dst_port ORDER BY MAX(at_ms) DESC LIMIT $2",
        )
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                // Grouped rows have no node: the column names the problem.
                let bad = |field| StoreError::Corrupt { id: "flows".into(), field };
                let ip =
                    |i: usize, field| -> Result<IpAddr> { r.try_get::<String, _>(i)?.parse().map_err(|_| bad(field)) };
                Ok(FlowKind {
                    src: ip(0, "src")?,
                    dst: ip(1, "dst")?,
                    protocol: u8::try_from(r.try_get::<i64, _>(2)?).map_err(|_| bad("protocol"))?,
                    dst_port: u16::try_from(r.try_get::<i64, _>(3)?).map_err(|_| bad("dst_port"))?,
                    connections: to_u64(r.try_get(4)?),
                    records: to_u64(r.try_get(5)?),
                    last_ms: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Deletes the records older than `before_ms`, then all but the newest `keep`. Returns
    /// how many went.
    pub async fn prune_flows(&self, before_ms: i64, keep: u64) -> Result<u64> {
        let old = sqlx::query("DELETE FROM flows WHERE at_ms < $1").bind(before_ms).execute(&self.pool).await?;
        let over =
            sqlx::query("DELETE FROM flows WHERE id <= (SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET $1)")
                .bind(to_i64(keep))
                .execute(&self.pool)
                .await?;
        Ok(old.rows_affected() + over.rows_affected())
    }
}
