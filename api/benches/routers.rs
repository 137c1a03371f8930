//! Routers on the local provider, a real HAProxy, through the real API:
//! figures printed (not a test: these machines are shared and noisy).
//!
//! - Registry change → HAProxy serving the new server: over a scale of a
//!   service from 2 to 22 instances and a deploy of the 22, the time from
//!   each entry's entering the registry (its change's `at`) to HAProxy's
//!   running worker listing the server (`show stat` on the admin socket,
//!   polled every 2 ms), p50 and p99. Goal p99 ≤ 500 ms.
//! - Swap request → all traffic on the new target: a loop of requests
//!   through the router (one every 2 ms) while a swap (verify_secs 0) moves
//!   a backend from cluster blue to cluster green; from the request to the
//!   first answer from green after which none came from blue. Goal ≤ 1 s
//!   plus the verify window.
//! - Requests failed across 100 reloads under load: four loops of requests
//!   through the router while 100 `apply` runs each reload HAProxy. Goal 0.
//!
//! Run: `cargo bench -p drover-api --bench routers`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{at, secs, Api};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(bench());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// HAProxy's `show stat`, from a router's admin socket.
async fn show_stat(socket: &Path) -> Option<String> {
    let mut s = tokio::net::UnixStream::connect(socket).await.ok()?;
    s.write_all(b"show stat\n").await.ok()?;
    s.shutdown().await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// Notes when each server of `b_site` first shows in HAProxy's worker.
async fn watch_stats(socket: PathBuf, seen: Arc<std::sync::Mutex<BTreeMap<String, DateTime<Utc>>>>) {
    loop {
        if let Some(csv) = show_stat(&socket).await {
            let now = Utc::now();
            let mut seen = seen.lock().unwrap();
            for line in csv.lines().filter(|l| l.starts_with("b_site,")) {
                let server = line.split(',').nth(1).unwrap_or_default();
                if server != "BACKEND" {
                    seen.entry(server.to_string()).or_insert(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// When a request was answered, and its body or what went wrong.
type Answers = Vec<(DateTime<Utc>, Result<String, String>)>;

/// Requests through `url` until stopped: (when answered, body or error).
fn load(url: String, every: Duration, going: Arc<AtomicBool>) -> tokio::task::JoinHandle<Answers> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let mut out = Vec::new();
        while going.load(Ordering::Relaxed) {
            let r = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => Ok(r.text().await.unwrap_or_default().trim().to_string()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            };
            out.push((Utc::now(), r));
            tokio::time::sleep(every).await;
        }
        out
    })
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn router(api: &Api, name: &str, port: u16, target: Value) -> String {
    let spec = json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": port, "backend": "site"}],
        "backends": [{"name": "site", "target": target, "check": {"type": "http", "path": "/index.html"}}]});
    let r = api.call("POST", "/v1/routers", Some(json!({"name": name, "spec": spec}))).await;
    api.run("routers", name, json!({"action": "create"})).await;
    r["id"].as_str().unwrap().to_string()
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = common::KillOnDrop(dir.path().to_path_buf());
    let (_server, api) = common::serve(dir.path()).await;
    let spec = json!({"build_command": "echo $DROVER_RUN_ID > index.html",
        "start_command": "exec python3 -m http.server $PORT --bind 127.0.0.1"});
    api.call("POST", "/v1/images", Some(json!({"name": "web", "spec": spec}))).await;
    api.call("POST", "/v1/environments", Some(json!({"name": "prod", "spec": {}}))).await;
    let blue = api.run("images", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    for (name, count) in [("c1", 4), ("blue", 2)] {
        let spec = json!({"image": "web", "count": count, "health_check": {"type": "tcp"}});
        api.call("POST", "/v1/clusters", Some(json!({"name": name, "spec": spec}))).await;
        api.run("clusters", name, json!({"action": "create"})).await;
    }
    let spec =
        json!({"cluster": "c1", "image": "web", "count": 2, "health_check": {"type": "http", "path": "/index.html"}});
    api.call("POST", "/v1/services", Some(json!({"name": "app", "spec": spec}))).await;
    api.run("services", "app", json!({"action": "start"})).await;
    let edge_port = free_port();
    let edge = router(&api, "edge", edge_port, json!({"service": "app"})).await;

    // Registry change → HAProxy serving the new server.
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let socket = dir.path().join("routers").join(&edge).join("admin.sock");
    let watcher = tokio::spawn(watch_stats(socket, seen.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = api.call("GET", "/v1/discovery-changes?service=app&limit=1000", None).await["next_after"].clone();
    api.run("services", "app", json!({"action": "scale", "params": {"count": 22}})).await;
    api.run("images", "web", json!({"action": "build"})).await;
    api.run("services", "app", json!({"action": "deploy"})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    watcher.abort();
    let changes = api.call("GET", &format!("/v1/discovery-changes?service=app&after={before}&limit=1000"), None).await;
    let seen = seen.lock().unwrap().clone();
    let mut lags: Vec<f64> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["change"] == "enter")
        .map(|c| {
            let got = seen.get(c["instance"].as_str().unwrap()).expect("HAProxy listed every new server");
            secs(*got - at(&c["at"])) * 1000.0
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let versions =
        api.call("GET", "/v1/routers/edge/configs?limit=100", None).await["configs"].as_array().unwrap().len();
    println!(
        "registry change -> HAProxy serving it: {} new servers, {versions} configuration versions: p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms (goal p99 <= 500 ms)",
        lags.len(),
        pct(&lags, 0.5),
        pct(&lags, 0.99),
        lags.last().unwrap()
    );

    // Swap request → all traffic on the new target.
    let green = api.run("images", "web", json!({"action": "build"})).await["id"].as_str().unwrap().to_string();
    let spec = json!({"image": "web", "count": 2, "health_check": {"type": "tcp"}});
    api.call("POST", "/v1/clusters", Some(json!({"name": "green", "spec": spec}))).await;
    api.run("clusters", "green", json!({"action": "create"})).await;
    let bg_port = free_port();
    router(&api, "bg", bg_port, json!({"cluster": "blue"})).await;
    let going = Arc::new(AtomicBool::new(true));
    let answers = load(format!("http://127.0.0.1:{bg_port}/"), Duration::from_millis(2), going.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Utc::now();
    let swap = api
        .run(
            "routers",
            "bg",
            json!({"action": "swap",
            "params": {"backend": "site", "to": {"cluster": "green"}, "verify_secs": 0}}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    going.store(false, Ordering::Relaxed);
    let answers = answers.await.unwrap();
    let last_blue = answers.iter().rposition(|(_, r)| r.as_deref() == Ok(blue.as_str())).expect("blue served");
    let all_green =
        answers[last_blue + 1..].iter().find(|(_, r)| r.as_deref() == Ok(green.as_str())).expect("green served").0;
    let failed = answers.iter().filter(|(_, r)| r.is_err()).count();
    let events = api.events(&swap).await;
    let step = |name: &str| events.iter().find(|e| e["step"] == name).map(|e| at(&e["at"]));
    let gate_passed = events.iter().rfind(|e| e["step"] == "gate").map(|e| at(&e["at"])).unwrap();
    println!(
        "swap request -> all traffic on green: {:.2}s (verify window 0; goal <= 1 s + the window); of it, waiting for \
         HAProxy's checks of green's servers (once loaded) {:.2}s; run {:.2}s; {} requests, {failed} failed",
        secs(all_green - asked),
        secs(gate_passed - step("shadow").unwrap()),
        secs(at(&swap["finished_at"]) - at(&swap["started_at"])),
        answers.len()
    );

    // Requests failed across 100 reloads under load.
    let going = Arc::new(AtomicBool::new(true));
    let loops: Vec<_> = (0..4)
        .map(|_| load(format!("http://127.0.0.1:{edge_port}/index.html"), Duration::from_millis(5), going.clone()))
        .collect();
    let started = std::time::Instant::now();
    for _ in 0..100 {
        api.run("routers", "edge", json!({"action": "apply"})).await;
    }
    let took = started.elapsed();
    going.store(false, Ordering::Relaxed);
    let (mut sent, mut failed, mut why) = (0, 0, BTreeMap::<String, usize>::new());
    for l in loops {
        for (_, r) in l.await.unwrap() {
            sent += 1;
            if let Err(e) = r {
                failed += 1;
                *why.entry(e).or_default() += 1;
            }
        }
    }
    println!("100 reloads under load: {sent} requests in {:.1}s, {failed} failed (goal 0) {why:?}", took.as_secs_f64());
}
