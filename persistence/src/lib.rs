//! Drover's storage: Postgres and SQLite mappers behind
//! [`drover_domain::ports::Store`].
//!
//! **Architecture invariant:** nothing outside this crate sees a row, a
//! column or a `sqlx::Error`; constraint violations come out as typed domain
//! errors (`AlreadyExists`, `Busy`, `StaleLease`).

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
