//! The kind registry: every resource kind drover knows, each declared once.
//!
//! A kind is one module here that implements [`Declaration`]: its name and
//! plural, its states and actions (`named_enum!`), its transition table (an
//! exhaustive `match` without a `_` arm, so a new state or action does not
//! compile until every entry is decided), each action's typed parameters,
//! its spec type (whose JSON Schema is derived from the type with
//! `schemars`) and the checks the types cannot say, the resources its spec
//! references, and the provider that runs it. [`REGISTRY`] lists the kinds;
//! a [`Kind`] is a handle to one declaration.
//!
//! Everything else is derived from the registry: the `/v1/{plural}` routes
//! and their OpenAPI operations, the `kind:action` permissions and the
//! validation of roles, `GET /v1/kinds`, the engine's dispatch. Nothing
//! outside this module and the kind modules asks which kind it holds.
//!
//! # Guarantees
//! - [`Kind::next`] is the only decision of whether an action is allowed.
//! - A spec that [`Kind::validate_spec`] returns serialises to a value its
//!   schema ([`Kind::spec_schema`]) accepts (tested over every kind's
//!   examples in `api`).

pub mod cluster;
pub mod environment;
pub mod image;
pub mod job;
pub mod record;
pub mod role;
pub mod router;
pub mod service;
pub mod user;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, FieldError, Result};

/// Every kind, in the order the API lists them. Adding a kind is a module
/// that implements [`Declaration`] and one line here.
pub const REGISTRY: &[Kind] =
    &[image::KIND, cluster::KIND, service::KIND, job::KIND, router::KIND, environment::KIND, user::KIND, role::KIND];

/// The provider of kinds whose transitions only touch drover's own records.
pub const BUILTIN_PROVIDER: &str = "builtin";

/// Permissions that belong to no kind's actions, with what they allow.
pub const SCOPES: &[(&str, &str)] = &[
    ("transitions:read", "Read transitions, their events and statistics."),
    ("kinds:read", "Read the kinds and their state machines."),
    ("settings:read", "Read settings (secret values stay redacted)."),
    ("discovery:read", "Read the discovery registry and its changes."),
    ("settings:write", "Write, delete and roll back settings."),
    ("settings:reveal", "Read secret values."),
    ("users:admin", "Manage users, roles and API tokens."),
    ("metrics:read", "Read the Prometheus metrics."),
    (
        environment::OPERATE_PROTECTED,
        "Change resources in a protected environment (besides the action's own permission).",
    ),
];

/// The verbs every kind has besides its actions (`cancel`: a transition
/// of a resource of the kind).
pub const VERBS: &[&str] = &["read", "create", "update", "delete", "cancel"];

// ---------------------------------------------------------------------
// What a kind module declares.

