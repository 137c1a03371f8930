//! The routes of every resource kind, derived from the registry: for each
//! kind, `/v1/{plural}` (create, list), `/v1/{plural}/{id}` (get, patch,
//! delete) and `/v1/{plural}/{id}/transitions`. The handlers are the same
//! for every kind; the kind rides in the closure, and its permissions come
//! from its declaration (`Kind::permission`). Their OpenAPI operations are
//! written from the same registry in `crate::openapi::kinds`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_domain::kinds::{environment, Kind};
use drover_domain::model::{PageRequest, ResourceFilter};
use drover_domain::service::TransitionRequest as DomainRequest;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::AppState;
use crate::auth::Caller;
use crate::dto::*;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::problem::{ApiResult, Problem};

/// Every kind's routes.
pub fn router() -> Router<AppState> {
    let mut router = Router::new();
    for kind in Kind::all() {
        let collection = format!("/v1/{}", kind.plural());
        router = router
            .route(
                &collection,
                post(move |State(s): State<AppState>, caller: Caller, ApiJson(body): ApiJson<CreateResource>| async move {
                    create(&s, &caller, kind, body).await
                })
                .get(move |State(s): State<AppState>, caller: Caller, ApiQuery(q): ApiQuery<ListQuery>| async move {
                    list(&s, &caller, kind, q).await
                }),
            )
            .route(
                &format!("{collection}/{{id}}"),
                get(move |State(s): State<AppState>, caller: Caller, headers: HeaderMap, ApiPath(id): ApiPath<String>| async move {
                    caller.require(&kind.permission("read"))?;
                    let (extra, Json(view)) = view(&s, kind, &id).await?;
                    Ok::<_, Problem>(crate::text::respond(&headers, extra, view, crate::text::resource))
                })
                .patch(
                    move |State(s): State<AppState>,
                          caller: Caller,
                          ApiPath(id): ApiPath<String>,
                          headers: HeaderMap,
                          ApiJson(body): ApiJson<PatchResource>| async move {
                        patch(&s, &caller, kind, &id, &headers, body).await
                    },
                )
                .delete(move |State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>| async move {
                    delete(&s, &caller, kind, &id).await
                }),
            )
            .route(
                &format!("{collection}/{{id}}/transitions"),
                post(
                    move |State(s): State<AppState>,
                          caller: Caller,
                          ApiPath(id): ApiPath<String>,
                          headers: HeaderMap,
                          ApiJson(body): ApiJson<TransitionRequest>| async move {
                        transition(&s, &caller, kind, &id, &headers, body).await
                    },
                ),
            )
            .route(
                &format!("{collection}/{{id}}/versions"),
                get(move |State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>, ApiQuery(q): ApiQuery<VersionsQuery>| async move {
                    versions(&s, &caller, kind, &id, q).await
                }),
            )
            .route(
                &format!("{collection}/{{id}}/versions/{{version}}"),
                get(move |State(s): State<AppState>, caller: Caller, ApiPath((id, version)): ApiPath<(String, i64)>| async move {
                    caller.require(&kind.permission("read"))?;
                    let v = s.service.spec_version(kind, &id, version).await?;
                    Ok::<_, Problem>(Json(SpecVersionView::from(v)))
                }),
            )
            .route(
                &format!("{collection}/{{id}}/versions/{{version}}/diff"),
                get(
                    move |State(s): State<AppState>,
                          caller: Caller,
                          ApiPath((id, version)): ApiPath<(String, i64)>,
                          ApiQuery(q): ApiQuery<DiffQuery>| async move { diff(&s, &caller, kind, &id, version, q).await },
                ),
            );
    }
    router
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VersionsQuery {
    /// Page size, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page: versions older than it.
    #[param(minimum = 1)]
    pub cursor: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    /// The version to compare with; default: the one before (0: no spec).
    #[param(minimum = 0)]
    pub from: Option<i64>,
}

async fn versions(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    key: &str,
    q: VersionsQuery,
) -> ApiResult<Json<SpecVersionPage>> {
    caller.require(&kind.permission("read"))?;
    let limit = page(q.limit, None)?.limit;
    let (items, next) = state.service.spec_versions(kind, key, q.cursor, limit).await?;
    Ok(Json(SpecVersionPage { items: items.into_iter().map(Into::into).collect(), next_cursor: next }))
}

async fn diff(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    key: &str,
    version: i64,
    q: DiffQuery,
) -> ApiResult<Json<SpecDiff>> {
    caller.require(&kind.permission("read"))?;
    let from = q.from.unwrap_or(version - 1);
    let (changes, patch) = state.service.spec_diff(kind, key, version, from).await?;
    let changes = changes
        .into_iter()
        .map(|c| FieldChange { field: format!("spec.{}", c.field), from: c.from, to: c.to })
        .collect();
    Ok(Json(SpecDiff { from, to: version, patch, changes }))
}

pub fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Page size, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
    /// Only resources in this environment.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub environment: Option<String>,
}

