-- Named queries of durable waits (docs/waits.md): registering a wait, the
-- inbox of signals, human tasks, recording a wait's value, parking, and the
-- timer sweep.
--
-- Every writer that can satisfy a wait (the attempt that reached it, its
-- park, a signal, a decision, the timer sweep) first locks the intent's row
-- (lock_intent / lock_intent_of_tenant / due_waits, each the first
-- statement of its transaction) and runs the statements below after it. In
-- READ COMMITTED each of them takes a new snapshot, which holds everything
-- committed before the lock was granted: two writers never both satisfy one
-- wait, and a signal never slips between a park's check and its update.
-- $now parameters are NULL in production (the database clock decides).

-- name: lock_intent
-- The intent of a lease, locked; judged in the caller against the lease.
-- $1 id, $2 now
SELECT i.*, i.deadline IS NOT NULL AND i.deadline <= coalesce($2::timestamptz, now()) AS past_deadline
FROM intents i WHERE i.id = $1
FOR UPDATE;

-- name: lock_intent_of_tenant
-- $1 id, $2 tenant
SELECT * FROM intents WHERE id = $1 AND tenant = $2 FOR UPDATE;

-- name: step_at
-- $1 intent id, $2 index
SELECT intent_id, idx, name, result, attempt, record_time FROM intent_steps WHERE intent_id = $1 AND idx = $2;

-- name: register_wait
-- A wait at (intent, index) unless one is there (then nothing changes: a
-- retried write and a later attempt keep the first registration). A HUMAN
-- wait makes its task here, once, with its TASK_CREATED event.
-- Its due time counts from now: $6 (until) when given, else now + $16 ms
-- for a TIME wait or a timeout (0: none).
-- $1 intent id, $2 index, $3 kind, $4 name, $5 step name, $6 until,
-- $7 attempt, $8 now, $9 task id (HUMAN), $10 title, $11 description,
-- $12 outcomes, $13 assignees, $14 form schema (JSON text or NULL),
-- $15 remind after ms (0: never), $16 timeout ms, $17 children (AGENT),
-- $18 child mode (AGENT: ALL or FIRST)
WITH wait AS (
    INSERT INTO intent_waits (intent_id, idx, kind, name, step_name, due_at, attempt, create_time, task_id,
                              children, child_mode)
    VALUES ($1, $2, $3, $4, $5,
            CASE WHEN $6::timestamptz IS NOT NULL THEN $6::timestamptz
                 WHEN $3 = 'TIME' OR $16::bigint > 0
                 THEN coalesce($8::timestamptz, now()) + $16::bigint * interval '1 millisecond' END,
            $7, coalesce($8::timestamptz, now()), $9, $17::text[], $18)
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), task AS (
    INSERT INTO human_tasks (id, tenant, intent_id, idx, intent_type, to_agent, title, description, outcomes,
                             assignees, form_schema, state, create_time, due_at, remind_at)
    SELECT w.task_id, i.tenant, i.id, w.idx, i.intent_type, i.to_agent, $10, $11, $12::text[], $13::text[],
           $14::jsonb, 'OPEN', w.create_time, w.due_at,
           CASE WHEN $15::bigint > 0 THEN w.create_time + $15::bigint * interval '1 millisecond' END
    FROM wait w JOIN intents i ON i.id = w.intent_id
    WHERE w.kind = 'HUMAN'
    RETURNING *
), changed AS (
    UPDATE intents i
    SET has_waits = true, last_seq = i.last_seq + (SELECT count(*) FROM task),
        update_time = CASE WHEN EXISTS (SELECT 1 FROM task) THEN w.create_time ELSE i.update_time END
    FROM wait w
    WHERE i.id = w.intent_id
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_name, step_index, wait_kind,
                               wait_name, task_id)
    SELECT c.id, c.last_seq, 'TASK_CREATED', c.update_time, c.state, c.attempt, $5, t.idx, 'HUMAN', t.title, t.id
    FROM changed c JOIN task t ON t.intent_id = c.id
)
SELECT * FROM wait;

