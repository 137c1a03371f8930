-- See the Postgres twin of this file. SQLite rewrites a row with its index
-- entries whatever the indexes are, so the queue's partial indexes stay:
-- the claim and the reaper each read one of them.
SELECT 1;