pub fn page(limit: Option<u32>, cursor: Option<Uuid>) -> ApiResult<PageRequest> {
    Ok(PageRequest { after: cursor, limit: page_limit(limit, 50, 500)? })
}

/// A `limit` query parameter: `default` when absent, else from 1 to `max`.
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> ApiResult<u32> {
    match limit.unwrap_or(default) {
        l if (1..=max).contains(&l) => Ok(l),
        _ => Err(Problem::invalid("limit", format!("must be between 1 and {max}"))),
    }
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

async fn create(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    body: CreateResource,
) -> ApiResult<(StatusCode, HeaderMap, Json<ResourceView>)> {
    caller.require(&kind.permission("create"))?;
    let created = state.service.create(kind, &body.name, &body.spec, &caller.actor(), body.reason).await?;
    let (mut headers, view) = view(state, kind, &created.id.to_string()).await?;
    let location = format!("/v1/{}/{}", kind.plural(), created.id);
    headers.insert(header::LOCATION, HeaderValue::from_str(&location).expect("ascii"));
    Ok((StatusCode::CREATED, headers, view))
}

/// The 3 a.m. view of one resource, with its `ETag`.
pub async fn view(state: &AppState, kind: Kind, key: &str) -> ApiResult<(HeaderMap, Json<ResourceView>)> {
    let o = state.service.overview(kind, key).await?;
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, etag(o.resource.spec_version));
    Ok((headers, Json(ResourceView::from_overview(o))))
}

async fn list(state: &AppState, caller: &Caller, kind: Kind, q: ListQuery) -> ApiResult<Json<ResourcePage>> {
    caller.require(&kind.permission("read"))?;
    let filter = ResourceFilter { environment: q.environment };
    let p = state.service.list(kind, &filter, page(q.limit, q.cursor)?).await?;
    let items = p
        .items
        .into_iter()
        .map(|r| ResourceSummary {
            spec: r.spec,
            id: r.id,
            name: r.name,
            state: r.state,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(Json(ResourcePage { items, next_cursor: p.next }))
}

async fn patch(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    key: &str,
    headers: &HeaderMap,
    body: PatchResource,
) -> ApiResult<(HeaderMap, Json<ResourceView>)> {
    caller.require(&kind.permission("update"))?;
    if !body.spec.is_object() {
        return Err(Problem::invalid("spec", "must be an object (a JSON merge patch of the spec)"));
    }
    state.service.patch_spec(kind, key, &body.spec, if_match(headers)?, &caller.actor(), body.reason).await?;
    view(state, kind, key).await
}

async fn delete(state: &AppState, caller: &Caller, kind: Kind, key: &str) -> ApiResult<StatusCode> {
    caller.require(&kind.permission("delete"))?;
    state.service.delete(kind, key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Asking for `scale` needs the permission of `scale` (`cluster:scale`),
/// and a `retry` both `retry`'s and that of the action it repeats.
async fn transition(
    state: &AppState,
    caller: &Caller,
    kind: Kind,
    key: &str,
    headers: &HeaderMap,
    body: TransitionRequest,
) -> ApiResult<(StatusCode, HeaderMap, Json<Transition>)> {
    may_ask(state, &caller.0, kind, key, &body.action).await?;
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
                may_operate_protected: caller.0.can(environment::OPERATE_PROTECTED),
                parent: None,
            },
        )
        .await?;
    let mut out = HeaderMap::new();
    let location = format!("/v1/transitions/{}", run.id);
    out.insert(header::LOCATION, HeaderValue::from_str(&location).expect("ascii"));
    Ok((StatusCode::ACCEPTED, out, Json(run.into())))
}

/// Whether `who` may ask for `action` of a resource: the action's
/// permission, and a `retry`'s also that of the action it repeats. The
/// API's and the dashboard's one check.
pub async fn may_ask(
    state: &AppState,
    who: &drover_domain::auth::Principal,
    kind: Kind,
    key: &str,
    action: &str,
) -> ApiResult<()> {
    who.require(&kind.permission(action)).map_err(Problem::from)?;
    if action == "retry" {
        if let Some(repeated) = state.service.retry_action(kind, key).await? {
            who.require(&kind.permission(&repeated)).map_err(Problem::from)?;
        }
    }
    Ok(())
}

/// `30s`, `500ms`, `2m` or plain seconds; at most a minute.
pub fn parse_wait(s: Option<&str>) -> ApiResult<Duration> {
    let Some(s) = s else {
        return Ok(Duration::ZERO);
    };
    let bad = || Problem::invalid("wait", "a duration like 30s, 500ms or 1m (a bare number is seconds)");
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s).map_err(|_| bad())?,
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
        assert_eq!(parse_wait(Some("1m 30s")).unwrap_err().status, 422, "past the limit");
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
