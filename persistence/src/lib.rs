//! Drover's storage: Postgres and SQLite mappers behind
//! [`drover_domain::ports::Store`].
//!
//! **Architecture invariant:** nothing outside this crate sees a row, a
//! column or a `sqlx::Error`; constraint violations come out as typed domain
//! errors (`AlreadyExists`, `Busy`, `StaleLease`).

mod postgres;
mod rows;
mod sqlite;
mod store;
mod time;

#[cfg(feature = "test-support")]
pub mod testing;

use std::sync::Arc;

use drover_domain::ports::Store;
use drover_domain::{Error, Result};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Opens the store a URL names (`postgres://…` or `sqlite://…`) and runs
/// its migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, 16).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(Error::invalid(
            "database_url",
            "must start with postgres:// or sqlite:",
        ))
    }
}
