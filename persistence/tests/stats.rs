//! Transition statistics on a small hand-made history, on both backends.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use drover_domain::model::*;
use drover_domain::service::Service;
use drover_domain::settings::{SecretKey, Settings};
use drover_domain::stats::{Dim, Grain, Group, RollupFilter, StatsQuery};

both_backends!(stats_match_a_hand_computed_history, concurrent_folders_count_every_run_once);

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Runs one transition with exact timestamps: requested at `at`, started at
/// once, ended `ms` later with `outcome` (`None`: cancelled while queued).
async fn history(
    s: &Stores,
    name: &str,
    action: &str,
    actor: &str,
    env: Option<&str>,
    at: &str,
    run: Option<(i64, RunStatus)>,
) {
    let r = cluster(&s.store, name).await;
    let mut nr = new_run(&r, action, "pending", "creating", "up");
    nr.actor = actor.into();
    nr.environment = env.map(str::to_string);
    nr.now = t(at);
    let queued = s.store.insert_run(&nr).await.unwrap();
    match run {
        None => {
            s.store.request_cancel(queued.id, actor, None, t(at)).await.unwrap();
        }
        Some((ms, status)) => {
            let claimed = s.store.claim_runs("w", Duration::from_secs(3600), 1, t(at)).await.unwrap().remove(0);
            let mut c = done(status, if status == RunStatus::Succeeded { "up" } else { "failed" });
            c.now = t(at) + chrono::Duration::milliseconds(ms);
            s.store.complete_run(claimed.lease().unwrap(), &c).await.unwrap();
        }
    }
}

fn within(got: Option<f64>, want: f64) -> bool {
    got.is_some_and(|g| (g - want).abs() / want <= 0.02)
}

