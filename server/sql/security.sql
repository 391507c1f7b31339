-- Named queries for tenants, API keys, quotas and audit.

-- name: put_tenant
-- $1 name, $2 max live intents, $3 max sends/s, $4 max payload bytes,
-- $5 max writes/s (each NULL: unlimited, or the server's default)
INSERT INTO tenants (name, max_live_intents, max_sends_per_second, max_payload_bytes, max_writes_per_second)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO UPDATE
SET max_live_intents = EXCLUDED.max_live_intents, max_sends_per_second = EXCLUDED.max_sends_per_second,
    max_payload_bytes = EXCLUDED.max_payload_bytes, max_writes_per_second = EXCLUDED.max_writes_per_second,
    update_time = now()
RETURNING *;

-- name: get_tenant
SELECT * FROM tenants WHERE name = $1;

-- name: list_tenants
SELECT * FROM tenants ORDER BY name;

-- name: count_live_intents
-- Active and parked rows through an index each (migration 0010).
SELECT (SELECT count(*) FROM intents WHERE tenant = $1 AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS'))
     + (SELECT count(*) FROM intents WHERE tenant = $1 AND state = 'WAITING') AS count;

-- name: create_api_key
-- $1 id, $2 tenant, $3 name, $4 secret sha256, $5 roles, $6 address patterns,
-- $7 expire time, $8 max sends/s, $9 send patterns (child intents' addresses)
INSERT INTO api_keys (id, tenant, name, secret_sha256, roles, address_patterns, expire_time, max_sends_per_second,
                      send_patterns)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id, tenant, name, roles, address_patterns, expire_time, revoke_time, last_used_time, create_time,
          max_sends_per_second, send_patterns;

-- name: find_api_key
SELECT k.*, coalesce($2::timestamptz, now()) AS checked_at FROM api_keys k WHERE k.id = $1;

-- name: list_api_keys
-- $1 tenant (NULL: all)
SELECT id, tenant, name, roles, address_patterns, expire_time, revoke_time, last_used_time, create_time,
       max_sends_per_second, send_patterns
FROM api_keys WHERE $1::text IS NULL OR tenant = $1 ORDER BY tenant, name;

-- name: revoke_api_key
-- $1 tenant, $2 name or id
UPDATE api_keys SET revoke_time = now()
WHERE tenant = $1 AND (name = $2 OR id = $2) AND revoke_time IS NULL
RETURNING id, name;

-- name: touch_api_key
UPDATE api_keys SET last_used_time = now() WHERE id = $1;

-- name: audit
-- $1 tenant, $2 actor, $3 action, $4 target, $5 detail
INSERT INTO audit_log (tenant, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5::jsonb);

-- name: list_audit
SELECT * FROM audit_log WHERE tenant = $1 ORDER BY time DESC, id DESC LIMIT $2;