-- name: wait_at
-- A wait and how long until it is due (negative: past; NULL: never).
-- $1 intent id, $2 index, $3 now
SELECT w.*, extract(epoch FROM w.due_at - coalesce($3::timestamptz, now()))::float8 AS due_in_s
FROM intent_waits w WHERE w.intent_id = $1 AND w.idx = $2;

-- name: reopen_wait
-- A wait closed by the end of its intent, reached again after the intent
-- was retried (RetryIntent): open again, with its task.
-- $1 intent id, $2 index
WITH w AS (
    UPDATE intent_waits SET resolved_time = NULL
    WHERE intent_id = $1 AND idx = $2 AND resolved_time IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM intent_steps s WHERE s.intent_id = $1 AND s.idx = $2)
    RETURNING intent_id, idx
)
UPDATE human_tasks t SET state = 'OPEN'
FROM w WHERE t.intent_id = w.intent_id AND t.idx = w.idx AND t.state = 'CANCELED'
RETURNING t.id;

-- name: take_signal
-- The oldest signal of a name in an intent's inbox, consumed by the wait at
-- $2, and the value it records there.
-- $1 intent id, $2 the wait's index, $3 signal name
UPDATE intent_signals s SET consumed_idx = $2
WHERE s.seq = (SELECT seq FROM intent_signals
               WHERE intent_id = $1 AND name = $3 AND consumed_idx IS NULL
               ORDER BY seq LIMIT 1)
  AND s.consumed_idx IS NULL
RETURNING s.*, jsonb_build_object('signal', jsonb_build_object(
    'id', s.signal_id, 'name', s.name, 'payload', s.payload, 'sender', s.sender,
    'time', intentd_rfc3339(s.create_time)))::text AS value;

-- name: task_at
-- The task of a HUMAN wait, with the value its decision records.
-- $1 intent id, $2 index
SELECT t.*, CASE WHEN t.state = 'DECIDED' THEN jsonb_build_object('decision', jsonb_build_object(
    'task_id', t.id, 'outcome', t.outcome, 'decided_by', t.decided_by,
    'decide_time', intentd_rfc3339(t.decide_time), 'comment', coalesce(t.comment, ''),
    'form_data', t.form_data))::text END AS value
FROM human_tasks t WHERE t.intent_id = $1 AND t.idx = $2;

-- name: expire_task
-- $1 task id
UPDATE human_tasks SET state = 'EXPIRED' WHERE id = $1 AND state = 'OPEN' RETURNING id;

-- name: record_wait
-- A wait's value recorded at its position (a step row with its event), the
-- wait resolved, and a WAITING intent back to PENDING, claimable at once.
-- Only while the wait is open and the intent is live under its latest
-- attempt: nothing otherwise. (Any open wait: with parallel steps a wait
-- need not be at the intent's next position.)
-- $1 intent id, $2 index, $3 value (JSON text), $4 now, $5 event type,
-- $6 event message, $7 signal id, $8 actor, $9 task id
WITH w AS (
    UPDATE intent_waits w SET resolved_time = coalesce($4::timestamptz, now())
    FROM intents i
    WHERE w.intent_id = $1 AND w.idx = $2 AND w.resolved_time IS NULL
      AND i.id = w.intent_id AND i.lease_token IS NOT NULL
      AND i.state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING')
    RETURNING w.*, i.attempt AS intent_attempt, i.lease_token
), step AS (
    INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time, size_bytes)
    SELECT w.intent_id, w.idx, w.step_name, d.doc, w.intent_attempt, w.lease_token, w.resolved_time,
           octet_length(d.doc::text) + octet_length(w.step_name)
    FROM w CROSS JOIN LATERAL (SELECT $3::jsonb AS doc) d
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), changed AS (
    UPDATE intents i
    SET steps_completed = i.steps_completed + 1, last_step_index = greatest(i.last_step_index, s.idx),
        last_step = s.name, history_bytes = i.history_bytes + s.size_bytes,
        state = CASE WHEN i.state = 'WAITING' THEN 'PENDING'::intent_state ELSE i.state END,
        available_at = CASE WHEN i.state = 'WAITING' THEN s.record_time ELSE i.available_at END,
        update_time = s.record_time, last_seq = i.last_seq + 1
    FROM step s
    WHERE i.id = s.intent_id
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_name, step_index, message,
                               wait_kind, wait_name, signal_id, actor, task_id)
    SELECT c.id, c.last_seq, $5, c.update_time, c.state, c.attempt, s.name, s.idx, $6, w.kind, w.name, $7, $8,
           coalesce($9, w.task_id)
    FROM changed c JOIN step s ON s.intent_id = c.id JOIN w ON w.intent_id = c.id
)
SELECT s.intent_id, s.idx, s.name, s.result::text AS result, s.attempt, s.record_time,
       (SELECT c.state::text FROM changed c) AS state
