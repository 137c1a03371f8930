//! `Accept: text/plain`: compact tables for people at a terminal.
//!
//! Rendered from the same JSON the API returns, so the two never disagree.

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

pub fn wants_text(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| {
        let text = a.find("text/plain");
        let json = a.find("application/json");
        text.is_some() && json.is_none_or(|j| text.is_some_and(|t| t < j))
    })
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `2026-11-22T03:18:14.174501Z` → `2026-11-22 03:18:14`.
pub(crate) fn time(v: &Value) -> String {
    v.as_str().map(|t| t.replace('T', " ").chars().take(19).collect()).unwrap_or_else(|| "-".into())
}

fn ms(v: &Value) -> String {
    took(v.as_i64())
}

/// A duration in milliseconds as people read it: `250ms`, `1.5s`, `1m05s`.
pub(crate) fn took(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(m) if m < 1000 => format!("{m}ms"),
        Some(m) if m < 60_000 => format!("{:.1}s", m as f64 / 1000.0),
        Some(m) => format!("{}m{:02}s", m / 60_000, m % 60_000 / 1000),
    }
}

/// Columns aligned by two spaces, no borders: what `ps` and `kubectl get`
/// print, easy to read and to `awk`.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec())
        .add_rows(rows);
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn transition_rows(items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|t| {
            vec![
                s(&t["id"]),
                format!("{} {}", s(&t["resource"]["kind"]), s(&t["resource"]["name"])),
                s(&t["action"]),
                s(&t["status"]),
                format!("{}>{}", s(&t["from_state"]), s(&t["target_state"])),
                time(&t["started_at"]),
                ms(&t["duration_ms"]),
                s(&t["actor"]),
                t["error"]["message"].as_str().unwrap_or("").chars().take(60).collect(),
            ]
        })
        .collect();
    table(&["ID", "RESOURCE", "ACTION", "STATUS", "FROM>TO", "STARTED", "TOOK", "ACTOR", "ERROR"], rows)
}

/// A resource view as a few aligned lines and its recent transitions.
pub fn resource(v: &Value) -> String {
    let mut out = format!("{} {}  ({})\n", s(&v["kind"]), s(&v["name"]), s(&v["id"]));
    out.push_str(&format!(
        "state      {}   spec v{} (running v{})   updated {} by {}\n",
        s(&v["state"]),
        s(&v["spec_version"]),
        s(&v["applied_version"]),
        time(&v["updated_at"]),
        s(&v["updated_by"])
    ));
    out.push_str(&format!(
        "actions    {}\n",
        v["allowed_actions"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default()
    ));
    if let Some(builds) = v["outputs"]["builds"].as_array() {
        out.push_str(&format!("builds     {}, current {}\n", builds.len(), s(&v["outputs"]["build"])));
    }
    if let Some(instances) = v["outputs"]["instances"].as_array() {
        // A service's instances say which machine each runs on, and there
        // its process (locally) or its address (an aws unit).
        let list: Vec<String> = instances
            .iter()
            .map(|i| {
                let at = match i["address"].as_str() {
                    Some(a) => a.to_string(),
                    None => s(&i["pid"]),
                };
                match i["machine_name"].as_str() {
                    Some(m) => format!("{}@{m}={at}:{}", s(&i["index"]), s(&i["port"])),
                    None => format!("{at}:{}", s(&i["port"])),
                }
            })
            .collect();
        out.push_str(&format!("instances  {} ({})\n", instances.len(), list.join(" ")));
        let mut builds: Vec<String> =
            instances.iter().filter_map(|i| i["build"].as_str().map(str::to_string)).collect();
        builds.sort();
        builds.dedup();
        if !builds.is_empty() {
            out.push_str(&format!("running    build {}\n", builds.join(", build ")));
        }
    }
    if let Some(summary) = v["observed"]["summary"].as_str() {
        out.push_str(&format!("observed   {summary}\n"));
    }
    if let Some(summary) = v["drift"]["summary"].as_str() {
        out.push_str(&format!("drift      {summary} (checked {})\n", time(&v["drift"]["checked_at"])));
    }
    match &v["active_transition"] {
        Value::Null => out.push_str("active     -\n"),
        a => {
            let t = &a["transition"];
            out.push_str(&format!(
                "active     {} {} ({}, attempt {}) {}\n",
                s(&t["action"]),
                s(&t["status"]),
                s(&t["id"]),
                s(&t["attempt"]),
                s(&t["worker"])
            ));
            for e in a["recent_events"].as_array().into_iter().flatten() {
                out.push_str(&format!("           {} {:<5} {}\n", time(&e["at"]), s(&e["level"]), s(&e["message"])));
            }
        }
    }
    if let Some(p) = v["problem"]["summary"].as_str() {
        out.push_str(&format!("PROBLEM    {p}\n"));
    }
    for c in v["pending_changes"].as_array().into_iter().flatten() {
        let by = c["applied_by"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default();
        out.push_str(&format!(
            "PENDING    {}: {} -> {} (applied by {by})\n",
            s(&c["field"]),
            c["applied"],
            c["wanted"]
        ));
    }
    if let Some(items) = v["recent_transitions"].as_array().filter(|i| !i.is_empty()) {
        out.push('\n');
        out.push_str(&transition_rows(items));
    }
    out
}

/// One transition and its timings.
pub fn transition(t: &Value) -> String {
    let mut out = transition_rows(std::slice::from_ref(t));
    if let Some(reason) = t["reason"].as_str() {
        out.push_str(&format!("\nreason: {reason}\n"));
    }
    out
}

pub fn transitions(items: &[Value]) -> String {
    transition_rows(items)
}

/// Renders a DTO with `render` when the caller asked for text, as JSON otherwise.
/// The discovery registry: one line per instance.
pub fn discovery(v: &Value) -> String {
    let rows = v["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["service"]),
                s(&e["instance"]),
                format!("{}:{}", s(&e["address"]), s(&e["port"])),
                s(&e["scheme"]),
                s(&e["machine"]),
                s(&e["build"]),
                time(&e["expires_at"]),
            ]
        })
        .collect();
    table(&["SERVICE", "INSTANCE", "ADDRESS", "SCHEME", "MACHINE", "BUILD", "EXPIRES"], rows)
}

