//! Services on the local provider: instance processes placed on a local
//! cluster's machines (its instances).
//!
//! An instance's working directory is its own copy of the build, under its
//! machine's directory (`clusters/<cluster>/machines/<m>/services/<service>/<i>-<random>/`),
//! where a [`PROCESS`] file names its process: stopping, replacing or
//! destroying the machine stops it (`cluster.rs`). The service's own state
//! file (`services/<service>/instances.json`, written atomically before any
//! health check) records every instance it started: index, machine (and
//! which process was that machine), pid and start time, port, build, and
//! the rolling plan it belongs to.
//!
//! Placement: `count` instances with indexes `0..count`, each new one on
//! the matching machine with fewest of them (the lowest index on a tie);
//! `global`: one on every matching machine, with the machine's index. An
//! instance whose machine went away, or whose process is gone, is placed
//! again, and the move is an event on the run.
//!
//! Rolling replacement (`deploy`, `rollback`, `restart`) follows the rules
//! of `crate::rolling` (shared with the aws provider); here the plan is
//! saved in the state file before anything changes, so that the same run
//! tried again after a crash of drover carries out the same plan: an
//! instance of the plan that runs is kept, an old one it replaced is
//! stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use drover_domain::discovery::{NewEntry, Presence, Scheme};
use drover_domain::drift::{Difference, Report};
use drover_domain::kinds::cluster;
use drover_domain::kinds::image;
use drover_domain::kinds::service::{matches, Spec};
use drover_domain::model::{Level, NewEvent, Resource};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::cluster::{machine_dir, machines, Machine, PROCESS};
use super::image::io;
use super::process::{
    alive, check_running, free_port, look_at, mark_needs_repair, spawn_group, stop_group, wait_healthy, Probe, GONE,
};
use super::state;
use crate::rolling;

const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Instance {
    index: u32,
    /// The machine's index, and the process that was that machine when the
    /// instance was placed (a machine replaced under the same index is
    /// another machine).
    machine: u32,
    machine_pid: u32,
    machine_ticks: u64,
    /// The cluster the machine is an instance of (the service's, or a
    /// worker group joined to it), and the machine's name (`w1-0`).
    #[serde(default)]
    machine_cluster: Option<Uuid>,
    #[serde(default)]
    machine_name: Option<String>,
    pid: u32,
    start_ticks: u64,
    port: u16,
    started_at: DateTime<Utc>,
    log: PathBuf,
    /// What it runs: the image, its build, the build directory it was
    /// copied from (kept while it runs: a scale starts more from it) and
    /// the command.
    #[serde(default)]
    image: Option<String>,
    build: Option<String>,
    image_dir: Option<PathBuf>,
    #[serde(default)]
    command: Option<String>,
    /// Its working directory, under its machine's.
    dir: PathBuf,
    /// The rolling plan that started it, if one did.
    #[serde(default)]
    plan: Option<Uuid>,
}

impl Instance {
    /// Whether it runs on `m`: the machine's process (pid and start time)
    /// names the machine, whichever cluster it is in.
    fn on(&self, m: &Machine) -> bool {
        self.machine_pid == m.pid && self.machine_ticks == m.start_ticks
    }

    fn machine_label(&self) -> String {
        self.machine_name.clone().unwrap_or_else(|| self.machine.to_string())
    }

    fn alive(&self) -> bool {
        alive(self.pid, self.start_ticks)
    }

    /// Its id in the discovery registry: its directory's name
    /// (`{index}-{random}`), unique while the service lives.
    fn id(&self) -> String {
        self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| self.index.to_string())
    }

    fn source(&self) -> Option<Source> {
        Some(Source {
            image: self.image.clone().unwrap_or_default(),
            build: self.build.clone(),
            dir: self.image_dir.clone()?,
            command: self.command.clone()?,
        })
    }
}

/// What instances start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Source {
    image: String,
    build: Option<String>,
    dir: PathBuf,
    command: String,
}

impl rolling::Source for Source {
    fn image(&self) -> &str {
        &self.image
    }
    fn build(&self) -> Option<&str> {
        self.build.as_deref()
    }
}

type Plan = rolling::Plan<Source>;

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    instances: Vec<Instance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan: Option<Plan>,
    /// Build directories to keep although nothing runs from them: the one a
    /// rollback returns to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keep: Vec<PathBuf>,
    /// The cluster the last run placed on, for the observer to find its
    /// machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    site: Option<SiteRef>,
}

