-- Named queries for the client-facing API. Loaded once by intentd.server.queries;
-- each block starts with "-- name: <name>". Time-dependent queries take
-- $now (NULL means the database clock) so tests can move the clock.

-- name: insert_intents
-- New intents, set-based: one array element per intent, in send order (a
-- batch send, or single sends of many callers grouped by the group commit).
-- Inserting is idempotent by id: a row whose id is already there (the same
-- insert applied again after its commit was in doubt) or whose idempotency
-- key is taken (also by an earlier row of the same statement) is not
-- inserted and not returned. A tenant with a live-intents quota gets its
-- rows admitted in send order while intentd_live_room has room; a row past
-- it is returned with over_quota and nothing else. Each returned row carries
-- its 1-based position in the arrays as ord.
-- $1 ids, $2 tenants, $3 intent_types, $4 to_agents, $5 senders, $6 payloads,
-- $7 idempotency_keys, $8 labels, $9 max_attempts (NULL: type default),
-- $10 deadlines, $11 default heartbeat timeouts ms, $12 nows, and for
-- children (docs/children.md; NULL for an intent a client sends): $13
-- parent ids, $14 parent positions, $15 orders within the position, $16
-- detached, $17 deadline caps (the parent's deadline: a child's deadline,
-- given or the type's default, never exceeds it)
WITH input AS (
    -- The first array through a subquery: see the header of leases.sql (one
    -- plan for every batch size instead of one planned per execution).
    SELECT * FROM unnest((SELECT $1::text[]), $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::integer[], $10::timestamptz[], $11::integer[],
                         $12::timestamptz[], $13::text[], $14::integer[], $15::integer[], $16::boolean[],
                         $17::timestamptz[])
        WITH ORDINALITY AS u (id, tenant, intent_type, to_agent, sender, payload, idempotency_key, labels,
                              max_attempts, deadline, heartbeat_timeout_ms, at, parent_id, parent_idx, parent_ord,
                              detached, deadline_cap, ord)
), room AS MATERIALIZED (
    -- Only tenants with a quota call intentd_live_room (the others take no
    -- lock), in name order (a volatile function in the select list runs
    -- after the sort), so two batches take their tenants' locks in the same
    -- order.
    SELECT d.tenant, CASE WHEN q.max_live_intents IS NOT NULL THEN intentd_live_room(d.tenant) END AS room
    FROM (SELECT DISTINCT tenant FROM input) d
    LEFT JOIN tenants q ON q.name = d.tenant
    ORDER BY d.tenant
), refused AS (
    -- Only rows of tenants with a quota: a row past its tenant's room, in
    -- send order. A send matching an earlier one by key adds no live intent
    -- (a subplan, so it is looked up only for such rows).
    SELECT n.ord FROM (
        SELECT u.ord, r.room, count(*) OVER (PARTITION BY u.tenant ORDER BY u.ord) AS nth
        FROM input u JOIN room r ON r.tenant = u.tenant
        WHERE CASE WHEN r.room IS NULL THEN false
                   ELSE NOT EXISTS (SELECT 1 FROM intents x WHERE x.tenant = u.tenant AND x.sender = u.sender
                                                            AND x.idempotency_key = u.idempotency_key) END
    ) n
    WHERE n.nth > n.room
), inserted AS (
    INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, idempotency_key,
                         labels, max_attempts, heartbeat_timeout_ms, retry_backoff_ms,
                         retry_backoff_max_ms, wait_hold_ms, deadline, available_at, create_time,
                         update_time, last_seq, parent_id, parent_idx, parent_ord, detached)
    SELECT u.id, u.tenant, u.intent_type, u.to_agent, u.sender, u.payload::jsonb, u.idempotency_key,
           u.labels::jsonb, coalesce(u.max_attempts, t.max_attempts, 3),
           coalesce(t.heartbeat_timeout_ms, u.heartbeat_timeout_ms), coalesce(t.retry_backoff_ms, 100),
           coalesce(t.retry_backoff_max_ms, 60000), coalesce(t.wait_hold_ms, 2000),
           -- least() ignores NULLs: no cap, or no deadline, leaves the other.
           least(coalesce(u.deadline, coalesce(u.at, now()) + t.default_deadline_ms * interval '1 millisecond'),
                 u.deadline_cap),
           coalesce(u.at, now()), coalesce(u.at, now()), coalesce(u.at, now()), 1,
           u.parent_id, u.parent_idx, u.parent_ord, coalesce(u.detached, false)
    FROM input u
    LEFT JOIN intent_types t ON t.tenant = u.tenant AND t.intent_type = u.intent_type
    WHERE NOT EXISTS (SELECT 1 FROM refused f WHERE f.ord = u.ord)
    ORDER BY u.ord
    ON CONFLICT DO NOTHING
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, 1, 'CREATED', create_time, state, attempt FROM inserted
)
SELECT u.ord, false AS over_quota, i.* FROM inserted i JOIN input u ON u.id = i.id
UNION ALL
SELECT f.ord, true, (NULL::intents).* FROM refused f;

