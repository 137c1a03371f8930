//! The SQLite store: the embedded default, for one `drover serve` process.
//!
//! One connection serialises every statement, which gives the engine the
//! same exclusivity Postgres gets from row locks; WAL keeps the file safe
//! across crashes.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use drover_domain::model::*;
use drover_domain::{Error, Result};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use sqlx::sqlite::{
    Sqlite, SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::rows::*;
use crate::sql::{Backend, Exec, Param, Record, Sql, Ty};
use crate::store::queue::record_finished;
use crate::store::{db, ClaimTerms, Claimed, SqlStore};
use crate::time::Ts;

/// Drover's store on SQLite.
pub type SqliteStore = SqlStore<SqliteBackend>;

/// A SQLite database file, on one connection.
pub struct SqliteBackend {
    pool: SqlitePool,
}

/// Leases due queue rows, oldest first, with `$extra` added to the scan's
/// condition. Parameters: `$1` now, `$2` limit, `$3` lease expiry, then
/// the cursor's `$4` due time and `$5` run id, then the providers claimed
/// as a JSON array (`$4` or `$6`), when the claim names them.
macro_rules! claim {
    ($extra:literal) => {
        concat!(
            "UPDATE run_queue SET lease_expires_at = $3
            WHERE run_id IN (
                SELECT run_id FROM run_queue WHERE lease_expires_at IS NULL AND run_after <= $1",
            $extra,
            "
                ORDER BY run_after, run_id LIMIT $2
            )
            RETURNING run_id, run_after"
        )
    };
}

const CLAIM: &str = claim!("");
const CLAIM_AFTER: &str = claim!(" AND (run_after, run_id) > ($4, $5)");
const CLAIM_ONLY: &str = claim!(" AND provider IN (SELECT value FROM json_each($4))");
const CLAIM_AFTER_ONLY: &str =
    claim!(" AND (run_after, run_id) > ($4, $5) AND provider IN (SELECT value FROM json_each($6))");

impl SqlStore<SqliteBackend> {
    pub async fn connect(url: &str) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db("parse the SQLite URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(db("open SQLite"))?;
        crate::migrations::migrator(crate::migrations::SQLITE)
            .run(&pool)
            .await
            .map_err(|e| Error::store("run migrations", e))?;
        let discovery = Arc::new(tokio::sync::watch::channel(0).0);
        Ok(SqlStore::new(SqliteBackend { pool }, Arc::new(Notify::new()), discovery, url))
    }
}

/// Binds drover's parameters to a SQLite statement. SQLite has no arrays:
/// lists of ids are a parameter each ([`Backend::push_in`]), and an array
/// parameter is refused.
fn query<'q>(sql: &'q Sql<'_>) -> sqlx::Result<Query<'q, Sqlite, SqliteArguments<'q>>> {
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
                Ty::Uuids => return Err(no_arrays()),
            },
            Param::Uuid(v) => q.bind(*v),
            Param::Text(v) => q.bind(v.as_ref()),
            Param::I64(v) => q.bind(*v),
            Param::I32(v) => q.bind(*v),
            Param::Bool(v) => q.bind(*v),
            Param::Json(v) => q.bind(Json(v.as_ref())),
            Param::Time(v) => q.bind(Ts(*v)),
            Param::Bytes(v) => q.bind(v.as_ref()),
            Param::Uuids(_) => return Err(no_arrays()),
        };
    }
    Ok(q)
}

fn no_arrays() -> sqlx::Error {
    sqlx::Error::Encode("SQLite has no array parameters".into())
}

#[async_trait::async_trait]
impl Exec for SqliteConnection {
    async fn execute(&mut self, sql: Sql<'_>) -> sqlx::Result<u64> {
        Ok(query(&sql)?.execute(self).await?.rows_affected())
    }

    async fn fetch_all<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<Vec<R>> {
        query(&sql)?.fetch_all(self).await?.iter().map(R::from_row).collect()
    }

