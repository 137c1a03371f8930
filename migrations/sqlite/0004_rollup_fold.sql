-- Rollups folded in batches, with outcomes as columns and a weekly grain
-- (see the Postgres migration).

DROP TABLE run_rollups;

CREATE TABLE run_rollups (
    grain            TEXT NOT NULL CHECK (grain IN ('hour', 'day', 'week')),
    bucket           INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    action           TEXT NOT NULL,
    environment      TEXT NOT NULL,
    actor            TEXT NOT NULL,
    succeeded        INTEGER NOT NULL,
    succeeded_timed  INTEGER NOT NULL,
    succeeded_ms     INTEGER NOT NULL,
    failed           INTEGER NOT NULL,
    failed_timed     INTEGER NOT NULL,
    failed_ms        INTEGER NOT NULL,
    cancelled        INTEGER NOT NULL,
    cancelled_timed  INTEGER NOT NULL,
    cancelled_ms     INTEGER NOT NULL,
    max_ms           INTEGER NOT NULL,
    hist             BLOB NOT NULL,
    PRIMARY KEY (grain, bucket, kind, action, environment, actor)
);

CREATE INDEX run_rollups_actor ON run_rollups (grain, actor, bucket);

CREATE TABLE rollup_pending (
    run_id BLOB PRIMARY KEY
);

CREATE TRIGGER runs_finished_insert AFTER INSERT ON runs
    WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
BEGIN
    INSERT INTO rollup_pending (run_id) VALUES (NEW.id);
END;
CREATE TRIGGER runs_finished_update AFTER UPDATE OF status ON runs
    WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
BEGIN
    INSERT INTO rollup_pending (run_id) VALUES (NEW.id);
END;

INSERT INTO rollup_pending (run_id) SELECT id FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled');
