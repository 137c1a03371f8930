//! Authentication and authorisation, end to end.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use drover_tests::{client_with, spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A body the operation accepts, so that a request gets as far as its
/// permission check.
fn body_for(operation: &str) -> Option<Value> {
    Some(match operation {
        "create_image" => json!({"name": "walk-image", "spec": {"build_command": "true", "start_command": "true"}}),
        "create_cluster" => json!({"name": "walk-cluster", "spec": {"image": "walk", "count": 1}}),
        "create_service" => json!({"name": "walk-service", "spec": {"cluster": "walk", "image": "walk", "count": 1}}),
        "create_job" => json!({"name": "walk-job", "spec": {"cluster": "walk", "command": "true"}}),
        "create_router" => json!({"name": "walk-router", "spec": {"environment": "walk",
            "frontends": [{"name": "web", "mode": "http", "port": 18_099, "backend": "b"}],
            "backends": [{"name": "b", "target": {"service": "walk"}}]}}),
        "create_user" => json!({"name": "walk-user", "spec": {"roles": []}}),
        "create_role" => json!({"name": "walk-role", "spec": {"permissions": []}}),
        "create_environment" => json!({"name": "walk-env", "spec": {"description": "walked"}}),
        op if op.starts_with("patch_") => json!({"spec": {}}),
        "request_image_transition" => json!({"action": "destroy"}),
        "request_cluster_transition"
        | "request_service_transition"
        | "request_job_transition"
        | "request_router_transition" => {
            json!({"action": "destroy"})
        }
        "request_user_transition" | "request_role_transition" | "request_environment_transition" => {
            json!({"action": "delete"})
        }
        "create_token" => json!({"name": "walk"}),
        "put_setting" => json!({"value": "v"}),
        "rollback_setting" => json!({"version": 1}),
        "cancel_transition" => json!({}),
        _ => return None,
    })
}

