//! Settings: versions, diff, rollback, compare-and-set, scopes, secrets.

use drover_tests::{captured_logs, spawn_app, Backend};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECRET: &str = "s3cr3t-Tr0ub4dor-and-3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_diff_rollback_and_compare_and_set() {
    let app = spawn_app(Backend::Sqlite).await;
    let put = |v: &str, if_match: Option<&str>| {
        let mut req = app
            .client
            .put(app.url("/v1/settings/global/LOG_LEVEL"))
            .json(&json!({"value": v, "reason": format!("set {v}")}));
        if let Some(m) = if_match {
            req = req.header("If-Match", m);
        }
        req.send()
    };
    let r = put("info", Some("\"v0\"")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"v1\"");
    put("debug", Some("\"v1\"")).await.unwrap();
    // A writer that read version 1 is refused: someone wrote version 2.
    let stale = put("warn", Some("\"v1\"")).await.unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let current = app.get("/v1/settings/global/LOG_LEVEL").await;
    assert_eq!((current.body["value"].as_str(), current.body["version"].as_i64()), (Some("debug"), Some(2)));
    assert_eq!((current.body["actor"].as_str(), current.body["reason"].as_str()), (Some("admin"), Some("set debug")));

    let diff = app.get("/v1/settings/global/LOG_LEVEL/diff?from=1&to=2").await.body;
    assert_eq!(
        (diff["from"]["value"].as_str(), diff["to"]["value"].as_str(), &diff["changed"]),
        (Some("info"), Some("debug"), &json!(true))
    );

    let rb = app.post("/v1/settings/global/LOG_LEVEL/rollback", json!({"version": 1, "reason": "too noisy"})).await;
    assert_eq!(rb.status, StatusCode::OK, "{}", rb.body);
    assert_eq!((rb.body["version"].as_i64(), rb.body["value"].as_str()), (Some(3), Some("info")));
    let history = app.get("/v1/settings/global/LOG_LEVEL/versions").await.body;
    let versions: Vec<(i64, &str)> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_i64().unwrap(), v["value"].as_str().unwrap()))
        .collect();
    assert_eq!(versions, [(1, "info"), (2, "debug"), (3, "info")]);
    assert_eq!(history["items"][2]["reason"], "too noisy");

    let del = app.client.delete(app.url("/v1/settings/global/LOG_LEVEL?reason=unused")).send().await.unwrap();
    assert_eq!(del.status(), StatusCode::OK);
    let deleted: Value = del.json().await.unwrap();
    assert_eq!((deleted["version"].as_i64(), deleted["deleted"].as_bool()), (Some(4), Some(true)));
    assert_eq!(app.get("/v1/settings/global/LOG_LEVEL").await.status, StatusCode::NOT_FOUND);
    // Deleting it again changes nothing and answers with the version that
    // deleted it; a key that never existed is still not found.
    let again = app.client.delete(app.url("/v1/settings/global/LOG_LEVEL")).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap(), deleted);
    let versions = app.get("/v1/settings/global/LOG_LEVEL/versions").await.body;
    assert_eq!(versions["items"].as_array().unwrap().len(), 4, "no version for a delete that changed nothing");
    let never = app.client.delete(app.url("/v1/settings/global/NEVER_SET")).send().await.unwrap();
    assert_eq!(never.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.get("/v1/settings/global/LOG_LEVEL?version=3").await.body["value"], "info", "history stays");
    let bad =
        app.client.put(app.url("/v1/settings/global/not-a-key")).json(&json!({"value": "x"})).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bad = app.client.put(app.url("/v1/settings/planet:mars/K")).json(&json!({"value": "x"})).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// Effective settings merge global → environment → cluster; instances get
