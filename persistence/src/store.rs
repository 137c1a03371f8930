//! The [`Store`] implementation, written once and expanded for each backend.
//!
//! Queries use `$n` placeholders, which both Postgres and SQLite (through
//! sqlx) understand, and bind every time from Rust, never `now()`, so that
//! the two backends behave alike and tests control the clock. What must
//! differ comes from the backend module: the claim and the completion of a
//! batch (one statement each on Postgres, steps in a transaction on
//! SQLite), and how a list of ids is bound.
//!
//! Every write that belongs to a worker is fenced on `(status = 'running',
//! lease_token)` and checks rows affected; losing the fence is
//! [`Error::StaleLease`], and the whole transaction is rolled back.
//!
//! `run_queue` holds a narrow row per active run (queued: no lease; running:
//! the lease expiry), written in the same transaction as every change of
//! the run's status; `runs` has no index over a column the engine changes,
//! so its rows are rewritten in place. Transactions that take both rows
//! lock them in one order for a queued run (queue row, then run: claim,
//! cancel) and in the other for a running one (run, then queue row:
//! heartbeat, completion, requeue, reaper); no transaction holds a running
//! run's row while waiting for a queued one's, so the two orders cannot
//! deadlock.

/// Expands `impl Store for $store` against `$db`. The backend provides
/// `claim_batch` (one claim on [`ClaimTerms`], past the cursor or from the
/// front of the queue, returning [`Claimed`] runs), `complete_together` (a batch of
/// completions, all or nothing but for lost leases) and `push_in` (binds
/// `column IN` a list of ids). `$fold_lock` is the statement that
/// makes rollup folders take turns (a no-op where transactions are already
/// serial).
macro_rules! impl_store {
    ($store:ident, $db:ty, backend = $backend:literal, fold_lock = $fold_lock:expr) => {
        #[async_trait::async_trait]
        impl drover_domain::ports::Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db("ping"))?;
                Ok(())
            }

            async fn insert_resource(&self, r: &NewResource) -> Result<Resource> {
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                let row = sqlx::query_as::<_, ResourceRow>(
                    "INSERT INTO resources (id, kind, name, state, spec, version, spec_version, applied_version,
                        applied_spec, outputs, created_at, updated_at, created_by, updated_by)
                     VALUES ($1, $2, $3, $4, $5, 1, 1, CASE WHEN $9 THEN 1 END, CASE WHEN $9 THEN $5 END, $6, $7, $7,
                        $8, $8)
                     RETURNING *",
                )
                .bind(r.id)
                .bind(r.kind.as_str())
                .bind(&r.name)
                .bind(&r.state)
                .bind(Json(&r.spec))
                .bind(Json(serde_json::json!({})))
                .bind(Ts(r.now))
                .bind(&r.actor)
                .bind(r.applied)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| match is_unique(&e) {
                    true => Error::AlreadyExists { kind: r.kind.as_str(), name: r.name.clone() },
                    false => db("insert resource")(e),
                })?;
                insert_spec_version(&mut tx, r.id, 1, &r.actor, r.reason.as_deref(), &r.spec, &r.spec, r.now).await?;
                tx.commit().await.map_err(db("commit"))?;
                row.try_into()
            }

            async fn get_resource(&self, kind: Kind, key: &ResourceKey) -> Result<Option<Resource>> {
                let q = match key {
                    ResourceKey::Id(id) => sqlx::query_as::<_, ResourceRow>(
                        "SELECT * FROM resources WHERE kind = $1 AND id = $2 AND deleted_at IS NULL",
                    )
                    .bind(kind.as_str())
                    .bind(*id),
                    ResourceKey::Name(name) => sqlx::query_as::<_, ResourceRow>(
                        "SELECT * FROM resources WHERE kind = $1 AND name = $2 AND deleted_at IS NULL",
                    )
                    .bind(kind.as_str())
                    .bind(name.clone()),
                };
                q.fetch_optional(&self.pool).await.map_err(db("get resource"))?.map(TryInto::try_into).transpose()
            }

            async fn get_resource_by_id(&self, id: Uuid) -> Result<Option<Resource>> {
                sqlx::query_as::<_, ResourceRow>("SELECT * FROM resources WHERE id = $1 AND deleted_at IS NULL")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db("get resource"))?
                    .map(TryInto::try_into)
                    .transpose()
            }

            async fn list_resources(&self, kind: Kind, filter: &ResourceFilter, page: PageRequest) -> Result<Vec<Resource>> {
                let mut q = QueryBuilder::<$db>::new("SELECT * FROM resources WHERE deleted_at IS NULL AND kind = ");
                q.push_bind(kind.as_str());
                if let Some(env) = &filter.environment {
                    // `->>` reads a JSON field in both Postgres (JSONB) and SQLite (text).
                    q.push(" AND spec->>'environment' = ").push_bind(env.clone());
                }
                if let Some(after) = page.after {
                    q.push(" AND id > ").push_bind(after);
                }
                q.push(" ORDER BY id LIMIT ").push_bind(i64::from(page.limit));
                let rows = q.build_query_as::<ResourceRow>().fetch_all(&self.pool).await.map_err(db("list resources"))?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn update_spec(&self, c: &SpecChange) -> Result<Resource> {
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                let active = sqlx::query_scalar::<_, Uuid>("SELECT run_id FROM run_queue WHERE resource_id = $1")
                    .bind(c.resource)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db("find active run"))?;
                let row = sqlx::query_as::<_, ResourceRow>(
                    "UPDATE resources SET spec = $3, spec_version = spec_version + 1, version = version + 1,
                        applied_spec = CASE WHEN $6 THEN $3 ELSE applied_spec END,
                        applied_version = CASE WHEN $6 THEN spec_version + 1 ELSE applied_version END,
                        updated_at = $4, updated_by = $5
                     WHERE id = $1 AND spec_version = $2 AND deleted_at IS NULL RETURNING *",
                )
                .bind(c.resource)
                .bind(c.from_version)
                .bind(Json(&c.spec))
                .bind(Ts(c.now))
                .bind(&c.actor)
                .bind(c.applied)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("update spec"))?;
                match (active, row) {
                    (Some(run), _) => {
                        drop(tx);
                        let kind = self.kind_of(c.resource).await?;
                        Err(Error::Busy { kind: kind.as_str(), resource: c.resource, run })
                    }
                    (None, Some(row)) => {
                        let version = c.from_version + 1;
                        insert_spec_version(&mut tx, c.resource, version, &c.actor, c.reason.as_deref(), &c.patch, &c.spec, c.now).await?;
                        tx.commit().await.map_err(db("commit"))?;
                        row.try_into()
                    }
                    (None, None) => {
                        drop(tx);
                        let current = self.get_resource_by_id(c.resource).await?;
                        match current {
                            Some(r) => Err(Error::VersionMismatch { expected: c.from_version, current: r.spec_version }),
                            None => Err(Error::NotFound { kind: "resource", key: c.resource.to_string() }),
                        }
                    }
                }
            }

            async fn list_spec_versions(&self, resource: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<SpecVersion>> {
                let rows = sqlx::query_as::<_, SpecVersionRow>(
                    "SELECT * FROM spec_versions WHERE resource_id = $1 AND version < $2 ORDER BY version DESC LIMIT $3",
                )
                .bind(resource)
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db("list spec versions"))?;
                Ok(rows.into_iter().map(SpecVersion::from).collect())
            }

            async fn get_spec_version(&self, resource: Uuid, version: i64) -> Result<Option<SpecVersion>> {
                let row = sqlx::query_as::<_, SpecVersionRow>(
                    "SELECT * FROM spec_versions WHERE resource_id = $1 AND version = $2",
                )
                .bind(resource)
                .bind(version)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("get spec version"))?;
                Ok(row.map(SpecVersion::from))
            }

            async fn delete_resource(&self, id: Uuid, final_state: &str, now: Time) -> Result<()> {
                let done = sqlx::query(
                    "UPDATE resources SET deleted_at = $3 WHERE id = $1 AND state = $2 AND deleted_at IS NULL",
                )
                .bind(id)
                .bind(final_state)
                .bind(Ts(now))
                .execute(&self.pool)
                .await
                .map_err(db("delete resource"))?;
                match done.rows_affected() {
                    1 => Ok(()),
                    _ => {
                        let kind = self.kind_of(id).await?;
                        Err(Error::Moved { kind: kind.as_str(), name: id.to_string(), what: format!("it left {final_state} before it was deleted") })
                    }
                }
            }

            async fn set_observed(&self, id: Uuid, observed: &Value) -> Result<()> {
                sqlx::query("UPDATE resources SET observed = $2 WHERE id = $1")
                    .bind(id)
                    .bind(Json(observed))
                    .execute(&self.pool)
                    .await
                    .map_err(db("record observation"))?;
                Ok(())
            }

            async fn insert_run(&self, run: &NewRun) -> Result<Run> {
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                let inserted = sqlx::query_as::<_, RunRow>(
                    "INSERT INTO runs (id, resource_id, kind, resource_name, action, params, from_state,
                        working_state, ok_state, err_state, status, attempt, max_attempts, actor, reason,
                        idempotency_key, parent_run, provider, timeout_secs, created_at, run_after, settings, environment,
                        spec_version)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', 0, $11, $12, $13, $14, $15, $16, $17, $18, $18, $19, $20,
                        resources.spec_version
                     FROM resources WHERE id = $2 AND state = $7 AND deleted_at IS NULL
                     RETURNING *",
                )
                .bind(run.id)
                .bind(run.resource_id)
                .bind(run.kind.as_str())
                .bind(&run.resource_name)
                .bind(&run.action)
                .bind(Json(&run.params))
                .bind(&run.from_state)
                .bind(&run.working_state)
                .bind(&run.ok_state)
                .bind(&run.err_state)
                .bind(run.max_attempts)
                .bind(&run.actor)
                .bind(&run.reason)
                .bind(&run.idempotency_key)
                .bind(run.parent_run)
                .bind(&run.provider)
                .bind(run.timeout_secs)
                .bind(Ts(run.now))
                .bind(Json(&run.settings))
                .bind(&run.environment)
                .fetch_optional(&mut *tx)
                .await;
                let row = match inserted.map_err(db("insert run"))? {
                    Some(row) => row,
                    None => {
                        return Err(Error::Moved {
                            kind: run.kind.as_str(),
                            name: run.resource_name.clone(),
                            what: format!("it is no longer {}; look again before asking", run.from_state),
                        })
                    }
                };
                let queued = sqlx::query("INSERT INTO run_queue (run_id, resource_id, run_after) VALUES ($1, $2, $3)")
                    .bind(run.id)
                    .bind(run.resource_id)
                    .bind(Ts(run.now))
                    .execute(&mut *tx)
                    .await;
                match queued {
                    Ok(_) => {}
                    Err(e) if is_unique(&e) => {
                        drop(tx);
                        let active = self.active_run(run.resource_id).await?;
                        return Err(match active {
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
                insert_event_unfenced(&mut tx, run.id, &NewEvent::info("request", by)).await?;
                if let Some(notify) = $store::NOTIFY_SQL {
                    sqlx::query(notify).execute(&mut *tx).await.map_err(db("notify"))?;
                }
                tx.commit().await.map_err(db("commit"))?;
                self.wake();
                row.try_into()
            }

            async fn get_run(&self, id: Uuid) -> Result<Option<Run>> {
                sqlx::query_as::<_, RunRow>("SELECT * FROM runs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db("get run"))?
                    .map(TryInto::try_into)
                    .transpose()
            }

            async fn list_runs(&self, f: &RunFilter, page: PageRequest) -> Result<Vec<Run>> {
                // Finished runs of one outcome come from `run_outcomes`
                // (keyed by outcome and run id, and indexed by action,
                // outcome and run id), newest first; active ones through
                // the queue, which is small.
                let finished = f.status.filter(|s| s.is_terminal());
                let (mut q, id) = match finished {
                    Some(v) => {
                        let mut q = QueryBuilder::<$db>::new(
                            "SELECT runs.* FROM run_outcomes o JOIN runs ON runs.id = o.run_id WHERE o.outcome = ",
                        );
                        q.push_bind(v.as_str());
                        (q, "o.run_id")
                    }
                    None => (QueryBuilder::<$db>::new("SELECT * FROM runs WHERE 1 = 1"), "runs.id"),
                };
                if let Some(v) = f.resource {
                    q.push(" AND resource_id = ").push_bind(v);
                }
                // The filters `run_outcomes` carries are read there (its
                // key's index holds them), the rest from `runs`.
                let on = if finished.is_some() { "o." } else { "" };
                if let Some(v) = f.kind {
                    q.push(format_args!(" AND {on}kind = ")).push_bind(v.as_str());
                }
                if let Some(v) = &f.action {
                    q.push(format_args!(" AND {on}action = ")).push_bind(v.clone());
                }
                if let Some(v) = f.status.filter(|s| !s.is_terminal()) {
                    q.push(" AND status = ").push_bind(v.as_str()).push(" AND id IN (SELECT run_id FROM run_queue)");
                }
                if let Some(v) = f.since {
                    q.push(" AND created_at >= ").push_bind(Ts(v));
                }
                if let Some(v) = f.until {
                    q.push(" AND created_at < ").push_bind(Ts(v));
                }
                if let Some(v) = &f.environment {
                    q.push(format_args!(" AND {on}environment = ")).push_bind(v.clone());
                }
                if let Some(v) = &f.actor {
                    q.push(format_args!(" AND {on}actor = ")).push_bind(v.clone());
                }
                if let Some(v) = f.parent {
                    q.push(" AND parent_run = ").push_bind(v);
                }
                if let Some(v) = page.after {
                    q.push(format_args!(" AND {id} < ")).push_bind(v);
                }
                q.push(format_args!(" ORDER BY {id} DESC LIMIT ")).push_bind(i64::from(page.limit));
                runs(q.build_query_as::<RunRow>().fetch_all(&self.pool).await.map_err(db("list runs"))?)
            }

            async fn active_run(&self, resource: Uuid) -> Result<Option<Run>> {
                sqlx::query_as::<_, RunRow>(
                    "SELECT runs.* FROM run_queue JOIN runs ON runs.id = run_queue.run_id WHERE run_queue.resource_id = $1",
                )
                .bind(resource)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("get active run"))?
                .map(TryInto::try_into)
                .transpose()
            }

            async fn last_unsuccessful_run(&self, resource: Uuid) -> Result<Option<Run>> {
                sqlx::query_as::<_, RunRow>(
                    "SELECT * FROM runs WHERE resource_id = $1 AND status IN ('failed', 'cancelled')
                     ORDER BY id DESC LIMIT 1",
                )
                .bind(resource)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("get failed run"))?
                .map(TryInto::try_into)
                .transpose()
            }

            async fn claim_jobs(&self, worker: &str, lease: Duration, limit: u32, now: Time) -> Result<Vec<(Run, Resource)>> {
                let terms = ClaimTerms { worker, token: Uuid::new_v4(), expires: now + lease_len(lease), now };
                let mut claimed = Vec::new();
                if let Some(after) = self.cursor.start() {
                    claimed = self.claim_batch(&terms, limit, Some(after)).await?;
                }
                if claimed.len() < limit as usize {
                    // From the start of the queue: what the scan past the
                    // cursor missed (runs due earlier that came later).
                    let rest = limit - claimed.len() as u32;
                    claimed.extend(self.claim_batch(&terms, rest, None).await?);
                    self.cursor.scanned_from_start();
                }
                self.cursor.advance(claimed.iter().map(|c| c.due).max());
                let mut out = Vec::with_capacity(claimed.len());
                for c in claimed {
                    match c.resource {
                        Some(resource) => out.push((c.run, resource)),
                        None => {
                            // Its lease is ours: if this fails, the reaper
                            // queues the run again when the lease lapses.
                            if let Err(e) = fail_unclaimable(&self.pool, &c.run, now).await {
                                tracing::warn!(run = %c.run.id, error = %e, "could not fail a run whose resource moved");
                            }
                        }
                    }
                }
                Ok(out)
            }

            async fn heartbeat(&self, lease: Lease, lease_for: Duration, now: Time) -> Result<Option<bool>> {
                let expires = Ts(now + lease_len(lease_for));
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                let row = sqlx::query_scalar::<_, Option<Ts>>(
                    "UPDATE runs SET lease_expires_at = $3, heartbeat_at = $4
                     WHERE id = $1 AND lease_token = $2 AND status = 'running' RETURNING cancel_requested_at",
                )
                .bind(lease.run)
                .bind(lease.token)
                .bind(expires)
                .bind(Ts(now))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("heartbeat"))?;
                let Some(cancel) = row else {
                    return Ok(None);
                };
                sqlx::query("UPDATE run_queue SET lease_expires_at = $2 WHERE run_id = $1")
                    .bind(lease.run)
                    .bind(expires)
                    .execute(&mut *tx)
                    .await
                    .map_err(db("extend the lease in the queue"))?;
                tx.commit().await.map_err(db("commit heartbeat"))?;
                Ok(Some(cancel.is_some()))
            }

            async fn append_event(&self, lease: Lease, event: &NewEvent) -> Result<()> {
                let mut conn = self.pool.acquire().await.map_err(db("acquire"))?;
                insert_event_fenced(&mut conn, lease, event).await
            }

            async fn complete_run(&self, lease: Lease, c: &Completion) -> Result<()> {
                $store::complete_together(&self.pool, &[(lease, c)]).await?.remove(0)
            }

            async fn complete_runs(&self, batch: &[(Lease, Completion)]) -> Vec<Result<()>> {
                let items: Vec<(Lease, &Completion)> = batch.iter().map(|(l, c)| (*l, c)).collect();
                if items.len() > 1 {
                    match $store::complete_together(&self.pool, &items).await {
                        Ok(results) => return results,
                        Err(e) => tracing::debug!(error = %e, "batched completion failed; completing one by one"),
                    }
                }
                // One by one: each gets its own answer, errors included.
                let mut out = Vec::with_capacity(items.len());
                for item in &items {
                    out.push($store::complete_together(&self.pool, std::slice::from_ref(item)).await.and_then(|mut r| r.remove(0)));
                }
                out
            }

            async fn retry_later(&self, lease: Lease, run_after: Time, error: &RunError, event: &NewEvent) -> Result<()> {
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                insert_event_fenced(&mut tx, lease, event).await?;
                let done = sqlx::query(
                    "UPDATE runs SET status = 'queued', run_after = $3, error = $4, lease_token = NULL,
                        lease_expires_at = NULL, worker = NULL
                     WHERE id = $1 AND lease_token = $2 AND status = 'running'",
                )
                .bind(lease.run)
                .bind(lease.token)
                .bind(Ts(run_after))
                .bind(Json(error))
                .execute(&mut *tx)
                .await
                .map_err(db("requeue run"))?;
                if done.rows_affected() != 1 {
                    return Err(Error::StaleLease { run: lease.run });
                }
                requeue(&mut tx, lease.run, run_after).await?;
                tx.commit().await.map_err(db("commit requeue"))?;
                self.wake();
                Ok(())
            }

            async fn reap_expired(&self, now: Time) -> Result<Vec<Uuid>> {
                let expired = sqlx::query_as::<_, RunRow>(
                    "SELECT runs.* FROM run_queue JOIN runs ON runs.id = run_queue.run_id
                     WHERE run_queue.lease_expires_at < $1 ORDER BY run_queue.lease_expires_at LIMIT 100",
                )
                .bind(Ts(now))
                .fetch_all(&self.pool)
                .await
                .map_err(db("find expired leases"))?;
                let mut reaped = Vec::new();
                for row in expired {
                    let run: Run = row.try_into()?;
                    let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                    if run.status != RunStatus::Running {
                        // A queue row out of step with its run, which the
                        // claim leased and started nothing for (a broken
                        // invariant): bring it back in line.
                        tracing::warn!(run = %run.id, status = run.status.as_str(), "queue row leased for a run that is not running; repairing");
                        match run.status {
                            RunStatus::Queued => requeue(&mut tx, run.id, run.run_after).await?,
                            _ => dequeue(&mut tx, run.id).await?,
                        }
                        tx.commit().await.map_err(db("commit queue repair"))?;
                        continue;
                    }
                    let out_of_attempts = run.attempt >= run.max_attempts;
                    let (status, message) = if out_of_attempts {
                        ("failed", format!("lease of attempt {} lapsed and no attempts are left", run.attempt))
                    } else {
                        ("queued", format!("lease of attempt {} lapsed (worker gone?); run requeued", run.attempt))
                    };
                    let error = RunError { code: "lease_expired".into(), message: message.clone(), retryable: !out_of_attempts, detail: None };
                    // Fenced on the lease we saw: a heartbeat or another
                    // reaper that got there first wins.
                    let done = sqlx::query(
                        "UPDATE runs SET status = $3, outcome = CASE WHEN $3 = 'failed' THEN $3 END, error = $4, lease_token = NULL,
                            lease_expires_at = NULL,
                            worker = NULL, run_after = $5, finished_at = CASE WHEN $3 = 'failed' THEN $5 ELSE NULL END
                         WHERE id = $1 AND lease_token = $2 AND status = 'running' AND lease_expires_at < $5",
                    )
                    .bind(run.id)
                    .bind(run.lease_token)
                    .bind(status)
                    .bind(Json(&error))
                    .bind(Ts(now))
                    .execute(&mut *tx)
                    .await
                    .map_err(db("reap run"))?;
                    if done.rows_affected() != 1 {
                        continue;
                    }
                    if out_of_attempts {
                        dequeue(&mut tx, run.id).await?;
                        record_finished(&mut tx, &[run.id]).await?;
                        sqlx::query("UPDATE resources SET state = $3, version = version + 1, updated_at = $4 WHERE id = $1 AND state = $2")
                            .bind(run.resource_id)
                            .bind(&run.working_state)
                            .bind(&run.err_state)
                            .bind(Ts(now))
                            .execute(&mut *tx)
                            .await
                            .map_err(db("fail reaped resource"))?;
                    } else {
                        requeue(&mut tx, run.id, now).await?;
                    }
                    insert_event_unfenced(&mut tx, run.id, &NewEvent::info("reaper", message).with_level(Level::Warn)).await?;
                    tx.commit().await.map_err(db("commit reap"))?;
                    reaped.push(run.id);
                }
                if !reaped.is_empty() {
                    self.wake();
                }
                Ok(reaped)
            }

            async fn request_cancel(&self, id: Uuid, actor: &str, reason: Option<&str>, now: Time) -> Result<Run> {
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                let error = RunError { code: "cancelled".into(), message: format!("cancelled by {actor} before it started"), retryable: false, detail: None };
                // A queued run ends at once. If an earlier attempt had already
                // moved the resource to its working state, it leaves it for
                // the failure state, whose exits are retry and destroy.
                // The queue row first, as the claim takes it: a run being
                // claimed right now is running once this gets the row.
                let unleased: Option<Uuid> =
                    sqlx::query_scalar("DELETE FROM run_queue WHERE run_id = $1 AND lease_expires_at IS NULL RETURNING run_id")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db("take a queued run off the queue"))?;
                let queued = match unleased {
                    Some(_) => {
                        let row = sqlx::query_as::<_, RunRow>(
                            "UPDATE runs SET status = 'cancelled', outcome = 'cancelled', finished_at = $2, error = $5,
                                cancel_requested_at = $2, cancel_requested_by = $3, cancel_reason = $4
                             WHERE id = $1 AND status = 'queued' RETURNING *",
                        )
                        .bind(id)
                        .bind(Ts(now))
                        .bind(actor)
                        .bind(reason)
                        .bind(Json(&error))
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db("cancel queued run"))?
                        .ok_or_else(|| Error::Internal(format!("run {id} had an unleased queue row but was not queued")))?;
                        let run: Run = row.try_into()?;
                        record_finished(&mut tx, &[run.id]).await?;
                        Some((run.resource_id, run.working_state, run.err_state))
                    }
                    None => None,
                };
                let message = match &queued {
                    Some((resource, working, err)) => {
                        sqlx::query("UPDATE resources SET state = $3, version = version + 1, updated_at = $4 WHERE id = $1 AND state = $2")
                            .bind(resource)
                            .bind(working)
                            .bind(err)
                            .bind(Ts(now))
                            .execute(&mut *tx)
                            .await
                            .map_err(db("cancel resource"))?;
                        format!("cancelled by {actor} while queued")
                    }
                    None => {
                        sqlx::query(
                            "UPDATE runs SET cancel_requested_at = COALESCE(cancel_requested_at, $2),
                                cancel_requested_by = COALESCE(cancel_requested_by, $3),
                                cancel_reason = COALESCE(cancel_reason, $4)
                             WHERE id = $1 AND status = 'running'",
                        )
                        .bind(id)
                        .bind(Ts(now))
                        .bind(actor)
                        .bind(reason)
                        .execute(&mut *tx)
                        .await
                        .map_err(db("request cancel"))?;
                        format!("cancel requested by {actor}; the worker stops at its next step")
                    }
                };
                let message = match reason {
                    Some(r) => format!("{message}: {r}"),
                    None => message,
                };
                insert_event_unfenced(&mut tx, id, &NewEvent::info("cancel", message).with_level(Level::Warn)).await?;
                tx.commit().await.map_err(db("commit cancel"))?;
                self.get_run(id).await?.ok_or_else(|| Error::NotFound { kind: "transition", key: id.to_string() })
            }

            async fn list_events(&self, run: Uuid, after: i64, limit: u32) -> Result<Vec<RunEvent>> {
                let rows = sqlx::query_as::<_, EventRow>(
                    "SELECT * FROM run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(run)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db("list events"))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn queue_depth(&self, now: Time) -> Result<QueueDepth> {
                let (due, waiting, running) = sqlx::query_as::<_, (i64, i64, i64)>(
                    "SELECT
                        (SELECT COUNT(*) FROM run_queue WHERE lease_expires_at IS NULL AND run_after <= $1),
                        (SELECT COUNT(*) FROM run_queue WHERE lease_expires_at IS NULL AND run_after > $1),
                        (SELECT COUNT(*) FROM run_queue WHERE lease_expires_at IS NOT NULL)",
                )
                .bind(Ts(now))
                .fetch_one(&self.pool)
                .await
                .map_err(db("measure the queue"))?;
                Ok(QueueDepth { due, waiting, running })
            }

            async fn rollups(
                &self,
                grain: drover_domain::stats::Grain,
                since: Time,
                until: Time,
                f: &drover_domain::stats::RollupFilter,
            ) -> Result<Vec<drover_domain::stats::Rollup>> {
                let mut q = QueryBuilder::<$db>::new(format!("SELECT {} FROM run_rollups WHERE grain = ", crate::rows::ROLLUP_COLUMNS));
                q.push_bind(grain.as_str());
                q.push(" AND bucket >= ").push_bind(Ts(since));
                q.push(" AND bucket < ").push_bind(Ts(until));
                for (column, value) in [("kind", &f.kind), ("action", &f.action), ("environment", &f.environment), ("actor", &f.actor)] {
                    if let Some(v) = value {
                        q.push(format!(" AND {column} = ")).push_bind(v.clone());
                    }
                }
                if f.actor.is_none() {
                    q.push(" AND actor <> ").push_bind(drover_domain::stats::ALL_ACTORS);
                }
                let rows = q.build_query_as::<RollupRow>().fetch_all(&self.pool).await.map_err(db("read rollups"))?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn fold_rollups(&self, limit: u32) -> Result<usize> {
                use drover_domain::stats::{FinishedRun, Rollup};
                let mut tx = self.pool.begin().await.map_err(db("begin"))?;
                sqlx::query($fold_lock).execute(&mut *tx).await.map_err(db("take the rollup folder's turn"))?;
                // The ids first, then their runs by primary key: a join lets
                // the planner, whose statistics saw an empty pending table,
                // scan the whole ledger for a few hundred runs.
                let ids: Vec<Uuid> = sqlx::query_scalar("SELECT run_id FROM rollup_pending ORDER BY run_id LIMIT $1")
                    .bind(i64::from(limit))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db("read runs pending for the rollups"))?;
                if ids.is_empty() {
                    return Ok(0);
                }
                let mut q = QueryBuilder::<$db>::new(
                    "SELECT id, kind, action, environment, actor, status, created_at, started_at, finished_at FROM runs WHERE ",
                );
                $store::push_in(&mut q, "id", &ids);
                let pending = q.build_query_as::<FinishedRunRow>().fetch_all(&mut *tx).await.map_err(db("read runs pending for the rollups"))?;
                let runs = pending.into_iter().map(FinishedRun::try_from).collect::<Result<Vec<_>>>()?;
                let mut rows = drover_domain::stats::fold(&runs);
                // Add what the rows already hold. Folders take turns, so
                // nothing changes them between this read and the write.
                let keys: Vec<_> = rows.keys().cloned().collect();
                for chunk in keys.chunks(500) {
                    let mut q = QueryBuilder::<$db>::new(format!(
                        "SELECT {} FROM run_rollups WHERE (grain, bucket, kind, action, environment, actor) IN (VALUES ",
                        crate::rows::ROLLUP_COLUMNS
                    ));
                    for (n, k) in chunk.iter().enumerate() {
                        q.push(if n == 0 { "(" } else { ", (" });
                        let mut t = q.separated(", ");
                        t.push_bind(k.grain.as_str()).push_bind(Ts(k.bucket)).push_bind(&k.kind).push_bind(&k.action);
                        t.push_bind(&k.environment).push_bind(&k.actor);
                        q.push(")");
                    }
                    q.push(")");
                    let old = q.build_query_as::<RollupRow>().fetch_all(&mut *tx).await.map_err(db("read rollups to fold into"))?;
                    for row in old {
                        let old = Rollup::try_from(row)?;
                        if let Some(t) = rows.get_mut(&old.key) {
                            t.merge(&old.totals);
                        }
                    }
                }
                let rows: Vec<_> = rows.into_iter().collect();
                for chunk in rows.chunks(400) {
                    let mut q = QueryBuilder::<$db>::new(format!("INSERT INTO run_rollups ({}) ", crate::rows::ROLLUP_COLUMNS));
                    q.push_values(chunk, |mut b, (k, t)| {
                        b.push_bind(k.grain.as_str()).push_bind(Ts(k.bucket)).push_bind(&k.kind).push_bind(&k.action);
                        b.push_bind(&k.environment).push_bind(&k.actor);
                        for o in &t.outcomes {
                            b.push_bind(o.count).push_bind(o.timed).push_bind(o.sum_ms);
                        }
                        b.push_bind(t.max_ms).push_bind(t.hist.encode());
                    });
                    q.push(
                        " ON CONFLICT (grain, bucket, kind, action, environment, actor) DO UPDATE SET
                         succeeded = excluded.succeeded, succeeded_timed = excluded.succeeded_timed,
                         succeeded_ms = excluded.succeeded_ms, failed = excluded.failed,
                         failed_timed = excluded.failed_timed, failed_ms = excluded.failed_ms,
                         cancelled = excluded.cancelled, cancelled_timed = excluded.cancelled_timed,
                         cancelled_ms = excluded.cancelled_ms, max_ms = excluded.max_ms, hist = excluded.hist",
                    );
                    q.build().execute(&mut *tx).await.map_err(db("write rollups"))?;
                }
                for chunk in ids.chunks(1000) {
                    let mut q = QueryBuilder::<$db>::new("DELETE FROM rollup_pending WHERE ");
                    $store::push_in(&mut q, "run_id", chunk);
                    q.build().execute(&mut *tx).await.map_err(db("clear folded runs"))?;
                }
                tx.commit().await.map_err(db("commit rollups"))?;
                Ok(ids.len())
            }

            async fn idempotency_begin(&self, key: &str, fingerprint: &str, now: Time) -> Result<IdempotencyBegin> {
                // The key may vanish between the insert and the read (a
                // concurrent request with it failed and abandoned it): then
                // try to take it again.
                let mut attempts = 0;
                let row = loop {
                    let inserted = sqlx::query(
                        "INSERT INTO idempotency_keys (key, fingerprint, state, created_at, updated_at)
                         VALUES ($1, $2, 'pending', $3, $3) ON CONFLICT (key) DO NOTHING",
                    )
                    .bind(key)
                    .bind(fingerprint)
                    .bind(Ts(now))
                    .execute(&self.pool)
                    .await
                    .map_err(db("record idempotency key"))?;
                    if inserted.rows_affected() == 1 {
                        return Ok(IdempotencyBegin::Proceed);
                    }
                    let row = sqlx::query_as::<_, IdempotencyRow>("SELECT * FROM idempotency_keys WHERE key = $1")
                        .bind(key)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db("read idempotency key"))?;
                    match row {
                        Some(row) => break row,
                        None if attempts < 3 => attempts += 1,
                        // Contended that hard, it is in progress somewhere.
                        None => return Ok(IdempotencyBegin::InProgress),
                    }
                };
                if row.fingerprint != fingerprint {
                    return Ok(IdempotencyBegin::Mismatch);
                }
                if row.state == "done" {
                    return Ok(IdempotencyBegin::Replay(SavedResponse {
                        status: row.response_status.unwrap_or(200) as u16,
                        location: row.location,
                        body: row.body.unwrap_or_default(),
                    }));
                }
                // A pending key whose request died with its server is taken
                // over after a while, so that the key is not stuck forever.
                if now - row.updated_at.0 > chrono::Duration::minutes(5) {
                    let taken = sqlx::query(
                        "UPDATE idempotency_keys SET updated_at = $2 WHERE key = $1 AND state = 'pending' AND updated_at = $3",
                    )
                    .bind(key)
                    .bind(Ts(now))
                    .bind(row.updated_at)
                    .execute(&self.pool)
                    .await
                    .map_err(db("take over idempotency key"))?;
                    if taken.rows_affected() == 1 {
                        return Ok(IdempotencyBegin::Proceed);
                    }
                }
                Ok(IdempotencyBegin::InProgress)
            }

            async fn idempotency_save(&self, key: &str, r: &SavedResponse, now: Time) -> Result<()> {
                sqlx::query(
                    "UPDATE idempotency_keys SET state = 'done', response_status = $2, location = $3, body = $4, updated_at = $5
                     WHERE key = $1",
                )
                .bind(key)
                .bind(i32::from(r.status))
                .bind(&r.location)
                .bind(&r.body)
                .bind(Ts(now))
                .execute(&self.pool)
                .await
                .map_err(db("save idempotent response"))?;
                Ok(())
            }

            async fn idempotency_abandon(&self, key: &str) -> Result<()> {
                sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND state = 'pending'")
                    .bind(key)
                    .execute(&self.pool)
                    .await
                    .map_err(db("abandon idempotency key"))?;
                Ok(())
            }

            async fn wait_for_work(&self, max: Duration) {
                let _ = tokio::time::timeout(max, self.wakeup.notified()).await;
            }
        }

        impl $store {
            fn wake(&self) {
                self.wakeup.notify_one();
            }

            async fn kind_of(&self, id: Uuid) -> Result<Kind> {
                let kind: String = sqlx::query_scalar("SELECT kind FROM resources WHERE id = $1")
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db("get kind"))?;
                Kind::parse(&kind).ok_or_else(|| Error::Internal(format!("unknown kind {kind:?}")))
            }
        }

        async fn insert_event_fenced(conn: &mut <$db as sqlx::Database>::Connection, lease: Lease, e: &NewEvent) -> Result<()> {
            let done = sqlx::query(
                "INSERT INTO run_events (run_id, at, attempt, level, step, message, data)
                 SELECT id, $3, attempt, $4, $5, $6, $7 FROM runs WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            )
            .bind(lease.run)
            .bind(lease.token)
            .bind(Ts(e.at))
            .bind(e.level.as_str())
            .bind(&e.step)
            .bind(&e.message)
            .bind(e.data.as_ref().map(Json))
            .execute(&mut *conn)
            .await
            .map_err(db("append event"))?;
            match done.rows_affected() {
                1 => Ok(()),
                _ => Err(Error::StaleLease { run: lease.run }),
            }
        }

        /// Notes runs that have just ended, in the transaction that ended
        /// them: their outcome, for the status filters of history, and an
        /// entry for the rollup folder. Every way a run ends calls this
        /// (the Postgres completion does the same in its one statement).
        /// Appends a spec version (the caller's transaction wrote the spec).
        #[allow(clippy::too_many_arguments)]
        async fn insert_spec_version(
            conn: &mut <$db as sqlx::Database>::Connection,
            resource: Uuid,
            version: i64,
            actor: &str,
            reason: Option<&str>,
            patch: &Value,
            spec: &Value,
            now: Time,
        ) -> Result<()> {
            sqlx::query(
                "INSERT INTO spec_versions (resource_id, version, actor, reason, patch, spec, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(resource)
            .bind(version)
            .bind(actor)
            .bind(reason)
            .bind(Json(patch))
            .bind(Json(spec))
            .bind(Ts(now))
            .execute(&mut *conn)
            .await
            .map_err(db("record spec version"))?;
            Ok(())
        }

        async fn record_finished(conn: &mut <$db as sqlx::Database>::Connection, ids: &[Uuid]) -> Result<()> {
            let mut q = QueryBuilder::<$db>::new(
                "INSERT INTO run_outcomes (outcome, run_id, action, kind, environment, actor)
                 SELECT status, id, action, kind, environment, actor FROM runs WHERE ",
            );
            $store::push_in(&mut q, "id", ids);
            q.build().execute(&mut *conn).await.map_err(db("record outcomes"))?;
            let mut q = QueryBuilder::<$db>::new("INSERT INTO rollup_pending (run_id) SELECT id FROM runs WHERE ");
            $store::push_in(&mut q, "id", ids);
            q.build().execute(&mut *conn).await.map_err(db("mark runs for the rollups"))?;
            Ok(())
        }

        /// Fails a run that a claim started but whose resource had left its
        /// `from_state` meanwhile, fenced on the claim's lease.
        async fn fail_unclaimable(pool: &sqlx::Pool<$db>, run: &Run, now: Time) -> Result<()> {
            let error = RunError {
                code: "state_conflict".into(),
                message: format!("the resource left {} before work started", run.from_state),
                retryable: false,
                detail: None,
            };
            let mut tx = pool.begin().await.map_err(db("begin"))?;
            let done = sqlx::query(
                "UPDATE runs SET status = 'failed', outcome = 'failed', finished_at = $3, error = $4, lease_expires_at = NULL
                 WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            )
            .bind(run.id)
            .bind(run.lease_token)
            .bind(Ts(now))
            .bind(Json(&error))
            .execute(&mut *tx)
            .await
            .map_err(db("fail unclaimable run"))?;
            if done.rows_affected() != 1 {
                return Err(Error::StaleLease { run: run.id });
            }
            dequeue(&mut tx, run.id).await?;
            record_finished(&mut tx, &[run.id]).await?;
            insert_event_unfenced(&mut tx, run.id, &NewEvent::info("claim", error.message).with_level(Level::Error)).await?;
            tx.commit().await.map_err(db("commit unclaimable run"))
        }

        /// Takes a run that has ended off the queue.
        async fn dequeue(conn: &mut <$db as sqlx::Database>::Connection, run: Uuid) -> Result<()> {
            sqlx::query("DELETE FROM run_queue WHERE run_id = $1")
                .bind(run)
                .execute(&mut *conn)
                .await
                .map_err(db("take a run off the queue"))?;
            Ok(())
        }

        /// Puts a run that was running back in the queue, due at `run_after`.
        async fn requeue(conn: &mut <$db as sqlx::Database>::Connection, run: Uuid, run_after: Time) -> Result<()> {
            sqlx::query("UPDATE run_queue SET run_after = $2, lease_expires_at = NULL WHERE run_id = $1")
                .bind(run)
                .bind(Ts(run_after))
                .execute(&mut *conn)
                .await
                .map_err(db("queue a run again"))?;
            Ok(())
        }

        /// Events written by the store itself (request, cancel, reaper), not
        /// by the worker holding the lease.
        async fn insert_event_unfenced(conn: &mut <$db as sqlx::Database>::Connection, run: Uuid, e: &NewEvent) -> Result<()> {
            sqlx::query(
                "INSERT INTO run_events (run_id, at, attempt, level, step, message, data)
                 SELECT id, $2, attempt, $3, $4, $5, $6 FROM runs WHERE id = $1",
            )
            .bind(run)
            .bind(Ts(e.at))
            .bind(e.level.as_str())
            .bind(&e.step)
            .bind(&e.message)
            .bind(e.data.as_ref().map(Json))
            .execute(&mut *conn)
            .await
            .map_err(db("append event"))?;
            Ok(())
        }
    };
}

