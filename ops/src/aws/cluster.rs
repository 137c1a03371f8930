//! Clusters on AWS: one CloudFormation stack per cluster, rendered by
//! drover ([`super::template`]).
//!
//! # Guarantees
//! - `create` adopts a stack an earlier attempt made (same name), waits out
//!   one that is still in progress, and deletes one left in
//!   `ROLLBACK_COMPLETE` (or another dead end of a failed create) before it
//!   creates it again. A create never makes a second stack.
//! - `scale`, `add-instances`, `stop` (count 0) and `start` send `UpdateStack`
//!   with every parameter explicit; "no updates to perform" is success, so a
//!   repeated update is harmless. A cancel during an update calls
//!   `CancelUpdateStack` and waits for the rollback.
//! - `destroy` refuses while termination protection is on in the spec; a
//!   stack that is already gone is success.
//! - Stack events stream into the run's event log while drover waits, and a
//!   failure carries CloudFormation's `ResourceStatusReason`.
//!
//! # Assumptions
//! - Nobody else edits drover's stacks by hand.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use drover_domain::kinds::cluster::{Spec, MAX_COUNT};
use drover_domain::kinds::{cluster, image};
use drover_domain::model::{Level, NewEvent, Resource};
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde_json::{json, Value};
use tracing::warn;

use super::stacks::{InstanceInfo, StackApi, StackInfo, StackRequest};
use super::template::{self, Delivery, Leader, Rendered};
use super::{AwsError, Backoff, TAG_RESOURCE};
use crate::local::process::check_at;

pub struct AwsClusters {
    api: Arc<dyn StackApi>,
    poll: Backoff,
}

/// What a wait is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Update,
    Delete,
}

/// Statuses in which a stack is dead: a create that failed. Only deleting
/// it helps.
const DEAD: &[&str] = &["ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED"];

fn token(op: &str, job: &Job, extra: Option<i32>) -> String {
    match extra {
        Some(n) => format!("drover-{op}-{}-{n}", job.run_id),
        None => format!("drover-{op}-{}", job.run_id),
    }
}

fn spec_of(r: &Resource) -> Result<Spec, ProviderError> {
    Spec::from_value(&r.spec)
        .map_err(|e| ProviderError::fatal("invalid_spec", format!("stored spec is invalid: {e:?}")))
}

/// The spec the cluster last ran whole (its applied spec; the spec when
/// none is recorded): what a repair sends and a refresh compares with.
fn applied_spec_of(r: &Resource) -> Result<Spec, ProviderError> {
    Spec::from_value(r.applied_spec.as_ref().unwrap_or(&r.spec))
        .map_err(|e| ProviderError::fatal("invalid_spec", format!("the applied spec is invalid: {e:?}")))
}

impl AwsClusters {
    pub fn new(api: Arc<dyn StackApi>, poll: Backoff) -> AwsClusters {
        AwsClusters { api, poll }
    }

