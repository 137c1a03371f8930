//! The ledger for dashboards and people: stats, metrics, text tables,
//! pagination.

use std::collections::HashSet;

use drover_tests::{spawn_app, Backend};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_metrics_follow_real_runs() {
    let app = spawn_app(Backend::Sqlite).await;
    for (name, build) in [("good", "true"), ("bad", "exit 1"), ("also-good", "true")] {
        let r = app
            .post("/v1/images", json!({"name": name, "spec": {"build_command": build, "start_command": "true"}}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        app.run("image", name, json!({"action": "build"})).await;
    }
    app.run("image", "bad", json!({"action": "destroy"})).await;

    let stats = app.get("/v1/stats/transitions?group_by=kind,action").await;
    assert_eq!(stats.status, StatusCode::OK, "{}", stats.body);
    let groups = stats.body["groups"].as_array().unwrap();
    let build = groups.iter().find(|g| g["key"]["action"] == "build").expect("build group");
    assert_eq!(build["key"], json!({"kind": "image", "action": "build"}));
    assert_eq!(
        (build["total"].as_i64(), build["succeeded"].as_i64(), build["failed"].as_i64()),
        (Some(3), Some(2), Some(1))
    );
    assert!((build["failure_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
    assert!(build["avg_success_ms"].is_number() && build["avg_failure_ms"].is_number() && build["p95_ms"].is_number());
    assert!(build["max_ms"].as_i64().unwrap() >= build["p50_ms"].as_f64().unwrap().floor() as i64);
    let destroy = groups.iter().find(|g| g["key"]["action"] == "destroy").unwrap();
    assert_eq!(destroy["total"], 1);
    let by_actor = app.get("/v1/stats/transitions?group_by=actor&bucket=hour").await.body;
    assert_eq!(by_actor["groups"][0]["key"], json!({"actor": "admin"}));
    assert_eq!(by_actor["groups"][0]["total"], 4);
    assert!(by_actor["groups"][0]["bucket"].is_string());
    let filtered = app.get("/v1/stats/transitions?action=destroy").await.body;
    assert_eq!(filtered["groups"][0]["total"], 1);
    for bad in ["group_by=colour", "bucket=week", "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z"] {
        let r = app.get(&format!("/v1/stats/transitions?{bad}")).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {}", r.body);
    }

    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(metrics.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    for line in [
        "drover_transitions_finished_total{kind=\"image\",action=\"build\",outcome=\"failed\"} 1",
        "drover_transitions_finished_total{kind=\"image\",action=\"build\",outcome=\"succeeded\"} 2",
        "drover_transitions_started_total{kind=\"image\",action=\"destroy\"} 1",
        "drover_queue_depth{state=\"due\"} 0",
        "drover_transitions_running 0",
        "drover_lease_reclaims_total 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains(
            "drover_http_requests_total{method=\"POST\",route=\"/v1/images/{id}/transitions\",status=\"202\"} 4"
        ),
        "{text}"
    );
    assert!(text.contains("drover_transition_pickup_seconds_count 4"), "{text}");
    assert_eq!(app.send(&app.anonymous, "GET", "/metrics", None).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_tables_for_curl() {
    let app = spawn_app(Backend::Sqlite).await;
    app.post("/v1/images", json!({"name": "web", "spec": {"build_command": "exit 4", "start_command": "true"}})).await;
    let run = app.run("image", "web", json!({"action": "build", "reason": "nightly"})).await;
    let get = |path: String| app.client.get(app.url(&path)).header("accept", "text/plain").send();
    let r = get("/v1/images/web".into()).await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(r.headers().contains_key("etag"));
    let text = r.text().await.unwrap();
    assert!(text.starts_with("image web"), "{text}");
    assert!(text.contains("state      failed"), "{text}");
    assert!(text.contains("PROBLEM    build failed: build command exited with status 4"), "{text}");
    assert!(text.contains("ACTION") && text.contains("build") && text.contains("failed"), "{text}");
    let id = run["id"].as_str().unwrap();
    let t = get(format!("/v1/transitions/{id}")).await.unwrap().text().await.unwrap();
    assert!(t.contains(id) && t.contains("reason: nightly"), "{t}");
    let list = get("/v1/transitions".into()).await.unwrap().text().await.unwrap();
    assert_eq!(list.lines().count(), 2, "{list}");
    // JSON stays the default.
    assert!(app.get("/v1/images/web").await.body.is_object());
}

/// Keyset pages neither skip nor repeat while new transitions arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_is_stable_under_concurrent_inserts() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut before = Vec::new();
    for i in 0..25 {
        let name = format!("img-{i}");
        app.post("/v1/images", json!({"name": name, "spec": {"build_command": "true", "start_command": "true"}})).await;
        before.push(app.transition("image", &name, json!({"action": "destroy"})).await);
    }
    let writer = {
        let client = app.client.clone();
        let base = app.url("");
        tokio::spawn(async move {
            for i in 0..15 {
                let name = format!("late-{i}");
                let body = json!({"name": name, "spec": {"build_command": "true", "start_command": "true"}});
                client.post(format!("{base}/v1/images")).json(&body).send().await.unwrap();
                let r = client
                    .post(format!("{base}/v1/images/{name}/transitions"))
                    .json(&json!({"action": "destroy"}))
                    .send()
                    .await;
                assert_eq!(r.unwrap().status(), StatusCode::ACCEPTED);
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/transitions?limit=7&cursor={c}"),
            None => "/v1/transitions?limit=7".to_string(),
        };
        let page = app.get(&path).await.body;
        seen.extend(page["items"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a transition appeared twice");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, in id order");
    for id in &before {
        assert!(unique.contains(id), "{id} was skipped");
    }
    // Filters by environment and actor.
    app.post("/v1/environments", json!({"name": "qa", "spec": {}})).await;
    app.post("/v1/images", json!({"name": "img-c", "spec": {"build_command": "true", "start_command": "true"}})).await;
    app.post("/v1/clusters", json!({"name": "c", "spec": {"image": "img-c", "count": 1, "environment": "qa"}})).await;
    app.transition("cluster", "c", json!({"action": "destroy"})).await;
    let qa = app.get("/v1/transitions?environment=qa").await.body;
    assert_eq!(qa["items"].as_array().unwrap().len(), 1);
    assert_eq!(qa["items"][0]["environment"], "qa");
    assert_eq!(app.get("/v1/transitions?actor=admin&limit=500").await.body["items"].as_array().unwrap().len(), 41);
    assert_eq!(app.get("/v1/transitions?actor=nobody").await.body["items"], json!([]));
}
