//! HTTP routes. Each resource module owns its `router()`; handlers are thin:
//! parse, call the domain service, map to DTOs.

pub mod clusters;
pub mod health;
pub mod images;
mod kind_routes;
pub mod kinds;
pub mod resources;
pub mod templates;
pub mod transitions;

use std::sync::Arc;

use drover_domain::service::Service;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
}
