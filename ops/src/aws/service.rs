//! Services on the `aws` provider: each instance a systemd unit on one of
//! the cluster's EC2 instances (its *machines*), started and stopped over
//! SSM Run Command (`AWS-RunShellScript`), running its build's S3 artifact.
//!
//! # What an instance is
//! - A *unit id* `INDEX-RANDOM` (the registry's instance id) and the
//!   template unit `drover-SERVICE@.service`, instance `%i` = the unit id,
//!   working in `/var/lib/drover/services/SERVICE/UNIT/app`: the start
//!   script fetches the artifact (`aws s3 cp`), checks its SHA-256 against
//!   the build's, unpacks it, writes the instance's env file (mode 0600:
//!   the non-secret settings, the spec's `env`, `PORT`, `DROVER_*`; the
//!   secret settings come from `/etc/drover/secrets.env`, which the machine
//!   reads from Parameter Store at boot, never through SSM's parameters),
//!   starts the unit and waits, *on the machine*, until it answers its
//!   health check on `127.0.0.1:PORT` within `start_timeout_secs` (exit 0),
//!   or says why not (the unit exited; no answer in time) with the unit's
//!   journal. The script is idempotent: sent again for a unit that runs,
//!   it only checks its health.
//! - *Its record is a tag on its machine*: `drover:svc/SERVICE-ID/UNIT` =
//!   `build=… port=… plan=… at=…`, put on *before* the start command is
//!   sent and taken off after the stop command ends. So the inventory is
//!   where the units are, shared by every replica of drover, and an
//!   instance whose machine is terminated vanishes with it (placement then
//!   starts it elsewhere, and says so). EC2 allows 50 tags per instance:
//!   about 40 service instances per machine.
//! - *Ports*: instance `i` listens on `port + i`; a deploy's new instance
//!   put beside its predecessor on the same machine takes `port + 64 + i`
//!   (and the next one back `port + i`), so the two never collide.
//!
//! # Placement, deploys, the registry
//! As on the local provider: `count` instances with indexes `0..count` on
//! the matching machines with fewest (the machine a dead one was on first),
//! or `global`, one per matching machine. A rolling replacement (`deploy`,
//! `rollback`, `restart`) follows the rules of `crate::rolling`, shared
//! with the local provider; its plan is kept in the run's own log (the
//! `plan` event's data), which an attempt after a crash of drover reads
//! back ([`RunContext::recall`]) to carry out the same plan: an instance
//! tagged with the plan is its new one (its health is checked again by
//! sending its idempotent start script), any other at its index an old
//! one. A healthy instance enters the registry at its machine's private
//! address.
//! Drover's observer probes each instance at `PRIVATE_IP:PORT` itself (it
//! runs in the VPC, as the ALBs' target groups assume), renewing its
//! registry entry or taking it out.
//!
//! # What moto cannot show
//! moto accepts `SendCommand` and reports every invocation `Success` at once
//! without running anything: no artifact is fetched, no unit starts, and no
//! probe of a private address answers. The tests check the commands sent
//! (the unit, the artifact's key and checksum, the env file, no secret),
//! the tags, the plan's bookkeeping and its resume, and the registry's
//! entries as the runs made them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2::types::Tag;
use chrono::Utc;
use drover_domain::discovery::{NewEntry, Presence, Scheme};
use drover_domain::drift::{Difference, Report};
use drover_domain::kinds::cluster::{self, HealthCheck};
use drover_domain::kinds::image;
use drover_domain::kinds::service::{matches, Spec, MAX_COUNT};
use drover_domain::model::{Level, NewEvent, Resource};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::image::AWS_CLI;
use super::job::{ended, quote, tail};
use super::stacks::{InstanceInfo, StackApi};
use super::template::systemd_value;
use super::{AwsError, Backoff, Clients, TAG_RESOURCE};
use crate::local::process::check_at;
use crate::rolling;

const DOCUMENT: &str = "AWS-RunShellScript";
/// How long a start script may take beyond the health check's own timeout
/// (fetching and unpacking the artifact).
const FETCH_MARGIN: Duration = Duration::from_secs(300);

/// How long an instance's start script may run: its health check's
/// timeout and the fetch.
fn start_limit(spec: &Spec) -> Duration {
    Duration::from_secs(spec.start_timeout_secs) + FETCH_MARGIN
}

/// The tag key prefix of a service's instances on its machines.
fn tag_prefix(service: Uuid) -> String {
    format!("drover:svc/{service}/")
}

/// One instance, as its machine's tag records it.
#[derive(Debug, Clone, PartialEq)]
struct Instance {
    unit: String,
    index: u32,
    machine: String,
    address: Option<String>,
    port: u16,
    build: String,
    plan: Option<Uuid>,
    at: String,
}

impl Instance {
    /// The instances of the service `prefix` names ([`tag_prefix`]) that
    /// machine `m`'s tags record.
    fn tagged<'a>(prefix: &'a str, m: &'a InstanceInfo) -> impl Iterator<Item = Instance> + 'a {
        m.tags.iter().filter_map(move |(k, v)| Instance::parse(k.strip_prefix(prefix)?, v, m))
    }

    fn tag_value(&self) -> String {
        let plan = self.plan.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        format!("build={} port={} plan={plan} at={}", self.build, self.port, self.at)
    }

    fn parse(unit: &str, value: &str, machine: &InstanceInfo) -> Option<Instance> {
        let index = unit.split('-').next()?.parse().ok()?;
        let field = |k: &str| value.split(' ').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='));
        Some(Instance {
            unit: unit.to_string(),
            index,
            machine: machine.id.clone(),
            address: machine.private_ip.clone(),
            port: field("port")?.parse().ok()?,
            build: field("build")?.to_string(),
            plan: field("plan").and_then(|p| p.parse().ok()),
            at: field("at").unwrap_or_default().to_string(),
        })
    }
}