    async fn fetch_optional<R: Record>(&mut self, sql: Sql<'_>) -> sqlx::Result<Option<R>> {
        query(&sql)?.fetch_optional(self).await?.as_ref().map(R::from_row).transpose()
    }
}

/// `column IN (…)`, a parameter per id, in a statement built with sqlx's
/// builder (the backend's own claim and completion).
fn push_ids_in(q: &mut QueryBuilder<'_, Sqlite>, column: &str, ids: &[Uuid]) {
    q.push(column).push(" IN (");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    q.push(")");
}

#[async_trait::async_trait]
impl Backend for SqliteBackend {
    const NAME: &'static str = "sqlite";
    const CLAIM_LANES: u8 = 1;
    const NOTIFY: Option<&'static str> = None;
    const NOTIFY_DISCOVERY: Option<&'static str> = None;
    /// Transactions on the one connection are serial already.
    const FOLD_LOCK: &'static str = "SELECT 1";

    type Conn = SqliteConnection;
    type Pooled = PoolConnection<Sqlite>;
    type Tx = Transaction<'static, Sqlite>;

    async fn acquire(&self) -> sqlx::Result<Self::Pooled> {
        self.pool.acquire().await
    }

    async fn begin(&self) -> sqlx::Result<Self::Tx> {
        self.pool.begin().await
    }

    async fn commit(tx: Self::Tx) -> sqlx::Result<()> {
        tx.commit().await
    }

