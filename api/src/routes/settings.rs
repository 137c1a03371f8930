//! `/v1/settings`: versioned key/values scoped global → environment →
//! cluster, and a cluster's effective settings.
//!
//! Scopes in paths: `global`, `environment:NAME`, `cluster:NAME-OR-ID`.
//! Secret values are redacted unless `?reveal=true` and the caller holds
//! `settings:reveal`.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use drover_domain::settings::{same_value, Write};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::resources::{etag, if_match};
use super::AppState;
use crate::auth::Caller;
use crate::dto::*;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::problem::{ApiResult, Problem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_settings))
        .routes(routes!(get_setting, put_setting, delete_setting))
        .routes(routes!(setting_versions))
        .routes(routes!(setting_diff))
        .routes(routes!(rollback_setting))
        .routes(routes!(cluster_settings))
}

/// Where settings live. A cluster's scope takes its name or its id.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ScopePath {
    /// `global`, `environment:NAME` or `cluster:NAME-OR-ID`.
    #[param(pattern = r"^(global|(environment|cluster):[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)$", example = "global")]
    scope: String,
}

/// One setting: its scope and key.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SettingPath {
    /// `global`, `environment:NAME` or `cluster:NAME-OR-ID`.
    #[param(pattern = r"^(global|(environment|cluster):[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)$", example = "global")]
    scope: String,
    /// Letters, digits and `_`, not starting with a digit.
    #[param(pattern = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", example = "LOG_LEVEL")]
    key: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Show secret values (needs `settings:reveal`).
    #[serde(default)]
    reveal: bool,
    /// A past version instead of the current one.
    version: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevealQuery {
    /// Show secret values (needs `settings:reveal`).
    #[serde(default)]
    reveal: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// A version of the setting (they count from 1).
    #[param(minimum = 1, example = 1)]
    from: i64,
    /// Another version of the setting.
    #[param(minimum = 1, example = 2)]
    to: i64,
    /// Show secret values (needs `settings:reveal`).
    #[serde(default)]
    reveal: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Why, for the record: at most 2000 characters.
    #[param(max_length = 2000)]
    reason: Option<String>,
}

fn may_read(caller: &Caller, reveal: bool) -> ApiResult<()> {
    caller.require("settings:read")?;
    if reveal {
        caller.require("settings:reveal")?;
    }
    Ok(())
}

fn with_etag(v: SettingView) -> (HeaderMap, Json<SettingView>) {
    let mut h = HeaderMap::new();
    h.insert(header::ETAG, etag(v.version));
    (h, Json(v))
}

