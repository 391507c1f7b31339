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
-- $5 now, $6 ack timeout ms, $7 tenant, $8 the largest history the stream
-- can be sent whole (NULL: any; it fetches pages)
WITH candidates AS (
    SELECT id FROM intents
    WHERE state = 'PENDING'
      AND to_agent = ANY ($2::text[])
      AND tenant = $7
      AND available_at <= coalesce($5::timestamptz, now())
      AND ($3::text[] IS NULL OR intent_type = ANY ($3::text[]))
      AND attempt - parked_attempts < max_attempts
      AND (deadline IS NULL OR deadline > coalesce($5::timestamptz, now()))
      AND ($8::bigint IS NULL OR history_bytes <= $8)
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
-- Pages of the steps recorded for intents of one tenant, from index $3 on:
-- each intent's page is its first $6 recorded steps from there (by index;
-- positions may be holes, so not "positions $3 .. $3 + $6"), ending before
-- the step that would take it past $4 bytes (the first step is always in
-- it), all pages together before $5 bytes (the very first step is always
-- in). A page is therefore every step recorded from $3 up to its last one.
-- A step counts its size_bytes plus 32 for the rest of its message. Only
-- sizes are read to cut the pages, never the results of steps left out.
-- $1 intent ids, $2 tenant, $3 first index, $4 bytes per intent,
-- $5 bytes in all, $6 steps per intent
SELECT intent_id, idx, name, result, attempt, record_time, size_bytes
FROM (
    SELECT mine.*,
           sum(size_bytes + 32) OVER (ORDER BY intent_id, idx) AS upto_all,
           row_number() OVER (ORDER BY intent_id, idx) AS n_all
    FROM (
        SELECT s.intent_id, s.idx, s.name, s.result, s.attempt, s.record_time, s.size_bytes,
               row_number() OVER w AS n, sum(s.size_bytes + 32) OVER w AS upto
        FROM intents i
        CROSS JOIN LATERAL (
            SELECT * FROM intent_steps st
            WHERE st.intent_id = i.id AND st.idx >= $3
            ORDER BY st.idx LIMIT $6
        ) s
        WHERE i.id = ANY ($1::text[]) AND i.tenant = $2
        WINDOW w AS (PARTITION BY s.intent_id ORDER BY s.idx)
    ) mine
    WHERE n = 1 OR upto <= $4
) page
WHERE n_all = 1 OR upto_all <= $5
ORDER BY intent_id, idx;

-- name: lease_holder
-- Whether a stream holds a live lease of an intent of the tenant; the
-- intent's highest recorded position when it does (Assignment.recorded_steps;
-- never below the count, as history.recorded_to).
-- $1 id, $2 token, $3 attempt, $4 session, $5 tenant
SELECT greatest(last_step_index, steps_completed) FROM intents
WHERE id = $1 AND lease_token = $2 AND attempt = $3 AND lease_session = $4 AND tenant = $5
  AND state IN ('DELIVERED', 'IN_PROGRESS');

