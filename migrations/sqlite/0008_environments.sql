-- Environments become a resource kind (see the Postgres migration): every
-- environment name in use, by a live cluster or a settings scope, becomes
-- an active, unprotected environment created by drover.

INSERT INTO resources (id, kind, name, state, spec, version, outputs, created_at, updated_at, created_by, updated_by)
SELECT randomblob(16), 'environment', names.name, 'active', '{"description":"","protected":false}', 1, '{}',
       CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER),
       CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER), 'drover', 'drover'
FROM (
    SELECT spec ->> 'environment' AS name FROM resources
    WHERE kind = 'cluster' AND deleted_at IS NULL AND spec ->> 'environment' IS NOT NULL
    UNION
    SELECT substr(scope, length('environment:') + 1) FROM setting_versions WHERE scope LIKE 'environment:%'
) names
WHERE names.name <> ''
  AND NOT EXISTS (
    SELECT 1 FROM resources e WHERE e.kind = 'environment' AND e.name = names.name AND e.deleted_at IS NULL
  );

CREATE INDEX resources_environment ON resources ((spec ->> 'environment'), kind, id) WHERE deleted_at IS NULL;
