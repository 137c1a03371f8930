//! `/v1/transitions`: the ledger of every requested change.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use drover_domain::kinds::Kind;
use drover_domain::model::{RunFilter, RunStatus};
use futures::stream::{self, StreamExt};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::resources::{page, page_limit, parse_wait};
use super::AppState;
use crate::auth::Caller;
use crate::dto::*;
use crate::extract::{ApiPath, ApiQuery};
use crate::problem::{ApiResult, Problem};
use crate::text;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_transitions))
        .routes(routes!(get_transition))
        .routes(routes!(cancel_transition))
        .routes(routes!(transition_events))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TransitionQuery {
    /// Resource id, or name together with `kind`.
    resource: Option<String>,
    /// A kind's name, as `GET /v1/kinds` lists them (`cluster`, `service`, `router`, …).
    #[param(pattern = "^[a-z]+$")]
    kind: Option<String>,
    action: Option<String>,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[param(pattern = "^(queued|running|succeeded|failed|cancelled)$")]
    status: Option<String>,
    /// Requested at or after (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Requested before (RFC 3339).
    until: Option<DateTime<Utc>>,
    /// Only transitions that retry or follow this one.
    parent: Option<Uuid>,
    /// The resource's environment when the transition was asked for.
    environment: Option<String>,
    /// Who asked.
    actor: Option<String>,
    /// Page size, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<Uuid>,
}

