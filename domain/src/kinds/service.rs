//! Services: long-running processes placed on a cluster's machines.
//!
//! ```text
//! pending --start--> starting --ok--> running  --err--> failed
//! running --scale{count}--> scaling --ok--> running --err--> failed
//! running|failed --deploy{image?,build?}--> deploying --ok--> running --err--> failed
//! running|failed --rollback--> rolling-back --ok--> running --err--> failed
//! running --restart--> restarting --ok--> running --err--> failed
//! running --stop--> stopping --ok--> stopped   --err--> failed
//! stopped --start--> starting --ok--> running  --err--> failed
//! pending|running|stopped|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! failed --retry--> the working state of the action that failed
//! running|stopped --refresh--> (stays) --ok--> (stays) --err--> (stays)
//! running --repair--> repairing --ok--> running --err--> running
//! ```
//!
//! A service lives on a cluster (its *parent*: it takes the cluster's
//! settings and environment) and runs on the cluster's machines, its
//! instances spread over those whose role metadata matches `constraints`:
//! `count` instances, fewest per machine first, or with `global` one on
//! every matching machine. `after` names the services of the same cluster
//! that must be `running` before this one starts; they may not form a
//! cycle.
//!
//! `deploy`, `rollback` and `restart` replace instances surge-first, in
//! batches bounded by `max_surge` and `max_unavailable`: a new instance
//! starts and is healthy before the old one it replaces stops. A deploy
//! sets the spec's `image` and `build`; a rollback deploys the build that
//! ran before the last deploy (the provider's outputs say which, and the
//! run's parameters record it).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::cluster::HealthCheck;
use super::{
    cluster, image, is_name, named_enum, ActionDecl, ActionParams, Declaration, Dependency, Kind, NotAllowed, Params,
    Reference, Referenced, TypedStep,
};
use crate::error::{FieldError, Result};

/// Instances a service may have (and machines a global one may cover).
pub const MAX_COUNT: u32 = cluster::MAX_COUNT;

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Service>();

/// The service kind's declaration.
pub struct Service;

named_enum!(State {
    Pending => "pending",
    Starting => "starting",
    Running => "running",
    Scaling => "scaling",
    Placing => "placing",
    Deploying => "deploying",
    RollingBack => "rolling-back",
    Restarting => "restarting",
    Stopping => "stopping",
    Stopped => "stopped",
    Failed => "failed",
    Destroying => "destroying",
    Destroyed => "destroyed",
    Repairing => "repairing",
});

named_enum!(Action {
    Start => "start",
    Scale => "scale",
    Place => "place",
    Deploy => "deploy",
    Rollback => "rollback",
    Restart => "restart",
    Stop => "stop",
    Destroy => "destroy",
    Retry => "retry",
    Refresh => "refresh",
    Repair => "repair",
});

/// Providers services run on: the cluster's. On aws an instance is a
/// systemd unit started over SSM Run Command from the build's S3 artifact.
pub const PROVIDERS: &[&str] = &["local", "aws"];

