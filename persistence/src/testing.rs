//! A throwaway Postgres for tests.
//!
//! With `DATABASE_URL` set, tests use that server. Otherwise the first test
//! to ask starts one from the local PostgreSQL binaries (`initdb`,
//! `postgres`) in a temporary directory, as `nobody` when run as root; a
//! watchdog shell stops it and removes the directory when the test process
//! exits. Each caller gets a fresh database on it. If Postgres cannot be had,
//! this panics: a test that needs it fails, it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::Connection;

static SERVER: OnceLock<Result<String, String>> = OnceLock::new();

/// A URL to a new, empty database.
pub async fn fresh_postgres_database() -> String {
    let admin = SERVER.get_or_init(start_or_env).clone().unwrap_or_else(|e| panic!("no Postgres for tests: {e}"));
    let name = format!("drover_test_{}", uuid::Uuid::new_v4().simple());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match sqlx::PgConnection::connect(&admin).await {
            Ok(mut conn) => {
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("CREATE DATABASE on {admin}: {e}"));
                break;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "Postgres not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("could not connect to test Postgres at {admin}: {e}"),
        }
    }
    with_database(&admin, &name)
}

/// Replaces the database name of a `postgres://user@host:port/db?opts` URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..].find('/').map_or(base.len(), |i| after_scheme + i);
    let query = if query.is_empty() { String::new() } else { format!("?{query}") };
    format!("{}/{db}{query}", &base[..host_end])
}

fn start_or_env() -> Result<String, String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if url.starts_with("postgres") {
            return Ok(url);
        }
    }
    start_server()
}

fn bindir() -> Result<PathBuf, String> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    for entry in std::fs::read_dir("/usr/lib/postgresql").map_err(|e| format!("no PostgreSQL binaries: {e}"))? {
        let dir = entry.map_err(|e| e.to_string())?.path().join("bin");
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    Err("no initdb found (install PostgreSQL or set DATABASE_URL)".into())
}

fn start_server() -> Result<String, String> {
    let bin = bindir()?;
    let (dir, root) = server_dir("drover-pg-")?;
    let data = dir.join("data");
    initdb(root, &bin, &data)?;
    let port = free_port()?;
    let postgres = bin.join("postgres");
    // The watchdog outlives nothing: when the test process is gone, it stops
    // Postgres and removes the directory.
    let script = format!(
        "{prefix}'{pg}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 >'{dir}/postgres.log' 2>&1 &
         pg=$!
         while kill -0 {parent} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 1; done
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf '{dir}'",
        prefix = shell_prefix(root),
        pg = postgres.display(),
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    // Nobody waits for it: it ends with the test process.
    spawn_shell(&script).map_err(|e| format!("start postgres: {e}"))?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// A new directory for a server's files, owned by `nobody` when this runs
/// as root (Postgres refuses to run as root); and whether it does.
fn server_dir(prefix: &str) -> Result<(PathBuf, bool), String> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| e.to_string())?.keep();
    let root = nix_is_root();
    if root {
        chown_nobody(&dir)?;
    }
    Ok((dir, root))
}

const NOBODY: [&str; 3] = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];

/// `program`, run as `nobody` when this runs as root.
fn as_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The same, as a prefix for a shell command line.
fn shell_prefix(root: bool) -> String {
    if root {
        format!("setpriv {} ", NOBODY.join(" "))
    } else {
        String::new()
    }
}

