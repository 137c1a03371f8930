//! Clusters: a group of instances started from an image.
//!
//! ```text
//! pending --create--> creating --ok--> up   --err--> failed
//! up --scale{count}--> scaling --ok--> up   --err--> failed
//! up --stop--> stopping --ok--> down        --err--> failed
//! down --start--> starting --ok--> up       --err--> failed
//! pending|up|down|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! failed --retry--> the working state of the action that failed
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{from_json, machine, named_enum, Dependency, Kind, NotAllowed, TypedStep};
use crate::error::{Error, FieldError, Result};

pub const MAX_COUNT: u32 = 64;

named_enum!(State {
    Pending => "pending",
    Creating => "creating",
    Up => "up",
    Scaling => "scaling",
    Stopping => "stopping",
    Down => "down",
    Starting => "starting",
    Failed => "failed",
    Destroying => "destroying",
    Destroyed => "destroyed",
});

named_enum!(Action {
    Create => "create",
    Scale => "scale",
    Stop => "stop",
    Start => "start",
    Destroy => "destroy",
    Retry => "retry",
});

machine!();

/// The cluster transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    let go = |working, ok| Ok(TypedStep::Go { working, ok, err: S::Failed });
    match (state, action) {
        (S::Pending, A::Create) => go(S::Creating, S::Up),
        (S::Up, A::Scale) => go(S::Scaling, S::Up),
        (S::Up, A::Stop) => go(S::Stopping, S::Down),
        (S::Down, A::Start) => go(S::Starting, S::Up),
        (S::Pending | S::Up | S::Down | S::Failed, A::Destroy) => go(S::Destroying, S::Destroyed),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        (S::Pending, A::Scale | A::Stop | A::Start | A::Retry) => Err(NotAllowed),
        (S::Up, A::Create | A::Start | A::Retry) => Err(NotAllowed),
        (S::Down, A::Create | A::Scale | A::Stop | A::Retry) => Err(NotAllowed),
        (S::Failed, A::Create | A::Scale | A::Stop | A::Start) => Err(NotAllowed),
        (
            S::Creating | S::Scaling | S::Stopping | S::Starting | S::Destroying | S::Destroyed,
            A::Create | A::Scale | A::Stop | A::Start | A::Destroy | A::Retry,
        ) => Err(NotAllowed),
    }
}

/// How an instance shows it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    /// `GET path` on the instance's port answers 2xx or 3xx.
    Http { path: String },
    /// A TCP connection to the instance's port succeeds.
    Tcp,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck::Http { path: "/".to_string() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default = "default_provider")]
    pub provider: String,
    /// The image (name or id) instances start from.
    pub image: String,
    /// Number of instances.
    pub count: u32,
    /// The environment whose settings apply (between global and the cluster's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default)]
    pub health_check: HealthCheck,
    /// How long one instance may take to pass its health check (seconds).
    #[serde(default = "default_start_timeout")]
    pub start_timeout_secs: u64,
}

fn default_provider() -> String {
    "local".to_string()
}

fn default_start_timeout() -> u64 {
    30
}

