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

use std::fmt;

use serde_json::Value;

use crate::error::{Error, FieldError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Image,
    Cluster,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Image, Kind::Cluster];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Cluster => "cluster",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn description(self) -> &'static str {
        match self {
            Kind::Image => "A machine image: built once by a provider, then used by clusters.",
            Kind::Cluster => {
                "A group of instances started from an image, scaled, stopped and destroyed."
            }
        }
    }

    pub fn states(self) -> Vec<&'static str> {
        match self {
            Kind::Image => image::State::ALL.iter().map(|s| s.as_str()).collect(),
            Kind::Cluster => cluster::State::ALL.iter().map(|s| s.as_str()).collect(),
        }
    }

    pub fn actions(self) -> Vec<&'static str> {
        match self {
            Kind::Image => image::Action::ALL.iter().map(|a| a.as_str()).collect(),
            Kind::Cluster => cluster::Action::ALL.iter().map(|a| a.as_str()).collect(),
        }
    }

    pub fn initial_state(self) -> &'static str {
        match self {
            Kind::Image => image::State::Pending.as_str(),
            Kind::Cluster => cluster::State::Pending.as_str(),
        }
    }

    /// The state from which a resource may be deleted.
    pub fn final_state(self) -> &'static str {
        match self {
            Kind::Image => image::State::Destroyed.as_str(),
            Kind::Cluster => cluster::State::Destroyed.as_str(),
        }
    }

    /// The step `action` takes from `state`, or why it may not.
    pub fn next(self, state: &str, action: &str) -> Result<Step> {
        let step = match self {
            Kind::Image => {
                let (s, a) = (
                    parse_state::<image::State>(self, state)?,
                    image::Action::parse(action),
                );
                a.ok_or(())
                    .and_then(|a| image::next(s, a).map_err(|_| ()))
                    .map(Step::from)
            }
            Kind::Cluster => {
                let (s, a) = (
                    parse_state::<cluster::State>(self, state)?,
                    cluster::Action::parse(action),
                );
                a.ok_or(())
                    .and_then(|a| cluster::next(s, a).map_err(|_| ()))
                    .map(Step::from)
            }
        };
        step.map_err(|()| Error::NotAllowed {
            kind: self,
            state: state.to_string(),
            action: action.to_string(),
            allowed: self.allowed_actions(state),
        })
    }

    /// Actions allowed from `state`, in table order.
    pub fn allowed_actions(self, state: &str) -> Vec<String> {
        self.actions()
            .into_iter()
            .filter(|a| self.next_no_list(state, a))
            .map(str::to_string)
            .collect()
    }

    fn next_no_list(self, state: &str, action: &str) -> bool {
        match self {
            Kind::Image => match (image::State::parse(state), image::Action::parse(action)) {
                (Some(s), Some(a)) => image::next(s, a).is_ok(),
                _ => false,
            },
            Kind::Cluster => match (cluster::State::parse(state), cluster::Action::parse(action)) {
                (Some(s), Some(a)) => cluster::next(s, a).is_ok(),
                _ => false,
            },
        }
    }

    /// Every entry of the table, for `GET /v1/kinds/{kind}`.
    pub fn table(self) -> Vec<TableEntry> {
        let mut out = Vec::new();
        for state in self.states() {
            for action in self.actions() {
                if let Ok(step) = self.next(state, action) {
                    out.push(TableEntry {
                        from: state,
                        action,
                        step,
                    });
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
        }
    }

    /// Checks an action's parameters and returns them normalised.
    pub fn validate_params(self, action: &str, params: &Value) -> Result<Value> {
        match self {
            Kind::Image => image::validate_params(action, params),
            Kind::Cluster => cluster::validate_params(action, params),
        }
    }

    /// The provider named by a (validated) spec.
    pub fn provider_of(self, spec: &Value) -> String {
        spec.get("provider")
            .and_then(Value::as_str)
            .unwrap_or("local")
            .to_string()
    }

    /// Other resources this one needs to be in a given state before an
    /// action may run: `(kind, name or id, required state)`.
    pub fn dependencies(self, spec: &Value, action: &str) -> Vec<Dependency> {
        match self {
            Kind::Image => Vec::new(),
            Kind::Cluster => cluster::dependencies(spec, action),
        }
    }

    /// The spec after a successful run of `action` (a scale changes `count`).
    pub fn spec_after_success(self, action: &str, params: &Value, spec: &Value) -> Option<Value> {
        match self {
            Kind::Image => None,
            Kind::Cluster => cluster::spec_after_success(action, params, spec),
        }
    }

    /// Per-action timeout when the spec does not set one.
    pub fn default_timeout_secs(self, action: &str) -> u64 {
        match self {
            Kind::Image => image::default_timeout_secs(action),
            Kind::Cluster => cluster::default_timeout_secs(action),
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

fn parse_state<S: KindState>(kind: Kind, state: &str) -> Result<S> {
    S::parse(state)
        .ok_or_else(|| Error::Internal(format!("unknown {kind} state {state:?} in store")))
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("spec does not serialise: {e}")))
}

/// Deserialises a spec or params object, naming the offending field.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(root: &str, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| {
        let msg = e.to_string();
        // serde's messages name the field in backticks: "missing field `count`".
        let field = msg
            .split('`')
            .nth(1)
            .map(|f| format!("{root}.{f}"))
            .unwrap_or_else(|| root.to_string());
        Error::Invalid(vec![FieldError::new(field, msg)])
    })
}

/// What a table entry does: the working state the resource shows while the
/// run is under way, and where success and failure lead. `Retry` re-runs the
/// action that failed, through that action's own step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Go {
        working: &'static str,
        ok: &'static str,
        err: &'static str,
    },
    Retry,
}

impl<S: StateName> From<TypedStep<S>> for Step {
    fn from(t: TypedStep<S>) -> Self {
        match t {
            TypedStep::Go { working, ok, err } => Step::Go {
                working: working.name(),
                ok: ok.name(),
                err: err.name(),
            },
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
