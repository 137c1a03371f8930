//! API tokens and the caller's own identity.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use crate::auth::Caller;
use crate::dto::{CreateToken, Me, NewTokenView, TokenList, TokenView};
use crate::extract::{ApiJson, ApiPath};
use crate::idempotency::ReplayAs;
use crate::problem::{ApiResult, Problem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(me)).routes(routes!(create_token, list_tokens)).routes(routes!(revoke_token))
}

/// Managing tokens needs `users:admin`, except one's own.
fn may_manage(caller: &Caller, user: &str) -> ApiResult<()> {
    let own = user == caller.0.user || Uuid::parse_str(user).is_ok_and(|id| id == caller.0.user_id);
    if own {
        return Ok(());
    }
    caller.require("users:admin")
}

/// Who the caller is and what it may do.
#[utoipa::path(get, path = "/v1/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = Problem, content_type = "application/problem+json")))]
async fn me(caller: Caller) -> Json<Me> {
    let p = caller.0;
    Json(Me { user_id: p.user_id, user: p.user, token_id: p.token_id, permissions: p.permissions })
}

/// Creates a token. Its secret is in this response only: a retry with the
/// same `Idempotency-Key` gets the same token (`Idempotent-Replayed: true`)
/// with `secret: null`, and no second token is made.
#[utoipa::path(post, path = "/v1/users/{id}/tokens", tag = "users", request_body = CreateToken,
    params(("id" = String, Path, description = "User id or name")),
    security(("bearer" = ["users:admin"])),
    responses((status = 201, body = NewTokenView),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The user is not active", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<Response> {
    may_manage(&caller, &user)?;
    let (token, secret) = s.auth.create_token(&user, &body.name, body.expires_at, &caller.actor()).await?;
    let token: TokenView = token.into();
    let replay = serde_json::to_vec(&NewTokenView { token: token.clone(), secret: None })
        .map_err(|e| Problem::from(drover_domain::Error::Internal(e.to_string())))?;
    let mut headers = HeaderMap::new();
    // Never cached; a replay gets the token without its secret.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let mut response =
        (StatusCode::CREATED, headers, Json(NewTokenView { token, secret: Some(secret) })).into_response();
    response.extensions_mut().insert(ReplayAs(replay.into()));
    Ok(response)
}

/// A user's tokens, without their secrets.
#[utoipa::path(get, path = "/v1/users/{id}/tokens", tag = "users",
    params(("id" = String, Path, description = "User id or name")),
    security(("bearer" = ["users:admin"])),
    responses((status = 200, body = TokenList), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn list_tokens(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<Json<TokenList>> {
    may_manage(&caller, &user)?;
    let tokens = s.auth.list_tokens(&user).await?;
    Ok(Json(TokenList { items: tokens.into_iter().map(Into::into).collect() }))
}

/// Revokes a token at once. The record stays, with who revoked it.
#[utoipa::path(delete, path = "/v1/users/{id}/tokens/{token}", tag = "users",
    params(("id" = String, Path, description = "User id or name"), ("token" = Uuid, Path)),
    security(("bearer" = ["users:admin"])),
    responses((status = 200, body = TokenView), (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn revoke_token(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((user, token)): ApiPath<(String, Uuid)>,
) -> ApiResult<Json<TokenView>> {
    may_manage(&caller, &user)?;
    Ok(Json(s.auth.revoke_token(&user, token, &caller.actor()).await?.into()))
}
