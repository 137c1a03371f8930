//! Routing: what each router's backends hold, and keeping its load
//! balancer's configuration in step with it.
//!
//! A router's [`RouteTable`] is its applied spec and, for each backend, its
//! servers: the entries of its service in the discovery registry, or its
//! cluster's instances. The [`Routing`] keeper renders it again whenever
//! the registry changes (debounced) and on every observer round, and hands
//! it to the router's [`Balancer`] (locally a real HAProxy), which
//! validates the configuration with the load balancer itself before it
//! loads it. Every configuration that changed what runs, was refused, or
//! was held is kept as a [`RouterConfig`] version with its diff.
//!
//! # Guarantees
//! - A configuration the balancer refuses is never loaded: the last good
//!   one keeps serving, and the router is `degraded` with the reason.
//! - A render that would empty a backend that had servers keeps those
//!   servers (a *hold*, recorded), unless its target was stopped on
//!   purpose (a stopped or destroyed service or cluster) or changed.
//! - A router is rendered by one process at a time (a lock per router) and
//!   by one replica at a time (the holder of its observation lease); the
//!   keeper leaves a router alone while a run of it is under way (the run
//!   renders it itself).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::kinds::router::{self, Spec, Target};
use crate::model::{NewEvent, Resource, ResourceKey, Time};
use crate::ports::{DiscoveryStore, Job, Provider, ProviderError, RunContext, Store};

/// How long the keeper lets a burst of registry changes settle before it
/// renders: one render for a deploy's enter-then-leave.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// One server of a backend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Server {
    /// Unique in its backend: the instance's id (`0-3fa2c1`), or the
    /// cluster instance's `{cluster}-{index}`.
    pub name: String,
    pub address: String,
    pub port: u16,
}

/// What a router's balancer is told to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    pub spec: Spec,
    /// Each backend's servers, by backend name.
    pub servers: BTreeMap<String, Vec<Server>>,
}

/// A backend kept as it was instead of being emptied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub backend: String,
    pub reason: String,
}

/// What became of a rendered configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Validated and serving.
    Applied,
    /// Refused by the balancer's validation; the last good one serves on.
    Invalid,
    /// Nothing changed but a backend that would have been emptied was kept.
    Held,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Invalid => "invalid",
            Outcome::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "applied" => Some(Outcome::Applied),
            "invalid" => Some(Outcome::Invalid),
            "held" => Some(Outcome::Held),
            _ => None,
        }
    }
}

/// A configuration version to record.
#[derive(Debug, Clone)]
pub struct NewRouterConfig {
    pub router_id: Uuid,
    pub outcome: Outcome,
    /// What made drover render: a run's id, `registry` or `observer`.
    pub by: String,
    /// The configuration text as the balancer rendered it.
    pub config: String,
    pub table: RouteTable,
    /// A unified diff from the configuration serving before.
    pub diff: String,
    /// Why it was refused (`invalid`).
    pub reason: Option<String>,
    pub holds: Vec<Hold>,
    pub at: Time,
}

/// A recorded configuration version.
#[derive(Debug, Clone, Serialize)]
pub struct RouterConfig {
    pub router_id: Uuid,
    /// 1, 2, … per router.
    pub version: i64,
    pub outcome: Outcome,
    pub by: String,
    pub config: String,
    pub table: RouteTable,
    pub diff: String,
    pub reason: Option<String>,
    pub holds: Vec<Hold>,
    pub at: Time,
}

/// Where router configurations are kept.
#[async_trait]
pub trait RouterConfigStore: Send + Sync + 'static {
    /// Records a version (the next number of its router).
    async fn insert_router_config(&self, c: &NewRouterConfig) -> Result<RouterConfig>;
    /// Newest first, below `before`.
    async fn list_router_configs(&self, router: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<RouterConfig>>;
    async fn router_config(&self, router: Uuid, version: i64) -> Result<Option<RouterConfig>>;
    /// The newest version, and the newest that was applied.
    async fn last_router_configs(&self, router: Uuid) -> Result<(Option<RouterConfig>, Option<RouterConfig>)>;
    /// Forgets the versions older than `before`, except each router's
    /// serving one (its newest applied) and those after it.
    async fn prune_router_configs(&self, before: Time) -> Result<u64>;
}

/// How long configuration versions are kept (the serving one always is).
pub const KEEP_CONFIGS: chrono::Duration = chrono::Duration::days(30);

/// Why a balancer did not put a configuration in place.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BalancerError {
    /// The load balancer's own validation refused it.
    #[error("the configuration is invalid: {0}")]
    Invalid(String),
    #[error("{message}")]
    Failed { code: String, message: String, retryable: bool },
}

impl BalancerError {
    pub fn fatal(code: &str, message: impl Into<String>) -> BalancerError {
        BalancerError::Failed { code: code.into(), message: message.into(), retryable: false }
    }
}

impl From<BalancerError> for ProviderError {
    fn from(e: BalancerError) -> ProviderError {
        match e {
            BalancerError::Invalid(why) => ProviderError::fatal("invalid_config", why),
            BalancerError::Failed { code, message, retryable: true } => ProviderError::retryable(&code, message),
            BalancerError::Failed { code, message, .. } => ProviderError::fatal(&code, message),
        }
    }
}

/// A server as the load balancer's own health checks see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHealth {
    pub backend: String,
    pub server: String,
    /// `UP`, `DOWN`, `MAINT`, … as the balancer says it.
    pub status: String,
    /// The last check's result, as the balancer says it (`L7OK`, `L4CON`…).
    pub check: String,
}