pub(crate) use impl_store;

/// What every run of one claim gets: its worker, lease token and lease
/// expiry, and the claim's time (started, heartbeat, due at or before).
#[derive(Clone, Copy)]
pub(crate) struct ClaimTerms<'a> {
    pub(crate) worker: &'a str,
    pub(crate) token: uuid::Uuid,
    pub(crate) expires: drover_domain::model::Time,
    pub(crate) now: drover_domain::model::Time,
}

/// A run one claim statement started: its resource as the claim left it
/// (`None` when the resource had left the run's `from_state`, and the run
/// must fail), and its queue row's place in the due order (for the cursor).
pub(crate) struct Claimed {
    pub(crate) run: drover_domain::model::Run,
    pub(crate) resource: Option<drover_domain::model::Resource>,
    pub(crate) due: (drover_domain::model::Time, uuid::Uuid),
}

/// Where the last claim of this store ended in `run_queue`'s due order.
///
/// Claimed and finished queue rows leave dead entries at the front of the
/// due index until vacuum removes them, and a scan from the start walks
/// them all: under a long backlog that walk was most of a claim's cost. So
/// a claim starts past the last row the previous one took, and scans from
/// the start only when that comes up short or a second has passed since it
/// last did: a run due earlier than the cursor that appears later (another
/// replica's clock behind, or a run id sorting lower within the same
/// microsecond) waits at most that second longer.
#[derive(Default)]
pub(crate) struct ClaimCursor(std::sync::Mutex<CursorState>);

#[derive(Default)]
struct CursorState {
    after: Option<(drover_domain::model::Time, uuid::Uuid)>,
    from_start: Option<std::time::Instant>,
}

impl ClaimCursor {
    /// Where to start: past the cursor, or `None` for the front.
    pub(crate) fn start(&self) -> Option<(drover_domain::model::Time, uuid::Uuid)> {
        let state = self.0.lock().expect("not poisoned");
        let fresh = state.from_start.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1));
        if fresh {
            state.after
        } else {
            None
        }
    }

    pub(crate) fn scanned_from_start(&self) {
        self.0.lock().expect("not poisoned").from_start = Some(std::time::Instant::now());
    }

    /// Moves past the last row claimed; a claim that took nothing forgets
    /// the cursor.
    pub(crate) fn advance(&self, last: Option<(drover_domain::model::Time, uuid::Uuid)>) {
        self.0.lock().expect("not poisoned").after = last;
    }
}

use drover_domain::Error;

/// Wraps a database error with what the store was trying to do.
pub(crate) fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::store(op, e)
}

pub(crate) fn is_unique(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

pub(crate) fn lease_len(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::seconds(30))
}
