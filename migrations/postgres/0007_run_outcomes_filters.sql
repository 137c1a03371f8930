-- A status filter combined with another filter that matches few finished
-- runs ("my failed runs": actor and status) walked every run of that
-- outcome through `runs`, a row fetch each: 274 ms at 1M runs when nothing
-- matched. The filters whose values never change after the request ride
-- along in the outcome index now (INCLUDE), so such a list reads the index
-- alone, without another index to write per run.

ALTER TABLE run_outcomes ADD COLUMN kind TEXT, ADD COLUMN environment TEXT, ADD COLUMN actor TEXT;
UPDATE run_outcomes o SET kind = r.kind, environment = r.environment, actor = r.actor FROM runs r WHERE r.id = o.run_id;
ALTER TABLE run_outcomes ALTER COLUMN kind SET NOT NULL, ALTER COLUMN actor SET NOT NULL;
ALTER TABLE run_outcomes DROP CONSTRAINT run_outcomes_pkey;
ALTER TABLE run_outcomes ADD PRIMARY KEY (outcome, run_id) INCLUDE (action, kind, environment, actor);
