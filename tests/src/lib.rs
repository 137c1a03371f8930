//! The acceptance harness: the real server on port 0 with a fresh database
//! and data directory, driven over real HTTP.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use drover_api::app::{Config, Server};
use drover_domain::engine::EngineConfig;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The first admin's token in every test server.
pub const ADMIN_TOKEN: &str = "drv_acceptance_admin_token_0123456789abcdef";

pub struct TestApp {
    pub addr: SocketAddr,
    /// Sends the admin token with every request.
    pub client: reqwest::Client,
    /// Sends no token.
    pub anonymous: reqwest::Client,
    pub data_dir: tempfile::TempDir,
    database_url: String,
    aws: drover_ops::aws::Settings,
    workers: bool,
    /// The engine's settings, when a test wants its own (see
    /// [`TestApp::set_observe_every`], [`TestApp::set_refresh_every`]).
    engine: EngineConfig,
    server: Option<Server>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        worker_id: "acceptance".into(),
        concurrency: 16,
        lease: Duration::from_secs(5),
        heartbeat: Duration::from_millis(200),
        poll: Duration::from_millis(50),
        reap_every: Duration::from_millis(500),
        observe_every: Duration::from_millis(300),
        fold_every: Duration::from_millis(300),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        providers: None,
        // Only tests of the periodic refresh want it (it holds a resource
        // for a moment now and then).
        refresh_every: Vec::new(),
        // Quick, so that a test sees a backoff and a crash loop in seconds.
        auto_repair: drover_domain::repair::RepairPolicy {
            backoff: Duration::from_millis(500),
            backoff_max: Duration::from_secs(2),
            crash_loop_after: 3,
            forgive_after: Duration::from_secs(60),
        },
    }
}

/// Everything every test server logged, at debug level, for tests that
/// check what must never be logged.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").with_ansi(false).with_writer(|| Capture).try_init();
    });
}

pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, drover_ops::aws::Settings::default()).await
}

/// A server whose `aws` provider talks to the tests' moto server (started
/// on demand; see `drover_ops::aws::testing`).
pub async fn spawn_app_on_moto(backend: Backend) -> TestApp {
    spawn_app_with(backend, drover_ops::aws::testing::moto_settings()).await
}

/// A server on moto that runs no workers: the test drives the engine
/// itself (see [`TestApp::database_url`]).
pub async fn spawn_app_on_moto_without_workers(backend: Backend) -> TestApp {
    let mut app = spawn_app_with(backend, drover_ops::aws::testing::moto_settings()).await;
    app.workers = false;
    app.restart().await;
    app
}

pub async fn spawn_app_with(backend: Backend, aws: drover_ops::aws::Settings) -> TestApp {
    capture_logs();
    let data_dir = tempfile::tempdir().expect("temp dir");
    let database_url = match backend {
        Backend::Sqlite => format!("sqlite://{}", data_dir.path().join("drover.db").display()),
        Backend::Postgres => drover_persistence::testing::fresh_postgres_database().await,
    };
    let server = start(data_dir.path(), &database_url, &aws, true, &engine_config()).await;
    TestApp {
        addr: server.addr,
        client: client_with(Some(ADMIN_TOKEN)),
        anonymous: client_with(None),
        data_dir,
        database_url,
        aws,
        workers: true,
        engine: engine_config(),
        server: Some(server),
    }
}

/// An HTTP client that sends `token` as its bearer.
pub fn client_with(token: Option<&str>) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    if let Some(t) = token {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
    }
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// The configuration the tests' servers start with.
pub fn test_config(data_dir: &Path, database_url: &str, aws: &drover_ops::aws::Settings, workers: bool) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        database_url: Some(database_url.to_string()),
        engine: engine_config(),
        workers,
        bootstrap_token: Some(ADMIN_TOKEN.to_string()),
        secret_key: None,
        aws: aws.clone(),
        view_max_age: drover_domain::service::VIEW_MAX_AGE,
    }
}

async fn start(
    data_dir: &Path,
    database_url: &str,
    aws: &drover_ops::aws::Settings,
    workers: bool,
    engine: &EngineConfig,
) -> Server {
    let mut cfg = test_config(data_dir, database_url, aws, workers);
    cfg.engine = engine.clone();
    drover_api::start(cfg).await.expect("server starts")
}

impl TestApp {
    /// The server's database, for tests that drive an engine of their own.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Restarts the server with the observer's round set to `every`: a test
    /// that writes the registry behind the observer's back slows it down
    /// (the observer would put the registry right within a round).
    pub async fn set_observe_every(&mut self, every: Duration) {
        self.engine.observe_every = every;
        self.restart().await;
    }

