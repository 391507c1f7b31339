-- Named queries for deliveries: claims, acknowledgements, lease renewal and
-- expiry, and the fenced writes of an attempt. Every write is guarded by
-- (id, lease_token, attempt, state) and by the stream holding the lease: a
-- stale attempt, or another stream that learnt the token, matches no row.
-- $now parameters are NULL in production (the database clock decides).

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

-- name: ack_assignment
-- $1 id, $2 token, $3 attempt, $4 now,
-- $5 the stream that must hold the lease (NULL: any)
WITH changed AS (
    UPDATE intents
    SET state = 'IN_PROGRESS',
        lease_expires_at = coalesce($4::timestamptz, now()) + heartbeat_timeout_ms * interval '1 millisecond',
        update_time = coalesce($4::timestamptz, now()), last_seq = last_seq + 1
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state = 'DELIVERED'
      AND ($5::text IS NULL OR lease_session = $5)
      AND (deadline IS NULL OR deadline > coalesce($4::timestamptz, now()))
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'ACKNOWLEDGED', update_time, state, attempt FROM changed
)
SELECT id FROM changed;

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
-- A reconnecting sidecar keeps a lease only if nobody took it over.
-- $1 id, $2 token, $3 attempt, $4 new session, $5 now, $6 tenant
UPDATE intents
SET lease_session = $4,
    lease_expires_at = CASE
        WHEN state = 'IN_PROGRESS'
        THEN coalesce($5::timestamptz, now()) + heartbeat_timeout_ms * interval '1 millisecond'
        ELSE lease_expires_at END
WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state IN ('DELIVERED', 'IN_PROGRESS')
  AND tenant = $6
RETURNING id, last_seq;

-- name: record_step
-- The step row and its event commit together: a step is skipped on replay
-- only if this statement committed. Writes after the intent's deadline are
-- refused here (not only by the sweeper), so nothing completes late.
-- $1 id, $2 token, $3 attempt, $4 index, $5 name, $6 result, $7 now,
-- $8 the stream that must hold the lease (NULL: any)
WITH lease AS (
    SELECT id, steps_completed FROM intents
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state = 'IN_PROGRESS'
      AND ($8::text IS NULL OR lease_session = $8)
      AND (deadline IS NULL OR deadline > coalesce($7::timestamptz, now()))
    FOR UPDATE
), inserted AS (
    INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time)
    SELECT id, $4, $5, $6::jsonb, $3, $2, coalesce($7::timestamptz, now())
    FROM lease WHERE steps_completed = $4 - 1
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), changed AS (
    UPDATE intents i
    SET steps_completed = s.idx, last_step = s.name, update_time = s.record_time,
        last_seq = i.last_seq + 1
    FROM inserted s
    WHERE i.id = s.intent_id
    RETURNING i.id, i.last_seq, i.state, i.attempt, i.update_time
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, step_name, step_index)
    SELECT id, last_seq, 'STEP_COMPLETED', update_time, state, attempt, $5, $4 FROM changed
)
SELECT * FROM inserted;

-- name: write_diagnosis
-- Why a fenced write matched no row. $1 id, $2 token, $3 attempt, $4 step
-- index, $5 the writing stream (NULL: any)
SELECT i.state::text AS state, i.lease_token = $2 AND i.attempt = $3 AS same_lease,
       i.deadline IS NOT NULL AND i.deadline <= now() AS past_deadline,
       ($5::text IS NULL OR i.lease_session = $5) AS holds,
       i.steps_completed, s.idx, s.name, s.result, s.attempt AS step_attempt, s.record_time
FROM intents i
LEFT JOIN intent_steps s ON s.intent_id = i.id AND s.idx = $4
WHERE i.id = $1;

-- name: save_checkpoint
-- $1 id, $2 token, $3 attempt, $4 state, $5 now,
-- $6 the stream that must hold the lease (NULL: any)
WITH changed AS (
    UPDATE intents
    SET checkpoint = $4::jsonb, checkpoint_time = coalesce($5::timestamptz, now()),
        update_time = coalesce($5::timestamptz, now()), last_seq = last_seq + 1
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state = 'IN_PROGRESS'
      AND ($6::text IS NULL OR lease_session = $6)
      AND (deadline IS NULL OR deadline > coalesce($5::timestamptz, now()))
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'CHECKPOINT_SAVED', update_time, state, attempt FROM changed
)
SELECT id FROM changed;

-- name: report_progress
-- $1 id, $2 token, $3 attempt, $4 message, $5 fraction, $6 now,
-- $7 the stream that must hold the lease (NULL: any)
WITH changed AS (
    UPDATE intents
    SET progress_message = $4, progress_fraction = $5,
        update_time = coalesce($6::timestamptz, now()), last_seq = last_seq + 1
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state = 'IN_PROGRESS'
      AND ($7::text IS NULL OR lease_session = $7)
      AND (deadline IS NULL OR deadline > coalesce($6::timestamptz, now()))
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, progress_fraction)
    SELECT id, last_seq, 'PROGRESS', update_time, state, attempt, $4, $5 FROM changed
)
SELECT id FROM changed;

