//! Clusters: a group of instances started from an image.
//!
//! ```text
//! pending --create--> creating --ok--> up   --err--> failed
//! up --scale{count}--> scaling --ok--> up   --err--> failed
//! up --add-instances{n}--> scaling --ok--> up (count + n) --err--> failed
//! up --initialize--> up (starting its services) --ok--> up --err--> up
//! up --stop--> stopping --ok--> down        --err--> failed
//! down --start--> starting --ok--> up       --err--> failed
//! up|down --refresh--> (stays) --ok--> (stays) --err--> (stays)
//! up --repair--> repairing --ok--> up     --err--> up
//! pending|up|down|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! failed --retry--> the working state of the action that failed
//! ```
//!
//! A cluster names its provider in its spec (`local`, the default, or
//! `aws`); the fields a provider needs are checked here. A cluster on `aws`
//! may `join` a leader cluster: it is a worker group, and its create, scale
//! and start need the leader `up` (a dependency, like the image).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    environment, image, is_name, named_enum, service, ActionDecl, ActionParams, Declaration, Dependency, FanOut, Kind,
    NotAllowed, Params, Reference, Referenced, TypedStep,
};
use crate::error::{FieldError, Result};

pub const MAX_COUNT: u32 = 64;

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Cluster>();

/// The cluster kind's declaration.
pub struct Cluster;

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
    Repairing => "repairing",
    Adopting => "adopting",
});

named_enum!(Action {
    Create => "create",
    Scale => "scale",
    AddInstances => "add-instances",
    Initialize => "initialize",
    Stop => "stop",
    Start => "start",
    Destroy => "destroy",
    Retry => "retry",
    Refresh => "refresh",
    Repair => "repair",
    Adopt => "adopt",
});

