-- Finished runs by outcome move to a table of their own, and the store
-- writes a finished run's bookkeeping itself instead of a trigger (see the
-- Postgres twin of this file for why).

CREATE TABLE run_outcomes (
    outcome  TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'cancelled')),
    run_id   BLOB NOT NULL,
    action   TEXT NOT NULL,
    PRIMARY KEY (outcome, run_id)
) WITHOUT ROWID;
CREATE INDEX run_outcomes_action ON run_outcomes (action, outcome, run_id);

INSERT INTO run_outcomes (outcome, run_id, action) SELECT outcome, id, action FROM runs WHERE outcome IS NOT NULL;

DROP INDEX runs_outcome;
DROP INDEX runs_action_outcome;

DROP TRIGGER runs_finished_insert;
DROP TRIGGER runs_finished_update;
