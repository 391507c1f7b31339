-- One event notification per statement instead of one per event row.
--
-- The writes of attempts are set-based (a group commit applies all its acks,
-- all its steps... as one statement each), so a statement inserts many
-- events. A NOTIFY per row cost a trigger call, a notification queue entry
-- and a wake-up of every listening replica per event; now a statement sends
-- its events together, one "intent_id:seq:state" line each, joined by
-- newlines. A statement with one event sends exactly the old payload.
--
-- PostgreSQL refuses payloads of 8000 bytes or more, so the lines are cut
-- into chunks that start below 7000 bytes (a line is ~45 bytes; ids are 26
-- characters), each chunk its own notification.

DROP TRIGGER intent_events_notify ON intent_events;
DROP FUNCTION intentd_notify_event();

CREATE FUNCTION intentd_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    FOR chunk IN
        SELECT string_agg(line, E'\n' ORDER BY n)
        FROM (
            SELECT line, n,
                   -- Bytes before this line in the whole payload, so a chunk
                   -- is the lines that start in the same 7000-byte window.
                   (sum(octet_length(line) + 1) OVER (ORDER BY n) - octet_length(line) - 1) / 7000 AS part
            FROM (
                SELECT intent_id || ':' || seq || ':' || state AS line,
                       row_number() OVER (ORDER BY intent_id, seq) AS n
                FROM new_events
            ) lines
        ) numbered
        GROUP BY part
        ORDER BY part
    LOOP
        PERFORM pg_notify('intentd_events', chunk);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER intent_events_notify AFTER INSERT ON intent_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION intentd_notify_events();