-- name: complete_intent
-- $1 id, $2 token, $3 attempt, $4 result, $5 now,
-- $6 the stream that must hold the lease (NULL: any)
WITH changed AS (
    UPDATE intents
    SET state = 'COMPLETED', result = $4::jsonb, error_code = NULL, error_message = NULL,
        lease_session = NULL, lease_expires_at = NULL,
        finish_time = coalesce($5::timestamptz, now()), update_time = coalesce($5::timestamptz, now()),
        last_seq = last_seq + 1
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state = 'IN_PROGRESS'
      AND ($6::text IS NULL OR lease_session = $6)
      AND (deadline IS NULL OR deadline > coalesce($5::timestamptz, now()))
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)
    SELECT id, last_seq, 'COMPLETED', update_time, state, attempt FROM changed
)
SELECT id, extract(epoch FROM finish_time - create_time)::float8 AS age_s FROM changed;

-- name: fail_intent
-- Retryable with attempts left: back to PENDING after the backoff; otherwise FAILED.
-- $1 id, $2 token, $3 attempt, $4 code, $5 message, $6 retryable, $7 now,
-- $8 the stream that must hold the lease (NULL: any)
WITH changed AS (
    UPDATE intents
    SET state = CASE WHEN $6 AND attempt < max_attempts THEN 'PENDING' ELSE 'FAILED' END::intent_state,
        error_code = CASE WHEN $6 AND attempt >= max_attempts THEN 'ATTEMPTS_EXHAUSTED' ELSE $4 END,
        error_message = CASE WHEN $6 AND attempt >= max_attempts
                             THEN 'attempt ' || attempt || ' of ' || max_attempts || ' failed: ' || $4 || ': ' || $5
                             ELSE $5 END,
        available_at = coalesce($7::timestamptz, now())
            + least(retry_backoff_max_ms, retry_backoff_ms * power(2, greatest(attempt - 1, 0)))
              * interval '1 millisecond',
        finish_time = CASE WHEN $6 AND attempt < max_attempts THEN NULL
                           ELSE coalesce($7::timestamptz, now()) END,
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce($7::timestamptz, now()), last_seq = last_seq + 1
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state = 'IN_PROGRESS'
      AND ($8::text IS NULL OR lease_session = $8)
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, error_code, error_message)
    SELECT id, last_seq, CASE WHEN state = 'PENDING' THEN 'RELEASED' ELSE 'FAILED' END,
           update_time, state, attempt, error_code, error_message
    FROM changed
)
SELECT id, state::text AS state, error_code, extract(epoch FROM finish_time - create_time)::float8 AS age_s
FROM changed;

-- name: release_intent
-- Give an intent back without a result, for immediate redelivery. AGENT_DIED
-- counts the attempt; DRAINED (a graceful shutdown) grants it back.
-- $1 id, $2 token, $3 attempt, $4 reason, $5 now,
-- $6 the stream that must hold the lease (NULL: any)
WITH changed AS (
    UPDATE intents
    SET max_attempts = CASE WHEN $4 = 'DRAINED' THEN max_attempts + 1 ELSE max_attempts END,
        state = CASE WHEN $4 = 'DRAINED' OR attempt < max_attempts THEN 'PENDING'
                     ELSE 'FAILED' END::intent_state,
        error_code = CASE WHEN $4 = 'DRAINED' OR attempt < max_attempts THEN error_code
                          ELSE 'ATTEMPTS_EXHAUSTED' END,
        error_message = CASE WHEN $4 = 'DRAINED' OR attempt < max_attempts THEN error_message
                             ELSE 'attempt ' || attempt || ' of ' || max_attempts || ' ended: ' || $4 END,
        finish_time = CASE WHEN $4 = 'DRAINED' OR attempt < max_attempts THEN NULL
                           ELSE coalesce($5::timestamptz, now()) END,
        available_at = coalesce($5::timestamptz, now()),
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce($5::timestamptz, now()), last_seq = last_seq + 1
    WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND state IN ('DELIVERED', 'IN_PROGRESS')
      AND ($6::text IS NULL OR lease_session = $6)
    RETURNING *
), event AS (
    INSERT INTO intent_events (intent_id, seq, type, time, state, attempt, message, error_code, error_message)
    SELECT id, last_seq, CASE WHEN state = 'PENDING' THEN 'RELEASED' ELSE 'FAILED' END,
           update_time, state, attempt, $4, error_code, error_message
    FROM changed
)
SELECT id, state::text AS state, error_code, extract(epoch FROM finish_time - create_time)::float8 AS age_s
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