fn initdb(root: bool, bin: &Path, data: &Path) -> Result<(), String> {
    let out = as_user(root, &bin.join("initdb"))
        .arg("-D")
        .arg(data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// Runs a watchdog script in the background, detached from our output.
fn spawn_shell(script: &str) -> std::io::Result<std::process::Child> {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
}

/// Queues a no-op-sized transition for benches: a cluster `name`, `up`,
/// and a `stop` of it on `provider`. Returns the run's id.
pub async fn queue_stop(
    store: &dyn drover_domain::ports::Store,
    name: &str,
    provider: &str,
    environment: Option<&str>,
) -> drover_domain::Result<uuid::Uuid> {
    use drover_domain::model::{NewResource, NewRun};
    use serde_json::json;
    let now = chrono::Utc::now();
    let r = store
        .insert_resource(&NewResource {
            id: uuid::Uuid::now_v7(),
            kind: drover_domain::kinds::cluster::KIND,
            name: name.into(),
            state: "up".into(),
            spec: json!({"image": "x", "count": 1}),
            actor: "bench".into(),
            reason: None,
            applied: false,
            now,
        })
        .await?;
    let run = store
        .insert_run(&NewRun {
            id: uuid::Uuid::now_v7(),
            resource_id: r.id,
            kind: drover_domain::kinds::cluster::KIND,
            resource_name: r.name,
            action: "stop".into(),
            params: json!({}),
            from_state: "up".into(),
            working_state: "stopping".into(),
            ok_state: "down".into(),
            err_state: "failed".into(),
            max_attempts: 3,
            actor: "bench".into(),
            reason: None,
            idempotency_key: None,
            parent_run: None,
            provider: provider.into(),
            timeout_secs: 60,
            settings: json!([]),
            environment: environment.map(str::to_string),
            now,
        })
        .await?;
    Ok(run.id)
}

/// A Postgres server of its own, under `pg_ctl`, for tests that restart or
/// crash it (the chaos suite). Stopped and removed on drop, or by a
/// watchdog if the test process dies first.
pub struct OwnPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    root: bool,
    options: String,
    watchdog: Option<std::process::Child>,
}

impl OwnPostgres {
    /// Starts a new server; panics when it cannot (a test needing it fails).
    pub fn start() -> OwnPostgres {
        let bin = bindir().unwrap_or_else(|e| panic!("no Postgres for tests: {e}"));
        let (dir, root) = server_dir("drover-pg-own-").unwrap();
        let port = free_port().unwrap();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=300",
            dir.display()
        );
        let mut pg = OwnPostgres { bin, dir, port, root, options, watchdog: None };
        initdb(root, &pg.bin, &pg.data()).unwrap();
        pg.start_again();
        let watchdog = format!(
            "while kill -0 {parent} 2>/dev/null && [ -d '{dir}' ]; do sleep 1; done
             {prefix}'{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            parent = std::process::id(),
            dir = pg.dir.display(),
            prefix = shell_prefix(root),
            pg_ctl = pg.bin.join("pg_ctl").display(),
            data = pg.data().display(),
        );
        pg.watchdog = Some(spawn_shell(&watchdog).expect("start the Postgres watchdog"));
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self, args: &[&str], log: Option<&Path>) {
        let mut c = as_user(self.root, &self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.data()).args(args);
        if let Some(log) = log {
            c.arg(log);
        }
        let out = c.output().expect("run pg_ctl");
        assert!(out.status.success(), "pg_ctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The admin URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the PostgreSQL client programs (`psql`).
    pub fn bindir(&self) -> &Path {
        &self.bin
    }

    /// Crashes the server: `pg_ctl stop -m immediate` (no shutdown
    /// checkpoint; the next start runs crash recovery).
    pub fn crash(&self) {
        self.pg_ctl(&["stop", "-m", "immediate"], None);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60", "-o", &self.options, "-l"], Some(&self.dir.join("postgres.log")));
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = as_user(self.root, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        // It sees the directory gone within a second, and exits.
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn chown_nobody(dir: &Path) -> Result<(), String> {
    let ok = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(dir).status().map_err(|e| e.to_string())?;
    ok.success().then_some(()).ok_or_else(|| format!("chown {} failed", dir.display()))
}

/// The plans Postgres makes for the statements of a resource's view on the
/// database at `url`, as text, with sequential scans priced out so that
/// the plan shows the best an index can do: a scan line without an `Index
/// Cond` under it walks the whole table (as the view's first form did, an
/// `OR` of two `IN`s, which fell to 53 requests a second with 100k runs).
pub async fn view_plans(url: &str) -> Vec<(&'static str, String)> {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query("SET enable_seqscan = off").execute(&mut conn).await.expect("set enable_seqscan");
    let mut plans = Vec::new();
    for (name, sql) in crate::store::runs::VIEW_STATEMENTS {
        let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {sql}"))
            .bind(uuid::Uuid::nil())
            .bind(5i64)
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        plans.push((*name, rows.into_iter().map(|(line,)| line).collect::<Vec<_>>().join("\n")));
    }
    plans
}

// ---------------------------------------------------------------- synthetic history, for benches

/// Inserts `n` finished runs, `from` being the first index, with their
/// outcome rows and rollup notes, as the store writes them when runs end.
const SYNTHETIC_RUNS: &str = "
WITH src AS (
    SELECT g,
        now() - (((g * 7919) % ($3 * 86400))::text || ' seconds')::interval AS created,
        (ARRAY['create','scale','stop','start','destroy'])[1 + (g % 5)] AS action,
        (ARRAY['qa','staging','prod','dev'])[1 + (g / 7 % 4)] AS env,
        'user-' || (g % 20) AS actor,
        CASE WHEN g % 10 = 0 THEN 'failed' WHEN g % 37 = 0 THEN 'cancelled' ELSE 'succeeded' END AS status,
        (50 + (g * 104729 % 5000) * (1 + g % 3))::bigint AS ms
    FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) g
), ins AS (
INSERT INTO runs (id, resource_id, kind, resource_name, action, params, from_state, working_state, ok_state,
    err_state, status, attempt, max_attempts, actor, provider, timeout_secs, created_at, run_after, started_at,
    finished_at, environment, settings, outcome)
SELECT (lpad(to_hex((extract(epoch FROM created) * 1000)::bigint), 12, '0') || substr(md5(g::text), 1, 20))::uuid,
    md5('bench-' || (g % $4))::uuid, 'cluster', 'bench-' || (g % $4), action, '{}', 'up', 'working', 'up', 'failed',
    status, 1, 3, actor, 'bench', 600, created, created,
    CASE WHEN status = 'cancelled' THEN NULL ELSE created + interval '10 milliseconds' END,
    created + interval '10 milliseconds' + ms * interval '1 millisecond', env, '[]', status
FROM src
RETURNING id, status, action, kind, environment, actor
), outcomes AS (
    INSERT INTO run_outcomes (outcome, run_id, action, kind, environment, actor)
    SELECT status, id, action, kind, environment, actor FROM ins
)
INSERT INTO rollup_pending (run_id) SELECT id FROM ins";

/// `n` clusters `bench-0` … `bench-{n-1}`, `up`, for synthetic runs to
/// belong to (Postgres only).
pub async fn synthetic_resources(url: &str, n: i64) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query(
        "INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by, updated_by)
         SELECT md5('bench-' || g)::uuid, 'cluster', 'bench-' || g, 'up', '{}', 1, '{}', now(), now(), 'bench', 'bench'
         FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING",
    )
    .bind(n)
    .execute(&mut conn)
    .await
    .expect("insert the synthetic resources");
}

/// Tops the history up to `total` synthetic finished runs over the last
/// `days` days, spread over `resources` of [`synthetic_resources`]: 5
/// actions (create, scale, stop, start, destroy), 4 environments (qa,
/// staging, prod, dev), 20 actors, 10% failed, 2.7% cancelled, durations
/// 50 ms to 15 s; with their outcome rows and rollup notes, as the store
/// writes them when runs end (fold them with
/// [`drover_domain::ports::fold_pending`]). Returns how many there are.
/// Postgres only.
pub async fn synthetic_history(url: &str, total: i64, days: i64, resources: i64) -> i64 {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let mut loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE provider = 'bench'")
        .fetch_one(&mut conn)
        .await
        .expect("count the synthetic runs");
    while loaded < total {
        let n = (total - loaded).min(1_000_000);
        sqlx::query(SYNTHETIC_RUNS)
            .bind(loaded)
            .bind(n)
            .bind(days)
            .bind(resources)
            .execute(&mut conn)
            .await
            .expect("load synthetic runs");
        loaded += n;
    }
    loaded
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database() {
        assert_eq!(super::with_database("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(super::with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            super::with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}
