//! The store, written once as plain generic code over a [`Backend`] and
//! split by area: [`resources`] (and their spec versions), [`runs`] (the
//! ledger: requests, reads, events, cancels), [`queue`] (claims, leases,
//! completions, the reaper), [`stats`], [`idempotency`], [`identity`]
//! (tokens) and [`settings`].
//!
//! Queries use `$n` placeholders, which both Postgres and SQLite (through
//! sqlx) understand, and bind every time from Rust, never `now()`, so that
//! the two backends behave alike and tests control the clock. What must
//! differ comes from the backend: the claim and the completion of a batch
//! (one statement each on Postgres, steps in a transaction on SQLite), and
//! how a list of ids is bound.
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

mod discovery;
mod idempotency;
mod identity;
pub(crate) mod queue;
mod resources;
mod routers;
pub(crate) mod runs;
mod settings;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use drover_domain::kinds::Kind;
use drover_domain::model::*;
use drover_domain::ports::{Lane, Store};
use drover_domain::stats::{Grain, Rollup, RollupFilter};
use drover_domain::{Error, Result};
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::sql::{Backend, Exec, Record, Sql};

/// Drover's store on one database: [`crate::PgStore`] or
/// [`crate::SqliteStore`].
pub struct SqlStore<B> {
    pub(crate) db: B,
    wakeup: Arc<Notify>,
    cursor: ClaimCursor,
    /// Ticks after each change of the discovery registry (see
    /// [`drover_domain::ports::DiscoveryStore::discovery_watch`]).
    discovery: Arc<tokio::sync::watch::Sender<i64>>,
    /// Statements of this process that may have written to the database,
    /// each counted once it ended (a transaction's at its commit; a plain
    /// `SELECT` is not counted): what a cache of reads compares
    /// ([`Store::writes`]). Shared by the stores of one database in this
    /// process; writes by other processes are not counted.
    writes: Arc<std::sync::atomic::AtomicU64>,
}

// `Backend` is the crate's seam, not an interface: users name `PgStore`
// and `SqliteStore`.
#[allow(private_bounds)]
impl<B: Backend> SqlStore<B> {
    /// A store on `db`; `wakeup` is notified when work may be waiting, and
    /// `discovery` ticks when the registry changed (a Postgres listener does
    /// both for other replicas).
    pub(crate) fn new(
        db: B,
        wakeup: Arc<Notify>,
        discovery: Arc<tokio::sync::watch::Sender<i64>>,
        url: &str,
    ) -> SqlStore<B> {
        SqlStore { db, wakeup, cursor: ClaimCursor::default(), discovery, writes: crate::write_counter(url) }
    }

    /// Counts a write (see `writes`), after it ended.
    fn wrote(&self) {
        self.writes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Tells this replica's watchers that the registry reached `idx`.
    fn discovery_changed(&self, idx: i64) {
        discovery_heard(&self.discovery, idx);
    }

    /// A connection from the pool.
    async fn conn(&self) -> Result<B::Pooled> {
        self.db.acquire().await.map_err(db("acquire a connection"))
    }

    /// Runs one statement on a connection from the pool; `op` names it in
    /// errors. The connection goes back before this returns, so that the
    /// caller can ask for another (SQLite has one).
    async fn execute(&self, op: &'static str, sql: Sql<'_>) -> Result<u64> {
        let done = self.conn().await?.execute(sql).await;
        self.wrote();
        done.map_err(db(op))
    }

    /// See [`SqlStore::execute`].
    async fn fetch_optional<R: Record>(&self, op: &'static str, sql: Sql<'_>) -> Result<Option<R>> {
        let writes = !crate::only_reads(&sql.text);
        let row = self.conn().await?.fetch_optional(sql).await;
        if writes {
            self.wrote();
        }
        row.map_err(db(op))
    }

    /// See [`SqlStore::execute`].
    async fn fetch_all<R: Record>(&self, op: &'static str, sql: Sql<'_>) -> Result<Vec<R>> {
        let writes = !crate::only_reads(&sql.text);
        let rows = self.conn().await?.fetch_all(sql).await;
        if writes {
            self.wrote();
        }
        rows.map_err(db(op))
    }

    /// See [`SqlStore::execute`].
    async fn fetch_one<R: Record>(&self, op: &'static str, sql: Sql<'_>) -> Result<R> {
        self.fetch_optional(op, sql).await?.ok_or_else(|| db(op)(sqlx::Error::RowNotFound))
    }

    /// Commits `tx`; `op` names what it did.
    async fn commit(&self, tx: B::Tx, op: &'static str) -> Result<()> {
        let done = B::commit(tx).await;
        self.wrote();
        done.map_err(db(op))
    }

    async fn begin(&self) -> Result<B::Tx> {
        self.db.begin().await.map_err(db("begin"))
    }

    fn wake(&self) {
        wake_lanes::<B>(&self.wakeup);
    }
}

/// Ticks the registry's watchers when `idx` is newer than any index heard
/// of. On Postgres a replica hears its own changes twice (its commit, then
/// its `NOTIFY` coming back through the listener): the echo wakes nobody.
pub(crate) fn discovery_heard(tx: &tokio::sync::watch::Sender<i64>, idx: i64) {
    tx.send_if_modified(|v| {
        let newer = idx > *v;
        *v = (*v).max(idx);
        newer
    });
}

#[async_trait::async_trait]
impl<B: Backend> Store for SqlStore<B> {
    fn backend(&self) -> &'static str {
        B::NAME
    }

