//! The provisioner: executes queued runs in the background.
//!
//! # Guarantees
//! - A run is executed by one worker at a time: claims are exclusive and
//!   every write a worker makes is fenced on its lease token.
//! - A worker that dies loses nothing: its lease lapses, the reaper requeues
//!   the run, and the next attempt runs the provider again, which adopts
//!   what the earlier attempt made.
//! - A worker that stalls past its lease (a pause, a partition) cannot finish
//!   the run late: its terminal write is rejected and it gives up.
//! - Runs are tokio tasks bounded by a semaphore, not threads.
//!
//! # Assumptions
//! - Providers are idempotent per run id (see [`Provider`]).
//! - Clocks of replicas sharing a database agree to well within a lease.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn, Instrument};
use uuid::Uuid;

use crate::discovery::{NewEntry, Presence};
use crate::error::{Error, Result};
use crate::kinds::Kind;
use crate::model::*;
use crate::ports::{DiscoveryStore, Job, Lane, Metrics, Provider, ProviderError, RunContext, Store};
use crate::settings::Settings;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub worker_id: String,
    /// How many runs this worker executes at once.
    pub concurrency: usize,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Longest wait between looks at the queue when no wake-up arrives.
    pub poll: Duration,
    pub reap_every: Duration,
    pub observe_every: Duration,
    /// How often finished runs are folded into the stats rollups.
    pub fold_every: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Execute and observe only the resources of these providers (names as
    /// a spec gives them: `local`, `aws`, `builtin`); `None`: every
    /// registered provider. Runs of the others stay queued for a replica
    /// that serves them.
    pub providers: Option<Vec<String>>,
    /// How often the observer asks for a `refresh` of each resource of a
    /// kind (one that has the action, in a state that allows it, with no
    /// run active): kinds not listed are refreshed only on request.
    pub refresh_every: Vec<(Kind, Duration)>,
    /// How the observer repairs resources that opted into `auto_repair`.
    pub auto_repair: crate::repair::RepairPolicy,
}

/// The default refresh intervals: clusters, services and routers every 5
/// minutes, images every hour.
pub fn default_refresh_every() -> Vec<(Kind, Duration)> {
    vec![
        (crate::kinds::cluster::KIND, Duration::from_secs(300)),
        (crate::kinds::router::KIND, Duration::from_secs(300)),
        (crate::kinds::service::KIND, Duration::from_secs(300)),
        (crate::kinds::image::KIND, Duration::from_secs(3600)),
    ]
}

/// Reads `cluster=5m,image=1h` (`off` or `0` for a kind: never).
pub fn parse_refresh_every(s: &str) -> std::result::Result<Vec<(Kind, Duration)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, every) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected KIND=INTERVAL"))?;
        let kind = Kind::parse(kind.trim()).ok_or_else(|| format!("{part:?}: no kind {kind:?}"))?;
        if !kind.actions().contains(&"refresh") {
            return Err(format!("{part:?}: a {kind} has no refresh"));
        }
        let every = match every.trim() {
            "off" | "0" => Duration::ZERO,
            e => humantime::parse_duration(e).map_err(|err| format!("{part:?}: {err}"))?,
        };
        out.push((kind, every));
    }
    Ok(out)
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            worker_id: format!("worker-{}", &Uuid::new_v4().simple().to_string()[..8]),
            concurrency: 64,
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            poll: Duration::from_secs(1),
            reap_every: Duration::from_secs(5),
            observe_every: Duration::from_secs(15),
            fold_every: Duration::from_secs(1),
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(120),
            providers: None,
            refresh_every: default_refresh_every(),
            auto_repair: crate::repair::RepairPolicy::default(),
        }
    }
}

/// Providers by `(provider name, kind)`.
#[derive(Default, Clone)]
pub struct Providers {
    map: HashMap<(String, Kind), Arc<dyn Provider>>,
}

impl Providers {
    pub fn register(&mut self, provider: &str, kind: Kind, p: Arc<dyn Provider>) {
        self.map.insert((provider.to_string(), kind), p);
    }

    /// Whether any provider of `kind` observes its resources.
    pub fn observes(&self, kind: Kind) -> bool {
        self.map.iter().any(|((_, k), p)| *k == kind && p.observes())
    }

    pub fn get(&self, provider: &str, kind: Kind) -> Option<&Arc<dyn Provider>> {
        self.map.get(&(provider.to_string(), kind))
    }

    /// The names of the registered providers, sorted, each once.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.keys().map(|(p, _)| p.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Only the providers named in `only`.
    pub fn only(mut self, only: &[String]) -> Providers {
        self.map.retain(|(p, _), _| only.contains(p));
        self
    }
}

/// Who the runs the observer asks for are by, in the ledger.
pub const OBSERVER_ACTOR: &str = "observer";

pub struct Engine {
    store: Arc<dyn Store>,
    settings: std::sync::OnceLock<Arc<Settings>>,
    /// Asks for the child runs of fan-out actions (`crate::fanout`).
    requester: std::sync::OnceLock<Arc<dyn crate::fanout::Requester>>,
    discovery: std::sync::OnceLock<Arc<dyn DiscoveryStore>>,
    metrics: std::sync::OnceLock<Arc<dyn Metrics>>,
    providers: Providers,
    cfg: EngineConfig,
    slots: Arc<Semaphore>,
    /// The completion writers, one per lane, once [`Engine::spawn`] started
    /// them; a run's end goes to its lane's. Bounded at `concurrency`
    /// together: a run gives its slot back once its completion is in
    /// here, so runs wait for the writer without holding slots, and a
    /// writer that falls behind stops the claims.
    completions: std::sync::OnceLock<Vec<mpsc::Sender<Finished>>>,
    /// Leases of the runs this engine is executing.
    in_flight: Arc<std::sync::Mutex<HashMap<Uuid, Lease>>>,
    /// How many claims are under way: runs they took may be running in the
    /// store and not yet in `in_flight` (a shutdown waits for them).
    claiming: AtomicUsize,
    /// The cancel flags of the runs this engine is executing.
    running: Running,
}

