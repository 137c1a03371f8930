//! The discovery registry through the API: a running service's healthy
//! instances are in it, a deploy swaps them in order (new in, old out,
//! old stopped), a dead instance leaves with why, and watchers wake on the
//! change itself.

use std::time::{Duration, Instant};

use drover_tests::{spawn_app, Backend, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::services::{cluster_of_two, ok, service};

/// (instance, port, build) of a service's entries.
fn entries(list: &Value) -> Vec<(String, u64, String)> {
    list["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            let build = e["build"].as_str().unwrap_or_default().to_string();
            (e["instance"].as_str().unwrap().to_string(), e["port"].as_u64().unwrap(), build)
        })
        .collect()
}

/// A long-poll on the service's index: (what it answered, how long it took).
async fn watch(app: &TestApp, index: i64, wait: &str) -> (Value, Duration) {
    let started = Instant::now();
    let r = app.get(&format!("/v1/discovery/app?index={index}&wait={wait}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    (r.body, started.elapsed())
}

/// The changes of `app` after `after`.
async fn changes(app: &TestApp, after: i64) -> Vec<Value> {
    let r = app.get(&format!("/v1/discovery-changes?service=app&after={after}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["changes"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_follows_a_services_instances_and_wakes_watchers() {
    let app = spawn_app(Backend::Sqlite).await;
    cluster_of_two(&app).await;
    service(&app, "app", json!({"cluster": "c1", "image": "web", "count": 2})).await;
    let empty = app.get("/v1/discovery/app").await;
    assert_eq!((empty.status, empty.body["entries"].clone()), (StatusCode::OK, json!([])), "nothing runs yet");
    let svc = ok(&app, "app", json!({"action": "start"})).await;

    // Each healthy instance is in the registry, where its view says it runs.
    let first = app.get("/v1/discovery/app").await;
    let build = svc["outputs"]["build"].as_str().unwrap().to_string();
    let mut want: Vec<(u64, String)> = svc["outputs"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["port"].as_u64().unwrap(), build.clone()))
        .collect();
    let mut got: Vec<(u64, String)> = entries(&first.body).into_iter().map(|(_, p, b)| (p, b)).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{}", first.body);
    let e0 = &first.body["entries"][0];
    assert_eq!((e0["scheme"].as_str(), e0["address"].as_str()), (Some("http"), Some("127.0.0.1")));
    assert!(e0["machine"].as_str().unwrap().starts_with("c1-"), "{e0}");
    let index = first.body["index"].as_i64().unwrap();
    assert!(index >= 2, "{}", first.body);
    assert_eq!(first.headers["x-drover-index"], index.to_string().as_str());
    let all = app.get("/v1/discovery").await.body;
    assert_eq!(entries(&all).len(), 2);
    // For curl: one line per instance.
    let text = app.get_text("/v1/discovery/app", "text/plain").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("SERVICE"), "{text}");
    assert!(
        lines[1].contains(&format!("127.0.0.1:{}", got[0].0)) || lines[2].contains(&format!("127.0.0.1:{}", got[0].0)),
        "{text}"
    );

    // A watch with nothing changing answers at its deadline, index unchanged.
    let (same, took) = watch(&app, index, "400ms").await;
    assert_eq!(same["index"], index);
    assert!(took >= Duration::from_millis(400), "{took:?}");

    // A deploy of a new build: the watcher wakes on the first change, not
    // at its deadline; the new instances are in, the old ones out.
    assert_eq!(app.run("image", "web", json!({"action": "build"})).await["status"], "succeeded");
    let watcher = {
        let url = app.url(&format!("/v1/discovery/app?index={index}&wait=60s"));
        let client = app.client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            (body, started.elapsed())
        })
    };
    let deploy = app.run("service", "app", json!({"action": "deploy"})).await;
    assert_eq!(deploy["status"], "succeeded", "{deploy}");
    let (woke, took) = watcher.await.unwrap();
    assert!(woke["index"].as_i64().unwrap() > index, "{woke}");
    assert!(took < Duration::from_secs(50), "woken by the change, not the deadline: {took:?}");
    let new_build = deploy["outputs"]["build"].as_str().unwrap().to_string();
    assert_ne!(new_build, build);
    let after = app.get("/v1/discovery/app").await.body;
    let now: Vec<(String, u64, String)> = entries(&after);
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|(_, _, b)| *b == new_build), "{after}");
    // In the log: each index's new instance entered before its old one left,
    // and the old one left because it was replaced.
    let log = changes(&app, index).await;
    let old: Vec<String> = entries(&first.body).into_iter().map(|(i, _, _)| i).collect();
    for o in &old {
        let left = log.iter().find(|c| c["instance"] == o.as_str() && c["change"] == "leave").expect("left");
        assert!(left["reason"].as_str().unwrap().starts_with("replaced by build"), "{left}");
        assert_eq!(left["by"], deploy["id"]);
        let ix = o.split('-').next().unwrap();
        let entered = log
            .iter()
            .find(|c| {
                c["change"] == "enter"
                    && c["instance"].as_str().unwrap().starts_with(&format!("{ix}-"))
                    && c["build"] == new_build.as_str()
            })
            .expect("its replacement entered");
        assert!(entered["index"].as_i64() < left["index"].as_i64(), "new in before old out: {entered} {left}");
    }
    // The deploy's events say so too.
    let events = app.get(&format!("/v1/transitions/{}/events", deploy["id"].as_str().unwrap())).await.body;
    let steps: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["step"] == "discovery")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(steps.iter().filter(|m| m.contains("entered")).count(), 2, "{steps:?}");
    assert_eq!(steps.iter().filter(|m| m.contains("left")).count(), 2, "{steps:?}");

    // An instance killed by hand leaves within an observer round or two,
    // with why, and the watcher wakes for it.
    let index = after["index"].as_i64().unwrap();
    let victim = app.get("/v1/services/app").await.body["outputs"]["instances"][0].clone();
    let port = victim["port"].as_u64().unwrap();
    let pid = victim["pid"].as_u64().unwrap().to_string();
    std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    let (woke, _) = watch(&app, index, "30s").await;
    let left: Vec<u64> = entries(&woke).into_iter().map(|(_, p, _)| p).collect();
    assert_eq!(left.len(), 1, "{woke}");
    assert_ne!(left[0], port);
    let gone = changes(&app, index).await;
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!((gone[0]["change"].as_str(), gone[0]["by"].as_str()), (Some("leave"), Some("observer")));
    assert!(gone[0]["reason"].as_str().unwrap().contains("process is gone"), "{}", gone[0]);

    // Stopping the service takes the rest out, saying so.
    let index = woke["index"].as_i64().unwrap();
    ok(&app, "app", json!({"action": "stop"})).await;
    assert_eq!(app.get("/v1/discovery/app").await.body["entries"], json!([]));
    let stopped = changes(&app, index).await;
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert_eq!(stopped[0]["reason"], "the service is stopping");

    // Bad requests are named.
    assert_eq!(app.get("/v1/discovery/nope").await.status, StatusCode::NOT_FOUND);
    let r = app.get("/v1/discovery?index=-1").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(
        r.body["detail"].as_str().unwrap_or_default().contains("index") || r.body.to_string().contains("\"index\""),
        "{}",
        r.body
    );
    let r = app.get("/v1/discovery?index=1&wait=2h").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
}
