-- What the last refresh of a resource found: its drift from the record
-- (status, when, the run, the differences). Written only by refresh runs.
ALTER TABLE resources ADD COLUMN drift JSONB;
