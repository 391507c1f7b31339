"""Durable waits at the database layer (WaitStore, the timer sweep) and on a
real sidecar stream: register and resolve, hold, park, wake, signals,
decisions, timers, and the attempts rule."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from intentd.client import IntentClient
from intentd.core.errors import ValidationError
from intentd.core.waits import HUMAN, SIGNAL, TIME, record_name
from intentd.generated.v1 import delivery_pb2, intent_pb2
from intentd.server import errors
from intentd.server.db import Database
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.queries import Q
from intentd.server.store import IntentStore, NewIntent
from intentd.server.sweepers import WaitSweeper
from intentd.server.waits import WaitSpec, WaitStore
from tests.support import RawSidecar, run_sync

TYPE = "intent.waits.test.v1"


class Stores:
    def __init__(self, db: Database) -> None:
        self.intents = IntentStore(db)
        self.leases = LeaseStore(db, max_payload_bytes=128 * 1024)
        self.waits = WaitStore(db)

    async def send(self, address: str, **kw: Any) -> str:
        (sent,) = await self.intents.send("default", [NewIntent(TYPE, address, "{}", "test", **kw)])
        return str(sent.row["id"])

    async def deliver(self, address: str, session: str = "s1") -> tuple[LeaseRef, dict[str, list[Any]]]:
        rows, steps = await self.leases.claim(session, [address], None, 1, 5000)
        assert len(rows) == 1
        lease = LeaseRef(rows[0]["id"], rows[0]["attempt"], rows[0]["lease_token"])
        await self.leases.ack(lease, stream=session)
        return lease, steps


@pytest.fixture
def stores(db: Database) -> Stores:
    return Stores(db)


@pytest.fixture
async def fresh(databases: Any) -> AsyncIterator[tuple[Stores, asyncpg.Connection]]:
    """A database of its own, for sweeps that must see no other test's waits."""
    url = databases.create()
    database = Database(url, min_size=1, max_size=6)
    await database.open(run_migrations=False)
    conn = await asyncpg.connect(url)
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=str, decoder=str, schema="pg_catalog", format="text")
    try:
        yield Stores(database), conn
    finally:
        await conn.close()
        await database.close()


def signal_wait(index: int, name: str = "go", timeout_ms: int = 0) -> WaitSpec:
    return WaitSpec(index=index, step_name=record_name(SIGNAL, name), kind=SIGNAL, name=name, timeout_ms=timeout_ms)


def human_wait(index: int, title: str = "Deploy?", timeout_ms: int = 0, remind_after_ms: int = 0) -> WaitSpec:
    return WaitSpec(index=index, step_name=record_name(HUMAN, title), kind=HUMAN, name=title, timeout_ms=timeout_ms,
                    assignees=("alice",), remind_after_ms=remind_after_ms)


def sleep_wait(index: int, ms: int) -> WaitSpec:
    return WaitSpec(index=index, step_name=record_name(TIME), kind=TIME, name="", timeout_ms=ms)


async def events(pg: asyncpg.Connection, intent_id: str) -> list[tuple[str, str]]:
    rows = await pg.fetch("SELECT type, state::text FROM intent_events WHERE intent_id = $1 ORDER BY seq", intent_id)
    return [(r["type"], r["state"]) for r in rows]


async def intent(pg: asyncpg.Connection, intent_id: str) -> asyncpg.Record:
    return await pg.fetchrow("SELECT *, state::text AS state FROM intents WHERE id = $1", intent_id)


# ---------------------------------------------------------------- signals


async def test_a_wait_takes_its_signal_from_the_inbox(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address)
    sent = await stores.waits.signal("default", intent_id, "go", '{"n": 1}', "sig-1", "ci")
    assert sent.created and sent.signal["consumed_idx"] is None
    lease, _ = await stores.deliver(agent_address)
    reached = await stores.waits.reach(lease, "s1", signal_wait(1))
    assert reached.record is not None and not reached.parked
    value = json.loads(reached.record["result"])
    assert value["signal"] | {"time": None} == {"id": "sig-1", "name": "go", "payload": {"n": 1}, "sender": "ci",
                                                 "time": None}
    assert datetime.fromisoformat(value["signal"]["time"]).tzinfo is not None
    assert await pg.fetchval("SELECT consumed_idx FROM intent_signals WHERE intent_id = $1", intent_id) == 1
    row = await intent(pg, intent_id)
    assert (row["state"], row["steps_completed"], row["last_step"]) == ("IN_PROGRESS", 1, "@signal:go")
    # Repeated (the sidecar resent it): the same record, nothing new.
    again = await stores.waits.reach(lease, "s1", signal_wait(1))
    assert again.record is not None and again.record["result"] == reached.record["result"]
    assert [t for t, _ in await events(pg, intent_id)] == [
        "CREATED", "SIGNALED", "DELIVERED", "ACKNOWLEDGED", "STEP_COMPLETED"]


