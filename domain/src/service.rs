//! The application layer the API calls: every use case in one place, so
//! that handlers stay thin and never touch storage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::engine::Providers;
use crate::error::{Error, FieldError, Result};
use crate::kinds::{environment, validate_name, Kind, Reference, Referenced, Step};
use crate::model::*;
use crate::ports::{Job, ProviderError, Store};

/// How long a readiness check waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many batches folded by a stats request before it reads.
const STATS_FOLD_BATCHES: usize = 10;
use crate::settings::Settings;

/// A request for a transition.
#[derive(Debug, Clone)]
pub struct TransitionRequest {
    pub action: String,
    pub params: Value,
    pub reason: Option<String>,
    pub actor: String,
    pub idempotency_key: Option<String>,
    /// Whether the caller holds [`environment::OPERATE_PROTECTED`].
    pub may_operate_protected: bool,
    /// The run that asked for this one (a cluster's `initialize` asks for
    /// each service's `start`): its lineage in the ledger.
    pub parent: Option<Uuid>,
}

/// Everything `GET /v1/{kind}s/{id}` shows: the 3 a.m. view.
#[derive(Debug, Clone)]
pub struct Overview {
    pub resource: Resource,
    pub active_run: Option<Run>,
    /// The newest events of the active run.
    pub active_events: Vec<RunEvent>,
    pub recent_runs: Vec<Run>,
    pub allowed_actions: Vec<String>,
    /// Why the resource is failed or stuck, when it is.
    pub problem: Option<Problem>,
    /// For kinds that hold resources (environments): what is in it, each
    /// with its active run.
    pub members: Option<Vec<(Resource, Option<Run>)>>,
    /// What the spec says and the running resource does not yet: one entry
    /// per top-level field, empty when nothing is pending.
    pub pending_changes: Vec<PendingChange>,
}

/// A field whose spec differs from what runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingChange {
    /// `spec.image`.
    pub field: String,
    /// As it runs; `None` when absent.
    pub applied: Option<Value>,
    /// As the spec has it; `None` when removed.
    pub wanted: Option<Value>,
    /// The actions that would apply it.
    pub applied_by: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub summary: String,
    pub run: Option<Uuid>,
    pub error: Option<RunError>,
}

pub struct Service {
    store: Arc<dyn Store>,
    settings: Arc<Settings>,
    /// Only for previews: the service never applies anything itself.
    providers: Providers,
    max_attempts: i32,
    /// How long a queued, due run may wait before it is reported as stuck.
    stuck_after: chrono::Duration,
    /// The runs this process's engine executes: a cancel raises their flag
    /// at once.
    running: std::sync::OnceLock<crate::engine::Running>,
    /// What views read lately (see [`Service::overview`]).
    views: ViewCache,
}

/// What a resource's view reads from the store: kept for the next views of
/// it while this process writes nothing and for at most
/// [`ViewCache::max_age`]. What the view derives from these (its problem,
/// whose staleness depends on the clock, its allowed actions, its pending
/// spec changes) is derived again for every view.
struct ViewReads {
    resource: Resource,
    recent_runs: Vec<Run>,
    active_run: Option<Run>,
    active_events: Vec<RunEvent>,
    members: Option<Vec<(Resource, Option<Run>)>>,
    pending_settings: Vec<PendingChange>,
}

/// Views' reads by kind and key (name or id, as asked), each with the
/// store's write count before it was read and when. An entry serves while
/// the count is unchanged — no write of this process since, so a change
/// made here shows at once — and for at most `max_age`, the bound on how
/// long a change made through another replica can take to show.
struct ViewCache {
    max_age: std::time::Duration,
    reads: std::sync::Mutex<std::collections::HashMap<(&'static str, String), Kept>>,
}

/// A view's reads, the store's write count before they were made, and when.
type Kept = (Arc<ViewReads>, u64, std::time::Instant);

/// How long a view may be served from its reads: a change made through
/// another replica shows within this (one made through this replica, at
/// once).
pub const VIEW_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Past this many remembered views, forget the aged ones, and all of them
/// if none has aged (they live a second: this many views of different
/// resources within a second is past what the cache is for).
const VIEWS_MAX: usize = 1_000;

impl ViewCache {
    fn get(&self, kind: Kind, key: &str, writes: u64) -> Option<Arc<ViewReads>> {
        let reads = self.reads.lock().expect("not poisoned");
        let (r, at_writes, at) = reads.get(&(kind.as_str(), key.to_string()))?;
        (*at_writes == writes && at.elapsed() < self.max_age).then(|| r.clone())
    }

    fn put(&self, kind: Kind, key: &str, writes: u64, r: Arc<ViewReads>) {
        let mut reads = self.reads.lock().expect("not poisoned");
        if reads.len() >= VIEWS_MAX {
            reads.retain(|_, (_, _, at)| at.elapsed() < self.max_age);
        }
        if reads.len() >= VIEWS_MAX {
            reads.clear();
        }
        reads.insert((kind.as_str(), key.to_string()), (r, writes, std::time::Instant::now()));
    }
}

impl Service {
    pub fn new(store: Arc<dyn Store>, settings: Arc<Settings>) -> Service {
        Service {
            store,
            settings,
            providers: Providers::default(),
            max_attempts: 3,
            stuck_after: chrono::Duration::seconds(30),
            running: Default::default(),
            views: ViewCache { max_age: VIEW_MAX_AGE, reads: Default::default() },
        }
    }

    /// Serves views from their reads for at most `max_age` (default
    /// [`VIEW_MAX_AGE`]; zero: every view reads the store).
    pub fn with_view_max_age(mut self, max_age: std::time::Duration) -> Service {
        self.views.max_age = max_age;
        self
    }

