//! The provisioner against real stores, with a scripted provider.
//!
//! The provider here is a hand-written fake on purpose: it injects what real
//! providers only do by accident (hang past a timeout, fail retryably, panic,
//! stall while another worker takes over) so that each engine rule is
//! exercised on purpose. Its behaviour is chosen by the resource's name.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use drover_domain::engine::{Engine, EngineConfig, Providers};
use drover_domain::model::*;
use drover_domain::ports::{Job, Lane, Provider, ProviderError, RunContext, Store};
use serde_json::{json, Value};
use uuid::Uuid;

/// Counts how often each run's work was done to the end: the oracle for
/// "exactly once".
#[derive(Default)]
struct Scripted {
    done: Mutex<HashMap<Uuid, u32>>,
    attempts: Mutex<HashMap<Uuid, u32>>,
    /// Releases a stalled first attempt.
    release: tokio::sync::Notify,
    /// Clean-ups asked for, per run.
    cleaned: Mutex<HashMap<Uuid, u32>>,
}

impl Scripted {
    fn done(&self, run: Uuid) -> u32 {
        self.done.lock().unwrap().get(&run).copied().unwrap_or(0)
    }

    fn cleaned(&self, run: Uuid) -> u32 {
        self.cleaned.lock().unwrap().get(&run).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Provider for Scripted {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let attempt = {
            let mut a = self.attempts.lock().unwrap();
            let n = a.entry(job.run_id).or_default();
            *n += 1;
            *n
        };
        ctx.event(NewEvent::info("script", format!("attempt {attempt}"))).await;
        let name = job.resource.name.as_str();
        if name.starts_with("stall") && attempt == 1 {
            self.release.notified().await;
        } else if name.starts_with("slow") {
            // Works for up to 10 s, checking for cancel between steps.
            for _ in 0..200 {
                ctx.check_cancel()?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else if name.starts_with("hang") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        } else if name.starts_with("flaky") && attempt < 3 {
            return Err(ProviderError::retryable("throttled", format!("throttled on attempt {attempt}")));
        } else if name.starts_with("broken") {
            return Err(ProviderError::retryable("unavailable", "always down"));
        } else if name.starts_with("fatal") {
            return Err(ProviderError::fatal("bad_spec", "the spec cannot work").with_detail(json!({"why": "test"})));
        } else if name.starts_with("panic") {
            panic!("provider bug");
        }
        *self.done.lock().unwrap().entry(job.run_id).or_default() += 1;
        Ok(json!({ "attempt": attempt }))
    }

    async fn clean_up(&self, _ctx: &dyn RunContext, job: &Job) -> Result<(), ProviderError> {
        *self.cleaned.lock().unwrap().entry(job.run_id).or_default() += 1;
        Ok(())
    }
}

fn config(worker: &str) -> EngineConfig {
    EngineConfig {
        worker_id: worker.into(),
        concurrency: 8,
        lease: Duration::from_secs(5),
        heartbeat: Duration::from_millis(100),
        poll: Duration::from_millis(50),
        reap_every: Duration::from_millis(200),
        observe_every: Duration::from_secs(3600),
        fold_every: Duration::from_millis(200),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        providers: None,
        refresh_every: Vec::new(),
        auto_repair: Default::default(),
    }
}

fn engine(store: &Arc<dyn Store>, p: &Arc<Scripted>, cfg: EngineConfig) -> Arc<Engine> {
    let mut providers = Providers::default();
    providers.register("test", drover_domain::kinds::cluster::KIND, p.clone());
    Engine::new(store.clone(), providers, cfg)
}

/// Queues a `destroy` (no dependencies) of a new cluster named `name`.
async fn queue(store: &Arc<dyn Store>, name: &str, timeout_secs: i64) -> Run {
    let r = cluster(store, name).await;
    let mut nr = new_run(&r, "destroy", "pending", "destroying", "destroyed");
    nr.timeout_secs = timeout_secs;
    store.insert_run(&nr).await.unwrap()
}

async fn wait_terminal(store: &Arc<dyn Store>, id: Uuid) -> Run {
    for _ in 0..300 {
        let run = store.get_run(id).await.unwrap().unwrap();
        if run.status.is_terminal() {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {id} did not finish in 15 s");
}

async fn state_of(store: &Arc<dyn Store>, run: &Run) -> String {
    store.get_resource_by_id(run.resource_id).await.unwrap().unwrap().state
}

both_backends!(
    racing_workers_run_each_transition_once,
    a_stalled_worker_is_fenced_out_and_the_run_finishes_once,
    cancel_stops_a_running_transition,
    a_cancel_through_this_process_reaches_its_run_at_once,
    timeouts_fail_the_run,
    retryable_errors_are_retried_with_backoff,
    retries_end_when_attempts_run_out,
    fatal_errors_fail_at_once_with_their_detail,
    a_panicking_provider_fails_the_run,
    a_stopping_engine_puts_unfinished_runs_back_at_once,
    an_engine_runs_only_the_providers_it_serves,
    replicas_share_the_observing_out,
);

/// A run queued through one connection wakes an idle worker on another at
/// once (Postgres `LISTEN/NOTIFY`), long before its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_workers_of_other_replicas() {
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let api_side = drover_persistence::connect(&url).await.unwrap();
    let worker_side = drover_persistence::connect(&url).await.unwrap();
    let p = Arc::new(Scripted::default());
    let poll = Duration::from_secs(120);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let tasks = engine(&worker_side, &p, EngineConfig { poll, ..config("idle") }).spawn(rx);
    // Let the worker go idle on an empty queue first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let run = queue(&api_side, "ok-notify", 60).await;
    let started = std::time::Instant::now();
    let fin = wait_terminal(&api_side, run.id).await;
    assert_eq!(fin.status, RunStatus::Succeeded);
    assert!(started.elapsed() < poll / 4, "woken by NOTIFY, not by the {poll:?} poll");
    stop.send(true).unwrap();
    for t in tasks {
        t.abort();
    }
}

async fn racing_workers_run_each_transition_once(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let mut runs = Vec::new();
    for i in 0..30 {
        runs.push(queue(&store, &format!("ok-{i}"), 60).await);
    }
    let (stop, rx) = tokio::sync::watch::channel(false);
    let a = engine(&store, &p, config("a")).spawn(rx.clone());
    let b = engine(&store, &p, config("b")).spawn(rx);
    let mut workers = std::collections::HashSet::new();
    for run in &runs {
        let fin = wait_terminal(&store, run.id).await;
        assert_eq!(fin.status, RunStatus::Succeeded);
        assert_eq!(p.done(run.id), 1, "run {} did its work {} times", run.id, p.done(run.id));
        assert_eq!(state_of(&store, run).await, "destroyed");
        workers.insert(fin.worker.clone().unwrap());
    }
    stop.send(true).unwrap();
    for t in a.into_iter().chain(b) {
        t.abort();
    }
    assert!(!workers.is_empty());
}

async fn a_stalled_worker_is_fenced_out_and_the_run_finishes_once(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "stall", 60).await;
    // Worker A holds a one-second lease it does not renew (a long pause, a
    // partition) while its provider is stuck.
    let stalled = engine(
        &store,
        &p,
        EngineConfig { lease: Duration::from_secs(1), heartbeat: Duration::from_secs(600), ..config("a") },
    );
    let a = tokio::spawn({
        let stalled = stalled.clone();
        async move { stalled.run_one().await.unwrap() }
    });
    // The reaper requeues the run once the lease lapsed; worker B finishes it.
    let healthy = engine(&store, &p, config("b"));
    let mut reaped = Vec::new();
    for _ in 0..100 {
        reaped = healthy.reap().await.unwrap();
        if !reaped.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reaped, vec![run.id]);
    assert_eq!(healthy.run_one().await.unwrap(), Some(run.id));
    // A wakes up, finishes its work and tries to record it: fenced out.
    p.release.notify_one();
    assert_eq!(a.await.unwrap(), Some(run.id));
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((fin.status, fin.worker.as_deref(), fin.attempt), (RunStatus::Succeeded, Some("b"), 2));
    assert_eq!(fin.outputs, Some(json!({"attempt": 2})), "B's result is the one on record");
    let events = store.list_events(run.id, 0, 1000).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.step == "finish").count(), 1, "one terminal record: {events:#?}");
    assert!(events.iter().any(|e| e.step == "reaper"));
    assert_eq!(state_of(&store, &run).await, "destroyed");
}

