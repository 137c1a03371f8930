-- See the Postgres twin of this file. SQLite keeps the foreign key: its
-- check is one lookup in the rowid table, and dropping it would mean
-- copying the whole events table into a new one. The conformance suite runs
-- the store's every way of writing an event on this backend, with the key
-- checked, which catches an event written for a run that does not exist.
SELECT 1;
