"""Schema: migrations from scratch and re-run, the advisory lock, and the
state machine stated once and enforced by the database."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from intentd.core.states import LIVE_STATES, TERMINAL_STATES, TRANSITIONS, IntentState
from intentd.generated.v1 import intent_pb2
from intentd.server.migrate import available_migrations, current_version, migrate
from intentd.server.queries import Q, load_queries, parse_queries
from tests.support import run_sync


async def test_from_scratch_then_rerun_is_a_noop(databases) -> None:
    url = databases.create(migrated=False)
    conn = await asyncpg.connect(url)
    try:
        assert await current_version(conn) == 0
        applied = await migrate(conn)
        assert applied == [m.version for m in available_migrations()]
        assert await current_version(conn) == len(available_migrations())
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"intents", "intent_events", "intent_steps", "intent_types", "intent_transitions"} <= tables
        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(databases) -> None:
    url = databases.create(migrated=False)
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [r for r in results if r]
        assert len(applied) == 1, results
        count = await conns[0].fetchval("SELECT count(*) FROM intentd_schema_migrations")
        assert count == len(available_migrations())
    finally:
        for c in conns:
            await c.close()


def test_proto_sql_and_python_states_agree(database_url: str) -> None:
    proto_names = [
        n.removeprefix("INTENT_STATE_") for n in intent_pb2.IntentState.keys() if n != "INTENT_STATE_UNSPECIFIED"]
    assert proto_names == [s.value for s in IntentState]

    async def sql() -> tuple[list[str], set[tuple[str, str]]]:
        conn = await asyncpg.connect(database_url)
        try:
            labels = [r[0] for r in await conn.fetch(Q.enum_states)]
            edges = {(r[0], r[1]) for r in await conn.fetch(Q.transitions)}
            return labels, edges
        finally:
            await conn.close()

    labels, edges = run_sync(sql())
    assert labels == [s.value for s in IntentState]
    assert edges == {(a.value, b.value) for a, b in TRANSITIONS}
    for state in IntentState:
        assert state.from_proto(state.to_proto()) is state
    # Terminal states have no way out except FAILED -> PENDING (retry of a dead letter).
    exits = {a for a, _ in TRANSITIONS}
    assert exits & TERMINAL_STATES == {IntentState.FAILED}
    assert LIVE_STATES <= exits


async def _check_values(pg: asyncpg.Connection, table: str, constraint_column: str) -> list[str]:
    """The quoted values of the CHECK constraint on ``table`` naming the column."""
    defs = [r[0] for r in await pg.fetch(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid"
        " WHERE t.relname = $1 AND c.contype = 'c'", table)]
    [found] = [d for d in defs if f"({constraint_column} = ANY" in d or f"({constraint_column} IN" in d]
    return re.findall(r"'([A-Z_]+)'", found)


async def test_proto_sql_and_python_wait_kinds_agree(pg) -> None:
    """WaitKind and ChildWaitMode are stated in the proto, checked by the
    database (intent_waits.kind, child_mode) and mirrored in
    intentd.core.waits and the client's WAIT_KINDS: the same everywhere."""
    from intentd.client.models import WAIT_KINDS
    from intentd.core import waits
    from intentd.generated.v1 import delivery_pb2

    proto = [n.removeprefix("WAIT_KIND_") for n in intent_pb2.WaitKind.keys() if n != "WAIT_KIND_UNSPECIFIED"]
    assert await _check_values(pg, "intent_waits", "kind") == proto
    assert list(waits.KINDS) == proto and list(WAIT_KINDS) == proto
    modes = [n.removeprefix("CHILD_WAIT_MODE_") for n in delivery_pb2.ChildWaitMode.keys()
             if n != "CHILD_WAIT_MODE_UNSPECIFIED"]
    assert await _check_values(pg, "intent_waits", "child_mode") == modes
    assert list(waits.CHILD_MODES) == modes


async def test_trigger_refuses_transitions_outside_the_table(pg, database_url) -> None:
    from tests.integration.test_intent_api import insert_raw_intent

    intent_id = await insert_raw_intent(pg)
    with pytest.raises(asyncpg.CheckViolationError, match="PENDING -> COMPLETED is not allowed"):
        await pg.execute("UPDATE intents SET state='COMPLETED', result='1', finish_time=now() WHERE id=$1", intent_id)
    await pg.execute("UPDATE intents SET state='CANCELED', finish_time=now() WHERE id=$1", intent_id)
    with pytest.raises(asyncpg.CheckViolationError, match="CANCELED -> PENDING"):
        await pg.execute("UPDATE intents SET state='PENDING', finish_time=NULL WHERE id=$1", intent_id)


async def test_leased_rows_must_carry_a_lease(pg) -> None:
    from tests.integration.test_intent_api import insert_raw_intent

    intent_id = await insert_raw_intent(pg)
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE intents SET state='DELIVERED' WHERE id=$1", intent_id)


def test_named_queries_parse_and_are_unique() -> None:
    queries = load_queries()
    assert "insert_intents" in queries and "claim_intents" in queries
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(AttributeError):
        _ = Q.no_such_query


async def test_upgrade_to_statement_level_event_notifications(databases) -> None:
    """A database at version 2 (one NOTIFY per event row) moves to one NOTIFY
    per statement; a single event keeps the old payload."""
    from tests.integration.test_intent_api import insert_raw_intent

    url = databases.create(migrated=False)
    conn = await asyncpg.connect(url)
    listener = await asyncpg.connect(url)
    payloads: list[str] = []
    await listener.add_listener("intentd_events", lambda _c, _p, _ch, payload: payloads.append(payload))

    async def two_events() -> list[str]:
        payloads.clear()
        intent_id = await insert_raw_intent(conn)
        await conn.execute("INSERT INTO intent_events (intent_id, seq, type, time, state, attempt)"
                           " SELECT $1, g, 'NOTE', now(), 'PENDING', 0 FROM generate_series(1, 2) g", intent_id)
        for _ in range(500):
            if "\n".join(payloads).count(f"{intent_id}:") >= 2:
                break
            await asyncio.sleep(0.01)
        return [p.replace(intent_id, "ID") for p in payloads if intent_id in p]

    try:
        async with conn.transaction():
            await conn.execute(Q.create_migrations_table)
            for migration in available_migrations()[:2]:
                await conn.execute(migration.sql)
                await conn.execute(Q.record_migration, migration.version, migration.name)
        assert await two_events() == ["ID:1:PENDING", "ID:2:PENDING"]
        assert await migrate(conn) == [m.version for m in available_migrations()[2:]]
        assert await two_events() == ["ID:1:PENDING\nID:2:PENDING"]
        row_level = await conn.fetchval(
            "SELECT tgtype & 1 = 1 FROM pg_trigger WHERE tgname = 'intent_events_notify'")
        assert row_level is False
    finally:
        await listener.close()
        await conn.close()
