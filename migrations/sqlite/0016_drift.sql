-- See the Postgres twin of this file.
ALTER TABLE resources ADD COLUMN drift TEXT;
