//! Ports: what the domain needs from storage and from providers.
//!
//! `persistence` implements [`Store`] for Postgres and SQLite; `ops`
//! implements [`Provider`]. The domain depends on these traits only.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use crate::discovery::{Change, NewEntry, Presence, Snapshot};
use crate::error::Result;
use crate::kinds::Kind;
use crate::model::*;

/// One share of the queue: the runs whose id falls in lane `index` of
/// `of` (by the id's last byte, random in a UUIDv7). Claims in different
/// lanes never contend for the same rows, so one engine can keep several
/// in flight ([`Store::claim_lanes`]); every run is in exactly one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lane {
    pub index: u8,
    pub of: u8,
}

impl Lane {
    /// The whole queue.
    pub const ALL: Lane = Lane { index: 0, of: 1 };

    /// The lane of `of` that `run` is in.
    pub fn containing(run: Uuid, of: u8) -> Lane {
        let of = of.max(1);
        Lane { index: run.as_bytes()[15] % of, of }
    }

    /// Whether `run` is in this lane.
    pub fn holds(&self, run: Uuid) -> bool {
        Lane::containing(run, self.of) == *self
    }
}

/// Durable storage of resources, runs, events and idempotency records.
///
/// Guarantees every implementation gives (checked by the conformance suite):
/// - at most one queued or running run per resource ([`crate::Error::Busy`]);
/// - a claim hands a queued run to exactly one worker, with a fresh lease;
/// - every write fenced on a [`Lease`] fails once the lease was lost;
/// - completed runs are never changed again;
/// - a resource's state changes only in `claim_runs`, `complete_run`,
///   `reap_expired` and `request_cancel`: the provisioner's transitions.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    /// How many writes this process has made to its stores so far, each
    /// counted once it is committed; `None` (the default): not counted, so
    /// nothing read from this store may be served again from a cache. What
    /// the views' cache compares (see `Service::overview`): a read made
    /// before a write of this process is never served after it.
    fn writes(&self) -> Option<u64> {
        None
    }
    async fn ping(&self) -> Result<()>;

    // Resources.
    async fn insert_resource(&self, r: &NewResource) -> Result<Resource>;
    async fn get_resource(&self, kind: Kind, key: &ResourceKey) -> Result<Option<Resource>>;
    async fn get_resource_by_id(&self, id: Uuid) -> Result<Option<Resource>>;
    /// Live (not deleted) resources of a kind, by id, after `page.after`.
    async fn list_resources(&self, kind: Kind, filter: &ResourceFilter, page: PageRequest) -> Result<Vec<Resource>>;
    /// Replaces the spec and appends its version, in one transaction, if
    /// the spec version is still `change.from_version` (else
    /// `VersionMismatch`) and no run is active (else `Busy`).
    async fn update_spec(&self, change: &SpecChange) -> Result<Resource>;
    /// A resource's spec versions, newest first, older than `before`.
    async fn list_spec_versions(&self, resource: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<SpecVersion>>;
    async fn get_spec_version(&self, resource: Uuid, version: i64) -> Result<Option<SpecVersion>>;
    /// Soft-deletes a resource, fenced on its being in `state` (its final
    /// state, or an initial one no transition has left) with no transition
    /// queued or running; its runs stay.
    async fn delete_resource(&self, id: Uuid, state: &str, now: Time) -> Result<()>;
    async fn set_observed(&self, id: Uuid, observed: &Value) -> Result<()>;
    /// Records a resource's drift as a refresh found it
    /// ([`crate::drift::Drift`]); nothing else of the resource changes.
    async fn set_drift(&self, id: Uuid, drift: &Value) -> Result<()>;
    /// Takes or renews `observer`'s lease on observing a resource until
    /// `until`: true when it holds it (nobody did, the last holder's lease
    /// had lapsed by `now`, or it was this observer's), false while another
    /// observer holds it.
    async fn lease_observation(&self, resource: Uuid, observer: &str, now: Time, until: Time) -> Result<bool>;

    // Runs.
    /// Enqueues a run if the resource is still in `from_state`.
    async fn insert_run(&self, run: &NewRun) -> Result<Run>;
    async fn get_run(&self, id: Uuid) -> Result<Option<Run>>;
    async fn list_runs(&self, filter: &RunFilter, page: PageRequest) -> Result<Vec<Run>>;
    async fn active_run(&self, resource: Uuid) -> Result<Option<Run>>;
    /// The newest run of a resource that ended `failed` or `cancelled`.
    async fn last_unsuccessful_run(&self, resource: Uuid) -> Result<Option<Run>>;
    /// A resource's `limit` newest runs, newest first, and its active run
    /// (one of them, unless replicas' clocks disagree): what its view shows,
    /// in one statement where the store can.
    async fn recent_runs(&self, resource: Uuid, limit: u32) -> Result<(Vec<Run>, Option<Run>)> {
        let filter = RunFilter { resource: Some(resource), ..Default::default() };
        let recent = self.list_runs(&filter, PageRequest { after: None, limit }).await?;
        Ok((recent, self.active_run(resource).await?))
    }
    /// Claims up to `limit` due runs for `worker`, moving each resource to
    /// its working state and recording each attempt's start in its events,
    /// in one transaction. Each run comes with its resource as the claim
    /// left it. With `only`, just runs whose provider it names.
    async fn claim_jobs(
        &self,
        worker: &str,
        lease: Duration,
        limit: u32,
        now: Time,
        only: Option<&[String]>,
        lane: Lane,
    ) -> Result<Vec<(Run, Resource)>>;
    /// [`Store::claim_jobs`] of any provider, without the resources, as
    /// they are after the claim.
    async fn claim_runs(&self, worker: &str, lease: Duration, limit: u32, now: Time) -> Result<Vec<Run>> {
        Ok(self.claim_jobs(worker, lease, limit, now, None, Lane::ALL).await?.into_iter().map(|(run, _)| run).collect())
    }
    /// How many claims of one process this store serves side by side, each
    /// in its own [`Lane`]: 1 where writes take turns anyway (SQLite).
    fn claim_lanes(&self) -> u8 {
        1
    }
    /// Extends a lease; `None` when it is lost, else whether a cancel was asked.
    async fn heartbeat(&self, lease: Lease, lease_for: Duration, now: Time) -> Result<Option<bool>>;
    async fn append_event(&self, lease: Lease, event: &NewEvent) -> Result<()>;
    async fn complete_run(&self, lease: Lease, completion: &Completion) -> Result<()>;
    /// Completes several runs, in one transaction where the store can; each
    /// result is what [`Store::complete_run`] would have returned for it.
    async fn complete_runs(&self, batch: &[(Lease, Completion)]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(batch.len());
        for (lease, c) in batch {
            out.push(self.complete_run(*lease, c).await);
        }
        out
    }
    /// Puts a running run back in the queue to try again after `run_after`.
    async fn retry_later(&self, lease: Lease, run_after: Time, error: &RunError, event: &NewEvent) -> Result<()>;
    /// Requeues (or, out of attempts, fails) runs whose lease lapsed.
    async fn reap_expired(&self, now: Time) -> Result<Vec<Uuid>>;
    /// Cancels a queued run at once; marks a running one for its worker.
    async fn request_cancel(&self, run: Uuid, actor: &str, reason: Option<&str>, now: Time) -> Result<Run>;
    async fn list_events(&self, run: Uuid, after: i64, limit: u32) -> Result<Vec<RunEvent>>;
    /// A run's `n` latest events, oldest first.
    async fn last_events(&self, run: Uuid, n: u32) -> Result<Vec<RunEvent>> {
        let all = self.list_events(run, 0, u32::MAX).await?;
        let skip = all.len().saturating_sub(n as usize);
        Ok(all.into_iter().skip(skip).collect())
    }
    async fn queue_depth(&self, now: Time) -> Result<QueueDepth>;

    // History.
    /// Rollup rows of one grain with buckets in `[since, until)`.
    async fn rollups(
        &self,
        grain: crate::stats::Grain,
        since: Time,
        until: Time,
        filter: &crate::stats::RollupFilter,
    ) -> Result<Vec<crate::stats::Rollup>>;
    /// Adds up to `limit` finished runs not yet in the rollups to them, in
    /// one transaction; returns how many. Folders take turns, and each run
    /// is added exactly once.
    async fn fold_rollups(&self, limit: u32) -> Result<usize>;

    // Idempotency.
    async fn idempotency_begin(&self, key: &str, fingerprint: &str, now: Time) -> Result<IdempotencyBegin>;
    async fn idempotency_save(&self, key: &str, response: &SavedResponse, now: Time) -> Result<()>;
    async fn idempotency_abandon(&self, key: &str) -> Result<()>;

    /// Returns when new work may be due, or after `max` at the latest. A hint
    /// only: callers poll anyway.
    async fn wait_for_work(&self, max: Duration);
}

