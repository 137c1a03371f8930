//! Routers: a load balancer in an environment, its backends fed from the
//! discovery registry (a service's healthy instances) or a cluster's
//! instances.
//!
//! ```text
//! pending --create--> creating --ok--> up --err--> failed
//! up --apply--> applying --ok--> up --err--> failed
//! up --swap{backend,to}--> swapping --ok--> up --err--> up (traffic back where it was)
//! up --swap-back{backend}--> swapping-back --ok--> up --err--> up
//! up --stop--> stopping --ok--> stopped --err--> failed
//! stopped --start--> starting --ok--> up --err--> failed
//! pending|up|stopped|failed --destroy--> destroying --ok--> destroyed --err--> failed
//! failed --retry--> the working state of the action that failed
//! ```
//!
//! A router has frontends (`http` on a port, routing by host and path
//! prefix; `tcp` on a port) and backends, each naming its target: a
//! service (its servers are the service's entries in the discovery
//! registry) or a cluster (its instances). While it is `up`, drover renders
//! its configuration again whenever the registry changes (see
//! `crate::routing`); a spec change takes effect with `apply`.
//!
//! Blue/green: a backend has a live `target` and may have a `standby`.
//! `swap` moves a backend's traffic to another target once every server
//! of it passes the load balancer's own health checks, then watches the
//! error rate through the backend for `verify_secs` and swaps back by
//! itself when it crosses `max_error_rate`. The old target becomes the
//! standby, kept warm (no scale-down, stop or destroy) until `keep_until`.
//! `swap-back` is the inverse run: traffic back to the standby, which
//! becomes live again.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    cluster, environment, named_enum, service, ActionDecl, ActionParams, Declaration, Guard, Kind, NotAllowed, Params,
    Reference, TypedStep,
};
use crate::error::{FieldError, Result};

/// This kind's handle.
pub const KIND: Kind = Kind::declare::<Router>();

/// The router kind's declaration.
pub struct Router;

named_enum!(State {
    Pending => "pending",
    Creating => "creating",
    Up => "up",
    Applying => "applying",
    Swapping => "swapping",
    SwappingBack => "swapping-back",
    Stopping => "stopping",
    Stopped => "stopped",
    Starting => "starting",
    Failed => "failed",
    Destroying => "destroying",
    Destroyed => "destroyed",
});

named_enum!(Action {
    Create => "create",
    Apply => "apply",
    Swap => "swap",
    SwapBack => "swap-back",
    Stop => "stop",
    Start => "start",
    Destroy => "destroy",
    Retry => "retry",
    Refresh => "refresh",
    Repair => "repair",
});

/// Providers routers run on: `local`, a real HAProxy on drover's host;
/// `aws`, an Application Load Balancer.
pub const PROVIDERS: &[&str] = &["local", "aws"];

/// The most rules an Application Load Balancer's listener holds (AWS's
/// default quota: 100 besides the default action).
pub const MAX_AWS_RULES: usize = 100;

/// The longest host or path pattern an ALB condition takes (a path
/// prefix becomes `prefix` and `prefix/*`).
pub const MAX_AWS_PATTERN: usize = 128;

/// What a swap's shadow backend's name ends with (not a name a spec can
/// give: `.` is not allowed in one).
const SHADOW: &str = ".next";

/// The shadow backend a swap checks a new target in before traffic moves:
/// the load balancer health-checks its servers, and no frontend routes to it.
pub fn shadow_name(backend: &str) -> String {
    format!("{backend}{SHADOW}")
}

/// Whether a backend is a swap's shadow.
pub fn is_shadow(backend: &str) -> bool {
    backend.ends_with(SHADOW)
}

/// How long a swap keeps the old target warm by default.
pub const DEFAULT_KEEP_HOURS: i64 = 1;

/// The most frontends and backends one router has.
pub const MAX_FRONTENDS: usize = 16;
pub const MAX_BACKENDS: usize = 64;
pub const MAX_RULES: usize = 128;

