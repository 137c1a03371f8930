-- Router configuration versions are forgotten after 30 days (the serving
-- one is kept): the prune reads them by time.
CREATE INDEX router_configs_at ON router_configs (at);
