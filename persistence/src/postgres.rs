//! The Postgres store: production, shared by several `drover serve`
//! replicas. Claims use `FOR UPDATE SKIP LOCKED`; `LISTEN/NOTIFY` on
//! `drover_runs` wakes idle workers early (a hint only: they poll anyway).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use drover_domain::model::*;
use drover_domain::{Error, Result};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, Postgres};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Connection, FromRow, Row, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::rows::*;
use crate::sql::{Backend, Exec, Param, Record, Sql, Ty};
use crate::store::{db, ClaimTerms, Claimed, SqlStore};
use crate::time::Ts;

/// Drover's store on Postgres.
pub type PgStore = SqlStore<PgBackend>;

/// A Postgres database: its pool of sessions, and the few sessions the
/// claims go out on.
pub struct PgBackend {
    pool: PgPool,
    /// Sessions that plan a statement once (`plan_cache_mode =
    /// force_generic_plan`), for the claim alone: left to choose, Postgres
    /// plans the claim afresh at every call (a custom plan, about a fifth of
    /// the claim's time in Postgres), and the generic plan is the same one.
    /// Not for every statement: a generic plan of the observer's and the
    /// lists' queries can be much worse than a custom one. One per lane and
    /// a spare, opened when first needed.
    claims: PgPool,
}
/// A pooled connection idle for longer than this is pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The server ends a session of ours that sits this long inside a
/// transaction. Drover's transactions never wait on anything but the
/// process that opened them, so a session idle that long belongs to a
/// replica that is frozen (SIGSTOP, a VM paused, a partition): without
/// this its row locks (a heartbeat holds its run's row between two
/// statements) and the rollup folders' advisory lock would stall every
/// other replica's reaper and folder until it woke.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// One claim as one statement (its own transaction): lease due queue rows,
/// oldest first (with `$extra` added to the scan's condition), start their
/// runs, move their resources to the working states, record each attempt's
/// start, and return each run beside its resource (columns `r_…`; none when
/// the resource had left the run's `from_state`) and its queue row's due
/// time. Parameters: `$1` now, `$2` limit, `$3` lease expiry, `$4` worker,
/// `$5` lease token, the lane's `$6` count and `$7` index, then the
/// cursor's `$8` due time and `$9` run id, then the providers claimed (`$8`
/// or `$10`), when the claim names them.
macro_rules! claim {
    ($extra:literal) => {
        concat!(
            "WITH due AS (
                SELECT run_id FROM run_queue
                WHERE lease_expires_at IS NULL AND run_after <= $1
                    AND get_byte(uuid_send(run_id), 15) % $6::int = $7::int",
            $extra,
            "
                ORDER BY run_after, run_id
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE run_queue q SET lease_expires_at = $3
                FROM due WHERE q.run_id = due.run_id
                RETURNING q.run_id, q.run_after
            ), started AS (
                UPDATE runs SET status = 'running', attempt = attempt + 1, worker = $4::text, lease_token = $5,
                    lease_expires_at = $3, heartbeat_at = $1, started_at = COALESCE(started_at, $1)
                FROM leased WHERE runs.id = leased.run_id AND runs.status = 'queued'
                RETURNING runs.*, leased.run_after AS queue_due
            ), moved AS (
                UPDATE resources r SET state = s.working_state, version = r.version + 1, updated_at = $1
                FROM started s
                WHERE r.id = s.resource_id AND (r.state = s.from_state OR r.state = s.working_state)
                    AND r.deleted_at IS NULL
                RETURNING r.id AS r_id, r.kind AS r_kind, r.name AS r_name, r.state AS r_state, r.spec AS r_spec,
                    r.version AS r_version, r.spec_version AS r_spec_version,
                    r.applied_version AS r_applied_version, r.applied_spec AS r_applied_spec,
                    r.outputs AS r_outputs, r.observed AS r_observed,
                    r.created_by AS r_created_by, r.updated_by AS r_updated_by, r.created_at AS r_created_at,
                    r.updated_at AS r_updated_at
            ), attempts AS (
                INSERT INTO run_events (run_id, at, attempt, level, step, message)
                SELECT s.id, $1, s.attempt, 'info', 'attempt',
                    'attempt ' || s.attempt || ' of ' || s.max_attempts || ' started on ' || $4::text
                FROM started s JOIN moved m ON m.r_id = s.resource_id
            )
            SELECT s.*, m.* FROM started s LEFT JOIN moved m ON m.r_id = s.resource_id"
        )
    };
}