/// A kind, as its module declares it. Implemented by a unit struct; the
/// module's `KIND` constant is `Kind::declare::<ThatStruct>()`.
pub trait Declaration: Send + Sync + 'static {
    /// Singular, lowercase: `cluster`. Also the permission prefix.
    const NAME: &'static str;
    /// The collection in paths: `/v1/clusters`.
    const PLURAL: &'static str;
    const DESCRIPTION: &'static str;
    type State: Named;
    type Action: Named;
    /// The spec as clients write it. Its JSON Schema is the API's.
    type Spec: Serialize + DeserializeOwned + JsonSchema;
    const INITIAL: Self::State;
    /// Where a resource may be deleted from; a resource in it is not live.
    const FINAL: Self::State;

    /// The transition table.
    fn next(state: Self::State, action: Self::Action) -> Result<TypedStep<Self::State>, NotAllowed>;

    /// What an action is: description, parameters, timeout.
    fn action(action: Self::Action) -> ActionDecl;

    /// Checks the types cannot say (fields a provider requires, bounds
    /// across fields); each names its field.
    fn check(_spec: &Self::Spec) -> Vec<FieldError> {
        Vec::new()
    }

    /// The provider that runs this resource.
    fn provider(_spec: &Self::Spec) -> String {
        BUILTIN_PROVIDER.to_string()
    }

    /// Other resources the spec names. Each must exist (and be live) when
    /// the spec is written, and keeps the resource it names from being
    /// destroyed or deleted while this one is live.
    fn references(_spec: &Self::Spec) -> Vec<Reference> {
        Vec::new()
    }

    /// Whether resources of this kind guard others ([`Declaration::guards`]):
    /// only such kinds are read when an action might be guarded.
    const GUARDS: bool = false;

    /// Actions on other resources that a live resource of this kind refuses
    /// until a time (a router keeps its standby targets warm: no scale-down,
    /// stop or destroy while they are standbys).
    fn guards(_spec: &Self::Spec) -> Vec<Guard> {
        Vec::new()
    }

    /// What a live resource of this kind holds alone on its provider (a
    /// local router's ports): `(claim, field)`. A spec whose claim another
    /// live resource of the kind holds is refused with 422 naming the field
    /// and the holder.
    fn claims(_spec: &Self::Spec) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Checks against the resources the spec names, found live, in the
    /// order of [`Declaration::references`] (a service's pinned build must
    /// be one its image keeps); each error names its field.
    fn check_with(_spec: &Self::Spec, _named: &[Referenced]) -> Vec<FieldError> {
        Vec::new()
    }

    /// Checks, when a run is asked for, of the spec as the action's success
    /// would leave it against the resources it depends on, found in the
    /// states it needs (a service's constraints against its cluster's
    /// machines, its build against those its image keeps): refused with
    /// 422 naming the field before anything starts.
    fn check_run(_spec: &Self::Spec, _action: Self::Action, _dependencies: &[Referenced]) -> Vec<FieldError> {
        Vec::new()
    }

    /// Checks of an action's parameters against the resource's spec (a
    /// global service has no count to scale); each names its field.
    fn check_action(_spec: &Self::Spec, _action: Self::Action, _params: &Value) -> Vec<FieldError> {
        Vec::new()
    }

    /// Completes an action's (validated) parameters from what the provider
    /// reported (`outputs`) when the request is made, so that the run
    /// records what it acts on: a service's `rollback` gets the build it
    /// returns to. Errors name their field.
    fn complete_params(
        _spec: &Self::Spec,
        _outputs: &Value,
        _action: Self::Action,
        params: Value,
    ) -> Result<Value, Vec<FieldError>> {
        Ok(params)
    }

    /// Whether drover carries `action` out itself, as child transitions of
    /// the resources that live on this one (a cluster's `initialize`), and
    /// how; `None` (the default): the provider does.
    fn fan_out(_action: Self::Action) -> Option<FanOut> {
        None
    }

    /// The resource this one lives on (a service's cluster): its settings
    /// are the parent's, and so is its environment when it names none.
    fn parent(_spec: &Self::Spec) -> Option<Reference> {
        None
    }

    /// Resources that must be in a given state for `action` to run.
    fn requires(_spec: &Self::Spec, _action: Self::Action) -> Vec<Dependency> {
        Vec::new()
    }

    /// The spec after a successful `action` (a scale's `count`), if it changes.
    fn spec_after(_spec: &Self::Spec, _action: Self::Action, _params: &Value) -> Option<Self::Spec> {
        None
    }

    /// Asked only of actions that change the spec ([`ActionDecl::sets`]):
    /// whether their success applies the whole spec rather than the fields
    /// they set. Default: no. A kind whose provider applies more for some
    /// specs says so here (an `aws` cluster's scale renders the whole stack).
    fn applies_whole(_spec: &Self::Spec, _action: Self::Action) -> bool {
        false
    }

    /// Whether the spec takes effect as it is written, with no run to apply
    /// it (records: environments, users, roles). Then it never has pending
    /// changes.
    const APPLIED_ON_WRITE: bool = false;

    /// Whether a resource still in its initial state, no transition of it
    /// ever started, may be deleted at once: true where that state holds
    /// nothing in the world (an image not yet built, a cluster not yet
    /// created), so there is nothing to tear down first.
    const DELETABLE_UNSTARTED: bool = false;

    /// The timeout of `action` for this spec; default: the action's.
    fn timeout_secs(_spec: &Self::Spec, action: Self::Action) -> u64 {
        Self::action(action).timeout_secs
    }

    /// Kinds of access control itself: reading one needs `{kind}:read`
    /// (which `users:admin` implies), every other verb `users:admin`; the
    /// built-in operator and viewer roles read them and change nothing.
    const ADMIN_ONLY: bool = false;

    /// The permission `verb` (an action, or one of [`VERBS`]) needs.
    fn permission(verb: &str) -> String {
        match Self::ADMIN_ONLY && verb != "read" {
            true => "users:admin".to_string(),
            false => format!("{}:{verb}", Self::NAME),
        }
    }

    /// The environment the resource belongs to.
    fn environment(_spec: &Self::Spec) -> Option<String> {
        None
    }

    /// Why a resource of this name may not be changed or removed, if it may not.
    fn locked(_name: &str) -> Option<String> {
        None
    }

    /// Whether other resources live in resources of this kind: their specs
    /// name it in `environment` (environments). Its view lists them.
    const HOLDS_RESOURCES: bool = false;

    /// Specs that validate: documentation, and the schema's tests.
    fn examples() -> Vec<Value>;
}

/// A state or action enum (declared with `named_enum!`).
pub trait Named: Copy + Eq + fmt::Debug + Send + Sync + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    fn parse(s: &str) -> Option<Self>;
}

