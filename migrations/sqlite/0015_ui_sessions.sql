-- See the Postgres twin of this file.
CREATE TABLE ui_sessions (
    hash          TEXT PRIMARY KEY,
    token_id      BLOB NOT NULL REFERENCES api_tokens (id),
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    ended_at      INTEGER
);
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
