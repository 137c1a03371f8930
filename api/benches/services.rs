//! Services and jobs on the local provider, through the real API: figures
//! as ratios to their floors, printed (not a test: these machines are
//! shared and noisy).
//!
//! - A rolling deploy of 20 instances (max_surge 5, so 4 batches): its wall
//!   time over its floor, the batches times the slowest instance's time
//!   from started to healthy (what a deploy cannot beat), goal ≤ 1.3.
//! - During that deploy and a restart after it (40 new instances), a
//!   watcher long-polling the discovery registry: from an instance's being
//!   healthy (its event) to the watcher's holding its entry, p50 and p99,
//!   goal p99 ≤ 100 ms.
//! - A job fanned out to 100 machines (a 64-machine cluster, the most one
//!   has, and a worker group of 36 joined to it), all at once: its wall
//!   time over the slowest target's.
//!
//! Run: `cargo bench -p drover-api --bench services`.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use common::{at, secs, TOKEN};
use serde_json::{json, Value};

/// When the watcher first held each instance's entry.
static SEEN: std::sync::Mutex<BTreeMap<String, DateTime<Utc>>> = std::sync::Mutex::new(BTreeMap::new());

/// Long-polls `app`'s part of the registry, as a router would, noting when
/// each entry is first seen.
async fn watch(base: String, http: reqwest::Client) {
    let mut index = 0i64;
    loop {
        let url = format!("{base}/v1/discovery/app?index={index}&wait=60s");
        let Ok(r) = http.get(url).bearer_auth(TOKEN).send().await else { continue };
        let Ok(body) = r.json::<Value>().await else { continue };
        let now = Utc::now();
        index = body["index"].as_i64().unwrap_or(index);
        let mut seen = SEEN.lock().unwrap();
        for e in body["entries"].as_array().into_iter().flatten() {
            seen.entry(e["instance"].as_str().unwrap_or_default().to_string()).or_insert(now);
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = common::serve(dir.path()).await;

    // Instances take a moment to come up, as real ones do.
    let start = "sleep 0.5; exec python3 -m http.server $PORT --bind 127.0.0.1";
    let spec = json!({"build_command": "echo $DROVER_RUN_ID > index.html", "start_command": start});
    api.call("POST", "/v1/images", Some(json!({"name": "web", "spec": spec}))).await;
    api.run("images", "web", json!({"action": "build"})).await;
    let spec = json!({"image": "web", "count": 4, "health_check": {"type": "tcp"}});
    api.call("POST", "/v1/clusters", Some(json!({"name": "c1", "spec": spec}))).await;
    api.run("clusters", "c1", json!({"action": "create"})).await;

    let (count, surge) = (20u32, 5u32);
    let spec = json!({"cluster": "c1", "image": "web", "count": count, "max_surge": surge,
        "health_check": {"type": "http", "path": "/index.html"}});
    api.call("POST", "/v1/services", Some(json!({"name": "app", "spec": spec}))).await;
    api.run("services", "app", json!({"action": "start"})).await;
    api.run("images", "web", json!({"action": "build"})).await;
    let watcher = tokio::spawn(watch(api.base.clone(), api.http.clone()));
    let deploy = api.run("services", "app", json!({"action": "deploy"})).await;
    let wall = secs(at(&deploy["finished_at"]) - at(&deploy["started_at"]));
    // Each new instance: from its placement to its being healthy.
    let events = api.events(&deploy).await;
    let mut slowest = 0f64;
    for e in events.iter().filter(|e| e["message"].as_str().unwrap_or("").starts_with("placed instance")) {
        let index = &e["data"]["index"];
        let healthy = events
            .iter()
            .find(|h| h["data"]["index"] == *index && h["message"].as_str().unwrap_or("").contains("healthy on build"))
            .expect("each new instance became healthy");
        slowest = slowest.max(secs(at(&healthy["at"]) - at(&e["at"])));
    }
    let batches = count.div_ceil(surge);
    let floor = batches as f64 * slowest;
    println!(
        "rolling deploy: {count} instances, max_surge {surge} ({batches} batches): {wall:.2}s; slowest instance \
         {slowest:.2}s to healthy; floor {floor:.2}s; wall/floor = {:.2} (goal <= 1.3)",
        wall / floor
    );

    // Healthy → seen by a watcher, over the deploy and a restart.
    let restart = api.run("services", "app", json!({"action": "restart"})).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    watcher.abort();
    let seen = SEEN.lock().unwrap().clone();
    let mut lags = Vec::new();
    for run in [&deploy, &restart] {
        let events = api.events(run).await;
        // The plan's instances: (index, healthy at); their entries by index.
        for h in events.iter().filter(|e| e["message"].as_str().unwrap_or("").contains("healthy on build")) {
            let index = h["data"]["index"].as_u64().unwrap();
            let entered = events
                .iter()
                .find(|e| {
                    e["step"] == "discovery" && e["data"]["entry"]["index"] == index && at(&e["at"]) >= at(&h["at"])
                })
                .expect("each healthy instance entered the registry");
            let instance = entered["data"]["entry"]["instance"].as_str().unwrap();
            let got = seen.get(instance).expect("the watcher saw every instance");
            lags.push(secs(*got - at(&h["at"])) * 1000.0);
        }
    }
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1];
    println!(
        "discovery watch: {} instances: healthy -> seen by a watcher p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         (goal p99 <= 100 ms)",
        lags.len(),
        pct(0.5),
        pct(0.99),
        lags.last().unwrap()
    );

    // A job on 100 machines: the largest cluster and a worker group joined
    // to it, all at once.
    let machines = drover_domain::kinds::cluster::MAX_COUNT;
    api.run("clusters", "c1", json!({"action": "scale", "params": {"count": machines}})).await;
    let spec = json!({"image": "web", "count": 100 - machines, "join": "c1", "health_check": {"type": "tcp"}});
    api.call("POST", "/v1/clusters", Some(json!({"name": "w1", "spec": spec}))).await;
    api.run("clusters", "w1", json!({"action": "create"})).await;
    let spec = json!({"cluster": "c1", "command": "sleep 0.2; echo done", "max_concurrency": 100});
    api.call("POST", "/v1/jobs", Some(json!({"name": "fan", "spec": spec}))).await;
    let run = api.run("jobs", "fan", json!({"action": "run"})).await;
    let wall = secs(at(&run["finished_at"]) - at(&run["started_at"]));
    let results = run["outputs"]["results"].as_array().unwrap();
    let slowest = results.iter().map(|r| r["duration_ms"].as_u64().unwrap()).max().unwrap() as f64 / 1000.0;
    println!(
        "job fan-out: {} machines at once: {wall:.2}s; slowest target {slowest:.2}s; wall/slowest = {:.2}",
        results.len(),
        wall / slowest
    );
    api.run("jobs", "fan", json!({"action": "destroy"})).await;
    api.run("services", "app", json!({"action": "destroy"})).await;
    api.run("clusters", "w1", json!({"action": "destroy"})).await;
    api.run("clusters", "c1", json!({"action": "destroy"})).await;
    server.stop().await;
}
