//! The engine and the API under load, beside graphile-worker on the same
//! throwaway Postgres. Not a test: it prints figures, it asserts nothing.
//!
//! `bench/queue` installs what this needs and runs it; by hand:
//! `cargo bench -p drover-api --bench queue -- [runs] [sections]` (default
//! 200000 runs; sections among drain, pickup, api, memory, all by default),
//! after `npm ci` in `bench/graphile`, with `wrk` on the PATH.
//!
//! 1. Burn-down: `runs` queued no-op transitions drained by one and by two
//!    engine processes (64 slots each, `--worker-concurrency`'s default),
//!    and by one engine of 96 slots (as many runs at once as
//!    graphile-worker's 4 × 24), with the full audit (claim, events,
//!    completion, resource state, rollups); CPU (the workers and their
//!    Postgres backends), Postgres commits and WAL bytes per transition.
//!    A quarter-size drain, not reported, warms the fresh server first.
//!    Then graphile-worker 0.17.3 draining as many no-op jobs with 4
//!    processes × 24 concurrency and a local queue, measured alike. The
//!    machine is shared, so throughput swings from run to run; CPU per item
//!    is the steadier comparison.
//! 2. Pickup latency (request to claim) on an idle queue and on a queue fed
//!    at about half the rate one engine sustains.
//! 3. The API (`drover serve --no-workers`) under `wrk` at 32 connections:
//!    one cluster and a list of transitions; `pgbench -S` at 32 clients on
//!    the same server as the ceiling.
//! 4. Resident memory of an engine process idle and with 10,000 runs inside
//!    a slow provider.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_domain::engine::{Engine, EngineConfig, Providers};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use drover_persistence::testing::OwnPostgres;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const TOKEN: &str = "drv_bench_0123456789abcdefghijklmnopqrstuvwxyz";
/// Runs at once per drover engine: `--worker-concurrency`'s default.
const SLOTS: usize = 64;
const GRAPHILE_PROCESSES: usize = 4;
const GRAPHILE_CONCURRENCY: usize = 24;
const GRAPHILE_LOCAL_QUEUE: usize = 100;
/// How often a drain asks whether it is done (is any row left in the
/// queue?). Even that walks the dead rows at the front of a drained queue,
/// so asking often would steal a share of the two cores from the system
/// being measured (both systems alike); four times a second bounds the
/// error on the end time at ±0.25 s.
const DRAIN_POLL: Duration = Duration::from_millis(250);

struct Noop;

#[async_trait]
impl Provider for Noop {
    async fn apply(&self, _: &dyn RunContext, _: &Job) -> Result<Value, ProviderError> {
        Ok(json!({}))
    }
}

/// A provider that takes ten minutes: runs pile up inside it.
struct Slow;

#[async_trait]
impl Provider for Slow {
    async fn apply(&self, _: &dyn RunContext, _: &Job) -> Result<Value, ProviderError> {
        tokio::time::sleep(Duration::from_secs(600)).await;
        Ok(json!({}))
    }
}

/// Queues `n` transitions of `provider` as the API would have: a resource
/// each (one active run per resource), the run, its queue row and its
/// request event. Ids are time-ordered like the API's UUIDv7 (a millisecond
/// stamp, then a counter), so rows land in the order the API would write
/// them.
async fn load(conn: &mut PgConnection, n: i64, provider: &str, tag: &str) {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Parameters: `$1` n, `$2` the millisecond stamp, then `$3` the name
    // prefix and `$4` the provider where a statement needs them (the
    // queue's own statement takes the provider as `$3`).
    let id = |nibble: char| {
        format!("(lpad(to_hex($2::bigint), 12, '0') || '700{nibble}8' || lpad(to_hex(g), 15, '0'))::uuid")
    };
    let (resource, run) = (id('0'), id('1'));
    let statements = [
        format!(
            "INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by,
                updated_by)
             SELECT {resource}, 'cluster', $3 || g, 'up', '{{\"image\": \"x\", \"count\": 1}}', 1, '{{}}', now(), now(),
                'bench', 'bench'
             FROM generate_series(1, $1) g"
        ),
        format!(
            "INSERT INTO runs (id, resource_id, kind, resource_name, action, params, from_state, working_state, ok_state,
                err_state, status, attempt, max_attempts, actor, provider, timeout_secs, created_at, run_after, settings,
                environment)
             SELECT {run}, {resource}, 'cluster', $3 || g, 'stop', '{{}}', 'up', 'stopping', 'down', 'failed', 'queued', 0, 3,
                'bench', $4, 60, now(), now(), '[]', 'qa'
             FROM generate_series(1, $1) g"
        ),
        format!(
            "INSERT INTO run_queue (run_id, resource_id, run_after, provider)
             SELECT {run}, {resource}, now(), $3 FROM generate_series(1, $1) g"
        ),
        format!(
            "INSERT INTO run_events (run_id, at, attempt, level, step, message)
             SELECT {run}, now(), 0, 'info', 'request', 'stop requested by bench' FROM generate_series(1, $1) g"
        ),
    ];
    for (i, sql) in statements.iter().enumerate() {
        let mut q = sqlx::query(sql).bind(n).bind(ms);
        if i < 2 {
            q = q.bind(format!("{tag}-"));
        }
        if i == 1 || i == 2 {
            q = q.bind(provider);
        }
        q.execute(&mut *conn).await.unwrap();
    }
    sqlx::query("ANALYZE").execute(&mut *conn).await.unwrap();
}

