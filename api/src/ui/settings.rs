//! Settings by scope: current values (secrets masked, always: the dashboard
//! never reveals one), each key's versions, a diff between two, and a
//! rollback to an old one.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use drover_domain::kinds::{cluster, environment};
use drover_domain::model::{PageRequest, ResourceFilter};
use drover_domain::settings::{same_value, Scope, Setting};
use serde::Deserialize;

use super::pages::{check_csrf, render, require, when, Nav, Result, UiError};
use super::Viewer;
use crate::cli::encode;
use crate::routes::AppState;

/// What a masked secret shows.
const MASK: &str = "••••••";

pub struct SettingRow {
    pub key: String,
    pub href: String,
    pub value: String,
    pub secret: bool,
    pub version: i64,
    pub by: String,
    pub at: String,
}

pub struct ScopeCard {
    pub scope: String,
    pub rows: Vec<SettingRow>,
}

fn shown(s: &Setting) -> String {
    match (&s.value, s.version.secret, s.version.deleted) {
        (_, _, true) => "(deleted)".into(),
        (_, true, _) => MASK.into(),
        (Some(v), _, _) => v.clone(),
        (None, _, _) => "-".into(),
    }
}

fn setting_href(scope: &str, key: &str) -> String {
    format!("/ui/settings/{}/{}", encode(scope), encode(key))
}

#[derive(Template)]
#[template(path = "ui/settings.html")]
struct SettingsPage {
    nav: Nav,
    scopes: Vec<ScopeCard>,
}

/// Every scope's current settings: global, each environment, each cluster
/// (those without settings are left out): one read for all of them.
pub async fn settings(State(s): State<AppState>, Extension(viewer): Extension<Viewer>) -> Result<Response> {
    require(&viewer, "settings:read")?;
    // Stored scope → the name a person reads (and the API takes).
    let mut scopes = vec![(Scope::Global, "global".to_string())];
    for kind in [environment::KIND, cluster::KIND] {
        if !viewer.can(&kind.permission("read")) {
            continue;
        }
        let page = s.service.list(kind, &ResourceFilter::default(), PageRequest { after: None, limit: 500 }).await?;
        for r in page.items.iter().filter(|r| r.state != kind.final_state()) {
            let scope = match kind == environment::KIND {
                true => Scope::Environment(r.name.clone()),
                false => Scope::Cluster(r.id),
            };
            scopes.push((scope, format!("{}:{}", kind.as_str(), r.name)));
        }
    }
    let all: Vec<Scope> = scopes.iter().map(|(scope, _)| scope.clone()).collect();
    let current = s.settings.list_scopes(&all, false).await?;
    let cards = scopes
        .into_iter()
        .filter_map(|(scope, name)| {
            let key = scope.key();
            let rows: Vec<SettingRow> = current
                .iter()
                .filter(|v| v.version.scope == key)
                .map(|v| SettingRow {
                    key: v.version.key.clone(),
                    href: setting_href(&name, &v.version.key),
                    value: shown(v),
                    secret: v.version.secret,
                    version: v.version.version,
                    by: v.version.actor.clone(),
                    at: when(&v.version.created_at),
                })
                .collect();
            (scope == Scope::Global || !rows.is_empty()).then_some(ScopeCard { scope: name, rows })
        })
        .collect();
    Ok(render(&SettingsPage { nav: Nav::from(&viewer), scopes: cards }))
}

pub struct VersionRow {
    pub version: i64,
    pub value: String,
    pub secret: bool,
    pub deleted: bool,
    pub by: String,
    pub reason: String,
    pub at: String,
    pub current: bool,
}

#[derive(Template)]
#[template(path = "ui/setting.html")]
struct SettingPage {
    nav: Nav,
    scope: String,
    key: String,
    post: String,
    versions: Vec<VersionRow>,
    can_write: bool,
    from: i64,
    to: i64,
    diff: String,
    from_value: String,
    to_value: String,
}

#[derive(Deserialize)]
pub struct DiffForm {
    from: Option<i64>,
    to: Option<i64>,
}

/// One key's versions, newest first, and what changed between two.
pub async fn setting(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((scope_name, key)): Path<(String, String)>,
    Query(q): Query<DiffForm>,
) -> Result<Response> {
    require(&viewer, "settings:read")?;
    let scope = s.settings.scope(&scope_name).await?;
    let history = s.settings.history(&scope, &key, false).await?;
    let newest = history.iter().map(|v| v.version.version).max().unwrap_or(1);
    let to = q.to.unwrap_or(newest);
    let from = q.from.unwrap_or(to - 1).max(1);
    let find = |n: i64| {
        history
            .iter()
            .find(|v| v.version.version == n)
            .ok_or_else(|| UiError::invalid(format!("{scope_name}/{key} has no version {n} (versions 1 to {newest})")))
    };
    let (a, b) = (find(from)?, find(to)?);
    let diff = match (same_value(a, b), a.version.deleted || b.version.deleted) {
        _ if from == to => "the same version".to_string(),
        (_, true) if a.version.deleted != b.version.deleted => "deleted in one of them".to_string(),
        (Some(true), _) => "the same value".to_string(),
        (Some(false), _) => "changed".to_string(),
        (None, _) if a.version.secret != b.version.secret => "changed between plain and secret".to_string(),
        (None, _) => "secret values: not compared here (they are never shown)".to_string(),
    };
    let mut versions: Vec<VersionRow> = history
        .iter()
        .map(|v| VersionRow {
            version: v.version.version,
            value: shown(v),
            secret: v.version.secret,
            deleted: v.version.deleted,
            by: v.version.actor.clone(),
            reason: v.version.reason.clone().unwrap_or_default(),
            at: when(&v.version.created_at),
            current: v.version.version == newest,
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    Ok(render(&SettingPage {
        nav: Nav::from(&viewer),
        post: format!("{}/rollback", setting_href(&scope_name, &key)),
        can_write: viewer.can("settings:write"),
        from_value: shown(a),
        to_value: shown(b),
        scope: scope_name,
        key,
        versions,
        from,
        to,
        diff,
    }))
}

#[derive(Deserialize)]
pub struct RollbackForm {
    #[serde(default)]
    csrf: String,
    version: i64,
    #[serde(default)]
    reason: String,
}

/// Makes an old version current again, as a new version (recorded with
/// who and why, like the API's rollback).
pub async fn rollback(
    State(s): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path((scope_name, key)): Path<(String, String)>,
    Form(f): Form<RollbackForm>,
) -> Result<Response> {
    check_csrf(&viewer, &f.csrf)?;
    require(&viewer, "settings:write")?;
    let scope = s.settings.scope(&scope_name).await?;
    let reason = Some(f.reason.trim()).filter(|r| !r.is_empty());
    let v = s.settings.rollback(&scope, &key, f.version, reason, &viewer.principal.user, None).await?;
    tracing::info!(scope = %scope_name, key = %key, to = f.version, version = v.version.version, "setting rolled back from the dashboard");
    Ok(Redirect::to(&setting_href(&scope_name, &key)).into_response())
}
