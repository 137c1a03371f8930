//! `/v1/kinds`: the resource kinds and their state machines.

use axum::Json;
use drover_domain::kinds::Kind;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::auth::Caller;
use crate::dto::{KindList, KindView, ScopeView};
use crate::extract::ApiPath;
use crate::problem::{ApiResult, Problem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_kinds)).routes(routes!(get_kind))
}

/// Every resource kind with its states, actions and transition table.
#[utoipa::path(get, path = "/v1/kinds", tag = "kinds", security(("bearer" = ["kinds:read"])),
    responses((status = 200, body = KindList)))]
async fn list_kinds(caller: Caller) -> ApiResult<Json<KindList>> {
    caller.require("kinds:read")?;
    let scopes = drover_domain::kinds::SCOPES
        .iter()
        .map(|(p, d)| ScopeView { permission: p.to_string(), description: d.to_string() })
        .collect();
    Ok(Json(KindList { items: Kind::all().map(Into::into).collect(), scopes }))
}

/// One kind's state machine.
#[utoipa::path(get, path = "/v1/kinds/{kind}", tag = "kinds",
    params(("kind" = String, Path, description = "A kind's name or plural (`cluster`, `clusters`)")),
    security(("bearer" = ["kinds:read"])),
    responses((status = 200, body = KindView), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_kind(caller: Caller, ApiPath(kind): ApiPath<String>) -> ApiResult<Json<KindView>> {
    caller.require("kinds:read")?;
    Kind::parse_any(&kind)
        .map(|k| Json(k.into()))
        .ok_or_else(|| drover_domain::Error::NotFound { kind: "kind", key: kind }.into())
}