pub fn respond<T: Serialize>(headers: &HeaderMap, extra: HeaderMap, body: T, render: fn(&Value) -> String) -> Response {
    if wants_text(headers) {
        let v = serde_json::to_value(&body).unwrap_or(Value::Null);
        let mut r = ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], render(&v)).into_response();
        r.headers_mut().extend(extra);
        r
    } else {
        (extra, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    #[test]
    fn negotiation() {
        let mut h = HeaderMap::new();
        assert!(!wants_text(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
        assert!(wants_text(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/plain"));
        assert!(!wants_text(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(!wants_text(&h), "curl's default stays JSON");
    }

    #[test]
    fn a_resource_says_what_is_pending() {
        let v = json!({"kind": "cluster", "name": "web-qa", "id": "01", "state": "up", "spec_version": 3,
            "applied_version": 1, "allowed_actions": ["scale"], "active_transition": null,
            "pending_changes": [{"field": "spec.image", "applied": "web", "wanted": "web2",
                "applied_by": ["create", "start"]}]});
        let out = resource(&v);
        assert!(out.contains("spec v3 (running v1)"), "{out}");
        assert!(out.contains("PENDING    spec.image: \"web\" -> \"web2\" (applied by create, start)"), "{out}");
    }

    #[test]
    fn builds_show_in_the_view() {
        let image = json!({"kind": "image", "name": "web", "id": "01", "state": "built",
            "outputs": {"build": "b2", "builds": [{"id": "b2", "current": true}, {"id": "b1", "current": false}]}});
        assert!(resource(&image).contains("builds     2, current b2"), "{}", resource(&image));
        let cluster = json!({"kind": "cluster", "name": "web-qa", "id": "02", "state": "up",
            "outputs": {"instances": [{"pid": 1, "port": 80, "build": "b1"}, {"pid": 2, "port": 81, "build": "b2"},
                {"pid": 3, "port": 82, "build": "b1"}]}});
        assert!(resource(&cluster).contains("running    build b1, build b2"), "{}", resource(&cluster));
        let service = json!({"kind": "service", "name": "app", "id": "03", "state": "running",
            "outputs": {"instances": [{"index": 0, "machine_name": "web-qa-1", "pid": 7, "port": 90, "build": "b1"}]}});
        assert!(resource(&service).contains("instances  1 (0@web-qa-1=7:90)"), "{}", resource(&service));
        let on_aws = json!({"kind": "service", "name": "api", "state": "running",
            "outputs": {"instances": [{"index": 2, "machine_name": "i-0abc", "address": "10.0.0.7", "port": 8082, "build": "b1"}]}});
        assert!(resource(&on_aws).contains("instances  1 (2@i-0abc=10.0.0.7:8082)"), "{}", resource(&on_aws));
    }

    #[test]
    fn tables_align() {
        let t = json!({"id": "01", "resource": {"kind": "cluster", "name": "web-qa"}, "action": "scale", "status": "failed",
            "from_state": "up", "target_state": "up", "started_at": "2026-11-22T03:18:14.174Z", "duration_ms": 61500,
            "actor": "alice", "error": {"message": "instance 2 exited"}});
        let out = transition(&t);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("ID  RESOURCE        ACTION  STATUS"), "{out}");
        assert!(
            lines[1].contains("cluster web-qa")
                && lines[1].contains("1m01s")
                && lines[1].contains("2026-11-22 03:18:14"),
            "{out}"
        );
        assert_eq!(lines[0].find("ACTION"), lines[1].find("scale"));
    }
}