impl Declaration for Router {
    const NAME: &'static str = "router";
    const PLURAL: &'static str = "routers";
    const DESCRIPTION: &'static str = "A load balancer in an environment (locally a real HAProxy, on aws an \
         Application Load Balancer): frontends by port, host and path, backends fed from the discovery registry or a \
         cluster's instances.";
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
            Action::Create => ActionDecl::new(
                "Renders the configuration from the registry, validates it with the load balancer itself and \
                 starts serving it.",
                120,
            )
            .applying_spec(),
            Action::Apply => ActionDecl::new(
                "Puts the spec as it is written now in service: renders, validates and reloads without dropping \
                 connections.",
                120,
            )
            .applying_spec(),
            Action::Swap => ActionDecl::new(
                "Moves a backend's traffic to another target (a service or a cluster): first every server of it \
                 must pass the load balancer's own health checks, then traffic moves, then a guard watches the \
                 share of failed requests through the backend for verify_secs and swaps back by itself when it \
                 crosses max_error_rate (the run then fails, the router serving as before). The old target \
                 becomes the backend's standby, kept warm until keep_until.",
                1800,
            )
            .params(Params::of::<SwapParams>())
            .changing_spec(&["backends"]),
            Action::SwapBack => ActionDecl::new(
                "Moves a backend's traffic back to its standby, with the swap's gates and guard: the inverse run \
                 of the last swap, which its parameters name (`undoes`).",
                1800,
            )
            .params(Params::of::<SwapBackParams>())
            .changing_spec(&["backends"]),
            Action::Stop => ActionDecl::new("Stops serving (connections in flight finish); the router stays.", 120),
            Action::Start => {
                ActionDecl::new("Serves again, from a configuration rendered afresh.", 120).applying_spec()
            }
            Action::Destroy => ActionDecl::new(
                "Stops serving and removes what the router made (its HAProxy's files; on aws the load balancer and \
                 its target groups).",
                600,
            ),
            Action::Retry => ActionDecl::new("Repeats the action that failed.", 120),
            Action::Refresh => ActionDecl::new(
                "Compares the load balancer with the record: running when the router is up (stopped when \
                 stopped), serving the last applied configuration version as recorded. Records the \
                 differences as the router's drift; changes nothing.",
                60,
            )
            .refreshing(),
            Action::Repair => ActionDecl::new(
                "Puts the recorded configuration back in place (rendered from the spec and the registry, \
                 validated, loaded without dropping connections) over whatever was changed on the machine.",
                120,
            ),
        }
    }

    fn check(spec: &Spec) -> Vec<FieldError> {
        spec.check()
    }

    fn provider(spec: &Spec) -> String {
        spec.provider.clone()
    }

    fn references(spec: &Spec) -> Vec<Reference> {
        let mut refs = vec![Reference::new(environment::KIND, &spec.environment, "spec.environment")];
        for (i, b) in spec.backends.iter().enumerate() {
            refs.push(b.target.reference(&format!("spec.backends[{i}].target")));
        }
        refs
    }

    fn check_action(spec: &Spec, action: Action, params: &Value) -> Vec<FieldError> {
        let Some(name) = params.get("backend").and_then(Value::as_str) else { return Vec::new() };
        let Some(b) = spec.backends.iter().find(|b| b.name == name) else {
            return vec![FieldError::new("params.backend", format!("the router has no backend {name:?}"))];
        };
        match action {
            Action::Swap => match serde_json::from_value::<Target>(params["to"].clone()) {
                Ok(to) if to == b.target => {
                    vec![FieldError::new(
                        "params.to",
                        format!("{} {} is already backend {name}'s target", to.kind(), to.key()),
                    )]
                }
                _ => Vec::new(),
            },
            Action::SwapBack if b.standby.is_none() => vec![FieldError::new(
                "params.backend",
                format!("backend {name} has no standby to swap back to: no swap has left one"),
            )],
            _ => Vec::new(),
        }
    }

    /// A swap records until when the old target is kept warm (an hour by
    /// default); a swap-back records where it goes (the standby) and the
    /// swap it undoes (the router's outputs say which).
    fn complete_params(
        spec: &Spec,
        outputs: &Value,
        action: Action,
        mut params: Value,
    ) -> Result<Value, Vec<FieldError>> {
        match action {
            Action::Swap => {
                if params.get("keep_until").is_none_or(Value::is_null) {
                    let until = chrono::Utc::now() + chrono::Duration::hours(DEFAULT_KEEP_HOURS);
                    params["keep_until"] = json!(until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                }
                Ok(params)
            }
            Action::SwapBack => {
                let name = params["backend"].as_str().unwrap_or_default().to_string();
                let Some(standby) = spec.backends.iter().find(|b| b.name == name).and_then(|b| b.standby.clone())
                else {
                    return Ok(params);
                };
                params["to"] = serde_json::to_value(&standby).expect("a target serializes");
                if let Some(run) = outputs["swaps"][&name]["run"].as_str() {
                    params["undoes"] = json!(run);
                }
                Ok(params)
            }
            _ => Ok(params),
        }
    }

    fn spec_after(spec: &Spec, action: Action, params: &Value) -> Option<Spec> {
        match action {
            Action::Swap | Action::SwapBack => {
                let name = params["backend"].as_str()?;
                let to: Target = serde_json::from_value(params["to"].clone()).ok()?;
                let keep_until = params["keep_until"].as_str().and_then(|t| t.parse().ok());
                let mut after = spec.clone();
                let b = after.backends.iter_mut().find(|b| b.name == name)?;
                let from = std::mem::replace(&mut b.target, to);
                b.standby = Some(from);
                b.keep_until = match action {
                    Action::Swap => keep_until,
                    _ => b.keep_until,
                };
                Some(after)
            }
            _ => None,
        }
    }

    const GUARDS: bool = true;

    /// A standby is kept warm until its `keep_until`: its target is not
    /// scaled down, stopped or destroyed meanwhile.
    fn guards(spec: &Spec) -> Vec<Guard> {
        spec.backends
            .iter()
            .filter_map(|b| {
                let standby = b.standby.as_ref()?;
                Some(Guard {
                    kind: standby.kind(),
                    key: standby.key().to_string(),
                    actions: &["scale", "stop", "destroy"],
                    until: b.keep_until,
                    why: format!("standby of backend {}", b.name),
                })
            })
            .collect()
    }

    /// A local router's ports: two HAProxies cannot listen on one.
    fn claims(spec: &Spec) -> Vec<(String, String)> {
        match spec.provider.as_str() {
            "local" => spec
                .frontends
                .iter()
                .enumerate()
                .map(|(i, f)| (format!("port {}", f.port), format!("spec.frontends[{i}].port")))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn environment(spec: &Spec) -> Option<String> {
        Some(spec.environment.clone())
    }

    fn examples() -> Vec<Value> {
        vec![
            json!({"environment": "prod",
                "frontends": [{"name": "web", "mode": "http", "port": 8080, "backend": "site",
                    "rules": [{"host": "api.example.com", "backend": "api"}, {"path_prefix": "/api", "backend": "api"}]}],
                "backends": [{"name": "site", "target": {"service": "app"}},
                    {"name": "api", "target": {"service": "api"}, "check": {"type": "http", "path": "/health"}}]}),
            json!({"environment": "prod",
                "frontends": [{"name": "pg", "mode": "tcp", "port": 15432, "backend": "db"}],
                "backends": [{"name": "db", "target": {"cluster": "db-blue"}, "check": {"type": "tcp"}}]}),
            json!({"environment": "prod", "provider": "aws",
                "subnets": ["subnet-0123abcd", "subnet-4567cdef"], "security_groups": ["sg-0123abcd"],
                "frontends": [{"name": "web", "mode": "http", "port": 80, "backend": "site",
                    "rules": [{"path_prefix": "/api", "backend": "api"}]}],
                "backends": [{"name": "site", "target": {"cluster": "web-blue"}, "port": 8080},
                    {"name": "api", "target": {"service": "api"}, "check": {"type": "http", "path": "/health"}}]}),
        ]
    }
}

/// The router transition table.
pub fn next(state: State, action: Action) -> Result<TypedStep<State>, NotAllowed> {
    use Action as A;
    use State as S;
    let go = |working, ok| Ok(TypedStep::Go { working, ok, err: S::Failed });
    match (state, action) {
        (S::Pending, A::Create) => go(S::Creating, S::Up),
        (S::Up, A::Apply) => go(S::Applying, S::Up),
        // A swap that does not complete leaves (or puts) the traffic where
        // it was: the router is up, serving as before.
        (S::Up, A::Swap) => Ok(TypedStep::Go { working: S::Swapping, ok: S::Up, err: S::Up }),
        (S::Up, A::SwapBack) => Ok(TypedStep::Go { working: S::SwappingBack, ok: S::Up, err: S::Up }),
        (S::Up, A::Stop) => go(S::Stopping, S::Stopped),
        (S::Stopped, A::Start) => go(S::Starting, S::Up),
        (S::Pending | S::Up | S::Stopped | S::Failed, A::Destroy) => go(S::Destroying, S::Destroyed),
        (S::Failed, A::Retry) => Ok(TypedStep::Retry),
        // Reads only: the router stays as it is, whatever it finds.
        (S::Up | S::Stopped, A::Refresh) => Ok(TypedStep::Go { working: state, ok: state, err: state }),
        (S::Up, A::Repair) => go(S::Applying, S::Up),
        (S::Pending, A::Apply | A::Swap | A::SwapBack | A::Stop | A::Start | A::Retry) => Err(NotAllowed),
        (S::Pending | S::Failed, A::Refresh | A::Repair) => Err(NotAllowed),
        (S::Up, A::Create | A::Start | A::Retry) => Err(NotAllowed),
        (S::Stopped, A::Create | A::Apply | A::Swap | A::SwapBack | A::Stop | A::Retry | A::Repair) => Err(NotAllowed),
        (S::Failed, A::Create | A::Apply | A::Swap | A::SwapBack | A::Stop | A::Start) => Err(NotAllowed),
        (
            S::Creating
            | S::Applying
            | S::Swapping
            | S::SwappingBack
            | S::Stopping
            | S::Starting
            | S::Destroying
            | S::Destroyed,
            A::Create
            | A::Apply
            | A::Swap
            | A::SwapBack
            | A::Stop
            | A::Start
            | A::Destroy
            | A::Retry
            | A::Refresh
            | A::Repair,
        ) => Err(NotAllowed),
    }
}

/// A router: where it listens and where it sends what it receives. The
/// `aws` fields are refused on `local` routers, `address` on `aws` ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = provider_rules)]
pub struct Spec {
    /// Provider: `local` (default: a real HAProxy on drover's host) or
    /// `aws` (an Application Load Balancer).
    #[serde(default = "default_provider")]
    #[schemars(extend("enum" = PROVIDERS))]
    pub provider: String,
    /// The environment (name or id) it serves.
    #[schemars(regex(pattern = r"\S"))]
    pub environment: String,
    /// local: the address its frontends listen on (an IP address; default `127.0.0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 45), regex(pattern = "^[0-9a-fA-F.:]+$"))]
    pub address: Option<String>,
    /// aws: the load balancer's subnets, in at least two availability
    /// zones of one VPC (its target groups are made in that VPC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    /// aws: the load balancer's security groups (default: the VPC's default group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// aws: `internal` (default: reachable inside the VPC) or `internet-facing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    #[schemars(length(min = 1, max = 16))]
    pub frontends: Vec<Frontend>,
    #[schemars(length(min = 1, max = 64))]
    pub backends: Vec<Backend>,
}

/// Who can reach an aws router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// Addresses inside the VPC only.
    Internal,
    /// Public addresses.
    InternetFacing,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Internal => "internal",
            Scheme::InternetFacing => "internet-facing",
        }
    }
}