    /// Lets a cancel reach the runs this process's engine executes at once.
    pub fn set_running(&self, running: crate::engine::Running) {
        let _ = self.running.set(running);
    }

    /// Lets the service ask providers for previews (`preview`).
    pub fn with_providers(mut self, providers: Providers) -> Service {
        self.providers = providers;
        self
    }

    /// What the resource's provider would send for `action` (for an `aws`
    /// cluster: the exact CloudFormation template and parameters), without
    /// running anything. Dependencies are looked up as they are now, in
    /// whatever state.
    pub async fn preview(&self, kind: Kind, key: &str, action: &str, params: &Value) -> Result<Value> {
        let resource = self.get(kind, key).await?;
        if !kind.actions().contains(&action) {
            return Err(Error::invalid("action", format!("one of: {}", kind.actions().join(", "))));
        }
        let params = kind.validate_params(action, params)?;
        let params = kind.complete_params(&resource.spec, &resource.outputs, action, params)?;
        let mut dependencies = Vec::new();
        for dep in kind.run_dependencies(&resource.spec, action, &params) {
            let found = self
                .store
                .get_resource(dep.kind, &ResourceKey::parse(&dep.key))
                .await?
                .ok_or_else(|| Error::invalid(dep.field, format!("no {} named {:?}", dep.kind, dep.key)))?;
            dependencies.push(found);
        }
        let provider_name = kind.provider_of(&resource.spec);
        let Some(provider) = self.providers.get(&provider_name, kind) else {
            return Err(Error::NoProvider { kind: kind.as_str(), provider: provider_name });
        };
        // The settings a run asked for now would get (their values: what
        // the provider renders is what it would send).
        let (settings, secrets) = match kind.takes_settings(action) {
            true => {
                let refs = self.settings.refs_for(&resource).await?;
                self.settings.resolve_marking_secrets(&refs).await?
            }
            false => Default::default(),
        };
        let job = Job {
            run_id: Uuid::nil(),
            attempt: 0,
            kind,
            action: action.to_string(),
            params,
            resource,
            dependencies,
            settings,
            secrets,
        };
        let no_preview = |why: String| Error::NoPreview {
            kind: kind.as_str(),
            name: job.resource.name.clone(),
            action: action.to_string(),
            why,
        };
        match provider.preview(&job).await {
            None => Err(no_preview(format!("provider {provider_name} renders nothing to preview"))),
            Some(Ok(v)) => Ok(v),
            Some(Err(ProviderError::Failed { message, .. })) => Err(no_preview(message)),
            Some(Err(ProviderError::Cancelled)) => Err(no_preview("cancelled".into())),
        }
    }

    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Whether the database answers, within a probe's patience: a pool
    /// waiting to reconnect would otherwise hold the probe for its whole
    /// acquire timeout.
    pub async fn ready(&self) -> Result<()> {
        match tokio::time::timeout(READY_TIMEOUT, self.store.ping()).await {
            Ok(r) => r,
            Err(elapsed) => Err(Error::store("ping the database", elapsed)),
        }
    }

    pub async fn create(
        &self,
        kind: Kind,
        name: &str,
        spec: &Value,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Resource> {
        check_reason(reason.as_deref())?;
        let mut errors = validate_name(name).err().into_iter().collect::<Vec<_>>();
        let spec = match self.validate_spec(kind, name, spec).await {
            Ok(s) => Some(s),
            Err(Error::Invalid(mut f)) => {
                errors.append(&mut f);
                None
            }
            Err(e) => return Err(e),
        };
        match spec {
            Some(spec) if errors.is_empty() => {
                let new = NewResource {
                    id: Uuid::now_v7(),
                    kind,
                    name: name.to_string(),
                    state: kind.initial_state().to_string(),
                    spec,
                    actor: actor.to_string(),
                    reason,
                    applied: kind.applied_on_write(),
                    now: Utc::now(),
                };
                self.store.insert_resource(&new).await
            }
            _ => Err(Error::Invalid(errors)),
        }
    }

    /// The settings that changed since the last successful run that gave
    /// the cluster's instances their settings (among its recent runs): each
    /// as `settings.KEY`, with the scope and version it runs with and the
    /// one it would get (versions only: no value, secret or not).
    async fn pending_settings(&self, kind: Kind, cluster: &Resource, recent: &[Run]) -> Result<Vec<PendingChange>> {
        let Some(applied) = recent.iter().find(|r| r.status == RunStatus::Succeeded && kind.takes_settings(&r.action))
        else {
            return Ok(Vec::new());
        };
        let by_key = |refs: &Value| -> BTreeMap<String, Value> {
            refs.as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| {
                    let key = r["key"].as_str()?.to_string();
                    Some((key, json!({ "scope": r["scope"], "version": r["version"] })))
                })
                .collect()
        };
        let was = by_key(&applied.settings);
        let now = by_key(&self.settings.refs_for(cluster).await?);
        let applied_by: Vec<&'static str> =
            kind.actions().into_iter().filter(|a| kind.takes_settings(a) && !kind.retires(a)).collect();
        let keys: BTreeSet<&String> = was.keys().chain(now.keys()).collect();
        Ok(keys
            .into_iter()
            .filter(|k| was.get(*k) != now.get(*k))
            .map(|k| PendingChange {
                field: format!("settings.{k}"),
                applied: was.get(k).cloned(),
                wanted: now.get(k).cloned(),
                applied_by: applied_by.clone(),
            })
            .collect())
    }