impl Declaration for Service {
    const NAME: &'static str = "service";
    const PLURAL: &'static str = "services";
    const DESCRIPTION: &'static str =
        "A long-running process with a count (or one per machine), placed on a cluster's machines.";
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
            Action::Start => ActionDecl::new(
                "Starts the service's instances on the cluster's matching machines (again, when stopped), \
                 each healthy before the run succeeds.",
                600,
            )
            .with_settings()
            .applying_spec(),
            Action::Scale => ActionDecl::new(
                "Brings the service to `count` instances: new ones on the machines with fewest, the highest \
                 indexes stopped first.",
                600,
            )
            .params(Params::of::<cluster::ScaleParams>())
            .with_settings()
            .changing_spec(&["count"]),
            Action::Place => ActionDecl::new(
                "Places instances again: those whose machine went away go to the matching machines that are \
                 left, and a global service gets one on every matching machine there is now (none on those \
                 gone or no longer matching). Drover's observer asks for it when it sees a machine gone, or a \
                 global service's machines change; each move is an event with where from and why.",
                600,
            )
            .with_settings(),
            Action::Deploy => ActionDecl::new(
                "Replaces the instances with ones of another build (default: the image's current build), \
                 surge-first in batches bounded by max_surge and max_unavailable; a new instance that fails its \
                 health check halts the deploy and, unless rollback_on_failure is false, the instances already \
                 replaced go back to the build they ran.",
                1800,
            )
            .params(Params::of::<DeployParams>())
            .with_settings()
            .applying_spec()
            .changing_spec(&["image", "build"]),
            Action::Rollback => {
                ActionDecl::new("Deploys the build that ran before the last deploy, with the same gates.", 1800)
                    .with_settings()
                    .applying_spec()
                    .changing_spec(&["image", "build"])
            }
            Action::Restart => ActionDecl::new(
                "Replaces every instance with a fresh process of the same build, with the deploy's gates.",
                1800,
            )
            .with_settings()
            .applying_spec(),
            Action::Stop => ActionDecl::new("Stops every instance; the service stays, `stopped`.", 300),
            Action::Destroy => ActionDecl::new("Stops the instances and removes their files.", 300),
            Action::Retry => ActionDecl::new("Repeats the action that failed.", 600),
            Action::Refresh => ActionDecl::new(
                "Compares what runs with the record (as many instances as recorded, each on a machine that is \
                 still there, its process alive in its own directory, on the service's build, answering its \
                 health check and listed in the discovery registry) and records the differences as the \
                 service's drift. Changes nothing.",
                120,
            )
            .refreshing(),
            Action::Repair => ActionDecl::new(
                "Makes what runs match the record: instances whose process died, or whose machine went away, \
                 start again from the build the service runs (without applying a changed spec). A repair that \
                 cannot leaves the service running as it was, and fails saying why.",
                600,
            )
            .with_settings(),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        spec.check()
    }

    fn check_with(spec: &Spec, named: &[Referenced]) -> Vec<FieldError> {
        spec.check_with(named)
    }

    fn check_run(spec: &Spec, action: Action, dependencies: &[Referenced]) -> Vec<FieldError> {
        spec.check_run(action, dependencies)
    }

    fn check_action(spec: &Spec, action: Action, _params: &Value) -> Vec<FieldError> {
        match (action, spec.global) {
            (Action::Scale, true) => vec![FieldError::new(
                "params.count",
                "a global service runs one instance on every matching machine: it has no count to scale",
            )],
            _ => Vec::new(),
        }
    }

    /// A rollback's target is the build that ran before the last deploy,
    /// as the provider's outputs have it (`previous`); the run records it.
    fn complete_params(_spec: &Spec, outputs: &Value, action: Action, params: Value) -> Result<Value, Vec<FieldError>> {
        match action {
            Action::Rollback => match (outputs["previous"]["image"].as_str(), outputs["previous"]["build"].as_str()) {
                (Some(image), Some(build)) => Ok(json!({ "image": image, "build": build })),
                _ => Err(vec![FieldError::new("action", "nothing to roll back to: no deploy has succeeded yet")]),
            },
            _ => Ok(params),
        }
    }

    fn provider(spec: &Spec) -> String {
        spec.provider.clone()
    }

    fn references(spec: &Spec) -> Vec<Reference> {
        let mut refs = vec![
            Reference::new(cluster::KIND, &spec.cluster, "spec.cluster"),
            Reference::new(image::KIND, &spec.image, "spec.image"),
        ];
        for (i, s) in spec.after.iter().enumerate() {
            refs.push(Reference::new(KIND, s, format!("spec.after[{i}]")));
        }
        refs
    }

    fn parent(spec: &Spec) -> Option<Reference> {
        Some(Reference::new(cluster::KIND, &spec.cluster, "spec.cluster"))
    }

    fn requires(spec: &Spec, action: Action) -> Vec<Dependency> {
        if !Service::action(action).takes_settings {
            return Vec::new();
        }
        let mut deps = vec![
            Dependency {
                kind: cluster::KIND,
                key: spec.cluster.clone(),
                field: "spec.cluster",
                required_state: cluster::State::Up.as_str(),
            },
            Dependency {
                kind: image::KIND,
                key: spec.image.clone(),
                field: "spec.image",
                required_state: image::State::Built.as_str(),
            },
        ];
        for s in spec.after.iter().filter(|_| action == Action::Start) {
            deps.push(Dependency {
                kind: KIND,
                key: s.clone(),
                field: "spec.after",
                required_state: State::Running.as_str(),
            });
        }
        deps
    }

    fn spec_after(spec: &Spec, action: Action, params: &Value) -> Option<Spec> {
        match action {
            Action::Scale => {
                let count = params.get("count").and_then(Value::as_u64).map(|c| c as u32)?;
                Some(Spec { count: Some(count), ..spec.clone() })
            }
            Action::Deploy | Action::Rollback => Some(Spec {
                image: params["image"].as_str().unwrap_or(&spec.image).to_string(),
                build: params["build"].as_str().map(str::to_string),
                ..spec.clone()
            }),
            Action::Start
            | Action::Place
            | Action::Restart
            | Action::Stop
            | Action::Destroy
            | Action::Retry
            | Action::Refresh
            | Action::Repair => None,
        }
    }

    fn examples() -> Vec<Value> {
        vec![
            json!({"cluster": "web-qa", "image": "web", "count": 3, "after": ["cache"]}),
            json!({"cluster": "web-qa", "image": "agent", "global": true, "constraints": "role=worker",
                "command": "./agent --port $PORT", "health_check": {"type": "tcp"}, "env": {"LOG_LEVEL": "info"},
                "start_timeout_secs": 20}),
            json!({"cluster": "web-qa", "image": "web", "build": "0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b", "count": 2,
                "port": 8080, "max_surge": 1, "max_unavailable": 0}),
        ]
    }
}

