//! Machine images.
//!
//! ```text
//! pending --build--> building --ok--> built   --err--> failed
//! built --build--> building (rebuild from the current spec)
//! pending|built|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! failed --retry--> the working state of the action that failed
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{from_json, machine, named_enum, NotAllowed, TypedStep};
use crate::error::{Error, Result};

named_enum!(State {
    Pending => "pending",
    Building => "building",
    Built => "built",
    Failed => "failed",
    Destroying => "destroying",
    Destroyed => "destroyed",
});

named_enum!(Action {
    Build => "build",
    Destroy => "destroy",
    Retry => "retry",
});

machine!();

/// The image transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    let build = TypedStep::Go { working: S::Building, ok: S::Built, err: S::Failed };
    let destroy = TypedStep::Go { working: S::Destroying, ok: S::Destroyed, err: S::Failed };
    match (state, action) {
        (S::Pending, A::Build) | (S::Built, A::Build) => Ok(build),
        (S::Pending | S::Built | S::Failed, A::Destroy) => Ok(destroy),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        (S::Failed, A::Build) => Err(NotAllowed), // a failed build is retried, so its lineage is kept
        (S::Pending | S::Built, A::Retry) => Err(NotAllowed),
        (S::Building | S::Destroying | S::Destroyed, A::Build | A::Destroy | A::Retry) => Err(NotAllowed),
    }
}

/// What an image is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default = "default_provider")]
    pub provider: String,
    /// Shell command run in a fresh directory; the directory is the image.
    pub build_command: String,
    /// Shell command that starts one instance of the image; `PORT` is set.
    pub start_command: String,
    /// Overrides the build timeout (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_timeout_secs: Option<u64>,
}

fn default_provider() -> String {
    "local".to_string()
}

impl Spec {
    pub fn from_value(v: &Value) -> Result<Spec> {
        let spec: Spec = from_json("spec", v)?;
        let mut errors = Vec::new();
        if spec.provider != "local" {
            errors.push(crate::FieldError::new("spec.provider", "unknown provider; known: local"));
        }
        if spec.build_command.trim().is_empty() {
            errors.push(crate::FieldError::new("spec.build_command", "must not be empty"));
        }
        if spec.start_command.trim().is_empty() {
            errors.push(crate::FieldError::new("spec.start_command", "must not be empty"));
        }
        if let Some(t) = spec.build_timeout_secs {
            if t == 0 || t > 24 * 3600 {
                errors.push(crate::FieldError::new("spec.build_timeout_secs", "must be between 1 and 86400"));
            }
        }
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(Error::Invalid(errors))
        }
    }
}

pub fn validate_params(action: &str, params: &Value) -> Result<Value> {
    match Action::parse(action) {
        Some(Action::Build | Action::Destroy | Action::Retry) | None => super::cluster::no_params(params),
    }
}

pub fn default_timeout_secs(action: &str) -> u64 {
    match Action::parse(action) {
        Some(Action::Build) => 1800,
        Some(Action::Destroy | Action::Retry) | None => 300,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State as S;

    fn go(w: S, ok: S, err: S) -> Result<TypedStep<S>, NotAllowed> {
        Ok(TypedStep::Go { working: w, ok, err })
    }

    #[test]
    fn every_entry_of_the_table() {
        let build = go(S::Building, S::Built, S::Failed);
        let destroy = go(S::Destroying, S::Destroyed, S::Failed);
        let no = Err(NotAllowed);
        let expected = [
            (S::Pending, [build, destroy, no]),
            (S::Building, [no, no, no]),
            (S::Built, [build, destroy, no]),
            (S::Failed, [no, destroy, Ok(TypedStep::Retry)]),
            (S::Destroying, [no, no, no]),
            (S::Destroyed, [no, no, no]),
        ];
        assert_eq!(expected.len(), State::ALL.len());
        for (state, row) in expected {
            for (action, want) in [Action::Build, Action::Destroy, Action::Retry].into_iter().zip(row) {
                assert_eq!(next(state, action), want, "{state:?} --{action:?}-->");
            }
        }
    }

    #[test]
    fn every_failed_state_has_an_exit() {
        assert!(next(S::Failed, Action::Retry).is_ok());
        assert!(next(S::Failed, Action::Destroy).is_ok());
    }

    #[test]
    fn spec_validation_names_the_field() {
        let err = Spec::from_value(&serde_json::json!({"build_command": "true"})).unwrap_err();
        match err {
            Error::Invalid(f) => assert_eq!(f[0].field, "spec.start_command"),
            other => panic!("{other:?}"),
        }
        let err = Spec::from_value(&serde_json::json!({"build_command": " ", "start_command": "x", "provider": "gce"}))
            .unwrap_err();
        match err {
            Error::Invalid(f) => {
                let fields: Vec<_> = f.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, ["spec.provider", "spec.build_command"]);
            }
            other => panic!("{other:?}"),
        }
        let ok = Spec::from_value(&serde_json::json!({"build_command": "true", "start_command": "sleep 1"})).unwrap();
        assert_eq!(ok.provider, "local");
    }
}