    /// Looks a resource up by name or id.
    pub async fn get(&self, kind: Kind, key: &str) -> Result<Resource> {
        self.store
            .get_resource(kind, &ResourceKey::parse(key))
            .await?
            .ok_or_else(|| Error::NotFound { kind: kind.as_str(), key: key.to_string() })
    }

    /// A resource's view: what it is, its runs, why it is in trouble, what
    /// may be asked of it. Its reads come from the views' cache while this
    /// process has written nothing since they were made, for at most
    /// [`VIEW_MAX_AGE`] (see [`ViewCache`]); what depends on the clock is
    /// derived again each time.
    pub async fn overview(&self, kind: Kind, key: &str) -> Result<Overview> {
        let reads = self.view_reads(kind, key).await?;
        let r = &*reads;
        let problem = diagnose(
            &r.resource,
            r.active_run.as_ref(),
            r.active_events.last(),
            &r.recent_runs,
            self.stuck_after,
            Utc::now(),
        );
        let mut pending_changes = pending_changes(kind, &r.resource);
        pending_changes.extend(r.pending_settings.iter().cloned());
        Ok(Overview {
            members: r.members.clone(),
            pending_changes,
            allowed_actions: kind.allowed_actions(&r.resource.state),
            resource: r.resource.clone(),
            active_run: r.active_run.clone(),
            active_events: r.active_events.clone(),
            recent_runs: r.recent_runs.clone(),
            problem,
        })
    }

    /// What [`Service::overview`] reads: remembered, or read now (the
    /// store's write count taken first, so that a write racing with the
    /// reads leaves them stale in the cache's eyes, never the other way).
    async fn view_reads(&self, kind: Kind, key: &str) -> Result<Arc<ViewReads>> {
        let writes = self.store.writes().filter(|_| !self.views.max_age.is_zero());
        if let Some(hit) = writes.and_then(|w| self.views.get(kind, key, w)) {
            return Ok(hit);
        }
        // Two statements, three while a run is active.
        let resource = self.get(kind, key).await?;
        let (recent_runs, active_run) = self.store.recent_runs(resource.id, 5).await?;
        let active_events = match &active_run {
            Some(run) => self.store.last_events(run.id, 5).await?,
            None => Vec::new(),
        };
        let members = match kind.holds_resources() {
            true => {
                let mut out = Vec::new();
                for m in self.environment_members(&resource).await? {
                    let active = self.store.active_run(m.id).await?;
                    out.push((m, active));
                }
                Some(out)
            }
            false => None,
        };
        let pending_settings = match kind == crate::kinds::cluster::KIND && resource.state != kind.final_state() {
            true => self.pending_settings(kind, &resource, &recent_runs).await?,
            false => Vec::new(),
        };
        let reads = Arc::new(ViewReads { resource, recent_runs, active_run, active_events, members, pending_settings });
        if let Some(w) = writes {
            self.views.put(kind, key, w, reads.clone());
        }
        Ok(reads)
    }

    pub async fn list(&self, kind: Kind, filter: &ResourceFilter, page: PageRequest) -> Result<Page<Resource>> {
        if let Some(env) = &filter.environment {
            if validate_name(env).is_err() {
                return Err(Error::invalid("environment", "not an environment name"));
            }
        }
        let items = self.store.list_resources(kind, filter, page).await?;
        let next = next_cursor(&items, page.limit, |r| r.id);
        Ok(Page { items, next })
    }

    /// What is in an environment: the live resources of every kind whose
    /// spec names it, oldest first per kind (at most 500 of each).
    pub async fn environment_members(&self, env: &Resource) -> Result<Vec<Resource>> {
        let filter = ResourceFilter { environment: Some(env.name.clone()) };
        let mut out = Vec::new();
        for kind in Kind::all() {
            let page = self.store.list_resources(kind, &filter, PageRequest { after: None, limit: 500 }).await?;
            out.extend(page.into_iter().filter(|r| r.state != kind.final_state()));
        }
        Ok(out)
    }

    /// The kind's own checks, and the references its spec makes: each must
    /// name a live resource (422 naming the field otherwise), the kind's
    /// checks against them must pass ([`Kind::check_with`]), and references
    /// to resources of its own kind (a service's `after`, a worker group's
    /// leader) may not lead back to `name` (422 naming the cycle).
    async fn validate_spec(&self, kind: Kind, name: &str, spec: &Value) -> Result<Value> {
        let spec = kind.validate_spec(spec)?;
        let mut errors = Vec::new();
        let refs = kind.references(&spec);
        let mut found_all = Vec::new();
        for r in &refs {
            let found = self.store.get_resource(r.kind, &ResourceKey::parse(&r.key)).await?;
            match found {
                Some(found) if found.state != r.kind.final_state() => found_all.push((r, found)),
                Some(found) => {
                    errors.push(FieldError::new(&r.field, format!("{} {:?} is {}", r.kind, r.key, found.state)))
                }
                None => errors.push(FieldError::new(&r.field, format!("no {} named {:?}", r.kind, r.key))),
            }
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        let pairs: Vec<(Reference, Resource)> = found_all.iter().map(|(r, f)| ((*r).clone(), f.clone())).collect();
        errors.extend(kind.check_with(&spec, &referenced(&pairs)));
        errors.extend(self.claimed_by_others(kind, name, &spec).await?);
        for (r, found) in found_all.iter().filter(|(r, _)| r.kind == kind) {
            if let Some(cycle) = self.cycle_through(kind, name, found).await? {
                errors.push(FieldError::new(&r.field, format!("a cycle: {name} -> {}", cycle.join(" -> "))));
            }
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors));
        }
        Ok(spec)
    }

