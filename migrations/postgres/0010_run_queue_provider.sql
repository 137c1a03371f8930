-- Which provider a queued run needs, beside it in the queue, so that a
-- replica started with `--providers` claims only the runs it can execute
-- (a `local` run belongs on the machine whose processes it manages).
-- Runs already queued take their run's provider.

ALTER TABLE run_queue ADD COLUMN provider TEXT NOT NULL DEFAULT '';
UPDATE run_queue SET provider = runs.provider FROM runs WHERE runs.id = run_queue.run_id;
ALTER TABLE run_queue ALTER COLUMN provider DROP DEFAULT;
