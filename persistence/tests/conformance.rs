//! The store conformance suite: every guarantee of the `Store` port,
//! checked against SQLite and a real Postgres.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::*;
use drover_domain::discovery::{NewEntry, Scheme};
use drover_domain::model::*;
use drover_domain::ports::{Lane, Store};
use drover_domain::Error;
use serde_json::json;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

both_backends!(
    resources_are_unique_by_kind_and_name,
    resources_page_by_keyset,
    spec_updates_are_fenced_on_version_and_active_runs,
    completions_apply_the_spec_and_version_its_changes,
    one_active_run_per_resource,
    a_run_needs_the_resource_in_its_from_state,
    claim_moves_the_resource_and_hands_out_a_lease,
    claims_in_lanes_share_the_queue_out,
    racing_claims_never_share_a_run,
    writes_are_fenced_on_the_lease,
    completions_in_a_batch_are_fenced_one_by_one,
    lapsed_leases_are_reaped_and_finished_once,
    reaping_out_of_attempts_fails_the_run,
    retry_later_requeues_with_a_delay,
    cancel_of_a_queued_run_ends_it,
    cancel_of_a_running_run_is_seen_by_the_heartbeat,
    idempotency_keys_replay_and_refuse_mismatches,
    a_key_abandoned_mid_begin_is_taken_again,
    runs_list_by_filters_newest_first,
    finished_runs_list_by_outcome_whichever_way_they_ended,
    deleted_resources_keep_their_history,
    the_queue_holds_exactly_the_active_runs,
    a_run_due_before_the_claim_cursor_waits_a_second_at_most,
    a_claim_naming_providers_takes_only_their_runs,
    a_view_reads_recent_runs_the_active_one_and_the_last_events,
    an_observation_is_leased_to_one_observer_at_a_time,
    discovery_changes_are_ordered_and_a_renewal_is_no_change,
    a_discovery_entry_leaves_when_its_ttl_lapses_unless_renewed,
    router_configs_are_numbered_per_router_and_the_serving_one_is_found,
);

both_backends_with_url!(
    a_claim_fails_a_run_whose_resource_moved,
    a_completion_batch_leaves_a_misplaced_resource_alone,
    a_queue_row_out_of_step_with_its_run_is_repaired,
    a_view_serves_its_reads_until_a_write_here_or_its_age,
    every_event_belongs_to_a_run_that_stays,
);

/// A resource's view is served from its reads while nothing was written
/// through this process's stores of the database since: a change made
/// behind them (as another replica's would be) is not seen until the
/// reads are older than the service's max age, while a write through a
/// store of the database — this one or a second opened on it, as a second
/// replica in one process — is seen at the next view.
async fn a_view_serves_its_reads_until_a_write_here_or_its_age(s: Stores, url: &str) {
    use drover_domain::kinds::cluster::KIND;
    use drover_domain::service::Service;
    use drover_domain::settings::{SecretKey, Settings};
    let store = s.store.clone();
    let key = SecretKey::from_hex(&"00".repeat(32)).unwrap();
    let settings = Arc::new(Settings::new(store.clone(), s.settings.clone(), key));
    let service = Service::new(store.clone(), settings.clone()).with_view_max_age(Duration::from_secs(3600));
    let state = |v: drover_domain::service::Overview| v.resource.state;
    for name in ["a", "b"] {
        cluster(&store, name).await;
    }
    assert_eq!(state(service.overview(KIND, "a").await.unwrap()), "pending");
    backdoor(url, "UPDATE resources SET state = 'elsewhere' WHERE name = 'a'").await;
    assert_eq!(state(service.overview(KIND, "a").await.unwrap()), "pending", "served from its reads");
    // A write through another store of the database in this process.
    let replica = drover_persistence::open(url).await.unwrap().store;
    cluster(&replica, "c").await;
    assert_eq!(state(service.overview(KIND, "a").await.unwrap()), "elsewhere", "read again after a write");
    backdoor(url, "UPDATE resources SET state = 'further' WHERE name = 'a'").await;
    cluster(&store, "d").await;
    assert_eq!(state(service.overview(KIND, "a").await.unwrap()), "further", "read again after a write");

    // Reads older than the max age are read again.
    let young = Service::new(store.clone(), settings.clone()).with_view_max_age(Duration::from_millis(50));
    assert_eq!(state(young.overview(KIND, "b").await.unwrap()), "pending");
    backdoor(url, "UPDATE resources SET state = 'elsewhere' WHERE name = 'b'").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state(young.overview(KIND, "b").await.unwrap()), "elsewhere", "read again once aged");
    // And a service that keeps nothing reads every time.
    let none = Service::new(store.clone(), settings).with_view_max_age(Duration::ZERO);
    assert_eq!(state(none.overview(KIND, "b").await.unwrap()), "elsewhere");
    backdoor(url, "UPDATE resources SET state = 'pending' WHERE name = 'b'").await;
    assert_eq!(state(none.overview(KIND, "b").await.unwrap()), "pending");
}

async fn resources_are_unique_by_kind_and_name(store: Arc<dyn Store>) {
    let a = cluster(&store, "web").await;
    assert_eq!(a.state, "pending");
    assert_eq!(a.version, 1);
    let dup = store
        .insert_resource(&NewResource {
            id: uuid::Uuid::now_v7(),
            kind: drover_domain::kinds::cluster::KIND,
            name: "web".into(),
            state: "pending".into(),
            spec: json!({}),
            actor: "tester".into(),
            reason: None,
            applied: false,
            now: Utc::now(),
        })
        .await;
    assert!(matches!(dup, Err(Error::AlreadyExists { .. })), "{dup:?}");
    // Same name, other kind: fine.
    store
        .insert_resource(&NewResource {
            id: uuid::Uuid::now_v7(),
            kind: drover_domain::kinds::image::KIND,
            name: "web".into(),
            state: "pending".into(),
            spec: json!({}),
            actor: "tester".into(),
            reason: None,
            applied: false,
            now: Utc::now(),
        })
        .await
        .unwrap();
    let by_name = store
        .get_resource(drover_domain::kinds::cluster::KIND, &ResourceKey::Name("web".into()))
        .await
        .unwrap()
        .unwrap();
    let by_id = store.get_resource(drover_domain::kinds::cluster::KIND, &ResourceKey::Id(a.id)).await.unwrap().unwrap();
    assert_eq!(by_name, by_id);
    assert_eq!(by_name.spec, json!({"image": "img", "count": 1}));
    assert!(store.get_resource(drover_domain::kinds::image::KIND, &ResourceKey::Id(a.id)).await.unwrap().is_none());
}

async fn resources_page_by_keyset(store: Arc<dyn Store>) {
    for i in 0..5 {
        cluster(&store, &format!("c{i}")).await;
    }
    let first = store
        .list_resources(drover_domain::kinds::cluster::KIND, &Default::default(), PageRequest { after: None, limit: 2 })
        .await
        .unwrap();
    let second = store
        .list_resources(
            drover_domain::kinds::cluster::KIND,
            &Default::default(),
            PageRequest { after: Some(first[1].id), limit: 2 },
        )
        .await
        .unwrap();
    let third = store
        .list_resources(
            drover_domain::kinds::cluster::KIND,
            &Default::default(),
            PageRequest { after: Some(second[1].id), limit: 2 },
        )
        .await
        .unwrap();
    let names: Vec<_> = first.iter().chain(&second).chain(&third).map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);
}

async fn spec_updates_are_fenced_on_version_and_active_runs(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    assert_eq!((r.spec_version, r.applied_version, &r.applied_spec), (1, None, &None));
    let updated = store.update_spec(&change(&r, 1, json!({"image": "img", "count": 4}), "alice")).await.unwrap();
    assert_eq!((updated.version, updated.spec_version), (2, 2));
    assert_eq!((updated.created_by.as_str(), updated.updated_by.as_str()), ("tester", "alice"));
    assert_eq!(updated.spec["count"], 4);
    let stale = store.update_spec(&change(&r, 1, json!({"image": "img", "count": 9}), "bob")).await;
    assert!(matches!(stale, Err(Error::VersionMismatch { expected: 1, current: 2 })), "{stale:?}");
    let run = store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    assert_eq!(run.spec_version, Some(2), "a run records the spec version it runs against");
    let busy = store.update_spec(&change(&updated, 2, json!({"image": "img", "count": 9}), "bob")).await;
    assert!(matches!(busy, Err(Error::Busy { run: id, .. }) if id == run.id), "{busy:?}");
    // Every write is a version, newest first, and only the winners.
    let versions = store.list_spec_versions(r.id, None, 10).await.unwrap();
    let seen: Vec<_> = versions.iter().map(|v| (v.version, v.actor.as_str(), v.spec["count"].as_i64())).collect();
    assert_eq!(seen, [(2, "alice", Some(4)), (1, "tester", Some(1))]);
    assert_eq!(versions[0].patch, json!({"count": 4}));
    assert_eq!(versions[0].reason.as_deref(), Some("alice says so"));
    assert_eq!(store.list_spec_versions(r.id, Some(2), 10).await.unwrap().len(), 1);
    assert_eq!(store.get_spec_version(r.id, 1).await.unwrap().unwrap().spec, r.spec);
    assert!(store.get_spec_version(r.id, 3).await.unwrap().is_none());
}

