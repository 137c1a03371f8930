-- Who observes a resource (see the Postgres twin of this file).
CREATE TABLE observer_leases (
    resource_id BLOB PRIMARY KEY,
    observer    TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
