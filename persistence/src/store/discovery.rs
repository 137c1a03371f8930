//! The discovery registry ([`DiscoveryStore`]): entries, their changes and
//! the index that orders them.

use crate::sql::from_row;
use drover_domain::discovery::{Change, ChangeKind, Entry, NewEntry, Snapshot};
use drover_domain::model::Time;
use drover_domain::ports::DiscoveryStore;
use drover_domain::{Error, Result};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{db, SqlStore};
use crate::sql::{Backend, Exec, Sql};
use crate::time::Ts;

struct EntryRow {
    entry: Json<Value>,
    registered_at: Ts,
    renewed_at: Ts,
    expires_at: Ts,
}

from_row!(EntryRow { entry, registered_at, renewed_at, expires_at });

impl TryFrom<EntryRow> for Entry {
    type Error = Error;
    fn try_from(r: EntryRow) -> Result<Entry> {
        Ok(Entry {
            entry: parse(r.entry.0)?,
            registered_at: r.registered_at.0,
            renewed_at: r.renewed_at.0,
            expires_at: r.expires_at.0,
        })
    }
}

struct ChangeRow {
    idx: i64,
    change: String,
    service_id: Uuid,
    service: String,
    instance: String,
    reason: String,
    by_whom: String,
    entry: Json<Value>,
    at: Ts,
}

from_row!(ChangeRow { idx, change, service_id, service, instance, reason, by_whom, entry, at });

impl TryFrom<ChangeRow> for Change {
    type Error = Error;
    fn try_from(r: ChangeRow) -> Result<Change> {
        Ok(Change {
            index: r.idx,
            change: if r.change == "enter" { ChangeKind::Enter } else { ChangeKind::Leave },
            service_id: r.service_id,
            service: r.service,
            instance: r.instance,
            reason: r.reason,
            by: r.by_whom,
            entry: parse(r.entry.0)?,
            at: r.at.0,
        })
    }
}

fn parse(v: Value) -> Result<NewEntry> {
    serde_json::from_value(v).map_err(|e| Error::Internal(format!("a discovery entry in the store is invalid: {e}")))
}

fn json(e: &NewEntry) -> Value {
    serde_json::to_value(e).expect("an entry serializes")
}

/// Takes the next index, locking the counter's row until the transaction
/// ends: registry writers go one at a time, so indexes commit in order.
async fn next_index<C: Exec + ?Sized>(tx: &mut C) -> Result<i64> {
    let sql = Sql::new("UPDATE discovery_index SET value = value + 1 WHERE id = 1 RETURNING value");
    let (idx,) = tx.fetch_one::<(i64,)>(sql).await.map_err(db("take a discovery index"))?;
    Ok(idx)
}

