-- Named queries of child intents (docs/children.md): the record of a start,
-- AGENT waits' values, and the child sweeper's work on child_notices.
--
-- Lock order: a child's end never locks its parent (it only inserts a
-- notice, migration 0011); the sweeper locks parents, then children, both
-- with SKIP LOCKED, so it never waits for a lock: no cycle between the
-- generations of a family can form. The start of children runs under the
-- parent's row lock (lock_intent of waits.sql) and inserts new rows only.
-- $now parameters are NULL in production (the database clock decides).

-- name: record_start
-- The record of a start at its position, with the parent's counters, a
-- STEP_COMPLETED event and one CHILD_STARTED event per child, in the
-- transaction that inserted the children; nothing when the position is
-- recorded already.
-- $1 parent id, $2 index, $3 step name, $4 record (JSON text), $5 child
-- ids, $6 child addresses, $7 now
WITH step AS (
    INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time, size_bytes)
    SELECT i.id, $2, $3, d.doc, i.attempt, i.lease_token, coalesce($7::timestamptz, now()),
           octet_length(d.doc::text) + octet_length($3)
    FROM intents i CROSS JOIN LATERAL (SELECT $4::text::jsonb AS doc) d
    WHERE i.id = $1
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), changed AS (
    UPDATE intents i
    SET steps_completed = i.steps_completed + 1, last_step_index = greatest(i.last_step_index, s.idx),
        last_step = s.name, history_bytes = i.history_bytes + s.size_bytes,
        child_count = i.child_count + cardinality($5::text[]),
        update_time = s.record_time, last_seq = i.last_seq + 1 + cardinality($5::text[])
    FROM step s
    WHERE i.id = s.intent_id
    RETURNING i.id, i.last_seq - cardinality($5::text[]) AS step_seq, i.state, i.attempt, i.update_time
), step_event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_name, step_index)
    SELECT c.id, c.step_seq, 'STEP_COMPLETED', c.update_time, c.state, c.attempt, $3, $2 FROM changed c
), child_events AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_index, message, child_id,
                               child_state)
    SELECT c.id, c.step_seq + k.n, 'CHILD_STARTED', c.update_time, c.state, c.attempt, $2, k.to_agent, k.id,
           'PENDING'
    FROM changed c CROSS JOIN unnest($5::text[], $6::text[]) WITH ORDINALITY AS k (id, to_agent, n)
)
SELECT s.intent_id, s.idx, s.name, s.result::text AS result, s.attempt, s.record_time FROM step s;

-- name: foreign_children
-- The ids among $2 that are not children of intent $1 (an AGENT wait may
-- only wait for its own intent's children).
-- $1 intent id, $2 ids
SELECT c.id FROM unnest($2::text[]) AS c (id)
WHERE NOT EXISTS (SELECT 1 FROM intents k WHERE k.id = c.id AND k.parent_id = $1);

-- name: child_wait_value
-- What an open AGENT wait would record now, NULL while unsatisfied: ALL,
-- when every child ended; FIRST, when one did (the earliest end wins).
-- A child deleted by retention ended long ago: state DELETED.
-- $1 intent id, $2 index, $3 with the children's results
WITH w AS (
    SELECT * FROM intent_waits WHERE intent_id = $1 AND idx = $2 AND kind = 'AGENT'
), kids AS (
    SELECT c.id, c.ord, k.finish_time, coalesce(k.state::text, 'DELETED') AS state,
           k.id IS NULL OR k.finish_time IS NOT NULL AS ended, k.result, k.error_code, k.error_message
    FROM w CROSS JOIN unnest(w.children) WITH ORDINALITY AS c (id, ord)
    LEFT JOIN intents k ON k.id = c.id
), outcome AS (
    SELECT (SELECT child_mode FROM w) AS mode,
           bool_and(ended) AS all_ended, bool_or(ended) AS any_ended,
           (array_agg(id ORDER BY finish_time NULLS LAST, ord) FILTER (WHERE ended))[1] AS first_id
    FROM kids
)
SELECT CASE
    WHEN o.mode = 'ALL' AND o.all_ended OR o.mode = 'FIRST' AND o.any_ended THEN (
        -- Not jsonb_strip_nulls: it would strip the nulls inside results too.
        SELECT (jsonb_build_object(
                    'children', jsonb_agg(jsonb_build_object(
                        'id', k.id, 'state', k.state,
                        'result', CASE WHEN $3 THEN k.result END,
                        'error', CASE WHEN k.error_code IS NOT NULL
                                      THEN jsonb_build_object('code', k.error_code,
                                                              'message', coalesce(k.error_message, '')) END)
                        ORDER BY k.ord))
                || CASE WHEN o.mode = 'FIRST' THEN jsonb_build_object('first', o.first_id) ELSE '{}'::jsonb END
                || CASE WHEN $3 THEN '{}'::jsonb ELSE '{"results_omitted": true}'::jsonb END)::text
        FROM kids k WHERE k.ended)
    END AS value
FROM outcome o;

-- name: take_notices
-- The oldest notices no other sweeper holds.
-- $1 batch size
SELECT seq, kind, parent_id, child_id FROM child_notices ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED;

-- name: lock_parents
-- The parents among $1 no other transaction holds, locked; the others'
-- notices wait for a later round. Missing ones (deleted) are not returned.
SELECT id, state, finish_time IS NOT NULL AS ended FROM intents WHERE id = ANY ($1::text[])
ORDER BY id
FOR UPDATE SKIP LOCKED;

-- name: existing_intents
-- $1 ids: those that exist (read without a lock).
SELECT id FROM intents WHERE id = ANY ($1::text[]);

-- name: drop_notices
-- $1 seqs
DELETE FROM child_notices WHERE seq = ANY ($1::bigint[]);

-- name: child_finished_events
-- One CHILD_FINISHED event per (parent, child) pair, numbered in order per
-- parent; the parents are locked by lock_parents.
-- $1 parent ids, $2 child ids, $3 now
WITH input AS (
    SELECT u.parent_id, u.child_id, u.ord FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u (parent_id, child_id, ord)
), numbered AS (
    SELECT parent_id, child_id, row_number() OVER (PARTITION BY parent_id ORDER BY ord) AS n FROM input
), per_parent AS (
    SELECT parent_id, count(*) AS total FROM input GROUP BY parent_id
), changed AS (
    UPDATE intents p SET last_seq = p.last_seq + c.total, update_time = coalesce($3::timestamptz, now())
    FROM per_parent c
    WHERE p.id = c.parent_id
    RETURNING p.id, p.last_seq - c.total AS base_seq, p.state, p.attempt, p.update_time
)
INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, child_id, child_state, error_code,
                           error_message, step_index, message)