/// The service transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    let go = |working, ok| Ok(TypedStep::Go { working, ok, err: S::Failed });
    match (state, action) {
        (S::Pending | S::Stopped, A::Start) => go(S::Starting, S::Running),
        (S::Running, A::Scale) => go(S::Scaling, S::Running),
        (S::Running, A::Place) => go(S::Placing, S::Running),
        (S::Running | S::Failed, A::Deploy) => go(S::Deploying, S::Running),
        (S::Running | S::Failed, A::Rollback) => go(S::RollingBack, S::Running),
        (S::Running, A::Restart) => go(S::Restarting, S::Running),
        (S::Running, A::Stop) => go(S::Stopping, S::Stopped),
        (S::Pending | S::Running | S::Stopped | S::Failed, A::Destroy) => go(S::Destroying, S::Destroyed),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        // Reads only: the service stays as it is, whatever it finds.
        (S::Running | S::Stopped, A::Refresh) => Ok(TypedStep::Go { working: state, ok: state, err: state }),
        // A repair that cannot leaves the service running as it was.
        (S::Running, A::Repair) => Ok(TypedStep::Go { working: S::Repairing, ok: S::Running, err: S::Running }),
        (
            S::Pending,
            A::Scale | A::Place | A::Deploy | A::Rollback | A::Restart | A::Stop | A::Retry | A::Refresh | A::Repair,
        ) => Err(NotAllowed),
        (S::Running, A::Start | A::Retry) => Err(NotAllowed),
        (S::Stopped, A::Scale | A::Place | A::Deploy | A::Rollback | A::Restart | A::Stop | A::Retry | A::Repair) => {
            Err(NotAllowed)
        }
        (S::Failed, A::Start | A::Scale | A::Place | A::Restart | A::Stop | A::Refresh | A::Repair) => Err(NotAllowed),
        (
            S::Starting
            | S::Scaling
            | S::Placing
            | S::Deploying
            | S::RollingBack
            | S::Restarting
            | S::Stopping
            | S::Destroying
            | S::Destroyed
            | S::Repairing,
            A::Start
            | A::Scale
            | A::Place
            | A::Deploy
            | A::Rollback
            | A::Restart
            | A::Stop
            | A::Destroy
            | A::Retry
            | A::Refresh
            | A::Repair,
        ) => Err(NotAllowed),
    }
}

/// What a service runs, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = count_or_global)]
pub struct Spec {
    /// Provider: the cluster's (`local` or `aws`).
    #[serde(default = "default_provider")]
    #[schemars(extend("enum" = PROVIDERS))]
    pub provider: String,
    /// The cluster (name or id) whose machines run it.
    #[schemars(regex(pattern = r"\S"))]
    pub cluster: String,
    /// The image (name or id) its instances run.
    #[schemars(regex(pattern = r"\S"))]
    pub image: String,
    /// A build of the image (its id, from the image's `builds`); default:
    /// the image's current build when the service starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-fA-F-]{36}$"))]
    pub build: Option<String>,
    /// The command an instance runs (`sh -c`, in its own copy of the build);
    /// default: the image's `start_command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"\S"))]
    pub command: Option<String>,
    /// The port instances listen on: instance `i` gets `port + i` (in
    /// `PORT`). Locally, without it, each instance gets a free port; on aws
    /// it is required (drover cannot see a machine's free ports), and a
    /// deploy's new instance beside its predecessor on one machine takes
    /// `port + 64 + i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: Option<u16>,
    /// Number of instances (or `global`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub count: Option<u32>,
    /// One instance on every matching machine (instead of `count`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global: bool,
    /// Role metadata a machine must carry to run it: `key=value` pairs
    /// separated by commas (`role=worker,instancetype=r3`), all required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<String>,
    /// Services of the same cluster (names) that must be running, healthy,
    /// before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")))]
    pub after: Vec<String>,
    /// Default: `{"type": "http", "path": "/"}` on the instance's port.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// How long one instance may take to pass its health check (seconds, default 30).
    #[serde(default = "default_start_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub start_timeout_secs: u64,
    /// Environment variables of every instance (after the settings, before
    /// drover's own, which they cannot override).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A deploy's extra instances at a time (default 1).
    #[serde(default = "default_surge")]
    #[schemars(range(min = 0, max = 64))]
    pub max_surge: u32,
    /// Instances a deploy may have unhealthy at a time (default 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub max_unavailable: u32,
    /// When an instance's process dies, drover's observer repairs the
    /// service (starts it again) within one observation round, backing off
    /// when repairs do not hold, and stops at a crash loop (shown in the
    /// view).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_repair: bool,
}

