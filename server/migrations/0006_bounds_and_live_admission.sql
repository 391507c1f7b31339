-- Values the server can always give back, and live-intent admission decided
-- by the database.
--
-- Bounds. A deadline past year 9999 (an intent type's default_deadline_ms of
-- 10^15) was stored, then could not be read back into Python or protobuf:
-- the send that made it, and every read of the row after it, failed. The
-- server refuses such values (intentd/validation.py, MAX_HORIZON_MS: 100
-- years of 366 days); the same bounds hold here, so no path can store one.
-- Rows stored before are brought within them first.

UPDATE intent_types SET default_deadline_ms = 3162240000000 WHERE default_deadline_ms > 3162240000000;
UPDATE intent_types SET retry_backoff_ms = 3600000 WHERE retry_backoff_ms > 3600000;
UPDATE intent_types SET retry_backoff_max_ms = 86400000 WHERE retry_backoff_max_ms > 86400000;
ALTER TABLE intent_types
    ADD CONSTRAINT intent_types_default_deadline_bounded CHECK (default_deadline_ms <= 3162240000000),
    ADD CONSTRAINT intent_types_backoff_bounded CHECK (retry_backoff_ms <= 3600000 AND retry_backoff_max_ms <= 86400000);

UPDATE intents SET deadline = create_time + interval '36600 days'
WHERE deadline > create_time + interval '36600 days';
ALTER TABLE intents ADD CONSTRAINT intents_deadline_bounded
    CHECK (deadline <= create_time + interval '36600 days') NOT VALID;
ALTER TABLE intents VALIDATE CONSTRAINT intents_deadline_bounded;

-- Admission. How many more live intents a tenant with a max_live_intents
-- quota may have, NULL for a tenant without one. It takes a lock of the
-- tenant held to the end of the transaction, and only then counts: a
-- VOLATILE function's queries each see a fresh snapshot, so the count
-- includes every send admitted before the lock was granted, on any replica,
-- and the sends it admits are committed before the next count. Tenants
-- without a quota take no lock and count nothing.
CREATE FUNCTION intentd_live_room(p_tenant text) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
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
    SELECT count(*) INTO live FROM intents
    WHERE tenant = p_tenant AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS', 'WAITING');
    RETURN greatest(cap - live, 0)::integer;
END $$;
