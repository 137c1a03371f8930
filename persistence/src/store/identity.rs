//! API tokens ([`TokenStore`]).

use drover_domain::model::*;
use drover_domain::ports::TokenStore;
use drover_domain::Result;
use uuid::Uuid;

use super::SqlStore;
use crate::rows::{SessionRow, TokenRow};
use crate::sql::{Backend, Sql};
use crate::time::Ts;

#[async_trait::async_trait]
impl<B: Backend> TokenStore for SqlStore<B> {
    async fn insert_token(&self, t: &NewToken) -> Result<Token> {
        let sql = Sql::new(
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
        .bind(&t.created_by);
        let row = self.fetch_one::<TokenRow>("create token", sql).await?;
        Ok(row.into())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        let sql = Sql::new("SELECT * FROM api_tokens WHERE hash = $1").bind(hash);
        let row = self.fetch_optional::<TokenRow>("look up token", sql).await?;
        Ok(row.map(Into::into))
    }

    async fn list_tokens(&self, user: Uuid) -> Result<Vec<Token>> {
        let sql = Sql::new("SELECT * FROM api_tokens WHERE user_id = $1 ORDER BY id").bind(user);
        let rows = self.fetch_all::<TokenRow>("list tokens", sql).await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_token(&self, user: Uuid, id: Uuid, actor: &str, now: Time) -> Result<Option<Token>> {
        // Revoking twice keeps the first revocation on record.
        let sql = Sql::new(
            "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $3), revoked_by = COALESCE(revoked_by, $4)
             WHERE id = $1 AND user_id = $2 RETURNING *",
        )
        .bind(id)
        .bind(user)
        .bind(Ts(now))
        .bind(actor);
        let row = self.fetch_optional::<TokenRow>("revoke token", sql).await?;
        Ok(row.map(Into::into))
    }

    async fn touch_token(&self, id: Uuid, now: Time) -> Result<()> {
        let sql = Sql::new("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1").bind(id).bind(Ts(now));
        self.execute("record token use", sql).await?;
        Ok(())
    }

    async fn token_by_id(&self, id: Uuid) -> Result<Option<Token>> {
        let sql = Sql::new("SELECT * FROM api_tokens WHERE id = $1").bind(id);
        let row = self.fetch_optional::<TokenRow>("look up token", sql).await?;
        Ok(row.map(Into::into))
    }

    async fn insert_session(&self, s: &Session) -> Result<()> {
        let sql = Sql::new(
            "INSERT INTO ui_sessions (hash, token_id, created_at, expires_at, last_seen_at, ended_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&s.hash)
        .bind(s.token_id)
        .bind(Ts(s.created_at))
        .bind(Ts(s.expires_at))
        .bind(Ts(s.last_seen_at))
        .bind(s.ended_at.map(Ts));
        self.execute("create session", sql).await?;
        Ok(())
    }

    async fn session_by_hash(&self, hash: &str) -> Result<Option<Session>> {
        let sql = Sql::new("SELECT * FROM ui_sessions WHERE hash = $1").bind(hash);
        let row = self.fetch_optional::<SessionRow>("look up session", sql).await?;
        Ok(row.map(Into::into))
    }

    async fn end_session(&self, hash: &str, now: Time) -> Result<()> {
        let sql = Sql::new("UPDATE ui_sessions SET ended_at = COALESCE(ended_at, $2) WHERE hash = $1")
            .bind(hash)
            .bind(Ts(now));
        self.execute("end session", sql).await?;
        Ok(())
    }

    async fn touch_session(&self, hash: &str, now: Time) -> Result<()> {
        let sql = Sql::new("UPDATE ui_sessions SET last_seen_at = $2 WHERE hash = $1").bind(hash).bind(Ts(now));
        self.execute("record session use", sql).await?;
        Ok(())
    }

    async fn sweep_sessions(&self, before: Time) -> Result<u64> {
        let sql = Sql::new("DELETE FROM ui_sessions WHERE expires_at < $1 OR ended_at < $1").bind(Ts(before));
        self.execute("sweep sessions", sql).await
    }
}