impl Declaration for Cluster {
    const NAME: &'static str = "cluster";
    const PLURAL: &'static str = "clusters";
    const DESCRIPTION: &'static str = "A group of instances started from an image, scaled, stopped and destroyed.";
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
            Action::Create => {
                ActionDecl::new("Starts the cluster's instances from its image.", 600).with_settings().applying_spec()
            }
            Action::Scale => ActionDecl::new("Brings the cluster to `count` instances.", 600)
                .params(Params::of::<ScaleParams>())
                .with_settings()
                .changing_spec(&["count"]),
            Action::AddInstances => ActionDecl::new("Adds `n` instances to the cluster.", 600)
                .params(Params::of::<AddParams>())
                .with_settings()
                .changing_spec(&["count"]),
            Action::Initialize => ActionDecl::new(
                "Starts every service of the cluster that is not running, in the order their `after` gives (each \
                 running, healthy, before those that wait for it start): one child run per service. A service that \
                 fails to start fails this run; the cluster stays up.",
                3600,
            ),
            Action::Stop => ActionDecl::new("Stops every instance; the cluster stays, `down`.", 300),
            Action::Start => {
                ActionDecl::new("Starts a stopped cluster's instances again.", 600).with_settings().applying_spec()
            }
            Action::Destroy => ActionDecl::new("Stops the instances and removes what the cluster made.", 300),
            Action::Retry => ActionDecl::new("Repeats the action that failed.", 300),
            Action::Refresh => ActionDecl::new(
                "Compares what runs with the record (instances alive, from their recorded build, answering \
                 their health check; on aws the stack and its group) and records the differences as the \
                 cluster's drift. Changes nothing.",
                120,
            )
            .refreshing(),
            Action::Repair => ActionDecl::new(
                "Makes what runs match the record: local instances that died are started again from the build \
                 they ran, on the port they had; on aws the stack is sent again as it last ran (its applied \
                 spec, AMI and count) and the group's desired capacity set back if it was changed by hand.",
                600,
            )
            .with_settings(),
            Action::Adopt => ActionDecl::new(
                "Takes what the last refresh found into the record, as a new spec version: the count the \
                 cluster really has (an auto-scaling group resized by hand; local instances that died, \
                 forgotten). Refused (409) when the refresh found nothing, is over an hour old, or found \
                 something no spec field can say (then repair). Reality is looked at again first: if it moved \
                 since the refresh, the adopt fails and changes nothing.",
                600,
            )
            .with_settings()
            .changing_spec(&["count"])
            .adopting(),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        spec.check()
    }

    fn provider(spec: &Spec) -> String {
        spec.provider.clone()
    }

    fn references(spec: &Spec) -> Vec<Reference> {
        let mut refs = vec![Reference::new(image::KIND, &spec.image, "spec.image")];
        if let Some(env) = &spec.environment {
            refs.push(Reference::new(environment::KIND, env, "spec.environment"));
        }
        if let Some(leader) = &spec.join {
            refs.push(Reference::new(KIND, leader, "spec.join"));
        }
        refs
    }

    fn requires(spec: &Spec, action: Action) -> Vec<Dependency> {
        dependencies(spec, action)
    }

    /// A worker group's leader runs on its provider.
    fn check_with(spec: &Spec, named: &[Referenced]) -> Vec<FieldError> {
        named
            .iter()
            .filter(|r| r.reference.kind == KIND && r.spec["provider"].as_str().unwrap_or("local") != spec.provider)
            .map(|r| FieldError::new("spec.join", format!("cluster {} runs on another provider", r.name)))
            .collect()
    }

    fn spec_after(spec: &Spec, action: Action, params: &Value) -> Option<Spec> {
        spec_after_success(spec, action, params)
    }

    fn fan_out(action: Action) -> Option<FanOut> {
        match action {
            Action::Initialize => Some(FanOut { kind: service::KIND, action: "start", done: &["running"] }),
            _ => None,
        }
    }

    /// Locally, a scale starts or stops instances and leaves the others as
    /// they run; on `aws` it sends the whole rendered stack — but an adopt
    /// sends the stack as it last ran, with only the count changed.
    fn applies_whole(spec: &Spec, action: Action) -> bool {
        spec.provider == "aws" && action != Action::Adopt
    }

    fn environment(spec: &Spec) -> Option<String> {
        spec.environment.clone()
    }

    fn examples() -> Vec<Value> {
        vec![
            json!({"image": "web", "count": 3}),
            json!({"image": "web", "count": 1, "environment": "qa", "health_check": {"type": "tcp"},
                "start_timeout_secs": 60}),
            json!({"provider": "aws", "image": "base", "count": 2, "instance_type": "t3.micro",
                "subnets": ["subnet-0123abcd"], "security_groups": ["sg-0123abcd"], "key_name": "ops",
                "tags": {"team": "web"}, "role_metadata": "role=worker,instancetype=r3", "join": "leader",
                "termination_protection": true, "port": 8080, "health_check": {"type": "http", "path": "/health"},
                "auto_repair": true}),
        ]
    }
}

