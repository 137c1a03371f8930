-- See the Postgres twin of this file.
CREATE INDEX router_configs_at ON router_configs (at);
