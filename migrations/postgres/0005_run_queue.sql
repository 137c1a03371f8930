-- The queue moves out of the ledger.
--
-- A transition used to rewrite its run row twice (claim, completion), and
-- because `status` and `lease_expires_at` were indexed (and named in
-- partial-index predicates), neither rewrite could be a HOT update: each
-- added an entry to every index on `runs`. Now the run row keeps no index
-- on any column the engine changes, so claim, heartbeat and completion
-- rewrite it in place (with room left on each page for it), and the
-- queue's own bookkeeping lives in `run_queue`: a narrow row per active
-- run, inserted with the run, leased by the claim, deleted when the run
-- ends. `runs` stays the record of truth for everything the API shows.

CREATE TABLE run_queue (
    run_id            UUID PRIMARY KEY REFERENCES runs (id),
    -- The engine's first rule, one active run per resource, now holds here:
    -- a row exists exactly while its run is queued or running.
    resource_id       UUID NOT NULL UNIQUE,
    run_after         TIMESTAMPTZ NOT NULL,
    -- NULL while queued; the lease expiry while running (the reaper's key).
    lease_expires_at  TIMESTAMPTZ
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

-- Status filters on history need an index (a filter matching nothing would
-- otherwise walk every run), but an index naming `status` would stop the
-- claim's in-place rewrite. `outcome` is written once, when the run ends,
-- and equals its final status; the claim and heartbeats never touch it.
ALTER TABLE runs ADD COLUMN outcome TEXT;
ALTER TABLE runs DISABLE TRIGGER runs_immutable_update;
UPDATE runs SET outcome = status WHERE status IN ('succeeded', 'failed', 'cancelled');
ALTER TABLE runs ENABLE TRIGGER runs_immutable_update;
ALTER TABLE runs ADD CONSTRAINT runs_outcome_is_the_final_status CHECK (
    (status IN ('queued', 'running') AND outcome IS NULL) OR outcome = status
);
CREATE INDEX runs_outcome ON runs (outcome, id DESC) WHERE outcome IS NOT NULL;
CREATE INDEX runs_action_outcome ON runs (action, outcome, id DESC) WHERE outcome IS NOT NULL;

-- Room on each page for the in-place rewrites. A claim takes runs that
-- were queued together and so share pages; at 70% a page had room for a
-- third of its runs' new versions (85% of claims rewrote in place at 50%,
-- against about 60% at 70%, and a transition cost a quarter less CPU). The
-- price is a ledger heap about twice its packed size.
ALTER TABLE runs SET (fillfactor = 50);
ALTER TABLE resources SET (fillfactor = 50);
