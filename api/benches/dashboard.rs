//! The dashboard's pages with a big history: loads 1M synthetic runs (90
//! days, 1000 clusters) into a throwaway Postgres, starts drover on it,
//! signs in, and times each page over HTTP on loopback (p50/p95 over 50
//! requests, after 5 to warm up). A page's time here is an upper bound of
//! its time on the server (it includes the loopback round trip).
//!
//! `cargo bench -p drover-api --bench dashboard -- [RUNS]` (default
//! 1000000). Not a test: it prints figures and asserts only that each page
//! answers 200. `BENCH_DATABASE_URL` names a database to use as it is,
//! keeping the runs an earlier run loaded there.

mod common;

use std::time::{Duration, Instant};

use drover_api::Config;
use drover_domain::engine::EngineConfig;
use serde_json::json;

const DAYS: i64 = 90;
const RESOURCES: i64 = 1000;
const CALLS: usize = 50;

fn pct(mut xs: Vec<Duration>, q: f64) -> f64 {
    xs.sort();
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i].as_secs_f64() * 1000.0
}

fn cookie_of(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap().to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: i64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let url = match std::env::var("BENCH_DATABASE_URL") {
        Ok(url) => url,
        Err(_) => drover_persistence::testing::fresh_postgres_database().await,
    };
    // Migrations first: drover's own start would run them, but the load
    // goes in before it starts.
    let stores = drover_persistence::open(&url).await.unwrap();
    drover_persistence::testing::synthetic_resources(&url, RESOURCES).await;
    let t = Instant::now();
    let loaded = drover_persistence::testing::synthetic_history(&url, runs, DAYS, RESOURCES).await;
    let folded = drover_domain::ports::fold_pending(&*stores.store, usize::MAX).await.unwrap();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("VACUUM ANALYZE").execute(&mut conn).await.unwrap();
    }
    println!(
        "{loaded} runs over {DAYS} days, {RESOURCES} clusters ({folded} folded; ready in {:.0}s)",
        t.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir().unwrap();
    let _cleanup = common::KillOnDrop(dir.path().to_path_buf());
    let server = drover_api::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        database_url: Some(url.clone()),
        engine: EngineConfig::default(),
        workers: false,
        bootstrap_token: Some(common::TOKEN.to_string()),
        secret_key: None,
        aws: Default::default(),
        view_max_age: drover_domain::service::VIEW_MAX_AGE,
    })
    .await
    .expect("drover starts");
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let api = common::Api { base: base.clone(), http: reqwest::Client::new() };
    // Settings to list, one of them secret, and an environment.
    api.call("POST", "/v1/environments", Some(json!({"name": "prod", "spec": {}}))).await;
    for (key, body) in [
        ("DB_URL", json!({"value": "postgres://db-1/app"})),
        ("DB_URL", json!({"value": "postgres://db-2/app"})),
        ("DB_PASSWORD", json!({"value": "s3cret", "secret": true})),
    ] {
        api.call("PUT", &format!("/v1/settings/global/{key}"), Some(body)).await;
    }

    // Sign in as a browser does.
    let page = http.get(format!("{base}/ui/sign-in")).send().await.unwrap();
    let csrf_cookie = cookie_of(&page, "drover_csrf").unwrap();
    let csrf = csrf_cookie.trim_start_matches("drover_csrf=").to_string();
    let signed = http
        .post(format!("{base}/ui/sign-in"))
        .header("cookie", &csrf_cookie)
        .form(&[("token", common::TOKEN), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    let session = cookie_of(&signed, "drover_session").expect("signed in");

    // A run to show, and a second page of the history.
    let newest = api.call("GET", "/v1/transitions?limit=1", None).await;
    let run = newest["items"][0]["id"].as_str().unwrap().to_string();
    let page1 = api.call("GET", "/v1/transitions?limit=50", None).await;
    let cursor = page1["next_cursor"].as_str().unwrap().to_string();
    let week_ago = (chrono::Utc::now() - chrono::Duration::days(7)).format("%Y-%m-%dT%H:%M").to_string();
    let pages = [
        ("overview", "/ui/".to_string()),
        ("clusters (first 50 of 1000)", "/ui/clusters".to_string()),
        ("a cluster", "/ui/clusters/bench-7".to_string()),
        ("a run", format!("/ui/runs/{run}")),
        ("history, newest 50", "/ui/history".to_string()),
        ("history, page 2 (keyset)", format!("/ui/history?cursor={cursor}")),
        ("history, failed in prod", "/ui/history?status=failed&environment=prod".to_string()),
        ("history, one actor, last week", format!("/ui/history?actor=user-7&since={week_ago}")),
        ("history, kind and action", "/ui/history?kind=cluster&action=scale".to_string()),
        ("stats, scale, 7 days by hour", "/ui/stats?days=7&action=scale".to_string()),
        ("stats, every action, 90 days by day", "/ui/stats?days=90&action=".to_string()),
        ("settings", "/ui/settings".to_string()),
        ("a setting's versions", "/ui/settings/global/DB_URL".to_string()),
    ];
    println!("\n| page | p50 (ms) | p95 (ms) |\n| --- | --- | --- |");
    for (name, path) in pages {
        let mut xs = Vec::with_capacity(CALLS);
        for i in 0..CALLS + 5 {
            let t = Instant::now();
            let r = http.get(format!("{base}{path}")).header("cookie", &session).send().await.unwrap();
            let status = r.status();
            let body = r.bytes().await.unwrap();
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
            if i >= 5 {
                xs.push(t.elapsed());
            }
        }
        println!("| {name} | {:.1} | {:.1} |", pct(xs.clone(), 0.5), pct(xs, 0.95));
    }
    server.stop().await;
}