/// What [`Spec::check`] asks across fields, said in the schema: `count`
/// or `global`, not both; a deploy that may neither add nor take away an
/// instance could never move; the shapes of `constraints` and `env`.
fn count_or_global(schema: &mut schemars::Schema) {
    constraints_and_env(schema, "Environment variables of every instance");
    schema.insert(
        "oneOf".into(),
        json!([
            {"title": "count", "required": ["count"], "properties": {"global": {"const": false}, "count": {"type": "integer"}}},
            {"title": "global", "required": ["global"], "properties": {"global": {"const": true}, "count": {"type": "null"}}},
        ]),
    );
    schema.insert(
        "not".into(),
        json!({"required": ["max_surge"], "properties": {"max_surge": {"const": 0}, "max_unavailable": {"const": 0}}}),
    );
    // On aws: a port (instances take port + index, or port + 64 + index
    // beside a predecessor), and no auto-repair yet.
    schema.insert("if".into(), json!({"required": ["provider"], "properties": {"provider": {"const": "aws"}}}));
    schema.insert(
        "then".into(),
        json!({"required": ["port"], "properties": {"port": {"type": "integer", "maximum": 65535 - 2 * MAX_COUNT},
            "auto_repair": {"const": false}}}),
    );
}

/// The schemas of `constraints` and `env`, shared by the kinds that run
/// processes on a cluster's machines (services, jobs).
pub(super) fn constraints_and_env(schema: &mut schemars::Schema, env: &str) {
    let pair = "[A-Za-z0-9_./:-]{1,64}=[A-Za-z0-9_./:-]{1,64}";
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert(
            "constraints".into(),
            json!({"description": "Role metadata a machine must carry to run it: `key=value` pairs separated by \
                commas (`role=worker,instancetype=r3`), all required.",
                "type": ["string", "null"], "maxLength": 1024, "pattern": format!("^{pair}(,{pair})*$"),
                "examples": ["role=worker"]}),
        );
        props.insert(
            "env".into(),
            json!({"description": format!("{env} (after the settings, before drover's own, which they cannot \
                override)."),
                "type": "object", "maxProperties": MAX_ENV,
                "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
                "additionalProperties": {"type": "string", "maxLength": 4096}}),
        );
    }
}

/// Checks environment variables (`spec.env`) as [`constraints_and_env`] says them.
pub(super) fn check_env(env: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    if env.len() > MAX_ENV {
        errors.push(FieldError::new("spec.env", "at most 100 variables"));
    }
    for (k, v) in env {
        let name = !k.is_empty()
            && k.len() <= 128
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name || v.chars().count() > 4096 {
            errors.push(FieldError::new(
                format!("spec.env.{k}"),
                "names are letters, digits and _ (not starting with a digit), values at most 4096 characters",
            ));
        }
    }
}

/// The cluster a spec names runs on `provider` (services and jobs run on
/// local clusters only, for now).
pub(super) fn check_cluster_provider(
    provider: &str,
    providers: &[&str],
    named: &[Referenced],
    errors: &mut Vec<FieldError>,
) {
    for r in named.iter().filter(|r| r.reference.kind == cluster::KIND) {
        let Ok(c) = serde_json::from_value::<cluster::Spec>(r.spec.clone()) else { continue };
        if c.provider == provider {
            continue;
        }
        let why = match providers.contains(&c.provider.as_str()) {
            true => {
                format!("cluster {} runs on provider {}: set spec.provider to {:?}", r.name, c.provider, c.provider)
            }
            false => format!(
                "cluster {} runs on provider {}; this runs on {} clusters only, for now",
                r.name,
                c.provider,
                providers.join(" or ")
            ),
        };
        errors.push(FieldError::new("spec.cluster", why));
    }
}

