//! Resources and their spec versions.

use drover_domain::kinds::Kind;
use drover_domain::model::*;
use drover_domain::{Error, Result};
use serde_json::Value;
use uuid::Uuid;

use super::{db, is_unique, SqlStore};
use crate::rows::{ResourceRow, SpecVersionRow};
use crate::sql::{Backend, Exec, Sql};
use crate::time::Ts;

pub(super) async fn insert<B: Backend>(s: &SqlStore<B>, r: &NewResource) -> Result<Resource> {
    let mut tx = s.begin().await?;
    let row = tx
        .fetch_one::<ResourceRow>(
            Sql::new(
                "INSERT INTO resources (id, kind, name, state, spec, version, spec_version, applied_version,
                    applied_spec, outputs, created_at, updated_at, created_by, updated_by)
                 VALUES ($1, $2, $3, $4, $5, 1, 1, CASE WHEN $9 THEN 1 END, CASE WHEN $9 THEN $5 END, $6, $7, $7,
                    $8, $8)
                 RETURNING *",
            )
            .bind(r.id)
            .bind(r.kind.as_str())
            .bind(&r.name)
            .bind(&r.state)
            .bind(&r.spec)
            .bind(&serde_json::json!({}))
            .bind(Ts(r.now))
            .bind(&r.actor)
            .bind(r.applied),
        )
        .await
        .map_err(|e| match is_unique(&e) {
            true => Error::AlreadyExists { kind: r.kind.as_str(), name: r.name.clone() },
            false => db("insert resource")(e),
        })?;
    let version = NewVersion { resource: r.id, version: 1, actor: &r.actor, reason: r.reason.as_deref() };
    insert_version::<B>(&mut tx, version, &r.spec, &r.spec, r.now).await?;
    s.commit(tx, "commit").await?;
    row.try_into()
}

