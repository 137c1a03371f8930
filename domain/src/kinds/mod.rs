//! Resource kinds and their state machines.
//!
//! Each kind is one module that declares its states, its actions and a
//! transition table written as an exhaustive `match` (no `_` arm), so that a
//! new state or action does not compile until every entry is decided. The
//! engine and the API only see the kind-agnostic [`Step`] the table yields.
//!
//! Adding a kind: a module here (states, actions, `next`, spec and params
//! validation), a variant of [`Kind`], the arms in this file's dispatch
//! functions, and a provider module in `ops`.

pub mod cluster;
pub mod image;
pub mod role;
pub mod user;

use std::fmt;

use serde_json::Value;

use crate::error::{Error, FieldError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Image,
    Cluster,
    User,
    Role,
}

/// The provider of kinds whose transitions only touch drover's own records.
pub const BUILTIN_PROVIDER: &str = "builtin";

/// A kind's state machine, as its module declares it.
pub trait Machine {
    type State: KindState + StateName + 'static;
    type Action: Copy + 'static;
    const STATES: &'static [Self::State];
    const ACTIONS: &'static [Self::Action];
    fn action_name(a: Self::Action) -> &'static str;
    fn parse_action(s: &str) -> Option<Self::Action>;
    fn next(s: Self::State, a: Self::Action) -> Result<TypedStep<Self::State>, NotAllowed>;
}

/// `None`: the state is unknown to the kind; `Some(None)`: not allowed.
fn lookup<M: Machine>(state: &str, action: &str) -> Option<Option<Step>> {
    let s = M::State::parse(state)?;
    Some(M::parse_action(action).and_then(|a| M::next(s, a).ok()).map(Step::from))
}

fn names<M: Machine>() -> (Vec<&'static str>, Vec<&'static str>) {
    (M::STATES.iter().map(|s| s.name()).collect(), M::ACTIONS.iter().map(|&a| M::action_name(a)).collect())
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Image, Kind::Cluster, Kind::User, Kind::Role];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Cluster => "cluster",
            Kind::User => "user",
            Kind::Role => "role",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn description(self) -> &'static str {
        match self {
            Kind::Image => "A machine image: built once by a provider, then used by clusters.",
            Kind::Cluster => "A group of instances started from an image, scaled, stopped and destroyed.",
            Kind::User => "Someone who calls the API with bearer tokens; roles grant permissions.",
            Kind::Role => "A named set of permissions (kind:action).",
        }
    }

    fn names(self) -> (Vec<&'static str>, Vec<&'static str>) {
        match self {
            Kind::Image => names::<image::Table>(),
            Kind::Cluster => names::<cluster::Table>(),
            Kind::User => names::<user::Table>(),
            Kind::Role => names::<role::Table>(),
        }
    }

    pub fn states(self) -> Vec<&'static str> {
        self.names().0
    }

    pub fn actions(self) -> Vec<&'static str> {
        self.names().1
    }

    pub fn initial_state(self) -> &'static str {
        match self {
            Kind::Image => image::State::Pending.as_str(),
            Kind::Cluster => cluster::State::Pending.as_str(),
            Kind::User => user::State::Active.as_str(),
            Kind::Role => role::State::Active.as_str(),
        }
    }

    /// The state from which a resource may be deleted.
    pub fn final_state(self) -> &'static str {
        match self {
            Kind::Image => image::State::Destroyed.as_str(),
            Kind::Cluster => cluster::State::Destroyed.as_str(),
            Kind::User => user::State::Deleted.as_str(),
            Kind::Role => role::State::Deleted.as_str(),
        }
    }

    fn lookup(self, state: &str, action: &str) -> Option<Option<Step>> {
        match self {
            Kind::Image => lookup::<image::Table>(state, action),
            Kind::Cluster => lookup::<cluster::Table>(state, action),
            Kind::User => lookup::<user::Table>(state, action),
            Kind::Role => lookup::<role::Table>(state, action),
        }
    }

    /// The step `action` takes from `state`, or why it may not.
    pub fn next(self, state: &str, action: &str) -> Result<Step> {
        match self.lookup(state, action) {
            None => Err(Error::Internal(format!("unknown {self} state {state:?} in store"))),
            Some(Some(step)) => Ok(step),
            Some(None) => Err(Error::NotAllowed {
                kind: self,
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
            .filter(|a| matches!(self.lookup(state, a), Some(Some(_))))
            .map(str::to_string)
            .collect()
    }

    /// Every entry of the table, for `GET /v1/kinds/{kind}`.
    pub fn table(self) -> Vec<TableEntry> {
        let mut out = Vec::new();
        for state in self.states() {
            for action in self.actions() {
                if let Some(Some(step)) = self.lookup(state, action) {
                    out.push(TableEntry { from: state, action, step });
                }
            }
        }
        out
    }

    /// Checks a spec and returns it normalised (defaults filled in).
    pub fn validate_spec(self, spec: &Value) -> Result<Value> {
        match self {
            Kind::Image => image::Spec::from_value(spec).and_then(|s| to_value(&s)),
            Kind::Cluster => cluster::Spec::from_value(spec).and_then(|s| to_value(&s)),
            Kind::User => user::Spec::from_value(spec).and_then(|s| to_value(&s)),
            Kind::Role => role::Spec::from_value(spec).and_then(|s| to_value(&s)),
        }
    }

    /// Checks an action's parameters and returns them normalised.
    pub fn validate_params(self, action: &str, params: &Value) -> Result<Value> {
        match self {
            Kind::Image => image::validate_params(action, params),
            Kind::Cluster => cluster::validate_params(action, params),
            Kind::User | Kind::Role => cluster::no_params(params),
        }
    }

    /// The provider named by a (validated) spec.
    pub fn provider_of(self, spec: &Value) -> String {
        match self {
            Kind::Image | Kind::Cluster => spec.get("provider").and_then(Value::as_str).unwrap_or("local").to_string(),
            Kind::User | Kind::Role => BUILTIN_PROVIDER.to_string(),
        }
    }

    /// Other resources this one needs to be in a given state before an
    /// action may run: `(kind, name or id, required state)`.
    pub fn dependencies(self, spec: &Value, action: &str) -> Vec<Dependency> {
        match self {
            Kind::Image | Kind::User | Kind::Role => Vec::new(),
            Kind::Cluster => cluster::dependencies(spec, action),
        }
    }

    /// Whether a successful run of `action` changes the spec.
    pub fn changes_spec(self, action: &str) -> bool {
        match self {
            Kind::Image | Kind::User | Kind::Role => false,
            Kind::Cluster => cluster::changes_spec(action),
        }
    }

    /// The spec after a successful run of `action` (a scale changes `count`).
    pub fn spec_after_success(self, action: &str, params: &Value, spec: &Value) -> Option<Value> {
        match self {
            Kind::Image | Kind::User | Kind::Role => None,
            Kind::Cluster => cluster::spec_after_success(action, params, spec),
        }
    }

    /// Whether a run of `action` hands the resource's settings to its
    /// provider (and records which versions).
    pub fn takes_settings(self, action: &str) -> bool {
        match self {
            Kind::Cluster => cluster::takes_settings(action),
            Kind::Image | Kind::User | Kind::Role => false,
        }
    }

    /// Per-action timeout when the spec does not set one.
    pub fn default_timeout_secs(self, action: &str) -> u64 {
        match self {
            Kind::Image => image::default_timeout_secs(action),
            Kind::Cluster => cluster::default_timeout_secs(action),
            Kind::User | Kind::Role => 60,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state enum of one kind.
pub trait KindState: Sized + Copy {
    fn parse(s: &str) -> Option<Self>;
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("spec does not serialise: {e}")))
}

/// Deserialises a spec or params object, naming the offending field.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(root: &str, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| {
        let msg = e.to_string();
        // serde's messages name the field in backticks: "missing field `count`".
        let field = msg.split('`').nth(1).map(|f| format!("{root}.{f}")).unwrap_or_else(|| root.to_string());
        Error::Invalid(vec![FieldError::new(field, msg)])
    })
}