/// Completes a batch of runs as one statement (its own transaction), from
/// one array per field: each run's outcome (fenced on its lease), its queue
/// row's removal, its resource's new state (and spec, as a new spec
/// version, and applied spec), its event, its `run_outcomes` row and its
/// rollup note. Returns the runs it completed; a resource not
/// in its working state raises `DR001` (naming it), which undoes all of it.
const COMPLETE: &str = "
    WITH v AS (
        SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::jsonb[], $6::jsonb[],
            $7::text[], $8::jsonb[], $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::jsonb[],
            $14::jsonb[], $15::bool[], $16::jsonb[])
            AS v(run_id, token, status, at, outputs, error, state, spec, event_at, level, step, message, data,
                patch, applies, applied)
    ), done AS (
        UPDATE runs SET status = v.status, outcome = v.status, finished_at = v.at, outputs = v.outputs,
            error = v.error, lease_expires_at = NULL
        FROM v WHERE runs.id = v.run_id AND runs.lease_token = v.token AND runs.status = 'running'
        RETURNING runs.id, runs.resource_id, runs.working_state, runs.attempt, runs.action, runs.kind,
            runs.environment, runs.actor, runs.reason, v.status, v.at,
            v.outputs, v.state, v.spec, v.event_at, v.level, v.step, v.message, v.data, v.patch, v.applies, v.applied
    ), off_queue AS (
        DELETE FROM run_queue q USING done WHERE q.run_id = done.id
    ), moved AS (
        UPDATE resources r SET state = d.state, spec = COALESCE(d.spec, r.spec),
            spec_version = r.spec_version + (d.spec IS NOT NULL)::int,
            applied_spec = CASE WHEN d.applies THEN COALESCE(d.spec, r.spec) ELSE COALESCE(d.applied, r.applied_spec) END,
            applied_version = CASE WHEN d.applies THEN r.spec_version + (d.spec IS NOT NULL)::int
                ELSE r.applied_version END,
            outputs = COALESCE(d.outputs, r.outputs),
            -- What the observer saw stands while nothing it looks at changed
            -- (a refresh: the same state, no new outputs).
            observed = CASE WHEN d.outputs IS NULL AND d.state = r.state THEN r.observed END,
            version = r.version + 1, updated_at = d.at
        FROM done d WHERE r.id = d.resource_id AND r.state = d.working_state
        RETURNING r.id, r.spec_version
    ), versions AS (
        INSERT INTO spec_versions (resource_id, version, actor, reason, patch, spec, created_at)
        SELECT m.id, m.spec_version, d.actor, d.reason, d.patch, d.spec, d.at
        FROM done d JOIN moved m ON m.id = d.resource_id WHERE d.spec IS NOT NULL
    ), events AS (
        INSERT INTO run_events (run_id, at, attempt, level, step, message, data)
        SELECT id, event_at, attempt, level, step, message, data FROM done
    ), outcomes AS (
        INSERT INTO run_outcomes (outcome, run_id, action, kind, environment, actor)
        SELECT status, id, action, kind, environment, actor FROM done
    ), pending AS (
        INSERT INTO rollup_pending (run_id) SELECT id FROM done
    )
    SELECT d.id, CASE WHEN m.id IS NULL THEN
        drover_fail(format('resource %s was not in %s when run %s ended', d.resource_id, d.working_state, d.id))
    END AS failed
    FROM done d LEFT JOIN moved m ON m.id = d.resource_id";

impl PgBackend {
    const CLAIM: &'static str = claim!("");
    const CLAIM_AFTER: &'static str = claim!(" AND (run_after, run_id) > ($8, $9)");
    const CLAIM_ONLY: &'static str = claim!(" AND provider = ANY($8)");
    const CLAIM_AFTER_ONLY: &'static str = claim!(" AND (run_after, run_id) > ($8, $9) AND provider = ANY($10)");
}

/// Binds drover's parameters to a Postgres statement.
fn query<'q>(sql: &'q Sql<'_>) -> Query<'q, Postgres, PgArguments> {
    let mut q = sqlx::query(&sql.text);
    for p in &sql.params {
        q = match p {
            Param::Null(ty) => match ty {
                Ty::Uuid => q.bind(None::<Uuid>),
                Ty::Text => q.bind(None::<&str>),
                Ty::I64 => q.bind(None::<i64>),
                Ty::I32 => q.bind(None::<i32>),
                Ty::Bool => q.bind(None::<bool>),
                Ty::Json => q.bind(None::<Json<&Value>>),
                Ty::Time => q.bind(None::<Ts>),
                Ty::Bytes => q.bind(None::<&[u8]>),
                Ty::Uuids => q.bind(None::<&[Uuid]>),
            },
            Param::Uuid(v) => q.bind(*v),
            Param::Text(v) => q.bind(v.as_ref()),
            Param::I64(v) => q.bind(*v),
            Param::I32(v) => q.bind(*v),
            Param::Bool(v) => q.bind(*v),
            Param::Json(v) => q.bind(Json(v.as_ref())),
            Param::Time(v) => q.bind(Ts(*v)),
            Param::Bytes(v) => q.bind(v.as_ref()),
            Param::Uuids(v) => q.bind(v.as_ref()),
        };
    }
    q
}