/// A success applies the spec: the applied spec and version follow the
/// completion, and a spec change made by the run (a scale's count) is a
/// version of its own, by the run's actor.
async fn completions_apply_the_spec_and_version_its_changes(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let created = Completion { applies_spec: true, ..done(RunStatus::Succeeded, "up") };
    store.complete_run(run.lease().unwrap(), &created).await.unwrap();
    let up = store.get_resource_by_id(r.id).await.unwrap().unwrap();
    assert_eq!((up.applied_version, up.applied_spec.as_ref()), (Some(1), Some(&r.spec)));

    // A scale to 3 that applies only the count, while a PATCH of the image
    // is pending: the count runs, the image does not.
    let patched = store.update_spec(&change(&up, 1, json!({"image": "new", "count": 1}), "alice")).await.unwrap();
    let mut scale = new_run(&patched, "scale", "up", "scaling", "up");
    scale.reason = Some("more traffic".into());
    store.insert_run(&scale).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let scaled = Completion {
        spec: Some(SpecUpdate { spec: json!({"image": "new", "count": 3}), patch: json!({"count": 3}) }),
        applied: Some(json!({"image": "img", "count": 3})),
        ..done(RunStatus::Succeeded, "up")
    };
    store.complete_run(run.lease().unwrap(), &scaled).await.unwrap();
    let after = store.get_resource_by_id(r.id).await.unwrap().unwrap();
    assert_eq!((after.spec_version, after.spec["count"].as_i64()), (3, Some(3)));
    assert_eq!(after.applied_spec, Some(json!({"image": "img", "count": 3})));
    assert_eq!(after.applied_version, Some(1), "the image change still waits");
    let v3 = store.get_spec_version(r.id, 3).await.unwrap().unwrap();
    assert_eq!(
        (v3.actor.as_str(), v3.reason.as_deref(), &v3.patch),
        ("tester", Some("more traffic"), &json!({"count": 3}))
    );

    // A failure applies nothing.
    store.insert_run(&new_run(&after, "stop", "up", "stopping", "down")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let failed = Completion { error: None, ..done(RunStatus::Failed, "up") };
    store.complete_run(run.lease().unwrap(), &failed).await.unwrap();
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().applied_version, Some(1));

    // A start applies the whole spec.
    store.insert_run(&new_run(&after, "start", "up", "starting", "up")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let started = Completion { applies_spec: true, ..done(RunStatus::Succeeded, "up") };
    store.complete_run(run.lease().unwrap(), &started).await.unwrap();
    let whole = store.get_resource_by_id(r.id).await.unwrap().unwrap();
    assert_eq!((whole.applied_version, whole.applied_spec.as_ref()), (Some(3), Some(&whole.spec)));

    // What the observer saw stands through a run that changes nothing it
    // looks at (a refresh: same state, no outputs), and goes with one that does.
    let seen = json!({"healthy": true, "summary": "3 of 3 instance(s) healthy"});
    store.set_observed(r.id, &seen).await.unwrap();
    store.insert_run(&new_run(&whole, "refresh", "up", "up", "up")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let refreshed = Completion { outputs: None, ..done(RunStatus::Succeeded, "up") };
    store.complete_run(run.lease().unwrap(), &refreshed).await.unwrap();
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().observed, Some(seen));
    store.insert_run(&new_run(&whole, "scale", "up", "scaling", "up")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    store.complete_run(run.lease().unwrap(), &done(RunStatus::Succeeded, "up")).await.unwrap();
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().observed, None, "a scale changes what runs");
}

async fn one_active_run_per_resource(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let first = store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    assert_eq!(first.status, RunStatus::Queued);
    assert_eq!(first.attempt, 0);
    let second = store.insert_run(&new_run(&r, "destroy", "pending", "destroying", "destroyed")).await;
    assert!(matches!(second, Err(Error::Busy { run, .. }) if run == first.id), "{second:?}");
    assert_eq!(store.active_run(r.id).await.unwrap().unwrap().id, first.id);
    let events = store.list_events(first.id, 0, 100).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message, "create requested by tester: because");
}

async fn a_run_needs_the_resource_in_its_from_state(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let wrong = store.insert_run(&new_run(&r, "scale", "up", "scaling", "up")).await;
    assert!(matches!(wrong, Err(Error::Moved { .. })), "{wrong:?}");
    assert!(store.active_run(r.id).await.unwrap().is_none());
}

/// Claims in the store's lanes (two on Postgres, one on SQLite) each take
/// only runs of their lane, and together every run, once.
async fn claims_in_lanes_share_the_queue_out(store: Arc<dyn Store>) {
    let mut queued = std::collections::BTreeSet::new();
    for i in 0..24 {
        let r = cluster(&store, &format!("lane-{i}")).await;
        queued.insert(store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap().id);
    }
    let of = store.claim_lanes();
    let mut claimed = std::collections::BTreeSet::new();
    for index in 0..of {
        let lane = Lane { index, of };
        for (run, _) in store.claim_jobs("w1", LEASE, 100, Utc::now(), None, lane).await.unwrap() {
            assert!(lane.holds(run.id), "lane {index} of {of} claimed {}, of another lane", run.id);
            assert!(claimed.insert(run.id), "{} claimed twice", run.id);
        }
    }
    assert_eq!(claimed, queued, "the lanes together claimed every run");
    if of > 1 {
        // Which lane a run is in comes from its id alone.
        let lanes: std::collections::BTreeSet<u8> = queued.iter().map(|id| Lane::containing(*id, of).index).collect();
        assert!(lanes.len() > 1, "24 random ids all in one lane");
    }
}

/// On Postgres the claim, the heartbeat and the completion rewrite a run's
/// row, and the claim and the heartbeat its queue row, in place (HOT
/// updates: no new index entries), since no index of either table names a
/// column they write (migrations 0006 and 0019).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rewrites_runs_and_queue_rows_in_place() {
    use sqlx::Connection;
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let store: Arc<dyn Store> = Arc::new(drover_persistence::PgStore::connect(&url, 4).await.unwrap());
    for i in 0..8 {
        let r = cluster(&store, &format!("hot-{i}")).await;
        store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    }
    let claimed = store.claim_runs("w1", LEASE, 8, Utc::now()).await.unwrap();
    assert_eq!(claimed.len(), 8);
    for run in &claimed {
        assert_eq!(store.heartbeat(run.lease().unwrap(), LEASE, Utc::now()).await.unwrap(), Some(false));
    }
    let batch: Vec<_> = claimed.iter().map(|r| (r.lease().unwrap(), done(RunStatus::Succeeded, "up"))).collect();
    assert!(store.complete_runs(&batch).await.into_iter().all(|r| r.is_ok()));
    // Each session reports its counts when it has been idle a moment.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let expected = [("run_queue", 16), ("runs", 24)];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let counts: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
             WHERE relname IN ('run_queue', 'runs') ORDER BY relname",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let all_in = expected.iter().all(|(t, n)| counts.iter().any(|(name, upd, _)| name == t && upd >= n));
        if all_in || std::time::Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (table, n) in expected {
        let (_, updated, hot) = counts.iter().find(|(name, ..)| name == table).unwrap();
        assert_eq!(*updated, n, "{table}: rewrites counted");
        assert_eq!(hot, updated, "{table}: every rewrite in place");
    }
}

/// On Postgres the claim goes out on sessions of its own that plan it once
/// (a generic plan), not afresh at every call as Postgres would choose for
/// it elsewhere: a custom plan cost about a fifth of each claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_plans_the_claim_once_per_session() {
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let pg = Arc::new(drover_persistence::PgStore::connect(&url, 4).await.unwrap());
    let store: Arc<dyn Store> = pg.clone();
    for i in 0..12 {
        let r = cluster(&store, &format!("plan-{i}")).await;
        store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    }
    // One run per claim, in each lane: claims past the cursor and from the
    // front of the queue, more than the five custom plans Postgres tries
    // before it would consider a generic one.
    let of = store.claim_lanes();
    let mut claimed = 0;
    for _ in 0..12 {
        for index in 0..of {
            claimed += store.claim_jobs("w1", LEASE, 1, Utc::now(), None, Lane { index, of }).await.unwrap().len();
        }
    }
    assert_eq!(claimed, 12);
    let (generic, custom) = pg.claim_plans().await.unwrap();
    assert!(generic > 0, "no claim was planned on the claims' sessions");
    assert_eq!(custom, 0, "the claim was planned afresh {custom} times");
}

async fn claim_moves_the_resource_and_hands_out_a_lease(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let run = store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let claimed = store.claim_jobs("w1", LEASE, 10, Utc::now(), None, Lane::ALL).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let (c, with) = &claimed[0];
    assert_eq!((c.id, c.status, c.attempt), (run.id, RunStatus::Running, 1));
    assert_eq!(c.worker.as_deref(), Some("w1"));
    assert!(c.lease_token.is_some() && c.lease_expires_at.unwrap() > Utc::now());
    let res = store.get_resource_by_id(r.id).await.unwrap().unwrap();
    assert_eq!(res.state, "creating");
    // The claim hands the resource over as it left it.
    assert_eq!(with, &res);
    assert!(store.claim_runs("w2", LEASE, 10, Utc::now()).await.unwrap().is_empty());

    store.complete_run(c.lease().unwrap(), &done(RunStatus::Succeeded, "up")).await.unwrap();
    let res = store.get_resource_by_id(r.id).await.unwrap().unwrap();
    assert_eq!((res.state.as_str(), &res.outputs), ("up", &json!({"ok": true})));
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Succeeded);
    assert!(fin.finished_at.unwrap() >= fin.started_at.unwrap());
    assert!(store.active_run(r.id).await.unwrap().is_none());
}

async fn racing_claims_never_share_a_run(store: Arc<dyn Store>) {
    let mut ids = HashSet::new();
    for i in 0..40 {
        let r = cluster(&store, &format!("c{i}")).await;
        ids.insert(store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap().id);
    }
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store.claim_runs(&format!("w{w}"), LEASE, 3, Utc::now()).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|r| r.id));
            }
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = seen.iter().copied().collect();
    assert_eq!(seen.len(), unique.len(), "a run was claimed twice");
    assert_eq!(unique, ids, "every run claimed once");
}