/// The cluster transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    let go = |working, ok| Ok(TypedStep::Go { working, ok, err: S::Failed });
    match (state, action) {
        (S::Pending, A::Create) => go(S::Creating, S::Up),
        (S::Up, A::Scale | A::AddInstances) => go(S::Scaling, S::Up),
        // The cluster stays up while its services start (they need it up),
        // and a service that fails to start is the service's failure.
        (S::Up, A::Initialize) => Ok(TypedStep::Go { working: S::Up, ok: S::Up, err: S::Up }),
        (S::Up, A::Stop) => go(S::Stopping, S::Down),
        (S::Down, A::Start) => go(S::Starting, S::Up),
        (S::Pending | S::Up | S::Down | S::Failed, A::Destroy) => go(S::Destroying, S::Destroyed),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        // Reads only: the cluster stays as it is, whatever it finds.
        (S::Up | S::Down, A::Refresh) => Ok(TypedStep::Go { working: state, ok: state, err: state }),
        // A repair that cannot bring an instance back leaves the cluster
        // up, as it was (its other instances run): the failed run says why.
        (S::Up, A::Repair) => Ok(TypedStep::Go { working: S::Repairing, ok: S::Up, err: S::Up }),
        // An adopt that finds reality moved changes nothing.
        (S::Up, A::Adopt) => Ok(TypedStep::Go { working: S::Adopting, ok: S::Up, err: S::Up }),
        (S::Pending, A::Scale | A::AddInstances | A::Initialize | A::Stop | A::Start | A::Retry) => Err(NotAllowed),
        (S::Pending | S::Failed, A::Refresh | A::Repair | A::Adopt) => Err(NotAllowed),
        (S::Up, A::Create | A::Start | A::Retry) => Err(NotAllowed),
        (
            S::Down,
            A::Create | A::Scale | A::AddInstances | A::Initialize | A::Stop | A::Retry | A::Repair | A::Adopt,
        ) => Err(NotAllowed),
        (S::Failed, A::Create | A::Scale | A::AddInstances | A::Initialize | A::Stop | A::Start) => Err(NotAllowed),
        (
            S::Creating
            | S::Scaling
            | S::Stopping
            | S::Starting
            | S::Destroying
            | S::Destroyed
            | S::Repairing
            | S::Adopting,
            A::Create
            | A::Scale
            | A::AddInstances
            | A::Initialize
            | A::Stop
            | A::Start
            | A::Destroy
            | A::Retry
            | A::Refresh
            | A::Repair
            | A::Adopt,
        ) => Err(NotAllowed),
    }
}

/// How an instance shows it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum HealthCheck {
    /// `GET path` on the instance's port answers 2xx or 3xx.
    Http {
        /// An absolute path without spaces or control characters.
        #[schemars(regex(pattern = r"^/[^\s\x00-\x1f\x7f-\x9f]*$"))]
        path: String,
    },
    /// A TCP connection to the instance's port succeeds.
    Tcp,
}

impl HealthCheck {
    /// The path an HTTP check asks for; `None`: a TCP check.
    pub fn http_path(&self) -> Option<&str> {
        match self {
            HealthCheck::Http { path } => Some(path.as_str()),
            HealthCheck::Tcp => None,
        }
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck::Http { path: "/".to_string() }
    }
}

/// What a cluster runs. The `aws` fields are refused on `local` clusters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = provider_rules)]
pub struct Spec {
    /// Provider that runs it: `local` (default) or `aws` (a CloudFormation stack).
    #[serde(default = "default_provider")]
    #[schemars(extend("enum" = PROVIDERS))]
    pub provider: String,
    /// Name or id of the image its instances start from.
    #[schemars(regex(pattern = r"\S"))]
    pub image: String,
    /// Number of instances.
    #[schemars(range(min = 1, max = 64))]
    pub count: u32,
    /// The environment (name) the cluster is in: its settings apply between
    /// global and the cluster's own, and a protected environment guards it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub environment: Option<String>,
    /// Default: `{"type": "http", "path": "/"}`.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// How long one instance may take to pass its health check (seconds, default 30).
    #[serde(default = "default_start_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub start_timeout_secs: u64,
    /// aws: the port the instances serve on, which `health_check` asks at
    /// each instance's private address. With it, create, scale, start and
    /// repair wait until every instance answers, the view names those that
    /// do not, and a repair (or `auto_repair`) has the auto-scaling group
    /// replace them; without it, the group's EC2 status checks are the only
    /// check. (A local instance is given its port by drover, as `PORT`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// aws: the instances' type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// aws: the EC2 key pair to log in with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// aws: the instances' IAM instance profile (name): what lets them read
    /// their secret settings from Parameter Store, take SSM Run Command
    /// (jobs, services) and fetch services' artifacts from S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    /// aws: subnets of the auto-scaling group (at least one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    /// aws: security groups of the instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// aws: tags for the stack and every instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Role metadata of the cluster's machines, `key=value` pairs separated
    /// by commas: `role=worker,instancetype=r3` (default `cluster=NAME`).
    /// An aws instance gets it in its cloud-config, a local one as
    /// `DROVER_ROLE_METADATA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_metadata: Option<String>,
    /// The leader cluster (name) this worker group joins; it must be `up`,
    /// on the same provider. Its machines are the leader's too: services
    /// and jobs of the leader are placed on them (by their role metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub join: Option<String>,
    /// aws: refuse `destroy` while true (and turn on the stack's termination
    /// protection).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub termination_protection: bool,
    /// When an instance dies (local: its process; aws, with `port`: it
    /// stops answering its health check), drover's observer repairs the
    /// cluster within one observation round (local: starts it again; aws:
    /// the group replaces it), backing off when repairs do not hold, and
    /// stops at a crash loop (shown in the view). An aws cluster without
    /// `port` has nothing for drover to see: the group's own EC2 checks
    /// replace its instances.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_repair: bool,
}

