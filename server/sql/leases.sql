-- Named queries for deliveries: claims, acknowledgements, lease renewal and
-- expiry, and the fenced writes of an attempt. Every write is guarded by
-- (id, lease_token, attempt, state) and by the stream holding the lease: a
-- stale attempt, or another stream that learnt the token, matches no row.
-- $now parameters are NULL in production (the database clock decides).
--
-- The fenced writes of attempts (acks, steps, checkpoints, progress,
-- completions, failures, releases) are set-based: each takes one array
-- per argument, a group of writes of one kind from the write batcher (at most
-- one per intent, so no row is changed twice by one statement), and returns a
-- row per write that applied, with the write's 1-based position in the
-- arrays as ``ord``; a write that matched no row returns nothing, exactly as
-- it would have alone. The guards are those of a single write, row by row.
-- Their first array is read through a subquery, ``(SELECT $1::text[])``:
-- the planner then guesses the length of the arrays (10) instead of counting
-- them, so a plan made for the values of one call costs the same as the
-- prepared statement's generic plan, which PostgreSQL then keeps using;
-- otherwise a group of fewer than 10 writes always looks cheaper with a plan
-- of its own, and every execution is planned again (~0.4 ms each).

-- name: claim_intents
-- $1 session, $2 addresses, $3 intent types (NULL: all), $4 how many,
-- $5 now, $6 ack timeout ms, $7 tenant
WITH candidates AS (
    SELECT id FROM intents
    WHERE state = 'PENDING'
      AND to_agent = ANY ($2::text[])
      AND tenant = $7
      AND available_at <= coalesce($5::timestamptz, now())
      AND ($3::text[] IS NULL OR intent_type = ANY ($3::text[]))
      AND attempt < max_attempts
    ORDER BY available_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE intents i
    SET state = 'DELIVERED', attempt = i.attempt + 1, lease_token = gen_random_uuid(),
        lease_session = $1,
        lease_expires_at = coalesce($5::timestamptz, now()) + $6 * interval '1 millisecond',
        update_time = coalesce($5::timestamptz, now()), last_seq = i.last_seq + 1
    FROM candidates c
    WHERE i.id = c.id AND i.state = 'PENDING'
    RETURNING i.*
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'DELIVERED', update_time, state, attempt FROM claimed
)
SELECT * FROM claimed ORDER BY available_at, id;

-- name: next_available
-- Seconds until the earliest PENDING intent for these addresses becomes
-- claimable (retry backoff), so a dispatcher sleeps exactly until then.
-- $1 addresses, $2 intent types (NULL: all), $3 now, $4 tenant
SELECT extract(epoch FROM min(available_at) - coalesce($3::timestamptz, now()))::float8 FROM intents
WHERE state = 'PENDING'
  AND to_agent = ANY ($1::text[])
  AND tenant = $4
  AND available_at > coalesce($3::timestamptz, now())
  AND ($2::text[] IS NULL OR intent_type = ANY ($2::text[]));

-- name: steps_of
-- $1 intent ids
SELECT * FROM intent_steps WHERE intent_id = ANY ($1::text[]) ORDER BY intent_id, idx;

-- name: ack_assignments
-- $1 ids, $2 tokens, $3 attempts, $4 nows,
-- $5 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::timestamptz[], $5::text[])
        WITH ORDINALITY AS w (id, token, attempt, at, session, ord)
), changed AS (
    UPDATE intents i
    SET state = 'IN_PROGRESS',
        lease_expires_at = coalesce(w.at, now()) + i.heartbeat_timeout_ms * interval '1 millisecond',
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'DELIVERED'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    RETURNING w.ord, i.id, i.last_seq, i.update_time, i.state, i.attempt
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'ACKNOWLEDGED', update_time, state, attempt FROM changed
)
SELECT ord, id FROM changed;