async fn cancel_stops_a_running_transition(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "slow-cancel", 60).await;
    let e = engine(&store, &p, config("a"));
    let worker = tokio::spawn({
        let e = e.clone();
        async move { e.run_one().await.unwrap() }
    });
    while store.get_run(run.id).await.unwrap().unwrap().status != RunStatus::Running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.request_cancel(run.id, "carol", Some("wrong one"), chrono::Utc::now()).await.unwrap();
    worker.await.unwrap();
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Cancelled);
    assert_eq!(fin.cancel_requested_by.as_deref(), Some("carol"));
    assert_eq!(fin.error.unwrap().code, "cancelled");
    assert_eq!(p.done(run.id), 0);
    assert_eq!(p.cleaned(run.id), 1, "a cancelled attempt is cleaned up after");
    // Partial work may exist: the resource goes to its failure state, whose
    // exits are retry and destroy.
    assert_eq!(state_of(&store, &run).await, "failed");
}

/// A cancel asked through the process that runs the run raises its flag
/// at once: here no heartbeat comes within the test (an hour apart), so
/// only that path can stop the provider before its 10 s of work end.
async fn a_cancel_through_this_process_reaches_its_run_at_once(s: Stores) {
    use drover_domain::service::Service;
    use drover_domain::settings::{SecretKey, Settings};
    let store = s.store.clone();
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "slow-at-once", 60).await;
    let cfg = EngineConfig { heartbeat: Duration::from_secs(3600), lease: Duration::from_secs(7200), ..config("a") };
    let e = engine(&store, &p, cfg);
    let key = SecretKey::from_hex(&"00".repeat(32)).unwrap();
    let service = Service::new(store.clone(), Arc::new(Settings::new(store.clone(), s.settings.clone(), key)));
    service.set_running(e.running());
    let worker = tokio::spawn({
        let e = e.clone();
        async move { e.run_one().await.unwrap() }
    });
    while store.get_run(run.id).await.unwrap().unwrap().status != RunStatus::Running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.cancel(run.id, "carol", Some("at once")).await.unwrap();
    worker.await.unwrap();
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Cancelled, "{fin:?}");
    assert_eq!(p.done(run.id), 0, "the provider stopped at its next step");
}

