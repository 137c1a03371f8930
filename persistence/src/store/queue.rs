//! The work queue: claims, leases and heartbeats, completions, retries and
//! the reaper, and the writes every way a run ends shares.

use std::time::Duration;

use drover_domain::model::*;
use drover_domain::ports::Lane;
use drover_domain::{Error, Result};
use uuid::Uuid;

use super::{db, lease_len, ClaimTerms, SqlStore};
use crate::rows::RunRow;
use crate::sql::{Backend, Exec, Sql};
use crate::time::Ts;

/// Claims up to `limit` due runs (of the providers in `only`, when given): past the cursor first, then from the
/// front of the queue for what that scan missed. A run whose resource had
/// left its `from_state` is failed here instead of being handed out.
pub(super) async fn claim<B: Backend>(
    s: &SqlStore<B>,
    worker: &str,
    lease: Duration,
    limit: u32,
    now: Time,
    only: Option<&[String]>,
    lane: Lane,
) -> Result<Vec<(Run, Resource)>> {
    let terms = ClaimTerms { worker, token: Uuid::new_v4(), expires: now + lease_len(lease), now, only, lane };
    let mut claimed = Vec::new();
    if let Some(after) = s.cursor.start(lane) {
        claimed = s.db.claim_batch(&terms, limit, Some(after)).await?;
    }
    if claimed.len() < limit as usize {
        // From the start of the queue: what the scan past the cursor missed
        // (runs due earlier that came later).
        let rest = limit - claimed.len() as u32;
        claimed.extend(s.db.claim_batch(&terms, rest, None).await?);
        s.cursor.scanned_from_start(lane);
    }
    s.cursor.advance(lane, claimed.iter().map(|c| c.due).max());
    if !claimed.is_empty() {
        s.wrote();
    }
    let mut out = Vec::with_capacity(claimed.len());
    for c in claimed {
        match c.resource {
            Some(resource) => out.push((c.run, resource)),
            None => {
                // Its lease is ours: if this fails, the reaper queues the
                // run again when the lease lapses.
                if let Err(e) = fail_unclaimable(s, &c.run, now).await {
                    tracing::warn!(run = %c.run.id, error = %e, "could not fail a run whose resource moved");
                }
            }
        }
    }
    Ok(out)
}

/// Extends a run's lease; `None` when the lease is gone, else whether a
/// cancel was requested.
pub(super) async fn heartbeat<B: Backend>(
    s: &SqlStore<B>,
    lease: Lease,
    lease_for: Duration,
    now: Time,
) -> Result<Option<bool>> {
    let expires = Ts(now + lease_len(lease_for));
    let mut tx = s.begin().await?;
    let row = tx
        .fetch_optional::<(Option<Ts>,)>(
            Sql::new(
                "UPDATE runs SET lease_expires_at = $3, heartbeat_at = $4
                 WHERE id = $1 AND lease_token = $2 AND status = 'running' RETURNING cancel_requested_at",
            )
            .bind(lease.run)
            .bind(lease.token)
            .bind(expires)
            .bind(Ts(now)),
        )
        .await
        .map_err(db("heartbeat"))?;
    let Some((cancel,)) = row else {
        return Ok(None);
    };
    tx.execute(Sql::new("UPDATE run_queue SET lease_expires_at = $2 WHERE run_id = $1").bind(lease.run).bind(expires))
        .await
        .map_err(db("extend the lease in the queue"))?;
    s.commit(tx, "commit heartbeat").await?;
    Ok(Some(cancel.is_some()))
}

/// Completes a batch together, and one by one if that fails, so that each
/// completion gets its own answer, errors included.
pub(super) async fn complete<B: Backend>(s: &SqlStore<B>, batch: &[(Lease, Completion)]) -> Vec<Result<()>> {
    let done = complete_each(s, batch).await;
    s.wrote();
    done
}

async fn complete_each<B: Backend>(s: &SqlStore<B>, batch: &[(Lease, Completion)]) -> Vec<Result<()>> {
    let items: Vec<(Lease, &Completion)> = batch.iter().map(|(l, c)| (*l, c)).collect();
    if items.len() > 1 {
        match s.db.complete_together(&items).await {
            Ok(results) => return results,
            Err(e) => tracing::debug!(error = %e, "batched completion failed; completing one by one"),
        }
    }
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        out.push(s.db.complete_together(std::slice::from_ref(item)).await.and_then(|mut r| r.remove(0)));
    }
    out
}

