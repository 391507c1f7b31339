-- intentd schema, version 1. The state machine below is the one in
-- proto/intentd/v1/intent.proto and docs/state-machine.md; tests/integration/test_migrations.py
-- (test_proto_sql_and_python_states_agree) keeps the three in agreement.

CREATE TYPE intent_state AS ENUM (
    'PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING',
    'COMPLETED', 'FAILED', 'CANCELED', 'TIMED_OUT'
);

-- Every allowed change of state. The trigger below refuses any other, so a
-- bug in a query cannot move an intent along an edge the design does not have.
CREATE TABLE intent_transitions (
    from_state intent_state NOT NULL,
    to_state   intent_state NOT NULL,
    PRIMARY KEY (from_state, to_state)
);

INSERT INTO intent_transitions (from_state, to_state) VALUES
    ('PENDING', 'DELIVERED'), ('PENDING', 'CANCELED'), ('PENDING', 'TIMED_OUT'),
    ('DELIVERED', 'IN_PROGRESS'), ('DELIVERED', 'PENDING'), ('DELIVERED', 'FAILED'),
    ('DELIVERED', 'CANCELED'), ('DELIVERED', 'TIMED_OUT'),
    ('IN_PROGRESS', 'COMPLETED'), ('IN_PROGRESS', 'FAILED'), ('IN_PROGRESS', 'PENDING'),
    ('IN_PROGRESS', 'WAITING'), ('IN_PROGRESS', 'CANCELED'), ('IN_PROGRESS', 'TIMED_OUT'),
    ('WAITING', 'PENDING'), ('WAITING', 'CANCELED'), ('WAITING', 'TIMED_OUT'), ('WAITING', 'FAILED'),
    ('FAILED', 'PENDING');

CREATE FUNCTION intentd_check_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM intent_transitions
                   WHERE from_state = OLD.state AND to_state = NEW.state) THEN
        RAISE EXCEPTION 'intent %: transition % -> % is not allowed', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

-- Per-type delivery settings; an intent copies them when it is created.
CREATE TABLE intent_types (
    tenant               text    NOT NULL,
    intent_type          text    NOT NULL,
    max_attempts         integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 1000),
    heartbeat_timeout_ms integer NOT NULL DEFAULT 10000 CHECK (heartbeat_timeout_ms BETWEEN 100 AND 86400000),
    retry_backoff_ms     integer NOT NULL DEFAULT 100 CHECK (retry_backoff_ms >= 0),
    retry_backoff_max_ms integer NOT NULL DEFAULT 60000 CHECK (retry_backoff_max_ms >= 0),
    default_deadline_ms  bigint CHECK (default_deadline_ms > 0),
    update_time          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, intent_type)
);

