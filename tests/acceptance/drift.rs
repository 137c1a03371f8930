//! Drift: a refresh compares what runs with the record and changes
//! nothing; `repair` makes reality match the record again.

use drover_tests::{alive, spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{create_image, pids};

async fn refresh(app: &TestApp, kind: &str, name: &str) -> Value {
    let run = app.run(kind, name, json!({"action": "refresh", "reason": "a look"})).await;
    assert_eq!(run["status"], "succeeded", "a refresh succeeds whatever it finds: {run}");
    let plural = format!("{kind}s");
    let view = app.get(&format!("/v1/{plural}/{name}")).await.body;
    assert_eq!(view["drift"]["run"], run["id"], "the view shows this refresh's finding: {view}");
    view
}

/// Kills a process group by hand, as `kill -9 -PGID` would, and waits
/// until its leader is gone.
async fn kill_group(pid: u64) {
    let killed = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status().unwrap();
    assert!(killed.success());
    while alive(pid) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_drift_and_repair_starts_it_again() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "echo drift > index.html").await;
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let r = app.post("/v1/clusters", json!({"name": "web-qa", "spec": {"image": "web", "count": 2}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "web-qa", json!({"action": "create"})).await["status"], "succeeded");
    let before = app.get("/v1/clusters/web-qa").await.body;
    assert!(before["drift"].is_null(), "no drift before a refresh");

    // In sync: every attribute checked and as recorded; nothing changed.
    let view = refresh(&app, "cluster", "web-qa").await;
    assert_eq!(view["drift"]["status"], "in_sync", "{view}");
    assert_eq!(view["drift"]["differences"], json!([]));
    assert_eq!(view["state"], "up");
    assert_eq!(view["outputs"], before["outputs"], "a refresh leaves the outputs alone");
    assert_eq!(view["spec_version"], before["spec_version"]);

    // An instance killed by hand is found, named by its path.
    let gone = pids(&before)[1];
    // Its whole process group, as `kill -9 -PGID` by hand would.
    kill_group(gone).await;
    let view = refresh(&app, "cluster", "web-qa").await;
    assert_eq!(view["drift"]["status"], "drifted", "{view}");
    assert_eq!(
        view["drift"]["differences"],
        json!([{"path": "instances[1].process", "recorded": format!("running (pid {gone})"), "actual": "gone",
            "adopt": {"count": 1}}])
    );
    assert_eq!(view["state"], "up", "a refresh does not change the state");
    let text = app.get_text("/v1/clusters/web-qa", "text/plain").await;
    assert!(text.contains("drift      drifted: instances[1].process: recorded"), "{text}");

    // Repair starts it again from the build it ran, on its port.
    let run = app.run("cluster", "web-qa", json!({"action": "repair", "reason": "instance 1 died"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let after = app.get("/v1/clusters/web-qa").await.body;
    let (old, new) = (&before["outputs"]["instances"][1], &after["outputs"]["instances"][1]);
    assert_ne!(new["pid"], old["pid"]);
    assert_eq!((&new["port"], &new["build"]), (&old["port"], &old["build"]));
    assert_eq!(after["outputs"]["instances"][0]["pid"], before["outputs"]["instances"][0]["pid"], "left as it ran");
    let view = refresh(&app, "cluster", "web-qa").await;
    assert_eq!(view["drift"]["status"], "in_sync", "{view}");

    // Every refresh is a run in the ledger, and nothing else ran.
    let runs = app.get("/v1/transitions?kind=cluster&action=refresh").await.body;
    assert_eq!(runs["items"].as_array().unwrap().len(), 3);

    // A count asked for and not yet scaled to is pending, not missing.
    let r = app.patch("/v1/clusters/web-qa", json!({"spec": {"count": 3}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["pending_changes"][0]["field"], "spec.count", "{}", r.body);
    // Rounds of the observer (every 300 ms here) after the change.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let view = app.get_until("/v1/clusters/web-qa", |v| !v["observed"].is_null()).await;
    assert_eq!(view["observed"]["healthy"], true, "{view}");
    assert_eq!(view["observed"]["summary"], "2 of 2 instance(s) healthy", "{view}");
    // A refresh changes nothing the observer looks at: what it saw stands.
    let refreshed = refresh(&app, "cluster", "web-qa").await;
    assert_eq!(refreshed["drift"]["status"], "in_sync");
    assert_eq!(refreshed["observed"], view["observed"], "{refreshed}");
}

/// A probe that cannot tell (no answer in time) makes the drift unknown,
/// and says why: never in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_gets_no_answer_is_unknown_never_in_sync() {
    let app = spawn_app(Backend::Sqlite).await;
    // Takes connections and never answers them.
    let mute = "exec python3 -c \"import os, socket, time; s = socket.socket(); \
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
        s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(64); time.sleep(3600)\"";
    let r =
        app.post("/v1/images", json!({"name": "mute", "spec": {"build_command": "true", "start_command": mute}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("image", "mute", json!({"action": "build"})).await["status"], "succeeded");
    let spec = json!({"image": "mute", "count": 1, "health_check": {"type": "tcp"}});
    assert_eq!(app.post("/v1/clusters", json!({"name": "quiet", "spec": spec})).await.status, StatusCode::CREATED);
    assert_eq!(app.run("cluster", "quiet", json!({"action": "create"})).await["status"], "succeeded");
    assert_eq!(refresh(&app, "cluster", "quiet").await["drift"]["status"], "in_sync", "a TCP check it passes");
    // Checked over HTTP, it never answers.
    let r =
        app.patch("/v1/clusters/quiet", json!({"spec": {"health_check": {"type": "http", "path": "/"}}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let view = refresh(&app, "cluster", "quiet").await;
    assert_eq!(view["drift"]["status"], "unknown", "{view}");
    assert_eq!(view["drift"]["differences"], json!([]));
    assert_eq!(view["drift"]["unchecked"], json!([{"path": "instances[0].health", "why": "no answer within 2s"}]));

    // A refresh gives way: asked for while one runs (this one takes 2 s,
    // waiting for that answer), a stop is not refused as busy.
    let refresh = app.transition("cluster", "quiet", json!({"action": "refresh"})).await;
    let stop = app.post("/v1/clusters/quiet/transitions", json!({"action": "stop", "reason": "done"})).await;
    assert_eq!(stop.status, StatusCode::ACCEPTED, "{}", stop.body);
    let ended = app.wait(&refresh).await;
    assert!(matches!(ended["status"].as_str(), Some("succeeded" | "cancelled")), "{ended}");
    assert_eq!(app.wait(stop.body["id"].as_str().unwrap()).await["status"], "succeeded");
}

/// The observer asks for a refresh of each cluster every interval: a
/// killed instance shows as drift within one, recorded as the observer's
/// runs, counted in the stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_are_refreshed_on_an_interval() {
    let mut app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "echo tick > index.html").await;
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let r = app.post("/v1/clusters", json!({"name": "ticking", "spec": {"image": "web", "count": 1}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "ticking", json!({"action": "create"})).await["status"], "succeeded");
    app.set_refresh_every(drover_domain::kinds::cluster::KIND, std::time::Duration::from_secs(1)).await;
    app.get_until("/v1/clusters/ticking", |v| v["drift"]["status"] == "in_sync").await;

    let gone = pids(&app.get("/v1/clusters/ticking").await.body)[0];
    kill_group(gone).await;
    let view = app.get_until("/v1/clusters/ticking", |v| v["drift"]["status"] == "drifted").await;
    assert_eq!(view["drift"]["differences"][0]["path"], "instances[0].process", "{view}");
    assert_eq!(view["state"], "up");

    let runs = app.get("/v1/transitions?kind=cluster&action=refresh").await.body;
    let items = runs["items"].as_array().unwrap();
    assert!(items.len() >= 2, "{runs}");
    assert!(items.iter().all(|t| t["actor"] == "observer" && t["reason"] == "periodic refresh (every 1s)"), "{runs}");
    let stats = app
        .get_until("/v1/stats/transitions?group_by=action&kind=cluster", |s| {
            s["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["key"]["action"] == "refresh" && g["total"].as_i64() >= Some(2))
        })
        .await;
    assert!(stats["groups"].as_array().unwrap().iter().any(|g| g["key"]["action"] == "refresh"));
}

/// An image whose build directory was removed behind drover's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_build_is_drift() {
    let app = spawn_app(Backend::Postgres).await;
    create_image(&app, "lone", "echo lone > index.html").await;
    let build = app.run("image", "lone", json!({"action": "build"})).await;
    assert_eq!(build["status"], "succeeded");
    assert_eq!(refresh(&app, "image", "lone").await["drift"]["status"], "in_sync");
    let image = app.get("/v1/images/lone").await.body;
    let dir = image["outputs"]["path"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    let view = refresh(&app, "image", "lone").await;
    assert_eq!(view["drift"]["status"], "drifted");
    let id = build["id"].as_str().unwrap();
    assert_eq!(
        view["drift"]["differences"],
        json!([{"path": format!("builds[{id}].directory"), "recorded": dir, "actual": "missing"}])
    );
    assert_eq!(view["state"], "built");
}

/// A cluster that opted into `auto_repair` has an instance that died
/// started again by the observer within a round; when repairs do not hold
/// it backs off, then stops at a crash loop the view shows, until a person
/// acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_repair_heals_and_stops_at_a_crash_loop() {
    let app = spawn_app(Backend::Sqlite).await;
    let flag = std::env::temp_dir().join(format!("drover-crash-{}", uuid::Uuid::new_v4()));
    // Serves, unless the flag file says to crash at once.
    let start = format!("test -e {} && exit 3; exec python3 -m http.server $PORT --bind 127.0.0.1", flag.display());
    let r = app
        .post("/v1/images", json!({"name": "flaky", "spec": {"build_command": "true", "start_command": start}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("image", "flaky", json!({"action": "build"})).await["status"], "succeeded");
    let spec = json!({"image": "flaky", "count": 2, "auto_repair": true, "health_check": {"type": "tcp"}});
    let r = app.post("/v1/clusters", json!({"name": "healing", "spec": spec})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "healing", json!({"action": "create"})).await["status"], "succeeded");
    let before = app.get("/v1/clusters/healing").await.body;
    let repairs = || async {
        let runs = app.get("/v1/transitions?kind=cluster&action=repair").await.body;
        runs["items"].as_array().unwrap().clone()
    };

    // Killed by hand: the observer repairs it, as itself, saying why.
    let gone = pids(&before)[1];
    kill_group(gone).await;
    let view = app
        .get_until("/v1/clusters/healing", |v| {
            v["outputs"]["instances"][1]["pid"] != json!(gone) && v["observed"]["healthy"] == true
        })
        .await;
    let (old, new) = (&before["outputs"]["instances"][1], &view["outputs"]["instances"][1]);
    assert_eq!((&new["port"], &new["build"]), (&old["port"], &old["build"]));
    assert!(alive(new["pid"].as_u64().unwrap()));
    let runs = repairs().await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!((&runs[0]["actor"], &runs[0]["status"]), (&json!("observer"), &json!("succeeded")));
    assert_eq!(
        runs[0]["reason"],
        format!("auto-repair (attempt 1 of 3): process gone: instance 1 (pid {gone})"),
        "{runs:?}"
    );

    // Now every start crashes: repairs fail, back off, and stop at a
    // crash loop (the first repair above, a few seconds ago, did not hold
    // either: it is the streak's first).
    std::fs::write(&flag, "").unwrap();
    let gone = view["outputs"]["instances"][1]["pid"].as_u64().unwrap();
    kill_group(gone).await;
    let view = app.get_until("/v1/clusters/healing", |v| v["observed"]["auto_repair"]["status"] == "crash_loop").await;
    assert_eq!(view["state"], "up", "a repair that fails leaves the cluster up: {view}");
    assert_eq!(view["observed"]["auto_repair"]["attempts"], 3, "{view}");
    let problem = view["problem"]["summary"].as_str().unwrap_or_default();
    assert!(problem.starts_with("crash loop: it died again after each of 3 automatic repairs"), "{view}");
    let runs = repairs().await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs[..2].iter().all(|r| r["status"] == "failed" && r["actor"] == "observer"), "{runs:?}");
    assert_eq!(runs[0]["error"]["code"], "instance_exited", "{runs:?}");
    assert_eq!(runs[1]["reason"].as_str().unwrap().split(':').next(), Some("auto-repair (attempt 2 of 3)"));
    // The backoff between the failed two: at least the policy's 500 ms.
    let t = |r: &Value, f: &str| r[f].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert!(t(&runs[0], "created_at") - t(&runs[1], "finished_at") >= chrono::Duration::milliseconds(900), "{runs:?}");
    // It stays stopped: longer than the longest backoff, no new repair.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(repairs().await.len(), 3);

    // A person fixes the cause and repairs: a new start.
    std::fs::remove_file(&flag).unwrap();
    let run = app.run("cluster", "healing", json!({"action": "repair", "reason": "fixed the crash"})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let view = app
        .get_until("/v1/clusters/healing", |v| {
            v["observed"]["healthy"] == true && v["observed"]["auto_repair"].is_null()
        })
        .await;
    assert!(view["problem"].is_null(), "{view}");
    assert!(alive(view["outputs"]["instances"][1]["pid"].as_u64().unwrap()));
}

/// A service's refresh checks each instance (machine, process, directory,
/// build, health, registry entry); `repair` starts a dead one again on its
/// machine from the build the service runs; with `auto_repair` the
/// observer does it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_dead_instance_is_drift_and_repair_brings_it_back() {
    use super::services::{cluster_of_two, ok, service};
    let app = spawn_app(Backend::Sqlite).await;
    cluster_of_two(&app).await;
    service(&app, "app", json!({"cluster": "c1", "image": "web", "count": 2})).await;
    let before = ok(&app, "app", json!({"action": "start"})).await;
    let view = refresh(&app, "service", "app").await;
    assert_eq!(view["drift"]["status"], "in_sync", "{view}");

    let gone = pids(&before)[1];
    kill_group(gone).await;
    let view = refresh(&app, "service", "app").await;
    assert_eq!(view["drift"]["status"], "drifted", "{view}");
    assert_eq!(
        view["drift"]["differences"],
        json!([{"path": "instances[1].process", "recorded": format!("running (pid {gone})"), "actual": "gone"}])
    );
    assert_eq!(view["state"], "running");

    let after = ok(&app, "app", json!({"action": "repair", "reason": "instance 1 died"})).await;
    let (old, new) = (&before["outputs"]["instances"][1], &after["outputs"]["instances"][1]);
    assert_ne!(new["pid"], old["pid"]);
    assert_eq!((&new["machine_name"], &new["build"]), (&old["machine_name"], &old["build"]), "on its machine");
    assert_eq!(after["outputs"]["instances"][0]["pid"], before["outputs"]["instances"][0]["pid"], "left as it ran");
    let listed = app.get("/v1/discovery/app").await.body;
    let ports: Vec<&Value> = listed["entries"].as_array().unwrap().iter().map(|e| &e["port"]).collect();
    assert!(ports.contains(&&new["port"]), "the new instance is in the registry: {listed}");
    assert_eq!(refresh(&app, "service", "app").await["drift"]["status"], "in_sync");

    // Opted into auto-repair (read as written: not a pending change), the
    // observer starts a dead instance again by itself.
    let r = app.patch("/v1/services/app", json!({"spec": {"auto_repair": true}}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["pending_changes"], json!([]), "{}", r.body);
    let gone = pids(&after)[0];
    kill_group(gone).await;
    let view = app
        .get_until("/v1/services/app", |v| {
            v["state"] == "running"
                && v["outputs"]["instances"][0]["pid"] != json!(gone)
                && v["observed"]["healthy"] == true
        })
        .await;
    assert!(alive(view["outputs"]["instances"][0]["pid"].as_u64().unwrap()));
    let runs = app.get("/v1/transitions?kind=service&action=repair").await.body;
    assert_eq!(runs["items"][0]["actor"], "observer", "{runs}");
    assert_eq!(runs["items"][0]["status"], "succeeded", "{runs}");
}

/// `adopt` takes what the refresh found into the record as a new spec
/// version: a local cluster whose instance died by hand (on purpose) has
/// the instances that run; what no spec field can say is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_takes_reality_into_the_record() {
    let app = spawn_app(Backend::Sqlite).await;
    create_image(&app, "web", "echo adopt > index.html").await;
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let r = app.post("/v1/clusters", json!({"name": "three", "spec": {"image": "web", "count": 3}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(app.run("cluster", "three", json!({"action": "create"})).await["status"], "succeeded");
    let before = app.get("/v1/clusters/three").await.body;

    // Nothing to adopt before a refresh, nor when in sync.
    let adopt = json!({"action": "adopt", "reason": "we run two now"});
    let r = app.post("/v1/clusters/three/transitions", adopt.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("refresh first"), "{}", r.body);
    assert_eq!(refresh(&app, "cluster", "three").await["drift"]["status"], "in_sync");
    let r = app.post("/v1/clusters/three/transitions", adopt.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("found it in_sync"), "{}", r.body);

    let gone = pids(&before)[1];
    kill_group(gone).await;
    let view = refresh(&app, "cluster", "three").await;
    assert_eq!(view["drift"]["differences"][0]["adopt"], json!({"count": 2}), "{view}");

    let run = app.run("cluster", "three", adopt.clone()).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["params"]["spec"], json!({"count": 2}), "the ledger says what was adopted: {run}");
    assert_eq!(run["params"]["refresh"], view["drift"]["run"]);
    assert_eq!(run["params"]["differences"], json!(["instances[1].process"]));
    let after = app.get("/v1/clusters/three").await.body;
    assert_eq!(after["spec"]["count"], 2);
    assert_eq!(after["spec_version"], before["spec_version"].as_i64().unwrap() + 1, "a new spec version");
    assert_eq!(after["pending_changes"], json!([]), "{after}");
    let indexes: Vec<&Value> = after["outputs"]["instances"].as_array().unwrap().iter().map(|i| &i["index"]).collect();
    assert_eq!(indexes, [&json!(0), &json!(2)], "the others run on as they were");
    assert_eq!(pids(&after), [pids(&before)[0], pids(&before)[2]]);
    assert_eq!(refresh(&app, "cluster", "three").await["drift"]["status"], "in_sync");

    // A later scale fills the gap and leaves the others alone.
    let run = app.run("cluster", "three", json!({"action": "scale", "params": {"count": 3}})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let scaled = app.get("/v1/clusters/three").await.body;
    let indexes: Vec<u64> =
        scaled["outputs"]["instances"].as_array().unwrap().iter().map(|i| i["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, [0, 1, 2]);
    assert_eq!((pids(&scaled)[0], pids(&scaled)[2]), (pids(&before)[0], pids(&before)[2]));

    // Reality that moved since the refresh is not adopted.
    let gone = pids(&scaled)[2];
    kill_group(gone).await;
    refresh(&app, "cluster", "three").await;
    kill_group(pids(&scaled)[1]).await;
    let run = app.run("cluster", "three", adopt).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["error"]["code"], "reality_moved", "{run}");
    let view = app.get("/v1/clusters/three").await.body;
    assert_eq!((&view["state"], &view["spec"]["count"]), (&json!("up"), &json!(3)), "nothing changed: {view}");
}
