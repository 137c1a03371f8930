//! History at scale: loads synthetic runs into a throwaway Postgres and
//! reports the latency of stats and list queries, and the engine's
//! throughput with and without those queries running beside it.
//!
//! `cargo bench -p drover-persistence --bench history -- 1000000 10000000`
//! (sizes to load, cumulatively; default 1000000). Not a test: it prints
//! figures, it asserts nothing. Uses a fresh database on `DATABASE_URL` if
//! set, else on a throwaway server; `BENCH_DATABASE_URL` names a database to
//! use as it is, keeping the runs an earlier run loaded there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{Duration as ChronoDuration, Utc};
use drover_domain::engine::{Engine, EngineConfig, Providers};
use drover_domain::model::*;
use drover_domain::ports::{Job, Provider, ProviderError, RunContext, Store};
use drover_domain::service::Service;
use drover_domain::settings::{SecretKey, Settings};
use drover_domain::stats::{Dim, Grain, RollupFilter, StatsQuery};
use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

/// Runs spread over this many days.
const DAYS: i64 = 90;
const RESOURCES: i64 = 1000;

struct Noop;

#[async_trait]
impl Provider for Noop {
    async fn apply(&self, _: &dyn RunContext, _: &Job) -> Result<Value, ProviderError> {
        Ok(json!({}))
    }
}

fn pct(mut xs: Vec<Duration>, q: f64) -> f64 {
    xs.sort();
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i].as_secs_f64() * 1000.0
}

async fn timed<F, Fut, T>(n: usize, mut f: F) -> (f64, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut xs = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        xs.push(t.elapsed());
    }
    (pct(xs.clone(), 0.5), pct(xs, 0.95))
}

