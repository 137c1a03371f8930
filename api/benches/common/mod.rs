//! What the benches share: a real `drover` on its embedded defaults, and
//! a client of its API.

#![allow(dead_code)] // each bench uses its part

use std::path::Path;

use chrono::{DateTime, Utc};
use drover_api::Config;
use drover_domain::engine::EngineConfig;
use serde_json::Value;

pub const TOKEN: &str = "drv_bench_0123456789abcdefghijklmnopqrstuvwxyz012345";

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
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
    pub async fn run(&self, plural: &str, name: &str, body: Value) -> Value {
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

    pub async fn events(&self, run: &Value) -> Vec<Value> {
        let id = run["id"].as_str().unwrap();
        let e = self.call("GET", &format!("/v1/transitions/{id}/events?limit=1000"), None).await;
        e["events"].as_array().cloned().unwrap_or_default()
    }
}

pub fn at(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

pub fn secs(d: chrono::Duration) -> f64 {
    d.num_microseconds().unwrap_or(0) as f64 / 1e6
}

/// A drover on SQLite and the local provider, its data in `dir`.
pub async fn serve(dir: &Path) -> (drover_api::app::Server, Api) {
    let server = drover_api::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        database_url: None,
        engine: EngineConfig::default(),
        workers: true,
        bootstrap_token: Some(TOKEN.to_string()),
        secret_key: None,
        aws: Default::default(),
        view_max_age: drover_domain::service::VIEW_MAX_AGE,
    })
    .await
    .expect("drover starts");
    let api = Api { base: format!("http://{}", server.addr), http: reqwest::Client::new() };
    (server, api)
}

/// Kills whatever a bench's drover started under its data directory
/// (instances, HAProxies: daemons that outlive drover) when dropped, so
/// that a bench, ended or panicking, leaves nothing running.
pub struct KillOnDrop(pub std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        drover_ops::local::testing::kill_everything_under(&self.0);
    }
}
