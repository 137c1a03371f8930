//! Domain records: resources, runs (transitions) and their events.
//!
//! These are neither database rows nor HTTP bodies: `persistence` maps rows
//! to them and `api` maps them to DTOs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::kinds::Kind;

pub type Time = DateTime<Utc>;

#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub id: Uuid,
    pub kind: Kind,
    pub name: String,
    pub state: String,
    pub spec: Value,
    /// Generation: bumped by every change of spec or state.
    pub version: i64,
    /// The newest spec version (see [`SpecVersion`]); `spec` is its spec.
    pub spec_version: i64,
    /// The spec version that last ran whole, if any did.
    pub applied_version: Option<i64>,
    /// The spec as it runs: set by the successful run that applied it (or
    /// by the write itself, for kinds whose spec takes effect when
    /// written). `None` until something applied it.
    pub applied_spec: Option<Value>,
    /// What the last successful run produced (artifact path, instances…).
    pub outputs: Value,
    /// What the observer last saw of the real thing, if anything.
    pub observed: Option<Value>,
    /// What the last refresh found ([`crate::drift::Drift`]); `None`
    /// until one ran (and in a resource handed to a provider).
    pub drift: Option<Value>,
    pub created_by: String,
    pub updated_by: String,
    pub created_at: Time,
    pub updated_at: Time,
}

#[derive(Debug, Clone)]
pub struct NewResource {
    pub id: Uuid,
    pub kind: Kind,
    pub name: String,
    pub state: String,
    pub spec: Value,
    pub actor: String,
    /// Why, recorded with spec version 1.
    pub reason: Option<String>,
    /// Whether the spec takes effect as it is written (records such as
    /// environments): then it is applied at once.
    pub applied: bool,
    pub now: Time,
}

/// One version of a resource's spec: what a create, a `PATCH` or a run that
/// changes the spec (a scale's count) wrote. Append-only.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecVersion {
    pub resource_id: Uuid,
    /// 1 for the create, then one more per change.
    pub version: i64,
    pub actor: String,
    pub reason: Option<String>,
    /// The JSON merge patch (RFC 7396) from the version before to this one;
    /// for version 1, the whole spec.
    pub patch: Value,
    /// The spec this version produced.
    pub spec: Value,
    pub created_at: Time,
}

/// A change of a resource's spec (a `PATCH`), fenced on the spec version
/// it was computed from.
#[derive(Debug, Clone)]
pub struct SpecChange {
    pub resource: Uuid,
    /// The spec version the change was computed from.
    pub from_version: i64,
    pub spec: Value,
    pub patch: Value,
    pub actor: String,
    pub reason: Option<String>,
    /// Whether the spec takes effect as written (see [`NewResource::applied`]).
    pub applied: bool,
    pub now: Time,
}

/// Which resources a list returns (besides its kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceFilter {
    /// Only those whose spec names this environment.
    pub environment: Option<String>,
}

/// How a caller names a resource in a path: its id or its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceKey {
    Id(Uuid),
    Name(String),
}

impl ResourceKey {
    pub fn parse(s: &str) -> ResourceKey {
        match Uuid::parse_str(s) {
            Ok(id) => ResourceKey::Id(id),
            Err(_) => ResourceKey::Name(s.to_string()),
        }
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResourceKey::Id(id) => write!(f, "{id}"),
            ResourceKey::Name(n) => write!(f, "{n:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] =
        [RunStatus::Queued, RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        match self {
            RunStatus::Queued | RunStatus::Running => false,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled => true,
        }
    }
}

/// A typed failure: stable code, human message, whether trying again may help.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// One transition: a requested change of one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: Uuid,
    pub resource_id: Uuid,
    pub kind: Kind,
    pub resource_name: String,
    pub action: String,
    pub params: Value,
    pub from_state: String,
    pub working_state: String,
    pub ok_state: String,
    pub err_state: String,
    pub status: RunStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub actor: String,
    pub reason: Option<String>,
    pub idempotency_key: Option<String>,
    pub parent_run: Option<Uuid>,
    pub provider: String,
    pub timeout_secs: i64,
    pub created_at: Time,
    pub run_after: Time,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
    pub worker: Option<String>,
    pub lease_token: Option<Uuid>,
    pub lease_expires_at: Option<Time>,
    pub heartbeat_at: Option<Time>,
    pub outputs: Option<Value>,
    pub error: Option<RunError>,
    pub cancel_requested_at: Option<Time>,
    pub cancel_requested_by: Option<String>,
    /// The settings versions the run was asked with: `[{scope, key, version}]`.
    pub settings: Value,
    /// The environment of the resource when the run was asked for.
    pub environment: Option<String>,
    /// The spec version the run ran against (`None` for runs asked for
    /// before spec versions were recorded).
    pub spec_version: Option<i64>,
}

impl Run {
    pub fn duration_ms(&self) -> Option<i64> {
        Some((self.finished_at? - self.started_at?).num_milliseconds())
    }