/// them as their environment; a secret is sealed at rest and never shown
/// or logged unless revealed by someone allowed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_merge_and_secrets_stay_secret() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut seen = Vec::<String>::new();
    let put = |path: &str, body: Value| app.client.put(app.url(path)).json(&body).send();
    // An environment's settings need the environment.
    let r = put("/v1/settings/environment:qa/GREETING", json!({"value": "hello qa"})).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.post("/v1/environments", json!({"name": "qa", "spec": {}})).await.status, StatusCode::CREATED);
    for (path, body) in [
        ("/v1/settings/global/GREETING", json!({"value": "hello"})),
        ("/v1/settings/global/REGION", json!({"value": "eu"})),
        ("/v1/settings/environment:qa/GREETING", json!({"value": "hello qa"})),
        ("/v1/settings/global/DB_PASSWORD", json!({"value": SECRET, "secret": true, "reason": "rotate"})),
    ] {
        let r = put(path, body).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        seen.push(r.text().await.unwrap());
    }
    let r = app
        .post("/v1/images", json!({"name": "web", "spec": {
            "build_command": "true",
            "start_command": "printf '%s|%s|%s' \"$GREETING\" \"$REGION\" \"${#DB_PASSWORD}\" > settings.txt; exec python3 -m http.server $PORT --bind 127.0.0.1"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    app.run("image", "web", json!({"action": "build"})).await;
    app.post("/v1/clusters", json!({"name": "web-qa", "spec": {"image": "web", "count": 1, "environment": "qa"}}))
        .await;
    let r = put("/v1/settings/cluster:web-qa/REGION", json!({"value": "eu-west-1"})).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let effective = app.get("/v1/clusters/web-qa/settings").await.body;
    seen.push(effective.to_string());
    let by_key: Vec<(&str, &str, Option<&str>, bool)> = effective["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap(),
                e["scope"].as_str().unwrap(),
                e["value"].as_str(),
                e["redacted"].as_bool().unwrap(),
            )
        })
        .collect();
    let cluster_id = app.get("/v1/clusters/web-qa").await.body["id"].as_str().unwrap().to_string();
    let cluster_scope = format!("cluster:{cluster_id}");
    assert_eq!(
        by_key,
        [
            ("DB_PASSWORD", "global", None, true),
            ("GREETING", "environment:qa", Some("hello qa"), false),
            ("REGION", cluster_scope.as_str(), Some("eu-west-1"), false),
        ]
    );

    // The instance got them as its environment; the run says which versions.
    let create = app.run("cluster", "web-qa", json!({"action": "create"})).await;
    assert_eq!(create["status"], "succeeded", "{create}");
    seen.push(create.to_string());
    let used: Vec<(&str, i64)> = create["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["key"].as_str().unwrap(), s["version"].as_i64().unwrap()))
        .collect();
    assert_eq!(used, [("DB_PASSWORD", 1), ("GREETING", 1), ("REGION", 1)]);
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    seen.push(cluster.to_string());
    let url = format!("{}/settings.txt", cluster["outputs"]["instances"][0]["url"].as_str().unwrap());
    let env = app.client.get(url).send().await.unwrap().text().await.unwrap();
    assert_eq!(env, format!("hello qa|eu-west-1|{}", SECRET.len()));
    let events = app.get(&format!("/v1/transitions/{}/events", create["id"].as_str().unwrap())).await;
    seen.push(events.body.to_string());

    // Redacted everywhere by default.
    for path in [
        "/v1/settings/global/DB_PASSWORD",
        "/v1/settings/global",
        "/v1/settings/global/DB_PASSWORD/versions",
        "/v1/settings/global/DB_PASSWORD/diff?from=1&to=1",
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        seen.push(r.body.to_string());
    }
    let one = app.get("/v1/settings/global/DB_PASSWORD").await.body;
    assert_eq!(
        (one["secret"].as_bool(), one["redacted"].as_bool(), &one["value"]),
        (Some(true), Some(true), &Value::Null)
    );

    // An operator may not reveal; an admin may.
    let operator = app.user_with_roles("ops", &["operator"]).await;
    let denied = app.send(&operator, "GET", "/v1/settings/global/DB_PASSWORD?reveal=true", None).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    seen.push(denied.body.to_string());
    let hidden = app.send(&operator, "GET", "/v1/clusters/web-qa/settings", None).await;
    seen.push(hidden.body.to_string());
    let revealed = app.get("/v1/settings/global/DB_PASSWORD?reveal=true").await.body;
    assert_eq!(revealed["value"], SECRET);

    for body in &seen {
        assert!(!body.contains(SECRET), "a response showed the secret: {body}");
    }
    assert!(!captured_logs().contains(SECRET), "the logs showed the secret");
    assert!(captured_logs().contains("DB_PASSWORD"), "the logs were captured at all");

    // At rest: sealed, not plaintext (database file and its write-ahead log).
    let dir = app.data_dir.path();
    for file in ["drover.db", "drover.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.join(file)) {
            assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "{file} holds the plaintext");
        }
    }
    assert!(
        std::fs::read(dir.join("drover.db-wal")).map(|b| b.len()).unwrap_or(0)
            + std::fs::read(dir.join("drover.db")).unwrap().len()
            > 0
    );

    app.run("cluster", "web-qa", json!({"action": "destroy"})).await;
}