-- name: renew_leases
-- Every ping of a stream renews the acknowledged leases it holds. Returns all
-- the leases it still holds, so the server can tell which were lost.
-- $1 session, $2 now
UPDATE intents
SET lease_expires_at = CASE
        WHEN state = 'IN_PROGRESS'
        THEN coalesce($2::timestamptz, now()) + heartbeat_timeout_ms * interval '1 millisecond'
        ELSE lease_expires_at END
WHERE lease_session = $1 AND state IN ('DELIVERED', 'IN_PROGRESS')
RETURNING id, lease_token, attempt;

-- name: rebind_lease
-- A reconnecting sidecar keeps a lease only if nobody took it over, and only
-- for an address the new stream serves (its addresses were checked against
-- its key's patterns): a key scoped to dev cannot take over a prod lease.
-- $1 id, $2 token, $3 attempt, $4 new session, $5 now, $6 tenant, $7 the stream's addresses
UPDATE intents
SET lease_session = $4,
    lease_expires_at = CASE
        WHEN state = 'IN_PROGRESS'
        THEN coalesce($5::timestamptz, now()) + heartbeat_timeout_ms * interval '1 millisecond'
        ELSE lease_expires_at END
WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state IN ('DELIVERED', 'IN_PROGRESS')
  AND tenant = $6 AND to_agent = ANY($7::text[])
RETURNING id, last_seq;

-- name: record_steps
-- A step row and its event commit together: a step is skipped on replay only
-- if this statement committed. Writes after the intent's deadline are refused
-- here (not only by the sweeper), so nothing completes late.
-- $1 ids, $2 tokens, $3 attempts, $4 indexes, $5 names, $6 results, $7 nows,
-- $8 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::integer[], $5::text[], $6::text[],
                         $7::timestamptz[], $8::text[])
        WITH ORDINALITY AS w (id, token, attempt, idx, name, result, at, session, ord)
), lease AS (
    SELECT w.id, w.token, w.attempt, w.idx, w.name, w.result, w.at, i.steps_completed
    FROM w JOIN intents i ON i.id = w.id
    WHERE i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    FOR UPDATE OF i
), inserted AS (
    INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time)
    SELECT id, idx, name, result::jsonb, attempt, token, coalesce(at, now())
    FROM lease WHERE steps_completed = idx - 1
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), changed AS (
    UPDATE intents i
    SET steps_completed = s.idx, last_step = s.name, update_time = s.record_time,
        last_seq = i.last_seq + 1
    FROM inserted s
    WHERE i.id = s.intent_id
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time, s.name, s.idx
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_name, step_index)
    SELECT id, last_seq, 'STEP_COMPLETED', update_time, state, attempt, name, idx FROM changed
)
SELECT w.ord, s.* FROM inserted s JOIN w ON w.id = s.intent_id;

-- name: write_diagnoses
-- Why fenced writes matched no row, read right after them (in their
-- transaction). $1 ids, $2 tokens, $3 attempts, $4 step indexes (0: none),
-- $5 the writing streams (NULL: any), $6 the writes' nows
SELECT w.ord, i.state::text AS state, i.lease_token = w.token AND i.attempt = w.attempt AS same_lease,
       i.deadline IS NOT NULL AND i.deadline <= coalesce(w.at, now()) AS past_deadline,
       (w.session IS NULL OR i.lease_session = w.session) AS holds,
       i.steps_completed, s.idx, s.name, s.result, s.attempt AS step_attempt, s.record_time
FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::integer[], $5::text[], $6::timestamptz[])
    WITH ORDINALITY AS w (id, token, attempt, idx, session, at, ord)
JOIN intents i ON i.id = w.id
LEFT JOIN intent_steps s ON s.intent_id = i.id AND s.idx = w.idx;

-- name: save_checkpoints
-- $1 ids, $2 tokens, $3 attempts, $4 states, $5 nows,
-- $6 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::timestamptz[], $6::text[])
        WITH ORDINALITY AS w (id, token, attempt, checkpoint, at, session, ord)
), changed AS (
    UPDATE intents i
    SET checkpoint = w.checkpoint::jsonb, checkpoint_time = coalesce(w.at, now()),
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    RETURNING w.ord, i.id, i.last_seq, i.update_time, i.state, i.attempt
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'CHECKPOINT_SAVED', update_time, state, attempt FROM changed
)
SELECT ord, id FROM changed;