/// Queues `n` no-op transitions and returns the rate at which one engine
/// (64 slots) finishes them.
async fn engine_throughput(store: &Arc<dyn Store>, n: usize, tag: &str) -> f64 {
    for i in 0..n {
        let name = format!("tp-{tag}-{}-{i}", std::process::id());
        drover_persistence::testing::queue_stop(&**store, &name, "noop", Some("qa")).await.unwrap();
    }
    let mut providers = Providers::default();
    providers.register("noop", drover_domain::kinds::cluster::KIND, Arc::new(Noop));
    let cfg =
        EngineConfig { worker_id: format!("bench-{tag}"), poll: Duration::from_millis(20), ..EngineConfig::default() };
    let engine = Engine::new(store.clone(), providers, cfg);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let tasks = engine.spawn(rx);
    loop {
        let d = store.queue_depth(Utc::now()).await.unwrap();
        if d.due == 0 && d.running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    for t in tasks {
        t.abort();
    }
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<i64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1_000_000] } else { sizes };
    // A database kept from an earlier run skips loading what it has.
    let url = match std::env::var("BENCH_DATABASE_URL") {
        Ok(url) => url,
        Err(_) => drover_persistence::testing::fresh_postgres_database().await,
    };
    let stores = drover_persistence::open(&url).await.unwrap();
    let store = stores.store.clone();
    let settings =
        Arc::new(Settings::new(store.clone(), stores.settings.clone(), SecretKey::from_hex(&"00".repeat(32)).unwrap()));
    let service = Arc::new(Service::new(store.clone(), settings));
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    drover_persistence::testing::synthetic_resources(&url, RESOURCES).await;

    let base_rate = engine_throughput(&store, 2000, "idle").await;
    println!("engine alone, empty history: {base_rate:.0} transitions/s (2000 no-op, 64 slots)");

    for target in sizes {
        let t = Instant::now();
        let loaded = drover_persistence::testing::synthetic_history(&url, target, DAYS, RESOURCES).await;
        let load_secs = t.elapsed().as_secs_f64();
        // Fold them into the rollups as the engine's folder would.
        let t = Instant::now();
        let folded = drover_domain::ports::fold_pending(&*store, usize::MAX).await.unwrap();
        let rollup_secs = t.elapsed().as_secs_f64();
        // What autovacuum does on its own in a running system.
        sqlx::query("VACUUM ANALYZE").execute(&mut conn).await.unwrap();
        let rollup_rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM run_rollups").fetch_one(&mut conn).await.unwrap();
        println!(
            "\n== {loaded} runs over {DAYS} days (load {load_secs:.0}s; folded {folded} into the rollups in \
             {rollup_secs:.0}s, {:.0} runs/s; {rollup_rows} rollup rows)",
            folded as f64 / rollup_secs
        );

        let until = Utc::now() + ChronoDuration::hours(1);
        let queries: Vec<(&str, StatsQuery)> = vec![
            (
                "stats 90d by kind,action",
                StatsQuery {
                    since: until - ChronoDuration::days(DAYS),
                    until,
                    group_by: vec![Dim::Kind, Dim::Action],
                    bucket: None,
                    filter: Default::default(),
                },
            ),
            (
                "stats 90d by environment,actor",
                StatsQuery {
                    since: until - ChronoDuration::days(DAYS),
                    until,
                    group_by: vec![Dim::Environment, Dim::Actor],
                    bucket: None,
                    filter: Default::default(),
                },
            ),
            (
                // Ends in the past: ragged hours and days at both ends.
                "stats 83d to a week ago by env,actor",
                StatsQuery {
                    since: until - ChronoDuration::days(DAYS),
                    until: until - ChronoDuration::days(7),
                    group_by: vec![Dim::Environment, Dim::Actor],
                    bucket: None,
                    filter: Default::default(),
                },
            ),
            (
                "stats 90d by day, action=scale",
                StatsQuery {
                    since: until - ChronoDuration::days(DAYS),
                    until,
                    group_by: vec![],
                    bucket: Some(Grain::Day),
                    filter: RollupFilter { action: Some("scale".into()), ..Default::default() },
                },
            ),
            (
                "stats 7d by hour,environment",
                StatsQuery {
                    since: until - ChronoDuration::days(7),
                    until,
                    group_by: vec![Dim::Environment],
                    bucket: Some(Grain::Hour),
                    filter: Default::default(),
                },
            ),
            (
                "stats 24h by actor",
                StatsQuery {
                    since: until - ChronoDuration::days(1),
                    until,
                    group_by: vec![Dim::Actor],
                    bucket: None,
                    filter: Default::default(),
                },
            ),
        ];
        for (name, q) in &queries {
            let (p50, p95) = timed(50, |_| service.stats(q)).await;
            println!("{name:<40} p50 {p50:>8.1} ms   p95 {p95:>8.1} ms");
            // The same rows read through the store alone: the rest is the
            // fold check and the merge in Rust.
            let filter = q.filter.for_query(&q.group_by);
            let (p50, p95) = timed(50, |_| async {
                for (grain, since, until) in drover_domain::stats::plan(q.since, q.until, q.bucket, Utc::now()) {
                    store.rollups(grain, since, until, &filter).await.unwrap();
                }
            })
            .await;
            println!("{:<40} p50 {p50:>8.1} ms   p95 {p95:>8.1} ms", "  of which reading rows");
        }
        let (p50, p95) = timed(50, |_| store.fold_rollups(drover_domain::stats::FOLD_BATCH)).await;
        println!("{:<40} p50 {p50:>8.1} ms   p95 {p95:>8.1} ms", "fold with nothing pending");
        let one_resource: Uuid =
            sqlx::query_scalar("SELECT id FROM resources WHERE name = 'bench-42'").fetch_one(&mut conn).await.unwrap();
        let first = store.list_runs(&RunFilter::default(), PageRequest { after: None, limit: 50 }).await.unwrap();
        let deep_cursor = first.last().map(|r| r.id);
        let lists: Vec<(&str, RunFilter, Option<Uuid>)> = vec![
            ("list newest 50", RunFilter::default(), None),
            ("list page 2 (keyset)", RunFilter::default(), deep_cursor),
            (
                "list action=scale status=failed",
                RunFilter { action: Some("scale".into()), status: Some(RunStatus::Failed), ..Default::default() },
                None,
            ),
            (
                "list environment=prod actor=user-7",
                RunFilter { environment: Some("prod".into()), actor: Some("user-7".into()), ..Default::default() },
                None,
            ),
            ("list one resource", RunFilter { resource: Some(one_resource), ..Default::default() }, None),
            ("list status=cancelled", RunFilter { status: Some(RunStatus::Cancelled), ..Default::default() }, None),
            ("list status=succeeded", RunFilter { status: Some(RunStatus::Succeeded), ..Default::default() }, None),
            (
                "list one resource status=failed",
                RunFilter { resource: Some(one_resource), status: Some(RunStatus::Failed), ..Default::default() },
                None,
            ),
            (
                "list actor=user-7 status=failed",
                RunFilter { actor: Some("user-7".into()), status: Some(RunStatus::Failed), ..Default::default() },
                None,
            ),
            ("list status=running (none)", RunFilter { status: Some(RunStatus::Running), ..Default::default() }, None),
        ];
        for (name, f, after) in &lists {
            let (p50, p95) = timed(50, |_| store.list_runs(f, PageRequest { after: *after, limit: 50 })).await;
            println!("{name:<40} p50 {p50:>8.1} ms   p95 {p95:>8.1} ms");
        }

        // The engine while dashboards query: a reader loops over the stats
        // and list queries until the engine has drained its work.
        let busy = Arc::new(AtomicBool::new(true));
        let reader = {
            let (service, store, busy) = (service.clone(), store.clone(), busy.clone());
            let q = queries[0].1.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while busy.load(Ordering::Relaxed) {
                    service.stats(&q).await.unwrap();
                    store.list_runs(&RunFilter::default(), PageRequest { after: None, limit: 50 }).await.unwrap();
                    n += 2;
                }
                n
            })
        };
        let rate = engine_throughput(&store, 2000, &format!("busy-{loaded}")).await;
        busy.store(false, Ordering::Relaxed);
        let reads = reader.await.unwrap();
        println!(
            "engine with queries beside it: {rate:.0} transitions/s ({:.2}x of alone; {reads} queries meanwhile)",
            rate / base_rate
        );
    }
}