impl ServerHealth {
    /// `name STATUS (check)`, as events and views say it.
    pub fn said(&self) -> String {
        format!("{} {} ({})", self.server, self.status, self.check)
    }
}

/// Requests through a backend, and how many of them failed (5xx answers
/// and broken responses; for TCP, failed connections and responses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    pub failed: u64,
}

/// What a balancer sees of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerStatus {
    pub running: bool,
    /// Why it is not running, or what is wrong, if it knows.
    pub problem: Option<String>,
    pub servers: Vec<ServerHealth>,
}

/// A load balancer a provider runs for routers.
#[async_trait]
pub trait Balancer: Send + Sync + 'static {
    /// The configuration text for `table` (no side effect).
    fn render(&self, router: &Resource, table: &RouteTable) -> String;

    /// Validates `config` with the load balancer itself, and puts it in
    /// place: starts the balancer if it is not running, or reloads it
    /// without dropping connections. A refused configuration is
    /// [`BalancerError::Invalid`] and changes nothing.
    async fn apply(&self, router: &Resource, config: &str) -> Result<(), BalancerError>;

    async fn status(&self, router: &Resource) -> BalancerStatus;

    /// A backend's request counters since the balancer started (a reload
    /// starts them again): `None` when it cannot say.
    async fn counters(&self, router: &Resource, backend: &str) -> Option<Counters>;

    /// Stops serving; connections in flight finish (bounded).
    async fn stop(&self, router: &Resource) -> Result<(), BalancerError>;

    /// Stops and removes what the router left on the machine.
    async fn remove(&self, router: &Resource) -> Result<(), BalancerError>;

    /// Where clients reach the router's frontends, when the balancer
    /// decides it (an ALB's DNS name); `None`: the spec's address.
    async fn endpoint(&self, _router: &Resource) -> Option<String> {
        None
    }

    /// How often a swap looks at the checks and counters.
    fn look_every(&self) -> Duration {
        Duration::from_millis(100)
    }

    /// The configuration the balancer serves now, as it would render it
    /// (for a refresh to compare with the last applied version); `None`
    /// when it cannot show it.
    async fn serving(&self, _router: &Resource) -> Result<Option<String>, BalancerError> {
        Ok(None)
    }
}

/// What [`Routing::render`] did.
#[derive(Debug, Clone)]
pub enum Rendered {
    /// The balancer serves this (new) version.
    Applied(Box<RouterConfig>),
    /// Nothing to change: what serves is what the registry says.
    Unchanged,
    /// The balancer refused it; the last good configuration serves on.
    Invalid(String),
}

/// The routing keeper (see the module's documentation).
pub struct Routing {
    store: Arc<dyn Store>,
    discovery: Arc<dyn DiscoveryStore>,
    configs: Arc<dyn RouterConfigStore>,
    balancers: BTreeMap<String, Arc<dyn Balancer>>,
    locks: Locks,
    /// How each router's last render went, in this process (the renderer
    /// of a router is the holder of its observation lease, so this is
    /// where its observer looks).
    status: Mutex<HashMap<Uuid, RenderStatus>>,
    /// Wakes the keeper (a router's run ended).
    wake: Notify,
    /// The providers whose routers this process keeps (`None`: all).
    only: Option<Vec<String>>,
}

/// A lock per router: what works on one router (a render, a reload) does
/// it one at a time.
#[derive(Default)]
pub struct Locks(Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    /// Waits for `router`'s lock; held until the guard drops.
    pub async fn lock(&self, router: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.0.lock().expect("not poisoned").entry(router).or_default().clone();
        lock.lock_owned().await
    }
}

/// How a router's last render went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RenderStatus {
    Serving,
    Held(Vec<Hold>),
    Refused { version: i64, reason: String },
}

impl Routing {
    pub fn new(
        store: Arc<dyn Store>,
        discovery: Arc<dyn DiscoveryStore>,
        configs: Arc<dyn RouterConfigStore>,
        balancers: BTreeMap<String, Arc<dyn Balancer>>,
    ) -> Routing {
        Routing {
            store,
            discovery,
            configs,
            balancers,
            locks: Locks::default(),
            status: Mutex::default(),
            wake: Notify::new(),
            only: None,
        }
    }

    /// Keeps only the routers of these providers (a replica started with
    /// `--providers`).
    pub fn only(mut self, providers: Option<Vec<String>>) -> Routing {
        self.only = providers;
        self
    }

    /// The provider names that have a balancer.
    pub fn providers(&self) -> Vec<String> {
        self.balancers.keys().cloned().collect()
    }

    fn balancer(&self, provider: &str) -> std::result::Result<&Arc<dyn Balancer>, BalancerError> {
        self.balancers
            .get(provider)
            .ok_or_else(|| BalancerError::fatal("unknown_provider", format!("no balancer for provider {provider:?}")))
    }

