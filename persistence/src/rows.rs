//! Database rows and their mapping to domain records. Rows are private to
//! this crate: nothing outside sees a column.

use crate::sql::from_row;
use drover_domain::kinds::Kind;
use drover_domain::model::*;
use drover_domain::stats::{FinishedRun, Grain, Hist, OutcomeTotals, Rollup, RollupKey, Totals};
use drover_domain::{Error, Result};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use crate::time::Ts;

pub(crate) struct ResourceRow {
    id: Uuid,
    kind: String,
    name: String,
    state: String,
    spec: Json<Value>,
    version: i64,
    spec_version: i64,
    applied_version: Option<i64>,
    applied_spec: Option<Json<Value>>,
    outputs: Json<Value>,
    observed: Option<Json<Value>>,
    /// Absent from the claim's prefixed columns: providers do not read it.
    drift: Option<Json<Value>>,
    created_by: String,
    updated_by: String,
    created_at: Ts,
    updated_at: Ts,
}

from_row!(ResourceRow { id, kind, name, state, spec, version, spec_version, applied_version, applied_spec, outputs, observed, created_by, updated_by, created_at, updated_at ; absent_is_default: drift });

impl ResourceRow {
    /// A resource returned beside a run, its columns named `r_…` (the
    /// Postgres claim); `None` when the run came without one.
    pub(crate) fn prefixed(row: &sqlx::postgres::PgRow) -> std::result::Result<Option<ResourceRow>, sqlx::Error> {
        use sqlx::Row;
        let Some(id) = row.try_get::<Option<Uuid>, _>("r_id")? else {
            return Ok(None);
        };
        Ok(Some(ResourceRow {
            id,
            kind: row.try_get("r_kind")?,
            name: row.try_get("r_name")?,
            state: row.try_get("r_state")?,
            spec: row.try_get("r_spec")?,
            version: row.try_get("r_version")?,
            spec_version: row.try_get("r_spec_version")?,
            applied_version: row.try_get("r_applied_version")?,
            applied_spec: row.try_get("r_applied_spec")?,
            outputs: row.try_get("r_outputs")?,
            observed: row.try_get("r_observed")?,
            drift: None,
            created_by: row.try_get("r_created_by")?,
            updated_by: row.try_get("r_updated_by")?,
            created_at: row.try_get("r_created_at")?,
            updated_at: row.try_get("r_updated_at")?,
        }))
    }
}

fn kind(s: &str) -> Result<Kind> {
    Kind::parse(s).ok_or_else(|| Error::Internal(format!("unknown kind {s:?} in store")))
}

impl TryFrom<ResourceRow> for Resource {
    type Error = Error;
    fn try_from(r: ResourceRow) -> Result<Resource> {
        Ok(Resource {
            id: r.id,
            kind: kind(&r.kind)?,
            name: r.name,
            state: r.state,
            spec: r.spec.0,
            version: r.version,
            spec_version: r.spec_version,
            applied_version: r.applied_version,
            applied_spec: r.applied_spec.map(|j| j.0),
            outputs: r.outputs.0,
            observed: r.observed.map(|j| j.0),
            drift: r.drift.map(|j| j.0),
            created_by: r.created_by,
            updated_by: r.updated_by,
            created_at: r.created_at.0,
            updated_at: r.updated_at.0,
        })
    }
}

pub(crate) struct RunRow {
    pub(crate) id: Uuid,
    pub(crate) resource_id: Uuid,
    kind: String,
    resource_name: String,
    action: String,
    params: Json<Value>,
    from_state: String,
    pub(crate) working_state: String,
    ok_state: String,
    pub(crate) err_state: String,
    pub(crate) status: String,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    actor: String,
    reason: Option<String>,
    idempotency_key: Option<String>,
    parent_run: Option<Uuid>,
    provider: String,
    timeout_secs: i64,
    created_at: Ts,
    run_after: Ts,
    started_at: Option<Ts>,
    finished_at: Option<Ts>,
    worker: Option<String>,
    pub(crate) lease_token: Option<Uuid>,
    lease_expires_at: Option<Ts>,
    heartbeat_at: Option<Ts>,
    outputs: Option<Json<Value>>,
    error: Option<Json<RunError>>,
    cancel_requested_at: Option<Ts>,
    cancel_requested_by: Option<String>,
    settings: Json<Value>,
    environment: Option<String>,
    spec_version: Option<i64>,
}

from_row!(RunRow {
    id,
    resource_id,
    kind,
    resource_name,
    action,
    params,
    from_state,
    working_state,
    ok_state,
    err_state,
    status,
    attempt,
    max_attempts,
    actor,
    reason,
    idempotency_key,
    parent_run,
    provider,
    timeout_secs,
    created_at,
    run_after,
    started_at,
    finished_at,
    worker,
    lease_token,
    lease_expires_at,
    heartbeat_at,
    outputs,
    error,
    cancel_requested_at,
    cancel_requested_by,
    settings,
    environment,
    spec_version
});