/// What [`Spec::check`] asks of each provider, said in the schema: one
/// branch per provider, with the fields it requires and those it refuses.
fn provider_rules(schema: &mut schemars::Schema) {
    // A word: printable ASCII without spaces or commas.
    let word = json!({"type": "string", "pattern": "^[!-+\\--~]{1,255}$"});
    let id = |prefix: &str| json!({"type": "string", "pattern": format!("^{prefix}[0-9a-fA-F]{{8,32}}$")});
    let pair = "[A-Za-z0-9_./:-]{1,64}=[A-Za-z0-9_./:-]{1,64}";
    let metadata = json!({"type": ["string", "null"], "maxLength": 1024, "pattern": format!("^{pair}(,{pair})*$")});
    // Refused on local, unless empty (as validation has it).
    let local = json!({
        "provider": {"const": "local"},
        "instance_type": {"type": "null"}, "key_name": {"type": "null"}, "instance_profile": {"type": "null"},
        "port": {"type": "null"},
        "role_metadata": metadata,
        "subnets": {"maxItems": 0}, "security_groups": {"maxItems": 0},
        "tags": {"maxProperties": 0}, "termination_protection": {"const": false},
    });
    schema.insert(
        "oneOf".into(),
        json!([
            {"title": "local", "properties": local},
            {"title": "aws", "required": ["provider", "instance_type", "subnets"],
             "if": {"properties": {"auto_repair": {"const": true}}, "required": ["auto_repair"]},
             "then": {"required": ["port"], "properties": {"port": {"type": "integer"}}},
             "properties": {
                "provider": {"const": "aws"},
                "instance_type": word,
                "key_name": {"type": ["string", "null"], "pattern": "^[!-+\\--~]{1,255}$"},
                "instance_profile": {"type": ["string", "null"], "pattern": "^[\\w+=,.@-]{1,128}$"},
                "subnets": {"type": "array", "minItems": 1, "items": id("subnet-")},
                "security_groups": {"type": "array", "items": id("sg-")},
                "tags": {"type": "object", "maxProperties": 40,
                    "propertyNames": {"minLength": 1, "maxLength": 127, "pattern": "^(?![dD][rR][oO][vV][eE][rR]:|[aA][wW][sS]:)"},
                    "additionalProperties": {"type": "string", "maxLength": 255}},
                "role_metadata": metadata}},
        ]),
    );
}

/// Providers clusters can run on.
pub const PROVIDERS: &[&str] = &["local", "aws"];

/// Tag keys drover sets itself (and users may not).
pub const RESERVED_TAG_PREFIXES: &[&str] = &["drover:", "aws:"];

/// Whether `s` looks like an AWS id with this prefix (`ami-`, `subnet-`, `sg-`).
pub(crate) fn aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|rest| (8..=32).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `role=worker,instancetype=r3`: pairs whose keys and values are plain
/// words, so that they survive YAML, shell and CloudFormation unquoted.
fn valid_metadata(s: &str) -> bool {
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 64
            && w.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
    };
    s.len() <= 1024 && s.split(',').all(|pair| pair.split_once('=').is_some_and(|(k, v)| word(k) && word(v)))
}