/// How a frontend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// HTTP: requests are routed by host and path prefix.
    Http,
    /// TCP: every connection goes to the frontend's backend.
    Tcp,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        }
    }
}

/// A port the router listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    pub mode: Mode,
    /// From 1024 on `local`; any port on `aws`.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// `http` only: the first rule that matches a request picks its backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub rules: Vec<Rule>,
    /// The backend of requests no rule matches (`http`), or of every
    /// connection (`tcp`, required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// An `http` rule: a request whose host is `host` and/or whose path starts
/// with `path_prefix` goes to `backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A host name, matched without its port and case (`app.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"))]
    pub host: Option<String>,
    /// A path prefix (`/app`): matches `/app` and `/app/...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$"))]
    pub path_prefix: Option<String>,
    pub backend: String,
}

/// Where a backend's servers come from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Target {
    /// A service (name or id): its healthy instances, from the discovery registry.
    Service(String),
    /// A cluster (name or id): its instances.
    Cluster(String),
}

impl Target {
    fn reference(&self, field: &str) -> Reference {
        match self {
            Target::Service(s) => Reference::new(service::KIND, s, format!("{field}.service")),
            Target::Cluster(c) => Reference::new(cluster::KIND, c, format!("{field}.cluster")),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Target::Service(_) => service::KIND,
            Target::Cluster(_) => cluster::KIND,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Target::Service(k) | Target::Cluster(k) => k,
        }
    }
}

