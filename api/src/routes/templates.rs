//! `GET /v1/clusters/{id}/template`: the CloudFormation template and
//! parameters drover would send, before it sends them.

use axum::extract::State;
use axum::Json;
use drover_domain::kinds::cluster;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::auth::Caller;
use crate::dto::TemplatePreview;
use crate::extract::{ApiPath, ApiQuery};
use crate::problem::{ApiResult, Problem};

/// The actions that send a template, so the ones a preview renders.
const PREVIEWABLE: [&str; 5] = ["create", "scale", "add-instances", "stop", "start"];

fn previewable() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(PREVIEWABLE))
        .build()
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(preview_cluster_template))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TemplateQuery {
    /// The action to preview: `create` (default while the cluster is
    /// `pending`), `scale` (default otherwise), `add-instances`, `stop`, `start`.
    #[param(schema_with = previewable)]
    pub action: Option<String>,
    /// For `scale`: the new count (default: the current one).
    #[param(minimum = 1, maximum = 64)]
    pub count: Option<u32>,
    /// For `add-instances`: how many to add (default: 1).
    #[param(minimum = 1, maximum = 63)]
    pub n: Option<u32>,
}

/// The exact template, parameters and tags drover would send to
/// CloudFormation for an action on an `aws` cluster. Reads only.
#[utoipa::path(get, path = "/v1/clusters/{id}/template", tag = "clusters",
    operation_id = "preview_cluster_template",
    params(("id" = String, Path, description = "Id or name"), TemplateQuery),
    security(("bearer" = ["cluster:read"])),
    responses((status = 200, body = TemplatePreview),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The cluster's provider renders no template, or a dependency is not ready", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn preview_cluster_template(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<TemplateQuery>,
) -> ApiResult<Json<TemplatePreview>> {
    caller.require("cluster:read")?;
    let cluster = s.service.get(cluster::KIND, &id).await?;
    let action = q.action.unwrap_or_else(|| if cluster.state == "pending" { "create" } else { "scale" }.to_string());
    if !PREVIEWABLE.contains(&action.as_str()) {
        return Err(Problem::invalid("action", format!("one of: {}", PREVIEWABLE.join(", "))));
    }
    let params = match action.as_str() {
        "scale" => {
            json!({"count": q.count.or_else(|| cluster.spec.get("count").and_then(|c| c.as_u64()).map(|c| c as u32))})
        }
        "add-instances" => json!({"n": q.n.unwrap_or(1)}),
        _ => json!({}),
    };
    // The parameters came as query parameters: errors name them so.
    let v = s.service.preview(cluster::KIND, &id, &action, &params).await.map_err(|e| match e {
        drover_domain::Error::Invalid(mut errors) => {
            for e in &mut errors {
                if let Some(name) = e.field.strip_prefix("params.") {
                    e.field = name.to_string();
                }
            }
            drover_domain::Error::Invalid(errors)
        }
        other => other,
    })?;
    let provider = cluster::KIND.provider_of(&cluster.spec);
    TemplatePreview::from_value(&cluster.name, &provider, v).map(Json).ok_or_else(|| {
        tracing::error!("provider preview does not have the expected shape");
        Problem::internal()
    })
}