/// The runs an engine is executing, each with the flag its provider polls
/// between steps: a cancel asked through the same process reaches its run
/// at once ([`Running::cancel`]), instead of at the next heartbeat (which
/// still carries a cancel asked through another replica).
#[derive(Clone, Default)]
pub struct Running(Arc<std::sync::Mutex<HashMap<Uuid, Arc<AtomicBool>>>>);

impl Running {
    /// Raises the cancel flag of `run` if this engine executes it; whether it did.
    pub fn cancel(&self, run: Uuid) -> bool {
        match self.0.lock().expect("not poisoned").get(&run) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Takes a run off the running list however its execution ends.
struct Registered(Running, Uuid);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0 .0.lock().expect("not poisoned").remove(&self.1);
    }
}

/// Takes a run off the in-flight list however its execution ends.
struct InFlight(Arc<std::sync::Mutex<HashMap<Uuid, Lease>>>, Uuid);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().expect("not poisoned").remove(&self.1);
    }
}

/// A completion waiting for the writer, and where its result goes.
type Finished = (Lease, Completion, oneshot::Sender<Result<()>>);

/// The most completions written in one transaction.
const COMPLETION_BATCH: usize = 128;

/// The most runs one claim asks for.
const CLAIM_BATCH: usize = 64;

/// How long the claimer, when runs are waiting, lets slots free up before
/// it claims (it claims at once when half of them are free). Fewer, larger
/// claims cost less per run: at 200k queued, a quarter and 2 ms took 0.25
/// ms of CPU per transition, half and 5 ms 0.19 (BENCHMARKS.md).
const CLAIM_GATHER: Duration = Duration::from_millis(5);

/// Writes completions as they come: the first alone, and whatever arrived
/// while a write was in flight together in the next. Under load a batch
/// shares one transaction; idle, nothing waits for company.
async fn write_completions(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Finished>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < COMPLETION_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<(Lease, Completion)>, Vec<_>) =
            batch.into_iter().map(|(lease, c, reply)| ((lease, c), reply)).unzip();
        let results = store.complete_runs(&items).await;
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// How one attempt ended, before it is written down.
enum Outcome {
    Done(Result<Value, ProviderError>),
    TimedOut,
    Panicked(String),
    LeaseLost,
}

impl Engine {
    pub fn new(store: Arc<dyn Store>, providers: Providers, cfg: EngineConfig) -> Arc<Engine> {
        // What this engine does not serve it neither claims nor observes.
        let providers = match &cfg.providers {
            Some(only) => providers.only(only),
            None => providers,
        };
        let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
        Arc::new(Engine {
            store,
            settings: Default::default(),
            requester: Default::default(),
            discovery: Default::default(),
            metrics: Default::default(),
            providers,
            cfg,
            slots,
            completions: Default::default(),
            in_flight: Default::default(),
            running: Running::default(),
            claiming: AtomicUsize::new(0),
        })
    }

    /// Lets fan-out actions (a cluster's `initialize`) ask for child runs.
    pub fn set_requester(&self, requester: Arc<dyn crate::fanout::Requester>) {
        let _ = self.requester.set(requester);
    }

    /// The runs this engine executes, for a cancel to reach them at once.
    pub fn running(&self) -> Running {
        self.running.clone()
    }

    /// The discovery registry runs write to and the observer keeps (see
    /// [`crate::discovery`]); without one, both leave it alone.
    pub fn set_discovery(&self, discovery: Arc<dyn DiscoveryStore>) {
        let _ = self.discovery.set(discovery);
    }

