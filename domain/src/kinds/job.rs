//! Jobs: a one-shot command run on a cluster's machines.
//!
//! ```text
//! ready|failed --run--> running --ok--> ready --err--> failed
//! failed --retry--> running (the run that failed, again)
//! ready|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! ```
//!
//! A job lives on a cluster (its parent: it takes the cluster's settings
//! and environment). A `run` executes `command` once on every machine of the
//! cluster that matches `constraints` (`target: all`), or on one of them
//! (`target: once`), at most `max_concurrency` at a time; it fails once more
//! than `max_errors` targets failed (no new target starts after that). Each
//! target's result — machine, exit code, duration, the last lines of its
//! output with secret values masked — is an event of the run, and the
//! results are the job's outputs (or, for a failed run, its error's
//! detail). Running one needs `job:run`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::service::{check_cluster_provider, check_env, check_machines, constraints_and_env, parse_metadata};
use super::{
    cluster, image, named_enum, ActionDecl, Declaration, Dependency, Kind, NotAllowed, Reference, Referenced, TypedStep,
};
use crate::error::{FieldError, Result};

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Job>();

/// The job kind's declaration.
pub struct Job;

/// The most machines one run reaches at once.
pub const MAX_CONCURRENCY: u32 = 100;

named_enum!(State {
    Ready => "ready",
    Running => "running",
    Failed => "failed",
    Destroying => "destroying",
    Destroyed => "destroyed",
});

named_enum!(Action {
    Run => "run",
    Retry => "retry",
    Destroy => "destroy",
});

/// Providers jobs run on: the cluster's (`aws`: through SSM Run Command).
pub const PROVIDERS: &[&str] = &["local", "aws"];

impl Declaration for Job {
    const NAME: &'static str = "job";
    const PLURAL: &'static str = "jobs";
    const DESCRIPTION: &'static str =
        "A one-shot command run on every machine of a cluster (or those matching constraints, or once).";
    type State = State;
    type Action = Action;
    type Spec = Spec;
    const INITIAL: State = State::Ready;
    const FINAL: State = State::Destroyed;
    const DELETABLE_UNSTARTED: bool = true;

    fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
        next(state, action)
    }

    fn action(action: Action) -> ActionDecl {
        match action {
            Action::Run => ActionDecl::new(
                "Runs the command on the job's targets, at most max_concurrency at a time; fails once more than \\
                 max_errors of them failed.",
                3600,
            )
            .with_settings()
            .applying_spec(),
            Action::Retry => ActionDecl::new("Runs the job again, on all its targets.", 3600),
            Action::Destroy => ActionDecl::new("Removes the job's files on the machines.", 300),
        }
    }

    /// Each target may take `timeout_secs`, `max_concurrency` at a time,
    /// on at most 64 machines.
    fn timeout_secs(spec: &Spec, action: Action) -> u64 {
        match action {
            Action::Run | Action::Retry => {
                let rounds = cluster::MAX_COUNT.div_ceil(spec.max_concurrency.max(1)) as u64;
                spec.timeout_secs.saturating_mul(rounds).saturating_add(60).min(7 * 86_400)
            }
            Action::Destroy => Self::action(action).timeout_secs,
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        spec.check()
    }

    fn check_with(spec: &Spec, named: &[Referenced]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_cluster_provider(&spec.provider, PROVIDERS, named, &mut errors);
        errors
    }

    fn check_run(spec: &Spec, _action: Action, dependencies: &[Referenced]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_machines(spec.constraints.as_deref(), dependencies, &mut errors);
        errors
    }

    fn provider(spec: &Spec) -> String {
        spec.provider.clone()
    }

    fn references(spec: &Spec) -> Vec<Reference> {
        let mut refs = vec![Reference::new(cluster::KIND, &spec.cluster, "spec.cluster")];
        if let Some(i) = &spec.image {
            refs.push(Reference::new(image::KIND, i, "spec.image"));
        }
        refs
    }

    fn parent(spec: &Spec) -> Option<Reference> {
        Some(Reference::new(cluster::KIND, &spec.cluster, "spec.cluster"))
    }

    fn requires(spec: &Spec, action: Action) -> Vec<Dependency> {
        if action == Action::Destroy {
            return Vec::new();
        }
        let mut deps = vec![Dependency {
            kind: cluster::KIND,
            key: spec.cluster.clone(),
            field: "spec.cluster",
            required_state: cluster::State::Up.as_str(),
        }];
        if let Some(i) = &spec.image {
            deps.push(Dependency {
                kind: image::KIND,
                key: i.clone(),
                field: "spec.image",
                required_state: image::State::Built.as_str(),
            });
        }
        deps
    }

    fn examples() -> Vec<Value> {
        vec![
            json!({"cluster": "web-qa", "command": "df -h / && journalctl --vacuum-time=7d"}),
            json!({"cluster": "web-qa", "command": "./migrate.sh", "image": "web", "target": "once",
                "timeout_secs": 600}),
            json!({"cluster": "web-qa", "command": "sync; echo 3 > /proc/sys/vm/drop_caches", "constraints": "role=worker",
                "max_concurrency": 2, "max_errors": 1, "env": {"REASON": "maintenance"}}),
        ]
    }
}

