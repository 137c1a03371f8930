//! Rolling replacement (`deploy`, `rollback`, `restart`), one set of rules
//! for every provider that runs services: a [`Plan`] fixed when the run
//! starts, carried out batch by batch over a [`Fleet`] (a provider's
//! instances: processes locally, systemd units over SSM on aws).
//!
//! # Rules
//! - The plan fixes the indexes to replace (those not already on the
//!   target build; all of them for a restart), the build to start, and
//!   the bounds as numbers: `surge` new instances beyond the count and
//!   `unavailable` old ones down at a time (each at most the count). It is
//!   saved ([`Fleet::save_plan`]) before anything changes, so that an
//!   attempt of the same run after a crash carries out the same plan: an
//!   instance of the plan is its new one, any other at its index an old one.
//! - Per batch of `max(surge + unavailable, 1)` indexes: stop old ones
//!   while fewer than `unavailable` of the batch are down, start the new
//!   ones (the other old ones still serving), wait until each is healthy
//!   (and in the registry), then stop the old ones of the batch. So at no
//!   moment are there more than `count + surge` instances or fewer than
//!   `count - unavailable` healthy ones.
//! - A new instance that fails its check is stopped (its old one stays)
//!   and halts the plan. A deploy then puts the indexes it replaced (or
//!   left with nothing running) back on the build they ran, by a second
//!   plan under the same bounds, and fails `deploy_halted` (or
//!   `rollback_failed` when putting back fails too); unless the request
//!   said `rollback_on_failure: false`.

use async_trait::async_trait;
use drover_domain::kinds::service::Spec;
use drover_domain::model::{Level, NewEvent};
use drover_domain::ports::{Job, ProviderError, RunContext};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

/// What a plan's instances run: an image's build, as a provider needs it.
pub(crate) trait Source: Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync {
    fn image(&self) -> &str;
    fn build(&self) -> Option<&str>;
}

/// A rolling replacement, fixed when its run starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Plan<S> {
    pub id: Uuid,
    pub run: Uuid,
    /// What replaces the old instances.
    pub to: S,
    /// The indexes to replace, in order.
    pub indexes: Vec<u32>,
    /// New instances at a time beyond the count, and old ones that may be
    /// down at a time.
    pub surge: u32,
    pub unavailable: u32,
    /// Set on the plan that puts a halted deploy back: why it halted
    /// (missing, as `from`, reads as `None`).
    pub halted: Option<String>,
    /// What the instances ran before (for the deploy's put-back, and the
    /// service's `previous`).
    pub from: Option<S>,
}

impl<S: Source> Plan<S> {
    /// The plan of a run: replace each of `wanted` whose instance does not
    /// run `to` (`running(ix)`: the build of the instance at `ix`, `None`
    /// when none runs there; every one for a restart).
    pub fn new(
        job: &Job,
        spec: &Spec,
        wanted: &[u32],
        running: impl Fn(u32) -> Option<Option<String>>,
        to: S,
        from: Option<S>,
    ) -> Plan<S> {
        let indexes = wanted
            .iter()
            .copied()
            .filter(|&ix| match running(ix) {
                _ if job.action == "restart" => true,
                None | Some(None) => true,
                Some(Some(b)) => Some(b.as_str()) != to.build(),
            })
            .collect();
        let n = wanted.len() as u32;
        Plan {
            id: Uuid::now_v7(),
            run: job.run_id,
            surge: spec.max_surge.min(n),
            unavailable: spec.max_unavailable.min(n),
            to,
            indexes,
            halted: None,
            from,
        }
    }

    fn batch(&self) -> usize {
        (self.surge + self.unavailable).max(1) as usize
    }

    fn to_build(&self) -> &str {
        self.to.build().unwrap_or("?")
    }

    /// Why an old instance of the plan goes.
    pub fn replaced(&self) -> String {
        format!("replaced by build {}", self.to_build())
    }

    /// What the run's log says of a new plan (`of`: the instances wanted);
    /// its data carries the whole plan (`saved`), which
    /// [`RunContext::recall`] hands back to a later attempt.
    pub fn announced(&self, of: usize) -> NewEvent {
        let skipped = of.saturating_sub(self.indexes.len());
        let msg = format!(
            "plan: replace {} of {of} instance(s) with build {} in batches of {} (max_surge {}, max_unavailable {}){}",
            self.indexes.len(),
            self.to_build(),
            self.batch(),
            self.surge,
            self.unavailable,
            match skipped {
                0 => String::new(),
                k => format!("; {k} already run it"),
            }
        );
        NewEvent::info("plan", msg).with_data(self.data())
    }

    fn data(&self) -> Value {
        json!({ "plan": self.id, "indexes": self.indexes, "max_surge": self.surge,
            "max_unavailable": self.unavailable, "build": self.to.build(), "image": self.to.image(),
            "from_build": self.from.as_ref().and_then(|f| f.build()), "halted": self.halted, "saved": self })
    }

    /// The plan a run's log last saved, if it is this run's and not carried
    /// out yet.
    pub fn recalled(data: Option<Value>, run: Uuid) -> Option<Plan<S>> {
        let plan: Plan<S> = serde_json::from_value(data?.get("saved")?.clone()).ok()?;
        (plan.run == run).then_some(plan)
    }
}

/// A provider's instances of one service, as a plan moves them.
#[async_trait]
pub(crate) trait Fleet: Send {
    type Source: Source;

