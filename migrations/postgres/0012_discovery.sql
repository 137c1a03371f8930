-- The discovery registry: one row per healthy service instance, alive
-- until expires_at unless renewed.
CREATE TABLE discovery_entries (
    service_id    UUID NOT NULL,
    instance      TEXT NOT NULL,
    service       TEXT NOT NULL,
    entry         JSONB NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL,
    renewed_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (service_id, instance)
);
CREATE INDEX discovery_entries_expires ON discovery_entries (expires_at);

-- Every entry entering or leaving, with why, under an index from the one
-- counter below, taken in the change's own transaction: the counter's row
-- lock orders registry writers, so indexes commit in order and a watcher
-- that read index N has seen every change up to N.
CREATE TABLE discovery_log (
    idx        BIGINT PRIMARY KEY,
    change     TEXT NOT NULL,
    service_id UUID NOT NULL,
    service    TEXT NOT NULL,
    instance   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    by_whom    TEXT NOT NULL,
    entry      JSONB NOT NULL,
    at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX discovery_log_service ON discovery_log (service, idx);
CREATE INDEX discovery_log_service_id ON discovery_log (service_id, idx);
CREATE INDEX discovery_log_at ON discovery_log (at);

CREATE TABLE discovery_index (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO discovery_index (id, value) VALUES (1, 0);
