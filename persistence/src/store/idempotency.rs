//! Idempotency keys: the first request with a key proceeds, the same
//! request again gets the saved response, a different one is refused.

use drover_domain::model::*;
use drover_domain::Result;

use super::SqlStore;
use crate::rows::IdempotencyRow;
use crate::sql::{Backend, Sql};
use crate::time::Ts;

/// How long a pending key whose request died with its server blocks its
/// key before another request takes it over.
const ABANDONED_AFTER: chrono::Duration = chrono::Duration::minutes(5);

pub(super) async fn begin<B: Backend>(
    s: &SqlStore<B>,
    key: &str,
    fingerprint: &str,
    now: Time,
) -> Result<IdempotencyBegin> {
    // The key may vanish between the insert and the read (a concurrent
    // request with it failed and abandoned it): then try to take it again.
    let mut attempts = 0;
    let row = loop {
        let inserted = s
            .execute(
                "record idempotency key",
                Sql::new(
                    "INSERT INTO idempotency_keys (key, fingerprint, state, created_at, updated_at)
                     VALUES ($1, $2, 'pending', $3, $3) ON CONFLICT (key) DO NOTHING",
                )
                .bind(key)
                .bind(fingerprint)
                .bind(Ts(now)),
            )
            .await?;
        if inserted == 1 {
            return Ok(IdempotencyBegin::Proceed);
        }
        let row = s
            .fetch_optional::<IdempotencyRow>(
                "read idempotency key",
                Sql::new("SELECT * FROM idempotency_keys WHERE key = $1").bind(key),
            )
            .await?;
        match row {
            Some(row) => break row,
            None if attempts < 3 => attempts += 1,
            // Contended that hard, it is in progress somewhere.
            None => return Ok(IdempotencyBegin::InProgress),
        }
    };
    if row.fingerprint != fingerprint {
        return Ok(IdempotencyBegin::Mismatch);
    }
    if row.state == "done" {
        return Ok(IdempotencyBegin::Replay(SavedResponse {
            status: row.response_status.unwrap_or(200) as u16,
            location: row.location,
            body: row.body.unwrap_or_default(),
        }));
    }
    if now - row.updated_at.0 > ABANDONED_AFTER {
        let sql = Sql::new(
            "UPDATE idempotency_keys SET updated_at = $2 WHERE key = $1 AND state = 'pending' AND updated_at = $3",
        )
        .bind(key)
        .bind(Ts(now))
        .bind(row.updated_at);
        let taken = s.execute("take over idempotency key", sql).await?;
        if taken == 1 {
            return Ok(IdempotencyBegin::Proceed);
        }
    }
    Ok(IdempotencyBegin::InProgress)
}

pub(super) async fn save<B: Backend>(s: &SqlStore<B>, key: &str, r: &SavedResponse, now: Time) -> Result<()> {
    let sql = Sql::new(
        "UPDATE idempotency_keys SET state = 'done', response_status = $2, location = $3, body = $4, updated_at = $5
         WHERE key = $1",
    )
    .bind(key)
    .bind(i32::from(r.status))
    .bind(r.location.as_ref())
    .bind(r.body.as_slice())
    .bind(Ts(now));
    s.execute("save idempotent response", sql).await?;
    Ok(())
}

pub(super) async fn abandon<B: Backend>(s: &SqlStore<B>, key: &str) -> Result<()> {
    let sql = Sql::new("DELETE FROM idempotency_keys WHERE key = $1 AND state = 'pending'").bind(key);
    s.execute("abandon idempotency key", sql).await?;
    Ok(())
}