async fn open_count(conn: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&mut *conn).await.unwrap()
}

/// Before a drain's clock starts: every database on the server vacuumed
/// and analysed (the one just loaded, and those earlier drains left dead
/// rows in, whose autovacuum would otherwise run during this drain), then
/// a checkpoint, so that each system starts from the same quiet server.
async fn settle(pg: &OwnPostgres) {
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE datallowconn AND datname <> 'template1'")
            .fetch_all(&mut admin)
            .await
            .unwrap();
    for (name,) in names {
        let mut conn = PgConnection::connect(&pg.url(&name)).await.unwrap();
        sqlx::query("VACUUM (ANALYZE)").execute(&mut conn).await.unwrap();
    }
    sqlx::query("CHECKPOINT").execute(&mut admin).await.unwrap();
}

/// Commits and WAL bytes of the whole server so far.
async fn db_counters(conn: &mut PgConnection) -> (i64, i64) {
    // Backends report their commits at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query_as(
        "SELECT (SELECT sum(xact_commit)::bigint FROM pg_stat_database),
                pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

fn spawn_engine(url: &str, mode: &str, slots: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--engine", url, mode, &slots.to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Engine process mode: runs until its stdin closes.
async fn engine_process(url: &str, mode: &str, slots: usize) {
    let stores = drover_persistence::open(url).await.unwrap();
    let mut providers = Providers::default();
    let provider: Arc<dyn Provider> = if mode == "slow" { Arc::new(Slow) } else { Arc::new(Noop) };
    providers.register(mode, drover_domain::kinds::cluster::KIND, provider);
    let cfg = EngineConfig {
        worker_id: format!("bench-{}", std::process::id()),
        concurrency: slots,
        lease: Duration::from_secs(600),
        heartbeat: Duration::from_secs(200),
        ..EngineConfig::default()
    };
    let engine = Engine::new(stores.store, providers, cfg);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let _tasks = engine.spawn(rx);
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
}

fn stop(mut children: Vec<Child>) {
    for c in &mut children {
        drop(c.stdin.take());
        let _ = c.kill();
        let _ = c.wait();
    }
}

async fn new_database(pg: &OwnPostgres, name: &str) -> String {
    let mut admin = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
    pg.url(name)
}

/// Drains `n` queued no-op transitions with `replicas` engine processes;
/// returns transitions per second, commits and WAL bytes per transition.
async fn drover_drain(pg: &OwnPostgres, n: i64, replicas: usize, slots: usize) -> Drain {
    let db = if slots == SLOTS { format!("drain_{replicas}") } else { format!("drain_{replicas}_{slots}") };
    drover_drain_in(pg, &db, n, replicas, slots).await
}

/// [`drover_drain`] into a database of the given name.
async fn drover_drain_in(pg: &OwnPostgres, db: &str, n: i64, replicas: usize, slots: usize) -> Drain {
    let url = new_database(pg, db).await;
    drover_persistence::open(&url).await.unwrap();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    load(&mut conn, n, "noop", "d").await;
    settle(pg).await;
    let (commits0, wal0) = db_counters(&mut conn).await;
    let (children0, backends0) = (children_cpu(), backends_cpu(db));
    let started = Instant::now();
    let engines: Vec<Child> = (0..replicas).map(|_| spawn_engine(&url, "noop", slots)).collect();
    while open_count(&mut conn, "SELECT count(*) FROM (SELECT 1 FROM run_queue LIMIT 1) q").await > 0 {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    // The folders finish the rollups: part of the audit trail.
    while open_count(&mut conn, "SELECT count(*) FROM rollup_pending").await > 0 {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let backends = backends_cpu(db) - backends0;
    stop(engines);
    let cpu = children_cpu() - children0 + backends;
    let done = open_count(&mut conn, "SELECT count(*) FROM runs WHERE status = 'succeeded'").await;
    assert_eq!(done, n, "every transition succeeded");
    let (commits1, wal1) = db_counters(&mut conn).await;
    Drain::new(n, secs, cpu, commits1 - commits0, wal1 - wal0)
}

/// One burn-down's figures.
struct Drain {
    per_sec: f64,
    /// CPU (user and system, workers and their Postgres backends) per item.
    cpu_ms: f64,
    commits: f64,
    wal_bytes: f64,
}

impl Drain {
    fn new(n: i64, secs: f64, cpu_secs: f64, commits: i64, wal: i64) -> Drain {
        let n = n as f64;
        Drain {
            per_sec: n / secs,
            cpu_ms: cpu_secs * 1000.0 / n,
            commits: commits as f64 / n,
            wal_bytes: wal as f64 / n,
        }
    }

    fn line(&self, what: &str, unit: &str) -> String {
        format!(
            "{what:<44} {:>7.0}/s  {:.3} CPU ms, {:.2} commits, {:.0} WAL bytes per {unit}",
            self.per_sec, self.cpu_ms, self.commits, self.wal_bytes
        )
    }
}

/// CPU seconds (user and system) of this process's children that have
/// ended and been waited for.
fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// CPU seconds used so far by the live Postgres backends connected to `db`
/// (their title is `postgres: <user> <db> <client> <state>`).
fn backends_cpu(db: &str) -> f64 {
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    let ticks = 100.0;
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = entry.path();
        let Ok(title) = std::fs::read(path.join("cmdline")) else { continue };
        let title = String::from_utf8_lossy(&title).replace('\0', " ");
        let words: Vec<&str> = title.split_whitespace().collect();
        if words.first() != Some(&"postgres:") || words.get(2) != Some(&db) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        // Fields after the parenthesised name: state is the 3rd, utime the
        // 14th and stime the 15th of the whole line.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        total += (rest[11].parse::<f64>().unwrap() + rest[12].parse::<f64>().unwrap()) / ticks;
    }
    total
}

async fn graphile_drain(pg: &OwnPostgres, n: i64) -> Drain {
    let url = new_database(pg, "graphile").await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/graphile");
    let cli = format!("{dir}/node_modules/.bin/graphile-worker");
    let ok = Command::new(&cli).args(["--schema-only", "-c", &url]).status().expect("graphile-worker: run bench/queue");
    assert!(ok.success(), "graphile-worker --schema-only failed");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
            SELECT ROW('noop', '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
            FROM generate_series(1, $1)))",
    )
    .bind(n)
    .execute(&mut conn)
    .await
    .unwrap();
    settle(pg).await;
    let (commits0, wal0) = db_counters(&mut conn).await;
    let (children0, backends0) = (children_cpu(), backends_cpu("graphile"));
    let started = Instant::now();
    let mut workers: Vec<Child> = (0..GRAPHILE_PROCESSES)
        .map(|_| {
            Command::new("node")
                .arg(format!("{dir}/drain.js"))
                .env("DATABASE_URL", &url)
                .env("CONCURRENCY", GRAPHILE_CONCURRENCY.to_string())
                .env("LOCAL_QUEUE", GRAPHILE_LOCAL_QUEUE.to_string())
                .stdout(Stdio::null())
                .spawn()
                .expect("node")
        })
        .collect();
    while open_count(&mut conn, "SELECT count(*) FROM (SELECT 1 FROM graphile_worker._private_jobs LIMIT 1) q").await
        > 0
    {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let backends = backends_cpu("graphile") - backends0;
    for w in &mut workers {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    }
    for w in &mut workers {
        assert!(w.wait().unwrap().success(), "a graphile-worker process failed");
    }
    let cpu = children_cpu() - children0 + backends;
    let (commits1, wal1) = db_counters(&mut conn).await;
    Drain::new(n, secs, cpu, commits1 - commits0, wal1 - wal0)
}

/// Milliseconds from request to claim of each run.
async fn latency(conn: &mut PgConnection, ids: Vec<uuid::Uuid>) -> Vec<f64> {
    sqlx::query_scalar("SELECT extract(epoch FROM started_at - created_at)::float8 * 1000 FROM runs WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(conn)
        .await
        .unwrap()
}

fn pct(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1]
}

/// Request-to-claim latency: idle (one run at a time) and fed at `rate`
/// runs per second for five seconds. Returns (p50, p99) in ms for each.
async fn pickup(pg: &OwnPostgres, rate: f64) -> ((f64, f64), (f64, f64)) {
    let url = new_database(pg, "pickup").await;
    let stores = drover_persistence::open(&url).await.unwrap();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let engine = spawn_engine(&url, "noop", 64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut n = 0;
    let mut submit = || {
        n += 1;
        let (store, name) = (stores.store.clone(), format!("p-{n}"));
        async move { drover_persistence::testing::queue_stop(&*store, &name, "noop", None).await.unwrap() }
    };
    let mut idle = Vec::new();
    for _ in 0..200 {
        let id = submit().await;
        while open_count(&mut conn, "SELECT count(*) FROM (SELECT 1 FROM run_queue LIMIT 1) q").await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        idle.push(id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle = latency(&mut conn, idle).await;
    let mut loaded = Vec::new();
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / rate);
    while started.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        loaded.push(submit().await);
        tokio::time::sleep(gap.saturating_sub(t.elapsed())).await;
    }
    while open_count(&mut conn, "SELECT count(*) FROM (SELECT 1 FROM run_queue LIMIT 1) q").await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loaded = latency(&mut conn, loaded).await;
    stop(vec![engine]);
    ((pct(idle.clone(), 0.5), pct(idle, 0.99)), (pct(loaded.clone(), 0.5), pct(loaded, 0.99)))
}

/// A child process killed when this goes out of scope, panics included.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `wrk` output → (requests/s, p50 ms, p99 ms).
fn wrk(url: &str) -> (f64, f64, f64) {
    let out = Command::new("wrk")
        .args(["-t2", "-c32", "-d10s", "--latency", "-H", &format!("Authorization: Bearer {TOKEN}"), url])
        .output()
        .expect("wrk: run bench/queue");
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |s: &str| -> f64 {
        let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic()).unwrap_or(s.len()));
        let v: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => v / 1000.0,
            "s" => v * 1000.0,
            _ => v,
        }
    };
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()));
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let non2xx = field("Non-2xx or 3xx responses:");
    assert!(non2xx.is_none(), "wrk saw errors on {url}:\n{text}");
    (rps, field("50%").map(|v| ms(&v)).unwrap_or(f64::NAN), field("99%").map(|v| ms(&v)).unwrap_or(f64::NAN))
}

