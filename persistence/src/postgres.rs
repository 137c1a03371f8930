//! The Postgres store: production, shared by several `drover serve`
//! replicas. Claims use `FOR UPDATE SKIP LOCKED`; `LISTEN/NOTIFY` on
//! `drover_runs` wakes idle workers early (a hint only: they poll anyway).

use std::sync::Arc;
use std::time::Duration;

use drover_domain::kinds::Kind;
use drover_domain::model::*;
use drover_domain::{Error, Result};
use serde_json::Value;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, Postgres};
use sqlx::types::Json;
use sqlx::QueryBuilder;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::identity::impl_identity_stores;
use crate::rows::*;
use crate::store::{db, impl_store, is_unique, lease_len, ClaimCursor};
use crate::time::Ts;

pub struct PgStore {
    pool: PgPool,
    wakeup: Arc<Notify>,
    cursor: ClaimCursor,
}

/// Leases due queue rows, oldest first, with `$extra` added to the scan's
/// condition.
macro_rules! claim {
    ($extra:literal) => {
        concat!(
            "WITH due AS (
                SELECT run_id FROM run_queue
                WHERE lease_expires_at IS NULL AND run_after <= $1",
            $extra,
            "
                ORDER BY run_after, run_id
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE run_queue q SET lease_expires_at = $3
            FROM due WHERE q.run_id = due.run_id
            RETURNING q.run_id, q.run_after"
        )
    };
}

impl PgStore {
    const CLAIM: &'static str = claim!("");
    const CLAIM_AFTER: &'static str = claim!(" AND (run_after, run_id) > ($4, $5)");

    /// `column = ANY($n)`: one array parameter, so the statement's text (and
    /// its prepared plan) is the same however many ids there are.
    fn push_in(q: &mut QueryBuilder<'_, Postgres>, column: &str, ids: &[Uuid]) {
        q.push(column).push(" = ANY(").push_bind(ids.to_vec()).push(")");
    }

    const NOTIFY_SQL: Option<&'static str> = Some("SELECT pg_notify('drover_runs', '')");

    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(db("connect to Postgres"))?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await.map_err(|e| Error::store("run migrations", e))?;
        let wakeup = Arc::new(Notify::new());
        // The listener reconnects by itself; if it cannot start at all,
        // workers still poll.
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => {
                let wake = wakeup.clone();
                tokio::spawn(async move {
                    if let Err(e) = listener.listen("drover_runs").await {
                        tracing::warn!(error = %e, "LISTEN failed; relying on polling");
                        return;
                    }
                    loop {
                        match listener.recv().await {
                            Ok(_) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "notification listener lost; reconnecting");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "could not start LISTEN; relying on polling"),
        }
        Ok(PgStore { pool, wakeup, cursor: ClaimCursor::default() })
    }
}

/// Rollup folders take turns: a transaction-scoped advisory lock, the key
/// being "drover rollups" as a number.
const FOLD_LOCK: &str = "SELECT pg_advisory_xact_lock(7378429001)";

impl_store!(PgStore, Postgres, backend = "postgres", fold_lock = FOLD_LOCK);
impl_identity_stores!(PgStore, Postgres);
