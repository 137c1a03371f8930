-- Environments become a resource kind. Until now an environment was a name
-- a cluster's spec carried and a settings scope; every name in use (by a
-- live cluster, or by a settings scope) becomes an environment, active and
-- unprotected, created by drover, so that clusters and settings keep
-- pointing at something that exists.

INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by, updated_by)
SELECT gen_random_uuid(), 'environment', names.name, 'active', '{"description": "", "protected": false}'::jsonb, 1,
       '{}'::jsonb, now(), now(), 'drover', 'drover'
FROM (
    SELECT spec->>'environment' AS name FROM resources
    WHERE kind = 'cluster' AND deleted_at IS NULL AND spec->>'environment' IS NOT NULL
    UNION
    SELECT substr(scope, length('environment:') + 1) FROM setting_versions WHERE scope LIKE 'environment:%'
) names
WHERE names.name <> ''
  AND NOT EXISTS (
    SELECT 1 FROM resources e WHERE e.kind = 'environment' AND e.name = names.name AND e.deleted_at IS NULL
  );

-- Lists filter by environment (`?environment=`).
CREATE INDEX resources_environment ON resources ((spec->>'environment'), kind, id)
    WHERE deleted_at IS NULL;
