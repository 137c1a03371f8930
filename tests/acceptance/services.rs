//! Services on a local cluster: instances are real processes placed on the
//! cluster's machines, started in the order `after` gives.

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

async fn service(app: &TestApp, name: &str, spec: Value) -> Value {
    let r = app.post("/v1/services", json!({"name": name, "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["state"], "pending");
    r.body
}

async fn ok(app: &TestApp, name: &str, body: Value) -> Value {
    let run = app.run("service", name, body).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    app.get(&format!("/v1/services/{name}")).await.body
}

fn fields(r: &drover_tests::Reply) -> Vec<String> {
    r.body["errors"].as_array().into_iter().flatten().map(|e| e["field"].as_str().unwrap().to_string()).collect()
}

async fn cluster_of_two(app: &TestApp) -> Value {
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
    let bad = app
        .post(
            "/v1/services",
            json!({"name": "x", "spec": {"cluster": "c1", "image": "web", "count": 1, "constraints": "role=db"}}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert_eq!(fields(&bad), ["spec.constraints"]);
    assert!(bad.body["errors"][0]["message"].as_str().unwrap().contains("role=worker,disk=ssd"), "{}", bad.body);
    let bad = app
        .post("/v1/services", json!({"name": "x", "spec": {"cluster": "c1", "image": "web", "build": "0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b", "count": 1}}))
        .await;
    assert_eq!(fields(&bad), ["spec.build"]);
    assert_eq!(app.get("/v1/services/x").await.status, StatusCode::NOT_FOUND);

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
        let want = format!("clusters/{cluster_id}/machines/{machine}/services/{svc_id}/{index}");
        assert!(cwd.ends_with(&want), "{cwd:?} is not under {want}");
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

    // A machine killed by hand: the next action places its instances
    // elsewhere, says so, and stops what was left on the dead machine.
    let svc = ok(&app, "app", json!({"action": "scale", "params": {"count": 2}})).await;
    let before = placement(&svc);
    assert_eq!(before.iter().map(|p| p.1).collect::<Vec<_>>(), [0, 1]);
    let machine1 = pids(&cluster)[1];
    std::process::Command::new("kill").args(["-KILL", &machine1.to_string()]).status().unwrap();
    for _ in 0..50 {
        if !alive(machine1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let run = app.run("service", "app", json!({"action": "scale", "params": {"count": 2}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let svc = app.get("/v1/services/app").await.body;
    let after = placement(&svc);
    assert_eq!(after.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), [(0, 0), (1, 0)]);
    assert_eq!(after[0].2, before[0].2, "instance 0 stays where it was");
    assert!(!alive(before[1].2), "what ran on the dead machine is stopped");
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    let moved = events["events"].as_array().unwrap().iter().any(|e| {
        e["data"]["index"] == 1
            && e["data"]["moved_from"] == 1
            && e["data"]["machine"] == 0
            && e["data"]["reason"] == "its machine is gone"
    });
    assert!(moved, "{events}");

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
    assert_eq!(ok(&app, "agent", json!({"action": "destroy"})).await["state"], "destroyed");
    assert!(placed.iter().all(|p| !alive(p.2)));
}
