//! Users: who may call the API. A user's state decides whether its tokens
//! work; its roles decide what they may do.
//!
//! ```text
//! active --disable--> disabling --ok--> disabled  --err--> active
//! disabled --enable--> enabling --ok--> active    --err--> disabled
//! active|disabled --delete--> deleting --ok--> deleted --err--> disabled
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{is_name, named_enum, role, ActionDecl, Declaration, Kind, NotAllowed, Reference, TypedStep};
use crate::error::{FieldError, Result};

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<User>();

/// The user kind's declaration.
pub struct User;

named_enum!(State {
    Active => "active",
    Disabling => "disabling",
    Disabled => "disabled",
    Enabling => "enabling",
    Deleting => "deleting",
    Deleted => "deleted",
});

named_enum!(Action {
    Disable => "disable",
    Enable => "enable",
    Delete => "delete",
});

impl Declaration for User {
    const NAME: &'static str = "user";
    const PLURAL: &'static str = "users";
    const DESCRIPTION: &'static str = "Someone who calls the API with bearer tokens; roles grant permissions.";
    const ADMIN_ONLY: bool = true;
    type State = State;
    type Action = Action;
    type Spec = Spec;
    const INITIAL: State = State::Active;
    const FINAL: State = State::Deleted;
    const APPLIED_ON_WRITE: bool = true;

    fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
        next(state, action)
    }

    fn action(action: Action) -> ActionDecl {
        match action {
            Action::Disable => ActionDecl::new("Stops the user's tokens from working.", 60),
            Action::Enable => ActionDecl::new("Lets a disabled user's tokens work again.", 60),
            Action::Delete => ActionDecl::new("Deletes the user; its tokens stop for good.", 60),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (i, r) in spec.roles.iter().enumerate() {
            if !is_name(r) {
                errors.push(FieldError::new(format!("spec.roles[{i}]"), "not a role name"));
            }
        }
        if spec.email.as_ref().is_some_and(|e| !e.contains('@') || e.len() > 254) {
            errors.push(FieldError::new("spec.email", "not an email address"));
        }
        errors
    }

    fn references(spec: &Spec) -> Vec<Reference> {
        spec.roles.iter().enumerate().map(|(i, r)| Reference::new(role::KIND, r, format!("spec.roles[{i}]"))).collect()
    }

    fn examples() -> Vec<Value> {
        vec![json!({"roles": ["operator"], "email": "alice@example.com"}), json!({})]
    }
}

pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    match (state, action) {
        (S::Active, A::Disable) => Ok(TypedStep::Go { working: S::Disabling, ok: S::Disabled, err: S::Active }),
        (S::Disabled, A::Enable) => Ok(TypedStep::Go { working: S::Enabling, ok: S::Active, err: S::Disabled }),
        (S::Active | S::Disabled, A::Delete) => {
            Ok(TypedStep::Go { working: S::Deleting, ok: S::Deleted, err: S::Disabled })
        }
        (S::Active, A::Enable) | (S::Disabled, A::Disable) => Err(NotAllowed),
        (S::Disabling | S::Enabling | S::Deleting | S::Deleted, A::Disable | A::Enable | A::Delete) => Err(NotAllowed),
    }
}

/// A user's roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Role names; the user may do what any of them permits.
    #[serde(default)]
    #[schemars(inner(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")))]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254), regex(pattern = "@"))]
    pub email: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use State as S;

    #[test]
    fn every_entry_of_the_table() {
        let no = Err(NotAllowed);
        let go = |w, ok, err| Ok(TypedStep::Go { working: w, ok, err });
        let delete = go(S::Deleting, S::Deleted, S::Disabled);
        let expected = [
            (S::Active, [go(S::Disabling, S::Disabled, S::Active), no, delete]),
            (S::Disabling, [no; 3]),
            (S::Disabled, [no, go(S::Enabling, S::Active, S::Disabled), delete]),
            (S::Enabling, [no; 3]),
            (S::Deleting, [no; 3]),
            (S::Deleted, [no; 3]),
        ];
        assert_eq!(expected.len(), State::ALL.len());
        for (state, row) in expected {
            for (action, want) in [A::Disable, A::Enable, A::Delete].into_iter().zip(row) {
                assert_eq!(next(state, action), want, "{state:?} --{action:?}-->");
            }
        }
    }
}
