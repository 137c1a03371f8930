//! The discovery registry: where each healthy service instance can be
//! reached, kept alive by a TTL that drover renews.
//!
//! Who writes it:
//! - a service's runs, through [`crate::ports::RunContext`]: an instance
//!   enters once its health check passes, and leaves *before* it is
//!   stopped (a rolling deploy: new in, old out, old stopped);
//! - the observer, each round: it renews the entries of instances that
//!   still pass their checks, takes out those that do not (with the check's
//!   reason), and puts back a healthy instance that is missing while no run
//!   of its service is under way (a run owns the entries while it works);
//! - the sweep, each round: entries whose TTL lapsed leave ("not renewed"),
//!   which is what happens to every entry while no drover replica runs.
//!
//! Every entry that enters or leaves is a [`Change`] with a reason and an
//! index from one counter: watchers long-poll on it
//! (`GET /v1/discovery?index=N&wait=30s`) and wake on the change itself.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::Time;

/// How a router should speak to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Tcp,
}

impl From<&crate::kinds::cluster::HealthCheck> for Scheme {
    /// `http` when the instance's health check speaks HTTP.
    fn from(check: &crate::kinds::cluster::HealthCheck) -> Scheme {
        match check.http_path() {
            Some(_) => Scheme::Http,
            None => Scheme::Tcp,
        }
    }
}

/// Where one instance of a service can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEntry {
    pub service_id: Uuid,
    /// The service's name.
    pub service: String,
    /// The instance's id: unique for the service's life (two instances of
    /// one index run side by side during a rolling deploy).
    pub instance: String,
    /// Its stable index (`%i`).
    pub index: u32,
    /// The machine it runs on (`c1-0`).
    pub machine: String,
    pub address: String,
    pub port: u16,
    pub build: Option<String>,
    pub scheme: Scheme,
    /// The port on the machine's host, where it differs from `port`.
    pub host_port: Option<u16>,
}

/// An entry in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub entry: NewEntry,
    /// When it (last) entered, when it was last renewed, and when it
    /// leaves unless renewed again.
    pub registered_at: Time,
    pub renewed_at: Time,
    pub expires_at: Time,
}

/// The registry (or one service's part of it) at an index.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// The index of the last change it reflects: a watcher passes it back
    /// to wait for the next one.
    pub index: i64,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Enter,
    Leave,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Enter => "enter",
            ChangeKind::Leave => "leave",
        }
    }
}

/// An entry entering or leaving, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub index: i64,
    pub change: ChangeKind,
    pub service_id: Uuid,
    pub service: String,
    pub instance: String,
    pub reason: String,
    /// Who changed it: a run's id, `observer` or `sweep`.
    pub by: String,
    pub entry: NewEntry,
    pub at: Time,
}

/// What a provider sees of a service's instances for the registry: those
/// that pass their checks now, and those that do not, with why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Presence {
    pub healthy: Vec<NewEntry>,
    /// `(instance, reason)`.
    pub failing: Vec<(String, String)>,
    /// Why the instances should be placed again (a machine gone; a global
    /// service's machines changed), when they should: the observer asks
    /// for the kind's `place` action.
    pub misplaced: Option<String>,
}

/// How long an entry lives unless renewed: three observer rounds, so that
/// one slow or missed round takes nothing out.
pub fn ttl(observe_every: std::time::Duration) -> std::time::Duration {
    observe_every * 3
}

/// How long changes are kept for watchers and readers of the log.
pub const KEEP_CHANGES: chrono::Duration = chrono::Duration::days(30);

/// What the API reads of the registry (handlers never touch the store).
pub struct Registry {
    store: std::sync::Arc<dyn crate::ports::DiscoveryStore>,
}

impl Registry {
    pub fn new(store: std::sync::Arc<dyn crate::ports::DiscoveryStore>) -> Registry {
        Registry { store }
    }

    /// The registry (or one service's entries, by id) once its index
    /// differs from `after` (a change since, or a reset), or at `wait`'s
    /// end as it is; at once without `after`. Wakes on the change itself:
    /// it subscribes to the store's ticks before it reads, so a change
    /// between the read and the wait is not missed.
    pub async fn watch(
        &self,
        service: Option<Uuid>,
        after: Option<i64>,
        wait: std::time::Duration,
    ) -> crate::Result<Snapshot> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut ticks = self.store.discovery_watch();
            let snapshot = self.store.discovery_snapshot(service).await?;
            if after.is_none_or(|a| a != snapshot.index) {
                return Ok(snapshot);
            }
            if tokio::time::timeout_at(deadline, ticks.changed()).await.is_err() {
                return Ok(snapshot);
            }
        }
    }

    /// Changes after `after` (of one service, by name), oldest first.
    pub async fn changes(&self, after: i64, service: Option<&str>, limit: u32) -> crate::Result<Vec<Change>> {
        self.store.discovery_changes(after, service, limit).await
    }
}