async fn writes_are_fenced_on_the_lease(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let real = run.lease().unwrap();
    let forged = Lease { run: run.id, token: uuid::Uuid::new_v4() };
    assert!(store.heartbeat(forged, LEASE, Utc::now()).await.unwrap().is_none());
    assert!(matches!(store.append_event(forged, &NewEvent::info("x", "y")).await, Err(Error::StaleLease { .. })));
    assert!(matches!(
        store.complete_run(forged, &done(RunStatus::Succeeded, "up")).await,
        Err(Error::StaleLease { .. })
    ));
    assert_eq!(store.heartbeat(real, LEASE, Utc::now()).await.unwrap(), Some(false));
    store.append_event(real, &NewEvent::info("step", "working")).await.unwrap();
    store.complete_run(real, &done(RunStatus::Failed, "failed")).await.unwrap();
    // Completed runs are never written again, not even by their own worker.
    assert!(matches!(store.complete_run(real, &done(RunStatus::Succeeded, "up")).await, Err(Error::StaleLease { .. })));
    assert!(store.heartbeat(real, LEASE, Utc::now()).await.unwrap().is_none());
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Failed);
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().state, "failed");
    let steps: Vec<_> = store.list_events(run.id, 0, 100).await.unwrap().into_iter().map(|e| e.step).collect();
    assert_eq!(steps, ["request", "attempt", "step", "finish"]);
}

/// A batch of completions writes each run as `complete_run` would and
/// fences each on its own lease.
async fn completions_in_a_batch_are_fenced_one_by_one(store: Arc<dyn Store>) {
    let mut resources = Vec::new();
    for name in ["a", "b", "c"] {
        let r = cluster(&store, name).await;
        store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
        resources.push(r);
    }
    let runs = store.claim_runs("w1", LEASE, 10, Utc::now()).await.unwrap();
    assert_eq!(runs.len(), 3);
    let lease = |i: usize| runs[i].lease().unwrap();
    let forged = Lease { run: runs[1].id, token: uuid::Uuid::new_v4() };
    let mut scaled = done(RunStatus::Succeeded, "up");
    scaled.spec = Some(SpecUpdate { spec: json!({"image": "web", "count": 5}), patch: json!({"count": 5}) });
    let results = store
        .complete_runs(&[
            (lease(0), scaled),
            (forged, done(RunStatus::Succeeded, "up")),
            (lease(2), done(RunStatus::Failed, "failed")),
        ])
        .await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(Error::StaleLease { .. })));
    let state = |i: usize| {
        let (store, id) = (store.clone(), runs[i].id);
        async move { store.get_run(id).await.unwrap().unwrap().status }
    };
    assert_eq!(
        (state(0).await, state(1).await, state(2).await),
        (RunStatus::Succeeded, RunStatus::Running, RunStatus::Failed)
    );
    let a = store.get_resource_by_id(resources[0].id).await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), &a.spec["count"], &a.outputs["ok"]), ("up", &json!(5), &json!(true)));
    assert_eq!(store.get_resource_by_id(resources[2].id).await.unwrap().unwrap().state, "failed");
    for (i, want) in [(0, vec!["request", "attempt", "finish"]), (1, vec!["request", "attempt"])] {
        let steps: Vec<_> = store.list_events(runs[i].id, 0, 100).await.unwrap().into_iter().map(|e| e.step).collect();
        assert_eq!(steps, want);
    }
    // Completed runs stay completed: the same batch again is all stale.
    let again = store
        .complete_runs(&[(lease(0), done(RunStatus::Failed, "failed")), (lease(2), done(RunStatus::Failed, "failed"))])
        .await;
    assert!(again.iter().all(|r| matches!(r, Err(Error::StaleLease { .. }))), "{again:?}");
}

async fn lapsed_leases_are_reaped_and_finished_once(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let t0 = Utc::now();
    let stale = store.claim_runs("w1", Duration::from_secs(1), 1, t0).await.unwrap().remove(0);
    // Nothing is reaped while the lease holds.
    assert!(store.reap_expired(t0).await.unwrap().is_empty());
    let later = t0 + chrono::Duration::seconds(5);
    assert_eq!(store.reap_expired(later).await.unwrap(), vec![stale.id]);
    assert!(store.reap_expired(later).await.unwrap().is_empty(), "reaped once");
    let requeued = store.get_run(stale.id).await.unwrap().unwrap();
    assert_eq!((requeued.status, requeued.attempt), (RunStatus::Queued, 1));
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().state, "creating");

    let fresh = store.claim_runs("w2", LEASE, 1, later).await.unwrap().remove(0);
    assert_eq!((fresh.id, fresh.attempt), (stale.id, 2));
    // The stalled worker wakes up and tries to finish: fenced out.
    let late = store.complete_run(stale.lease().unwrap(), &done(RunStatus::Succeeded, "up")).await;
    assert!(matches!(late, Err(Error::StaleLease { .. })), "{late:?}");
    store.complete_run(fresh.lease().unwrap(), &done(RunStatus::Succeeded, "up")).await.unwrap();
    let fin = store.get_run(stale.id).await.unwrap().unwrap();
    assert_eq!((fin.status, fin.worker.as_deref()), (RunStatus::Succeeded, Some("w2")));
    let finishes =
        store.list_events(stale.id, 0, 100).await.unwrap().into_iter().filter(|e| e.step == "finish").count();
    assert_eq!(finishes, 1);
}

async fn reaping_out_of_attempts_fails_the_run(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let mut nr = new_run(&r, "create", "pending", "creating", "up");
    nr.max_attempts = 1;
    store.insert_run(&nr).await.unwrap();
    let t0 = Utc::now();
    store.claim_runs("w1", Duration::from_secs(1), 1, t0).await.unwrap();
    store.reap_expired(t0 + chrono::Duration::seconds(5)).await.unwrap();
    let fin = store.get_run(nr.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Failed);
    assert_eq!(fin.error.unwrap().code, "lease_expired");
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().state, "failed");
}

async fn retry_later_requeues_with_a_delay(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let t0 = Utc::now();
    let run = store.claim_runs("w1", LEASE, 1, t0).await.unwrap().remove(0);
    let err = RunError { code: "throttled".into(), message: "slow down".into(), retryable: true, detail: None };
    let after = t0 + chrono::Duration::seconds(10);
    store.retry_later(run.lease().unwrap(), after, &err, &NewEvent::info("retry", "later")).await.unwrap();
    assert!(store.claim_runs("w1", LEASE, 1, t0).await.unwrap().is_empty(), "not due yet");
    let q = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((q.status, q.error.as_ref().map(|e| e.code.as_str())), (RunStatus::Queued, Some("throttled")));
    let again = store.claim_runs("w1", LEASE, 1, after).await.unwrap().remove(0);
    assert_eq!(again.attempt, 2);
    assert_ne!(again.lease_token, run.lease_token);
}

async fn cancel_of_a_queued_run_ends_it(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let run = store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let c = store.request_cancel(run.id, "alice", Some("wrong cluster"), Utc::now()).await.unwrap();
    assert_eq!(c.status, RunStatus::Cancelled);
    assert_eq!(c.cancel_requested_by.as_deref(), Some("alice"));
    // Never started, so the resource never left its state.
    assert_eq!(store.get_resource_by_id(r.id).await.unwrap().unwrap().state, "pending");
    assert!(store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().is_empty());
    let last = store.list_events(run.id, 0, 100).await.unwrap().pop().unwrap();
    assert_eq!(last.message, "cancelled by alice while queued: wrong cluster");
}

async fn cancel_of_a_running_run_is_seen_by_the_heartbeat(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let run = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    let c = store.request_cancel(run.id, "bob", None, Utc::now()).await.unwrap();
    assert_eq!(c.status, RunStatus::Running, "a running run stops cooperatively");
    assert!(c.cancel_requested_at.is_some());
    assert_eq!(store.heartbeat(run.lease().unwrap(), LEASE, Utc::now()).await.unwrap(), Some(true));
}

async fn idempotency_keys_replay_and_refuse_mismatches(store: Arc<dyn Store>) {
    let now = Utc::now();
    assert_eq!(store.idempotency_begin("k1", "f1", now).await.unwrap(), IdempotencyBegin::Proceed);
    assert_eq!(store.idempotency_begin("k1", "f1", now).await.unwrap(), IdempotencyBegin::InProgress);
    assert_eq!(store.idempotency_begin("k1", "f2", now).await.unwrap(), IdempotencyBegin::Mismatch);
    let saved = SavedResponse { status: 202, location: Some("/v1/transitions/x".into()), body: b"{\"a\":1}".to_vec() };
    store.idempotency_save("k1", &saved, now).await.unwrap();
    assert_eq!(store.idempotency_begin("k1", "f1", now).await.unwrap(), IdempotencyBegin::Replay(saved));
    // An abandoned key (the request failed) can be used again.
    assert_eq!(store.idempotency_begin("k2", "f", now).await.unwrap(), IdempotencyBegin::Proceed);
    store.idempotency_abandon("k2").await.unwrap();
    assert_eq!(store.idempotency_begin("k2", "f", now).await.unwrap(), IdempotencyBegin::Proceed);
    // A pending key whose server died is taken over after a while.
    let later = now + chrono::Duration::minutes(10);
    assert_eq!(store.idempotency_begin("k2", "f", later).await.unwrap(), IdempotencyBegin::Proceed);
}

/// Requests racing with one key while each that gets it gives it up (its
/// request failed): every begin answers, none errs (a key that vanished
/// between the insert and the read used to surface as a store error).
async fn a_key_abandoned_mid_begin_is_taken_again(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut proceeded = 0;
                for _ in 0..50 {
                    match store.idempotency_begin("raced", "f", Utc::now()).await.unwrap() {
                        IdempotencyBegin::Proceed => {
                            proceeded += 1;
                            store.idempotency_abandon("raced").await.unwrap();
                        }
                        IdempotencyBegin::InProgress => {}
                        other => panic!("{other:?}"),
                    }
                }
                proceeded
            })
        })
        .collect();
    let mut proceeded = 0;
    for t in tasks {
        proceeded += t.await.unwrap();
    }
    assert!(proceeded > 0);
}