#[async_trait::async_trait]
impl Exec for PgConnection {
    async fn execute(&mut self, sql: Sql<'_>) -> sqlx::Result<u64> {
        Ok(query(&sql).execute(self).await?.rows_affected())
    }

    async fn fetch_all<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<Vec<R>> {
        query(&sql).fetch_all(self).await?.iter().map(R::from_row).collect()
    }

    async fn fetch_optional<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<Option<R>> {
        query(&sql).fetch_optional(self).await?.as_ref().map(R::from_row).transpose()
    }
}

#[async_trait::async_trait]
impl Backend for PgBackend {
    const NAME: &'static str = "postgres";
    const CLAIM_LANES: u8 = 2;
    const NOTIFY: Option<&'static str> = Some("SELECT pg_notify('drover_runs', '')");
    const NOTIFY_DISCOVERY: Option<&'static str> = Some("SELECT pg_notify('drover_discovery', $1)");
    /// A transaction-scoped advisory lock, the key being "drover rollups"
    /// as a number.
    const FOLD_LOCK: &'static str = "SELECT pg_advisory_xact_lock(7378429001)";

    type Conn = PgConnection;
    type Pooled = PoolConnection<Postgres>;
    type Tx = Transaction<'static, Postgres>;

    async fn acquire(&self) -> sqlx::Result<Self::Pooled> {
        self.pool.acquire().await
    }

    async fn begin(&self) -> sqlx::Result<Self::Tx> {
        self.pool.begin().await
    }

    async fn commit(tx: Self::Tx) -> sqlx::Result<()> {
        tx.commit().await
    }

    /// `column = ANY($n)`: one array parameter, so the statement's text (and
    /// its prepared plan) is the same however many ids there are.
    fn push_in<'a>(sql: &mut Sql<'a>, column: &str, ids: &'a [Uuid]) {
        sql.push(column).push(" = ANY(").push_bind(ids).push(")");
    }

    /// One claim: [`claim!`]'s statement, past the cursor or from the front.
    async fn claim_batch(&self, t: &ClaimTerms<'_>, limit: u32, after: Option<(Time, Uuid)>) -> Result<Vec<Claimed>> {
        let claim = sqlx::query(match (after.is_some(), t.only.is_some()) {
            (false, false) => Self::CLAIM,
            (true, false) => Self::CLAIM_AFTER,
            (false, true) => Self::CLAIM_ONLY,
            (true, true) => Self::CLAIM_AFTER_ONLY,
        });
        let mut claim = claim
            .bind(Ts(t.now))
            .bind(i64::from(limit))
            .bind(Ts(t.expires))
            .bind(t.worker)
            .bind(t.token)
            .bind(i32::from(t.lane.of.max(1)))
            .bind(i32::from(t.lane.index));
        if let Some((due, id)) = after {
            claim = claim.bind(Ts(due)).bind(id);
        }
        if let Some(only) = t.only {
            claim = claim.bind(only);
        }
        let rows = claim.fetch_all(&self.claims).await.map_err(db("claim runs"))?;
        rows.iter()
            .map(|row| {
                let run = Run::try_from(RunRow::from_row(row).map_err(db("read a claimed run"))?)?;
                let resource = ResourceRow::prefixed(row).map_err(db("read a claimed resource"))?;
                let due: Ts = row.try_get("queue_due").map_err(db("read a claimed run"))?;
                Ok(Claimed { due: (due.0, run.id), resource: resource.map(Resource::try_from).transpose()?, run })
            })
            .collect()
    }

    /// See [`COMPLETE`]: one round trip for the whole batch.
    async fn complete_together(&self, batch: &[(Lease, &Completion)]) -> Result<Vec<Result<()>>> {
        fn json(v: Option<&Value>) -> Option<Json<&Value>> {
            v.map(Json)
        }
        let done: Vec<(Uuid, Option<bool>)> = sqlx::query_as(COMPLETE)
            .bind(batch.iter().map(|(l, _)| l.run).collect::<Vec<_>>())
            .bind(batch.iter().map(|(l, _)| l.token).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.status.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.now).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| json(c.outputs.as_ref())).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.error.as_ref().map(Json)).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.resource_state.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.spec.as_ref().map(|u| Json(&u.spec))).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.event.at).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.event.level.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.event.step.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.event.message.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| json(c.event.data.as_ref())).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.spec.as_ref().map(|u| Json(&u.patch))).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| c.applies_spec).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, c)| json(c.applied.as_ref())).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| match e.as_database_error() {
                Some(d) if d.code().as_deref() == Some("DR001") => Error::Internal(d.message().to_string()),
                _ => db("complete runs")(e),
            })?;
        let done: std::collections::HashSet<Uuid> = done.into_iter().map(|(id, _)| id).collect();
        Ok(batch
            .iter()
            .map(|(l, _)| if done.contains(&l.run) { Ok(()) } else { Err(Error::StaleLease { run: l.run }) })
            .collect())
    }
}