async def test_park_then_signal_wakes_the_intent(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address)
    lease, _ = await stores.deliver(agent_address)
    reached = await stores.waits.reach(lease, "s1", signal_wait(1), park=True)
    assert reached.parked and reached.record is None
    row = await intent(pg, intent_id)
    assert (row["state"], row["parked_attempts"], row["lease_session"], row["lease_token"]) == (
        "WAITING", 1, None, lease.token)
    shown = await stores.intents.get("default", intent_id)
    assert (shown["wait_kind"], shown["wait_name"], shown["wait_idx"], shown["wait_task_id"]) == (
        "SIGNAL", "go", 1, None)
    # The resent wait of the parked attempt is answered parked again.
    assert (await stores.waits.reach(lease, "s1", signal_wait(1))).parked
    sent = await stores.waits.signal("default", intent_id, "go", "[1]", None, "ci")
    assert sent.created and sent.intent["state"] == "PENDING" and sent.signal["consumed_idx"] == 1
    assert sent.intent["wait_kind"] is None
    assert len(sent.signal["signal_id"]) == 26  # made by the server
    assert (await events(pg, intent_id))[-2:] == [("WAITING", "WAITING"), ("SIGNALED", "PENDING")]
    signaled = await pg.fetchrow("SELECT * FROM intent_events WHERE intent_id = $1 AND type = 'SIGNALED'", intent_id)
    assert (signaled["step_index"], signaled["wait_name"], signaled["actor"], signaled["signal_id"]) == (
        1, "go", "ci", sent.signal["signal_id"])
    # The next delivery replays the record; the wait answers with it at once.
    lease2, steps = await stores.deliver(agent_address)
    assert lease2.attempt == 2
    assert [s["name"] for s in steps[intent_id]] == ["@signal:go"]
    again = await stores.waits.reach(lease2, "s1", signal_wait(1))
    assert again.record is not None and json.loads(again.record["result"])["signal"]["payload"] == [1]


async def test_a_repeated_signal_id_is_delivered_once(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address)
    first = await stores.waits.signal("default", intent_id, "go", "1", "same", "ci")
    second = await stores.waits.signal("default", intent_id, "go", "2", "same", "ci")
    assert first.created and not second.created
    assert second.signal["seq"] == first.signal["seq"] and second.signal["payload"] == "1"
    assert await pg.fetchval("SELECT count(*) FROM intent_signals WHERE intent_id = $1", intent_id) == 1
    assert [t for t, _ in await events(pg, intent_id)].count("SIGNALED") == 1


async def test_signals_to_ended_or_unknown_intents_are_refused(stores: Stores, agent_address: str) -> None:
    intent_id = await stores.send(agent_address)
    await stores.intents.cancel("default", intent_id, "no", actor="me")
    with pytest.raises(errors.FailedPrecondition, match="CANCELED"):
        await stores.waits.signal("default", intent_id, "go", "1", None, "ci")
    with pytest.raises(errors.NotFound):
        await stores.waits.signal("default", "0" * 26, "go", "1", None, "ci")
    with pytest.raises(errors.NotFound):
        await stores.waits.signal("other", intent_id, "go", "1", None, "ci")


async def test_waits_take_the_inbox_in_order_per_name(stores: Stores, agent_address: str) -> None:
    intent_id = await stores.send(agent_address)
    await stores.waits.signal("default", intent_id, "go", '"first"', "a", "ci")
    await stores.waits.signal("default", intent_id, "other", '"noise"', "b", "ci")
    await stores.waits.signal("default", intent_id, "go", '"second"', "c", "ci")
    lease, _ = await stores.deliver(agent_address)
    one = await stores.waits.reach(lease, "s1", signal_wait(1))
    two = await stores.waits.reach(lease, "s1", signal_wait(2))
    assert one.record is not None and two.record is not None
    assert [json.loads(r.record["result"])["signal"]["payload"] for r in (one, two)] == ["first", "second"]