async fn stats_match_a_hand_computed_history(s: Stores) {
    use RunStatus::*;
    history(&s, "a", "create", "alice", Some("qa"), "2026-03-01T10:05:00Z", Some((100, Succeeded))).await;
    history(&s, "b", "create", "alice", Some("qa"), "2026-03-01T10:20:00Z", Some((300, Succeeded))).await;
    history(&s, "c", "create", "bob", Some("prod"), "2026-03-01T11:10:00Z", Some((1000, Failed))).await;
    history(&s, "d", "destroy", "bob", None, "2026-03-01T11:30:00Z", None).await;
    history(&s, "e", "create", "alice", Some("qa"), "2026-03-02T09:00:00Z", Some((200, Succeeded))).await;

    let settings =
        Arc::new(Settings::new(s.store.clone(), s.settings.clone(), SecretKey::from_hex(&"00".repeat(32)).unwrap()));
    let service = Service::new(s.store.clone(), settings);
    let query = |since: &str, until: &str, group_by: Vec<Dim>, bucket: Option<Grain>, filter: RollupFilter| {
        StatsQuery { since: t(since), until: t(until), group_by, bucket, filter }
    };

    // Whole days: from the daily rollups.
    let all = service
        .stats(&query("2026-03-01T00:00:00Z", "2026-03-03T00:00:00Z", vec![Dim::Kind], None, Default::default()))
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    let g: &Group = &all[0];
    assert_eq!(g.key, vec![(Dim::Kind, "cluster".to_string())]);
    assert_eq!((g.total, g.succeeded, g.failed, g.cancelled), (5, 3, 1, 1));
    assert_eq!(g.failure_rate, Some(0.25));
    assert_eq!(g.avg_ms, Some(400.0));
    assert_eq!(g.avg_success_ms, Some(200.0));
    assert_eq!(g.avg_failure_ms, Some(1000.0));
    assert_eq!(g.max_ms, Some(1000));
    assert!(within(g.p50_ms, 200.0), "{:?}", g.p50_ms);
    assert!(within(g.p95_ms, 1000.0), "{:?}", g.p95_ms);

    // A range with ragged ends: hours, a whole day, hours.
    let mixed = service
        .stats(&query("2026-02-28T23:00:00Z", "2026-03-02T10:00:00Z", vec![], None, Default::default()))
        .await
        .unwrap();
    assert_eq!(mixed[0].total, 5);
    let edge = service
        .stats(&query("2026-03-01T11:00:00Z", "2026-03-02T09:30:00Z", vec![], None, Default::default()))
        .await
        .unwrap();
    assert_eq!(edge[0].total, 3, "runs c, d and e");

    // By actor and hour.
    let hourly = service
        .stats(&query(
            "2026-03-01T10:30:00Z",
            "2026-03-02T10:00:00Z",
            vec![Dim::Actor],
            Some(Grain::Hour),
            Default::default(),
        ))
        .await
        .unwrap();
    let got: Vec<(DateTime<Utc>, &str, i64)> =
        hourly.iter().map(|g| (g.bucket.unwrap(), g.key[0].1.as_str(), g.total)).collect();
    assert_eq!(
        got,
        [
            (t("2026-03-01T10:00:00Z"), "alice", 2),
            (t("2026-03-01T11:00:00Z"), "bob", 2),
            (t("2026-03-02T09:00:00Z"), "alice", 1)
        ]
    );

    // Filtered by environment, grouped by environment and action, by day.
    let qa = RollupFilter { environment: Some("qa".into()), ..Default::default() };
    let daily = service
        .stats(&query(
            "2026-03-01T00:00:00Z",
            "2026-03-03T00:00:00Z",
            vec![Dim::Environment, Dim::Action],
            Some(Grain::Day),
            qa,
        ))
        .await
        .unwrap();
    let got: Vec<(DateTime<Utc>, i64, Option<f64>)> =
        daily.iter().map(|g| (g.bucket.unwrap(), g.succeeded, g.failure_rate)).collect();
    assert_eq!(got, [(t("2026-03-01T00:00:00Z"), 2, Some(0.0)), (t("2026-03-02T00:00:00Z"), 1, Some(0.0))]);
    assert_eq!(daily[0].key, vec![(Dim::Environment, "qa".to_string()), (Dim::Action, "create".to_string())]);

    // Nothing in range: no groups.
    assert!(service
        .stats(&query("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z", vec![], None, Default::default()))
        .await
        .unwrap()
        .is_empty());
    // Listing filters by environment and actor too.
    let f = RunFilter { environment: Some("prod".into()), ..Default::default() };
    assert_eq!(s.store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().len(), 1);
    let f = RunFilter { actor: Some("alice".into()), ..Default::default() };
    assert_eq!(s.store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().len(), 3);
}

/// Folders racing each other in small batches add every finished run to
/// the rollups exactly once.
async fn concurrent_folders_count_every_run_once(s: Stores) {
    use RunStatus::*;
    let mut want = (0, 0, 0i64);
    for i in 0..30i64 {
        let status = if i % 4 == 0 { Failed } else { Succeeded };
        let at = format!("2026-03-0{}T{:02}:15:00Z", 1 + i % 3, i % 24);
        history(&s, &format!("r{i}"), "create", "alice", Some("qa"), &at, Some((10 * i, status))).await;
        match status {
            Failed => want.1 += 1,
            _ => want.0 += 1,
        }
        want.2 += 10 * i;
    }
    let folders: Vec<_> = (0..4)
        .map(|_| {
            let store = s.store.clone();
            tokio::spawn(async move {
                let mut n = 0;
                loop {
                    match store.fold_rollups(3).await.unwrap() {
                        0 => return n,
                        k => n += k,
                    }
                }
            })
        })
        .collect();
    let mut folded = 0;
    for f in folders {
        folded += f.await.unwrap();
    }
    assert_eq!(folded, 30);
    assert_eq!(s.store.fold_rollups(100).await.unwrap(), 0, "nothing left pending");

    let settings =
        Arc::new(Settings::new(s.store.clone(), s.settings.clone(), SecretKey::from_hex(&"00".repeat(32)).unwrap()));
    let service = Service::new(s.store.clone(), settings);
    // Over the weekly, daily and hourly rows, for all actors and for alice.
    for group_by in [vec![], vec![Dim::Actor]] {
        let q = StatsQuery {
            since: t("2026-02-01T00:00:00Z"),
            until: t("2026-04-01T00:00:00Z"),
            group_by,
            bucket: None,
            filter: Default::default(),
        };
        let g = service.stats(&q).await.unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].total, g[0].succeeded, g[0].failed), (30, want.0, want.1));
        assert_eq!(g[0].avg_ms, Some(want.2 as f64 / 30.0));
        assert_eq!(g[0].max_ms, Some(290));
    }
}