    /// The AMI of the cluster's image (its build output).
    fn ami(job: &Job, spec: &Spec) -> Result<String, ProviderError> {
        let image = job
            .dependencies
            .iter()
            .find(|d| d.kind == image::KIND)
            .ok_or_else(|| ProviderError::fatal("dependency_missing", "the cluster's image was not resolved"))?;
        if image.kind.provider_of(&image.spec) != super::NAME {
            return Err(ProviderError::fatal(
                "image_provider_mismatch",
                format!(
                    "image {} is built by provider {}; an aws cluster needs an aws image",
                    image.name,
                    image.kind.provider_of(&image.spec)
                ),
            ));
        }
        image.outputs.get("ami_id").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
            ProviderError::fatal("image_not_built", format!("image {} ({}) has no AMI yet", spec.image, image.state))
        })
    }

    /// What a worker group needs from its leader: the leader stack's outputs
    /// and its instances' private IPs.
    async fn leader(&self, job: &Job, spec: &Spec) -> Result<Option<Leader>, ProviderError> {
        let Some(name) = &spec.join else {
            return Ok(None);
        };
        let leader = job
            .dependencies
            .iter()
            .find(|d| d.kind == cluster::KIND && (&d.name == name || &d.id.to_string() == name))
            .ok_or_else(|| {
                ProviderError::fatal("dependency_missing", format!("leader cluster {name} was not resolved"))
            })?;
        if leader.kind.provider_of(&leader.spec) != super::NAME {
            return Err(ProviderError::fatal(
                "leader_provider_mismatch",
                format!("leader cluster {name} does not run on aws"),
            ));
        }
        let stack_name = template::stack_name(leader);
        let info = self
            .api
            .describe(&stack_name)
            .await?
            .filter(|s| !s.in_progress() && !DEAD.contains(&s.status.as_str()))
            .ok_or_else(|| {
                ProviderError::fatal(
                    "leader_not_ready",
                    format!("leader cluster {name} has no finished stack {stack_name}"),
                )
            })?;
        let asg = info.outputs.get("AutoScalingGroupName").cloned().ok_or_else(|| {
            ProviderError::fatal(
                "leader_not_ready",
                format!("leader stack {stack_name} has no AutoScalingGroupName output"),
            )
        })?;
        let mut endpoints: Vec<String> = self
            .api
            .instances("aws:autoscaling:groupName", &asg)
            .await?
            .into_iter()
            .filter(|i| matches!(i.state.as_str(), "pending" | "running"))
            .filter_map(|i| i.private_ip)
            .collect();
        endpoints.sort();
        Ok(Some(Leader {
            name: info.outputs.get("ClusterName").cloned().unwrap_or_else(|| leader.name.clone()),
            stack_name,
            auto_scaling_group: asg,
            endpoints,
        }))
    }

    /// Renders the stack the job would send for `count` instances.
    async fn render(&self, job: &Job, spec: &Spec, count: u32) -> Result<Rendered, ProviderError> {
        if count > MAX_COUNT {
            return Err(ProviderError::fatal(
                "too_many_instances",
                format!("{count} instances is more than the limit of {MAX_COUNT}"),
            ));
        }
        let ami = Self::ami(job, spec)?;
        let leader = self.leader(job, spec).await?;
        let (delivery, _) = delivery(job);
        Ok(template::render(&job.resource, spec, &ami, count, leader.as_ref(), &delivery))
    }

    /// Puts the run's secret settings where its instances read them
    /// (Parameter Store), and takes out those no longer set.
    async fn put_secrets(&self, ctx: &dyn RunContext, job: &Job) -> Result<(), ProviderError> {
        let (delivery, secrets) = delivery(job);
        let path = template::parameter_path(&job.resource);
        self.api.put_parameters(&path, &secrets).await?;
        if !delivery.secret_keys.is_empty() {
            let msg = format!(
                "secret settings {} put in SSM Parameter Store under {path} (SecureString)",
                delivery.secret_keys.join(", ")
            );
            ctx.event(NewEvent::info("settings", msg)).await;
        }
        Ok(())
    }

    fn request(r: &Rendered, token: String) -> StackRequest {
        StackRequest {
            name: r.stack_name.clone(),
            template: r.template_body(),
            parameters: r.parameters.clone(),
            tags: r.tags.clone(),
            token,
            termination_protection: r.termination_protection,
        }
    }

    /// Marks the stack's current events as seen, so that a wait streams only
    /// what happens from now on.
    async fn seen_now(&self, name: &str) -> HashSet<String> {
        match self.api.events(name).await {
            Ok(ev) => ev.into_iter().map(|e| e.id).collect(),
            Err(e) => {
                warn!(error = %e, "could not read stack events");
                HashSet::new()
            }
        }
    }

    /// Streams new stack events into the run's log; returns the failure
    /// reasons among them, oldest first.
    async fn stream_events(
        &self,
        ctx: &dyn RunContext,
        name: &str,
        seen: &mut HashSet<String>,
        reasons: &mut Vec<String>,
    ) {
        let events = match self.api.events(name).await {
            Ok(ev) => ev,
            Err(e) => {
                warn!(error = %e, "could not read stack events");
                return;
            }
        };
        for e in events.into_iter().rev() {
            if !seen.insert(e.id.clone()) {
                continue;
            }
            let failed = e.status.ends_with("_FAILED");
            if failed {
                if let Some(r) = &e.reason {
                    if !r.contains("cancelled") {
                        reasons.push(format!("{}: {r}", e.logical_id));
                    }
                }
            }
            let msg = format!(
                "{} {} {}{}",
                e.logical_id,
                e.resource_type,
                e.status,
                e.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            );
            let level = if failed { Level::Warn } else { Level::Info };
            ctx.event(NewEvent::info("stack-event", msg).with_level(level).with_data(json!({
                "event_id": e.id, "at": e.at, "logical_id": e.logical_id,
                "resource_type": e.resource_type, "status": e.status, "reason": e.reason,
            })))
            .await;
        }
    }

    /// Waits, with backoff, until the stack is no longer in progress, and
    /// judges the outcome for `op`. `Ok(None)` means the stack is gone.
    /// A cancel during an update calls `CancelUpdateStack` and waits for
    /// the rollback; during a create or delete, drover stops waiting (the
    /// stack operation cannot be cancelled) and `retry` or `destroy` picks
    /// it up.
    async fn wait(
        &self,
        ctx: &dyn RunContext,
        name: &str,
        op: Op,
        mut seen: HashSet<String>,
    ) -> Result<Option<StackInfo>, ProviderError> {
        let mut reasons = Vec::new();
        let mut cancelled = false;
        let mut delays = self.poll.delays();
        loop {
            self.stream_events(ctx, name, &mut seen, &mut reasons).await;
            let info = self.api.describe(name).await?;
            let Some(info) = info else {
                return match op {
                    Op::Delete => Ok(None),
                    _ => Err(ProviderError::fatal(
                        "stack_vanished",
                        format!("stack {name} disappeared while drover waited for it"),
                    )),
                };
            };
            if info.in_progress() {
                if ctx.cancel_requested() && !cancelled {
                    if info.status == "UPDATE_IN_PROGRESS" {
                        ctx.event(NewEvent::info("cancel", format!("cancel requested: CancelUpdateStack {name}")))
                            .await;
                        self.api.cancel_update(name).await?;
                        cancelled = true;
                    } else {
                        ctx.event(
                            NewEvent::info(
                                "cancel",
                                format!(
                                    "cancel requested while {name} is {}; CloudFormation cannot cancel that, drover stops waiting (retry or destroy takes it from here)",
                                    info.status
                                ),
                            )
                            .with_level(Level::Warn),
                        )
                        .await;
                        return Err(ProviderError::Cancelled);
                    }
                }
                let d = delays.next().expect("endless");
                tokio::time::sleep(d).await;
                continue;
            }
            // One more look at the events: the last ones explain the end.
            self.stream_events(ctx, name, &mut seen, &mut reasons).await;
            if cancelled {
                return Err(ProviderError::Cancelled);
            }
            let reason =
                || reasons.first().cloned().or_else(|| info.reason.clone()).unwrap_or_else(|| "no reason given".into());
            let ok = match op {
                Op::Create => info.status == "CREATE_COMPLETE",
                Op::Update => info.status == "UPDATE_COMPLETE",
                Op::Delete => false,
            };
            if ok {
                return Ok(Some(info));
            }
            let code = match op {
                Op::Create => "stack_create_failed",
                Op::Update => "stack_update_failed",
                Op::Delete => "stack_delete_failed",
            };
            return Err(ProviderError::fatal(code, format!("stack {name} is {}: {}", info.status, reason()))
                .with_detail(json!({"stack": name, "status": info.status, "reasons": reasons})));
        }
    }

    /// Deletes a stack and waits until it is gone.
    async fn delete_and_wait(&self, ctx: &dyn RunContext, name: &str, token: String) -> Result<(), ProviderError> {
        let seen = self.seen_now(name).await;
        self.api.delete(name, &token).await?;
        self.wait(ctx, name, Op::Delete, seen).await.map(|_| ())
    }

    /// `create`: make the stack, or adopt the one an earlier attempt made.
    async fn create(&self, ctx: &dyn RunContext, job: &Job, r: &Rendered) -> Result<StackInfo, ProviderError> {
        let name = &r.stack_name;
        for round in 0..4 {
            ctx.check_cancel()?;
            match self.api.describe(name).await? {
                None => {
                    let create_token = token("create", job, (round > 0).then_some(round));
                    ctx.event(
                        NewEvent::info(
                            "create-stack",
                            format!("CreateStack {name} ({} instances)", r.parameters["Count"]),
                        )
                        .with_data(json!({"parameters": r.parameters, "tags": r.tags, "token": create_token})),
                    )
                    .await;
                    match self.api.create(&Self::request(r, create_token)).await {
                        Ok(id) => {
                            ctx.event(NewEvent::info("create-stack", format!("stack {id} accepted; waiting"))).await;
                        }
                        Err(e) if e.is("AlreadyExistsException") => {
                            // Made by an earlier attempt after all: adopt it.
                            continue;
                        }
                        Err(e) => {
                            if !e.retryable {
                                // A refused create leaves nothing on AWS; some
                                // implementations leave a half-made stack, which
                                // would block the retry. Removing it is harmless.
                                if let Err(d) = self.api.delete(name, &token("cleanup", job, None)).await {
                                    warn!(error = %d, "could not clean up after a refused create");
                                }
                            }
                            return Err(e.into());
                        }
                    }
                    return self
                        .wait(ctx, name, Op::Create, HashSet::new())
                        .await?
                        .ok_or_else(|| ProviderError::fatal("stack_vanished", format!("stack {name} is gone")));
                }
                Some(s) if DEAD.contains(&s.status.as_str()) => {
                    ctx.event(
                        NewEvent::info(
                            "delete-dead-stack",
                            format!(
                                "stack {name} is {} from an earlier attempt ({}); deleting it before creating it again",
                                s.status,
                                s.reason.as_deref().unwrap_or("no reason given")
                            ),
                        )
                        .with_level(Level::Warn),
                    )
                    .await;
                    self.delete_and_wait(ctx, name, token("delete", job, Some(round))).await?;
                }
                Some(s) if s.status == "DELETE_IN_PROGRESS" => {
                    ctx.event(NewEvent::info(
                        "wait",
                        format!("stack {name} is being deleted; waiting before creating it"),
                    ))
                    .await;
                    let seen = self.seen_now(name).await;
                    self.wait(ctx, name, Op::Delete, seen).await?;
                }
                Some(s) if s.in_progress() => {
                    ctx.event(NewEvent::info(
                        "adopt",
                        format!("stack {name} is {} (an earlier attempt's); waiting for it", s.status),
                    ))
                    .await;
                    let op = if s.status.starts_with("CREATE") { Op::Create } else { Op::Update };
                    let seen = self.seen_now(name).await;
                    if op == Op::Update {
                        self.wait(ctx, name, op, seen).await?;
                        continue;
                    }
                    return self
                        .wait(ctx, name, op, seen)
                        .await?
                        .ok_or_else(|| ProviderError::fatal("stack_vanished", format!("stack {name} is gone")));
                }
                Some(s) => {
                    ctx.event(NewEvent::info("adopt", format!("stack {name} exists ({}); adopting it", s.status)))
                        .await;
                    if s.parameters == r.parameters {
                        return Ok(s);
                    }
                    return self.update(ctx, job, r).await;
                }
            }
        }
        Err(ProviderError::retryable("stack_unsettled", format!("stack {name} kept changing under drover; try again")))
    }

    /// `scale` and friends: `UpdateStack` to the rendered parameters.
    async fn update(&self, ctx: &dyn RunContext, job: &Job, r: &Rendered) -> Result<StackInfo, ProviderError> {
        let name = &r.stack_name;
        let mut info = self.api.describe(name).await?.ok_or_else(|| {
            ProviderError::fatal(
                "stack_missing",
                format!("stack {name} does not exist; destroy the cluster and create it again"),
            )
        })?;
        if info.in_progress() {
            ctx.event(NewEvent::info("wait", format!("stack {name} is {}; waiting for it first", info.status))).await;
            let seen = self.seen_now(name).await;
            let op = if info.status.starts_with("DELETE") { Op::Delete } else { Op::Update };
            // Whatever it ends in, look again below.
            let _ = self.wait(ctx, name, op, seen).await;
            info = self
                .api
                .describe(name)
                .await?
                .ok_or_else(|| ProviderError::fatal("stack_missing", format!("stack {name} is gone")))?;
        }
        if DEAD.contains(&info.status.as_str()) {
            return Err(ProviderError::fatal(
                "stack_dead",
                format!("stack {name} is {}; destroy the cluster and create it again", info.status),
            ));
        }
        if info.termination_protection != r.termination_protection {
            self.api.set_termination_protection(name, r.termination_protection).await?;
        }
        ctx.check_cancel()?;
        let seen = self.seen_now(name).await;
        let update_token = token("update", job, None);
        ctx.event(
            NewEvent::info("update-stack", format!("UpdateStack {name}: Count={}", r.parameters["Count"]))
                .with_data(json!({"parameters": r.parameters, "token": update_token})),
        )
        .await;
        if !self.api.update(&Self::request(r, update_token)).await? {
            ctx.event(NewEvent::info("update-stack", "nothing to change: the stack already matches")).await;
            return Ok(info);
        }
        self.wait(ctx, name, Op::Update, seen)
            .await?
            .ok_or_else(|| ProviderError::fatal("stack_vanished", format!("stack {name} is gone")))
    }

    async fn destroy(&self, ctx: &dyn RunContext, job: &Job, spec: &Spec) -> Result<Value, ProviderError> {
        let name = template::stack_name(&job.resource);
        if spec.termination_protection {
            return Err(ProviderError::fatal(
                "termination_protected",
                format!(
                    "cluster {} has termination protection on: PATCH its spec with \"termination_protection\": false, then destroy",
                    job.resource.name
                ),
            ));
        }
        let Some(info) = self.api.describe(&name).await? else {
            ctx.event(NewEvent::info("destroy", format!("stack {name} does not exist; nothing to delete"))).await;
            return Ok(json!({"stack_name": name, "deleted": true}));
        };
        if info.termination_protection {
            ctx.event(NewEvent::info(
                "destroy",
                format!("turning off termination protection of {name}, as the spec now says"),
            ))
            .await;
            self.api.set_termination_protection(&name, false).await?;
        }
        ctx.event(NewEvent::info("delete-stack", format!("DeleteStack {name} ({})", info.status))).await;
        self.delete_and_wait(ctx, &name, token("delete", job, None)).await?;
        self.api.put_parameters(&template::parameter_path(&job.resource), &BTreeMap::new()).await?;
        Ok(json!({"stack_name": name, "stack_id": info.id, "deleted": true}))
    }

    /// Waits until the stack's auto-scaling group has `count` instances
    /// `InService` and `Healthy`: a stack is complete once the group exists,
    /// not once its instances boot. Bounded by the cluster's
    /// `start_timeout_secs` (the group's grace period) and the time an
    /// instance takes to launch.
    async fn wait_in_service(
        &self,
        ctx: &dyn RunContext,
        spec: &Spec,
        info: &StackInfo,
        count: u32,
    ) -> Result<(), ProviderError> {
        let Some(group) = info.outputs.get("AutoScalingGroupName").filter(|_| count > 0) else {
            return Ok(());
        };
        let limit = std::time::Duration::from_secs(spec.start_timeout_secs) + LAUNCH_ALLOWANCE;
        let started = tokio::time::Instant::now();
        let mut delays = self.poll.delays();
        let mut last = String::new();
        loop {
            ctx.check_cancel()?;
            let Some(health) = self.api.group_health(group).await? else {
                return Ok(()); // nothing to ask (the scripted fake)
            };
            let ready = health.in_service();
            let summary = format!("auto-scaling group {group}: {ready} of {count} instance(s) InService and Healthy");
            if summary != last {
                ctx.event(NewEvent::info("instances", summary.clone()).with_data(json!({
                    "instances": health.instances.iter().map(|(id, life, h)| json!({
                        "id": id, "lifecycle_state": life, "health_status": h })).collect::<Vec<_>>(),
                })))
                .await;
                last = summary;
            }
            if ready >= count as usize {
                return Ok(());
            }
            if started.elapsed() > limit {
                let not: Vec<String> = health
                    .instances
                    .iter()
                    .filter(|(_, life, h)| life != "InService" || h != "Healthy")
                    .map(|(id, life, h)| format!("{id} ({life}, {h})"))
                    .collect();
                return Err(ProviderError::fatal(
                    "instances_not_healthy",
                    format!(
                        "{ready} of {count} instance(s) of auto-scaling group {group} InService and Healthy after {}s{}",
                        limit.as_secs(),
                        match not.is_empty() {
                            true => String::new(),
                            false => format!(": {}", not.join(", ")),
                        }
                    ),
                ));
            }
            tokio::time::sleep(delays.next().unwrap_or(self.poll.max)).await;
        }
    }

    /// With a `port` in the spec, waits until `count` running instances
    /// answer the cluster's health check at their private addresses (drover
    /// runs in the VPC, as a load balancer's checks would): what an
    /// auto-scaling group without a load balancer cannot check itself.
    /// Bounded by `start_timeout_secs` from when the group reported them in
    /// service; fails `instances_not_healthy` naming each instance that
    /// does not answer and why.
    async fn wait_answering(
        &self,
        ctx: &dyn RunContext,
        r: &Resource,
        spec: &Spec,
        count: u32,
    ) -> Result<(), ProviderError> {
        let Some(check) = check_of(spec).filter(|_| count > 0) else {
            return Ok(());
        };
        let limit = std::time::Duration::from_secs(spec.start_timeout_secs);
        let started = tokio::time::Instant::now();
        let mut delays = self.poll.delays();
        let mut last = String::new();
        loop {
            ctx.check_cancel()?;
            let instances = self.instances(r).await?;
            let answers = ask(&instances, check).await;
            let healthy = answers.iter().filter(|a| a.failing.is_none()).count();
            let summary = format!("{healthy} of {count} instance(s) answer their health check ({})", check_said(check));
            if summary != last {
                ctx.event(NewEvent::info("health", summary.clone()).with_data(json!({
                    "instances": answers.iter().map(|a| json!({
                        "id": a.instance.id, "address": a.address, "failing": a.failing })).collect::<Vec<_>>(),
                })))
                .await;
                last = summary;
            }
            if healthy >= count as usize {
                return Ok(());
            }
            if started.elapsed() > limit {
                let failing: Vec<String> = answers.iter().filter(|a| a.failing.is_some()).map(Answer::said).collect();
                return Err(ProviderError::fatal(
                    "instances_not_healthy",
                    format!(
                        "{healthy} of {count} instance(s) of cluster {} answer its health check ({}) after {}s{}",
                        r.name,
                        check_said(check),
                        limit.as_secs(),
                        match failing.is_empty() {
                            true => String::new(),
                            false => format!(": {}", failing.join("; ")),
                        }
                    ),
                ));
            }
            tokio::time::sleep(delays.next().unwrap_or(self.poll.max)).await;
        }
    }

    /// A repair's first step with a `port`: tells the group which of its
    /// instances fail the cluster's health check (past their grace), so
    /// that it replaces them; the repair then waits for the replacements.
    async fn mark_failing(&self, ctx: &dyn RunContext, r: &Resource, spec: &Spec) -> Result<(), ProviderError> {
        let Some(check) = check_of(spec) else {
            return Ok(());
        };
        let instances = self.instances(r).await?;
        for a in ask(&instances, check).await {
            if a.failing.is_none() || !a.past_grace(spec) {
                continue;
            }
            self.api.set_unhealthy(&a.instance.id).await?;
            let msg = format!("{}: marked Unhealthy, for its auto-scaling group to replace", a.said());
            ctx.event(NewEvent::info("repair", msg).with_level(Level::Warn).with_data(json!({
                "instance": a.instance.id, "address": a.address, "failing": a.failing })))
                .await;
        }
        Ok(())
    }

    /// `repair` and `adopt`: sends the stack as the record says it runs —
    /// the applied spec (a change not yet applied stays pending), the AMI
    /// the last run started, and the count it left (a repair) or the count
    /// the refresh found (an adopt) — then sets the group's desired
    /// capacity to that count if it was changed by hand (the stack's
    /// parameters may already say it, so CloudFormation would not), and
    /// waits for the instances in service.
    async fn restore(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let r = &job.resource;
        // CloudFormation updates what the template changes: a resource
        // deleted behind its back stays deleted through an update that
        // sends the same template. Say so rather than pretend.
        let deleted: Vec<&str> = r
            .drift
            .as_ref()
            .map_or(&[][..], |d| d["differences"].as_array().map_or(&[][..], Vec::as_slice))
            .iter()
            .filter(|d| d["actual"] == "DELETED")
            .filter_map(|d| d["path"].as_str()?.strip_prefix("stack.resources."))
            .collect();
        if job.action == "repair" && !deleted.is_empty() {
            return Err(ProviderError::fatal(
                "resource_deleted",
                format!(
                    "stack resource(s) {} were deleted outside CloudFormation, which does not recreate them on an \
                     update of the same template: destroy the cluster and create it again (or import them into \
                     the stack by hand)",
                    deleted.join(", ")
                ),
            ));
        }
        let spec = applied_spec_of(r)?;
        let count = match job.action.as_str() {
            "adopt" => spec.target_count(&job.action, &job.params),
            _ => r.outputs["count"].as_u64().map(|c| c as u32),
        }
        .unwrap_or(spec.count);
        let ami = match r.outputs["ami_id"].as_str() {
            Some(ami) => ami.to_string(),
            None => Self::ami(job, &spec)?,
        };
        let leader = self.leader(job, &spec).await?;
        let (delivery, _) = delivery(job);
        let rendered = template::render(r, &spec, &ami, count, leader.as_ref(), &delivery);
        if job.action == "repair" {
            self.mark_failing(ctx, r, &spec).await?;
        }
        self.put_secrets(ctx, job).await?;
        let info = self.update(ctx, job, &rendered).await?;
        if let Some(group) = info.outputs.get("AutoScalingGroupName") {
            if let Some(health) = self.api.group_health(group).await? {
                if health.desired != count {
                    self.api.set_desired_capacity(group, count).await?;
                    let msg = format!("auto-scaling group {group}: desired capacity {} set to {count}", health.desired);
                    ctx.event(NewEvent::info(job.action.as_str(), msg)).await;
                }
            }
        }
        self.settled(ctx, r, &spec, &rendered, &info, count).await
    }

    /// Compares the stack and its group with the record: the stack there
    /// and settled, its `Count` and `ImageId` as the last run left them,
    /// the group's desired capacity and instances in service at that count,
    /// and CloudFormation's own drift detection of the stack's resources
    /// (where the endpoint has it). Changes nothing.
    async fn refresh(&self, ctx: &dyn RunContext, r: &Resource) -> Value {
        use drover_domain::drift::{Difference, Report};
        let mut report = Report::default();
        let Some(name) = r.outputs["stack_name"].as_str() else {
            report.cannot_check("stack", "no stack on record");
            return report.told(ctx).await;
        };
        let info = match self.api.describe(name).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                report.differs(Difference::new("stack", name, "missing"));
                return report.told(ctx).await;
            }
            Err(e) => {
                report.cannot_check("stack", e.to_string());
                return report.told(ctx).await;
            }
        };
        let settled = info.status.ends_with("_COMPLETE") && !info.status.contains("ROLLBACK");
        match settled {
            true => report.same(),
            false => report.differs(Difference::new(
                "stack.status",
                r.outputs["stack_status"].as_str().unwrap_or("CREATE_COMPLETE"),
                info.status.clone(),
            )),
        }
        let count = r.outputs["count"].as_u64().unwrap_or(0);
        for (param, recorded) in
            [("Count", Some(count.to_string())), ("ImageId", r.outputs["ami_id"].as_str().map(str::to_string))]
        {
            let Some(recorded) = recorded else { continue };
            match info.parameters.get(param) {
                Some(actual) if *actual == recorded => report.same(),
                actual => {
                    let d = Difference::new(
                        format!("stack.parameters.{param}"),
                        recorded,
                        actual.cloned().unwrap_or_else(|| "absent".into()),
                    );
                    // A count set on the stack by hand is a count the spec can say.
                    let n = actual.filter(|_| param == "Count").and_then(|a| a.parse::<u64>().ok());
                    report.differs(match n {
                        Some(n) => d.adoptable(json!({ "count": n })),
                        None => d,
                    });
                }
            }
        }
        match info.outputs.get("AutoScalingGroupName") {
            None => report.cannot_check("group", "the stack names no auto-scaling group"),
            Some(group) => match self.api.group_health(group).await {
                Ok(Some(h)) => {
                    let adopt = json!({ "count": h.desired });
                    match u64::from(h.desired) == count {
                        true => report.same(),
                        false => report.differs(
                            Difference::new("group.desired_capacity", count, h.desired).adoptable(adopt.clone()),
                        ),
                    }
                    // Instances at the desired capacity can be adopted with
                    // it; a group still on its way there cannot yet.
                    let n = h.instances.len();
                    match n as u64 == count {
                        true => report.same(),
                        false if n == h.desired as usize => {
                            report.differs(Difference::new("group.instances", count, n).adoptable(adopt))
                        }
                        false => report.differs(Difference::new("group.instances", count, n)),
                    }
                    // Every instance launched from the version the group launches.
                    match &h.launch_template_version {
                        None => report.cannot_check("group.launch_template", "the group names no template version"),
                        Some(want) => {
                            for (id, version) in &h.instance_templates {
                                match version {
                                    Some(v) if v == want => report.same(),
                                    Some(v) => report.differs(Difference::new(
                                        format!("group.instances[{id}].launch_template_version"),
                                        want.clone(),
                                        v.clone(),
                                    )),
                                    None => report.cannot_check(
                                        format!("group.instances[{id}].launch_template_version"),
                                        "the group does not say which version launched it",
                                    ),
                                }
                            }
                        }
                    }
                }
                Ok(None) => report.differs(Difference::new("group", group.clone(), "missing")),
                Err(e) => report.cannot_check("group", e.to_string()),
            },
        }
        // Every instance carries the tags the stack gives it.
        match (applied_spec_of(r), self.instances(r).await) {
            (Ok(spec), Ok(instances)) => {
                let want = template::stack_tags(r, &spec);
                for i in instances.iter().filter(|i| i.state == "running" || i.state == "pending") {
                    for (k, v) in &want {
                        match i.tags.get(k) {
                            Some(actual) if actual == v => report.same(),
                            actual => report.differs(Difference::new(
                                format!("instances[{}].tags.{k}", i.id),
                                v.clone(),
                                actual.cloned().map(Value::from).unwrap_or_else(|| "absent".into()),
                            )),
                        }
                    }
                }
            }
            (Err(e), _) => report.cannot_check("instances.tags", e.to_string()),
            (_, Err(e)) => report.cannot_check("instances.tags", e.to_string()),
        }
        match self.api.detect_drift(name).await {
            Ok(drifts) if drifts.is_empty() => report.same(),
            Ok(drifts) => {
                for d in drifts {
                    if d.properties.is_empty() {
                        report.differs(Difference::new(
                            format!("stack.resources.{}", d.logical_id),
                            "as deployed",
                            d.status,
                        ));
                    }
                    for (path, expected, actual) in d.properties {
                        report.differs(Difference::new(
                            format!("stack.resources.{}{path}", d.logical_id).replace("//", "/"),
                            expected,
                            actual,
                        ));
                    }
                }
            }
            Err(e) => report.cannot_check("stack.drift", format!("CloudFormation's drift detection did not run: {e}")),
        }
        report.told(ctx).await
    }

    async fn instances(&self, r: &Resource) -> Result<Vec<InstanceInfo>, AwsError> {
        self.api.instances(TAG_RESOURCE, &r.id.to_string()).await
    }

    /// How a run that sent the stack ends: it waits for `count` instances
    /// in service and answering the cluster's health check, then gives the
    /// run's outputs.
    async fn settled(
        &self,
        ctx: &dyn RunContext,
        r: &Resource,
        spec: &Spec,
        rendered: &Rendered,
        info: &StackInfo,
        count: u32,
    ) -> Result<Value, ProviderError> {
        self.wait_in_service(ctx, spec, info, count).await?;
        self.wait_answering(ctx, r, spec, count).await?;
        let instances = self.instances(r).await.unwrap_or_else(|e| {
            warn!(error = %e, "could not list instances");
            Vec::new()
        });
        Ok(Self::outputs(rendered, info, &instances))
    }

    fn outputs(r: &Rendered, info: &StackInfo, instances: &[InstanceInfo]) -> Value {
        json!({
            "stack_name": r.stack_name,
            "stack_id": info.id,
            "stack_status": info.status,
            "count": r.parameters["Count"].parse::<u32>().unwrap_or(0),
            "stack_outputs": info.outputs,
            // The build new instances start from (one AMI per image build).
            "ami_id": r.parameters.get("ImageId"),
            "instances": instances,
        })
    }
}