FROM step s;

-- name: park_intent
-- The attempt holding the lease parks on its open wait at $5: IN_PROGRESS
-- to WAITING, the lease cleared (its token kept, as for every ended
-- attempt), the parked attempt counted apart from the retry budget.
-- $1 id, $2 token, $3 attempt, $4 the stream holding the lease, $5 index, $6 now
WITH wait AS (
    SELECT kind, name, idx FROM intent_waits WHERE intent_id = $1 AND idx = $5 AND resolved_time IS NULL
), changed AS (
    UPDATE intents i
    SET state = 'WAITING', lease_session = NULL, lease_expires_at = NULL,
        parked_attempts = i.parked_attempts + 1,
        update_time = coalesce($6::timestamptz, now()), last_seq = i.last_seq + 1
    FROM wait
    WHERE i.id = $1 AND i.lease_token = $2 AND i.attempt = $3 AND i.state = 'IN_PROGRESS' AND i.lease_session = $4
      AND (i.deadline IS NULL OR i.deadline > coalesce($6::timestamptz, now()))
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time, wait.kind, wait.name, wait.idx
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_index, wait_kind, wait_name)
    SELECT id, last_seq, 'WAITING', update_time, state, attempt, idx, kind, name FROM changed
)
SELECT id, last_seq FROM changed;

-- name: signal_by_id
-- $1 intent id, $2 signal id
SELECT * FROM intent_signals WHERE intent_id = $1 AND signal_id = $2;

-- name: inbox_size
-- Signals of an intent not taken by a wait yet, and their payloads' bytes.
-- $1 intent id
SELECT count(*) AS signals, coalesce(sum(size_bytes), 0)::bigint AS bytes
FROM intent_signals WHERE intent_id = $1 AND consumed_idx IS NULL;

-- name: open_signal_wait
-- The open wait of an intent for a signal of this name, if any.
-- $1 intent id, $2 signal name, $3 now
SELECT w.*, extract(epoch FROM w.due_at - coalesce($3::timestamptz, now()))::float8 AS due_in_s
FROM intent_waits w
WHERE w.intent_id = $1 AND w.resolved_time IS NULL AND w.kind = 'SIGNAL' AND w.name = $2
ORDER BY w.idx LIMIT 1;

-- name: insert_signal
-- A signal, consumed at once by the wait at $7, or (NULL) kept in the inbox:
-- then it has its own SIGNALED event (a consumed one's is the record's).
-- $1 intent id, $2 signal id, $3 name, $4 payload (JSON text), $5 sender,
-- $6 now, $7 the consuming wait's index (NULL: the inbox)
WITH s AS (
    INSERT INTO intent_signals (intent_id, signal_id, name, payload, sender, create_time, consumed_idx, size_bytes)
    VALUES ($1, $2, $3, $4::text::jsonb, $5, coalesce($6::timestamptz, now()), $7, octet_length($4::text))
    ON CONFLICT (intent_id, signal_id) DO NOTHING
    RETURNING *, jsonb_build_object('signal', jsonb_build_object(
        'id', signal_id, 'name', name, 'payload', payload, 'sender', sender,
        'time', intentd_rfc3339(create_time)))::text AS value
), changed AS (
    UPDATE intents i SET last_seq = i.last_seq + 1, update_time = s.create_time
    FROM s WHERE i.id = s.intent_id AND s.consumed_idx IS NULL
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, wait_name, signal_id, actor)
    SELECT c.id, c.last_seq, 'SIGNALED', c.update_time, c.state, c.attempt, s.name, s.signal_id, s.sender
    FROM changed c CROSS JOIN s
)
SELECT * FROM s;