/// Puts a running run back in the queue for another attempt at
/// `run_after`, fenced on its lease.
pub(super) async fn retry_later<B: Backend>(
    s: &SqlStore<B>,
    lease: Lease,
    run_after: Time,
    error: &RunError,
    event: &NewEvent,
) -> Result<()> {
    let mut tx = s.begin().await?;
    insert_event_fenced::<B>(&mut tx, lease, event).await?;
    let done = tx
        .execute(
            Sql::new(
                "UPDATE runs SET status = 'queued', run_after = $3, error = $4, lease_token = NULL,
                    lease_expires_at = NULL, worker = NULL
                 WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            )
            .bind(lease.run)
            .bind(lease.token)
            .bind(Ts(run_after))
            .bind(error),
        )
        .await
        .map_err(db("requeue run"))?;
    if done != 1 {
        return Err(Error::StaleLease { run: lease.run });
    }
    requeue::<B>(&mut tx, lease.run, run_after).await?;
    s.commit(tx, "commit requeue").await?;
    s.wake();
    Ok(())
}

/// Takes back runs whose lease lapsed: queued again while attempts are
/// left, failed (with their resource) when none are.
pub(super) async fn reap_expired<B: Backend>(s: &SqlStore<B>, now: Time) -> Result<Vec<Uuid>> {
    // On Postgres no index names the lease (the claim rewrites queue rows in
    // place: migration 0019), so this reads the queue, which holds the
    // active runs alone.
    let expired = s
        .fetch_all::<RunRow>(
            "find expired leases",
            Sql::new(
                "SELECT runs.* FROM run_queue JOIN runs ON runs.id = run_queue.run_id
                 WHERE run_queue.lease_expires_at < $1 ORDER BY run_queue.lease_expires_at LIMIT 100",
            )
            .bind(Ts(now)),
        )
        .await?;
    let mut reaped = Vec::new();
    for row in expired {
        let run: Run = row.try_into()?;
        if reap(s, &run, now).await? {
            reaped.push(run.id);
        }
    }
    if !reaped.is_empty() {
        s.wake();
    }
    Ok(reaped)
}

/// Reaps one run whose lease lapsed; whether it was this reaper's to take.
async fn reap<B: Backend>(s: &SqlStore<B>, run: &Run, now: Time) -> Result<bool> {
    let mut tx = s.begin().await?;
    if run.status != RunStatus::Running {
        // A queue row out of step with its run, which the claim leased and
        // started nothing for (a broken invariant): bring it back in line.
        tracing::warn!(run = %run.id, status = run.status.as_str(), "queue row leased for a run that is not running; repairing");
        match run.status {
            RunStatus::Queued => requeue::<B>(&mut tx, run.id, run.run_after).await?,
            _ => dequeue::<B>(&mut tx, run.id).await?,
        }
        s.commit(tx, "commit queue repair").await?;
        return Ok(false);
    }
    let out_of_attempts = run.attempt >= run.max_attempts;
    let (status, message) = if out_of_attempts {
        ("failed", format!("lease of attempt {} lapsed and no attempts are left", run.attempt))
    } else {
        ("queued", format!("lease of attempt {} lapsed (worker gone?); run requeued", run.attempt))
    };
    let error =
        RunError { code: "lease_expired".into(), message: message.clone(), retryable: !out_of_attempts, detail: None };
    // Fenced on the lease we saw: a heartbeat or another reaper that got
    // there first wins.
    let done = tx
        .execute(
            Sql::new(
                "UPDATE runs SET status = $3, outcome = CASE WHEN $3 = 'failed' THEN $3 END, error = $4,
                    lease_token = NULL, lease_expires_at = NULL, worker = NULL, run_after = $5,
                    finished_at = CASE WHEN $3 = 'failed' THEN $5 ELSE NULL END
                 WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at < $5",
            )
            .bind(run.id)
            .bind(run.lease_token)
            .bind(status)
            .bind(&error)
            .bind(Ts(now)),
        )
        .await
        .map_err(db("reap run"))?;
    if done != 1 {
        return Ok(false);
    }
    if out_of_attempts {
        dequeue::<B>(&mut tx, run.id).await?;
        record_finished::<B>(&mut tx, &[run.id]).await?;
        leave_working_state::<B>(&mut tx, run, now).await?;
    } else {
        requeue::<B>(&mut tx, run.id, now).await?;
    }
    insert_event_unfenced::<B>(&mut tx, run.id, &NewEvent::info("reaper", message).with_level(Level::Warn)).await?;
    s.commit(tx, "commit reap").await?;
    Ok(true)
}

