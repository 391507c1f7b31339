-- Durable waits (docs/waits.md): signals, human decisions and timers an
-- attempt can park on, holding no lease while it waits.

-- The hold window: how long an attempt that reached an unsatisfied wait
-- keeps its lease hoping for it before it parks. Per type, copied to the
-- intent when it is sent like the other delivery settings.
ALTER TABLE intent_types
    ADD COLUMN wait_hold_ms integer NOT NULL DEFAULT 2000 CHECK (wait_hold_ms BETWEEN 0 AND 30000);

-- parked_attempts: deliveries that ended by parking; they are not failures,
-- so the retry budget everywhere is attempt - parked_attempts. has_waits:
-- the intent registered a wait once, so its end must close waits and tasks
-- (the trigger below fires for no other intent).
ALTER TABLE intents
    ADD COLUMN parked_attempts integer NOT NULL DEFAULT 0 CHECK (parked_attempts >= 0),
    ADD COLUMN wait_hold_ms integer NOT NULL DEFAULT 2000 CHECK (wait_hold_ms BETWEEN 0 AND 30000),
    ADD COLUMN has_waits boolean NOT NULL DEFAULT false;
ALTER TABLE intents DROP CONSTRAINT intents_attempts_bounded;
ALTER TABLE intents ADD CONSTRAINT intents_attempts_bounded CHECK (attempt - parked_attempts <= max_attempts);

ALTER TABLE intent_events
    ADD COLUMN wait_kind text,
    ADD COLUMN wait_name text,
    ADD COLUMN signal_id text,
    ADD COLUMN task_id text;

-- One row per wait an intent reached, at its position in the step sequence.
-- Kept after it resolves (resolved_time) so a later attempt reaching it again
-- finds its first registration: its due time, its task.
CREATE TABLE intent_waits (
    intent_id     text NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    idx           integer NOT NULL CHECK (idx >= 1),
    kind          text NOT NULL CHECK (kind IN ('SIGNAL', 'HUMAN', 'TIME')),
    -- SIGNAL: the signal's name; HUMAN: the task's title; TIME: ''.
    name          text NOT NULL,
    -- The record's name (core.waits.record_name).
    step_name     text NOT NULL,
    -- TIME: when it fires; SIGNAL and HUMAN: when it times out; NULL: never.
    due_at        timestamptz,
    -- The attempt that registered it.
    attempt       integer NOT NULL,
    create_time   timestamptz NOT NULL,
    resolved_time timestamptz,
    task_id       text,
    PRIMARY KEY (intent_id, idx)
);
-- The timer sweep: only open waits with a due time.
CREATE INDEX intent_waits_due ON intent_waits (due_at) WHERE resolved_time IS NULL AND due_at IS NOT NULL;

