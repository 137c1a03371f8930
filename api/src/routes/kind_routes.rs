//! The routes of one resource kind, declared once for every kind.
//!
//! utoipa needs literal paths, tags and operation ids on each handler, so a
//! kind's handlers are stamped out by this macro; the logic itself lives in
//! [`super::resources`].

/// `kind_routes!(Kind::Image, ImageSpec, CreateImage, tag = "images",
/// collection = "/v1/images", item = "/v1/images/{id}", transitions = …,
/// ids = [...], permissions = [create, read, update, delete, transition])`.
/// Each permission literal is both checked and documented (as the
/// operation's security scope), so the two cannot drift; the transition
/// permission names the action as `{action}`.
macro_rules! kind_routes {
    (
        $kind:expr, $spec:ty, $create:ty,
        tag = $tag:literal,
        collection = $collection:literal,
        item = $item:literal,
        transitions = $transitions:literal,
        ids = [$create_id:literal, $list_id:literal, $get_id:literal, $patch_id:literal, $delete_id:literal, $transition_id:literal],
        permissions = [$create_perm:literal, $read_perm:literal, $update_perm:literal, $delete_perm:literal, $transition_perm:literal]
    ) => {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::Json;
        use utoipa_axum::router::OpenApiRouter;
        use utoipa_axum::routes;

        use crate::auth::Caller;
        use crate::dto::*;
        use crate::extract::{ApiJson, ApiPath, ApiQuery};
        use crate::problem::{ApiResult, Problem};
        use crate::routes::resources::{self, ListQuery};
        use crate::routes::AppState;

        pub fn router() -> OpenApiRouter<AppState> {
            OpenApiRouter::new()
                .routes(routes!(create, list))
                .routes(routes!(get, patch, delete))
                .routes(routes!(transition))
        }

        /// Creates a resource in its initial state.
        #[utoipa::path(post, path = $collection, tag = $tag, operation_id = $create_id,
            request_body = $create,
            params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request safe: the same key and body return the first response.")),
            security(("bearer" = [$create_perm])),
            responses(
                (status = 201, description = "Created", body = ResourceView<$spec>,
                    headers(("Location" = String, description = "The new resource"), ("ETag" = String))),
                (status = 409, description = "Name taken", body = Problem, content_type = "application/problem+json"),
                (status = 422, description = "Invalid field", body = Problem, content_type = "application/problem+json"),
            ))]
        async fn create(State(s): State<AppState>, caller: Caller, ApiJson(body): ApiJson<$create>) -> ApiResult<(StatusCode, HeaderMap, Json<ResourceView<$spec>>)> {
            caller.require($create_perm)?;
            resources::create(&s, &caller, $kind, &body.name, &body.spec).await
        }

        /// Lists resources, oldest first, with keyset pagination.
        #[utoipa::path(get, path = $collection, tag = $tag, operation_id = $list_id, params(ListQuery),
            security(("bearer" = [$read_perm])),
            responses((status = 200, body = ResourcePage<$spec>), (status = 400, body = Problem, content_type = "application/problem+json")))]
        async fn list(State(s): State<AppState>, caller: Caller, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Json<ResourcePage<$spec>>> {
            caller.require($read_perm)?;
            resources::list(&s, $kind, q).await
        }

        /// The resource, its active transition and what it is doing, the last
        /// five transitions, and why it is failed or stuck.
        #[utoipa::path(get, path = $item, tag = $tag, operation_id = $get_id,
            params(("id" = String, Path, description = "Id or name")),
            security(("bearer" = [$read_perm])),
            responses((status = 200, description = "As JSON or (`Accept: text/plain`) a compact table",
                    content((ResourceView<$spec> = "application/json"), (String = "text/plain")), headers(("ETag" = String))),
                (status = 404, body = Problem, content_type = "application/problem+json")))]
        async fn get(State(s): State<AppState>, caller: Caller, headers: HeaderMap, ApiPath(id): ApiPath<String>) -> ApiResult<axum::response::Response> {
            caller.require($read_perm)?;
            let (extra, Json(view)) = resources::get::<$spec>(&s, $kind, &id).await?;
            Ok(crate::text::respond(&headers, extra, view, crate::text::resource))
        }

        /// Changes the spec (JSON merge patch) while no transition is active.
        #[utoipa::path(patch, path = $item, tag = $tag, operation_id = $patch_id, request_body = PatchResource,
            params(("id" = String, Path, description = "Id or name"),
                ("If-Match" = Option<String>, Header, description = "The ETag read before: refuses the change if the resource changed since")),
            security(("bearer" = [$update_perm])),
            responses((status = 200, body = ResourceView<$spec>, headers(("ETag" = String))),
                (status = 404, body = Problem, content_type = "application/problem+json"),
                (status = 409, description = "A transition is active", body = Problem, content_type = "application/problem+json"),
                (status = 412, description = "The resource changed", body = Problem, content_type = "application/problem+json"),
                (status = 422, body = Problem, content_type = "application/problem+json")))]
        async fn patch(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>, headers: HeaderMap, ApiJson(body): ApiJson<PatchResource>) -> ApiResult<(HeaderMap, Json<ResourceView<$spec>>)> {
            caller.require($update_perm)?;
            resources::patch(&s, &caller, $kind, &id, &headers, body).await
        }

        /// Deletes a destroyed resource. Its transitions stay in the history.
        #[utoipa::path(delete, path = $item, tag = $tag, operation_id = $delete_id,
            params(("id" = String, Path, description = "Id or name")),
            security(("bearer" = [$delete_perm])),
            responses((status = 204, description = "Deleted"),
                (status = 404, body = Problem, content_type = "application/problem+json"),
                (status = 409, description = "Not destroyed yet", body = Problem, content_type = "application/problem+json")))]
        async fn delete(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>) -> ApiResult<StatusCode> {
            caller.require($delete_perm)?;
            resources::delete(&s, $kind, &id).await
        }

        /// Asks for a transition; it runs in the background.
        #[utoipa::path(post, path = $transitions, tag = $tag, operation_id = $transition_id, request_body = TransitionRequest,
            params(("id" = String, Path, description = "Id or name"),
                ("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request safe: the same key and body return the first response.")),
            security(("bearer" = [$transition_perm])),
            responses((status = 202, description = "Queued", body = Transition, headers(("Location" = String, description = "The transition"))),
                (status = 404, body = Problem, content_type = "application/problem+json"),
                (status = 409, description = "Busy, or not allowed in this state (lists the allowed actions)", body = Problem, content_type = "application/problem+json"),
                (status = 422, body = Problem, content_type = "application/problem+json")))]
        async fn transition(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<String>, headers: HeaderMap, ApiJson(body): ApiJson<TransitionRequest>) -> ApiResult<(StatusCode, HeaderMap, Json<Transition>)> {
            resources::transition(&s, &caller, $transition_perm, $kind, &id, &headers, body).await
        }
    };
}

pub(crate) use kind_routes;
