//! The kind registry through the API: environments, references checked
//! both ways, protected environments.

use drover_tests::{spawn_app, Backend};
use reqwest::StatusCode;
use serde_json::json;

/// An environment holds clusters: its view lists them, lists filter by it,
/// it cannot be deleted while they live, and the reverse holds for images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_checked_both_ways() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = app.post("/v1/environments", json!({"name": "qa", "spec": {"description": "for testing"}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.headers["location"].to_str().unwrap(), format!("/v1/environments/{}", r.body["id"].as_str().unwrap()));
    assert_eq!(r.body["spec"], json!({"description": "for testing", "protected": false}));
    assert_eq!(r.body["settings_scope"], "environment:qa");
    assert_eq!(r.body["members"], json!([]));
    let r = app
        .post("/v1/images", json!({"name": "web", "spec": {"build_command": "true", "start_command": "sleep 60"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .post("/v1/clusters", json!({"name": "c1", "spec": {"image": "web", "count": 1, "environment": "qa"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    app.post("/v1/clusters", json!({"name": "c2", "spec": {"image": "web", "count": 1}})).await;

    let qa = app.get("/v1/environments/qa").await.body;
    let members = qa["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{qa}");
    assert_eq!(
        (&members[0]["kind"], &members[0]["name"], &members[0]["state"]),
        (&json!("cluster"), &json!("c1"), &json!("pending"))
    );
    let listed = app.get("/v1/clusters?environment=qa").await.body;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["name"], "c1");
    assert_eq!(app.get("/v1/clusters?environment=Not_A_Name").await.status, StatusCode::UNPROCESSABLE_ENTITY);

    // A patch that names a missing resource is refused and changes nothing.
    let r = app.patch("/v1/clusters/c2", json!({"spec": {"environment": "prod"}}), None).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "spec.environment");
    let c2 = app.get("/v1/clusters/c2").await.body;
    assert!(c2["spec"].get("environment").is_none());
    assert_eq!(c2["version"], 1);

    // The image is used by two live clusters; the environment by one.
    let r = app.post("/v1/images/web/transitions", json!({"action": "destroy"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["type"], "/problems/resource-in-use");
    assert_eq!(r.body["used_by"], json!(["cluster/c1", "cluster/c2"]));
    let r = app.post("/v1/environments/qa/transitions", json!({"action": "delete"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["used_by"], json!(["cluster/c1"]));
    assert_eq!(app.get("/v1/transitions").await.body["items"], json!([]), "nothing was queued");

    // Once the clusters are destroyed they hold nothing.
    for c in ["c1", "c2"] {
        let run = app.run("cluster", c, json!({"action": "destroy"})).await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let run = app.run("environment", "qa", json!({"action": "delete"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(app.get("/v1/environments/qa").await.body["state"], "deleted");
    assert_eq!(app.delete("/v1/environments/qa").await.status, StatusCode::NO_CONTENT);
    let run = app.run("image", "web", json!({"action": "destroy"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // A deleted environment cannot be named again, nor hold settings.
    let r = app
        .post("/v1/clusters", json!({"name": "c3", "spec": {"image": "web", "count": 1, "environment": "qa"}}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<_> = r.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["spec.image", "spec.environment"], "the image is destroyed, the environment gone");
    let r = app.send(&app.client, "PUT", "/v1/settings/environment:qa/K", Some(json!({"value": "v"}))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// A protected environment: every transition of a resource in it needs a
/// reason and `environment:operate-protected`, besides the action's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_environments_need_a_reason_and_a_permission() {
    let app = spawn_app(Backend::Sqlite).await;
    app.post("/v1/environments", json!({"name": "prod", "spec": {"protected": true}})).await;
    app.post("/v1/images", json!({"name": "web", "spec": {"build_command": "true", "start_command": "true"}})).await;
    let r = app
        .post("/v1/clusters", json!({"name": "web-prod", "spec": {"image": "web", "count": 1, "environment": "prod"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    let operator = app.user_with_roles("olga", &["operator"]).await;
    let r = app
        .send(
            &operator,
            "POST",
            "/v1/clusters/web-prod/transitions",
            Some(json!({"action": "destroy", "reason": "cleanup"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("environment:operate-protected"), "{}", r.body);

    app.role("oncall", &["cluster:destroy", "environment:operate-protected"]).await;
    let oncall = app.user_with_roles("omar", &["oncall"]).await;
    for reason in [json!(null), json!("  ")] {
        let r = app
            .send(
                &oncall,
                "POST",
                "/v1/clusters/web-prod/transitions",
                Some(json!({"action": "destroy", "reason": reason})),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
        assert_eq!(r.body["errors"][0]["field"], "reason");
    }
    assert_eq!(app.get("/v1/transitions").await.body["items"], json!([]));
    let r = app
        .send(
            &oncall,
            "POST",
            "/v1/clusters/web-prod/transitions",
            Some(json!({"action": "destroy", "reason": "decommissioned"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body["environment"], "prod");
    assert_eq!(r.body["actor"], "omar");

    // Unprotected, the same operator needs neither.
    let r = app.patch("/v1/environments/prod", json!({"spec": {"protected": false}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.send(&operator, "POST", "/v1/images/web/transitions", Some(json!({"action": "build"}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

/// Roles name permissions the registry knows; built-in roles cannot change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_checked_against_the_registry() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = app
        .post(
            "/v1/roles",
            json!({"name": "typo", "spec": {"permissions": ["cluster:scale", "cluster:sclae", "widget:*"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let fields: Vec<_> = r.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["spec.permissions[1]", "spec.permissions[2]"]);
    let r = app.post("/v1/users", json!({"name": "u", "spec": {"roles": ["nope"]}})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["errors"][0]["field"], "spec.roles[0]");
    let r = app.patch("/v1/roles/operator", json!({"spec": {"permissions": ["*"]}}), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["type"], "/problems/resource-locked");
    // A role in use by a live user cannot be deleted.
    app.role("deployer", &["cluster:scale"]).await;
    app.post("/v1/users", json!({"name": "dee", "spec": {"roles": ["deployer"]}})).await;
    let r = app.post("/v1/roles/deployer/transitions", json!({"action": "delete"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["used_by"], json!(["user/dee"]));
}

/// Every spec change is a version: create, PATCH (with If-Match on the spec
/// version) and a scale's count, each with who and why; transitions record
/// the version they ran against; a PATCH of a running cluster shows as a
/// pending change naming the actions that apply it, until one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_change_is_a_version() {
    let app = spawn_app(Backend::Sqlite).await;
    let serve = "python3 -m http.server $PORT --bind 127.0.0.1";
    for image in ["web", "web2"] {
        let r = app
            .post("/v1/images", json!({"name": image, "spec": {"build_command": "true", "start_command": serve}}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(app.run("image", image, json!({"action": "build"})).await["status"], "succeeded");
    }
    let r = app
        .post("/v1/clusters", json!({"name": "c1", "spec": {"image": "web", "count": 1}, "reason": "new service"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!((r.body["spec_version"].as_i64(), &r.body["applied_version"]), (Some(1), &json!(null)));
    assert_eq!(r.headers["etag"], "\"v1\"");
    assert_eq!(r.body["pending_changes"], json!([]), "nothing runs yet, so nothing is pending");
    let created = app.run("cluster", "c1", json!({"action": "create"})).await;
    assert_eq!((created["status"].as_str(), created["spec_version"].as_i64()), (Some("succeeded"), Some(1)));
    let c1 = app.get("/v1/clusters/c1").await.body;
    assert_eq!((c1["spec_version"].as_i64(), c1["applied_version"].as_i64()), (Some(1), Some(1)));

    // A new image for the running cluster: pending until a start applies it.
    let r =
        app.patch("/v1/clusters/c1", json!({"spec": {"image": "web2"}, "reason": "new release"}), Some("\"v1\"")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!((r.body["spec_version"].as_i64(), r.body["applied_version"].as_i64()), (Some(2), Some(1)));
    assert_eq!(
        r.body["pending_changes"],
        json!([{"field": "spec.image", "applied": "web", "wanted": "web2", "applied_by": ["create", "start"]}])
    );
    let stale = app.patch("/v1/clusters/c1", json!({"spec": {"count": 2}}), Some("\"v1\"")).await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{}", stale.body);
    let same = app.patch("/v1/clusters/c1", json!({"spec": {"image": "web2"}}), Some("\"v2\"")).await;
    assert_eq!(same.body["spec_version"], 2, "a patch that changes nothing is no version");

    // A scale changes the count (a version by the scale's actor and
    // reason) and applies only the count: the image is still pending.
    let scaled = app.run("cluster", "c1", json!({"action": "scale", "params": {"count": 2}, "reason": "load"})).await;
    assert_eq!((scaled["status"].as_str(), scaled["spec_version"].as_i64()), (Some("succeeded"), Some(2)));
    let c1 = app.get("/v1/clusters/c1").await.body;
    assert_eq!((c1["spec_version"].as_i64(), c1["applied_version"].as_i64()), (Some(3), Some(1)));
    assert_eq!(c1["pending_changes"].as_array().unwrap().len(), 1, "{c1}");
    assert_eq!(c1["pending_changes"][0]["field"], "spec.image");

    let versions = app.get("/v1/clusters/c1/versions").await.body;
    let seen: Vec<_> = versions["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_i64().unwrap(), v["reason"].as_str().unwrap_or(""), v["patch"].clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (3, "load", json!({"count": 2})),
            (2, "new release", json!({"image": "web2"})),
            (
                1,
                "new service",
                json!({"image": "web", "count": 1, "provider": "local",
                "health_check": {"type": "http", "path": "/"}, "start_timeout_secs": 30})
            ),
        ],
        "{versions}"
    );
    let page = app.get("/v1/clusters/c1/versions?limit=2").await.body;
    assert_eq!(page["next_cursor"], 2);
    let rest = app.get("/v1/clusters/c1/versions?limit=2&cursor=2").await.body;
    assert_eq!(rest["items"][0]["version"], 1);
    assert_eq!(rest["next_cursor"], json!(null));
    let diff = app.get("/v1/clusters/c1/versions/3/diff?from=1").await.body;
    assert_eq!(diff["patch"], json!({"image": "web2", "count": 2}));
    assert_eq!(diff["changes"][0], json!({"field": "spec.count", "from": 1, "to": 2}));
    assert_eq!(app.get("/v1/clusters/c1/versions/9").await.status, StatusCode::NOT_FOUND);

    // Stop and start: the whole spec runs again, nothing is pending.
    assert_eq!(app.run("cluster", "c1", json!({"action": "stop"})).await["status"], "succeeded");
    let started = app.run("cluster", "c1", json!({"action": "start"})).await;
    assert_eq!((started["status"].as_str(), started["spec_version"].as_i64()), (Some("succeeded"), Some(3)));
    let c1 = app.get("/v1/clusters/c1").await.body;
    assert_eq!((c1["spec_version"].as_i64(), c1["applied_version"].as_i64()), (Some(3), Some(3)));
    assert_eq!(c1["pending_changes"], json!([]));

    // Records take effect as written: an environment's patch is applied.
    app.post("/v1/environments", json!({"name": "qa", "spec": {"description": "x"}})).await;
    let qa = app.patch("/v1/environments/qa", json!({"spec": {"description": "y"}}), None).await.body;
    assert_eq!((qa["spec_version"].as_i64(), qa["applied_version"].as_i64()), (Some(2), Some(2)));
    assert_eq!(qa["pending_changes"], json!([]));
    let _ = app.run("cluster", "c1", json!({"action": "destroy"})).await;
}

/// A cluster or image that no transition ever started holds nothing, and
/// can be deleted at once; not while a transition of it is queued, nor an
/// image that a live cluster names. A record kind's initial state is live:
/// it still needs its `delete` transition first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_never_started_can_be_deleted_at_once() {
    let app = spawn_app(Backend::Sqlite).await;
    app.post("/v1/images", json!({"name": "web", "spec": {"build_command": "true", "start_command": "sleep 60"}}))
        .await;
    app.post("/v1/images", json!({"name": "spare", "spec": {"build_command": "true", "start_command": "true"}})).await;
    let r = app.post("/v1/clusters", json!({"name": "c1", "spec": {"image": "web", "count": 1}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    let r = app.delete("/v1/images/web").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["type"], "/problems/resource-in-use");
    assert_eq!(r.body["used_by"], json!(["cluster/c1"]));

    // Once a transition was asked for, it is too late: while the build is
    // queued or running the image is busy, and once it ends the image
    // holds a build and must be destroyed first.
    let queued = app.post("/v1/images/spare/transitions", json!({"action": "build"})).await;
    assert_eq!(queued.status, StatusCode::ACCEPTED, "{}", queued.body);
    let r = app.delete("/v1/images/spare").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let refused = r.body["type"].as_str().unwrap().to_string();
    assert!(["/problems/resource-busy", "/problems/action-not-allowed"].contains(&refused.as_str()), "{}", r.body);
    app.wait(queued.body["id"].as_str().unwrap()).await;
    let r = app.delete("/v1/images/spare").await;
    assert_eq!(
        (r.status, &r.body["type"]),
        (StatusCode::CONFLICT, &json!("/problems/action-not-allowed")),
        "{}",
        r.body
    );

    assert_eq!(app.delete("/v1/clusters/c1").await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get("/v1/clusters/c1").await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete("/v1/images/web").await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get("/v1/images/web").await.status, StatusCode::NOT_FOUND);
    // The names are free again.
    let r = app
        .post("/v1/images", json!({"name": "web", "spec": {"build_command": "true", "start_command": "true"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    app.post("/v1/environments", json!({"name": "qa", "spec": {}})).await;
    let r = app.delete("/v1/environments/qa").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["type"], "/problems/action-not-allowed");
}
