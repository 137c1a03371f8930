//! Test support: a moto server on loopback, settings that reach it, and a
//! run context that records events. Feature `test-support`.
//!
//! The endpoint is `AWS_ENDPOINT_URL` when set (`.ci/run` starts moto and
//! sets it); otherwise the first test that needs AWS starts `moto_server`
//! itself, from `.ci/.venv` or `PATH`, and a watcher stops it when the test
//! process ends. When neither is possible the test fails: AWS tests never
//! pass silently without moto.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::model::NewEvent;
use drover_domain::ports::RunContext;
use uuid::Uuid;

pub use aws_sdk_autoscaling as autoscaling;
pub use aws_sdk_cloudformation as cloudformation;
pub use aws_sdk_ec2 as ec2;
pub use aws_sdk_elasticloadbalancingv2 as elbv2;
pub use aws_sdk_ssm as ssm;

use super::{Backoff, Clients, Settings};

static ENDPOINT: OnceLock<String> = OnceLock::new();
static WATCHER: Mutex<Option<std::process::Child>> = Mutex::new(None);

/// The moto endpoint, starting moto when needed. Panics (fails the test)
/// when moto cannot be had.
pub fn moto_endpoint() -> String {
    ENDPOINT.get_or_init(start_or_find).clone()
}

fn moto_binary() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.ci/.venv/bin/moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("moto_server")).find(|p| p.is_file()))
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1") && &buf[9..12] == b"200"
}

fn start_or_find() -> String {
    if let Some(url) = std::env::var("AWS_ENDPOINT_URL").ok().filter(|u| !u.is_empty()) {
        return url;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let Some(bin) = moto_binary() else {
        panic!(
            "the AWS tests need a moto server: set AWS_ENDPOINT_URL to one, or install moto \
             (`bash .ci/run` puts it in .ci/.venv; or `pip install 'moto[server]'`){}",
            if ci { " — CI=true, so this is a failure, not a skip" } else { "" }
        );
    };
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    // The watcher shell stops moto when this test process is gone.
    let script = format!(
        "\"$0\" -H 127.0.0.1 -p {port} >/dev/null 2>&1 & m=$!; trap 'kill $m' EXIT; \
         while kill -0 {} 2>/dev/null && kill -0 $m 2>/dev/null; do sleep 1; done",
        std::process::id()
    );
    let watcher = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&bin)
        .env("MOTO_ENABLE_AMI_VALIDATION", "true")
        .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    // Kept, never waited for: it lives as long as this process.
    *WATCHER.lock().unwrap() = Some(watcher);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if answers(port) {
            return format!("http://127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{} did not answer on port {port} within 30s", bin.display());
}

/// Settings for moto: fixed test credentials, no SDK retries (moto's 500s
/// would be retried into misleading errors), fast polling.
pub fn moto_settings() -> Settings {
    Settings {
        endpoint_url: Some(moto_endpoint()),
        region: Some("us-east-1".into()),
        max_attempts: Some(1),
        static_credentials: Some(("testing".into(), "testing".into())),
        poll: Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) },
        artifact_bucket: None,
    }
}

/// SDK clients on moto, to cross-check what drover did.
pub fn moto_clients() -> Arc<Clients> {
    Clients::new(moto_settings())
}

/// A base AMI moto knows (moto checks AMI ids when validation is on).
pub async fn base_ami(clients: &Clients) -> String {
    let out = clients.ec2().await.describe_images().owners("amazon").send().await.expect("moto lists its AMIs");
    out.images()
        .iter()
        .filter(|i| i.name().is_some_and(|n| n.contains("ubuntu")))
        .find_map(|i| i.image_id().map(str::to_string))
        .expect("moto has an ubuntu AMI")
}

/// A subnet and the security group of moto's default VPC.
pub async fn default_network(clients: &Clients) -> (String, String) {
    let ec2 = clients.ec2().await;
    let subnets = ec2.describe_subnets().send().await.expect("subnets");
    let subnet = subnets.subnets()[0].subnet_id().unwrap().to_string();
    let groups = ec2.describe_security_groups().send().await.expect("groups");
    let sg = groups.security_groups()[0].group_id().unwrap().to_string();
    (subnet, sg)
}

/// Takes a tag off an EC2 resource, as someone's hand in the console would.
pub async fn untag(clients: &Clients, resource: &str, key: &str) {
    let tag = aws_sdk_ec2::types::Tag::builder().key(key).build();
    clients.ec2().await.delete_tags().resources(resource).tags(tag).send().await.expect("DeleteTags");
}

/// A run context that records events and can be told to cancel.
#[derive(Default)]
pub struct RecordingCtx {
    pub run: Uuid,
    pub events: Mutex<Vec<NewEvent>>,
    pub cancel: AtomicBool,
}

impl RecordingCtx {
    pub fn new(run: Uuid) -> RecordingCtx {
        RecordingCtx { run, ..Default::default() }
    }

    pub fn messages(&self) -> Vec<String> {
        self.events.lock().unwrap().iter().map(|e| format!("{}: {}", e.step, e.message)).collect()
    }
}

#[async_trait]
impl RunContext for RecordingCtx {
    fn run_id(&self) -> Uuid {
        self.run
    }
    fn attempt(&self) -> i32 {
        1
    }
    async fn event(&self, event: NewEvent) {
        self.events.lock().unwrap().push(event);
    }
    fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    async fn recall(&self, step: &str) -> Option<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|e| e.step == step && e.data.is_some())
            .and_then(|e| e.data.clone())
    }
}

/// A job as the engine would hand it to a provider.
pub fn job(
    kind: drover_domain::kinds::Kind,
    name: &str,
    spec: serde_json::Value,
    action: &str,
    params: serde_json::Value,
    dependencies: Vec<drover_domain::model::Resource>,
) -> drover_domain::ports::Job {
    drover_domain::ports::Job {
        run_id: Uuid::now_v7(),
        attempt: 1,
        kind,
        action: action.into(),
        params,
        resource: resource(kind, name, spec, "pending", serde_json::json!({})),
        dependencies,
        settings: Default::default(),
        secrets: Vec::new(),
    }
}

/// A resource record, as the store would return it.
pub fn resource(
    kind: drover_domain::kinds::Kind,
    name: &str,
    spec: serde_json::Value,
    state: &str,
    outputs: serde_json::Value,
) -> drover_domain::model::Resource {
    let spec = kind.validate_spec(&spec).expect("valid spec");
    drover_domain::model::Resource {
        id: Uuid::now_v7(),
        kind,
        name: name.into(),
        state: state.into(),
        spec,
        version: 1,
        spec_version: 1,
        applied_version: None,
        applied_spec: None,
        outputs,
        observed: None,
        drift: None,
        created_by: "test".into(),
        updated_by: "test".into(),
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
    }
}

/// A name no other test (or earlier run against the same moto) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// A health endpoint on `ip` (port chosen by the system) that answers
/// `GET /health` `200 OK`, and any other request `404`, until the handle is
/// aborted: what an instance of a
/// cluster with a `port` serves, for drover's health check to ask. On
/// `0.0.0.0`, it answers at every loopback address — moto's instances in a
/// `127.0.0.0/16` VPC have such private addresses.
pub async fn health_endpoint(ip: &str) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind a health endpoint");
    let port = listener.local_addr().expect("its address").port();
    let serve = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let answer: &[u8] = match buf[..n].starts_with(b"GET /health ") {
                    true => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    false => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                };
                let _ = s.write_all(answer).await;
            });
        }
    });
    (port, serve)
}