/// A pool of servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    pub target: Target,
    /// The load balancer's own health check of each server (default: `http`
    /// `GET /` for backends of `http` frontends, `tcp` for the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// The port a cluster target's instances serve on, for clusters whose
    /// instances do not say (`aws`; default: the cluster's own `port`, else
    /// 80). A service's instances and a local cluster's say their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// The target traffic went to before the last swap (set by `swap` and
    /// `swap-back`): where `swap-back` sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<Target>,
    /// Until when the standby is kept warm: no scale-down, stop or destroy
    /// of it before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// `swap`'s parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwapParams {
    /// The backend whose traffic moves.
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub backend: String,
    /// Where it moves: `{"cluster": "green"}` or `{"service": "app-green"}`.
    pub to: Target,
    /// How long the guard watches the error rate after the move (seconds, default 30).
    #[serde(default = "default_verify")]
    #[schemars(range(min = 0, max = 3600))]
    pub verify_secs: u64,
    /// The share of failed requests (5xx answers, broken responses) through
    /// the backend above which the guard swaps back (default 0.05).
    #[serde(default = "default_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// Until when the old target is kept warm as the standby (default: an hour from the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_until: Option<chrono::DateTime<chrono::Utc>>,
    /// How long every server of the new target has to pass the load
    /// balancer's health check before the swap gives up, traffic unmoved
    /// (seconds, default 120).
    #[serde(default = "default_health_timeout")]
    #[schemars(range(min = 1, max = 1800))]
    pub health_timeout_secs: u64,
}

impl ActionParams for SwapParams {
    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_move(&self.backend, self.verify_secs, self.max_error_rate, self.health_timeout_secs);
        if self.to.key().trim().is_empty() {
            errors.push(FieldError::new("params.to", "names a service or a cluster"));
        }
        errors
    }
}

/// The checks a swap's and a swap-back's parameters share.
fn check_move(backend: &str, verify_secs: u64, max_error_rate: f64, health_timeout_secs: u64) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if !super::is_name(backend) {
        errors.push(FieldError::new("params.backend", "a backend's name"));
    }
    if verify_secs > 3600 {
        errors.push(FieldError::new("params.verify_secs", "at most 3600"));
    }
    if !(0.0..=1.0).contains(&max_error_rate) {
        errors.push(FieldError::new("params.max_error_rate", "a share between 0 and 1"));
    }
    if !(1..=1800).contains(&health_timeout_secs) {
        errors.push(FieldError::new("params.health_timeout_secs", "from 1 to 1800"));
    }
    errors
}

/// `swap-back`'s parameters (the run completes them with `to`, the
/// standby, and `undoes`, the swap it undoes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwapBackParams {
    #[schemars(regex(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub backend: String,
    /// How long the guard watches the error rate after the move (seconds, default 30).
    #[serde(default = "default_verify")]
    #[schemars(range(min = 0, max = 3600))]
    pub verify_secs: u64,
    /// As for `swap` (default 0.05).
    #[serde(default = "default_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// As for `swap` (seconds, default 120).
    #[serde(default = "default_health_timeout")]
    #[schemars(range(min = 1, max = 1800))]
    pub health_timeout_secs: u64,
}

impl ActionParams for SwapBackParams {
    fn check(&self) -> Vec<FieldError> {
        check_move(&self.backend, self.verify_secs, self.max_error_rate, self.health_timeout_secs)
    }
}

/// What a swap or swap-back run works from: its parameters, completed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Move {
    pub backend: String,
    pub to: Target,
    #[serde(default = "default_verify")]
    pub verify_secs: u64,
    #[serde(default = "default_error_rate")]
    pub max_error_rate: f64,
    #[serde(default = "default_health_timeout")]
    pub health_timeout_secs: u64,
    #[serde(default)]
    pub undoes: Option<String>,
}

fn default_health_timeout() -> u64 {
    120
}

fn default_verify() -> u64 {
    30
}