    fn writes(&self) -> Option<u64> {
        Some(self.writes.load(std::sync::atomic::Ordering::Acquire))
    }

    async fn ping(&self) -> Result<()> {
        self.execute("ping", Sql::new("SELECT 1")).await?;
        Ok(())
    }

    async fn insert_resource(&self, r: &NewResource) -> Result<Resource> {
        resources::insert(self, r).await
    }

    async fn get_resource(&self, kind: Kind, key: &ResourceKey) -> Result<Option<Resource>> {
        resources::get(self, kind, key).await
    }

    async fn get_resource_by_id(&self, id: Uuid) -> Result<Option<Resource>> {
        resources::get_by_id(self, id).await
    }

    async fn list_resources(&self, kind: Kind, filter: &ResourceFilter, page: PageRequest) -> Result<Vec<Resource>> {
        resources::list(self, kind, filter, page).await
    }

    async fn update_spec(&self, change: &SpecChange) -> Result<Resource> {
        resources::update_spec(self, change).await
    }

    async fn list_spec_versions(&self, resource: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<SpecVersion>> {
        resources::list_versions(self, resource, before, limit).await
    }

    async fn get_spec_version(&self, resource: Uuid, version: i64) -> Result<Option<SpecVersion>> {
        resources::get_version(self, resource, version).await
    }

    async fn delete_resource(&self, id: Uuid, state: &str, now: Time) -> Result<()> {
        resources::delete(self, id, state, now).await
    }

    async fn set_observed(&self, id: Uuid, observed: &Value) -> Result<()> {
        resources::set_observed(self, id, observed).await
    }

    async fn set_drift(&self, id: Uuid, drift: &Value) -> Result<()> {
        resources::set_drift(self, id, drift).await
    }

    async fn lease_observation(&self, resource: Uuid, observer: &str, now: Time, until: Time) -> Result<bool> {
        resources::lease_observation(self, resource, observer, now, until).await
    }

    async fn insert_run(&self, run: &NewRun) -> Result<Run> {
        runs::insert(self, run).await
    }

    async fn get_run(&self, id: Uuid) -> Result<Option<Run>> {
        runs::get(self, id).await
    }

    async fn list_runs(&self, filter: &RunFilter, page: PageRequest) -> Result<Vec<Run>> {
        runs::list(self, filter, page).await
    }

    async fn active_run(&self, resource: Uuid) -> Result<Option<Run>> {
        runs::active(self, resource).await
    }

    async fn last_unsuccessful_run(&self, resource: Uuid) -> Result<Option<Run>> {
        runs::last_unsuccessful(self, resource).await
    }

    async fn recent_runs(&self, resource: Uuid, limit: u32) -> Result<(Vec<Run>, Option<Run>)> {
        runs::recent_and_active(self, resource, limit).await
    }

    async fn claim_jobs(
        &self,
        worker: &str,
        lease: Duration,
        limit: u32,
        now: Time,
        only: Option<&[String]>,
        lane: Lane,
    ) -> Result<Vec<(Run, Resource)>> {
        queue::claim(self, worker, lease, limit, now, only, lane).await
    }

    fn claim_lanes(&self) -> u8 {
        B::CLAIM_LANES
    }

    async fn heartbeat(&self, lease: Lease, lease_for: Duration, now: Time) -> Result<Option<bool>> {
        queue::heartbeat(self, lease, lease_for, now).await
    }

    async fn append_event(&self, lease: Lease, event: &NewEvent) -> Result<()> {
        let mut conn = self.conn().await?;
        let done = queue::insert_event_fenced::<B>(&mut conn, lease, event).await;
        self.wrote();
        done
    }

    async fn complete_run(&self, lease: Lease, completion: &Completion) -> Result<()> {
        let done = self.db.complete_together(&[(lease, completion)]).await;
        self.wrote();
        done?.remove(0)
    }

    async fn complete_runs(&self, batch: &[(Lease, Completion)]) -> Vec<Result<()>> {
        queue::complete(self, batch).await
    }

    async fn retry_later(&self, lease: Lease, run_after: Time, error: &RunError, event: &NewEvent) -> Result<()> {
        queue::retry_later(self, lease, run_after, error, event).await
    }

    async fn reap_expired(&self, now: Time) -> Result<Vec<Uuid>> {
        queue::reap_expired(self, now).await
    }

    async fn request_cancel(&self, run: Uuid, actor: &str, reason: Option<&str>, now: Time) -> Result<Run> {
        runs::request_cancel(self, run, actor, reason, now).await
    }

    async fn list_events(&self, run: Uuid, after: i64, limit: u32) -> Result<Vec<RunEvent>> {
        runs::list_events(self, run, after, limit).await
    }

    async fn last_events(&self, run: Uuid, n: u32) -> Result<Vec<RunEvent>> {
        runs::last_events(self, run, n).await
    }

    async fn queue_depth(&self, now: Time) -> Result<QueueDepth> {
        stats::queue_depth(self, now).await
    }

    async fn rollups(&self, grain: Grain, since: Time, until: Time, filter: &RollupFilter) -> Result<Vec<Rollup>> {
        stats::rollups(self, grain, since, until, filter).await
    }

    async fn fold_rollups(&self, limit: u32) -> Result<usize> {
        stats::fold(self, limit).await
    }

    async fn idempotency_begin(&self, key: &str, fingerprint: &str, now: Time) -> Result<IdempotencyBegin> {
        idempotency::begin(self, key, fingerprint, now).await
    }

    async fn idempotency_save(&self, key: &str, response: &SavedResponse, now: Time) -> Result<()> {
        idempotency::save(self, key, response, now).await
    }

    async fn idempotency_abandon(&self, key: &str) -> Result<()> {
        idempotency::abandon(self, key).await
    }

    async fn wait_for_work(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.wakeup.notified()).await;
    }
}