    pub fn lease(&self) -> Option<Lease> {
        Some(Lease { run: self.id, token: self.lease_token? })
    }
}

#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub resource_id: Uuid,
    pub kind: Kind,
    pub resource_name: String,
    pub action: String,
    pub params: Value,
    pub from_state: String,
    pub working_state: String,
    pub ok_state: String,
    pub err_state: String,
    pub max_attempts: i32,
    pub actor: String,
    pub reason: Option<String>,
    pub idempotency_key: Option<String>,
    pub parent_run: Option<Uuid>,
    pub provider: String,
    pub timeout_secs: i64,
    pub settings: Value,
    pub environment: Option<String>,
    pub now: Time,
}

/// A worker's claim on a running run. Every write a worker makes on the run
/// is fenced on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub run: Uuid,
    pub token: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Level {
        match s {
            "warn" => Level::Warn,
            "error" => Level::Error,
            _ => Level::Info,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    /// Position in the event log; increasing, usable as a cursor.
    pub seq: i64,
    pub run_id: Uuid,
    pub at: Time,
    pub attempt: i32,
    pub level: Level,
    pub step: String,
    pub message: String,
    pub data: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub at: Time,
    pub level: Level,
    pub step: String,
    pub message: String,
    pub data: Option<Value>,
}

impl NewEvent {
    pub fn info(step: impl Into<String>, message: impl Into<String>) -> NewEvent {
        NewEvent { at: Utc::now(), level: Level::Info, step: step.into(), message: message.into(), data: None }
    }

    pub fn with_level(mut self, level: Level) -> NewEvent {
        self.level = level;
        self
    }

    pub fn with_data(mut self, data: Value) -> NewEvent {
        self.data = Some(data);
        self
    }
}

/// A spec a run's success writes, and the merge patch from the spec before.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecUpdate {
    pub spec: Value,
    pub patch: Value,
}

/// How a worker ends a run.
#[derive(Debug, Clone)]
pub struct Completion {
    pub status: RunStatus,
    pub resource_state: String,
    pub outputs: Option<Value>,
    pub error: Option<RunError>,
    /// Replaces the resource's spec (a successful scale records the count),
    /// as a new spec version.
    pub spec: Option<SpecUpdate>,
    /// The run applied the whole spec (as it is after `spec`): the
    /// resource's applied spec and version become its spec and version.
    pub applies_spec: bool,
    /// Otherwise, the applied spec after the run, when it changed part of
    /// it (a local scale applies `count` only).
    pub applied: Option<Value>,
    pub event: NewEvent,
    pub now: Time,
}

/// Filters of `GET /v1/transitions`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub resource: Option<Uuid>,
    pub kind: Option<Kind>,
    pub action: Option<String>,
    pub status: Option<RunStatus>,
    pub since: Option<Time>,
    pub until: Option<Time>,
    pub parent: Option<Uuid>,
    pub environment: Option<String>,
    pub actor: Option<String>,
}

/// Keyset pagination: items strictly after the cursor, newest first for runs
/// and oldest first for resources.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub after: Option<Uuid>,
    pub limit: u32,
}

pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next: Option<Uuid>,
}

/// The stored outcome of a request made with an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedResponse {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyBegin {
    /// First use of the key: go ahead, then save or abandon.
    Proceed,
    Replay(SavedResponse),
    Mismatch,
    InProgress,
}

/// An API token. The secret itself is never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// The first characters of the secret, to recognise it by.
    pub prefix: String,
    pub expires_at: Option<Time>,
    pub created_at: Time,
    pub created_by: String,
    pub revoked_at: Option<Time>,
    pub revoked_by: Option<String>,
    pub last_used_at: Option<Time>,
}

#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub prefix: String,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    pub expires_at: Option<Time>,
    pub created_by: String,
    pub now: Time,
}

/// A dashboard session: a browser signed in with an API token. Acts as
/// that token; only the SHA-256 of its cookie secret is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub hash: String,
    pub token_id: Uuid,
    pub created_at: Time,
    pub expires_at: Time,
    pub last_seen_at: Time,
    pub ended_at: Option<Time>,
}

/// One immutable version of a setting.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingVersion {
    pub id: Uuid,
    /// `global`, `environment:NAME` or `cluster:ID`.
    pub scope: String,
    pub key: String,
    pub version: i64,
    /// The value, when it is not secret.
    pub value: Option<String>,
    /// Nonce and ciphertext of a secret value.
    pub sealed: Option<Vec<u8>>,
    pub secret: bool,
    /// A deletion: the key has no value from this version on.
    pub deleted: bool,
    pub actor: String,
    pub reason: Option<String>,
    pub created_at: Time,
}

#[derive(Debug, Clone)]
pub struct NewSettingVersion {
    pub id: Uuid,
    pub scope: String,
    pub key: String,
    pub version: i64,
    pub value: Option<String>,
    pub sealed: Option<Vec<u8>>,
    pub secret: bool,
    pub deleted: bool,
    pub actor: String,
    pub reason: Option<String>,
    pub now: Time,
}

/// How much work is waiting, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Queued and due now.
    pub due: i64,
    /// Queued for later (waiting to retry).
    pub waiting: i64,
    pub running: i64,
}