async fn timeouts_fail_the_run(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "hang", 1).await;
    engine(&store, &p, config("a")).run_one().await.unwrap();
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Failed);
    let err = fin.error.clone().unwrap();
    assert_eq!((err.code.as_str(), err.retryable), ("timeout", false));
    assert!(fin.duration_ms().unwrap() >= 1000);
    assert_eq!(state_of(&store, &run).await, "failed");
    assert_eq!(p.cleaned(run.id), 1, "a timed-out attempt is cleaned up after");
}

async fn retryable_errors_are_retried_with_backoff(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "flaky", 60).await;
    let e = engine(&store, &p, config("a"));
    let mut claimed = 0;
    for _ in 0..200 {
        if e.run_one().await.unwrap().is_some() {
            claimed += 1;
        }
        if store.get_run(run.id).await.unwrap().unwrap().status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(claimed, 3);
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((fin.status, fin.attempt), (RunStatus::Succeeded, 3));
    assert_eq!(p.done(run.id), 1);
    assert_eq!(p.cleaned(run.id), 0, "a retried attempt is adopted by the next, not cleaned up");
    let retries: Vec<_> =
        store.list_events(run.id, 0, 100).await.unwrap().into_iter().filter(|e| e.step == "retry").collect();
    assert_eq!(retries.len(), 2);
    assert!(retries[0].message.contains("throttled on attempt 1"), "{}", retries[0].message);
}

async fn retries_end_when_attempts_run_out(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "broken", 60).await;
    let e = engine(&store, &p, config("a"));
    for _ in 0..200 {
        e.run_one().await.unwrap();
        if store.get_run(run.id).await.unwrap().unwrap().status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((fin.status, fin.attempt), (RunStatus::Failed, 3));
    let err = fin.error.unwrap();
    assert_eq!((err.code.as_str(), err.retryable), ("unavailable", true));
    assert_eq!(state_of(&store, &run).await, "failed");
    assert_eq!(p.cleaned(run.id), 1, "only the last attempt is cleaned up after");
}