/// A cluster as placement sees it: its id, name and its own machines'
/// role metadata (its worker groups' come from their state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SiteRef {
    cluster: Uuid,
    name: String,
    metadata: String,
}

/// The cluster a run places instances on, as it is now.
struct Site {
    cluster: String,
    at: SiteRef,
    /// Its live machines (its own and its worker groups'), and those that
    /// match the constraints.
    all: Vec<Machine>,
    eligible: Vec<Machine>,
    /// A global service's machine for each index.
    assigned: BTreeMap<u32, Machine>,
}

pub struct LocalServices {
    root: PathBuf,
    clusters: PathBuf,
}

impl LocalServices {
    pub fn new(root: PathBuf, clusters: PathBuf) -> LocalServices {
        LocalServices { root, clusters }
    }

    fn dir(&self, r: &Resource) -> PathBuf {
        self.root.join(r.id.to_string())
    }

    fn load(&self, r: &Resource) -> Result<State, ProviderError> {
        state::read(&self.dir(r))
    }

    fn save(&self, r: &Resource, s: &State) -> Result<(), ProviderError> {
        state::write(&self.dir(r), s)
    }

    fn site(&self, job: &Job, spec: &Spec) -> Result<Site, ProviderError> {
        let c = job.dependency(cluster::KIND)?;
        let cluster_spec = cluster::Spec::from_value(&c.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("cluster {}: {e:?}", c.name)))?;
        let at = SiteRef { cluster: c.id, name: c.name.clone(), metadata: cluster_spec.machine_metadata(&c.name) };
        let all = machines(&self.clusters, at.cluster, &at.name, &at.metadata)?;
        let eligible: Vec<Machine> =
            all.iter().filter(|m| matches(spec.constraints.as_deref(), &m.metadata)).cloned().collect();
        if eligible.is_empty() {
            let why = match all.is_empty() {
                true => format!("cluster {} has no running machine", c.name),
                false => {
                    let mut carried: Vec<String> =
                        all.iter().map(|m| format!("{}: {}", m.name(), m.metadata)).collect();
                    carried.dedup();
                    format!(
                        "no machine of cluster {} matches the constraints {:?} ({})",
                        c.name,
                        spec.constraints.as_deref().unwrap_or_default(),
                        carried.join("; ")
                    )
                }
            };
            return Err(ProviderError::fatal("no_machine", why));
        }
        Ok(Site { cluster: c.name.clone(), at, all, eligible, assigned: BTreeMap::new() })
    }

    /// The indexes the service wants on the site: `0..count`; or, when
    /// global, one per matching machine: an instance that runs on one keeps
    /// its index, a machine without one gets the lowest index free (kept in
    /// `site.assigned`).
    fn wanted(spec: &Spec, site: &mut Site, state: &State, count: Option<u32>) -> Vec<u32> {
        if !spec.global {
            return (0..count.or(spec.count).unwrap_or(0)).collect();
        }
        let mut assigned = BTreeMap::new();
        let mut bare = Vec::new();
        for m in &site.eligible {
            match state.instances.iter().find(|i| i.on(m) && i.alive() && !assigned.contains_key(&i.index)) {
                Some(i) => {
                    assigned.insert(i.index, m.clone());
                }
                None => bare.push(m.clone()),
            }
        }
        let mut next = 0;
        for m in bare {
            while assigned.contains_key(&next) {
                next += 1;
            }
            assigned.insert(next, m);
        }
        site.assigned = assigned;
        site.assigned.keys().copied().collect()
    }

    /// Stops and forgets the instances that are gone, whose machine went
    /// away (or no longer matches), or that are not wanted; returns the
    /// indexes placed again and why.
    async fn prune(
        &self,
        ctx: &dyn RunContext,
        r: &Resource,
        state: &mut State,
        site: &Site,
        wanted: &[u32],
        global: bool,
    ) -> Result<BTreeMap<u32, (String, String)>, ProviderError> {
        let mut moved = BTreeMap::new();
        let all = std::mem::take(&mut state.instances);
        let mut keep = Vec::new();
        for (n, i) in all.iter().enumerate() {
            let machine = site.eligible.iter().find(|m| i.on(m));
            // Two of one index (a plan that ended half way): the first stays.
            let twin = keep.iter().any(|k: &Instance| k.index == i.index);
            let why = match (machine, i.alive()) {
                (Some(m), true)
                    if !twin
                        && wanted.contains(&i.index)
                        && (!global || site.assigned.get(&i.index).is_some_and(|a| a == m)) =>
                {
                    keep.push(i.clone());
                    continue;
                }
                (Some(_), true) => None,
                (Some(_), false) => Some("its process is gone"),
                (None, _) if site.all.iter().any(|m| i.on(m)) => Some("its machine no longer matches the constraints"),
                (None, _) => Some("its machine is gone"),
            };
            let reason = why.unwrap_or("the service no longer wants it (scaled down, or a twin)");
            self.stop_instance(ctx, r, i, reason).await?;
            match why {
                Some(why) if wanted.contains(&i.index) => {
                    let msg = format!(
                        "instance {} was on machine {}: {why}; it will be placed again",
                        i.index,
                        i.machine_label()
                    );
                    ctx.event(NewEvent::info("placement", msg).with_level(Level::Warn)).await;
                    moved.insert(i.index, (i.machine_label(), why.to_string()));
                }
                // A global service's instance whose machine is gone for good.
                Some(why) => {
                    let msg =
                        format!("instance {} was on machine {}: {why}; it is not needed", i.index, i.machine_label());
                    let data = json!({ "index": i.index, "machine_name": i.machine_label(), "reason": why });
                    ctx.event(NewEvent::info("placement", msg).with_level(Level::Warn).with_data(data)).await;
                }
                None => {
                    let msg = format!("stopped instance {} (pid {}) on machine {}", i.index, i.pid, i.machine_label());
                    ctx.event(NewEvent::info("instances", msg)).await;
                }
            }
            state.instances = keep.iter().cloned().chain(all[n + 1..].iter().cloned()).collect();
            self.save(r, state)?;
        }
        state.instances = keep;
        self.save(r, state)?;
        Ok(moved)
    }

    /// Brings the service to the instances its spec wants on the cluster's
    /// matching machines (`count` or one per machine), adopting those that
    /// run on a machine that is still there, and waits until all are healthy.
    async fn ensure(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        count: Option<u32>,
    ) -> Result<Value, ProviderError> {
        let r = &job.resource;
        let mut site = self.site(job, spec)?;
        let mut state = self.load(r)?;
        state.site = Some(site.at.clone());
        // What ran, dead or alive, read before placement forgets the dead
        // (a repair starts that again).
        let ran = (job.action == "repair")
            .then(|| state.instances.iter().filter(|i| i.alive()).chain(&state.instances).find_map(Instance::source))
            .flatten();
        let wanted = Self::wanted(spec, &mut site, &state, count);
        let moved = self.prune(ctx, r, &mut state, &site, &wanted, spec.global).await?;
        for i in &state.instances {
            let msg = format!(
                "adopting instance {} on machine {} (pid {}, port {})",
                i.index,
                i.machine_label(),
                i.pid,
                i.port
            );
            ctx.event(NewEvent::info("instances", msg)).await;
        }
        // A scale deploys nothing: new instances run what the others run.
        // Nor does a start after a stop: it runs the build that ran last,
        // unless the spec pins one or names another image (then it applies
        // the spec); a newer build of the image waits for a deploy.
        let running = match job.action.as_str() {
            "scale" => state.instances.iter().find(|i| i.alive()).and_then(Instance::source),
            // Nor does a repair: what ran starts again.
            "repair" => ran,
            _ => None,
        };
        let last = job.resource.outputs["build"].as_str().filter(|_| {
            spec.build.is_none()
                && job.dependency(image::KIND).is_ok_and(|i| job.resource.outputs["image"] == i.name.as_str())
        });
        let source = match (running, last) {
            (Some(s), _) => s,
            (None, Some(last)) => match source(job, spec, Some(last)) {
                Ok(s) => s,
                // No longer kept: the image's current build it is.
                Err(_) => source(job, spec, None)?,
            },
            (None, None) => source(job, spec, spec.build.as_deref())?,
        };
        for &index in &wanted {
            if state.instances.iter().any(|i| i.index == index) {
                continue;
            }
            ctx.check_cancel()?;
            let inst = self.place(ctx, job, spec, &site, &state, &source, index, None, moved.get(&index)).await?;
            state.instances.push(inst);
            state.instances.sort_by_key(|i| i.index);
            self.save(r, &state)?;
        }
        for i in &state.instances {
            wait_healthy(ctx, &probe(i), health_path(spec), Duration::from_secs(spec.start_timeout_secs)).await?;
            ctx.discovery_enter(&entry(r, spec, i), "healthy").await?;
        }
        let n = state.instances.len();
        let machines = site.eligible.len();
        ctx.event(NewEvent::info("instances", format!("{n} instance(s) healthy on {machines} machine(s)"))).await;
        Ok(outputs(&state, &site.cluster, &source, &job.resource.outputs["previous"]))
    }

    /// Starts one instance on a machine (the one `index` must run on for a
    /// global service, the old instance's when it is still there, else the
    /// matching machine with fewest), in a fresh copy of the build, and
    /// records it. `plan`: the rolling plan it belongs to.
    #[allow(clippy::too_many_arguments)]
    async fn place(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        site: &Site,
        state: &State,
        source: &Source,
        index: u32,
        plan: Option<Uuid>,
        moved: Option<&(String, String)>,
    ) -> Result<Instance, ProviderError> {
        let old = state.instances.iter().find(|i| i.index == index && site.eligible.iter().any(|m| i.on(m)));
        let machine = match (spec.global, old) {
            (true, _) => site.assigned.get(&index),
            (false, Some(old)) => site.eligible.iter().find(|m| old.on(m)),
            // One whose process died goes back on its machine if it is there.
            (false, None) => {
                moved.and_then(|(from, _)| site.eligible.iter().find(|m| &m.name() == from)).or_else(|| {
                    site.eligible
                        .iter()
                        .enumerate()
                        .min_by_key(|(n, m)| (state.instances.iter().filter(|i| i.on(m) && i.alive()).count(), *n))
                        .map(|(_, m)| m)
                })
            }
        }
        .cloned()
        .ok_or_else(|| ProviderError::fatal("no_machine", format!("no machine for instance {index}")))?;
        let inst = self.spawn(job, spec, source, site, &machine, index, plan)?;
        let build_name = source.build.clone().unwrap_or_else(|| "(from before build ids)".into());
        let mut data = json!({ "index": index, "machine": machine.index, "machine_name": machine.name(),
            "build": source.build, "pid": inst.pid, "port": inst.port });
        let mut msg = format!(
            "placed instance {index} on machine {} from build {build_name}: pid {}, port {}",
            machine.name(),
            inst.pid,
            inst.port
        );
        if let Some((from, why)) = moved {
            data["moved_from"] = json!(from);
            data["reason"] = json!(why);
            msg.push_str(&format!(" (moved from machine {from}: {why})"));
        }
        ctx.event(NewEvent::info("placement", msg).with_data(data)).await;
        Ok(inst)
    }

    /// Starts one instance's process in a fresh copy of the build.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        job: &Job,
        spec: &Spec,
        source: &Source,
        site: &Site,
        machine: &Machine,
        index: u32,
        plan: Option<Uuid>,
    ) -> Result<Instance, ProviderError> {
        let r = &job.resource;
        // Every instance its own directory: a plan's runs beside the one it
        // replaces, which keeps serving from its own.
        let name = format!("{index}-{}", &Uuid::new_v4().simple().to_string()[..12]);
        let dir = machine_dir(&self.clusters, machine.cluster, machine.index)
            .join("services")
            .join(r.id.to_string())
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("create the instance directory"))?;
        copy_dir(&source.dir, &dir).map_err(io("copy the build into the instance directory"))?;
        let port = match spec.port {
            Some(p) => {
                let port = u16::try_from(u32::from(p) + index).map_err(|_| {
                    ProviderError::fatal("port_out_of_range", format!("port {p} + instance {index} is past 65535"))
                })?;
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                    return Err(ProviderError::fatal(
                        "port_in_use",
                        format!("port {port} (port {p} + instance {index}) is in use on this host"),
                    ));
                }
                port
            }
            None => free_port().map_err(io("find a free port"))?,
        };
        let logs = self.dir(r).join("logs");
        std::fs::create_dir_all(&logs).map_err(io("create the log directory"))?;
        let log = logs.join(format!("instance-{index}.log"));
        let mut env: Vec<(String, String)> = job.settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend([
            ("PORT".to_string(), port.to_string()),
            ("DROVER_SERVICE".to_string(), r.name.clone()),
            ("DROVER_INSTANCE".to_string(), index.to_string()),
            ("DROVER_MACHINE".to_string(), machine.name()),
            ("DROVER_CLUSTER".to_string(), site.cluster.clone()),
            ("DROVER_ROLE_METADATA".to_string(), machine.metadata.clone()),
            ("DROVER_BUILD".to_string(), source.build.clone().unwrap_or_default()),
        ]);
        let (pid, start_ticks) = spawn_group(&dir, &source.command, &env, &log, &format!("instance {index}"))?;
        let record = json!({ "pid": pid, "start_ticks": start_ticks, "service": r.name, "index": index });
        std::fs::write(dir.join(PROCESS), record.to_string()).map_err(io("record the instance's process"))?;
        Ok(Instance {
            index,
            machine: machine.index,
            machine_pid: machine.pid,
            machine_ticks: machine.start_ticks,
            machine_cluster: Some(machine.cluster),
            machine_name: Some(machine.name()),
            pid,
            start_ticks,
            port,
            started_at: Utc::now(),
            log,
            image: Some(source.image.clone()),
            build: source.build.clone(),
            image_dir: Some(source.dir.clone()),
            command: Some(source.command.clone()),
            dir,
            plan,
        })
    }

    /// `deploy`, `rollback` and `restart`: replaces instances by a plan
    /// (resumed when this run made one already; see `rolling`).
    async fn roll(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let r = &job.resource;
        let mut site = self.site(job, spec)?;
        let mut state = self.load(r)?;
        state.site = Some(site.at.clone());
        let wanted = Self::wanted(spec, &mut site, &state, None);
        let plan = match state.plan.clone().filter(|p| p.run == job.run_id) {
            Some(p) => {
                let msg = format!("resuming the plan of this run: {} instance(s) to replace", p.indexes.len());
                ctx.event(NewEvent::info("resume", msg).with_data(json!({ "plan": p.id }))).await;
                p
            }
            None => {
                let moved = self.prune(ctx, r, &mut state, &site, &wanted, spec.global).await?;
                for (index, (from, why)) in &moved {
                    let msg = format!("instance {index} (was on machine {from}: {why}) will be started by the plan");
                    ctx.event(NewEvent::info("placement", msg)).await;
                }
                let from = state.instances.iter().find(|i| i.alive()).and_then(Instance::source);
                let to = match (job.action.as_str(), &from) {
                    ("restart", Some(running)) => running.clone(),
                    ("restart", None) => source(job, spec, spec.build.as_deref())?,
                    _ => source(job, spec, job.params["build"].as_str())?,
                };
                let running = |ix: u32| state.instances.iter().find(|i| i.index == ix).map(|i| i.build.clone());
                let plan = Plan::new(job, spec, &wanted, running, to, from);
                state.plan = Some(plan.clone());
                state.keep = plan.from.iter().map(|f| f.dir.clone()).collect();
                self.save(r, &state)?;
                ctx.event(plan.announced(wanted.len())).await;
                plan
            }
        };
        let mut fleet = Fleet { services: self, job, spec, site: &site, state: &mut state };
        let previous = rolling::carry_out(ctx, job, &mut fleet, &plan).await?;
        let n = state.instances.len();
        ctx.event(NewEvent::info("instances", format!("{n} instance(s) healthy on the new build"))).await;
        Ok(outputs(&state, &site.cluster, &plan.to, &previous))
    }

    /// Compares what runs with the record: as many instances as the
    /// service's state says (the count it last reached when running, none
    /// when stopped), each on a machine that is still there, its process
    /// alive in its own directory, on the service's build (unless a rolling
    /// plan is under way), answering its health check and, when healthy,
    /// listed in the discovery registry. Changes nothing.
    async fn refresh(&self, ctx: &dyn RunContext, r: &Resource, spec: &Spec) -> Result<Value, ProviderError> {
        let state = self.load(r)?;
        let mut report = Report::default();
        let running = r.state == "running";
        let expected = if running { r.outputs["count"].as_u64().unwrap_or(0) as usize } else { 0 };
        match state.instances.len() {
            n if n == expected => report.same(),
            n => report.differs(Difference::new("count", expected, n)),
        }
        let listed = if running { ctx.discovery_listed(r.id).await? } else { None };
        let build = r.outputs["build"].as_str().filter(|_| state.plan.is_none());
        for i in &state.instances {
            ctx.check_cancel()?;
            let at = format!("instances[{}]", i.index);
            if !alive(i.machine_pid, i.machine_ticks) {
                let machine = format!("machine {} running", i.machine_label());
                report.differs(Difference::new(format!("{at}.machine"), machine, "gone"));
                continue;
            }
            report.same();
            if !i.alive() {
                report.differs(Difference::new(format!("{at}.process"), format!("running (pid {})", i.pid), "gone"));
                continue;
            }
            report.same();
            if let Some(build) = build {
                match i.build.as_deref() {
                    Some(b) if b == build => report.same(),
                    other => report.differs(Difference::new(format!("{at}.build"), build, other.unwrap_or("unknown"))),
                }
            }
            let healthy = look_at(&mut report, &at, i.pid, Some(&i.dir), "directory", i.port, health_path(spec)).await;
            match &listed {
                Some(listed) if healthy && listed.contains(&i.id()) => report.same(),
                Some(_) if healthy => report.differs(Difference::new(
                    format!("{at}.registry"),
                    format!("listed as {}", i.id()),
                    "not listed",
                )),
                _ => {}
            }
        }
        Ok(report.told(ctx).await)
    }

    /// Takes an instance out of the discovery registry, then stops it and
    /// removes its directory.
    async fn stop_instance(
        &self,
        ctx: &dyn RunContext,
        r: &Resource,
        i: &Instance,
        reason: &str,
    ) -> Result<(), ProviderError> {
        ctx.discovery_leave(&r.name, r.id, &i.id(), reason).await?;
        if i.alive() {
            stop_group(i.pid, i.start_ticks, STOP_GRACE).await;
            let msg = format!("stopped instance {} (pid {}) on machine {}", i.index, i.pid, i.machine_label());
            ctx.event(NewEvent::info("instances", msg).with_data(json!({ "index": i.index, "pid": i.pid }))).await;
        }
        let _ = std::fs::remove_dir_all(&i.dir);
        Ok(())
    }

    async fn stop_all(&self, ctx: &dyn RunContext, r: &Resource, reason: &str) -> Result<(), ProviderError> {
        let mut state = self.load(r)?;
        state.plan = None;
        while let Some(i) = state.instances.pop() {
            ctx.check_cancel()?;
            self.stop_instance(ctx, r, &i, reason).await?;
            self.save(r, &state)?;
        }
        Ok(())
    }
}