-- The inbox: signals an intent received, in arrival order (seq); a wait
-- takes the oldest of its name (consumed_idx: its position).
CREATE TABLE intent_signals (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    intent_id    text NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    signal_id    text NOT NULL,
    name         text NOT NULL,
    payload      jsonb NOT NULL,
    sender       text NOT NULL,
    create_time  timestamptz NOT NULL,
    consumed_idx integer,
    -- The payload's size as sent, for the inbox's bound in bytes.
    size_bytes   integer NOT NULL,
    UNIQUE (intent_id, signal_id)
);
-- The oldest unconsumed signal of a name of an intent (and the count of an
-- intent's unconsumed signals, by its prefix).
CREATE INDEX intent_signals_inbox ON intent_signals (intent_id, name, seq) WHERE consumed_idx IS NULL;

-- One task per HUMAN wait.
CREATE TABLE human_tasks (
    id          text PRIMARY KEY,
    tenant      text NOT NULL,
    intent_id   text NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    intent_type text NOT NULL,
    to_agent    text NOT NULL,
    title       text NOT NULL,
    description text NOT NULL DEFAULT '',
    outcomes    text[] NOT NULL,
    assignees   text[] NOT NULL DEFAULT '{}',
    form_schema jsonb,
    state       text NOT NULL DEFAULT 'OPEN' CHECK (state IN ('OPEN', 'DECIDED', 'EXPIRED', 'CANCELED')),
    create_time timestamptz NOT NULL,
    due_at      timestamptz,
    remind_at   timestamptz,
    reminded    boolean NOT NULL DEFAULT false,
    outcome     text,
    decided_by  text,
    decide_time timestamptz,
    comment     text,
    form_data   jsonb,
    UNIQUE (intent_id, idx),
    CONSTRAINT human_tasks_decided_iff_outcome CHECK ((state = 'DECIDED') = (outcome IS NOT NULL))
);
-- Listing a tenant's tasks newest first (ids are time ordered), and its open
-- ones without reading the decided.
CREATE INDEX human_tasks_list ON human_tasks (tenant, id DESC);
CREATE INDEX human_tasks_open ON human_tasks (tenant, id DESC) WHERE state = 'OPEN';
-- The reminder sweep: only open tasks not reminded yet.
CREATE INDEX human_tasks_remind ON human_tasks (remind_at)
    WHERE state = 'OPEN' AND NOT reminded AND remind_at IS NOT NULL;

-- An intent that ends closes its open waits and cancels its open tasks, in
-- the statement that ends it, whichever it is (completion, failure, lease
-- expiry, cancel, deadline): a trigger, so no terminal statement can forget
-- it. It fires only for intents that registered a wait (has_waits, tested
-- in the WHEN clause without a function call), so the hot completions of
-- intents that never waited pay nothing. It runs under the intent's row
-- lock, taken by the ending statement, like every writer of waits.
CREATE FUNCTION intentd_close_waits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE intent_waits SET resolved_time = NEW.finish_time
    WHERE intent_id = NEW.id AND resolved_time IS NULL;
    UPDATE human_tasks SET state = 'CANCELED'
    WHERE intent_id = NEW.id AND state = 'OPEN';
    RETURN NULL;
END $$;

CREATE TRIGGER intents_close_waits AFTER UPDATE OF state ON intents
    FOR EACH ROW WHEN (NEW.has_waits AND NEW.finish_time IS NOT NULL AND OLD.finish_time IS NULL)
    EXECUTE FUNCTION intentd_close_waits();

-- Times inside recorded values: RFC 3339 in UTC, whatever the session's
-- TimeZone.
CREATE FUNCTION intentd_rfc3339(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- Parked intents are live (quotas count them) but must cost the hot path
-- nothing. intents_live_by_tenant held them, and right after a burst of
-- parks, before autovacuum had counted the rows, the generic plan of a claim
-- could prefer that index to intents_pending (both looked like one row) and
-- then filtered every parked row of the tenant on each claim: dispatch
-- latency 4x with 10,000 parked. The index now holds the active states, and
-- waiting rows are counted through an index of their own.
DROP INDEX intents_live_by_tenant;
CREATE INDEX intents_live_by_tenant ON intents (tenant) WHERE state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS');
CREATE INDEX intents_waiting_by_tenant ON intents (tenant) WHERE state = 'WAITING';

CREATE OR REPLACE FUNCTION intentd_live_room(p_tenant text) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    cap integer;
    live bigint;
BEGIN
    SELECT max_live_intents INTO cap FROM tenants WHERE name = p_tenant;
    IF cap IS NULL THEN
        RETURN NULL;
    END IF;
    -- 1769235561: 'intentd' as a key space of its own.
    PERFORM pg_advisory_xact_lock(1769235561, hashtext(p_tenant));
    SELECT (SELECT count(*) FROM intents WHERE tenant = p_tenant AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS'))
         + (SELECT count(*) FROM intents WHERE tenant = p_tenant AND state = 'WAITING')
    INTO live;
    RETURN greatest(cap - live, 0)::integer;
END $$;
