//! The `local` provider: the embedded default. An image is a directory made
//! by running its build command; a cluster's instances are real processes
//! started from the image, each with its own `PORT` and health check; a
//! cluster's instances are the machines services are placed on, and a
//! service instance is a process whose working directory (a copy of its
//! build) lives under its machine's. A router is a real HAProxy (the
//! [`LocalHaproxy`] balancer), a daemon that outlives drover.
//!
//! # Guarantees
//! - A build that ran to completion for a run id is adopted, not rebuilt,
//!   when the run is tried again (a reclaimed lease).
//! - Every build is its own directory, kept while a live instance runs from
//!   it (and the build current before it); a rebuild never removes what
//!   runs, and an image is not destroyed while anything runs from it.
//! - Instance processes outlive drover. Their pids, ports and kernel start
//!   times are kept in a state file, so that after a restart they are
//!   adopted again, and those that vanished are reported, never forgotten.
//! - Every process drover starts runs in its own process group; stopping an
//!   instance or cancelling a build stops the whole group.
//!
//! # Assumptions
//! - Linux `/proc` (to tell a live instance from a reused pid), `sh`.
//! - One drover host owns a data directory.

mod cluster;
mod image;
mod job;
pub(crate) mod process;
mod router;
mod service;
mod state;
#[cfg(feature = "test-support")]
pub mod testing;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use drover_domain::engine::Providers;
use drover_domain::kinds;
use drover_domain::routing::Balancer;

pub use cluster::LocalClusters;
pub use image::LocalImages;
pub use job::LocalJobs;
pub use router::{haproxy_binary, LocalHaproxy};
pub use service::LocalServices;

pub const NAME: &str = "local";

/// Registers the local provider for every kind, keeping its files under
/// `data_dir`.
pub fn register(providers: &mut Providers, data_dir: &Path) {
    providers.register(
        NAME,
        kinds::image::KIND,
        Arc::new(LocalImages::new(data_dir.join("images"), vec![data_dir.join("clusters"), data_dir.join("services")])),
    );
    providers.register(NAME, kinds::cluster::KIND, Arc::new(LocalClusters::new(data_dir.join("clusters"))));
    providers.register(NAME, kinds::job::KIND, Arc::new(LocalJobs::new(data_dir.join("clusters"))));
    providers.register(
        NAME,
        kinds::service::KIND,
        Arc::new(LocalServices::new(data_dir.join("services"), data_dir.join("clusters"))),
    );
}

/// The local provider's load balancer for routers: a real HAProxy per
/// router, its files under `data_dir/routers`.
pub fn balancers(data_dir: &Path) -> BTreeMap<String, Arc<dyn Balancer>> {
    BTreeMap::from([(NAME.to_string(), Arc::new(LocalHaproxy::new(data_dir.join("routers"))) as Arc<dyn Balancer>)])
}