/// One action of a kind.
#[derive(Clone, Copy)]
pub struct ActionDecl {
    pub description: &'static str,
    pub params: Params,
    pub timeout_secs: u64,
    /// Whether a run of it hands the resource's settings to the provider.
    pub takes_settings: bool,
    /// The spec fields its success changes ([`Declaration::spec_after`]),
    /// and so applies; empty when it changes none.
    pub sets: &'static [&'static str],
    /// Whether its success means the whole spec runs (a create, a build):
    /// see [`Kind::applies`].
    pub applies_spec: bool,
    /// A refresh: it reads the real thing and changes nothing; its success
    /// is the resource's drift ([`crate::drift`]), not its outputs.
    pub refreshes: bool,
    /// An adopt: it takes what the last refresh found into the record; its
    /// parameters are the spec patch ([`crate::drift::adoption`]), merged
    /// into the spec on success as a new spec version.
    pub adopts: bool,
}

impl ActionDecl {
    /// An action without parameters that takes no settings.
    pub const fn new(description: &'static str, timeout_secs: u64) -> ActionDecl {
        ActionDecl {
            description,
            params: Params::NONE,
            timeout_secs,
            takes_settings: false,
            sets: &[],
            applies_spec: false,
            refreshes: false,
            adopts: false,
        }
    }

    /// An adopt (see [`ActionDecl::adopts`]).
    pub const fn adopting(mut self) -> ActionDecl {
        self.adopts = true;
        self
    }

    /// A refresh (see [`ActionDecl::refreshes`]).
    pub const fn refreshing(mut self) -> ActionDecl {
        self.refreshes = true;
        self
    }

    /// Its success changes these spec fields (and applies them).
    pub const fn changing_spec(mut self, fields: &'static [&'static str]) -> ActionDecl {
        self.sets = fields;
        self
    }

    /// Its success leaves the whole spec running.
    pub const fn applying_spec(mut self) -> ActionDecl {
        self.applies_spec = true;
        self
    }

    pub const fn params(mut self, params: Params) -> ActionDecl {
        self.params = params;
        self
    }

    pub const fn with_settings(mut self) -> ActionDecl {
        self.takes_settings = true;
        self
    }
}

/// An action's parameters: `{}` (none), or a type whose schema is derived.
#[derive(Clone, Copy)]
pub struct Params {
    schema: Option<fn() -> Value>,
    validate: fn(&Value) -> Result<Value>,
}

/// A type of action parameters.
pub trait ActionParams: Serialize + DeserializeOwned + JsonSchema {
    /// Checks the type cannot say; each names its field (`params.count`).
    fn check(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

impl Params {
    pub const NONE: Params = Params { schema: None, validate: no_params };

    pub const fn of<P: ActionParams>() -> Params {
        Params { schema: Some(schema_of::<P>), validate: typed_params::<P> }
    }

    /// The JSON Schema of the parameters; `None` when the action takes none.
    pub fn schema(&self) -> Option<Value> {
        self.schema.map(|s| s())
    }
}

/// Actions on a resource that another refuses until a time (see
/// [`Declaration::guards`]). A `scale` is refused only when it would take
/// instances away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub kind: Kind,
    /// Name or id, as the guarding spec has it.
    pub key: String,
    pub actions: &'static [&'static str],
    /// Refused until then; `None`: as long as the guard is in the spec.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// What the refusal says the guard is (`standby of backend site`).
    pub why: String,
}

/// A resource a spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub kind: Kind,
    /// Name or id, as the spec has it.
    pub key: String,
    /// Where in the request: `spec.image`, `spec.roles[0]`.
    pub field: String,
}

impl Reference {
    pub fn new(kind: Kind, key: impl Into<String>, field: impl Into<String>) -> Reference {
        Reference { kind, key: key.into(), field: field.into() }
    }
}

/// A resource a spec names, as the store has it (see
/// [`Declaration::check_with`]).
#[derive(Debug, Clone, Copy)]
pub struct Referenced<'a> {
    pub reference: &'a Reference,
    pub id: Uuid,
    pub name: &'a str,
    pub state: &'a str,
    pub spec: &'a Value,
    pub outputs: &'a Value,
}

/// An action drover carries out as child transitions (see
/// `crate::fanout`): `action` on every live resource of `kind` that lives
/// on this one, dependencies first, except those already in a `done` state.
#[derive(Debug, Clone, Copy)]
pub struct FanOut {
    pub kind: Kind,
    pub action: &'static str,
    pub done: &'static [&'static str],
}

/// A resource that must be in a state for an action to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub kind: Kind,
    pub key: String,
    pub field: &'static str,
    pub required_state: &'static str,
}

/// What a table entry does: the working state the resource shows while the
/// run is under way, and where success and failure lead. `Retry` re-runs the
/// action that failed, through that action's own step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Go { working: &'static str, ok: &'static str, err: &'static str },
    Retry,
}

/// A step in a kind's own state type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypedStep<S> {
    Go { working: S, ok: S, err: S },
    Retry,
}

impl<S: Named> From<TypedStep<S>> for Step {
    fn from(t: TypedStep<S>) -> Self {
        match t {
            TypedStep::Go { working, ok, err } => {
                Step::Go { working: working.as_str(), ok: ok.as_str(), err: err.as_str() }
            }
            TypedStep::Retry => Step::Retry,
        }
    }
}

