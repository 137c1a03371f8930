//! What the black-box tests of the `drover` binary share: a real
//! `drover serve` (SQLite, the local provider) on a loopback port, and the
//! API called as its first admin.

#![allow(dead_code)] // each test binary uses its part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub const TOKEN: &str = "cli-test-token-0123456789abcdef0123456789";

pub struct Server {
    child: Child,
    pub url: String,
    pub data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        drover_ops::local::testing::kill_everything_under(self.data.path());
    }
}

pub fn serve() -> Server {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data.path())
        .env("DROVER_BOOTSTRAP_TOKEN", TOKEN)
        .env("DROVER_LOG", "warn")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start drover serve");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("drover listening on http://") {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("drover serve started");
    Server { child, url: format!("http://{addr}"), data }
}

/// A call with a JSON body as the first admin; panics unless it succeeds.
pub async fn send(server: &Server, method: reqwest::Method, path: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .request(method.clone(), format!("{}{path}", server.url))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{method} {path}: {}", r.status());
    r.json().await.unwrap()
}

pub async fn post(server: &Server, path: &str, body: Value) -> Value {
    send(server, reqwest::Method::POST, path, body).await
}

pub async fn put(server: &Server, path: &str, body: Value) -> Value {
    send(server, reqwest::Method::PUT, path, body).await
}

pub async fn get(server: &Server, path: &str) -> Value {
    let r = reqwest::Client::new().get(format!("{}{path}", server.url)).bearer_auth(TOKEN).send().await.unwrap();
    r.json().await.unwrap()
}