/// The build new instances start from: `build` (pinned in the spec, or a
/// deploy's), else the image's current build.
fn source(job: &Job, spec: &Spec, build: Option<&str>) -> Result<Source, ProviderError> {
    let image_r = job.dependency(image::KIND)?;
    let wanted = build.map(str::to_string).or_else(|| image::current_build(&image_r.outputs).map(str::to_string));
    let entry = match &wanted {
        Some(id) => image_r.outputs["builds"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["id"] == id.as_str())
            .cloned()
            .ok_or_else(|| {
                ProviderError::fatal("no_such_build", format!("image {} keeps no build {id}", image_r.name))
            })?,
        // An image built before builds had ids: its outputs are the build.
        None => image_r.outputs.clone(),
    };
    let dir = entry["path"].as_str().map(PathBuf::from).ok_or_else(|| {
        ProviderError::fatal("image_not_built", format!("image {} has no build output", image_r.name))
    })?;
    let command = spec
        .command
        .clone()
        .or_else(|| entry["start_command"].as_str().map(str::to_string))
        .or_else(|| image_r.spec["start_command"].as_str().map(str::to_string))
        .unwrap_or_default();
    Ok(Source { image: image_r.name.clone(), build: wanted, dir, command })
}

impl LocalServices {
    /// Why the instances should be placed again, if they should: one whose
    /// machine is gone; for a global service, a matching machine without
    /// one, or one on a machine that no longer matches. (A dead instance on
    /// a live machine is the drift issue's to repair, not placement's.)
    fn misplaced(&self, spec: &Spec, state: &State) -> Option<String> {
        let gone: Vec<String> = state
            .instances
            .iter()
            .filter(|i| !alive(i.machine_pid, i.machine_ticks))
            .map(|i| format!("machine {} of instance {} is gone", i.machine_label(), i.index))
            .collect();
        if !gone.is_empty() {
            return Some(gone.join("; "));
        }
        let at = state.site.as_ref().filter(|_| spec.global)?;
        let all = machines(&self.clusters, at.cluster, &at.name, &at.metadata).ok()?;
        let eligible: Vec<&Machine> =
            all.iter().filter(|m| matches(spec.constraints.as_deref(), &m.metadata)).collect();
        let bare: Vec<String> =
            eligible.iter().filter(|m| !state.instances.iter().any(|i| i.on(m))).map(|m| m.name()).collect();
        if !bare.is_empty() {
            return Some(format!("matching machine(s) {} run no instance of this global service", bare.join(", ")));
        }
        let astray: Vec<String> = state
            .instances
            .iter()
            .filter(|i| !eligible.iter().any(|m| i.on(m)))
            .map(|i| format!("instance {} on {}", i.index, i.machine_label()))
            .collect();
        (!astray.is_empty()).then(|| format!("{} no longer on a matching machine", astray.join(", ")))
    }
}