async fn runs_list_by_filters_newest_first(store: Arc<dyn Store>) {
    let a = cluster(&store, "a").await;
    let b = cluster(&store, "b").await;
    let ra = store.insert_run(&new_run(&a, "create", "pending", "creating", "up")).await.unwrap();
    let rb = store.insert_run(&new_run(&b, "destroy", "pending", "destroying", "destroyed")).await.unwrap();
    let all = store.list_runs(&RunFilter::default(), PageRequest { after: None, limit: 10 }).await.unwrap();
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [rb.id, ra.id]);
    let f = RunFilter { action: Some("create".into()), ..Default::default() };
    assert_eq!(store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap()[0].id, ra.id);
    let f = RunFilter { resource: Some(b.id), status: Some(RunStatus::Queued), ..Default::default() };
    assert_eq!(store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().len(), 1);
    let f = RunFilter { status: Some(RunStatus::Running), ..Default::default() };
    assert!(store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().is_empty());
    let f = RunFilter { until: Some(ra.created_at - chrono::Duration::seconds(1)), ..Default::default() };
    assert!(store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().is_empty());
    let page2 = store.list_runs(&RunFilter::default(), PageRequest { after: Some(rb.id), limit: 10 }).await.unwrap();
    assert_eq!(page2.iter().map(|r| r.id).collect::<Vec<_>>(), [ra.id]);
}

/// The status filters for finished runs read `run_outcomes`, which the
/// trigger fills whichever way a run ended: completion, cancel while
/// queued, the reaper out of attempts. Other filters and keyset pages
/// combine with it.
async fn finished_runs_list_by_outcome_whichever_way_they_ended(store: Arc<dyn Store>) {
    let finish = |store: &Arc<dyn Store>, r: Resource, action: &'static str, from: &'static str, status: RunStatus| {
        let store = store.clone();
        async move {
            let run = store.insert_run(&new_run(&r, action, from, "working", "up")).await.unwrap();
            let claimed = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
            assert_eq!(claimed.id, run.id);
            let state = if status == RunStatus::Succeeded { "up" } else { "failed" };
            store.complete_run(claimed.lease().unwrap(), &done(status, state)).await.unwrap();
            run.id
        }
    };
    let ids = |runs: Vec<Run>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let page = |after| PageRequest { after, limit: 10 };
    let (a, b, c, d, e) = (
        cluster(&store, "a").await,
        cluster(&store, "b").await,
        cluster(&store, "c").await,
        cluster(&store, "d").await,
        cluster(&store, "e").await,
    );
    let ra = finish(&store, a, "create", "pending", RunStatus::Succeeded).await;
    let rb = finish(&store, b.clone(), "create", "pending", RunStatus::Failed).await;
    let after_b = Utc::now();
    let rc = store.insert_run(&new_run(&c, "create", "pending", "working", "up")).await.unwrap().id;
    store.request_cancel(rc, "alice", None, Utc::now()).await.unwrap();
    let mut nd = new_run(&d, "create", "pending", "working", "up");
    nd.max_attempts = 1;
    nd.environment = Some("prod".into());
    store.insert_run(&nd).await.unwrap();
    let t0 = Utc::now();
    store.claim_runs("w1", Duration::from_secs(1), 1, t0).await.unwrap();
    store.reap_expired(t0 + chrono::Duration::seconds(5)).await.unwrap();
    let re1 = finish(&store, e.clone(), "stop", "pending", RunStatus::Failed).await;
    let re2 =
        finish(&store, store.get_resource_by_id(e.id).await.unwrap().unwrap(), "start", "failed", RunStatus::Succeeded)
            .await;

    let by = |status, action: Option<&str>, resource: Option<uuid::Uuid>| RunFilter {
        status: Some(status),
        action: action.map(Into::into),
        resource,
        ..Default::default()
    };
    assert_eq!(ids(store.list_runs(&by(RunStatus::Failed, None, None), page(None)).await.unwrap()), [re1, nd.id, rb]);
    assert_eq!(ids(store.list_runs(&by(RunStatus::Succeeded, None, None), page(None)).await.unwrap()), [re2, ra]);
    assert_eq!(ids(store.list_runs(&by(RunStatus::Cancelled, None, None), page(None)).await.unwrap()), [rc]);
    assert_eq!(ids(store.list_runs(&by(RunStatus::Failed, Some("stop"), None), page(None)).await.unwrap()), [re1]);
    assert_eq!(
        ids(store.list_runs(&by(RunStatus::Failed, Some("create"), None), page(None)).await.unwrap()),
        [nd.id, rb]
    );
    assert!(store.list_runs(&by(RunStatus::Cancelled, Some("stop"), None), page(None)).await.unwrap().is_empty());
    assert_eq!(ids(store.list_runs(&by(RunStatus::Failed, None, Some(b.id)), page(None)).await.unwrap()), [rb]);
    assert_eq!(ids(store.list_runs(&by(RunStatus::Succeeded, None, Some(e.id)), page(None)).await.unwrap()), [re2]);
    // The filters the outcome rows carry.
    let mine = RunFilter {
        actor: Some("tester".into()),
        kind: Some(drover_domain::kinds::cluster::KIND),
        ..by(RunStatus::Failed, None, None)
    };
    assert_eq!(ids(store.list_runs(&mine, page(None)).await.unwrap()), [re1, nd.id, rb]);
    let prod = RunFilter { environment: Some("prod".into()), ..by(RunStatus::Failed, None, None) };
    assert_eq!(ids(store.list_runs(&prod, page(None)).await.unwrap()), [nd.id]);
    for f in [
        RunFilter { actor: Some("nobody".into()), ..by(RunStatus::Failed, None, None) },
        RunFilter { kind: Some(drover_domain::kinds::image::KIND), ..by(RunStatus::Succeeded, None, None) },
        RunFilter { environment: Some("qa".into()), ..by(RunStatus::Failed, None, None) },
    ] {
        assert!(store.list_runs(&f, page(None)).await.unwrap().is_empty(), "{f:?}");
    }
    let recent = RunFilter { since: Some(after_b), ..by(RunStatus::Failed, None, None) };
    assert_eq!(ids(store.list_runs(&recent, page(None)).await.unwrap()), [re1, nd.id]);
    // Keyset pages over one outcome.
    let first =
        store.list_runs(&by(RunStatus::Failed, None, None), PageRequest { after: None, limit: 2 }).await.unwrap();
    assert_eq!(ids(first), [re1, nd.id]);
    assert_eq!(ids(store.list_runs(&by(RunStatus::Failed, None, None), page(Some(nd.id))).await.unwrap()), [rb]);
    // Each finished run reached the rollups once.
    assert_eq!(store.fold_rollups(100).await.unwrap(), 6);
    assert_eq!(store.fold_rollups(100).await.unwrap(), 0);
}

/// Events are written only for runs that exist, and a run is never
/// deleted: the guarantees that let Postgres do without a foreign key from
/// `run_events` to `runs` (migration 0018). Every way the store writes an
/// event runs here, and then no event is without its run.
async fn every_event_belongs_to_a_run_that_stays(store: Arc<dyn Store>, url: &str) {
    let names = ["done", "retried", "cancelled", "reaped", "moved"];
    let mut runs = Vec::new();
    for name in names {
        let r = cluster(&store, name).await;
        runs.push(store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap());
    }
    store.request_cancel(runs[2].id, "alice", None, Utc::now()).await.unwrap();
    backdoor(url, "UPDATE resources SET state = 'elsewhere' WHERE name = 'moved'").await;
    let t0 = Utc::now();
    let claimed = store.claim_runs("w1", LEASE, 10, t0).await.unwrap();
    let lease_of = |i: usize| claimed.iter().find(|c| c.id == runs[i].id).unwrap().lease().unwrap();
    store.append_event(lease_of(0), &NewEvent::info("step", "working")).await.unwrap();
    store.complete_run(lease_of(0), &done(RunStatus::Succeeded, "up")).await.unwrap();
    let error = RunError { code: "later".into(), message: "try again".into(), retryable: true, detail: None };
    store.retry_later(lease_of(1), t0, &error, &NewEvent::info("retry", "again")).await.unwrap();
    store.reap_expired(t0 + LEASE + chrono::Duration::seconds(1)).await.unwrap();
    // No run has this id: its event is refused and nothing is written.
    let nobody = Lease { run: Uuid::now_v7(), token: Uuid::new_v4() };
    assert!(matches!(store.append_event(nobody, &NewEvent::info("x", "y")).await, Err(Error::StaleLease { .. })));
    assert!(store.list_events(nobody.run, 0, 10).await.unwrap().is_empty());
    for (i, run) in runs.iter().enumerate() {
        assert!(store.list_events(run.id, 0, 100).await.unwrap().len() >= 2, "{}: request and more", names[i]);
    }
    let refused = backdoor_try(url, "DELETE FROM runs").await.expect_err("a run cannot be deleted");
    assert!(refused.contains("cannot"), "{refused}");
    assert_eq!(backdoor_count(url, "SELECT count(*) FROM runs").await, names.len() as i64);
    let orphans = "SELECT count(*) FROM run_events e WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = e.run_id)";
    assert_eq!(backdoor_count(url, orphans).await, 0, "every event has its run");
}

