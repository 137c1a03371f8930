//! Roles: named sets of permissions (`kind:action`, `kind:*` or `*`).
//! The built-in roles `admin`, `operator` and `viewer` cannot be changed or
//! deleted; their permissions are derived from the registry, so a new kind
//! reaches operators and viewers without a change here.
//!
//! Its state machine is [`super::record`]'s: active until deleted.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use super::record::{Action, State};
use super::{record, ActionDecl, Declaration, Kind, NotAllowed, TypedStep, SCOPES};
use crate::error::{FieldError, Result};

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Role>();

/// The role kind's declaration.
pub struct Role;

impl Declaration for Role {
    const NAME: &'static str = "role";
    const PLURAL: &'static str = "roles";
    const DESCRIPTION: &'static str = "A named set of permissions (kind:action).";
    const ADMIN_ONLY: bool = true;
    type State = State;
    type Action = Action;
    type Spec = Spec;
    const INITIAL: State = State::Active;
    const FINAL: State = State::Deleted;
    const APPLIED_ON_WRITE: bool = true;

    fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
        record::next(state, action)
    }

    fn action(action: Action) -> ActionDecl {
        match action {
            Action::Delete => ActionDecl::new("Deletes the role; users that had it lose its permissions.", 60),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        spec.permissions
            .iter()
            .enumerate()
            .filter(|(_, p)| !valid_permission(p))
            .map(|(i, _)| {
                FieldError::new(
                    format!("spec.permissions[{i}]"),
                    "must be *, KIND:*, KIND:VERB or KIND:ACTION of a known kind, or a scope (GET /v1/kinds lists them)",
                )
            })
            .collect()
    }

    fn locked(name: &str) -> Option<String> {
        is_builtin_role(name).then(|| format!("role {name} is built in and cannot be changed or deleted"))
    }

    fn examples() -> Vec<Value> {
        vec![json!({"permissions": ["cluster:read", "cluster:scale"], "description": "Scales clusters."})]
    }
}

/// A role's permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = known_permissions)]
pub struct Spec {
    /// `kind:action` (e.g. `cluster:scale`), `kind:verb` (`read`, `create`,
    /// `update`, `delete`, `cancel`), `kind:*`, a scope such as
    /// `settings:write`, or `*`.
    pub permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Every permission [`valid_permission`] accepts, as the schema's enum.
fn known_permissions(schema: &mut schemars::Schema) {
    let mut all: Vec<String> = vec!["*".to_string()];
    let named = Kind::all().flat_map(Kind::permissions).chain(SCOPES.iter().map(|(s, _)| s.to_string()));
    for p in named {
        let wild = format!("{}:*", p.split_once(':').map_or("", |(k, _)| k));
        for candidate in [p, wild] {
            if !all.contains(&candidate) {
                all.push(candidate);
            }
        }
    }
    if let Some(items) = schema.get_mut("properties").and_then(|p| p.get_mut("permissions")) {
        items["items"] = json!({"type": "string", "enum": all});
    }
}

/// `*` grants everything, `kind:*` every permission that starts `kind:`.
pub fn permits(granted: &str, wanted: &str) -> bool {
    granted == "*"
        || granted == wanted
        || granted.strip_suffix(":*").is_some_and(|k| wanted.split_once(':').is_some_and(|(wk, _)| wk == k))
        // Who manages users and roles reads them.
        || (granted == "users:admin" && Kind::all().any(|k| k.admin_only() && k.permission("read") == wanted))
}

/// Whether `p` names something a permission check asks for: `*`, a kind's
/// verb or action, a scope, or `prefix:*` of either.
pub fn valid_permission(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    let known = || Kind::all().flat_map(Kind::permissions).chain(SCOPES.iter().map(|(s, _)| s.to_string()));
    match p.strip_suffix(":*") {
        Some(prefix) => known().any(|k| k.split_once(':').is_some_and(|(kp, _)| kp == prefix)),
        None => known().any(|k| k == p),
    }
}

/// The roles every installation has, with their permissions: `admin` may
/// do everything; `operator` every verb and action of the kinds that are
/// not access control (but not operating protected environments), and
/// writing settings; `viewer` reads them.
pub fn builtin_roles() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let operational = || Kind::all().filter(|k| !k.admin_only());
    let access_control = || Kind::all().filter(|k| k.admin_only());
    let mut operator: Vec<String> = operational().flat_map(Kind::permissions).collect();
    operator.extend(access_control().map(|k| k.permission("read")));
    let mut viewer: Vec<String> = Kind::all().map(|k| k.permission("read")).collect();
    for (scope, _) in SCOPES {
        if ["transitions:read", "kinds:read", "settings:read", "metrics:read", "discovery:read"].contains(scope) {
            viewer.push(scope.to_string());
            operator.push(scope.to_string());
        }
    }
    operator.push("settings:write".to_string());
    vec![
        ("admin", "Everything, including users, roles and revealing secrets.", vec!["*".to_string()]),
        (
            "operator",
            "Runs images, clusters and environments and writes settings; reads users and roles but cannot \
             manage them, reveal secrets or change protected environments.",
            operator,
        ),
        (
            "viewer",
            "Reads every resource, users and roles included, and changes nothing; no secret values, no API tokens.",
            viewer,
        ),
    ]
}

pub fn is_builtin_role(name: &str) -> bool {
    ["admin", "operator", "viewer"].contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_matching() {
        assert!(permits("*", "cluster:scale"));
        assert!(permits("cluster:*", "cluster:scale"));
        assert!(permits("cluster:scale", "cluster:scale"));
        assert!(!permits("cluster:*", "image:build"));
        assert!(!permits("cluster:stop", "cluster:scale"));
        assert!(!permits("cluster", "cluster:scale"));
    }

    #[test]
    fn permissions_come_from_the_registry() {
        for ok in ["*", "cluster:*", "cluster:scale", "cluster:read", "image:cancel", "settings:reveal", "users:admin"]
        {
            assert!(valid_permission(ok), "{ok}");
        }
        assert!(valid_permission("environment:operate-protected"));
        for bad in ["", "cluster", ":scale", "cluster:", "Cluster:scale", "a:b:c", "*:*", "cluster:frob", "nope:*"] {
            assert!(!valid_permission(bad), "{bad}");
        }
    }

    #[test]
    fn builtin_roles_are_valid_and_derived() {
        let roles = builtin_roles();
        for (name, _, perms) in &roles {
            assert!(is_builtin_role(name));
            assert!(perms.iter().all(|p| valid_permission(p)), "{name}");
        }
        let operator = &roles[1].2;
        assert!(operator.contains(&"cluster:scale".to_string()));
        assert!(operator.contains(&"environment:create".to_string()));
        assert!(!operator.iter().any(|p| p == "users:admin" || p == "settings:reveal"));
        assert!(!operator.iter().any(|p| permits(p, super::super::environment::OPERATE_PROTECTED)));
        let viewer = &roles[2].2;
        for kind in Kind::all() {
            assert!(viewer.contains(&kind.permission("read")), "viewer reads {kind}");
            assert!(operator.contains(&kind.permission("read")), "operator reads {kind}");
        }
        assert!(!viewer.iter().any(|p| p.ends_with(":create") || p == "settings:write" || p == "users:admin"));
        assert!(!viewer.iter().any(|p| p == "settings:reveal"));
        // Managing users and roles implies reading them; reading does not
        // imply managing.
        assert!(permits("users:admin", "user:read") && permits("users:admin", "role:read"));
        assert!(!permits("user:read", "users:admin"));
    }
}