-- name: add_event
-- An event that changes nothing else of the intent. $1 id, $2 type,
-- $3 message, $4 actor, $5 task id, $6 now, $7 step index, $8 wait kind,
-- $9 wait name
WITH changed AS (
    UPDATE intents SET last_seq = last_seq + 1, update_time = coalesce($6::timestamptz, now())
    WHERE id = $1
    RETURNING id, last_seq, state, attempt, update_time
)
INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, actor, task_id, step_index,
                           wait_kind, wait_name)
SELECT id, last_seq, $2, update_time, state, attempt, $3, $4, $5, $7, $8, $9 FROM changed
RETURNING seq;

-- name: get_task
-- $1 tenant, $2 task id
SELECT * FROM human_tasks WHERE tenant = $1 AND id = $2;

-- name: list_tasks
-- Newest first (task ids are time ordered). $1 tenant, $2 states (NULL:
-- all), $3 assignee (NULL: any; else tasks naming it or naming nobody),
-- $4 intent type, $5 intent id, $6 cursor (ids below it), $7 limit
SELECT * FROM human_tasks
WHERE tenant = $1
  AND ($2::text[] IS NULL OR state = ANY ($2::text[]))
  AND ($3::text IS NULL OR $3 = ANY (assignees) OR cardinality(assignees) = 0)
  AND ($4::text IS NULL OR intent_type = $4)
  AND ($5::text IS NULL OR intent_id = $5)
  AND ($6::text IS NULL OR id < $6)
ORDER BY tenant, id DESC
LIMIT $7;

-- name: decide_task
-- OPEN to DECIDED, with the value the decision records.
-- $1 task id, $2 outcome, $3 comment, $4 form data (JSON text or NULL),
-- $5 decided by, $6 now
UPDATE human_tasks t
SET state = 'DECIDED', outcome = $2, comment = $3, form_data = $4::jsonb, decided_by = $5,
    decide_time = coalesce($6::timestamptz, now())
WHERE t.id = $1 AND t.state = 'OPEN'
RETURNING t.*, jsonb_build_object('decision', jsonb_build_object(
    'task_id', t.id, 'outcome', t.outcome, 'decided_by', t.decided_by,
    'decide_time', intentd_rfc3339(t.decide_time), 'comment', coalesce(t.comment, ''),
    'form_data', t.form_data))::text AS value;

