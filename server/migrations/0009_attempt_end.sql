-- The one rule for where an attempt that ended without a result goes: the
-- retryable failure, the release and the lease expiry (server/sql/leases.sql:
-- fail_intents, release_intents, expire_leases) all take their target state
-- from it, and only their error text differs.
-- retry: the way the attempt ended allows another one; it gets one while
-- attempts are left (else it is the dead letter, exhausted: the attempts ran
-- out, not the agent's own non-retryable failure). backoff: the next attempt
-- waits retry_backoff_ms doubled per attempt made, up to retry_backoff_max_ms
-- (a release redelivers at once).
CREATE FUNCTION intentd_attempt_end(
    retry boolean, attempt integer, max_attempts integer, backoff boolean,
    retry_backoff_ms integer, retry_backoff_max_ms integer, at timestamptz
) RETURNS TABLE (state intent_state, available_at timestamptz, finish_time timestamptz, exhausted boolean)
-- A set of one row, so that the planner inlines it into each statement.
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN again THEN 'PENDING' ELSE 'FAILED' END::intent_state,
           at + CASE WHEN backoff
                     THEN least(retry_backoff_max_ms, retry_backoff_ms * power(2, greatest(attempt - 1, 0)))
                     ELSE 0 END * interval '1 millisecond',
           CASE WHEN again THEN NULL ELSE at END,
           retry AND NOT again
    FROM (SELECT retry AND attempt < max_attempts AS again) decided
$$;