fn default_provider() -> String {
    "local".to_string()
}

fn default_start_timeout() -> u64 {
    30
}

impl Spec {
    /// The role metadata its machines carry: as given, else `cluster=NAME`.
    pub fn machine_metadata(&self, cluster: &str) -> String {
        self.role_metadata.clone().unwrap_or_else(|| format!("cluster={cluster}"))
    }

    /// Checks a spec and returns it typed.
    pub fn from_value(v: &Value) -> Result<Spec> {
        super::read_spec::<Cluster>(v)
    }

    fn check(&self) -> Vec<FieldError> {
        let spec = self;
        let mut errors = Vec::new();
        match spec.provider.as_str() {
            "local" => {
                let aws_only = [
                    ("instance_type", spec.instance_type.is_some()),
                    ("key_name", spec.key_name.is_some()),
                    ("instance_profile", spec.instance_profile.is_some()),
                    ("subnets", !spec.subnets.is_empty()),
                    ("security_groups", !spec.security_groups.is_empty()),
                    ("tags", !spec.tags.is_empty()),
                    ("termination_protection", spec.termination_protection),
                ];
                for (field, set) in aws_only {
                    if set {
                        errors.push(FieldError::new(format!("spec.{field}"), "not used by provider local"));
                    }
                }
                if spec.port.is_some() {
                    errors.push(FieldError::new(
                        "spec.port",
                        "not used by provider local: drover gives each instance its own port (PORT)",
                    ));
                }
            }
            "aws" => spec.check_aws(&mut errors),
            _ => errors
                .push(FieldError::new("spec.provider", format!("unknown provider; known: {}", PROVIDERS.join(", ")))),
        }
        if spec.role_metadata.as_deref().is_some_and(|m| !valid_metadata(m)) {
            errors.push(FieldError::new(
                "spec.role_metadata",
                "must be key=value pairs separated by commas, like role=worker,instancetype=r3",
            ));
        }
        if spec.image.trim().is_empty() {
            errors.push(FieldError::new("spec.image", "must name an image"));
        }
        if spec.environment.as_deref().is_some_and(|e| !is_name(e)) {
            errors.push(FieldError::new("spec.environment", "not an environment name"));
        }
        if spec.join.as_deref().is_some_and(|j| !is_name(j)) {
            errors.push(FieldError::new("spec.join", "must name the leader cluster"));
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
        errors
    }
}

/// `scale`: the new number of instances.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleParams {
    /// Instances after the scale.
    #[schemars(range(min = 1, max = 64))]
    pub count: u32,
}

impl ActionParams for ScaleParams {
    fn check(&self) -> Vec<FieldError> {
        match self.count {
            1..=MAX_COUNT => Vec::new(),
            _ => vec![FieldError::new("params.count", format!("must be between 1 and {MAX_COUNT}"))],
        }
    }
}