/// The table refuses this action in this state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAllowed;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    pub from: &'static str,
    pub action: &'static str,
    pub step: Step,
}

// ---------------------------------------------------------------------
// The handle.

/// A resource kind: a handle to its declaration. Compared by name.
#[derive(Clone, Copy)]
pub struct Kind(&'static dyn Erased);

impl Kind {
    /// The handle of a declaration: a kind module's `KIND`.
    pub const fn declare<D: Declaration>() -> Kind {
        Kind(Decl::<D>::IT)
    }

    /// Every kind, in registry order.
    pub fn all() -> impl Iterator<Item = Kind> {
        REGISTRY.iter().copied()
    }

    /// The kind named `s` (singular).
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::all().find(|k| k.as_str() == s)
    }

    /// The kind whose collection is `s` (`clusters`) or named `s` (`cluster`).
    pub fn parse_any(s: &str) -> Option<Kind> {
        Kind::all().find(|k| k.as_str() == s || k.plural() == s)
    }

    pub fn as_str(self) -> &'static str {
        self.0.name()
    }

    pub fn plural(self) -> &'static str {
        self.0.plural()
    }

    pub fn description(self) -> &'static str {
        self.0.description()
    }

    pub fn states(self) -> Vec<&'static str> {
        self.0.states()
    }

    pub fn actions(self) -> Vec<&'static str> {
        self.0.actions()
    }

    /// One action's declaration.
    pub fn action(self, action: &str) -> Option<ActionDecl> {
        self.0.action(action)
    }

    pub fn initial_state(self) -> &'static str {
        self.0.initial()
    }

    /// The state from which a resource may be deleted; resources in it are
    /// not live.
    pub fn final_state(self) -> &'static str {
        self.0.final_state()
    }

    /// The step `action` takes from `state`, or why it may not.
    pub fn next(self, state: &str, action: &str) -> Result<Step> {
        match self.0.lookup(state, action) {
            None => Err(Error::Internal(format!("unknown {self} state {state:?} in store"))),
            Some(Some(step)) => Ok(step),
            Some(None) => Err(Error::NotAllowed {
                kind: self.as_str(),
                state: state.to_string(),
                action: action.to_string(),
                allowed: self.allowed_actions(state),
            }),
        }
    }

    /// Actions allowed from `state`, in table order.
    pub fn allowed_actions(self, state: &str) -> Vec<String> {
        self.actions()
            .into_iter()
            .filter(|a| matches!(self.0.lookup(state, a), Some(Some(_))))
            .map(str::to_string)
            .collect()
    }

    /// Every entry of the table, for `GET /v1/kinds/{kind}`.
    pub fn table(self) -> Vec<TableEntry> {
        let mut out = Vec::new();
        for state in self.states() {
            for action in self.actions() {
                if let Some(Some(step)) = self.0.lookup(state, action) {
                    out.push(TableEntry { from: state, action, step });
                }
            }
        }
        out
    }

    /// Actions whose success leaves the resource in its final state
    /// (`destroy`, `delete`): refused while live resources reference it.
    pub fn retires(self, action: &str) -> bool {
        let fin = self.final_state();
        self.table().iter().any(|e| e.action == action && matches!(e.step, Step::Go { ok, .. } if ok == fin))
    }

    /// Checks a spec and returns it normalised (defaults filled in).
    pub fn validate_spec(self, spec: &Value) -> Result<Value> {
        self.0.validate_spec(spec)
    }

    /// The JSON Schema (2020-12, self-contained) of the spec.
    pub fn spec_schema(self) -> Value {
        self.0.spec_schema()
    }

    /// Specs that validate.
    pub fn examples(self) -> Vec<Value> {
        self.0.examples()
    }

    /// Checks an action's parameters and returns them normalised.
    pub fn validate_params(self, action: &str, params: &Value) -> Result<Value> {
        match self.action(action) {
            Some(a) => (a.params.validate)(params),
            None => Err(Error::invalid("action", format!("one of: {}", self.actions().join(", ")))),
        }
    }

    /// The provider named by a (validated) spec.
    pub fn provider_of(self, spec: &Value) -> String {
        self.0.provider(spec)
    }

    pub fn references(self, spec: &Value) -> Vec<Reference> {
        self.0.references(spec)
    }

    /// Whether resources of this kind guard others ([`Declaration::guards`]).
    pub fn has_guards(self) -> bool {
        self.0.has_guards()
    }

    /// What a resource with this spec guards ([`Declaration::guards`]).
    pub fn guards(self, spec: &Value) -> Vec<Guard> {
        self.0.guards(spec)
    }

    /// What a live resource with this spec holds alone ([`Declaration::claims`]).
    pub fn claims(self, spec: &Value) -> Vec<(String, String)> {
        self.0.claims(spec)
    }

    /// Checks a (validated) spec against the live resources it names.
    pub fn check_with(self, spec: &Value, named: &[Referenced]) -> Vec<FieldError> {
        self.0.check_with(spec, named)
    }

    /// Checks an action's (validated) parameters against a resource's spec
    /// ([`Declaration::check_action`]).
    pub fn check_action(self, spec: &Value, action: &str, params: &Value) -> Result<()> {
        match self.0.check_action(spec, action, params) {
            errors if errors.is_empty() => Ok(()),
            errors => Err(Error::Invalid(errors)),
        }
    }

    /// Checks a run's target spec against its dependencies ([`Declaration::check_run`]).
    pub fn check_run(self, spec: &Value, action: &str, dependencies: &[Referenced]) -> Result<()> {
        match self.0.check_run(spec, action, dependencies) {
            errors if errors.is_empty() => Ok(()),
            errors => Err(Error::Invalid(errors)),
        }
    }

    /// An action's parameters completed from the resource's outputs
    /// ([`Declaration::complete_params`]).
    pub fn complete_params(self, spec: &Value, outputs: &Value, action: &str, params: Value) -> Result<Value> {
        self.0.complete_params(spec, outputs, action, params).map_err(Error::Invalid)
    }

    /// What a run of `action` with `params` depends on: the dependencies of
    /// the spec as the action's success leaves it (a deploy needs the
    /// image it deploys built, not the one it replaces).
    pub fn run_dependencies(self, spec: &Value, action: &str, params: &Value) -> Vec<Dependency> {
        match self.spec_after_success(action, params, spec) {
            Some(after) => self.dependencies(&after, action),
            None => self.dependencies(spec, action),
        }
    }

    /// How drover carries `action` out itself, if it does ([`Declaration::fan_out`]).
    pub fn fan_out(self, action: &str) -> Option<FanOut> {
        self.0.fan_out(action)
    }

    /// The resource this one lives on ([`Declaration::parent`]).
    pub fn parent(self, spec: &Value) -> Option<Reference> {
        self.0.parent(spec)
    }

    /// Other resources that must be in a given state before `action` runs.
    pub fn dependencies(self, spec: &Value, action: &str) -> Vec<Dependency> {
        self.0.requires(spec, action)
    }

    /// Whether a successful `action` leaves the whole spec running: it is
    /// declared to ([`ActionDecl::applies_spec`]), or it changes the spec
    /// and its kind says it applies all of it ([`Declaration::applies_whole`]).
    pub fn applies(self, spec: &Value, action: &str) -> bool {
        match self.action(action) {
            Some(a) if a.applies_spec => true,
            Some(a) if !a.sets.is_empty() => self.0.applies_whole(spec, action),
            _ => false,
        }
    }

    /// Whether the spec takes effect as written ([`Declaration::APPLIED_ON_WRITE`]).
    pub fn applied_on_write(self) -> bool {
        self.0.applied_on_write()
    }

    /// The states a resource may be deleted from: its final state, and its
    /// initial one where that holds nothing ([`Declaration::DELETABLE_UNSTARTED`]).
    pub fn deletable_states(self) -> Vec<&'static str> {
        match self.0.deletable_unstarted() {
            true => vec![self.final_state(), self.initial_state()],
            false => vec![self.final_state()],
        }
    }

    /// The actions that apply a change of the top-level spec field `field`
    /// on a resource with this spec: those that apply the whole spec, and
    /// those whose success sets the field.
    pub fn applied_by(self, spec: &Value, field: &str) -> Vec<&'static str> {
        self.actions()
            .into_iter()
            // An adopt writes what runs into the spec: it applies nothing.
            .filter(|a| !self.adopts(a))
            .filter(|a| self.applies(spec, a) || self.action(a).is_some_and(|d| d.sets.contains(&field)))
            .collect()
    }

    /// The spec after a successful run of `action` (a scale changes
    /// `count`), or `None` when the action does not change it.
    pub fn spec_after_success(self, action: &str, params: &Value, spec: &Value) -> Option<Value> {
        self.0.spec_after(spec, action, params)
    }

    /// Whether `action` is an adopt (see [`ActionDecl::adopts`]).
    pub fn adopts(self, action: &str) -> bool {
        self.action(action).is_some_and(|a| a.adopts)
    }

    /// Whether `action` is a refresh (see [`ActionDecl::refreshes`]).
    pub fn refreshes(self, action: &str) -> bool {
        self.action(action).is_some_and(|a| a.refreshes)
    }

    /// Whether a run of `action` hands the resource's settings to its
    /// provider (and records which versions).
    pub fn takes_settings(self, action: &str) -> bool {
        self.action(action).is_some_and(|a| a.takes_settings)
    }

    /// The timeout of `action` on a resource with this spec.
    pub fn timeout_secs(self, spec: &Value, action: &str) -> u64 {
        self.0.timeout_secs(spec, action)
    }

    /// The permission `verb` (an action or one of [`VERBS`]) needs.
    pub fn permission(self, verb: &str) -> String {
        self.0.permission(verb)
    }

    /// Every permission of this kind: its verbs and its actions.
    pub fn permissions(self) -> Vec<String> {
        let mut out: Vec<String> = VERBS.iter().chain(self.actions().iter()).map(|v| self.permission(v)).collect();
        out.dedup();
        out
    }

    /// Whether only `users:admin` changes this kind (users, roles).
    pub fn admin_only(self) -> bool {
        self.0.admin_only()
    }

    pub fn environment_of(self, spec: &Value) -> Option<String> {
        self.0.environment(spec)
    }

    /// Why a resource of this name may not be changed, if it may not.
    pub fn locked(self, name: &str) -> Option<String> {
        self.0.locked(name)
    }

    /// Whether resources live in resources of this kind (see
    /// [`Declaration::HOLDS_RESOURCES`]).
    pub fn holds_resources(self) -> bool {
        self.0.holds_resources()
    }
}

