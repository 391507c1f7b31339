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

-- name: can_migrate
-- Whether this session may run migrations: it can create tables in its
-- schema and, once intentd's tables exist, owns them (ALTER and DROP need
-- the owner). An application role granted only DML answers false.
SELECT has_schema_privilege(current_schema(), 'CREATE')
   AND (to_regclass('intents') IS NULL
        OR pg_has_role((SELECT relowner FROM pg_class WHERE oid = to_regclass('intents')), 'USAGE'));

-- name: missing_table_privileges
-- $1 table names, $2 privileges each needs (parallel arrays): the pairs this
-- session lacks.
SELECT t.name, t.privilege FROM unnest($1::text[], $2::text[]) AS t (name, privilege)
WHERE to_regclass(t.name) IS NULL OR NOT has_table_privilege(to_regclass(t.name), t.privilege);

-- name: owned_sequences
-- The sequences behind the serial columns of these tables.
SELECT DISTINCT quote_ident(n.nspname) || '.' || quote_ident(s.relname)
FROM pg_class s
JOIN pg_namespace n ON n.oid = s.relnamespace
JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
WHERE s.relkind = 'S' AND d.refobjid = ANY (SELECT to_regclass(x) FROM unnest($1::text[]) AS x);

-- name: quote_ident
SELECT quote_ident($1);

-- name: current_schema
SELECT current_schema();

-- name: current_user
SELECT current_user::text;