/// Folds pending finished runs into the rollups until none are left or
/// `max_batches` batches were folded; returns how many runs it folded.
pub async fn fold_pending(store: &dyn Store, max_batches: usize) -> Result<usize> {
    let mut total = 0;
    for _ in 0..max_batches {
        let n = store.fold_rollups(crate::stats::FOLD_BATCH).await?;
        total += n;
        if n < crate::stats::FOLD_BATCH as usize {
            break;
        }
    }
    Ok(total)
}

/// API tokens.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn insert_token(&self, t: &NewToken) -> Result<Token>;
    async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>>;
    async fn list_tokens(&self, user: Uuid) -> Result<Vec<Token>>;
    /// Revokes a token of `user`; `None` if it has no such token.
    async fn revoke_token(&self, user: Uuid, id: Uuid, actor: &str, now: Time) -> Result<Option<Token>>;
    async fn touch_token(&self, id: Uuid, now: Time) -> Result<()>;
    async fn token_by_id(&self, id: Uuid) -> Result<Option<Token>>;
    /// Dashboard sessions (see [`Session`]); ending one keeps its row.
    async fn insert_session(&self, s: &Session) -> Result<()>;
    async fn session_by_hash(&self, hash: &str) -> Result<Option<Session>>;
    async fn end_session(&self, hash: &str, now: Time) -> Result<()>;
    async fn touch_session(&self, hash: &str, now: Time) -> Result<()>;
    /// Deletes sessions that expired or ended before `before`; how many.
    async fn sweep_sessions(&self, before: Time) -> Result<u64>;
}