pub(super) async fn get<B: Backend>(s: &SqlStore<B>, kind: Kind, key: &ResourceKey) -> Result<Option<Resource>> {
    let sql = match key {
        ResourceKey::Id(id) => Sql::new("SELECT * FROM resources WHERE kind = $1 AND id = $2 AND deleted_at IS NULL")
            .bind(kind.as_str())
            .bind(*id),
        ResourceKey::Name(name) => {
            Sql::new("SELECT * FROM resources WHERE kind = $1 AND name = $2 AND deleted_at IS NULL")
                .bind(kind.as_str())
                .bind(name)
        }
    };
    let row = s.fetch_optional::<ResourceRow>("get resource", sql).await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn get_by_id<B: Backend>(s: &SqlStore<B>, id: Uuid) -> Result<Option<Resource>> {
    let sql = Sql::new("SELECT * FROM resources WHERE id = $1 AND deleted_at IS NULL").bind(id);
    let row = s.fetch_optional::<ResourceRow>("get resource", sql).await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn list<B: Backend>(
    s: &SqlStore<B>,
    kind: Kind,
    filter: &ResourceFilter,
    page: PageRequest,
) -> Result<Vec<Resource>> {
    let mut sql = Sql::new("SELECT * FROM resources WHERE deleted_at IS NULL AND kind = ");
    sql.push_bind(kind.as_str());
    if let Some(env) = &filter.environment {
        // `->>` reads a JSON field in both Postgres (JSONB) and SQLite (text).
        sql.push(" AND spec->>'environment' = ").push_bind(env);
    }
    if let Some(after) = page.after {
        sql.push(" AND id > ").push_bind(after);
    }
    sql.push(" ORDER BY id LIMIT ").push_bind(i64::from(page.limit));
    let rows = s.fetch_all::<ResourceRow>("list resources", sql).await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// Writes a new spec and appends its version, fenced on the version the
/// change was made against and refused while a run is active.
pub(super) async fn update_spec<B: Backend>(s: &SqlStore<B>, c: &SpecChange) -> Result<Resource> {
    let mut tx = s.begin().await?;
    let active = tx
        .fetch_optional::<(Uuid,)>(Sql::new("SELECT run_id FROM run_queue WHERE resource_id = $1").bind(c.resource))
        .await
        .map_err(db("find active run"))?;
    let row = tx
        .fetch_optional::<ResourceRow>(
            Sql::new(
                "UPDATE resources SET spec = $3, spec_version = spec_version + 1, version = version + 1,
                    applied_spec = CASE WHEN $6 THEN $3 ELSE applied_spec END,
                    applied_version = CASE WHEN $6 THEN spec_version + 1 ELSE applied_version END,
                    updated_at = $4, updated_by = $5
                 WHERE id = $1 AND spec_version = $2 AND deleted_at IS NULL RETURNING *",
            )
            .bind(c.resource)
            .bind(c.from_version)
            .bind(&c.spec)
            .bind(Ts(c.now))
            .bind(&c.actor)
            .bind(c.applied),
        )
        .await
        .map_err(db("update spec"))?;
    match (active, row) {
        (Some((run,)), _) => {
            drop(tx);
            let kind = kind_of(s, c.resource).await?;
            Err(Error::Busy { kind: kind.as_str(), resource: c.resource, run })
        }
        (None, Some(row)) => {
            let version = NewVersion {
                resource: c.resource,
                version: c.from_version + 1,
                actor: &c.actor,
                reason: c.reason.as_deref(),
            };
            insert_version::<B>(&mut tx, version, &c.patch, &c.spec, c.now).await?;
            s.commit(tx, "commit").await?;
            row.try_into()
        }
        (None, None) => {
            drop(tx);
            match get_by_id(s, c.resource).await? {
                Some(r) => Err(Error::VersionMismatch { expected: c.from_version, current: r.spec_version }),
                None => Err(Error::NotFound { kind: "resource", key: c.resource.to_string() }),
            }
        }
    }
}

pub(super) async fn list_versions<B: Backend>(
    s: &SqlStore<B>,
    resource: Uuid,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<SpecVersion>> {
    let sql =
        Sql::new("SELECT * FROM spec_versions WHERE resource_id = $1 AND version < $2 ORDER BY version DESC LIMIT $3")
            .bind(resource)
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit));
    let rows = s.fetch_all::<SpecVersionRow>("list spec versions", sql).await?;
    Ok(rows.into_iter().map(SpecVersion::from).collect())
}

pub(super) async fn get_version<B: Backend>(
    s: &SqlStore<B>,
    resource: Uuid,
    version: i64,
) -> Result<Option<SpecVersion>> {
    let sql =
        Sql::new("SELECT * FROM spec_versions WHERE resource_id = $1 AND version = $2").bind(resource).bind(version);
    let row = s.fetch_optional::<SpecVersionRow>("get spec version", sql).await?;
    Ok(row.map(SpecVersion::from))
}

pub(super) async fn delete<B: Backend>(s: &SqlStore<B>, id: Uuid, state: &str, now: Time) -> Result<()> {
    // Fenced on the state, and on no transition having been requested since
    // (a resource may be deleted before any started).
    let sql = Sql::new(
        "UPDATE resources SET deleted_at = $3 WHERE id = $1 AND state = $2 AND deleted_at IS NULL
            AND NOT EXISTS (SELECT 1 FROM run_queue WHERE resource_id = $1)",
    )
    .bind(id)
    .bind(state)
    .bind(Ts(now));
    // The connection goes back before `kind_of` takes one (SQLite has one).
    let deleted = s.execute("delete resource", sql).await?;
    match deleted {
        1 => Ok(()),
        _ => {
            let kind = kind_of(s, id).await?;
            Err(Error::Moved {
                kind: kind.as_str(),
                name: id.to_string(),
                what: format!("it left {state}, or a transition of it was requested, before it was deleted"),
            })
        }
    }
}

/// One statement: insert the lease, or take it over when it lapsed or is
/// already the observer's; nothing comes back while another holds it.
pub(super) async fn lease_observation<B: Backend>(
    s: &SqlStore<B>,
    resource: Uuid,
    observer: &str,
    now: Time,
    until: Time,
) -> Result<bool> {
    let sql = Sql::new(
        "INSERT INTO observer_leases (resource_id, observer, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (resource_id) DO UPDATE SET observer = excluded.observer, expires_at = excluded.expires_at
         WHERE observer_leases.expires_at <= $4 OR observer_leases.observer = excluded.observer
         RETURNING resource_id",
    )
    .bind(resource)
    .bind(observer)
    .bind(Ts(until))
    .bind(Ts(now));
    Ok(s.fetch_optional::<(Uuid,)>("lease an observation", sql).await?.is_some())
}

pub(super) async fn set_observed<B: Backend>(s: &SqlStore<B>, id: Uuid, observed: &Value) -> Result<()> {
    let sql = Sql::new("UPDATE resources SET observed = $2 WHERE id = $1").bind(id).bind(observed);
    s.execute("record observation", sql).await?;
    Ok(())
}

pub(super) async fn set_drift<B: Backend>(s: &SqlStore<B>, id: Uuid, drift: &Value) -> Result<()> {
    let sql = Sql::new("UPDATE resources SET drift = $2 WHERE id = $1").bind(id).bind(drift);
    s.execute("record drift", sql).await?;
    Ok(())
}

pub(super) async fn kind_of<B: Backend>(s: &SqlStore<B>, id: Uuid) -> Result<Kind> {
    let sql = Sql::new("SELECT kind FROM resources WHERE id = $1").bind(id);
    let (kind,) = s.fetch_one::<(String,)>("get kind", sql).await?;
    Kind::parse(&kind).ok_or_else(|| Error::Internal(format!("unknown kind {kind:?}")))
}

/// Who made spec version `version` of a resource, and why.
struct NewVersion<'a> {
    resource: Uuid,
    version: i64,
    actor: &'a str,
    reason: Option<&'a str>,
}

/// Appends a spec version (the caller's transaction wrote the spec).
async fn insert_version<B: Backend>(
    conn: &mut B::Conn,
    v: NewVersion<'_>,
    patch: &Value,
    spec: &Value,
    now: Time,
) -> Result<()> {
    let sql = Sql::new(
        "INSERT INTO spec_versions (resource_id, version, actor, reason, patch, spec, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(v.resource)
    .bind(v.version)
    .bind(v.actor)
    .bind(v.reason)
    .bind(patch)
    .bind(spec)
    .bind(Ts(now));
    conn.execute(sql).await.map_err(db("record spec version"))?;
    Ok(())
}
