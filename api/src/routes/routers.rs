//! `/v1/routers/{id}/configs`: every configuration a router's load
//! balancer was given — applied, refused by its validation, or held back
//! from emptying a backend — with its diff. (A router's own routes, like
//! every kind's, come from the kind registry.)

use axum::extract::State;
use axum::Json;
use drover_domain::kinds::router;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::resources::page_limit;
use super::AppState;
use crate::auth::Caller;
use crate::dto::*;
use crate::extract::{ApiPath, ApiQuery};
use crate::problem::{ApiResult, Problem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_router_configs)).routes(routes!(get_router_config))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RouterPath {
    /// The router's name or id.
    #[param(min_length = 1, example = "edge")]
    id: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConfigPath {
    /// The router's name or id.
    #[param(min_length = 1, example = "edge")]
    id: String,
    /// A configuration version.
    #[param(minimum = 1, example = 3)]
    version: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConfigsQuery {
    /// Versions below this one (the previous page's `next_before`).
    #[param(minimum = 1)]
    before: Option<i64>,
    /// At most this many (1–100, default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// A router's configuration versions, newest first: what each changed (a
/// diff), why it was rendered, and whether it serves, was refused, or held
/// a backend back from being emptied.
#[utoipa::path(get, path = "/v1/routers/{id}/configs", tag = "routers",
    params(RouterPath, ConfigsQuery),
    security(("bearer" = ["router:read"])),
    responses((status = 200, body = RouterConfigPage),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn list_router_configs(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(RouterPath { id }): ApiPath<RouterPath>,
    ApiQuery(q): ApiQuery<ConfigsQuery>,
) -> ApiResult<Json<RouterConfigPage>> {
    caller.require(&router::KIND.permission("read"))?;
    if q.before.is_some_and(|b| b < 1) {
        return Err(Problem::invalid("before", "must be 1 or more"));
    }
    let limit = page_limit(q.limit, 20, 100)?;
    let r = s.service.get(router::KIND, &id).await?;
    let configs = s.routing.configs(r.id, q.before, limit).await?;
    let next_before = match configs.last() {
        Some(last) if configs.len() == limit as usize && last.version > 1 => Some(last.version),
        _ => None,
    };
    Ok(Json(RouterConfigPage { configs: configs.iter().map(Into::into).collect(), next_before }))
}

/// One configuration version, with the load balancer's configuration text.
#[utoipa::path(get, path = "/v1/routers/{id}/configs/{version}", tag = "routers",
    params(ConfigPath),
    security(("bearer" = ["router:read"])),
    responses((status = 200, body = RouterConfigVersion),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_router_config(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(ConfigPath { id, version }): ApiPath<ConfigPath>,
) -> ApiResult<Json<RouterConfigVersion>> {
    caller.require(&router::KIND.permission("read"))?;
    let r = s.service.get(router::KIND, &id).await?;
    let c = s.routing.config(r.id, version).await?.ok_or_else(|| {
        Problem::new(
            axum::http::StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("router {} has no configuration version {version}", r.name),
        )
    })?;
    Ok(Json(RouterConfigVersion { summary: (&c).into(), config: c.config }))
}
