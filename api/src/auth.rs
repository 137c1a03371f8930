//! Authentication at the edge: every request but the public ones must carry
//! `Authorization: Bearer <token>`; the principal goes into the request for
//! handlers to check permissions against.
//!
//! **Invariant:** the only unauthenticated paths are [`PUBLIC`]. The
//! route-walk test in `tests/` fails when an operation documented in the
//! OpenAPI document answers without a token.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_domain::auth::Principal;

use crate::problem::Problem;
use crate::routes::AppState;

/// Paths anyone may call.
pub const PUBLIC: [&str; 3] = ["/healthz", "/readyz", "/openapi.json"];

/// The public paths, and the dashboard's, which checks its own sessions
/// (`crate::ui`): a browser never sends a bearer token.
pub(crate) fn is_public(path: &str) -> bool {
    PUBLIC.contains(&path) || path == "/docs" || path.starts_with("/docs/") || path == "/ui" || path.starts_with("/ui/")
}

pub async fn layer(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(bearer) = bearer.filter(|b| !b.is_empty()) else {
        return unauthenticated("send Authorization: Bearer <token>".into());
    };
    // Reads may use a principal read moments ago; anything else reads it
    // afresh, and makes this process forget the remembered ones before and
    // after it runs (it may have changed a token, user or role).
    let reads_only = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let authenticated = if reads_only {
        s.auth.authenticate_read(bearer).await
    } else {
        s.auth.forget_recent();
        s.auth.authenticate(bearer).await
    };
    match authenticated {
        Ok(principal) => {
            tracing::Span::current().record("user", principal.user.as_str());
            req.extensions_mut().insert(principal);
            let response = next.run(req).await;
            if !reads_only {
                s.auth.forget_recent();
            }
            response
        }
        Err(drover_domain::Error::Unauthenticated(why)) => unauthenticated(why),
        Err(e) => Problem::from(e).into_response(),
    }
}

fn unauthenticated(detail: String) -> Response {
    let mut r =
        Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", "Authentication required", detail).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"drover\""));
    r
}

/// The authenticated caller.
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", "Authentication required", None))
    }
}

impl Caller {
    pub fn require(&self, permission: &str) -> Result<(), Problem> {
        self.0.require(permission).map_err(Problem::from)
    }

    pub fn actor(&self) -> String {
        self.0.user.clone()
    }
}
