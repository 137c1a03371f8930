//! The domain's one error type.
//!
//! Variants carry what a caller needs to act (the active run, the allowed
//! actions, the field that is wrong). Internal failures keep their source in
//! `#[source]` so that the cause chain is logged once, never sent to clients.

use uuid::Uuid;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }

    /// Reads `value` as a `T`, or names the field that is wrong: its path
    /// under `prefix` (`spec.health_check.path`, `spec.subnets[0]`), with
    /// the field a "missing field" message names appended (serde's path
    /// stops at the object that would hold it); `whole` when the value
    /// itself is wrong and there is no prefix.
    pub fn read<T: serde::de::DeserializeOwned>(
        value: &serde_json::Value,
        prefix: Option<&str>,
        whole: &str,
    ) -> Result<T, FieldError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            let at = Some(path.as_str()).filter(|p| !matches!(*p, "." | ""));
            let missing = message.strip_prefix("missing field").and_then(|_| message.split('`').nth(1));
            let field = [prefix, at, missing].into_iter().flatten().collect::<Vec<_>>().join(".");
            FieldError::new(if field.is_empty() { whole.to_string() } else { field }, message)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {key} not found")]
    NotFound { kind: &'static str, key: String },

    #[error("{kind} named {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },

    #[error("invalid request")]
    Invalid(Vec<FieldError>),

    #[error("{kind} {resource} has an active transition {run}")]
    Busy { kind: &'static str, resource: Uuid, run: Uuid },

    #[error("action {action:?} is not allowed in state {state:?}")]
    NotAllowed { kind: &'static str, state: String, action: String, allowed: Vec<String> },

    /// The resource moved between the look and the write (another request
    /// at the same moment); looking again shows where it is.
    #[error("{kind} {name} changed meanwhile: {what}")]
    Moved { kind: &'static str, name: String, what: String },

    /// Live resources name this one in their specs.
    #[error("{kind} {name} is used by {}", .users.join(", "))]
    InUse { kind: &'static str, name: String, action: String, users: Vec<String> },

    /// A resource an action needs is not in the state it needs.
    #[error("{kind} {name:?} is {state}; {action} needs it {required}")]
    DependencyNotReady { kind: &'static str, name: String, state: String, action: String, required: &'static str },

    /// Built in, or otherwise not to be changed.
    #[error("{why}")]
    Locked { why: String },

    #[error("{kind} {name} has no failed transition to retry")]
    NothingToRetry { kind: &'static str, name: String },

    /// `adopt` found nothing it may take into the record: why.
    #[error("cannot adopt what {kind} {name} runs: {why}")]
    NothingToAdopt { kind: &'static str, name: String, why: String },

    #[error("transition {run} already ended {status}")]
    AlreadyEnded { run: Uuid, status: &'static str },

    #[error("no provider {provider:?} is registered for {kind} resources")]
    NoProvider { kind: &'static str, provider: String },

    /// The provider renders nothing to preview, or could not render it.
    #[error("cannot preview {action} of {kind} {name}: {why}")]
    NoPreview { kind: &'static str, name: String, action: String, why: String },

    /// A user that is not active cannot be given tokens.
    #[error("user {name} is {state}; enable it first")]
    UserNotActive { name: String, state: String },

    /// No usable credentials; the message says which check failed.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),

    #[error("permission {permission} is required")]
    Forbidden { permission: String },

    #[error("version mismatch: expected {expected}, current {current}")]
    VersionMismatch { expected: i64, current: i64 },

    #[error("idempotency key reused with a different request")]
    IdempotencyMismatch,

    #[error("a request with this idempotency key is still in progress")]
    IdempotencyInProgress,

    /// A fenced write found the row no longer held by this lease.
    #[error("run {run} is no longer held by this worker's lease")]
    StaleLease { run: Uuid },

    #[error("storage failure while trying to {op}")]
    Store {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid(vec![FieldError::new(field, message)])
    }

    pub fn store(op: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Store { op, source: Box::new(source) }
    }
}
