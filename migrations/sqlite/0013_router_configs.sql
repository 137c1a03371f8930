-- Router configuration versions (see the Postgres twin of this file).
CREATE TABLE router_configs (
    router_id   BLOB NOT NULL REFERENCES resources (id),
    version     INTEGER NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('applied', 'invalid', 'held')),
    by_whom     TEXT NOT NULL,
    config      TEXT NOT NULL,
    route_table TEXT NOT NULL,
    diff        TEXT NOT NULL,
    reason      TEXT,
    holds       TEXT NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (router_id, version)
);
CREATE INDEX router_configs_applied ON router_configs (router_id, version) WHERE outcome = 'applied';