-- name: ack_assignments
-- The ack of an attempt after the first also supersedes (REDELIVERED) the
-- chunks earlier attempts emitted at positions they did not record: per
-- stream of the intent with such open positions, a marker at the head's
-- next offset; then no position of the intent's streams is open (the rest
-- are recorded, never superseded). Acks of first attempts skip all of it:
-- the gate below is a one-time filter over the acked rows, so they touch
-- no stream table.
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
), lost AS (
    SELECT h.intent_id, h.name, c.attempt, c.update_time,
           ARRAY(SELECT p FROM unnest(h.open_positions) p
                 WHERE NOT EXISTS (SELECT 1 FROM intent_steps s WHERE s.intent_id = h.intent_id AND s.idx = p)
                 ORDER BY p) AS positions
    FROM changed c JOIN intent_streams h ON h.intent_id = c.id
    WHERE EXISTS (SELECT 1 FROM changed WHERE attempt > 1)
      AND c.attempt > 1 AND h.open_positions <> '{}'
), redelivered AS (
    UPDATE intent_streams h
    SET open_positions = '{}', next_offset = h.next_offset + (cardinality(l.positions) > 0)::integer,
        update_time = l.update_time
    FROM lost l
    WHERE h.intent_id = l.intent_id AND h.name = l.name
    RETURNING h.intent_id, h.name, h.next_offset, l.positions, l.attempt, l.update_time
), markers AS (
    INSERT INTO stream_frames (intent_id, stream, end_offset, first_offset, attempt, time, positions, formats, data,
                               superseded, reason)
    SELECT intent_id, name, next_offset, next_offset - 1, attempt, update_time, '{0}', '{0}', '{""}', positions, 1
    FROM redelivered
    WHERE cardinality(positions) > 0
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

-- name: lease_endings
-- Why leases a renewal no longer found were lost: the attempts among them
-- that ended CANCELED or TIMED_OUT (their holders are told that, not that
-- the lease lapsed, when the renewal runs ahead of the end's notification).
-- $1 ids, $2 attempts (one per id)
SELECT i.id, i.state
FROM intents i
JOIN unnest($1::text[], $2::int[]) AS l(id, attempt) ON l.id = i.id AND l.attempt = i.attempt
WHERE i.state IN ('CANCELED', 'TIMED_OUT');

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
RETURNING id, last_seq, state::text AS state;

-- name: record_steps
-- A step row and its event commit together: a step is skipped on replay only
-- if this statement committed. Any position not recorded yet is taken, in
-- any order: concurrent steps of an attempt finish in any order, and a
-- position below the highest may be a hole an earlier attempt left (its
-- step did not finish). steps_completed counts the recorded steps,
-- last_step_index is the highest recorded position. A position recorded
-- already inserts nothing (write_diagnoses answers with that record). Writes
-- after the intent's deadline are refused here (not only by the sweeper),
-- so nothing completes late. So is a step that would take the intent's
-- history past its limits (a position past the step limit, or bytes): the
-- history stays resumable, since the limit is met at the write, never at a
-- resume.
-- $1 ids, $2 tokens, $3 attempts, $4 indexes, $5 names, $6 results, $7 nows,
-- $8 the streams that must hold the leases (NULL: any),
-- $9 history byte limits, $10 history step limits
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::integer[], $5::text[], $6::text[],
                         $7::timestamptz[], $8::text[], $9::bigint[], $10::integer[])
        WITH ORDINALITY AS w (id, token, attempt, idx, name, result, at, session, max_bytes, max_steps, ord)
), lease AS (
    SELECT w.id, w.token, w.attempt, w.idx, w.name, w.at, w.max_bytes, w.max_steps, d.doc,
           octet_length(d.doc::text) + octet_length(w.name) AS size_bytes,
           i.history_bytes
    FROM w JOIN intents i ON i.id = w.id
    CROSS JOIN LATERAL (SELECT w.result::jsonb AS doc) d
    WHERE i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    FOR UPDATE OF i
), inserted AS (
    INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time, size_bytes)
    SELECT id, idx, name, doc, attempt, token, coalesce(at, now()), size_bytes
    FROM lease
    WHERE idx <= max_steps AND history_bytes + size_bytes <= max_bytes
    ON CONFLICT (intent_id, idx) DO NOTHING
    RETURNING *
), changed AS (
    UPDATE intents i
    SET steps_completed = i.steps_completed + 1, last_step_index = greatest(i.last_step_index, s.idx),
        last_step = s.name, update_time = s.record_time,
        last_seq = i.last_seq + 1, history_bytes = i.history_bytes + s.size_bytes
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
-- $5 the writing streams (NULL: any), $6 the writes' nows.
-- ended_by: how the write's attempt ended, if it did under this lease: 'fail'
-- or the release reason (a repeat of that write committed), LEASE_EXPIRED.
SELECT w.ord, i.state::text AS state, i.lease_token = w.token AND i.attempt = w.attempt AS same_lease,
       i.deadline IS NOT NULL AND i.deadline <= coalesce(w.at, now()) AS past_deadline,
       (w.session IS NULL OR i.lease_session = w.session) AS holds,
       i.steps_completed, i.last_step_index, i.history_bytes, s.idx, s.name, s.result, s.attempt AS step_attempt,
       s.record_time,
       CASE WHEN e.type IS NOT NULL THEN coalesce(e.message, 'fail') END AS ended_by,
       e.state::text AS ended_state, e.error_code AS ended_code,
       extract(epoch FROM i.finish_time - i.create_time)::float8 AS ended_age_s
FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::integer[], $5::text[], $6::timestamptz[])
    WITH ORDINALITY AS w (id, token, attempt, idx, session, at, ord)