/// A run whose resource left its `from_state` between the request and the
/// claim is not handed out: it fails with `state_conflict`, leaves the
/// queue and is recorded like any finished run.
async fn a_claim_fails_a_run_whose_resource_moved(store: Arc<dyn Store>, url: &str) {
    let (a, b) = (cluster(&store, "a").await, cluster(&store, "b").await);
    let ra = store.insert_run(&new_run(&a, "create", "pending", "creating", "up")).await.unwrap();
    let rb = store.insert_run(&new_run(&b, "create", "pending", "creating", "up")).await.unwrap();
    backdoor(url, "UPDATE resources SET state = 'elsewhere' WHERE name = 'a'").await;
    let claimed = store.claim_runs("w1", LEASE, 10, Utc::now()).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [rb.id]);
    let failed = store.get_run(ra.id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.error.unwrap().code.as_str()), (RunStatus::Failed, "state_conflict"));
    assert!(store.active_run(a.id).await.unwrap().is_none());
    assert_eq!(store.get_resource_by_id(a.id).await.unwrap().unwrap().state, "elsewhere");
    let f = RunFilter { status: Some(RunStatus::Failed), ..Default::default() };
    let listed: Vec<_> =
        store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(listed, [ra.id]);
    let steps: Vec<_> = store.list_events(ra.id, 0, 100).await.unwrap().into_iter().map(|e| e.step).collect();
    assert_eq!(steps, ["request", "claim"]);
    assert_eq!(store.fold_rollups(100).await.unwrap(), 1, "one finished run for the rollups");
}

/// A batch of completions where one run's resource is not in its working
/// state (a broken invariant) writes nothing; one by one, the others
/// complete and the culprit is named.
async fn a_completion_batch_leaves_a_misplaced_resource_alone(store: Arc<dyn Store>, url: &str) {
    for name in ["a", "b"] {
        let r = cluster(&store, name).await;
        store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    }
    let runs = store.claim_runs("w1", LEASE, 10, Utc::now()).await.unwrap();
    assert_eq!(runs.len(), 2);
    let misplaced = runs.iter().find(|r| r.resource_name == "a").unwrap();
    let fine = runs.iter().find(|r| r.resource_name == "b").unwrap();
    backdoor(url, "UPDATE resources SET state = 'elsewhere' WHERE name = 'a'").await;
    let results = store
        .complete_runs(&[
            (misplaced.lease().unwrap(), done(RunStatus::Succeeded, "up")),
            (fine.lease().unwrap(), done(RunStatus::Succeeded, "up")),
        ])
        .await;
    assert!(
        matches!(&results[0], Err(Error::Internal(m)) if m.contains(&misplaced.resource_id.to_string())),
        "{results:?}"
    );
    assert!(results[1].is_ok(), "{results:?}");
    let status = |id| {
        let store = store.clone();
        async move { store.get_run(id).await.unwrap().unwrap().status }
    };
    assert_eq!((status(misplaced.id).await, status(fine.id).await), (RunStatus::Running, RunStatus::Succeeded));
    let steps: Vec<_> = store.list_events(misplaced.id, 0, 100).await.unwrap().into_iter().map(|e| e.step).collect();
    assert_eq!(steps, ["request", "attempt"]);
    assert_eq!(store.fold_rollups(100).await.unwrap(), 1, "only the completed run reaches the rollups");
}

/// A queue row whose run ended behind the store's back (a broken
/// invariant) does not jam the queue: the claim takes the row but starts
/// nothing, and when that lease lapses the reaper drops the row.
async fn a_queue_row_out_of_step_with_its_run_is_repaired(store: Arc<dyn Store>, url: &str) {
    let (a, b) = (cluster(&store, "a").await, cluster(&store, "b").await);
    let ra = store.insert_run(&new_run(&a, "create", "pending", "creating", "up")).await.unwrap();
    let rb = store.insert_run(&new_run(&b, "create", "pending", "creating", "up")).await.unwrap();
    backdoor(url, "UPDATE runs SET status = 'cancelled', outcome = 'cancelled' WHERE resource_name = 'a'").await;
    let t0 = Utc::now();
    let claimed = store.claim_runs("w1", LEASE, 10, t0).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [rb.id], "the other run still starts");
    store.complete_run(claimed[0].lease().unwrap(), &done(RunStatus::Succeeded, "up")).await.unwrap();
    let reaped = store.reap_expired(t0 + LEASE + chrono::Duration::seconds(1)).await.unwrap();
    assert!(!reaped.contains(&ra.id), "repaired, not reaped: {reaped:?}");
    assert!(store.active_run(a.id).await.unwrap().is_none());
    let d = store.queue_depth(Utc::now()).await.unwrap();
    assert_eq!((d.due, d.waiting), (0, 0));
    // The resource takes a new run, which is claimed.
    let again = store.insert_run(&new_run(&a, "create", "pending", "creating", "up")).await.unwrap();
    let claimed = store.claim_runs("w1", LEASE, 10, Utc::now()).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [again.id]);
}

