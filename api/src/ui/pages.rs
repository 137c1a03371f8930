//! The dashboard's pages: each handler reads what the API's handler for the
//! same thing reads (the domain's calls, the DTOs), shapes it for its
//! template, and renders.

use std::collections::BTreeMap;
use std::convert::Infallible;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use chrono::{DateTime, Duration, Utc};
use drover_domain::kinds::{environment, Kind};
use drover_domain::model::{PageRequest, ResourceFilter, Run, RunFilter, RunStatus};
use drover_domain::service::TransitionRequest;
use drover_domain::stats::{RollupFilter, StatsQuery};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::Viewer;
use crate::cli::encode;
use crate::dto::{Event, ResourceView, Transition};
use crate::problem::Problem;
use crate::routes::AppState;
use crate::text::took;

pub type Result<T> = std::result::Result<T, UiError>;

/// What a page could not do, shown as a page.
#[derive(Debug)]
pub struct UiError {
    pub status: StatusCode,
    pub message: String,
}

impl UiError {
    /// A 422: what was asked for cannot be read.
    pub fn invalid(message: impl Into<String>) -> UiError {
        UiError { status: StatusCode::UNPROCESSABLE_ENTITY, message: message.into() }
    }
}

impl From<Problem> for UiError {
    fn from(p: Problem) -> UiError {
        let mut message = p.detail.clone().unwrap_or_else(|| p.title.clone());
        for e in &p.errors {
            let said = format!("{}: {}", e.field, e.message);
            if !message.contains(&said) {
                message.push_str(&format!("; {said}"));
            }
        }
        UiError { status: StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), message }
    }
}

impl From<drover_domain::Error> for UiError {
    fn from(e: drover_domain::Error) -> UiError {
        Problem::from(e).into()
    }
}

#[derive(Template)]
#[template(path = "ui/error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            status: self.status.as_u16(),
            reason: self.status.canonical_reason().unwrap_or("Error"),
            message: &self.message,
        };
        let mut r = render(&page);
        *r.status_mut() = self.status;
        r
    }
}

/// A template as a response; a template that fails is a 500 in the log.
pub fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a dashboard template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
        }
    }
}

pub fn check_csrf(viewer: &Viewer, sent: &str) -> Result<()> {
    match sent == viewer.csrf {
        true => Ok(()),
        false => Err(UiError {
            status: StatusCode::FORBIDDEN,
            message: "This form's security token is missing or belongs to another session: reload the page and \
                      send it again."
                .into(),
        }),
    }
}

/// What every signed-in page's header shows.
pub struct Nav {
    pub user: String,
    pub csrf: String,
}

impl From<&Viewer> for Nav {
    fn from(v: &Viewer) -> Nav {
        Nav { user: v.principal.user.clone(), csrf: v.csrf.clone() }
    }
}

#[derive(Template)]
#[template(path = "ui/sign_in.html")]
pub struct SignIn {
    pub next: String,
    pub csrf: String,
    pub error: Option<String>,
    pub note: Option<String>,
}

/// A state as a badge's colour: `ok`, `busy`, `bad` or `idle`.
fn badge(state: &str, active: bool, healthy: Option<bool>) -> &'static str {
    match state {
        "failed" | "down" | "degraded" => "bad",
        _ if healthy == Some(false) => "bad",
        _ if active => "busy",
        "up" | "running" | "built" | "active" | "serving" | "succeeded" | "ready" => "ok",
        "queued" => "busy",
        "cancelled" => "idle",
        _ => "idle",
    }
}

fn status_badge(status: &str) -> &'static str {
    match status {
        "succeeded" => "ok",
        "failed" => "bad",
        "queued" | "running" => "busy",
        _ => "idle",
    }
}

/// `2026-12-04T03:18:14.17Z` → `2026-12-04 03:18:14`.
pub fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn href(kind: Kind, name: &str) -> String {
    format!("/ui/{}/{}", kind.plural(), encode(name))
}

fn kind_of(plural: &str) -> Result<Kind> {
    Kind::all().find(|k| k.plural() == plural).ok_or_else(|| UiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "there is no kind {plural:?}; the kinds are {}",
            Kind::all().map(Kind::plural).collect::<Vec<_>>().join(", ")
        ),
    })
}