/// What instances run: a build of an image, its artifact and the command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Source {
    image: String,
    build: String,
    bucket: String,
    key: String,
    sha256: String,
    command: String,
}

impl rolling::Source for Source {
    fn image(&self) -> &str {
        &self.image
    }
    fn build(&self) -> Option<&str> {
        Some(&self.build)
    }
}

type Plan = rolling::Plan<Source>;

/// The cluster's machines as a run sees them, and the service's instances on them.
struct Site {
    cluster: String,
    cluster_id: Uuid,
    metadata: String,
    /// Running machines, in launch order (their ids).
    running: Vec<InstanceInfo>,
    /// Those matching the constraints.
    eligible: Vec<InstanceInfo>,
    instances: Vec<Instance>,
    /// Tagged instances on machines that do not run (stopped): gone.
    stranded: Vec<Instance>,
}

pub struct AwsServices {
    clients: Arc<Clients>,
    stacks: Arc<dyn StackApi>,
    poll: Backoff,
}

impl AwsServices {
    pub fn new(clients: Arc<Clients>, stacks: Arc<dyn StackApi>, poll: Backoff) -> AwsServices {
        AwsServices { clients, stacks, poll }
    }

    async fn site(&self, r: &Resource, cluster_r: &Resource, spec: &Spec) -> Result<Site, ProviderError> {
        let cluster_spec = cluster::Spec::from_value(&cluster_r.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("cluster {}: {e:?}", cluster_r.name)))?;
        let metadata = cluster_spec.machine_metadata(&cluster_r.name);
        self.site_of(r, cluster_r.id, &cluster_r.name, metadata, spec).await
    }

    /// The site of the cluster the last run placed on (`stop`, `destroy`
    /// and `refresh` resolve no cluster); `None` when no run placed any.
    async fn recorded_site(&self, r: &Resource, spec: &Spec) -> Result<Option<Site>, ProviderError> {
        let Some(id) = r.outputs["cluster_id"].as_str().and_then(|c| c.parse().ok()) else { return Ok(None) };
        let name = r.outputs["cluster"].as_str().unwrap_or_default().to_string();
        Ok(Some(self.site_of(r, id, &name, String::new(), spec).await?))
    }

    async fn site_of(
        &self,
        r: &Resource,
        cluster_id: Uuid,
        cluster: &str,
        metadata: String,
        spec: &Spec,
    ) -> Result<Site, ProviderError> {
        let all =
            self.stacks.instances(TAG_RESOURCE, &cluster_id.to_string()).await.map_err(AwsError::into_provider)?;
        let prefix = tag_prefix(r.id);
        let mut instances = Vec::new();
        let mut stranded = Vec::new();
        for m in &all {
            match m.state.as_str() {
                "running" | "pending" => instances.extend(Instance::tagged(&prefix, m)),
                _ => stranded.extend(Instance::tagged(&prefix, m)),
            }
        }
        instances.sort_by(|a, b| (a.index, &a.at).cmp(&(b.index, &b.at)));
        let running: Vec<InstanceInfo> = all.into_iter().filter(|m| m.state == "running").collect();
        let eligible = match matches(spec.constraints.as_deref(), &metadata) {
            true => running.clone(),
            false => Vec::new(),
        };
        Ok(Site { cluster: cluster.to_string(), cluster_id, metadata, running, eligible, instances, stranded })
    }

    fn no_machine(site: &Site, spec: &Spec) -> ProviderError {
        let why = match site.running.is_empty() {
            true => format!("cluster {} has no running machine", site.cluster),
            false => format!(
                "no machine of cluster {} matches the constraints {:?} (its machines carry {})",
                site.cluster,
                spec.constraints.as_deref().unwrap_or_default(),
                site.metadata
            ),
        };
        ProviderError::fatal("no_machine", why)
    }

    async fn set_tag(&self, i: &Instance, r: &Resource) -> Result<(), ProviderError> {
        let tag = Tag::builder().key(format!("{}{}", tag_prefix(r.id), i.unit)).value(i.tag_value()).build();
        let ec2 = self.clients.ec2().await;
        ec2.create_tags()
            .resources(&i.machine)
            .tags(tag)
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("CreateTags", &e).into_provider())?;
        Ok(())
    }

    async fn drop_tag(&self, i: &Instance, r: &Resource) -> Result<(), ProviderError> {
        let tag = Tag::builder().key(format!("{}{}", tag_prefix(r.id), i.unit)).build();
        let ec2 = self.clients.ec2().await;
        match ec2.delete_tags().resources(&i.machine).tags(tag).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = AwsError::from_sdk("DeleteTags", &e);
                // A machine gone takes its tags with it.
                if e.code.starts_with("InvalidInstanceID") {
                    Ok(())
                } else {
                    Err(e.into_provider())
                }
            }
        }
    }

    /// Sends a script to one machine; the command's id.
    async fn send(
        &self,
        job: &Job,
        machine: &str,
        what: &str,
        script: String,
        timeout: Duration,
    ) -> Result<String, ProviderError> {
        let ssm = self.clients.ssm().await;
        let out = ssm
            .send_command()
            .document_name(DOCUMENT)
            .comment(format!("drover run {} {what}", job.run_id))
            .instance_ids(machine)
            .parameters("commands", vec![script])
            .parameters("executionTimeout", vec![timeout.as_secs().to_string()])
            .send()
            .await
            .map_err(|e| AwsError::from_sdk("SendCommand", &e).into_provider())?;
        Ok(out.command().and_then(|c| c.command_id()).unwrap_or_default().to_string())
    }

    /// Waits for a command on one machine to end: `Ok` when it succeeded,
    /// else why not (its status, exit code and the last lines it wrote).
    async fn wait(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        command: &str,
        machine: &str,
        timeout: Duration,
    ) -> Result<Result<(), String>, ProviderError> {
        let ssm = self.clients.ssm().await;
        let started = Instant::now();
        let limit = timeout + Duration::from_secs(120);
        let mut delays = self.poll.delays();
        loop {
            ctx.check_cancel()?;
            match ssm.get_command_invocation().command_id(command).instance_id(machine).send().await {
                Ok(inv) => {
                    let status = inv.status().map(|s| s.as_str().to_string()).unwrap_or_default();
                    match ended(&status) {
                        Some("succeeded") => return Ok(Ok(())),
                        Some(_) => {
                            let mut out = tail(inv.standard_output_content(), &job.secrets);
                            out.extend(tail(inv.standard_error_content(), &job.secrets));
                            let code = inv.response_code();
                            let mut why = format!("command {command} on {machine}: {status} (exit code {code})");
                            if !out.is_empty() {
                                why.push_str(&format!(": {}", out.join(" | ")));
                            }
                            return Ok(Err(why));
                        }
                        None => {}
                    }
                }
                Err(e) => {
                    let e = AwsError::from_sdk("GetCommandInvocation", &e);
                    if !e.is("InvocationDoesNotExist") {
                        return Err(e.into_provider());
                    }
                }
            }
            if started.elapsed() > limit {
                return Ok(Err(format!("command {command} on {machine} reported no end within {}s", limit.as_secs())));
            }
            tokio::time::sleep(delays.next().unwrap_or(self.poll.max)).await;
        }
    }

    /// Records a new instance on a machine (its tag) and sends its start
    /// script; the command to wait on.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        site: &Site,
        source: &Source,
        index: u32,
        machine: &InstanceInfo,
        plan: Option<Uuid>,
        moved: Option<&(String, String)>,
    ) -> Result<(Instance, String), ProviderError> {
        let base = u32::from(spec.port.unwrap_or_default()) + index;
        let beside = site.instances.iter().any(|i| i.machine == machine.id && u32::from(i.port) == base);
        let port = u16::try_from(if beside { base + MAX_COUNT } else { base }).map_err(|_| {
            ProviderError::fatal("port_out_of_range", format!("port of instance {index} is past 65535"))
        })?;
        let unit = format!("{index}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        let inst = Instance {
            unit,
            index,
            machine: machine.id.clone(),
            address: machine.private_ip.clone(),
            port,
            build: source.build.clone(),
            plan,
            at: Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        };
        self.set_tag(&inst, &job.resource).await?;
        let command = self.send_start(job, spec, site, source, &inst).await?;
        let mut msg = format!(
            "placed instance {index} on machine {} ({}) from build {}: unit drover-{}@{}, port {port}, command {command}",
            machine.id,
            machine.private_ip.as_deref().unwrap_or("no address"),
            source.build,
            job.resource.name,
            inst.unit
        );
        let mut data = json!({ "index": index, "machine": machine.id, "address": machine.private_ip,
            "unit": inst.unit, "build": source.build, "port": port, "command_id": command });
        if let Some((from, why)) = moved {
            data["moved_from"] = json!(from);
            data["reason"] = json!(why);
            msg.push_str(&format!(" (moved from machine {from}: {why})"));
        }
        ctx.event(NewEvent::info("placement", msg).with_data(data)).await;
        Ok((inst, command))
    }

    async fn send_start(
        &self,
        job: &Job,
        spec: &Spec,
        site: &Site,
        source: &Source,
        i: &Instance,
    ) -> Result<String, ProviderError> {
        let script = start_script(job, spec, &site.cluster, &site.metadata, source, i);
        self.send(job, &i.machine, &format!("start {}", i.unit), script, start_limit(spec)).await
    }

    /// Waits until a started instance is healthy (its start script ended
    /// well), then enters it in the registry.
    async fn healthy(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        i: &Instance,
        command: &str,
    ) -> Result<Result<(), String>, ProviderError> {
        if let Err(why) = self.wait(ctx, job, command, &i.machine, start_limit(spec)).await? {
            return Ok(Err(format!("instance {} did not become healthy: {why}", i.index)));
        }
        let msg = format!("instance {} healthy on machine {} (build {})", i.index, i.machine, i.build);
        ctx.event(NewEvent::info("instances", msg).with_data(json!({ "index": i.index, "unit": i.unit }))).await;
        ctx.discovery_enter(&entry(&job.resource, spec, i), "healthy").await?;
        Ok(Ok(()))
    }

    /// Takes an instance out of the registry, stops its unit, removes its
    /// files and its tag. A machine that no longer runs stops it anyway.
    async fn stop(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        i: &Instance,
        reason: &str,
        machine_runs: bool,
    ) -> Result<(), ProviderError> {
        let r = &job.resource;
        ctx.discovery_leave(&r.name, r.id, &i.unit, reason).await?;
        if machine_runs {
            let timeout = Duration::from_secs(120);
            let command =
                self.send(job, &i.machine, &format!("stop {}", i.unit), stop_script(&r.name, &i.unit), timeout).await?;
            if let Err(why) = self.wait(ctx, job, &command, &i.machine, timeout).await? {
                let msg =
                    format!("stopping instance {} on {} did not end well ({why}); forgetting it", i.index, i.machine);
                ctx.event(NewEvent::info("instances", msg).with_level(Level::Warn)).await;
            }
        }
        self.drop_tag(i, r).await?;
        let msg = format!(
            "stopped instance {} (unit drover-{}@{}) on machine {}: {reason}",
            i.index, r.name, i.unit, i.machine
        );
        ctx.event(NewEvent::info("instances", msg).with_data(json!({ "index": i.index, "unit": i.unit }))).await;
        Ok(())
    }

    /// The indexes wanted: `0..count`, or for a global service one per
    /// matching machine (an instance keeps its index; a bare machine gets
    /// the lowest free one), with the machine each index must be on.
    fn wanted(spec: &Spec, site: &Site, count: Option<u32>) -> BTreeMap<u32, Option<InstanceInfo>> {
        if !spec.global {
            return (0..count.or(spec.count).unwrap_or(0)).map(|i| (i, None)).collect();
        }
        let mut assigned = BTreeMap::new();
        let mut bare = Vec::new();
        for m in &site.eligible {
            match site.instances.iter().find(|i| i.machine == m.id && !assigned.contains_key(&i.index)) {
                Some(i) => {
                    assigned.insert(i.index, Some(m.clone()));
                }
                None => bare.push(m.clone()),
            }
        }
        let mut next = 0;
        for m in bare {
            while assigned.contains_key(&next) {
                next += 1;
            }
            assigned.insert(next, Some(m));
        }
        assigned
    }

    /// The machine a new instance of `index` goes on.
    fn machine_for<'a>(
        site: &'a Site,
        wanted: &'a BTreeMap<u32, Option<InstanceInfo>>,
        index: u32,
        prefer: Option<&str>,
    ) -> Option<&'a InstanceInfo> {
        if let Some(Some(m)) = wanted.get(&index) {
            return Some(m);
        }
        if let Some(m) = prefer.and_then(|p| site.eligible.iter().find(|m| m.id == p)) {
            return Some(m);
        }
        site.eligible
            .iter()
            .enumerate()
            .min_by_key(|(n, m)| (site.instances.iter().filter(|i| i.machine == m.id).count(), *n))
            .map(|(_, m)| m)
    }

    /// Stops what is not wanted (scaled away, a twin, on a machine that no
    /// longer matches or does not run); returns the indexes to place again
    /// with where they were and why.
    async fn prune(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        site: &mut Site,
        wanted: &BTreeMap<u32, Option<InstanceInfo>>,
    ) -> Result<BTreeMap<u32, (String, String)>, ProviderError> {
        let mut moved = BTreeMap::new();
        for i in std::mem::take(&mut site.stranded) {
            let why = "its machine is not running".to_string();
            self.stop(ctx, job, &i, &why, false).await?;
            if wanted.contains_key(&i.index) {
                moved.insert(i.index, (i.machine.clone(), why));
            }
        }
        // Instances the last run recorded whose machine is gone (with its tags).
        for rec in job.resource.outputs["instances"].as_array().into_iter().flatten() {
            let (Some(index), Some(machine)) = (rec["index"].as_u64(), rec["machine"].as_str()) else { continue };
            let index = index as u32;
            if !site.running.iter().any(|m| m.id == machine) && wanted.contains_key(&index) {
                let why = "its machine is gone".to_string();
                let msg = format!("instance {index} was on machine {machine}: {why}; it will be placed again");
                ctx.event(NewEvent::info("placement", msg).with_level(Level::Warn)).await;
                moved.entry(index).or_insert((machine.to_string(), why));
            }
        }
        let all = std::mem::take(&mut site.instances);
        let mut keep: Vec<Instance> = Vec::new();
        for i in all {
            let twin = keep.iter().any(|k| k.index == i.index);
            let matching = site.eligible.iter().any(|m| m.id == i.machine);
            let where_ok = match wanted.get(&i.index) {
                Some(Some(m)) => m.id == i.machine,
                Some(None) => matching,
                None => false,
            };
            if where_ok && !twin {
                keep.push(i);
                continue;
            }
            let why = match (matching, wanted.contains_key(&i.index)) {
                (false, _) => "its machine no longer matches the constraints",
                (true, false) => "the service no longer wants it (scaled down)",
                (true, true) => "a twin of its index",
            };
            self.stop(ctx, job, &i, why, true).await?;
            if !matching && wanted.contains_key(&i.index) {
                moved.insert(i.index, (i.machine.clone(), why.to_string()));
            }
        }
        site.instances = keep;
        Ok(moved)
    }

    /// start, scale, place, repair: the wanted instances on the matching
    /// machines, those that run adopted, the rest started and healthy.
    async fn ensure(
        &self,
        ctx: &dyn RunContext,
        job: &Job,
        spec: &Spec,
        count: Option<u32>,
    ) -> Result<Value, ProviderError> {
        let cluster_r = job.dependency(cluster::KIND)?;
        let mut site = self.site(&job.resource, cluster_r, spec).await?;
        if site.eligible.is_empty() {
            return Err(Self::no_machine(&site, spec));
        }
        let wanted = Self::wanted(spec, &site, count);
        let moved = self.prune(ctx, job, &mut site, &wanted).await?;
        for i in &site.instances {
            let msg =
                format!("adopting instance {} on machine {} (port {}, build {})", i.index, i.machine, i.port, i.build);
            ctx.event(NewEvent::info("instances", msg)).await;
        }
        // A scale or repair runs what runs; a start after a stop what ran
        // last (unless the spec pins a build or names another image).
        let running = site.instances.first().map(|i| i.build.clone());
        let last = job.resource.outputs["build"].as_str().filter(|_| {
            spec.build.is_none()
                && job.dependency(image::KIND).is_ok_and(|i| job.resource.outputs["image"] == i.name.as_str())
        });
        let build = match job.action.as_str() {
            "scale" | "repair" | "place" => running.or(last.map(str::to_string)),
            _ => last.map(str::to_string),
        };
        let source = match build {
            Some(b) => source(job, spec, Some(&b)).or_else(|_| source(job, spec, None))?,
            None => source(job, spec, spec.build.as_deref())?,
        };
        let mut started = Vec::new();
        for (&index, _) in wanted.iter() {
            if site.instances.iter().any(|i| i.index == index) {
                continue;
            }
            ctx.check_cancel()?;
            let from = moved.get(&index);
            let m = Self::machine_for(&site, &wanted, index, from.map(|(m, _)| m.as_str()))
                .ok_or_else(|| Self::no_machine(&site, spec))?
                .clone();
            let (inst, command) = self.start(ctx, job, spec, &site, &source, index, &m, None, from).await?;
            site.instances.push(inst.clone());
            started.push((inst, command));
        }
        // A repair sends every other instance its start script again: it
        // starts a unit that is not active (its process died) and checks
        // the health of one that is.
        if job.action == "repair" {
            let others: Vec<Instance> =
                site.instances.iter().filter(|i| !started.iter().any(|(s, _)| s.unit == i.unit)).cloned().collect();
            for i in &others {
                let ran = self::source(job, spec, Some(&i.build))?;
                let command = self.send_start(job, spec, &site, &ran, i).await?;
                let msg = format!(
                    "instance {} on machine {}: start script sent again (starts its unit if it is not active): command {command}",
                    i.index, i.machine
                );
                ctx.event(NewEvent::info("repair", msg)).await;
                started.push((i.clone(), command));
            }
        }
        for (i, command) in &started {
            if let Err(why) = self.healthy(ctx, job, spec, i, command).await? {
                return Err(ProviderError::fatal("unhealthy", why));
            }
        }
        for i in site.instances.iter().filter(|i| !started.iter().any(|(s, _)| s.unit == i.unit)) {
            ctx.discovery_enter(&entry(&job.resource, spec, i), "adopted by the run").await?;
        }
        site.instances.sort_by_key(|i| i.index);
        let n = site.instances.len();
        ctx.event(NewEvent::info(
            "instances",
            format!("{n} instance(s) healthy on {} machine(s)", site.eligible.len()),
        ))
        .await;
        Ok(outputs(&site, &source, &job.resource.outputs["previous"]))
    }

    /// deploy, rollback, restart: by a plan (see `rolling`), kept in the
    /// run's log and read back by a later attempt.
    async fn roll(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let cluster_r = job.dependency(cluster::KIND)?;
        let mut site = self.site(&job.resource, cluster_r, spec).await?;
        if site.eligible.is_empty() {
            return Err(Self::no_machine(&site, spec));
        }
        let wanted = Self::wanted(spec, &site, None);
        let plan = match Plan::recalled(ctx.recall("plan").await, job.run_id) {
            Some(p) => {
                let msg = format!("resuming the plan of this run: {} instance(s) to replace", p.indexes.len());
                ctx.event(NewEvent::info("resume", msg)).await;
                p
            }
            None => {
                self.prune(ctx, job, &mut site, &wanted).await?;
                let from = site.instances.first().and_then(|i| source(job, spec, Some(&i.build)).ok());
                let to = match (job.action.as_str(), &from) {
                    ("restart", Some(running)) => running.clone(),
                    ("restart", None) => source(job, spec, spec.build.as_deref())?,
                    _ => source(job, spec, job.params["build"].as_str())?,
                };
                let indexes: Vec<u32> = wanted.keys().copied().collect();
                let running = |ix: u32| site.instances.iter().find(|i| i.index == ix).map(|i| Some(i.build.clone()));
                let plan = Plan::new(job, spec, &indexes, running, to, from);
                // The run's log is where the plan is kept: this event.
                ctx.event(plan.announced(wanted.len())).await;
                plan
            }
        };
        let mut fleet = Fleet { services: self, job, spec, site: &mut site, wanted: &wanted, started: BTreeMap::new() };
        let previous = rolling::carry_out(ctx, job, &mut fleet, &plan).await?;
        site.instances.sort_by_key(|i| i.index);
        let n = site.instances.len();
        ctx.event(NewEvent::info("instances", format!("{n} instance(s) healthy on the new build"))).await;
        Ok(outputs(&site, &plan.to, &previous))
    }

    async fn stop_all(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec, reason: &str) -> Result<(), ProviderError> {
        let Some(site) = self.recorded_site(&job.resource, spec).await? else { return Ok(()) };
        for i in &site.stranded {
            self.stop(ctx, job, i, reason, false).await?;
        }
        for i in &site.instances {
            ctx.check_cancel()?;
            self.stop(ctx, job, i, reason, true).await?;
        }
        Ok(())
    }

    /// Compares the instances on the machines' tags with the record: as
    /// many as the last run left (none when stopped), each on a running
    /// machine, on the service's build unless a plan is under way.
    async fn refresh(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let r = &job.resource;
        // A refresh resolves no cluster: the machines are those of the
        // cluster the last run recorded (none yet: nothing to compare).
        let Some(site) = self.recorded_site(r, spec).await? else { return Ok(Report::default().told(ctx).await) };
        let mut report = Report::default();
        let running = r.state == "running";
        let expected = if running { r.outputs["count"].as_u64().unwrap_or(0) as usize } else { 0 };
        match site.instances.len() {
            n if n == expected => report.same(),
            n => report.differs(Difference::new("count", expected, n)),
        }
        for i in &site.stranded {
            report.differs(Difference::new(
                format!("instances[{}].machine", i.index),
                format!("{} running", i.machine),
                "not running",
            ));
        }
        let build = r.outputs["build"].as_str();
        for i in &site.instances {
            let at = format!("instances[{}]", i.index);
            match (build, i.plan) {
                (Some(b), None) if b != i.build => {
                    report.differs(Difference::new(format!("{at}.build"), b, i.build.clone()))
                }
                _ => report.same(),
            }
        }
        Ok(report.told(ctx).await)
    }
}

