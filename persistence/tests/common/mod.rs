//! Shared helpers: a fresh store of each backend, and fixtures.

#![allow(dead_code)]

use std::sync::Arc;

use chrono::Utc;
use drover_domain::model::*;
use drover_domain::ports::Store;
pub use drover_persistence::Stores;
use serde_json::json;
use uuid::Uuid;

pub async fn sqlite() -> (Stores, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("drover.db").display());
    (drover_persistence::open(&url).await.unwrap(), dir)
}

/// A fresh Postgres database migrated up to `version` only (an earlier
/// drover's schema), and a connection to it; `drover_persistence::open` on
/// its URL migrates the rest, as an upgrade would.
pub async fn postgres_at_version(version: i64) -> (String, sqlx::PgConnection) {
    use sqlx::Connection;
    let url = drover_persistence::testing::fresh_postgres_database().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut before = sqlx::migrate!("../migrations/postgres");
    before.migrations = before.migrations.iter().filter(|m| m.version <= version).cloned().collect::<Vec<_>>().into();
    before.run(&mut conn).await.unwrap();
    (url, conn)
}

/// A fresh SQLite database migrated up to `version` only, its URL and the
/// directory that holds it.
pub async fn sqlite_at_version(version: i64) -> (String, tempfile::TempDir) {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mut before = sqlx::migrate!("../migrations/sqlite");
    before.migrations = before.migrations.iter().filter(|m| m.version <= version).cloned().collect::<Vec<_>>().into();
    before.run(&mut conn).await.unwrap();
    (format!("sqlite://{}", path.display()), dir)
}

/// Writes to a store's database behind the store's back, to break one of
/// its invariants on purpose.
pub async fn backdoor(url: &str, sql: &str) {
    if let Err(e) = backdoor_try(url, sql).await {
        panic!("{sql}: {e}");
    }
}

/// Runs `sql` straight on the database, bypassing the store; the error's
/// text when it is refused.
pub async fn backdoor_try(url: &str, sql: &str) -> Result<(), String> {
    use sqlx::Connection;
    let done = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.map(drop)
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.map(drop)
    };
    done.map_err(|e| e.to_string())
}

/// A count read straight from the database.
pub async fn backdoor_count(url: &str, sql: &str) -> i64 {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
    }
}

pub async fn postgres() -> Stores {
    let url = drover_persistence::testing::fresh_postgres_database().await;
    drover_persistence::open(&url).await.unwrap()
}

/// What a test body takes: the main store, or every port.
pub trait FromStores {
    fn from_stores(s: Stores) -> Self;
}

impl FromStores for Arc<dyn Store> {
    fn from_stores(s: Stores) -> Self {
        s.store
    }
}

impl FromStores for Stores {
    fn from_stores(s: Stores) -> Self {
        s
    }
}

/// Instantiates an async test body `fn(Arc<dyn Store> or Stores, url)` once per
/// backend, the URL for [`backdoor`].
#[macro_export]
macro_rules! both_backends_with_url {
    ($($name:ident),+ $(,)?) => {
        mod sqlite_backend_with_url {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("drover.db").display());
                    let stores = drover_persistence::open(&url).await.unwrap();
                    super::$name($crate::common::FromStores::from_stores(stores), &url).await;
                }
            )+
        }
        mod postgres_backend_with_url {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let url = drover_persistence::testing::fresh_postgres_database().await;
                    let stores = drover_persistence::open(&url).await.unwrap();
                    super::$name($crate::common::FromStores::from_stores(stores), &url).await;
                }
            )+
        }
    };
}

/// Instantiates an async test body `fn(Arc<dyn Store>)` once per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (stores, _dir) = $crate::common::sqlite().await;
                    super::$name($crate::common::FromStores::from_stores(stores)).await;
                }
            )+
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let stores = $crate::common::postgres().await;
                    super::$name($crate::common::FromStores::from_stores(stores)).await;
                }
            )+
        }
    };
}

pub async fn cluster(store: &Arc<dyn Store>, name: &str) -> Resource {
    store
        .insert_resource(&NewResource {
            id: Uuid::now_v7(),
            kind: drover_domain::kinds::cluster::KIND,
            name: name.into(),
            state: "pending".into(),
            spec: json!({"image": "img", "count": 1}),
            actor: "tester".into(),
            reason: None,
            applied: false,
            now: Utc::now(),
        })
        .await
        .unwrap()
}

pub fn new_run(r: &Resource, action: &str, from: &str, working: &str, ok: &str) -> NewRun {
    NewRun {
        id: Uuid::now_v7(),
        resource_id: r.id,
        kind: r.kind,
        resource_name: r.name.clone(),
        action: action.into(),
        params: json!({}),
        from_state: from.into(),
        working_state: working.into(),
        ok_state: ok.into(),
        err_state: "failed".into(),
        max_attempts: 3,
        actor: "tester".into(),
        reason: Some("because".into()),
        idempotency_key: None,
        parent_run: None,
        provider: "test".into(),
        timeout_secs: 60,
        settings: json!([]),
        environment: None,
        now: Utc::now(),
    }
}

/// A change of `r`'s spec from the spec version `from` to `spec`.
pub fn change(r: &Resource, from: i64, spec: serde_json::Value, actor: &str) -> SpecChange {
    SpecChange {
        resource: r.id,
        from_version: from,
        patch: drover_domain::merge::diff(&r.spec, &spec),
        spec,
        actor: actor.into(),
        reason: Some(format!("{actor} says so")),
        applied: false,
        now: Utc::now(),
    }
}

pub fn done(status: RunStatus, state: &str) -> Completion {
    Completion {
        status,
        resource_state: state.into(),
        outputs: Some(json!({"ok": true})),
        error: None,
        spec: None,
        applies_spec: false,
        applied: None,
        event: NewEvent::info("finish", "done"),
        now: Utc::now(),
    }
}