pub fn require(viewer: &Viewer, permission: &str) -> Result<()> {
    viewer.principal.require(permission).map_err(UiError::from)
}

// ---------------------------------------------------------------- home

/// A resource in a list.
pub struct Row {
    pub kind: &'static str,
    pub name: String,
    pub href: String,
    pub state: String,
    pub badge: &'static str,
    pub note: String,
}

/// Something to look at: a resource that is failed, stuck, busy or
/// unhealthy, and why.
pub struct Attention {
    pub row: Row,
    pub why: String,
    pub run: Option<String>,
    /// Failed, stuck or unhealthy; else only busy.
    pub serious: bool,
}

pub struct Numbers {
    pub transitions: i64,
    pub deploys: i64,
    pub failed: i64,
    pub failure_rate: String,
    pub median: String,
}

pub struct EnvCard {
    pub row: Row,
    pub protected: bool,
    pub clusters: Vec<ClusterCard>,
    pub routers: Vec<Row>,
}

pub struct ClusterCard {
    pub row: Row,
    pub services: Vec<Row>,
}

#[derive(Template)]
#[template(path = "ui/home.html")]
struct Home {
    nav: Nav,
    attention: Vec<Attention>,
    /// How many of `attention` are serious.
    wrong: usize,
    /// The newest failed runs of the last 24 hours.
    failures: Vec<RunRow>,
    numbers: Numbers,
    environments: Vec<EnvCard>,
    elsewhere: Vec<Row>,
    more_elsewhere: usize,
    kinds: Vec<(&'static str, &'static str)>,
}

/// How many resources outside any environment the overview lists.
const ELSEWHERE_SHOWN: usize = 30;

/// The kinds a person operates (users and roles are on their own pages).
fn operated() -> impl Iterator<Item = Kind> {
    Kind::all().filter(|k| !k.admin_only())
}