/// What every run of one claim gets: its worker, lease token and lease
/// expiry, and the claim's time (started, heartbeat, due at or before).
#[derive(Clone, Copy)]
pub(crate) struct ClaimTerms<'a> {
    pub(crate) worker: &'a str,
    pub(crate) token: uuid::Uuid,
    pub(crate) expires: drover_domain::model::Time,
    pub(crate) now: drover_domain::model::Time,
    /// Only runs of these providers; `None`: any.
    pub(crate) only: Option<&'a [String]>,
    pub(crate) lane: Lane,
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
/// Each lane has its own ([`Lane`]): claims in different lanes run side
/// by side.
#[derive(Default)]
pub(crate) struct ClaimCursor(std::sync::Mutex<std::collections::HashMap<Lane, CursorState>>);

#[derive(Default)]
struct CursorState {
    after: Option<(drover_domain::model::Time, uuid::Uuid)>,
    from_start: Option<std::time::Instant>,
}

impl ClaimCursor {
    /// Where to start in `lane`: past the cursor, or `None` for the front.
    pub(crate) fn start(&self, lane: Lane) -> Option<(drover_domain::model::Time, uuid::Uuid)> {
        let lanes = self.0.lock().expect("not poisoned");
        let state = lanes.get(&lane)?;
        let fresh = state.from_start.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1));
        if fresh {
            state.after
        } else {
            None
        }
    }

    pub(crate) fn scanned_from_start(&self, lane: Lane) {
        self.0.lock().expect("not poisoned").entry(lane).or_default().from_start = Some(std::time::Instant::now());
    }

    /// Moves past the last row claimed in `lane`; a claim that took
    /// nothing forgets the cursor.
    pub(crate) fn advance(&self, lane: Lane, last: Option<(drover_domain::model::Time, uuid::Uuid)>) {
        self.0.lock().expect("not poisoned").entry(lane).or_default().after = last;
    }
}

/// Wakes a claim loop of each lane ([`Backend::CLAIM_LANES`]): each
/// `notify_one` wakes one waiting loop, or lets the next wait return at
/// once (a loop between its claim and its wait misses nothing).
pub(crate) fn wake_lanes<B: Backend>(wakeup: &Notify) {
    for _ in 0..B::CLAIM_LANES {
        wakeup.notify_one();
    }
}

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
