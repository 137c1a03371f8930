-- The discovery registry (see the Postgres twin of this file).
CREATE TABLE discovery_entries (
    service_id    BLOB NOT NULL,
    instance      TEXT NOT NULL,
    service       TEXT NOT NULL,
    entry         TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    renewed_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    PRIMARY KEY (service_id, instance)
);
CREATE INDEX discovery_entries_expires ON discovery_entries (expires_at);

CREATE TABLE discovery_log (
    idx        INTEGER PRIMARY KEY,
    change     TEXT NOT NULL,
    service_id BLOB NOT NULL,
    service    TEXT NOT NULL,
    instance   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    by_whom    TEXT NOT NULL,
    entry      TEXT NOT NULL,
    at         INTEGER NOT NULL
);
CREATE INDEX discovery_log_service ON discovery_log (service, idx);
CREATE INDEX discovery_log_service_id ON discovery_log (service_id, idx);
CREATE INDEX discovery_log_at ON discovery_log (at);

CREATE TABLE discovery_index (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO discovery_index (id, value) VALUES (1, 0);