    /// The claims of `spec` ([`Kind::claims`]) that another live resource
    /// of the kind holds, each naming its field and the holder.
    async fn claimed_by_others(&self, kind: Kind, name: &str, spec: &Value) -> Result<Vec<FieldError>> {
        let wanted = kind.claims(spec);
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut errors = Vec::new();
        for other in live_where(self.store.as_ref(), kind, |o| o.name != name).await? {
            let held = kind.claims(&other.spec);
            for (claim, field) in &wanted {
                if let Some((_, theirs)) = held.iter().find(|(c, _)| c == claim) {
                    errors
                        .push(FieldError::new(field, format!("{claim} is taken by {kind} {} ({theirs})", other.name)));
                }
            }
        }
        Ok(errors)
    }

    /// The path from `from` back to the resource named `name` through the
    /// references of its own kind, if there is one.
    async fn cycle_through(&self, kind: Kind, name: &str, from: &Resource) -> Result<Option<Vec<String>>> {
        // Depth first, each resource visited once: the graph is small (a
        // cluster's services), and a cycle not through `name` was refused
        // when it was written.
        let mut stack = vec![(from.clone(), vec![from.name.clone()])];
        let mut seen = std::collections::HashSet::new();
        while let Some((r, path)) = stack.pop() {
            if r.name == name {
                return Ok(Some(path));
            }
            if !seen.insert(r.id) || seen.len() > 1000 {
                continue;
            }
            for next in kind.references(&r.spec).into_iter().filter(|x| x.kind == kind) {
                if next.key == name {
                    let mut p = path.clone();
                    p.push(name.to_string());
                    return Ok(Some(p));
                }
                if let Some(n) = self.store.get_resource(kind, &ResourceKey::parse(&next.key)).await? {
                    let mut p = path.clone();
                    p.push(n.name.clone());
                    stack.push((n, p));
                }
            }
        }
        Ok(None)
    }

    /// The live resources of `r`'s kind whose specs name it (a leader
    /// cluster's worker groups).
    async fn members_of(&self, r: &Resource) -> Result<Vec<Resource>> {
        let (kind, id) = (r.kind, r.id.to_string());
        live_where(self.store.as_ref(), kind, |m| {
            m.id != r.id && kind.references(&m.spec).iter().any(|x| x.kind == kind && (x.key == r.name || x.key == id))
        })
        .await
    }

    /// The resource `r` lives on ([`Kind::parent`]), if it names one that exists.
    async fn parent_of(&self, kind: Kind, r: &Resource) -> Result<Option<Resource>> {
        match kind.parent(&r.spec) {
            Some(p) => self.store.get_resource(p.kind, &ResourceKey::parse(&p.key)).await,
            None => Ok(None),
        }
    }

    /// The live resources whose specs name `target`, as `kind/name`.
    async fn users_of(&self, target: &Resource) -> Result<Vec<String>> {
        let id = target.id.to_string();
        let mut users = Vec::new();
        for kind in Kind::all() {
            // What its spec names, and what it runs now: a cluster patched
            // to another image still runs the old one until the change is
            // applied.
            let named = |spec: &Value| {
                kind.references(spec).iter().any(|x| x.kind == target.kind && (x.key == target.name || x.key == id))
            };
            let found = live_where(self.store.as_ref(), kind, |r| {
                r.id != target.id && (named(&r.spec) || r.applied_spec.as_ref().is_some_and(named))
            })
            .await?;
            users.extend(found.into_iter().map(|r| format!("{kind}/{}", r.name)));
        }
        Ok(users)
    }

    /// The live resources that refuse `action` on `target` now
    /// ([`Kind::guards`]), each with what it guards. A `scale` that takes no
    /// instance away (to as many or more) is refused by nothing.
    async fn guarding(&self, target: &Resource, action: &str, params: &Value) -> Result<Vec<String>> {
        let count = |v: &Value| v.get("count").and_then(Value::as_u64);
        if action == "scale" && count(params) >= count(&target.spec) {
            return Ok(Vec::new());
        }
        let id = target.id.to_string();
        let now = chrono::Utc::now();
        let mut out = Vec::new();
        for kind in Kind::all().filter(|k| k.has_guards()) {
            let applies = |g: &crate::kinds::Guard| {
                g.kind == target.kind
                    && (g.key == target.name || g.key == id)
                    && g.actions.contains(&action)
                    && g.until.is_none_or(|u| u > now)
            };
            for r in live_where(self.store.as_ref(), kind, |r| kind.guards(&r.spec).iter().any(applies)).await? {
                for g in kind.guards(&r.spec).iter().filter(|g| applies(g)) {
                    let until = g.until.map(|u| format!(" until {}", u.to_rfc3339())).unwrap_or_default();
                    out.push(format!("{kind}/{} ({}{until})", r.name, g.why));
                }
            }
        }
        Ok(out)
    }

