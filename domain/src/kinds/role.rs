//! Roles: named sets of permissions (`kind:action`, `kind:*` or `*`).
//! The built-in roles `admin`, `operator` and `viewer` cannot be changed or
//! deleted.
//!
//! ```text
//! active --delete--> deleting --ok--> deleted --err--> active
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{from_json, machine, named_enum, NotAllowed, TypedStep};
use crate::error::{Error, FieldError, Result};

named_enum!(State {
    Active => "active",
    Deleting => "deleting",
    Deleted => "deleted",
});

named_enum!(Action {
    Delete => "delete",
});

machine!();

pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    match (state, action) {
        (State::Active, Action::Delete) => {
            Ok(TypedStep::Go { working: State::Deleting, ok: State::Deleted, err: State::Active })
        }
        (State::Deleting | State::Deleted, Action::Delete) => Err(NotAllowed),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Spec {
    pub fn from_value(v: &Value) -> Result<Spec> {
        let spec: Spec = from_json("spec", v)?;
        let errors: Vec<_> = spec
            .permissions
            .iter()
            .enumerate()
            .filter(|(_, p)| !crate::auth::valid_permission(p))
            .map(|(i, _)| FieldError::new(format!("spec.permissions[{i}]"), "must be kind:action, kind:* or *"))
            .collect();
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(Error::Invalid(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_of_the_table() {
        let delete = Ok(TypedStep::Go { working: State::Deleting, ok: State::Deleted, err: State::Active });
        assert_eq!(next(State::Active, Action::Delete), delete);
        assert_eq!(next(State::Deleting, Action::Delete), Err(NotAllowed));
        assert_eq!(next(State::Deleted, Action::Delete), Err(NotAllowed));
    }
}