SELECT c.id, c.base_seq + n.n, 'CHILD_FINISHED', c.update_time, c.state, c.attempt, n.child_id,
       coalesce(k.state::text, 'DELETED'), k.error_code, k.error_message, k.parent_idx, k.to_agent
FROM changed c JOIN numbered n ON n.parent_id = c.id LEFT JOIN intents k ON k.id = n.child_id
RETURNING intent_id;

-- name: open_child_waits
-- The open AGENT waits of the parents among $1 that are live, lowest
-- position first.
SELECT w.intent_id, w.idx FROM intent_waits w JOIN intents i ON i.id = w.intent_id
WHERE w.intent_id = ANY ($1::text[]) AND w.kind = 'AGENT' AND w.resolved_time IS NULL AND i.finish_time IS NULL
ORDER BY w.intent_id, w.idx;

-- name: cancel_children
-- Cancels the live children of the ended parents among $1 that are not
-- detached (their leases end with the CANCELED event, which their streams
-- revoke), skipping the ones another transaction holds; returns the
-- canceled. Their own ends write FINISHED notices to the parents, and
-- PARENT_ENDED ones for their children: the cascade goes down the tree.
-- $1 parent ids, $2 now
WITH kids AS (
    SELECT k.id FROM intents k
    WHERE k.parent_id = ANY ($1::text[]) AND k.finish_time IS NULL AND NOT k.detached
    FOR UPDATE OF k SKIP LOCKED
), changed AS (
    UPDATE intents k
    SET state = 'CANCELED', cancel_reason = 'parent ' || p.id || ' ended ' || p.state::text,
        lease_session = NULL, lease_expires_at = NULL,
        finish_time = coalesce($2::timestamptz, now()), update_time = coalesce($2::timestamptz, now()),
        last_seq = k.last_seq + 1
    FROM kids, intents p
    WHERE k.id = kids.id AND p.id = k.parent_id
      AND k.state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')
    RETURNING k.*
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, actor)
    SELECT id, last_seq, 'CANCELED', update_time, state, attempt, cancel_reason, 'intentd' FROM changed
)
SELECT id, parent_id FROM changed;

-- name: live_children_left
-- The parents among $1 that still have live children that are not
-- detached (skipped by cancel_children: held by another transaction).
SELECT DISTINCT parent_id FROM intents
WHERE parent_id = ANY ($1::text[]) AND finish_time IS NULL AND NOT detached;

-- name: list_children
-- A parent's children in start order (position, then order within it),
-- after the child $7 (the cursor: the last one seen), with the filters of
-- list_intents, each with its open wait as get_intent.
-- $1 tenant, $2 parent id, $3 states (NULL: all), $4 intent_type, $5
-- to_agent, $6 labels (containment), $7 cursor (a child id), $8 limit
SELECT i.*, w.kind AS wait_kind, w.name AS wait_name, w.idx AS wait_idx, w.create_time AS wait_since,
       w.due_at AS wait_due_at, w.task_id AS wait_task_id
FROM (
    SELECT * FROM intents
    WHERE parent_id = $2 AND tenant = $1
      AND ($3::intent_state[] IS NULL OR state = ANY ($3::intent_state[]))
      AND ($4::text IS NULL OR intent_type = $4)
      AND ($5::text IS NULL OR to_agent = $5)
      AND ($6::jsonb IS NULL OR labels @> $6::jsonb)
      AND ($7::text IS NULL OR (parent_idx, parent_ord) > (SELECT c.parent_idx, c.parent_ord FROM intents c
                                                           WHERE c.id = $7 AND c.parent_id = $2))
    ORDER BY parent_id, parent_idx, parent_ord
    LIMIT $8
) i
LEFT JOIN LATERAL (
    SELECT * FROM intent_waits w
    WHERE w.intent_id = i.id AND i.has_waits AND w.resolved_time IS NULL
    ORDER BY w.idx LIMIT 1
) w ON true
ORDER BY i.parent_idx, i.parent_ord;