fn default_error_rate() -> f64 {
    0.05
}

/// A load balancer health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Check {
    /// `GET path` answers 2xx or 3xx.
    Http {
        #[serde(default = "default_path")]
        #[schemars(regex(pattern = r"^/[!-~]*$"), length(max = 256))]
        path: String,
    },
    /// A TCP connection succeeds.
    Tcp,
}

fn default_provider() -> String {
    "local".to_string()
}

/// Where a local router listens unless its spec says.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1";

/// What [`Spec::check`] asks of each provider, said in the schema: one
/// branch per provider, with the fields it requires and those it refuses.
fn provider_rules(schema: &mut schemars::Schema) {
    let subnet = json!({"type": "string", "pattern": "^subnet-[0-9a-fA-F]{8,32}$"});
    let group = json!({"type": "string", "pattern": "^sg-[0-9a-fA-F]{8,32}$"});
    schema.insert(
        "oneOf".into(),
        json!([
            {"title": "local", "properties": {
                "provider": {"const": "local"},
                "subnets": {"maxItems": 0}, "security_groups": {"maxItems": 0}, "scheme": {"type": "null"},
                "frontends": {"items": {"properties": {"port": {"minimum": 1024}}}},
                "backends": {"items": {"properties": {"port": {"type": "null"}}}},
            }},
            {"title": "aws", "required": ["provider", "subnets"], "properties": {
                "provider": {"const": "aws"},
                "address": {"type": "null"},
                "subnets": {"type": "array", "minItems": 2, "maxItems": 16, "uniqueItems": true, "items": subnet},
                "security_groups": {"type": "array", "maxItems": 5, "uniqueItems": true, "items": group},
                "frontends": {"items": {"properties": {
                    "mode": {"const": "http"},
                    "rules": {"maxItems": MAX_AWS_RULES},
                }}},
                "backends": {"items": {"properties": {"check": {"oneOf": [{"type": "null"}, {
                    "type": "object", "properties": {"type": {"const": "http"}}}]}}}},
            }},
        ]),
    );
}

fn default_path() -> String {
    "/".to_string()
}

impl Spec {
    /// The address a local router's frontends listen on.
    pub fn address(&self) -> &str {
        self.address.as_deref().unwrap_or(DEFAULT_ADDRESS)
    }

    /// Checks a spec and returns it typed.
    pub fn from_value(v: &Value) -> Result<Spec> {
        super::read_spec::<Router>(v)
    }

    /// The mode of each backend's servers: that of the frontends that use it
    /// (a swap's shadow backend has its backend's; one no frontend uses is
    /// `http`).
    pub fn backend_modes(&self) -> BTreeMap<&str, Mode> {
        let mut modes: BTreeMap<&str, Mode> = BTreeMap::new();
        for f in &self.frontends {
            for b in f.rules.iter().map(|r| r.backend.as_str()).chain(f.backend.as_deref()) {
                modes.entry(b).or_insert(f.mode);
            }
        }
        for b in &self.backends {
            let of = b.name.strip_suffix(SHADOW).and_then(|base| modes.get(base).copied());
            modes.entry(b.name.as_str()).or_insert(of.unwrap_or(Mode::Http));
        }
        modes
    }

    /// A backend's health check, its default filled in.
    pub fn check_of(&self, backend: &Backend) -> Check {
        match (&backend.check, self.backend_modes().get(backend.name.as_str())) {
            (Some(c), _) => c.clone(),
            (None, Some(Mode::Tcp)) => Check::Tcp,
            (None, _) => Check::Http { path: default_path() },
        }
    }