/// "Do I need to get up?": what is wrong first, then the last day in
/// numbers, then every environment with what runs in it.
pub async fn home(State(s): State<AppState>, Extension(viewer): Extension<Viewer>) -> Result<Response> {
    let now = Utc::now();
    // Live resources of every kind the viewer may read: one page each.
    let mut all = Vec::new();
    for kind in operated().filter(|k| viewer.can(&k.permission("read"))) {
        let page = s.service.list(kind, &ResourceFilter::default(), PageRequest { after: None, limit: 500 }).await?;
        all.extend(page.items.into_iter().filter(|r| r.state != kind.final_state()));
    }
    // Active runs: queued and running, one page each.
    let mut active: BTreeMap<Uuid, Run> = BTreeMap::new();
    if viewer.can("transitions:read") {
        for status in [RunStatus::Running, RunStatus::Queued] {
            let filter = RunFilter { status: Some(status), ..RunFilter::default() };
            for run in s.service.runs(&filter, PageRequest { after: None, limit: 200 }).await?.items {
                active.entry(run.resource_id).or_insert(run);
            }
        }
    }
    let row = |r: &drover_domain::model::Resource, note: String| {
        let healthy = r.observed.as_ref().and_then(|o| o.get("healthy")).and_then(Value::as_bool);
        Row {
            kind: r.kind.as_str(),
            name: r.name.clone(),
            href: href(r.kind, &r.name),
            state: r.state.clone(),
            badge: badge(&r.state, active.contains_key(&r.id), healthy),
            note,
        }
    };
    let mut attention = Vec::new();
    for r in &all {
        let unhealthy = r.observed.as_ref().and_then(|o| o.get("healthy")) == Some(&Value::Bool(false));
        let drifted = r.drift.as_ref().filter(|d| d["status"] == "drifted").and_then(|d| d["summary"].as_str());
        let run = active.get(&r.id);
        if r.state != "failed" && !unhealthy && drifted.is_none() && run.is_none() {
            continue;
        }
        // The same diagnosis the resource's view gives.
        let o = s.service.overview(r.kind, &r.id.to_string()).await?;
        let why = match (&o.problem, drifted, run) {
            (Some(p), _, _) => p.summary.clone(),
            (None, Some(drift), _) => drift.to_string(),
            (None, None, Some(run)) => format!("{} {} by {}", run.action, run.status.as_str(), run.actor),
            (None, None, None) => r.state.clone(),
        };
        let run_link = o.problem.as_ref().and_then(|p| p.run).or(run.map(|r| r.id)).map(|id| format!("/ui/runs/{id}"));
        let serious = o.problem.is_some() || r.state == "failed" || unhealthy || drifted.is_some();
        attention.push(Attention { row: row(r, String::new()), why, run: run_link, serious });
    }
    // What is wrong before what is only busy.
    attention.sort_by_key(|a| (!a.serious, a.row.kind, a.row.name.clone()));
    let wrong = attention.iter().filter(|a| a.serious).count();
    // Failures of the last day, whatever state they left behind (a failed
    // deploy that put the old build back leaves its service running).
    let failures = match viewer.can("transitions:read") {
        true => {
            let filter = RunFilter {
                status: Some(RunStatus::Failed),
                since: Some(now - Duration::hours(24)),
                ..RunFilter::default()
            };
            let page = s.service.runs(&filter, PageRequest { after: None, limit: 5 }).await?;
            page.items.into_iter().map(|r| RunRow::from(&Transition::from(r))).collect()
        }
        false => Vec::new(),
    };

    let numbers = match viewer.can("transitions:read") {
        true => last_day(&s, now).await?,
        false => Numbers { transitions: 0, deploys: 0, failed: 0, failure_rate: "-".into(), median: "-".into() },
    };

    // Environments, each with its clusters (and their services) and routers.
    let mut environments: Vec<EnvCard> = all
        .iter()
        .filter(|r| r.kind == environment::KIND)
        .map(|e| EnvCard {
            row: row(e, String::new()),
            protected: environment::is_protected(&e.spec),
            clusters: Vec::new(),
            routers: Vec::new(),
        })
        .collect();
    let mut elsewhere = Vec::new();
    let mut clusters: Vec<(Option<String>, ClusterCard)> = Vec::new();
    let mut services = Vec::new();
    for r in all.iter().filter(|r| r.kind != environment::KIND) {
        let env = r.kind.environment_of(&r.spec);
        match r.kind.as_str() {
            "cluster" => {
                let count = r.spec.get("count").map(|c| format!("{c} machines")).unwrap_or_default();
                clusters.push((env, ClusterCard { row: row(r, count), services: Vec::new() }));
            }
            "service" => services.push(r),
            "router" => match environments.iter_mut().find(|e| Some(&e.row.name) == env.as_ref()) {
                Some(e) => e.routers.push(row(r, String::new())),
                None => elsewhere.push(row(r, String::new())),
            },
            _ => elsewhere.push(row(r, String::new())),
        }
    }
    for svc in services {
        let on = svc.spec.get("cluster").and_then(Value::as_str).unwrap_or_default();
        let note = match (svc.spec.get("global"), svc.spec.get("count")) {
            (Some(Value::Bool(true)), _) => "on every machine".to_string(),
            (_, Some(c)) => format!("× {c}"),
            _ => String::new(),
        };
        match clusters.iter_mut().find(|(_, c)| c.row.name == on) {
            Some((_, c)) => c.services.push(row(svc, note)),
            None => elsewhere.push(row(svc, note)),
        }
    }
    for (env, c) in clusters {
        match environments.iter_mut().find(|e| Some(&e.row.name) == env.as_ref()) {
            Some(e) => e.clusters.push(c),
            None => {
                elsewhere.push(c.row);
                elsewhere.extend(c.services);
            }
        }
    }
    let kinds = operated().map(|k| (k.plural(), k.as_str())).collect();
    // The rest is on the kinds' pages: the overview stays short.
    let more_elsewhere = elsewhere.len().saturating_sub(ELSEWHERE_SHOWN);
    elsewhere.truncate(ELSEWHERE_SHOWN);
    Ok(render(&Home {
        nav: Nav::from(&viewer),
        attention,
        wrong,
        failures,
        numbers,
        environments,
        elsewhere,
        more_elsewhere,
        kinds,
    }))
}

