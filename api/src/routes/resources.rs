//! What images and clusters share: create, read, list, patch, delete and
//! ask for a transition. The kind modules wrap these with their own types
//! and OpenAPI annotations.

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::Json;
use drover_domain::kinds::Kind;
use drover_domain::model::PageRequest;
use drover_domain::service::TransitionRequest as DomainRequest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;
use uuid::Uuid;

use super::AppState;
use crate::auth::Caller;
use crate::dto::*;
use crate::problem::{ApiResult, Problem};

/// The permission an action on a kind needs. Identity is all `users:admin`.
pub fn action_permission(kind: Kind, action: &str) -> String {
    match kind {
        Kind::User | Kind::Role => "users:admin".to_string(),
        Kind::Image | Kind::Cluster => format!("{kind}:{action}"),
    }
}

pub fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
}

pub fn page(limit: Option<u32>, cursor: Option<Uuid>) -> ApiResult<PageRequest> {
    match limit.unwrap_or(50) {
        l @ 1..=500 => Ok(PageRequest { after: cursor, limit: l }),
        _ => Err(Problem::invalid("limit", "must be between 1 and 500")),
    }
}

fn spec_of<S: DeserializeOwned>(v: &serde_json::Value) -> ApiResult<S> {
    serde_json::from_value(v.clone()).map_err(|e| {
        tracing::error!(error = %e, "stored spec does not match its API shape");
        Problem::internal()
    })
}

pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"v{version}\"")).expect("etag is ascii")
}

/// `If-Match: "v3"` → 3; `*` or absent → no precondition.
pub fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    s.trim_start_matches("W/").trim_matches('"').trim_start_matches('v').parse().map(Some).map_err(|_| {
        Problem::bad_request(
            "invalid-if-match",
            format!("If-Match must be an ETag this API gave out, like \"v3\"; got {s:?}"),
        )
    })
}

pub async fn create<S: Serialize + DeserializeOwned>(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    name: &str,
    spec: &S,
) -> ApiResult<(StatusCode, HeaderMap, Json<ResourceView<S>>)> {
    let value = serde_json::to_value(spec).map_err(|_| Problem::internal())?;
    let created = state.service.create(kind, name, &value, &caller.actor()).await?;
    let (headers, view) = get(state, kind, &created.id.to_string()).await?;
    let mut headers = headers;
    let location = format!("/v1/{kind}s/{}", created.id);
    headers.insert(header::LOCATION, HeaderValue::from_str(&location).expect("ascii"));
    Ok((StatusCode::CREATED, headers, view))
}

pub async fn get<S: DeserializeOwned>(
    state: &AppState,
    kind: Kind,
    key: &str,
) -> ApiResult<(HeaderMap, Json<ResourceView<S>>)> {
    let o = state.service.overview(kind, key).await?;
    let spec = spec_of(&o.resource.spec)?;
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, etag(o.resource.version));
    Ok((headers, Json(ResourceView::from_overview(o, spec))))
}

pub async fn list<S: DeserializeOwned>(state: &AppState, kind: Kind, q: ListQuery) -> ApiResult<Json<ResourcePage<S>>> {
    let p = state.service.list(kind, page(q.limit, q.cursor)?).await?;
    let items = p
        .items
        .into_iter()
        .map(|r| {
            Ok(ResourceSummary {
                spec: spec_of(&r.spec)?,
                id: r.id,
                name: r.name,
                state: r.state,
                version: r.version,
                created_at: r.created_at,
                updated_at: r.updated_at,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(ResourcePage { items, next_cursor: p.next }))
}

pub async fn patch<S: DeserializeOwned>(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    key: &str,
    headers: &HeaderMap,
    body: PatchResource,
) -> ApiResult<(HeaderMap, Json<ResourceView<S>>)> {
    if !body.spec.is_object() {
        return Err(Problem::invalid("spec", "must be an object (a JSON merge patch of the spec)"));
    }
    state.service.patch_spec(kind, key, &body.spec, if_match(headers)?, &caller.actor()).await?;
    get(state, kind, key).await
}

pub async fn delete(state: &AppState, kind: Kind, key: &str) -> ApiResult<StatusCode> {
    state.service.delete(kind, key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `permission` names the action as `{action}` (e.g. `cluster:{action}`):
/// asking for `scale` needs `cluster:scale`, and a `retry` needs both
/// `cluster:retry` and the permission of the action it repeats.
pub async fn transition(
    state: &AppState,
    caller: &Caller,
    permission: &str,
    kind: Kind,
    key: &str,
    headers: &HeaderMap,
    body: TransitionRequest,
) -> ApiResult<(StatusCode, HeaderMap, Json<Transition>)> {
    caller.require(&permission.replace("{action}", &body.action))?;
    if body.action == "retry" {
        if let Some(repeated) = state.service.retry_action(kind, key).await? {
            caller.require(&permission.replace("{action}", &repeated))?;
        }
    }
    let run = state
        .service
        .request(
            kind,
            key,
            DomainRequest {
                action: body.action,
                params: body.params,
                reason: body.reason,
                actor: caller.actor(),
                idempotency_key: idempotency_key(headers),
            },
        )
        .await?;
    let mut out = HeaderMap::new();
    let location = format!("/v1/transitions/{}", run.id);
    out.insert(header::LOCATION, HeaderValue::from_str(&location).expect("ascii"));
    Ok((StatusCode::ACCEPTED, out, Json(run.into())))
}

/// `30s`, `500ms`, `2m` or plain seconds; at most a minute.
pub fn parse_wait(s: Option<&str>) -> ApiResult<Duration> {
    let Some(s) = s else {
        return Ok(Duration::ZERO);
    };
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| Problem::invalid("wait", "a duration like 30s, 500ms or 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        // Checked: a huge count of minutes must be refused, not overflow.
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(Problem::invalid("wait", "a duration like 30s, 500ms or 2m")),
    };
    if d > Duration::from_secs(60) {
        return Err(Problem::invalid("wait", "at most 60s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits() {
        assert_eq!(parse_wait(Some("30s")).unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait(Some("250ms")).unwrap(), Duration::from_millis(250));
        assert_eq!(parse_wait(Some("1m")).unwrap(), Duration::from_secs(60));
        assert_eq!(parse_wait(Some("5")).unwrap(), Duration::from_secs(5));
        assert_eq!(parse_wait(None).unwrap(), Duration::ZERO);
        assert!(parse_wait(Some("2h")).is_err());
        assert!(parse_wait(Some("90s")).is_err());
        assert!(parse_wait(Some("x")).is_err());
        // u64::MAX / 60 + 1 minutes overflowed the multiplication (a panic in debug builds).
        assert_eq!(parse_wait(Some("307445734561825861m")).unwrap_err().status, 422);
    }

    #[test]
    fn if_match_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).unwrap(), None);
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"v7\""));
        assert_eq!(if_match(&h).unwrap(), Some(7));
        h.insert(header::IF_MATCH, HeaderValue::from_static("W/\"v7\""));
        assert_eq!(if_match(&h).unwrap(), Some(7));
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(if_match(&h).unwrap(), None);
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"abc\""));
        assert_eq!(if_match(&h).unwrap_err().status, 400);
    }
}
