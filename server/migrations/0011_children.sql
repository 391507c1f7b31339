-- Child intents and parallel steps (docs/children.md).

-- A child is an ordinary intent with a parent: the intent whose handler
-- started it, at position parent_idx of the parent's step sequence (the
-- ord-th child of that start). No foreign key: retention deletes a finished
-- parent without touching its (maybe detached, still live) children, and no
-- child statement ever locks its parent row through a constraint check.
-- detached: left running when the parent ends; child_count: children
-- started, so the end of an intent that never started one pays nothing.
-- last_step_index: the highest recorded position. Parallel steps record out
-- of order, so steps_completed (how many are recorded) and the highest
-- position differ while an attempt runs steps concurrently, and holes stay
-- where an attempt ended before its concurrent steps were recorded.
ALTER TABLE intents
    ADD COLUMN parent_id text,
    ADD COLUMN parent_idx integer,
    ADD COLUMN parent_ord integer,
    ADD COLUMN detached boolean NOT NULL DEFAULT false,
    ADD COLUMN child_count integer NOT NULL DEFAULT 0 CHECK (child_count >= 0),
    ADD COLUMN last_step_index integer NOT NULL DEFAULT 0 CHECK (last_step_index >= 0);
UPDATE intents SET last_step_index = steps_completed WHERE steps_completed > 0;
ALTER TABLE intents ADD CONSTRAINT intents_child_position
    CHECK ((parent_id IS NULL) = (parent_idx IS NULL) AND (parent_id IS NULL) = (parent_ord IS NULL));

-- A parent's children in the order they were started; also what makes a
-- start exactly once (one child per parent, position and order).
CREATE UNIQUE INDEX intents_children ON intents (parent_id, parent_idx, parent_ord) WHERE parent_id IS NOT NULL;

ALTER TABLE intent_events
    ADD COLUMN child_id text,
    ADD COLUMN child_state text;

-- An AGENT wait waits for children: all of them (ALL) or the first (FIRST).
ALTER TABLE intent_waits DROP CONSTRAINT intent_waits_kind_check;
ALTER TABLE intent_waits ADD CONSTRAINT intent_waits_kind_check CHECK (kind IN ('SIGNAL', 'HUMAN', 'TIME', 'AGENT'));
ALTER TABLE intent_waits
    ADD COLUMN children text[],
    ADD COLUMN child_mode text CHECK (child_mode IN ('ALL', 'FIRST'));
ALTER TABLE intent_waits ADD CONSTRAINT intent_waits_agent_children
    CHECK ((kind = 'AGENT') = (children IS NOT NULL AND child_mode IS NOT NULL));

-- Agent keys name the addresses their agents may start children at.
ALTER TABLE api_keys ADD COLUMN send_patterns text[] NOT NULL DEFAULT '{}';

-- What the ends of intents in a family owe each other, written by the
-- ending statement and applied by the child sweeper (server/children.py):
-- FINISHED (a child ended: its parent gets CHILD_FINISHED and its AGENT
-- waits are judged), PARENT_ENDED (a parent ended: its live children that
-- are not detached are canceled). Insert-only for the ending statement, so
-- a child's end never waits for its parent's row lock, and the sweeper,
-- which locks parents and then children with SKIP LOCKED, never waits for
-- anything: no lock order between the generations can deadlock.
CREATE TABLE child_notices (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('FINISHED', 'PARENT_ENDED')),
    -- FINISHED: the parent to tell; PARENT_ENDED: the parent that ended.
    parent_id   text NOT NULL,
    -- FINISHED: the child that ended.
    child_id    text,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION intentd_family_notices() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.parent_id IS NOT NULL THEN
        INSERT INTO child_notices (kind, parent_id, child_id) VALUES ('FINISHED', NEW.parent_id, NEW.id);
    END IF;
    IF NEW.child_count > 0 THEN
        INSERT INTO child_notices (kind, parent_id) VALUES ('PARENT_ENDED', NEW.id);
    END IF;
    RETURN NULL;
END $$;

-- Fires only for members of a family (tested in the WHEN clause), so the
-- hot completions of intents without parent or children pay nothing.
CREATE TRIGGER intents_family_notices AFTER UPDATE OF state ON intents
    FOR EACH ROW WHEN ((NEW.parent_id IS NOT NULL OR NEW.child_count > 0)
                       AND NEW.finish_time IS NOT NULL AND OLD.finish_time IS NULL)
    EXECUTE FUNCTION intentd_family_notices();

-- One wake-up per statement for the sweepers of every replica.
CREATE FUNCTION intentd_notify_children() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('intentd_children', '');
    RETURN NULL;
END $$;

CREATE TRIGGER child_notices_notify AFTER INSERT ON child_notices
    FOR EACH STATEMENT EXECUTE FUNCTION intentd_notify_children();
