//! Chaos: three `drover serve` processes on one Postgres of their own, and
//! faults injected while they work through a few hundred transitions: a
//! replica killed (`SIGKILL`), a replica frozen past its lease (`SIGSTOP`,
//! then `SIGCONT`), and Postgres crashed (`pg_ctl stop -m immediate`, down
//! for four seconds, then started again: crash recovery).
//!
//! Each transition is an image build on the local provider whose command
//! writes `(run id, attempt)` to a ledger table with a UNIQUE constraint: an
//! attempt that ran twice fails its build and so its run. After every
//! scenario: every run succeeded, once, and left its row in the ledger;
//! every image is `built`; each run has one `finish` event; the stats count
//! every run once. Each scenario prints its figures (reclaim time, attempts
//! executed).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_persistence::testing::OwnPostgres;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const TOKEN: &str = "drv_chaos_0123456789abcdefghijklmnopqrstuvwxyz";
const RUNS: usize = 200;
const REPLICAS: usize = 3;
const LEASE_SECS: u64 = 3;
/// The engine's defaults: the reaper's period and the longest wait for work.
const REAP_EVERY_SECS: u64 = 5;
const POLL_SECS: u64 = 1;

/// Sleeps a second, then writes this attempt to the ledger, retrying while
/// Postgres is away; a duplicate fails the build at once.
const BUILD: &str = r#"sleep 1
sql="INSERT INTO chaos_ledger (run_id, attempt) VALUES ('$DROVER_RUN_ID', $DROVER_ATTEMPT)"
for try in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30; do
    out=$("$CHAOS_PSQL" "$CHAOS_LEDGER" -v ON_ERROR_STOP=1 -qAtc "$sql" 2>&1) && exit 0
    case "$out" in *duplicate*) echo "$out"; exit 3 ;; esac
    sleep 0.5
done
echo "$out"
exit 1"#;

struct Replica {
    child: Child,
    base: String,
    worker: String,
    log: Arc<Mutex<String>>,
}