/// `drover serve --no-workers` on `url`, its views kept for `view_max_age`;
/// its base URL once it is ready.
async fn serve_api(url: &str, view_max_age: &str) -> (KillOnDrop, String, tempfile::TempDir) {
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["serve", "--no-workers", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--view-max-age", view_max_age])
            .arg("--data-dir")
            .arg(data.path())
            .env("DATABASE_URL", url)
            .env("DROVER_BOOTSTRAP_TOKEN", TOKEN)
            .env("DROVER_SECRET_KEY", "11".repeat(32))
            .env("DROVER_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status().is_success()) {
        assert!(Instant::now() < deadline, "drover serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (server, base, data)
}

async fn api(pg: &OwnPostgres, runs: i64) -> Vec<(String, (f64, f64, f64))> {
    // The drained database: a cluster and a transition per run. One of the
    // drained clusters (named d-1 to d-<runs>).
    let url = pg.url("drain_1");
    let cluster = format!("/v1/clusters/d-{}", runs / 2 + 1);
    let mut out = Vec::new();
    // As installed (views kept for a second), then every view read from
    // the database (`--view-max-age 0s`).
    for (max_age, paths) in [
        (
            "1s",
            &[
                ("GET /v1/clusters/{name}", cluster.as_str()),
                ("GET /v1/transitions?limit=50", "/v1/transitions?limit=50"),
            ][..],
        ),
        ("0s", &[("GET /v1/clusters/{name}, --view-max-age 0s", cluster.as_str())][..]),
    ] {
        let (server, base, _data) = serve_api(&url, max_age).await;
        for (name, path) in paths {
            out.push((name.to_string(), wrk(&format!("{base}{path}"))));
        }
        drop(server);
    }
    // The ceiling: Postgres alone answering primary-key selects.
    new_database(pg, "pgbench").await;
    let pgbench = pg.bindir().join("pgbench");
    let conn_args = |c: &mut Command| {
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-p"]).arg(pg.port().to_string());
    };
    let mut init = Command::new(&pgbench);
    conn_args(&mut init);
    assert!(init.args(["-i", "-q", "-s", "10", "pgbench"]).output().unwrap().status.success());
    let mut run = Command::new(&pgbench);
    conn_args(&mut run);
    let res = run.args(["-S", "-c", "32", "-j", "2", "-T", "10", "pgbench"]).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN);
    let lat = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("latency average = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN);
    out.push(("pgbench -S (ceiling; avg latency)".into(), (tps, lat, f64::NAN)));
    out
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

async fn memory(pg: &OwnPostgres) -> (f64, f64) {
    let url = new_database(pg, "memory").await;
    drover_persistence::open(&url).await.unwrap();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let engine = spawn_engine(&url, "slow", 10_000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_mib(engine.id());
    load(&mut conn, 10_000, "slow", "m").await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while open_count(&mut conn, "SELECT count(*) FROM runs WHERE status = 'running'").await < 10_000 {
        assert!(Instant::now() < deadline, "10,000 runs never all started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = rss_mib(engine.id());
    stop(vec![engine]);
    (idle, busy)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if args.first().map(String::as_str) == Some("--engine") {
        return rt.block_on(engine_process(&args[1], &args[2], args[3].parse().unwrap()));
    }
    let runs: i64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    // Sections to run after the count: drain, pickup, api, memory (all by
    // default; api reads the database the drain left).
    let only: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let wanted = |s: &str| only.is_empty() || only.contains(&s);
    rt.block_on(async {
        let pg = OwnPostgres::start();
        println!("throwaway Postgres: fsync=off, full_page_writes=off (the same for both systems)\n");
        // The API section reads the database the drain leaves behind.
        let mut one_engine = None;
        if wanted("drain") || wanted("api") {
            println!("== burn-down of {runs} no-op transitions");
            // A fresh server's first drain has cost up to 1.5× more CPU per
            // transition than the next ones (BENCHMARKS.md run 11): a
            // quarter-size drain first, not reported, so that every drain
            // measured, drover's first as much as graphile-worker's, runs
            // on a server that has drained before.
            if wanted("drain") {
                drover_drain_in(&pg, "warm_up", runs / 4, 1, SLOTS).await;
            }
            let one = drover_drain(&pg, runs, 1, SLOTS).await;
            println!("{}", one.line(&format!("drover, 1 engine ({SLOTS} slots)"), "transition"));
            one_engine = Some(one.per_sec);
            if wanted("drain") {
                // As many runs at once as graphile-worker's processes together.
                let slots = GRAPHILE_PROCESSES * GRAPHILE_CONCURRENCY;
                let wide = drover_drain(&pg, runs, 1, slots).await;
                println!("{}", wide.line(&format!("drover, 1 engine ({slots} slots, as graphile-worker)"), "transition"));
                let two = drover_drain(&pg, runs, 2, SLOTS).await;
                println!("{}", two.line(&format!("drover, 2 engines ({SLOTS} slots each)"), "transition"));
                let gw = graphile_drain(&pg, runs).await;
                let name = format!(
                    "graphile-worker 0.17.3, {GRAPHILE_PROCESSES}×{GRAPHILE_CONCURRENCY}, local queue {GRAPHILE_LOCAL_QUEUE}"
                );
                println!("{}", gw.line(&name, "job"));
                println!(
                    "ratio drover/graphile-worker, throughput: 1 engine {:.2}× ({slots} slots {:.2}×), 2 engines {:.2}×",
                    one.per_sec / gw.per_sec,
                    wide.per_sec / gw.per_sec,
                    two.per_sec / gw.per_sec
                );
                println!(
                    "ratio drover/graphile-worker, work per CPU second: 1 engine {:.2}× ({slots} slots {:.2}×), 2 engines {:.2}×",
                    gw.cpu_ms / one.cpu_ms,
                    gw.cpu_ms / wide.cpu_ms,
                    gw.cpu_ms / two.cpu_ms
                );
            }
        }

        if wanted("pickup") {
            // Half of what one engine sustained, or a fixed rate when the
            // drain did not run.
            let rate = one_engine.map_or(1000.0, |r| r / 2.0);
            println!("\n== pickup latency (request to claim)");
            let (idle, loaded) = pickup(&pg, rate).await;
            println!("idle queue                      p50 {:>7.1} ms  p99 {:>7.1} ms", idle.0, idle.1);
            println!("fed at {rate:>5.0}/s                  p50 {:>7.1} ms  p99 {:>7.1} ms", loaded.0, loaded.1);
        }

        if wanted("api") {
            println!("\n== API under wrk, 32 connections, 10 s ({runs} clusters in the database)");
            for (name, (rps, p50, p99)) in api(&pg, runs).await {
                println!("{name:<44} {rps:>8.0} req/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
            }
        }

        if wanted("memory") {
            println!("\n== memory of one engine process");
            let (idle, busy) = memory(&pg).await;
            println!("idle {idle:.1} MiB; with 10,000 runs inside a slow provider {busy:.1} MiB ({:.1} KiB per run)", (busy - idle) * 1024.0 / 10_000.0);
        }
    });
}