JOIN intents i ON i.id = w.id
LEFT JOIN intent_steps s ON s.intent_id = i.id AND s.idx = w.idx
LEFT JOIN LATERAL (
    SELECT e.type, e.message, e.state, e.error_code FROM intent_events e
    WHERE e.intent_id = i.id AND e.attempt = w.attempt AND e.type IN ('FAILED', 'RELEASED')
    ORDER BY e.seq DESC LIMIT 1
) e ON i.lease_token = w.token AND i.attempt = w.attempt;

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
-- Retryable with attempts left: back to PENDING after the backoff; otherwise
-- FAILED (intentd_attempt_end, migration 0009, decides). After the deadline it matches nothing (the sweeper ends it TIMED_OUT).
-- $1 ids, $2 tokens, $3 attempts, $4 codes, $5 messages, $6 retryable, $7 nows,
-- $8 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::text[], $6::boolean[],
                         $7::timestamptz[], $8::text[])
        WITH ORDINALITY AS w (id, token, attempt, code, message, retryable, at, session, ord)
), changed AS (
    UPDATE intents i
    SET (state, available_at, finish_time, error_code, error_message) = (
            SELECT e.state, e.available_at, e.finish_time,
                   CASE WHEN e.exhausted THEN 'ATTEMPTS_EXHAUSTED' ELSE w.code END,
                   CASE WHEN e.exhausted
                        THEN 'attempt ' || (i.attempt - i.parked_attempts) || ' of ' || i.max_attempts || ' failed: '
                             || w.code || ': ' || w.message
                        ELSE w.message END
            FROM intentd_attempt_end(w.retryable, i.attempt - i.parked_attempts, i.max_attempts, true, i.retry_backoff_ms,
                                     i.retry_backoff_max_ms, coalesce(w.at, now())) e),
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
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
-- and SIDECAR_STOPPED count the attempt. DRAINED (a graceful shutdown, or an
-- assignment no agent took) grants it back, but only the first 10 times per
-- intent, counted from its DRAINED release events: a sidecar that keeps
-- giving an intent back cannot keep it alive for ever; later drains count.
-- A release after the deadline matches nothing (the deadline sweeper ends it
-- TIMED_OUT), as every other write.
-- $1 ids, $2 tokens, $3 attempts, $4 reasons, $5 nows,
-- $6 the streams that must hold the leases (NULL: any)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::timestamptz[], $6::text[])
        WITH ORDINALITY AS w (id, token, attempt, reason, at, session, ord)
), judged AS (
    SELECT w.*, CASE WHEN w.reason = 'DRAINED' THEN (
               SELECT count(*) < 10 FROM intent_events e
               WHERE e.intent_id = w.id AND e.message = 'DRAINED' AND e.type IN ('RELEASED', 'FAILED'))
           ELSE false END AS granted
    FROM w
), changed AS (
    UPDATE intents i
    SET max_attempts = i.max_attempts + w.granted::integer,
        (state, available_at, finish_time, error_code, error_message) = (
            SELECT e.state, e.available_at, e.finish_time,
                   CASE WHEN e.exhausted THEN 'ATTEMPTS_EXHAUSTED' ELSE i.error_code END,
                   CASE WHEN e.exhausted
                        THEN 'attempt ' || (i.attempt - i.parked_attempts) || ' of ' || i.max_attempts || ' ended: ' || w.reason
                             || CASE WHEN w.reason = 'DRAINED'
                                     THEN ' (drains of this intent no longer give the attempt back)' ELSE '' END
                        ELSE i.error_message END
            FROM intentd_attempt_end(true, i.attempt - i.parked_attempts, i.max_attempts + w.granted::integer, false,
                                     i.retry_backoff_ms, i.retry_backoff_max_ms, coalesce(w.at, now())) e),
        lease_session = NULL, lease_expires_at = NULL,
        update_time = coalesce(w.at, now()), last_seq = i.last_seq + 1
    FROM judged w
    WHERE i.id = w.id AND i.lease_token = w.token AND i.attempt = w.attempt AND i.state IN ('DELIVERED', 'IN_PROGRESS')
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
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
-- Deliveries never acknowledged within the ack timeout (DELIVERED) and
-- leases whose holder stopped renewing them (IN_PROGRESS): back to PENDING for the next
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
    SET (state, available_at, finish_time, error_code, error_message) = (
            SELECT e.state, e.available_at, e.finish_time,
                   CASE WHEN NOT e.exhausted THEN i.error_code ELSE 'ATTEMPTS_EXHAUSTED' END,
                   CASE WHEN NOT e.exhausted THEN i.error_message
                        WHEN i.state = 'DELIVERED'
                        THEN 'attempt ' || (i.attempt - i.parked_attempts) || ' of ' || i.max_attempts
                             || ' was not acknowledged within the ack timeout (its sidecar never confirmed'
                             || ' the delivery)'
                        ELSE 'attempt ' || (i.attempt - i.parked_attempts) || ' of ' || i.max_attempts
                             || ' lost its lease (no heartbeat)' END
            FROM intentd_attempt_end(true, i.attempt - i.parked_attempts, i.max_attempts, true, i.retry_backoff_ms,
                                     i.retry_backoff_max_ms, coalesce($1::timestamptz, now())) e),
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
