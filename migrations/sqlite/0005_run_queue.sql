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
