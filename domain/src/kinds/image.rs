//! Machine images.
//!
//! ```text
//! pending --build--> building --ok--> built   --err--> failed
//! built --build--> built (a rebuild from the current spec: the current
//!                   build stays current, and usable, until a new one succeeds)
//! pending|built|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! failed --retry--> the working state of the action that failed
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{named_enum, ActionDecl, Declaration, Kind, NotAllowed, TypedStep};
use crate::error::{FieldError, Result};

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Image>();

/// The image kind's declaration.
pub struct Image;

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
    Refresh => "refresh",
});

impl Declaration for Image {
    const NAME: &'static str = "image";
    const PLURAL: &'static str = "images";
    const DESCRIPTION: &'static str = "A machine image: built once by a provider, then used by clusters.";
    type State = State;
    type Action = Action;
    type Spec = Spec;
    const INITIAL: State = State::Pending;
    const FINAL: State = State::Destroyed;
    const DELETABLE_UNSTARTED: bool = true;

    fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
        next(state, action)
    }

    fn action(action: Action) -> ActionDecl {
        match action {
            Action::Build => {
                ActionDecl::new("Builds the image from its spec (again, when it is built).", 1800).applying_spec()
            }
            Action::Destroy => ActionDecl::new("Removes what the build made (directory, or AMI and snapshots).", 300),
            Action::Retry => ActionDecl::new("Repeats the action that failed.", 300),
            Action::Refresh => ActionDecl::new(
                "Compares the current build on record with what is there (its directory and marker; on aws its \
                 AMI) and records the differences as the image's drift. Changes nothing.",
                120,
            )
            .refreshing(),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        spec.check()
    }

    fn provider(spec: &Spec) -> String {
        spec.provider.clone()
    }

    fn timeout_secs(spec: &Spec, action: Action) -> u64 {
        match (action, spec.build_timeout_secs) {
            (Action::Build, Some(t)) => t,
            _ => Self::action(action).timeout_secs,
        }
    }

    fn examples() -> Vec<Value> {
        vec![
            json!({"build_command": "echo hello > index.html",
                "start_command": "exec python3 -m http.server $PORT --bind 127.0.0.1"}),
            json!({"provider": "aws", "base_ami": "ami-0abcdef1234567890", "instance_type": "t3.micro",
                "build_script": "#!/bin/sh\necho hi", "builder_shutdown": false, "build_timeout_secs": 900}),
        ]
    }
}

/// The image transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    let build = TypedStep::Go { working: S::Building, ok: S::Built, err: S::Failed };
    // A rebuild never takes the current build away: the image stays built
    // (clusters and services go on scaling, starting and repairing from
    // it) while it runs, and after it fails or is cancelled.
    let rebuild = TypedStep::Go { working: S::Built, ok: S::Built, err: S::Built };
    let destroy = TypedStep::Go { working: S::Destroying, ok: S::Destroyed, err: S::Failed };
    match (state, action) {
        (S::Pending, A::Build) => Ok(build),
        (S::Built, A::Build) => Ok(rebuild),
        (S::Pending | S::Built | S::Failed, A::Destroy) => Ok(destroy),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        (S::Failed, A::Build) => Err(NotAllowed), // a failed build is retried, so its lineage is kept
        (S::Pending | S::Built, A::Retry) => Err(NotAllowed),
        (S::Building | S::Destroying | S::Destroyed, A::Build | A::Destroy | A::Retry) => Err(NotAllowed),
        // Looks at the builds on record; changes nothing.
        (S::Built, A::Refresh) => Ok(TypedStep::Go { working: S::Built, ok: S::Built, err: S::Built }),
        (S::Pending | S::Building | S::Failed | S::Destroying | S::Destroyed, A::Refresh) => Err(NotAllowed),
    }
}

/// What an image is built from. Which fields are required depends on the
/// provider: `local` needs `build_command` and `start_command`; `aws` needs
/// `base_ami`, `instance_type` and `build_script`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = provider_rules)]
pub struct Spec {
    /// Provider that builds it: `local` (default) or `aws`.
    #[serde(default = "default_provider")]
    #[schemars(extend("enum" = PROVIDERS))]
    pub provider: String,
    /// local: shell command run in a fresh directory; the directory is the image.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build_command: String,
    /// Shell command that starts one instance of the image (as a service's
    /// instance); `PORT` is set. local: required. aws: optional, run in the
    /// unpacked artifact by the instance's systemd unit (a service's
    /// `command` overrides it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub start_command: String,
    /// aws: the AMI the builder instance starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^ami-[0-9a-fA-F]{8,32}$"))]
    pub base_ami: Option<String>,
    /// aws: the builder's instance type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// aws: the builder's user-data (a shell script or cloud-config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_script: Option<String>,
    /// aws: whether the build script powers the builder off when it is done
    /// (drover then waits for `stopped` before `CreateImage`). When false,
    /// the image is taken as soon as the builder runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_shutdown: Option<bool>,
    /// Overrides the build timeout (seconds, default 1800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub build_timeout_secs: Option<u64>,
    /// aws: the builder's IAM instance profile (name). With an artifact
    /// bucket the bake uploads the build with it: it must allow
    /// `s3:PutObject` on the bucket's `drover/images/` prefix and
    /// `ec2:CreateTags` on the builder itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[\w+=,.@-]{1,128}$"))]
    pub instance_profile: Option<String>,
}

