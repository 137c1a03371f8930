//! The domain's one error type.
//!
//! Variants carry what a caller needs to act (the active run, the allowed
//! actions, the field that is wrong). Internal failures keep their source in
//! `#[source]` so that the cause chain is logged once, never sent to clients.

use uuid::Uuid;

use crate::kinds::Kind;

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
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {key} not found")]
    NotFound { kind: &'static str, key: String },

    #[error("{kind} named {name:?} already exists")]
    AlreadyExists { kind: Kind, name: String },

    #[error("invalid request")]
    Invalid(Vec<FieldError>),

    #[error("{kind} {resource} has an active transition {run}")]
    Busy { kind: Kind, resource: Uuid, run: Uuid },

    #[error("action {action:?} is not allowed in state {state:?}")]
    NotAllowed { kind: Kind, state: String, action: String, allowed: Vec<String> },

    #[error("{0}")]
    Conflict(String),

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