impl Spec {
    fn check_aws(&self, errors: &mut Vec<FieldError>) {
        if self.auto_repair && self.port.is_none() {
            errors.push(FieldError::new(
                "spec.auto_repair",
                "needs spec.port on provider aws: without a health check drover can ask, the auto-scaling \
                 group's own EC2 checks replace its instances",
            ));
        }
        if self.port == Some(0) {
            errors.push(FieldError::new("spec.port", "must be between 1 and 65535"));
        }
        let word = |s: &str| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic() && b != b',');
        if !self.instance_type.as_deref().is_some_and(word) {
            errors.push(FieldError::new(
                "spec.instance_type",
                "must name an instance type, like t3.micro (required by provider aws)",
            ));
        }
        if self.key_name.as_deref().is_some_and(|k| !word(k)) {
            errors.push(FieldError::new("spec.key_name", "must be a key pair name without spaces or commas"));
        }
        let profile = |c: char| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c);
        if self.instance_profile.as_ref().is_some_and(|p| p.is_empty() || p.len() > 128 || !p.chars().all(profile)) {
            errors.push(FieldError::new("spec.instance_profile", "must be an IAM instance profile name"));
        }
        if self.subnets.is_empty() {
            errors.push(FieldError::new("spec.subnets", "at least one subnet id (required by provider aws)"));
        }
        for (i, s) in self.subnets.iter().enumerate() {
            if !aws_id(s, "subnet-") {
                errors.push(FieldError::new(format!("spec.subnets[{i}]"), "must be a subnet id like subnet-0abc1234"));
            }
        }
        for (i, s) in self.security_groups.iter().enumerate() {
            if !aws_id(s, "sg-") {
                errors.push(FieldError::new(
                    format!("spec.security_groups[{i}]"),
                    "must be a security group id like sg-0abc1234",
                ));
            }
        }
        if self.tags.len() > 40 {
            errors.push(FieldError::new("spec.tags", "at most 40 tags"));
        }
        for (k, v) in &self.tags {
            let reserved = RESERVED_TAG_PREFIXES.iter().any(|p| k.to_ascii_lowercase().starts_with(p));
            if k.is_empty() || k.len() > 127 || v.len() > 255 || reserved {
                errors.push(FieldError::new(
                    format!("spec.tags.{k}"),
                    "keys are 1-127 characters and may not start with drover: or aws:; values at most 255",
                ));
            }
        }
    }

    /// The count an action brings the cluster to, or `None` when it does not
    /// change it.
    pub fn target_count(&self, action: &str, params: &Value) -> Option<u32> {
        let n = |k: &str| params.get(k).and_then(Value::as_u64).map(|c| c as u32);
        match Action::parse(action)? {
            Action::Create | Action::Start => Some(self.count),
            Action::Scale => Some(n("count").unwrap_or(self.count)),
            Action::AddInstances => Some(self.count.saturating_add(n("n").unwrap_or(0))),
            Action::Stop => Some(0),
            // What the refresh found, taken into the record.
            Action::Adopt => Some(params["spec"]["count"].as_u64().map(|c| c as u32).unwrap_or(self.count)),
            Action::Initialize | Action::Destroy | Action::Retry | Action::Refresh | Action::Repair => None,
        }
    }
}

/// `add-instances`: how many instances to add.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddParams {
    /// Instances to add (the cluster stays at most 64).
    #[schemars(range(min = 1, max = 63))]
    pub n: u32,
}

impl ActionParams for AddParams {
    fn check(&self) -> Vec<FieldError> {
        match self.n {
            1..MAX_COUNT => Vec::new(),
            _ => vec![FieldError::new("params.n", format!("must be between 1 and {}", MAX_COUNT - 1))],
        }
    }
}

/// A cluster's image must be built, and a worker group's leader `up`, for
/// any action that starts instances.
fn dependencies(spec: &Spec, action: Action) -> Vec<Dependency> {
    if !Cluster::action(action).takes_settings {
        return Vec::new();
    }
    let mut deps = vec![Dependency {
        kind: image::KIND,
        key: spec.image.clone(),
        field: "spec.image",
        required_state: image::State::Built.as_str(),
    }];
    if let Some(leader) = &spec.join {
        deps.push(Dependency {
            kind: KIND,
            key: leader.clone(),
            field: "spec.join",
            required_state: State::Up.as_str(),
        });
    }
    deps
}