/// Some machine of the cluster among `deps`, or of a worker group joined
/// to it (also among them), carries what `constraints` ask for.
pub(super) fn check_machines(constraints: Option<&str>, deps: &[Referenced], errors: &mut Vec<FieldError>) {
    let mut carried = Vec::new();
    for r in deps.iter().filter(|r| r.reference.kind == cluster::KIND) {
        let Ok(c) = serde_json::from_value::<cluster::Spec>(r.spec.clone()) else { continue };
        let metadata = c.machine_metadata(r.name);
        if matches(constraints, &metadata) {
            return;
        }
        carried.push(format!("{}: {metadata}", r.name));
    }
    if !carried.is_empty() {
        errors.push(FieldError::new(
            "spec.constraints",
            format!("no machine matches: the cluster's machines carry {}", carried.join("; ")),
        ));
    }
}

const MAX_ENV: usize = 100;

fn default_provider() -> String {
    "local".to_string()
}

fn default_start_timeout() -> u64 {
    30
}

fn default_surge() -> u32 {
    1
}

/// `role=worker,instancetype=r3` as pairs; `None` when it is not that shape.
pub fn parse_metadata(s: &str) -> Option<Vec<(&str, &str)>> {
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 64
            && w.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
    };
    if s.len() > 1024 {
        return None;
    }
    s.split(',').map(|pair| pair.split_once('=').filter(|(k, v)| word(k) && word(v))).collect()
}

/// Whether a machine carrying `metadata` satisfies `constraints`: every
/// pair of the constraints is one of the machine's.
pub fn matches(constraints: Option<&str>, metadata: &str) -> bool {
    let Some(c) = constraints else { return true };
    let have = parse_metadata(metadata).unwrap_or_default();
    parse_metadata(c).is_some_and(|want| want.iter().all(|p| have.contains(p)))
}

impl Spec {
    /// Checks a spec and returns it typed.
    pub fn from_value(v: &Value) -> Result<Spec> {
        super::read_spec::<Service>(v)
    }

    /// The count a placing action (`start`, `place`, `scale`, `repair`)
    /// brings the service to: a scale's `count`, a repair's the count the
    /// service last had (a changed count waits for a scale), else the
    /// spec's. `None` for a global service without a count.
    pub fn count_for(&self, action: &str, params: &Value, outputs: &Value) -> Option<u32> {
        let asked = match action {
            "scale" => params.get("count").and_then(Value::as_u64),
            "repair" => outputs["count"].as_u64(),
            _ => None,
        };
        asked.map(|c| c as u32).or(self.count)
    }

