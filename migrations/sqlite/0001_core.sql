-- Drover core schema (SQLite). Same shape as Postgres; times are integer
-- microseconds since the epoch so that they compare as numbers, ids are
-- 16-byte blobs, JSON is text.

CREATE TABLE resources (
    id          BLOB PRIMARY KEY,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1,
    outputs     TEXT NOT NULL DEFAULT '{}',
    observed    TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deleted_at  INTEGER
);

CREATE UNIQUE INDEX resources_kind_name ON resources (kind, name) WHERE deleted_at IS NULL;
CREATE INDEX resources_kind_id ON resources (kind, id) WHERE deleted_at IS NULL;

CREATE TABLE runs (
    id                   BLOB PRIMARY KEY,
    resource_id          BLOB NOT NULL REFERENCES resources (id),
    kind                 TEXT NOT NULL,
    resource_name        TEXT NOT NULL,
    action               TEXT NOT NULL,
    params               TEXT NOT NULL,
    from_state           TEXT NOT NULL,
    working_state        TEXT NOT NULL,
    ok_state             TEXT NOT NULL,
    err_state            TEXT NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt              INTEGER NOT NULL DEFAULT 0,
    max_attempts         INTEGER NOT NULL,
    actor                TEXT NOT NULL,
    reason               TEXT,
    idempotency_key      TEXT,
    parent_run           BLOB REFERENCES runs (id),
    provider             TEXT NOT NULL,
    timeout_secs         INTEGER NOT NULL,
    created_at           INTEGER NOT NULL,
    run_after            INTEGER NOT NULL,
    started_at           INTEGER,
    finished_at          INTEGER,
    worker               TEXT,
    lease_token          BLOB,
    lease_expires_at     INTEGER,
    heartbeat_at         INTEGER,
    outputs              TEXT,
    error                TEXT,
    cancel_requested_at  INTEGER,
    cancel_requested_by  TEXT,
    cancel_reason        TEXT
);

CREATE UNIQUE INDEX runs_one_active ON runs (resource_id) WHERE status IN ('queued', 'running');
CREATE INDEX runs_due ON runs (run_after, id) WHERE status = 'queued';
CREATE INDEX runs_leased ON runs (lease_expires_at) WHERE status = 'running';
CREATE INDEX runs_resource ON runs (resource_id, id DESC);
CREATE INDEX runs_kind_action ON runs (kind, action, id DESC);
CREATE INDEX runs_status ON runs (status, id DESC);
CREATE INDEX runs_parent ON runs (parent_run) WHERE parent_run IS NOT NULL;

CREATE TRIGGER runs_immutable_update BEFORE UPDATE ON runs
    WHEN OLD.status IN ('succeeded', 'failed', 'cancelled')
BEGIN
    SELECT RAISE(ABORT, 'run is complete and cannot change');
END;
CREATE TRIGGER runs_immutable_delete BEFORE DELETE ON runs
BEGIN
    SELECT RAISE(ABORT, 'runs cannot be deleted');
END;

CREATE TABLE run_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id   BLOB NOT NULL REFERENCES runs (id),
    at       INTEGER NOT NULL,
    attempt  INTEGER NOT NULL,
    level    TEXT NOT NULL,
    step     TEXT NOT NULL,
    message  TEXT NOT NULL,
    data     TEXT
);
CREATE INDEX run_events_run ON run_events (run_id, seq);

CREATE TABLE idempotency_keys (
    key              TEXT PRIMARY KEY,
    fingerprint      TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    response_status  INTEGER,
    location         TEXT,
    body             BLOB,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