async def test_the_inbox_is_bounded(stores: Stores, agent_address: str, pg) -> None:
    from intentd.core.limits import MAX_INBOX_SIGNALS

    intent_id = await stores.send(agent_address)
    await pg.execute("INSERT INTO intent_signals (intent_id, signal_id, name, payload, sender, create_time,"
                     " size_bytes) SELECT $1, 'x' || g, 'go', '1', 'ci', now(), 1 FROM generate_series(1, $2) g",
                     intent_id, MAX_INBOX_SIGNALS)
    with pytest.raises(errors.ResourceExhausted):
        await stores.waits.signal("default", intent_id, "go", "1", None, "ci")


async def test_the_inbox_is_bounded_in_bytes(stores: Stores, agent_address: str, pg) -> None:
    from intentd.core.limits import MAX_INBOX_BYTES

    intent_id = await stores.send(agent_address)
    big = '"' + "x" * (100 * 1024) + '"'
    kept = 0
    with pytest.raises(errors.ResourceExhausted) as full:
        while True:
            await stores.waits.signal("default", intent_id, "go", big, None, "ci")
            kept += 1
    assert "bytes" in full.value.message
    assert kept == MAX_INBOX_BYTES // len(big)
    inbox = await pg.fetchrow("SELECT count(*) AS n, sum(size_bytes) AS bytes FROM intent_signals"
                              " WHERE intent_id = $1", intent_id)
    assert inbox["n"] == kept and inbox["bytes"] <= MAX_INBOX_BYTES


async def test_waits_are_fenced_and_deterministic(stores: Stores, agent_address: str) -> None:
    await stores.send(agent_address)
    lease, _ = await stores.deliver(agent_address)
    with pytest.raises(errors.StaleLease):
        await stores.waits.reach(lease, "another-stream", signal_wait(1))
    # A wait beside a step still running (parallel steps, docs/children.md)
    # need not be at the next position.
    beside = await stores.waits.reach(lease, "s1", signal_wait(2))
    assert beside.record is None and not beside.parked
    await stores.leases.record_step(lease, 1, "build", b"{}", stream="s1")
    with pytest.raises(errors.FailedPrecondition, match="divergence"):
        await stores.waits.reach(lease, "s1", signal_wait(1))
    with pytest.raises(ValidationError, match=r"step\.name"):
        await stores.leases.record_step(lease, 2, "@signal:go", b"{}", stream="s1")


# ---------------------------------------------------------------- human tasks


async def test_a_decision_resolves_its_wait_once(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address)
    lease, _ = await stores.deliver(agent_address)
    reached = await stores.waits.reach(lease, "s1", human_wait(1), park=True)
    assert reached.parked
    (task,) = await stores.waits.list_tasks("default", states=["OPEN"], assignee="alice", intent_type=None,
                                            intent_id=intent_id, limit=10, before_id=None)
    assert (task["title"], task["outcomes"], task["assignees"], task["state"]) == (
        "Deploy?", ["approve", "reject"], ["alice"], "OPEN")
    assert await stores.waits.list_tasks("default", states=["OPEN"], assignee="bob", intent_type=None,
                                         intent_id=intent_id, limit=10, before_id=None) == []
    assert (await stores.intents.get("default", intent_id))["wait_task_id"] == task["id"]
    decided = await stores.waits.decide_task("default", task["id"], "approve", "ok", '{"x": 1}', "alice")
    assert (decided["state"], decided["outcome"], decided["decided_by"]) == ("DECIDED", "approve", "alice")
    row = await intent(pg, intent_id)
    assert row["state"] == "PENDING"
    value = json.loads(await pg.fetchval("SELECT result::text FROM intent_steps WHERE intent_id=$1 AND idx=1",
                                         intent_id))
    assert value["decision"] | {"decide_time": None} == {
        "task_id": task["id"], "outcome": "approve", "decided_by": "alice", "decide_time": None, "comment": "ok",
        "form_data": {"x": 1}}
    # The same decision again: the task as it is; another: refused, nothing changes.
    assert (await stores.waits.decide_task("default", task["id"], "approve", "", None, "alice"))["comment"] == "ok"
    with pytest.raises(errors.FailedPrecondition, match="DECIDED"):
        await stores.waits.decide_task("default", task["id"], "reject", "no", None, "bob")
    assert (await stores.waits.get_task("default", task["id"]))["outcome"] == "approve"
    kinds = [t for t, _ in await events(pg, intent_id)]
    assert kinds.count("TASK_CREATED") == 1 and kinds.count("TASK_DECIDED") == 1 and kinds[-1] == "TASK_DECIDED"
    decided_event = await pg.fetchrow("SELECT * FROM intent_events WHERE intent_id=$1 AND type='TASK_DECIDED'",
                                      intent_id)
    assert (decided_event["message"], decided_event["actor"], decided_event["task_id"]) == (
        "approve", "alice", task["id"])
    with pytest.raises(errors.NotFound):
        await stores.waits.get_task("other", task["id"])


