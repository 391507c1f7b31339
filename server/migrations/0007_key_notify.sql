-- A change to an API key (revoked, expiry moved, created, deleted) is
-- announced on intentd_keys with the key's id, so every replica drops what
-- it cached about the key and re-judges the streams and calls using it at
-- once instead of at its next poll. Keys change rarely: one row's notify.

CREATE FUNCTION intentd_notify_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('intentd_keys', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END;
$$;

-- last_used_time is touched by the servers themselves about once a minute per
-- key: that is no change anyone needs to hear about.
CREATE TRIGGER api_keys_notify AFTER INSERT OR DELETE OR UPDATE OF revoke_time, expire_time, roles,
    address_patterns, secret_sha256, tenant ON api_keys
    FOR EACH ROW EXECUTE FUNCTION intentd_notify_key();