async fn fatal_errors_fail_at_once_with_their_detail(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "fatal", 60).await;
    engine(&store, &p, config("a")).run_one().await.unwrap();
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((fin.status, fin.attempt), (RunStatus::Failed, 1));
    let err = fin.error.unwrap();
    assert_eq!((err.code.as_str(), err.detail), ("bad_spec", Some(json!({"why": "test"}))));
    assert_eq!(p.cleaned(run.id), 1);
}

async fn a_panicking_provider_fails_the_run(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "panic", 60).await;
    engine(&store, &p, config("a")).run_one().await.unwrap();
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(fin.status, RunStatus::Failed);
    assert_eq!(fin.error.unwrap().code, "internal");
    assert_eq!(state_of(&store, &run).await, "failed");
    assert_eq!(p.cleaned(run.id), 1, "a crashed attempt is cleaned up after");
}

/// An engine given `providers` (`--providers`) leaves the runs of the
/// others queued, untouched, for an engine that serves them.
async fn an_engine_runs_only_the_providers_it_serves(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "elsewhere", 60).await;
    let aws_only = EngineConfig { providers: Some(vec!["aws".into()]), ..config("aws-only") };
    assert_eq!(engine(&store, &p, aws_only).run_one().await.unwrap(), None);
    let waiting = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((waiting.status, waiting.attempt), (RunStatus::Queued, 0));
    assert_eq!(state_of(&store, &run).await, "pending");
    let serves = EngineConfig { providers: Some(vec!["aws".into(), "test".into()]), ..config("test") };
    assert_eq!(engine(&store, &p, serves).run_one().await.unwrap(), Some(run.id));
    let fin = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((fin.status, fin.worker.as_deref()), (RunStatus::Succeeded, Some("test")));
}

/// Counts its probes, per resource.
#[derive(Default)]
struct Probes(Mutex<HashMap<Uuid, u32>>);

#[async_trait]
impl Provider for Probes {
    async fn apply(&self, _ctx: &dyn RunContext, _job: &Job) -> Result<Value, ProviderError> {
        Ok(json!({}))
    }
    fn observes(&self) -> bool {
        true
    }
    async fn observe(&self, r: &Resource) -> Option<Value> {
        *self.0.lock().unwrap().entry(r.id).or_default() += 1;
        Some(json!({"healthy": true, "summary": "seen"}))
    }
}

/// Two replicas observing the same resources probe each once a round, not
/// twice; when the one holding the leases goes quiet, the other takes its
/// resources over once they lapse (two rounds).
async fn replicas_share_the_observing_out(store: Arc<dyn Store>) {
    let probes = Arc::new(Probes::default());
    let replica = |name: &str| {
        let mut providers = Providers::default();
        // The clusters of `common::cluster` name no provider: `local`.
        providers.register("local", drover_domain::kinds::cluster::KIND, probes.clone());
        let cfg = EngineConfig { observe_every: Duration::from_millis(200), ..config(name) };
        Engine::new(store.clone(), providers, cfg)
    };
    let (a, b) = (replica("a"), replica("b"));
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        ids.push(cluster(&store, name).await.id);
    }
    let probed = |ids: &[Uuid]| -> Vec<u32> {
        let seen = probes.0.lock().unwrap();
        ids.iter().map(|id| seen.get(id).copied().unwrap_or(0)).collect()
    };
    a.observe_all().await;
    b.observe_all().await;
    assert_eq!(probed(&ids), [1, 1, 1], "one probe each, by a");
    a.observe_all().await;
    b.observe_all().await;
    assert_eq!(probed(&ids), [2, 2, 2], "a renews its leases; b still probes nothing");
    let seen = store.get_resource_by_id(ids[0]).await.unwrap().unwrap().observed;
    assert_eq!(seen, Some(json!({"healthy": true, "summary": "seen"})));
    // a goes quiet: past its leases (two rounds), b takes over.
    tokio::time::sleep(Duration::from_millis(450)).await;
    b.observe_all().await;
    a.observe_all().await;
    assert_eq!(probed(&ids), [3, 3, 3], "b now, and a no longer");
}