    /// The provider's own fields: aws needs its subnets, local refuses them.
    fn check_aws_fields(&self, aws: bool) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !aws {
            for (field, set) in [
                ("spec.subnets", !self.subnets.is_empty()),
                ("spec.security_groups", !self.security_groups.is_empty()),
                ("spec.scheme", self.scheme.is_some()),
            ] {
                if set {
                    errors.push(FieldError::new(field, "only for provider aws"));
                }
            }
            for (i, b) in self.backends.iter().enumerate() {
                if b.port.is_some() {
                    errors.push(FieldError::new(
                        format!("spec.backends[{i}].port"),
                        "only for provider aws: a local target's instances say their own port",
                    ));
                }
            }
            return errors;
        }
        if self.subnets.len() < 2 || self.subnets.len() > 16 {
            errors.push(FieldError::new(
                "spec.subnets",
                "an Application Load Balancer needs subnets in at least two availability zones (2 to 16 subnet ids)",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.subnets.iter().enumerate() {
            if !cluster::aws_id(s, "subnet-") {
                errors.push(FieldError::new(format!("spec.subnets[{i}]"), "must be a subnet id like subnet-0abc1234"));
            } else if !seen.insert(s) {
                errors.push(FieldError::new(format!("spec.subnets[{i}]"), format!("{s} is listed twice")));
            }
        }
        if self.security_groups.len() > 5 {
            errors.push(FieldError::new("spec.security_groups", "at most 5 security groups"));
        }
        for (i, g) in self.security_groups.iter().enumerate() {
            if !cluster::aws_id(g, "sg-") {
                errors.push(FieldError::new(
                    format!("spec.security_groups[{i}]"),
                    "must be a security group id like sg-0abc1234",
                ));
            }
        }
        for (i, b) in self.backends.iter().enumerate() {
            if matches!(b.check, Some(Check::Tcp)) {
                errors.push(FieldError::new(
                    format!("spec.backends[{i}].check"),
                    "an Application Load Balancer checks its targets over http",
                ));
            }
            if b.port == Some(0) {
                errors.push(FieldError::new(format!("spec.backends[{i}].port"), "a port from 1 to 65535"));
            }
            if b.port.is_some() && matches!(b.target, Target::Service(_)) {
                errors.push(FieldError::new(
                    format!("spec.backends[{i}].port"),
                    "a service's instances say their own port (in the discovery registry): only for cluster targets",
                ));
            }
        }
        errors
    }

    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !PROVIDERS.contains(&self.provider.as_str()) {
            errors.push(FieldError::new("spec.provider", format!("one of: {}", PROVIDERS.join(", "))));
        }
        if self.environment.trim().is_empty() {
            errors.push(FieldError::new("spec.environment", "names the environment the router serves"));
        }
        let aws = self.provider == "aws";
        match (&self.address, aws) {
            (Some(_), true) => errors.push(FieldError::new(
                "spec.address",
                "an aws router listens on its load balancer's own addresses (its view says which): no address",
            )),
            (Some(a), false) if a.len() > 45 || a.parse::<std::net::IpAddr>().is_err() => {
                errors.push(FieldError::new("spec.address", "an IP address (IPv4 or IPv6), such as 127.0.0.1"))
            }
            _ => {}
        }
        errors.extend(self.check_aws_fields(aws));
        if self.frontends.is_empty() || self.frontends.len() > MAX_FRONTENDS {
            errors.push(FieldError::new("spec.frontends", format!("between 1 and {MAX_FRONTENDS} frontends")));
        }
        if self.backends.is_empty() || self.backends.len() > MAX_BACKENDS {
            errors.push(FieldError::new("spec.backends", format!("between 1 and {MAX_BACKENDS} backends")));
        }
        let mut backends = BTreeMap::new();
        for (i, b) in self.backends.iter().enumerate() {
            if !super::is_name(&b.name) {
                errors.push(FieldError::new(format!("spec.backends[{i}].name"), "a name: a-z, 0-9 and -"));
            }
            if let Some(first) = backends.insert(b.name.as_str(), i) {
                errors.push(FieldError::new(
                    format!("spec.backends[{i}].name"),
                    format!("backend {:?} is already spec.backends[{first}]", b.name),
                ));
            }
            if b.target.key().trim().is_empty() {
                errors.push(FieldError::new(format!("spec.backends[{i}].target"), "names a service or a cluster"));
            }
            if let Some(Check::Http { path }) = &b.check {
                if !path.starts_with('/') || path.len() > 256 || !path.bytes().all(|c| c.is_ascii_graphic()) {
                    errors.push(FieldError::new(
                        format!("spec.backends[{i}].check.path"),
                        "an absolute path of visible ASCII characters",
                    ));
                }
            }
        }
        let mut names = BTreeMap::new();
        let mut ports = BTreeMap::new();
        let mut used: BTreeMap<&str, (Mode, String)> = BTreeMap::new();
        for (i, f) in self.frontends.iter().enumerate() {
            let at = format!("spec.frontends[{i}]");
            if !super::is_name(&f.name) {
                errors.push(FieldError::new(format!("{at}.name"), "a name: a-z, 0-9 and -"));
            }
            if let Some(first) = names.insert(f.name.as_str(), i) {
                errors.push(FieldError::new(
                    format!("{at}.name"),
                    format!("frontend {:?} is already spec.frontends[{first}]", f.name),
                ));
            }
            if f.port < 1024 && !aws {
                errors.push(FieldError::new(format!("{at}.port"), "a port from 1024 to 65535 (local routers)"));
            }
            if f.port == 0 {
                errors.push(FieldError::new(format!("{at}.port"), "a port from 1 to 65535"));
            }
            if let Some(first) = ports.insert(f.port, i) {
                errors.push(FieldError::new(
                    format!("{at}.port"),
                    format!("port {} is taken by spec.frontends[{first}]", f.port),
                ));
            }
            let mut uses = Vec::new();
            match f.mode {
                Mode::Tcp => {
                    if aws {
                        errors.push(FieldError::new(
                            format!("{at}.mode"),
                            "an aws router is an Application Load Balancer: its frontends speak http",
                        ));
                    }
                    if !f.rules.is_empty() {
                        errors.push(FieldError::new(
                            format!("{at}.rules"),
                            "a tcp frontend sends every connection to its backend: it has no rules",
                        ));
                    }
                    if f.backend.is_none() {
                        errors.push(FieldError::new(format!("{at}.backend"), "a tcp frontend needs its backend"));
                    }
                }
                Mode::Http => {
                    if f.rules.is_empty() && f.backend.is_none() {
                        errors.push(FieldError::new(
                            format!("{at}.backend"),
                            "an http frontend needs rules or a backend",
                        ));
                    }
                    if f.rules.len() > MAX_RULES {
                        errors.push(FieldError::new(format!("{at}.rules"), format!("at most {MAX_RULES} rules")));
                    }
                    if aws && f.rules.len() > MAX_AWS_RULES {
                        errors.push(FieldError::new(
                            format!("{at}.rules"),
                            format!("at most {MAX_AWS_RULES} rules on an Application Load Balancer's listener"),
                        ));
                    }
                    let mut seen: BTreeMap<(Option<String>, Option<&str>), usize> = BTreeMap::new();
                    for (j, r) in f.rules.iter().enumerate() {
                        let rat = format!("{at}.rules[{j}]");
                        if r.host.is_none() && r.path_prefix.is_none() {
                            errors.push(FieldError::new(rat.clone(), "a rule matches a host, a path_prefix or both"));
                        }
                        if let Some(h) = &r.host {
                            if !is_host(h) {
                                errors.push(FieldError::new(
                                    format!("{rat}.host"),
                                    "a host name (letters, digits, - and .)",
                                ));
                            } else if aws && h.len() > MAX_AWS_PATTERN {
                                errors.push(FieldError::new(
                                    format!("{rat}.host"),
                                    format!("at most {MAX_AWS_PATTERN} characters on an Application Load Balancer"),
                                ));
                            }
                        }
                        if let Some(p) = &r.path_prefix {
                            if !is_path_prefix(p) {
                                errors.push(FieldError::new(
                                    format!("{rat}.path_prefix"),
                                    "a path starting with /, without spaces, quotes or control characters",
                                ));
                            } else if aws && !alb_literal(p) {
                                errors.push(FieldError::new(
                                    format!("{rat}.path_prefix"),
                                    "on an Application Load Balancer: letters, digits and _ - . $ / ~ ' @ : + & only",
                                ));
                            } else if aws && alb_paths(p).iter().any(|v| v.len() > MAX_AWS_PATTERN) {
                                errors.push(FieldError::new(
                                    format!("{rat}.path_prefix"),
                                    format!(
                                        "at most {} characters on an Application Load Balancer (it matches {p} and {p}/*)",
                                        MAX_AWS_PATTERN - 2
                                    ),
                                ));
                            }
                        }
                        let key = (r.host.as_ref().map(|h| h.to_ascii_lowercase()), r.path_prefix.as_deref());
                        if let Some(first) = seen.insert(key, j) {
                            let what = match (&r.host, &r.path_prefix) {
                                (Some(h), None) => format!("host {h}"),
                                (None, Some(p)) => format!("path prefix {p}"),
                                (Some(h), Some(p)) => format!("host {h} and path prefix {p}"),
                                (None, None) => "nothing".into(),
                            };
                            let field =
                                if r.host.is_some() { format!("{rat}.host") } else { format!("{rat}.path_prefix") };
                            errors.push(FieldError::new(
                                field,
                                format!("two rules for {what}: {at}.rules[{first}] has it"),
                            ));
                        }
                        uses.push((format!("{rat}.backend"), r.backend.as_str()));
                    }
                }
            }
            if let Some(b) = &f.backend {
                uses.push((format!("{at}.backend"), b.as_str()));
            }
            for (field, b) in uses {
                if !backends.contains_key(b) {
                    errors.push(FieldError::new(field, format!("no backend named {b:?} in spec.backends")));
                    continue;
                }
                match used.get(b) {
                    Some((mode, by)) if *mode != f.mode => errors.push(FieldError::new(
                        field,
                        format!(
                            "backend {b:?} serves a {} frontend ({by}); a {} frontend needs its own",
                            mode.as_str(),
                            f.mode.as_str()
                        ),
                    )),
                    Some(_) => {}
                    None => {
                        used.insert(b, (f.mode, at.clone()));
                    }
                }
            }
        }
        errors
    }
}

/// The ALB path patterns of a path prefix, matching what HAProxy matches
/// locally: the path itself and what is under it (`/app` and `/app/` →
/// `/app`, `/app/*`; `/` → `/*`).
pub fn alb_paths(prefix: &str) -> Vec<String> {
    let base = prefix.trim_end_matches('/');
    if base.is_empty() {
        return vec!["/*".to_string()];
    }
    vec![base.to_string(), format!("{base}/*")]
}

/// Whether an ALB path pattern takes `prefix` literally: only the
/// characters it allows, without its wildcards `*` and `?`.
fn alb_literal(prefix: &str) -> bool {
    prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.$/~'@:+&".contains(&b))
}

fn is_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn is_path_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 256
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~!$&()*+,;=:@%/-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(spec: Value) -> Vec<String> {
        match Spec::from_value(&spec) {
            Ok(_) => Vec::new(),
            Err(crate::error::Error::Invalid(e)) => {
                e.into_iter().map(|f| format!("{}: {}", f.field, f.message)).collect()
            }
            Err(other) => vec![other.to_string()],
        }
    }

