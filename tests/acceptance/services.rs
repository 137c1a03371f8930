//! Services on a local cluster: instances are real processes placed on the
//! cluster's machines, started in the order `after` gives.

use drover_ops::local::testing::{Bounds, Sampler};
use drover_tests::{alive, spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{create_image, pids};

/// (index, machine, pid) of a service's instances, from its view.
fn placement(service: &Value) -> Vec<(u64, u64, u64)> {
    service["outputs"]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| (i["index"].as_u64().unwrap(), i["machine"].as_u64().unwrap(), i["pid"].as_u64().unwrap()))
        .collect()
}

fn environ(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).to_string()).collect()
}

pub(super) async fn service(app: &TestApp, name: &str, spec: Value) -> Value {
    let r = app.post("/v1/services", json!({"name": name, "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["state"], "pending");
    r.body
}

pub(super) async fn ok(app: &TestApp, name: &str, body: Value) -> Value {
    let run = app.run("service", name, body).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    app.get(&format!("/v1/services/{name}")).await.body
}

fn fields(r: &drover_tests::Reply) -> Vec<String> {
    r.body["errors"].as_array().into_iter().flatten().map(|e| e["field"].as_str().unwrap().to_string()).collect()
}

pub(super) async fn cluster_of_two(app: &TestApp) -> Value {
    create_image(app, "web", "echo $DROVER_RUN_ID > index.html").await;
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let spec = json!({"image": "web", "count": 2, "role_metadata": "role=worker,disk=ssd"});
    let r = app.post("/v1/clusters", json!({"name": "c1", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "c1", json!({"action": "create"})).await["status"], "succeeded");
    app.get("/v1/clusters/c1").await.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_placed_on_the_clusters_machines_in_order() {
    let app = spawn_app(Backend::Sqlite).await;
    let cluster = cluster_of_two(&app).await;
    let cluster_id = cluster["id"].as_str().unwrap().to_string();
    let put = app
        .client
        .put(app.url("/v1/settings/cluster:c1/GREETING"))
        .json(&json!({"value": "hello", "reason": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    // Bad specs are refused, naming the field, and nothing is written.
    let bad =
        app.post("/v1/services", json!({"name": "x", "spec": {"cluster": "nope", "image": "web", "count": 1}})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(fields(&bad), ["spec.cluster"]);
    assert_eq!(app.get("/v1/services/x").await.status, StatusCode::NOT_FOUND);
    // What depends on the cluster and image as they are is checked when a
    // run is asked for, before anything starts.
    service(&app, "x", json!({"cluster": "c1", "image": "web", "count": 1, "constraints": "role=db"})).await;
    let bad = app.post("/v1/services/x/transitions", json!({"action": "start"})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(fields(&bad), ["spec.constraints"]);
    assert!(bad.body["errors"][0]["message"].as_str().unwrap().contains("role=worker,disk=ssd"), "{}", bad.body);
    let pin = json!({"spec": {"constraints": null, "build": "0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b"}});
    let r = app.patch("/v1/services/x", pin, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let bad = app.post("/v1/services/x/transitions", json!({"action": "start"})).await;
    assert_eq!(fields(&bad), ["spec.build"], "{}", bad.body);
    let x = app.get("/v1/services/x").await.body;
    assert_eq!(x["state"], "pending");
    assert_eq!(x["recent_transitions"], json!([]), "nothing was asked for");
    assert_eq!(app.delete("/v1/services/x").await.status, StatusCode::NO_CONTENT);

    service(&app, "cache", json!({"cluster": "c1", "image": "web", "count": 1, "constraints": "role=worker"})).await;
    let app_spec = json!({"cluster": "c1", "image": "web", "count": 3, "after": ["cache"], "env": {"MODE": "test"}});
    service(&app, "app", app_spec).await;

    // A cycle in `after` is named.
    let r = app.patch("/v1/services/cache", json!({"spec": {"after": ["app"]}}), None).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(fields(&r), ["spec.after[0]"]);
    assert!(r.body["errors"][0]["message"].as_str().unwrap().contains("cache -> app -> cache"), "{}", r.body);

    // `app` waits for `cache` to run.
    let r = app.post("/v1/services/app/transitions", json!({"action": "start"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let cache = ok(&app, "cache", json!({"action": "start"})).await;
    assert_eq!(cache["state"], "running");
    let svc = ok(&app, "app", json!({"action": "start", "reason": "first start"})).await;
    assert_eq!(svc["state"], "running");

    // Three instances with stable indexes, spread fewest-first over the two machines.
    let placed = placement(&svc);
    let machines: Vec<(u64, u64)> = placed.iter().map(|&(i, m, _)| (i, m)).collect();
    assert_eq!(machines, [(0, 0), (1, 1), (2, 0)]);
    let svc_id = svc["id"].as_str().unwrap();
    for &(index, machine, pid) in &placed {
        assert!(alive(pid));
        let env = environ(pid);
        for want in [
            "DROVER_SERVICE=app".to_string(),
            format!("DROVER_INSTANCE={index}"),
            format!("DROVER_MACHINE=c1-{machine}"),
            "GREETING=hello".to_string(),
            "MODE=test".to_string(),
            "DROVER_ROLE_METADATA=role=worker,disk=ssd".to_string(),
        ] {
            assert!(env.contains(&want), "instance {index} lacks {want}: {env:?}");
        }
        // Its working directory is its own copy of the build, under its machine's.
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        let want = format!("clusters/{cluster_id}/machines/{machine}/services/{svc_id}");
        assert!(cwd.parent().unwrap().ends_with(&want), "{cwd:?} is not under {want}");
        assert!(cwd.file_name().unwrap().to_str().unwrap().starts_with(&format!("{index}-")), "{cwd:?}");
        assert!(cwd.join("index.html").exists());
    }
    for i in svc["outputs"]["instances"].as_array().unwrap() {
        let page = app.client.get(format!("{}/index.html", i["url"].as_str().unwrap())).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::OK);
    }
    // The cluster is not destroyed from under its services.
    let r = app.post("/v1/clusters/c1/transitions", json!({"action": "destroy"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.body["used_by"], json!(["service/cache", "service/app"]));

    // A scale down stops the highest indexes; the spec follows.
    let svc = ok(&app, "app", json!({"action": "scale", "params": {"count": 1}})).await;
    assert_eq!(svc["spec"]["count"], 1);
    assert_eq!(placement(&svc), [placed[0]]);
    assert!(!alive(placed[1].2) && !alive(placed[2].2));

    // A machine killed by hand: the observer sees the loss, reports it on
    // the view, and asks for a `place` run itself, which moves the instance
    // to the machine that is left, says so, and stops what was left on the
    // dead machine.
    let svc = ok(&app, "app", json!({"action": "scale", "params": {"count": 2}})).await;
    let before = placement(&svc);
    assert_eq!(before.iter().map(|p| p.1).collect::<Vec<_>>(), [0, 1]);
    let machine1 = pids(&cluster)[1];
    std::process::Command::new("kill").args(["-KILL", &machine1.to_string()]).status().unwrap();
    let run = placed_by_observer(&app, "app").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["reason"].as_str().unwrap().contains("machine c1-1 of instance 1 is gone"), "{run}");
    let svc = app.get("/v1/services/app").await.body;
    assert_eq!(svc["state"], "running");
    let after = placement(&svc);
    assert_eq!(after.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), [(0, 0), (1, 0)]);
    assert_eq!(after[0].2, before[0].2, "instance 0 stays where it was");
    assert!(!alive(before[1].2), "what ran on the dead machine is stopped");
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    let moved = events["events"].as_array().unwrap().iter().any(|e| {
        e["data"]["index"] == 1
            && e["data"]["moved_from"] == "c1-1"
            && e["data"]["machine"] == 0
            && e["data"]["reason"] == "its machine is gone"
    });
    assert!(moved, "{events}");
    // Once placed, nothing more is asked for.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let places = app.get("/v1/transitions?kind=service&resource=app&action=place").await.body;
    assert_eq!(places["items"].as_array().unwrap().len(), 1, "{places}");

    // Stopping the cluster stops the services on its machines with them.
    let running: Vec<u64> = placement(&svc).iter().chain(placement(&cache).iter()).map(|p| p.2).collect();
    assert_eq!(app.run("cluster", "c1", json!({"action": "stop"})).await["status"], "succeeded");
    assert!(running.iter().all(|&p| !alive(p)), "a stopped machine leaves no service instance behind");

    // Stop and destroy the services; then the cluster can go.
    for name in ["app", "cache"] {
        assert_eq!(ok(&app, name, json!({"action": "stop"})).await["state"], "stopped");
        assert_eq!(ok(&app, name, json!({"action": "destroy"})).await["state"], "destroyed");
    }
    assert_eq!(app.run("cluster", "c1", json!({"action": "destroy"})).await["status"], "succeeded");
}

/// Waits for the `place` run the observer asks for on its own, and for it
/// to end.
async fn placed_by_observer(app: &TestApp, name: &str) -> Value {
    let path = format!("/v1/transitions?kind=service&resource={name}&action=place&actor=observer");
    for _ in 0..300 {
        let page = app.get(&path).await.body;
        if let Some(run) = page["items"].as_array().and_then(|i| i.first()) {
            return app.wait(run["id"].as_str().unwrap()).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the observer asked for no place run of {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_service_runs_once_on_every_matching_machine() {
    let app = spawn_app(Backend::Sqlite).await;
    cluster_of_two(&app).await;
    let spec = json!({"cluster": "c1", "image": "web", "global": true, "constraints": "disk=ssd",
        "health_check": {"type": "tcp"}});
    service(&app, "agent", spec).await;
    let svc = ok(&app, "agent", json!({"action": "start"})).await;
    let placed = placement(&svc);
    assert_eq!(placed.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), [(0, 0), (1, 1)]);
    // A scale of a global service is refused: its count is its machines'.
    let r = app.post("/v1/services/agent/transitions", json!({"action": "scale", "params": {"count": 3}})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);

    // The cluster scales up: the observer has the new machine get one, and
    // the two that run stay as they are.
    assert_eq!(
        app.run("cluster", "c1", json!({"action": "scale", "params": {"count": 3}})).await["status"],
        "succeeded"
    );
    let run = placed_by_observer(&app, "agent").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["reason"].as_str().unwrap().contains("c1-2 run no instance"), "{run}");
    let svc = app.get("/v1/services/agent").await.body;
    let grown = placement(&svc);
    assert_eq!(grown.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), [(0, 0), (1, 1), (2, 2)]);
    assert_eq!(&grown[..2], &placed[..], "the instances that ran were left alone");
    let registry = app.get("/v1/discovery/agent").await.body;
    assert_eq!(registry["entries"].as_array().unwrap().len(), 3, "{registry}");

    // And down again: the third machine's instance goes with it, out of
    // the registry, and the service is brought back to two.
    let down = app.run("cluster", "c1", json!({"action": "scale", "params": {"count": 2}})).await;
    assert_eq!(down["status"], "succeeded", "{down}");
    assert!(!alive(grown[2].2), "the removed machine's instance stopped with it");
    // It left the registry before it stopped, by the cluster's run.
    let changes = app.get("/v1/discovery-changes?service=agent").await.body;
    let left = changes["changes"].as_array().unwrap().iter().find(|c| c["change"] == "leave").expect("a leave");
    assert_eq!(left["by"], down["id"], "{changes}");
    assert_eq!(left["reason"], "its machine c1-2 is being removed (the cluster scales down)");
    let mut svc = Value::Null;
    for _ in 0..300 {
        svc = app.get("/v1/services/agent").await.body;
        let runs = app.get("/v1/transitions?kind=service&resource=agent&action=place").await.body;
        let done = runs["items"].as_array().unwrap().len() == 2 && runs["items"][0]["status"] == "succeeded";
        if done && svc["state"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(placement(&svc).iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), [(0, 0), (1, 1)], "{svc}");
    let registry = app.get("/v1/discovery/agent").await.body;
    assert_eq!(registry["entries"].as_array().unwrap().len(), 2, "{registry}");

    assert_eq!(ok(&app, "agent", json!({"action": "destroy"})).await["state"], "destroyed");
    assert!(placed.iter().all(|p| !alive(p.2)));
}

/// Runs a service transition while sampling its instances from outside.
async fn run_sampled(app: &TestApp, svc_id: &str, body: Value) -> (Value, Bounds) {
    let sampler = Sampler::start(app.data_dir.path(), svc_id, Some("/index.html"));
    let run = app.run("service", "app", body).await;
    (run, sampler.finish().await)
}

fn builds(service: &Value) -> Vec<String> {
    let instances = service["outputs"]["instances"].as_array().unwrap();
    instances.iter().map(|i| i["build"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_keeps_its_bounds_and_a_failing_build_is_put_back() {
    let app = spawn_app(Backend::Sqlite).await;
    // Instances take a moment to answer, so that a deploy has moments to sample.
    let start = "sleep 0.3; exec python3 -m http.server $PORT --bind 127.0.0.1";
    let r = app
        .post("/v1/images", json!({"name": "web", "spec": {"build_command": "echo $DROVER_RUN_ID > index.html", "start_command": start}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let b1 = app.run("image", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    let r = app.post("/v1/clusters", json!({"name": "c1", "spec": {"image": "web", "count": 2}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "c1", json!({"action": "create"})).await["status"], "succeeded");
    let svc = service(
        &app,
        "app",
        json!({"cluster": "c1", "image": "web", "count": 4, "health_check": {"type": "http", "path": "/index.html"}}),
    )
    .await;
    let svc_id = svc["id"].as_str().unwrap().to_string();
    let svc = ok(&app, "app", json!({"action": "start"})).await;
    assert_eq!(builds(&svc), [b1.as_str(); 4]);
    let r = app.post("/v1/services/app/transitions", json!({"action": "rollback"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "nothing to roll back to yet: {}", r.body);

    // Deploy the next build: surge-first, one at a time (max_surge 1,
    // max_unavailable 0): never more than 5 instances, never fewer than 4
    // answering.
    let b2 = app.run("image", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    let (run, bounds) = run_sampled(&app, &svc_id, json!({"action": "deploy", "reason": "release 2"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(bounds.samples > 10, "{bounds:?}");
    assert!(bounds.most_alive <= 5, "more than count + max_surge: {bounds:?}");
    assert!(bounds.fewest_healthy >= 4, "fewer than count - max_unavailable healthy: {bounds:?}");
    let svc = app.get("/v1/services/app").await.body;
    assert_eq!(builds(&svc), [b2.as_str(); 4]);
    assert_eq!(svc["outputs"]["previous"], json!({"image": "web", "build": b1}));
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    let plan = events["events"].as_array().unwrap().iter().find(|e| e["step"] == "plan").expect("a plan event");
    assert_eq!(plan["data"]["max_surge"], 1);
    assert_eq!(plan["data"]["indexes"], json!([0, 1, 2, 3]));
    let on_b2 = placement(&svc);

    // A build whose instance 2 never comes up: the deploy replaces 0 and 1,
    // halts at 2, and puts 0 and 1 back on build 2; 2 and 3 never stopped.
    let failing = "if [ \"$DROVER_INSTANCE\" = 2 ]; then echo broken >&2; exit 3; fi; exec python3 -m http.server $PORT --bind 127.0.0.1";
    let r = app.patch("/v1/images/web", json!({"spec": {"start_command": failing}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    app.run("image", "web", json!({"action": "build"})).await;
    let (run, bounds) = run_sampled(&app, &svc_id, json!({"action": "deploy"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "deploy_halted", "{run}");
    assert!(run["error"]["message"].as_str().unwrap().contains("instance 2"), "{run}");
    assert!(bounds.most_alive <= 5 && bounds.fewest_healthy >= 4, "{bounds:?}");
    let svc = app.get("/v1/services/app").await.body;
    assert_eq!(svc["state"], "failed");
    let now: Vec<(u64, u64, u64)> = placement(&svc);
    let live = std::fs::read(app.data_dir.path().join("services").join(&svc_id).join("instances.json")).unwrap();
    let live: Value = serde_json::from_slice(&live).unwrap();
    let on_record: Vec<(u64, String, u64)> = live["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["index"].as_u64().unwrap(), i["build"].as_str().unwrap().to_string(), i["pid"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        on_record.iter().map(|i| (i.0, i.1.as_str())).collect::<Vec<_>>(),
        [(0, b2.as_str()), (1, b2.as_str()), (2, b2.as_str()), (3, b2.as_str())]
    );
    assert!(on_record.iter().all(|i| alive(i.2)));
    assert_eq!((on_record[2].2, on_record[3].2), (on_b2[2].2, on_b2[3].2), "2 and 3 were never stopped");
    assert_ne!((on_record[0].2, on_record[1].2), (on_b2[0].2, on_b2[1].2), "0 and 1 were replaced and put back");
    let _ = now;

    // Roll back to the build before the last successful deploy: build 1.
    let (run, bounds) = run_sampled(&app, &svc_id, json!({"action": "rollback", "reason": "back to 1"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["params"], json!({"image": "web", "build": b1}), "the run records what it went back to");
    assert!(bounds.most_alive <= 5 && bounds.fewest_healthy >= 4, "{bounds:?}");
    let svc = app.get("/v1/services/app").await.body;
    assert_eq!((svc["state"].as_str(), svc["spec"]["build"].as_str()), (Some("running"), Some(b1.as_str())));
    assert_eq!(builds(&svc), [b1.as_str(); 4]);
    assert_eq!(svc["outputs"]["previous"], json!({"image": "web", "build": b2}), "a second rollback swaps back");

    // A restart replaces every process, same build, same gates.
    let before = placement(&svc);
    let (run, bounds) = run_sampled(&app, &svc_id, json!({"action": "restart"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(bounds.most_alive <= 5 && bounds.fewest_healthy >= 4, "{bounds:?}");
    let svc = app.get("/v1/services/app").await.body;
    assert_eq!(builds(&svc), [b1.as_str(); 4]);
    let after = placement(&svc);
    assert!(before.iter().zip(&after).all(|(b, a)| b.0 == a.0 && b.2 != a.2 && !alive(b.2)), "{before:?} {after:?}");

    // Stop and start: the build that ran last runs again, not the image's
    // current one (the broken build 3): only a deploy changes the build.
    assert_eq!(ok(&app, "app", json!({"action": "stop"})).await["state"], "stopped");
    let svc = ok(&app, "app", json!({"action": "start"})).await;
    assert_eq!(builds(&svc), [b1.as_str(); 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_starts_a_clusters_services_in_order() {
    let app = spawn_app(Backend::Sqlite).await;
    let cluster = cluster_of_two(&app).await;
    // Declared in an order other than the one they start in.
    service(&app, "db", json!({"cluster": "c1", "image": "web", "count": 1})).await;
    service(&app, "app", json!({"cluster": "c1", "image": "web", "count": 2, "after": ["db"]})).await;
    service(&app, "cache", json!({"cluster": "c1", "image": "web", "count": 1, "after": ["db"]})).await;
    let r = app.patch("/v1/services/app", json!({"spec": {"after": ["cache"]}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    service(&app, "agent", json!({"cluster": "c1", "image": "web", "global": true})).await;

    let run = app.run("cluster", "c1", json!({"action": "initialize", "reason": "bring up"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let c1 = app.get("/v1/clusters/c1").await.body;
    assert_eq!(c1["state"], "up");
    assert_eq!(c1["outputs"], cluster["outputs"], "the cluster's own outputs stay");

    // One child run per service, each a start asked for by the initialize.
    let children = app.get(&format!("/v1/transitions?parent={}", run["id"].as_str().unwrap())).await.body;
    let children = children["items"].as_array().unwrap().clone();
    let by_name =
        |n: &str| children.iter().find(|c| c["resource"]["name"] == n).unwrap_or_else(|| panic!("{n}: {children:?}"));
    assert_eq!(children.len(), 4, "{children:?}");
    for c in &children {
        assert_eq!((c["action"].as_str(), c["status"].as_str()), (Some("start"), Some("succeeded")), "{c}");
        assert_eq!(c["reason"], "initialize of cluster c1");
        assert_eq!(c["actor"], run["actor"]);
    }
    // Each starts only once what it waits for is running (healthy).
    let at = |c: &Value, f: &str| chrono::DateTime::parse_from_rfc3339(c[f].as_str().unwrap()).unwrap();
    assert!(at(by_name("cache"), "started_at") >= at(by_name("db"), "finished_at"));
    assert!(at(by_name("app"), "started_at") >= at(by_name("cache"), "finished_at"));
    for name in ["db", "cache", "app", "agent"] {
        assert_eq!(app.get(&format!("/v1/services/{name}")).await.body["state"], "running", "{name}");
    }
    // The instances' start times say the same.
    let mut first = Vec::new();
    for name in ["db", "cache", "app"] {
        let s = app.get(&format!("/v1/services/{name}")).await.body;
        let times = s["outputs"]["instances"].as_array().unwrap().iter().map(|i| at(i, "started_at"));
        first.push(times.min().unwrap());
    }
    assert!(first[0] < first[1] && first[1] < first[2], "{first:?}");

    // Again: everything runs, nothing is asked for.
    let again = app.run("cluster", "c1", json!({"action": "initialize"})).await;
    assert_eq!(again["status"], "succeeded", "{again}");
    let none = app.get(&format!("/v1/transitions?parent={}", again["id"].as_str().unwrap())).await.body;
    assert_eq!(none["items"], json!([]));

    // A service that fails to start fails the initialize, naming it; the
    // cluster stays up, and what started before it runs.
    assert_eq!(ok(&app, "app", json!({"action": "stop"})).await["state"], "stopped");
    let r = app.patch("/v1/services/app", json!({"spec": {"command": "echo no-such-thing >&2; exit 4"}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let failed = app.run("cluster", "c1", json!({"action": "initialize"})).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "child_failed");
    assert!(failed["error"]["message"].as_str().unwrap().starts_with("service app: start failed"), "{failed}");
    assert_eq!(app.get("/v1/clusters/c1").await.body["state"], "up");
    assert_eq!(app.get("/v1/services/app").await.body["state"], "failed");
    assert_eq!(app.get("/v1/services/db").await.body["state"], "running");
}