/// Shutting down, an engine waits for quick runs, then queues the others
/// again at once (not after their leases lapse), for another worker to
/// finish; its own late completion is fenced out.
async fn a_stopping_engine_puts_unfinished_runs_back_at_once(store: Arc<dyn Store>) {
    let p = Arc::new(Scripted::default());
    let run = queue(&store, "stall-at-shutdown", 60).await;
    // A lease far longer than the test: only the release can free the run.
    let cfg =
        EngineConfig { lease: Duration::from_secs(600), heartbeat: Duration::from_secs(200), ..config("leaving") };
    let leaving = engine(&store, &p, cfg);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let tasks = leaving.spawn(rx);
    while store.get_run(run.id).await.unwrap().unwrap().status != RunStatus::Running {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    assert_eq!(leaving.release_in_flight(Duration::from_millis(300)).await, 1);
    let back = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((back.status, back.error.as_ref().map(|e| e.code.as_str())), (RunStatus::Queued, Some("released")));
    let steps: Vec<_> = store.list_events(run.id, 0, 100).await.unwrap().into_iter().map(|e| e.step).collect();
    assert!(steps.contains(&"release".to_string()), "{steps:?}");
    // Another worker finishes it; the first, woken late, is fenced out.
    let next = engine(&store, &p, config("staying"));
    assert_eq!(next.run_one().await.unwrap(), Some(run.id));
    p.release.notify_one();
    let fin = wait_terminal(&store, run.id).await;
    assert_eq!((fin.status, fin.attempt), (RunStatus::Succeeded, 2));
    assert_eq!(fin.outputs, Some(json!({"attempt": 2})), "the second attempt's outcome");
    // The first attempt's work ended too, later: its completion never lands.
    while p.done(run.id) < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let finishes = store.list_events(run.id, 0, 100).await.unwrap().into_iter().filter(|e| e.step == "finish").count();
    assert_eq!(finishes, 1);
    assert_eq!(store.get_run(run.id).await.unwrap().unwrap().outputs, Some(json!({"attempt": 2})));
    for t in tasks {
        t.abort();
    }
}

/// A run gives its slot back once its end is handed to the completion
/// writer, and the writer's queue is bounded: when the writer cannot write
/// (another session holds a lock its statement needs), runs pile up to
/// that bound, then keep their slots, and claims stop. Once the writer can
/// write again, every run finishes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_falls_behind_stops_the_claims() {
    use sqlx::Connection;
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let store = drover_persistence::connect(&url).await.unwrap();
    let p = Arc::new(Scripted::default());
    let mut runs = Vec::new();
    for i in 0..40 {
        runs.push(queue(&store, &format!("ok-{i}"), 60).await);
    }
    let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE rollup_pending IN EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();

    let concurrency = 2;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let tasks = engine(&store, &p, EngineConfig { concurrency, ..config("w1") }).spawn(rx);
    let leased = || {
        let store = store.clone();
        async move {
            let d = store.queue_depth(chrono::Utc::now()).await.unwrap();
            (d.running, d.due)
        }
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (running, due) = leased().await;
    // The writer's batch, its queue (`concurrency`), and the slots.
    assert!(running > concurrency as i64, "slots came back when the ends were handed over: {running} leased");
    assert!(running <= 3 * concurrency as i64, "the writer's queue is bounded: {running} leased");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leased().await, (running, due), "claims stopped while the writer could not write");
    assert_eq!(due, 40 - running);

    tx.commit().await.unwrap();
    for run in &runs {
        assert_eq!(wait_terminal(&store, run.id).await.status, RunStatus::Succeeded);
        assert_eq!(p.done(run.id), 1);
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.abort();
    }
}