/// The job transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    match (state, action) {
        (S::Ready | S::Failed, A::Run) => Ok(TypedStep::Go { working: S::Running, ok: S::Ready, err: S::Failed }),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        (S::Ready | S::Failed, A::Destroy) => {
            Ok(TypedStep::Go { working: S::Destroying, ok: S::Destroyed, err: S::Failed })
        }
        (S::Ready, A::Retry) => Err(NotAllowed),
        (S::Running | S::Destroying | S::Destroyed, A::Run | A::Retry | A::Destroy) => Err(NotAllowed),
    }
}

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Every matching machine.
    #[default]
    All,
    /// One matching machine (the first).
    Once,
}

/// What a job runs, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = job_schema)]
pub struct Spec {
    /// Provider: the cluster's (`local`, or `aws`: SSM Run Command on the
    /// cluster's EC2 instances).
    #[serde(default = "default_provider")]
    #[schemars(extend("enum" = PROVIDERS))]
    pub provider: String,
    /// The cluster (name or id) whose machines run it.
    #[schemars(regex(pattern = r"\S"))]
    pub cluster: String,
    /// The command (`sh -c`), run in the job's directory on each machine.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"\S"))]
    pub command: String,
    /// An image whose current build is copied into that directory first
    /// (local only: an aws machine runs its cluster's AMI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"\S"))]
    pub image: Option<String>,
    /// `all` matching machines (default) or `once`.
    #[serde(default)]
    pub target: Target,
    /// Role metadata a machine must carry to run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<String>,
    /// Targets running at once (default 10).
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrency: u32,
    /// Failed targets the run tolerates (default 0: the first failure fails it).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub max_errors: u32,
    /// How long one target may run (seconds, default 300).
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_secs: u64,
    /// Environment variables of the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

fn job_schema(schema: &mut schemars::Schema) {
    constraints_and_env(schema, "Environment variables of the command");
    // On aws a machine runs its cluster's AMI: no image to bring.
    schema.insert("if".into(), json!({"properties": {"provider": {"const": "aws"}}, "required": ["provider"]}));
    schema.insert("then".into(), json!({"properties": {"image": {"type": "null"}}}));
}

fn default_provider() -> String {
    "local".to_string()
}

fn default_concurrency() -> u32 {
    10
}

fn default_timeout() -> u64 {
    300
}

impl Spec {
    /// Checks a spec and returns it typed.
    pub fn from_value(v: &Value) -> Result<Spec> {
        super::read_spec::<Job>(v)
    }

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, why: &str| errors.push(FieldError::new(format!("spec.{field}"), why));
        if !PROVIDERS.contains(&self.provider.as_str()) {
            bad("provider", "jobs run on provider local or aws");
        }
        if self.provider == "aws" && self.image.is_some() {
            bad("image", "an aws machine runs its cluster's AMI: a job there cannot bring an image's build");
        }
        if self.cluster.trim().is_empty() {
            bad("cluster", "must name a cluster");
        }
        if self.command.trim().is_empty() || self.command.chars().count() > 4096 {
            bad("command", "must be a non-empty command of at most 4096 characters");
        }
        if self.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            bad("image", "must name an image");
        }
        if self.constraints.as_deref().is_some_and(|c| parse_metadata(c).is_none()) {
            bad("constraints", "must be key=value pairs separated by commas, like role=worker,instancetype=r3");
        }
        if self.max_concurrency == 0 || self.max_concurrency > MAX_CONCURRENCY {
            bad("max_concurrency", "must be between 1 and 100");
        }
        if self.max_errors > 100 {
            bad("max_errors", "must be between 0 and 100");
        }
        if self.timeout_secs == 0 || self.timeout_secs > 86_400 {
            bad("timeout_secs", "must be between 1 and 86400");
        }
        check_env(&self.env, &mut errors);
        errors
    }
}