/// Fails a run that a claim started but whose resource had left its
/// `from_state` meanwhile, fenced on the claim's lease.
async fn fail_unclaimable<B: Backend>(s: &SqlStore<B>, run: &Run, now: Time) -> Result<()> {
    let error = RunError {
        code: "state_conflict".into(),
        message: format!("the resource left {} before work started", run.from_state),
        retryable: false,
        detail: None,
    };
    let mut tx = s.begin().await?;
    let done = tx
        .execute(
            Sql::new(
                "UPDATE runs SET status = 'failed', outcome = 'failed', finished_at = $3, error = $4,
                    lease_expires_at = NULL
                 WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            )
            .bind(run.id)
            .bind(run.lease_token)
            .bind(Ts(now))
            .bind(&error),
        )
        .await
        .map_err(db("fail unclaimable run"))?;
    if done != 1 {
        return Err(Error::StaleLease { run: run.id });
    }
    dequeue::<B>(&mut tx, run.id).await?;
    record_finished::<B>(&mut tx, &[run.id]).await?;
    insert_event_unfenced::<B>(&mut tx, run.id, &NewEvent::info("claim", error.message).with_level(Level::Error))
        .await?;
    s.commit(tx, "commit unclaimable run").await
}

/// An event written by the worker holding the run's lease, fenced on it.
pub(super) async fn insert_event_fenced<B: Backend>(conn: &mut B::Conn, lease: Lease, e: &NewEvent) -> Result<()> {
    let sql = Sql::new(
        "INSERT INTO run_events (run_id, at, attempt, level, step, message, data)
         SELECT id, $3, attempt, $4, $5, $6, $7 FROM runs WHERE id = $1 AND lease_token = $2 AND status = 'running'",
    )
    .bind(lease.run)
    .bind(lease.token)
    .bind(Ts(e.at))
    .bind(e.level.as_str())
    .bind(&e.step)
    .bind(&e.message)
    .bind(e.data.as_ref());
    match conn.execute(sql).await.map_err(db("append event"))? {
        1 => Ok(()),
        _ => Err(Error::StaleLease { run: lease.run }),
    }
}

/// An event written by the store itself (request, cancel, reaper), not by
/// the worker holding the lease.
pub(super) async fn insert_event_unfenced<B: Backend>(conn: &mut B::Conn, run: Uuid, e: &NewEvent) -> Result<()> {
    let sql = Sql::new(
        "INSERT INTO run_events (run_id, at, attempt, level, step, message, data)
         SELECT id, $2, attempt, $3, $4, $5, $6 FROM runs WHERE id = $1",
    )
    .bind(run)
    .bind(Ts(e.at))
    .bind(e.level.as_str())
    .bind(&e.step)
    .bind(&e.message)
    .bind(e.data.as_ref());
    conn.execute(sql).await.map_err(db("append event"))?;
    Ok(())
}

/// Notes runs that have just ended, in the transaction that ended them:
/// their outcome, for the status filters of history, and an entry for the
/// rollup folder. Every way a run ends calls this (the Postgres completion
/// does the same in its one statement).
pub(crate) async fn record_finished<B: Backend>(conn: &mut B::Conn, ids: &[Uuid]) -> Result<()> {
    let mut sql = Sql::new(
        "INSERT INTO run_outcomes (outcome, run_id, action, kind, environment, actor)
         SELECT status, id, action, kind, environment, actor FROM runs WHERE ",
    );
    B::push_in(&mut sql, "id", ids);
    conn.execute(sql).await.map_err(db("record outcomes"))?;
    let mut sql = Sql::new("INSERT INTO rollup_pending (run_id) SELECT id FROM runs WHERE ");
    B::push_in(&mut sql, "id", ids);
    conn.execute(sql).await.map_err(db("mark runs for the rollups"))?;
    Ok(())
}

/// Moves the resource of a run that failed outside its worker (the reaper,
/// a cancel while queued) from the run's working state to its failure
/// state, if an earlier attempt had left it there. One of the four writes
/// of a resource's state (ARCHITECTURE.md).
pub(super) async fn leave_working_state<B: Backend>(conn: &mut B::Conn, run: &Run, now: Time) -> Result<()> {
    let sql = Sql::new(
        "UPDATE resources SET state = $3, version = version + 1, updated_at = $4 WHERE id = $1 AND state = $2",
    )
    .bind(run.resource_id)
    .bind(&run.working_state)
    .bind(&run.err_state)
    .bind(Ts(now));
    conn.execute(sql).await.map_err(db("move the resource to its failure state"))?;
    Ok(())
}

/// Takes a run that has ended off the queue.
async fn dequeue<B: Backend>(conn: &mut B::Conn, run: Uuid) -> Result<()> {
    conn.execute(Sql::new("DELETE FROM run_queue WHERE run_id = $1").bind(run))
        .await
        .map_err(db("take a run off the queue"))?;
    Ok(())
}

/// Puts a run that was running back in the queue, due at `run_after`.
async fn requeue<B: Backend>(conn: &mut B::Conn, run: Uuid, run_after: Time) -> Result<()> {
    let sql = Sql::new("UPDATE run_queue SET run_after = $2, lease_expires_at = NULL WHERE run_id = $1")
        .bind(run)
        .bind(Ts(run_after));
    conn.execute(sql).await.map_err(db("queue a run again"))?;
    Ok(())
}