#[async_trait]
impl Provider for AwsClusters {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let spec = spec_of(&job.resource)?;
        if job.action == "destroy" {
            return self.destroy(ctx, job, &spec).await;
        }
        if job.action == "refresh" {
            return Ok(self.refresh(ctx, &job.resource).await);
        }
        if job.action == "repair" || job.action == "adopt" {
            return self.restore(ctx, job).await;
        }
        let Some(count) = spec.target_count(&job.action, &job.params) else {
            return Err(ProviderError::fatal("unsupported_action", format!("aws clusters cannot {}", job.action)));
        };
        let rendered = self.render(job, &spec, count).await?;
        self.put_secrets(ctx, job).await?;
        let info = if job.action == "create" {
            self.create(ctx, job, &rendered).await?
        } else {
            self.update(ctx, job, &rendered).await?
        };
        self.settled(ctx, &job.resource, &spec, &rendered, &info, count).await
    }

    fn observes(&self) -> bool {
        true
    }

    fn refreshes(&self) -> bool {
        true
    }

    /// The instances EC2 shows for an `up` cluster, found by its tags.
    async fn observe(&self, r: &Resource) -> Option<Value> {
        if r.state != "up" {
            return None;
        }
        let want = r.spec.get("count").and_then(Value::as_u64).unwrap_or(0) as usize;
        let instances = match self.instances(r).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, cluster = %r.name, "could not look at the cluster's instances");
                return None;
            }
        };
        let running = instances.iter().filter(|i| i.state == "running").count();
        // The check the cluster last ran with (a changed one is pending).
        let spec = applied_spec_of(r).ok();
        let Some((spec, check)) = spec.as_ref().and_then(|s| Some((s, check_of(s)?))) else {
            return Some(json!({
                "healthy": running == want,
                "summary": format!("{running} of {want} instances running"),
                "instances": instances,
            }));
        };
        // With a port: each running instance's answer to the health check.
        let answers = ask(&instances, check).await;
        let answering = answers.iter().filter(|a| a.failing.is_none()).count();
        let mut listed = serde_json::to_value(&instances).unwrap_or_default();
        for (i, v) in instances.iter().zip(listed.as_array_mut().into_iter().flatten()) {
            if let Some(a) = answers.iter().find(|a| a.instance.id == i.id) {
                v["address"] = a.address.clone().into();
                v["healthy"] = a.failing.is_none().into();
                v["reason"] = a.failing.clone().into();
            }
        }
        let mut seen = json!({
            "healthy": running == want && answering == running,
            "summary": format!("{running} of {want} instances running, {answering} answering {}", check_said(check)),
            "instances": listed,
        });
        // What a repair would have the group replace: those failing past their grace.
        let failing: Vec<String> =
            answers.iter().filter(|a| a.failing.is_some() && a.past_grace(spec)).map(Answer::said).collect();
        if !failing.is_empty() {
            seen["needs_repair"] = json!(format!("failing the health check: {}", failing.join("; ")));
        }
        Some(seen)
    }

    async fn preview(&self, job: &Job) -> Option<Result<Value, ProviderError>> {
        let result = async {
            let spec = spec_of(&job.resource)?;
            let count = spec.target_count(&job.action, &job.params).ok_or_else(|| {
                ProviderError::fatal("nothing_to_render", format!("{} sends no template", job.action))
            })?;
            let r = self.render(job, &spec, count).await?;
            let mut v = r.to_json();
            v["action"] = job.action.clone().into();
            v["operation"] = if job.action == "create" { "CreateStack" } else { "UpdateStack" }.into();
            Ok(v)
        }
        .await;
        Some(result)
    }
}

