//! Black-box acceptance tests: the real server over real HTTP, a real
//! database, and real processes started by the local provider.

mod aws;
mod builds;
mod discovery;
mod drift;

use std::time::Duration;

mod history;
mod identity;
mod jobs;
mod kinds;
mod routers;
mod services;
mod settings;

use drover_tests::{alive, spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SERVE: &str = "exec python3 -m http.server $PORT --bind 127.0.0.1";

async fn create_image(app: &TestApp, name: &str, build: &str) -> Value {
    let r =
        app.post("/v1/images", json!({"name": name, "spec": {"build_command": build, "start_command": SERVE}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["state"], "pending");
    r.body
}

async fn instance_pages(app: &TestApp, cluster: &Value) -> Vec<String> {
    let mut pages = Vec::new();
    for i in cluster["outputs"]["instances"].as_array().expect("instances") {
        let url = format!("{}/index.html", i["url"].as_str().unwrap());
        let body = app.client.get(&url).send().await.expect("instance answers").text().await.unwrap();
        pages.push(body.trim().to_string());
    }
    pages
}

fn pids(cluster: &Value) -> Vec<u64> {
    cluster["outputs"]["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_u64().unwrap()).collect()
}

/// The journey of the README: build an image, run a cluster of it, scale,
/// stop, start, destroy, and find every step in the ledger with timings.
async fn journey(backend: Backend) {
    let app = spawn_app(backend).await;
    create_image(&app, "web", "echo drover-ok > index.html").await;
    let build = app.run("image", "web", json!({"action": "build", "reason": "first build"})).await;
    assert_eq!(build["status"], "succeeded", "{build}");
    assert_eq!(build["reason"], "first build");
    let image = app.get("/v1/images/web").await.body;
    assert_eq!(image["state"], "built");
    let path = image["outputs"]["path"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(format!("{path}/index.html")).unwrap().trim(), "drover-ok");

    let r = app.post("/v1/clusters", json!({"name": "web-qa", "spec": {"image": "web", "count": 2}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.headers["location"], format!("/v1/clusters/{}", r.body["id"].as_str().unwrap()).as_str());
    let create = app.run("cluster", "web-qa", json!({"action": "create"})).await;
    assert_eq!(create["status"], "succeeded", "{create}");
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!(cluster["state"], "up");
    assert_eq!(instance_pages(&app, &cluster).await, ["drover-ok", "drover-ok"]);

    let scale = app.run("cluster", "web-qa", json!({"action": "scale", "params": {"count": 3}})).await;
    assert_eq!(scale["status"], "succeeded", "{scale}");
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!((cluster["state"].as_str(), cluster["spec"]["count"].as_u64()), (Some("up"), Some(3)));
    assert_eq!(instance_pages(&app, &cluster).await.len(), 3);
    let running = pids(&cluster);
    assert!(running.iter().all(|&p| alive(p)));

    let stop = app.run("cluster", "web-qa", json!({"action": "stop"})).await;
    assert_eq!(stop["status"], "succeeded", "{stop}");
    assert_eq!(app.get("/v1/clusters/web-qa").await.body["state"], "down");
    assert!(running.iter().all(|&p| !alive(p)), "stop leaves no process behind");

    let start = app.run("cluster", "web-qa", json!({"action": "start"})).await;
    assert_eq!(start["status"], "succeeded", "{start}");
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!(instance_pages(&app, &cluster).await.len(), 3);
    let running = pids(&cluster);

    let destroy = app.run("cluster", "web-qa", json!({"action": "destroy", "reason": "done"})).await;
    assert_eq!(destroy["status"], "succeeded", "{destroy}");
    assert_eq!(app.get("/v1/clusters/web-qa").await.body["state"], "destroyed");
    assert!(running.iter().all(|&p| !alive(p)), "destroy leaves no process behind");

    // Every step is in the ledger, newest first, with its timings.
    let ledger = app.get("/v1/transitions?limit=100").await.body;
    let steps: Vec<(String, String)> = ledger["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["resource"]["name"].as_str().unwrap().to_string(), t["action"].as_str().unwrap().to_string()))
        .collect();
    let expected = [
        ("web-qa", "destroy"),
        ("web-qa", "start"),
        ("web-qa", "stop"),
        ("web-qa", "scale"),
        ("web-qa", "create"),
        ("web", "build"),
    ];
    assert_eq!(steps, expected.map(|(a, b)| (a.to_string(), b.to_string())));
    for t in ledger["items"].as_array().unwrap() {
        assert_eq!(t["status"], "succeeded");
        assert!(t["started_at"].is_string() && t["finished_at"].is_string(), "{t}");
        assert!(t["duration_ms"].as_i64().unwrap() >= 0);
        assert_eq!(t["actor"], "admin");
    }
    let by_cluster = app.get("/v1/transitions?resource=web-qa&kind=cluster&action=scale").await.body;
    assert_eq!(by_cluster["items"].as_array().unwrap().len(), 1);
    assert_eq!(by_cluster["items"][0]["params"], json!({"count": 3}));

    // Deleting the destroyed cluster keeps its history.
    assert_eq!(app.delete("/v1/clusters/web-qa").await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get("/v1/clusters/web-qa").await.status, StatusCode::NOT_FOUND);
    let kept = app.get(&format!("/v1/transitions/{}", destroy["id"].as_str().unwrap())).await;
    assert_eq!(kept.body["reason"], "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_on_sqlite() {
    journey(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_on_postgres() {
    journey(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_says_why_and_retry_after_a_fix_recovers() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "broken", "echo compiling; echo 'fatal: missing libfoo' >&2; exit 3").await;
    let failed = app.run("image", "broken", json!({"action": "build"})).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "build_failed");
    assert_eq!(failed["error"]["retryable"], false);
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("status 3") && message.contains("missing libfoo"), "{message}");
    let tail = failed["error"]["detail"]["output_tail"].to_string();
    assert!(tail.contains("compiling") && tail.contains("missing libfoo"), "{tail}");

    // The 3 a.m. view says why, and what can be done.
    let image = app.get("/v1/images/broken").await;
    assert_eq!(image.body["state"], "failed");
    assert!(image.body["problem"]["summary"].as_str().unwrap().contains("missing libfoo"), "{}", image.body);
    assert_eq!(image.body["problem"]["transition"], failed["id"]);
    assert_eq!(image.body["allowed_actions"], json!(["destroy", "retry"]));
    let events = app.get(&format!("/v1/transitions/{}/events", failed["id"].as_str().unwrap())).await.body;
    assert!(events["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["level"] == "error" && e["message"].as_str().unwrap().contains("libfoo")));

    // Fix the spec under optimistic concurrency, then retry.
    let etag = image.headers["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, "\"v1\"", "the ETag is the spec version");
    let fixed = app
        .patch("/v1/images/broken", json!({"spec": {"build_command": "echo fixed > index.html"}}), Some(&etag))
        .await;
    assert_eq!(fixed.status, StatusCode::OK, "{}", fixed.body);
    assert_eq!(fixed.body["spec"]["build_command"], "echo fixed > index.html");
    assert_eq!(fixed.body["spec"]["start_command"], SERVE, "a merge patch keeps the other fields");
    assert_eq!(fixed.headers["etag"].to_str().unwrap(), "\"v2\"");
    // Someone who read version 1 cannot overwrite version 2.
    let stale = app.patch("/v1/images/broken", json!({"spec": {"build_command": "true"}}), Some(&etag)).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{}", stale.body);
    assert_eq!(app.get("/v1/images/broken").await.body["spec"]["build_command"], "echo fixed > index.html");

    let retry = app.run("image", "broken", json!({"action": "retry", "reason": "fixed the build"})).await;
    assert_eq!(retry["status"], "succeeded", "{retry}");
    assert_eq!(retry["action"], "build");
    assert_eq!(retry["parent"], failed["id"]);
    assert_eq!(retry["from_state"], "failed");
    assert_eq!(app.get("/v1/images/broken").await.body["state"], "built");
    let lineage = app.get(&format!("/v1/transitions?parent={}", failed["id"].as_str().unwrap())).await.body;
    assert_eq!(lineage["items"][0]["id"], retry["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transition_at_a_time_and_cancel() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "slow", "sleep 30").await;
    let build = app.transition("image", "slow", json!({"action": "build"})).await;
    let busy = app.post("/v1/images/slow/transitions", json!({"action": "destroy"})).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.headers["content-type"], "application/problem+json");
    assert_eq!(busy.body["type"], "/problems/resource-busy");
    assert_eq!(busy.body["active_transition"], build.as_str());
    // While busy, the spec cannot change either.
    let patch = app.patch("/v1/images/slow", json!({"spec": {"build_command": "true"}}), None).await;
    assert_eq!(patch.status, StatusCode::CONFLICT);

    // Wait for it to be running, then cancel.
    for _ in 0..100 {
        if app.get(&format!("/v1/transitions/{build}")).await.body["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = app.post(&format!("/v1/transitions/{build}/cancel"), json!({"reason": "too slow"})).await;
    assert_eq!(cancel.status, StatusCode::ACCEPTED, "{}", cancel.body);
    let fin = app.wait(&build).await;
    assert_eq!(fin["status"], "cancelled");
    assert_eq!(fin["cancel_requested_by"], "admin");
    assert!(fin["duration_ms"].as_i64().unwrap() < 25_000, "the build command was stopped, not waited for");
    assert_eq!(app.get("/v1/images/slow").await.body["state"], "failed");
    let again = app.post(&format!("/v1/transitions/{build}/cancel"), json!({})).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_make_retries_safe() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "true").await;
    let body = json!({"action": "build"});
    let first = app.post_with_key("/v1/images/web/transitions", body.clone(), "key-1").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let second = app.post_with_key("/v1/images/web/transitions", body.clone(), "key-1").await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(second.body["id"], first.body["id"]);
    assert_eq!(second.headers["location"], first.headers["location"]);
    let other = app.post_with_key("/v1/images/web/transitions", json!({"action": "destroy"}), "key-1").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.body["type"], "/problems/idempotency-key-reused");
    app.wait(first.body["id"].as_str().unwrap()).await;
    let runs = app.get("/v1/transitions?kind=image").await.body;
    assert_eq!(runs["items"].as_array().unwrap().len(), 1, "no second run");
    assert_eq!(runs["items"][0]["idempotency_key"], "key-1");

    // Creation is idempotent too.
    let spec = json!({"name": "c", "spec": {"image": "web", "count": 1}});
    let a = app.post_with_key("/v1/clusters", spec.clone(), "key-2").await;
    let b = app.post_with_key("/v1/clusters", spec, "key-2").await;
    assert_eq!((a.status, b.status), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(a.body["id"], b.body["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_problem_and_writes_nothing() {
    let app = spawn_app(Backend::Sqlite).await;
    let cases = [
        (json!({"name": "Bad Name", "spec": {"image": "x", "count": 1}}), "name"),
        (json!({"name": "ok", "spec": {"image": "x", "count": 0}}), "spec.count"),
        (json!({"name": "ok", "spec": {"image": "x"}}), "spec.count"),
        (json!({"name": "ok", "spec": {"image": "x", "count": "two"}}), "spec.count"),
        (json!({"name": "ok", "spec": {"image": "x", "count": 1, "colour": "red"}}), "spec.colour"),
        (
            json!({"name": "ok", "spec": {"image": "x", "count": 1, "health_check": {"type": "http", "path": "no-slash"}}}),
            "spec.health_check.path",
        ),
    ];
    for (body, field) in cases {
        let r = app.post("/v1/clusters", body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(r.body["type"], "/problems/invalid-request");
        assert_eq!(r.body["errors"][0]["field"], field, "{body}: {}", r.body);
    }
    let malformed = app
        .client
        .post(app.url("/v1/clusters"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let huge = json!({"name": "big", "spec": {"build_command": "x".repeat(100_000), "start_command": "y"}});
    let r = app.post("/v1/images", huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(app.get("/v1/clusters").await.body["items"], json!([]), "nothing half-written");
    assert_eq!(app.get("/v1/images").await.body["items"], json!([]));

    create_image(&app, "web", "true").await;
    let dup =
        app.post("/v1/images", json!({"name": "web", "spec": {"build_command": "true", "start_command": "x"}})).await;
    assert_eq!((dup.status, dup.body["type"].as_str()), (StatusCode::CONFLICT, Some("/problems/already-exists")));
    let r = app.post("/v1/images/web/transitions", json!({"action": "retry"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["type"], "/problems/action-not-allowed");
    assert_eq!(r.body["allowed_actions"], json!(["build", "destroy"]));
    assert_eq!(r.body["current_state"], "pending");
    let r = app.post("/v1/images/web/transitions", json!({"action": "launch"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    // A cluster cannot start from an image that is not built.
    app.post("/v1/clusters", json!({"name": "c", "spec": {"image": "web", "count": 1}})).await;
    let r = app.post("/v1/clusters/c/transitions", json!({"action": "create"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.body["detail"].as_str().unwrap().contains("needs it built"), "{}", r.body);
    // A spec that names a resource that does not exist is refused whole.
    let r = app
        .post("/v1/clusters", json!({"name": "d", "spec": {"image": "nope", "count": 1, "environment": "nowhere"}}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let fields: Vec<_> = r.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["spec.image", "spec.environment"]);
    assert_eq!(app.get("/v1/clusters/d").await.status, StatusCode::NOT_FOUND, "nothing was written");
    assert_eq!(app.get("/v1/transitions").await.body["items"], json!([]), "no run was queued by any of this");
    let r = app.delete("/v1/images/web").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "only destroyed resources are deleted");
    assert_eq!(app.get("/v1/transitions?limit=0").await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.get("/v1/transitions?since=yesterday").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.get("/v1/transitions/not-a-uuid").await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_survive_a_restart_and_losses_are_reported() {
    let mut app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "echo up > index.html").await;
    app.run("image", "web", json!({"action": "build"})).await;
    app.post("/v1/clusters", json!({"name": "web-qa", "spec": {"image": "web", "count": 2}})).await;
    app.run("cluster", "web-qa", json!({"action": "create"})).await;
    let before = app.get("/v1/clusters/web-qa").await.body;
    let pids_before = pids(&before);

    app.restart().await;
    // The observer looks at the instances again after the restart.
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = app.get("/v1/clusters/web-qa").await.body;
        if seen["observed"]["healthy"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen["observed"]["healthy"], true, "{seen}");
    assert_eq!(pids(&seen), pids_before, "the same processes were adopted");
    assert_eq!(instance_pages(&app, &seen).await, ["up", "up"]);

    // One instance dies behind drover's back: the cluster says so.
    let victim = pids_before[1];
    std::process::Command::new("kill").args(["-KILL", "--", &format!("-{victim}")]).status().unwrap();
    for _ in 0..100 {
        seen = app.get("/v1/clusters/web-qa").await.body;
        if seen["observed"]["healthy"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen["observed"]["healthy"], false, "{seen}");
    let summary = seen["problem"]["summary"].as_str().unwrap();
    assert!(summary.contains(&format!("pid {victim}")) && summary.contains("gone"), "{summary}");

    let destroy = app.run("cluster", "web-qa", json!({"action": "destroy"})).await;
    assert_eq!(destroy["status"], "succeeded");
    assert!(pids_before.iter().all(|&p| !alive(p)));
    let gone = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!(gone["observed"], Value::Null, "no stale observation: {gone}");
    assert_eq!(gone["problem"], Value::Null, "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_live_and_long_poll() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "sleep 1; echo done > index.html").await;
    let id = app.transition("image", "web", json!({"action": "build"})).await;
    // The stream follows the run as it happens and ends with the transition.
    let text = app.get_text(&format!("/v1/transitions/{id}/events"), "text/event-stream").await;
    let kinds: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(kinds.last(), Some(&"end"), "{text}");
    assert!(kinds.iter().filter(|k| **k == "event").count() >= 4, "{text}");
    assert!(text.contains("\"status\":\"succeeded\""));
    // Reading on from a cursor.
    let page = app.get(&format!("/v1/transitions/{id}/events?limit=2")).await.body;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    let rest = app.get(&format!("/v1/transitions/{id}/events?after={}", page["next_after"])).await.body;
    let first_rest = rest["events"][0]["seq"].as_i64().unwrap();
    assert!(first_rest > page["next_after"].as_i64().unwrap());
    assert_eq!(rest["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_describes_itself() {
    let app = spawn_app(Backend::Sqlite).await;
    let served = app.get("/openapi.json").await.body;
    let checked_in: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, checked_in,
        "openapi/openapi.json is stale: run `cargo run -p drover-api -- openapi > openapi/openapi.json`"
    );
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1"));
    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"), "the docs page is served from bundled assets");

    let kinds = app.get("/v1/kinds").await.body;
    let names: Vec<_> = kinds["items"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["image", "cluster", "service", "job", "router", "environment", "user", "role"]);
    let cluster = app.get("/v1/kinds/clusters").await.body;
    let scale_action = cluster["actions"].as_array().unwrap().iter().find(|a| a["name"] == "scale").unwrap();
    assert_eq!(scale_action["permission"], "cluster:scale");
    assert_eq!(scale_action["params"]["properties"]["count"]["maximum"], 64);
    assert_eq!(cluster["spec_schema"]["required"], json!(["image", "count"]));
    // The document says the same, per kind: the transition body is one
    // branch per action, with that action's parameters.
    let request = &served["components"]["schemas"]["ClusterTransitionRequest"]["oneOf"];
    let actions: Vec<_> =
        request.as_array().unwrap().iter().map(|b| b["properties"]["action"]["const"].clone()).collect();
    assert_eq!(
        actions,
        [
            "create",
            "scale",
            "add-instances",
            "initialize",
            "stop",
            "start",
            "destroy",
            "retry",
            "refresh",
            "repair",
            "adopt"
        ]
    );
    assert_eq!(request[1]["properties"]["params"]["properties"]["count"]["minimum"], 1);
    assert_eq!(
        served["paths"]["/v1/environments/{id}/transitions"]["post"]["security"][0]["bearer"][0],
        "environment:{action}"
    );
    assert_eq!(served["paths"]["/v1/users/{id}"]["get"]["security"][0]["bearer"][0], "user:read");
    assert_eq!(served["paths"]["/v1/users/{id}"]["patch"]["security"][0]["bearer"][0], "users:admin");
    let scale = cluster["transitions"].as_array().unwrap().iter().find(|t| t["action"] == "scale").unwrap();
    assert_eq!(
        scale,
        &json!({"from": "up", "action": "scale", "working": "scaling", "on_success": "up", "on_failure": "failed", "repeats_failed_action": false})
    );
    assert_eq!(app.get("/v1/kinds/widget").await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    let ready = app.get("/readyz").await;
    assert_eq!((ready.status, ready.body["store"].as_str()), (StatusCode::OK, Some("sqlite")));
    let r = app.client.get(app.url("/healthz")).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
}

/// What schemathesis (`.ci/fuzz`) found: path parameters that do not
/// parse, unknown paths and methods, and out-of-range values answered with
/// plain text, an empty body or a dropped connection. Each is a problem now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_a_problem_naming_what_is_wrong() {
    let app = spawn_app(Backend::Sqlite).await;
    let bad_paths = [
        ("GET", "/v1/transitions/not-a-uuid", "id"),
        ("POST", "/v1/transitions/not-a-uuid/cancel", "id"),
        ("GET", "/v1/transitions/not-a-uuid/events", "id"),
        ("DELETE", "/v1/users/admin/tokens/xyz", "token"),
        ("GET", "/v1/images/%FF", "id"),
    ];
    for (method, path, field) in bad_paths {
        let r = app.send(&app.client, method, path, None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{method} {path}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json", "{method} {path}");
        assert_eq!(r.body["type"], "/problems/invalid-path", "{method} {path}");
        assert_eq!(r.body["errors"][0]["field"], field, "{method} {path}: {}", r.body);
    }

    let r = app.get("/v1/no-such-thing").await;
    assert_eq!((r.status, r.body["type"].as_str()), (StatusCode::NOT_FOUND, Some("/problems/no-such-path")));
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let r = app.send(&app.client, "PUT", "/v1/images", Some(json!({}))).await;
    assert_eq!(
        (r.status, r.body["type"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("/problems/method-not-allowed"))
    );
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.headers["allow"].to_str().unwrap().contains("POST"), "{:?}", r.headers);

    // A wait of 2^64/60 minutes overflowed (a panic, so no response at all).
    let id = uuid::Uuid::now_v7();
    let r = app.get(&format!("/v1/transitions/{id}?wait=307445734561825861m")).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "wait");
    // Statistics round times in nanoseconds, which end in 2262: beyond
    // that the handler panicked and the connection dropped.
    for (query, field) in [("until=9999-12-31T23:59:59Z", "until"), ("since=0001-01-01T00:00:00Z", "since")] {
        let r = app.get(&format!("/v1/stats/transitions?{query}")).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(r.body["errors"][0]["field"], field, "{query}: {}", r.body);
    }
    assert_eq!(
        app.get("/v1/stats/transitions?since=2199-12-01T00:00:00Z&until=2200-01-01T00:00:00Z&bucket=day").await.status,
        StatusCode::OK
    );

    // A preview's bad parameter is named as the query parameter it came
    // as, not as the action's `params` (and add-instances adds one by default).
    let image = json!({"name": "ami", "spec": {"provider": "aws", "base_ami": "ami-0abcdef1234567890",
        "instance_type": "t3.micro", "build_script": "#!/bin/sh"}});
    assert_eq!(app.post("/v1/images", image).await.status, StatusCode::CREATED);
    let cluster = json!({"name": "core", "spec": {"provider": "aws", "image": "ami", "count": 1,
        "instance_type": "m5.large", "subnets": ["subnet-0abc1234"]}});
    assert_eq!(app.post("/v1/clusters", cluster).await.status, StatusCode::CREATED);
    let r = app.get("/v1/clusters/core/template?action=add-instances&n=64").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "n", "{}", r.body);
    let r = app.get("/v1/clusters/core/template?action=destroy").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "action", "{}", r.body);

    // The cancel body is documented as optional and nullable: `null` means no reason.
    create_image(&app, "slow", "sleep 30").await;
    let build = app.transition("image", "slow", json!({"action": "build"})).await;
    let r = app.post(&format!("/v1/transitions/{build}/cancel"), Value::Null).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["cancel_requested_by"], "admin");
    assert_eq!(app.wait(&build).await["status"], "cancelled");

    // The document lists these answers wherever they can happen.
    let doc = app.get("/openapi.json").await.body;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let documented = |status: &str| op["responses"].get(status).is_some();
            if op.get("security").is_some() {
                assert!(documented("401") && documented("403"), "{method} {path} documents 401 and 403");
            }
            if op.get("requestBody").is_some() {
                for status in ["400", "413", "415", "422"] {
                    assert!(documented(status), "{method} {path} documents {status}");
                }
            }
            if op["parameters"].as_array().is_some_and(|ps| ps.iter().any(|p| p["in"] == "path")) {
                assert!(documented("400") && documented("404"), "{method} {path} documents 400 and 404");
            }
        }
    }
}

/// `--providers` naming a provider drover does not have stops the start
/// before the database is opened (so before a first admin is made whose
/// token nobody would see), and says which providers there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_provider_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drover.db");
    let mut cfg =
        drover_tests::test_config(dir.path(), &format!("sqlite://{}", db.display()), &Default::default(), true);
    cfg.engine.providers = Some(vec!["local".into(), "gcp".into()]);
    let err = drover_api::start(cfg).await.err().expect("refused").to_string();
    assert!(err.contains("\"gcp\"") && err.contains("aws, builtin, local"), "{err}");
    assert!(!db.exists(), "nothing was created");
}

/// Role metadata is the machines' on local clusters too (services'
/// constraints will match it): each instance gets it as
/// `DROVER_ROLE_METADATA`, and a cluster without any is `cluster=NAME`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_instances_carry_their_role_metadata() {
    let app = spawn_app(Backend::Sqlite).await;
    let start = "echo \"$DROVER_ROLE_METADATA\" > meta-$DROVER_CLUSTER-$DROVER_INSTANCE.txt; \
                 exec python3 -m http.server $PORT --bind 127.0.0.1";
    let r =
        app.post("/v1/images", json!({"name": "web", "spec": {"build_command": "true", "start_command": start}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let bad = app
        .post(
            "/v1/clusters",
            json!({"name": "w", "spec": {"image": "web", "count": 1, "role_metadata": "role worker"}}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(bad.body["errors"][0]["field"], "spec.role_metadata");
    for (name, metadata) in [("workers", Some("role=worker,tier=web")), ("plain", None)] {
        let mut spec = json!({"image": "web", "count": 2});
        if let Some(m) = metadata {
            spec["role_metadata"] = m.into();
        }
        let r = app.post("/v1/clusters", json!({"name": name, "spec": spec})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(app.run("cluster", name, json!({"action": "create"})).await["status"], "succeeded");
        let cluster = app.get(&format!("/v1/clusters/{name}")).await.body;
        for i in cluster["outputs"]["instances"].as_array().unwrap() {
            let url = format!("{}/meta-{name}-{}.txt", i["url"].as_str().unwrap(), i["index"]);
            let got = app.client.get(&url).send().await.unwrap().text().await.unwrap();
            assert_eq!(got.trim(), metadata.map_or(format!("cluster={name}"), str::to_string));
        }
    }
}
