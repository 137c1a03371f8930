-- The queue moves out of the ledger (see the Postgres twin of this file for
-- why): a narrow row per active run in `run_queue`, and no index on `runs`
-- over a column the engine changes.

CREATE TABLE run_queue (
    run_id            BLOB PRIMARY KEY REFERENCES runs (id),
    -- One active run per resource: a row exists exactly while its run is
    -- queued or running.
    resource_id       BLOB NOT NULL UNIQUE,
    run_after         INTEGER NOT NULL,
    -- NULL while queued; the lease expiry while running.
    lease_expires_at  INTEGER
);
CREATE INDEX run_queue_due ON run_queue (run_after, run_id) WHERE lease_expires_at IS NULL;
CREATE INDEX run_queue_leased ON run_queue (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

INSERT INTO run_queue (run_id, resource_id, run_after, lease_expires_at)
    SELECT id, resource_id, run_after, CASE WHEN status = 'running' THEN COALESCE(lease_expires_at, run_after) END
    FROM runs WHERE status IN ('queued', 'running');

DROP INDEX runs_one_active;
DROP INDEX runs_due;
DROP INDEX runs_leased;
DROP INDEX runs_status;
DROP INDEX runs_action_status;
-- An action never changes, so its index does not stop the rewrites.
CREATE INDEX runs_action ON runs (action, id DESC);

-- `outcome`: the final status, written once when the run ends, so that
-- status filters on history have an index that the claim never touches.
ALTER TABLE runs ADD COLUMN outcome TEXT CHECK (
    (status IN ('queued', 'running') AND outcome IS NULL) OR outcome = status
);
DROP TRIGGER runs_immutable_update;
UPDATE runs SET outcome = status WHERE status IN ('succeeded', 'failed', 'cancelled');
CREATE TRIGGER runs_immutable_update BEFORE UPDATE ON runs
    WHEN OLD.status IN ('succeeded', 'failed', 'cancelled')
BEGIN
    SELECT RAISE(ABORT, 'run is complete and cannot change');
END;
CREATE INDEX runs_outcome ON runs (outcome, id DESC) WHERE outcome IS NOT NULL;
CREATE INDEX runs_action_outcome ON runs (action, outcome, id DESC) WHERE outcome IS NOT NULL;