impl TryFrom<RunRow> for Run {
    type Error = Error;
    fn try_from(r: RunRow) -> Result<Run> {
        Ok(Run {
            id: r.id,
            resource_id: r.resource_id,
            kind: kind(&r.kind)?,
            resource_name: r.resource_name,
            action: r.action,
            params: r.params.0,
            from_state: r.from_state,
            working_state: r.working_state,
            ok_state: r.ok_state,
            err_state: r.err_state,
            status: RunStatus::parse(&r.status)
                .ok_or_else(|| Error::Internal(format!("unknown run status {:?} in store", r.status)))?,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            actor: r.actor,
            reason: r.reason,
            idempotency_key: r.idempotency_key,
            parent_run: r.parent_run,
            provider: r.provider,
            timeout_secs: r.timeout_secs,
            created_at: r.created_at.0,
            run_after: r.run_after.0,
            started_at: r.started_at.map(|t| t.0),
            finished_at: r.finished_at.map(|t| t.0),
            worker: r.worker,
            lease_token: r.lease_token,
            lease_expires_at: r.lease_expires_at.map(|t| t.0),
            heartbeat_at: r.heartbeat_at.map(|t| t.0),
            outputs: r.outputs.map(|j| j.0),
            error: r.error.map(|j| j.0),
            cancel_requested_at: r.cancel_requested_at.map(|t| t.0),
            cancel_requested_by: r.cancel_requested_by,
            settings: r.settings.0,
            environment: r.environment,
            spec_version: r.spec_version,
        })
    }
}

pub(crate) struct SpecVersionRow {
    resource_id: Uuid,
    version: i64,
    actor: String,
    reason: Option<String>,
    patch: Json<Value>,
    spec: Json<Value>,
    created_at: Ts,
}

from_row!(SpecVersionRow { resource_id, version, actor, reason, patch, spec, created_at });

impl From<SpecVersionRow> for SpecVersion {
    fn from(v: SpecVersionRow) -> SpecVersion {
        SpecVersion {
            resource_id: v.resource_id,
            version: v.version,
            actor: v.actor,
            reason: v.reason,
            patch: v.patch.0,
            spec: v.spec.0,
            created_at: v.created_at.0,
        }
    }
}

pub(crate) struct EventRow {
    seq: i64,
    run_id: Uuid,
    at: Ts,
    attempt: i32,
    level: String,
    step: String,
    message: String,
    data: Option<Json<Value>>,
}

from_row!(EventRow { seq, run_id, at, attempt, level, step, message, data });

impl From<EventRow> for RunEvent {
    fn from(e: EventRow) -> RunEvent {
        RunEvent {
            seq: e.seq,
            run_id: e.run_id,
            at: e.at.0,
            attempt: e.attempt,
            level: Level::parse(&e.level),
            step: e.step,
            message: e.message,
            data: e.data.map(|j| j.0),
        }
    }
}

pub(crate) struct IdempotencyRow {
    pub(crate) fingerprint: String,
    pub(crate) state: String,
    pub(crate) response_status: Option<i32>,
    pub(crate) location: Option<String>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) updated_at: Ts,
}

from_row!(IdempotencyRow { fingerprint, state, response_status, location, body, updated_at });

pub(crate) fn runs(rows: Vec<RunRow>) -> Result<Vec<Run>> {
    rows.into_iter().map(Run::try_from).collect()
}

pub(crate) struct TokenRow {
    id: Uuid,
    user_id: Uuid,
    name: String,
    prefix: String,
    expires_at: Option<Ts>,
    created_at: Ts,
    created_by: String,
    revoked_at: Option<Ts>,
    revoked_by: Option<String>,
    last_used_at: Option<Ts>,
}

from_row!(TokenRow {
    id,
    user_id,
    name,
    prefix,
    expires_at,
    created_at,
    created_by,
    revoked_at,
    revoked_by,
    last_used_at
});

impl From<TokenRow> for Token {
    fn from(t: TokenRow) -> Token {
        Token {
            id: t.id,
            user_id: t.user_id,
            name: t.name,
            prefix: t.prefix,
            expires_at: t.expires_at.map(|x| x.0),
            created_at: t.created_at.0,
            created_by: t.created_by,
            revoked_at: t.revoked_at.map(|x| x.0),
            revoked_by: t.revoked_by,
            last_used_at: t.last_used_at.map(|x| x.0),
        }
    }
}

pub(crate) struct SessionRow {
    hash: String,
    token_id: Uuid,
    created_at: Ts,
    expires_at: Ts,
    last_seen_at: Ts,
    ended_at: Option<Ts>,
}

from_row!(SessionRow { hash, token_id, created_at, expires_at, last_seen_at, ended_at });

impl From<SessionRow> for Session {
    fn from(s: SessionRow) -> Session {
        Session {
            hash: s.hash,
            token_id: s.token_id,
            created_at: s.created_at.0,
            expires_at: s.expires_at.0,
            last_seen_at: s.last_seen_at.0,
            ended_at: s.ended_at.map(|x| x.0),
        }
    }
}

