-- The filters whose values never change after the request ride along with
-- each outcome row (see the Postgres twin of this file for why). A WITHOUT
-- ROWID table keeps every column in its key's B-tree already.

CREATE TABLE run_outcomes_new (
    outcome      TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'cancelled')),
    run_id       BLOB NOT NULL,
    action       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    environment  TEXT,
    actor        TEXT NOT NULL,
    PRIMARY KEY (outcome, run_id)
) WITHOUT ROWID;
INSERT INTO run_outcomes_new (outcome, run_id, action, kind, environment, actor)
    SELECT o.outcome, o.run_id, o.action, r.kind, r.environment, r.actor FROM run_outcomes o JOIN runs r ON r.id = o.run_id;
DROP TABLE run_outcomes;
ALTER TABLE run_outcomes_new RENAME TO run_outcomes;
CREATE INDEX run_outcomes_action ON run_outcomes (action, outcome, run_id);