async fn deleted_resources_keep_their_history(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let wrong = store.delete_resource(r.id, "destroyed", Utc::now()).await;
    assert!(matches!(wrong, Err(Error::Moved { .. })), "only in the final state");
    let run = store.insert_run(&new_run(&r, "destroy", "pending", "destroying", "destroyed")).await.unwrap();
    let c = store.claim_runs("w", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    store.complete_run(c.lease().unwrap(), &done(RunStatus::Succeeded, "destroyed")).await.unwrap();
    store.delete_resource(r.id, "destroyed", Utc::now()).await.unwrap();
    assert!(store.get_resource_by_id(r.id).await.unwrap().is_none());
    assert_eq!(store.get_run(run.id).await.unwrap().unwrap().status, RunStatus::Succeeded);
    // The name is free again.
    cluster(&store, "web").await;
}

/// `run_queue` has a row for each queued or running run and none for any
/// other, whichever way a run ends or goes back: what the depth, the
/// active-run lookups, the status lists and the one-active-run rule read.
async fn the_queue_holds_exactly_the_active_runs(store: Arc<dyn Store>) {
    let t0 = Utc::now();
    let depth = |store: &Arc<dyn Store>| {
        let store = store.clone();
        async move {
            let d = store.queue_depth(Utc::now()).await.unwrap();
            (d.due, d.waiting, d.running)
        }
    };
    let listed = |store: &Arc<dyn Store>, status: RunStatus| {
        let store = store.clone();
        async move {
            let f = RunFilter { status: Some(status), ..Default::default() };
            let mut ids: Vec<_> = store
                .list_runs(&f, PageRequest { after: None, limit: 50 })
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let (a, b, c) = (cluster(&store, "a").await, cluster(&store, "b").await, cluster(&store, "c").await);
    let ra = store.insert_run(&new_run(&a, "create", "pending", "creating", "up")).await.unwrap();
    let rb = store.insert_run(&new_run(&b, "create", "pending", "creating", "up")).await.unwrap();
    assert_eq!(depth(&store).await, (2, 0, 0));

    // Cancelled while queued: off the queue, and the resource takes a new run.
    store.request_cancel(rb.id, "alice", None, t0).await.unwrap();
    assert_eq!(depth(&store).await, (1, 0, 0));
    let rb2 = store.insert_run(&new_run(&b, "create", "pending", "creating", "up")).await.unwrap();
    let rc = store.insert_run(&new_run(&c, "create", "pending", "creating", "up")).await.unwrap();
    assert_eq!(depth(&store).await, (3, 0, 0));
    assert_eq!(listed(&store, RunStatus::Queued).await, {
        let mut v = vec![ra.id, rb2.id, rc.id];
        v.sort();
        v
    });

    let t1 = Utc::now();
    let claimed = store.claim_runs("w1", LEASE, 10, t1).await.unwrap();
    assert_eq!(claimed.len(), 3);
    assert_eq!(depth(&store).await, (0, 0, 3));
    assert_eq!(listed(&store, RunStatus::Running).await.len(), 3);
    assert!(listed(&store, RunStatus::Queued).await.is_empty());
    let by = |id| claimed.iter().find(|r| r.id == id).unwrap().lease().unwrap();

    // Succeeded: off the queue; the resource is free again.
    store.complete_run(by(ra.id), &done(RunStatus::Succeeded, "up")).await.unwrap();
    assert!(store.active_run(a.id).await.unwrap().is_none());
    store.insert_run(&new_run(&a, "destroy", "up", "destroying", "destroyed")).await.unwrap();
    // Sent back with a delay: queued but not due.
    let err = RunError { code: "throttled".into(), message: "later".into(), retryable: true, detail: None };
    let later = Utc::now() + chrono::Duration::hours(1);
    store.retry_later(by(rb2.id), later, &err, &NewEvent::info("retry", "later")).await.unwrap();
    assert_eq!(depth(&store).await, (1, 1, 1));
    assert_eq!(store.active_run(b.id).await.unwrap().unwrap().status, RunStatus::Queued);
    // A lapsed lease: the reaper queues it again, due at the reaper's "now"
    // (a minute ahead here, so not due yet by the wall clock).
    let reaped = store.reap_expired(t1 + LEASE + chrono::Duration::seconds(30)).await.unwrap();
    assert_eq!(reaped, vec![rc.id]);
    assert_eq!(depth(&store).await, (1, 2, 0));
    let f = RunFilter { status: Some(RunStatus::Succeeded), ..Default::default() };
    let done_ids: Vec<_> =
        store.list_runs(&f, PageRequest { after: None, limit: 50 }).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(done_ids, vec![ra.id]);
}

/// Claims start past the last run the previous claim took; a run due
/// earlier that appears later is claimed when a claim past the cursor comes
/// up short, or within a second under a backlog that never runs dry.
async fn a_run_due_before_the_claim_cursor_waits_a_second_at_most(store: Arc<dyn Store>) {
    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let mut ids = Vec::new();
    for (name, minutes) in [("a", 1), ("c", 3), ("d", 4), ("e", 5)] {
        let r = cluster(&store, name).await;
        let mut run = new_run(&r, "create", "pending", "creating", "up");
        run.now = t0 + chrono::Duration::minutes(minutes);
        ids.push(store.insert_run(&run).await.unwrap().id);
    }
    let claim = |store: &Arc<dyn Store>| {
        let store = store.clone();
        async move { store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0).id }
    };
    assert_eq!(claim(&store).await, ids[0]);
    // Due before everything still queued, but behind the cursor.
    let b = cluster(&store, "b").await;
    let mut late = new_run(&b, "create", "pending", "creating", "up");
    late.now = t0;
    let late = store.insert_run(&late).await.unwrap().id;
    assert_eq!(claim(&store).await, ids[1], "past the cursor first");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(claim(&store).await, late, "from the front once a second has passed");
    assert_eq!(claim(&store).await, ids[2]);
    assert_eq!(claim(&store).await, ids[3]);
    assert!(store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().is_empty());
}

/// A replica started with `--providers` claims the runs of those providers
/// only, past the claim cursor and from the front of the queue alike; the
/// others stay queued for a replica that serves them.
async fn a_claim_naming_providers_takes_only_their_runs(store: Arc<dyn Store>) {
    let t0 = Utc::now() - chrono::Duration::minutes(10);
    let mut ids = std::collections::HashMap::new();
    for (name, provider, minutes) in [("a", "local", 1), ("b", "aws", 2), ("c", "local", 3), ("d", "builtin", 4)] {
        let r = cluster(&store, name).await;
        let mut run = new_run(&r, "create", "pending", "creating", "up");
        run.provider = provider.into();
        run.now = t0 + chrono::Duration::minutes(minutes);
        ids.insert(name, store.insert_run(&run).await.unwrap().id);
    }
    let claim = |only: &'static [&'static str], limit: u32| {
        let store = store.clone();
        async move {
            let only: Vec<String> = only.iter().map(|p| p.to_string()).collect();
            let claimed = store.claim_jobs("w1", LEASE, limit, Utc::now(), Some(&only), Lane::ALL).await.unwrap();
            claimed.into_iter().map(|(run, _)| run.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(claim(&["aws"], 10).await, vec![ids["b"]]);
    // The cursor now stands at b: c is past it, a before it.
    assert_eq!(claim(&["local"], 1).await, vec![ids["c"]], "past the cursor");
    assert_eq!(claim(&["local"], 10).await, vec![ids["a"]], "and from the front");
    assert!(claim(&["aws", "local"], 10).await.is_empty());
    let waiting = store.get_run(ids["d"]).await.unwrap().unwrap();
    assert_eq!((waiting.status, waiting.attempt), (RunStatus::Queued, 0), "untouched by the others' claims");
    assert_eq!(claim(&["builtin"], 10).await, vec![ids["d"]]);
}

/// What a resource's view reads: its newest runs with the active one
/// marked, even when a replica's clock put the active run's id behind
/// runs that ended before it, and the active run's last events.
async fn a_view_reads_recent_runs_the_active_one_and_the_last_events(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let mut ended = Vec::new();
    for _ in 0..3 {
        let run = store.insert_run(&new_run(&r, "create", "pending", "creating", "pending")).await.unwrap();
        let claimed = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
        store.complete_run(claimed.lease().unwrap(), &done(RunStatus::Succeeded, "pending")).await.unwrap();
        ended.push(run.id);
    }
    let (recent, active) = store.recent_runs(r.id, 2).await.unwrap();
    assert_eq!(recent.iter().map(|r| r.id).collect::<Vec<_>>(), [ended[2], ended[1]]);
    assert!(active.is_none());

    // Queued by a replica whose clock is behind: its id sorts first of all.
    let mut late = new_run(&r, "create", "pending", "creating", "up");
    late.id = uuid::Uuid::from_u128(ended[0].as_u128() - (1 << 80));
    let late = store.insert_run(&late).await.unwrap();
    let (recent, active) = store.recent_runs(r.id, 2).await.unwrap();
    assert_eq!(recent.iter().map(|r| r.id).collect::<Vec<_>>(), [ended[2], ended[1]]);
    assert_eq!(active.map(|a| a.id), Some(late.id));
    let (recent, active) = store.recent_runs(r.id, 10).await.unwrap();
    assert_eq!(recent.len(), 4);
    assert_eq!(active.map(|a| (a.id, a.status)), Some((late.id, RunStatus::Queued)));

    let claimed = store.claim_runs("w1", LEASE, 1, Utc::now()).await.unwrap().remove(0);
    for i in 0..7 {
        store.append_event(claimed.lease().unwrap(), &NewEvent::info("step", format!("step {i}"))).await.unwrap();
    }
    let last: Vec<String> = store.last_events(late.id, 3).await.unwrap().into_iter().map(|e| e.message).collect();
    assert_eq!(last, ["step 4", "step 5", "step 6"], "the latest, oldest first");
}

/// Observing a resource is leased: one observer at a time, renewed by its
/// holder, taken over once it lapses.
async fn an_observation_is_leased_to_one_observer_at_a_time(store: Arc<dyn Store>) {
    let r = cluster(&store, "web").await;
    let t0 = Utc::now();
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    assert!(store.lease_observation(r.id, "a", at(0), at(30)).await.unwrap());
    assert!(!store.lease_observation(r.id, "b", at(10), at(40)).await.unwrap(), "a holds it");
    assert!(store.lease_observation(r.id, "a", at(15), at(45)).await.unwrap(), "a renews");
    assert!(!store.lease_observation(r.id, "b", at(40), at(70)).await.unwrap(), "renewed until 45");
    assert!(store.lease_observation(r.id, "b", at(45), at(75)).await.unwrap(), "lapsed: b takes it over");
    assert!(!store.lease_observation(r.id, "a", at(50), at(80)).await.unwrap(), "and a no longer has it");
    let other = cluster(&store, "api").await;
    assert!(store.lease_observation(other.id, "a", at(50), at(80)).await.unwrap(), "one lease per resource");
}

/// A resource's view reads by index, never by scanning every run: checked
/// on the plans, since no test is large or timed enough to see a scan.
/// Every scan in them must be bounded by an index condition: the first form
/// of the runs statement walked the whole primary key with a filter (an
/// `Index Scan` without `Index Cond`), and fell to 53 requests a second
/// with 100k runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_statements_use_indexes() {
    let url = drover_persistence::testing::fresh_postgres_database().await;
    drover_persistence::open(&url).await.unwrap();
    for (name, plan) in drover_persistence::testing::view_plans(&url).await {
        let unbounded = unbounded_scans(&plan);
        assert!(unbounded.is_empty(), "{name} scans {unbounded:?}:\n{plan}");
    }
}

/// The scan nodes of a text plan that no index condition bounds.
fn unbounded_scans(plan: &str) -> Vec<String> {
    let lines: Vec<&str> = plan.lines().map(str::trim).collect();
    let is_node = |l: &str| l.starts_with("->") || l.starts_with("SubPlan") || l.starts_with("InitPlan");
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.contains(" Scan") && !line.starts_with("Seq Scan") {
            continue;
        }
        let props = lines[i + 1..].iter().take_while(|l| !is_node(l));
        if !props.clone().any(|l| l.starts_with("Index Cond:") || l.starts_with("Recheck Cond:")) {
            out.push(line.trim_start_matches("->").trim().to_string());
        }
    }
    out
}

/// An installation upgraded from before `run_queue` (migration 0004) keeps
/// its queue: the queued run is claimable, the running one is reaped when
/// its lease lapses, and the one-active-run rule still holds for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_moves_the_active_runs_into_the_queue() {
    let (url, mut conn) = postgres_at_version(4).await;
    let lapsed = Utc::now() - chrono::Duration::minutes(5);
    for (n, state, status) in [(1, "up", "queued"), (2, "stopping", "running"), (3, "down", "succeeded")] {
        sqlx::query(
            "INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by,
                updated_by)
             VALUES (('00000000-0000-0000-0000-00000000000' || $1)::uuid, 'cluster', 'c' || $1, $2, '{}', 1, '{}', now(),
                now(), 'a', 'a')",
        )
        .bind(n.to_string())
        .bind(state)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO runs (id, resource_id, kind, resource_name, action, params, from_state, working_state, ok_state,
                err_state, status, attempt, max_attempts, actor, provider, timeout_secs, created_at, run_after,
                started_at, finished_at, worker, lease_token, lease_expires_at, environment, settings)
             VALUES (('00000000-0000-0000-0000-00000000010' || $1)::uuid, ('00000000-0000-0000-0000-00000000000' || $1)::uuid,
                'cluster', 'c' || $1, 'stop', '{}', 'up', 'stopping', 'down', 'failed', $2,
                CASE WHEN $2 = 'queued' THEN 0 ELSE 1 END, 3, 'alice', 'local', 60, $3, $3,
                CASE WHEN $2 = 'queued' THEN NULL ELSE $3 END, CASE WHEN $2 = 'succeeded' THEN $3 END,
                CASE WHEN $2 = 'running' THEN 'gone' END, CASE WHEN $2 = 'running' THEN gen_random_uuid() END,
                CASE WHEN $2 = 'running' THEN $3 END, 'qa', '[]')",
        )
        .bind(n.to_string())
        .bind(status)
        .bind(lapsed)
        .execute(&mut conn)
        .await
        .unwrap();
    }

    let store = drover_persistence::open(&url).await.unwrap().store;
    let d = store.queue_depth(Utc::now()).await.unwrap();
    assert_eq!((d.due, d.waiting, d.running), (1, 0, 1));
    let resource = |n: u8| uuid::Uuid::from_u128(n as u128);
    let run = |n: u8| uuid::Uuid::from_u128(0x100 + n as u128);
    assert_eq!(store.active_run(resource(1)).await.unwrap().unwrap().id, run(1));
    assert_eq!(store.active_run(resource(2)).await.unwrap().unwrap().id, run(2));
    assert!(store.active_run(resource(3)).await.unwrap().is_none());
    // The finished run's outcome was filled in: status filters find it.
    let f = RunFilter { status: Some(RunStatus::Succeeded), ..Default::default() };
    let listed: Vec<_> =
        store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(listed, vec![run(3)]);
    // With the filters its outcome row carries (0007).
    let f = RunFilter { actor: Some("alice".into()), environment: Some("qa".into()), ..f };
    assert_eq!(store.list_runs(&f, PageRequest { after: None, limit: 10 }).await.unwrap().len(), 1);
    let r1 = store.get_resource_by_id(resource(1)).await.unwrap().unwrap();
    let again = store.insert_run(&new_run(&r1, "stop", "up", "stopping", "down")).await;
    assert!(matches!(again, Err(Error::Busy { run: busy, .. }) if busy == run(1)), "{again:?}");

    assert_eq!(store.reap_expired(Utc::now()).await.unwrap(), vec![run(2)]);
    // Queued before the queue knew providers (0010), they have their run's.
    let only = |p: &str| vec![p.to_string()];
    assert!(store.claim_jobs("w1", LEASE, 10, Utc::now(), Some(&only("aws")), Lane::ALL).await.unwrap().is_empty());
    let mut claimed: Vec<_> = store
        .claim_jobs("w1", LEASE, 10, Utc::now(), Some(&only("local")), Lane::ALL)
        .await
        .unwrap()
        .into_iter()
        .map(|(r, _)| r.id)
        .collect();
    claimed.sort();
    assert_eq!(claimed, vec![run(1), run(2)]);
}

