-- Named queries for migrations and maintenance.

-- name: migration_lock
SELECT pg_advisory_xact_lock($1);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS intentd_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version FROM intentd_schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO intentd_schema_migrations (version, name) VALUES ($1, $2);

-- name: migrations_table_exists
SELECT to_regclass('intentd_schema_migrations') IS NOT NULL;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM intentd_schema_migrations;

-- name: enum_states
SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
WHERE t.typname = 'intent_state' ORDER BY e.enumsortorder;

-- name: transitions
SELECT from_state::text, to_state::text FROM intent_transitions;

-- name: ping
SELECT 1;

-- name: intent_counts
-- For the intentd_intents gauge: live intents only, read through the partial
-- index, so the count stays cheap with millions of finished rows (those are
-- counted as they finish, by intentd_end_to_end_latency_seconds).
SELECT state::text, intent_type, count(*) FROM intents
WHERE state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')
GROUP BY 1, 2;