impl Replica {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fleet {
    // Dropped in order: replicas before their database.
    replicas: Vec<Replica>,
    db: PgPool,
    http: reqwest::Client,
    _dirs: tempfile::TempDir,
    pg: OwnPostgres,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or("drover".into())
}

fn spawn_replica(pg: &OwnPostgres, url: &str, dir: &std::path::Path, n: usize) -> Replica {
    let data = dir.join(format!("replica-{n}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--listen", "127.0.0.1:0", "--worker-concurrency", "8"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--lease-secs", &LEASE_SECS.to_string()])
        .args(["--view-max-age", "1s"])
        .env("DATABASE_URL", url)
        .env("DROVER_BOOTSTRAP_TOKEN", TOKEN)
        .env("DROVER_SECRET_KEY", "11".repeat(32))
        .env("DROVER_LOG", "info,sqlx=warn,tower_http=warn")
        .env("CHAOS_LEDGER", url)
        .env("CHAOS_PSQL", pg.bindir().join("psql"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drover");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("drover listening on http://") {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or_default().to_string());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("replica {n} did not start:\n{}", log.lock().unwrap()));
    let worker = format!("{}-{}", hostname(), child.id());
    Replica { child, base: format!("http://{addr}"), worker, log }
}

impl Fleet {
    async fn start() -> Fleet {
        let pg = OwnPostgres::start();
        let url = pg.url("postgres");
        let db = connect(&url).await;
        sqlx::query(
            "CREATE TABLE chaos_ledger (run_id UUID NOT NULL, attempt INT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now(),
                UNIQUE (run_id, attempt))",
        )
        .execute(&db)
        .await
        .unwrap();
        let dirs = tempfile::tempdir().unwrap();
        // The first bootstraps the empty database; the others join it.
        let mut replicas = vec![spawn_replica(&pg, &url, dirs.path(), 0)];
        for n in 1..REPLICAS {
            replicas.push(spawn_replica(&pg, &url, dirs.path(), n));
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Fleet { replicas, db, http, _dirs: dirs, pg }
    }

    /// Sends a request to a replica, retrying while the cluster is
    /// unavailable; the idempotency key makes the retries safe.
    async fn post(&self, replica: usize, path: &str, body: Value, key: &str) -> Value {
        let url = format!("{}{path}", self.replicas[replica].base);
        for _ in 0..100 {
            let r = self.http.post(&url).bearer_auth(TOKEN).header("Idempotency-Key", key).json(&body).send().await;
            match r {
                Ok(r) if r.status().is_success() => return r.json().await.unwrap(),
                Ok(r) if r.status().is_server_error() => {}
                Ok(r) => panic!("POST {path}: {} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("POST {path} never succeeded");
    }

    /// Creates `RUNS` images and asks each for a build, spread over the
    /// replicas.
    async fn submit(&self) {
        for i in 0..RUNS {
            let name = format!("img-{i}");
            let via = i % self.replicas.len();
            let spec = json!({"build_command": BUILD, "start_command": "true"});
            self.post(via, "/v1/images", json!({"name": name, "spec": spec}), &format!("create-{i}")).await;
            self.post(
                via,
                &format!("/v1/images/{name}/transitions"),
                json!({"action": "build", "reason": "chaos"}),
                &format!("build-{i}"),
            )
            .await;
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }

    async fn running_on(&self, r: &Replica) -> Vec<uuid::Uuid> {
        sqlx::query_scalar("SELECT id FROM runs WHERE status = 'running' AND worker = $1")
            .bind(&r.worker)
            .fetch_all(&self.db)
            .await
            .unwrap()
    }

    /// Waits until a replica holds at least `k` running runs; returns which.
    /// Any replica will do: which one the claims favour depends on timing
    /// (once in five CI runs the third replica never held three at once
    /// while the other two drained the queue).
    async fn until_busy(&self, k: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for n in (0..self.replicas.len()).rev() {
                if self.running_on(&self.replicas[n]).await.len() >= k {
                    return n;
                }
            }
            assert!(Instant::now() < deadline, "no replica ever held {k} runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until none of `runs` is held by `worker` any more; returns how
    /// long that took.
    async fn reclaimed(&self, runs: &[uuid::Uuid], worker: &str, since: Instant) -> Duration {
        let deadline = since + Duration::from_secs(120);
        loop {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM runs WHERE id = ANY($1) AND status = 'running' AND worker = $2",
            )
            .bind(runs)
            .bind(worker)
            .fetch_one(&self.db)
            .await
            .unwrap();
            if held == 0 {
                return since.elapsed();
            }
            assert!(Instant::now() < deadline, "{held} runs still held by {worker}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until_all_finished(&self) {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let open = self.count("SELECT count(*) FROM runs WHERE status IN ('queued', 'running')").await;
            let total = self.count("SELECT count(*) FROM runs WHERE kind = 'image'").await;
            if open == 0 && total == RUNS as i64 {
                return;
            }
            assert!(Instant::now() < deadline, "{open} runs still open; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        self.replicas.iter().enumerate().map(|(i, r)| format!("--- replica {i}\n{}", r.log())).collect()
    }

    /// The oracle: nothing lost, nothing done twice, every resource in a
    /// state its machine allows.
    async fn assert_exactly_once(&self) {
        let failed: Vec<(String, Option<Value>)> = sqlx::query_as(
            "SELECT resource_name, error FROM runs WHERE kind = 'image' AND status <> 'succeeded' ORDER BY 1",
        )
        .fetch_all(&self.db)
        .await
        .unwrap();
        assert!(failed.is_empty(), "runs that did not succeed: {failed:?}");
        assert_eq!(
            self.count("SELECT count(*) FROM runs WHERE kind = 'image' AND status = 'succeeded'").await,
            RUNS as i64
        );
        // Every run did its work (the UNIQUE constraint fails any attempt
        // that ran twice). The succeeding attempt may have left no row of
        // its own: a replica that finds the finished build of an earlier
        // attempt of the run on its disk adopts it instead of building again.
        let missing = self
            .count(
                "SELECT count(*) FROM runs r WHERE kind = 'image' AND NOT EXISTS
                    (SELECT 1 FROM chaos_ledger l WHERE l.run_id = r.id AND l.attempt <= r.attempt)",
            )
            .await;
        assert_eq!(missing, 0, "succeeded runs that left no ledger row");
        let stray = self
            .count("SELECT count(*) FROM chaos_ledger l WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = l.run_id)")
            .await;
        assert_eq!(stray, 0);
        // One recorded end per run: late writes of a fenced worker never land.
        let finishes = self
            .count(
                "SELECT count(*) FROM (SELECT run_id FROM run_events WHERE step = 'finish' GROUP BY run_id
                    HAVING count(*) <> 1) x",
            )
            .await;
        assert_eq!(finishes, 0, "runs with other than one finish event");
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM resources WHERE kind = 'image' GROUP BY state")
                .fetch_all(&self.db)
                .await
                .unwrap();
        assert_eq!(states, [("built".to_string(), RUNS as i64)]);
        // The rollups counted every run once, whichever replica folded it.
        let stats: Value = self
            .http
            .get(format!(
                "{}/v1/stats/transitions?kind=image&since={}",
                self.replicas[0].base,
                (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let g = &stats["groups"][0];
        assert_eq!((g["total"].as_i64(), g["succeeded"].as_i64()), (Some(RUNS as i64), Some(RUNS as i64)), "{stats}");
        let attempts = self.count("SELECT count(*) FROM chaos_ledger").await;
        println!("{RUNS} runs, {attempts} attempts executed, 0 lost, 0 duplicated");
    }
}

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new().max_connections(4).connect(url).await.expect("connect to the chaos Postgres")
}

/// The longest a lapsed lease may wait: until it expires, until a reaper
/// passes, until a worker looks for work; doubled for a loaded machine.
fn reclaim_bound() -> Duration {
    Duration::from_secs(2 * (LEASE_SECS + REAP_EVERY_SECS + POLL_SECS))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_loses_nothing() {
    let mut fleet = Fleet::start().await;
    fleet.submit().await;
    let n = fleet.until_busy(3).await;
    let victim = fleet.replicas.remove(n);
    let held = fleet.running_on(&victim).await;
    kill(victim.pid(), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let took = fleet.reclaimed(&held, &victim.worker, killed).await;
    println!("SIGKILL: {} runs reclaimed from the dead replica in {:.1}s", held.len(), took.as_secs_f64());
    assert!(took <= reclaim_bound(), "reclaim took {took:?}");
    fleet.until_all_finished().await;
    fleet.assert_exactly_once().await;
    // The reclaimed runs went on to a later attempt elsewhere; a run the
    // victim finished between the list being read and the kill is not
    // one of them.
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE id = ANY($1)
           AND (attempt > 1 OR (attempt = 1 AND worker = $2 AND status = 'succeeded'))",
    )
    .bind(&held)
    .bind(&victim.worker)
    .fetch_one(&fleet.db)
    .await
    .unwrap();
    assert_eq!(retried, held.len() as i64);
}

/// Each replica keeps a view for at most a second (`--view-max-age 1s`,
/// given to every replica here) while it writes nothing itself: a change
/// made through one replica shows in its own view at once, and in
/// another's once that second is up (the conformance suite checks the
/// bound itself; here, that separate processes do get there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_shows_at_once_on_its_replica_and_soon_on_the_others() {
    let fleet = Fleet::start().await;
    let (http, a, b) = (&fleet.http, &fleet.replicas[0].base, &fleet.replicas[1].base);
    let command = |v: &Value| v["spec"]["build_command"].as_str().unwrap_or_default().to_string();
    let spec = json!({"build_command": "echo one", "start_command": "true"});
    call(http, a, "POST", "/v1/images", Some(json!({"name": "seen", "spec": spec}))).await;
    assert_eq!(command(&call(http, b, "GET", "/v1/images/seen", None).await), "echo one");
    call(http, a, "PATCH", "/v1/images/seen", Some(json!({"spec": {"build_command": "echo two"}}))).await;
    assert_eq!(command(&call(http, a, "GET", "/v1/images/seen", None).await), "echo two", "at once where written");
    let patched = Instant::now();
    while command(&call(http, b, "GET", "/v1/images/seen", None).await) != "echo two" {
        assert!(patched.elapsed() < Duration::from_secs(10), "the other replica's view never changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("the other replica's view changed {:?} after the PATCH", patched.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_fenced_out() {
    let fleet = Fleet::start().await;
    fleet.submit().await;
    let n = fleet.until_busy(3).await;
    let victim = &fleet.replicas[n];
    let held = fleet.running_on(victim).await;
    kill(victim.pid(), Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let took = fleet.reclaimed(&held, &victim.worker, stopped).await;
    println!("SIGSTOP: {} runs reclaimed from the frozen replica in {:.1}s", held.len(), took.as_secs_f64());
    assert!(took <= reclaim_bound(), "reclaim took {took:?}");
    // Its build commands finished while it was frozen: on waking it tries
    // to record them, under leases it no longer holds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill(victim.pid(), Signal::SIGCONT).unwrap();
    fleet.until_all_finished().await;
    fleet.assert_exactly_once().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let fenced = |log: &str| log.contains("late write fenced out") || log.contains("lease lost while working");
    while !fenced(&victim.log()) {
        assert!(Instant::now() < deadline, "the frozen replica never noticed it was fenced:\n{}", victim.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_loses_nothing() {
    let fleet = Fleet::start().await;
    fleet.submit().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.count("SELECT count(*) FROM runs WHERE status = 'succeeded'").await < (RUNS / 4) as i64 {
        assert!(Instant::now() < deadline, "no progress before the crash");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Watch every replica's readiness through the crash.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watchers: Vec<_> = fleet
        .replicas
        .iter()
        .map(|r| {
            let (url, http, watching) = (format!("{}/readyz", r.base), fleet.http.clone(), watching.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while watching.load(std::sync::atomic::Ordering::Relaxed) {
                    let ok = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
                    if seen.last() != Some(&ok) {
                        seen.push(ok);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // `pg_ctl restart -m immediate`, with the server down long enough for
    // a readiness probe to see it.
    tokio::task::block_in_place(|| fleet.pg.crash());
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::block_in_place(|| fleet.pg.start_again());
    println!("Postgres crashed, stayed down 4s, and came back");
    // Give the replicas time to notice and to recover on their own.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all_ready = true;
        for r in &fleet.replicas {
            let ok =
                matches!(fleet.http.get(format!("{}/readyz", r.base)).send().await, Ok(r) if r.status().is_success());
            all_ready &= ok;
        }
        if all_ready {
            break;
        }
        assert!(Instant::now() < deadline, "replicas did not become ready again:\n{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    for (i, w) in watchers.into_iter().enumerate() {
        let seen = w.await.unwrap();
        assert_eq!(seen, [true, false, true], "replica {i}: ready, not ready while Postgres was down, ready again");
    }
    fleet.until_all_finished().await;
    fleet.assert_exactly_once().await;
}

/// A request to one drover, with the chaos token; panics unless it succeeds.
async fn call(http: &reqwest::Client, base: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut req = http.request(method.parse().unwrap(), format!("{base}{path}")).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Asks for a transition and long-polls it until it ends (or `limit`).
async fn transition(
    http: &reqwest::Client,
    base: &str,
    plural: &str,
    name: &str,
    body: Value,
    limit: Duration,
) -> Value {
    let run = call(http, base, "POST", &format!("/v1/{plural}/{name}/transitions"), Some(body)).await;
    ended(http, base, run["id"].as_str().unwrap(), limit).await
}

async fn ended(http: &reqwest::Client, base: &str, run: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let r = call(http, base, "GET", &format!("/v1/transitions/{run}?wait=5s"), None).await;
        if matches!(r["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return r;
        }
        assert!(start.elapsed() < limit, "run {run} did not end within {limit:?}: {r}");
    }
}

/// One drover on a Postgres of its own, with the local provider; whatever
/// it started (instances, HAProxies) is killed however the test ends.
struct Local {
    pg: OwnPostgres,
    url: String,
    dirs: tempfile::TempDir,
    data: std::path::PathBuf,
}

impl Drop for Local {
    fn drop(&mut self) {
        drover_ops::local::testing::kill_everything_under(&self.data);
    }
}

impl Local {
    fn start() -> (Local, Replica) {
        let pg = OwnPostgres::start();
        let url = pg.url("postgres");
        let dirs = tempfile::tempdir().unwrap();
        let data = dirs.path().join("replica-0");
        let local = Local { pg, url, dirs, data };
        let drover = local.spawn();
        (local, drover)
    }

    /// A drover on the same database and data directory.
    fn spawn(&self) -> Replica {
        spawn_replica(&self.pg, &self.url, self.dirs.path(), 0)
    }
}

/// SIGKILL of drover in the middle of a service's rolling deploy. Sampled
/// from outside throughout, the instances never exceed `count + max_surge`
/// nor fall below `count - max_unavailable` answering; the next drover on
/// the same database and data directory takes the run over once its lease
/// lapses, resumes the same plan, and the deploy ends on the new build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_resumes_after_drover_is_killed() {
    let (local, drover) = Local::start();
    let data = local.data.clone();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let (h, base) = (&http, drover.base.clone());
    let minute = Duration::from_secs(60);

    // Instances take a second to answer: the deploy of four lasts a while.
    let start = "sleep 1; exec python3 -m http.server $PORT --bind 127.0.0.1";
    let spec = json!({"build_command": "echo $DROVER_RUN_ID > index.html", "start_command": start});
    call(h, &base, "POST", "/v1/images", Some(json!({"name": "web", "spec": spec}))).await;
    assert_eq!(transition(h, &base, "images", "web", json!({"action": "build"}), minute).await["status"], "succeeded");
    let spec = json!({"image": "web", "count": 2, "health_check": {"type": "tcp"}});
    call(h, &base, "POST", "/v1/clusters", Some(json!({"name": "c1", "spec": spec}))).await;
    assert_eq!(
        transition(h, &base, "clusters", "c1", json!({"action": "create"}), minute).await["status"],
        "succeeded"
    );
    let spec =
        json!({"cluster": "c1", "image": "web", "count": 4, "health_check": {"type": "http", "path": "/index.html"}});
    let svc = call(h, &base, "POST", "/v1/services", Some(json!({"name": "app", "spec": spec}))).await;
    let svc_id = svc["id"].as_str().unwrap().to_string();
    assert_eq!(
        transition(h, &base, "services", "app", json!({"action": "start"}), minute).await["status"],
        "succeeded"
    );
    let b2 = transition(h, &base, "images", "web", json!({"action": "build"}), minute).await;
    let b2 = b2["id"].as_str().unwrap().to_string();

    let sampler = drover_ops::local::testing::Sampler::start(&data, &svc_id, Some("/index.html"));
    let run = call(h, &base, "POST", "/v1/services/app/transitions", Some(json!({"action": "deploy"}))).await;
    let run_id = run["id"].as_str().unwrap().to_string();
    // Kill it once the plan has started its second new instance.
    let state_file = data.join("services").join(&svc_id).join("instances.json");
    let deadline = Instant::now() + minute;
    loop {
        let state: Value =
            std::fs::read(&state_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let planned = state["instances"].as_array().into_iter().flatten().filter(|i| !i["plan"].is_null()).count();
        if planned >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the deploy never got going: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(drover.pid(), Signal::SIGKILL).unwrap();
    drop(drover);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let drover = local.spawn();
    let run = ended(h, &drover.base, &run_id, reclaim_bound() + minute).await;
    let bounds = sampler.finish().await;
    println!("deploy across SIGKILL: {bounds:?}, {} attempts", run["attempt"]);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["attempt"].as_i64().unwrap() >= 2, "{run}");
    assert!(bounds.samples > 20, "{bounds:?}");
    assert!(bounds.most_alive <= 5, "more than count + max_surge at some moment: {bounds:?}");
    assert!(bounds.fewest_healthy >= 4, "fewer than count - max_unavailable answering at some moment: {bounds:?}");
    let svc = call(h, &drover.base, "GET", "/v1/services/app", None).await;
    let on: Vec<&str> =
        svc["outputs"]["instances"].as_array().unwrap().iter().map(|i| i["build"].as_str().unwrap()).collect();
    assert_eq!(on, [b2.as_str(); 4]);
    // The registry lists exactly the instances that run, all on the new
    // build: none was lost or left behind across the kill.
    let registry = call(h, &drover.base, "GET", "/v1/discovery/app", None).await;
    let mut listed: Vec<(u64, String)> = registry["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["port"].as_u64().unwrap(), e["build"].as_str().unwrap().to_string()))
        .collect();
    let mut running: Vec<(u64, String)> = svc["outputs"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["port"].as_u64().unwrap(), b2.clone()))
        .collect();
    listed.sort();
    running.sort();
    assert_eq!(listed, running, "{registry}");
    let events = call(h, &drover.base, "GET", &format!("/v1/transitions/{run_id}/events"), None).await;
    let resumed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["message"].as_str().unwrap().starts_with("resuming the plan"));
    assert!(resumed, "{events}");
}

/// SIGKILL of drover in the middle of a blue/green swap, while requests go
/// through the router: HAProxy (a daemon of its own) serves every one of
/// them throughout, and the next drover takes the swap over once its lease
/// lapses and finishes it (the gates again, then the guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_finishes_after_drover_is_killed_and_haproxy_serves_throughout() {
    let (local, drover) = Local::start();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let (h, base) = (&http, drover.base.clone());
    let minute = Duration::from_secs(60);

    let spec = json!({"build_command": "echo $DROVER_RUN_ID > index.html",
        "start_command": "exec python3 -m http.server $PORT --bind 127.0.0.1"});
    call(h, &base, "POST", "/v1/images", Some(json!({"name": "web", "spec": spec}))).await;
    call(h, &base, "POST", "/v1/environments", Some(json!({"name": "prod", "spec": {}}))).await;
    let mut builds = Vec::new();
    for cluster in ["blue", "green"] {
        let b = transition(h, &base, "images", "web", json!({"action": "build"}), minute).await;
        builds.push(b["id"].as_str().unwrap().to_string());
        let spec = json!({"image": "web", "count": 2, "health_check": {"type": "tcp"}});
        call(h, &base, "POST", "/v1/clusters", Some(json!({"name": cluster, "spec": spec}))).await;
        let created = transition(h, &base, "clusters", cluster, json!({"action": "create"}), minute).await;
        assert_eq!(created["status"], "succeeded", "{created}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spec = json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": port, "backend": "site"}],
        "backends": [{"name": "site", "target": {"cluster": "blue"}, "check": {"type": "http", "path": "/index.html"}}]});
    call(h, &base, "POST", "/v1/routers", Some(json!({"name": "edge", "spec": spec}))).await;
    let created = transition(h, &base, "routers", "edge", json!({"action": "create"}), minute).await;
    assert_eq!(created["status"], "succeeded", "{created}");

    // Requests through HAProxy, about 100 a second, from outside drover.
    let going = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (going, url) = (going.clone(), format!("http://127.0.0.1:{port}/"));
        tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
            let (mut sent, mut failed, mut seen) = (0usize, Vec::new(), Vec::<String>::new());
            while going.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let body = r.text().await.unwrap_or_default().trim().to_string();
                        if seen.last() != Some(&body) {
                            seen.push(body);
                        }
                    }
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (sent, failed, seen)
        })
    };
    let params = json!({"backend": "site", "to": {"cluster": "green"}, "verify_secs": 5});
    let run =
        call(h, &base, "POST", "/v1/routers/edge/transitions", Some(json!({"action": "swap", "params": params}))).await;
    let run_id = run["id"].as_str().unwrap().to_string();
    // Kill it once traffic has moved, in the guard's window.
    let deadline = Instant::now() + minute;
    loop {
        let events = call(h, &base, "GET", &format!("/v1/transitions/{run_id}/events"), None).await;
        if events["events"].as_array().unwrap().iter().any(|e| e["step"] == "traffic") {
            break;
        }
        assert!(Instant::now() < deadline, "traffic never moved: {events}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(drover.pid(), Signal::SIGKILL).unwrap();
    drop(drover);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let drover = local.spawn();
    let run = ended(h, &drover.base, &run_id, reclaim_bound() + minute).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    going.store(false, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed, seen) = load.await.unwrap();
    println!("swap across SIGKILL: {sent} requests, {} attempts", run["attempt"]);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["attempt"].as_i64().unwrap() >= 2, "{run}");
    assert!(failed.is_empty(), "{} of {sent} requests failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert_eq!(seen.last(), Some(&builds[1]), "green serves: {seen:?}");
    assert!(seen.iter().all(|b| builds.contains(b)), "{seen:?}");
    let edge = call(h, &drover.base, "GET", "/v1/routers/edge", None).await;
    assert_eq!(edge["spec"]["backends"][0]["target"], json!({"cluster": "green"}), "{edge}");
    assert_eq!(edge["state"], "up");
}
