-- Transition history for dashboards.
--
-- Stats never scan `runs`, the engine's hot queue table: every terminal
-- write adds its run to a rollup row (per hour and per day, kind, action,
-- environment, actor and outcome) in the same transaction, with a sparse
-- log-scale histogram of durations for percentiles.

ALTER TABLE runs ADD COLUMN environment TEXT;
CREATE INDEX runs_environment ON runs (environment, id DESC) WHERE environment IS NOT NULL;
CREATE INDEX runs_actor ON runs (actor, id DESC);

CREATE TABLE run_rollups (
    grain        TEXT NOT NULL CHECK (grain IN ('hour', 'day')),
    bucket       TIMESTAMPTZ NOT NULL,
    kind         TEXT NOT NULL,
    action       TEXT NOT NULL,
    environment  TEXT NOT NULL,
    actor        TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    count        BIGINT NOT NULL,
    -- Runs that started, and so have a duration.
    timed        BIGINT NOT NULL,
    sum_ms       BIGINT NOT NULL,
    max_ms       BIGINT NOT NULL,
    -- {"<bucket index>": count}, index = floor(ln(ms) / ln(1.04)).
    hist         JSONB NOT NULL,
    PRIMARY KEY (grain, bucket, kind, action, environment, actor, outcome)
);

-- Filtering by action alone (a common dashboard question) without scanning
-- every kind's history.
CREATE INDEX runs_action_status ON runs (action, status, id DESC);

-- Most stats read only the all-actors rows ('*'). Rollup rows of all actors
-- are interleaved on the heap, so the index carries every column: an
-- index-only scan reads them contiguously once vacuum has marked the pages
-- all-visible (everything but the current hour's and day's rows).
CREATE INDEX run_rollups_actor ON run_rollups (grain, actor, bucket)
    INCLUDE (kind, action, environment, outcome, count, timed, sum_ms, max_ms, hist);