async def test_cancel_of_a_waiting_intent_closes_its_wait_and_task(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address)
    lease, _ = await stores.deliver(agent_address)
    assert (await stores.waits.reach(lease, "s1", human_wait(1), park=True)).parked
    await stores.intents.cancel("default", intent_id, "changed my mind", actor="me")
    assert await pg.fetchval("SELECT resolved_time IS NOT NULL FROM intent_waits WHERE intent_id=$1", intent_id)
    assert await pg.fetchval("SELECT state FROM human_tasks WHERE intent_id=$1", intent_id) == "CANCELED"
    assert (await stores.intents.get("default", intent_id))["wait_kind"] is None


async def test_a_retried_intent_reopens_the_wait_its_end_closed(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address, max_attempts=1)
    lease, _ = await stores.deliver(agent_address)
    assert not (await stores.waits.reach(lease, "s1", human_wait(1))).parked  # held
    await stores.leases.fail(lease, "BOOM", "no", False, stream="s1")
    task_id = await pg.fetchval("SELECT id FROM human_tasks WHERE intent_id=$1", intent_id)
    assert await pg.fetchval("SELECT state FROM human_tasks WHERE id=$1", task_id) == "CANCELED"
    await stores.intents.retry("default", intent_id, 1)
    lease, _ = await stores.deliver(agent_address)
    assert (await stores.waits.reach(lease, "s1", human_wait(1), park=True)).parked
    assert await pg.fetchval("SELECT state FROM human_tasks WHERE id=$1", task_id) == "OPEN"
    await stores.waits.decide_task("default", task_id, "reject", "", None, "alice")
    assert (await intent(pg, intent_id))["state"] == "PENDING"


# ---------------------------------------------------------------- attempts


async def test_parked_attempts_do_not_spend_the_retry_budget(stores: Stores, agent_address: str, pg) -> None:
    intent_id = await stores.send(agent_address, max_attempts=1)
    for index in range(1, 5):
        lease, _ = await stores.deliver(agent_address)
        for earlier in range(1, index):
            assert (await stores.waits.reach(lease, "s1", signal_wait(earlier))).record is not None
        assert (await stores.waits.reach(lease, "s1", signal_wait(index), park=True)).parked
        await stores.waits.signal("default", intent_id, "go", str(index), None, "ci")
    lease, _ = await stores.deliver(agent_address)
    assert lease.attempt == 5
    await stores.leases.complete(lease, b'"done"', stream="s1")
    row = await intent(pg, intent_id)
    assert (row["state"], row["attempt"], row["parked_attempts"], row["max_attempts"]) == ("COMPLETED", 5, 4, 1)


async def test_a_failure_after_parks_reports_the_attempts_used(stores: Stores, agent_address: str) -> None:
    intent_id = await stores.send(agent_address, max_attempts=1)
    lease, _ = await stores.deliver(agent_address)
    assert (await stores.waits.reach(lease, "s1", signal_wait(1), park=True)).parked
    await stores.waits.signal("default", intent_id, "go", "1", None, "ci")
    lease, _ = await stores.deliver(agent_address)
    ended = await stores.leases.fail(lease, "BOOM", "no", True, stream="s1")
    assert (ended["state"], ended["error_code"]) == ("FAILED", "ATTEMPTS_EXHAUSTED")
    assert "attempt 1 of 1" in (await stores.intents.get("default", intent_id))["error_message"]


