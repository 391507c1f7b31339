-- Named queries for the write side of streams (docs/streams.md): appending
-- the chunks of emits, STEP_RETRIED markers and pruning. The REDELIVERED
-- markers are written by ack_assignments (leases.sql). Every write is fenced
-- like the other writes of an attempt (lease token, attempt, IN_PROGRESS,
-- the stream holding the lease) and decides under the intent's row lock, so
-- that racing emits of one intent see each other's limits and keys.

-- name: emit_chunks
-- The group commit's emits (at most one per intent, each to one stream).
-- Returns a row per write whose lease held, with its verdict decided under
-- the intent's row lock: 'ok' (appended: its kept chunks, dropped those at a
-- position intent_steps recorded), 'repeat' (its key is not above the last
-- applied: nothing appended), or the limit it would pass ('streams',
-- 'bytes', 'rate': nothing of it appended, nothing else changed). A write
-- whose lease did not hold returns nothing (write_diagnoses explains it).
-- The head's next_offset upsert orders a stream's appends (dense offsets in
-- commit order); intents.stream_* carry the intent's totals and window.
-- $1 ids, $2 tokens, $3 attempts, $4 stream names, $5 emit keys
-- (attempt * 2^32 + seq), $6 nows, $7 the streams that must hold the leases
-- (NULL: any), $8 byte limits, $9 chunks-per-second limits, $10 stream
-- count limits; flat, one element per chunk: $11 data, $12 formats,
-- $13 positions, $14 owners (the ord of each chunk's write)
WITH w AS (
    SELECT * FROM unnest((SELECT $1::text[]), $2::uuid[], $3::integer[], $4::text[], $5::bigint[],
                         $6::timestamptz[], $7::text[], $8::bigint[], $9::integer[], $10::integer[])
        WITH ORDINALITY AS w (id, token, attempt, name, emit_key, at, session, max_bytes, max_rate, max_streams,
                              ord)
), lease AS MATERIALIZED (
    SELECT w.ord, w.id, w.attempt, w.name, w.emit_key, coalesce(w.at, now()) AS t, w.max_bytes, w.max_rate,
           w.max_streams, i.tenant, i.intent_type, i.stream_emit_key, i.stream_bytes, i.stream_window_at,
           i.stream_window_chunks, i.stream_names,
           -- The write falls in a new one-second window (or the first).
           (i.stream_window_at IS NULL OR coalesce(w.at, now()) >= i.stream_window_at + interval '1 second')
               AS new_window
    FROM w JOIN intents i ON i.id = w.id
    WHERE i.lease_token = w.token AND i.attempt = w.attempt AND i.state = 'IN_PROGRESS'
      AND (w.session IS NULL OR i.lease_session = w.session)
      AND (i.deadline IS NULL OR i.deadline > coalesce(w.at, now()))
    FOR UPDATE OF i
), c AS (
    SELECT * FROM unnest((SELECT $11::bytea[]), $12::smallint[], $13::integer[], $14::integer[])
        WITH ORDINALITY AS c (data, format, position, owner, n)
), kept AS (
    -- The position rule: a chunk at a recorded position was emitted when
    -- that position ran.
    SELECT c.* FROM c JOIN lease l ON l.ord = c.owner
    WHERE NOT EXISTS (SELECT 1 FROM intent_steps s WHERE s.intent_id = l.id AND s.idx = c.position)
), sums AS (
    SELECT l.ord, count(k.n)::integer AS n, coalesce(sum(octet_length(k.data)), 0)::bigint AS bytes,
           coalesce(array_agg(k.data ORDER BY k.n) FILTER (WHERE k.n IS NOT NULL), '{}') AS data,
           coalesce(array_agg(k.format ORDER BY k.n) FILTER (WHERE k.n IS NOT NULL), '{}') AS formats,
           coalesce(array_agg(k.position ORDER BY k.n) FILTER (WHERE k.n IS NOT NULL), '{}') AS positions,
           coalesce(array_agg(DISTINCT k.position ORDER BY k.position) FILTER (WHERE k.n IS NOT NULL), '{}') AS open_positions
    FROM lease l LEFT JOIN kept k ON k.owner = l.ord
    GROUP BY l.ord
), windowed AS (
    SELECT l.*, s.n, s.bytes, s.data, s.formats, s.positions, s.open_positions,
           l.name = ANY (l.stream_names) AS known,
           -- The chunks of the window this write falls in, before it.
           CASE WHEN l.new_window THEN 0 ELSE l.stream_window_chunks END AS window_before
    FROM lease l JOIN sums s ON s.ord = l.ord
), judged AS (
    SELECT d.*,
           CASE WHEN d.emit_key <= d.stream_emit_key THEN 'repeat'
                WHEN d.n > 0 AND NOT d.known AND cardinality(d.stream_names) >= d.max_streams THEN 'streams'
                WHEN d.stream_bytes + d.bytes > d.max_bytes THEN 'bytes'
                WHEN d.window_before + d.n > d.max_rate THEN 'rate'
                ELSE 'ok' END AS verdict
    FROM windowed d
), applied AS (
    UPDATE intents i
    SET stream_emit_key = j.emit_key,
        stream_bytes = i.stream_bytes + j.bytes,
        stream_window_at = CASE WHEN j.n > 0 AND j.new_window THEN j.t ELSE i.stream_window_at END,
        stream_window_chunks = CASE WHEN j.n = 0 THEN i.stream_window_chunks ELSE j.window_before + j.n END,
        stream_names = CASE WHEN j.n = 0 OR j.known THEN i.stream_names ELSE i.stream_names || j.name END
    FROM judged j
    WHERE i.id = j.id AND j.verdict = 'ok'
    RETURNING i.id
), heads AS (
    INSERT INTO intent_streams AS h (intent_id, name, next_offset, bytes, open_positions, keep_ms, create_time,
                                     update_time)
    SELECT j.id, j.name, j.n, j.bytes, j.open_positions, t.stream_keep_ms, j.t, j.t
    FROM judged j
    LEFT JOIN intent_types t ON t.tenant = j.tenant AND t.intent_type = j.intent_type
    WHERE j.verdict = 'ok' AND j.n > 0
    ON CONFLICT (intent_id, name) DO UPDATE
    SET next_offset = h.next_offset + EXCLUDED.next_offset, bytes = h.bytes + EXCLUDED.bytes,
        open_positions = ARRAY(SELECT DISTINCT p FROM unnest(h.open_positions || EXCLUDED.open_positions) p
                               ORDER BY p),
        update_time = EXCLUDED.update_time
    RETURNING h.intent_id, h.next_offset
), frames AS (
    INSERT INTO stream_frames (intent_id, stream, end_offset, first_offset, attempt, time, positions, formats, data)
    SELECT j.id, j.name, h.next_offset, h.next_offset - j.n, j.attempt, j.t, j.positions, j.formats, j.data
    FROM judged j JOIN heads h ON h.intent_id = j.id
)
SELECT j.ord, j.verdict, coalesce(h.next_offset - j.n, 0) AS first_offset, j.n AS appended, j.t AS time, j.bytes,
       j.stream_bytes, j.window_before, cardinality(j.stream_names) AS streams,
       -- A rate refusal passes when the window does, unless the write alone
       -- holds more chunks than a window takes (0: it never passes).
       CASE WHEN j.verdict = 'rate' AND j.n <= j.max_rate
            THEN greatest(1, ceil(extract(epoch FROM j.stream_window_at + interval '1 second' - j.t) * 1000))
            ELSE 0 END::bigint AS retry_after_ms
FROM judged j LEFT JOIN heads h ON h.intent_id = j.id;

-- name: supersede_positions
-- STEP_RETRIED markers of one EmitWrite, before its chunks: for each stream
-- of the intent whose open positions meet $6, a marker (at the head's next
-- offset) superseding that intersection, which leaves open_positions. Only
-- when the write's key is above the last applied (a repeat changes
-- nothing: its markers were written; its re-run's chunks must not be
-- superseded again); $7: the write has no chunks, so this statement applies
-- its key (otherwise its chunks' statement does). One row when the lease
-- held: repeat, and the markers written.
-- $1 id, $2 token, $3 attempt, $4 now, $5 the stream that must hold the
-- lease (NULL: any), $6 positions, $7 apply the key, $8 key
WITH lease AS MATERIALIZED (
    SELECT i.id, i.stream_emit_key >= $8::bigint AS repeat, coalesce($4::timestamptz, now()) AS t
    FROM intents i
    WHERE i.id = $1 AND i.lease_token = $2 AND i.attempt = $3 AND i.state = 'IN_PROGRESS'
      AND ($5::text IS NULL OR i.lease_session = $5)
      AND (i.deadline IS NULL OR i.deadline > coalesce($4::timestamptz, now()))
    FOR UPDATE OF i
), hit AS (
    SELECT h.intent_id, h.name, l.t,
           ARRAY(SELECT p FROM unnest(h.open_positions) p WHERE p = ANY ($6::integer[]) ORDER BY p) AS positions
    FROM lease l JOIN intent_streams h ON h.intent_id = l.id
    WHERE NOT l.repeat AND h.open_positions && $6::integer[]
), heads AS (
    UPDATE intent_streams h
    SET next_offset = h.next_offset + 1,
        open_positions = ARRAY(SELECT p FROM unnest(h.open_positions) p WHERE p <> ALL ($6::integer[]) ORDER BY p),
        update_time = hit.t
    FROM hit
    WHERE h.intent_id = hit.intent_id AND h.name = hit.name
    RETURNING h.intent_id, h.name, h.next_offset, hit.positions, hit.t
), frames AS (
    INSERT INTO stream_frames (intent_id, stream, end_offset, first_offset, attempt, time, positions, formats, data,
                               superseded, reason)
    SELECT intent_id, name, next_offset, next_offset - 1, $3, t, '{0}', '{0}', '{""}', positions, 2
    FROM heads
), keyed AS (
    UPDATE intents i SET stream_emit_key = $8::bigint
    FROM lease l
    WHERE i.id = l.id AND $7::boolean AND NOT l.repeat
)
SELECT l.repeat, (SELECT count(*) FROM heads)::integer AS markers FROM lease l;

-- name: prune_streams
-- Deletes the entries of streams whose keep time after their intent's end
-- passed, a batch at a time (heads another replica is pruning are skipped),
-- and marks the heads pruned (their counts stay). The candidates come from
-- the partial index of heads with a keep time not pruned yet, each intent's
-- end read by its key; the heads are found again by ctid (locked by this
-- statement, they cannot move before it ends). Returns the streams pruned.
-- $1 now, $2 batch size
WITH due AS (
    SELECT h.ctid AS head, h.intent_id, h.name
    FROM intent_streams h
    WHERE h.keep_ms IS NOT NULL AND NOT h.pruned
      AND (SELECT i.finish_time FROM intents i WHERE i.id = h.intent_id) + h.keep_ms * interval '1 millisecond'
          <= coalesce($1::timestamptz, now())
    LIMIT $2
    FOR UPDATE OF h SKIP LOCKED
), gone AS (
    DELETE FROM stream_frames f USING due
    WHERE f.intent_id = due.intent_id AND f.stream = due.name
), pruned AS (
    UPDATE intent_streams h
    SET pruned = true, open_positions = '{}', update_time = coalesce($1::timestamptz, now())
    WHERE h.ctid = ANY (ARRAY(SELECT head FROM due))
    RETURNING h.intent_id
)
SELECT count(*)::integer FROM pruned;