    /// Restarts the server with the observer asking for a refresh of each
    /// resource of `kind` every `every`.
    pub async fn set_refresh_every(&mut self, kind: drover_domain::kinds::Kind, every: Duration) {
        self.engine.refresh_every.retain(|(k, _)| *k != kind);
        self.engine.refresh_every.push((kind, every));
        self.restart().await;
    }

    /// Stops the server (runs in flight are left to their leases) and starts
    /// a new one on the same database and data directory.
    pub async fn restart(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        let server = start(self.data_dir.path(), &self.database_url, &self.aws, self.workers, &self.engine).await;
        self.addr = server.addr;
        self.server = Some(server);
    }

    async fn reply(r: reqwest::Response) -> Reply {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Self::reply(self.client.get(self.url(path)).send().await.expect("GET")).await
    }

    /// Polls `GET path` until `pred` holds of its body (every 50 ms, for at
    /// most 10 s, then the test fails showing the last body).
    pub async fn get_until(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut seen = Value::Null;
        for _ in 0..200 {
            seen = self.get(path).await.body;
            if pred(&seen) {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("GET {path} never got there: {seen}");
    }

    /// `GET path` asking for `accept` (`text/plain`, `text/event-stream`):
    /// the body as text.
    pub async fn get_text(&self, path: &str, accept: &str) -> String {
        let r = self.client.get(self.url(path)).header("accept", accept).send().await.expect("GET");
        r.text().await.expect("a text body")
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        Self::reply(self.client.post(self.url(path)).json(&body).send().await.expect("POST")).await
    }

    /// A user with `roles` and a token of theirs; returns a client using it.
    pub async fn user_with_roles(&self, name: &str, roles: &[&str]) -> reqwest::Client {
        let r = self.post("/v1/users", serde_json::json!({"name": name, "spec": {"roles": roles}})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let t = self.post(&format!("/v1/users/{name}/tokens"), serde_json::json!({"name": "test"})).await;
        assert_eq!(t.status, StatusCode::CREATED, "{}", t.body);
        client_with(Some(t.body["secret"].as_str().unwrap()))
    }

    /// A role granting exactly `permissions`.
    pub async fn role(&self, name: &str, permissions: &[&str]) {
        let r = self.post("/v1/roles", serde_json::json!({"name": name, "spec": {"permissions": permissions}})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }

    pub async fn send(&self, client: &reqwest::Client, method: &str, path: &str, body: Option<Value>) -> Reply {
        let mut req = client.request(method.parse().unwrap(), self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        Self::reply(req.send().await.expect("request")).await
    }

    pub async fn post_with_key(&self, path: &str, body: Value, key: &str) -> Reply {
        let r = self.client.post(self.url(path)).header("Idempotency-Key", key).json(&body).send().await.expect("POST");
        Self::reply(r).await
    }

    pub async fn patch(&self, path: &str, body: Value, if_match: Option<&str>) -> Reply {
        let mut req = self.client.patch(self.url(path)).json(&body);
        if let Some(m) = if_match {
            req = req.header("If-Match", m);
        }
        Self::reply(req.send().await.expect("PATCH")).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        Self::reply(self.client.delete(self.url(path)).send().await.expect("DELETE")).await
    }

    /// Asks for a transition and returns its id (asserting 202 + Location).
    pub async fn transition(&self, kind: &str, name: &str, body: Value) -> String {
        let r = self.post(&format!("/v1/{kind}s/{name}/transitions"), body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        let id = r.body["id"].as_str().expect("id").to_string();
        assert_eq!(r.headers["location"], format!("/v1/transitions/{id}").as_str());
        id
    }

    /// Long-polls a transition until it ends.
    pub async fn wait(&self, id: &str) -> Value {
        for _ in 0..12 {
            let r = self.get(&format!("/v1/transitions/{id}?wait=10s")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            if matches!(r.body["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return r.body;
            }
        }
        panic!("transition {id} did not end in two minutes");
    }

    /// Runs a transition to its end and returns it.
    pub async fn run(&self, kind: &str, name: &str, body: Value) -> Value {
        let id = self.transition(kind, name, body).await;
        self.wait(&id).await
    }
}

impl Drop for TestApp {
    /// Whatever a failing test left running is stopped: every instance
    /// process group on record under the data directory.
    fn drop(&mut self) {
        drover_ops::local::testing::kill_everything_under(self.data_dir.path());
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false)
}