-- name: find_sent
-- What a send that inserted nothing stands for: its own row, when an earlier
-- application of the same insert committed (its answer was lost), else the
-- earlier send with the same idempotency key.
-- $1 tenant, $2 sender, $3 key, $4 intent_type, $5 to_agent, $6 payload,
-- $7 the send's id (NULL: none)
SELECT i.*, coalesce(i.id = $7, false) AS own,
       (coalesce(i.id = $7, false)
        OR (i.intent_type = $4 AND i.to_agent = $5 AND i.payload = $6::jsonb)) AS same_request
FROM intents i
WHERE i.tenant = $1 AND (i.id = $7 OR (i.sender = $2 AND i.idempotency_key = $3))
ORDER BY coalesce(i.id = $7, false) DESC
LIMIT 1;

-- name: get_intent
-- With its open wait (the unresolved one of the smallest position, if any)
-- as wait_kind, wait_name, wait_idx, wait_since, wait_due_at, wait_task_id:
-- looked up by the primary key's prefix, and only for intents that ever
-- registered a wait.
SELECT i.*, w.kind AS wait_kind, w.name AS wait_name, w.idx AS wait_idx, w.create_time AS wait_since,
       w.due_at AS wait_due_at, w.task_id AS wait_task_id
FROM intents i
LEFT JOIN LATERAL (
    SELECT * FROM intent_waits w
    WHERE w.intent_id = i.id AND i.has_waits AND w.resolved_time IS NULL
    ORDER BY w.idx LIMIT 1
) w ON true
WHERE i.id = $1 AND i.tenant = $2;

-- name: list_intents
-- $1 tenant, $2 states (NULL: all), $3 intent_type, $4 to_agent, $5 labels
-- (containment), $6 cursor (ids below it), $7 limit. Each with its open
-- wait, as get_intent.
SELECT i.*, w.kind AS wait_kind, w.name AS wait_name, w.idx AS wait_idx, w.create_time AS wait_since,
       w.due_at AS wait_due_at, w.task_id AS wait_task_id
FROM (
    SELECT * FROM intents
    WHERE tenant = $1
      AND ($2::intent_state[] IS NULL OR state = ANY ($2::intent_state[]))
      AND ($3::text IS NULL OR intent_type = $3)
      AND ($4::text IS NULL OR to_agent = $4)
      AND ($5::jsonb IS NULL OR labels @> $5::jsonb)
      AND ($6::text IS NULL OR id < $6)
    ORDER BY tenant, id DESC
    LIMIT $7
) i
LEFT JOIN LATERAL (
    SELECT * FROM intent_waits w
    WHERE w.intent_id = i.id AND i.has_waits AND w.resolved_time IS NULL
    ORDER BY w.idx LIMIT 1
) w ON true
ORDER BY i.tenant, i.id DESC;

-- name: list_events
-- $1 intent id, $2 tenant, $3 after seq, $4 limit. Tenant-scoped like every
-- read by id, so a caller that skipped its own check still sees only its tenant.
SELECT e.* FROM intent_events e JOIN intents i ON i.id = e.intent_id
WHERE e.intent_id = $1 AND i.tenant = $2 AND e.seq > $3 ORDER BY e.seq LIMIT $4;


-- name: cancel_intent
-- $1 id, $2 tenant, $3 reason, $4 now, $5 actor
WITH changed AS (
    UPDATE intents
    SET state = 'CANCELED', cancel_reason = $3,
        lease_session = NULL, lease_expires_at = NULL,
        finish_time = coalesce($4::timestamptz, now()), update_time = coalesce($4::timestamptz, now()),
        last_seq = last_seq + 1
    WHERE id = $1 AND tenant = $2 AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, actor)
    SELECT id, last_seq, 'CANCELED', update_time, state, attempt, cancel_reason, $5 FROM changed
)
SELECT * FROM changed;