/// What a table entry does: the working state the resource shows while the
/// run is under way, and where success and failure lead. `Retry` re-runs the
/// action that failed, through that action's own step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Go { working: &'static str, ok: &'static str, err: &'static str },
    Retry,
}

impl<S: StateName> From<TypedStep<S>> for Step {
    fn from(t: TypedStep<S>) -> Self {
        match t {
            TypedStep::Go { working, ok, err } => Step::Go { working: working.name(), ok: ok.name(), err: err.name() },
            TypedStep::Retry => Step::Retry,
        }
    }
}

pub trait StateName: Copy {
    fn name(self) -> &'static str;
}

/// A step in a kind's own state type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypedStep<S> {
    Go { working: S, ok: S, err: S },
    Retry,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub kind: Kind,
    pub key: String,
    pub field: &'static str,
    pub required_state: &'static str,
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

        impl $crate::kinds::StateName for $name {
            fn name(self) -> &'static str { self.as_str() }
        }

        impl $crate::kinds::KindState for $name {
            fn parse(s: &str) -> Option<Self> { $name::parse(s) }
        }
    };
}
pub(crate) use named_enum;

/// Declares `Table`, the kind's [`Machine`], from its `State`, `Action`
/// and `next` (all in the invoking module).
macro_rules! machine {
    () => {
        /// This kind's state machine.
        pub struct Table;

        impl $crate::kinds::Machine for Table {
            type State = State;
            type Action = Action;
            const STATES: &'static [State] = State::ALL;
            const ACTIONS: &'static [Action] = Action::ALL;
            fn action_name(a: Action) -> &'static str {
                a.as_str()
            }
            fn parse_action(s: &str) -> Option<Action> {
                Action::parse(s)
            }
            fn next(s: State, a: Action) -> Result<$crate::kinds::TypedStep<State>, $crate::kinds::NotAllowed> {
                next(s, a)
            }
        }
    };
}
pub(crate) use machine;