    /// Applies a JSON merge patch (RFC 7396) to the spec, as a new spec
    /// version. `if_match` is the spec version the caller last read (412
    /// otherwise); a patch that changes nothing writes no version.
    pub async fn patch_spec(
        &self,
        kind: Kind,
        key: &str,
        patch: &Value,
        if_match: Option<i64>,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Resource> {
        check_reason(reason.as_deref())?;
        let current = self.get(kind, key).await?;
        if let Some(why) = kind.locked(&current.name) {
            return Err(Error::Locked { why });
        }
        if let Some(expected) = if_match {
            if expected != current.spec_version {
                return Err(Error::VersionMismatch { expected, current: current.spec_version });
            }
        }
        let mut spec = current.spec.clone();
        crate::merge::apply(&mut spec, patch);
        let spec = self.validate_spec(kind, &current.name, &spec).await?;
        let patch = crate::merge::diff(&current.spec, &spec);
        if patch.as_object().is_some_and(|m| m.is_empty()) {
            return Ok(current);
        }
        // The store refuses the write while a transition is active (Busy),
        // and when another write came first (fenced on the spec version),
        // in the same transaction as the write.
        self.store
            .update_spec(&SpecChange {
                resource: current.id,
                from_version: current.spec_version,
                spec,
                patch,
                actor: actor.to_string(),
                reason,
                applied: kind.applied_on_write(),
                now: Utc::now(),
            })
            .await
    }

    /// A resource's spec versions, newest first, older than `before`.
    pub async fn spec_versions(
        &self,
        kind: Kind,
        key: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<SpecVersion>, Option<i64>)> {
        let r = self.get(kind, key).await?;
        let items = self.store.list_spec_versions(r.id, before, limit).await?;
        let next = match items.last() {
            Some(last) if items.len() == limit as usize && last.version > 1 => Some(last.version),
            _ => None,
        };
        Ok((items, next))
    }

    /// How spec version `version` differs from version `from` (0: no spec):
    /// the top-level fields that changed, and the merge patch from one to the
    /// other.
    pub async fn spec_diff(
        &self,
        kind: Kind,
        key: &str,
        version: i64,
        from: i64,
    ) -> Result<(Vec<crate::merge::FieldChange>, Value)> {
        let r = self.get(kind, key).await?;
        let read = |n: i64| async move {
            self.store
                .get_spec_version(r.id, n)
                .await?
                .map(|v| v.spec)
                .ok_or_else(|| Error::NotFound { kind: "spec version", key: format!("{n} of {kind} {key}") })
        };
        let to = read(version).await?;
        let before = match from {
            0 => Value::Object(Default::default()),
            n => read(n).await?,
        };
        Ok(crate::merge::field_changes(&before, &to))
    }

    /// One spec version of a resource.
    pub async fn spec_version(&self, kind: Kind, key: &str, version: i64) -> Result<SpecVersion> {
        let r = self.get(kind, key).await?;
        self.store
            .get_spec_version(r.id, version)
            .await?
            .ok_or_else(|| Error::NotFound { kind: "spec version", key: format!("{} of {kind} {key}", version) })
    }

    /// Deletes a resource's record (its runs stay in the history): in its
    /// final state, or, for kinds whose initial state holds nothing, before
    /// any transition of it started, unless live resources name it.
    pub async fn delete(&self, kind: Kind, key: &str) -> Result<()> {
        let r = self.get(kind, key).await?;
        if !kind.deletable_states().contains(&r.state.as_str()) {
            return Err(Error::NotAllowed {
                kind: kind.as_str(),
                state: r.state.clone(),
                action: "delete".into(),
                allowed: kind.allowed_actions(&r.state),
            });
        }
        if r.state != kind.final_state() {
            if let Some(run) = self.store.active_run(r.id).await? {
                return Err(Error::Busy { kind: kind.as_str(), resource: r.id, run: run.id });
            }
            let users = self.users_of(&r).await?;
            if !users.is_empty() {
                return Err(Error::InUse { kind: kind.as_str(), name: r.name, action: "delete".into(), users });
            }
        }
        self.store.delete_resource(r.id, &r.state, Utc::now()).await
    }

    pub async fn request(&self, kind: Kind, key: &str, req: TransitionRequest) -> Result<Run> {
        let resource = self.get(kind, key).await?;
        if let Some(why) = kind.locked(&resource.name) {
            return Err(Error::Locked { why });
        }
        if let Some(run) = self.store.active_run(resource.id).await? {
            let run = self.make_way(run, &req).await?;
            if let Some(run) = run {
                return Err(Error::Busy { kind: kind.as_str(), resource: resource.id, run: run.id });
            }
        }
        check_reason(req.reason.as_deref())?;
        // A service takes its cluster's settings and environment.
        let lives_on = self.parent_of(kind, &resource).await?;
        let environment = environment_of(&resource, lives_on.as_ref());
        self.guard_protected(environment.as_deref(), &req).await?;
        let (action, params, working, ok, err, parent) = match kind.next(&resource.state, &req.action)? {
            Step::Go { working, ok, err } => {
                let params = kind.validate_params(&req.action, &req.params)?;
                let params = match kind.adopts(&req.action) {
                    true => {
                        // It rewrites the record from what runs: say why that is right.
                        if req.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                            return Err(Error::invalid(
                                "reason",
                                "an adopt needs a reason: why what runs is right and the record wrong",
                            ));
                        }
                        adoption(kind, &req.action, &resource)?
                    }
                    false => kind.complete_params(&resource.spec, &resource.outputs, &req.action, params)?,
                };
                (req.action.clone(), params, working.to_string(), ok.to_string(), err.to_string(), req.parent)
            }
            Step::Retry => {
                let failed = self
                    .store
                    .last_unsuccessful_run(resource.id)
                    .await?
                    .ok_or_else(|| Error::NothingToRetry { kind: kind.as_str(), name: resource.name.clone() })?;
                // A retry repeats the failed run's action through that run's
                // own states; new params, when given, replace the old ones.
                let params = match &req.params {
                    Value::Null => failed.params.clone(),
                    Value::Object(m) if m.is_empty() => failed.params.clone(),
                    p => kind.validate_params(&failed.action, p)?,
                };
                (failed.action, params, failed.working_state, failed.ok_state, failed.err_state, Some(failed.id))
            }
        };
        kind.check_action(&resource.spec, &action, &params)?;
        let dependencies = kind.run_dependencies(&resource.spec, &action, &params);
        let mut found_deps = Vec::new();
        for dep in &dependencies {
            let found = self.store.get_resource(dep.kind, &ResourceKey::parse(&dep.key)).await?;
            match found {
                None => return Err(Error::invalid(dep.field, format!("no {} named {:?}", dep.kind, dep.key))),
                Some(d) if d.state != dep.required_state => {
                    return Err(Error::DependencyNotReady {
                        kind: dep.kind.as_str(),
                        name: d.name,
                        state: d.state,
                        action,
                        required: dep.required_state,
                    })
                }
                Some(d) => found_deps.push((Reference::new(dep.kind, &dep.key, dep.field), d)),
            }
        }
        // With each dependency come the resources that join it (a leader
        // cluster's worker groups: their machines are its machines too).
        let mut members = Vec::new();
        for (_, d) in &found_deps {
            for m in self.members_of(d).await? {
                members.push((Reference::new(m.kind, &m.name, "members"), m));
            }
        }
        found_deps.extend(members);
        let target = kind.spec_after_success(&action, &params, &resource.spec).unwrap_or_else(|| resource.spec.clone());
        kind.check_run(&target, &action, &referenced(&found_deps))?;
        if kind.retires(&action) {
            let users = self.users_of(&resource).await?;
            if !users.is_empty() {
                return Err(Error::InUse { kind: kind.as_str(), name: resource.name, action, users });
            }
        }
        let guards = self.guarding(&resource, &action, &params).await?;
        if !guards.is_empty() {
            return Err(Error::InUse { kind: kind.as_str(), name: resource.name, action, users: guards });
        }
        let timeout = kind.timeout_secs(&resource.spec, &action);
        let settings = match kind.takes_settings(&action) {
            true => self.settings.refs_for(lives_on.as_ref().unwrap_or(&resource)).await?,
            false => Value::Array(Vec::new()),
        };
        let run = NewRun {
            id: Uuid::now_v7(),
            resource_id: resource.id,
            kind,
            resource_name: resource.name.clone(),
            action,
            params,
            from_state: resource.state.clone(),
            working_state: working,
            ok_state: ok,
            err_state: err,
            max_attempts: self.max_attempts,
            actor: req.actor,
            reason: req.reason,
            idempotency_key: req.idempotency_key,
            parent_run: parent,
            provider: kind.provider_of(&resource.spec),
            timeout_secs: timeout as i64,
            settings,
            environment,
            now: Utc::now(),
        };
        self.store.insert_run(&run).await
    }