impl PartialEq for Kind {
    fn eq(&self, other: &Kind) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Kind {}

impl Hash for Kind {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl PartialOrd for Kind {
    fn partial_cmp(&self, other: &Kind) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Kind {
    fn cmp(&self, other: &Kind) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kind({})", self.as_str())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------
// From a typed declaration to the handle's string-typed questions.

/// The object-safe face of a [`Declaration`], implemented for every one.
trait Erased: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn plural(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn states(&self) -> Vec<&'static str>;
    fn actions(&self) -> Vec<&'static str>;
    fn action(&self, action: &str) -> Option<ActionDecl>;
    fn initial(&self) -> &'static str;
    fn final_state(&self) -> &'static str;
    /// `None`: the state is unknown to the kind; `Some(None)`: not allowed.
    fn lookup(&self, state: &str, action: &str) -> Option<Option<Step>>;
    fn validate_spec(&self, spec: &Value) -> Result<Value>;
    fn spec_schema(&self) -> Value;
    fn examples(&self) -> Vec<Value>;
    fn provider(&self, spec: &Value) -> String;
    fn references(&self, spec: &Value) -> Vec<Reference>;
    fn check_with(&self, spec: &Value, named: &[Referenced]) -> Vec<FieldError>;
    fn claims(&self, spec: &Value) -> Vec<(String, String)>;
    fn has_guards(&self) -> bool;
    fn guards(&self, spec: &Value) -> Vec<Guard>;
    fn parent(&self, spec: &Value) -> Option<Reference>;
    fn fan_out(&self, action: &str) -> Option<FanOut>;
    fn check_action(&self, spec: &Value, action: &str, params: &Value) -> Vec<FieldError>;
    fn check_run(&self, spec: &Value, action: &str, dependencies: &[Referenced]) -> Vec<FieldError>;
    fn complete_params(
        &self,
        spec: &Value,
        outputs: &Value,
        action: &str,
        params: Value,
    ) -> Result<Value, Vec<FieldError>>;
    fn requires(&self, spec: &Value, action: &str) -> Vec<Dependency>;
    fn spec_after(&self, spec: &Value, action: &str, params: &Value) -> Option<Value>;
    fn applies_whole(&self, spec: &Value, action: &str) -> bool;
    fn applied_on_write(&self) -> bool;
    fn deletable_unstarted(&self) -> bool;
    fn timeout_secs(&self, spec: &Value, action: &str) -> u64;
    fn permission(&self, verb: &str) -> String;
    fn admin_only(&self) -> bool;
    fn environment(&self, spec: &Value) -> Option<String>;
    fn locked(&self, name: &str) -> Option<String>;
    fn holds_resources(&self) -> bool;
}

/// A stored spec, read back as its type. Stored specs were validated when
/// written; one that no longer reads (a field removed since) is treated as
/// saying nothing rather than failing the caller.
fn stored<D: Declaration>(spec: &Value) -> Option<D::Spec> {
    serde::Deserialize::deserialize(spec).ok()
}

/// A declaration behind the handle.
struct Decl<D>(PhantomData<fn() -> D>);

impl<D: Declaration> Decl<D> {
    const IT: &'static Decl<D> = &Decl(PhantomData);
}

impl<D: Declaration> Erased for Decl<D> {
    fn name(&self) -> &'static str {
        D::NAME
    }
    fn plural(&self) -> &'static str {
        D::PLURAL
    }
    fn description(&self) -> &'static str {
        D::DESCRIPTION
    }
    fn states(&self) -> Vec<&'static str> {
        D::State::ALL.iter().map(|s| s.as_str()).collect()
    }
    fn actions(&self) -> Vec<&'static str> {
        D::Action::ALL.iter().map(|a| a.as_str()).collect()
    }
    fn action(&self, action: &str) -> Option<ActionDecl> {
        D::Action::parse(action).map(D::action)
    }
    fn initial(&self) -> &'static str {
        D::INITIAL.as_str()
    }
    fn final_state(&self) -> &'static str {
        D::FINAL.as_str()
    }
    fn lookup(&self, state: &str, action: &str) -> Option<Option<Step>> {
        let s = D::State::parse(state)?;
        Some(D::Action::parse(action).and_then(|a| D::next(s, a).ok()).map(Step::from))
    }
    fn validate_spec(&self, spec: &Value) -> Result<Value> {
        to_value(&read_spec::<D>(spec)?)
    }
    fn spec_schema(&self) -> Value {
        schema_of::<D::Spec>()
    }
    fn examples(&self) -> Vec<Value> {
        D::examples()
    }
    fn provider(&self, spec: &Value) -> String {
        stored::<D>(spec).map(|s| D::provider(&s)).unwrap_or_else(|| BUILTIN_PROVIDER.to_string())
    }
    fn references(&self, spec: &Value) -> Vec<Reference> {
        stored::<D>(spec).map(|s| D::references(&s)).unwrap_or_default()
    }
    fn check_with(&self, spec: &Value, named: &[Referenced]) -> Vec<FieldError> {
        stored::<D>(spec).map(|s| D::check_with(&s, named)).unwrap_or_default()
    }
    fn claims(&self, spec: &Value) -> Vec<(String, String)> {
        stored::<D>(spec).map(|s| D::claims(&s)).unwrap_or_default()
    }
    fn has_guards(&self) -> bool {
        D::GUARDS
    }
    fn guards(&self, spec: &Value) -> Vec<Guard> {
        stored::<D>(spec).map(|s| D::guards(&s)).unwrap_or_default()
    }
    fn parent(&self, spec: &Value) -> Option<Reference> {
        stored::<D>(spec).and_then(|s| D::parent(&s))
    }
    fn fan_out(&self, action: &str) -> Option<FanOut> {
        D::Action::parse(action).and_then(D::fan_out)
    }
    fn check_action(&self, spec: &Value, action: &str, params: &Value) -> Vec<FieldError> {
        match (stored::<D>(spec), D::Action::parse(action)) {
            (Some(s), Some(a)) => D::check_action(&s, a, params),
            _ => Vec::new(),
        }
    }
    fn check_run(&self, spec: &Value, action: &str, dependencies: &[Referenced]) -> Vec<FieldError> {
        match (stored::<D>(spec), D::Action::parse(action)) {
            (Some(s), Some(a)) => D::check_run(&s, a, dependencies),
            _ => Vec::new(),
        }
    }
    fn complete_params(
        &self,
        spec: &Value,
        outputs: &Value,
        action: &str,
        params: Value,
    ) -> Result<Value, Vec<FieldError>> {
        match (stored::<D>(spec), D::Action::parse(action)) {
            (Some(s), Some(a)) => D::complete_params(&s, outputs, a, params),
            _ => Ok(params),
        }
    }
    fn requires(&self, spec: &Value, action: &str) -> Vec<Dependency> {
        let Some(a) = D::Action::parse(action) else {
            return Vec::new();
        };
        stored::<D>(spec).map(|s| D::requires(&s, a)).unwrap_or_default()
    }
    fn spec_after(&self, spec: &Value, action: &str, params: &Value) -> Option<Value> {
        let a = D::Action::parse(action)?;
        if D::action(a).adopts {
            let mut after = spec.clone();
            crate::merge::apply(&mut after, params.get("spec")?);
            return Some(after);
        }
        let after = D::spec_after(&stored::<D>(spec)?, a, params)?;
        serde_json::to_value(after).ok()
    }
    fn applies_whole(&self, spec: &Value, action: &str) -> bool {
        match (stored::<D>(spec), D::Action::parse(action)) {
            (Some(s), Some(a)) => D::applies_whole(&s, a),
            _ => false,
        }
    }
    fn applied_on_write(&self) -> bool {
        D::APPLIED_ON_WRITE
    }
    fn deletable_unstarted(&self) -> bool {
        D::DELETABLE_UNSTARTED
    }
    fn timeout_secs(&self, spec: &Value, action: &str) -> u64 {
        match (stored::<D>(spec), D::Action::parse(action)) {
            (Some(s), Some(a)) => D::timeout_secs(&s, a),
            (None, Some(a)) => D::action(a).timeout_secs,
            _ => 300,
        }
    }
    fn permission(&self, verb: &str) -> String {
        D::permission(verb)
    }
    fn admin_only(&self) -> bool {
        D::ADMIN_ONLY
    }
    fn environment(&self, spec: &Value) -> Option<String> {
        stored::<D>(spec).and_then(|s| D::environment(&s))
    }
    fn locked(&self, name: &str) -> Option<String> {
        D::locked(name)
    }
    fn holds_resources(&self) -> bool {
        D::HOLDS_RESOURCES
    }
}

