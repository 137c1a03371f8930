//! Clusters on the local provider: instance processes started from an image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use drover_domain::drift::{Difference, Report};
use drover_domain::kinds::cluster::{Spec, MAX_COUNT};
use drover_domain::kinds::image;
use drover_domain::model::{Level, NewEvent, Resource};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::image::io;
use super::process::{
    alive, check_running, free_port, look_at, mark_needs_repair, spawn_group, stop_group, wait_healthy, Probe, GONE,
};
use super::state;

const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Instance {
    index: u32,
    pid: u32,
    start_ticks: u64,
    port: u16,
    started_at: DateTime<Utc>,
    log: PathBuf,
    /// The image build it runs (`None` in state written before builds had
    /// ids) and that build's directory, its working directory.
    #[serde(default)]
    build: Option<String>,
    #[serde(default)]
    image_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    instances: Vec<Instance>,
    /// Who the machines are, for the services and jobs placed on them:
    /// the cluster's name, the leader it joins, its machines' role
    /// metadata (absent in state written before worker groups were local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<String>,
}

pub struct LocalClusters {
    root: PathBuf,
}

impl LocalClusters {
    pub fn new(root: PathBuf) -> LocalClusters {
        LocalClusters { root }
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

    /// Brings the cluster to `count` healthy instances, adopting those that
    /// run already.
    async fn ensure(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec, count: u32) -> Result<Value, ProviderError> {
        let image = job
            .dependencies
            .iter()
            .find(|d| d.kind == image::KIND)
            .ok_or_else(|| ProviderError::fatal("dependency_missing", "the cluster's image was not resolved"))?;
        let image_dir = image.outputs.get("path").and_then(Value::as_str).map(PathBuf::from).ok_or_else(|| {
            ProviderError::fatal("image_not_built", format!("image {} has no build output", image.name))
        })?;
        // New instances run the image's current build, with the start
        // command it was built with; running ones keep the build they run.
        let build = image::current_build(&image.outputs).map(str::to_string);
        let start = image
            .outputs
            .get("start_command")
            .or_else(|| image.spec.get("start_command"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let build_name = build.clone().unwrap_or_else(|| "(from before build ids)".into());
        let role_metadata = spec.machine_metadata(&job.resource.name);
        let r = &job.resource;
        let mut state = self.load(r)?;
        state.name = Some(r.name.clone());
        state.join = spec.join.clone();
        state.metadata = Some(role_metadata.clone());

        let (live, gone): (Vec<_>, Vec<_>) = state.instances.drain(..).partition(|i| alive(i.pid, i.start_ticks));
        for i in &gone {
            let msg = format!("instance {} (pid {}, port {}) is gone; it will be replaced", i.index, i.pid, i.port);
            ctx.event(NewEvent::info("instances", msg).with_level(Level::Warn)).await;
            let why = format!("its machine {}-{} is gone", r.name, i.index);
            stop_machine_services(ctx, &machine_dir(&self.root, r.id, i.index), &why).await;
        }
        // The `count` lowest indexes that run stay (an adopt may have left
        // a gap); the others stop, the highest first.
        let mut live = live;
        live.sort_by_key(|i| i.index);
        let extra: Vec<_> = live.split_off(live.len().min(count as usize)).into_iter().rev().collect();
        let keep = live;
        for i in &keep {
            ctx.event(NewEvent::info(
                "instances",
                format!("adopting instance {} (pid {}, port {})", i.index, i.pid, i.port),
            ))
            .await;
        }
        state.instances = keep;
        self.save(r, &state)?;
        for i in extra {
            ctx.check_cancel()?;
            let why = format!("its machine {}-{} is being removed (the cluster scales down)", r.name, i.index);
            stop_machine_services(ctx, &machine_dir(&self.root, r.id, i.index), &why).await;
            stop_group(i.pid, i.start_ticks, STOP_GRACE).await;
            ctx.event(NewEvent::info("instances", format!("stopped instance {} (pid {})", i.index, i.pid))).await;
        }
        let logs = self.dir(r).join("logs");
        std::fs::create_dir_all(&logs).map_err(io("create the log directory"))?;
        for index in 0.. {
            if state.instances.len() >= count as usize {
                break;
            }
            if state.instances.iter().any(|i| i.index == index) {
                continue;
            }
            ctx.check_cancel()?;
            let log = logs.join(format!("instance-{index}.log"));
            let mut inst =
                spawn(&image_dir, &start, &role_metadata, r, Slot { index, port: None }, &job.settings, &log)?;
            inst.build = build.clone();
            ctx.event(
                NewEvent::info(
                    "instances",
                    format!("started instance {index} from build {build_name}: pid {}, port {}", inst.pid, inst.port),
                )
                .with_data(json!({ "index": index, "build": build, "image": image.name })),
            )
            .await;
            state.instances.push(inst);
            state.instances.sort_by_key(|i| i.index);
            self.save(r, &state)?;
        }
        all_healthy(ctx, &state, spec).await?;
        ctx.event(NewEvent::info("instances", format!("{count} instance(s) healthy"))).await;
        Ok(outputs(&state))
    }

    /// Compares what runs with the record: as many instances as the
    /// cluster's state says (its count when up, none when down), each
    /// process alive, running in its recorded build's directory (which
    /// still exists), and answering its health check. Changes nothing.
    async fn refresh(&self, ctx: &dyn RunContext, r: &Resource, spec: &Spec) -> Result<Value, ProviderError> {
        let state = self.load(r)?;
        let mut report = Report::default();
        // What the last run left running (a count changed since, not yet
        // scaled to, is a pending change, not drift).
        let expected = match r.state.as_str() {
            "up" => recorded_count(r, spec),
            _ => 0,
        };
        // Taking reality in: the cluster has the instances that run.
        let live = state.instances.iter().filter(|i| alive(i.pid, i.start_ticks)).count();
        let adopt = json!({ "count": live });
        match state.instances.len() {
            n if n == expected => report.same(),
            n => report.differs(Difference::new("count", expected, n).adoptable(adopt.clone())),
        }
        let path = health_path(spec);
        for i in &state.instances {
            ctx.check_cancel()?;
            let at = format!("instances[{}]", i.index);
            if !alive(i.pid, i.start_ticks) {
                let gone = Difference::new(format!("{at}.process"), format!("running (pid {})", i.pid), "gone");
                report.differs(gone.adoptable(adopt.clone()));
                continue;
            }
            report.same();
            look_at(&mut report, &at, i.pid, i.image_dir.as_deref(), "build", i.port, path).await;
        }
        Ok(report.told(ctx).await)
    }

    /// Starts again, from the build each ran and on its port, the
    /// instances whose process is gone; the others are left as they run.
    async fn repair(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let r = &job.resource;
        let start = job
            .dependencies
            .iter()
            .find(|d| d.kind == image::KIND)
            .and_then(|image| image.outputs.get("start_command").or_else(|| image.spec.get("start_command")))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut state = self.load(r)?;
        let role_metadata = state.metadata.clone().unwrap_or_else(|| spec.machine_metadata(&r.name));
        let logs = self.dir(r).join("logs");
        std::fs::create_dir_all(&logs).map_err(io("create the log directory"))?;
        let mut repaired = 0;
        for slot in 0..state.instances.len() {
            ctx.check_cancel()?;
            let i = state.instances[slot].clone();
            if alive(i.pid, i.start_ticks) {
                continue;
            }
            let Some(dir) = i.image_dir.clone().filter(|d| d.is_dir()) else {
                return Err(ProviderError::fatal(
                    "build_gone",
                    format!(
                        "instance {} cannot be started again: the build it ran is gone (deploy or scale instead)",
                        i.index
                    ),
                ));
            };
            let why = format!("its machine {}-{} died", r.name, i.index);
            stop_machine_services(ctx, &machine_dir(&self.root, r.id, i.index), &why).await;
            let mut again = spawn(
                &dir,
                &start,
                &role_metadata,
                r,
                Slot { index: i.index, port: Some(i.port) },
                &job.settings,
                &i.log,
            )?;
            again.build = i.build.clone();
            ctx.event(NewEvent::info(
                "repair",
                format!(
                    "instance {} (pid {}) was gone; started again: pid {}, port {}",
                    i.index, i.pid, again.pid, again.port
                ),
            ))
            .await;
            state.instances[slot] = again;
            self.save(r, &state)?;
            repaired += 1;
        }
        all_healthy(ctx, &state, spec).await?;
        let msg = match repaired {
            0 => "nothing to repair: every instance runs".to_string(),
            n => format!("{n} instance(s) started again; all healthy"),
        };
        ctx.event(NewEvent::info("repair", msg)).await;
        Ok(outputs(&state))
    }

    /// Takes the instances that died into the record: they are forgotten
    /// (what their machines ran stopped), the others run on as they are, and
    /// the count is what runs — as long as that is what the refresh found.
    async fn adopt(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let r = &job.resource;
        let found = spec.target_count(&job.action, &job.params).unwrap_or(spec.count) as usize;
        let mut state = self.load(r)?;
        let (live, gone): (Vec<_>, Vec<_>) = state.instances.drain(..).partition(|i| alive(i.pid, i.start_ticks));
        if live.len() != found {
            return Err(ProviderError::fatal(
                "reality_moved",
                format!("{} instance(s) run now, the refresh found {found}: refresh again, then adopt", live.len()),
            ));
        }
        for i in &gone {
            let why = format!("its machine {}-{} died and is forgotten", r.name, i.index);
            stop_machine_services(ctx, &machine_dir(&self.root, r.id, i.index), &why).await;
            let msg = format!("forgot instance {} (pid {}, port {}): its process is gone", i.index, i.pid, i.port);
            ctx.event(NewEvent::info("adopt", msg)).await;
        }
        state.instances = live;
        self.save(r, &state)?;
        ctx.event(NewEvent::info("adopt", format!("the cluster has the {found} instance(s) that run"))).await;
        Ok(outputs(&state))
    }

    async fn stop_all(&self, ctx: &dyn RunContext, r: &Resource) -> Result<(), ProviderError> {
        let mut state = self.load(r)?;
        while let Some(i) = state.instances.pop() {
            ctx.check_cancel()?;
            let why = format!("its machine {}-{} is stopping with its cluster", r.name, i.index);
            stop_machine_services(ctx, &machine_dir(&self.root, r.id, i.index), &why).await;
            stop_group(i.pid, i.start_ticks, STOP_GRACE).await;
            ctx.event(NewEvent::info("instances", format!("stopped instance {} (pid {})", i.index, i.pid))).await;
            self.save(r, &state)?;
        }
        Ok(())
    }
}

/// The instances the last run left (a count changed since, not yet scaled
/// to, is a pending change: neither drift nor missing).
fn recorded_count(r: &Resource, spec: &Spec) -> usize {
    r.outputs["count"].as_u64().map(|c| c as usize).unwrap_or(spec.count as usize)
}

/// The path a cluster's HTTP health check asks for; `None`: TCP.
fn health_path(spec: &Spec) -> Option<&str> {
    spec.health_check.http_path()
}

/// Waits until every instance answers its health check, or fails the run
/// with the first that does not in time.
async fn all_healthy(ctx: &dyn RunContext, state: &State, spec: &Spec) -> Result<(), ProviderError> {
    for i in &state.instances {
        let probe = Probe {
            what: format!("instance {}", i.index),
            pid: i.pid,
            start_ticks: i.start_ticks,
            port: i.port,
            log: &i.log,
        };
        wait_healthy(ctx, &probe, health_path(spec), Duration::from_secs(spec.start_timeout_secs)).await?;
    }
    Ok(())
}

/// Where an instance goes: its index, and its port (`None`: a free one).
struct Slot {
    index: u32,
    port: Option<u16>,
}

/// Starts one instance. The cluster's settings become its environment
/// (before drover's own variables, which they cannot override).
fn spawn(
    image_dir: &Path,
    start: &str,
    role_metadata: &str,
    r: &Resource,
    Slot { index, port }: Slot,
    settings: &BTreeMap<String, String>,
    log: &Path,
) -> Result<Instance, ProviderError> {
    let port = match port {
        Some(p) => p,
        None => free_port().map_err(io("find a free port"))?,
    };
    let mut env: Vec<(String, String)> = settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.extend([
        ("PORT".to_string(), port.to_string()),
        ("DROVER_INSTANCE".to_string(), index.to_string()),
        ("DROVER_CLUSTER".to_string(), r.name.clone()),
        ("DROVER_ROLE_METADATA".to_string(), role_metadata.to_string()),
    ]);
    let (pid, start_ticks) = spawn_group(image_dir, start, &env, log, &format!("instance {index}"))?;
    Ok(Instance {
        index,
        pid,
        start_ticks,
        port,
        started_at: Utc::now(),
        log: log.to_path_buf(),
        build: None,
        image_dir: Some(image_dir.to_path_buf()),
    })
}

fn outputs(state: &State) -> Value {
    let instances: Vec<Value> = state
        .instances
        .iter()
        .map(|i| {
            json!({ "index": i.index, "pid": i.pid, "port": i.port, "url": format!("http://127.0.0.1:{}", i.port),
                "started_at": i.started_at, "build": i.build })
        })
        .collect();
    json!({ "count": instances.len(), "instances": instances })
}

/// What [`dirs_in_use`] reads of any state file of live processes (a
/// cluster's instances, a service's).
#[derive(Deserialize)]
struct Running {
    instances: Vec<RunningInstance>,
    /// Build directories kept for a service's rollback.
    #[serde(default)]
    keep: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct RunningInstance {
    pid: u32,
    start_ticks: u64,
    /// A service instance's service (name).
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    image_dir: Option<PathBuf>,
}

/// The image build directories that live instances run from, read from
/// the state files of every local cluster and service under `roots`;
/// `None` when that cannot be told (a state file that cannot be read, or a
/// live instance started before builds had ids), so that the caller
/// removes nothing.
pub(super) fn dirs_in_use(roots: &[PathBuf]) -> Option<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for root in roots {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return None,
        };
        for e in entries {
            let file = e.ok()?.path().join(state::STATE);
            let state: Running = match std::fs::read(&file) {
                Ok(bytes) => serde_json::from_slice(&bytes).ok()?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => return None,
            };
            for i in state.instances.iter().filter(|i| alive(i.pid, i.start_ticks)) {
                dirs.push(i.image_dir.clone()?);
            }
            dirs.extend(state.keep);
        }
    }
    Some(dirs)
}

/// A machine services and jobs run on: an instance of a local cluster, or
/// of a worker group joined to it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Machine {
    /// The cluster it is an instance of, and that cluster's name.
    pub cluster: uuid::Uuid,
    pub cluster_name: String,
    pub index: u32,
    pub pid: u32,
    pub start_ticks: u64,
    /// Its role metadata.
    pub metadata: String,
}

impl Machine {
    /// `web-qa-2`: what `DROVER_MACHINE` says.
    pub fn name(&self) -> String {
        format!("{}-{}", self.cluster_name, self.index)
    }
}

/// The live machines of `leader` (a local cluster: its id, name and its
/// machines' metadata) and of every local worker group whose state says it
/// joins it: the leader's first, each cluster's by index.
pub(super) fn machines(
    root: &Path,
    leader: uuid::Uuid,
    leader_name: &str,
    leader_metadata: &str,
) -> Result<Vec<Machine>, ProviderError> {
    let mut groups: Vec<(uuid::Uuid, State)> = vec![(leader, state::read(&root.join(leader.to_string()))?)];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let Some(id) = e.file_name().to_str().and_then(|n| uuid::Uuid::parse_str(n).ok()) else { continue };
        if id == leader {
            continue;
        }
        // A worker group's state that cannot be read is not one of ours to place on.
        let Ok(s) = state::read::<State>(&e.path()) else { continue };
        if s.join.as_deref().is_some_and(|j| j == leader_name || j == leader.to_string()) {
            groups.push((id, s));
        }
    }
    groups[1..].sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let mut out = Vec::new();
    for (n, (id, s)) in groups.into_iter().enumerate() {
        let name = s.name.clone().unwrap_or_else(|| if n == 0 { leader_name.to_string() } else { id.to_string() });
        let metadata = match n {
            0 => leader_metadata.to_string(),
            _ => s.metadata.clone().unwrap_or_else(|| format!("cluster={name}")),
        };
        let mut ms: Vec<Machine> = s
            .instances
            .iter()
            .filter(|i| alive(i.pid, i.start_ticks))
            .map(|i| Machine {
                cluster: id,
                cluster_name: name.clone(),
                index: i.index,
                pid: i.pid,
                start_ticks: i.start_ticks,
                metadata: metadata.clone(),
            })
            .collect();
        ms.sort_by_key(|m| m.index);
        out.extend(ms);
    }
    Ok(out)
}