/// An installation upgraded from the per-transaction rollups (migration
/// 0003) keeps its history: the upgrade marks every finished run pending and
/// the folder rebuilds the rollups from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_rebuilds_the_rollups_from_the_ledger() {
    let (url, mut conn) = postgres_at_version(3).await;
    // What 0003 held: two finished runs, one queued, and their old rollups.
    sqlx::query(
        "INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by, updated_by)
         VALUES ('00000000-0000-0000-0000-00000000000a', 'cluster', 'old', 'up', '{}', 1, '{}', now(), now(), 'a', 'a'),
                ('00000000-0000-0000-0000-00000000000b', 'cluster', 'new', 'up', '{}', 1, '{}', now(), now(), 'a', 'a')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for (id, resource, status, ms) in [
        ("00000000-0000-0000-0000-000000000001", "a", "succeeded", Some(100)),
        ("00000000-0000-0000-0000-000000000002", "a", "failed", Some(300)),
        ("00000000-0000-0000-0000-000000000003", "b", "queued", None),
    ] {
        sqlx::query(
            "INSERT INTO runs (id, resource_id, kind, resource_name, action, params, from_state, working_state, ok_state,
                err_state, status, attempt, max_attempts, actor, provider, timeout_secs, created_at, run_after,
                started_at, finished_at, environment, settings)
             VALUES ($1::uuid, ('00000000-0000-0000-0000-00000000000' || $2)::uuid, 'cluster', 'old', 'stop', '{}',
                'up', 'stopping', 'down', 'failed', $3, 1, 3, 'alice', 'local', 60, '2026-03-01T10:00:00Z',
                '2026-03-01T10:00:00Z', '2026-03-01T10:00:00Z',
                CASE WHEN $4::int IS NULL THEN NULL ELSE '2026-03-01T10:00:00Z'::timestamptz + $4::int * interval '1 ms' END,
                'qa', '[]')",
        )
        .bind(id)
        .bind(resource)
        .bind(status)
        .bind(ms)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO run_rollups VALUES ('day', '2026-03-01', 'cluster', 'stop', 'qa', '*', 'succeeded', 1, 1, 100, 100, '{}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    // The new version starts on it.
    let s = drover_persistence::open(&url).await.unwrap();
    let settings =
        Arc::new(Settings::new(s.store.clone(), s.settings.clone(), SecretKey::from_hex(&"00".repeat(32)).unwrap()));
    let service = Service::new(s.store.clone(), settings);
    let q = StatsQuery {
        since: t("2026-03-01T00:00:00Z"),
        until: t("2026-03-02T00:00:00Z"),
        group_by: vec![Dim::Actor],
        bucket: None,
        filter: Default::default(),
    };
    let g = service.stats(&q).await.unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!((g[0].key[0].1.as_str(), g[0].total, g[0].succeeded, g[0].failed), ("alice", 2, 1, 1));
    assert_eq!((g[0].avg_success_ms, g[0].avg_failure_ms, g[0].max_ms), (Some(100.0), Some(300.0), Some(300)));
    assert_eq!(s.store.fold_rollups(100).await.unwrap(), 0, "nothing left pending");
}
