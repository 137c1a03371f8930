//! Environments: where clusters (and later services and routers) live, a
//! scope of settings between global and a cluster's own, and a guard: a
//! `protected` environment requires a reason on every transition of a
//! resource in it, and the permission [`OPERATE_PROTECTED`] besides the
//! action's own.
//!
//! Its state machine is [`super::record`]'s: active until deleted.
//!
//! An environment cannot be deleted while live resources are in it (the
//! registry's reference check: a cluster's `spec.environment` names it).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use super::record::{Action, State};
use super::{record, ActionDecl, Declaration, Kind, NotAllowed, TypedStep};
use crate::error::{FieldError, Result};

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Environment>();

/// What changing a resource in a protected environment needs, besides the
/// action's own permission. (`environment:*` grants it.)
pub const OPERATE_PROTECTED: &str = "environment:operate-protected";

/// The environment kind's declaration.
pub struct Environment;

impl Declaration for Environment {
    const NAME: &'static str = "environment";
    const PLURAL: &'static str = "environments";
    const DESCRIPTION: &'static str =
        "Where clusters live: a scope of settings, and when protected a guard on every change in it.";
    type State = State;
    type Action = Action;
    type Spec = Spec;
    const INITIAL: State = State::Active;
    const FINAL: State = State::Deleted;
    const HOLDS_RESOURCES: bool = true;
    const APPLIED_ON_WRITE: bool = true;

    fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
        record::next(state, action)
    }

    fn action(action: Action) -> ActionDecl {
        match action {
            Action::Delete => ActionDecl::new("Deletes the environment (refused while resources are in it).", 60),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        match spec.description.chars().count() {
            0..=1000 => Vec::new(),
            _ => vec![FieldError::new("spec.description", "at most 1000 characters")],
        }
    }

    fn examples() -> Vec<Value> {
        vec![json!({"description": "Production, us-east-1", "protected": true}), json!({})]
    }
}

/// An environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// What the environment is for.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub description: String,
    /// When true, every transition of a resource in it needs a `reason`
    /// and the permission `environment:operate-protected`.
    #[serde(default)]
    pub protected: bool,
}

/// Whether an environment's (stored) spec is protected.
pub fn is_protected(spec: &Value) -> bool {
    spec.get("protected").and_then(Value::as_bool).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let v = KIND.validate_spec(&json!({})).unwrap();
        assert_eq!(v, json!({"description": "", "protected": false}));
        assert!(is_protected(&KIND.validate_spec(&json!({"protected": true})).unwrap()));
        let e = KIND.validate_spec(&json!({"protected": "yes"})).unwrap_err();
        assert!(matches!(e, crate::Error::Invalid(f) if f[0].field == "spec.protected"));
    }
}
