//! Drover's storage: Postgres and SQLite mappers behind
//! [`drover_domain::ports::Store`].
//!
//! **Architecture invariant:** nothing outside this crate sees a row, a
//! column or a `sqlx::Error`; constraint violations come out as typed domain
//! errors (`AlreadyExists`, `Busy`, `StaleLease`).

mod migrations;
mod postgres;
mod rows;
mod sql;
mod sqlite;
mod store;
mod time;

#[cfg(feature = "test-support")]
pub mod testing;

use std::sync::Arc;

use drover_domain::ports::{DiscoveryStore, SettingsStore, Store, TokenStore};
use drover_domain::routing::RouterConfigStore;
use drover_domain::{Error, Result};

pub use postgres::{PgBackend, PgStore, IDLE_IN_TRANSACTION};
pub use sqlite::{SqliteBackend, SqliteStore};
pub use store::SqlStore;

/// Each database's write count in this process (see [`store::SqlStore`]'s
/// `writes`), by its URL: the stores of one database in one process (the
/// replicas of a test) count together, so that a cache of reads from one
/// of them is never served after a write through another.
fn write_counter(url: &str) -> Arc<std::sync::atomic::AtomicU64> {
    static COUNTERS: std::sync::Mutex<Vec<(String, Arc<std::sync::atomic::AtomicU64>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut counters = COUNTERS.lock().expect("not poisoned");
    if let Some((_, c)) = counters.iter().find(|(u, _)| u == url) {
        return c.clone();
    }
    let c = Arc::new(std::sync::atomic::AtomicU64::new(0));
    counters.push((url.to_string(), c.clone()));
    c
}

/// Whether a statement only reads: it starts with `SELECT` (a `WITH` may
/// write, so it counts as a write).
pub(crate) fn only_reads(text: &str) -> bool {
    text.trim_start().get(..6).is_some_and(|w| w.eq_ignore_ascii_case("select"))
}

/// Opens the store a URL names (`postgres://…` or `sqlite://…`) and runs
/// its migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    Ok(open(url).await?.store)
}

/// Every port of one database.
#[derive(Clone)]
pub struct Stores {
    pub store: Arc<dyn Store>,
    pub tokens: Arc<dyn TokenStore>,
    pub settings: Arc<dyn SettingsStore>,
    pub discovery: Arc<dyn DiscoveryStore>,
    pub routers: Arc<dyn RouterConfigStore>,
}

fn stores<T: Store + TokenStore + SettingsStore + DiscoveryStore + RouterConfigStore>(s: T) -> Stores {
    let s = Arc::new(s);
    Stores { store: s.clone(), tokens: s.clone(), settings: s.clone(), discovery: s.clone(), routers: s }
}

/// Opens the database a URL names (`postgres://…` or `sqlite://…`) and runs
/// its migrations.
pub async fn open(url: &str) -> Result<Stores> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(stores(PgStore::connect(url, 16).await?))
    } else if url.starts_with("sqlite:") {
        Ok(stores(SqliteStore::connect(url).await?))
    } else {
        Err(Error::invalid("database_url", "must start with postgres:// or sqlite:"))
    }
}
