-- Every spec change is a version. `spec_versions` keeps each one (who,
-- when, why, the merge patch and the spec it produced), append-only;
-- `resources.spec_version` is the newest. `applied_spec` is the spec as it
-- runs (set by the successful run that applied it, or by the write itself
-- for kinds whose spec takes effect when written) and `applied_version` the
-- version it last equalled; `runs.spec_version` is the version a run ran
-- against.

ALTER TABLE resources ADD COLUMN spec_version BIGINT NOT NULL DEFAULT 1;
ALTER TABLE resources ADD COLUMN applied_version BIGINT;
ALTER TABLE resources ADD COLUMN applied_spec JSONB;
ALTER TABLE runs ADD COLUMN spec_version BIGINT;

CREATE TABLE spec_versions (
    resource_id UUID NOT NULL REFERENCES resources (id),
    version     BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT,
    patch       JSONB NOT NULL,
    spec        JSONB NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (resource_id, version)
);

-- What an upgrade knows: the spec each resource has now is its version 1,
-- and a resource that has left its initial state runs it.
INSERT INTO spec_versions (resource_id, version, actor, reason, patch, spec, created_at)
SELECT id, 1, updated_by, 'recorded when spec versions began (migration 0009)', spec, spec, updated_at
FROM resources;
UPDATE resources SET applied_version = 1, applied_spec = spec WHERE state <> 'pending';

CREATE FUNCTION drover_spec_versions_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'spec versions are append-only';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER spec_versions_append_only BEFORE UPDATE OR DELETE ON spec_versions
    FOR EACH ROW EXECUTE FUNCTION drover_spec_versions_append_only();