    /// How long a registry entry lives unless renewed.
    fn discovery_ttl(&self) -> chrono::Duration {
        let ttl = crate::discovery::ttl(self.cfg.observe_every);
        chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(45))
    }

    /// Lets runs hand their recorded settings to providers.
    pub fn set_settings(&self, settings: Arc<Settings>) {
        let _ = self.settings.set(settings);
    }

    pub fn set_metrics(&self, metrics: Arc<dyn Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Starts the claim loop, the completion writer, the reaper, the rollup
    /// folder and the observer; they stop when `shutdown` turns true. Runs
    /// in flight are left to their leases ([`Engine::release_in_flight`]
    /// hands them back).
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        // One completion writer per lane as well: a run's end goes to the
        // writer of its lane.
        let of = self.store.claim_lanes().max(1);
        let (txs, rxs): (Vec<_>, Vec<_>) =
            (0..of).map(|_| mpsc::channel(self.cfg.concurrency.div_ceil(usize::from(of)).max(1))).unzip();
        let writers: Vec<_> = if self.completions.set(txs).is_ok() {
            rxs.into_iter().map(|rx| tokio::spawn(write_completions(self.store.clone(), rx))).collect()
        } else {
            Vec::new()
        };
        // One claim loop per lane of the queue: each keeps its claim in
        // flight beside the others'.
        let claimers: Vec<_> = (0..of)
            .map(|index| {
                let (engine, mut stop) = (self.clone(), shutdown.clone());
                tokio::spawn(async move { engine.claim_loop(Lane { index, of }, &mut stop).await })
            })
            .collect();
        let reaper = {
            let (engine, mut stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    if let Err(e) = engine.reap().await {
                        warn!(error = %e, cause = ?std::error::Error::source(&e), "reaper pass failed");
                    }
                    if sleep_or_stop(engine.cfg.reap_every, &mut stop).await {
                        break;
                    }
                }
            })
        };
        let folder = {
            let (engine, mut stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                loop {
                    if let Err(e) = crate::ports::fold_pending(&*engine.store, 100).await {
                        warn!(error = %e, cause = ?std::error::Error::source(&e), "rollup fold failed");
                    }
                    if sleep_or_stop(engine.cfg.fold_every, &mut stop).await {
                        break;
                    }
                }
            })
        };
        let observer = {
            let (engine, mut stop) = (self.clone(), shutdown);
            tokio::spawn(async move {
                loop {
                    engine.observe_all().await;
                    engine.sweep_discovery().await;
                    if sleep_or_stop(engine.cfg.observe_every, &mut stop).await {
                        break;
                    }
                }
            })
        };
        claimers.into_iter().chain([reaper, folder, observer]).chain(writers).collect()
    }

    async fn claim_loop(self: &Arc<Self>, lane: Lane, stop: &mut watch::Receiver<bool>) {
        // Whether the last claim found as many runs as it asked for: then
        // more are probably waiting.
        let mut backlog = false;
        loop {
            if *stop.borrow() {
                return;
            }
            // Wait for a free slot before claiming: a claimed run starts its
            // lease at once, so never claim more than can start.
            let first = tokio::select! {
                p = self.slots.clone().acquire_owned() => p.expect("semaphore never closes"),
                _ = stop.changed() => return,
            };
            let mut permits = vec![first];
            // With a backlog, runs wait anyway: give slots a moment to free
            // up so that one claim starts several runs instead of one each.
            // An idle queue never waits here.
            if backlog {
                let enough = (self.cfg.concurrency / 2).clamp(1, CLAIM_BATCH);
                let until = tokio::time::Instant::now() + CLAIM_GATHER;
                while permits.len() + self.slots.available_permits() < enough {
                    match tokio::time::timeout_at(until, self.slots.clone().acquire_owned()).await {
                        Ok(p) => permits.push(p.expect("semaphore never closes")),
                        Err(_) => break,
                    }
                }
            }
            // Take every free slot now (up to a batch), so that a claim
            // beside this one cannot count them too.
            while permits.len() < CLAIM_BATCH {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let want = permits.len() as u32;
            self.claiming.fetch_add(1, Ordering::SeqCst);
            let claimed = self.claim(want, lane).await;
            if let Ok(claimed) = &claimed {
                // In flight from the moment the claim returns, before any
                // task starts: a shutdown now finds them to put back.
                let mut in_flight = self.in_flight.lock().expect("not poisoned");
                in_flight.extend(claimed.iter().filter_map(|(run, _)| Some((run.id, run.lease()?))));
            }
            self.claiming.fetch_sub(1, Ordering::SeqCst);
            let claimed = match claimed {
                Ok(runs) => runs,
                Err(e) => {
                    warn!(error = %e, cause = ?std::error::Error::source(&e), "claim failed; backing off");
                    drop(permits);
                    backlog = false;
                    if sleep_or_stop(self.cfg.poll, stop).await {
                        return;
                    }
                    continue;
                }
            };
            backlog = claimed.len() as u32 == want;
            if claimed.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = self.store.wait_for_work(self.cfg.poll) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            for (run, resource) in claimed {
                let p = match permits.pop() {
                    Some(p) => p,
                    None => self.slots.clone().acquire_owned().await.expect("semaphore never closes"),
                };
                let engine = self.clone();
                tokio::spawn(async move { engine.execute(run, resource, Some(p)).await });
            }
        }
    }

    /// For a shutdown, once claiming has stopped: waits up to `grace` for
    /// the runs in flight to end, then puts those still running back in the
    /// queue at once (fenced on their leases), for another replica or the
    /// next start, instead of leaving them until their leases lapse.
    /// Returns how many it put back.
    pub async fn release_in_flight(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        let busy =
            || self.claiming.load(Ordering::SeqCst) > 0 || !self.in_flight.lock().expect("not poisoned").is_empty();
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leases: Vec<Lease> = self.in_flight.lock().expect("not poisoned").values().copied().collect();
        let mut released = 0;
        for lease in leases {
            let error = RunError {
                code: "released".into(),
                message: format!("{} shut down before the attempt ended; the run is queued again", self.cfg.worker_id),
                retryable: true,
                detail: None,
            };
            let event = NewEvent::info("release", error.message.clone()).with_level(Level::Warn);
            match self.store.retry_later(lease, Utc::now(), &error, &event).await {
                Ok(()) => released += 1,
                Err(e) => {
                    warn!(run = %lease.run, error = %e, "could not put a run back on shutdown; its lease will lapse")
                }
            }
        }
        released
    }

    /// Claims up to `limit` due runs of the providers this engine serves.
    async fn claim(&self, limit: u32, lane: Lane) -> Result<Vec<(Run, Resource)>> {
        let only = self.cfg.providers.as_deref();
        self.store.claim_jobs(&self.cfg.worker_id, self.cfg.lease, limit, Utc::now(), only, lane).await
    }

    /// Claims one due run and executes it to the end; `None` when the queue
    /// had nothing due. Lets tests drive the engine step by step.
    pub async fn run_one(&self) -> Result<Option<Uuid>> {
        let mut runs = self.claim(1, Lane::ALL).await?;
        match runs.pop() {
            Some((run, resource)) => {
                let id = run.id;
                self.execute(run, resource, None).await;
                Ok(Some(id))
            }
            None => Ok(None),
        }
    }

    /// One reaper pass: requeues runs whose lease lapsed.
    pub async fn reap(&self) -> Result<Vec<Uuid>> {
        let ids = self.store.reap_expired(Utc::now()).await?;
        if let (Some(m), false) = (self.metrics.get(), ids.is_empty()) {
            m.leases_reclaimed(ids.len());
        }
        for id in &ids {
            warn!(run = %id, "lease lapsed; run reclaimed");
        }
        Ok(ids)
    }

    /// Asks each provider what it sees of settled resources and records it.
    pub async fn observe_all(&self) {
        for kind in Kind::all() {
            let refreshed = self.cfg.refresh_every.iter().any(|(k, every)| *k == kind && !every.is_zero());
            if !self.providers.observes(kind) && !refreshed {
                continue;
            }
            let mut after = None;
            loop {
                let page = match self
                    .store
                    .list_resources(kind, &ResourceFilter::default(), PageRequest { after, limit: 200 })
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(error = %e, "observer could not list resources");
                        return;
                    }
                };
                for r in &page {
                    self.observe(r).await;
                }
                match page.last() {
                    Some(last) if page.len() == 200 => after = Some(last.id),
                    _ => break,
                }
            }
        }
    }

    async fn observe(&self, r: &Resource) {
        if r.state == r.kind.final_state() {
            return;
        }
        let Some(provider) = self.providers.get(&r.kind.provider_of(&r.spec), r.kind) else {
            return;
        };
        // One replica observes a resource at a time: the one holding its
        // lease, renewed each round and lapsing after two, so that a
        // replica gone quiet hands its resources on within two rounds.
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(self.cfg.observe_every * 2).unwrap_or(chrono::Duration::MAX);
        match self.store.lease_observation(r.id, &self.cfg.worker_id, now, until).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(error = %e, resource = %r.id, "could not lease the observation");
                return;
            }
        }
        let (seen, presence) = provider.observe_presence(r).await;
        if let Some(presence) = presence {
            let misplaced = presence.misplaced.clone();
            self.keep_presence(r, presence).await;
            if let Some(why) = misplaced {
                self.ask(r, "place", &why).await;
            }
        }
        self.refresh_if_due(r, provider.as_ref()).await;
        let seen = match seen {
            Some(seen) => Some(self.auto_repair(r, seen).await),
            None => None,
        };
        if let Some(seen) = seen {
            if r.observed.as_ref() != Some(&seen) {
                if seen.get("healthy") == Some(&Value::Bool(false)) {
                    warn!(resource = %r.id, kind = %r.kind, name = %r.name, summary = %seen["summary"], "resource is not healthy");
                }
                if let Err(e) = self.store.set_observed(r.id, &seen).await {
                    warn!(error = %e, resource = %r.id, "could not record observation");
                }
            }
        }
    }

    /// Brings a service's registry entries to what its provider sees:
    /// renews the healthy ones, takes out those failing or gone (with why),
    /// and puts back a healthy one that is missing, unless a run of the
    /// service is under way (it enters and takes out instances itself, and
    /// one it just took out to stop must not come back).
    async fn keep_presence(&self, r: &Resource, presence: Presence) {
        let Some(registry) = self.discovery.get() else { return };
        let now = Utc::now();
        let until = now + self.discovery_ttl();
        let result: Result<()> = async {
            let current = registry.discovery_snapshot(Some(r.id)).await?;
            let listed: BTreeSet<&str> = current.entries.iter().map(|e| e.entry.instance.as_str()).collect();
            let healthy: BTreeSet<&str> = presence.healthy.iter().map(|e| e.instance.as_str()).collect();
            let renew: Vec<String> = listed.intersection(&healthy).map(|i| i.to_string()).collect();
            registry.discovery_renew(r.id, &renew, now, until).await?;
            for gone in listed.difference(&healthy) {
                let why = presence
                    .failing
                    .iter()
                    .find(|(i, _)| i == gone)
                    .map(|(_, why)| why.clone())
                    .unwrap_or_else(|| "the instance no longer runs".into());
                if registry.discovery_leave(r.id, gone, &why, "observer", now, None).await?.is_some() {
                    warn!(service = %r.name, instance = %gone, why = %why, "instance left the discovery registry");
                }
            }
            let missing: Vec<&NewEntry> =
                presence.healthy.iter().filter(|e| !listed.contains(e.instance.as_str())).collect();
            if !missing.is_empty() && self.store.active_run(r.id).await?.is_none() {
                for e in missing {
                    let why = "healthy, and not in the registry (seen by the observer)";
                    registry.discovery_enter(e, why, "observer", now, until).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, resource = %r.id, "could not keep the discovery registry");
        }
    }

    /// Asks for a refresh of `r` when its kind's interval has passed since
    /// the last one checked it (or since it last changed, if none did), and
    /// its provider can refresh.
    async fn refresh_if_due(&self, r: &Resource, provider: &dyn Provider) {
        let Some(every) = self.cfg.refresh_every.iter().find(|(k, _)| *k == r.kind).map(|(_, e)| *e) else {
            return;
        };
        if every.is_zero() || !provider.refreshes() {
            return;
        }
        // Since the last refresh, or (never refreshed) since it last
        // changed: a new installation or an upgrade does not refresh
        // everything at once.
        let last = r
            .drift
            .as_ref()
            .and_then(|d| d["checked_at"].as_str())
            .and_then(|t| t.parse::<crate::model::Time>().ok())
            .unwrap_or(r.updated_at);
        let every = chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX);
        if Utc::now() - last < every {
            return;
        }
        self.ask(
            r,
            "refresh",
            &format!("periodic refresh (every {})", humantime::format_duration(every.to_std().unwrap_or_default())),
        )
        .await;
    }

    /// For a resource that opted into `auto_repair` and whose provider saw
    /// something a repair would fix (`needs_repair` in what it saw): asks
    /// for a repair when [`RepairPolicy::decide`](crate::repair::RepairPolicy::decide)
    /// says so, and returns what was seen with the decision in it
    /// (`auto_repair`, and a backoff or a crash loop said first in the
    /// summary).
    async fn auto_repair(&self, r: &Resource, mut seen: Value) -> Value {
        use crate::repair::Decision;
        let Some(why) = seen.get("needs_repair").and_then(Value::as_str).map(str::to_string) else {
            return seen;
        };
        if r.spec.get(crate::repair::SPEC_FIELD) != Some(&Value::Bool(true)) {
            return seen;
        }
        let filter = RunFilter { resource: Some(r.id), ..Default::default() };
        let runs = match self.store.list_runs(&filter, PageRequest { after: None, limit: 50 }).await {
            Ok(runs) => runs,
            Err(e) => {
                warn!(error = %e, resource = %r.id, "could not read the runs for auto-repair");
                return seen;
            }
        };
        if runs.first().is_some_and(|run| matches!(run.status, RunStatus::Queued | RunStatus::Running)) {
            return seen;
        }
        let policy = &self.cfg.auto_repair;
        let decision = policy.decide(&runs, Utc::now());
        match &decision {
            Decision::Repair { attempt } => {
                let why = format!("auto-repair (attempt {attempt} of {}): {why}", policy.crash_loop_after);
                self.ask(r, "repair", &why).await;
            }
            Decision::CrashLoop { attempts, .. }
                if r.observed.as_ref().map(|o| &o["auto_repair"]["status"]) != Some(&json!("crash_loop")) =>
            {
                warn!(kind = %r.kind, name = %r.name, attempts, "crash loop: auto-repair stops");
            }
            _ => {}
        }
        if !matches!(decision, Decision::Repair { .. }) {
            let summary = seen["summary"].as_str().unwrap_or_default().to_string();
            seen["summary"] = json!(format!("{}; {summary}", decision.said()));
        }
        seen["auto_repair"] = serde_json::to_value(&decision).expect("a decision serialises");
        seen
    }

    /// Asks for `action` of `r` as the observer (with why), when its state
    /// allows it and no run of it is active: a `place` when its provider
    /// sees instances to place again, a periodic `refresh`. A request
    /// refused (busy, not up) is asked again next round.
    async fn ask(&self, r: &Resource, action: &str, why: &str) {
        let Some(requester) = self.requester.get() else { return };
        if !matches!(r.kind.next(&r.state, action), Ok(crate::kinds::Step::Go { .. })) {
            return;
        }
        match self.store.active_run(r.id).await {
            Ok(None) => {}
            Ok(Some(_)) => return,
            Err(e) => {
                warn!(error = %e, resource = %r.id, "could not read the active run");
                return;
            }
        }
        let req = crate::service::TransitionRequest {
            action: action.into(),
            params: json!({}),
            reason: Some(why.to_string()),
            actor: OBSERVER_ACTOR.into(),
            idempotency_key: None,
            may_operate_protected: true,
            parent: None,
        };
        match requester.request(r.kind, &r.id.to_string(), req).await {
            Ok(run) => {
                info!(run = %run.id, kind = %r.kind, name = %r.name, action, why = %why, "asked by the observer")
            }
            Err(e) => info!(kind = %r.kind, name = %r.name, action, error = %e, "the observer could not ask yet"),
        }
    }

    /// Takes out registry entries whose TTL lapsed, and forgets old changes.
    pub async fn sweep_discovery(&self) {
        let Some(registry) = self.discovery.get() else { return };
        let now = Utc::now();
        let result: Result<()> = async {
            for (service, instance) in registry.discovery_lapsed(now).await? {
                let why = "its TTL lapsed: nobody renewed it (is drover's observer running?)";
                if registry.discovery_leave(service, &instance, why, "sweep", now, Some(now)).await?.is_some() {
                    warn!(service = %service, instance = %instance, "discovery entry lapsed");
                }
            }
            registry.discovery_prune(now - crate::discovery::KEEP_CHANGES).await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, "could not sweep the discovery registry");
        }
    }

    /// Runs one attempt and writes its end. `slot` is the claim loop's
    /// permit for it: given back once the attempt's end is handed to the
    /// completion writer, or when this returns.
    async fn execute(&self, run: Run, resource: Resource, slot: Option<OwnedSemaphorePermit>) {
        let span =
            tracing::info_span!("run", run = %run.id, kind = %run.kind, action = %run.action, attempt = run.attempt);
        self.execute_inner(run, resource, slot).instrument(span).await
    }

    async fn execute_inner(&self, run: Run, resource: Resource, slot: Option<OwnedSemaphorePermit>) {
        let Some(lease) = run.lease() else {
            warn!("claimed run without a lease token; skipping");
            return;
        };
        self.in_flight.lock().expect("not poisoned").insert(run.id, lease);
        let _in_flight = InFlight(self.in_flight.clone(), run.id);
        let ctx = Arc::new(Ctx {
            store: self.store.clone(),
            discovery: self.discovery.get().cloned(),
            ttl: self.discovery_ttl(),
            lease,
            attempt: run.attempt,
            cancel: Arc::new(AtomicBool::new(run.cancel_requested_at.is_some())),
        });
        self.running.0.lock().expect("not poisoned").insert(run.id, ctx.cancel.clone());
        let _running = Registered(self.running.clone(), run.id);
        // The claim recorded the attempt's start in the run's events.
        if let (Some(m), Some(started)) = (self.metrics.get(), run.heartbeat_at) {
            m.run_started(run.kind, &run.action, (started - run.run_after).to_std().unwrap_or_default());
        }
        let lost = Arc::new(Notify::new());
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.store.clone(),
            ctx.clone(),
            lost.clone(),
            self.cfg.heartbeat,
            self.cfg.lease,
        ));
        // A fan-out run waits for child runs, which need slots of their own.
        let slot = match run.kind.fan_out(&run.action) {
            Some(_) => None,
            None => slot,
        };
        let prepared = self.prepare(&run, resource).await;
        let outcome = match &prepared {
            Ok((provider, job)) => {
                let limit = Duration::from_secs(run.timeout_secs.max(1) as u64);
                let work = AssertUnwindSafe(provider.apply(ctx.as_ref(), job)).catch_unwind();
                tokio::select! {
                    r = tokio::time::timeout(limit, work) => match r {
                        Ok(Ok(result)) => Outcome::Done(result),
                        Ok(Err(panic)) => Outcome::Panicked(panic_message(panic)),
                        Err(_) => Outcome::TimedOut,
                    },
                    _ = lost.notified() => Outcome::LeaseLost,
                }
            }
            Err(e) => Outcome::Done(Err(e.clone())),
        };
        let cleanup = prepared.as_ref().ok().map(|(provider, job)| (provider.as_ref(), job));
        // The lease is kept alive until the end is written: an end that
        // waits for a completion writer that fell behind must not let the
        // reaper hand the run to another worker, which would do its work
        // again.
        self.record(&run, lease, &ctx, outcome, slot, cleanup).await;
        heartbeat.abort();
    }

    /// Finds the provider and what the job needs, as they are now (the
    /// resource as the claim left it).
    async fn prepare(&self, run: &Run, resource: Resource) -> Result<(Arc<dyn Provider>, Job), ProviderError> {
        let store_err = |e: Error| ProviderError::retryable("store_unavailable", e.to_string());
        let provider: Arc<dyn Provider> = match (run.kind.fan_out(&run.action), self.requester.get()) {
            (Some(fan_out), Some(requester)) => Arc::new(crate::fanout::FanOutRunner {
                store: self.store.clone(),
                requester: requester.clone(),
                fan_out,
            }),
            (Some(_), None) => {
                return Err(ProviderError::fatal("no_requester", "this engine cannot ask for child runs"));
            }
            (None, _) => self.providers.get(&run.provider, run.kind).cloned().ok_or_else(|| {
                ProviderError::fatal(
                    "unknown_provider",
                    format!("no provider {:?} for {} resources", run.provider, run.kind),
                )
            })?,
        };
        let mut dependencies = Vec::new();
        for dep in run.kind.run_dependencies(&resource.spec, &run.action, &run.params) {
            let found =
                self.store.get_resource(dep.kind, &ResourceKey::parse(&dep.key)).await.map_err(store_err)?.ok_or_else(
                    || ProviderError::fatal("dependency_missing", format!("{} {:?} does not exist", dep.kind, dep.key)),
                )?;
            if found.state != dep.required_state {
                return Err(ProviderError::fatal(
                    "dependency_not_ready",
                    format!("{} {:?} is {}, needs {}", dep.kind, found.name, found.state, dep.required_state),
                ));
            }
            dependencies.push(found);
        }
        let (settings, secrets) = match (self.settings.get(), run.settings.as_array().is_some_and(|a| !a.is_empty())) {
            (Some(s), true) => s.resolve_marking_secrets(&run.settings).await.map_err(|e| match e {
                Error::Store { .. } => ProviderError::retryable("store_unavailable", e.to_string()),
                other => ProviderError::fatal("settings_unavailable", other.to_string()),
            })?,
            _ => Default::default(),
        };
        let job = Job {
            run_id: run.id,
            attempt: run.attempt,
            kind: run.kind,
            action: run.action.clone(),
            params: run.params.clone(),
            resource,
            dependencies,
            settings,
            secrets,
        };
        Ok((provider, job))
    }

    /// Records what a refresh found as its resource's drift; its summary.
    async fn keep_drift(&self, run: &Run, report: Value) -> Result<String, RunError> {
        let failed =
            |code: &str, message: String| RunError { code: code.into(), message, retryable: false, detail: None };
        let report: crate::drift::Report = serde_json::from_value(report)
            .map_err(|e| failed("invalid_report", format!("the provider's refresh report does not read: {e}")))?;
        let drift = crate::drift::Drift::of(report, run.id, Utc::now());
        let value = serde_json::to_value(&drift).expect("a drift serialises");
        self.store
            .set_drift(run.resource_id, &value)
            .await
            .map_err(|e| failed("drift_unrecorded", format!("the drift could not be recorded: {e}")))?;
        Ok(drift.summary)
    }

    /// Writes the outcome of one attempt, fenced on the lease.
    async fn record(
        &self,
        run: &Run,
        lease: Lease,
        ctx: &Ctx,
        outcome: Outcome,
        slot: Option<OwnedSemaphorePermit>,
        cleanup: Option<(&dyn Provider, &Job)>,
    ) {
        let now = Utc::now();
        let finish = |status: RunStatus, error: Option<RunError>, outputs: Option<Value>| {
            let (state, event) = match status {
                RunStatus::Succeeded => (
                    run.ok_state.clone(),
                    NewEvent::info("finish", format!("succeeded; {} is {}", run.kind, run.ok_state)),
                ),
                _ => (
                    run.err_state.clone(),
                    NewEvent::info(
                        "finish",
                        format!("{}: {}", status.as_str(), error.as_ref().map(|e| e.message.as_str()).unwrap_or("")),
                    )
                    .with_level(Level::Error),
                ),
            };
            // What a success does to the spec (a scale's count, applying
            // it) is added by `applied`.
            Completion {
                status,
                resource_state: state,
                outputs,
                error,
                spec: None,
                applies_spec: false,
                applied: None,
                event,
                now,
            }
        };
        let completion = match outcome {
            Outcome::LeaseLost => {
                warn!("lease lost while working; abandoning this attempt to the reclaiming worker");
                return;
            }
            // A refresh's findings are the resource's drift, not its outputs.
            Outcome::Done(Ok(report)) if run.kind.refreshes(&run.action) => match self.keep_drift(run, report).await {
                Ok(summary) => {
                    let mut c = finish(RunStatus::Succeeded, None, None);
                    c.event = NewEvent::info("finish", format!("succeeded; {summary}"));
                    c
                }
                Err(error) => finish(RunStatus::Failed, Some(error), None),
            },
            Outcome::Done(Ok(outputs)) => finish(RunStatus::Succeeded, None, Some(outputs)),
            Outcome::Done(Err(ProviderError::Cancelled)) => {
                let error = RunError {
                    code: "cancelled".into(),
                    message: "cancelled on request".into(),
                    retryable: false,
                    detail: None,
                };
                finish(RunStatus::Cancelled, Some(error), None)
            }
            Outcome::Done(Err(ProviderError::Failed { code, message, retryable, detail })) => {
                let error = RunError { code, message, retryable, detail };
                if error.retryable && run.attempt < run.max_attempts && !ctx.cancel_requested() {
                    let delay = self.backoff(run.attempt);
                    let after = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    let event = NewEvent::info(
                        "retry",
                        format!(
                            "{} (retryable); attempt {} will start after {:.1}s",
                            error.message,
                            run.attempt + 1,
                            delay.as_secs_f64()
                        ),
                    )
                    .with_level(Level::Warn)
                    .with_data(json!({ "error": error }));
                    match self.store.retry_later(lease, after, &error, &event).await {
                        Ok(()) => {
                            info!(delay = ?delay, "attempt failed; will retry");
                            if let Some(m) = self.metrics.get() {
                                m.run_retried(run.kind, &run.action);
                            }
                        }
                        Err(e) => warn!(error = %e, "could not requeue for retry"),
                    }
                    return;
                }
                finish(RunStatus::Failed, Some(error), None)
            }
            Outcome::TimedOut => finish(
                RunStatus::Failed,
                Some(RunError {
                    code: "timeout".into(),
                    message: format!("{} did not finish within its timeout of {}s", run.action, run.timeout_secs),
                    retryable: false,
                    detail: None,
                }),
                None,
            ),
            Outcome::Panicked(msg) => finish(
                RunStatus::Failed,
                Some(RunError {
                    code: "internal".into(),
                    message: "the provider crashed; see the server log".into(),
                    retryable: false,
                    detail: None,
                }),
                {
                    tracing::error!(panic = %msg, "provider panicked");
                    None
                },
            ),
        };
        let mut completion = completion;
        if completion.status == RunStatus::Succeeded {
            self.applied(run, &mut completion).await;
        } else if let Some((provider, job)) = cleanup {
            clean_up(provider, ctx, job).await;
        }
        let (status, now) = (completion.status, completion.now);
        // The writers are the lanes: one each.
        let writer = self.completions.get().map(|w| &w[usize::from(Lane::containing(lease.run, w.len() as u8).index)]);
        let written = match writer {
            Some(writer) => {
                let (reply, result) = oneshot::channel();
                match writer.send((lease, completion, reply)).await {
                    Ok(()) => {
                        drop(slot);
                        result.await.unwrap_or_else(|_| Err(Error::Internal("the completion writer stopped".into())))
                    }
                    Err(mpsc::error::SendError((lease, completion, _))) => {
                        self.store.complete_run(lease, &completion).await
                    }
                }
            }
            None => self.store.complete_run(lease, &completion).await,
        };
        match written {
            Ok(()) => {
                info!(status = status.as_str(), "run finished");
                if let Some(m) = self.metrics.get() {
                    let took = run.started_at.and_then(|s| (now - s).to_std().ok());
                    m.run_finished(run.kind, &run.action, status, took);
                }
            }
            Err(Error::StaleLease { .. }) => {
                warn!("late write fenced out: another worker owns this run now")
            }
            Err(e) => {
                warn!(error = %e, cause = ?std::error::Error::source(&e), "could not record the end of the run; its lease will lapse and it will be retried")
            }
        }
    }

    /// What a success changes in the spec (a scale's count, as a new spec
    /// version) and in what runs (the applied spec). Only a spec-changing
    /// action reads the resource again: its change applies to the spec as
    /// it is now.
    async fn applied(&self, run: &Run, completion: &mut Completion) {
        let Some(decl) = run.kind.action(&run.action) else {
            return;
        };
        if decl.sets.is_empty() {
            completion.applies_spec = decl.applies_spec;
            return;
        }
        let Ok(Some(r)) = self.store.get_resource_by_id(run.resource_id).await else {
            return;
        };
        let new = run.kind.spec_after_success(&run.action, &run.params, &r.spec).unwrap_or_else(|| r.spec.clone());
        if new != r.spec {
            completion.spec = Some(SpecUpdate { patch: crate::merge::diff(&r.spec, &new), spec: new.clone() });
        }
        if run.kind.applies(&r.spec, &run.action) {
            completion.applies_spec = true;
        } else if let Some(mut applied) = r.applied_spec {
            // The fields the action sets run as the spec now says.
            if let Some(fields) = applied.as_object_mut() {
                for field in decl.sets {
                    match new.get(*field) {
                        Some(v) => fields.insert(field.to_string(), v.clone()),
                        None => fields.remove(*field),
                    };
                }
            }
            match applied == new {
                true => completion.applies_spec = true,
                false => completion.applied = Some(applied),
            }
        }
    }

    fn backoff(&self, attempt: i32) -> Duration {
        let exp = self.cfg.backoff_base.saturating_mul(1u32 << (attempt.clamp(1, 16) - 1));
        let capped = exp.min(self.cfg.backoff_max);
        // Up to 20% jitter so that runs failing together do not retry together.
        let jitter = (Uuid::new_v4().as_u128() % 1000) as f64 / 5000.0;
        capped.mul_f64(1.0 + jitter)
    }
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// How long a provider may take to release what a failed attempt started.
const CLEAN_UP_LIMIT: Duration = Duration::from_secs(120);