CREATE TABLE intents (
    id                   text PRIMARY KEY,
    tenant               text NOT NULL,
    intent_type          text NOT NULL,
    to_agent             text NOT NULL,
    sender               text NOT NULL,
    payload              jsonb NOT NULL,
    idempotency_key      text,
    labels               jsonb NOT NULL DEFAULT '{}',
    state                intent_state NOT NULL DEFAULT 'PENDING',
    attempt              integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts         integer NOT NULL CHECK (max_attempts >= 1),
    heartbeat_timeout_ms integer NOT NULL,
    retry_backoff_ms     integer NOT NULL DEFAULT 100,
    retry_backoff_max_ms integer NOT NULL DEFAULT 60000,
    -- The delivery: token (fencing) of the latest attempt (kept after it
    -- ends, so a repeated final write from that attempt is recognised), the
    -- sidecar stream holding it and when it lapses without a heartbeat (both
    -- set exactly while DELIVERED or IN_PROGRESS).
    lease_token          uuid,
    lease_session        text,
    lease_expires_at     timestamptz,
    -- Not claimable before this (retry backoff).
    available_at         timestamptz NOT NULL,
    deadline             timestamptz,
    result               jsonb,
    error_code           text,
    error_message        text,
    cancel_reason        text,
    steps_completed      integer NOT NULL DEFAULT 0,
    last_step            text,
    checkpoint           jsonb,
    checkpoint_time      timestamptz,
    progress_message     text,
    progress_fraction    double precision,
    -- seq of the newest row in intent_events; bumped by the statement that adds it.
    last_seq             bigint NOT NULL DEFAULT 0,
    create_time          timestamptz NOT NULL,
    update_time          timestamptz NOT NULL,
    finish_time          timestamptz,
    CONSTRAINT intents_lease_iff_leased CHECK (
        (state IN ('DELIVERED', 'IN_PROGRESS')) = (lease_session IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT intents_leased_has_token CHECK (
        state NOT IN ('DELIVERED', 'IN_PROGRESS') OR (lease_token IS NOT NULL AND attempt >= 1)),
    CONSTRAINT intents_finish_iff_terminal CHECK (
        (state IN ('COMPLETED', 'FAILED', 'CANCELED', 'TIMED_OUT')) = (finish_time IS NOT NULL)),
    CONSTRAINT intents_attempts_bounded CHECK (attempt <= max_attempts),
    CONSTRAINT intents_result_iff_completed CHECK ((state = 'COMPLETED') = (result IS NOT NULL))
);

CREATE TRIGGER intents_transition BEFORE UPDATE OF state ON intents
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION intentd_check_transition();

-- Idempotency keys are scoped per tenant and sender.
CREATE UNIQUE INDEX intents_idempotency ON intents (tenant, sender, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The dispatch scan: only PENDING rows, oldest first per address.
CREATE INDEX intents_pending ON intents (to_agent, available_at, id) WHERE state = 'PENDING';
-- The lease sweep: only leased rows.
CREATE INDEX intents_leased ON intents (lease_expires_at) WHERE state IN ('DELIVERED', 'IN_PROGRESS');
CREATE INDEX intents_leased_by_session ON intents (lease_session) WHERE lease_session IS NOT NULL;
-- The deadline sweep: only live rows that have a deadline.
CREATE INDEX intents_deadline ON intents (deadline)
    WHERE deadline IS NOT NULL AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING');
-- Listing, newest first (ids are time ordered).
CREATE INDEX intents_list ON intents (tenant, id DESC);
-- Retention of terminal rows.
CREATE INDEX intents_finished ON intents (finish_time) WHERE finish_time IS NOT NULL;

CREATE TABLE intent_events (
    intent_id         text NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    seq               bigint NOT NULL CHECK (seq >= 1),
    type              text NOT NULL,
    time              timestamptz NOT NULL,
    state             intent_state NOT NULL,
    attempt           integer NOT NULL,
    step_name         text,
    step_index        integer,
    message           text,
    error_code        text,
    error_message     text,
    progress_fraction double precision,
    PRIMARY KEY (intent_id, seq)
);

-- One row per recorded step; written in the same statement as its event, so
-- a step is skipped on replay only if that transaction committed.
CREATE TABLE intent_steps (
    intent_id   text NOT NULL REFERENCES intents (id) ON DELETE CASCADE,
    idx         integer NOT NULL CHECK (idx >= 1),
    name        text NOT NULL,
    result      jsonb NOT NULL,
    attempt     integer NOT NULL,
    lease_token uuid NOT NULL,
    record_time timestamptz NOT NULL,
    PRIMARY KEY (intent_id, idx)
);

-- Watchers and waiters (any replica) are woken by the event's commit.
CREATE FUNCTION intentd_notify_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('intentd_events', NEW.intent_id || ':' || NEW.seq || ':' || NEW.state);
    RETURN NULL;
END $$;

CREATE TRIGGER intent_events_notify AFTER INSERT ON intent_events
    FOR EACH ROW EXECUTE FUNCTION intentd_notify_event();

-- Dispatchers are woken when an intent becomes claimable for an address.
-- The wake-up is only a hint: dispatchers also claim on a timer, so a lost
-- notification delays work but never strands it.
CREATE FUNCTION intentd_notify_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('intentd_pending', NEW.to_agent);
    RETURN NULL;
END $$;

CREATE TRIGGER intents_notify_pending AFTER INSERT OR UPDATE OF state ON intents
    FOR EACH ROW WHEN (NEW.state = 'PENDING')
    EXECUTE FUNCTION intentd_notify_pending();
