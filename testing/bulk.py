"""Bulk test data: many finished and pending intents written straight into the
tables with generate_series (no events or steps), for query-plan checks and the
scale benchmark, which need a big table in seconds rather than a real history."""

from __future__ import annotations

import time

import asyncpg

TERMINAL = """
INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, state, attempt, max_attempts,
                     heartbeat_timeout_ms, lease_token, available_at, result, steps_completed, last_step,
                     last_seq, create_time, update_time, finish_time)
SELECT '00000' || lpad(g::text, 21, '0'), 'default', 'bench.noop.v1', 'agent://bench/old/a' || (g % 100),
       'bench', '{}'::jsonb, 'COMPLETED', 1, 3, 10000, gen_random_uuid(), t, '{"ok": true}'::jsonb, 1, 'noop',
       5, t, t + interval '20 ms', t + interval '20 ms'
FROM generate_series(1, $1::integer) AS g,
     LATERAL (SELECT now() - interval '2 days' + g * interval '1 ms') AS x(t)
"""
PENDING = """
INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts, heartbeat_timeout_ms,
                     available_at, last_seq, create_time, update_time)
SELECT '00001' || lpad(g::text, 21, '0'), 'default', 'bench.noop.v1', 'agent://bench/backlog/a' || (g % 100),
       'bench', '{}'::jsonb, 3, 10000, t, 1, t, t
FROM generate_series(1, $1::integer) AS g,
     LATERAL (SELECT now() - interval '1 day' + g * interval '1 ms') AS x(t)
"""



async def bulk_load(url: str, terminal: int, pending: int) -> float:
    """Loads ``terminal`` COMPLETED and ``pending`` PENDING intents, then VACUUM ANALYZEs; returns the seconds taken."""
    began = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(TERMINAL, terminal)
        await conn.execute(PENDING, pending)
        await conn.execute("VACUUM ANALYZE intents")
    finally:
        await conn.close()
    return time.monotonic() - began