// ---------------------------------------------------------------------
// Helpers the kind modules share.

/// A type's JSON Schema: draft 2020-12 (what OpenAPI 3.1 uses), with every
/// subschema inlined so that the schema stands alone.
pub fn schema_of<T: JsonSchema>() -> Value {
    let settings = schemars::generate::SchemaSettings::draft2020_12().with(|s| {
        s.inline_subschemas = true;
        s.meta_schema = None;
    });
    let schema = settings.into_generator().into_root_schema_for::<T>();
    let mut v = schema.to_value();
    if let Some(m) = v.as_object_mut() {
        m.remove("title");
    }
    v
}

fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("spec does not serialise: {e}")))
}

/// Deserialises a spec or params object, naming the offending field
/// under `root` (`spec.count`, `params.count`).
pub(crate) fn from_json<T: DeserializeOwned>(root: &str, v: &Value) -> Result<T> {
    FieldError::read(v, Some(root), root).map_err(|f| Error::Invalid(vec![f]))
}

/// A spec read as its kind's type and checked ([`Declaration::check`]).
pub fn read_spec<D: Declaration>(spec: &Value) -> Result<D::Spec> {
    let typed: D::Spec = from_json("spec", spec)?;
    match D::check(&typed) {
        errors if errors.is_empty() => Ok(typed),
        errors => Err(Error::Invalid(errors)),
    }
}