/// Transitions, newest first, with keyset pagination.
#[utoipa::path(get, path = "/v1/transitions", tag = "transitions", params(TransitionQuery),
    security(("bearer" = ["transitions:read"])),
    responses((status = 200, description = "A page, as JSON or (`Accept: text/plain`) a table",
            content((TransitionPage = "application/json"), (String = "text/plain"))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No resource of that `kind` has the name in `resource`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
async fn list_transitions(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<TransitionQuery>,
) -> ApiResult<Response> {
    caller.require("transitions:read")?;
    let kind = match &q.kind {
        Some(k) => Some(Kind::parse(k).ok_or_else(|| {
            let known: Vec<_> = Kind::all().map(Kind::as_str).collect();
            Problem::invalid("kind", format!("one of: {}", known.join(", ")))
        })?),
        None => None,
    };
    let resource = match (&q.resource, kind) {
        (None, _) => None,
        (Some(r), _) if Uuid::parse_str(r).is_ok() => Some(Uuid::parse_str(r).expect("checked")),
        (Some(name), Some(kind)) => Some(s.service.get(kind, name).await?.id),
        (Some(_), None) => return Err(Problem::invalid("resource", "a name needs kind= too; or pass the id")),
    };
    let status = match &q.status {
        Some(st) => Some(
            RunStatus::parse(st)
                .ok_or_else(|| Problem::invalid("status", "must be queued, running, succeeded, failed or cancelled"))?,
        ),
        None => None,
    };
    let filter = RunFilter {
        resource,
        kind,
        action: q.action,
        status,
        since: q.since,
        until: q.until,
        parent: q.parent,
        environment: q.environment,
        actor: q.actor,
    };
    let p = s.service.runs(&filter, page(q.limit, q.cursor)?).await?;
    let page = TransitionPage { items: p.items.into_iter().map(Into::into).collect(), next_cursor: p.next };
    Ok(text::respond(&headers, HeaderMap::new(), page, |v| text::transitions(v["items"].as_array().map_or(&[], |a| a))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Long-poll: wait up to this long (e.g. `30s`, at most `60s`) for the transition to end.
    #[param(pattern = "^[0-9]+(ms|s|m)?$")]
    wait: Option<String>,
}

/// One transition: status, timings, outputs, error.
#[utoipa::path(get, path = "/v1/transitions/{id}", tag = "transitions",
    params(("id" = Uuid, Path), WaitQuery),
    security(("bearer" = ["transitions:read"])),
    responses((status = 200, description = "The transition, as JSON or (`Accept: text/plain`) a table",
            content((Transition = "application/json"), (String = "text/plain"))),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn get_transition(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Response> {
    caller.require("transitions:read")?;
    let wait = parse_wait(q.wait.as_deref())?;
    let t: Transition = s.service.wait_run(id, wait).await?.into();
    Ok(text::respond(&headers, HeaderMap::new(), t, text::transition))
}

/// Cancels a transition: at once if queued; a running one stops at its
/// provider's next step. The request and who made it are recorded.
#[utoipa::path(post, path = "/v1/transitions/{id}/cancel", tag = "transitions",
    params(("id" = Uuid, Path)),
    request_body(content = Option<CancelRequest>),
    security(("bearer" = ["{kind}:cancel"])),
    responses((status = 202, description = "Cancelled, or cancel requested", body = Transition),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already ended", body = Problem, content_type = "application/problem+json")))]
async fn cancel_transition(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Transition>)> {
    let run = s.service.run(id).await?;
    caller.require(&run.kind.permission("cancel"))?;
    // The body is optional: an empty one (or `null`, as documented) means no reason.
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<Option<CancelRequest>>(&body)
            .map_err(|e| Problem::invalid("body", format!("expected {{\"reason\": \"…\"}}: {e}")))?
            .and_then(|r| r.reason)
    };
    let run = s.service.cancel(id, &caller.actor(), reason.as_deref()).await?;
    Ok((StatusCode::ACCEPTED, Json(run.into())))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this `seq`.
    after: Option<i64>,
    /// Page size, 1-1000 (default 200).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Long-poll: wait up to this long (e.g. `30s`) for a new event.
    #[param(pattern = "^[0-9]+(ms|s|m)?$")]
    wait: Option<String>,
}

/// The transition's event log, as JSON or, with `Accept: text/event-stream`,
/// as a live stream that ends when the transition does.
#[utoipa::path(get, path = "/v1/transitions/{id}/events", tag = "transitions",
    params(("id" = Uuid, Path), EventQuery),
    security(("bearer" = ["transitions:read"])),
    responses(
        (status = 200, description = "Events", content(
            (EventPage = "application/json"),
            (String = "text/event-stream"))),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
async fn transition_events(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> ApiResult<Response> {
    caller.require("transitions:read")?;
    let limit = page_limit(q.limit, 200, 1000)?;
    let wait = parse_wait(q.wait.as_deref())?;
    let wants_stream =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/event-stream"));
    if wants_stream {
        let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        s.service.run(id).await?; // 404 before the stream starts
        return Ok(stream_events(s, id, resume.or(q.after).unwrap_or(0)).into_response());
    }
    let after = q.after.unwrap_or(0);
    let (run, events) = s.service.events(id, after, limit, wait).await?;
    let next_after = events.last().map_or(after, |e| e.seq);
    Ok(Json(EventPage {
        transition: id,
        status: run.status.as_str().into(),
        events: events.into_iter().map(Into::into).collect(),
        next_after,
    })
    .into_response())
}

/// Polls the log and pushes what is new; ends with an `end` event carrying
/// the final transition.
fn stream_events(s: AppState, id: Uuid, after: i64) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let event = |e: Event| Ok(SseEvent::default().event("event").json_data(e).expect("event serialises"));
    let end = |t: Transition| Ok(SseEvent::default().event("end").json_data(t).expect("serialises"));
    event_stream(s, id, after, event, end)
}

/// A run's log as a live stream: each new event as `event` makes it, and
/// when the run has ended and nothing is left to read, `end` of the run.
/// Every event carries its `seq` as its id, so a client resumes with
/// `Last-Event-ID`. Shared by the API and the dashboard, which say their
/// events differently.
pub(crate) fn event_stream(
    s: AppState,
    id: Uuid,
    after: i64,
    event: impl Fn(Event) -> Result<SseEvent, Infallible> + Send + Sync + 'static,
    end: impl Fn(Transition) -> Result<SseEvent, Infallible> + Send + Sync + 'static,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    struct Cursor {
        s: AppState,
        after: i64,
        done: bool,
    }
    let event = std::sync::Arc::new(event);
    let end = std::sync::Arc::new(end);
    let events = stream::unfold(Cursor { s, after, done: false }, move |mut c| {
        let (event, end) = (event.clone(), end.clone());
        async move {
            if c.done {
                return None;
            }
            loop {
                let (run, events) = match c.s.service.events(id, c.after, 500, Duration::from_secs(15)).await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream read failed");
                        c.done = true;
                        return Some((
                            vec![Ok(SseEvent::default().event("error").data("the event log could not be read"))],
                            c,
                        ));
                    }
                };
                let mut out: Vec<Result<SseEvent, Infallible>> = events
                    .into_iter()
                    .map(|e| {
                        c.after = e.seq;
                        let seq = e.seq.to_string();
                        event(Event::from(e)).map(|ev| ev.id(seq))
                    })
                    .collect();
                if run.status.is_terminal() {
                    // Read once more so nothing written with the completion is missed.
                    if out.is_empty() {
                        c.done = true;
                        out.push(end(Transition::from(run)));
                    }
                    return Some((out, c));
                }
                if !out.is_empty() {
                    return Some((out, c));
                }
            }
        }
    })
    .flat_map(stream::iter);
    Sse::new(events).keep_alive(KeepAlive::default())
}