/// Every operation of the OpenAPI document: 401 without a token, 403 with
/// a token that lacks the permission its security scope names, and neither
/// with a token that has exactly that permission; and the built-in viewer
/// and operator roles against their table. A new route without a check, or
/// without a documented permission, fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_demands_its_permission() {
    let app = spawn_app(Backend::Sqlite).await;
    // Fixtures the paths point at.
    let r = app
        .post("/v1/images", json!({"name": "walk", "spec": {"build_command": "sleep 30", "start_command": "true"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let run = app.transition("image", "walk", json!({"action": "build"})).await;
    app.post("/v1/clusters", json!({"name": "walk", "spec": {"image": "walk", "count": 1}})).await;
    app.post("/v1/services", json!({"name": "walk", "spec": {"cluster": "walk", "image": "walk", "count": 1}})).await;
    app.post("/v1/jobs", json!({"name": "walk", "spec": {"cluster": "walk", "command": "true"}})).await;
    app.post("/v1/roles", json!({"name": "walk", "spec": {"permissions": []}})).await;
    app.post("/v1/environments", json!({"name": "walk", "spec": {}})).await;
    let router = json!({"environment": "walk", "frontends": [{"name": "web", "mode": "http", "port": 18_098, "backend": "b"}],
        "backends": [{"name": "b", "target": {"service": "walk"}}]});
    assert_eq!(app.post("/v1/routers", json!({"name": "walk", "spec": router})).await.status, StatusCode::CREATED);
    app.send(&app.client, "PUT", "/v1/settings/global/WALK", Some(json!({"value": "1"}))).await;
    let nobody = app.user_with_roles("nobody", &[]).await;
    let viewer = app.user_with_roles("a-viewer", &["viewer"]).await;
    let operator = app.user_with_roles("an-operator", &["operator"]).await;
    let nobody_token = app.get("/v1/users/nobody/tokens").await.body["items"][0]["id"].as_str().unwrap().to_string();

    let doc = app.get("/openapi.json").await.body;
    let mut public = BTreeSet::new();
    let mut walked = 0;
    let mut granted: BTreeMap<String, String> = BTreeMap::new();
    // Transitions last: the walk deletes what it walks them on (admin too).
    let mut operations: Vec<(&String, &String, &Value)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(template, ops)| ops.as_object().unwrap().iter().map(move |(m, op)| (template, m, op)))
        .collect();
    operations.sort_by_key(|(template, _, _)| template.ends_with("/transitions"));
    for (template, method, op) in operations {
        let id = op["operationId"].as_str().unwrap();
        let Some(security) = op.get("security") else {
            public.insert(template.clone());
            continue;
        };
        let scopes: Vec<String> =
            security[0]["bearer"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
        let path = template
            .replace("{kind}", "cluster")
            .replace("{scope}", "global")
            .replace("{key}", "WALK")
            .replace("{version}", "1")
            .replace("{token}", &nobody_token)
            .replace("{id}", if template.starts_with("/v1/transitions/") { &run } else { "walk" });
        let path = if template.starts_with("/v1/users/{id}") { path.replace("/walk", "/nobody") } else { path };
        let path = if id == "setting_diff" { format!("{path}?from=1&to=1") } else { path };
        let body = body_for(id);
        let m = method.to_uppercase();

        let anon = app.send(&app.anonymous, &m, &path, body.clone()).await;
        assert_eq!(anon.status, StatusCode::UNAUTHORIZED, "{m} {path} without a token: {}", anon.body);
        assert_eq!(anon.headers["content-type"], "application/problem+json");
        let bad = app.send(&app.anonymous, &m, &path, body.clone()).await;
        assert!(bad.headers.contains_key("www-authenticate"));

        if scopes.is_empty() {
            // Any authenticated caller.
            let r = app.send(&nobody, &m, &path, body.clone()).await;
            assert_eq!(r.status, StatusCode::OK, "{m} {path}: {}", r.body);
            walked += 1;
            continue;
        }
        // `nobody` may manage its own tokens; walk those as someone else's.
        let denied_path = path.replace("/v1/users/nobody", "/v1/users/admin");
        let denied_path = if denied_path.contains("/tokens/") {
            denied_path.replace(&nobody_token, "00000000-0000-0000-0000-000000000000")
        } else {
            denied_path
        };
        let r = app.send(&nobody, &m, &denied_path, body.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {denied_path} with no permission: {}", r.body);
        assert_eq!(r.body["type"], "/problems/forbidden");

        // The built-in roles against their table, before anyone with the
        // permission changes what the path names: a viewer reads every
        // resource, users and roles included, and changes nothing; an
        // operator does everything but manage users, roles and tokens.
        // Someone else's tokens are for admins alone, even to list.
        let reads = m == "GET";
        let tokens = template.starts_with("/v1/users/{id}/tokens");
        let access_control = template.starts_with("/v1/users") || template.starts_with("/v1/roles");
        for (role, client, allowed) in
            [("viewer", &viewer, reads && !tokens), ("operator", &operator, !tokens && (reads || !access_control))]
        {
            let r = app.send(client, &m, &denied_path, body.clone()).await;
            match allowed {
                true => assert!(
                    r.status != StatusCode::UNAUTHORIZED && r.status != StatusCode::FORBIDDEN,
                    "{m} {denied_path} as {role}: {} {}",
                    r.status,
                    r.body
                ),
                false => assert_eq!(r.status, StatusCode::FORBIDDEN, "{m} {denied_path} as {role}: {}", r.body),
            }
        }

        let wanted = scopes[0]
            .replace("{action}", body.as_ref().and_then(|b| b["action"].as_str()).unwrap_or(""))
            .replace("{kind}", "image");
        let next = granted.len();
        let role = granted.entry(wanted.clone()).or_insert_with(|| format!("p{next}")).clone();
        if granted.len() > next {
            app.role(&role, &[&wanted]).await;
            app.post("/v1/users", json!({"name": format!("{role}-user"), "spec": {"roles": [role]}})).await;
        }
        let token = app.post(&format!("/v1/users/{role}-user/tokens"), json!({"name": "x"})).await;
        assert_eq!(token.status, StatusCode::CREATED, "{}", token.body);
        let holder = client_with(Some(token.body["secret"].as_str().unwrap()));
        let r = app.send(&holder, &m, &denied_path, body.clone()).await;
        assert!(
            r.status != StatusCode::UNAUTHORIZED && r.status != StatusCode::FORBIDDEN,
            "{m} {denied_path} with {wanted}: {} {}",
            r.status,
            r.body
        );
        walked += 1;
    }
    assert_eq!(public, BTreeSet::from(["/healthz".to_string(), "/readyz".to_string()]), "undocumented public routes");
    assert!(walked >= 30, "walked only {walked} operations");
    // The public pages really are public.
    for p in ["/healthz", "/readyz", "/openapi.json", "/docs/"] {
        assert_eq!(app.send(&app.anonymous, "GET", p, None).await.status, StatusCode::OK, "{p}");
    }
}

async fn me(app: &TestApp, client: &reqwest::Client) -> (StatusCode, Value) {
    let r = app.send(client, "GET", "/v1/me", None).await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifecycle() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = app
        .post("/v1/users", json!({"name": "alice", "spec": {"roles": ["operator"], "email": "alice@example.com"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!((r.body["state"].as_str(), r.body["created_by"].as_str()), (Some("active"), Some("admin")));
    let bad = app.post("/v1/users", json!({"name": "bob", "spec": {"roles": ["wizard"]}})).await;
    assert_eq!(
        (bad.status, bad.body["errors"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("spec.roles[0]"))
    );

    let created = app.post("/v1/users/alice/tokens", json!({"name": "laptop"})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.headers["cache-control"], "no-store");
    let secret = created.body["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with(created.body["prefix"].as_str().unwrap()));
    let alice = client_with(Some(&secret));
    let (status, who) = me(&app, &alice).await;
    assert_eq!((status, who["user"].as_str()), (StatusCode::OK, Some("alice")));
    assert!(who["permissions"].as_array().unwrap().contains(&json!("cluster:scale")));

    // Listed without its secret, with its last use.
    let list = app.get("/v1/users/alice/tokens").await.body;
    let listed = &list["items"][0];
    assert_eq!(listed["name"], "laptop");
    assert!(listed.get("secret").is_none() && !list.to_string().contains(&secret));
    assert!(listed["last_used_at"].is_string());

    // What alice does is recorded as hers; what she may not do is refused.
    let r = app
        .send(
            &alice,
            "POST",
            "/v1/images",
            Some(json!({"name": "a", "spec": {"build_command": "true", "start_command": "true"}})),
        )
        .await;
    assert_eq!((r.status, r.body["created_by"].as_str()), (StatusCode::CREATED, Some("alice")));
    let r = app.send(&alice, "POST", "/v1/images/a/transitions", Some(json!({"action": "build"}))).await;
    assert_eq!(r.body["actor"], "alice");
    // An operator reads users, and manages none.
    assert_eq!(app.send(&alice, "GET", "/v1/users", None).await.status, StatusCode::OK);
    let r = app.send(&alice, "POST", "/v1/users", Some(json!({"name": "mallory", "spec": {"roles": ["admin"]}}))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body["detail"].as_str().unwrap().contains("users:admin"));

    // Expiry.
    let past = app.post("/v1/users/alice/tokens", json!({"name": "old", "expires_at": "2000-01-01T00:00:00Z"})).await;
    assert_eq!(past.status, StatusCode::UNPROCESSABLE_ENTITY);
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let short = app.post("/v1/users/alice/tokens", json!({"name": "short", "expires_at": soon})).await;
    assert_eq!(short.status, StatusCode::CREATED, "{}", short.body);
    let short_client = client_with(Some(short.body["secret"].as_str().unwrap()));
    assert_eq!(me(&app, &short_client).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, body) = me(&app, &short_client).await;
    assert_eq!((status, body["detail"].as_str()), (StatusCode::UNAUTHORIZED, Some("token expired")));

    // Disabling the user stops its tokens at once; enabling restores them.
    let run = app.run("user", "alice", json!({"action": "disable", "reason": "left the team"})).await;
    assert_eq!((run["status"].as_str(), run["actor"].as_str()), (Some("succeeded"), Some("admin")));
    assert_eq!(me(&app, &alice).await.0, StatusCode::UNAUTHORIZED);
    app.run("user", "alice", json!({"action": "enable"})).await;
    assert_eq!(me(&app, &alice).await.0, StatusCode::OK);

    // Revocation: at once, recorded with who did it.
    let id = created.body["id"].as_str().unwrap();
    let revoked = app.delete(&format!("/v1/users/alice/tokens/{id}")).await;
    assert_eq!((revoked.status, revoked.body["revoked_by"].as_str()), (StatusCode::OK, Some("admin")));
    let (status, body) = me(&app, &alice).await;
    assert_eq!((status, body["detail"].as_str()), (StatusCode::UNAUTHORIZED, Some("token revoked")));
    assert_eq!(me(&app, &client_with(Some("drv_not_a_real_token"))).await.0, StatusCode::UNAUTHORIZED);

    // Built-in roles cannot be changed or deleted.
    let r = app.patch("/v1/roles/viewer", json!({"spec": {"permissions": ["*"]}}), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = app.post("/v1/roles/admin/transitions", json!({"action": "delete"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

/// A token created under an `Idempotency-Key` and asked for again with the
/// same key (a client that timed out and retried) is the same token: the
/// retry says so (`Idempotent-Replayed`), and carries no secret, which is
/// shown once and never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_token_request_makes_one_token() {
    let app = spawn_app(Backend::Sqlite).await;
    app.post("/v1/users", json!({"name": "alice", "spec": {"roles": ["viewer"]}})).await;
    let body = json!({"name": "ci"});
    let first = app.post_with_key("/v1/users/alice/tokens", body.clone(), "token-1").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let secret = first.body["secret"].as_str().unwrap().to_string();
    assert!(first.headers.get("idempotent-replayed").is_none());

    let again = app.post_with_key("/v1/users/alice/tokens", body, "token-1").await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.body["prefix"], first.body["prefix"]);
    assert!(again.body["secret"].is_null(), "{}", again.body);
    assert!(!again.body.to_string().contains(&secret));

    let tokens = app.get("/v1/users/alice/tokens").await.body;
    assert_eq!(tokens["items"].as_array().unwrap().len(), 1, "{tokens}");
    // The secret works, and was never stored for the replay.
    let (status, _) = me(&app, &client_with(Some(&secret))).await;
    assert_eq!(status, StatusCode::OK);
    for file in ["drover.db", "drover.db-wal"] {
        let stored = std::fs::read(app.data_dir.path().join(file)).unwrap_or_default();
        assert!(!stored.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in {file}");
    }
}