    /// An instance of `plan` runs at `ix`.
    fn has_new(&self, plan: Uuid, ix: u32) -> bool;
    /// An instance of another plan (or none) runs at `ix`.
    fn has_old(&self, plan: Uuid, ix: u32) -> bool;
    /// Stops every instance at `ix` that is not `plan`'s, and forgets it.
    async fn stop_old(&mut self, ctx: &dyn RunContext, plan: &Plan<Self::Source>, ix: u32)
        -> Result<(), ProviderError>;
    /// Starts `plan`'s instance at `ix` (one that runs already, started by
    /// an attempt before a crash, is kept or checked again).
    async fn start_new(
        &mut self,
        ctx: &dyn RunContext,
        plan: &Plan<Self::Source>,
        ix: u32,
    ) -> Result<(), ProviderError>;
    /// Waits until `plan`'s instance at `ix` is healthy and enters it in
    /// the registry; one that fails is stopped and forgotten, and its
    /// failure returned.
    async fn wait_new(&mut self, ctx: &dyn RunContext, plan: &Plan<Self::Source>, ix: u32)
        -> Result<(), ProviderError>;
    /// Saves the plan under way (`None`: none), before it moves anything.
    async fn save_plan(&mut self, ctx: &dyn RunContext, plan: Option<&Plan<Self::Source>>)
        -> Result<(), ProviderError>;
}

/// Carries out a plan from wherever it stands, batch by batch.
async fn execute<F: Fleet>(ctx: &dyn RunContext, fleet: &mut F, plan: &Plan<F::Source>) -> Result<(), ProviderError> {
    for chunk in plan.indexes.chunks(plan.batch()) {
        ctx.check_cancel()?;
        let mut down = chunk.iter().filter(|&&ix| !fleet.has_new(plan.id, ix) && !fleet.has_old(plan.id, ix)).count();
        // First the old ones that may be down, then the new ones beside the others.
        for &ix in chunk {
            if fleet.has_new(plan.id, ix) || down >= plan.unavailable as usize {
                continue;
            }
            if fleet.has_old(plan.id, ix) {
                fleet.stop_old(ctx, plan, ix).await?;
                down += 1;
            }
        }
        for &ix in chunk {
            ctx.check_cancel()?;
            fleet.start_new(ctx, plan, ix).await?;
        }
        for &ix in chunk {
            fleet.wait_new(ctx, plan, ix).await?;
        }
        // Now the old ones of the batch go.
        for &ix in chunk {
            fleet.stop_old(ctx, plan, ix).await?;
        }
    }
    Ok(())
}

/// Carries out `plan` (saved already) and, for a deploy that halts, puts
/// back what it replaced. On success, the service's `previous` (what a
/// deploy replaced, else what it was).
pub(crate) async fn carry_out<F: Fleet>(
    ctx: &dyn RunContext,
    job: &Job,
    fleet: &mut F,
    plan: &Plan<F::Source>,
) -> Result<Value, ProviderError> {
    let outcome = execute(ctx, fleet, plan).await;
    let deploy = matches!(job.action.as_str(), "deploy" | "rollback");
    match (outcome, plan.halted.clone()) {
        (Ok(()), None) => {
            fleet.save_plan(ctx, None).await?;
            Ok(match &plan.from {
                Some(f) if deploy && (f.build() != plan.to.build() || f.image() != plan.to.image()) => {
                    json!({ "image": f.image(), "build": f.build() })
                }
                _ => job.resource.outputs["previous"].clone(),
            })
        }
        // The plan that put a halted deploy back is done: the deploy failed.
        (Ok(()), Some(why)) => {
            fleet.save_plan(ctx, None).await?;
            Err(ProviderError::fatal("deploy_halted", format!("{why}; the instances it replaced were put back")))
        }
        (Err(e), Some(why)) => Err(ProviderError::fatal(
            "rollback_failed",
            format!("{why}; putting the replaced instances back failed too: {e}"),
        )),
        (Err(ProviderError::Cancelled), None) => Err(ProviderError::Cancelled),
        (Err(e), None) => {
            let why = match &e {
                ProviderError::Failed { message, .. } => message.clone(),
                ProviderError::Cancelled => "cancelled".into(),
            };
            let rollback_on_failure = job.params["rollback_on_failure"].as_bool().unwrap_or(true);
            let Some(from) = plan.from.clone().filter(|_| job.action == "deploy" && rollback_on_failure) else {
                fleet.save_plan(ctx, None).await?;
                return Err(e);
            };
            // Every index now on the new build, or with nothing running,
            // goes back to the old build.
            let indexes = plan.indexes.iter().copied().filter(|&ix| !fleet.has_old(plan.id, ix)).collect();
            let back = Plan {
                id: Uuid::now_v7(),
                run: job.run_id,
                to: from,
                indexes,
                surge: plan.surge,
                unavailable: plan.unavailable,
                halted: Some(format!("deploy halted: {why}")),
                from: None,
            };
            fleet.save_plan(ctx, Some(&back)).await?;
            let msg = format!(
                "deploy halted ({why}); putting {} instance(s) back on build {}",
                back.indexes.len(),
                back.to_build()
            );
            ctx.event(NewEvent::info("plan", msg).with_level(Level::Warn).with_data(back.data())).await;
            match execute(ctx, fleet, &back).await {
                Ok(()) => {
                    fleet.save_plan(ctx, None).await?;
                    Err(ProviderError::fatal(
                        "deploy_halted",
                        format!("deploy halted: {why}; the instances it replaced were put back"),
                    ))
                }
                Err(e2) => Err(ProviderError::fatal(
                    "rollback_failed",
                    format!("deploy halted: {why}; putting the replaced instances back failed too: {e2}"),
                )),
            }
        }
    }
}
