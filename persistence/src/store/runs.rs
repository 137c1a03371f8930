//! The ledger: requesting runs, reading them and their events, cancelling.

use drover_domain::model::*;
use drover_domain::{Error, Result};
use uuid::Uuid;

use super::queue::{insert_event_unfenced, leave_working_state, record_finished};
use super::{db, is_unique, SqlStore};
use crate::rows::{runs, EventRow, RunRow};
use crate::sql::{Backend, Exec, Sql};
use crate::time::Ts;

/// Records a requested run and queues it, in one transaction: fenced on the
/// resource still being in the run's `from_state`, and refused while the
/// resource has another active run.
pub(super) async fn insert<B: Backend>(s: &SqlStore<B>, run: &NewRun) -> Result<Run> {
    let mut tx = s.begin().await?;
    let inserted = tx
        .fetch_optional::<RunRow>(
            Sql::new(
                "INSERT INTO runs (id, resource_id, kind, resource_name, action, params, from_state,
                    working_state, ok_state, err_state, status, attempt, max_attempts, actor, reason,
                    idempotency_key, parent_run, provider, timeout_secs, created_at, run_after, settings, environment,
                    spec_version)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', 0, $11, $12, $13, $14, $15, $16, $17, $18,
                    $18, $19, $20, resources.spec_version
                 FROM resources WHERE id = $2 AND state = $7 AND deleted_at IS NULL
                 RETURNING *",
            )
            .bind(run.id)
            .bind(run.resource_id)
            .bind(run.kind.as_str())
            .bind(&run.resource_name)
            .bind(&run.action)
            .bind(&run.params)
            .bind(&run.from_state)
            .bind(&run.working_state)
            .bind(&run.ok_state)
            .bind(&run.err_state)
            .bind(run.max_attempts)
            .bind(&run.actor)
            .bind(run.reason.as_ref())
            .bind(run.idempotency_key.as_ref())
            .bind(run.parent_run)
            .bind(&run.provider)
            .bind(run.timeout_secs)
            .bind(Ts(run.now))
            .bind(&run.settings)
            .bind(run.environment.as_ref()),
        )
        .await
        .map_err(db("insert run"))?;
    let Some(row) = inserted else {
        return Err(Error::Moved {
            kind: run.kind.as_str(),
            name: run.resource_name.clone(),
            what: format!("it is no longer {}; look again before asking", run.from_state),
        });
    };
    let queued = tx
        .execute(
            Sql::new("INSERT INTO run_queue (run_id, resource_id, run_after, provider) VALUES ($1, $2, $3, $4)")
                .bind(run.id)
                .bind(run.resource_id)
                .bind(Ts(run.now))
                .bind(&run.provider),
        )
        .await;
    match queued {
        Ok(_) => {}
        Err(e) if is_unique(&e) => {
            drop(tx);
            return Err(match active(s, run.resource_id).await? {
                Some(a) => Error::Busy { kind: run.kind.as_str(), resource: run.resource_id, run: a.id },
                None => Error::Moved {
                    kind: run.kind.as_str(),
                    name: run.resource_name.clone(),
                    what: "another transition was requested at the same time".into(),
                },
            });
        }
        Err(e) => return Err(db("queue run")(e)),
    }
    let by = match &run.reason {
        Some(r) => format!("{} requested by {}: {r}", run.action, run.actor),
        None => format!("{} requested by {}", run.action, run.actor),
    };
    insert_event_unfenced::<B>(&mut tx, run.id, &NewEvent::info("request", by)).await?;
    if let Some(notify) = B::NOTIFY {
        tx.execute(Sql::new(notify)).await.map_err(db("notify"))?;
    }
    s.commit(tx, "commit").await?;
    s.wake();
    row.try_into()
}