/// Where machine `index` of the cluster with id `cluster` keeps what runs on it.
pub(super) fn machine_dir(root: &Path, cluster: uuid::Uuid, index: u32) -> PathBuf {
    root.join(cluster.to_string()).join("machines").join(index.to_string())
}

/// The file a service instance's directory records its process in, so that
/// stopping its machine stops it too.
pub(super) const PROCESS: &str = "process.json";

/// Stops every process on a machine (each service instance and job run
/// recorded in a [`PROCESS`] file, `services/<service>/<instance>/` and
/// `jobs/<job>/<run>/` under the machine's directory) and removes what they
/// left there: a machine that stops takes them with it.
async fn stop_machine_services(ctx: &dyn RunContext, machine: &Path, why: &str) {
    let mut owners = Vec::new();
    for d in ["services", "jobs"] {
        owners.extend(std::fs::read_dir(machine.join(d)).into_iter().flatten().flatten());
    }
    for svc in owners {
        for inst in std::fs::read_dir(svc.path()).into_iter().flatten().flatten() {
            let Ok(bytes) = std::fs::read(inst.path().join(PROCESS)) else { continue };
            let Ok(p) = serde_json::from_slice::<RunningInstance>(&bytes) else { continue };
            // A service instance leaves the discovery registry before it
            // stops, as in a deploy: nothing is sent to it while it goes.
            let service_id = svc.file_name().to_str().and_then(|n| uuid::Uuid::parse_str(n).ok());
            if let (Some(name), Some(id)) = (&p.service, service_id) {
                let instance = inst.file_name().to_string_lossy().into_owned();
                if let Err(e) = ctx.discovery_leave(name, id, &instance, why).await {
                    let msg = format!("could not take {name}/{instance} out of the discovery registry: {e}");
                    ctx.event(NewEvent::info("discovery", msg).with_level(Level::Warn)).await;
                }
            }
            if alive(p.pid, p.start_ticks) {
                stop_group(p.pid, p.start_ticks, STOP_GRACE).await;
                let msg =
                    format!("stopped service instance {} (pid {}) with its machine", inst.path().display(), p.pid);
                ctx.event(NewEvent::info("instances", msg)).await;
            }
        }
    }
    let _ = std::fs::remove_dir_all(machine);
}