# ---------------------------------------------------------------- timers


async def test_the_sweep_fires_parked_timers_and_leaves_the_others(fresh) -> None:
    stores, pg = fresh
    address = "agent://test/sweep/worker"
    sleeper, held, later_one, human = [await stores.send(address) for _ in range(4)]
    leases = {}
    for _ in range(4):
        lease, _ = await stores.deliver(address)
        leases[lease.intent_id] = lease
    assert (await stores.waits.reach(leases[sleeper], "s1", sleep_wait(1, 1000), park=True)).parked
    assert not (await stores.waits.reach(leases[held], "s1", signal_wait(1, timeout_ms=1000))).parked  # held
    assert (await stores.waits.reach(leases[later_one], "s1", sleep_wait(1, 3_600_000), park=True)).parked
    assert (await stores.waits.reach(leases[human], "s1", human_wait(1, timeout_ms=1000), park=True)).parked
    sweeper = WaitSweeper(stores.waits, interval=1.0)
    await sweeper.run_once(now=datetime.now(UTC) + timedelta(seconds=30))
    assert sweeper.fired == 2
    states = {i: (await intent(pg, i))["state"] for i in (sleeper, held, later_one, human)}
    assert states == {sleeper: "PENDING", held: "IN_PROGRESS", later_one: "WAITING", human: "PENDING"}
    fired = json.loads(await pg.fetchval("SELECT result::text FROM intent_steps WHERE intent_id=$1", sleeper))
    due = await pg.fetchval("SELECT due_at FROM intent_waits WHERE intent_id=$1", sleeper)
    assert datetime.fromisoformat(fired["fired"]) == due
    timed_out = json.loads(await pg.fetchval("SELECT result::text FROM intent_steps WHERE intent_id=$1", human))
    task_id = await pg.fetchval("SELECT id FROM human_tasks WHERE intent_id=$1", human)
    assert timed_out == {"timed_out": True, "task_id": task_id}
    assert await pg.fetchval("SELECT state FROM human_tasks WHERE id=$1", task_id) == "EXPIRED"
    event = await pg.fetchrow("SELECT * FROM intent_events WHERE intent_id=$1 ORDER BY seq DESC LIMIT 1", human)
    assert (event["type"], event["message"], event["wait_kind"], event["step_index"]) == (
        "TIMER_FIRED", "TIMEOUT", "HUMAN", 1)
    # The holder meets its own due time: timed out, without the sweep.
    reached = await stores.waits.retry(leases[held], "s1", 1, park=False,
                                       now=datetime.now(UTC) + timedelta(seconds=30))
    assert reached.record is not None and json.loads(reached.record["result"]) == {"timed_out": True}


async def test_a_timer_racing_a_signal_has_one_winner(fresh) -> None:
    stores, pg = fresh
    for n in range(25):
        address = f"agent://test/race/w{n}"
        intent_id = await stores.send(address)
        lease, _ = await stores.deliver(address)
        assert (await stores.waits.reach(lease, "s1", signal_wait(1, timeout_ms=1), park=True)).parked
        later = datetime.now(UTC) + timedelta(seconds=5)
        await asyncio.gather(stores.waits.fire_due(now=later),
                             stores.waits.signal("default", intent_id, "go", '"sig"', None, "ci"))
        (record,) = await pg.fetch("SELECT result::text FROM intent_steps WHERE intent_id=$1", intent_id)
        consumed = await pg.fetchval("SELECT consumed_idx FROM intent_signals WHERE intent_id=$1", intent_id)
        value = json.loads(record["result"])
        if consumed is None:
            assert value == {"timed_out": True}  # the timer won; the signal waits in the inbox
        else:
            assert value["signal"]["payload"] == "sig"
        assert (await intent(pg, intent_id))["state"] == "PENDING"
        kinds = [t for t, _ in await events(pg, intent_id)]
        assert kinds.count("TIMER_FIRED") + (consumed is not None) == 1


