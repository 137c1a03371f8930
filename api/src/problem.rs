//! RFC 9457 problem details: the one place where errors become responses.
//!
//! Internal detail (database errors, panics) is logged here with its whole
//! cause chain and never sent: the client gets a stable `type` and a
//! sentence it can act on.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_domain::Error;
use futures::FutureExt;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

/// An error response (`application/problem+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// Stable identifier of the problem kind, e.g. `/problems/resource-busy`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The fields that are wrong, for `invalid-request`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldProblem>,
    /// The run that holds the resource, for `resource-busy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_transition: Option<Uuid>,
    /// For `action-not-allowed`: the state and what it allows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_actions: Option<Vec<String>>,
    /// For `resource-in-use`: the live resources that name this one, as `kind/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_by: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldProblem {
    /// Path of the offending field, e.g. `spec.count`.
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<Option<String>>) -> Problem {
        Problem {
            kind: format!("/problems/{slug}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            active_transition: None,
            current_state: None,
            allowed_actions: None,
            used_by: None,
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Problem {
        let mut p = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "The request is invalid", None);
        p.errors.push(FieldProblem { field: field.into(), message: message.into() });
        p.detail = Some(format!("{field}: {}", p.errors[0].message));
        p
    }

    pub fn bad_request(slug: &str, detail: String) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, slug, "Bad request", detail)
    }

    pub fn internal() -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "Something went wrong on our side; the server log has the detail.".to_string(),
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (status, [(header::CONTENT_TYPE, "application/problem+json")], body).into_response()
    }
}

/// A handler that panics answers 500 with a problem, like any other internal
/// error, instead of dropping the connection without a response. The panic
/// is a bug: its message is logged here (and by the panic hook), never sent.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(response) => response,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            tracing::error!(panic = %message, "request handler panicked");
            Problem::internal().into_response()
        }
    }
}

/// Logs an error with its whole cause chain, once.
pub fn log_internal(e: &(dyn std::error::Error + 'static)) {
    let mut chain = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        chain.push(s.to_string());
        cur = s.source();
    }
    tracing::error!(error = %e, causes = ?chain, "request failed");
}

impl From<Error> for Problem {
    fn from(e: Error) -> Problem {
        use StatusCode as S;
        match e {
            Error::NotFound { kind, key } => {
                Problem::new(S::NOT_FOUND, "not-found", "Not found", format!("{kind} {key} not found"))
            }
            Error::AlreadyExists { kind, name } => Problem::new(
                S::CONFLICT,
                "already-exists",
                "Already exists",
                format!("a {kind} named {name:?} already exists"),
            ),
            Error::Invalid(fields) => {
                let mut p = Problem::new(S::UNPROCESSABLE_ENTITY, "invalid-request", "The request is invalid", None);
                p.detail =
                    Some(fields.iter().map(|f| format!("{}: {}", f.field, f.message)).collect::<Vec<_>>().join("; "));
                p.errors = fields.into_iter().map(|f| FieldProblem { field: f.field, message: f.message }).collect();
                p
            }
            Error::Busy { kind, resource, run } => {
                let mut p = Problem::new(
                    S::CONFLICT,
                    "resource-busy",
                    "Another transition is active",
                    format!("{kind} {resource} is busy with transition {run}; wait for it or cancel it (POST /v1/transitions/{run}/cancel)"),
                );
                p.active_transition = Some(run);
                p
            }
            Error::NotAllowed { kind, state, action, allowed } => {
                let mut p = Problem::new(
                    S::CONFLICT,
                    "action-not-allowed",
                    "Action not allowed in this state",
                    format!(
                        "a {kind} in state {state:?} cannot {action:?}; allowed: {}",
                        if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") }
                    ),
                );
                p.current_state = Some(state);
                p.allowed_actions = Some(allowed);
                p
            }
            e @ Error::Moved { .. } => {
                Problem::new(S::CONFLICT, "resource-moved", "The resource changed meanwhile", e.to_string())
            }
            Error::InUse { kind, name, action, users } => {
                let mut p = Problem::new(
                    S::CONFLICT,
                    "resource-in-use",
                    "The resource is in use",
                    format!("{kind} {name} cannot {action} while these use it: {}", users.join(", ")),
                );
                p.used_by = Some(users);
                p
            }
            e @ Error::DependencyNotReady { .. } => {
                Problem::new(S::CONFLICT, "dependency-not-ready", "A resource this needs is not ready", e.to_string())
            }
            e @ Error::Locked { .. } => {
                Problem::new(S::CONFLICT, "resource-locked", "The resource cannot be changed", e.to_string())
            }
            e @ Error::NothingToRetry { .. } => {
                Problem::new(S::CONFLICT, "nothing-to-retry", "Nothing to retry", e.to_string())
            }
            e @ Error::NothingToAdopt { .. } => {
                Problem::new(S::CONFLICT, "nothing-to-adopt", "Nothing to adopt", e.to_string())
            }
            e @ Error::AlreadyEnded { .. } => {
                Problem::new(S::CONFLICT, "transition-ended", "The transition already ended", e.to_string())
            }
            e @ Error::NoProvider { .. } => Problem::new(S::CONFLICT, "no-provider", "No such provider", e.to_string()),
            e @ Error::NoPreview { .. } => Problem::new(S::CONFLICT, "no-preview", "Nothing to preview", e.to_string()),
            e @ Error::UserNotActive { .. } => {
                Problem::new(S::CONFLICT, "user-not-active", "The user is not active", e.to_string())
            }
            Error::Unauthenticated(why) => {
                Problem::new(S::UNAUTHORIZED, "unauthenticated", "Authentication required", why)
            }
            Error::Forbidden { permission } => Problem::new(
                S::FORBIDDEN,
                "forbidden",
                "Permission denied",
                format!("this needs the permission {permission}, which none of your roles grants"),
            ),
            Error::VersionMismatch { expected, current } => Problem::new(
                S::PRECONDITION_FAILED,
                "precondition-failed",
                "The resource has changed",
                format!("If-Match named version {expected} but the resource is at version {current}; GET it again"),
            ),
            Error::IdempotencyMismatch => Problem::new(
                S::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "this Idempotency-Key was used with a different request; use a new key for a new request".to_string(),
            ),
            Error::IdempotencyInProgress => Problem::new(
                S::CONFLICT,
                "idempotency-key-in-progress",
                "Request in progress",
                "a request with this Idempotency-Key is still being processed; retry shortly".to_string(),
            ),
            e @ (Error::StaleLease { .. } | Error::Internal(_)) => {
                log_internal(&e);
                Problem::internal()
            }
            e @ Error::Store { .. } => {
                log_internal(&e);
                Problem::new(
                    S::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "Storage unavailable",
                    "the database did not answer; retry shortly".to_string(),
                )
            }
        }
    }
}

pub type ApiResult<T> = Result<T, Problem>;

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use axum::routing::get;
    use axum::{middleware, Router};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_a_problem() {
        async fn boom() -> &'static str {
            panic!("a bug")
        }
        let app = Router::new().route("/", get(boom)).layer(middleware::from_fn(super::catch_panic));
        let r = app.oneshot(Request::get("/").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(r.status(), 500);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let body = to_bytes(r.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["type"], "/problems/internal");
        assert!(!body.to_string().contains("a bug"), "the panic message is logged, never sent: {body}");
    }
}