    /// `column IN (…)`, a parameter per id (SQLite has no arrays).
    fn push_in<'a>(sql: &mut Sql<'a>, column: &str, ids: &'a [Uuid]) {
        sql.push(column).push(" IN ").push_tuple(ids.iter().copied());
    }

    /// One claim, in steps on the one connection: lease due queue rows,
    /// start their runs, move their resources to the working states, and
    /// record each attempt's start.
    async fn claim_batch(&self, t: &ClaimTerms<'_>, limit: u32, after: Option<(Time, Uuid)>) -> Result<Vec<Claimed>> {
        let ClaimTerms { worker, token, expires, now, only, lane: _ } = *t;
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        let statement = match (after.is_some(), only.is_some()) {
            (false, false) => CLAIM,
            (true, false) => CLAIM_AFTER,
            (false, true) => CLAIM_ONLY,
            (true, true) => CLAIM_AFTER_ONLY,
        };
        let mut lease = sqlx::query_as(statement).bind(Ts(now)).bind(i64::from(limit)).bind(Ts(expires));
        if let Some((due, id)) = after {
            lease = lease.bind(Ts(due)).bind(id);
        }
        if let Some(only) = only {
            lease = lease.bind(serde_json::to_string(only).expect("a list of strings serialises"));
        }
        let leased: Vec<(Uuid, Ts)> = lease.fetch_all(&mut *tx).await.map_err(db("claim runs"))?;
        if leased.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = leased.iter().map(|(id, _)| *id).collect();
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE runs SET status = 'running', attempt = attempt + 1, worker = ");
        q.push_bind(worker).push(", lease_token = ").push_bind(token);
        q.push(", lease_expires_at = ").push_bind(Ts(expires)).push(", heartbeat_at = ").push_bind(Ts(now));
        q.push(", started_at = COALESCE(started_at, ").push_bind(Ts(now)).push(") WHERE status = 'queued' AND ");
        push_ids_in(&mut q, "id", &ids);
        q.push(" RETURNING *");
        // A leased queue row without a queued run (a broken invariant) is
        // left leased: the reaper brings it back in line with its run.
        let runs = q.build_query_as::<RunRow>().fetch_all(&mut *tx).await.map_err(db("start runs"))?;
        let runs = runs.into_iter().map(Run::try_from).collect::<Result<Vec<_>>>()?;
        if runs.is_empty() {
            tx.commit().await.map_err(db("commit claim"))?;
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new(
            "UPDATE resources SET state = v.column2, version = resources.version + 1, updated_at = ",
        );
        q.push_bind(Ts(now)).push(" FROM (");
        q.push_values(&runs, |mut b, r| {
            b.push_bind(r.resource_id).push_bind(&r.working_state).push_bind(&r.from_state);
        });
        q.push(
            ") AS v WHERE resources.id = v.column1 AND (resources.state = v.column3 OR resources.state = v.column2)
             AND resources.deleted_at IS NULL
             RETURNING resources.id, resources.kind, resources.name, resources.state, resources.spec,
                resources.version, resources.spec_version, resources.applied_version, resources.applied_spec,
                resources.outputs, resources.observed, resources.created_by, resources.updated_by,
                resources.created_at, resources.updated_at",
        );
        let mut moved: std::collections::HashMap<Uuid, Resource> = q
            .build_query_as::<ResourceRow>()
            .fetch_all(&mut *tx)
            .await
            .map_err(db("enter working states"))?
            .into_iter()
            .map(|row| Resource::try_from(row).map(|r| (r.id, r)))
            .collect::<Result<_>>()?;
        let started: Vec<&Run> = runs.iter().filter(|r| moved.contains_key(&r.resource_id)).collect();
        if !started.is_empty() {
            let mut q =
                QueryBuilder::<Sqlite>::new("INSERT INTO run_events (run_id, at, attempt, level, step, message) ");
            q.push_values(&started, |mut b, r| {
                b.push_bind(r.id)
                    .push_bind(Ts(now))
                    .push_bind(r.attempt)
                    .push_bind(Level::Info.as_str())
                    .push_bind("attempt");
                b.push_bind(format!("attempt {} of {} started on {worker}", r.attempt, r.max_attempts));
            });
            q.build().execute(&mut *tx).await.map_err(db("record attempts"))?;
        }
        tx.commit().await.map_err(db("commit claim"))?;
        let due: std::collections::HashMap<Uuid, Time> = leased.into_iter().map(|(id, at)| (id, at.0)).collect();
        Ok(runs
            .into_iter()
            .map(|run| Claimed { due: (due[&run.id], run.id), resource: moved.remove(&run.resource_id), run })
            .collect())
    }

    /// Completes runs in one transaction, as six statements however many:
    /// each run's outcome, its queue row's removal, its resource's new
    /// state, its event, and its notes for history and the rollups.
    /// Runs whose lease is gone get `StaleLease` and the rest commit; a
    /// resource not in its working state fails the whole call (naming it)
    /// and writes nothing.
    async fn complete_together(&self, batch: &[(Lease, &Completion)]) -> Result<Vec<Result<()>>> {
        let stale = |l: &Lease| Err(Error::StaleLease { run: l.run });
        let mut tx = self.pool.begin().await.map_err(db("begin"))?;
        // VALUES columns are column1, column2, ….
        let mut q = QueryBuilder::<Sqlite>::new(
            "UPDATE runs SET status = v.column3, outcome = v.column3, finished_at = v.column4, outputs = v.column5, error = v.column6,
                lease_expires_at = NULL FROM (",
        );
        q.push_values(batch, |mut b, (lease, c)| {
            b.push_bind(lease.run).push_bind(lease.token).push_bind(c.status.as_str()).push_bind(Ts(c.now));
            b.push_bind(c.outputs.as_ref().map(Json)).push_bind(c.error.as_ref().map(Json));
        });
        q.push(
            ") AS v WHERE runs.id = v.column1 AND runs.lease_token = v.column2 AND runs.status = 'running'
             RETURNING runs.id, runs.resource_id, runs.working_state, runs.attempt",
        );
        let done: Vec<(Uuid, Uuid, String, i32)> =
            q.build_query_as().fetch_all(&mut *tx).await.map_err(db("complete runs"))?;
        if done.is_empty() {
            return Ok(batch.iter().map(|(l, _)| stale(l)).collect());
        }
        let ids: Vec<Uuid> = done.iter().map(|(id, ..)| *id).collect();
        let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM run_queue WHERE ");
        push_ids_in(&mut q, "run_id", &ids);
        q.build().execute(&mut *tx).await.map_err(db("take finished runs off the queue"))?;
        record_finished::<SqliteBackend>(&mut tx, &ids).await?;
        let by_id: std::collections::HashMap<Uuid, (Uuid, String, i32)> =
            done.into_iter().map(|(id, resource, working, attempt)| (id, (resource, working, attempt))).collect();
        let finished: Vec<Ended> = batch.iter().filter_map(|item| by_id.get(&item.0.run).map(|d| (item, d))).collect();
        // VALUES: resource, working state, new state, spec, outputs, now,
        // applies, applied.
        let mut q = QueryBuilder::<Sqlite>::new(
            "UPDATE resources SET state = v.column3, spec = COALESCE(v.column4, resources.spec),
                spec_version = resources.spec_version + (v.column4 IS NOT NULL),
                applied_spec = CASE WHEN v.column7 THEN COALESCE(v.column4, resources.spec)
                    ELSE COALESCE(v.column8, resources.applied_spec) END,
                applied_version = CASE WHEN v.column7 THEN resources.spec_version + (v.column4 IS NOT NULL)
                    ELSE resources.applied_version END,
                outputs = COALESCE(v.column5, resources.outputs),
                observed = CASE WHEN v.column5 IS NULL AND v.column3 = resources.state THEN resources.observed END,
                version = resources.version + 1, updated_at = v.column6 FROM (",
        );
        q.push_values(&finished, |mut b, ((_, c), (resource, working, _))| {
            b.push_bind(*resource).push_bind(working.as_str()).push_bind(c.resource_state.as_str());
            b.push_bind(c.spec.as_ref().map(|u| Json(&u.spec)))
                .push_bind(c.outputs.as_ref().map(Json))
                .push_bind(Ts(c.now));
            b.push_bind(c.applies_spec).push_bind(c.applied.as_ref().map(Json));
        });
        q.push(") AS v WHERE resources.id = v.column1 AND resources.state = v.column2 RETURNING resources.id");
        let moved: std::collections::HashSet<Uuid> =
            q.build_query_scalar().fetch_all(&mut *tx).await.map_err(db("leave working states"))?.into_iter().collect();
        if let Some(((lease, _), (resource, working, _))) = finished.iter().find(|(_, (r, _, _))| !moved.contains(r)) {
            return Err(Error::Internal(format!(
                "resource {resource} was not in {working} when run {} ended",
                lease.run
            )));
        }
        let mut q =
            QueryBuilder::<Sqlite>::new("INSERT INTO run_events (run_id, at, attempt, level, step, message, data) ");
        q.push_values(&finished, |mut b, ((lease, c), (_, _, attempt))| {
            let e = &c.event;
            b.push_bind(lease.run).push_bind(Ts(e.at)).push_bind(*attempt).push_bind(e.level.as_str());
            b.push_bind(&e.step).push_bind(&e.message).push_bind(e.data.as_ref().map(Json));
        });
        q.build().execute(&mut *tx).await.map_err(db("append completion events"))?;
        // A success that changed the spec (a scale's count) is a spec
        // version, by the run's actor and for its reason.
        for ((lease, c), (resource, _, _)) in finished.iter() {
            let Some(update) = &c.spec else {
                continue;
            };
            sqlx::query(
                "INSERT INTO spec_versions (resource_id, version, actor, reason, patch, spec, created_at)
                 SELECT r.id, r.spec_version, runs.actor, runs.reason, $3, r.spec, $4
                 FROM resources r JOIN runs ON runs.id = $2 WHERE r.id = $1",
            )
            .bind(*resource)
            .bind(lease.run)
            .bind(Json(&update.patch))
            .bind(Ts(c.now))
            .execute(&mut *tx)
            .await
            .map_err(db("record spec version"))?;
        }
        tx.commit().await.map_err(db("commit completions"))?;
        Ok(batch.iter().map(|(l, _)| if by_id.contains_key(&l.run) { Ok(()) } else { stale(l) }).collect())
    }
}

/// A completion whose run ended, beside the run's resource, working state
/// and attempt.
type Ended<'a> = (&'a (Lease, &'a Completion), &'a (Uuid, String, i32));
