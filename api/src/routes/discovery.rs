//! `/v1/discovery`: the discovery registry — where each healthy service
//! instance can be reached — with a long-poll watch on its index, and
//! `/v1/discovery-changes`: entries entering and leaving, with why.
//!
//! A watcher reads once, keeps the index (body `index`, header
//! `X-Drover-Index`) and asks again with `?index=N&wait=60s`: the answer
//! comes when the index moves (the change itself wakes it, on every
//! replica), or at the end of the wait with the same index.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use axum::Json;
use drover_domain::kinds::service;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::resources::{page_limit, parse_wait};
use super::AppState;
use crate::auth::Caller;
use crate::dto::*;
use crate::extract::{ApiPath, ApiQuery};
use crate::problem::{ApiResult, Problem};
use crate::text;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_discovery))
        .routes(routes!(service_discovery))
        .routes(routes!(discovery_changes))
}

const INDEX: HeaderName = HeaderName::from_static("x-drover-index");

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Wait for a change: answer once the index differs from this one.
    #[param(minimum = 0, example = 42)]
    index: Option<i64>,
    /// How long to wait for it (e.g. `30s`, at most `60s`); with `index` only.
    #[param(pattern = "^[0-9]+(ms|s|m)?$", example = "30s")]
    wait: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ServicePath {
    /// A service's name or id.
    #[param(min_length = 1, example = "app")]
    service: String,
}

async fn watch(s: &AppState, headers: &HeaderMap, service: Option<uuid::Uuid>, q: WatchQuery) -> ApiResult<Response> {
    if q.index.is_some_and(|i| i < 0) {
        return Err(Problem::invalid("index", "must be 0 or more"));
    }
    let wait = parse_wait(q.wait.as_deref())?;
    let snapshot = s.discovery.watch(service, q.index, wait).await?;
    let mut extra = HeaderMap::new();
    extra.insert(INDEX, HeaderValue::from(snapshot.index));
    let body = DiscoveryList { index: snapshot.index, entries: snapshot.entries.into_iter().map(Into::into).collect() };
    Ok(text::respond(headers, extra, body, text::discovery))
}

/// Every healthy service instance: address, port, build, machine. With
/// `index`, a long-poll that answers when the registry changes.
#[utoipa::path(get, path = "/v1/discovery", tag = "discovery",
    params(WatchQuery),
    security(("bearer" = ["discovery:read"])),
    responses((status = 200, description = "The registry, as JSON or (`Accept: text/plain`) one line per instance",
        headers(("X-Drover-Index" = i64, description = "The index of the last change it reflects")),
        content((DiscoveryList = "application/json"), (String = "text/plain")))))]
async fn list_discovery(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<WatchQuery>,
) -> ApiResult<Response> {
    caller.require("discovery:read")?;
    watch(&s, &headers, None, q).await
}

/// One service's healthy instances. With `index`, a long-poll that answers
/// when that service's entries change.
#[utoipa::path(get, path = "/v1/discovery/{service}", tag = "discovery",
    params(ServicePath, WatchQuery),
    security(("bearer" = ["discovery:read"])),
    responses((status = 200, description = "The service's entries, as JSON or (`Accept: text/plain`) one line per instance",
        headers(("X-Drover-Index" = i64, description = "The index of the service's last change")),
        content((DiscoveryList = "application/json"), (String = "text/plain"))),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn service_discovery(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(ServicePath { service: name }): ApiPath<ServicePath>,
    ApiQuery(q): ApiQuery<WatchQuery>,
) -> ApiResult<Response> {
    caller.require("discovery:read")?;
    let svc = s.service.get(service::KIND, &name).await?;
    watch(&s, &headers, Some(svc.id), q).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// Changes after this index (default 0: from the oldest kept).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Only this service's (by name).
    #[param(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", example = "app")]
    service: Option<String>,
    /// At most this many (1–1000, default 200).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Instances entering and leaving the registry, oldest first, each with
/// why and who (a transition, the observer, or the sweep of lapsed TTLs).
/// Kept 30 days.
#[utoipa::path(get, path = "/v1/discovery-changes", tag = "discovery",
    params(ChangesQuery),
    security(("bearer" = ["discovery:read"])),
    responses((status = 200, body = DiscoveryChangePage)))]
async fn discovery_changes(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> ApiResult<Json<DiscoveryChangePage>> {
    caller.require("discovery:read")?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(Problem::invalid("after", "must be 0 or more"));
    }
    let limit = page_limit(q.limit, 200, 1000)?;
    let changes = s.discovery.changes(after, q.service.as_deref(), limit).await?;
    let next_after = changes.last().map_or(after, |c| c.index);
    Ok(Json(DiscoveryChangePage { changes: changes.into_iter().map(Into::into).collect(), next_after }))
}