/// Setting versions: append-only.
#[async_trait]
pub trait SettingsStore: Send + Sync + 'static {
    /// Adds a version; [`crate::Error::VersionMismatch`] if that version
    /// number was taken meanwhile.
    async fn insert_setting(&self, v: &NewSettingVersion) -> Result<SettingVersion>;
    /// A given version, or the newest.
    async fn setting(&self, scope: &str, key: &str, version: Option<i64>) -> Result<Option<SettingVersion>>;
    /// Every version, oldest first.
    async fn setting_history(&self, scope: &str, key: &str) -> Result<Vec<SettingVersion>>;
    /// The newest version of every key of the given scopes (deletions included).
    async fn current_settings(&self, scopes: &[String]) -> Result<Vec<SettingVersion>>;
}

/// The discovery registry (see [`crate::discovery`]). Every write that
/// changes it appends a [`Change`] under the next index, in the same
/// transaction, and wakes watchers (on every replica) after it commits.
#[async_trait]
pub trait DiscoveryStore: Send + Sync + 'static {
    /// Puts an entry in (or updates one whose address, port or build
    /// changed) until `until`; an entry already there as it is is only
    /// renewed. The change's index when it entered or changed.
    async fn discovery_enter(
        &self,
        entry: &NewEntry,
        reason: &str,
        by: &str,
        now: Time,
        until: Time,
    ) -> Result<Option<i64>>;
    /// Extends the given instances' entries of a service to `until`
    /// (those still there); how many.
    async fn discovery_renew(&self, service: Uuid, instances: &[String], now: Time, until: Time) -> Result<u64>;
    /// Takes an instance's entry out; with `lapsed_by`, only if it had
    /// expired by then (a renewal meanwhile wins). The change's index
    /// when there was one to take out.
    async fn discovery_leave(
        &self,
        service: Uuid,
        instance: &str,
        reason: &str,
        by: &str,
        now: Time,
        lapsed_by: Option<Time>,
    ) -> Result<Option<i64>>;
    /// Entries whose TTL lapsed by `now`: `(service, instance)`.
    async fn discovery_lapsed(&self, now: Time) -> Result<Vec<(Uuid, String)>>;
    /// Forgets changes older than `before`.
    async fn discovery_prune(&self, before: Time) -> Result<u64>;
    /// The registry, or one service's entries (by id), with the index of
    /// its last change; read index first, so that a watcher never misses a
    /// change the entries do not show yet. Entries by service, index and
    /// instance.
    async fn discovery_snapshot(&self, service: Option<Uuid>) -> Result<Snapshot>;
    /// Changes after `after` (of one service, by name), oldest first.
    async fn discovery_changes(&self, after: i64, service: Option<&str>, limit: u32) -> Result<Vec<Change>>;
    /// Ticks (with the newest index heard of) after each change this
    /// replica or, on Postgres, any replica made: subscribe, then read, then
    /// wait for a tick.
    fn discovery_watch(&self) -> tokio::sync::watch::Receiver<i64>;
}

