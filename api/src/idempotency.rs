//! `Idempotency-Key` for every POST.
//!
//! The first request with a key runs and, if it succeeded (2xx), its
//! response is saved; the same key with the same method, path and body
//! gets that response again (`Idempotent-Replayed: true`) without new work.
//! The same key with another request is a 422; while the first is still
//! running, a 409. A request that failed is not saved: it did no work, so
//! retrying it for real is both safe and what the caller wants. Neither is
//! a response marked `Cache-Control: no-store` (a new token's secret):
//! its handler says with [`ReplayAs`] what a retry gets instead (the token
//! without its secret), or, without one, the key is released.

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_domain::model::{IdempotencyBegin, SavedResponse};
use drover_domain::Error;
use sha2::{Digest, Sha256};

use crate::app::BODY_LIMIT;
use crate::problem::Problem;
use crate::routes::AppState;

/// What a retry of this request gets instead of its response's body, for
/// a response that holds something shown once (`Cache-Control: no-store`).
#[derive(Clone)]
pub struct ReplayAs(pub axum::body::Bytes);

pub async fn layer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get("idempotency-key").map(|v| v.to_str().map(str::to_string)) else {
        return next.run(req).await;
    };
    let Ok(key) = key else {
        return Problem::invalid("Idempotency-Key", "must be 1 to 255 visible ASCII characters").into_response();
    };
    let caller = req.extensions().get::<drover_domain::auth::Principal>().map(|p| p.user_id);
    let key = match drover_domain::service::idempotency_key(caller, &key) {
        Ok(key) => key,
        Err(e) => return Problem::from(e).into_response(),
    };
    let (parts, body) = req.into_parts();
    let bytes = match to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
                format!("request bodies are limited to {BODY_LIMIT} bytes"),
            )
            .into_response()
        }
    };
    let mut h = Sha256::new();
    h.update(parts.method.as_str());
    h.update(b" ");
    h.update(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("").as_bytes());
    h.update(b"\n");
    h.update(&bytes);
    let fingerprint = format!("{:x}", h.finalize());

    match s.service.idempotency_begin(&key, &fingerprint).await {
        Ok(IdempotencyBegin::Proceed) => {}
        Ok(IdempotencyBegin::Replay(saved)) => return replay(saved),
        Ok(IdempotencyBegin::Mismatch) => return Problem::from(Error::IdempotencyMismatch).into_response(),
        Ok(IdempotencyBegin::InProgress) => return Problem::from(Error::IdempotencyInProgress).into_response(),
        Err(e) => return Problem::from(e).into_response(),
    }

    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let no_store = response.headers().get(header::CACHE_CONTROL).is_some_and(|v| v.as_bytes() == b"no-store");
    let replay_as = response.extensions().get::<ReplayAs>().cloned();
    if !response.status().is_success() || (no_store && replay_as.is_none()) {
        // Failed requests did no work; `no-store` responses hold a secret
        // that must not be kept for replay.
        if let Err(e) = s.service.idempotency_abandon(&key).await {
            tracing::warn!(error = %e, "could not release idempotency key");
        }
        return response;
    }
    let (parts, body) = response.into_parts();
    // What is saved: the body, or what its handler said a retry gets.
    let (body, saved_body) = match replay_as {
        Some(ReplayAs(replay)) => (body, replay),
        None => match to_bytes(body, usize::MAX).await {
            Ok(b) => (Body::from(b.clone()), b),
            Err(e) => {
                tracing::error!(error = %e, "could not buffer a response to save it");
                return Problem::internal().into_response();
            }
        },
    };
    let saved = SavedResponse {
        status: parts.status.as_u16(),
        location: parts.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string),
        body: saved_body.to_vec(),
    };
    if let Err(e) = s.service.idempotency_save(&key, &saved).await {
        // The work is done; a retry would do it again only if this key is lost.
        tracing::error!(error = %e, key = %key, "could not save an idempotent response");
    }
    Response::from_parts(parts, body)
}

fn replay(saved: SavedResponse) -> Response {
    let status = StatusCode::from_u16(saved.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, saved.body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    if let Some(loc) = saved.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    resp
}