/// The last 24 hours from the rollups: never a count over the ledger.
async fn last_day(s: &AppState, now: DateTime<Utc>) -> Result<Numbers> {
    let query = |action: Option<&str>| StatsQuery {
        since: now - Duration::hours(24),
        until: now,
        group_by: Vec::new(),
        bucket: None,
        filter: RollupFilter { action: action.map(str::to_string), ..RollupFilter::default() },
    };
    let all = s.service.stats(&query(None)).await?.into_iter().next();
    let deploys = s.service.stats(&query(Some("deploy"))).await?.into_iter().next();
    Ok(Numbers {
        transitions: all.as_ref().map_or(0, |g| g.total),
        deploys: deploys.as_ref().map_or(0, |g| g.total),
        failed: all.as_ref().map_or(0, |g| g.failed),
        failure_rate: all.as_ref().and_then(|g| g.failure_rate).map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
        median: took(all.as_ref().and_then(|g| g.p50_ms).map(|m| m as i64)),
    })
}

// ---------------------------------------------------------------- a kind

#[derive(Template)]
#[template(path = "ui/kind.html")]
struct KindPage {
    nav: Nav,
    plural: &'static str,
    description: &'static str,
    rows: Vec<Row>,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct KindQuery {
    cursor: Option<Uuid>,
}

pub async fn kind(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(plural): Path<String>,
    Query(q): Query<KindQuery>,
) -> Result<Response> {
    let kind = kind_of(&plural)?;
    require(&viewer, &kind.permission("read"))?;
    let page = s.service.list(kind, &ResourceFilter::default(), PageRequest { after: q.cursor, limit: 50 }).await?;
    let rows = page
        .items
        .iter()
        .map(|r| {
            let healthy = r.observed.as_ref().and_then(|o| o.get("healthy")).and_then(Value::as_bool);
            Row {
                kind: kind.as_str(),
                name: r.name.clone(),
                href: href(kind, &r.name),
                state: r.state.clone(),
                badge: badge(&r.state, false, healthy),
                note: format!("updated {} by {}", when(&r.updated_at), r.updated_by),
            }
        })
        .collect();
    let next = page.next.map(|c| format!("/ui/{}?cursor={c}", kind.plural()));
    Ok(render(&KindPage {
        nav: Nav::from(&viewer),
        plural: kind.plural(),
        description: kind.description(),
        rows,
        next,
    }))
}

// ---------------------------------------------------------------- a resource

/// A transition in a list.
pub struct RunRow {
    pub href: String,
    pub what: String,
    pub action: String,
    pub status: String,
    pub badge: &'static str,
    pub actor: String,
    pub reason: String,
    pub at: String,
    pub took: String,
    pub error: String,
}

impl From<&Transition> for RunRow {
    fn from(t: &Transition) -> RunRow {
        RunRow {
            href: format!("/ui/runs/{}", t.id),
            what: format!("{} {}", t.resource.kind, t.resource.name),
            action: t.action.clone(),
            status: t.status.clone(),
            badge: status_badge(&t.status),
            actor: t.actor.clone(),
            reason: t.reason.clone().unwrap_or_default(),
            at: when(&t.started_at.unwrap_or(t.created_at)),
            took: took(t.duration_ms),
            error: t.error.as_ref().map(|e| e.message.clone()).unwrap_or_default(),
        }
    }
}

/// One parameter of an action, as a form field.
pub struct Field {
    pub name: String,
    /// `number`, `checkbox` or `text`.
    pub input: &'static str,
    pub required: bool,
    pub help: String,
    /// Its JSON Schema, which types what is typed into it.
    pub schema: Value,
}

/// An action the viewer may ask for, as a form.
pub struct ActionForm {
    pub name: String,
    pub description: String,
    pub fields: Vec<Field>,
}

pub struct Line {
    pub label: String,
    pub value: String,
}

pub struct VersionRow {
    pub version: i64,
    pub href: String,
    pub actor: String,
    pub reason: String,
    pub at: String,
    pub applied: bool,
}

#[derive(Template)]
#[template(path = "ui/resource.html")]
struct ResourcePage {
    nav: Nav,
    kind: &'static str,
    plural: &'static str,
    name: String,
    state: String,
    badge: &'static str,
    problem: Option<String>,
    problem_run: Option<String>,
    active: Option<RunRow>,
    active_events: Vec<String>,
    observed: Option<String>,
    facts: Vec<Line>,
    pending: Vec<Line>,
    actions: Vec<ActionForm>,
    environment: Option<String>,
    protected: bool,
    spec: String,
    outputs: Option<String>,
    versions: Vec<VersionRow>,
    runs: Vec<RunRow>,
    members: Vec<Row>,
    history: String,
}

fn fields(kind: Kind, action: &str) -> Vec<Field> {
    let Some(schema) = kind.action(action).and_then(|a| a.params.schema()) else {
        return Vec::new();
    };
    let required: Vec<&str> =
        schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, p)| {
            let types: Vec<&str> = match &p["type"] {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let input = if types.contains(&"integer") || types.contains(&"number") {
                "number"
            } else if types.contains(&"boolean") {
                "checkbox"
            } else {
                "text"
            };
            let help = p["description"].as_str().unwrap_or("").to_string();
            let help = match types.iter().any(|t| *t == "object" || *t == "array") {
                true => format!("{help} (JSON)").trim().to_string(),
                false => help,
            };
            Field { name: name.clone(), input, required: required.contains(&name.as_str()), help, schema: p.clone() }
        })
        .collect()
}

