-- Finished runs by outcome move to a table of their own, and the store
-- writes a finished run's bookkeeping itself instead of a trigger.
--
-- 0005 indexed `runs.outcome`, so the completion's rewrite of a run changed
-- an indexed column: it could not be a HOT update and added an entry to each
-- of the eight indexes on `runs` (at 200k transitions, the most expensive
-- statement of the engine). Now the status filters of history read
-- `run_outcomes`, a narrow row per finished run written once, when it ends
-- (a finished run cannot change). No index on `runs` covers a column the
-- engine writes: claim, heartbeat and completion all rewrite a run in place
-- when its page has room. `runs.outcome` stays, unindexed, as the run's own
-- record of it.
--
-- The trigger that noted each finished run in `rollup_pending` ran a
-- PL/pgSQL call per run; a batch of completions now writes `rollup_pending`
-- and `run_outcomes` with one statement each, and so does every other way
-- a run ends (cancel while queued, the reaper out of attempts, a claim that
-- found its resource gone). The store's conformance tests check each way.

CREATE TABLE run_outcomes (
    outcome  TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'cancelled')),
    run_id   UUID NOT NULL,
    -- Copied from the run (it never changes), for "failed scale runs".
    action   TEXT NOT NULL,
    PRIMARY KEY (outcome, run_id)
);
CREATE INDEX run_outcomes_action ON run_outcomes (action, outcome, run_id);

INSERT INTO run_outcomes (outcome, run_id, action) SELECT outcome, id, action FROM runs WHERE outcome IS NOT NULL;

DROP INDEX runs_outcome;
DROP INDEX runs_action_outcome;

DROP TRIGGER runs_finished ON runs;
DROP FUNCTION drover_rollup_pending();

-- Lets one statement check what it wrote and undo all of it: a CASE calls
-- this only where a check failed, and the error rolls the statement back.
CREATE FUNCTION drover_fail(message TEXT) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = message, ERRCODE = 'DR001';
END
$$;