pub(crate) struct SettingRow {
    id: Uuid,
    scope: String,
    key: String,
    version: i64,
    value: Option<String>,
    sealed: Option<Vec<u8>>,
    secret: bool,
    deleted: bool,
    actor: String,
    reason: Option<String>,
    created_at: Ts,
}

from_row!(SettingRow { id, scope, key, version, value, sealed, secret, deleted, actor, reason, created_at });

impl From<SettingRow> for SettingVersion {
    fn from(s: SettingRow) -> SettingVersion {
        SettingVersion {
            id: s.id,
            scope: s.scope,
            key: s.key,
            version: s.version,
            value: s.value,
            sealed: s.sealed,
            secret: s.secret,
            deleted: s.deleted,
            actor: s.actor,
            reason: s.reason,
            created_at: s.created_at.0,
        }
    }
}

/// The columns of a rollup row, in [`RollupRow`]'s order.
pub(crate) const ROLLUP_COLUMNS: &str = "grain, bucket, kind, action, environment, actor, succeeded, succeeded_timed, \
    succeeded_ms, failed, failed_timed, failed_ms, cancelled, cancelled_timed, cancelled_ms, max_ms, hist";

/// Decoded by position, in [`ROLLUP_COLUMNS`] order: a stats query reads
/// thousands of these, and looking each column up by name costs more than
/// decoding it.
pub(crate) struct RollupRow {
    grain: String,
    bucket: Ts,
    kind: String,
    action: String,
    environment: String,
    actor: String,
    succeeded: i64,
    succeeded_timed: i64,
    succeeded_ms: i64,
    failed: i64,
    failed_timed: i64,
    failed_ms: i64,
    cancelled: i64,
    cancelled_timed: i64,
    cancelled_ms: i64,
    max_ms: i64,
    hist: Vec<u8>,
}

impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for RollupRow
where
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Ts: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        Ok(RollupRow {
            grain: row.try_get(0)?,
            bucket: row.try_get(1)?,
            kind: row.try_get(2)?,
            action: row.try_get(3)?,
            environment: row.try_get(4)?,
            actor: row.try_get(5)?,
            succeeded: row.try_get(6)?,
            succeeded_timed: row.try_get(7)?,
            succeeded_ms: row.try_get(8)?,
            failed: row.try_get(9)?,
            failed_timed: row.try_get(10)?,
            failed_ms: row.try_get(11)?,
            cancelled: row.try_get(12)?,
            cancelled_timed: row.try_get(13)?,
            cancelled_ms: row.try_get(14)?,
            max_ms: row.try_get(15)?,
            hist: row.try_get(16)?,
        })
    }
}

impl TryFrom<RollupRow> for Rollup {
    type Error = Error;
    fn try_from(r: RollupRow) -> Result<Rollup> {
        let outcome = |count, timed, sum_ms| OutcomeTotals { count, timed, sum_ms };
        Ok(Rollup {
            key: RollupKey {
                grain: Grain::parse(&r.grain)
                    .ok_or_else(|| Error::Internal(format!("unknown rollup grain {:?} in store", r.grain)))?,
                bucket: r.bucket.0,
                kind: r.kind,
                action: r.action,
                environment: r.environment,
                actor: r.actor,
            },
            totals: Totals {
                outcomes: [
                    outcome(r.succeeded, r.succeeded_timed, r.succeeded_ms),
                    outcome(r.failed, r.failed_timed, r.failed_ms),
                    outcome(r.cancelled, r.cancelled_timed, r.cancelled_ms),
                ],
                max_ms: r.max_ms,
                hist: Hist::decode(&r.hist).map_err(|e| Error::Internal(e.to_string()))?,
            },
        })
    }
}

/// A finished run as the rollup folder reads it.
pub(crate) struct FinishedRunRow {
    pub(crate) id: Uuid,
    kind: String,
    action: String,
    environment: Option<String>,
    actor: String,
    status: String,
    created_at: Ts,
    started_at: Option<Ts>,
    finished_at: Option<Ts>,
}

from_row!(FinishedRunRow { id, kind, action, environment, actor, status, created_at, started_at, finished_at });

impl TryFrom<FinishedRunRow> for FinishedRun {
    type Error = Error;
    fn try_from(r: FinishedRunRow) -> Result<FinishedRun> {
        let status = RunStatus::parse(&r.status)
            .ok_or_else(|| Error::Internal(format!("unknown run status {:?} in store", r.status)))?;
        Ok(FinishedRun {
            kind: r.kind,
            action: r.action,
            environment: r.environment,
            actor: r.actor,
            status,
            created_at: r.created_at.0,
            started_at: r.started_at.map(|t| t.0),
            finished_at: r.finished_at.map(|t| t.0).ok_or_else(|| {
                Error::Internal(format!("run {} is pending for the rollups but has not finished", r.id))
            })?,
        })
    }
}
