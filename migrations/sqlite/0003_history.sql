-- Transition history for dashboards (see the Postgres migration).

ALTER TABLE runs ADD COLUMN environment TEXT;
CREATE INDEX runs_environment ON runs (environment, id DESC) WHERE environment IS NOT NULL;
CREATE INDEX runs_actor ON runs (actor, id DESC);

CREATE TABLE run_rollups (
    grain        TEXT NOT NULL CHECK (grain IN ('hour', 'day')),
    bucket       INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    action       TEXT NOT NULL,
    environment  TEXT NOT NULL,
    actor        TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    count        INTEGER NOT NULL,
    timed        INTEGER NOT NULL,
    sum_ms       INTEGER NOT NULL,
    max_ms       INTEGER NOT NULL,
    hist         TEXT NOT NULL,
    PRIMARY KEY (grain, bucket, kind, action, environment, actor, outcome)
);

CREATE INDEX runs_action_status ON runs (action, status, id DESC);

CREATE INDEX run_rollups_actor ON run_rollups (grain, actor, bucket);