/// What new instances run: `build` (else the image's current one) with its
/// artifact, and the command (the spec's, else the image's).
fn source(job: &Job, spec: &Spec, build: Option<&str>) -> Result<Source, ProviderError> {
    let image_r = job.dependency(image::KIND)?;
    let wanted = build
        .or_else(|| image::current_build(&image_r.outputs))
        .ok_or_else(|| ProviderError::fatal("image_not_built", format!("image {} has no build", image_r.name)))?;
    let entry =
        image_r.outputs["builds"].as_array().into_iter().flatten().find(|b| b["id"] == wanted).ok_or_else(|| {
            ProviderError::fatal("no_such_build", format!("image {} keeps no build {wanted}", image_r.name))
        })?;
    let artifact = &entry["artifact"];
    let field = |k: &str| artifact[k].as_str().map(str::to_string);
    let (Some(bucket), Some(key), Some(sha256)) = (field("bucket"), field("key"), field("sha256")) else {
        return Err(ProviderError::fatal(
            "no_artifact",
            format!(
                "build {wanted} of image {} has no artifact to unpack (it was baked without an artifact bucket, \
                 DROVER_AWS_ARTIFACT_BUCKET); rebuild the image",
                image_r.name
            ),
        ));
    };
    let command = spec
        .command
        .clone()
        .or_else(|| entry["start_command"].as_str().map(str::to_string))
        .or_else(|| image_r.spec["start_command"].as_str().filter(|c| !c.is_empty()).map(str::to_string))
        .ok_or_else(|| {
            ProviderError::fatal(
                "no_command",
                format!("neither the service nor image {} says what to run (command, start_command)", image_r.name),
            )
        })?;
    Ok(Source { image: image_r.name.clone(), build: wanted.to_string(), bucket, key, sha256, command })
}