/// The current settings of a scope.
#[utoipa::path(get, path = "/v1/settings/{scope}", tag = "settings",
    params(ScopePath, RevealQuery),
    security(("bearer" = ["settings:read"])),
    responses((status = 200, body = SettingList), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn list_settings(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(ScopePath { scope }): ApiPath<ScopePath>,
    ApiQuery(q): ApiQuery<RevealQuery>,
) -> ApiResult<Json<SettingList>> {
    may_read(&caller, q.reveal)?;
    let scope = s.settings.scope(&scope).await?;
    let items = s.settings.list(&scope, q.reveal).await?;
    Ok(Json(SettingList { items: items.into_iter().map(Into::into).collect() }))
}

/// One setting: the current version, or `?version=`.
#[utoipa::path(get, path = "/v1/settings/{scope}/{key}", tag = "settings",
    params(SettingPath, ReadQuery),
    security(("bearer" = ["settings:read"])),
    responses((status = 200, body = SettingView, headers(("ETag" = String))),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_setting(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(SettingPath { scope, key }): ApiPath<SettingPath>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult<(HeaderMap, Json<SettingView>)> {
    may_read(&caller, q.reveal)?;
    let scope = s.settings.scope(&scope).await?;
    Ok(with_etag(s.settings.get(&scope, &key, q.version, q.reveal).await?.into()))
}

/// Writes a new version. With `If-Match` (the ETag read before, `"v0"` for
/// a key that does not exist yet) the write is refused if another came first.
#[utoipa::path(put, path = "/v1/settings/{scope}/{key}", tag = "settings", request_body = PutSetting,
    params(SettingPath,
        ("If-Match" = Option<String>, Header, description = "Compare-and-set on the version")),
    security(("bearer" = ["settings:write"])),
    responses((status = 200, body = SettingView, headers(("ETag" = String))),
        (status = 412, description = "Another write came first", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn put_setting(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(SettingPath { scope, key }): ApiPath<SettingPath>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PutSetting>,
) -> ApiResult<(HeaderMap, Json<SettingView>)> {
    caller.require("settings:write")?;
    let scope = s.settings.scope(&scope).await?;
    let actor = caller.actor();
    let w = Write {
        value: Some(&body.value),
        secret: body.secret,
        reason: body.reason.as_deref(),
        actor: &actor,
        if_match: if_match(&headers)?,
    };
    Ok(with_etag(s.settings.write(&scope, &key, w).await?.into()))
}

/// Removes a key, as a new version that records who and why. Deleting a
/// deleted key changes nothing and answers with the version that deleted
/// it; a key that never had a value is 404.
#[utoipa::path(delete, path = "/v1/settings/{scope}/{key}", tag = "settings",
    params(SettingPath, DeleteQuery,
        ("If-Match" = Option<String>, Header, description = "Compare-and-set on the version")),
    security(("bearer" = ["settings:write"])),
    responses((status = 200, body = SettingView), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json")))]
async fn delete_setting(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(SettingPath { scope, key }): ApiPath<SettingPath>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<(HeaderMap, Json<SettingView>)> {
    caller.require("settings:write")?;
    let scope = s.settings.scope(&scope).await?;
    let actor = caller.actor();
    let w =
        Write { value: None, secret: false, reason: q.reason.as_deref(), actor: &actor, if_match: if_match(&headers)? };
    Ok(with_etag(s.settings.write(&scope, &key, w).await?.into()))
}

/// Every version of a setting, oldest first.
#[utoipa::path(get, path = "/v1/settings/{scope}/{key}/versions", tag = "settings",
    params(SettingPath, RevealQuery),
    security(("bearer" = ["settings:read"])),
    responses((status = 200, body = SettingList), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn setting_versions(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(SettingPath { scope, key }): ApiPath<SettingPath>,
    ApiQuery(q): ApiQuery<RevealQuery>,
) -> ApiResult<Json<SettingList>> {
    may_read(&caller, q.reveal)?;
    let scope = s.settings.scope(&scope).await?;
    let items = s.settings.history(&scope, &key, q.reveal).await?;
    Ok(Json(SettingList { items: items.into_iter().map(Into::into).collect() }))
}

/// Two versions side by side.
#[utoipa::path(get, path = "/v1/settings/{scope}/{key}/diff", tag = "settings",
    params(SettingPath, DiffQuery),
    security(("bearer" = ["settings:read"])),
    responses((status = 200, body = SettingDiff), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn setting_diff(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(SettingPath { scope, key }): ApiPath<SettingPath>,
    ApiQuery(q): ApiQuery<DiffQuery>,
) -> ApiResult<Json<SettingDiff>> {
    may_read(&caller, q.reveal)?;
    let scope = s.settings.scope(&scope).await?;
    let from = s.settings.get(&scope, &key, Some(q.from), q.reveal).await?;
    let to = s.settings.get(&scope, &key, Some(q.to), q.reveal).await?;
    let changed = same_value(&from, &to).map(|same| !same).or_else(|| {
        // Without values to compare (secrets not revealed, deletions), a
        // difference in kind still shows.
        (from.version.deleted != to.version.deleted || from.version.secret != to.version.secret).then_some(true)
    });
    Ok(Json(SettingDiff { from: from.into(), to: to.into(), changed }))
}

/// Makes an old version's value current again, as a new version.
#[utoipa::path(post, path = "/v1/settings/{scope}/{key}/rollback", tag = "settings", request_body = RollbackSetting,
    params(SettingPath,
        ("If-Match" = Option<String>, Header, description = "Compare-and-set on the version")),
    security(("bearer" = ["settings:write"])),
    responses((status = 200, body = SettingView), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 412, body = Problem, content_type = "application/problem+json")))]
async fn rollback_setting(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(SettingPath { scope, key }): ApiPath<SettingPath>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RollbackSetting>,
) -> ApiResult<(HeaderMap, Json<SettingView>)> {
    caller.require("settings:write")?;
    let scope = s.settings.scope(&scope).await?;
    let v = s
        .settings
        .rollback(&scope, &key, body.version, body.reason.as_deref(), &caller.actor(), if_match(&headers)?)
        .await?;
    Ok(with_etag(v.into()))
}

/// A cluster's effective settings: global, then its environment, then its
/// own, each with the scope it came from.
#[utoipa::path(get, path = "/v1/clusters/{id}/settings", tag = "settings",
    params(("id" = String, Path, description = "Cluster id or name"), RevealQuery),
    security(("bearer" = ["settings:read"])),
    responses((status = 200, body = EffectiveSettings), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn cluster_settings(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RevealQuery>,
) -> ApiResult<Json<EffectiveSettings>> {
    may_read(&caller, q.reveal)?;
    let cluster = s.service.get(drover_domain::kinds::cluster::KIND, &id).await?;
    let items = s
        .settings
        .effective(&cluster, q.reveal)
        .await?
        .into_iter()
        .map(|e| EffectiveSetting {
            redacted: e.secret && e.value.is_none(),
            key: e.key,
            scope: e.scope,
            version: e.version,
            secret: e.secret,
            value: e.value,
        })
        .collect();
    Ok(Json(EffectiveSettings { cluster: cluster.name, items }))
}