-- name: retry_intent
-- Puts a FAILED intent (the dead letter) back to PENDING. Its recorded steps
-- stay, so the next attempt resumes where the last one stopped. A retried
-- intent is live again, so it is admitted like a send: by intentd_live_room,
-- only for a tenant with a quota (room NULL: none).
-- $1 id, $2 tenant, $3 extra attempts, $4 now, $5 actor
WITH room AS (
    SELECT CASE WHEN t.max_live_intents IS NOT NULL THEN intentd_live_room($2) END AS room
    FROM (SELECT 1) one LEFT JOIN tenants t ON t.name = $2
), changed AS (
    UPDATE intents
    SET state = 'PENDING', max_attempts = attempt - parked_attempts + $3, error_code = NULL, error_message = NULL,
        finish_time = NULL, available_at = coalesce($4::timestamptz, now()),
        update_time = coalesce($4::timestamptz, now()), last_seq = last_seq + 1
    WHERE id = $1 AND tenant = $2 AND state = 'FAILED'
      AND (deadline IS NULL OR deadline > coalesce($4::timestamptz, now()))
      AND coalesce((SELECT room FROM room), 1) > 0
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, actor)
    SELECT id, last_seq, 'RETRIED', update_time, state, attempt, $5 FROM changed
)
SELECT * FROM changed;

-- name: retry_refusal
-- Why retry_intent changed nothing. $1 id, $2 tenant, $3 now
SELECT state::text AS state,
       deadline IS NOT NULL AND deadline <= coalesce($3::timestamptz, now()) AS past_deadline
FROM intents WHERE id = $1 AND tenant = $2;

-- name: expire_deadlines
-- Moves every live intent past its deadline to TIMED_OUT. Safe in several
-- replicas at once: rows another sweeper holds are skipped, not waited for.
-- $1 now, $2 batch size
WITH due AS (
    SELECT id FROM intents
    WHERE deadline <= coalesce($1::timestamptz, now())
      AND deadline IS NOT NULL
      AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')
    ORDER BY deadline
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE intents i
    SET state = 'TIMED_OUT', error_code = 'DEADLINE_EXCEEDED',
        error_message = 'the deadline passed before the intent finished',
        lease_session = NULL, lease_expires_at = NULL,
        finish_time = coalesce($1::timestamptz, now()), update_time = coalesce($1::timestamptz, now()),
        last_seq = i.last_seq + 1
    FROM due
    WHERE i.id = due.id AND i.state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')
    RETURNING i.*
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, error_code, error_message)
    SELECT id, last_seq, 'TIMED_OUT', update_time, state, attempt, error_code, error_message FROM changed
)
SELECT id, tenant, to_agent, attempt, extract(epoch FROM finish_time - create_time)::float8 AS age_s
FROM changed;

-- name: upsert_intent_type
-- $1 tenant, $2 type, $3 max_attempts, $4 heartbeat_timeout_ms, $5 backoff ms,
-- $6 backoff max ms, $7 default deadline ms, $8 wait hold ms (NULL: keep the
-- type's, or $9, the default, for a new type), $9 default wait hold ms,
-- $10 stream keep ms (NULL: streams live as long as their intents)
INSERT INTO intent_types (tenant, intent_type, max_attempts, heartbeat_timeout_ms,
                          retry_backoff_ms, retry_backoff_max_ms, default_deadline_ms, wait_hold_ms, stream_keep_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8::int, $9::int), $10::bigint)
ON CONFLICT (tenant, intent_type) DO UPDATE
SET max_attempts = EXCLUDED.max_attempts, heartbeat_timeout_ms = EXCLUDED.heartbeat_timeout_ms,
    retry_backoff_ms = EXCLUDED.retry_backoff_ms, retry_backoff_max_ms = EXCLUDED.retry_backoff_max_ms,
    default_deadline_ms = EXCLUDED.default_deadline_ms,
    wait_hold_ms = COALESCE($8::int, intent_types.wait_hold_ms), stream_keep_ms = EXCLUDED.stream_keep_ms,
    update_time = now()
RETURNING *;

-- name: get_intent_type
SELECT * FROM intent_types WHERE tenant = $1 AND intent_type = $2;

-- name: list_intent_types
SELECT * FROM intent_types WHERE tenant = $1 ORDER BY intent_type;

-- name: delete_finished_intents
-- Retention: terminal intents finished longer ago than the retention period go,
-- with their events and steps (ON DELETE CASCADE). Their idempotency keys are
-- free again after that: the idempotency window is the retention period.
-- $1 now, $2 retention in seconds, $3 batch size
WITH doomed AS (
    SELECT id FROM intents
    WHERE finish_time IS NOT NULL
      AND finish_time < coalesce($1::timestamptz, now()) - $2 * interval '1 second'
    ORDER BY finish_time
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
DELETE FROM intents i USING doomed d WHERE i.id = d.id
RETURNING i.id;