pub(super) async fn get<B: Backend>(s: &SqlStore<B>, id: Uuid) -> Result<Option<Run>> {
    let sql = Sql::new("SELECT * FROM runs WHERE id = $1").bind(id);
    let row = s.fetch_optional::<RunRow>("get run", sql).await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn list<B: Backend>(s: &SqlStore<B>, f: &RunFilter, page: PageRequest) -> Result<Vec<Run>> {
    // Finished runs of one outcome come from `run_outcomes` (keyed by
    // outcome and run id, and indexed by action, outcome and run id),
    // newest first; active ones through the queue, which is small.
    let finished = f.status.filter(|s| s.is_terminal());
    let (mut sql, id) = match finished {
        Some(v) => {
            let mut sql =
                Sql::new("SELECT runs.* FROM run_outcomes o JOIN runs ON runs.id = o.run_id WHERE o.outcome = ");
            sql.push_bind(v.as_str());
            (sql, "o.run_id")
        }
        None => (Sql::new("SELECT * FROM runs WHERE 1 = 1"), "runs.id"),
    };
    if let Some(v) = f.resource {
        sql.push(" AND resource_id = ").push_bind(v);
    }
    // The filters `run_outcomes` carries are read there (its key's index
    // holds them), the rest from `runs`.
    let on = if finished.is_some() { "o." } else { "" };
    if let Some(v) = f.kind {
        sql.push(&format!(" AND {on}kind = ")).push_bind(v.as_str());
    }
    if let Some(v) = &f.action {
        sql.push(&format!(" AND {on}action = ")).push_bind(v);
    }
    if let Some(v) = f.status.filter(|s| !s.is_terminal()) {
        sql.push(" AND status = ").push_bind(v.as_str()).push(" AND id IN (SELECT run_id FROM run_queue)");
    }
    if let Some(v) = f.since {
        sql.push(" AND created_at >= ").push_bind(Ts(v));
    }
    if let Some(v) = f.until {
        sql.push(" AND created_at < ").push_bind(Ts(v));
    }
    if let Some(v) = &f.environment {
        sql.push(&format!(" AND {on}environment = ")).push_bind(v);
    }
    if let Some(v) = &f.actor {
        sql.push(&format!(" AND {on}actor = ")).push_bind(v);
    }
    if let Some(v) = f.parent {
        sql.push(" AND parent_run = ").push_bind(v);
    }
    if let Some(v) = page.after {
        sql.push(&format!(" AND {id} < ")).push_bind(v);
    }
    sql.push(&format!(" ORDER BY {id} DESC LIMIT ")).push_bind(i64::from(page.limit));
    runs(s.fetch_all::<RunRow>("list runs", sql).await?)
}

pub(super) async fn active<B: Backend>(s: &SqlStore<B>, resource: Uuid) -> Result<Option<Run>> {
    let sql = Sql::new(
        "SELECT runs.* FROM run_queue JOIN runs ON runs.id = run_queue.run_id WHERE run_queue.resource_id = $1",
    )
    .bind(resource);
    let row = s.fetch_optional::<RunRow>("get active run", sql).await?;
    row.map(TryInto::try_into).transpose()
}

/// The statements of a resource's view, each with `$1` a resource or run id
/// and `$2` a count, for the query-plan check (`testing::view_plans`).
#[cfg(feature = "test-support")]
pub(crate) const VIEW_STATEMENTS: &[(&str, &str)] =
    &[("recent and active runs", RECENT_AND_ACTIVE), ("last events", LAST_EVENTS)];

/// The ids first (a few, each by an index), then their rows by primary
/// key: an `OR` of two `IN`s here made Postgres scan every run.
const RECENT_AND_ACTIVE: &str = "SELECT * FROM runs
     WHERE id IN (
         SELECT id FROM (SELECT id FROM runs WHERE resource_id = $1 ORDER BY id DESC LIMIT $2) AS newest
         UNION SELECT run_id FROM run_queue WHERE resource_id = $1)
     ORDER BY id DESC";

const LAST_EVENTS: &str =
    "SELECT * FROM (SELECT * FROM run_events WHERE run_id = $1 ORDER BY seq DESC LIMIT $2) AS last ORDER BY seq";

/// A resource's `limit` newest runs and its active run, in one statement:
/// the active one is almost always among the newest (no run can be asked
/// for while it is active), but ids come from the clocks of the replicas
/// that made them, so it is asked for in its own right.
pub(super) async fn recent_and_active<B: Backend>(
    s: &SqlStore<B>,
    resource: Uuid,
    limit: u32,
) -> Result<(Vec<Run>, Option<Run>)> {
    let sql = Sql::new(RECENT_AND_ACTIVE).bind(resource).bind(i64::from(limit));
    let rows = s.fetch_all::<RunRow>("list recent runs", sql).await?;
    let mut recent = Vec::with_capacity(rows.len());
    let mut active = None;
    for row in rows {
        let run = Run::try_from(row)?;
        // The queue holds exactly the runs not ended, so the one not ended
        // is the one the queue gave.
        if !run.status.is_terminal() {
            active = Some(run.clone());
        }
        if recent.len() < limit as usize {
            recent.push(run);
        }
    }
    Ok((recent, active))
}

pub(super) async fn last_unsuccessful<B: Backend>(s: &SqlStore<B>, resource: Uuid) -> Result<Option<Run>> {
    let sql = Sql::new(
        "SELECT * FROM runs WHERE resource_id = $1 AND status IN ('failed', 'cancelled') ORDER BY id DESC LIMIT 1",
    )
    .bind(resource);
    let row = s.fetch_optional::<RunRow>("get failed run", sql).await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn list_events<B: Backend>(
    s: &SqlStore<B>,
    run: Uuid,
    after: i64,
    limit: u32,
) -> Result<Vec<RunEvent>> {
    let sql = Sql::new("SELECT * FROM run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3")
        .bind(run)
        .bind(after)
        .bind(i64::from(limit));
    let rows = s.fetch_all::<EventRow>("list events", sql).await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

pub(super) async fn last_events<B: Backend>(s: &SqlStore<B>, run: Uuid, n: u32) -> Result<Vec<RunEvent>> {
    let sql = Sql::new(LAST_EVENTS).bind(run).bind(i64::from(n));
    let rows = s.fetch_all::<EventRow>("list last events", sql).await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// Cancels a run: a queued one ends at once (and, if an earlier attempt
/// had already moved its resource to the working state, leaves it for the
/// failure state, whose exits are retry and destroy); a running one is
/// asked to stop at its next step.
pub(super) async fn request_cancel<B: Backend>(
    s: &SqlStore<B>,
    id: Uuid,
    actor: &str,
    reason: Option<&str>,
    now: Time,
) -> Result<Run> {
    let mut tx = s.begin().await?;
    let error = RunError {
        code: "cancelled".into(),
        message: format!("cancelled by {actor} before it started"),
        retryable: false,
        detail: None,
    };
    // The queue row first, as the claim takes it: a run being claimed right
    // now is running once this gets the row.
    let unleased = tx
        .fetch_optional::<(Uuid,)>(
            Sql::new("DELETE FROM run_queue WHERE run_id = $1 AND lease_expires_at IS NULL RETURNING run_id").bind(id),
        )
        .await
        .map_err(db("take a queued run off the queue"))?;
    let message = if unleased.is_some() {
        let row = tx
            .fetch_optional::<RunRow>(
                Sql::new(
                    "UPDATE runs SET status = 'cancelled', outcome = 'cancelled', finished_at = $2, error = $5,
                        cancel_requested_at = $2, cancel_requested_by = $3, cancel_reason = $4
                     WHERE id = $1 AND status = 'queued' RETURNING *",
                )
                .bind(id)
                .bind(Ts(now))
                .bind(actor)
                .bind(reason)
                .bind(&error),
            )
            .await
            .map_err(db("cancel queued run"))?
            .ok_or_else(|| Error::Internal(format!("run {id} had an unleased queue row but was not queued")))?;
        let run: Run = row.try_into()?;
        record_finished::<B>(&mut tx, &[run.id]).await?;
        leave_working_state::<B>(&mut tx, &run, now).await?;
        format!("cancelled by {actor} while queued")
    } else {
        tx.execute(
            Sql::new(
                "UPDATE runs SET cancel_requested_at = COALESCE(cancel_requested_at, $2),
                    cancel_requested_by = COALESCE(cancel_requested_by, $3),
                    cancel_reason = COALESCE(cancel_reason, $4)
                 WHERE id = $1 AND status = 'running'",
            )
            .bind(id)
            .bind(Ts(now))
            .bind(actor)
            .bind(reason),
        )
        .await
        .map_err(db("request cancel"))?;
        format!("cancel requested by {actor}; the worker stops at its next step")
    };
    let message = match reason {
        Some(r) => format!("{message}: {r}"),
        None => message,
    };
    insert_event_unfenced::<B>(&mut tx, id, &NewEvent::info("cancel", message).with_level(Level::Warn)).await?;
    s.commit(tx, "commit cancel").await?;
    get(s, id).await?.ok_or_else(|| Error::NotFound { kind: "transition", key: id.to_string() })
}