async def test_reminders_are_sent_once(fresh) -> None:
    stores, pg = fresh
    address = "agent://test/remind/worker"
    intent_id = await stores.send(address)
    lease, _ = await stores.deliver(address)
    assert (await stores.waits.reach(lease, "s1", human_wait(1, remind_after_ms=1000), park=True)).parked
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert len(await stores.waits.remind_due(now=later)) == 1
    assert await stores.waits.remind_due(now=later) == []
    assert [t for t, _ in await events(pg, intent_id)].count("TASK_REMINDED") == 1


async def test_the_sweep_finds_due_waits_through_their_index(fresh) -> None:
    _, pg = fresh
    await pg.execute("""
        INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, state, max_attempts,
                             heartbeat_timeout_ms, available_at, create_time, update_time, has_waits,
                             attempt, lease_token, parked_attempts)
        SELECT lpad(g::text, 26, '0'), 'default', 'intent.x.y.v1', 'agent://a/b/c', 's', '{}', 'WAITING', 3,
               10000, now(), now(), now(), true, 1, gen_random_uuid(), 1
        FROM generate_series(1, 20000) g""")
    await pg.execute("""
        INSERT INTO intent_waits (intent_id, idx, kind, name, step_name, due_at, attempt, create_time, resolved_time)
        SELECT lpad(g::text, 26, '0'), 1, 'TIME', '', '@sleep', now() + g * interval '1 hour', 1, now(),
               CASE WHEN g % 10 = 0 THEN NULL ELSE now() END
        FROM generate_series(1, 20000) g""")
    await pg.execute("ANALYZE intents; ANALYZE intent_waits")
    raw = await pg.fetchval("EXPLAIN (FORMAT JSON) " + Q.due_waits, None, 500)
    (top,) = json.loads(raw)

    def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
        return [plan, *[n for child in plan.get("Plans", []) for n in nodes(child)]]

    scans = [(n["Node Type"], n.get("Index Name")) for n in nodes(top["Plan"]) if n.get("Relation Name")
             in ("intent_waits", "intents")]
    assert ("Index Scan", "intent_waits_due") in scans, scans
    assert not [s for s in scans if s[0] == "Seq Scan"], scans


# ---------------------------------------------------------------- on a sidecar stream


def _signal_from_outside(database_url: str, intent_id: str, name: str, payload: str) -> None:
    async def go() -> None:
        database = Database(database_url, min_size=1, max_size=1)
        await database.open(run_migrations=False)
        try:
            await WaitStore(database).signal("default", intent_id, name, payload, None, "outside")
        finally:
            await database.close()

    run_sync(go())


def _wait_write(lease: Any, index: int, name: str, timeout_ms: int = 0) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, wait=delivery_pb2.WaitWrite(
        index=index, step_name=record_name(SIGNAL, name), kind=intent_pb2.WAIT_KIND_SIGNAL, signal_name=name,
        timeout_ms=timeout_ms))


def _sql(database_url: str, query: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(database_url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    result: list[Any] = run_sync(go())
    return result


def test_a_held_wait_is_resolved_by_a_signal_during_its_hold(server, database_url, agent_address) -> None:
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    _sql(database_url, "UPDATE intents SET wait_hold_ms = 30000 WHERE id = $1", intent_id)
    raw = RawSidecar(server.address, agent_address, ping_every=0.2)
    try:
        lease = raw.recv("assignment").lease
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        raw.send(write=raw.apb.WriteRequest(request_id=1, write=_wait_write(lease, 1, "go")))
        # Held: the registration is there and no answer yet; other writes are answered meanwhile.
        deadline = time.monotonic() + 10
        while not _sql(database_url, "SELECT 1 FROM intent_waits WHERE intent_id = $1", intent_id):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        progress = delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="m"))
        assert raw.write(2, progress).code == 0
        assert not [r for r in raw.of("write_result") if r.request_id == 1]
        _signal_from_outside(database_url, intent_id, "go", '{"ok": true}')
        result = raw.write(99, delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite()))
        first = next((r for r in raw.of("write_result") if r.request_id == 1), None) or raw.recv("write_result")
        assert result.code == 0
        assert first.request_id == 1 and first.code == 0, first
        assert not first.wait.parked and first.wait.step.name == "@signal:go"
        assert json.loads(first.wait.step.result)["signal"]["payload"] == {"ok": True}
        (row,) = _sql(database_url, "SELECT state::text, parked_attempts FROM intents WHERE id = $1", intent_id)
        assert tuple(row) == ("IN_PROGRESS", 0)
    finally:
        raw.close()


