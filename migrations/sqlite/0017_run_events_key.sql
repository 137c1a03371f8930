-- See the Postgres twin of this file. Here `seq` is the table's rowid, which
-- costs no index of its own, and `run_events_run (run_id, seq)` stays: there
-- is nothing to change.
SELECT 1;
