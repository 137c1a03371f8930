//! The ledger's pages: the history with its filters, and the statistics
//! drawn on the server as SVG.

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::Extension;
use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use drover_domain::kinds::Kind;
use drover_domain::model::{PageRequest, RunFilter, RunStatus};
use drover_domain::stats::{Grain, Group, RollupFilter, StatsQuery};
use serde::Deserialize;
use uuid::Uuid;

use super::chart::{self, Series};
use super::pages::{render, require, Nav, Result, RunRow, UiError};
use super::Viewer;
use crate::cli::encode;
use crate::dto::Transition;
use crate::text::took;

#[derive(Debug, Default, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    actor: String,
    /// `YYYY-MM-DDTHH:MM` (a browser's datetime-local), in UTC.
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    cursor: Option<Uuid>,
}

impl HistoryQuery {
    /// The filters as a query string, for the next page's link.
    fn query(&self) -> String {
        [
            ("kind", &self.kind),
            ("action", &self.action),
            ("status", &self.status),
            ("environment", &self.environment),
            ("actor", &self.actor),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
    }
}

/// A form's time (`2026-12-04T03:00`, seconds optional), read as UTC.
fn form_time(field: &str, s: &str) -> Result<Option<DateTime<Utc>>> {
    if s.is_empty() {
        return Ok(None);
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| Some(t.and_utc()))
        .or_else(|| DateTime::parse_from_rfc3339(s).ok().map(|t| Some(t.with_timezone(&Utc))))
        .ok_or_else(|| UiError::invalid(format!("{field}: {s:?} is not a time like 2026-12-04T03:00 (UTC)")))
}

#[derive(Template)]
#[template(path = "ui/history.html")]
struct History {
    nav: Nav,
    q: HistoryQuery,
    kinds: Vec<&'static str>,
    statuses: [&'static str; 5],
    runs: Vec<RunRow>,
    next: Option<String>,
    first: Option<String>,
}

/// The ledger, newest first, filtered, a page of 50 at a time by keyset:
/// each page is an index range, whatever the history's size.
pub async fn history(
    State(s): State<crate::routes::AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response> {
    require(&viewer, "transitions:read")?;
    let kind = match q.kind.as_str() {
        "" => None,
        k => Some(Kind::parse(k).ok_or_else(|| UiError::invalid(format!("kind: no kind {k:?}")))?),
    };
    let status = match q.status.as_str() {
        "" => None,
        st => Some(RunStatus::parse(st).ok_or_else(|| UiError::invalid(format!("status: no status {st:?}")))?),
    };
    let some = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
    let filter = RunFilter {
        resource: None,
        kind,
        action: some(&q.action),
        status,
        since: form_time("since", &q.since)?,
        until: form_time("until", &q.until)?,
        parent: None,
        environment: some(&q.environment),
        actor: some(&q.actor),
    };
    let page = s.service.runs(&filter, PageRequest { after: q.cursor, limit: 50 }).await?;
    let query = q.query();
    let link = |cursor: Option<String>| {
        let mut parts: Vec<String> = Vec::new();
        if !query.is_empty() {
            parts.push(query.clone());
        }
        if let Some(c) = cursor {
            parts.push(format!("cursor={c}"));
        }
        format!("/ui/history?{}", parts.join("&"))
    };
    Ok(render(&History {
        nav: Nav::from(&viewer),
        kinds: Kind::all().map(Kind::as_str).collect(),
        statuses: ["queued", "running", "succeeded", "failed", "cancelled"],
        runs: page.items.into_iter().map(|r| RunRow::from(&Transition::from(r))).collect(),
        next: page.next.map(|c| link(Some(c.to_string()))),
        first: q.cursor.map(|_| link(None)),
        q,
    }))
}

#[derive(Debug, Deserialize)]
pub struct StatsQueryForm {
    /// 1, 7, 30 or 90.
    days: Option<i64>,
    /// An action, or empty for every action.
    action: Option<String>,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    environment: String,
}

/// One bucket's figures, for the table under the charts.
pub struct BucketRow {
    pub at: String,
    pub total: i64,
    pub failed: i64,
    pub failure_rate: String,
    pub p50: String,
    pub p95: String,
}

#[derive(Template)]
#[template(path = "ui/stats.html")]
struct Stats {
    nav: Nav,
    days: i64,
    action: String,
    kind: String,
    environment: String,
    kinds: Vec<&'static str>,
    grain: &'static str,
    durations: String,
    failures: String,
    rows: Vec<BucketRow>,
    total: i64,
}

/// Deploy (or any action's) durations, p50 and p95, and the failure rate,
/// per hour over a day or a week, per day beyond: read from the rollups.
pub async fn stats(
    State(s): State<crate::routes::AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<StatsQueryForm>,
) -> Result<Response> {
    require(&viewer, "transitions:read")?;
    let days = q.days.unwrap_or(7);
    if ![1, 7, 30, 90].contains(&days) {
        return Err(UiError::invalid("days: 1, 7, 30 or 90"));
    }
    let action = q.action.unwrap_or_else(|| "deploy".into()).trim().to_string();
    let grain = if days <= 7 { Grain::Hour } else { Grain::Day };
    let step = if days <= 7 { Duration::hours(1) } else { Duration::days(1) };
    let until = Utc::now();
    let since = grain.truncate(until - Duration::days(days));
    let some = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
    let query = StatsQuery {
        since,
        until,
        group_by: Vec::new(),
        bucket: Some(grain),
        filter: RollupFilter {
            kind: some(&q.kind),
            action: some(&action),
            environment: some(&q.environment),
            actor: None,
        },
    };
    let groups: Vec<Group> = s.service.stats(&query).await?;
    // Every bucket of the window, empty ones too, so time reads evenly.
    let mut buckets = Vec::new();
    let mut at = since;
    while at <= until {
        buckets.push((at, groups.iter().find(|g| g.bucket == Some(at))));
        at += step;
    }
    let label = |t: &DateTime<Utc>| match grain {
        Grain::Hour => t.format("%m-%d %H:00").to_string(),
        Grain::Day | Grain::Week => t.format("%m-%d").to_string(),
    };
    // Seconds, or milliseconds when nothing took a second.
    let slowest = buckets.iter().filter_map(|(_, g)| g.and_then(|g| g.p95_ms)).fold(0.0f64, f64::max);
    let (unit, per) = if slowest < 1000.0 { ("ms", 1.0) } else { ("s", 1000.0) };
    let secs = |ms: Option<f64>| ms.map(|m| m / per);
    let durations = chart::lines(
        &format!("Duration ({unit})"),
        &buckets.iter().map(|(t, _)| label(t)).collect::<Vec<_>>(),
        &[
            Series { name: "p50", values: buckets.iter().map(|(_, g)| secs(g.and_then(|g| g.p50_ms))).collect() },
            Series { name: "p95", values: buckets.iter().map(|(_, g)| secs(g.and_then(|g| g.p95_ms))).collect() },
        ],
        unit,
    );
    let failures = chart::bars(
        "Failure rate (%)",
        &buckets.iter().map(|(t, _)| label(t)).collect::<Vec<_>>(),
        &buckets.iter().map(|(_, g)| g.and_then(|g| g.failure_rate).map(|r| r * 100.0)).collect::<Vec<_>>(),
        "%",
    );
    let rows = buckets
        .iter()
        .rev()
        .filter_map(|(t, g)| g.map(|g| (t, g)))
        .map(|(t, g)| BucketRow {
            at: label(t),
            total: g.total,
            failed: g.failed,
            failure_rate: g.failure_rate.map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            p50: took(g.p50_ms.map(|m| m as i64)),
            p95: took(g.p95_ms.map(|m| m as i64)),
        })
        .collect::<Vec<_>>();
    Ok(render(&Stats {
        nav: Nav::from(&viewer),
        days,
        total: rows.iter().map(|r| r.total).sum(),
        action,
        kind: q.kind,
        environment: q.environment,
        kinds: Kind::all().map(Kind::as_str).collect(),
        grain: grain.as_str(),
        durations,
        failures,
        rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_times_are_utc() {
        let t = form_time("since", "2026-12-04T03:00").unwrap().unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-04T03:00:00+00:00");
        assert!(form_time("since", "").unwrap().is_none());
        assert!(form_time("since", "2026-12-04T03:00:00Z").unwrap().is_some());
        assert!(form_time("since", "yesterday").is_err());
    }

    #[test]
    fn a_next_page_keeps_its_filters() {
        let q =
            HistoryQuery { kind: "cluster".into(), status: "failed".into(), actor: "a b".into(), ..Default::default() };
        assert_eq!(q.query(), "kind=cluster&status=failed&actor=a%20b");
    }
}