    /// A refresh only reads, so it gives way to any other request: queued,
    /// it is cancelled at once; running, it is waited for (it is short) up
    /// to [`REFRESH_GIVES_WAY`]. The run still active after that, if any.
    async fn make_way(&self, active: Run, req: &TransitionRequest) -> Result<Option<Run>> {
        if !active.kind.refreshes(&active.action) || req.action == active.action {
            return Ok(Some(active));
        }
        if active.status == RunStatus::Queued {
            let why = format!("gave way to {} asked by {}", req.action, req.actor);
            match self.store.request_cancel(active.id, &req.actor, Some(&why), Utc::now()).await {
                Ok(_) | Err(Error::AlreadyEnded { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let run = self.wait_run(active.id, REFRESH_GIVES_WAY).await?;
        if !run.status.is_terminal() {
            return Ok(Some(run));
        }
        self.store.active_run(active.resource_id).await
    }

    /// The environment a resource is in (a service: its cluster's), and
    /// whether that environment is protected.
    pub async fn environment(&self, resource: &Resource) -> Result<Option<(String, bool)>> {
        let lives_on = self.parent_of(resource.kind, resource).await?;
        let Some(env) = environment_of(resource, lives_on.as_ref()) else {
            return Ok(None);
        };
        let found = self.store.get_resource(environment::KIND, &ResourceKey::Name(env.clone())).await?;
        Ok(Some((env, found.is_some_and(|e| environment::is_protected(&e.spec)))))
    }

    /// A resource in a protected environment changes only with a reason
    /// and [`environment::OPERATE_PROTECTED`].
    async fn guard_protected(&self, environment: Option<&str>, req: &TransitionRequest) -> Result<()> {
        let Some(env) = environment else {
            return Ok(());
        };
        let found = self.store.get_resource(environment::KIND, &ResourceKey::Name(env.to_string())).await?;
        if !found.is_some_and(|e| environment::is_protected(&e.spec)) {
            return Ok(());
        }
        if !req.may_operate_protected {
            return Err(Error::Forbidden { permission: environment::OPERATE_PROTECTED.to_string() });
        }
        if req.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err(Error::invalid("reason", "required: the resource is in a protected environment"));
        }
        Ok(())
    }

    /// The action a `retry` of this resource would repeat, if any.
    pub async fn retry_action(&self, kind: Kind, key: &str) -> Result<Option<String>> {
        let resource = self.get(kind, key).await?;
        Ok(self.store.last_unsuccessful_run(resource.id).await?.map(|r| r.action))
    }

    /// Transition statistics over a time range, from the rollups.
    pub async fn stats(&self, q: &crate::stats::StatsQuery) -> Result<Vec<crate::stats::Group>> {
        crate::stats::validate(q)?;
        // Runs that finished since the engine's folder last ran: the answer
        // includes every run finished before the request. After an upgrade
        // that rebuilds the rollups this folds a bounded share and the
        // folder catches up with the rest.
        crate::ports::fold_pending(&*self.store, STATS_FOLD_BATCHES).await?;
        let mut rows = Vec::new();
        let filter = q.filter.for_query(&q.group_by);
        for (grain, since, until) in crate::stats::plan(q.since, q.until, q.bucket, Utc::now()) {
            rows.extend(self.store.rollups(grain, since, until, &filter).await?);
        }
        Ok(crate::stats::aggregate(&rows, &q.group_by, q.bucket))
    }

    pub async fn queue_depth(&self) -> Result<QueueDepth> {
        self.store.queue_depth(Utc::now()).await
    }

    pub async fn cancel(&self, run: Uuid, actor: &str, reason: Option<&str>) -> Result<Run> {
        let current = self.run(run).await?;
        if current.status.is_terminal() {
            return Err(Error::AlreadyEnded { run, status: current.status.as_str() });
        }
        let asked = self.store.request_cancel(run, actor, reason, Utc::now()).await?;
        // Recorded first; then, if this process runs it, its provider
        // sees it at its next step rather than at the next heartbeat.
        if let Some(running) = self.running.get() {
            running.cancel(run);
        }
        Ok(asked)
    }

    pub async fn run(&self, id: Uuid) -> Result<Run> {
        self.store.get_run(id).await?.ok_or_else(|| Error::NotFound { kind: "transition", key: id.to_string() })
    }

    /// Waits up to `wait` for the run to end, then returns it as it is.
    pub async fn wait_run(&self, id: Uuid, wait: Duration) -> Result<Run> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let run = self.run(id).await?;
            if run.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(run);
            }
            tokio::time::sleep(Duration::from_millis(100).min(deadline - tokio::time::Instant::now())).await;
        }
    }

