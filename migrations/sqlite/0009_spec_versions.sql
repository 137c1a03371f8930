-- Every spec change is a version (see the Postgres migration).

ALTER TABLE resources ADD COLUMN spec_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE resources ADD COLUMN applied_version INTEGER;
ALTER TABLE resources ADD COLUMN applied_spec TEXT;
ALTER TABLE runs ADD COLUMN spec_version INTEGER;

CREATE TABLE spec_versions (
    resource_id BLOB NOT NULL REFERENCES resources (id),
    version     INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT,
    patch       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (resource_id, version)
);

INSERT INTO spec_versions (resource_id, version, actor, reason, patch, spec, created_at)
SELECT id, 1, updated_by, 'recorded when spec versions began (migration 0009)', spec, spec, updated_at
FROM resources;
UPDATE resources SET applied_version = 1, applied_spec = spec WHERE state <> 'pending';

CREATE TRIGGER spec_versions_no_update BEFORE UPDATE ON spec_versions
BEGIN
    SELECT RAISE(ABORT, 'spec versions are append-only');
END;
CREATE TRIGGER spec_versions_no_delete BEFORE DELETE ON spec_versions
BEGIN
    SELECT RAISE(ABORT, 'spec versions are append-only');
END;