/// How many lines of each output a target's result keeps.
pub const OUTPUT_TAIL: usize = 20;

/// A line of output with every secret value in it replaced by `***`.
pub fn masked(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

/// A run's end from its targets' results (each with `machine_name` and
/// `status`: `succeeded`, `failed`, `timed_out`, `skipped`, …): the
/// summary as outputs, or `job_failed` with it as detail when more than
/// `max_errors` failed. The same for every provider.
pub fn conclude(results: Vec<Value>, max_errors: u32) -> std::result::Result<Value, crate::ports::ProviderError> {
    let failed = results.iter().filter(|r| r["status"] != "succeeded" && r["status"] != "skipped").count();
    let skipped = results.iter().filter(|r| r["status"] == "skipped").count();
    let which: Vec<String> = results
        .iter()
        .filter(|r| r["status"] != "succeeded" && r["status"] != "skipped")
        .map(|r| format!("{} ({})", r["machine_name"].as_str().unwrap_or("?"), r["status"].as_str().unwrap_or("?")))
        .collect();
    let targets = results.len();
    let summary = json!({ "targets": targets, "succeeded": targets - failed - skipped,
        "failed": failed, "skipped": skipped, "results": results });
    if failed > max_errors as usize {
        return Err(crate::ports::ProviderError::fatal(
            "job_failed",
            format!("{failed} of {targets} target(s) failed, more than max_errors {max_errors}: {}", which.join(", ")),
        )
        .with_detail(summary));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn the_table() {
        let run = Ok(TypedStep::Go { working: State::Running, ok: State::Ready, err: State::Failed });
        assert_eq!(next(State::Ready, Action::Run), run);
        assert_eq!(next(State::Failed, Action::Run), run);
        assert_eq!(next(State::Failed, Action::Retry), Ok(TypedStep::Retry));
        assert_eq!(next(State::Running, Action::Run), Err(NotAllowed));
        assert_eq!(next(State::Ready, Action::Retry), Err(NotAllowed));
        assert!(KIND.retires("destroy"));
        assert_eq!(KIND.permission("run"), "job:run");
    }

    #[test]
    fn specs_are_checked_by_field() {
        let ok = Spec::from_value(&json!({"cluster": "c", "command": "true"})).unwrap();
        assert_eq!((ok.target, ok.max_concurrency, ok.max_errors, ok.timeout_secs), (Target::All, 10, 0, 300));
        for (bad, field) in [
            (json!({"cluster": "c", "command": " "}), "spec.command"),
            (json!({"cluster": "c", "command": "x", "max_concurrency": 0}), "spec.max_concurrency"),
            (json!({"cluster": "c", "command": "x", "target": "twice"}), "spec.target"),
            (json!({"cluster": "c", "command": "x", "constraints": "role"}), "spec.constraints"),
            (json!({"cluster": "c", "command": "x", "env": {"A B": "1"}}), "spec.env.A B"),
            (json!({"cluster": "c", "command": "x", "provider": "aws", "image": "web"}), "spec.image"),
        ] {
            let e = Spec::from_value(&bad).unwrap_err();
            assert!(matches!(&e, Error::Invalid(f) if f[0].field == field), "{bad}: {e:?}");
        }
        // A run may take a target's timeout per round of max_concurrency.
        let s = json!({"cluster": "c", "command": "x", "timeout_secs": 10, "max_concurrency": 32});
        assert_eq!(KIND.timeout_secs(&s, "run"), 10 * 2 + 60);
    }
}