/// Counters and histograms the engine reports to (Prometheus, in `api`).
pub trait Metrics: Send + Sync + 'static {
    /// An attempt started, `pickup` after it became due.
    fn run_started(&self, kind: Kind, action: &str, pickup: std::time::Duration);
    /// A run ended; `duration` from its first start, if it started.
    fn run_finished(&self, kind: Kind, action: &str, status: RunStatus, duration: Option<std::time::Duration>);
    /// An attempt failed and was put back in the queue.
    fn run_retried(&self, kind: Kind, action: &str);
    /// Runs whose lease lapsed were taken back by the reaper.
    fn leases_reclaimed(&self, n: usize);
}

/// What a provider is asked to do.
#[derive(Debug, Clone)]
pub struct Job {
    pub run_id: Uuid,
    pub attempt: i32,
    pub kind: Kind,
    pub action: String,
    pub params: Value,
    pub resource: Resource,
    /// Resources the action depends on (a cluster's image), as they are now.
    pub dependencies: Vec<Resource>,
    /// The settings the run was asked with, opened: key → value.
    pub settings: std::collections::BTreeMap<String, String>,
    /// The values of the secret ones among them: a provider masks them in
    /// whatever it reports (a job's output).
    pub secrets: Vec<String>,
}

impl Job {
    /// The resolved dependency of `kind` (a service's cluster and image).
    pub fn dependency(&self, kind: Kind) -> Result<&Resource, ProviderError> {
        self.dependencies.iter().find(|d| d.kind == kind).ok_or_else(|| {
            ProviderError::fatal("dependency_missing", format!("the {}'s {kind} was not resolved", self.kind))
        })
    }

    /// The run's settings split in two: the non-secret ones and the secret
    /// ones (a setting is secret when its value is among [`Job::secrets`]).
    pub fn split_settings(&self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        self.settings.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(_, v)| !self.secrets.contains(v))
    }
}

/// A provider's failure, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("{message}")]
    Failed { code: String, message: String, retryable: bool, detail: Option<Value> },
    #[error("cancelled")]
    Cancelled,
}

impl ProviderError {
    pub fn fatal(code: &str, message: impl Into<String>) -> ProviderError {
        ProviderError::Failed { code: code.to_string(), message: message.into(), retryable: false, detail: None }
    }