/// Beyond `start_timeout_secs`, how long an instance may take to launch and
/// boot before a run stops waiting for its group to report it in service.
const LAUNCH_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(600);

/// The check drover asks of an aws cluster's instances: its `port`, and
/// the path an HTTP check gets (`None`: a TCP connection). `None` without a
/// port: the group's EC2 status checks are then the only check.
fn check_of(spec: &Spec) -> Option<(u16, Option<&str>)> {
    spec.port.map(|port| (port, spec.health_check.http_path()))
}

/// The check in words, as the run log and errors say it.
fn check_said((port, path): (u16, Option<&str>)) -> String {
    match path {
        Some(path) => format!("GET {path} on port {port}"),
        None => format!("TCP on port {port}"),
    }
}

/// An instance as drover's health check found it.
struct Answer<'a> {
    instance: &'a InstanceInfo,
    address: String,
    /// Why it is not healthy; `None`: it answered.
    failing: Option<String>,
}

impl Answer<'_> {
    /// Whether it has been up longer than the grace the cluster gives a new
    /// instance (`start_timeout_secs`, the group's grace period), so that
    /// failing its check means it is unhealthy, not still starting.
    fn past_grace(&self, spec: &Spec) -> bool {
        let grace = std::time::Duration::from_secs(spec.start_timeout_secs);
        self.instance.launched_at.is_none_or(|t| t.elapsed().is_ok_and(|age| age >= grace))
    }

    fn said(&self) -> String {
        format!("{} at {}: {}", self.instance.id, self.address, self.failing.as_deref().unwrap_or("healthy"))
    }
}