/// An end that waits for the completion writer keeps its lease alive: with
/// the writer blocked for longer than a lease, the reaper takes no run back
/// and no work is done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_the_writer_keeps_its_lease() {
    use sqlx::Connection;
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let store = drover_persistence::connect(&url).await.unwrap();
    let p = Arc::new(Scripted::default());
    let mut runs = Vec::new();
    for i in 0..12 {
        runs.push(queue(&store, &format!("ok-{i}"), 60).await);
    }
    let mut blocker = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE rollup_pending IN EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();

    let lease = Duration::from_secs(2);
    let cfg = EngineConfig { concurrency: 2, lease, heartbeat: Duration::from_millis(300), ..config("w1") };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let tasks = engine(&store, &p, cfg).spawn(rx);
    // Runs finished their work and wait for the writer, for two and a half
    // leases.
    tokio::time::sleep(lease * 5 / 2).await;
    let waiting = store.queue_depth(chrono::Utc::now()).await.unwrap().running;
    assert!(waiting > 2, "runs wait for the writer: {waiting} leased");

    tx.commit().await.unwrap();
    for run in &runs {
        let done = wait_terminal(&store, run.id).await;
        assert_eq!(done.status, RunStatus::Succeeded);
        assert_eq!((done.attempt, p.done(run.id)), (1, 1), "run {} was taken back and done again", run.id);
        let events = store.list_events(run.id, 0, 100).await.unwrap();
        assert!(!events.iter().any(|e| e.step == "reaper"), "{events:?}");
    }
    stop.send(true).unwrap();
    for t in tasks {
        t.abort();
    }
}

/// A store that hands back each claim's runs `delay` after the claim
/// committed: the window in which a run is running in the store but its
/// engine has not heard of it yet. A hand-written fake because no real
/// database can be told to stall its reply after the commit.
struct SlowClaims(Arc<dyn Store>, Duration);

#[async_trait]
impl Store for SlowClaims {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn ping(&self) -> drover_domain::Result<()> {
        self.0.ping().await
    }
    async fn insert_resource(&self, r: &NewResource) -> drover_domain::Result<Resource> {
        self.0.insert_resource(r).await
    }
    async fn get_resource(
        &self,
        kind: drover_domain::Kind,
        key: &ResourceKey,
    ) -> drover_domain::Result<Option<Resource>> {
        self.0.get_resource(kind, key).await
    }
    async fn get_resource_by_id(&self, id: Uuid) -> drover_domain::Result<Option<Resource>> {
        self.0.get_resource_by_id(id).await
    }
    async fn list_resources(
        &self,
        kind: drover_domain::Kind,
        filter: &ResourceFilter,
        page: PageRequest,
    ) -> drover_domain::Result<Vec<Resource>> {
        self.0.list_resources(kind, filter, page).await
    }
    async fn update_spec(&self, change: &SpecChange) -> drover_domain::Result<Resource> {
        self.0.update_spec(change).await
    }
    async fn list_spec_versions(
        &self,
        resource: Uuid,
        before: Option<i64>,
        limit: u32,
    ) -> drover_domain::Result<Vec<SpecVersion>> {
        self.0.list_spec_versions(resource, before, limit).await
    }
    async fn get_spec_version(&self, resource: Uuid, version: i64) -> drover_domain::Result<Option<SpecVersion>> {
        self.0.get_spec_version(resource, version).await
    }
    async fn delete_resource(&self, id: Uuid, final_state: &str, now: Time) -> drover_domain::Result<()> {
        self.0.delete_resource(id, final_state, now).await
    }
    async fn set_observed(&self, id: Uuid, observed: &Value) -> drover_domain::Result<()> {
        self.0.set_observed(id, observed).await
    }
    async fn set_drift(&self, id: Uuid, drift: &Value) -> drover_domain::Result<()> {
        self.0.set_drift(id, drift).await
    }
    async fn lease_observation(
        &self,
        resource: Uuid,
        observer: &str,
        now: Time,
        until: Time,
    ) -> drover_domain::Result<bool> {
        self.0.lease_observation(resource, observer, now, until).await
    }
    async fn insert_run(&self, run: &NewRun) -> drover_domain::Result<Run> {
        self.0.insert_run(run).await
    }
    async fn get_run(&self, id: Uuid) -> drover_domain::Result<Option<Run>> {
        self.0.get_run(id).await
    }
    async fn list_runs(&self, filter: &RunFilter, page: PageRequest) -> drover_domain::Result<Vec<Run>> {
        self.0.list_runs(filter, page).await
    }
    async fn active_run(&self, resource: Uuid) -> drover_domain::Result<Option<Run>> {
        self.0.active_run(resource).await
    }
    async fn last_unsuccessful_run(&self, resource: Uuid) -> drover_domain::Result<Option<Run>> {
        self.0.last_unsuccessful_run(resource).await
    }
    async fn claim_jobs(
        &self,
        worker: &str,
        lease: Duration,
        limit: u32,
        now: Time,
        only: Option<&[String]>,
        lane: Lane,
    ) -> drover_domain::Result<Vec<(Run, Resource)>> {
        let claimed = self.0.claim_jobs(worker, lease, limit, now, only, lane).await;
        if claimed.as_ref().is_ok_and(|c| !c.is_empty()) {
            tokio::time::sleep(self.1).await;
        }
        claimed
    }
    fn claim_lanes(&self) -> u8 {
        self.0.claim_lanes()
    }
    async fn heartbeat(&self, lease: Lease, lease_for: Duration, now: Time) -> drover_domain::Result<Option<bool>> {
        self.0.heartbeat(lease, lease_for, now).await
    }
    async fn append_event(&self, lease: Lease, event: &NewEvent) -> drover_domain::Result<()> {
        self.0.append_event(lease, event).await
    }
    async fn complete_run(&self, lease: Lease, completion: &Completion) -> drover_domain::Result<()> {
        self.0.complete_run(lease, completion).await
    }
    async fn retry_later(
        &self,
        lease: Lease,
        at: Time,
        error: &RunError,
        event: &NewEvent,
    ) -> drover_domain::Result<()> {
        self.0.retry_later(lease, at, error, event).await
    }
    async fn reap_expired(&self, now: Time) -> drover_domain::Result<Vec<Uuid>> {
        self.0.reap_expired(now).await
    }
    async fn request_cancel(
        &self,
        run: Uuid,
        actor: &str,
        reason: Option<&str>,
        now: Time,
    ) -> drover_domain::Result<Run> {
        self.0.request_cancel(run, actor, reason, now).await
    }
    async fn list_events(&self, run: Uuid, after: i64, limit: u32) -> drover_domain::Result<Vec<RunEvent>> {
        self.0.list_events(run, after, limit).await
    }
    async fn queue_depth(&self, now: Time) -> drover_domain::Result<QueueDepth> {
        self.0.queue_depth(now).await
    }
    async fn rollups(
        &self,
        grain: drover_domain::stats::Grain,
        since: Time,
        until: Time,
        filter: &drover_domain::stats::RollupFilter,
    ) -> drover_domain::Result<Vec<drover_domain::stats::Rollup>> {
        self.0.rollups(grain, since, until, filter).await
    }
    async fn fold_rollups(&self, limit: u32) -> drover_domain::Result<usize> {
        self.0.fold_rollups(limit).await
    }
    async fn idempotency_begin(&self, key: &str, fp: &str, now: Time) -> drover_domain::Result<IdempotencyBegin> {
        self.0.idempotency_begin(key, fp, now).await
    }
    async fn idempotency_save(&self, key: &str, r: &SavedResponse, now: Time) -> drover_domain::Result<()> {
        self.0.idempotency_save(key, r, now).await
    }
    async fn idempotency_abandon(&self, key: &str) -> drover_domain::Result<()> {
        self.0.idempotency_abandon(key).await
    }
    async fn wait_for_work(&self, max: Duration) {
        self.0.wait_for_work(max).await
    }
}