/// The instance's environment, in order: the non-secret settings, the
/// spec's `env`, then drover's own (which the others cannot override).
fn environment(
    job: &Job,
    spec: &Spec,
    cluster: &str,
    metadata: &str,
    source: &Source,
    i: &Instance,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = job.split_settings().0;
    env.extend(spec.env.clone());
    env.extend([
        ("PORT".to_string(), i.port.to_string()),
        ("DROVER_SERVICE".to_string(), job.resource.name.clone()),
        ("DROVER_INSTANCE".to_string(), i.index.to_string()),
        ("DROVER_MACHINE".to_string(), i.machine.clone()),
        ("DROVER_CLUSTER".to_string(), cluster.to_string()),
        ("DROVER_ROLE_METADATA".to_string(), metadata.to_string()),
        ("DROVER_BUILD".to_string(), source.build.clone()),
    ]);
    env.into_iter().collect()
}

/// The start script of one instance (see the module's docs). Idempotent.
fn start_script(job: &Job, spec: &Spec, cluster: &str, metadata: &str, source: &Source, i: &Instance) -> String {
    let name = &job.resource.name;
    let dir = format!("/var/lib/drover/services/{name}/{}", i.unit);
    let mut env = String::new();
    for (k, v) in environment(job, spec, cluster, metadata, source, i) {
        env.push_str(&format!("{k}={}\n", systemd_value(&v)));
    }
    let mut end = String::from("DROVER_ENV");
    while env.contains(&end) || source.command.contains(&end) {
        end.push('_');
    }
    let check = match &spec.health_check {
        HealthCheck::Http { path } => {
            format!("curl -fsS -o /dev/null --max-time 2 {}", quote(&format!("http://127.0.0.1:{}{path}", i.port)))
        }
        HealthCheck::Tcp => format!("timeout 2 bash -c {}", quote(&format!("</dev/tcp/127.0.0.1/{}", i.port))),
    };
    let unit = format!("drover-{name}@{}", i.unit);
    format!(
        r#"set -u
{AWS_CLI}unit={unit_q}
dir={dir_q}
if ! systemctl is-active --quiet "$unit"; then
  set -e
  mkdir -p "$dir/app"
  awscli s3 cp {url} "$dir/build.tar.gz" --only-show-errors
  echo {sum_line} | sha256sum -c --quiet -
  tar -xzf "$dir/build.tar.gz" -C "$dir/app"
  rm -f "$dir/build.tar.gz"
  umask 077
  cat > "$dir/env" <<'{end}'
{env}{end}
  cat > "$dir/run" <<'{end}'
{command}
{end}
  cat > /etc/systemd/system/drover-{name}@.service <<'{end}'
[Unit]
Description=drover service {name}, instance %i
Wants=network-online.target
After=network-online.target
[Service]
WorkingDirectory=/var/lib/drover/services/{name}/%i/app
EnvironmentFile=-/etc/drover/secrets.env
EnvironmentFile=/var/lib/drover/services/{name}/%i/env
ExecStart=/bin/sh /var/lib/drover/services/{name}/%i/run
KillMode=control-group
Restart=no
{end}
  systemctl daemon-reload
  systemctl start "$unit"
  set +e
fi
deadline=$(( $(date +%s) + {timeout} ))
until {check}; do
  if ! systemctl is-active --quiet "$unit"; then
    echo "instance {index} exited before it was healthy" >&2
    journalctl -u "$unit" -n 20 --no-pager >&2
    exit 3
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "instance {index} not healthy within {timeout}s ({check_q})" >&2
    journalctl -u "$unit" -n 20 --no-pager >&2
    exit 4
  fi
  sleep 1
done
echo "instance {index} healthy on port {port}"
"#,
        unit_q = quote(&unit),
        dir_q = quote(&dir),
        url = quote(&format!("s3://{}/{}", source.bucket, source.key)),
        sum_line = quote(&format!("{}  {dir}/build.tar.gz", source.sha256)),
        command = source.command,
        timeout = spec.start_timeout_secs,
        index = i.index,
        port = i.port,
        check_q = check.replace('\'', ""),
    )
}