    #[test]
    fn examples_are_valid() {
        for e in Router::examples() {
            assert_eq!(errors(e.clone()), Vec::<String>::new(), "{e}");
        }
    }

    #[test]
    fn bad_specs_name_their_field() {
        let base = json!({"environment": "prod",
            "frontends": [{"name": "web", "mode": "http", "port": 8080, "backend": "site",
                "rules": [{"host": "a.example.com", "backend": "site"}, {"host": "A.example.com", "backend": "api"}]},
                {"name": "web2", "mode": "http", "port": 8080, "backend": "nope"},
                {"name": "pg", "mode": "tcp", "port": 9000, "backend": "site", "rules": [{"host": "x", "backend": "site"}]}],
            "backends": [{"name": "site", "target": {"service": "app"}}, {"name": "api", "target": {"service": "api"}},
                {"name": "api", "target": {"cluster": "c1"}}]});
        let got = errors(base);
        let fields: Vec<&str> = got.iter().map(|e| e.split(':').next().unwrap()).collect();
        for want in [
            "spec.backends[2].name",
            "spec.frontends[0].rules[1].host",
            "spec.frontends[1].port",
            "spec.frontends[1].backend",
            "spec.frontends[2].rules",
            "spec.frontends[2].backend",
        ] {
            assert!(fields.contains(&want), "{want} not in {got:#?}");
        }
        assert!(got.iter().any(|e| e.contains("two rules for host A.example.com")), "{got:#?}");
        assert!(got.iter().any(|e| e.contains("port 8080 is taken by spec.frontends[0]")), "{got:#?}");
    }

