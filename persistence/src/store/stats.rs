//! The queue's depth and the ledger's rollups: reading them, and folding
//! finished runs into them.

use drover_domain::model::*;
use drover_domain::stats::{self, FinishedRun, Grain, Rollup, RollupFilter, ALL_ACTORS};
use drover_domain::Result;
use uuid::Uuid;

use super::{db, SqlStore};
use crate::rows::{FinishedRunRow, RollupRow, ROLLUP_COLUMNS};
use crate::sql::{Backend, Exec, Sql};
use crate::time::Ts;

pub(super) async fn queue_depth<B: Backend>(s: &SqlStore<B>, now: Time) -> Result<QueueDepth> {
    // One pass over the queue: on Postgres no index tells leased rows from
    // the others (migration 0019), and the queue holds only active runs.
    let sql = Sql::new(
        "SELECT
            COUNT(*) FILTER (WHERE lease_expires_at IS NULL AND run_after <= $1),
            COUNT(*) FILTER (WHERE lease_expires_at IS NULL AND run_after > $1),
            COUNT(*) FILTER (WHERE lease_expires_at IS NOT NULL)
         FROM run_queue",
    )
    .bind(Ts(now));
    let (due, waiting, running) = s.fetch_one::<(i64, i64, i64)>("measure the queue", sql).await?;
    Ok(QueueDepth { due, waiting, running })
}

pub(super) async fn rollups<B: Backend>(
    s: &SqlStore<B>,
    grain: Grain,
    since: Time,
    until: Time,
    f: &RollupFilter,
) -> Result<Vec<Rollup>> {
    let mut sql = Sql::new(format!("SELECT {ROLLUP_COLUMNS} FROM run_rollups WHERE grain = "));
    sql.push_bind(grain.as_str());
    sql.push(" AND bucket >= ").push_bind(Ts(since));
    sql.push(" AND bucket < ").push_bind(Ts(until));
    for (column, value) in
        [("kind", &f.kind), ("action", &f.action), ("environment", &f.environment), ("actor", &f.actor)]
    {
        if let Some(v) = value {
            sql.push(&format!(" AND {column} = ")).push_bind(v);
        }
    }
    if f.actor.is_none() {
        sql.push(" AND actor <> ").push_bind(ALL_ACTORS);
    }
    let rows = s.fetch_all::<RollupRow>("read rollups", sql).await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// Folds up to `limit` finished runs into the rollups; how many it folded.
pub(super) async fn fold<B: Backend>(s: &SqlStore<B>, limit: u32) -> Result<usize> {
    let mut tx = s.begin().await?;
    tx.execute(Sql::new(B::FOLD_LOCK)).await.map_err(db("take the rollup folder's turn"))?;
    // The ids first, then their runs by primary key: a join lets the
    // planner, whose statistics saw an empty pending table, scan the whole
    // ledger for a few hundred runs.
    let ids: Vec<Uuid> = tx
        .fetch_all::<(Uuid,)>(
            Sql::new("SELECT run_id FROM rollup_pending ORDER BY run_id LIMIT $1").bind(i64::from(limit)),
        )
        .await
        .map_err(db("read runs pending for the rollups"))?
        .into_iter()
        .map(|(id,)| id)
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let mut sql = Sql::new(
        "SELECT id, kind, action, environment, actor, status, created_at, started_at, finished_at FROM runs WHERE ",
    );
    B::push_in(&mut sql, "id", &ids);
    let pending = tx.fetch_all::<FinishedRunRow>(sql).await.map_err(db("read runs pending for the rollups"))?;
    let runs = pending.into_iter().map(FinishedRun::try_from).collect::<Result<Vec<_>>>()?;
    let mut rows = stats::fold(&runs);
    // Add what the rows already hold. Folders take turns, so nothing
    // changes them between this read and the write.
    let keys: Vec<_> = rows.keys().cloned().collect();
    for chunk in keys.chunks(500) {
        let mut sql = Sql::new(format!(
            "SELECT {ROLLUP_COLUMNS} FROM run_rollups WHERE (grain, bucket, kind, action, environment, actor) IN (VALUES "
        ));
        for (n, k) in chunk.iter().enumerate() {
            sql.push(if n == 0 { "(" } else { ", (" });
            sql.push_bind(k.grain.as_str()).push(", ").push_bind(Ts(k.bucket)).push(", ");
            sql.push_bind(&k.kind).push(", ").push_bind(&k.action).push(", ");
            sql.push_bind(&k.environment).push(", ").push_bind(&k.actor).push(")");
        }
        sql.push(")");
        let old = tx.fetch_all::<RollupRow>(sql).await.map_err(db("read rollups to fold into"))?;
        for row in old {
            let old = Rollup::try_from(row)?;
            if let Some(t) = rows.get_mut(&old.key) {
                t.merge(&old.totals);
            }
        }
    }
    let rows: Vec<_> = rows.into_iter().collect();
    for chunk in rows.chunks(400) {
        let mut sql = Sql::new(format!("INSERT INTO run_rollups ({ROLLUP_COLUMNS}) VALUES "));
        for (n, (k, t)) in chunk.iter().enumerate() {
            sql.push(if n == 0 { "(" } else { ", (" });
            sql.push_bind(k.grain.as_str()).push(", ").push_bind(Ts(k.bucket)).push(", ");
            sql.push_bind(&k.kind).push(", ").push_bind(&k.action).push(", ");
            sql.push_bind(&k.environment).push(", ").push_bind(&k.actor);
            for o in &t.outcomes {
                sql.push(", ").push_bind(o.count).push(", ").push_bind(o.timed).push(", ").push_bind(o.sum_ms);
            }
            sql.push(", ").push_bind(t.max_ms).push(", ").push_bind(t.hist.encode()).push(")");
        }
        sql.push(
            " ON CONFLICT (grain, bucket, kind, action, environment, actor) DO UPDATE SET
             succeeded = excluded.succeeded, succeeded_timed = excluded.succeeded_timed,
             succeeded_ms = excluded.succeeded_ms, failed = excluded.failed,
             failed_timed = excluded.failed_timed, failed_ms = excluded.failed_ms,
             cancelled = excluded.cancelled, cancelled_timed = excluded.cancelled_timed,
             cancelled_ms = excluded.cancelled_ms, max_ms = excluded.max_ms, hist = excluded.hist",
        );
        tx.execute(sql).await.map_err(db("write rollups"))?;
    }
    for chunk in ids.chunks(1000) {
        let mut sql = Sql::new("DELETE FROM rollup_pending WHERE ");
        B::push_in(&mut sql, "run_id", chunk);
        tx.execute(sql).await.map_err(db("clear folded runs"))?;
    }
    s.commit(tx, "commit rollups").await?;
    Ok(ids.len())
}