/// Actions without parameters accept `null` or `{}` only.
fn no_params(params: &Value) -> Result<Value> {
    match params {
        Value::Null => Ok(Value::Object(Default::default())),
        Value::Object(m) if m.is_empty() => Ok(params.clone()),
        _ => Err(Error::invalid("params", "this action takes no parameters")),
    }
}

/// Typed parameters; left out (`null`), they are `{}`, which a type whose
/// fields are all optional accepts.
fn typed_params<P: ActionParams>(params: &Value) -> Result<Value> {
    let empty = Value::Object(Default::default());
    let p: P = from_json("params", if params.is_null() { &empty } else { params })?;
    let errors = p.check();
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    to_value(&p)
}

/// The pattern every resource name matches (see [`validate_name`]).
pub const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// Names are DNS labels, so they fit hostnames, tags and stack names, and
/// never look like an id.
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && Uuid::parse_str(name).is_err();
    if ok {
        Ok(())
    } else {
        Err(FieldError::new("name", "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"))
    }
}

/// Whether `name` is a valid resource name.
pub fn is_name(name: &str) -> bool {
    validate_name(name).is_ok()
}

/// Declares a kind's state or action enum with its string names.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some($name::$variant),)+ _ => None }
            }
        }

        impl $crate::kinds::Named for $name {
            const ALL: &'static [$name] = $name::ALL;
            fn as_str(self) -> &'static str { $name::as_str(self) }
            fn parse(s: &str) -> Option<Self> { $name::parse(s) }
        }
    };
}
pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web-qa").is_ok());
        assert!(validate_name("a").is_ok());
        for bad in ["", "-a", "a-", "Web", "a_b", "a b", &"x".repeat(64), "0190d5e4-7b6c-7a3e-8c1b-2f4a5e6d7c8b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_registry_is_consistent() {
        let mut names: Vec<_> = Kind::all().map(Kind::as_str).collect();
        let mut plurals: Vec<_> = Kind::all().map(Kind::plural).collect();
        names.sort();
        names.dedup();
        plurals.sort();
        plurals.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        assert_eq!(plurals.len(), REGISTRY.len());
        for k in Kind::all() {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(Kind::parse_any(k.plural()), Some(k));
            assert!(k.states().contains(&k.initial_state()), "{k}");
            assert!(k.states().contains(&k.final_state()), "{k}");
            // Nothing leaves the final state but deletion.
            assert!(k.allowed_actions(k.final_state()).is_empty(), "{k}");
            // Some action reaches the final state, so every resource can be deleted.
            assert!(k.actions().iter().any(|a| k.retires(a)), "{k}");
            for a in k.actions() {
                assert!(k.action(a).is_some_and(|d| !d.description.is_empty()), "{k} {a}");
                // A fan-out names an action and states its children have.
                if let Some(f) = k.fan_out(a) {
                    assert!(f.kind.actions().contains(&f.action), "{k} {a}");
                    assert!(f.done.iter().all(|s| f.kind.states().contains(s)), "{k} {a}");
                }
            }
            let examples = k.examples();
            assert!(!examples.is_empty(), "{k} has no examples");
            for e in examples {
                let v = k.validate_spec(&e).unwrap_or_else(|err| panic!("{k} example {e}: {err:?}"));
                // Normalising is idempotent.
                assert_eq!(k.validate_spec(&v).unwrap(), v, "{k}");
            }
            assert_eq!(k.spec_schema()["type"], "object", "{k}");
        }
    }

    #[test]
    fn kinds_compare_by_name() {
        assert_eq!(image::KIND, Kind::parse("image").unwrap());
        assert_ne!(image::KIND, cluster::KIND);
        assert_eq!(format!("{}", cluster::KIND), "cluster");
        assert!(cluster::KIND.retires("destroy"));
        assert!(!cluster::KIND.retires("scale"));
    }
}
