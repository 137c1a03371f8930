//! Drover's domain: resource kinds and their state machines, the transition
//! engine (the provisioner), the application service the API calls, and the
//! ports that storage and providers implement.
//!
//! **Architecture invariant:** this crate names no `sqlx`, `axum`,
//! `aws_sdk_*` or HTTP type. It is the one place that decides which state
//! change is allowed; storage only carries out fenced writes.

pub mod auth;
pub mod discovery;
pub mod drift;
pub mod engine;
pub mod error;
pub mod fanout;
pub mod kinds;
pub mod merge;
pub mod model;
pub mod ports;
pub mod repair;
pub mod routing;
pub mod service;
pub mod settings;
pub mod stats;

pub use error::{Error, FieldError, Result};
pub use kinds::{Kind, Step};