#[async_trait]
impl Provider for LocalClusters {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "create" | "start" => self.ensure(ctx, job, &spec, spec.count).await,
            "scale" | "add-instances" => {
                let count = spec.target_count(&job.action, &job.params).unwrap_or(spec.count);
                if count > MAX_COUNT {
                    return Err(ProviderError::fatal(
                        "too_many_instances",
                        format!("{count} instances is more than the limit of {MAX_COUNT}"),
                    ));
                }
                self.ensure(ctx, job, &spec, count).await
            }
            "stop" => {
                self.stop_all(ctx, &job.resource).await?;
                Ok(json!({ "count": 0, "instances": [] }))
            }
            "refresh" => self.refresh(ctx, &job.resource, &spec).await,
            "repair" => self.repair(ctx, job, &spec).await,
            "adopt" => self.adopt(ctx, job, &spec).await,
            "destroy" => {
                self.stop_all(ctx, &job.resource).await?;
                state::remove(&self.dir(&job.resource), "remove the cluster directory")?;
                ctx.event(NewEvent::info("destroy", "all instances stopped and files removed")).await;
                Ok(json!({ "count": 0, "instances": [] }))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("local clusters cannot {other}"))),
        }
    }

    fn observes(&self) -> bool {
        true
    }

    fn refreshes(&self) -> bool {
        true
    }

    /// Reports on the instances of an `up` cluster: alive and answering?
    async fn observe(&self, r: &Resource) -> Option<Value> {
        if r.state != "up" {
            return None;
        }
        let spec = Spec::from_value(&r.spec).ok()?;
        let path = health_path(&spec);
        let state = self.load(r).ok()?;
        let mut instances = Vec::new();
        let mut problems = Vec::new();
        // What a repair would fix: processes gone (not an instance that
        // runs and fails its check — starting it again would not help).
        let mut gone = Vec::new();
        for i in &state.instances {
            let running = alive(i.pid, i.start_ticks);
            let failing = check_running(i.pid, i.start_ticks, i.port, path).await;
            if let Some(why) = &failing {
                problems.push(format!("instance {} (pid {}, port {}): {why}", i.index, i.pid, i.port));
                if why == GONE {
                    gone.push(format!("instance {} (pid {})", i.index, i.pid));
                }
            }
            instances.push(json!({ "index": i.index, "pid": i.pid, "port": i.port, "build": i.build,
                "running": running, "healthy": failing.is_none() }));
        }
        let count = recorded_count(r, &spec);
        let missing = count.saturating_sub(state.instances.len());
        if missing > 0 {
            problems.push(format!("{missing} instance(s) not on record"));
        }
        let summary = if problems.is_empty() {
            format!("{} of {count} instance(s) healthy", instances.len())
        } else {
            format!("{} of {count} instance(s) unhealthy: {}", problems.len(), problems.join("; "))
        };
        let mut seen = json!({ "healthy": problems.is_empty(), "summary": summary, "instances": instances });
        mark_needs_repair(&mut seen, &gone);
        Some(seen)
    }
}