    /// The instances it wants on `machines` matching machines: its count,
    /// or one per machine when global.
    pub fn wanted(&self, machines: usize) -> u32 {
        match (self.global, self.count) {
            (true, _) => machines as u32,
            (false, count) => count.unwrap_or(0),
        }
    }

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, why: &str| errors.push(FieldError::new(format!("spec.{field}"), why));
        if !PROVIDERS.contains(&self.provider.as_str()) {
            bad("provider", "services run on provider local or aws (the cluster's)");
        }
        if self.provider == "aws" {
            if self.port.is_none() {
                bad("port", "required on aws: drover cannot see which ports are free on a machine");
            }
            if self.port.is_some_and(|p| u32::from(p) + 2 * MAX_COUNT > 65535) {
                bad(
                    "port",
                    "on aws at most 65407: instances take port + index, and port + 64 + index beside a predecessor",
                );
            }
            if self.auto_repair {
                bad("auto_repair", "not on aws services yet: drover does not yet see a unit die on an EC2 machine");
            }
        }
        if self.cluster.trim().is_empty() {
            bad("cluster", "must name a cluster");
        }
        if self.image.trim().is_empty() {
            bad("image", "must name an image");
        }
        if self
            .build
            .as_deref()
            .is_some_and(|b| b.len() != 36 || !b.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'))
        {
            bad("build", "must be a build id from the image's builds");
        }
        if self.command.as_deref().is_some_and(|c| c.trim().is_empty() || c.chars().count() > 4096) {
            bad("command", "must be a non-empty command of at most 4096 characters");
        }
        if self.port.is_some_and(|p| p < 1024) {
            bad("port", "must be between 1024 and 65535");
        }
        match (self.global, self.count) {
            (true, Some(_)) => bad("count", "give count or global: true, not both"),
            (false, None) => bad("count", "required unless global is true"),
            (false, Some(c)) if c == 0 || c > MAX_COUNT => bad("count", "must be between 1 and 64"),
            _ => {}
        }
        if self.constraints.as_deref().is_some_and(|c| parse_metadata(c).is_none()) {
            bad("constraints", "must be key=value pairs separated by commas, like role=worker,instancetype=r3");
        }
        if self.after.len() > 32 {
            bad("after", "at most 32 services");
        }
        for (i, s) in self.after.iter().enumerate() {
            if !is_name(s) {
                errors.push(FieldError::new(format!("spec.after[{i}]"), "must name a service"));
            }
        }
        let mut bad = |field: &str, why: &str| errors.push(FieldError::new(format!("spec.{field}"), why));
        if let HealthCheck::Http { path } = &self.health_check {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bad("health_check.path", "must be an absolute path without spaces");
            }
        }
        if self.start_timeout_secs == 0 || self.start_timeout_secs > 3600 {
            bad("start_timeout_secs", "must be between 1 and 3600");
        }
        if self.max_surge > MAX_COUNT {
            bad("max_surge", "must be between 0 and 64");
        }
        if self.max_unavailable > MAX_COUNT {
            bad("max_unavailable", "must be between 0 and 64");
        }
        if self.max_surge == 0 && self.max_unavailable == 0 {
            bad("max_surge", "max_surge and max_unavailable cannot both be 0: a deploy could not move");
        }
        check_env(&self.env, &mut errors);
        errors
    }

    /// Checks against what the spec names: the cluster runs on the same
    /// provider, and the services of `after` run on the same cluster.
    fn check_with(&self, named: &[Referenced]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_cluster_provider(&self.provider, PROVIDERS, named, &mut errors);
        for r in named.iter().filter(|r| r.reference.kind == image::KIND) {
            let built_by = r.spec["provider"].as_str().unwrap_or("local");
            if built_by != self.provider {
                errors.push(FieldError::new(
                    r.reference.field.clone(),
                    format!(
                        "image {} is built by provider {built_by}; a {} service runs a {} image's builds",
                        r.name, self.provider, self.provider
                    ),
                ));
            }
        }
        for r in named.iter().filter(|r| r.reference.kind == KIND) {
            let same = r.spec["cluster"].as_str().is_some_and(|c| {
                named.iter().any(|n| n.reference.kind == cluster::KIND && (c == n.name || c == n.id.to_string()))
            });
            if !same {
                errors.push(FieldError::new(
                    r.reference.field.clone(),
                    format!("service {} runs on another cluster", r.name),
                ));
            }
        }
        errors
    }

    /// Checks, before instances are placed, against the cluster and image
    /// as they are: some machine carries the metadata the constraints ask
    /// for, and the build to run is one the image keeps.
    fn check_run(&self, action: Action, deps: &[Referenced]) -> Vec<FieldError> {
        let mut errors = Vec::new();
        check_machines(self.constraints.as_deref(), deps, &mut errors);
        for r in deps.iter().filter(|r| r.reference.kind == image::KIND) {
            let build = self.build.as_deref().or_else(|| image::current_build(r.outputs));
            let entry =
                r.outputs["builds"].as_array().into_iter().flatten().find(|b| build.is_some_and(|id| b["id"] == id));
            match (entry, &self.build) {
                (None, Some(build)) => {
                    let field = match action {
                        Action::Deploy => "params.build",
                        _ => "spec.build",
                    };
                    errors.push(FieldError::new(
                        field,
                        format!("image {} has no build {build} (see its builds)", r.name),
                    ));
                }
                // An aws instance unpacks its build's artifact: a build
                // without one (baked with no artifact bucket) cannot run.
                (Some(b), _) if self.provider == "aws" && !b["artifact"].is_object() => {
                    errors.push(FieldError::new(
                        "spec.image",
                        format!(
                            "build {} of image {} has no artifact to unpack: an aws build carries one when drover has \
                             an artifact bucket (DROVER_AWS_ARTIFACT_BUCKET); rebuild the image",
                            build.unwrap_or_default(),
                            r.name
                        ),
                    ));
                }
                _ => {}
            }
        }
        errors
    }
}

