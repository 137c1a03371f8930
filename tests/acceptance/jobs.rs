//! Jobs: a one-shot command on a local cluster's machines, with per-target
//! results, bounds on failures and time, cancel, and masked secrets.

use drover_tests::{alive, spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::create_image;

async fn cluster_of_three(app: &TestApp) {
    create_image(app, "web", "echo built > index.html").await;
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let spec = json!({"image": "web", "count": 3, "role_metadata": "role=worker"});
    let r = app.post("/v1/clusters", json!({"name": "c1", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "c1", json!({"action": "create"})).await["status"], "succeeded");
}

async fn job(app: &TestApp, name: &str, spec: Value) {
    let r = app.post("/v1/jobs", json!({"name": name, "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["state"], "ready");
}

fn results(v: &Value) -> Vec<Value> {
    v["results"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_once_on_each_matching_machine() {
    let app = spawn_app(Backend::Sqlite).await;
    cluster_of_three(&app).await;
    let put = app
        .client
        .put(app.url("/v1/settings/cluster:c1/DB_PASSWORD"))
        .json(&json!({"value": "hunter2", "secret": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    // On every machine, in a copy of the image's build, with the cluster's
    // settings; the secret never shows in what is reported.
    let cmd = "echo \"on $DROVER_MACHINE pw=$DB_PASSWORD\"; cat index.html; echo warned >&2";
    job(&app, "report", json!({"cluster": "c1", "command": cmd, "image": "web", "constraints": "role=worker"})).await;
    let run = app.run("job", "report", json!({"action": "run", "reason": "audit"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let view = app.get("/v1/jobs/report").await.body;
    assert_eq!(view["state"], "ready");
    assert_eq!((view["outputs"]["targets"].as_u64(), view["outputs"]["succeeded"].as_u64()), (Some(3), Some(3)));
    let mut machines: Vec<String> =
        results(&view["outputs"]).iter().map(|r| r["machine_name"].as_str().unwrap().into()).collect();
    machines.sort();
    assert_eq!(machines, ["c1-0", "c1-1", "c1-2"]);
    for r in results(&view["outputs"]) {
        assert_eq!((r["status"].as_str(), r["exit_code"].as_i64()), (Some("succeeded"), Some(0)), "{r}");
        let name = r["machine_name"].as_str().unwrap();
        assert_eq!(r["stdout_tail"], json!([format!("on {name} pw=***"), "built"]), "{r}");
        assert_eq!(r["stderr_tail"], json!(["warned"]));
        assert!(r["duration_ms"].is_u64());
    }
    assert!(!view.to_string().contains("hunter2"));
    let events = app.get(&format!("/v1/transitions/{}/events", run["id"].as_str().unwrap())).await.body;
    assert!(!events.to_string().contains("hunter2"), "{events}");
    let ended: Vec<&Value> =
        events["events"].as_array().unwrap().iter().filter(|e| e["data"]["status"] == "succeeded").collect();
    assert_eq!(ended.len(), 3, "one event per target: {events}");

    // `once`: one machine.
    job(&app, "migrate", json!({"cluster": "c1", "command": "echo migrated", "target": "once"})).await;
    let run = app.run("job", "migrate", json!({"action": "run"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(results(&app.get("/v1/jobs/migrate").await.body["outputs"]).len(), 1);

    // No machine matches: refused before anything runs.
    job(&app, "db-only", json!({"cluster": "c1", "command": "true", "constraints": "role=db"})).await;
    let r = app.post("/v1/jobs/db-only/transitions", json!({"action": "run"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(r.body["errors"][0]["field"], "spec.constraints");

    // Running one takes job:run; reading it does not.
    app.role("job-reader", &["job:read"]).await;
    let reader = app.user_with_roles("reader", &["job-reader"]).await;
    assert_eq!(app.send(&reader, "GET", "/v1/jobs/report", None).await.status, StatusCode::OK);
    let r = app.send(&reader, "POST", "/v1/jobs/report/transitions", Some(json!({"action": "run"}))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("job:run"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_time_outs_and_cancel_are_bounded() {
    let app = spawn_app(Backend::Sqlite).await;
    cluster_of_three(&app).await;

    // One machine fails: with max_errors 0 the run fails, naming it, with
    // every target's result; concurrency 1 means the last never starts.
    let cmd = "if [ \"$DROVER_MACHINE\" = c1-1 ]; then echo disk full >&2; exit 7; fi; echo ok";
    job(&app, "clean", json!({"cluster": "c1", "command": cmd, "max_concurrency": 1})).await;
    let run = app.run("job", "clean", json!({"action": "run"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "job_failed");
    assert!(run["error"]["message"].as_str().unwrap().contains("c1-1 (failed)"), "{run}");
    let by: Vec<(String, String)> = results(&run["error"]["detail"])
        .iter()
        .map(|r| (r["machine_name"].as_str().unwrap().into(), r["status"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        by,
        [("c1-0".into(), "succeeded".into()), ("c1-1".into(), "failed".into()), ("c1-2".into(), "skipped".into())]
    );
    let failed = &results(&run["error"]["detail"])[1];
    assert_eq!((failed["exit_code"].as_i64(), &failed["stderr_tail"]), (Some(7), &json!(["disk full"])));
    assert_eq!(app.get("/v1/jobs/clean").await.body["state"], "failed");
    // Tolerating one failure, it succeeds, and says what failed.
    let r = app.patch("/v1/jobs/clean", json!({"spec": {"max_errors": 1}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let run = app.run("job", "clean", json!({"action": "run"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!((run["outputs"]["failed"].as_u64(), run["outputs"]["succeeded"].as_u64()), (Some(1), Some(2)));

    // A target past its timeout is stopped, and counts as failed.
    job(&app, "slow", json!({"cluster": "c1", "command": "sleep 30", "timeout_secs": 1, "target": "once"})).await;
    let run = app.run("job", "slow", json!({"action": "run"})).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(results(&run["error"]["detail"])[0]["status"], "timed_out");

    // Cancel stops every target under way.
    job(&app, "long", json!({"cluster": "c1", "command": "sleep 60"})).await;
    let id = app.transition("job", "long", json!({"action": "run"})).await;
    let pids = loop {
        let events = app.get(&format!("/v1/transitions/{id}/events")).await.body;
        let started: Vec<u64> = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["message"].as_str().and_then(|m| m.split("(pid ").nth(1)))
            .filter_map(|p| p.trim_end_matches(')').parse().ok())
            .collect();
        if started.len() == 3 {
            break started;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let r = app.post(&format!("/v1/transitions/{id}/cancel"), json!({"reason": "wrong night"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(app.wait(&id).await["status"], "cancelled");
    assert!(pids.iter().all(|&p| !alive(p)), "{pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_groups_lend_their_machines_to_the_leaders_jobs_and_services() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "echo built > index.html").await;
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let leader = json!({"image": "web", "count": 1, "role_metadata": "role=leader"});
    assert_eq!(app.post("/v1/clusters", json!({"name": "c1", "spec": leader})).await.status, StatusCode::CREATED);
    let workers = json!({"image": "web", "count": 2, "join": "c1", "role_metadata": "role=worker,disk=ssd"});
    assert_eq!(app.post("/v1/clusters", json!({"name": "w1", "spec": workers})).await.status, StatusCode::CREATED);
    // A worker group needs its leader up.
    let r = app.post("/v1/clusters/w1/transitions", json!({"action": "create"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(app.run("cluster", "c1", json!({"action": "create"})).await["status"], "succeeded");
    assert_eq!(app.run("cluster", "w1", json!({"action": "create"})).await["status"], "succeeded");
    // Joins may not go round.
    let r = app.patch("/v1/clusters/c1", json!({"spec": {"join": "w1"}}), None).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body["errors"][0]["message"].as_str().unwrap().contains("c1 -> w1 -> c1"), "{}", r.body);

    // A job of the leader with the workers' role runs on the workers only.
    let cmd = "echo $DROVER_MACHINE $DROVER_ROLE_METADATA";
    job(&app, "warm", json!({"cluster": "c1", "command": cmd, "constraints": "role=worker"})).await;
    let run = app.run("job", "warm", json!({"action": "run"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let mut out: Vec<String> =
        results(&run["outputs"]).iter().map(|r| r["stdout_tail"][0].as_str().unwrap().to_string()).collect();
    out.sort();
    assert_eq!(out, ["w1-0 role=worker,disk=ssd", "w1-1 role=worker,disk=ssd"]);
    // Without constraints: every machine of the leader and its workers.
    job(&app, "all", json!({"cluster": "c1", "command": "true"})).await;
    let run = app.run("job", "all", json!({"action": "run"})).await;
    let mut names: Vec<String> =
        results(&run["outputs"]).iter().map(|r| r["machine_name"].as_str().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(names, ["c1-0", "w1-0", "w1-1"]);
    // Constraints nothing carries are refused before anything runs, naming what the machines carry.
    job(&app, "none", json!({"cluster": "c1", "command": "true", "constraints": "disk=hdd"})).await;
    let r = app.post("/v1/jobs/none/transitions", json!({"action": "run"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    let why = r.body["errors"][0]["message"].as_str().unwrap();
    assert!(why.contains("c1: role=leader") && why.contains("w1: role=worker,disk=ssd"), "{why}");

    // A global service with the workers' role: one instance on each worker.
    let spec = json!({"cluster": "c1", "image": "web", "global": true, "constraints": "role=worker"});
    assert_eq!(app.post("/v1/services", json!({"name": "agent", "spec": spec})).await.status, StatusCode::CREATED);
    let run = app.run("service", "agent", json!({"action": "start"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let svc = app.get("/v1/services/agent").await.body;
    let instances = svc["outputs"]["instances"].as_array().unwrap().clone();
    let placed: Vec<(u64, &str)> =
        instances.iter().map(|i| (i["index"].as_u64().unwrap(), i["machine_name"].as_str().unwrap())).collect();
    assert_eq!(placed, [(0, "w1-0"), (1, "w1-1")]);
    // Stopping the worker group stops what runs on its machines.
    let pids: Vec<u64> = instances.iter().map(|i| i["pid"].as_u64().unwrap()).collect();
    assert!(pids.iter().all(|&p| alive(p)));
    assert_eq!(app.run("cluster", "w1", json!({"action": "stop"})).await["status"], "succeeded");
    assert!(pids.iter().all(|&p| !alive(p)), "{pids:?}");
}
