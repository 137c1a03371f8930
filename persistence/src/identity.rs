//! [`TokenStore`] and [`SettingsStore`], written once and expanded for
//! each backend like the main store.
//!
//! [`TokenStore`]: drover_domain::ports::TokenStore
//! [`SettingsStore`]: drover_domain::ports::SettingsStore

macro_rules! impl_identity_stores {
    ($store:ident, $db:ty) => {
        #[async_trait::async_trait]
        impl drover_domain::ports::TokenStore for $store {
            async fn insert_token(&self, t: &NewToken) -> Result<Token> {
                let row = sqlx::query_as::<_, TokenRow>(
                    "INSERT INTO api_tokens (id, user_id, name, prefix, hash, expires_at, created_at, created_by)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
                )
                .bind(t.id)
                .bind(t.user_id)
                .bind(&t.name)
                .bind(&t.prefix)
                .bind(&t.hash)
                .bind(t.expires_at.map(Ts))
                .bind(Ts(t.now))
                .bind(&t.created_by)
                .fetch_one(&self.pool)
                .await
                .map_err(db("create token"))?;
                Ok(row.into())
            }

            async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
                let row = sqlx::query_as::<_, TokenRow>("SELECT * FROM api_tokens WHERE hash = $1")
                    .bind(hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db("look up token"))?;
                Ok(row.map(Into::into))
            }

            async fn list_tokens(&self, user: Uuid) -> Result<Vec<Token>> {
                let rows = sqlx::query_as::<_, TokenRow>("SELECT * FROM api_tokens WHERE user_id = $1 ORDER BY id")
                    .bind(user)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("list tokens"))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn revoke_token(&self, user: Uuid, id: Uuid, actor: &str, now: Time) -> Result<Option<Token>> {
                // Revoking twice keeps the first revocation on record.
                let row = sqlx::query_as::<_, TokenRow>(
                    "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $3), revoked_by = COALESCE(revoked_by, $4)
                     WHERE id = $1 AND user_id = $2 RETURNING *",
                )
                .bind(id)
                .bind(user)
                .bind(Ts(now))
                .bind(actor)
                .fetch_optional(&self.pool)
                .await
                .map_err(db("revoke token"))?;
                Ok(row.map(Into::into))
            }

            async fn touch_token(&self, id: Uuid, now: Time) -> Result<()> {
                sqlx::query("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1")
                    .bind(id)
                    .bind(Ts(now))
                    .execute(&self.pool)
                    .await
                    .map_err(db("record token use"))?;
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl drover_domain::ports::SettingsStore for $store {
            async fn insert_setting(&self, v: &NewSettingVersion) -> Result<SettingVersion> {
                let row = sqlx::query_as::<_, SettingRow>(
                    "INSERT INTO setting_versions (id, scope, key, version, value, sealed, secret, deleted, actor, reason, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *",
                )
                .bind(v.id)
                .bind(&v.scope)
                .bind(&v.key)
                .bind(v.version)
                .bind(&v.value)
                .bind(&v.sealed)
                .bind(v.secret)
                .bind(v.deleted)
                .bind(&v.actor)
                .bind(&v.reason)
                .bind(Ts(v.now))
                .fetch_one(&self.pool)
                .await;
                match row {
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
                let q = match version {
                    Some(v) => sqlx::query_as::<_, SettingRow>(
                        "SELECT * FROM setting_versions WHERE scope = $1 AND key = $2 AND version = $3",
                    )
                    .bind(scope)
                    .bind(key)
                    .bind(v),
                    None => sqlx::query_as::<_, SettingRow>(
                        "SELECT * FROM setting_versions WHERE scope = $1 AND key = $2 ORDER BY version DESC LIMIT 1",
                    )
                    .bind(scope)
                    .bind(key),
                };
                Ok(q.fetch_optional(&self.pool).await.map_err(db("read setting"))?.map(Into::into))
            }

            async fn setting_history(&self, scope: &str, key: &str) -> Result<Vec<SettingVersion>> {
                let rows = sqlx::query_as::<_, SettingRow>(
                    "SELECT * FROM setting_versions WHERE scope = $1 AND key = $2 ORDER BY version",
                )
                .bind(scope)
                .bind(key)
                .fetch_all(&self.pool)
                .await
                .map_err(db("read setting history"))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn current_settings(&self, scopes: &[String]) -> Result<Vec<SettingVersion>> {
                let mut q = QueryBuilder::<$db>::new(
                    "SELECT * FROM setting_versions s WHERE version = (SELECT MAX(version) FROM setting_versions m
                     WHERE m.scope = s.scope AND m.key = s.key) AND scope IN (",
                );
                let mut list = q.separated(", ");
                for s in scopes {
                    list.push_bind(s.clone());
                }
                q.push(") ORDER BY scope, key");
                let rows = q.build_query_as::<SettingRow>().fetch_all(&self.pool).await.map_err(db("read settings"))?;
                Ok(rows.into_iter().map(Into::into).collect())
            }
        }
    };
}

pub(crate) use impl_identity_stores;