/// `deploy`: what to deploy.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployParams {
    /// The image (name) to deploy; default: the spec's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub image: Option<String>,
    /// A build of it (id, from the image's `builds`); default: its current build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[0-9a-fA-F-]{36}$"))]
    pub build: Option<String>,
    /// Whether a failed deploy puts the instances it replaced back on the
    /// build they ran (default true).
    #[serde(default = "yes")]
    pub rollback_on_failure: bool,
}

fn yes() -> bool {
    true
}

impl ActionParams for DeployParams {
    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.image.as_deref().is_some_and(|i| !is_name(i)) {
            errors.push(FieldError::new("params.image", "must name an image"));
        }
        if self
            .build
            .as_deref()
            .is_some_and(|b| b.len() != 36 || !b.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'))
        {
            errors.push(FieldError::new("params.build", "must be a build id from the image's builds"));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use Action as A;
    use State as S;

    fn go(w: S, ok: S) -> Result<TypedStep<S>, NotAllowed> {
        Ok(TypedStep::Go { working: w, ok, err: S::Failed })
    }

    #[test]
    fn every_entry_of_the_table() {
        let no = Err(NotAllowed);
        let destroy = go(S::Destroying, S::Destroyed);
        let start = go(S::Starting, S::Running);
        let deploy = go(S::Deploying, S::Running);
        let rollback = go(S::RollingBack, S::Running);
        let stay = |s: S| Ok(TypedStep::Go { working: s, ok: s, err: s });
        let repair = Ok(TypedStep::Go { working: S::Repairing, ok: S::Running, err: S::Running });
        // columns: start, scale, place, deploy, rollback, restart, stop,
        // destroy, retry, refresh, repair
        let expected = [
            (S::Pending, [start, no, no, no, no, no, no, destroy, no, no, no]),
            (S::Starting, [no; 11]),
            (
                S::Running,
                [
                    no,
                    go(S::Scaling, S::Running),
                    go(S::Placing, S::Running),
                    deploy,
                    rollback,
                    go(S::Restarting, S::Running),
                    go(S::Stopping, S::Stopped),
                    destroy,
                    no,
                    stay(S::Running),
                    repair,
                ],
            ),
            (S::Scaling, [no; 11]),
            (S::Placing, [no; 11]),
            (S::Deploying, [no; 11]),
            (S::RollingBack, [no; 11]),
            (S::Restarting, [no; 11]),
            (S::Stopping, [no; 11]),
            (S::Stopped, [start, no, no, no, no, no, no, destroy, no, stay(S::Stopped), no]),
            (S::Failed, [no, no, no, deploy, rollback, no, no, destroy, Ok(TypedStep::Retry), no, no]),
            (S::Destroying, [no; 11]),
            (S::Destroyed, [no; 11]),
            (S::Repairing, [no; 11]),
        ];
        assert_eq!(expected.len(), State::ALL.len());
        assert_eq!(Action::ALL.len(), 11);
        let actions = [
            A::Start,
            A::Scale,
            A::Place,
            A::Deploy,
            A::Rollback,
            A::Restart,
            A::Stop,
            A::Destroy,
            A::Retry,
            A::Refresh,
            A::Repair,
        ];
        for (state, row) in expected {
            for (action, want) in actions.into_iter().zip(row) {
                assert_eq!(next(state, action), want, "{state:?} --{action:?}-->");
            }
        }
    }

    #[test]
    fn a_deploy_sets_image_and_build_and_a_rollback_needs_a_previous_build() {
        let spec =
            json!({"cluster": "c1", "image": "web", "count": 2, "build": "0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b"});
        let after = KIND.spec_after_success("deploy", &json!({"image": "web2"}), &spec).unwrap();
        assert_eq!((after["image"].as_str(), after.get("build")), (Some("web2"), None));
        // What it deploys is what it depends on.
        let deps = KIND.run_dependencies(&spec, "deploy", &json!({"image": "web2"}));
        assert_eq!(deps.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["c1", "web2"]);
        let e = KIND.complete_params(&spec, &json!({}), "rollback", json!({})).unwrap_err();
        assert!(matches!(e, crate::Error::Invalid(f) if f[0].field == "action"));
        let outputs = json!({"previous": {"image": "web", "build": "b1"}});
        let p = KIND.complete_params(&spec, &outputs, "rollback", json!({})).unwrap();
        assert_eq!(p, json!({"image": "web", "build": "b1"}));
    }

    #[test]
    fn count_or_global_not_both() {
        let ok = Spec::from_value(&json!({"cluster": "c", "image": "i", "count": 2})).unwrap();
        assert_eq!(ok.wanted(5), 2);
        assert_eq!(ok.max_surge, 1);
        let g = Spec::from_value(&json!({"cluster": "c", "image": "i", "global": true})).unwrap();
        assert_eq!(g.wanted(5), 5);
        for (bad, field) in [
            (json!({"cluster": "c", "image": "i"}), "spec.count"),
            (json!({"cluster": "c", "image": "i", "global": true, "count": 1}), "spec.count"),
            (json!({"cluster": "c", "image": "i", "count": 1, "max_surge": 0}), "spec.max_surge"),
            (json!({"cluster": "c", "image": "i", "count": 1, "constraints": "role"}), "spec.constraints"),
            (json!({"cluster": "c", "image": "i", "count": 1, "env": {"1X": "y"}}), "spec.env.1X"),
            (json!({"cluster": "c", "image": "i", "count": 3, "port": 80}), "spec.port"),
            (json!({"cluster": "c", "image": "i", "count": 1, "after": ["Bad"]}), "spec.after[0]"),
            (json!({"cluster": "c", "image": "i", "count": 1, "provider": "aws"}), "spec.port"),
            (json!({"cluster": "c", "image": "i", "count": 1, "provider": "aws", "port": 65500}), "spec.port"),
            (
                json!({"cluster": "c", "image": "i", "count": 1, "provider": "aws", "port": 8080, "auto_repair": true}),
                "spec.auto_repair",
            ),
            (json!({"cluster": "c", "image": "i", "count": 1, "provider": "gcp"}), "spec.provider"),
        ] {
            let e = Spec::from_value(&bad).unwrap_err();
            assert!(matches!(&e, Error::Invalid(f) if f[0].field == field), "{bad}: {e:?}");
        }
    }

    #[test]
    fn an_aws_service_runs_an_aws_builds_artifact() {
        let spec =
            Spec::from_value(&json!({"provider": "aws", "cluster": "c", "image": "web", "count": 1, "port": 8080}))
                .expect("valid");
        let reference = Reference::new(image::KIND, "web", "spec.image");
        let id = uuid::Uuid::nil();
        let check = |image_spec: &Value, outputs: &Value| {
            let named =
                [Referenced { reference: &reference, id, name: "web", state: "built", spec: image_spec, outputs }];
            (spec.check_with(&named), spec.check_run(Action::Start, &named))
        };
        let aws = json!({"provider": "aws"});
        let with =
            json!({"build": "b1", "builds": [{"id": "b1", "artifact": {"bucket": "x", "key": "k", "sha256": "s"}}]});
        assert_eq!(check(&aws, &with), (vec![], vec![]));
        let without = json!({"build": "b1", "builds": [{"id": "b1", "ami_id": "ami-1"}]});
        let (_, run) = check(&aws, &without);
        assert_eq!(run.len(), 1, "{run:?}");
        assert!(
            run[0].message.contains("no artifact") && run[0].message.contains("DROVER_AWS_ARTIFACT_BUCKET"),
            "{run:?}"
        );
        let (with_errors, _) = check(&json!({"provider": "local"}), &with);
        assert_eq!(with_errors[0].field, "spec.image");
        assert!(with_errors[0].message.contains("built by provider local"), "{with_errors:?}");
    }

    #[test]
    fn constraints_match_every_pair() {
        assert!(matches(None, "cluster=c1"));
        assert!(matches(Some("role=worker"), "role=worker,instancetype=r3"));
        assert!(matches(Some("instancetype=r3,role=worker"), "role=worker,instancetype=r3"));
        assert!(!matches(Some("role=worker,disk=ssd"), "role=worker,instancetype=r3"));
        assert!(!matches(Some("role=work"), "role=worker"));
    }

    #[test]
    fn scale_sets_the_count_and_start_depends_on_what_it_runs_on() {
        let spec = json!({"cluster": "c1", "image": "web", "count": 2, "after": ["cache"]});
        let after = KIND.spec_after_success("scale", &json!({"count": 5}), &spec).unwrap();
        assert_eq!(after["count"], 5);
        let deps = KIND.dependencies(&spec, "start");
        let got: Vec<_> = deps.iter().map(|d| (d.kind.as_str(), d.key.as_str(), d.required_state)).collect();
        assert_eq!(got, [("cluster", "c1", "up"), ("image", "web", "built"), ("service", "cache", "running")]);
        assert!(KIND.dependencies(&spec, "stop").is_empty());
    }
}
