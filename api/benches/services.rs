//! Services and jobs on the local provider, through the real API: figures
//! as ratios to their floors, printed (not a test: these machines are
//! shared and noisy).
//!
//! - A rolling deploy of 20 instances (max_surge 5, so 4 batches): its wall
//!   time over its floor, the batches times the slowest instance's time
//!   from started to healthy (what a deploy cannot beat), goal ≤ 1.3.
//! - A job fanned out to every machine of a 64-machine cluster (the most a
//!   cluster has), all at once: its wall time over the slowest target's.
//!
//! Run: `cargo bench -p drover-api --bench services`.

use chrono::{DateTime, Utc};
use drover_api::Config;
use drover_domain::engine::EngineConfig;
use serde_json::{json, Value};

const TOKEN: &str = "drv_bench_0123456789abcdefghijklmnopqrstuvwxyz012345";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Asks for a transition and waits for it; panics unless it succeeds.
    async fn run(&self, plural: &str, name: &str, body: Value) -> Value {
        let run = self.call("POST", &format!("/v1/{plural}/{name}/transitions"), Some(body)).await;
        let id = run["id"].as_str().unwrap().to_string();
        loop {
            let r = self.call("GET", &format!("/v1/transitions/{id}?wait=10s"), None).await;
            match r["status"].as_str() {
                Some("succeeded") => return r,
                Some("failed" | "cancelled") => panic!("{plural}/{name}: {r}"),
                _ => {}
            }
        }
    }

    async fn events(&self, run: &Value) -> Vec<Value> {
        let id = run["id"].as_str().unwrap();
        let e = self.call("GET", &format!("/v1/transitions/{id}/events?limit=1000"), None).await;
        e["events"].as_array().cloned().unwrap_or_default()
    }
}

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_microseconds().unwrap_or(0) as f64 / 1e6
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let server = drover_api::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        database_url: None,
        engine: EngineConfig::default(),
        workers: true,
        bootstrap_token: Some(TOKEN.to_string()),
        secret_key: None,
        aws: Default::default(),
    })
    .await
    .expect("drover starts");
    let api = Api { base: format!("http://{}", server.addr), http: reqwest::Client::new() };

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

    // A job on every machine of the largest cluster, all at once.
    let machines = drover_domain::kinds::cluster::MAX_COUNT;
    api.run("clusters", "c1", json!({"action": "scale", "params": {"count": machines}})).await;
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
    api.run("clusters", "c1", json!({"action": "destroy"})).await;
    server.stop().await;
}