/// An instance's entry in the discovery registry. Locally every machine
/// shares the host's loopback, so the address is 127.0.0.1 and the port is
/// the host's; `http` when its health check speaks HTTP.
fn entry(r: &Resource, spec: &Spec, i: &Instance) -> NewEntry {
    NewEntry {
        service_id: r.id,
        service: r.name.clone(),
        instance: i.id(),
        index: i.index,
        machine: i.machine_label(),
        address: "127.0.0.1".into(),
        port: i.port,
        build: i.build.clone(),
        scheme: Scheme::from(&spec.health_check),
        host_port: None,
    }
}

fn health_path(spec: &Spec) -> Option<&str> {
    spec.health_check.http_path()
}

fn probe(i: &Instance) -> Probe<'_> {
    Probe { what: format!("instance {}", i.index), pid: i.pid, start_ticks: i.start_ticks, port: i.port, log: &i.log }
}

/// Copies a build's files (a plain tree: files, directories, symlinks).
pub(super) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_dir(&src, &dst)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

fn outputs(state: &State, cluster: &str, source: &Source, previous: &Value) -> Value {
    let instances: Vec<Value> = state
        .instances
        .iter()
        .map(|i| {
            let name = i.machine_name.clone().unwrap_or_else(|| format!("{cluster}-{}", i.machine));
            json!({ "index": i.index, "machine": i.machine, "machine_name": name,
                "pid": i.pid, "port": i.port, "url": format!("http://127.0.0.1:{}", i.port),
                "started_at": i.started_at, "build": i.build })
        })
        .collect();
    let mut out = json!({ "count": instances.len(), "image": source.image, "build": source.build,
        "instances": instances });
    if previous.is_object() {
        out["previous"] = previous.clone();
    }
    out
}

