//! Actions drover carries out itself, as child transitions (a cluster's
//! `initialize`: a `start` of each of its services, dependencies first).
//!
//! A kind declares such an action with [`crate::kinds::FanOut`]: which kind
//! of resource lives on it (those whose [`Kind::parent`] names it), which
//! action each gets, and the states in which one needs nothing. The engine
//! runs it with [`FanOutRunner`] in place of a provider: one child run per
//! resource, asked for through the same path as an API request (so every
//! check applies) with this run as its parent, in the order the children's
//! references to their own kind give (a service's `after`: each child's
//! dependencies run first), one after the other, each waited for until it
//! ends. A child that fails fails the parent, naming it. The parent's
//! attempt after a crash adopts the child runs it already asked for.
//!
//! # Guarantees
//! - A child starts only once every child it references has succeeded.
//! - No child run is asked for twice by one parent run.
//! - Cancelling the parent cancels the child under way.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::kinds::{FanOut, Kind};
use crate::model::*;
use crate::ports::{Job, Provider, ProviderError, RunContext, Store};
use crate::service::TransitionRequest;

/// Asks for a transition the way the API does. Implemented by
/// [`crate::service::Service`].
#[async_trait]
pub trait Requester: Send + Sync + 'static {
    async fn request(&self, kind: Kind, key: &str, req: TransitionRequest) -> crate::Result<Run>;
}

#[async_trait]
impl Requester for crate::service::Service {
    async fn request(&self, kind: Kind, key: &str, req: TransitionRequest) -> crate::Result<Run> {
        crate::service::Service::request(self, kind, key, req).await
    }
}

/// Runs a fan-out action as a provider would.
pub struct FanOutRunner {
    pub store: Arc<dyn Store>,
    pub requester: Arc<dyn Requester>,
    pub fan_out: FanOut,
}

const POLL: Duration = Duration::from_millis(100);

impl FanOutRunner {
    /// The live resources of the fan-out's kind that live on `parent`, in
    /// the order their same-kind references give (referenced ones first).
    async fn children(&self, parent: &Resource) -> Result<Vec<Resource>, ProviderError> {
        let store_err = |e: crate::Error| ProviderError::retryable("store_unavailable", e.to_string());
        let kind = self.fan_out.kind;
        let id = parent.id.to_string();
        let mut found = crate::service::live_where(self.store.as_ref(), kind, |r| {
            kind.parent(&r.spec).is_some_and(|p| p.kind == parent.kind && (p.key == parent.name || p.key == id))
        })
        .await
        .map_err(store_err)?;
        // Dependencies first: take, round after round, those whose
        // references to their siblings are all taken.
        let names = |r: &Resource| -> Vec<String> {
            kind.references(&r.spec).into_iter().filter(|x| x.kind == kind).map(|x| x.key).collect()
        };
        let mut ordered: Vec<Resource> = Vec::new();
        while !found.is_empty() {
            let is_sibling = |k: &String| found.iter().any(|f| &f.name == k || &f.id.to_string() == k);
            let (ready, rest): (Vec<_>, Vec<_>) = found.iter().cloned().partition(|r| !names(r).iter().any(is_sibling));
            if ready.is_empty() {
                let left: Vec<&str> = rest.iter().map(|r| r.name.as_str()).collect();
                return Err(ProviderError::fatal(
                    "cycle",
                    format!("these {kind}s wait for each other: {}", left.join(", ")),
                ));
            }
            ordered.extend(ready);
            found = rest;
        }
        Ok(ordered)
    }

    /// Waits until a child run ends; cancels it when the parent is cancelled.
    async fn wait(&self, ctx: &dyn RunContext, run: &Run) -> Result<Run, ProviderError> {
        loop {
            match self.store.get_run(run.id).await {
                Ok(Some(r)) if r.status.is_terminal() => return Ok(r),
                Ok(_) | Err(_) => {}
            }
            if ctx.cancel_requested() {
                let reason = "its parent run was cancelled";
                let _ = self.store.request_cancel(run.id, "drover", Some(reason), chrono::Utc::now()).await;
                return Err(ProviderError::Cancelled);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[async_trait]
impl Provider for FanOutRunner {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        let store_err = |e: crate::Error| ProviderError::retryable("store_unavailable", e.to_string());
        let parent = &job.resource;
        let me = self
            .store
            .get_run(job.run_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| ProviderError::fatal("run_missing", "the run being executed is not in the store"))?;
        let FanOut { kind, action, done } = self.fan_out;
        let children = self.children(parent).await?;
        let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        let msg = match names.is_empty() {
            true => format!("no {kind} lives on {} {}: nothing to do", job.kind, parent.name),
            false => format!("{action} {} {kind}(s) in this order: {}", names.len(), names.join(", ")),
        };
        ctx.event(NewEvent::info("plan", msg).with_data(json!({ "order": names }))).await;
        for child in &children {
            ctx.check_cancel()?;
            let filter = RunFilter { parent: Some(job.run_id), resource: Some(child.id), ..Default::default() };
            let earlier =
                self.store.list_runs(&filter, PageRequest { after: None, limit: 1 }).await.map_err(store_err)?;
            let run = match earlier.into_iter().next() {
                Some(run) => {
                    let msg = format!("{kind} {}: adopting run {} asked for by an earlier attempt", child.name, run.id);
                    ctx.event(NewEvent::info("child", msg)).await;
                    run
                }
                None if done.contains(&child.state.as_str()) => {
                    let msg = format!("{kind} {} is {} already", child.name, child.state);
                    ctx.event(NewEvent::info("child", msg).with_data(json!({ "name": child.name }))).await;
                    continue;
                }
                None => {
                    let req = TransitionRequest {
                        action: action.to_string(),
                        params: Value::Null,
                        reason: Some(format!("{} of {} {}", job.action, job.kind, parent.name)),
                        actor: me.actor.clone(),
                        idempotency_key: None,
                        may_operate_protected: true,
                        parent: Some(job.run_id),
                    };
                    let run = self.requester.request(kind, &child.id.to_string(), req).await.map_err(|e| {
                        ProviderError::fatal(
                            "child_refused",
                            format!("{kind} {}: {action} was refused: {e}", child.name),
                        )
                    })?;
                    let msg = format!("{kind} {}: {action} asked for (run {})", child.name, run.id);
                    ctx.event(NewEvent::info("child", msg).with_data(json!({ "name": child.name, "run": run.id })))
                        .await;
                    run
                }
            };
            let ended = self.wait(ctx, &run).await?;
            if ended.status != RunStatus::Succeeded {
                let why = ended
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| ended.status.as_str().to_string());
                return Err(ProviderError::fatal(
                    "child_failed",
                    format!("{kind} {}: {action} {}: {why}", child.name, ended.status.as_str()),
                )
                .with_detail(json!({ "run": run.id, "name": child.name })));
            }
            let msg = format!("{kind} {} is {}", child.name, ended.ok_state);
            ctx.event(NewEvent::info("child", msg).with_data(json!({ "name": child.name, "run": run.id }))).await;
        }
        // The parent's own outputs stay as they are.
        Ok(parent.outputs.clone())
    }
}
