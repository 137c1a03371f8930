//! Router configuration versions ([`RouterConfigStore`]).

use crate::sql::from_row;
use drover_domain::model::Time;
use drover_domain::routing::{Hold, NewRouterConfig, Outcome, RouteTable, RouterConfig, RouterConfigStore};
use drover_domain::{Error, Result};
use sqlx::types::Json;
use uuid::Uuid;

use super::SqlStore;
use crate::sql::{Backend, Sql};
use crate::time::Ts;

struct Row {
    router_id: Uuid,
    version: i64,
    outcome: String,
    by_whom: String,
    config: String,
    route_table: Json<RouteTable>,
    diff: String,
    reason: Option<String>,
    holds: Json<Vec<Hold>>,
    at: Ts,
}

from_row!(Row { router_id, version, outcome, by_whom, config, route_table, diff, reason, holds, at });

impl TryFrom<Row> for RouterConfig {
    type Error = Error;
    fn try_from(r: Row) -> Result<RouterConfig> {
        let outcome = Outcome::parse(&r.outcome)
            .ok_or_else(|| Error::Internal(format!("router config outcome {:?} is unknown", r.outcome)))?;
        Ok(RouterConfig {
            router_id: r.router_id,
            version: r.version,
            outcome,
            by: r.by_whom,
            config: r.config,
            table: r.route_table.0,
            diff: r.diff,
            reason: r.reason,
            holds: r.holds.0,
            at: r.at.0,
        })
    }
}

#[async_trait::async_trait]
impl<B: Backend> RouterConfigStore for SqlStore<B> {
    async fn insert_router_config(&self, c: &NewRouterConfig) -> Result<RouterConfig> {
        let table = serde_json::to_value(&c.table).map_err(|e| Error::Internal(e.to_string()))?;
        let holds = serde_json::to_value(&c.holds).map_err(|e| Error::Internal(e.to_string()))?;
        // One writer per router (the keeper's lock and lease): the next
        // number is read in the insert itself, and a race loses on the key.
        let sql = Sql::new(
            "INSERT INTO router_configs (router_id, version, outcome, by_whom, config, route_table, diff, reason,
                holds, at)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3, $4, $5, $6, $7, $8, $9
             FROM router_configs WHERE router_id = $1
             RETURNING *",
        )
        .bind(c.router_id)
        .bind(c.outcome.as_str())
        .bind(c.by.as_str())
        .bind(c.config.as_str())
        .bind(&table)
        .bind(c.diff.as_str())
        .bind(c.reason.as_deref())
        .bind(&holds)
        .bind(Ts(c.at));
        self.fetch_one::<Row>("record a router configuration", sql).await?.try_into()
    }

    async fn list_router_configs(&self, router: Uuid, before: Option<i64>, limit: u32) -> Result<Vec<RouterConfig>> {
        let mut sql = Sql::new("SELECT * FROM router_configs WHERE router_id = ");
        sql.push_bind(router);
        if let Some(b) = before {
            sql.push(" AND version < ").push_bind(b);
        }
        sql.push(" ORDER BY version DESC LIMIT ").push_bind(i64::from(limit));
        let rows = self.fetch_all::<Row>("list router configurations", sql).await?;
        rows.into_iter().map(RouterConfig::try_from).collect()
    }

    async fn router_config(&self, router: Uuid, version: i64) -> Result<Option<RouterConfig>> {
        let sql =
            Sql::new("SELECT * FROM router_configs WHERE router_id = $1 AND version = $2").bind(router).bind(version);
        self.fetch_optional::<Row>("read a router configuration", sql).await?.map(RouterConfig::try_from).transpose()
    }

    async fn last_router_configs(&self, router: Uuid) -> Result<(Option<RouterConfig>, Option<RouterConfig>)> {
        let last =
            Sql::new("SELECT * FROM router_configs WHERE router_id = $1 ORDER BY version DESC LIMIT 1").bind(router);
        let last = self.fetch_optional::<Row>("read the last router configuration", last).await?;
        let last = last.map(RouterConfig::try_from).transpose()?;
        if last.as_ref().is_some_and(|l| l.outcome == Outcome::Applied) {
            return Ok((last.clone(), last));
        }
        let applied = Sql::new(
            "SELECT * FROM router_configs WHERE router_id = $1 AND outcome = 'applied' ORDER BY version DESC LIMIT 1",
        )
        .bind(router);
        let applied = self.fetch_optional::<Row>("read the serving router configuration", applied).await?;
        Ok((last, applied.map(RouterConfig::try_from).transpose()?))
    }

    async fn prune_router_configs(&self, before: Time) -> Result<u64> {
        let sql = Sql::new(
            "DELETE FROM router_configs WHERE at < $1 AND version < (
                SELECT MAX(s.version) FROM router_configs s
                WHERE s.router_id = router_configs.router_id AND s.outcome = 'applied')",
        )
        .bind(Ts(before));
        self.execute("forget old router configurations", sql).await
    }
}