/// An installation from before environments were a kind (migration 0008):
/// every environment name in use, by a live cluster or a settings scope,
/// becomes an environment, and lists filter by it. On both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_makes_an_environment_of_every_name_in_use() {
    use drover_domain::kinds::{cluster, environment};
    let (pg, _pg_conn) = postgres_at_version(7).await;
    let (lite, _dir) = sqlite_at_version(7).await;
    for (url, uuid) in [(pg.as_str(), "gen_random_uuid()"), (lite.as_str(), "randomblob(16)")] {
        let now = if url.starts_with("sqlite") { "0" } else { "now()" };
        let sql = format!(
            "INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by, updated_by)
             VALUES ({uuid}, 'cluster', 'web', 'up', '{{\"image\": \"i\", \"count\": 1, \"environment\": \"prod\"}}', 1, '{{}}', {now}, {now}, 'a', 'a'),
                    ({uuid}, 'cluster', 'old', 'destroyed', '{{\"image\": \"i\", \"count\": 1, \"environment\": \"gone\"}}', 1, '{{}}', {now}, {now}, 'a', 'a'),
                    ({uuid}, 'cluster', 'plain', 'up', '{{\"image\": \"i\", \"count\": 1}}', 1, '{{}}', {now}, {now}, 'a', 'a');
             INSERT INTO setting_versions (id, scope, key, version, value, secret, deleted, actor, created_at)
             VALUES ({uuid}, 'environment:staging', 'K', 1, 'v', false, false, 'a', {now}),
                    ({uuid}, 'environment:prod', 'K', 1, 'v', false, false, 'a', {now});"
        );
        backdoor(url, &sql).await;
        let store = drover_persistence::open(url).await.unwrap().store;
        let page = PageRequest { after: None, limit: 10 };
        let envs = store.list_resources(environment::KIND, &ResourceFilter::default(), page).await.unwrap();
        let mut names: Vec<_> = envs.iter().map(|e| e.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["gone", "prod", "staging"], "{url}");
        for e in &envs {
            assert_eq!(e.state, "active");
            assert_eq!(e.created_by, "drover");
            assert_eq!(environment::KIND.validate_spec(&e.spec).unwrap(), e.spec, "a valid, normalised spec");
        }
        let in_prod = ResourceFilter { environment: Some("prod".into()) };
        let listed = store.list_resources(cluster::KIND, &in_prod, page).await.unwrap();
        assert_eq!(listed.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["web"], "{url}");
    }
}

/// An installation upgraded from before spec versions (migration 0008):
/// each resource's spec is its version 1, and one that left its initial
/// state runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_makes_each_spec_its_first_version() {
    use drover_domain::kinds::cluster;
    let (pg, _pg_conn) = postgres_at_version(8).await;
    let (lite, _dir) = sqlite_at_version(8).await;
    for (url, uuid) in [(pg.as_str(), "gen_random_uuid()"), (lite.as_str(), "randomblob(16)")] {
        let now = if url.starts_with("sqlite") { "0" } else { "now()" };
        let sql = format!(
            "INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by, updated_by)
             VALUES ({uuid}, 'cluster', 'web', 'up', '{{\"image\": \"i\", \"count\": 2}}', 7, '{{}}', {now}, {now}, 'a', 'b'),
                    ({uuid}, 'cluster', 'new', 'pending', '{{\"image\": \"i\", \"count\": 1}}', 1, '{{}}', {now}, {now}, 'a', 'a');"
        );
        backdoor(url, &sql).await;
        let store = drover_persistence::open(url).await.unwrap().store;
        for (name, applied) in [("web", Some(1)), ("new", None)] {
            let r = store.get_resource(cluster::KIND, &ResourceKey::Name(name.into())).await.unwrap().unwrap();
            assert_eq!((r.spec_version, r.applied_version), (1, applied), "{url} {name}");
            assert_eq!(r.applied_spec.is_some(), applied.is_some());
            let v1 = store.get_spec_version(r.id, 1).await.unwrap().unwrap();
            assert_eq!((&v1.spec, &v1.patch, v1.actor.as_str()), (&r.spec, &r.spec, r.updated_by.as_str()));
            // The next change is version 2.
            let next = store.update_spec(&change(&r, 1, json!({"image": "i", "count": 5}), "c")).await.unwrap();
            assert_eq!(next.spec_version, 2);
        }
    }
}

/// A replica frozen inside a transaction (SIGSTOP between a heartbeat's two
/// statements) holds its run's row lock. The server ends such a session
/// after `IDLE_IN_TRANSACTION`, so the other replicas' reaper gets through;
/// before, it waited on the lock until the frozen replica woke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_session_cannot_stall_the_reaper() {
    use sqlx::{ConnectOptions, Connection};
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let store = drover_persistence::open(&url).await.unwrap().store;
    let r = cluster(&store, "web").await;
    store.insert_run(&new_run(&r, "create", "pending", "creating", "up")).await.unwrap();
    let t0 = Utc::now();
    let run = store.claim_runs("frozen", Duration::from_secs(1), 1, t0).await.unwrap().remove(0);
    // The frozen replica's session: the heartbeat's first statement took
    // the row, then the process stopped.
    let mut frozen = drover_persistence::PgStore::session_options(&url).unwrap().connect().await.unwrap();
    let mut tx = frozen.begin().await.unwrap();
    sqlx::query("UPDATE runs SET heartbeat_at = heartbeat_at WHERE id = $1")
        .bind(run.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let later = t0 + chrono::Duration::seconds(5);
    let patience = drover_persistence::IDLE_IN_TRANSACTION + Duration::from_secs(10);
    let reaped = tokio::time::timeout(patience, store.reap_expired(later)).await;
    assert_eq!(reaped.expect("the reaper waited on the frozen session's lock").unwrap(), vec![run.id]);
    // The frozen session wakes to find itself ended: its write never lands.
    assert!(tx.commit().await.is_err());
    assert_eq!(store.get_run(run.id).await.unwrap().unwrap().status, RunStatus::Queued);
}

fn entry(service: (Uuid, &str), instance: &str, port: u16) -> NewEntry {
    NewEntry {
        service_id: service.0,
        service: service.1.into(),
        instance: instance.into(),
        index: 0,
        machine: "c1-0".into(),
        address: "127.0.0.1".into(),
        port,
        build: Some("b1".into()),
        scheme: Scheme::Http,
        host_port: None,
    }
}

