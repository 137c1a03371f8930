//! Routers through the API, with a real HAProxy on loopback: served from
//! the discovery registry, following a rolling deploy without a failed
//! request, keeping the last good configuration when a render is refused,
//! and holding a backend back from being emptied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use drover_domain::discovery::{NewEntry, Scheme};
use drover_tests::{spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::services::{ok, service};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An image `web` whose instances serve `index.html` holding the build's
/// run id, a cluster of two, and a service `app` of two instances running.
async fn app_running(app: &TestApp) -> String {
    let r = app
        .post(
            "/v1/images",
            json!({"name": "web", "spec": {"build_command": "echo $DROVER_RUN_ID > index.html",
                "start_command": "exec python3 -m http.server $PORT --bind 127.0.0.1"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let build = app.run("image", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    assert_eq!(app.post("/v1/environments", json!({"name": "prod", "spec": {}})).await.status, StatusCode::CREATED);
    let r = app
        .post("/v1/clusters", json!({"name": "c1", "spec": {"image": "web", "count": 2, "environment": "prod"}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "c1", json!({"action": "create"})).await["status"], "succeeded");
    service(
        app,
        "app",
        json!({"cluster": "c1", "image": "web", "count": 2, "health_check": {"type": "http", "path": "/index.html"}}),
    )
    .await;
    ok(app, "app", json!({"action": "start"})).await;
    build
}

/// Requests through the router, about 200 a second, until stopped: how
/// many, which failed (and how), and the bodies seen in order of change.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>, Vec<String>)>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
            let (mut sent, mut failed, mut seen) = (0, Vec::new(), Vec::<String>::new());
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while !done.load(Ordering::SeqCst) {
                tick.tick().await;
                sent += 1;
                match client.get(&url).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let body = r.text().await.unwrap_or_default().trim().to_string();
                        if seen.last() != Some(&body) {
                            seen.push(body);
                        }
                    }
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) => failed.push(format!("error {e}")),
                }
            }
            (sent, failed, seen)
        });
        Load { stop, task }
    }

    async fn finish(self) -> (usize, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

async fn configs(app: &TestApp, router: &str) -> Vec<Value> {
    let r = app.get(&format!("/v1/routers/{router}/configs?limit=100")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["configs"].as_array().unwrap().clone()
}

/// Polls the router's view until `pred` holds (or 10 s).
async fn router_until(app: &TestApp, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    app.get_until(&format!("/v1/routers/{name}"), pred).await
}

/// The servers of `backend` in the newest applied configuration.
fn serving(configs: &[Value], backend: &str) -> Vec<String> {
    let applied = configs.iter().find(|c| c["outcome"] == "applied").expect("an applied configuration");
    let mut names: Vec<String> = applied["servers"][backend]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

async fn registry_instances(app: &TestApp) -> Vec<String> {
    let list = app.get("/v1/discovery/app").await.body;
    let mut names: Vec<String> =
        list["entries"].as_array().unwrap().iter().map(|e| e["instance"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_serves_a_service_through_haproxy_and_follows_a_deploy_without_a_failed_request() {
    let app = spawn_app(Backend::Sqlite).await;
    let b1 = app_running(&app).await;
    let port = free_port();
    let spec = json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": port, "backend": "site",
            "rules": [{"host": "app.example.com", "backend": "site"}, {"path_prefix": "/app", "backend": "site"}]}],
        "backends": [{"name": "site", "target": {"service": "app"}, "check": {"type": "http", "path": "/index.html"}}]});

    // Bad specs are refused, naming the field, and nothing is written.
    for (bad, field) in [
        (
            json!({"frontends": [{"name": "web", "mode": "http", "port": port, "backend": "nope"}]}),
            "spec.frontends[0].backend",
        ),
        (
            json!({"frontends": [{"name": "web", "mode": "http", "port": port,
                "rules": [{"host": "a.example.com", "backend": "site"}, {"host": "a.example.com", "backend": "site"}]}]}),
            "spec.frontends[0].rules[1].host",
        ),
        (json!({"backends": [{"name": "site", "target": {"service": "ghost"}}]}), "spec.backends[0].target.service"),
        (json!({"environment": "nowhere"}), "spec.environment"),
    ] {
        let mut s = spec.clone();
        for (k, v) in bad.as_object().unwrap() {
            s[k] = v.clone();
        }
        let r = app.post("/v1/routers", json!({"name": "edge", "spec": s})).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
        let fields: Vec<&str> =
            r.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert!(fields.contains(&field), "{field} in {}", r.body);
    }
    assert_eq!(app.get("/v1/routers/edge").await.status, StatusCode::NOT_FOUND);

    let r = app.post("/v1/routers", json!({"name": "edge", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // Its port is its own: another router cannot take it.
    let r = app.post("/v1/routers", json!({"name": "edge2", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "spec.frontends[0].port", "{}", r.body);
    assert!(r.body["errors"][0]["message"].as_str().unwrap().contains("router edge"), "{}", r.body);
    let run = app.run("router", "edge", json!({"action": "create", "reason": "first router"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let edge = app.get("/v1/routers/edge").await.body;
    assert_eq!(edge["state"], "up");
    assert_eq!(run["environment"], "prod", "the router's runs carry its environment: {run}");
    assert_eq!(edge["outputs"]["frontends"][0]["url"], format!("http://127.0.0.1:{port}"));

    // HAProxy serves the service's instances: by default, by host, by path.
    let url = format!("http://127.0.0.1:{port}/index.html");
    let body = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert_eq!(body.trim(), b1);
    let by_host = app.client.get(&url).header("host", "APP.example.com:80").send().await.unwrap();
    assert_eq!(by_host.status(), StatusCode::OK);
    let by_path = app.client.get(format!("http://127.0.0.1:{port}/app")).send().await.unwrap();
    assert_eq!(by_path.status(), StatusCode::NOT_FOUND, "python's server has no /app: the request reached it");
    assert!(by_path.headers()["server"].to_str().unwrap().contains("Python"), "{:?}", by_path.headers());

    // The first configuration is a version: applied, by the run, with the
    // registry's instances, and its full text.
    let list = configs(&app, "edge").await;
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!((list[0]["version"].as_i64(), list[0]["outcome"].as_str()), (Some(1), Some("applied")));
    assert_eq!(list[0]["by"], run["id"]);
    assert_eq!(serving(&list, "site"), registry_instances(&app).await);
    assert!(list[0]["diff"].as_str().unwrap().contains("+backend b_site"), "{}", list[0]["diff"]);
    let v1 = app.get("/v1/routers/edge/configs/1").await.body;
    assert!(v1["config"].as_str().unwrap().contains(&format!("bind 127.0.0.1:{port}")), "{v1}");
    assert_eq!(app.get("/v1/routers/edge/configs/99").await.status, StatusCode::NOT_FOUND);
    // HAProxy's own checks see both servers up.
    let edge = router_until(&app, "edge", |r| {
        r["observed"]["servers"].as_array().is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["status"] == "UP"))
    })
    .await;
    assert_eq!(edge["observed"]["status"], "serving", "{edge}");

    // A rolling deploy of the service under load: no request fails, and
    // the responses move from the old build to the new one.
    let b2 = app.run("image", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    let load = Load::start(url.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deploy = app.run("service", "app", json!({"action": "deploy", "reason": "release 2"})).await;
    assert_eq!(deploy["status"], "succeeded", "{deploy}");
    // The router follows the registry.
    let mut list = Vec::new();
    for _ in 0..100 {
        list = configs(&app, "edge").await;
        if serving(&list, "site") == registry_instances(&app).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(serving(&list, "site"), registry_instances(&app).await, "{list:#?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed, seen) = load.finish().await;
    assert!(sent > 200, "{sent}");
    assert!(failed.is_empty(), "{} of {sent} requests failed: {:?}", failed.len(), &failed[..failed.len().min(10)]);
    assert_eq!(seen.first(), Some(&b1), "{seen:?}");
    assert_eq!(seen.last(), Some(&b2), "{seen:?}");
    assert!(list.len() >= 3, "each registry change was a version: {list:#?}");
    assert!(list.iter().all(|c| c["outcome"] == "applied"), "{list:#?}");
    // Rendered by drover's keeper as the registry changed, no run asked.
    let followed = &list[..list.len() - 1];
    assert!(followed.iter().all(|c| c["by"] == "registry" || c["by"] == "observer"), "{list:#?}");

    // A port something else holds: the create fails saying so, the router
    // is failed, and no HAProxy is left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut busy = json!({"environment": "prod", "backends": [{"name": "site", "target": {"service": "app"}}],
        "frontends": [{"name": "web", "mode": "http", "port": taken.local_addr().unwrap().port(), "backend": "site"}]});
    assert_eq!(app.post("/v1/routers", json!({"name": "busy", "spec": busy.take()})).await.status, StatusCode::CREATED);
    let failed = app.run("router", "busy", json!({"action": "create"})).await;
    assert_eq!(
        (failed["status"].as_str(), failed["error"]["code"].as_str()),
        (Some("failed"), Some("start_failed")),
        "{failed}"
    );
    assert!(failed["error"]["message"].as_str().unwrap().contains("cannot bind"), "{failed}");
    assert_eq!(app.get("/v1/routers/busy").await.body["state"], "failed");
    assert_eq!(app.run("router", "busy", json!({"action": "destroy"})).await["status"], "succeeded");

    // Destroy stops HAProxy; the port is free again.
    let pid: i32 = std::fs::read_dir(app.data_dir.path().join("routers"))
        .unwrap()
        .flatten()
        .find_map(|d| std::fs::read_to_string(d.path().join("haproxy.pid")).ok())
        .and_then(|p| p.trim().parse().ok())
        .expect("HAProxy's pid file");
    assert_eq!(app.run("router", "edge", json!({"action": "destroy"})).await["status"], "succeeded");
    assert!(!drover_tests::alive(pid as u64), "HAProxy's master is gone");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "the port is free");
    // Its configurations stay readable while the router is.
    assert_eq!(app.get("/v1/routers/edge/configs").await.status, StatusCode::OK);
}

/// A registry entry HAProxy cannot use (an address that does not
/// resolve) makes a render that fails validation: it is never loaded, the
/// last good configuration serves on, and the router is `degraded` with
/// HAProxy's reason until the entry goes. A render that would empty a
/// backend whose service still runs is held; stopping the service on
/// purpose empties it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_render_keeps_the_last_good_config_and_an_emptying_render_is_held() {
    // The test writes the registry behind the observer's back, as a second
    // writer would (another replica: Postgres tells the server's keeper);
    // the observer, which would put it right within a round, looks once a
    // minute here.
    let mut app = spawn_app(Backend::Postgres).await;
    app.set_observe_every(Duration::from_secs(60)).await;
    let b1 = app_running(&app).await;
    let port = free_port();
    let spec = json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": port, "backend": "site"}],
        "backends": [{"name": "site", "target": {"service": "app"}, "check": {"type": "http", "path": "/index.html"}}]});
    assert_eq!(app.post("/v1/routers", json!({"name": "edge", "spec": spec})).await.status, StatusCode::CREATED);
    assert_eq!(app.run("router", "edge", json!({"action": "create"})).await["status"], "succeeded");
    let url = format!("http://127.0.0.1:{port}/index.html");
    let get = |url: String| async move { reqwest::get(&url).await.map(|r| r.status()).ok() };
    assert_eq!(get(url.clone()).await, Some(StatusCode::OK));

    // The registry's own store, as a second writer would use it.
    let stores = drover_persistence::open(app.database_url()).await.unwrap();
    let svc = app.get("/v1/services/app").await.body;
    let svc_id: uuid::Uuid = svc["id"].as_str().unwrap().parse().unwrap();
    let bogus = NewEntry {
        service_id: svc_id,
        service: "app".into(),
        instance: "9-bogus".into(),
        index: 9,
        machine: "elsewhere".into(),
        address: "no-such-host.invalid".into(),
        port: 8080,
        build: None,
        scheme: Scheme::Http,
        host_port: None,
    };
    let now = Utc::now();
    stores.discovery.discovery_enter(&bogus, "test", "test", now, now + chrono::Duration::hours(1)).await.unwrap();
    let load = Load::start(url.clone());
    let edge = router_until(&app, "edge", |r| r["observed"]["status"] == "degraded").await;
    let summary = edge["observed"]["summary"].as_str().unwrap();
    assert!(summary.contains("no-such-host.invalid") && summary.contains("version 1 serves on"), "{summary}");
    assert_eq!(edge["observed"]["healthy"], false);
    let list = configs(&app, "edge").await;
    assert_eq!(list[0]["outcome"], "invalid", "{list:#?}");
    assert!(list[0]["reason"].as_str().unwrap().contains("no-such-host.invalid"), "{list:#?}");
    assert_eq!(list.iter().filter(|c| c["outcome"] == "invalid").count(), 1, "one record per refusal: {list:#?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(configs(&app, "edge").await.len(), list.len(), "the same refusal is not recorded each round");
    stores.discovery.discovery_leave(svc_id, "9-bogus", "test", "test", Utc::now(), None).await.unwrap();
    let edge = router_until(&app, "edge", |r| r["observed"]["status"] == "serving").await;
    assert_eq!(edge["observed"]["healthy"], true);
    let (sent, failed, seen) = load.finish().await;
    assert!(failed.is_empty(), "{} of {sent} failed while degraded: {failed:?}", failed.len());
    assert_eq!(seen, [b1]);

    // Both entries leave behind the service's back (as when no drover
    // renewed them): the render would empty the backend, so it is held,
    // and the instances keep serving until the observer puts them back.
    let load = Load::start(url.clone());
    let before = configs(&app, "edge").await.len();
    let entries: Vec<NewEntry> =
        stores.discovery.discovery_snapshot(Some(svc_id)).await.unwrap().entries.into_iter().map(|e| e.entry).collect();
    assert_eq!(entries.len(), 2);
    for e in &entries {
        stores.discovery.discovery_leave(svc_id, &e.instance, "lapsed", "sweep", Utc::now(), None).await.unwrap();
    }
    let mut list = Vec::new();
    for _ in 0..100 {
        list = configs(&app, "edge").await;
        if list.iter().take(list.len() - before).any(|c| !c["holds"].as_array().unwrap().is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = list.iter().take(list.len() - before).find(|c| !c["holds"].as_array().unwrap().is_empty());
    let held = held.unwrap_or_else(|| panic!("a hold was recorded: {list:#?}"));
    assert_eq!(held["holds"][0]["backend"], "site");
    assert!(held["holds"][0]["reason"].as_str().unwrap().contains("would be emptied"), "{held}");
    assert!(!held["servers"]["site"].as_array().unwrap().is_empty(), "{held}");
    let edge = router_until(&app, "edge", |r| r["observed"]["status"] == "held").await;
    assert!(edge["observed"]["summary"].as_str().unwrap().contains("would be emptied"), "{edge}");
    // They come back (as the observer would put them back): serving.
    let now = Utc::now();
    for e in &entries {
        stores
            .discovery
            .discovery_enter(e, "healthy", "observer", now, now + chrono::Duration::hours(1))
            .await
            .unwrap();
    }
    router_until(&app, "edge", |r| r["observed"]["status"] == "serving").await;
    assert_eq!(serving(&configs(&app, "edge").await, "site").len(), 2);
    let (sent, failed, _) = load.finish().await;
    assert!(failed.is_empty(), "{} of {sent} failed while held: {failed:?}", failed.len());

    // Stopped on purpose: the backend empties (not held), and HAProxy
    // answers 503.
    assert_eq!(app.run("service", "app", json!({"action": "stop"})).await["status"], "succeeded");
    let mut list = Vec::new();
    for _ in 0..100 {
        list = configs(&app, "edge").await;
        if list[0]["servers"]["site"] == json!([]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((list[0]["outcome"].as_str(), &list[0]["servers"]["site"]), (Some("applied"), &json!([])), "{list:#?}");
    assert!(list[0]["holds"].as_array().unwrap().is_empty(), "{list:#?}");
    assert_eq!(get(url.clone()).await, Some(StatusCode::SERVICE_UNAVAILABLE));
    // Healthy: a backend emptied on purpose is not a dark one. (The first
    // "serving" view may still carry the reloading HAProxy's old servers,
    // down: CI once saw it.)
    router_until(&app, "edge", |r| r["observed"]["status"] == "serving" && r["observed"]["healthy"] == true).await;
}

/// A cluster `name` of two instances of image `web`'s current build, whose
/// instances pass a TCP check (what HAProxy thinks is its own business).
async fn cluster_of(app: &TestApp, name: &str, image: &str) {
    let spec = json!({"image": image, "count": 2, "environment": "prod", "health_check": {"type": "tcp"}});
    let r = app.post("/v1/clusters", json!({"name": name, "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let run = app.run("cluster", name, json!({"action": "create"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

/// Blue/green with swap-back: a swap moves traffic only once HAProxy's own
/// checks pass on every server of the new cluster, fails no request, keeps
/// the old cluster warm as the standby; swap-back is one call that undoes
/// it. A target HAProxy finds unhealthy never gets traffic, and one whose
/// requests fail after the move is swapped back by the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_swaps_gate_on_haproxys_checks_and_swap_back_by_hand_or_by_the_guard() {
    let app = spawn_app(Backend::Sqlite).await;
    let image = |name: &str, start: &str| json!({"name": name, "spec": {"build_command": "echo $DROVER_RUN_ID > index.html", "start_command": start}});
    let serve = "exec python3 -m http.server $PORT --bind 127.0.0.1";
    assert_eq!(app.post("/v1/images", image("web", serve)).await.status, StatusCode::CREATED);
    assert_eq!(app.post("/v1/environments", json!({"name": "prod", "spec": {}})).await.status, StatusCode::CREATED);
    let blue = app.run("image", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    cluster_of(&app, "blue", "web").await;
    let green = app.run("image", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    cluster_of(&app, "green", "web").await;
    // Answers its health check (GET /index.html) and fails every other request.
    let failing = r#"exec python3 -c 'import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/index.html"
        self.send_response(200 if ok else 500); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(b"ok" if ok else b"no")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()'"#;
    assert_eq!(app.post("/v1/images", image("fails", failing)).await.status, StatusCode::CREATED);
    assert_eq!(app.run("image", "fails", json!({"action": "build"})).await["status"], "succeeded");
    cluster_of(&app, "bad", "fails").await;
    // Serves nothing HAProxy's check asks for (404).
    let empty = "mkdir -p empty && exec python3 -m http.server $PORT --bind 127.0.0.1 --directory empty";
    assert_eq!(app.post("/v1/images", image("empty", empty)).await.status, StatusCode::CREATED);
    assert_eq!(app.run("image", "empty", json!({"action": "build"})).await["status"], "succeeded");
    cluster_of(&app, "hollow", "empty").await;

    let port = free_port();
    let spec = json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": port, "backend": "site"}],
        "backends": [{"name": "site", "target": {"cluster": "blue"}, "check": {"type": "http", "path": "/index.html"}}]});
    assert_eq!(app.post("/v1/routers", json!({"name": "edge", "spec": spec})).await.status, StatusCode::CREATED);
    assert_eq!(app.run("router", "edge", json!({"action": "create"})).await["status"], "succeeded");
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(reqwest::get(&url).await.unwrap().text().await.unwrap().trim(), blue);

    // Bad requests name the field.
    for (params, field) in [
        (json!({"backend": "nope", "to": {"cluster": "green"}}), "params.backend"),
        (json!({"backend": "site", "to": {"cluster": "blue"}}), "params.to"),
        (json!({"backend": "site", "to": {"cluster": "green"}, "max_error_rate": 2}), "params.max_error_rate"),
    ] {
        let r = app.post("/v1/routers/edge/transitions", json!({"action": "swap", "params": params})).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{params}: {}", r.body);
        assert!(r.body["errors"].to_string().contains(field), "{field}: {}", r.body);
    }
    let r =
        app.post("/v1/routers/edge/transitions", json!({"action": "swap-back", "params": {"backend": "site"}})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "no standby yet: {}", r.body);

    // The swap: no request fails, and the answers move from blue to green.
    let load = Load::start(url.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let swap = app
        .run(
            "router",
            "edge",
            json!({"action": "swap", "reason": "release 2",
            "params": {"backend": "site", "to": {"cluster": "green"}, "verify_secs": 2}}),
        )
        .await;
    assert_eq!(swap["status"], "succeeded", "{swap}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, failed, seen) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed across the swap: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(seen, [blue.clone(), green.clone()], "one move, blue to green");
    let events = app.get(&format!("/v1/transitions/{}/events", swap["id"].as_str().unwrap())).await.body;
    let steps: Vec<&str> = events["events"].as_array().unwrap().iter().filter_map(|e| e["step"].as_str()).collect();
    let (gate, moved) =
        (steps.iter().rposition(|s| *s == "gate").unwrap(), steps.iter().position(|s| *s == "traffic").unwrap());
    assert!(gate < moved, "HAProxy's checks passed before traffic moved: {steps:?}");
    let edge = app.get("/v1/routers/edge").await.body;
    let site = &edge["spec"]["backends"][0];
    assert_eq!(
        (site["target"].clone(), site["standby"].clone()),
        (json!({"cluster": "green"}), json!({"cluster": "blue"}))
    );
    assert!(site["keep_until"].is_string(), "{site}");
    assert_eq!(edge["outputs"]["swaps"]["site"]["run"], swap["id"]);

    // The standby stays warm: no scale-down, no destroy.
    for body in [json!({"action": "scale", "params": {"count": 1}}), json!({"action": "destroy"})] {
        let r = app.post("/v1/clusters/blue/transitions", body.clone()).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{body}: {}", r.body);
        assert!(r.body["detail"].as_str().unwrap().contains("router/edge (standby of backend site"), "{}", r.body);
    }

    // Swap-back: one call, the inverse run, linked to the swap.
    let load = Load::start(url.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = app
        .run("router", "edge", json!({"action": "swap-back", "params": {"backend": "site", "verify_secs": 1}}))
        .await;
    assert_eq!(back["status"], "succeeded", "{back}");
    assert_eq!(
        (back["params"]["to"].clone(), back["params"]["undoes"].clone()),
        (json!({"cluster": "blue"}), swap["id"].clone())
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, failed, seen) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed across the swap-back: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(seen, [green.clone(), blue.clone()]);
    let site = app.get("/v1/routers/edge").await.body["spec"]["backends"][0].clone();
    assert_eq!(
        (site["target"].clone(), site["standby"].clone()),
        (json!({"cluster": "blue"}), json!({"cluster": "green"}))
    );

    // A target whose servers fail HAProxy's check never gets traffic.
    let load = Load::start(url.clone());
    let refused = app
        .run(
            "router",
            "edge",
            json!({"action": "swap",
            "params": {"backend": "site", "to": {"cluster": "hollow"}, "health_timeout_secs": 3}}),
        )
        .await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "target_unhealthy", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("traffic stays on cluster blue"), "{refused}");
    let (_, failed, seen) = load.finish().await;
    assert!(failed.is_empty() && seen == [blue.clone()], "{failed:?} {seen:?}");
    assert_eq!(
        app.get("/v1/routers/edge").await.body["state"],
        "up",
        "a swap that did not happen leaves the router up"
    );

    // A target whose requests fail after the move: the guard swaps back.
    let load = Load::start(url.clone());
    let guarded = app
        .run(
            "router",
            "edge",
            json!({"action": "swap",
            "params": {"backend": "site", "to": {"cluster": "bad"}, "verify_secs": 20, "max_error_rate": 0.05}}),
        )
        .await;
    assert_eq!(guarded["status"], "failed", "{guarded}");
    assert_eq!(guarded["error"]["code"], "swapped_back", "{guarded}");
    assert!(guarded["error"]["message"].as_str().unwrap().contains("traffic is back on cluster blue"), "{guarded}");
    assert!(guarded["duration_ms"].as_u64().unwrap() < 15_000, "the guard did not wait out its window: {guarded}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, failed, seen) = load.finish().await;
    assert!(!failed.is_empty() && failed.len() < sent / 2, "{} of {sent} failed", failed.len());
    assert_eq!(seen.last(), Some(&blue), "{seen:?}");
    let edge = app.get("/v1/routers/edge").await.body;
    assert_eq!(
        (edge["state"].clone(), edge["spec"]["backends"][0]["target"].clone()),
        (json!("up"), json!({"cluster": "blue"}))
    );
    assert_eq!(reqwest::get(&url).await.unwrap().text().await.unwrap().trim(), blue);
    // The ledger has it all: the stats count swaps and swap-backs.
    let swaps = app.get("/v1/transitions?kind=router&action=swap").await.body;
    assert_eq!(swaps["items"].as_array().unwrap().len(), 3);
    assert_eq!(app.run("router", "edge", json!({"action": "destroy"})).await["status"], "succeeded");
}

/// Refreshes router `edge`; its view after.
async fn refresh(app: &TestApp) -> Value {
    let run = app.run("router", "edge", json!({"action": "refresh"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    app.get("/v1/routers/edge").await.body
}

/// HAProxy's configuration changed on the machine behind drover's back is
/// drift, named and counted; `repair` puts the recorded configuration back
/// (validated and reloaded, as a new version) and the router serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_changed_on_the_machine_is_drift_and_repair_puts_it_back() {
    let app = spawn_app(Backend::Sqlite).await;
    app_running(&app).await;
    let port = free_port();
    let spec = json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": port, "backend": "site"}],
        "backends": [{"name": "site", "target": {"service": "app"}, "check": {"type": "http", "path": "/index.html"}}]});
    let r = app.post("/v1/routers", json!({"name": "edge", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("router", "edge", json!({"action": "create"})).await["status"], "succeeded");
    let view = refresh(&app).await;
    assert_eq!(view["drift"]["status"], "in_sync", "{view}");
    let versions = configs(&app, "edge").await.len();

    // Someone edits the file HAProxy runs from.
    let id = view["id"].as_str().unwrap();
    let file = app.data_dir.path().join("routers").join(id).join("haproxy.cfg");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("# tuned by hand at 3 a.m.\n");
    std::fs::write(&file, text).unwrap();
    let view = refresh(&app).await;
    assert_eq!(view["drift"]["status"], "drifted", "{view}");
    assert_eq!(
        view["drift"]["differences"],
        json!([{"path": "config", "recorded": format!("version {versions}"), "actual": "changed on the machine (1 lines differ)"}])
    );
    assert_eq!(view["state"], "up");
    assert_eq!(configs(&app, "edge").await.len(), versions, "a refresh writes no configuration");

    let run = app.run("router", "edge", json!({"action": "repair", "reason": "undo the hand edit"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(!std::fs::read_to_string(&file).unwrap().contains("tuned by hand"));
    assert_eq!(configs(&app, "edge").await.len(), versions + 1, "the repair is a new version");
    assert_eq!(refresh(&app).await["drift"]["status"], "in_sync");
    let ok = reqwest::get(format!("http://127.0.0.1:{port}/index.html")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}