    /// The configuration versions of a router, newest first.
    pub async fn configs(&self, router: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<RouterConfig>> {
        self.configs.list_router_configs(router, before, limit).await
    }

    pub async fn config(&self, router: Uuid, version: i64) -> Result<Option<RouterConfig>> {
        self.configs.router_config(router, version).await
    }

    /// Each backend's servers as drover sees them now, and for each backend
    /// whose target is stopped on purpose (or gone), why it may be empty.
    async fn servers(&self, spec: &Spec) -> Result<(BTreeMap<String, Vec<Server>>, BTreeMap<String, String>)> {
        let mut servers = BTreeMap::new();
        let mut may_empty = BTreeMap::new();
        for b in &spec.backends {
            let seen = self.target(&b.target, b.port).await?;
            if let Some(why) = seen.resting {
                may_empty.insert(b.name.clone(), why);
            }
            servers.insert(b.name.clone(), seen.servers);
        }
        Ok((servers, may_empty))
    }

    /// A target's servers as drover sees them now, and whether it rests on
    /// purpose (stopped, destroyed, gone: why). `port`: a cluster's
    /// instances' port when they do not say (aws).
    async fn target(&self, target: &Target, port: Option<u16>) -> Result<TargetSeen> {
        let found = self.store.get_resource(target.kind(), &ResourceKey::parse(target.key())).await?;
        let Some(r) = found else {
            let why = format!("{} {} does not exist", target.kind(), target.key());
            return Ok(TargetSeen { servers: Vec::new(), resting: Some(why), state: None });
        };
        let (mut servers, resting_states): (Vec<Server>, &[&str]) = match target {
            Target::Service(_) => {
                let snap = self.discovery.discovery_snapshot(Some(r.id)).await?;
                let list = snap
                    .entries
                    .into_iter()
                    .map(|e| Server {
                        name: e.entry.instance.clone(),
                        address: e.entry.address.clone(),
                        port: e.entry.host_port.unwrap_or(e.entry.port),
                    })
                    .collect();
                (list, &["pending", "stopping", "stopped", "destroying", "destroyed"])
            }
            Target::Cluster(_) => {
                (cluster_servers(&r, port), &["pending", "stopping", "down", "destroying", "destroyed"])
            }
        };
        servers.sort();
        let resting =
            resting_states.contains(&r.state.as_str()).then(|| format!("{} {} is {}", r.kind, r.name, r.state));
        Ok(TargetSeen { servers, resting, state: Some(r.state) })
    }

    /// Renders `router` with `spec` from what the registry holds now and,
    /// when that differs from what serves (or `force`: a run's), puts it in
    /// place; records what it did. `by`: a run's id, `registry`, `observer`.
    pub async fn render(&self, router: &Resource, spec: &Spec, by: &str, force: bool) -> Result<Rendered, RenderError> {
        let _one = self.locks.lock(router.id).await;
        let balancer = self.balancer(&spec.provider)?.clone();
        let (servers, may_empty) = self.servers(spec).await?;
        let (last, last_applied) = self.configs.last_router_configs(router.id).await?;
        let mut table = RouteTable { spec: spec.clone(), servers };
        let holds = hold(last_applied.as_ref().map(|c| &c.table), &mut table, &may_empty);
        let serving = last_applied.as_ref().is_some_and(|c| c.table == table);
        let now = Utc::now();
        let previous_text = last_applied.as_ref().map(|c| c.config.as_str()).unwrap_or("");
        if serving && !force {
            // Only a hold to say, if it is new.
            let known = last.as_ref().is_some_and(|l| l.holds == holds);
            if !holds.is_empty() && !known {
                for h in &holds {
                    warn!(router = %router.name, backend = %h.backend, reason = %h.reason, "render held");
                }
                let config = last_applied.as_ref().map(|c| c.config.clone()).unwrap_or_default();
                self.record(router, Outcome::Held, by, config, table, String::new(), None, holds.clone(), now).await?;
            }
            let status = if holds.is_empty() { RenderStatus::Serving } else { RenderStatus::Held(holds) };
            self.settle(router, status).await?;
            return Ok(Rendered::Unchanged);
        }
        let config = balancer.render(router, &table);
        let diff = text_diff(previous_text, &config);
        match balancer.apply(router, &config).await {
            Ok(()) => {
                for h in &holds {
                    warn!(router = %router.name, backend = %h.backend, reason = %h.reason, "render held");
                }
                let status = if holds.is_empty() { RenderStatus::Serving } else { RenderStatus::Held(holds.clone()) };
                let version = self.record(router, Outcome::Applied, by, config, table, diff, None, holds, now).await?;
                info!(router = %router.name, version = version.version, by = %by, "router configuration applied");
                self.settle(router, status).await?;
                Ok(Rendered::Applied(Box::new(version)))
            }
            Err(BalancerError::Invalid(reason)) => {
                let known = last.as_ref().is_some_and(|l| {
                    l.outcome == Outcome::Invalid && l.reason.as_deref() == Some(&reason) && l.table == table
                });
                let version = match (known, last) {
                    (true, Some(l)) => l.version,
                    _ => {
                        warn!(router = %router.name, reason = %reason, "router configuration refused; the last good one serves on");
                        self.record(router, Outcome::Invalid, by, config, table, diff, Some(reason.clone()), holds, now)
                            .await?
                            .version
                    }
                };
                self.settle(router, RenderStatus::Refused { version, reason: reason.clone() }).await?;
                Ok(Rendered::Invalid(reason))
            }
            Err(e) => Err(RenderError::Balancer(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        router: &Resource,
        outcome: Outcome,
        by: &str,
        config: String,
        table: RouteTable,
        diff: String,
        reason: Option<String>,
        holds: Vec<Hold>,
        at: Time,
    ) -> Result<RouterConfig> {
        let c = NewRouterConfig {
            router_id: router.id,
            outcome,
            by: by.to_string(),
            config,
            table,
            diff,
            reason,
            holds,
            at,
        };
        self.configs.insert_router_config(&c).await
    }

    /// Keeps how the render went, and shows it in the router's view.
    async fn settle(&self, router: &Resource, status: RenderStatus) -> Result<()> {
        self.status.lock().expect("not poisoned").insert(router.id, status);
        let seen = self.observation(router).await;
        if router.observed.as_ref() != Some(&seen) {
            self.store.set_observed(router.id, &seen).await?;
        }
        Ok(())
    }

    /// What the router's view shows of it: whether it serves, the last
    /// configuration's outcome, and its servers as the balancer sees them.
    pub async fn observation(&self, router: &Resource) -> Value {
        let Ok(spec) = Spec::from_value(router.applied_spec.as_ref().unwrap_or(&router.spec)) else {
            return json!({ "healthy": false, "status": "unknown", "summary": "the router's spec is invalid" });
        };
        let Ok(balancer) = self.balancer(&spec.provider) else {
            return json!({ "healthy": false, "status": "unknown", "summary": "no balancer for its provider" });
        };
        let status = balancer.status(router).await;
        let (last, applied) = self.configs.last_router_configs(router.id).await.unwrap_or_default();
        // How the last render went: as this process saw it, or (after a
        // restart, before its first render) as the last version says.
        let render =
            self.status.lock().expect("not poisoned").get(&router.id).cloned().unwrap_or_else(|| match &last {
                Some(l) if l.outcome == Outcome::Invalid => {
                    RenderStatus::Refused { version: l.version, reason: l.reason.clone().unwrap_or_default() }
                }
                Some(l) if !l.holds.is_empty() => RenderStatus::Held(l.holds.clone()),
                _ => RenderStatus::Serving,
            });
        let should_run = router.state == router::State::Up.as_str();
        let (state, summary) = match (render, status.running) {
            (_, false) if should_run => {
                ("down", format!("the load balancer is not running: {}", status.problem.clone().unwrap_or_default()))
            }
            (_, false) => ("stopped", "not serving".to_string()),
            (RenderStatus::Refused { version, reason }, true) => (
                "degraded",
                format!(
                    "configuration version {version} was refused: {reason}; version {} serves on",
                    applied.as_ref().map(|a| a.version).unwrap_or(0)
                ),
            ),
            (RenderStatus::Held(holds), true) => (
                "held",
                format!("serving, holding: {}", holds.iter().map(|h| h.reason.as_str()).collect::<Vec<_>>().join("; ")),
            ),
            (RenderStatus::Serving, true) => ("serving", "serving".to_string()),
        };
        // The balancer's own view: servers its checks do not find up, and
        // backends none of whose servers are (a swap's shadow aside).
        let live: Vec<&ServerHealth> = status.servers.iter().filter(|s| !router::is_shadow(&s.backend)).collect();
        let down: Vec<String> =
            live.iter().filter(|s| s.status != "UP").map(|s| format!("{}/{}", s.backend, s.said())).collect();
        let dark: Vec<&str> = spec
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .filter(|b| {
                let of: Vec<&&ServerHealth> = live.iter().filter(|s| s.backend == *b).collect();
                !of.is_empty() && of.iter().all(|s| s.status != "UP")
            })
            .collect();
        let mut summary = summary;
        if !dark.is_empty() {
            summary.push_str(&format!("; no server up in backend {}", dark.join(", ")));
        }
        if !down.is_empty() {
            let first: Vec<&str> = down.iter().take(5).map(String::as_str).collect();
            summary.push_str(&format!(
                "; {} server(s) not up by the load balancer's checks: {}",
                down.len(),
                first.join(", ")
            ));
        }
        json!({
            "healthy": matches!(state, "serving" | "held" | "stopped") && dark.is_empty(),
            "status": state,
            "summary": summary,
            "config_version": applied.as_ref().map(|a| a.version),
            "servers": status.servers,
            "servers_not_up": down.len(),
        })
    }

    /// One round: renders every `up` router this replica holds the lease
    /// of and no run is working on.
    pub async fn keep_all(&self, worker: &str, lease_for: Duration, by: &str) {
        let up = router::State::Up.as_str();
        match crate::service::live_where(self.store.as_ref(), router::KIND, |r| r.state == up).await {
            Ok(routers) => {
                for r in &routers {
                    self.keep(r, worker, lease_for, by).await;
                }
            }
            Err(e) => warn!(error = %e, "routing keeper could not list routers"),
        }
    }

    async fn keep(&self, r: &Resource, worker: &str, lease_for: Duration, by: &str) {
        let Some(applied) = r.applied_spec.as_ref() else { return };
        let provider = r.kind.provider_of(applied);
        if self.only.as_ref().is_some_and(|only| !only.contains(&provider)) {
            return;
        }
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease_for).unwrap_or(chrono::Duration::MAX);
        let result: Result<(), RenderError> = async {
            if !self.store.lease_observation(r.id, worker, now, until).await? {
                return Ok(());
            }
            if self.store.active_run(r.id).await?.is_some() {
                return Ok(());
            }
            let spec = Spec::from_value(applied)?;
            self.render(r, &spec, by, false).await.map(|_| ())
        }
        .await;
        if let Err(e) = result {
            warn!(router = %r.name, error = %e, "could not render the router");
        }
    }

    /// Wakes the keeper at once (a router's run ended).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Renders on every registry change (debounced), when woken, and every
    /// `every`, until `stop`.
    pub async fn run(self: Arc<Self>, worker: String, every: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticks = self.discovery.discovery_watch();
        loop {
            let by = tokio::select! {
                r = ticks.changed() => match r { Ok(()) => "registry", Err(_) => return },
                _ = self.wake.notified() => "registry",
                _ = tokio::time::sleep(every) => "observer",
                _ = stop.changed() => return,
            };
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(DEBOUNCE).await;
            ticks.borrow_and_update();
            self.keep_all(&worker, every * 2, by).await;
            if by == "observer" {
                if let Err(e) = self.configs.prune_router_configs(Utc::now() - KEEP_CONFIGS).await {
                    warn!(error = %e, "could not forget old router configurations");
                }
            }
        }
    }
}

/// A target as drover sees it.
struct TargetSeen {
    servers: Vec<Server>,
    /// Why it may be empty: stopped on purpose, or gone.
    resting: Option<String>,
    /// Its resource's state (`None`: it does not exist).
    state: Option<String>,
}

/// Why a render could not be done at all.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Store(#[from] Error),
    #[error(transparent)]
    Balancer(#[from] BalancerError),
}

impl From<RenderError> for ProviderError {
    fn from(e: RenderError) -> ProviderError {
        match e {
            RenderError::Store(e @ Error::Store { .. }) => ProviderError::retryable("store_unavailable", e.to_string()),
            RenderError::Store(e) => ProviderError::fatal("render_failed", e.to_string()),
            RenderError::Balancer(b) => b.into(),
        }
    }
}

/// A cluster's instances: a local cluster's from its outputs (each says
/// its port); an aws cluster's running ones as the observer last saw them
/// (or its last run left them), on the backend's `port`, else the
/// cluster's own (the port its instances serve on and its health check
/// asks), else 80.
fn cluster_servers(r: &Resource, port: Option<u16>) -> Vec<Server> {
    let port = port.or_else(|| r.spec["port"].as_u64().and_then(|p| u16::try_from(p).ok())).unwrap_or(80);
    let local = r.outputs["instances"].as_array().into_iter().flatten().filter_map(|i| {
        let index = i["index"].as_u64()?;
        let port = u16::try_from(i["port"].as_u64()?).ok()?;
        let address = i["address"].as_str().unwrap_or("127.0.0.1").to_string();
        Some(Server { name: format!("{}-{index}", r.name), address, port })
    });
    let local: Vec<Server> = local.collect();
    if !local.is_empty() {
        return local;
    }
    let seen = r.observed.as_ref().and_then(|o| o["instances"].as_array()).filter(|l| !l.is_empty());
    seen.or_else(|| r.outputs["instances"].as_array())
        .into_iter()
        .flatten()
        .filter(|i| i["state"] == "running")
        .filter_map(|i| {
            let address = i["private_ip"].as_str()?.to_string();
            Some(Server { name: i["id"].as_str()?.to_string(), address, port })
        })
        .collect()
}

/// Keeps the servers of each backend `next` would empty that had servers
/// in `applied`, the same target, and no reason to be empty; returns what
/// it kept, with why.
pub fn hold(applied: Option<&RouteTable>, next: &mut RouteTable, may_empty: &BTreeMap<String, String>) -> Vec<Hold> {
    let Some(applied) = applied else { return Vec::new() };
    let mut holds = Vec::new();
    for b in &next.spec.backends {
        let empty = next.servers.get(&b.name).is_none_or(|s| s.is_empty());
        let before = applied.spec.backends.iter().find(|a| a.name == b.name);
        let had = applied.servers.get(&b.name).filter(|s| !s.is_empty());
        let (Some(before), Some(had)) = (before, had) else { continue };
        if !empty || before.target != b.target || may_empty.contains_key(&b.name) {
            continue;
        }
        holds.push(Hold {
            backend: b.name.clone(),
            reason: format!(
                "backend {} would be emptied ({} {} has no servers, and was not stopped): its {} server(s) are kept",
                b.name,
                b.target.kind(),
                b.target.key(),
                had.len()
            ),
        });
        next.servers.insert(b.name.clone(), had.clone());
    }
    holds
}

/// A unified diff of two configurations (empty when equal).
pub fn text_diff(from: &str, to: &str) -> String {
    if from == to {
        return String::new();
    }
    similar::TextDiff::from_lines(from, to).unified_diff().context_radius(2).header("serving", "rendered").to_string()
}

/// The router kind's runs, on a provider that has a [`Balancer`]: they
/// render through the keeper (so their configurations are versions like
/// any other) and start, stop or remove the balancer.
pub struct RouterRuns {
    pub routing: Arc<Routing>,
}

#[async_trait]
impl Provider for RouterRuns {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e}")))?;
        let balancer = self.routing.balancer(&spec.provider)?.clone();
        let result = match job.action.as_str() {
            "refresh" => return Ok(self.refresh(ctx, &job.resource, balancer.as_ref()).await),
            "create" | "apply" | "start" | "repair" => {
                let by = job.run_id.to_string();
                let rendered = match self.routing.render(&job.resource, &spec, &by, true).await? {
                    Rendered::Applied(c) => {
                        let holds = c.holds.iter().map(|h| h.reason.as_str()).collect::<Vec<_>>().join("; ");
                        let servers: usize = c.table.servers.values().map(Vec::len).sum();
                        let mut msg = format!("configuration version {} serving, {servers} server(s)", c.version);
                        if !holds.is_empty() {
                            msg.push_str(&format!("; held: {holds}"));
                        }
                        ctx.event(NewEvent::info("config", msg).with_data(json!({ "version": c.version }))).await;
                        Ok(Some(c.version))
                    }
                    Rendered::Unchanged => Ok(None),
                    Rendered::Invalid(reason) => Err(ProviderError::fatal(
                        "invalid_config",
                        format!("the load balancer refused the configuration: {reason}"),
                    )),
                };
                match rendered {
                    Ok(version) => {
                        let at = balancer.endpoint(&job.resource).await;
                        Ok(keeping_swaps(outputs(&spec, version, at.as_deref()), job))
                    }
                    Err(e) => Err(e),
                }
            }
            "swap" | "swap-back" => self.swap(ctx, job, &spec, balancer.as_ref()).await,
            "stop" => {
                balancer.stop(&job.resource).await?;
                ctx.event(NewEvent::info("stop", "the load balancer stopped")).await;
                Ok(json!({ "frontends": [] }))
            }
            "destroy" => {
                balancer.remove(&job.resource).await?;
                ctx.event(NewEvent::info("destroy", "the load balancer stopped and its files removed")).await;
                Ok(json!({ "frontends": [] }))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("routers cannot {other}"))),
        };
        self.routing.wake();
        result
    }