/// A shutdown that comes while a claim's reply is on its way still finds
/// the run it claimed and puts it back at once (before, it saw nothing in
/// flight and left the run to its ten-minute lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_claim_puts_the_claimed_run_back() {
    let (stores, _dir) = sqlite().await;
    let real: Arc<dyn Store> = stores.store;
    let slow: Arc<dyn Store> = Arc::new(SlowClaims(real.clone(), Duration::from_millis(800)));
    let p = Arc::new(Scripted::default());
    let run = queue(&real, "stall-at-shutdown", 60).await;
    let cfg =
        EngineConfig { lease: Duration::from_secs(600), heartbeat: Duration::from_secs(200), ..config("leaving") };
    let leaving = engine(&slow, &p, cfg);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let tasks = leaving.spawn(rx);
    while real.get_run(run.id).await.unwrap().unwrap().status != RunStatus::Running {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The claim committed; its reply is still 800 ms away.
    stop.send(true).unwrap();
    assert_eq!(leaving.release_in_flight(Duration::from_secs(3)).await, 1);
    let back = real.get_run(run.id).await.unwrap().unwrap();
    assert_eq!((back.status, back.error.map(|e| e.code)), (RunStatus::Queued, Some("released".to_string())));
    for t in tasks {
        t.abort();
    }
}