/// Asks every running instance's private address at once (an address
/// that does not answer costs its timeout once, not once per instance).
async fn ask<'a>(instances: &'a [InstanceInfo], (port, path): (u16, Option<&str>)) -> Vec<Answer<'a>> {
    let looks = instances.iter().filter(|i| i.state == "running").map(|i| async move {
        let (address, failing) = match &i.private_ip {
            Some(ip) => (format!("{ip}:{port}"), check_at(ip, port, path).await),
            None => ("(no private address)".to_string(), Some("EC2 shows no private address".to_string())),
        };
        Answer { instance: i, address, failing }
    });
    futures::future::join_all(looks).await
}

/// What a run's settings give its instances: the non-secret ones for the
/// cloud-config, and the secret ones (key → value) for Parameter Store.
fn delivery(job: &Job) -> (Delivery, BTreeMap<String, String>) {
    let (env, secrets) = job.split_settings();
    (Delivery { env, secret_keys: secrets.keys().cloned().collect() }, secrets)
}

/// The provider against a scripted fake of CloudFormation, for what moto
/// cannot show: moto finishes every operation at once, never rolls back,
/// does not implement `CancelUpdateStack` or `UpdateTerminationProtection`,
/// and omits per-resource events. Each test names the behaviour of real AWS
/// it stands for.
#[cfg(test)]
mod scripted {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::aws::stacks::StackEvent;
    use crate::aws::testing::{job, resource, RecordingCtx};

    /// One stack whose status moves one scripted step per `DescribeStacks`.
    #[derive(Default)]
    struct Fake {
        st: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        stack: Option<StackInfo>,
        /// Statuses the next describes show, one each; `GONE` deletes.
        script: VecDeque<(&'static str, Option<&'static str>)>,
        create_script: Vec<(&'static str, Option<&'static str>)>,
        update_script: Vec<(&'static str, Option<&'static str>)>,
        events: Vec<StackEvent>,
        calls: Vec<String>,
        describes: usize,
        /// `CreateStack` answers `AlreadyExistsException` (a duplicate
        /// token or a create that raced another attempt).
        create_conflicts: bool,
        /// What the stack's auto-scaling group reports, when set (the
        /// stack then has the group as its output).
        group: Option<crate::aws::stacks::GroupHealth>,
        /// The cluster's instances EC2 shows.
        machines: Vec<InstanceInfo>,
        /// What a group does with an instance marked unhealthy: the
        /// instance it launches in its place.
        replacements: VecDeque<InstanceInfo>,
    }

    const GONE: &str = "GONE";

    impl Fake {
        fn new(
            create: &[(&'static str, Option<&'static str>)],
            update: &[(&'static str, Option<&'static str>)],
        ) -> Arc<Fake> {
            let f = Fake::default();
            {
                let mut s = f.st.lock().unwrap();
                s.create_script = create.to_vec();
                s.update_script = update.to_vec();
            }
            Arc::new(f)
        }

        fn with_stack(self: Arc<Self>, status: &str, count: u32) -> Arc<Self> {
            self.st.lock().unwrap().stack = Some(StackInfo {
                id: "arn:stack/1".into(),
                status: status.into(),
                parameters: BTreeMap::from([("Count".into(), count.to_string())]),
                ..Default::default()
            });
            self
        }

        fn calls(&self) -> Vec<String> {
            self.st.lock().unwrap().calls.clone()
        }

        fn push_event(s: &mut FakeState, status: &str, reason: Option<&str>) {
            let n = s.events.len();
            s.events.push(StackEvent {
                id: format!("ev-{n}"),
                at: format!("t{n}"),
                logical_id: if reason.is_some() { "AutoScalingGroup".into() } else { "stack".into() },
                resource_type: "AWS::AutoScaling::AutoScalingGroup".into(),
                status: status.into(),
                reason: reason.map(str::to_string),
            });
        }

        fn start(s: &mut FakeState, script: Vec<(&'static str, Option<&'static str>)>) {
            s.script = script.into();
        }
    }