    fn observes(&self) -> bool {
        true
    }

    fn refreshes(&self) -> bool {
        true
    }

    async fn observe(&self, resource: &Resource) -> Option<Value> {
        Some(self.routing.observation(resource).await)
    }
}

impl RouterRuns {
    /// Compares the balancer with the record: running when the router is
    /// up and not when it is stopped, and (running) serving the last
    /// applied configuration version. Changes nothing.
    async fn refresh(&self, ctx: &dyn RunContext, router: &Resource, balancer: &dyn Balancer) -> Value {
        use crate::drift::{Difference, Report};
        let mut report = Report::default();
        let status = balancer.status(router).await;
        let should_run = router.state == router::State::Up.as_str();
        match (should_run, status.running) {
            (true, true) | (false, false) => report.same(),
            (true, false) => report.differs(Difference::new(
                "balancer",
                "running",
                format!("not running: {}", status.problem.clone().unwrap_or_default()),
            )),
            (false, true) => report.differs(Difference::new("balancer", "stopped", "running")),
        }
        if should_run && status.running {
            let applied = self.routing.configs.last_router_configs(router.id).await.map(|(_, applied)| applied);
            match (applied, balancer.serving(router).await) {
                (Ok(Some(applied)), Ok(Some(text))) if text == applied.config => report.same(),
                (Ok(Some(applied)), Ok(Some(text))) => {
                    let changed = text_diff(&applied.config, &text)
                        .lines()
                        .filter(|l| l.starts_with(['+', '-']) && !l.starts_with("+++") && !l.starts_with("---"))
                        .count();
                    report.differs(Difference::new(
                        "config",
                        format!("version {}", applied.version),
                        format!("changed on the machine ({changed} lines differ)"),
                    ))
                }
                (Ok(None), _) => report.cannot_check("config", "no configuration version applied yet"),
                (_, Ok(None)) => report.cannot_check("config", "the load balancer cannot show what it serves"),
                (Err(e), _) => report.cannot_check("config", e.to_string()),
                (_, Err(e)) => report.cannot_check("config", e.to_string()),
            }
        }
        report.told(ctx).await
    }
}

