-- The claim and the heartbeat rewrite a queue row in place.
--
-- Leasing a run changed `lease_expires_at`, which both partial indexes of
-- the queue named (in the key of one, in the predicate of each): Postgres
-- could not make the claim's rewrite a HOT update, so every claimed run
-- added a new entry to three of the queue's four indexes (the unique one
-- checked again). That was the most expensive step of the claim, about a
-- third of its time in Postgres (#14 item 12; BENCHMARKS.md run 12).
--
-- Now no index of `run_queue` names `lease_expires_at`:
--   * the claim's order is one index of every queue row by due time; a
--     claim walks past the leased rows at its front (at most the runs in
--     flight, and the claim cursor starts past most of them);
--   * the reaper reads the queue (active runs only) for lapsed leases
--     instead of an index of them, once every few seconds;
--   * pages keep half their room free, so that the new version of a row
--     fits beside the old one.
DROP INDEX run_queue_leased;
DROP INDEX run_queue_due;
CREATE INDEX run_queue_due ON run_queue (run_after, run_id);
ALTER TABLE run_queue SET (fillfactor = 50);
