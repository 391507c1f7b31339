-- Streams out of an intent (docs/streams.md): chunks an agent emits while it
-- works, read live or later by offset.

-- How long an intent type keeps its intents' streams after they end; NULL:
-- as long as the intent (retention deletes them with it).
ALTER TABLE intent_types ADD COLUMN stream_keep_ms bigint CHECK (stream_keep_ms >= 0);

-- What the emit statement checks under the intent's row lock, so that its
-- limits hold exactly however many emits race: the bytes emitted so far,
-- the chunks of the current one-second window (stream_window_at its start)
-- and the names of the intent's streams (at most 16); stream_emit_key: the
-- last applied EmitWrite as attempt * 2^32 + seq, so a repeat (seq not above
-- it within the attempt) appends nothing, and a new attempt starts above it.
ALTER TABLE intents
    ADD COLUMN stream_emit_key bigint NOT NULL DEFAULT 0,
    ADD COLUMN stream_bytes bigint NOT NULL DEFAULT 0 CHECK (stream_bytes >= 0),
    ADD COLUMN stream_window_at timestamptz,
    ADD COLUMN stream_window_chunks integer NOT NULL DEFAULT 0 CHECK (stream_window_chunks >= 0),
    ADD COLUMN stream_names text[] NOT NULL DEFAULT '{}' CHECK (cardinality(stream_names) <= 16);

-- One row per stream of an intent: its head. next_offset is the offset of
-- its next entry; updating it is what orders the stream's appends, so
-- offsets are dense and appear in commit order. open_positions: the
-- positions of its chunk entries that no marker superseded yet and that may
-- not be recorded (the candidates of the next marker; docs/streams.md).
-- keep_ms: the type's stream_keep_ms when the stream was first written.
-- pruned: its entries were deleted (keep_ms after the intent's end).
CREATE TABLE intent_streams (
    intent_id      text NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    name           text NOT NULL CHECK (name ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    next_offset    bigint NOT NULL DEFAULT 0 CHECK (next_offset >= 0),
    bytes          bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    open_positions integer[] NOT NULL DEFAULT '{}',
    keep_ms        bigint CHECK (keep_ms >= 0),
    pruned         boolean NOT NULL DEFAULT false,
    create_time    timestamptz NOT NULL DEFAULT now(),
    update_time    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (intent_id, name)
);
-- The pruner's candidates: streams with a keep time not pruned yet.
CREATE INDEX intent_streams_prunable ON intent_streams (intent_id) WHERE keep_ms IS NOT NULL AND NOT pruned;

-- The entries of streams, one row per append (a frame: the chunks of one
-- EmitWrite, or one marker), not per chunk: a stream of 100,000 tokens is a
-- few thousand rows. Entries first_offset .. end_offset - 1, one array
-- element each: positions, formats (ChunkFormat numbers), data. A marker
-- frame holds one entry (position 0, format 0, empty data) and sets
-- superseded (the positions it supersedes) and reason (SupersedeReason).
-- Insert-only; rows leave with their stream (pruning) or intent (retention).
CREATE TABLE stream_frames (
    intent_id    text NOT NULL,
    stream       text NOT NULL,
    end_offset   bigint NOT NULL,
    first_offset bigint NOT NULL CHECK (first_offset >= 0 AND first_offset < end_offset),
    attempt      integer NOT NULL CHECK (attempt >= 1),
    time         timestamptz NOT NULL DEFAULT now(),
    positions    integer[] NOT NULL,
    formats      smallint[] NOT NULL,
    data         bytea[] NOT NULL,
    superseded   integer[],
    reason       smallint,
    PRIMARY KEY (intent_id, stream, end_offset),
    FOREIGN KEY (intent_id, stream) REFERENCES intent_streams (intent_id, name) ON DELETE CASCADE,
    CHECK (cardinality(positions) = end_offset - first_offset
           AND cardinality(formats) = end_offset - first_offset
           AND cardinality(data) = end_offset - first_offset),
    CHECK ((superseded IS NULL) = (reason IS NULL))
);
-- Readers with skip_superseded load a stream's markers on their own.
CREATE INDEX stream_frames_markers ON stream_frames (intent_id, stream, end_offset) WHERE superseded IS NOT NULL;

-- One notification per statement that appended frames, one line
-- "intent_id:stream:end_offset" per stream (its highest end offset), cut
-- below PostgreSQL's 8000-byte payload limit as the events' are
-- (migration 0003). Readers are woken by it and read the frames.
CREATE FUNCTION intentd_notify_streams() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    FOR chunk IN
        SELECT string_agg(line, E'\n' ORDER BY n)
        FROM (
            SELECT line, n,
                   (sum(octet_length(line) + 1) OVER (ORDER BY n) - octet_length(line) - 1) / 7000 AS part
            FROM (
                SELECT intent_id || ':' || stream || ':' || max(end_offset) AS line,
                       row_number() OVER (ORDER BY intent_id, stream) AS n
                FROM new_frames
                GROUP BY intent_id, stream
            ) lines
        ) numbered
        GROUP BY part
        ORDER BY part
    LOOP
        PERFORM pg_notify('intentd_streams', chunk);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER stream_frames_notify AFTER INSERT ON stream_frames
    REFERENCING NEW TABLE AS new_frames
    FOR EACH STATEMENT EXECUTE FUNCTION intentd_notify_streams();
