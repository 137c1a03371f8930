-- Which provider a queued run needs (see the Postgres twin of this file).
-- SQLite keeps the default: every insert names the provider.

ALTER TABLE run_queue ADD COLUMN provider TEXT NOT NULL DEFAULT '';
UPDATE run_queue SET provider = (SELECT provider FROM runs WHERE runs.id = run_queue.run_id);
