//! `/v1/stats/transitions` and `/metrics`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use drover_domain::stats::{Dim, Grain, RollupFilter, StatsQuery};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::auth::Caller;
use crate::dto::{StatsGroup, TransitionStats};
use crate::extract::ApiQuery;
use crate::problem::{ApiResult, Problem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(transition_stats)).routes(routes!(metrics))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Start (RFC 3339, rounded down to the hour; 1970 to 2200). Default: seven days before `until`.
    since: Option<DateTime<Utc>>,
    /// End, exclusive (rounded up to the hour; 1970 to 2200). Default: now.
    until: Option<DateTime<Utc>>,
    /// Comma-separated: any of `kind`, `action`, `environment`, `actor`.
    #[param(pattern = "^ *((kind|action|environment|actor) *)?(, *((kind|action|environment|actor) *)?)*$")]
    group_by: Option<String>,
    /// `hour` or `day`: also group by when transitions were requested.
    #[param(pattern = "^(hour|day)$")]
    bucket: Option<String>,
    kind: Option<String>,
    action: Option<String>,
    environment: Option<String>,
    actor: Option<String>,
}

/// Counts by outcome, failure rate, average, p50, p95 and max duration,
/// with average time to succeed and to fail apart; grouped as asked.
#[utoipa::path(get, path = "/v1/stats/transitions", tag = "transitions", params(StatsParams),
    security(("bearer" = ["transitions:read"])),
    responses((status = 200, body = TransitionStats), (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn transition_stats(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<StatsParams>,
) -> ApiResult<Json<TransitionStats>> {
    caller.require("transitions:read")?;
    for (field, t) in [("since", q.since), ("until", q.until)] {
        if t.is_some_and(|t| !(first_time()..=last_time()).contains(&t)) {
            return Err(Problem::invalid(field, "must be between 1970-01-01T00:00:00Z and 2200-01-01T00:00:00Z"));
        }
    }
    let until = q.until.unwrap_or_else(Utc::now);
    let since = q.since.unwrap_or(until - Duration::days(7));
    let mut group_by = Vec::new();
    for d in q.group_by.as_deref().unwrap_or("").split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let dim = Dim::parse(d).ok_or_else(|| {
            Problem::invalid("group_by", format!("{d:?} is not one of kind, action, environment, actor"))
        })?;
        if !group_by.contains(&dim) {
            group_by.push(dim);
        }
    }
    let bucket = match q.bucket.as_deref() {
        None => None,
        Some("hour") => Some(Grain::Hour),
        Some("day") => Some(Grain::Day),
        Some(_) => return Err(Problem::invalid("bucket", "hour or day")),
    };
    let query = StatsQuery {
        since,
        until,
        group_by: group_by.clone(),
        bucket,
        filter: RollupFilter { kind: q.kind, action: q.action, environment: q.environment, actor: q.actor },
    };
    let groups = s.service.stats(&query).await?;
    Ok(Json(TransitionStats {
        since,
        until,
        group_by: group_by.iter().map(|d| d.as_str().to_string()).collect(),
        bucket: bucket.map(|b| b.as_str().to_string()),
        groups: groups.into_iter().map(StatsGroup::from).collect(),
    }))
}

// Bucketing rounds times in nanoseconds since 1970, which run out in 2262;
// and no transition was asked for before 1970.
fn first_time() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH
}

fn last_time() -> DateTime<Utc> {
    "2200-01-01T00:00:00Z".parse().expect("a valid time")
}

/// Prometheus metrics of this replica (and the shared queue's depth).
#[utoipa::path(get, path = "/metrics", tag = "health", security(("bearer" = ["metrics:read"])),
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(s): State<AppState>, caller: Caller) -> ApiResult<impl IntoResponse> {
    caller.require("metrics:read")?;
    let depth = match s.service.queue_depth().await {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "queue depth unavailable for metrics");
            None
        }
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render(depth)))
}