/// Fewer requests than this in the verify window say nothing of an error
/// rate: the guard needs at least these many to swap back.
const GUARD_MIN_REQUESTS: u64 = 10;

impl RouterRuns {
    /// `swap` and `swap-back`: the new target must be up, then every one of
    /// its servers pass the balancer's own checks (a shadow backend that
    /// no frontend routes to), then traffic moves, then the guard watches
    /// the error rate and moves it back when it crosses the threshold. A
    /// second attempt (a crash, a lost lease) goes through the same steps:
    /// it finishes the swap, or swaps back.
    async fn swap(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        balancer: &dyn Balancer,
    ) -> Result<Value, ProviderError> {
        let router = &job.resource;
        let by = job.run_id.to_string();
        let m: router::Move = serde_json::from_value(job.params.clone())
            .map_err(|e| ProviderError::fatal("invalid_params", format!("the run's parameters are invalid: {e}")))?;
        let Some(backend) = spec.backends.iter().find(|b| b.name == m.backend) else {
            return Err(ProviderError::fatal("no_backend", format!("the router has no backend {:?}", m.backend)));
        };
        let from = backend.target.clone();
        let what = |t: &Target| format!("{} {}", t.kind(), t.key());
        let after = router::KIND
            .spec_after_success(&job.action, &job.params, &job.resource.spec)
            .and_then(|v| Spec::from_value(&v).ok())
            .ok_or_else(|| ProviderError::fatal("invalid_params", "the swap's parameters leave no valid spec"))?;

        // 1. The new target is up, with servers, as drover sees it.
        let seen = self.routing.target(&m.to, backend.port).await.map_err(RenderError::from)?;
        let up = matches!(seen.state.as_deref(), Some("running" | "up"));
        if !up || seen.servers.is_empty() {
            let state = seen.state.unwrap_or_else(|| "missing".into());
            return Err(ProviderError::fatal(
                "target_not_ready",
                format!(
                    "{} is {state} with {} server(s): traffic stays on {}",
                    what(&m.to),
                    seen.servers.len(),
                    what(&from)
                ),
            ));
        }
        ctx.event(NewEvent::info(
            "gate",
            format!("{} is {} with {} server(s)", what(&m.to), seen.state.unwrap_or_default(), seen.servers.len()),
        ))
        .await;

        // 2. Every server of it passes the balancer's own health checks.
        let look = balancer.look_every();
        let shadow_name = router::shadow_name(&m.backend);
        let mut shadowed = spec.clone();
        shadowed.backends.push(router::Backend {
            name: shadow_name.clone(),
            target: m.to.clone(),
            check: Some(spec.check_of(backend)),
            port: backend.port,
            standby: None,
            keep_until: None,
        });
        self.render_or_fail(router, &shadowed, &by).await?;
        let msg = format!(
            "backend {shadow_name} loaded with {}'s servers: waiting for the load balancer's checks",
            what(&m.to)
        );
        ctx.event(NewEvent::info("shadow", msg)).await;
        let gate = Duration::from_secs(m.health_timeout_secs);
        let deadline = tokio::time::Instant::now() + gate;
        loop {
            ctx.check_cancel()?;
            let status = balancer.status(router).await;
            let shadow: Vec<&ServerHealth> = status.servers.iter().filter(|s| s.backend == shadow_name).collect();
            let down: Vec<String> = shadow
                .iter()
                // Passed a check of its own: a server that was just loaded
                // shows UP before its first check.
                .filter(|s| s.status != "UP" || !s.check.ends_with("OK"))
                .map(|s| s.said())
                .collect();
            if !shadow.is_empty() && down.is_empty() {
                let msg =
                    format!("the load balancer's own checks pass on all {} server(s) of {}", shadow.len(), what(&m.to));
                ctx.event(NewEvent::info("gate", msg)).await;
                break;
            }
            if tokio::time::Instant::now() > deadline {
                self.render_or_fail(router, spec, &by).await?;
                return Err(ProviderError::fatal(
                    "target_unhealthy",
                    format!(
                        "not every server of {} passes the load balancer's health check after {}s: {}; traffic stays on {}",
                        what(&m.to),
                        gate.as_secs(),
                        if down.is_empty() { "none seen yet".to_string() } else { down.join(", ") },
                        what(&from)
                    ),
                ));
            }
            tokio::time::sleep(look).await;
        }

        // 3. Traffic moves.
        let moved_at = Utc::now();
        self.render_or_fail(router, &after, &by).await?;
        let counting = balancer.counters(router, &m.backend).await;
        ctx.event(
            NewEvent::info(
                "traffic",
                format!("backend {}'s traffic moved from {} to {}", m.backend, what(&from), what(&m.to)),
            )
            .with_data(json!({ "from": from, "to": m.to, "at": moved_at })),
        )
        .await;

        // 4. The guard: the share of failed requests through the backend
        // or, where the balancer does not count them as they happen, the
        // share of its servers that fail the balancer's checks.
        if counting.is_none() {
            let msg = format!(
                "the load balancer does not count requests as they happen: the guard watches its health checks of \
                 backend {}'s servers instead, and swaps back when more than {:.1}% of them fail",
                m.backend,
                m.max_error_rate * 100.0
            );
            ctx.event(NewEvent::info("guard", msg)).await;
        }
        let before = counting.unwrap_or_default();
        let verify = Duration::from_secs(m.verify_secs);
        let until = tokio::time::Instant::now() + verify;
        let mut last = Counters::default();
        let mut failing = (0, 0);
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(look.min(verify)).await;
            let crossed = match counting {
                Some(_) => {
                    let now = balancer.counters(router, &m.backend).await.unwrap_or(last);
                    last = Counters {
                        requests: now.requests.saturating_sub(before.requests),
                        failed: now.failed.saturating_sub(before.failed),
                    };
                    let rate = last.failed as f64 / last.requests.max(1) as f64;
                    (last.requests >= GUARD_MIN_REQUESTS && rate > m.max_error_rate).then(|| {
                        format!(
                            "{} of {} requests through backend {} failed after the swap to {} ({:.1}%, more than {:.1}%)",
                            last.failed,
                            last.requests,
                            m.backend,
                            what(&m.to),
                            rate * 100.0,
                            m.max_error_rate * 100.0
                        )
                    })
                }
                None => {
                    let status = balancer.status(router).await;
                    let of: Vec<&ServerHealth> = status.servers.iter().filter(|s| s.backend == m.backend).collect();
                    let down: Vec<String> = of.iter().filter(|s| s.status != "UP").map(|s| s.said()).collect();
                    failing = (down.len(), of.len());
                    let rate = down.len() as f64 / of.len().max(1) as f64;
                    (!of.is_empty() && rate > m.max_error_rate).then(|| {
                        format!(
                            "{} of {} servers of backend {} fail the load balancer's checks after the swap to {} \
                             ({:.1}%, more than {:.1}%): {}",
                            down.len(),
                            of.len(),
                            m.backend,
                            what(&m.to),
                            rate * 100.0,
                            m.max_error_rate * 100.0,
                            down.join(", ")
                        )
                    })
                }
            };
            if crossed.is_some() || ctx.cancel_requested() {
                self.render_or_fail(router, spec, &by).await?;
                let back = format!("traffic is back on {}", what(&from));
                ctx.event(NewEvent::info("traffic", back.clone()).with_level(crate::model::Level::Warn)).await;
                let Some(why) = crossed else { return Err(ProviderError::Cancelled) };
                return Err(ProviderError::fatal("swapped_back", format!("{why}: {back}")).with_detail(json!({
                    "requests": last.requests, "failed": last.failed,
                    "servers": failing.1, "servers_failing": failing.0, "swapped_back_at": Utc::now()
                })));
            }
        }
        let msg = match counting {
            Some(_) => format!(
                "verified for {}s: {} of {} requests failed through backend {}",
                m.verify_secs, last.failed, last.requests, m.backend
            ),
            None => format!(
                "verified for {}s: {} of {} servers of backend {} failed the load balancer's checks",
                m.verify_secs, failing.0, failing.1, m.backend
            ),
        };
        ctx.event(NewEvent::info("verify", msg)).await;
        let mut out = outputs(&after, None, balancer.endpoint(router).await.as_deref());
        let mut swaps = job.resource.outputs.get("swaps").cloned().unwrap_or_else(|| json!({}));
        swaps[&m.backend] = json!({ "run": job.run_id, "action": job.action, "from": from, "to": m.to,
            "moved_at": moved_at, "undoes": m.undoes, "requests": last.requests, "failed": last.failed });
        out["swaps"] = swaps;
        Ok(out)
    }

    /// Renders `spec` through the keeper; a refusal is the run's failure.
    async fn render_or_fail(&self, router: &Resource, spec: &Spec, by: &str) -> Result<(), ProviderError> {
        match self.routing.render(router, spec, by, true).await? {
            Rendered::Applied(_) | Rendered::Unchanged => Ok(()),
            Rendered::Invalid(reason) => Err(ProviderError::fatal(
                "invalid_config",
                format!("the load balancer refused the configuration: {reason}"),
            )),
        }
    }
}

