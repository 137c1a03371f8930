-- Every configuration a router's load balancer was given: applied (and
-- serving until the next), refused by its validation (invalid), or a
-- render held back from emptying a backend (held). Versions count from 1
-- per router; they outlive a deleted router, like its runs.
CREATE TABLE router_configs (
    router_id UUID NOT NULL REFERENCES resources (id),
    version   BIGINT NOT NULL,
    outcome   TEXT NOT NULL CHECK (outcome IN ('applied', 'invalid', 'held')),
    by_whom   TEXT NOT NULL,
    config    TEXT NOT NULL,
    route_table JSONB NOT NULL,
    diff      TEXT NOT NULL,
    reason    TEXT,
    holds     JSONB NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (router_id, version)
);
-- The newest applied version of a router.
CREATE INDEX router_configs_applied ON router_configs (router_id, version) WHERE outcome = 'applied';
