-- Drover core schema (Postgres).

CREATE TABLE resources (
    id          UUID PRIMARY KEY,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    spec        JSONB NOT NULL,
    version     BIGINT NOT NULL DEFAULT 1,
    outputs     JSONB NOT NULL DEFAULT '{}',
    observed    JSONB,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    deleted_at  TIMESTAMPTZ
);

-- Names are unique among live resources of a kind; deleted ones keep theirs
-- so that their runs still read well.
CREATE UNIQUE INDEX resources_kind_name ON resources (kind, name) WHERE deleted_at IS NULL;
CREATE INDEX resources_kind_id ON resources (kind, id) WHERE deleted_at IS NULL;

CREATE TABLE runs (
    id                   UUID PRIMARY KEY,
    resource_id          UUID NOT NULL REFERENCES resources (id),
    kind                 TEXT NOT NULL,
    resource_name        TEXT NOT NULL,
    action               TEXT NOT NULL,
    params               JSONB NOT NULL,
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
    parent_run           UUID REFERENCES runs (id),
    provider             TEXT NOT NULL,
    timeout_secs         BIGINT NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL,
    run_after            TIMESTAMPTZ NOT NULL,
    started_at           TIMESTAMPTZ,
    finished_at          TIMESTAMPTZ,
    worker               TEXT,
    lease_token          UUID,
    lease_expires_at     TIMESTAMPTZ,
    heartbeat_at         TIMESTAMPTZ,
    outputs              JSONB,
    error                JSONB,
    cancel_requested_at  TIMESTAMPTZ,
    cancel_requested_by  TEXT,
    cancel_reason        TEXT
);

-- The engine's first rule: one active run per resource.
CREATE UNIQUE INDEX runs_one_active ON runs (resource_id) WHERE status IN ('queued', 'running');
-- The queue and the reaper read only these small partial indexes.
CREATE INDEX runs_due ON runs (run_after, id) WHERE status = 'queued';
CREATE INDEX runs_leased ON runs (lease_expires_at) WHERE status = 'running';
-- History queries.
CREATE INDEX runs_resource ON runs (resource_id, id DESC);
CREATE INDEX runs_kind_action ON runs (kind, action, id DESC);
CREATE INDEX runs_status ON runs (status, id DESC);
CREATE INDEX runs_parent ON runs (parent_run) WHERE parent_run IS NOT NULL;

-- Completed runs are append-only history.
CREATE FUNCTION drover_runs_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'run % is complete and cannot change', OLD.id USING ERRCODE = 'integrity_constraint_violation';
END
$$;

CREATE TRIGGER runs_immutable_update BEFORE UPDATE ON runs FOR EACH ROW
    WHEN (OLD.status IN ('succeeded', 'failed', 'cancelled')) EXECUTE FUNCTION drover_runs_immutable();
CREATE TRIGGER runs_immutable_delete BEFORE DELETE ON runs FOR EACH ROW
    EXECUTE FUNCTION drover_runs_immutable();

CREATE TABLE run_events (
    seq      BIGSERIAL PRIMARY KEY,
    run_id   UUID NOT NULL REFERENCES runs (id),
    at       TIMESTAMPTZ NOT NULL,
    attempt  INTEGER NOT NULL,
    level    TEXT NOT NULL,
    step     TEXT NOT NULL,
    message  TEXT NOT NULL,
    data     JSONB
);
CREATE INDEX run_events_run ON run_events (run_id, seq);

CREATE TABLE idempotency_keys (
    key              TEXT PRIMARY KEY,
    fingerprint      TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    response_status  INTEGER,
    location         TEXT,
    body             BYTEA,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