/// Outputs that keep the record of the last swap of each backend.
fn keeping_swaps(mut out: Value, job: &Job) -> Value {
    if let Some(swaps) = job.resource.outputs.get("swaps") {
        out["swaps"] = swaps.clone();
    }
    out
}

/// A router's outputs: where its frontends listen (at `endpoint` when the
/// balancer says, else at the spec's address).
fn outputs(spec: &Spec, version: Option<i64>, endpoint: Option<&str>) -> Value {
    let address = endpoint.unwrap_or(spec.address());
    let host = match address.contains(':') {
        true => format!("[{address}]"),
        false => address.to_string(),
    };
    let frontends: Vec<Value> = spec
        .frontends
        .iter()
        .map(|f| {
            let url = match f.mode {
                router::Mode::Http => format!("http://{host}:{}", f.port),
                router::Mode::Tcp => format!("tcp://{host}:{}", f.port),
            };
            json!({ "name": f.name, "mode": f.mode, "port": f.port, "url": url })
        })
        .collect();
    json!({ "frontends": frontends, "config_version": version })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(servers: &[(&str, usize)]) -> RouteTable {
        let spec = Spec::from_value(&json!({"environment": "prod",
            "frontends": [{"name": "web", "mode": "http", "port": 8080, "backend": "site"}],
            "backends": [{"name": "site", "target": {"service": "app"}}, {"name": "api", "target": {"service": "api"}}]}))
        .unwrap();
        let servers = servers
            .iter()
            .map(|(b, n)| {
                let list = (0..*n)
                    .map(|i| Server { name: format!("{i}-x"), address: "127.0.0.1".into(), port: 9000 + i as u16 })
                    .collect();
                (b.to_string(), list)
            })
            .collect();
        RouteTable { spec, servers }
    }

    #[test]
    fn a_render_that_would_empty_a_backend_keeps_its_servers() {
        let applied = table(&[("site", 2), ("api", 1)]);
        let mut next = table(&[("site", 0), ("api", 0)]);
        let may_empty = BTreeMap::from([("api".to_string(), "service api is stopped".to_string())]);
        let holds = hold(Some(&applied), &mut next, &may_empty);
        assert_eq!(holds.len(), 1, "{holds:?}");
        assert_eq!(holds[0].backend, "site");
        assert_eq!(next.servers["site"], applied.servers["site"], "kept");
        assert!(next.servers["api"].is_empty(), "a stopped service's backend empties");
        // Nothing before: nothing to hold.
        let mut fresh = table(&[("site", 0)]);
        assert!(hold(None, &mut fresh, &BTreeMap::new()).is_empty());
        // Another target: a swap, not a loss.
        let mut moved = table(&[("site", 0), ("api", 1)]);
        moved.spec.backends[0].target = Target::Service("app-green".into());
        assert!(hold(Some(&applied), &mut moved, &BTreeMap::new()).is_empty());
    }

    /// An aws cluster's instances say no port: the backend's, else the
    /// cluster's own, else 80; only running ones are servers.
    #[test]
    fn an_aws_clusters_servers_are_on_the_backends_port_else_the_clusters() {
        let now = chrono::Utc::now();
        let mut r = Resource {
            id: uuid::Uuid::now_v7(),
            kind: crate::kinds::cluster::KIND,
            name: "web".into(),
            state: "up".into(),
            spec: json!({"provider": "aws", "image": "base", "count": 2, "instance_type": "t3.micro",
                         "subnets": ["subnet-0123abcd"]}),
            version: 1,
            spec_version: 1,
            applied_version: None,
            applied_spec: None,
            outputs: json!({"instances": [
                {"id": "i-1", "private_ip": "10.0.0.1", "state": "running"},
                {"id": "i-2", "private_ip": "10.0.0.2", "state": "stopped"}]}),
            observed: None,
            drift: None,
            created_by: "t".into(),
            updated_by: "t".into(),
            created_at: now,
            updated_at: now,
        };
        let ports =
            |r: &Resource, p| cluster_servers(r, p).iter().map(|s| (s.address.clone(), s.port)).collect::<Vec<_>>();
        assert_eq!(ports(&r, None), [("10.0.0.1".to_string(), 80)]);
        r.spec["port"] = 8080.into();
        assert_eq!(ports(&r, None), [("10.0.0.1".to_string(), 8080)]);
        assert_eq!(ports(&r, Some(9000)), [("10.0.0.1".to_string(), 9000)]);
    }

    #[test]
    fn diffs_say_what_changed() {
        assert_eq!(text_diff("a\nb\n", "a\nb\n"), "");
        let d = text_diff("a\nb\n", "a\nc\n");
        assert!(d.contains("-b\n") && d.contains("+c\n"), "{d}");
    }
}