/// What [`Spec::check`] asks of each provider, said in the schema: one
/// branch per provider, with the fields it requires and those it refuses
/// (a refused field may still be empty: `null`, `""`, as validation has it).
fn provider_rules(schema: &mut schemars::Schema) {
    let text = json!({"type": "string", "pattern": "\\S"});
    schema.insert(
        "oneOf".into(),
        json!([
            {"title": "local", "required": ["build_command", "start_command"], "properties": {
                "provider": {"const": "local"}, "build_command": text, "start_command": text,
                "base_ami": {"type": "null"}, "instance_type": {"type": "null"}, "build_script": {"type": "null"},
                "builder_shutdown": {"type": "null"}, "instance_profile": {"type": "null"}}},
            {"title": "aws", "required": ["provider", "base_ami", "instance_type", "build_script"], "properties": {
                "provider": {"const": "aws"}, "base_ami": {"type": "string"}, "instance_type": text,
                "build_script": {"type": "string", "pattern": "\\S", "maxLength": 12 * 1024},
                "build_command": {"const": ""}, "start_command": {"type": "string", "maxLength": 4096}}},
        ]),
    );
}

/// Providers images can be built with.
pub const PROVIDERS: &[&str] = &["local", "aws"];

fn default_provider() -> String {
    "local".to_string()
}

impl Spec {
    /// Checks a spec and returns it typed.
    pub fn from_value(v: &Value) -> Result<Spec> {
        super::read_spec::<Image>(v)
    }

    fn check(&self) -> Vec<FieldError> {
        let spec = self;
        let mut errors = Vec::new();
        let required = |errors: &mut Vec<FieldError>, field: &str, value: &str| {
            if value.trim().is_empty() {
                errors.push(FieldError::new(
                    format!("spec.{field}"),
                    format!("must not be empty (required by provider {})", spec.provider),
                ));
            }
        };
        let forbidden = |errors: &mut Vec<FieldError>, field: &str, set: bool| {
            if set {
                errors
                    .push(FieldError::new(format!("spec.{field}"), format!("not used by provider {}", spec.provider)));
            }
        };
        match spec.provider.as_str() {
            "local" => {
                required(&mut errors, "build_command", &spec.build_command);
                required(&mut errors, "start_command", &spec.start_command);
                forbidden(&mut errors, "base_ami", spec.base_ami.is_some());
                forbidden(&mut errors, "instance_type", spec.instance_type.is_some());
                forbidden(&mut errors, "build_script", spec.build_script.is_some());
                forbidden(&mut errors, "builder_shutdown", spec.builder_shutdown.is_some());
                forbidden(&mut errors, "instance_profile", spec.instance_profile.is_some());
            }
            "aws" => {
                let ami = spec.base_ami.as_deref().unwrap_or("");
                if !super::cluster::aws_id(ami, "ami-") {
                    errors.push(FieldError::new(
                        "spec.base_ami",
                        "must be an AMI id like ami-0abc1234 (required by provider aws)",
                    ));
                }
                required(&mut errors, "instance_type", spec.instance_type.as_deref().unwrap_or(""));
                required(&mut errors, "build_script", spec.build_script.as_deref().unwrap_or(""));
                if spec.build_script.as_ref().is_some_and(|s| s.len() > 16 * 1024 * 3 / 4) {
                    errors.push(FieldError::new(
                        "spec.build_script",
                        "at most 12 KiB (EC2 user-data is limited to 16 KiB once base64-encoded)",
                    ));
                }
                forbidden(&mut errors, "build_command", !spec.build_command.is_empty());
                if spec.start_command.chars().count() > 4096 {
                    errors.push(FieldError::new("spec.start_command", "at most 4096 characters"));
                }
                let profile = |c: char| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c);
                if spec
                    .instance_profile
                    .as_ref()
                    .is_some_and(|p| p.is_empty() || p.len() > 128 || !p.chars().all(profile))
                {
                    errors.push(FieldError::new("spec.instance_profile", "must be an IAM instance profile name"));
                }
            }
            _ => errors
                .push(FieldError::new("spec.provider", format!("unknown provider; known: {}", PROVIDERS.join(", ")))),
        }
        if let Some(t) = spec.build_timeout_secs {
            if t == 0 || t > 24 * 3600 {
                errors.push(FieldError::new("spec.build_timeout_secs", "must be between 1 and 86400"));
            }
        }
        errors
    }
}