def test_repeats_of_a_held_wait_keep_their_slots_and_get_the_one_record(server, database_url,
                                                                       agent_address) -> None:
    """A sidecar that resends a held wait (a reconnect, or a hostile one):
    only the first hold gives its write slot back, so repeats are bounded by
    the stream's write slots, and every repeat gets the same record."""
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    _sql(database_url, "UPDATE intents SET wait_hold_ms = 30000 WHERE id = $1", intent_id)
    raw = RawSidecar(server.address, agent_address, ping_every=0.2)
    try:
        lease = raw.recv("assignment").lease
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        for request_id in (1, 2, 3):
            raw.send(write=raw.apb.WriteRequest(request_id=request_id, write=_wait_write(lease, 1, "go")))
        progress = delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite(message="m"))
        assert raw.write(10, progress).code == 0  # the stream still answers its other writes
        _signal_from_outside(database_url, intent_id, "go", "5")
        deadline = time.monotonic() + 10
        while len([r for r in raw.of("write_result") if r.request_id in (1, 2, 3)]) < 3:
            assert time.monotonic() < deadline, raw.of("write_result")
            raw.recv("write_result")
        answers = [r for r in raw.of("write_result") if r.request_id in (1, 2, 3)]
        assert all(r.code == 0 and not r.wait.parked for r in answers), answers
        assert {r.wait.step.result for r in answers} == {answers[0].wait.step.result}
        assert json.loads(answers[0].wait.step.result)["signal"]["payload"] == 5
        (row,) = _sql(database_url, "SELECT count(*) AS n FROM intent_steps WHERE intent_id = $1", intent_id)
        assert row["n"] == 1
    finally:
        raw.close()


def test_a_held_wait_parks_when_nothing_comes(server, database_url, agent_address) -> None:
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    _sql(database_url, "UPDATE intents SET wait_hold_ms = 200 WHERE id = $1", intent_id)
    raw = RawSidecar(server.address, agent_address, ping_every=0.2)
    try:
        lease = raw.recv("assignment").lease
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        result = raw.write(1, _wait_write(lease, 1, "go"))
        assert result.code == 0 and result.wait.parked
        (row,) = _sql(database_url, "SELECT state::text, parked_attempts, lease_session FROM intents WHERE id = $1",
                      intent_id)
        assert tuple(row) == ("WAITING", 1, None)
        # The signal wakes it; the slot the park freed takes the next delivery.
        _signal_from_outside(database_url, intent_id, "go", "7")
        again = raw.recv("assignment")
        assert again.lease.intent_id == intent_id and again.lease.attempt == 2
        assert [s.name for s in again.steps] == ["@signal:go"]
        assert not raw.of("revocation")
        bad = raw.write(2, delivery_pb2.IntentWrite(lease=again.lease, step=delivery_pb2.StepWrite(
            index=2, name="@sneaky", result=b"{}")))
        assert bad.code == 3  # INVALID_ARGUMENT
    finally:
        raw.close()


def test_a_stopping_server_ends_its_holds_at_once(make_server, database_url, agent_address) -> None:
    """A hold far longer than the shutdown grace does not keep the server
    from stopping; the attempt is left to its lease (not parked), for the
    sidecar to re-announce on another replica."""
    srv = make_server()
    with IntentClient(srv.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    _sql(database_url, "UPDATE intents SET wait_hold_ms = 30000 WHERE id = $1", intent_id)
    raw = RawSidecar(srv.address, agent_address, ping_every=0.2)
    try:
        lease = raw.recv("assignment").lease
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        raw.send(write=raw.apb.WriteRequest(request_id=1, write=_wait_write(lease, 1, "go")))
        deadline = time.monotonic() + 10
        while not _sql(database_url, "SELECT 1 FROM intent_waits WHERE intent_id = $1", intent_id):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        began = time.monotonic()
        srv.stop()
        # Far below the 30 s hold: the hold ended with its stream.
        assert time.monotonic() - began < 20
        (row,) = _sql(database_url, "SELECT state::text, parked_attempts FROM intents WHERE id = $1", intent_id)
        assert tuple(row) == ("IN_PROGRESS", 0)
    finally:
        raw.close()
