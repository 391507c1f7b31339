-- A tenant's own budget of database writes per second per replica (acks and
-- fenced writes of all its sidecar streams together). NULL: the server's
-- INTENTD_TENANT_WRITES_PER_SECOND. Lets an operator hold one flooding tenant
-- down without holding every tenant down with it.
ALTER TABLE tenants ADD COLUMN max_writes_per_second double precision
    CHECK (max_writes_per_second > 0 AND max_writes_per_second <= 10000000);