    #[async_trait]
    impl StackApi for Fake {
        async fn describe(&self, _name: &str) -> Result<Option<StackInfo>, AwsError> {
            let mut s = self.st.lock().unwrap();
            s.describes += 1;
            if let Some((status, reason)) = s.script.pop_front() {
                Fake::push_event(&mut s, status, reason);
                if reason.is_some() {
                    // A resource's event (e.g. the group's CREATE_FAILED):
                    // the stack itself stays where it is.
                } else if status == GONE {
                    s.stack = None;
                } else if let Some(st) = s.stack.as_mut() {
                    st.status = status.into();
                }
            }
            let mut stack = s.stack.clone();
            if let (Some(st), Some(_)) = (stack.as_mut(), &s.group) {
                st.outputs.insert("AutoScalingGroupName".into(), "asg-web".into());
            }
            Ok(stack)
        }
        async fn group_health(&self, group: &str) -> Result<Option<crate::aws::stacks::GroupHealth>, AwsError> {
            let s = self.st.lock().unwrap();
            Ok(s.group.clone().filter(|_| group == "asg-web"))
        }
        async fn create(&self, req: &StackRequest) -> Result<String, AwsError> {
            let mut s = self.st.lock().unwrap();
            s.calls.push(format!("create {}", req.token));
            if s.create_conflicts {
                s.create_conflicts = false;
                s.stack = Some(StackInfo {
                    id: "arn:stack/other".into(),
                    status: "CREATE_COMPLETE".into(),
                    parameters: req.parameters.clone(),
                    ..Default::default()
                });
                return Err(AwsError::new("CreateStack", "AlreadyExistsException", "exists", false));
            }
            s.stack = Some(StackInfo {
                id: "arn:stack/1".into(),
                status: "CREATE_IN_PROGRESS".into(),
                parameters: req.parameters.clone(),
                termination_protection: req.termination_protection,
                ..Default::default()
            });
            let script = s.create_script.clone();
            Fake::start(&mut s, script);
            Ok("arn:stack/1".into())
        }
        async fn update(&self, req: &StackRequest) -> Result<bool, AwsError> {
            let mut s = self.st.lock().unwrap();
            s.calls.push(format!("update Count={}", req.parameters["Count"]));
            let st = s.stack.as_mut().expect("stack");
            st.status = "UPDATE_IN_PROGRESS".into();
            st.parameters = req.parameters.clone();
            let script = s.update_script.clone();
            Fake::start(&mut s, script);
            Ok(true)
        }
        async fn delete(&self, _name: &str, token: &str) -> Result<(), AwsError> {
            let mut s = self.st.lock().unwrap();
            s.calls.push(format!("delete {token}"));
            if s.stack.is_some() {
                Fake::start(&mut s, vec![("DELETE_IN_PROGRESS", None), (GONE, None)]);
            }
            Ok(())
        }
        async fn cancel_update(&self, _name: &str) -> Result<(), AwsError> {
            let mut s = self.st.lock().unwrap();
            s.calls.push("cancel-update".into());
            Fake::start(&mut s, vec![("UPDATE_ROLLBACK_IN_PROGRESS", None), ("UPDATE_ROLLBACK_COMPLETE", None)]);
            Ok(())
        }
        async fn set_termination_protection(&self, _name: &str, on: bool) -> Result<(), AwsError> {
            let mut s = self.st.lock().unwrap();
            s.calls.push(format!("protect {on}"));
            if let Some(st) = s.stack.as_mut() {
                st.termination_protection = on;
            }
            Ok(())
        }
        async fn events(&self, _name: &str) -> Result<Vec<StackEvent>, AwsError> {
            let s = self.st.lock().unwrap();
            Ok(s.events.iter().rev().cloned().collect())
        }
        async fn instances(&self, _k: &str, _v: &str) -> Result<Vec<InstanceInfo>, AwsError> {
            Ok(self.st.lock().unwrap().machines.clone())
        }
        /// As a group does once the replacement is in service.
        async fn set_unhealthy(&self, instance: &str) -> Result<(), AwsError> {
            let mut s = self.st.lock().unwrap();
            s.calls.push(format!("unhealthy {instance}"));
            let new = s.replacements.pop_front().expect("a replacement");
            s.machines.retain(|m| m.id != instance);
            s.machines.push(new);
            Ok(())
        }
    }

    fn provider(fake: Arc<Fake>) -> AwsClusters {
        AwsClusters::new(fake, Backoff { initial: Duration::from_millis(1), max: Duration::from_millis(4) })
    }

    fn cluster_job(action: &str, params: Value) -> Job {
        let image = resource(
            image::KIND,
            "base",
            json!({"provider": "aws", "base_ami": "ami-0123abcd", "instance_type": "t3.micro", "build_script": "x"}),
            "built",
            json!({"ami_id": "ami-0123abcd"}),
        );
        job(
            cluster::KIND,
            "web",
            json!({"provider": "aws", "image": "base", "count": 2, "instance_type": "t3.micro",
                   "subnets": ["subnet-0123abcd"]}),
            action,
            params,
            vec![image],
        )
    }

