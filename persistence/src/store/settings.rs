//! Settings and their versions ([`SettingsStore`]).

use drover_domain::model::*;
use drover_domain::ports::SettingsStore;
use drover_domain::{Error, Result};

use super::{db, is_unique, SqlStore};
use crate::rows::SettingRow;
use crate::sql::{Backend, Exec, Sql};
use crate::time::Ts;

#[async_trait::async_trait]
impl<B: Backend> SettingsStore for SqlStore<B> {
    async fn insert_setting(&self, v: &NewSettingVersion) -> Result<SettingVersion> {
        let sql = Sql::new(
            "INSERT INTO setting_versions (id, scope, key, version, value, sealed, secret, deleted, actor, reason,
                created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *",
        )
        .bind(v.id)
        .bind(&v.scope)
        .bind(&v.key)
        .bind(v.version)
        .bind(v.value.as_ref())
        .bind(v.sealed.as_deref())
        .bind(v.secret)
        .bind(v.deleted)
        .bind(&v.actor)
        .bind(v.reason.as_ref())
        .bind(Ts(v.now));
        // The connection goes back before `setting` takes one (SQLite has
        // one).
        let inserted = self.conn().await?.fetch_one::<SettingRow>(sql).await;
        self.wrote();
        match inserted {
            Ok(row) => Ok(row.into()),
            // Another writer took this version number first.
            Err(e) if is_unique(&e) => {
                let current = self.setting(&v.scope, &v.key, None).await?.map_or(0, |c| c.version);
                Err(Error::VersionMismatch { expected: v.version - 1, current })
            }
            Err(e) => Err(db("write setting")(e)),
        }
    }

    async fn setting(&self, scope: &str, key: &str, version: Option<i64>) -> Result<Option<SettingVersion>> {
        let sql = match version {
            Some(v) => Sql::new("SELECT * FROM setting_versions WHERE scope = $1 AND key = $2 AND version = $3")
                .bind(scope)
                .bind(key)
                .bind(v),
            None => {
                Sql::new("SELECT * FROM setting_versions WHERE scope = $1 AND key = $2 ORDER BY version DESC LIMIT 1")
                    .bind(scope)
                    .bind(key)
            }
        };
        let row = self.fetch_optional::<SettingRow>("read setting", sql).await?;
        Ok(row.map(Into::into))
    }

    async fn setting_history(&self, scope: &str, key: &str) -> Result<Vec<SettingVersion>> {
        let sql = Sql::new("SELECT * FROM setting_versions WHERE scope = $1 AND key = $2 ORDER BY version")
            .bind(scope)
            .bind(key);
        let rows = self.fetch_all::<SettingRow>("read setting history", sql).await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn current_settings(&self, scopes: &[String]) -> Result<Vec<SettingVersion>> {
        let mut sql = Sql::new(
            "SELECT * FROM setting_versions s WHERE version = (SELECT MAX(version) FROM setting_versions m
             WHERE m.scope = s.scope AND m.key = s.key) AND scope IN ",
        );
        sql.push_tuple(scopes).push(" ORDER BY scope, key");
        let rows = self.fetch_all::<SettingRow>("read settings", sql).await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }
}
