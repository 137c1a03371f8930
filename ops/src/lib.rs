//! Drover's providers: the code that touches the outside world, behind
//! [`drover_domain::ports::Provider`].
//!
//! **Architecture invariant:** providers never write drover's store; they
//! report through the run context (events) and their return value (outputs
//! or a classified error). Each provider step tolerates running twice.

pub mod aws;
pub mod builtin;
pub mod local;
mod rolling;