    pub async fn runs(&self, filter: &RunFilter, page: PageRequest) -> Result<Page<Run>> {
        let items = self.store.list_runs(filter, page).await?;
        let next = next_cursor(&items, page.limit, |r| r.id);
        Ok(Page { items, next })
    }

    /// Events after `after`; waits up to `wait` for one if there are none
    /// yet and the run is still going.
    pub async fn events(&self, id: Uuid, after: i64, limit: u32, wait: Duration) -> Result<(Run, Vec<RunEvent>)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let run = self.run(id).await?;
            let events = self.store.list_events(id, after, limit).await?;
            if !events.is_empty() || run.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok((run, events));
            }
            tokio::time::sleep(Duration::from_millis(100).min(deadline - tokio::time::Instant::now())).await;
        }
    }

    /// Begins a request under `key`, the stored key ([`idempotency_key`]).
    pub async fn idempotency_begin(&self, key: &str, fingerprint: &str) -> Result<IdempotencyBegin> {
        self.store.idempotency_begin(key, fingerprint, Utc::now()).await
    }

    pub async fn idempotency_save(&self, key: &str, response: &SavedResponse) -> Result<()> {
        self.store.idempotency_save(key, response, Utc::now()).await
    }

    pub async fn idempotency_abandon(&self, key: &str) -> Result<()> {
        self.store.idempotency_abandon(key).await
    }
}

/// The live resources of `kind` that `keep` accepts, paging through them
/// all (a scan: fine for the hundreds of resources an installation has).
pub(crate) async fn live_where(
    store: &dyn Store,
    kind: Kind,
    keep: impl Fn(&Resource) -> bool,
) -> Result<Vec<Resource>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_resources(kind, &ResourceFilter::default(), PageRequest { after, limit: 500 }).await?;
        out.extend(page.iter().filter(|r| r.state != kind.final_state() && keep(r)).cloned());
        match page.last() {
            Some(last) if page.len() == 500 => after = Some(last.id),
            _ => break,
        }
    }
    Ok(out)
}

/// The resources found for references (or dependencies), as the kinds see them.
fn referenced(found: &[(Reference, Resource)]) -> Vec<Referenced<'_>> {
    found
        .iter()
        .map(|(r, f)| Referenced {
            reference: r,
            id: f.id,
            name: &f.name,
            state: &f.state,
            spec: &f.spec,
            outputs: &f.outputs,
        })
        .collect()
}

fn next_cursor<T>(items: &[T], limit: u32, id: impl Fn(&T) -> Uuid) -> Option<Uuid> {
    if items.len() as u32 >= limit {
        items.last().map(id)
    } else {
        None
    }
}

/// The key a client's `Idempotency-Key` is stored under: per caller, so
/// that two users may pick the same key. The client's key is 1 to 255
/// visible ASCII characters (what the OpenAPI document says of it).
pub fn idempotency_key(caller: Option<Uuid>, key: &str) -> Result<String> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(Error::invalid("Idempotency-Key", "must be 1 to 255 visible ASCII characters"));
    }
    Ok(match caller {
        Some(user) => format!("{user}:{key}"),
        None => key.to_string(),
    })
}

/// A reason is optional, and at most 2000 characters.
fn check_reason(reason: Option<&str>) -> Result<()> {
    match reason {
        Some(r) if r.chars().count() > 2000 => Err(Error::invalid("reason", "at most 2000 characters")),
        _ => Ok(()),
    }
}

/// What an `adopt` takes into the record ([`crate::drift::adoption`]),
/// as long as the spec it leaves is one a request could write.
fn adoption(kind: Kind, action: &str, resource: &Resource) -> Result<Value> {
    let refused = |why: String| Error::NothingToAdopt { kind: kind.as_str(), name: resource.name.clone(), why };
    let params = crate::drift::adoption(resource.drift.as_ref(), Utc::now()).map_err(refused)?;
    let after = kind.spec_after_success(action, &params, &resource.spec).unwrap_or_else(|| resource.spec.clone());
    if let Err(Error::Invalid(fields)) = kind.validate_spec(&after) {
        let said: Vec<String> = fields.iter().map(|f| format!("{} {}", f.field, f.message)).collect();
        return Err(refused(format!("the spec would not be valid ({}): repair instead", said.join("; "))));
    }
    Ok(params)
}