fn spec_after_success(spec: &Spec, action: Action, params: &Value) -> Option<Spec> {
    let count = spec.target_count(action.as_str(), params)?;
    match action {
        // (An adopt's spec is the generic merge of its patch: never here.)
        Action::Scale | Action::AddInstances | Action::Adopt => Some(Spec { count, ..spec.clone() }),
        Action::Create
        | Action::Initialize
        | Action::Stop
        | Action::Start
        | Action::Destroy
        | Action::Retry
        | Action::Refresh
        | Action::Repair => None,
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
        let init = Ok(TypedStep::Go { working: S::Up, ok: S::Up, err: S::Up });
        let stay = |s: S| Ok(TypedStep::Go { working: s, ok: s, err: s });
        let up = |w: S| Ok(TypedStep::Go { working: w, ok: S::Up, err: S::Up });
        // columns: create, scale, add-instances, initialize, stop, start,
        // destroy, retry, refresh, repair, adopt
        let expected = [
            (S::Pending, [go(S::Creating, S::Up), no, no, no, no, no, destroy, no, no, no, no]),
            (S::Creating, [no; 11]),
            (
                S::Up,
                [
                    no,
                    go(S::Scaling, S::Up),
                    go(S::Scaling, S::Up),
                    init,
                    go(S::Stopping, S::Down),
                    no,
                    destroy,
                    no,
                    stay(S::Up),
                    up(S::Repairing),
                    up(S::Adopting),
                ],
            ),
            (S::Scaling, [no; 11]),
            (S::Stopping, [no; 11]),
            (S::Down, [no, no, no, no, no, go(S::Starting, S::Up), destroy, no, stay(S::Down), no, no]),
            (S::Starting, [no; 11]),
            (S::Failed, [no, no, no, no, no, no, destroy, Ok(TypedStep::Retry), no, no, no]),
            (S::Destroying, [no; 11]),
            (S::Destroyed, [no; 11]),
            (S::Repairing, [no; 11]),
            (S::Adopting, [no; 11]),
        ];
        assert_eq!(expected.len(), State::ALL.len());
        assert_eq!(Action::ALL.len(), 11);
        let actions = [
            A::Create,
            A::Scale,
            A::AddInstances,
            A::Initialize,
            A::Stop,
            A::Start,
            A::Destroy,
            A::Retry,
            A::Refresh,
            A::Repair,
            A::Adopt,
        ];
        for (state, row) in expected {
            for (action, want) in actions.into_iter().zip(row) {
                assert_eq!(next(state, action), want, "{state:?} --{action:?}-->");
            }
        }
    }

    #[test]
    fn no_dead_ends() {
        // Every state but `destroyed` has a way out that ends in `destroyed`.
        for &s in State::ALL {
            let exits: Vec<_> = Action::ALL.iter().filter(|&&a| next(s, a).is_ok()).collect();
            let working = matches!(
                s,
                S::Creating | S::Scaling | S::Stopping | S::Starting | S::Destroying | S::Repairing | S::Adopting
            );
            assert_eq!(exits.is_empty(), working || s == S::Destroyed, "{s:?}: {exits:?}");
        }
    }

    fn validate_params(action: &str, params: &Value) -> Result<Value> {
        KIND.validate_params(action, params)
    }

    fn dependencies(spec: &Value, action: &str) -> Vec<Dependency> {
        KIND.dependencies(spec, action)
    }

    fn spec_after_success(action: &str, params: &Value, spec: &Value) -> Option<Value> {
        KIND.spec_after_success(action, params, spec)
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
        let spec = serde_json::json!({"image": "i", "count": 2, "health_check": {"type": "tcp"}});
        let after = spec_after_success("scale", &serde_json::json!({"count": 5}), &spec).unwrap();
        assert_eq!(after["count"], 5);
        assert_eq!(spec_after_success("stop", &Value::Null, &spec), None);
        let after = spec_after_success("add-instances", &serde_json::json!({"n": 2}), &spec).unwrap();
        assert_eq!(after["count"], 4);
    }

    #[test]
    fn add_instances_params_are_checked() {
        assert_eq!(
            validate_params("add-instances", &serde_json::json!({"n": 2})).unwrap(),
            serde_json::json!({"n": 2})
        );
        for bad in [serde_json::json!({"n": 0}), serde_json::json!({}), serde_json::json!({"count": 2})] {
            let e = validate_params("add-instances", &bad).unwrap_err();
            assert!(matches!(e, Error::Invalid(f) if f[0].field.starts_with("params")), "{bad}");
        }
    }

    fn aws_spec() -> Value {
        serde_json::json!({
            "provider": "aws", "image": "base", "count": 2, "instance_type": "t3.micro",
            "subnets": ["subnet-0123abcd"], "security_groups": ["sg-0123abcd"],
            "key_name": "ops", "tags": {"team": "web"}, "role_metadata": "role=worker,instancetype=r3",
            "join": "leader"
        })
    }

    #[test]
    fn aws_spec_fields_are_checked_by_name() {
        let ok = Spec::from_value(&aws_spec()).unwrap();
        assert_eq!(ok.join.as_deref(), Some("leader"));
        let mut bad = aws_spec();
        bad["subnets"] = serde_json::json!(["nope"]);
        bad["role_metadata"] = "role worker".into();
        bad["tags"] = serde_json::json!({"drover:run": "x"});
        bad.as_object_mut().unwrap().remove("instance_type");
        let e = Spec::from_value(&bad).unwrap_err();
        let Error::Invalid(f) = e else { panic!() };
        let fields: Vec<_> = f.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.instance_type", "spec.subnets[0]", "spec.tags.drover:run", "spec.role_metadata"]);
        // aws fields on a local cluster are refused, so local specs stay as they were.
        let e = Spec::from_value(&serde_json::json!({"image": "web", "count": 1, "key_name": "x"})).unwrap_err();
        assert!(matches!(e, Error::Invalid(f) if f[0].field == "spec.key_name"));
        // auto_repair on aws needs a port to check: else the group's own checks replace instances.
        let mut repaired = aws_spec();
        repaired["auto_repair"] = true.into();
        let e = Spec::from_value(&repaired).unwrap_err();
        assert!(
            matches!(e, Error::Invalid(f) if f[0].field == "spec.auto_repair" && f[0].message.contains("spec.port"))
        );
        repaired["port"] = 8080.into();
        assert_eq!(Spec::from_value(&repaired).unwrap().port, Some(8080));
        // A port is an aws field: a local instance is given its own.
        let e = Spec::from_value(&serde_json::json!({"image": "web", "count": 1, "port": 8080})).unwrap_err();
        assert!(matches!(e, Error::Invalid(f) if f[0].field == "spec.port" && f[0].message.contains("PORT")));
        assert!(Spec::from_value(&serde_json::json!({"image": "web", "count": 1, "auto_repair": true})).is_ok());
        // A local worker group joins a local leader.
        assert!(Spec::from_value(&serde_json::json!({"image": "web", "count": 1, "join": "x"})).is_ok());
        let local = Spec::from_value(&serde_json::json!({"image": "web", "count": 1})).unwrap();
        assert_eq!(
            serde_json::to_value(&local).unwrap(),
            serde_json::json!({"provider": "local", "image": "web", "count": 1,
                "health_check": {"type": "http", "path": "/"}, "start_timeout_secs": 30})
        );
    }

    #[test]
    fn a_worker_group_depends_on_its_leader_being_up() {
        let deps = dependencies(&aws_spec(), "create");
        assert_eq!(deps.len(), 2);
        assert_eq!(deps[1].kind, KIND);
        assert_eq!(deps[1].key, "leader");
        assert_eq!(deps[1].field, "spec.join");
        assert_eq!(deps[1].required_state, "up");
        assert_eq!(dependencies(&aws_spec(), "add-instances").len(), 2);
        assert!(dependencies(&aws_spec(), "destroy").is_empty());
        assert!(dependencies(&aws_spec(), "stop").is_empty());
    }

    #[test]
    fn target_counts() {
        let s = Spec::from_value(&aws_spec()).unwrap();
        assert_eq!(s.target_count("create", &Value::Null), Some(2));
        assert_eq!(s.target_count("scale", &serde_json::json!({"count": 5})), Some(5));
        assert_eq!(s.target_count("add-instances", &serde_json::json!({"n": 3})), Some(5));
        assert_eq!(s.target_count("stop", &Value::Null), Some(0));
        assert_eq!(s.target_count("destroy", &Value::Null), None);
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
