-- Tenants, API keys, quotas and audit.

CREATE TABLE tenants (
    name                   text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- Quotas; NULL means unlimited.
    max_live_intents       integer CHECK (max_live_intents > 0),
    max_sends_per_second   double precision CHECK (max_sends_per_second > 0),
    max_payload_bytes      integer CHECK (max_payload_bytes > 0),
    create_time            timestamptz NOT NULL DEFAULT now(),
    update_time            timestamptz NOT NULL DEFAULT now()
);

INSERT INTO tenants (name) VALUES ('default');

-- A key is shown once: intentd_<id>_<secret>. Only the SHA-256 of the
-- secret is kept; the id is the lookup prefix.
CREATE TABLE api_keys (
    id                 text PRIMARY KEY,
    tenant             text NOT NULL REFERENCES tenants (name),
    name               text NOT NULL,
    secret_sha256      bytea NOT NULL,
    roles              text[] NOT NULL CHECK (roles <@ ARRAY['client', 'agent', 'admin']::text[] AND cardinality(roles) > 0),
    -- For the agent role: the agent addresses a sidecar with this key may serve
    -- (a trailing * matches anything after it).
    address_patterns   text[] NOT NULL DEFAULT '{}',
    max_sends_per_second double precision CHECK (max_sends_per_second > 0),
    expire_time        timestamptz,
    revoke_time        timestamptz,
    last_used_time     timestamptz,
    create_time        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, name)
);

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    tenant    text NOT NULL,
    time      timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    target    text NOT NULL,
    detail    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant, time DESC);

-- Who caused an event, when a person or key did (cancel, retry).
ALTER TABLE intent_events ADD COLUMN actor text;

-- Quota checks count live intents per tenant without touching terminal rows.
CREATE INDEX intents_live_by_tenant ON intents (tenant)
    WHERE state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING');

ALTER TABLE intents ADD CONSTRAINT intents_tenant_known FOREIGN KEY (tenant) REFERENCES tenants (name) NOT VALID;
ALTER TABLE intent_types ADD CONSTRAINT intent_types_tenant_known FOREIGN KEY (tenant) REFERENCES tenants (name) NOT VALID;
