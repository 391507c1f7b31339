"""Query plans of the hot path on a big intents table.

Scenario 6 of the bench measures that a table full of finished intents does
not slow dispatch; this test says why, with EXPLAIN: every query the server
runs per intent or per tick reaches its rows through an index (the partial
ones keep finished rows out), never by reading the whole table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from intentd.server.queries import Q
from intentd.testing import bulk

TERMINAL = 60_000
PENDING = 3_000
ADDRESS = "agent://plans/test/a"


@pytest.fixture(scope="module")
async def big(databases: Any) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(databases.create())
    try:
        await conn.execute(bulk.TERMINAL, TERMINAL)
        await conn.execute(bulk.PENDING, PENDING)
        await conn.execute("VACUUM ANALYZE intents")
        yield conn
    finally:
        await conn.close()


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _intents_scans(conn: asyncpg.Connection, query: str, *args: Any) -> list[str]:
    """How each scan of ``intents`` in the plan reads it: its node type and index."""
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)
    (top,) = json.loads(raw)
    return [f"{node['Node Type']}:{node.get('Index Name', '')}" for node in _nodes(top["Plan"])
            if node.get("Relation Name") == "intents"]


# Each query, and the index its rows are found through (None: any index).
HOT_QUERIES = [
    ("claim_intents", "intents_pending",
     lambda: (Q.claim_intents, "session", [ADDRESS], None, 50, None, 5000, "default", None)),
    ("next_available", "intents_pending", lambda: (Q.next_available, [ADDRESS], None, None, "default")),
    ("renew_leases", "intents_leased_by_session", lambda: (Q.renew_leases, "session", None)),
    ("expire_leases", "intents_leased", lambda: (Q.expire_leases, None, 100)),
    ("expire_deadlines", "intents_deadline", lambda: (Q.expire_deadlines, None, 100)),
    ("count_live_intents", "intents_live_by_tenant", lambda: (Q.count_live_intents, "default")),
    ("get_intent", None, lambda: (Q.get_intent, "00000" + "0" * 20 + "7", "default")),
    ("ack_assignments", None, lambda: (Q.ack_assignments, ["x"], [uuid.uuid4()], [1], [None], [None])),
]


@pytest.mark.parametrize(("name", "index", "make"), HOT_QUERIES, ids=[name for name, _, _ in HOT_QUERIES])
async def test_hot_queries_use_indexes_on_a_big_table(
    big: asyncpg.Connection, name: str, index: str | None, make: Any
) -> None:
    query, *args = make()
    scans = await _intents_scans(big, query, *args)
    assert scans, f"{name} does not read intents at all?"
    assert not [scan for scan in scans if scan.startswith("Seq Scan")], f"{name}: {scans}"
    if index is not None:
        first = next(scan for scan in scans if not scan.startswith("ModifyTable"))
        assert first.endswith(f":{index}"), f"{name} finds its rows through {first}, not {index}"


async def test_retention_reads_finished_rows_by_their_index(big: asyncpg.Connection) -> None:
    scans = await _intents_scans(big, Q.delete_finished_intents, None, 86_400, 500)
    assert "Index Scan:intents_finished" in scans or "Index Only Scan:intents_finished" in scans, scans


WAITING = """
INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, state, attempt, parked_attempts,
                     max_attempts, heartbeat_timeout_ms, lease_token, available_at, steps_completed, last_seq,
                     create_time, update_time, has_waits)
SELECT '00002' || lpad(g::text, 21, '0'), 'default', 'bench.noop.v1', $2, 'bench', '{}'::jsonb, 'WAITING', 1, 1,
       3, 10000, gen_random_uuid(), t, 0, 4, t, t, true
FROM generate_series(1, $1::integer) AS g,
     LATERAL (SELECT now() - interval '1 hour' + g * interval '1 ms') AS x(t)
"""


async def test_claims_read_none_of_the_parked_intents_after_a_burst(databases: Any) -> None:
    """10,000 intents parked on the dispatching address since the table was
    last analyzed (a burst: autovacuum has not run yet), and the generic plan
    the server's prepared statement settles on: a claim must not read the
    parked rows, whichever index the planner picks. Found by the bench:
    dispatch latency rose 4x right after 10,000 intents parked, the claim
    filtering them through intents_live_by_tenant."""
    conn = await asyncpg.connect(databases.create())
    try:
        # Each went PENDING -> (delivered, taken) -> WAITING: the entries it
        # left in intents_pending are dead until a vacuum.
        await conn.execute(WAITING.replace("'WAITING'", "'PENDING'"), 10_000, ADDRESS)
        await conn.execute("ALTER TABLE intents DISABLE TRIGGER intents_transition")
        await conn.execute("UPDATE intents SET state = 'WAITING' WHERE state = 'PENDING'")
        await conn.execute("ALTER TABLE intents ENABLE TRIGGER intents_transition")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for name, _, make in HOT_QUERIES[:2]:
            query, *args = make()
            statement = await conn.prepare(query)
            (top,) = await statement.explain(*args, analyze=True)
            removed = sum(node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
                          for node in _nodes(top["Plan"]) if node.get("Relation Name") == "intents")
            assert removed == 0, f"{name} read {removed} parked rows: {json.dumps(top['Plan'])[:2000]}"
        live = await conn.fetchval(Q.count_live_intents, "default")
        assert live == 10_000
    finally:
        await conn.close()
