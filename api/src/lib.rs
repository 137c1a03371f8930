//! Drover's HTTP API: axum routers, problem+json, OpenAPI, and the server
//! the `drover` binary runs.
//!
//! **Architecture invariant:** handlers call [`drover_domain::service::Service`]
//! and never touch storage; the JSON shapes live in [`dto`] only, and errors
//! become responses in [`problem`] only.

// `Problem` is the error type of every handler. It is built once per failed
// request and moved straight into a response; boxing it would only add an
// allocation to that path.
#![allow(clippy::result_large_err)]

pub mod app;
pub mod auth;
pub mod cli;
pub mod dto;
pub mod extract;
pub mod idempotency;
pub mod metrics;
mod openapi;
pub mod problem;
pub mod routes;
pub mod text;
pub mod ui;

pub use app::{openapi, start, Config, Server};