/// Stops an instance's unit and removes its files. Idempotent.
fn stop_script(service: &str, unit: &str) -> String {
    let dir = format!("/var/lib/drover/services/{service}/{unit}");
    format!(
        "set -u\nsystemctl stop {} || true\nrm -rf {}\necho stopped\n",
        quote(&format!("drover-{service}@{unit}")),
        quote(&dir)
    )
}

/// An instance's registry entry: its machine's private address.
fn entry(r: &Resource, spec: &Spec, i: &Instance) -> NewEntry {
    NewEntry {
        service_id: r.id,
        service: r.name.clone(),
        instance: i.unit.clone(),
        index: i.index,
        machine: i.machine.clone(),
        address: i.address.clone().unwrap_or_default(),
        port: i.port,
        build: Some(i.build.clone()),
        scheme: Scheme::from(&spec.health_check),
        host_port: None,
    }
}

fn outputs(site: &Site, source: &Source, previous: &Value) -> Value {
    let instances: Vec<Value> = site
        .instances
        .iter()
        .map(|i| {
            let url = i.address.as_ref().map(|a| format!("http://{a}:{}", i.port));
            json!({ "index": i.index, "machine": i.machine, "machine_name": i.machine, "address": i.address,
                "port": i.port, "url": url, "unit": i.unit, "started_at": i.at, "build": i.build })
        })
        .collect();
    let mut out = json!({ "count": instances.len(), "cluster": site.cluster, "cluster_id": site.cluster_id,
        "image": source.image, "build": source.build,
        "artifact": {"bucket": source.bucket, "key": source.key, "sha256": source.sha256}, "instances": instances });
    if previous.is_object() {
        out["previous"] = previous.clone();
    }
    out
}