/// A local service's instances as a rolling plan moves them.
struct Fleet<'a> {
    services: &'a LocalServices,
    job: &'a Job,
    spec: &'a Spec,
    site: &'a Site,
    state: &'a mut State,
}

impl Fleet<'_> {
    /// Stops an instance and forgets it.
    async fn retire(&mut self, ctx: &dyn RunContext, i: &Instance, reason: &str) -> Result<(), ProviderError> {
        let r = &self.job.resource;
        self.services.stop_instance(ctx, r, i, reason).await?;
        self.state.instances.retain(|k| k.pid != i.pid);
        self.services.save(r, self.state)
    }
}

#[async_trait]
impl rolling::Fleet for Fleet<'_> {
    type Source = Source;

    fn has_new(&self, plan: Uuid, ix: u32) -> bool {
        self.state.instances.iter().any(|i| i.index == ix && i.plan == Some(plan) && i.alive())
    }

    fn has_old(&self, plan: Uuid, ix: u32) -> bool {
        self.state.instances.iter().any(|i| i.index == ix && i.plan != Some(plan) && i.alive())
    }

    async fn stop_old(&mut self, ctx: &dyn RunContext, plan: &Plan, ix: u32) -> Result<(), ProviderError> {
        let old: Vec<Instance> =
            self.state.instances.iter().filter(|i| i.index == ix && i.plan != Some(plan.id)).cloned().collect();
        for o in old {
            self.retire(ctx, &o, &plan.replaced()).await?;
        }
        Ok(())
    }

    async fn start_new(&mut self, ctx: &dyn RunContext, plan: &Plan, ix: u32) -> Result<(), ProviderError> {
        if rolling::Fleet::has_new(self, plan.id, ix) {
            return Ok(());
        }
        // One the plan started before a crash whose process died goes first.
        let dead: Vec<Instance> =
            self.state.instances.iter().filter(|i| i.index == ix && i.plan == Some(plan.id)).cloned().collect();
        for d in dead {
            self.retire(ctx, &d, "its process is gone").await?;
        }
        let (job, spec, site) = (self.job, self.spec, self.site);
        let inst = self.services.place(ctx, job, spec, site, self.state, &plan.to, ix, Some(plan.id), None).await?;
        self.state.instances.push(inst);
        self.state.instances.sort_by_key(|i| i.index);
        self.services.save(&job.resource, self.state)
    }

    async fn wait_new(&mut self, ctx: &dyn RunContext, plan: &Plan, ix: u32) -> Result<(), ProviderError> {
        let Some(new) = self.state.instances.iter().find(|i| i.index == ix && i.plan == Some(plan.id)).cloned() else {
            return Ok(());
        };
        let limit = Duration::from_secs(self.spec.start_timeout_secs);
        if let Err(e) = wait_healthy(ctx, &probe(&new), health_path(self.spec), limit).await {
            // The failed instance goes; whatever it was to replace stays.
            self.retire(ctx, &new, "it failed its health check").await?;
            return Err(e);
        }
        let msg = format!("instance {ix} healthy on build {}", plan.to.build.as_deref().unwrap_or("?"));
        ctx.event(NewEvent::info("instances", msg).with_data(json!({ "index": ix, "pid": new.pid }))).await;
        ctx.discovery_enter(&entry(&self.job.resource, self.spec, &new), "healthy").await
    }

    async fn save_plan(&mut self, _ctx: &dyn RunContext, plan: Option<&Plan>) -> Result<(), ProviderError> {
        self.state.plan = plan.cloned();
        self.services.save(&self.job.resource, self.state)
    }
}

