-- Who made each change, users' tokens, versioned settings.

ALTER TABLE resources ADD COLUMN created_by TEXT NOT NULL DEFAULT 'drover';
ALTER TABLE resources ADD COLUMN updated_by TEXT NOT NULL DEFAULT 'drover';

ALTER TABLE runs ADD COLUMN settings TEXT NOT NULL DEFAULT '[]';

CREATE TABLE api_tokens (
    id            BLOB PRIMARY KEY,
    user_id       BLOB NOT NULL REFERENCES resources (id),
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    hash          TEXT NOT NULL UNIQUE,
    expires_at    INTEGER,
    created_at    INTEGER NOT NULL,
    created_by    TEXT NOT NULL,
    revoked_at    INTEGER,
    revoked_by    TEXT,
    last_used_at  INTEGER
);
CREATE INDEX api_tokens_user ON api_tokens (user_id, id);

CREATE TABLE setting_versions (
    id          BLOB PRIMARY KEY,
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     INTEGER NOT NULL,
    value       TEXT,
    sealed      BLOB,
    secret      BOOLEAN NOT NULL,
    deleted     BOOLEAN NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT,
    created_at  INTEGER NOT NULL,
    UNIQUE (scope, key, version),
    CHECK (NOT secret OR value IS NULL)
);

CREATE TRIGGER setting_versions_immutable_update BEFORE UPDATE ON setting_versions
BEGIN
    SELECT RAISE(ABORT, 'setting versions are immutable');
END;
CREATE TRIGGER setting_versions_immutable_delete BEFORE DELETE ON setting_versions
BEGIN
    SELECT RAISE(ABORT, 'setting versions are immutable');
END;
