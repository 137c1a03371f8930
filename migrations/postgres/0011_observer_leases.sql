-- Who observes a resource: one replica at a time, under a lease it renews
-- each round, so that N replicas do not probe every instance N times. A
-- replica that stops renewing (crashed, stopped, partitioned) loses its
-- resources to the next replica that looks once its leases lapse.
CREATE TABLE observer_leases (
    resource_id UUID PRIMARY KEY,
    observer    TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