/// The fields whose spec differs from what runs, on a live resource that
/// runs something (its applied spec is known), each with the actions that
/// apply it.
pub fn pending_changes(kind: Kind, r: &Resource) -> Vec<PendingChange> {
    let Some(applied) = &r.applied_spec else {
        return Vec::new();
    };
    if r.state == kind.final_state() || applied == &r.spec {
        return Vec::new();
    }
    let (changes, _) = crate::merge::field_changes(applied, &r.spec);
    changes
        .into_iter()
        // The observer reads it as written: no run applies it.
        .filter(|c| c.field != crate::repair::SPEC_FIELD)
        .map(|c| PendingChange {
            applied_by: kind.applied_by(&r.spec, &c.field),
            field: format!("spec.{}", c.field),
            applied: c.from,
            wanted: c.to,
        })
        .collect()
}

/// How long a request waits for a running refresh of its resource to end.
pub const REFRESH_GIVES_WAY: Duration = Duration::from_secs(10);

/// The environment a resource names, else the one of what it lives on.
fn environment_of(resource: &Resource, lives_on: Option<&Resource>) -> Option<String> {
    resource.kind.environment_of(&resource.spec).or_else(|| lives_on.and_then(|p| p.kind.environment_of(&p.spec)))
}

/// Explains, in one sentence, why a resource is failed or stuck.
pub fn diagnose(
    resource: &Resource,
    active: Option<&Run>,
    last_event: Option<&RunEvent>,
    recent: &[Run],
    stuck_after: chrono::Duration,
    now: Time,
) -> Option<Problem> {
    if let Some(run) = active {
        let problem = |summary: String| Some(Problem { summary, run: Some(run.id), error: run.error.clone() });
        if let Some(at) = run.cancel_requested_at {
            let by = run.cancel_requested_by.as_deref().unwrap_or("someone");
            if now - at > stuck_after {
                return problem(format!(
                    "cancel requested by {by} at {at} has not taken effect yet; the provider is between steps"
                ));
            }
        }
        match run.status {
            RunStatus::Queued if run.run_after > now => {
                let why = run.error.as_ref().map(|e| e.message.as_str()).unwrap_or("an earlier attempt failed");
                return problem(format!(
                    "waiting to retry at {} (attempt {} of {}): {why}",
                    run.run_after,
                    run.attempt + 1,
                    run.max_attempts
                ));
            }
            RunStatus::Queued if now - run.run_after > stuck_after => {
                return problem(format!(
                    "queued since {} and not picked up: is any drover worker running?",
                    run.run_after
                ));
            }
            RunStatus::Running if run.lease_expires_at.is_some_and(|t| t < now) => {
                return problem(format!(
                    "worker {} stopped renewing its lease at {}; the run will be reclaimed and resumed",
                    run.worker.as_deref().unwrap_or("?"),
                    run.lease_expires_at.map(|t| t.to_string()).unwrap_or_default()
                ));
            }
            RunStatus::Running
                if run.started_at.is_some_and(|t| now - t > chrono::Duration::seconds(run.timeout_secs / 2)) =>
            {
                let doing = last_event.map(|e| format!("; last step: {}", e.message)).unwrap_or_default();
                return problem(format!(
                    "{} has run for over half of its {}s timeout{doing}",
                    run.action, run.timeout_secs
                ));
            }
            _ => return None,
        }
    }
    let observed_problem =
        resource.observed.as_ref().filter(|o| o.get("healthy") == Some(&Value::Bool(false))).and_then(|o| {
            // A crash loop or a backoff links the last repair that did not hold.
            let run = o["auto_repair"]["last_run"].as_str().and_then(|id| id.parse().ok());
            o.get("summary").and_then(Value::as_str).map(|s| Problem { summary: s.to_string(), run, error: None })
        });
    // The newest run failed and left the resource as it was (a rebuild of
    // a built image, a repair): not stuck, but someone should know.
    let last_failed = || {
        recent.first().filter(|r| r.status == RunStatus::Failed && resource.state != "failed").map(|run| Problem {
            summary: format!(
                "the last {} failed ({}); it stays {}",
                run.action,
                run.error.as_ref().map(|e| e.message.as_str()).unwrap_or("no error recorded"),
                resource.state
            ),
            run: Some(run.id),
            error: run.error.clone(),
        })
    };
    if resource.state == "failed" {
        let failed = recent.iter().find(|r| matches!(r.status, RunStatus::Failed | RunStatus::Cancelled));
        return Some(match failed {
            Some(run) => Problem {
                summary: format!(
                    "{} failed: {}",
                    run.action,
                    run.error.as_ref().map(|e| e.message.as_str()).unwrap_or("no error recorded")
                ),
                run: Some(run.id),
                error: run.error.clone(),
            },
            None => Problem {
                summary: "failed; its failing run is older than the last five".into(),
                run: None,
                error: None,
            },
        });
    }
    observed_problem.or_else(last_failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_checked_before_they_are_made_per_caller() {
        let user = Uuid::now_v7();
        // 255 characters is what the document allows the client, whatever
        // the caller prefix adds (it used to count against the limit).
        let long = "k".repeat(255);
        assert_eq!(idempotency_key(Some(user), &long).unwrap(), format!("{user}:{long}"));
        assert_eq!(idempotency_key(None, "a b").unwrap(), "a b");
        for bad in ["", &"k".repeat(256), "tab\there", "é"] {
            assert!(idempotency_key(Some(user), bad).is_err(), "{bad:?}");
        }
    }
}
