//! Every build of an image is an immutable artifact: a rebuild never
//! touches the instances running from an earlier one.

use drover_tests::{alive, spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{create_image, instance_pages, pids};

fn builds_of(image: &Value) -> Vec<(String, bool)> {
    image["outputs"]["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .map(|b| (b["id"].as_str().unwrap().to_string(), b["current"].as_bool().unwrap()))
        .collect()
}

fn instance_builds(cluster: &Value) -> Vec<String> {
    cluster["outputs"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["build"].as_str().unwrap().to_string())
        .collect()
}

async fn build(app: &TestApp) -> (String, String) {
    let run = app.run("image", "web", json!({"action": "build"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let image = app.get("/v1/images/web").await.body;
    (run["id"].as_str().unwrap().to_string(), image["outputs"]["path"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_never_touches_running_instances() {
    let app = spawn_app(Backend::Sqlite).await;
    // Each build's page is the id of the run that built it.
    create_image(&app, "web", "echo $DROVER_RUN_ID > index.html").await;
    let (b1, dir1) = build(&app).await;
    let r = app.post("/v1/clusters", json!({"name": "web-qa", "spec": {"image": "web", "count": 2}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "web-qa", json!({"action": "create"})).await["status"], "succeeded");
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!(instance_builds(&cluster), [b1.clone(), b1.clone()]);
    let running = pids(&cluster);

    // A rebuild makes a second build, current, and leaves the first alone.
    let (b2, dir2) = build(&app).await;
    assert_ne!(dir1, dir2);
    let image = app.get("/v1/images/web").await.body;
    assert_eq!(image["outputs"]["build"], b2.as_str());
    assert_eq!(builds_of(&image), [(b2.clone(), true), (b1.clone(), false)]);
    assert!(std::path::Path::new(&dir1).join("index.html").exists(), "the first build is still there");
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!(pids(&cluster), running);
    assert!(running.iter().all(|&p| alive(p)));
    assert_eq!(instance_pages(&app, &cluster).await, [b1.clone(), b1.clone()], "still served from the first build");

    // The next scale starts its new instance from the current build, and
    // says so; the others keep theirs.
    let scale = app.run("cluster", "web-qa", json!({"action": "scale", "params": {"count": 3}})).await;
    assert_eq!(scale["status"], "succeeded", "{scale}");
    let cluster = app.get("/v1/clusters/web-qa").await.body;
    assert_eq!(instance_builds(&cluster), [b1.clone(), b1.clone(), b2.clone()]);
    assert_eq!(instance_pages(&app, &cluster).await, [b1.clone(), b1.clone(), b2.clone()]);
    let events = app.get(&format!("/v1/transitions/{}/events", scale["id"].as_str().unwrap())).await.body;
    let said = events["events"].as_array().unwrap().iter().any(|e| {
        e["message"].as_str().unwrap().contains(&format!("started instance 2 from build {b2}"))
            && e["data"]["build"] == b2.as_str()
    });
    assert!(said, "{events}");

    // Nothing destroys the image while anything runs from it: not even a
    // cluster whose spec has moved to another image but still runs this one.
    create_image(&app, "other", "true").await;
    let r = app.patch("/v1/clusters/web-qa", json!({"spec": {"image": "other"}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = app.post("/v1/images/web/transitions", json!({"action": "destroy"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["used_by"], json!(["cluster/web-qa"]));
    let r = app.patch("/v1/clusters/web-qa", json!({"spec": {"image": "web"}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // A third build removes nothing: the first two run.
    let (b3, _) = build(&app).await;
    let image = app.get("/v1/images/web").await.body;
    assert_eq!(builds_of(&image), [(b3.clone(), true), (b2.clone(), false), (b1.clone(), false)]);

    // Once nothing runs from them, the next build removes the old builds,
    // all but the one current until then.
    assert_eq!(app.run("cluster", "web-qa", json!({"action": "stop"})).await["status"], "succeeded");
    let (b4, _) = build(&app).await;
    let image = app.get("/v1/images/web").await.body;
    assert_eq!(builds_of(&image), [(b4, true), (b3, false)]);
    assert!(!std::path::Path::new(&dir1).exists() && !std::path::Path::new(&dir2).exists());

    // With nothing running, the image goes, every build with it.
    assert_eq!(app.run("cluster", "web-qa", json!({"action": "destroy"})).await["status"], "succeeded");
    assert_eq!(app.run("image", "web", json!({"action": "destroy"})).await["status"], "succeeded");
    let builds_dir = std::path::Path::new(&dir1).parent().unwrap().to_path_buf();
    assert!(!builds_dir.exists(), "{} is left", builds_dir.display());
}

/// A rebuild that fails, or is cancelled, leaves the image built on its
/// current build: clusters go on scaling from it, and the view says what
/// failed. A rebuild under way does not hold them up either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rebuild_keeps_the_current_build() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "echo $DROVER_RUN_ID > index.html").await;
    let (b1, _) = build(&app).await;
    let r = app.post("/v1/clusters", json!({"name": "web-qa", "spec": {"image": "web", "count": 1}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "web-qa", json!({"action": "create"})).await["status"], "succeeded");

    // A broken commit: the rebuild fails; the image stays built on b1.
    let r = app.patch("/v1/images/web", json!({"spec": {"build_command": "echo 'fatal: broken' >&2; exit 2"}}), None);
    assert_eq!(r.await.status, StatusCode::OK);
    let failed = app.run("image", "web", json!({"action": "build", "reason": "the broken commit"})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let image = app.get("/v1/images/web").await.body;
    assert_eq!((&image["state"], &image["outputs"]["build"]), (&json!("built"), &json!(b1)), "{image}");
    let summary = image["problem"]["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("the last build failed (") && summary.ends_with("it stays built"), "{image}");
    assert!(summary.contains("broken"), "{image}");
    assert_eq!(image["problem"]["transition"], failed["id"]);

    // Scaling at 3 a.m. still works, from the build that is current.
    let scale = app.run("cluster", "web-qa", json!({"action": "scale", "params": {"count": 2}})).await;
    assert_eq!(scale["status"], "succeeded", "{scale}");
    assert_eq!(instance_builds(&app.get("/v1/clusters/web-qa").await.body), [b1.clone(), b1.clone()]);

    // While a (slow) rebuild runs, the image is usable too; cancelled, it
    // stays built.
    let r = app.patch("/v1/images/web", json!({"spec": {"build_command": "sleep 30"}}), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let slow = app.transition("image", "web", json!({"action": "build"})).await;
    app.get_until(&format!("/v1/transitions/{slow}"), |t| t["status"] == "running").await;
    let scale = app.run("cluster", "web-qa", json!({"action": "scale", "params": {"count": 1}})).await;
    assert_eq!(scale["status"], "succeeded", "a rebuild under way does not hold the cluster up: {scale}");
    let r = app.post(&format!("/v1/transitions/{slow}/cancel"), json!({"reason": "wrong branch"})).await;
    assert!(r.status.is_success(), "{}", r.body);
    assert_eq!(app.wait(&slow).await["status"], "cancelled");
    let image = app.get("/v1/images/web").await.body;
    assert_eq!((&image["state"], &image["outputs"]["build"]), (&json!("built"), &json!(b1)), "{image}");

    // Fixed, it builds again, as a new build.
    let r = app.patch("/v1/images/web", json!({"spec": {"build_command": "echo $DROVER_RUN_ID > index.html"}}), None);
    assert_eq!(r.await.status, StatusCode::OK);
    let (b3, _) = build(&app).await;
    let image = app.get("/v1/images/web").await.body;
    assert_eq!((&image["outputs"]["build"], &image["problem"]), (&json!(b3), &Value::Null), "{image}");
}