/// Records a change under `idx` and tells other replicas.
async fn log<B: Backend>(
    tx: &mut B::Conn,
    idx: i64,
    change: ChangeKind,
    e: &NewEntry,
    reason: &str,
    by: &str,
    now: Time,
) -> Result<()> {
    let value = json(e);
    let sql = Sql::new(
        "INSERT INTO discovery_log (idx, change, service_id, service, instance, reason, by_whom, entry, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(idx)
    .bind(change.as_str())
    .bind(e.service_id)
    .bind(&e.service)
    .bind(&e.instance)
    .bind(reason)
    .bind(by)
    .bind(&value)
    .bind(Ts(now));
    tx.execute(sql).await.map_err(db("log a discovery change"))?;
    if let Some(notify) = B::NOTIFY_DISCOVERY {
        tx.execute(Sql::new(notify).bind(idx.to_string())).await.map_err(db("notify a discovery change"))?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl<B: Backend> DiscoveryStore for SqlStore<B> {
    async fn discovery_enter(
        &self,
        e: &NewEntry,
        reason: &str,
        by: &str,
        now: Time,
        until: Time,
    ) -> Result<Option<i64>> {
        let mut tx = self.begin().await?;
        let idx = next_index(&mut *tx).await?;
        let value = json(e);
        let current = tx
            .fetch_optional::<(Json<Value>,)>(
                Sql::new("SELECT entry FROM discovery_entries WHERE service_id = $1 AND instance = $2")
                    .bind(e.service_id)
                    .bind(&e.instance),
            )
            .await
            .map_err(db("read a discovery entry"))?;
        if current.is_some_and(|(c,)| c.0 == value) {
            // There as it is: a renewal, which changes nothing a watcher sees.
            drop(tx);
            self.discovery_renew(e.service_id, std::slice::from_ref(&e.instance), now, until).await?;
            return Ok(None);
        }
        let sql = Sql::new(
            "INSERT INTO discovery_entries (service_id, instance, service, entry, registered_at, renewed_at,
                expires_at)
             VALUES ($1, $2, $3, $4, $5, $5, $6)
             ON CONFLICT (service_id, instance) DO UPDATE SET service = excluded.service, entry = excluded.entry,
                registered_at = excluded.registered_at, renewed_at = excluded.renewed_at,
                expires_at = excluded.expires_at",
        )
        .bind(e.service_id)
        .bind(&e.instance)
        .bind(&e.service)
        .bind(&value)
        .bind(Ts(now))
        .bind(Ts(until));
        tx.execute(sql).await.map_err(db("write a discovery entry"))?;
        log::<B>(&mut tx, idx, ChangeKind::Enter, e, reason, by, now).await?;
        self.commit(tx, "enter the discovery registry").await?;
        self.discovery_changed(idx);
        Ok(Some(idx))
    }

    async fn discovery_renew(&self, service: Uuid, instances: &[String], now: Time, until: Time) -> Result<u64> {
        let mut renewed = 0;
        for i in instances {
            let sql = Sql::new(
                "UPDATE discovery_entries SET renewed_at = $3, expires_at = $4 WHERE service_id = $1 AND instance = $2",
            )
            .bind(service)
            .bind(i.as_str())
            .bind(Ts(now))
            .bind(Ts(until));
            renewed += self.execute("renew a discovery entry", sql).await?;
        }
        Ok(renewed)
    }

    async fn discovery_leave(
        &self,
        service: Uuid,
        instance: &str,
        reason: &str,
        by: &str,
        now: Time,
        lapsed_by: Option<Time>,
    ) -> Result<Option<i64>> {
        let mut tx = self.begin().await?;
        let idx = next_index(&mut *tx).await?;
        let mut sql = Sql::new("DELETE FROM discovery_entries WHERE service_id = ");
        sql.push_bind(service).push(" AND instance = ").push_bind(instance);
        if let Some(t) = lapsed_by {
            sql.push(" AND expires_at <= ").push_bind(Ts(t));
        }
        sql.push(" RETURNING entry");
        let gone = tx.fetch_optional::<(Json<Value>,)>(sql).await.map_err(db("take out a discovery entry"))?;
        let Some((entry,)) = gone else {
            return Ok(None); // rolled back: the index is not used
        };
        log::<B>(&mut tx, idx, ChangeKind::Leave, &parse(entry.0)?, reason, by, now).await?;
        self.commit(tx, "leave the discovery registry").await?;
        self.discovery_changed(idx);
        Ok(Some(idx))
    }

    async fn discovery_lapsed(&self, now: Time) -> Result<Vec<(Uuid, String)>> {
        let sql = Sql::new("SELECT service_id, instance FROM discovery_entries WHERE expires_at <= $1").bind(Ts(now));
        self.fetch_all::<(Uuid, String)>("read lapsed discovery entries", sql).await
    }

    async fn discovery_prune(&self, before: Time) -> Result<u64> {
        // The newest change stays, whatever its age: it carries the index.
        let sql = Sql::new(
            "DELETE FROM discovery_log WHERE at < $1 AND idx < (SELECT value FROM discovery_index WHERE id = 1)",
        )
        .bind(Ts(before));
        self.execute("forget old discovery changes", sql).await
    }

    async fn discovery_snapshot(&self, service: Option<Uuid>) -> Result<Snapshot> {
        let mut conn = self.conn().await?;
        let (index, listed) = match service {
            None => (
                Sql::new("SELECT value FROM discovery_index WHERE id = 1"),
                Sql::new("SELECT entry, registered_at, renewed_at, expires_at FROM discovery_entries"),
            ),
            Some(id) => (
                Sql::new("SELECT COALESCE(MAX(idx), 0) FROM discovery_log WHERE service_id = $1").bind(id),
                Sql::new(
                    "SELECT entry, registered_at, renewed_at, expires_at FROM discovery_entries WHERE service_id = $1",
                )
                .bind(id),
            ),
        };
        let (index,) = conn.fetch_one::<(i64,)>(index).await.map_err(db("read the discovery index"))?;
        let rows = conn.fetch_all::<EntryRow>(listed).await.map_err(db("read the discovery registry"))?;
        // The index is inside the entry: sorted here, not by the database.
        let mut entries = rows.into_iter().map(Entry::try_from).collect::<Result<Vec<_>>>()?;
        entries.sort_by(|a, b| {
            (&a.entry.service, a.entry.index, &a.entry.instance).cmp(&(
                &b.entry.service,
                b.entry.index,
                &b.entry.instance,
            ))
        });
        Ok(Snapshot { index, entries })
    }

    async fn discovery_changes(&self, after: i64, service: Option<&str>, limit: u32) -> Result<Vec<Change>> {
        let mut sql = Sql::new("SELECT * FROM discovery_log WHERE idx > ");
        sql.push_bind(after);
        if let Some(name) = service {
            sql.push(" AND service = ").push_bind(name);
        }
        sql.push(" ORDER BY idx LIMIT ").push_bind(i64::from(limit));
        let rows = self.fetch_all::<ChangeRow>("read discovery changes", sql).await?;
        rows.into_iter().map(Change::try_from).collect()
    }

    fn discovery_watch(&self) -> tokio::sync::watch::Receiver<i64> {
        self.discovery.subscribe()
    }
}