    /// Real AWS: a create takes minutes in CREATE_IN_PROGRESS while
    /// resource events arrive. Drover polls with backoff and streams them.
    #[tokio::test]
    async fn create_waits_with_backoff_and_streams_events() {
        let fake = Fake::new(
            &[
                ("CREATE_IN_PROGRESS", None),
                ("CREATE_IN_PROGRESS", None),
                ("CREATE_IN_PROGRESS", None),
                ("CREATE_COMPLETE", None),
            ],
            &[],
        );
        let p = provider(fake.clone());
        let job = cluster_job("create", json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        let out = p.apply(&ctx, &job).await.expect("create");
        assert_eq!(out["stack_status"], "CREATE_COMPLETE");
        assert_eq!(fake.calls(), [format!("create drover-create-{}", job.run_id)]);
        assert!(fake.st.lock().unwrap().describes >= 5);
        let streamed = ctx.messages().iter().filter(|m| m.starts_with("stack-event")).count();
        assert_eq!(streamed, 4, "{:?}", ctx.messages());
    }

    /// Real AWS (moto reports every instance InService and Healthy at once):
    /// a stack is complete when its group exists, while instances still
    /// launch or fail their status checks. The run waits for them, then
    /// fails naming the laggards.
    #[tokio::test(start_paused = true)]
    async fn a_create_waits_for_the_groups_instances_and_names_those_not_healthy() {
        use crate::aws::stacks::GroupHealth;
        let fake = Fake::new(&[("CREATE_COMPLETE", None)], &[]);
        let group = |second: &str| GroupHealth {
            desired: 2,
            health_check_type: Some("EC2".into()),
            grace_period_secs: Some(30),
            launch_template_version: None,
            instance_templates: Vec::new(),
            instances: vec![
                ("i-1".into(), "InService".into(), "Healthy".into()),
                ("i-2".into(), second.into(), "Healthy".into()),
            ],
        };
        fake.st.lock().unwrap().group = Some(group("Pending"));
        let p = provider(fake.clone());
        let job = cluster_job("create", json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { code, message, .. }) => {
                assert_eq!(code, "instances_not_healthy");
                assert!(message.contains("1 of 2") && message.contains("i-2 (Pending, Healthy)"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(ctx.messages().iter().any(|m| m.ends_with("1 of 2 instance(s) InService and Healthy")));
        // Once both are in service, the same create succeeds.
        fake.st.lock().unwrap().group = Some(group("InService"));
        let ctx = RecordingCtx::new(job.run_id);
        p.apply(&ctx, &job).await.expect("create");
        assert!(ctx.messages().iter().any(|m| m.ends_with("2 of 2 instance(s) InService and Healthy")));
    }

    /// Real AWS without a load balancer: a group checks only EC2's status,
    /// so an instance whose service does not answer stays `Healthy` to it.
    /// With a `port`, drover asks each instance's private address itself: a
    /// create waits for the answers and names each instance that does not
    /// answer; the observation names it (past its grace) as what a repair
    /// fixes; a repair marks it Unhealthy, for the group to replace, and
    /// waits for the replacement's answer. A new instance within its grace
    /// is left alone. The instances' addresses are loopback ones, where a
    /// real endpoint answers (127.0.0.1) or nothing listens (127.0.0.2).
    #[tokio::test]
    async fn instances_answer_the_clusters_health_check_or_are_replaced() {
        use crate::aws::testing::health_endpoint;
        let (port, endpoint) = health_endpoint("127.0.0.1").await;
        let machine = |id: &str, ip: &str, launched: std::time::SystemTime| InstanceInfo {
            id: id.into(),
            private_ip: Some(ip.into()),
            state: "running".into(),
            launched_at: Some(launched),
            ..Default::default()
        };
        let long_ago = std::time::UNIX_EPOCH;
        let fake = Fake::new(&[("CREATE_COMPLETE", None)], &[("UPDATE_COMPLETE", None)]);
        fake.st.lock().unwrap().machines =
            vec![machine("i-1", "127.0.0.1", long_ago), machine("i-2", "127.0.0.2", long_ago)];
        let p = provider(fake.clone());
        let mut job = cluster_job("create", json!({}));
        let spec = &mut job.resource.spec;
        spec["port"] = port.into();
        spec["health_check"] = json!({"type": "http", "path": "/health"});
        spec["start_timeout_secs"] = 1.into();
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { code, message, .. }) => {
                assert_eq!(code, "instances_not_healthy");
                assert!(message.contains(&format!("1 of 2 instance(s) of cluster web answer its health check (GET /health on port {port}) after 1s: i-2 at 127.0.0.2:{port}: connect")), "{message}");
                assert!(!message.contains("i-1"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(ctx
            .messages()
            .contains(&format!("health: 1 of 2 instance(s) answer their health check (GET /health on port {port})")));

        // Up: the observer names the one not answering, as a repair's to fix.
        job.resource.state = "up".into();
        job.resource.applied_spec = Some(job.resource.spec.clone());
        job.resource.outputs = json!({"count": 2, "ami_id": "ami-0123abcd"});
        let seen = p.observe(&job.resource).await.expect("observed");
        assert_eq!(seen["healthy"], false, "{seen}");
        assert_eq!(seen["instances"][0]["healthy"], true, "{seen}");
        assert_eq!(seen["instances"][1]["address"], format!("127.0.0.2:{port}"), "{seen}");
        let why = seen["needs_repair"].as_str().expect("something to repair");
        assert!(why.starts_with("failing the health check: i-2 at 127.0.0.2") && !why.contains("i-1"), "{why}");

        // A repair has the group replace it (and not a new instance still in
        // its grace, nor one that answers), then waits for the replacement.
        {
            let mut s = fake.st.lock().unwrap();
            s.stack =
                Some(StackInfo { id: "arn:stack/1".into(), status: "CREATE_COMPLETE".into(), ..Default::default() });
            s.machines.push(machine("i-4", "127.0.0.3", std::time::SystemTime::now()));
            s.replacements.push_back(machine("i-3", "127.0.0.1", std::time::SystemTime::now()));
        }
        let seen = p.observe(&job.resource).await.expect("observed");
        assert!(!seen["needs_repair"].as_str().unwrap().contains("i-4"), "in its grace: {seen}");
        job.action = "repair".into();
        let ctx = RecordingCtx::new(job.run_id);
        p.apply(&ctx, &job).await.expect("repair");
        assert_eq!(fake.calls()[1..], ["unhealthy i-2", "update Count=2"]);
        assert!(ctx.messages().iter().any(|m| m.starts_with("repair: i-2 at 127.0.0.2")
            && m.ends_with("marked Unhealthy, for its auto-scaling group to replace")));
        assert!(ctx
            .messages()
            .contains(&format!("health: 2 of 2 instance(s) answer their health check (GET /health on port {port})")));

        // Without a port, nothing is asked: the group's own checks stand.
        job.resource.spec.as_object_mut().unwrap().remove("port");
        job.resource.applied_spec = Some(job.resource.spec.clone());
        let seen = p.observe(&job.resource).await.expect("observed");
        assert!(seen.get("needs_repair").is_none() && seen["summary"] == "3 of 2 instances running", "{seen}");
        endpoint.abort();
    }

    /// Real AWS: a failed create rolls back to ROLLBACK_COMPLETE and the
    /// reason is in the failed resource's ResourceStatusReason.
    #[tokio::test]
    async fn a_failed_create_carries_cloudformations_reason() {
        let fake = Fake::new(
            &[
                ("CREATE_FAILED", Some("Parameter InstanceType is invalid: zz.bogus")),
                ("ROLLBACK_IN_PROGRESS", None),
                ("ROLLBACK_COMPLETE", None),
            ],
            &[],
        );
        let p = provider(fake.clone());
        let job = cluster_job("create", json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { code, message, retryable, .. }) => {
                assert_eq!(code, "stack_create_failed");
                assert!(!retryable);
                assert!(message.contains("ROLLBACK_COMPLETE"), "{message}");
                assert!(message.contains("Parameter InstanceType is invalid: zz.bogus"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Real AWS: a stack left in ROLLBACK_COMPLETE can only be deleted. A
    /// retry deletes it, waits until it is gone, then creates it again.
    #[tokio::test]
    async fn retry_deletes_a_rolled_back_stack_then_recreates() {
        let fake = Fake::new(&[("CREATE_COMPLETE", None)], &[]).with_stack("ROLLBACK_COMPLETE", 2);
        let p = provider(fake.clone());
        let job = cluster_job("create", json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        let out = p.apply(&ctx, &job).await.expect("recreated");
        assert_eq!(out["stack_status"], "CREATE_COMPLETE");
        let calls = fake.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls[0].starts_with("delete "), "{calls:?}");
        assert!(calls[1].starts_with("create "), "{calls:?}");
        assert!(ctx.messages().iter().any(|m| m.contains("ROLLBACK_COMPLETE from an earlier attempt")));
    }

    /// Real AWS: a create request retried with the same ClientRequestToken,
    /// or racing an attempt whose lease lapsed, finds the stack already
    /// there (AlreadyExistsException). Drover adopts it.
    #[tokio::test]
    async fn a_duplicate_create_adopts_the_existing_stack() {
        let fake = Fake::new(&[], &[]);
        fake.st.lock().unwrap().create_conflicts = true;
        let p = provider(fake.clone());
        let job = cluster_job("create", json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        let out = p.apply(&ctx, &job).await.expect("adopted");
        assert_eq!(out["stack_id"], "arn:stack/other");
        assert_eq!(fake.calls().len(), 1, "one CreateStack, no update: parameters match");
    }

    /// Real AWS: a create still in progress when the lease lapsed; the next
    /// attempt waits for it instead of creating another.
    #[tokio::test]
    async fn a_reclaimed_create_waits_for_the_stack_in_progress() {
        let fake = Fake::new(&[], &[]).with_stack("CREATE_IN_PROGRESS", 2);
        fake.st.lock().unwrap().script = VecDeque::from([("CREATE_IN_PROGRESS", None), ("CREATE_COMPLETE", None)]);
        let p = provider(fake.clone());
        let job = cluster_job("create", json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        p.apply(&ctx, &job).await.expect("adopted");
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    /// Real AWS: an update can be cancelled with CancelUpdateStack; the
    /// stack rolls back to UPDATE_ROLLBACK_COMPLETE.
    #[tokio::test]
    async fn cancel_during_an_update_calls_cancel_update_stack() {
        let fake = Fake::new(
            &[],
            &[
                ("UPDATE_IN_PROGRESS", None),
                ("UPDATE_IN_PROGRESS", None),
                ("UPDATE_IN_PROGRESS", None),
                ("UPDATE_IN_PROGRESS", None),
            ],
        )
        .with_stack("CREATE_COMPLETE", 2);
        let p = provider(fake.clone());
        let job = cluster_job("scale", json!({"count": 5}));
        let ctx = RecordingCtx::new(job.run_id);
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            ctx.cancel.store(true, Ordering::Relaxed);
        };
        let (result, ()) = tokio::join!(p.apply(&ctx, &job), cancel);
        assert!(matches!(result, Err(ProviderError::Cancelled)), "{result:?}");
        assert_eq!(fake.calls(), ["update Count=5", "cancel-update"]);
        assert_eq!(fake.st.lock().unwrap().stack.as_ref().unwrap().status, "UPDATE_ROLLBACK_COMPLETE");
    }

    /// Real AWS: a failed update rolls back (UPDATE_ROLLBACK_COMPLETE); the
    /// run fails with the resource's reason.
    #[tokio::test]
    async fn a_failed_update_carries_the_reason() {
        let fake = Fake::new(
            &[],
            &[
                ("UPDATE_FAILED", Some("You have requested more instances than your current limit")),
                ("UPDATE_ROLLBACK_IN_PROGRESS", None),
                ("UPDATE_ROLLBACK_COMPLETE", None),
            ],
        )
        .with_stack("CREATE_COMPLETE", 2);
        let p = provider(fake.clone());
        let job = cluster_job("add-instances", json!({"n": 3}));
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { code, message, .. }) => {
                assert_eq!(code, "stack_update_failed");
                assert!(message.contains("more instances than your current limit"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.calls(), ["update Count=5"]);
    }

    /// Real AWS: CloudFormation updates what the template changes, so a
    /// resource deleted outside it (drift detection says DELETED) is not
    /// recreated by an update of the same template: a repair says so and
    /// sends nothing; one with only a count to put back sends the stack as
    /// it last ran.
    #[tokio::test]
    async fn a_repair_does_not_pretend_to_restore_a_deleted_resource() {
        let fake = Fake::new(&[], &[("UPDATE_COMPLETE", None)]).with_stack("CREATE_COMPLETE", 2);
        let p = provider(fake.clone());
        let mut job = cluster_job("repair", json!({}));
        job.resource.outputs = json!({"count": 2, "ami_id": "ami-0123abcd"});
        job.resource.drift = Some(json!({"differences": [
            {"path": "stack.resources.LaunchTemplate", "recorded": "as deployed", "actual": "DELETED"}]}));
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { code, message, .. }) => {
                assert_eq!(code, "resource_deleted");
                assert!(message.contains("LaunchTemplate were deleted outside CloudFormation"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(fake.calls().is_empty(), "nothing sent: {:?}", fake.calls());
        job.resource.drift = None;
        job.resource.spec["count"] = 5.into(); // a pending change stays pending
        job.resource.applied_spec = Some(cluster_job("repair", json!({})).resource.spec);
        p.apply(&ctx, &job).await.expect("repair");
        assert_eq!(fake.calls(), ["update Count=2"]);
    }

    /// Real AWS: DeleteStack on a protected stack fails; drover refuses
    /// first while the spec asks for protection, and turns the stack's
    /// protection off once the spec no longer does.
    #[tokio::test]
    async fn destroy_honours_termination_protection() {
        let fake = Fake::new(&[], &[]).with_stack("CREATE_COMPLETE", 2);
        fake.st.lock().unwrap().stack.as_mut().unwrap().termination_protection = true;
        let p = provider(fake.clone());
        let mut job = cluster_job("destroy", json!({}));
        job.resource.spec["termination_protection"] = true.into();
        let ctx = RecordingCtx::new(job.run_id);
        match p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { code, message, .. }) => {
                assert_eq!(code, "termination_protected");
                assert!(message.contains("termination_protection"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(fake.calls().is_empty());
        job.resource.spec["termination_protection"] = false.into();
        p.apply(&ctx, &job).await.expect("destroyed");
        let calls = fake.calls();
        assert_eq!(calls[0], "protect false");
        assert!(calls[1].starts_with("delete "));
        assert!(fake.st.lock().unwrap().stack.is_none());
        // And again: the stack is gone, which is what destroy wants.
        p.apply(&ctx, &job).await.expect("destroyed twice");
    }
}

/// Each step against a real moto server over loopback HTTP: real SDK calls.
#[cfg(test)]
mod moto_tests {
    use super::*;
    use crate::aws::stacks::SdkStacks;
    use crate::aws::testing::*;

    struct Setup {
        p: AwsClusters,
        clients: Arc<crate::aws::Clients>,
        image: Resource,
        subnet: String,
        sg: String,
    }

    async fn setup() -> Setup {
        let clients = moto_clients();
        let ami = base_ami(&clients).await;
        let (subnet, sg) = default_network(&clients).await;
        let image = resource(
            image::KIND,
            &unique("img"),
            json!({"provider": "aws", "base_ami": ami, "instance_type": "t2.micro", "build_script": "x"}),
            "built",
            json!({"ami_id": ami}),
        );
        Setup {
            p: AwsClusters::new(Arc::new(SdkStacks::new(clients.clone())), clients.settings().poll),
            clients,
            image,
            subnet,
            sg,
        }
    }

    impl Setup {
        fn job(&self, name: &str, count: u32, extra: Value) -> Job {
            let mut spec = json!({"provider": "aws", "image": self.image.name, "count": count,
                "instance_type": "t2.micro", "subnets": [self.subnet], "security_groups": [self.sg],
                "role_metadata": "role=worker,instancetype=r3", "tags": {"team": "drover-tests"}});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            job(cluster::KIND, name, spec, "create", json!({}), vec![self.image.clone()])
        }

        async fn running(&self, r: &Resource) -> usize {
            SdkStacks::new(self.clients.clone())
                .instances(TAG_RESOURCE, &r.id.to_string())
                .await
                .unwrap()
                .iter()
                .filter(|i| i.state == "running")
                .count()
        }
    }

    #[tokio::test]
    async fn create_scale_and_destroy_each_run_twice() {
        let s = setup().await;
        let mut job = s.job(&unique("c"), 2, json!({}));
        let ctx = RecordingCtx::new(job.run_id);
        let first = s.p.apply(&ctx, &job).await.expect("create");
        let second = s.p.apply(&ctx, &job).await.expect("create again adopts");
        assert_eq!(first["stack_id"], second["stack_id"]);
        let name = first["stack_name"].as_str().unwrap().to_string();
        let stacks = SdkStacks::new(s.clients.clone());
        let info = stacks.describe(&name).await.unwrap().expect("stack");
        assert_eq!(info.parameters["Count"], "2");
        assert_eq!(info.parameters["RoleMetadata"], "role=worker,instancetype=r3");
        assert_eq!(s.running(&job.resource).await, 2);
        assert!(ctx.messages().iter().any(|m| m.contains("adopting")), "{:?}", ctx.messages());

        job.action = "scale".into();
        job.params = json!({"count": 3});
        s.p.apply(&ctx, &job).await.expect("scale");
        s.p.apply(&ctx, &job).await.expect("scale again");
        let info = stacks.describe(&name).await.unwrap().expect("stack");
        assert_eq!(info.parameters["Count"], "3");
        assert_eq!(s.running(&job.resource).await, 3);

        // add-instances twice in one run adds n once: the target is the
        // spec's count (updated only when the run succeeds) plus n.
        job.resource.spec["count"] = 3.into();
        job.action = "add-instances".into();
        job.params = json!({"n": 1});
        s.p.apply(&ctx, &job).await.expect("add-instances");
        s.p.apply(&ctx, &job).await.expect("add-instances again");
        let info = stacks.describe(&name).await.unwrap().expect("stack");
        assert_eq!(info.parameters["Count"], "4");
        assert_eq!(s.running(&job.resource).await, 4);

        job.resource.spec["count"] = 4.into();
        for (action, running) in [("stop", 0), ("start", 4)] {
            job.action = action.into();
            job.params = json!({});
            s.p.apply(&ctx, &job).await.expect(action);
            s.p.apply(&ctx, &job).await.expect(action);
            assert_eq!(s.running(&job.resource).await, running, "{action}");
        }

        job.action = "destroy".into();
        job.params = json!({});
        s.p.apply(&ctx, &job).await.expect("destroy");
        s.p.apply(&ctx, &job).await.expect("destroy again");
        assert!(stacks.describe(&name).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_worker_group_gets_its_leaders_endpoints() {
        let s = setup().await;
        let leader_job = s.job(&unique("lead"), 2, json!({"role_metadata": "role=leader"}));
        let ctx = RecordingCtx::new(leader_job.run_id);
        let out = s.p.apply(&ctx, &leader_job).await.expect("leader");
        let ips: Vec<String> = out["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["private_ip"].as_str().map(str::to_string))
            .collect();
        assert_eq!(ips.len(), 2, "{out}");
        let mut leader = leader_job.resource.clone();
        leader.state = "up".into();
        let mut worker = s.job(&unique("work"), 1, json!({"join": leader.name}));
        worker.dependencies.push(leader);
        let preview = s.p.preview(&worker).await.unwrap().expect("preview");
        let mut want = ips.clone();
        want.sort();
        assert_eq!(preview["parameters"]["LeaderEndpoints"], want.join(","));
        let out = s.p.apply(&ctx, &worker).await.expect("worker");
        let info =
            SdkStacks::new(s.clients.clone()).describe(out["stack_name"].as_str().unwrap()).await.unwrap().unwrap();
        assert_eq!(info.parameters["LeaderEndpoints"], want.join(","));
        assert_eq!(info.parameters["LeaderName"], leader_job.resource.name);
    }

    /// moto refuses the bad instance type in CreateStack itself (AWS would
    /// roll the stack back; see the scripted tests). Either way the run
    /// fails with AWS's reason, and a retry with a good spec succeeds.
    #[tokio::test]
    async fn a_bad_parameter_fails_with_aws_reason_and_a_retry_recovers() {
        let s = setup().await;
        let mut job = s.job(&unique("bad"), 1, json!({"instance_type": "zz.bogus"}));
        let ctx = RecordingCtx::new(job.run_id);
        match s.p.apply(&ctx, &job).await {
            Err(ProviderError::Failed { message, retryable, .. }) => {
                assert!(!retryable, "{message}");
                assert!(message.contains("zz.bogus"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        job.resource.spec["instance_type"] = "t2.micro".into();
        job.run_id = uuid::Uuid::now_v7();
        let out = s.p.apply(&ctx, &job).await.expect("retry with a good spec");
        assert_eq!(out["stack_status"], "CREATE_COMPLETE");
        assert_eq!(s.running(&job.resource).await, 1);
    }
}
