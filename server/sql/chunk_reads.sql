-- Named queries of the stream readers (server/chunk_reader.py,
-- docs/streams.md). The caller has read the intent in its tenant first
-- (get_intent), so these look streams up by intent id alone.

-- name: stream_head
-- $1 intent id, $2 stream name. No row: nothing was emitted to it yet.
SELECT name, next_offset, bytes, pruned, create_time, update_time
FROM intent_streams
WHERE intent_id = $1 AND name = $2;

-- name: stream_frames_from
-- The frames holding entries at or after the cursor $3, in offset order: at
-- most $4 frames, and no more after those whose stored size reaches $5 (the
-- first one always comes), so one read is about one page of a reader
-- however its stream was written. upto: the stored size up to and with the
-- frame (a last row with upto >= $5 means that more may follow).
-- $1 intent id, $2 stream, $3 cursor, $4 max frames, $5 byte budget.
SELECT first_offset, end_offset, attempt, time, positions, formats, data, superseded, reason, upto
FROM (
    SELECT f.*, sum(pg_column_size(f.data)) OVER (ORDER BY f.end_offset ROWS UNBOUNDED PRECEDING) AS upto
    FROM stream_frames f
    WHERE f.intent_id = $1 AND f.stream = $2 AND f.end_offset > $3
    ORDER BY f.end_offset
    LIMIT $4
) f
WHERE upto - pg_column_size(data) < $5
ORDER BY end_offset;

-- name: stream_markers_from
-- The markers at offsets from $3 on (partial index stream_frames_markers):
-- what skip_superseded leaves out. $1 intent id, $2 stream, $3 offset.
SELECT first_offset, superseded
FROM stream_frames
WHERE intent_id = $1 AND stream = $2 AND end_offset > $3 AND superseded IS NOT NULL
ORDER BY end_offset;

-- name: list_intent_streams
-- The intent's streams by name, the intent in the tenant. No row: no such
-- intent in the tenant; one row with a NULL name: it has no stream yet.
-- $1 intent id, $2 tenant.
SELECT s.name, s.next_offset, s.bytes, s.pruned, s.create_time, s.update_time
FROM intents i
LEFT JOIN intent_streams s ON s.intent_id = i.id
WHERE i.id = $1 AND i.tenant = $2
ORDER BY s.name;