/// An aws service's instances as a rolling plan moves them.
struct Fleet<'a> {
    services: &'a AwsServices,
    job: &'a Job,
    spec: &'a Spec,
    site: &'a mut Site,
    wanted: &'a BTreeMap<u32, Option<InstanceInfo>>,
    /// The new instances whose start command is under way, by index.
    started: BTreeMap<u32, (Instance, String)>,
}

#[async_trait]
impl rolling::Fleet for Fleet<'_> {
    type Source = Source;

    fn has_new(&self, plan: Uuid, ix: u32) -> bool {
        self.site.instances.iter().any(|i| i.index == ix && i.plan == Some(plan))
    }

    fn has_old(&self, plan: Uuid, ix: u32) -> bool {
        self.site.instances.iter().any(|i| i.index == ix && i.plan != Some(plan))
    }

    async fn stop_old(&mut self, ctx: &dyn RunContext, plan: &Plan, ix: u32) -> Result<(), ProviderError> {
        let old: Vec<Instance> =
            self.site.instances.iter().filter(|i| i.index == ix && i.plan != Some(plan.id)).cloned().collect();
        for o in old {
            self.services.stop(ctx, self.job, &o, &plan.replaced(), true).await?;
            self.site.instances.retain(|i| i.unit != o.unit);
        }
        Ok(())
    }

    async fn start_new(&mut self, ctx: &dyn RunContext, plan: &Plan, ix: u32) -> Result<(), ProviderError> {
        let (job, spec) = (self.job, self.spec);
        if let Some(new) = self.site.instances.iter().find(|i| i.index == ix && i.plan == Some(plan.id)).cloned() {
            // Started by an attempt before a crash: its (idempotent) start
            // script checks its health again.
            let command = self.services.send_start(job, spec, self.site, &plan.to, &new).await?;
            let msg = format!("checking instance {ix}, started before: command {command}");
            ctx.event(NewEvent::info("resume", msg)).await;
            self.started.insert(ix, (new, command));
            return Ok(());
        }
        let old_machine = self.site.instances.iter().find(|i| i.index == ix).map(|i| i.machine.clone());
        let m = AwsServices::machine_for(self.site, self.wanted, ix, old_machine.as_deref())
            .ok_or_else(|| AwsServices::no_machine(self.site, spec))?
            .clone();
        let (inst, command) =
            self.services.start(ctx, job, spec, self.site, &plan.to, ix, &m, Some(plan.id), None).await?;
        self.site.instances.push(inst.clone());
        self.started.insert(ix, (inst, command));
        Ok(())
    }

    async fn wait_new(&mut self, ctx: &dyn RunContext, _plan: &Plan, ix: u32) -> Result<(), ProviderError> {
        let Some((new, command)) = self.started.remove(&ix) else { return Ok(()) };
        if let Err(why) = self.services.healthy(ctx, self.job, self.spec, &new, &command).await? {
            // The failed instance goes; whatever it was to replace stays.
            self.services.stop(ctx, self.job, &new, "it failed its health check", true).await?;
            self.site.instances.retain(|i| i.unit != new.unit);
            return Err(ProviderError::fatal("unhealthy", why));
        }
        Ok(())
    }

    /// The run's log keeps the plan: a new one is the data of the `plan`
    /// event the rules write as they make it (`Plan::announced`, or the
    /// put-back's), so only its end is written here.
    async fn save_plan(&mut self, ctx: &dyn RunContext, plan: Option<&Plan>) -> Result<(), ProviderError> {
        if plan.is_none() {
            ctx.event(NewEvent::info("plan", "plan carried out").with_data(json!({ "plan": null }))).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for AwsServices {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = Spec::from_value(&job.resource.spec)
            .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))?;
        match job.action.as_str() {
            "start" | "place" | "scale" | "repair" => {
                let count = spec.count_for(&job.action, &job.params, &job.resource.outputs);
                self.ensure(ctx, job, &spec, count).await
            }
            "deploy" | "rollback" | "restart" => self.roll(ctx, job, &spec).await,
            "refresh" => self.refresh(ctx, job, &spec).await,
            "stop" => {
                self.stop_all(ctx, job, &spec, "the service is stopping").await?;
                let o = &job.resource.outputs;
                Ok(json!({ "count": 0, "instances": [], "image": o["image"], "build": o["build"],
                    "previous": o["previous"], "cluster": o["cluster"], "cluster_id": o["cluster_id"] }))
            }
            "destroy" => {
                self.stop_all(ctx, job, &spec, "the service is being destroyed").await?;
                ctx.event(NewEvent::info("destroy", "all instances stopped")).await;
                Ok(json!({ "count": 0, "instances": [] }))
            }
            other => Err(ProviderError::fatal("unsupported_action", format!("aws services cannot {other}"))),
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

    /// Probes every instance the machines' tags name at its private
    /// address; a machine gone (an instance the last run recorded that no
    /// tag names any more) asks for `place`.
    async fn observe_presence(&self, r: &Resource) -> (Option<Value>, Option<Presence>) {
        let Ok(spec) = Spec::from_value(&r.spec) else { return (None, None) };
        let Some(cluster_id) = r.outputs["cluster_id"].as_str() else { return (None, None) };
        let Ok(machines) = self.stacks.instances(TAG_RESOURCE, cluster_id).await else { return (None, None) };
        let prefix = tag_prefix(r.id);
        let path = spec.health_check.http_path();
        // Every instance probed at once: an unreachable address costs its
        // two seconds once per round, not once per instance.
        let looks =
            machines.iter().flat_map(|m| Instance::tagged(&prefix, m).map(move |i| (m, i))).map(|(m, i)| async move {
                let failing = match (m.state.as_str(), &i.address) {
                    ("running", Some(a)) => check_at(a, i.port, path).await,
                    ("running", None) => Some("its machine has no private address".into()),
                    (state, _) => Some(format!("machine {} is {state}", m.id)),
                };
                (i, failing)
            });
        let mut presence = Presence::default();
        let mut problems = Vec::new();
        let mut instances = Vec::new();
        for (i, failing) in futures::future::join_all(looks).await {
            match &failing {
                Some(why) => {
                    problems.push(format!("instance {} on {}: {why}", i.index, i.machine));
                    presence.failing.push((i.unit.clone(), format!("instance {}: {why}", i.index)));
                }
                None => presence.healthy.push(entry(r, &spec, &i)),
            }
            instances.push(json!({ "index": i.index, "machine": i.machine, "port": i.port, "build": i.build,
                "healthy": failing.is_none() }));
        }
        let lost: Vec<String> = r.outputs["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|rec| !machines.iter().any(|m| rec["machine"] == m.id.as_str() && m.state == "running"))
            .map(|rec| {
                format!("machine {} of instance {} is gone", rec["machine"].as_str().unwrap_or("?"), rec["index"])
            })
            .collect();
        if r.state == "running" && !lost.is_empty() {
            presence.misplaced = Some(lost.join("; "));
        }
        if r.state != "running" {
            return (None, Some(presence));
        }
        problems.extend(lost);
        let summary = match problems.is_empty() {
            true => format!("{} instance(s) healthy", instances.len()),
            false => format!("{} problem(s): {}", problems.len(), problems.join("; ")),
        };
        (Some(json!({ "healthy": problems.is_empty(), "summary": summary, "instances": instances })), Some(presence))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> InstanceInfo {
        InstanceInfo {
            id: "i-0abc".into(),
            private_ip: Some("10.0.0.7".into()),
            state: "running".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_instance_reads_back_from_its_tag() {
        let i = Instance {
            unit: "3-deadbeef".into(),
            index: 3,
            machine: "i-0abc".into(),
            address: Some("10.0.0.7".into()),
            port: 8083,
            build: Uuid::nil().to_string(),
            plan: Some(Uuid::from_u128(7)),
            at: "2026-12-04T10:00:00Z".into(),
        };
        let back = Instance::parse("3-deadbeef", &i.tag_value(), &machine()).expect("parses");
        assert_eq!(back, i);
        assert!(i.tag_value().len() <= 256, "an EC2 tag value holds 256 characters");
        let none = Instance { plan: None, ..i.clone() };
        assert_eq!(Instance::parse("3-deadbeef", &none.tag_value(), &machine()).unwrap().plan, None);
        assert!(Instance::parse("x-1", &i.tag_value(), &machine()).is_none());
    }

    #[test]
    fn env_values_are_quoted_for_systemd() {
        assert_eq!(systemd_value(r#"a "b" \c"#), r#""a \"b\" \\c""#);
        assert_eq!(systemd_value("x\ny"), r#""x\ny""#);
    }
}