impl SqlStore<PgBackend> {
    /// How every session of drover's opens: the URL's settings, and the
    /// server ends it when it sits idle in a transaction
    /// ([`IDLE_IN_TRANSACTION`]).
    pub fn session_options(url: &str) -> Result<PgConnectOptions> {
        Ok(PgConnectOptions::from_str(url)
            .map_err(db("read the Postgres URL"))?
            .options([("idle_in_transaction_session_timeout", format!("{}ms", IDLE_IN_TRANSACTION.as_millis()))]))
    }

    /// How drover's pools hand out sessions.
    fn pool_options(max_connections: u32) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings every connection it hands out by default: a round
            // trip added to each transaction, a tenth of the engine's
            // throughput under load. Only a connection that sat idle for a
            // while is pinged now; one that broke in use is dropped when it
            // comes back (sqlx tests it on release), and an error in use
            // is retried by whoever saw it (a claim backs off, a completion
            // goes one by one and then to its lease).
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
    }

    /// How the claim has been planned on the claims' sessions open now:
    /// (generic plans, custom plans) made for it, summed over them. Each
    /// session plans it once ([`PgBackend::claims`]), so the second count
    /// stays 0.
    pub async fn claim_plans(&self) -> Result<(i64, i64)> {
        let mut seen = (0, 0);
        let open = self.db.claims.size() as usize;
        let mut sessions = Vec::with_capacity(open);
        for _ in 0..open {
            sessions.push(self.db.claims.acquire().await.map_err(db("open a claims session"))?);
        }
        for session in &mut sessions {
            let (generic, custom): (Option<i64>, Option<i64>) = sqlx::query_as(
                "SELECT sum(generic_plans)::bigint, sum(custom_plans)::bigint FROM pg_prepared_statements
                 WHERE statement LIKE '%FOR UPDATE SKIP LOCKED%'",
            )
            .fetch_one(&mut **session)
            .await
            .map_err(db("read the claims' plans"))?;
            seen = (seen.0 + generic.unwrap_or(0), seen.1 + custom.unwrap_or(0));
        }
        Ok(seen)
    }

    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore> {
        let options = PgStore::session_options(url)?;
        let pool = Self::pool_options(max_connections)
            .connect_with(options.clone())
            .await
            .map_err(db("connect to Postgres"))?;
        let claims = Self::pool_options(u32::from(PgBackend::CLAIM_LANES) + 1)
            .connect_lazy_with(options.options([("plan_cache_mode", "force_generic_plan")]));
        crate::migrations::migrator(crate::migrations::POSTGRES)
            .run(&pool)
            .await
            .map_err(|e| Error::store("run migrations", e))?;
        let wakeup = Arc::new(Notify::new());
        let discovery = Arc::new(tokio::sync::watch::channel(0).0);
        // The listener reconnects by itself; if it cannot start at all,
        // workers still poll, and registry watchers wake on this replica's
        // changes and at their deadline.
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                let (wake, heard) = (wakeup.clone(), discovery.clone());
                tokio::spawn(async move {
                    if let Err(e) = listener.listen_all(["drover_runs", "drover_discovery"]).await {
                        tracing::warn!(error = %e, "LISTEN failed; relying on polling");
                        return;
                    }
                    loop {
                        match listener.recv().await {
                            Ok(n) if n.channel() == "drover_discovery" => {
                                crate::store::discovery_heard(&heard, n.payload().parse().unwrap_or(0));
                            }
                            Ok(_) => crate::store::wake_lanes::<PgBackend>(&wake),
                            Err(e) => {
                                tracing::warn!(error = %e, "notification listener lost; reconnecting");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "could not start LISTEN; relying on polling"),
        }
        Ok(SqlStore::new(PgBackend { pool, claims }, wakeup, discovery, url))
    }
}