/// What a successful `build` leaves in an image's outputs. Every build is
/// an immutable artifact with its own id (the id of the run that made it):
/// a directory locally, an AMI on AWS. `build`'s own fields (with `"id"`)
/// describe the current build at the top level, where clusters read the
/// build they start new instances from, beside `"build"` (its id); every
/// build the provider still keeps (`keep`) is listed in `"builds"`, newest
/// first, the current one marked. A rebuild touches no other build: which
/// ones go is the provider's call, as it alone knows what runs from them.
pub fn outputs_with_build(previous: &Value, build: Value, keep: impl Fn(&str) -> bool) -> Value {
    let id = build["id"].as_str().unwrap_or_default().to_string();
    let mut builds = vec![];
    let mut current = build.clone();
    current["current"] = Value::Bool(true);
    builds.push(current);
    for old in previous["builds"].as_array().into_iter().flatten() {
        let Some(old_id) = old["id"].as_str() else { continue };
        if old_id != id && keep(old_id) {
            let mut old = old.clone();
            old["current"] = Value::Bool(false);
            builds.push(old);
        }
    }
    let mut out = build;
    if let Value::Object(m) = &mut out {
        m.remove("id");
        m.insert("build".into(), Value::String(id));
        m.insert("builds".into(), Value::Array(builds));
    }
    out
}

/// The id of an image's current build, from its outputs.
pub fn current_build(outputs: &Value) -> Option<&str> {
    outputs["build"].as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use State as S;

    fn go(w: S, ok: S, err: S) -> Result<TypedStep<S>, NotAllowed> {
        Ok(TypedStep::Go { working: w, ok, err })
    }

    #[test]
    fn a_build_is_added_to_the_builds_kept() {
        let first = outputs_with_build(&json!({}), json!({"id": "b1", "path": "/i/b1"}), |_| true);
        assert_eq!(first["build"], "b1");
        assert_eq!(first["path"], "/i/b1");
        assert_eq!(first["builds"], json!([{"id": "b1", "path": "/i/b1", "current": true}]));
        let second = outputs_with_build(&first, json!({"id": "b2", "path": "/i/b2"}), |_| true);
        assert_eq!(current_build(&second), Some("b2"));
        assert_eq!(
            second["builds"],
            json!([{"id": "b2", "path": "/i/b2", "current": true}, {"id": "b1", "path": "/i/b1", "current": false}])
        );
        // What the provider no longer keeps leaves the list; the same build
        // adopted again is listed once.
        let third = outputs_with_build(&second, json!({"id": "b3"}), |id| id != "b1");
        let ids: Vec<&str> = third["builds"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["b3", "b2"]);
        let again = outputs_with_build(&third, json!({"id": "b3"}), |_| true);
        assert_eq!(again["builds"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn every_entry_of_the_table() {
        let build = go(S::Building, S::Built, S::Failed);
        let destroy = go(S::Destroying, S::Destroyed, S::Failed);
        let no = Err(NotAllowed);
        let expected = [
            (S::Pending, [build, destroy, no]),
            (S::Building, [no, no, no]),
            (S::Built, [go(S::Built, S::Built, S::Built), destroy, no]),
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
                assert_eq!(fields, ["spec.provider"]);
            }
            other => panic!("{other:?}"),
        }
        let ok = Spec::from_value(&serde_json::json!({"build_command": "true", "start_command": "sleep 1"})).unwrap();
        assert_eq!(ok.provider, "local");
        // A local spec serialises as it always did: no aws fields appear.
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            serde_json::json!({"provider": "local", "build_command": "true", "start_command": "sleep 1"})
        );
    }

    #[test]
    fn aws_specs_name_their_missing_fields() {
        let err = Spec::from_value(&serde_json::json!({"provider": "aws", "base_ami": "web"})).unwrap_err();
        match err {
            Error::Invalid(f) => {
                let fields: Vec<_> = f.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, ["spec.base_ami", "spec.instance_type", "spec.build_script"]);
            }
            other => panic!("{other:?}"),
        }
        let err = Spec::from_value(
            &serde_json::json!({"build_command": "true", "start_command": "x", "base_ami": "ami-1234abcd"}),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Invalid(f) if f[0].field == "spec.base_ami"));
        let ok = Spec::from_value(&serde_json::json!({
            "provider": "aws", "base_ami": "ami-1234abcd", "instance_type": "t3.micro",
            "build_script": "#!/bin/sh\necho hi"}))
        .unwrap();
        assert_eq!(ok.instance_type.as_deref(), Some("t3.micro"));
    }
}