/// Lets the provider release what an attempt that ended for good without
/// success started; a failure or a timeout here is logged and recorded as
/// an event, and never changes the run's outcome.
async fn clean_up(provider: &dyn Provider, ctx: &Ctx, job: &Job) {
    let work = AssertUnwindSafe(provider.clean_up(ctx, job)).catch_unwind();
    let why = match tokio::time::timeout(CLEAN_UP_LIMIT, work).await {
        Ok(Ok(Ok(()))) => return,
        Ok(Ok(Err(e))) => e.to_string(),
        Ok(Err(panic)) => format!("the provider crashed: {}", panic_message(panic)),
        Err(_) => format!("it did not finish within {}s", CLEAN_UP_LIMIT.as_secs()),
    };
    warn!(why = %why, "could not clean up after the attempt");
    ctx.event(
        NewEvent::info("clean-up", format!("could not clean up after this attempt: {why}")).with_level(Level::Warn),
    )
    .await;
}

async fn heartbeat_loop(store: Arc<dyn Store>, ctx: Arc<Ctx>, lost: Arc<Notify>, every: Duration, lease: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match store.heartbeat(ctx.lease, lease, Utc::now()).await {
            Ok(Some(cancel)) => {
                if cancel {
                    ctx.cancel.store(true, Ordering::Relaxed);
                }
            }
            Ok(None) => {
                lost.notify_one();
                return;
            }
            // Keep trying: the lease may still be ours when the store is back.
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

struct Ctx {
    store: Arc<dyn Store>,
    discovery: Option<Arc<dyn DiscoveryStore>>,
    ttl: chrono::Duration,
    lease: Lease,
    attempt: i32,
    cancel: Arc<AtomicBool>,
}

#[async_trait]
impl RunContext for Ctx {
    fn run_id(&self) -> Uuid {
        self.lease.run
    }

    fn attempt(&self) -> i32 {
        self.attempt
    }

    async fn event(&self, event: NewEvent) {
        if let Err(e) = self.store.append_event(self.lease, &event).await {
            warn!(error = %e, step = %event.step, "could not append run event");
        }
    }

    fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    async fn recall(&self, step: &str) -> Option<Value> {
        let mut after = 0;
        let mut found = None;
        loop {
            let page = match self.store.list_events(self.lease.run, after, 1000).await {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %e, run = %self.lease.run, "could not read the run's events");
                    return None;
                }
            };
            let Some(last) = page.last() else { return found };
            after = last.seq;
            if let Some(e) = page.iter().rev().find(|e| e.step == step && e.data.is_some()) {
                found = e.data.clone();
            }
        }
    }

    async fn discovery_enter(&self, entry: &NewEntry, reason: &str) -> Result<(), ProviderError> {
        let Some(registry) = &self.discovery else { return Ok(()) };
        let now = Utc::now();
        let by = self.lease.run.to_string();
        let idx = registry.discovery_enter(entry, reason, &by, now, now + self.ttl).await.map_err(|e| {
            ProviderError::retryable("discovery_unavailable", format!("could not enter {}: {e}", entry.instance))
        })?;
        if let Some(idx) = idx {
            let msg = format!(
                "{}/{} entered the discovery registry at {}:{} ({reason})",
                entry.service, entry.instance, entry.address, entry.port
            );
            let data = serde_json::json!({ "discovery_index": idx, "entry": entry });
            self.event(NewEvent::info("discovery", msg).with_data(data)).await;
        }
        Ok(())
    }

    async fn discovery_listed(&self, service_id: Uuid) -> Result<Option<Vec<String>>, ProviderError> {
        let Some(registry) = &self.discovery else { return Ok(None) };
        let snapshot = registry.discovery_snapshot(Some(service_id)).await.map_err(|e| {
            ProviderError::retryable("discovery_unavailable", format!("could not read the registry: {e}"))
        })?;
        Ok(Some(snapshot.entries.into_iter().map(|e| e.entry.instance).collect()))
    }

    async fn discovery_leave(
        &self,
        service: &str,
        service_id: Uuid,
        instance: &str,
        reason: &str,
    ) -> Result<(), ProviderError> {
        let Some(registry) = &self.discovery else { return Ok(()) };
        let by = self.lease.run.to_string();
        let idx = registry.discovery_leave(service_id, instance, reason, &by, Utc::now(), None).await.map_err(|e| {
            ProviderError::retryable("discovery_unavailable", format!("could not take {instance} out: {e}"))
        })?;
        if let Some(idx) = idx {
            let msg = format!("{service}/{instance} left the discovery registry ({reason})");
            let data = serde_json::json!({ "discovery_index": idx, "instance": instance });
            self.event(NewEvent::info("discovery", msg).with_data(data)).await;
        }
        Ok(())
    }
}
