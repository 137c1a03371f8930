-- Who made each change, users' tokens, versioned settings.

ALTER TABLE resources ADD COLUMN created_by TEXT NOT NULL DEFAULT 'drover';
ALTER TABLE resources ADD COLUMN updated_by TEXT NOT NULL DEFAULT 'drover';

-- The settings versions a run was asked with: [{scope, key, version}].
ALTER TABLE runs ADD COLUMN settings JSONB NOT NULL DEFAULT '[]';

CREATE TABLE api_tokens (
    id            UUID PRIMARY KEY,
    user_id       UUID NOT NULL REFERENCES resources (id),
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    -- SHA-256 of the secret; the secret itself is never stored.
    hash          TEXT NOT NULL UNIQUE,
    expires_at    TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL,
    created_by    TEXT NOT NULL,
    revoked_at    TIMESTAMPTZ,
    revoked_by    TEXT,
    last_used_at  TIMESTAMPTZ
);
CREATE INDEX api_tokens_user ON api_tokens (user_id, id);

CREATE TABLE setting_versions (
    id          UUID PRIMARY KEY,
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     BIGINT NOT NULL,
    value       TEXT,
    sealed      BYTEA,
    secret      BOOLEAN NOT NULL,
    deleted     BOOLEAN NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (scope, key, version),
    -- A secret's value is only ever stored sealed.
    CHECK (NOT secret OR value IS NULL)
);

CREATE FUNCTION drover_setting_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'setting versions are immutable' USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE TRIGGER setting_versions_immutable BEFORE UPDATE OR DELETE ON setting_versions
    FOR EACH ROW EXECUTE FUNCTION drover_setting_versions_immutable();