#[async_trait]
impl Provider for LocalServices {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "start" | "place" | "scale" | "repair" => {
                let count = spec.count_for(&job.action, &job.params, &job.resource.outputs);
                self.ensure(ctx, job, &spec, count).await
            }
            "deploy" | "rollback" | "restart" => self.roll(ctx, job, &spec).await,
            "refresh" => self.refresh(ctx, &job.resource, &spec).await,
            "stop" => {
                self.stop_all(ctx, &job.resource, "the service is stopping").await?;
                // What ran stays on record: the next start runs it again.
                let o = &job.resource.outputs;
                Ok(json!({ "count": 0, "instances": [], "image": o["image"], "build": o["build"],
                    "previous": o["previous"] }))
            }
            "destroy" => {
                self.stop_all(ctx, &job.resource, "the service is being destroyed").await?;
                state::remove(&self.dir(&job.resource), "remove the service directory")?;
                ctx.event(NewEvent::info("destroy", "all instances stopped and files removed")).await;
                Ok(json!({ "count": 0, "instances": [] }))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("local services cannot {other}"))),
        }
    }

    fn observes(&self) -> bool {
        true
    }

    fn refreshes(&self) -> bool {
        true
    }

    async fn observe(&self, r: &Resource) -> Option<Value> {
        self.observe_presence(r).await.0
    }

    /// Looks at every instance on record (in any state: a deploy's too):
    /// alive, on a machine that is still there, answering its check? The
    /// report is for a `running` service; the presence for the registry.
    async fn observe_presence(&self, r: &Resource) -> (Option<Value>, Option<Presence>) {
        let (Ok(spec), Ok(state)) = (Spec::from_value(&r.spec), self.load(r)) else {
            return (None, None);
        };
        let mut instances = Vec::new();
        let mut problems = Vec::new();
        let mut presence = Presence::default();
        // What a repair would fix: a process gone on a machine still there
        // (a machine gone is placement's, asked for below).
        let mut gone = Vec::new();
        for i in &state.instances {
            let running = i.alive();
            let failing = match alive(i.machine_pid, i.machine_ticks) {
                false => Some(format!("machine {} is gone", i.machine_label())),
                true => check_running(i.pid, i.start_ticks, i.port, health_path(&spec)).await,
            };
            if failing.as_deref() == Some(GONE) {
                gone.push(format!("instance {} (pid {})", i.index, i.pid));
            }
            match &failing {
                Some(why) => {
                    problems.push(format!("instance {} (pid {}, port {}): {why}", i.index, i.pid, i.port));
                    presence.failing.push((i.id(), format!("instance {}: {why}", i.index)));
                }
                None => presence.healthy.push(entry(r, &spec, i)),
            }
            instances.push(json!({ "index": i.index, "machine": i.machine, "pid": i.pid, "port": i.port,
                "build": i.build, "running": running, "healthy": failing.is_none() }));
        }
        presence.misplaced = self.misplaced(&spec, &state);
        if r.state != "running" {
            return (None, Some(presence));
        }
        let expected = r.outputs["count"].as_u64().unwrap_or(state.instances.len() as u64) as usize;
        let missing = expected.saturating_sub(state.instances.len());
        if missing > 0 {
            problems.push(format!("{missing} instance(s) not on record"));
        }
        let summary = match problems.is_empty() {
            true => format!("{} instance(s) healthy", instances.len()),
            false => format!("{} problem(s): {}", problems.len(), problems.join("; ")),
        };
        let mut seen = json!({ "healthy": problems.is_empty(), "summary": summary, "instances": instances });
        mark_needs_repair(&mut seen, &gone);
        (Some(seen), Some(presence))
    }
}