-- name: report_progresses
-- $1 ids, $2 tokens, $3 attempts, $4 messages, $5 fractions, $6 nows,
-- $7 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::float8[], $6::timestamptz[],
                         $7::text[])
        WITH ORDINALITY AS w (id, token, attempt, message, fraction, at, session, ord)
), changed AS (
    UPDATE intents i
    SET progress_message = w.message, progress_fraction = w.fraction,
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    RETURNING w.ord, i.id, i.last_seq, i.update_time, i.state, i.attempt, w.message, w.fraction
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, progress_fraction)
    SELECT id, last_seq, 'PROGRESS', update_time, state, attempt, message, fraction FROM changed
)
SELECT ord, id FROM changed;

-- name: complete_intents
-- $1 ids, $2 tokens, $3 attempts, $4 results, $5 nows,
-- $6 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::timestamptz[], $6::text[])
        WITH ORDINALITY AS w (id, token, attempt, result, at, session, ord)
), changed AS (
    UPDATE intents i
    SET state = 'COMPLETED', result = w.result::jsonb, error_code = NULL, error_message = NULL,
        lease_session = NULL, lease_expires_at = NULL,
        finish_time = coalesce(w.at, now()), update_time = coalesce(w.at, now()),
        last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    RETURNING w.ord, i.id, i.last_seq, i.update_time, i.state, i.attempt, i.finish_time, i.create_time
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'COMPLETED', update_time, state, attempt FROM changed
)
SELECT ord, id, extract(epoch FROM finish_time - create_time)::float8 AS age_s FROM changed;

-- name: fail_intents
-- Retryable with attempts left: back to PENDING after the backoff; otherwise FAILED.
-- $1 ids, $2 tokens, $3 attempts, $4 codes, $5 messages, $6 retryable, $7 nows,
-- $8 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::text[], $6::boolean[],
                         $7::timestamptz[], $8::text[])
        WITH ORDINALITY AS w (id, token, attempt, code, message, retryable, at, session, ord)
), changed AS (
    UPDATE intents i
    SET state = CASE WHEN w.retryable AND i.attempt < i.max_attempts THEN 'PENDING' ELSE 'FAILED' END::intent_state,
        error_code = CASE WHEN w.retryable AND i.attempt >= i.max_attempts THEN 'ATTEMPTS_EXHAUSTED' ELSE w.code END,
        error_message = CASE WHEN w.retryable AND i.attempt >= i.max_attempts
                             THEN 'attempt ' || i.attempt || ' of ' || i.max_attempts || ' failed: '
                                  || w.code || ': ' || w.message
                             ELSE w.message END,
        available_at = coalesce(w.at, now())
            + least(i.retry_backoff_max_ms, i.retry_backoff_ms * power(2, greatest(i.attempt - 1, 0)))
              * interval '1 millisecond',
        finish_time = CASE WHEN w.retryable AND i.attempt < i.max_attempts THEN NULL
                           ELSE coalesce(w.at, now()) END,
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
    RETURNING w.ord, i.*
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, error_code, error_message)
    SELECT id, last_seq, CASE WHEN state = 'PENDING' THEN 'RELEASED' ELSE 'FAILED' END,
           update_time, state, attempt, error_code, error_message
    FROM changed
)
SELECT ord, id, state::text AS state, error_code, extract(epoch FROM finish_time - create_time)::float8 AS age_s
FROM changed;