    #[test]
    fn aws_routers_are_application_load_balancers() {
        let got = errors(json!({"environment": "prod", "provider": "aws", "address": "10.0.0.1",
            "subnets": ["subnet-0123abcd"], "security_groups": ["nope"],
            "frontends": [{"name": "web", "mode": "http", "port": 80, "backend": "site",
                "rules": [{"path_prefix": "/a*b", "backend": "site"}, {"host": format!("{}.example.com", "a".repeat(120)), "backend": "site"}]},
                {"name": "pg", "mode": "tcp", "port": 5432, "backend": "db"}],
            "backends": [{"name": "site", "target": {"service": "app"}, "port": 8080},
                {"name": "db", "target": {"cluster": "db"}, "check": {"type": "tcp"}}]}));
        let fields: Vec<&str> = got.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.address",
                "spec.subnets",
                "spec.security_groups[0]",
                "spec.backends[0].port",
                "spec.backends[1].check",
                "spec.frontends[0].rules[0].path_prefix",
                "spec.frontends[0].rules[1].host",
                "spec.frontends[1].mode",
            ],
            "{got:#?}"
        );
        // The aws fields are refused on local routers.
        let got = errors(json!({"environment": "prod", "subnets": ["subnet-0123abcd"], "scheme": "internal",
            "frontends": [{"name": "web", "mode": "http", "port": 80, "backend": "site"}],
            "backends": [{"name": "site", "target": {"cluster": "c1"}, "port": 8080}]}));
        let fields: Vec<&str> = got.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            ["spec.subnets", "spec.scheme", "spec.backends[0].port", "spec.frontends[0].port"],
            "{got:#?}"
        );
        assert_eq!(alb_paths("/app"), ["/app", "/app/*"]);
        assert_eq!(alb_paths("/app/"), ["/app", "/app/*"]);
        assert_eq!(alb_paths("/"), ["/*"]);
    }

    #[test]
    fn a_swap_makes_the_old_target_the_standby_and_swap_back_undoes_it() {
        let spec = Spec::from_value(&Router::examples()[0]).unwrap();
        let to_green = json!({"backend": "site", "to": {"service": "app-green"}});
        assert!(Router::check_action(&spec, Action::Swap, &to_green).is_empty());
        let same = json!({"backend": "site", "to": {"service": "app"}});
        assert_eq!(Router::check_action(&spec, Action::Swap, &same)[0].field, "params.to");
        let back = json!({"backend": "site"});
        assert_eq!(Router::check_action(&spec, Action::SwapBack, &back)[0].field, "params.backend", "no standby yet");

        let params = Router::complete_params(&spec, &json!({}), Action::Swap, to_green).unwrap();
        let until: chrono::DateTime<chrono::Utc> = params["keep_until"].as_str().unwrap().parse().unwrap();
        assert!(until > chrono::Utc::now() + chrono::Duration::minutes(59), "an hour by default: {params}");
        let after = Router::spec_after(&spec, Action::Swap, &params).unwrap();
        assert_eq!(after.backends[0].target, Target::Service("app-green".into()));
        assert_eq!(after.backends[0].standby, Some(Target::Service("app".into())));
        assert_eq!(after.backends[1], spec.backends[1], "the other backend is untouched");
        let guards = Router::guards(&after);
        assert_eq!((guards.len(), guards[0].key.as_str(), guards[0].until), (1, "app", Some(until)));
        assert!(guards[0].actions.contains(&"scale") && guards[0].actions.contains(&"destroy"));

        let outputs = json!({"swaps": {"site": {"run": "0190d5e4-0000-7000-8000-000000000001"}}});
        let params = Router::complete_params(&after, &outputs, Action::SwapBack, back).unwrap();
        assert_eq!(params["to"], json!({"service": "app"}));
        assert_eq!(params["undoes"], "0190d5e4-0000-7000-8000-000000000001");
        let again = Router::spec_after(&after, Action::SwapBack, &params).unwrap();
        assert_eq!(again.backends[0].target, Target::Service("app".into()));
        assert_eq!(again.backends[0].standby, Some(Target::Service("app-green".into())));
        assert_eq!(again.backends[0].keep_until, Some(until));
    }

    #[test]
    fn every_state_and_action_is_decided() {
        for s in State::ALL {
            for a in Action::ALL {
                let _ = next(*s, *a);
            }
        }
        assert!(next(State::Up, Action::Apply).is_ok());
        assert!(next(State::Stopped, Action::Apply).is_err());
    }
}