-- name: due_waits
-- The timer sweep's claim: open waits past their due time of WAITING
-- intents (held ones are their holder's), found through intent_waits_due,
-- their intents locked (intent row first, like every writer of waits) and
-- skipped when another writer holds them.
-- $1 now, $2 batch size
SELECT w.intent_id, w.idx
FROM intent_waits w JOIN intents i ON i.id = w.intent_id
WHERE w.resolved_time IS NULL AND w.due_at IS NOT NULL AND w.due_at <= coalesce($1::timestamptz, now())
  AND i.state = 'WAITING'
ORDER BY w.due_at
LIMIT $2
FOR UPDATE OF i SKIP LOCKED;

-- name: fire_timers
-- The due waits of intents due_waits locked, read again in this statement's
-- snapshot (which holds every change committed before the locks): each
-- still open, its intent still WAITING at its position, records its value
-- (TIME: fired at its due time; SIGNAL, HUMAN: timed out, the task EXPIRED),
-- and the intent is PENDING. One wait per intent per round.
-- $1 intent ids, $2 indexes, $3 now
WITH picked AS (
    SELECT DISTINCT ON (p.intent_id) p.intent_id, p.idx
    FROM unnest((SELECT $1::text[]), $2::integer[]) AS p (intent_id, idx)
    ORDER BY p.intent_id, p.idx
), w AS (
    UPDATE intent_waits w SET resolved_time = coalesce($3::timestamptz, now())
    FROM picked p, intents i
    WHERE w.intent_id = p.intent_id AND w.idx = p.idx AND w.resolved_time IS NULL
      AND w.due_at <= coalesce($3::timestamptz, now())
      AND i.id = w.intent_id AND i.state = 'WAITING'
    RETURNING w.*, i.attempt AS intent_attempt, i.lease_token
), expired AS (
    UPDATE human_tasks t SET state = 'EXPIRED'
    FROM w WHERE w.kind = 'HUMAN' AND t.intent_id = w.intent_id AND t.idx = w.idx AND t.state = 'OPEN'
    RETURNING t.id
), step AS (
    INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time, size_bytes)
    SELECT w.intent_id, w.idx, w.step_name, d.doc, w.intent_attempt, w.lease_token, w.resolved_time,
           octet_length(d.doc::text) + octet_length(w.step_name)
    FROM w CROSS JOIN LATERAL (
        SELECT CASE w.kind WHEN 'TIME' THEN jsonb_build_object('fired', intentd_rfc3339(w.due_at))
                           WHEN 'HUMAN' THEN jsonb_build_object('timed_out', true, 'task_id', w.task_id)
                           ELSE jsonb_build_object('timed_out', true) END AS doc) d
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), changed AS (
    UPDATE intents i
    SET steps_completed = i.steps_completed + 1, last_step_index = greatest(i.last_step_index, s.idx),
        last_step = s.name, history_bytes = i.history_bytes + s.size_bytes,
        state = 'PENDING', available_at = s.record_time, update_time = s.record_time, last_seq = i.last_seq + 1
    FROM step s
    WHERE i.id = s.intent_id
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time, i.to_agent
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_name, step_index, message,
                               wait_kind, wait_name, task_id)
    SELECT c.id, c.last_seq, 'TIMER_FIRED', c.update_time, c.state, c.attempt, w.step_name, w.idx,
           CASE WHEN w.kind = 'TIME' THEN NULL ELSE 'TIMEOUT' END, w.kind, w.name, w.task_id
    FROM changed c JOIN w ON w.intent_id = c.id
)
SELECT c.id, c.to_agent, w.kind, w.idx FROM changed c JOIN w ON w.intent_id = c.id;

-- name: due_reminders
-- Open tasks past their reminder, not reminded yet, their intents locked.
-- $1 now, $2 batch size
SELECT t.id, t.intent_id
FROM human_tasks t JOIN intents i ON i.id = t.intent_id
WHERE t.state = 'OPEN' AND NOT t.reminded AND t.remind_at IS NOT NULL
  AND t.remind_at <= coalesce($1::timestamptz, now())
ORDER BY t.remind_at
LIMIT $2
FOR UPDATE OF i SKIP LOCKED;

-- name: remind_tasks
-- One TASK_REMINDED event per task, once; one task per intent per round.
-- $1 task ids, $2 now
WITH t AS (
    UPDATE human_tasks t SET reminded = true
    FROM (SELECT DISTINCT ON (x.intent_id) x.id
          FROM human_tasks x WHERE x.id = ANY ($1::text[]) AND x.state = 'OPEN' AND NOT x.reminded
          ORDER BY x.intent_id, x.id) p
    WHERE t.id = p.id
    RETURNING t.id, t.intent_id, t.idx, t.title
), changed AS (
    UPDATE intents i SET last_seq = i.last_seq + 1, update_time = coalesce($2::timestamptz, now())
    FROM t WHERE i.id = t.intent_id
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time
)
INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_index, wait_kind, wait_name, task_id)
SELECT c.id, c.last_seq, 'TASK_REMINDED', c.update_time, c.state, c.attempt, t.idx, 'HUMAN', t.title, t.id
FROM changed c JOIN t ON t.intent_id = c.id
RETURNING task_id;