-- name: release_intents
-- Give intents back without a result, for immediate redelivery. AGENT_DIED
-- counts the attempt; DRAINED (a graceful shutdown) grants it back.
-- $1 ids, $2 tokens, $3 attempts, $4 reasons, $5 nows,
-- $6 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::timestamptz[], $6::text[])
        WITH ORDINALITY AS w (id, token, attempt, reason, at, session, ord)
), changed AS (
    UPDATE intents i
    SET max_attempts = CASE WHEN w.reason = 'DRAINED' THEN i.max_attempts + 1 ELSE i.max_attempts END,
        state = CASE WHEN w.reason = 'DRAINED' OR i.attempt < i.max_attempts THEN 'PENDING'
                     ELSE 'FAILED' END::intent_state,
        error_code = CASE WHEN w.reason = 'DRAINED' OR i.attempt < i.max_attempts THEN i.error_code
                          ELSE 'ATTEMPTS_EXHAUSTED' END,
        error_message = CASE WHEN w.reason = 'DRAINED' OR i.attempt < i.max_attempts THEN i.error_message
                             ELSE 'attempt ' || i.attempt || ' of ' || i.max_attempts || ' ended: ' || w.reason END,
        finish_time = CASE WHEN w.reason = 'DRAINED' OR i.attempt < i.max_attempts THEN NULL
                           ELSE coalesce(w.at, now()) END,
        available_at = coalesce(w.at, now()),
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state IN ('DELIVERED', 'IN_PROGRESS')
      AND (w.session IS NULL OR i.lease_session = w.session)
    RETURNING w.ord, w.reason, i.*
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, error_code, error_message)
    SELECT id, last_seq, CASE WHEN state = 'PENDING' THEN 'RELEASED' ELSE 'FAILED' END,
           update_time, state, attempt, reason, error_code, error_message
    FROM changed
)
SELECT ord, id, state::text AS state, error_code, extract(epoch FROM finish_time - create_time)::float8 AS age_s
FROM changed;

-- name: expire_leases
-- Leases whose holder stopped renewing them: back to PENDING for the next
-- attempt after the backoff, or FAILED / ATTEMPTS_EXHAUSTED (the dead letter).
-- Safe in every replica at once. A lease whose renewals could not land
-- because PostgreSQL itself was down is not a dead holder: nothing expires
-- until one full heartbeat timeout after the server (re)started.
-- $1 now, $2 batch size
WITH due AS (
    SELECT id FROM intents
    WHERE state IN ('DELIVERED', 'IN_PROGRESS')
      AND lease_expires_at <= coalesce($1::timestamptz, now())
      AND pg_postmaster_start_time() + heartbeat_timeout_ms * interval '1 millisecond'
          <= coalesce($1::timestamptz, now())
    ORDER BY lease_expires_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), changed AS (
    UPDATE intents i
    SET state = CASE WHEN i.attempt < i.max_attempts THEN 'PENDING' ELSE 'FAILED' END::intent_state,
        error_code = CASE WHEN i.attempt < i.max_attempts THEN i.error_code ELSE 'ATTEMPTS_EXHAUSTED' END,
        error_message = CASE WHEN i.attempt < i.max_attempts THEN i.error_message
                             ELSE 'attempt ' || i.attempt || ' of ' || i.max_attempts
                                  || ' lost its lease (no heartbeat)' END,
        finish_time = CASE WHEN i.attempt < i.max_attempts THEN NULL
                           ELSE coalesce($1::timestamptz, now()) END,
        available_at = coalesce($1::timestamptz, now())
            + least(i.retry_backoff_max_ms, i.retry_backoff_ms * power(2, greatest(i.attempt - 1, 0)))
              * interval '1 millisecond',
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce($1::timestamptz, now()), last_seq = i.last_seq + 1
    FROM due
    WHERE i.id = due.id AND i.state IN ('DELIVERED', 'IN_PROGRESS')
      AND i.lease_expires_at <= coalesce($1::timestamptz, now())
    RETURNING i.*
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, error_code, error_message)
    SELECT id, last_seq, CASE WHEN state = 'PENDING' THEN 'RELEASED' ELSE 'FAILED' END,
           update_time, state, attempt, 'LEASE_EXPIRED', error_code, error_message
    FROM changed
)
SELECT id, state::text AS state, attempt, extract(epoch FROM finish_time - create_time)::float8 AS age_s
FROM changed;
