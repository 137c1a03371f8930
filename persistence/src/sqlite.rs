//! The SQLite store: the embedded default, for one `drover serve` process.
//!
//! One connection serialises every statement, which gives the engine the
//! same exclusivity Postgres gets from row locks; WAL keeps the file safe
//! across crashes.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use drover_domain::kinds::Kind;
use drover_domain::model::*;
use drover_domain::{Error, Result};
use serde_json::Value;
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::QueryBuilder;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::identity::impl_identity_stores;
use crate::rows::*;
use crate::store::{db, impl_store, is_unique, lease_len, ClaimCursor};
use crate::time::Ts;

pub struct SqliteStore {
    pool: SqlitePool,
    wakeup: Arc<Notify>,
    cursor: ClaimCursor,
}

/// Leases due queue rows, oldest first, with `$extra` added to the scan's
/// condition.
macro_rules! claim {
    ($extra:literal) => {
        concat!(
            "UPDATE run_queue SET lease_expires_at = $3
            WHERE run_id IN (
                SELECT run_id FROM run_queue WHERE lease_expires_at IS NULL AND run_after <= $1",
            $extra,
            "
                ORDER BY run_after, run_id LIMIT $2
            )
            RETURNING run_id, run_after"
        )
    };
}

impl SqliteStore {
    const CLAIM: &'static str = claim!("");
    const CLAIM_AFTER: &'static str = claim!(" AND (run_after, run_id) > ($4, $5)");

    /// `column IN (…)`, a parameter per id (SQLite has no arrays).
    fn push_in(q: &mut QueryBuilder<'_, Sqlite>, column: &str, ids: &[Uuid]) {
        q.push(column).push(" IN (");
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        q.push(")");
    }

    const NOTIFY_SQL: Option<&'static str> = None;

    pub async fn connect(url: &str) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db("parse the SQLite URL"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(db("open SQLite"))?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await.map_err(|e| Error::store("run migrations", e))?;
        Ok(SqliteStore { pool, wakeup: Arc::new(Notify::new()), cursor: ClaimCursor::default() })
    }
}

/// Transactions on the one connection are serial already.
const FOLD_LOCK: &str = "SELECT 1";

impl_store!(SqliteStore, Sqlite, backend = "sqlite", fold_lock = FOLD_LOCK);
impl_identity_stores!(SqliteStore, Sqlite);
