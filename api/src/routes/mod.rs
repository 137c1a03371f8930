//! HTTP routes. Each resource module owns its `router()`; handlers are thin:
//! parse, call the domain service, map to DTOs.

pub mod discovery;
pub mod health;
pub mod identity;
pub mod kinds;
pub mod resources;
pub mod routers;
pub mod settings;
pub mod stats;
pub mod templates;
pub mod transitions;

use std::sync::Arc;

use drover_domain::auth::Auth;
use drover_domain::service::Service;
use drover_domain::settings::Settings;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub auth: Arc<Auth>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<crate::metrics::Registry>,
    pub discovery: Arc<drover_domain::discovery::Registry>,
    pub routing: Arc<drover_domain::routing::Routing>,
}
