//! The `builtin` provider: kinds whose transitions change only drover's own
//! records (users, roles, environments). The state change the engine writes
//! is the whole effect: a disabled user's tokens stop working because
//! authentication reads the user's state.
//!
//! It is registered for every kind of the registry: a kind whose specs name
//! no other provider (the declaration's default) needs nothing here.

use std::sync::Arc;

use async_trait::async_trait;
use drover_domain::engine::Providers;
use drover_domain::kinds::{Kind, BUILTIN_PROVIDER};
use drover_domain::model::NewEvent;
use drover_domain::ports::{Job, Provider, ProviderError, RunContext};
use serde_json::{json, Value};

pub struct Builtin;

#[async_trait]
impl Provider for Builtin {
    async fn apply(&self, ctx: &dyn RunContext, job: &Job) -> Result<Value, ProviderError> {
        ctx.event(NewEvent::info(job.action.clone(), format!("{} {} {}", job.kind, job.resource.name, job.action)))
            .await;
        Ok(json!({}))
    }
}

pub fn register(providers: &mut Providers) {
    for kind in Kind::all() {
        providers.register(BUILTIN_PROVIDER, kind, Arc::new(Builtin));
    }
}
