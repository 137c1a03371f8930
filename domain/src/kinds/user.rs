//! Users: who may call the API. A user's state decides whether its tokens
//! work; its roles decide what they may do.
//!
//! ```text
//! active --disable--> disabling --ok--> disabled  --err--> active
//! disabled --enable--> enabling --ok--> active    --err--> disabled
//! active|disabled --delete--> deleting --ok--> deleted --err--> disabled
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{from_json, machine, named_enum, NotAllowed, TypedStep};
use crate::error::{Error, FieldError, Result};

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

machine!();

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Role names; permissions are the union of the roles'.
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

impl Spec {
    pub fn from_value(v: &Value) -> Result<Spec> {
        let spec: Spec = from_json("spec", v)?;
        let mut errors = Vec::new();
        for (i, r) in spec.roles.iter().enumerate() {
            if crate::service::validate_name(r).is_err() {
                errors.push(FieldError::new(format!("spec.roles[{i}]"), "not a role name"));
            }
        }
        if spec.email.as_ref().is_some_and(|e| !e.contains('@') || e.len() > 254) {
            errors.push(FieldError::new("spec.email", "not an email address"));
        }
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