    pub fn retryable(code: &str, message: impl Into<String>) -> ProviderError {
        ProviderError::Failed { code: code.to_string(), message: message.into(), retryable: true, detail: None }
    }

    pub fn with_detail(self, d: Value) -> ProviderError {
        match self {
            ProviderError::Failed { code, message, retryable, .. } => {
                ProviderError::Failed { code, message, retryable, detail: Some(d) }
            }
            other => other,
        }
    }
}

/// The run, as a provider sees it while working.
#[async_trait]
pub trait RunContext: Send + Sync {
    fn run_id(&self) -> Uuid;
    fn attempt(&self) -> i32;
    /// Appends to the run's event log. Best effort: a lost lease is noticed
    /// by the heartbeat, not here.
    async fn event(&self, event: NewEvent);
    /// Whether someone asked to cancel. Providers check between steps and
    /// return [`ProviderError::Cancelled`] after undoing what they must.
    fn cancel_requested(&self) -> bool;

    fn check_cancel(&self) -> Result<(), ProviderError> {
        if self.cancel_requested() {
            Err(ProviderError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The data of this run's newest event of `step` that carries data, from
    /// this attempt or an earlier one: where a provider finds what it
    /// decided before a crash (a rolling plan) to carry out the same.
    /// `None` when there is none (the default: a context that keeps no log).
    async fn recall(&self, _step: &str) -> Option<Value> {
        None
    }

    /// Puts a healthy instance in the discovery registry, or renews its
    /// entry; recorded in the run's events when it changed the registry.
    async fn discovery_enter(&self, _entry: &NewEntry, _reason: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The instances of a service listed in the discovery registry now;
    /// `None` when this drover keeps no registry.
    async fn discovery_listed(&self, _service_id: Uuid) -> Result<Option<Vec<String>>, ProviderError> {
        Ok(None)
    }

    /// Takes an instance out of the registry (before it is stopped).
    async fn discovery_leave(
        &self,
        _service: &str,
        _service_id: Uuid,
        _instance: &str,
        _reason: &str,
    ) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// Carries out actions of one kind for one provider name.
///
/// Assumptions: `apply` may run twice for the same run (a retry, or a lease
/// reclaimed after a crash) and must adopt what an earlier attempt made
/// rather than fail or make it twice.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError>;

    /// Looks at the real thing (are the instances alive?). `None` when the
    /// provider has nothing to say about this resource.
    async fn observe(&self, _resource: &Resource) -> Option<Value> {
        None
    }

    /// Whether [`Provider::observe`] is implemented: the observer does not
    /// page through resources of a kind none of whose providers look.
    fn observes(&self) -> bool {
        false
    }

    /// [`Provider::observe`], and for a resource whose instances belong in
    /// the discovery registry, which of them pass their checks now (one
    /// look for both).
    async fn observe_presence(&self, resource: &Resource) -> (Option<Value>, Option<Presence>) {
        (self.observe(resource).await, None)
    }

    /// Whether `apply` carries out `refresh` for this provider's
    /// resources: the observer asks for periodic refreshes only of those.
    fn refreshes(&self) -> bool {
        false
    }

    /// What `apply` would send for this job, without sending it (for `aws`
    /// clusters: the CloudFormation template, parameters and tags). Reads
    /// only; never changes anything. `None` when the provider renders
    /// nothing to preview. `job.run_id` is nil: no run exists yet.
    async fn preview(&self, _job: &Job) -> Option<Result<Value, ProviderError>> {
        None
    }

    /// Releases what an attempt started, once the run has ended without
    /// success for good (failed with no attempt left, cancelled, timed out,
    /// crashed): the engine calls it before it records the end, while the
    /// lease is still held, and bounds it in time. A retry does not call it:
    /// the next attempt adopts what this one left. It must be safe to call
    /// for an attempt that started nothing.
    async fn clean_up(&self, _ctx: &dyn RunContext, _job: &Job) -> Result<(), ProviderError> {
        Ok(())
    }
}
