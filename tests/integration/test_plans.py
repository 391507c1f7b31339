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