/// Every change of the registry takes the next index, in the order the
/// changes happened; a renewal of an entry as it is changes nothing a
/// watcher sees (no index, no log row) but its expiry; a watcher's ticks
/// follow the changes.
async fn discovery_changes_are_ordered_and_a_renewal_is_no_change(stores: Stores) {
    let d = stores.discovery;
    let (app, db) = ((Uuid::now_v7(), "app"), (Uuid::now_v7(), "db"));
    let now = Utc::now();
    let ttl = chrono::Duration::seconds(30);
    let mut ticks = d.discovery_watch();
    assert_eq!(d.discovery_snapshot(None).await.unwrap().index, 0);

    assert_eq!(d.discovery_enter(&entry(app, "0-a", 4000), "healthy", "run-1", now, now + ttl).await.unwrap(), Some(1));
    assert!(ticks.has_changed().unwrap(), "a watcher is woken");
    assert_eq!(*ticks.borrow_and_update(), 1);
    let later = now + chrono::Duration::seconds(5);
    assert_eq!(
        d.discovery_enter(&entry(app, "0-a", 4000), "healthy", "observer", later, later + ttl).await.unwrap(),
        None
    );
    assert!(!ticks.has_changed().unwrap(), "a renewal wakes nobody");
    let snap = d.discovery_snapshot(None).await.unwrap();
    assert_eq!(snap.index, 1);
    assert_eq!(snap.entries.len(), 1);
    assert_eq!(snap.entries[0].expires_at.timestamp(), (later + ttl).timestamp(), "renewed");
    assert_eq!(snap.entries[0].registered_at.timestamp(), now.timestamp(), "not entered again");
    // A moved instance is a change.
    assert_eq!(d.discovery_enter(&entry(app, "0-a", 4001), "moved", "run-1", now, now + ttl).await.unwrap(), Some(2));
    assert_eq!(d.discovery_enter(&entry(app, "1-b", 4002), "healthy", "run-1", now, now + ttl).await.unwrap(), Some(3));
    assert_eq!(d.discovery_enter(&entry(db, "0-c", 5000), "healthy", "run-2", now, now + ttl).await.unwrap(), Some(4));
    assert_eq!(d.discovery_leave(app.0, "0-a", "replaced by build b2", "run-3", now, None).await.unwrap(), Some(5));
    assert_eq!(d.discovery_leave(app.0, "0-a", "again", "run-3", now, None).await.unwrap(), None, "gone already");
    assert_eq!(*ticks.borrow_and_update(), 5);

    let changes = d.discovery_changes(0, None, 100).await.unwrap();
    let seen: Vec<(i64, &str, &str, &str)> =
        changes.iter().map(|c| (c.index, c.change.as_str(), c.instance.as_str(), c.reason.as_str())).collect();
    assert_eq!(
        seen,
        [
            (1, "enter", "0-a", "healthy"),
            (2, "enter", "0-a", "moved"),
            (3, "enter", "1-b", "healthy"),
            (4, "enter", "0-c", "healthy"),
            (5, "leave", "0-a", "replaced by build b2"),
        ]
    );
    assert_eq!((changes[4].by.as_str(), changes[4].entry.port), ("run-3", 4001), "what left, as it was");
    let of_app: Vec<i64> = d.discovery_changes(2, Some("app"), 100).await.unwrap().iter().map(|c| c.index).collect();
    assert_eq!(of_app, [3, 5]);
    assert_eq!(d.discovery_changes(0, None, 2).await.unwrap().len(), 2, "limited");

    // A service's index is its own last change.
    let app_now = d.discovery_snapshot(Some(app.0)).await.unwrap();
    assert_eq!((app_now.index, app_now.entries.len()), (5, 1));
    assert_eq!(app_now.entries[0].entry.instance, "1-b");
    let db_now = d.discovery_snapshot(Some(db.0)).await.unwrap();
    assert_eq!((db_now.index, db_now.entries[0].entry.port), (4, 5000));
    assert_eq!(d.discovery_snapshot(None).await.unwrap().entries.len(), 2);

    // Old changes are forgotten, but the newest stays: it carries the index.
    assert_eq!(d.discovery_prune(now + chrono::Duration::days(1)).await.unwrap(), 4);
    let kept: Vec<i64> = d.discovery_changes(0, None, 100).await.unwrap().iter().map(|c| c.index).collect();
    assert_eq!(kept, [5]);
    assert_eq!(d.discovery_snapshot(None).await.unwrap().index, 5);
}

/// An entry whose TTL lapsed is found by the sweep and taken out, but not
/// one renewed between the sweep's look and its delete.
async fn a_discovery_entry_leaves_when_its_ttl_lapses_unless_renewed(stores: Stores) {
    let d = stores.discovery;
    let svc = (Uuid::now_v7(), "app");
    let now = Utc::now();
    let s = chrono::Duration::seconds;
    d.discovery_enter(&entry(svc, "0-a", 4000), "healthy", "run", now, now + s(10)).await.unwrap();
    d.discovery_enter(&entry(svc, "1-b", 4001), "healthy", "run", now, now + s(10)).await.unwrap();
    assert!(d.discovery_lapsed(now + s(5)).await.unwrap().is_empty());
    let lapsed = d.discovery_lapsed(now + s(11)).await.unwrap();
    assert_eq!(lapsed.len(), 2);
    // 1-b is renewed meanwhile: the sweep's delete passes it over.
    assert_eq!(d.discovery_renew(svc.0, &["1-b".to_string()], now + s(10), now + s(40)).await.unwrap(), 1);
    let sweep = now + s(11);
    assert!(d.discovery_leave(svc.0, "0-a", "ttl lapsed", "sweep", sweep, Some(sweep)).await.unwrap().is_some());
    assert!(d.discovery_leave(svc.0, "1-b", "ttl lapsed", "sweep", sweep, Some(sweep)).await.unwrap().is_none());
    let left: Vec<String> =
        d.discovery_snapshot(None).await.unwrap().entries.into_iter().map(|e| e.entry.instance).collect();
    assert_eq!(left, ["1-b"]);
    assert_eq!(d.discovery_renew(svc.0, &["0-a".to_string()], sweep, sweep + s(30)).await.unwrap(), 0, "gone");
}

/// On Postgres a change made through one replica's store wakes watchers on
/// another's (LISTEN/NOTIFY), with the change's index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_change_on_one_replica_wakes_watchers_on_another() {
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let a = drover_persistence::open(&url).await.unwrap();
    let b = drover_persistence::open(&url).await.unwrap();
    let mut ticks = b.discovery.discovery_watch();
    let now = Utc::now();
    let svc = (Uuid::now_v7(), "app");
    // The listener connects in the background: enter until b hears of it.
    let mut heard = None;
    for attempt in 0..50 {
        let idx = a
            .discovery
            .discovery_enter(
                &entry(svc, &format!("{attempt}-x"), 4000),
                "healthy",
                "run",
                now,
                now + chrono::Duration::seconds(30),
            )
            .await
            .unwrap()
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(200), ticks.changed()).await.is_ok() {
            heard = Some((idx, *ticks.borrow_and_update()));
            break;
        }
    }
    let (idx, value) = heard.expect("b heard of a's change within 10 s");
    assert_eq!(value, idx);
    let idx = a.discovery.discovery_leave(svc.0, "0-x", "stopped", "run", now, None).await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), ticks.changed()).await.expect("woken").unwrap();
    assert_eq!(*ticks.borrow(), idx);
}

/// Router configuration versions count from 1 per router, list newest
/// first by keyset, and the newest applied one is found past refusals and
/// holds.
async fn router_configs_are_numbered_per_router_and_the_serving_one_is_found(stores: Stores) {
    use drover_domain::routing::{Hold, NewRouterConfig, Outcome, RouteTable};
    let store = stores.store.clone();
    let configs = stores.routers.clone();
    let a = cluster(&store, "edge-a").await;
    let b = cluster(&store, "edge-b").await;
    let spec = drover_domain::kinds::router::Spec::from_value(&json!({"environment": "prod",
        "frontends": [{"name": "web", "mode": "http", "port": 8080, "backend": "site"}],
        "backends": [{"name": "site", "target": {"service": "app"}}]}))
    .unwrap();
    let table = RouteTable { spec, servers: Default::default() };
    let new = |router: Uuid, outcome: Outcome, text: &str| NewRouterConfig {
        router_id: router,
        outcome,
        by: "registry".into(),
        config: text.into(),
        table: table.clone(),
        diff: String::new(),
        reason: (outcome == Outcome::Invalid).then(|| "bad".to_string()),
        holds: match outcome {
            Outcome::Held => vec![Hold { backend: "site".into(), reason: "kept".into() }],
            _ => Vec::new(),
        },
        at: Utc::now(),
    };
    assert_eq!(configs.last_router_configs(a.id).await.unwrap().0.map(|c| c.version), None);
    let v1 = configs.insert_router_config(&new(a.id, Outcome::Applied, "one")).await.unwrap();
    assert_eq!((v1.version, v1.config.as_str()), (1, "one"));
    assert_eq!(configs.insert_router_config(&new(b.id, Outcome::Applied, "b")).await.unwrap().version, 1);
    configs.insert_router_config(&new(a.id, Outcome::Invalid, "two")).await.unwrap();
    let v3 = configs.insert_router_config(&new(a.id, Outcome::Held, "one")).await.unwrap();
    assert_eq!((v3.version, v3.holds.len(), v3.table.clone()), (3, 1, table.clone()));
    let (last, applied) = configs.last_router_configs(a.id).await.unwrap();
    assert_eq!((last.unwrap().version, applied.unwrap().version), (3, 1));
    let page = configs.list_router_configs(a.id, None, 2).await.unwrap();
    assert_eq!(page.iter().map(|c| c.version).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(page[1].reason.as_deref(), Some("bad"));
    let rest = configs.list_router_configs(a.id, Some(2), 2).await.unwrap();
    assert_eq!(rest.iter().map(|c| c.version).collect::<Vec<_>>(), [1]);
    assert_eq!(configs.router_config(a.id, 2).await.unwrap().unwrap().outcome, Outcome::Invalid);
    assert!(configs.router_config(a.id, 9).await.unwrap().is_none());

    // Old versions are forgotten, but never the serving one nor any after it.
    let old = Utc::now() - chrono::Duration::days(40);
    let c = cluster(&store, "edge-c").await;
    for outcome in [Outcome::Applied, Outcome::Invalid, Outcome::Applied, Outcome::Held] {
        configs.insert_router_config(&NewRouterConfig { at: old, ..new(c.id, outcome, "old") }).await.unwrap();
    }
    configs.insert_router_config(&new(c.id, Outcome::Applied, "now")).await.unwrap();
    let d = cluster(&store, "edge-d").await;
    for outcome in [Outcome::Applied, Outcome::Invalid] {
        configs.insert_router_config(&NewRouterConfig { at: old, ..new(d.id, outcome, "old") }).await.unwrap();
    }
    assert_eq!(configs.prune_router_configs(Utc::now() - chrono::Duration::days(30)).await.unwrap(), 4);
    let versions = |v: Vec<drover_domain::routing::RouterConfig>| v.iter().map(|c| c.version).collect::<Vec<_>>();
    assert_eq!(versions(configs.list_router_configs(c.id, None, 10).await.unwrap()), [5]);
    assert_eq!(versions(configs.list_router_configs(d.id, None, 10).await.unwrap()), [2, 1], "the serving one stays");
    assert_eq!(versions(configs.list_router_configs(a.id, None, 10).await.unwrap()), [3, 2, 1], "recent ones stay");
}