pub async fn resource(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Response> {
    let kind = kind_of(&plural)?;
    require(&viewer, &kind.permission("read"))?;
    let overview = s.service.overview(kind, &name).await?;
    let env = s.service.environment(&overview.resource).await?;
    let id = overview.resource.id;
    let healthy = overview.resource.observed.as_ref().and_then(|o| o.get("healthy")).and_then(Value::as_bool);
    let view = ResourceView::from_overview(overview);
    let active = view.active_transition.as_ref().map(|a| RunRow::from(&a.transition));
    let active_events = view
        .active_transition
        .as_ref()
        .map(|a| a.recent_events.iter().map(|e| format!("{} {}", e.step, e.message)).collect())
        .unwrap_or_default();
    let mut facts = vec![
        Line { label: "spec version".into(), value: spec_versions(view.spec_version, view.applied_version) },
        Line { label: "updated".into(), value: format!("{} by {}", when(&view.updated_at), view.updated_by) },
        Line { label: "created".into(), value: format!("{} by {}", when(&view.created_at), view.created_by) },
    ];
    if let Some((env, protected)) = &env {
        let note = if *protected { " (protected: every action needs a reason)" } else { "" };
        facts.insert(0, Line { label: "environment".into(), value: format!("{env}{note}") });
    }
    if let Some(drift) = &view.drift {
        let at =
            drift["checked_at"].as_str().unwrap_or_default().replace('T', " ").chars().take(19).collect::<String>();
        facts.push(Line {
            label: "drift".into(),
            value: format!("{} (checked {at})", drift["summary"].as_str().unwrap_or_default()),
        });
    }
    if let Some(instances) = view.outputs.get("instances").and_then(Value::as_array) {
        let each: Vec<String> = instances.iter().map(instance).collect();
        facts.push(Line { label: format!("instances ({})", each.len()), value: each.join("\n") });
    }
    let pending = view
        .pending_changes
        .iter()
        .map(|p| Line {
            label: p.field.clone(),
            value: format!(
                "{} → {} (applied by {})",
                p.applied.as_ref().map_or("(none)".into(), short),
                p.wanted.as_ref().map_or("(none)".into(), short),
                p.applied_by.join(", ")
            ),
        })
        .collect();
    let actions = view
        .allowed_actions
        .iter()
        .filter(|a| viewer.can(&kind.permission(a)))
        .map(|a| ActionForm {
            name: a.clone(),
            description: kind.action(a).map(|d| d.description).unwrap_or("").to_string(),
            fields: fields(kind, a),
        })
        .collect();
    let (versions, _) = s.service.spec_versions(kind, &id.to_string(), None, 10).await?;
    let versions = versions
        .into_iter()
        .map(|v| VersionRow {
            version: v.version,
            href: format!("{}/versions/{}", href(kind, &view.name), v.version),
            actor: v.actor,
            reason: v.reason.unwrap_or_default(),
            at: when(&v.created_at),
            applied: view.applied_version == Some(v.version),
        })
        .collect();
    let members = view
        .members
        .iter()
        .flatten()
        .filter_map(|m| {
            let k = Kind::parse(&m.kind)?;
            Some(Row {
                kind: k.as_str(),
                name: m.name.clone(),
                href: href(k, &m.name),
                state: m.state.clone(),
                badge: badge(&m.state, m.active_transition.is_some(), None),
                note: m.active_transition.as_ref().map(|r| format!("{} {}", r.action, r.status)).unwrap_or_default(),
            })
        })
        .collect();
    Ok(render(&ResourcePage {
        nav: Nav::from(&viewer),
        kind: kind.as_str(),
        plural: kind.plural(),
        badge: badge(&view.state, active.is_some(), healthy),
        problem: view.problem.as_ref().map(|p| p.summary.clone()),
        problem_run: view.problem.as_ref().and_then(|p| p.transition).map(|id| format!("/ui/runs/{id}")),
        active,
        active_events,
        observed: view.observed.as_ref().and_then(|o| o.get("summary")).and_then(Value::as_str).map(str::to_string),
        facts,
        pending,
        actions,
        protected: env.as_ref().is_some_and(|(_, p)| *p),
        environment: env.map(|(e, _)| e),
        spec: serde_json::to_string_pretty(&view.spec).unwrap_or_default(),
        outputs: view
            .outputs
            .as_object()
            .filter(|o| !o.is_empty())
            .map(|o| serde_json::to_string_pretty(o).unwrap_or_default()),
        versions,
        runs: view.recent_transitions.iter().map(RunRow::from).collect(),
        members,
        history: format!("/v1/transitions?kind={}&resource={}", kind.as_str(), encode(&view.name)),
        state: view.state,
        name: view.name,
    }))
}

/// An instance in one line: where it runs, its process and build.
fn instance(i: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(n) = i.get("index") {
        parts.push(format!("#{n}"));
    }
    for key in ["machine_name", "instance_id", "state", "health"] {
        if let Some(v) = i.get(key).and_then(Value::as_str) {
            parts.push(v.to_string());
        }
    }
    if let Some(pid) = i.get("pid") {
        parts.push(format!("pid {pid}"));
    }
    if let Some(url) = i.get("url").and_then(Value::as_str) {
        parts.push(url.to_string());
    } else if let Some(ip) = i.get("private_ip").and_then(Value::as_str) {
        parts.push(ip.to_string());
    }
    if let Some(build) = i.get("build").and_then(Value::as_str) {
        parts.push(format!("build {}", build.chars().take(13).collect::<String>()));
    }
    parts.join(" · ")
}

fn spec_versions(spec: i64, applied: Option<i64>) -> String {
    match applied {
        Some(a) if a == spec => format!("v{spec} (running)"),
        Some(a) => format!("v{spec} (running v{a})"),
        None => format!("v{spec} (not run yet)"),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.chars().count() > 80 {
        true => format!("{}…", s.chars().take(80).collect::<String>()),
        false => s,
    }
}

#[derive(Template)]
#[template(path = "ui/version.html")]
struct VersionPage {
    nav: Nav,
    kind: &'static str,
    name: String,
    back: String,
    version: i64,
    actor: String,
    reason: String,
    at: String,
    changes: Vec<Line>,
    spec: String,
}

/// One spec version, and what it changed from the one before.
pub async fn version(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((plural, name, version)): Path<(String, String, i64)>,
) -> Result<Response> {
    let kind = kind_of(&plural)?;
    require(&viewer, &kind.permission("read"))?;
    let v = s.service.spec_version(kind, &name, version).await?;
    let (changes, _) = s.service.spec_diff(kind, &name, version, version - 1).await?;
    let changes = changes
        .into_iter()
        .map(|c| Line {
            label: format!("spec.{}", c.field),
            value: format!(
                "{} → {}",
                c.from.as_ref().map_or("(none)".into(), short),
                c.to.as_ref().map_or("(none)".into(), short)
            ),
        })
        .collect();
    Ok(render(&VersionPage {
        nav: Nav::from(&viewer),
        kind: kind.as_str(),
        back: href(kind, &name),
        name,
        version,
        actor: v.actor,
        reason: v.reason.unwrap_or_default(),
        at: when(&v.created_at),
        changes,
        spec: serde_json::to_string_pretty(&v.spec).unwrap_or_default(),
    }))
}

// ---------------------------------------------------------------- asking for an action

#[derive(Template)]
#[template(path = "ui/confirm.html")]
struct Confirm {
    nav: Nav,
    kind: &'static str,
    name: String,
    back: String,
    action: String,
    post: String,
    reason: String,
    protected: bool,
    fields: Vec<(String, String)>,
}

/// An action's form: first a confirmation page saying what will happen,
/// then (`confirm=yes`) the request. The domain checks it as it checks
/// the API's: permission, state, parameters, a protected environment's
/// reason.
pub async fn act(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((plural, name, action)): Path<(String, String, String)>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response> {
    let field = |k: &str| form.iter().find(|(f, _)| f == k).map(|(_, v)| v.trim().to_string());
    check_csrf(&viewer, &field("csrf").unwrap_or_default())?;
    let kind = kind_of(&plural)?;
    crate::routes::resources::may_ask(&s, &viewer.principal, kind, &name, &action).await?;
    let mut params = serde_json::Map::new();
    let mut shown = Vec::new();
    for f in fields(kind, &action) {
        let Some(raw) = field(&format!("param.{}", f.name)).filter(|v| !v.is_empty()) else {
            continue;
        };
        let value = match f.input {
            "checkbox" => Value::Bool(matches!(raw.as_str(), "on" | "true" | "yes")),
            _ => crate::cli::coerce(&f.schema, &raw).map_err(|why| UiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("params.{}: {why}", f.name),
            })?,
        };
        shown.push((f.name.clone(), raw));
        params.insert(f.name, value);
    }
    let reason = field("reason").unwrap_or_default();
    let post = format!("{}/actions/{}", href(kind, &name), encode(&action));
    if field("confirm").as_deref() != Some("yes") {
        // What the confirmation says; the request itself checks again.
        let resource = s.service.get(kind, &name).await?;
        let protected = s.service.environment(&resource).await?.is_some_and(|(_, p)| p);
        return Ok(render(&Confirm {
            nav: Nav::from(&viewer),
            kind: kind.as_str(),
            back: href(kind, &name),
            name: resource.name,
            action,
            post,
            reason,
            protected,
            fields: shown,
        }));
    }
    let run = s
        .service
        .request(
            kind,
            &name,
            TransitionRequest {
                action,
                params: Value::Object(params),
                reason: Some(reason).filter(|r| !r.is_empty()),
                actor: viewer.principal.user.clone(),
                idempotency_key: None,
                may_operate_protected: viewer.can(environment::OPERATE_PROTECTED),
                parent: None,
            },
        )
        .await?;
    tracing::info!(run = %run.id, kind = kind.as_str(), name = %name, action = %run.action, "asked for from the dashboard");
    Ok(Redirect::to(&format!("/ui/runs/{}", run.id)).into_response())
}

// ---------------------------------------------------------------- a run

#[derive(Template)]
#[template(path = "ui/run.html")]
struct RunPage {
    nav: Nav,
    run: RunRow,
    id: Uuid,
    resource: String,
    resource_href: String,
    live: bool,
    can_cancel: bool,
    facts: Vec<Line>,
    error: Option<String>,
    parent: Option<String>,
    runs: Vec<RunRow>,
    events: Vec<EventRow>,
    after: i64,
}

pub struct EventRow {
    pub at: String,
    pub level: String,
    pub step: String,
    pub message: String,
}

impl From<Event> for EventRow {
    fn from(e: Event) -> EventRow {
        EventRow { at: e.at.format("%H:%M:%S%.3f").to_string(), level: e.level, step: e.step, message: e.message }
    }
}

pub async fn run(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<Uuid>,
) -> Result<Response> {
    require(&viewer, "transitions:read")?;
    let (run, events) = s.service.events(id, 0, 1000, std::time::Duration::ZERO).await?;
    let kind = run.kind;
    let children = s
        .service
        .runs(&RunFilter { parent: Some(id), ..RunFilter::default() }, PageRequest { after: None, limit: 100 })
        .await?
        .items;
    let t = Transition::from(run);
    let mut facts = vec![
        Line { label: "asked by".into(), value: t.actor.clone() },
        Line { label: "reason".into(), value: t.reason.clone().unwrap_or_else(|| "-".into()) },
        Line {
            label: "from → to".into(),
            value: format!("{} → {} (while: {})", t.from_state, t.target_state, t.working_state),
        },
        Line { label: "asked at".into(), value: when(&t.created_at) },
        Line { label: "started".into(), value: t.started_at.as_ref().map_or("-".into(), when) },
        Line { label: "finished".into(), value: t.finished_at.as_ref().map_or("-".into(), when) },
        Line { label: "took".into(), value: took(t.duration_ms) },
        Line { label: "waited".into(), value: took(t.queued_ms) },
        Line { label: "attempt".into(), value: format!("{} of {}", t.attempt, t.max_attempts) },
        Line { label: "provider".into(), value: t.provider.clone() },
    ];
    if t.params.as_object().is_some_and(|p| !p.is_empty()) {
        facts.push(Line { label: "params".into(), value: t.params.to_string() });
    }
    if let Some(by) = &t.cancel_requested_by {
        facts.push(Line { label: "cancel asked by".into(), value: by.clone() });
    }
    let live = matches!(t.status.as_str(), "queued" | "running");
    let after = events.last().map_or(0, |e| e.seq);
    Ok(render(&RunPage {
        nav: Nav::from(&viewer),
        id,
        resource: format!("{} {}", t.resource.kind, t.resource.name),
        resource_href: href(kind, &t.resource.name),
        live,
        can_cancel: live && t.cancel_requested_at.is_none() && viewer.can(&kind.permission("cancel")),
        error: t.error.as_ref().map(|e| format!("{}: {}", e.code, e.message)),
        parent: t.parent.map(|p| format!("/ui/runs/{p}")),
        runs: children.into_iter().map(|c| RunRow::from(&Transition::from(c))).collect(),
        events: events.into_iter().map(|e| EventRow::from(Event::from(e))).collect(),
        after,
        facts,
        run: RunRow::from(&t),
    }))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    after: Option<i64>,
}

/// A run's events as they happen (SSE): `event` with an [`Event`] as JSON,
/// then `end` with the run's status; the page's script adds the rows.
pub async fn run_events(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response> {
    require(&viewer, "transitions:read")?;
    s.service.run(id).await?;
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let after = resume.or(q.after).unwrap_or(0);
    let to_event = |e: Event| -> std::result::Result<SseEvent, Infallible> {
        let row = EventRow::from(e);
        let data = serde_json::json!({"at": row.at, "level": row.level, "step": row.step, "message": row.message});
        Ok(SseEvent::default().event("event").data(data.to_string()))
    };
    let end = |t: Transition| -> std::result::Result<SseEvent, Infallible> {
        Ok(SseEvent::default().event("end").data(t.status))
    };
    let mut r = crate::routes::transitions::event_stream(s, id, after, to_event, end).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(r)
}

#[derive(Deserialize)]
pub struct CancelForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

pub async fn cancel(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<Uuid>,
    Form(f): Form<CancelForm>,
) -> Result<Response> {
    check_csrf(&viewer, &f.csrf)?;
    let run = s.service.run(id).await?;
    require(&viewer, &run.kind.permission("cancel"))?;
    let reason = Some(f.reason.trim()).filter(|r| !r.is_empty());
    s.service.cancel(id, &viewer.principal.user, reason).await?;
    tracing::info!(run = %id, "cancel asked for from the dashboard");
    Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
}
