//! Services on the local provider: instance processes placed on a local
//! cluster's machines (its instances).
//!
//! An instance's working directory is its own copy of the build, under its
//! machine's directory (`clusters/<cluster>/machines/<m>/services/<service>/<i>/`),
//! where a [`PROCESS`] file names its process: stopping, replacing or
//! destroying the machine stops it (`cluster.rs`). The service's own state
//! file (`services/<service>/instances.json`, written atomically before any
//! health check) records every instance it started: index, machine (and
//! which process was that machine), pid and start time, port, build.
//!
//! Placement: `count` instances with indexes `0..count`, each new one on
//! the matching machine with fewest of them (the lowest index on a tie);
//! `global`: one on every matching machine, with the machine's index. An
//! instance whose machine went away, or whose process is gone, is placed
//! again, and the move is an event on the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use drover_domain::kinds::cluster::{self, HealthCheck};
use drover_domain::kinds::image;
use drover_domain::kinds::service::{matches, Spec};
use drover_domain::model::{Level, NewEvent, Resource};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::cluster::{machine_dir, machines, Machine, PROCESS};
use super::image::io;
use super::process::{alive, check, free_port, spawn_group, stop_group, wait_healthy, Probe};

const STATE: &str = "instances.json";
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
    pid: u32,
    start_ticks: u64,
    port: u16,
    started_at: DateTime<Utc>,
    log: PathBuf,
    build: Option<String>,
    /// The build directory it was copied from (kept while it runs: a scale
    /// starts more from it).
    image_dir: Option<PathBuf>,
    /// Its working directory, under its machine's.
    dir: PathBuf,
}