impl Spec {
    pub fn from_value(v: &Value) -> Result<Spec> {
        let spec: Spec = from_json("spec", v)?;
        let mut errors = Vec::new();
        if spec.provider != "local" {
            errors.push(FieldError::new("spec.provider", "unknown provider; known: local"));
        }
        if spec.image.trim().is_empty() {
            errors.push(FieldError::new("spec.image", "must name an image"));
        }
        if spec.environment.as_deref().is_some_and(|e| crate::service::validate_name(e).is_err()) {
            errors.push(FieldError::new("spec.environment", "not an environment name"));
        }
        if spec.count == 0 || spec.count > MAX_COUNT {
            errors.push(FieldError::new("spec.count", format!("must be between 1 and {MAX_COUNT}")));
        }
        if let HealthCheck::Http { path } = &spec.health_check {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errors.push(FieldError::new("spec.health_check.path", "must be an absolute path without spaces"));
            }
        }
        if spec.start_timeout_secs == 0 || spec.start_timeout_secs > 3600 {
            errors.push(FieldError::new("spec.start_timeout_secs", "must be between 1 and 3600"));
        }
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(Error::Invalid(errors))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleParams {
    count: u32,
}

pub fn validate_params(action: &str, params: &Value) -> Result<Value> {
    match Action::parse(action) {
        Some(Action::Scale) => {
            let p: ScaleParams = from_json("params", params)?;
            if p.count == 0 || p.count > MAX_COUNT {
                return Err(Error::invalid("params.count", format!("must be between 1 and {MAX_COUNT}")));
            }
            Ok(serde_json::json!({ "count": p.count }))
        }
        Some(Action::Create | Action::Stop | Action::Start | Action::Destroy | Action::Retry) | None => {
            no_params(params)
        }
    }
}

/// Actions without parameters accept `null` or `{}` only.
pub(crate) fn no_params(params: &Value) -> Result<Value> {
    match params {
        Value::Null => Ok(Value::Object(Default::default())),
        Value::Object(m) if m.is_empty() => Ok(params.clone()),
        _ => Err(Error::invalid("params", "this action takes no parameters")),
    }
}

pub fn dependencies(spec: &Value, action: &str) -> Vec<Dependency> {
    let starts_instances = takes_settings(action);
    match (starts_instances, spec.get("image").and_then(Value::as_str)) {
        (true, Some(image)) => vec![Dependency {
            kind: Kind::Image,
            key: image.to_string(),
            field: "spec.image",
            required_state: super::image::State::Built.as_str(),
        }],
        _ => Vec::new(),
    }
}

/// Actions that start instances hand them the cluster's settings.
pub fn takes_settings(action: &str) -> bool {
    matches!(Action::parse(action), Some(Action::Create | Action::Start | Action::Scale))
}

pub fn spec_after_success(action: &str, params: &Value, spec: &Value) -> Option<Value> {
    match Action::parse(action) {
        Some(Action::Scale) => {
            let mut spec = spec.clone();
            spec["count"] = params.get("count")?.clone();
            Some(spec)
        }
        _ => None,
    }
}

pub fn default_timeout_secs(action: &str) -> u64 {
    match Action::parse(action) {
        Some(Action::Create | Action::Scale | Action::Start) => 600,
        Some(Action::Stop | Action::Destroy | Action::Retry) | None => 300,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use State as S;

    fn go(w: S, ok: S) -> Result<TypedStep<S>, NotAllowed> {
        Ok(TypedStep::Go { working: w, ok, err: S::Failed })
    }

    #[test]
    fn every_entry_of_the_table() {
        let no = Err(NotAllowed);
        let destroy = go(S::Destroying, S::Destroyed);
        // columns: create, scale, stop, start, destroy, retry
        let expected = [
            (S::Pending, [go(S::Creating, S::Up), no, no, no, destroy, no]),
            (S::Creating, [no; 6]),
            (S::Up, [no, go(S::Scaling, S::Up), go(S::Stopping, S::Down), no, destroy, no]),
            (S::Scaling, [no; 6]),
            (S::Stopping, [no; 6]),
            (S::Down, [no, no, no, go(S::Starting, S::Up), destroy, no]),
            (S::Starting, [no; 6]),
            (S::Failed, [no, no, no, no, destroy, Ok(TypedStep::Retry)]),
            (S::Destroying, [no; 6]),
            (S::Destroyed, [no; 6]),
        ];
        assert_eq!(expected.len(), State::ALL.len());
        for (state, row) in expected {
            for (action, want) in [A::Create, A::Scale, A::Stop, A::Start, A::Destroy, A::Retry].into_iter().zip(row) {
                assert_eq!(next(state, action), want, "{state:?} --{action:?}-->");
            }
        }
    }

    #[test]
    fn no_dead_ends() {
        // Every state but `destroyed` has a way out that ends in `destroyed`.
        for &s in State::ALL {
            let exits: Vec<_> = Action::ALL.iter().filter(|&&a| next(s, a).is_ok()).collect();
            let working = matches!(s, S::Creating | S::Scaling | S::Stopping | S::Starting | S::Destroying);
            assert_eq!(exits.is_empty(), working || s == S::Destroyed, "{s:?}: {exits:?}");
        }
    }

    #[test]
    fn scale_params_are_checked() {
        assert!(validate_params("scale", &serde_json::json!({"count": 3})).is_ok());
        let e = validate_params("scale", &serde_json::json!({"count": 0})).unwrap_err();
        assert!(matches!(e, Error::Invalid(f) if f[0].field == "params.count"));
        let e = validate_params("scale", &serde_json::json!({})).unwrap_err();
        assert!(matches!(e, Error::Invalid(f) if f[0].field == "params.count"));
        let e = validate_params("stop", &serde_json::json!({"count": 1})).unwrap_err();
        assert!(matches!(e, Error::Invalid(f) if f[0].field == "params"));
    }

    #[test]
    fn scale_success_updates_count() {
        let spec = serde_json::json!({"image": "i", "count": 2});
        let after = spec_after_success("scale", &serde_json::json!({"count": 5}), &spec).unwrap();
        assert_eq!(after["count"], 5);
        assert_eq!(spec_after_success("stop", &Value::Null, &spec), None);
    }

    #[test]
    fn spec_defaults() {
        let s = Spec::from_value(&serde_json::json!({"image": "web", "count": 2})).unwrap();
        assert_eq!(s.health_check, HealthCheck::Http { path: "/".into() });
        assert_eq!(s.provider, "local");
        let e = Spec::from_value(
            &serde_json::json!({"image": "web", "count": 2, "health_check": {"type": "http", "path": "x y"}}),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Invalid(f) if f[0].field == "spec.health_check.path"));
    }
}
