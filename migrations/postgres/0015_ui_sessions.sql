-- Dashboard sessions: a browser signs in with an API token and gets a
-- session cookie; only the cookie secret's SHA-256 is stored. A session
-- acts as its token: revoking the token, or disabling its user, ends it.
CREATE TABLE ui_sessions (
    hash          TEXT PRIMARY KEY,
    token_id      UUID NOT NULL REFERENCES api_tokens (id),
    created_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    last_seen_at  TIMESTAMPTZ NOT NULL,
    ended_at      TIMESTAMPTZ
);
-- Sweeping ended and expired sessions.
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
