-- Rollups folded in batches, with outcomes as columns and a weekly grain.
--
-- A finished run no longer updates its rollup rows in its completing
-- transaction (every completion of one kind and action in the same hour
-- queued on the same row locks). A trigger notes it in `rollup_pending`
-- instead; a folder drains that table in batches, adding each batch to the
-- rollups in one transaction with the deletion of its pending rows, so every
-- run is counted exactly once. The stats endpoint folds what is pending
-- before it reads.
--
-- The rollups are derived data: rebuilt here by marking every finished run
-- pending.

DROP TABLE run_rollups;

CREATE TABLE run_rollups (
    grain            TEXT NOT NULL CHECK (grain IN ('hour', 'day', 'week')),
    bucket           TIMESTAMPTZ NOT NULL,
    kind             TEXT NOT NULL,
    action           TEXT NOT NULL,
    environment      TEXT NOT NULL,
    actor            TEXT NOT NULL,
    succeeded        BIGINT NOT NULL,
    succeeded_timed  BIGINT NOT NULL,
    succeeded_ms     BIGINT NOT NULL,
    failed           BIGINT NOT NULL,
    failed_timed     BIGINT NOT NULL,
    failed_ms        BIGINT NOT NULL,
    cancelled        BIGINT NOT NULL,
    cancelled_timed  BIGINT NOT NULL,
    cancelled_ms     BIGINT NOT NULL,
    max_ms           BIGINT NOT NULL,
    -- Sparse log-scale histogram of every timed run's duration, encoded by
    -- drover_domain::stats::Hist: (index gap, count) varint pairs.
    hist             BYTEA NOT NULL,
    PRIMARY KEY (grain, bucket, kind, action, environment, actor)
);

-- Most stats read only the all-actors rows ('*'), interleaved on the heap
-- with every actor's: the index carries every column, for index-only scans
-- once vacuum has marked the pages all-visible.
CREATE INDEX run_rollups_actor ON run_rollups (grain, actor, bucket)
    INCLUDE (kind, action, environment, succeeded, succeeded_timed, succeeded_ms, failed, failed_timed, failed_ms,
        cancelled, cancelled_timed, cancelled_ms, max_ms, hist);

CREATE TABLE rollup_pending (
    run_id UUID PRIMARY KEY
);

CREATE FUNCTION drover_rollup_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rollup_pending (run_id) VALUES (NEW.id);
    RETURN NULL;
END
$$;

-- A finished run cannot change again (runs_immutable_update), so reaching a
-- final status happens once per run.
CREATE TRIGGER runs_finished AFTER INSERT OR UPDATE OF status ON runs FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled')) EXECUTE FUNCTION drover_rollup_pending();

INSERT INTO rollup_pending (run_id) SELECT id FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled');