impl Instance {
    fn on(&self, m: &Machine) -> bool {
        self.machine == m.index && self.machine_pid == m.pid && self.machine_ticks == m.start_ticks
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    instances: Vec<Instance>,
}

/// What new instances start from.
struct Source {
    build: Option<String>,
    dir: PathBuf,
    command: String,
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
        match std::fs::read(self.dir(r).join(STATE)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ProviderError::fatal("corrupt_state", format!("instance state file is unreadable: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io("read the instance state")(e)),
        }
    }

    fn save(&self, r: &Resource, s: &State) -> Result<(), ProviderError> {
        let dir = self.dir(r);
        std::fs::create_dir_all(&dir).map_err(io("create the service directory"))?;
        let tmp = dir.join(format!("{STATE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(s).expect("state serialises"))
            .map_err(io("write the instance state"))?;
        std::fs::rename(&tmp, dir.join(STATE)).map_err(io("write the instance state"))
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
        let dep = |kind| {
            job.dependencies.iter().find(|d| d.kind == kind).ok_or_else(|| {
                ProviderError::fatal("dependency_missing", format!("the service's {kind} was not resolved"))
            })
        };
        let (cluster_r, image_r) = (dep(cluster::KIND)?, dep(image::KIND)?);
        let cluster_spec = cluster::Spec::from_value(&cluster_r.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("cluster {}: {e:?}", cluster_r.name)))?;
        let metadata = cluster_spec.machine_metadata(&cluster_r.name);
        let r = &job.resource;
        let mut state = self.load(r)?;
        let all = machines(&self.clusters, cluster_r.id)?;
        let eligible: Vec<Machine> = match matches(spec.constraints.as_deref(), &metadata) {
            true => all.clone(),
            false => Vec::new(),
        };
        if eligible.is_empty() {
            let why = match all.is_empty() {
                true => format!("cluster {} has no running machine", cluster_r.name),
                false => format!(
                    "no machine of cluster {} matches the constraints {:?} (its machines carry {metadata})",
                    cluster_r.name,
                    spec.constraints.as_deref().unwrap_or_default()
                ),
            };
            return Err(ProviderError::fatal("no_machine", why));
        }
        let source = self.source(job, spec, image_r, &state)?;
        let wanted: Vec<u32> = match (spec.global, count) {
            (true, _) => eligible.iter().map(|m| m.index).collect(),
            (false, n) => (0..n.unwrap_or_else(|| spec.wanted(eligible.len()))).collect(),
        };

        // Keep what runs on a machine that is still there and still wanted.
        let mut moved: BTreeMap<u32, (u32, String)> = BTreeMap::new();
        let mut keep = Vec::new();
        for i in std::mem::take(&mut state.instances) {
            let machine = eligible.iter().find(|m| i.on(m));
            let why = match (machine, alive(i.pid, i.start_ticks)) {
                (Some(_), true) if wanted.contains(&i.index) && (!spec.global || i.machine == i.index) => {
                    keep.push(i);
                    continue;
                }
                (Some(_), true) => None,
                (Some(_), false) => Some("its process is gone"),
                (None, _) if all.iter().any(|m| i.on(m)) => Some("its machine no longer matches the constraints"),
                (None, _) => Some("its machine is gone"),
            };
            self.stop_instance(ctx, &i).await;
            match why {
                Some(why) => {
                    let msg =
                        format!("instance {} was on machine {}: {why}; it will be placed again", i.index, i.machine);
                    ctx.event(NewEvent::info("placement", msg).with_level(Level::Warn)).await;
                    moved.insert(i.index, (i.machine, why.to_string()));
                }
                None => {
                    let msg = format!("stopped instance {} (pid {}) on machine {}", i.index, i.pid, i.machine);
                    ctx.event(NewEvent::info("instances", msg)).await;
                }
            }
            state.instances = keep.clone();
            self.save(r, &state)?;
        }
        state.instances = keep;
        for i in &state.instances {
            let msg =
                format!("adopting instance {} on machine {} (pid {}, port {})", i.index, i.machine, i.pid, i.port);
            ctx.event(NewEvent::info("instances", msg)).await;
        }
        self.save(r, &state)?;

        let logs = self.dir(r).join("logs");
        std::fs::create_dir_all(&logs).map_err(io("create the log directory"))?;
        let build_name = source.build.clone().unwrap_or_else(|| "(from before build ids)".into());
        for &index in &wanted {
            if state.instances.iter().any(|i| i.index == index) {
                continue;
            }
            ctx.check_cancel()?;
            let machine = match spec.global {
                true => eligible.iter().find(|m| m.index == index),
                false => eligible.iter().min_by_key(|m| (state.instances.iter().filter(|i| i.on(m)).count(), m.index)),
            }
            .cloned()
            .expect("eligible machines are not empty");
            let inst =
                self.spawn(job, spec, &source, (cluster_r.id, &cluster_r.name), &metadata, &machine, index, &logs)?;
            let mut data = json!({ "index": index, "machine": machine.index, "build": source.build, "pid": inst.pid,
                "port": inst.port });
            let mut msg = format!(
                "placed instance {index} on machine {} from build {build_name}: pid {}, port {}",
                machine.index, inst.pid, inst.port
            );
            if let Some((from, why)) = moved.get(&index) {
                data["moved_from"] = json!(from);
                data["reason"] = json!(why);
                msg.push_str(&format!(" (moved from machine {from}: {why})"));
            }
            ctx.event(NewEvent::info("placement", msg).with_data(data)).await;
            state.instances.push(inst);
            state.instances.sort_by_key(|i| i.index);
            self.save(r, &state)?;
        }
        let path = match &spec.health_check {
            HealthCheck::Http { path } => Some(path.as_str()),
            HealthCheck::Tcp => None,
        };
        for i in &state.instances {
            let probe = Probe {
                what: format!("instance {}", i.index),
                pid: i.pid,
                start_ticks: i.start_ticks,
                port: i.port,
                log: &i.log,
            };
            wait_healthy(ctx, &probe, path, Duration::from_secs(spec.start_timeout_secs)).await?;
        }
        let n = state.instances.len();
        ctx.event(NewEvent::info("instances", format!("{n} instance(s) healthy on {} machine(s)", eligible.len())))
            .await;
        Ok(outputs(&state, &cluster_r.name, source.build.as_deref()))
    }

    /// The build new instances start from: the spec's pinned one; for a
    /// scale, the one the running instances run (a scale deploys nothing);
    /// else the image's current build.
    fn source(&self, job: &Job, spec: &Spec, image_r: &Resource, state: &State) -> Result<Source, ProviderError> {
        let builds = image_r.outputs["builds"].as_array().cloned().unwrap_or_default();
        let running = state.instances.iter().find(|i| alive(i.pid, i.start_ticks)).and_then(|i| i.build.clone());
        let wanted = match (&spec.build, job.action.as_str()) {
            (Some(b), _) => Some(b.clone()),
            (None, "scale") => running.or_else(|| image::current_build(&image_r.outputs).map(str::to_string)),
            (None, _) => image::current_build(&image_r.outputs).map(str::to_string),
        };
        let entry = match &wanted {
            Some(id) => builds.iter().find(|b| b["id"] == id.as_str()).cloned().ok_or_else(|| {
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
        Ok(Source { build: wanted, dir, command })
    }

    /// Starts one instance on `machine`, in a fresh copy of the build.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        job: &Job,
        spec: &Spec,
        source: &Source,
        (cluster_id, cluster): (Uuid, &str),
        metadata: &str,
        machine: &Machine,
        index: u32,
        logs: &Path,
    ) -> Result<Instance, ProviderError> {
        let r = &job.resource;
        let dir = machine_dir(&self.clusters, cluster_id, machine.index)
            .join("services")
            .join(r.id.to_string())
            .join(index.to_string());
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
        let log = logs.join(format!("instance-{index}.log"));
        let mut env: Vec<(String, String)> = job.settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend([
            ("PORT".to_string(), port.to_string()),
            ("DROVER_SERVICE".to_string(), r.name.clone()),
            ("DROVER_INSTANCE".to_string(), index.to_string()),
            ("DROVER_MACHINE".to_string(), format!("{cluster}-{}", machine.index)),
            ("DROVER_CLUSTER".to_string(), cluster.to_string()),
            ("DROVER_ROLE_METADATA".to_string(), metadata.to_string()),
            ("DROVER_BUILD".to_string(), source.build.clone().unwrap_or_default()),
        ]);
        let (pid, start_ticks) = spawn_group(&dir, &source.command, &env, &log)?;
        let record = json!({ "pid": pid, "start_ticks": start_ticks, "service": r.name, "index": index });
        std::fs::write(dir.join(PROCESS), record.to_string()).map_err(io("record the instance's process"))?;
        Ok(Instance {
            index,
            machine: machine.index,
            machine_pid: machine.pid,
            machine_ticks: machine.start_ticks,
            pid,
            start_ticks,
            port,
            started_at: Utc::now(),
            log,
            build: source.build.clone(),
            image_dir: Some(source.dir.clone()),
            dir,
        })
    }

    async fn stop_instance(&self, ctx: &dyn RunContext, i: &Instance) {
        if alive(i.pid, i.start_ticks) {
            stop_group(i.pid, i.start_ticks, STOP_GRACE).await;
            let msg = format!("stopped instance {} (pid {}) on machine {}", i.index, i.pid, i.machine);
            ctx.event(NewEvent::info("instances", msg)).await;
        }
        let _ = std::fs::remove_dir_all(&i.dir);
    }

    async fn stop_all(&self, ctx: &dyn RunContext, r: &Resource) -> Result<(), ProviderError> {
        let mut state = self.load(r)?;
        while let Some(i) = state.instances.pop() {
            ctx.check_cancel()?;
            self.stop_instance(ctx, &i).await;
            self.save(r, &state)?;
        }
        Ok(())
    }
}

/// Copies a build's files (a plain tree: files, directories, symlinks).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
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

fn outputs(state: &State, cluster: &str, build: Option<&str>) -> Value {
    let instances: Vec<Value> = state
        .instances
        .iter()
        .map(|i| {
            json!({ "index": i.index, "machine": i.machine, "machine_name": format!("{cluster}-{}", i.machine),
                "pid": i.pid, "port": i.port, "url": format!("http://127.0.0.1:{}", i.port),
                "started_at": i.started_at, "build": i.build })
        })
        .collect();
    json!({ "count": instances.len(), "build": build, "instances": instances })
}

#[async_trait]
impl Provider for LocalServices {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "start" => self.ensure(ctx, job, &spec, spec.count).await,
            "scale" => {
                let count = job.params.get("count").and_then(Value::as_u64).map(|c| c as u32);
                self.ensure(ctx, job, &spec, count.or(spec.count)).await
            }
            "stop" => {
                self.stop_all(ctx, &job.resource).await?;
                Ok(json!({ "count": 0, "instances": [] }))
            }
            "destroy" => {
                self.stop_all(ctx, &job.resource).await?;
                match std::fs::remove_dir_all(self.dir(&job.resource)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove the service directory")(e)),
                }
                ctx.event(NewEvent::info("destroy", "all instances stopped and files removed")).await;
                Ok(json!({ "count": 0, "instances": [] }))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("local services cannot {other}"))),
        }
    }

    fn observes(&self) -> bool {
        true
    }

    /// Reports on the instances of a `running` service: alive, on a machine
    /// that is still there, answering?
    async fn observe(&self, r: &Resource) -> Option<Value> {
        if r.state != "running" {
            return None;
        }
        let spec = Spec::from_value(&r.spec).ok()?;
        let path = match &spec.health_check {
            HealthCheck::Http { path } => Some(path.clone()),
            HealthCheck::Tcp => None,
        };
        let state = self.load(r).ok()?;
        let mut instances = Vec::new();
        let mut problems = Vec::new();
        for i in &state.instances {
            let running = alive(i.pid, i.start_ticks);
            let machine_up = alive(i.machine_pid, i.machine_ticks);
            let failing = match (running, machine_up) {
                (_, false) => Some(format!("machine {} is gone", i.machine)),
                (false, true) => Some("process is gone".to_string()),
                (true, true) => check(i.port, path.as_deref()).await,
            };
            if let Some(why) = &failing {
                problems.push(format!("instance {} (pid {}, port {}): {why}", i.index, i.pid, i.port));
            }
            instances.push(json!({ "index": i.index, "machine": i.machine, "pid": i.pid, "port": i.port,
                "build": i.build, "running": running, "healthy": failing.is_none() }));
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
        Some(json!({ "healthy": problems.is_empty(), "summary": summary, "instances": instances }))
    }
}
