"""Event notifications: one per statement, with all its events, in chunks
under PostgreSQL's payload limit, fanned out per event by the hub."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from intentd.server.batcher import WriteBatcher
from intentd.server.hub import EVENTS_CHANNEL, NotificationHub, parse_events
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.store import IntentStore, NewIntent

TYPE = "intent.pipeline.process.v1"
N = 400  # ~40 bytes an event: over 15 kB, so three chunks


async def eventually(predicate: Callable[[], object], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@dataclass
class Heard:
    hub: NotificationHub
    # What the hub fanned out, per event.
    seen: list[tuple[str, int | None, str]]
    # The raw notifications on the events channel.
    payloads: list[str]


@pytest.fixture
async def heard(database_url: str) -> AsyncIterator[Heard]:
    """A started hub recording every event it fans out, and a plain listener
    of the channel beside it."""
    hub = NotificationHub(database_url)
    await hub.start()
    heard = Heard(hub, [], [])
    hub.on_event(lambda intent_id, seq, state: heard.seen.append((intent_id, seq, state)))
    raw = await asyncpg.connect(database_url)
    await raw.add_listener(EVENTS_CHANNEL, lambda _c, _p, _ch, payload: heard.payloads.append(payload))
    try:
        yield heard
    finally:
        await raw.close()
        await hub.close()


def test_parse_events_reads_aggregated_and_single_payloads() -> None:
    assert list(parse_events("a1:3:IN_PROGRESS")) == [("a1", 3, "IN_PROGRESS")]
    assert list(parse_events("a1:3:IN_PROGRESS\nb2:7:COMPLETED\nc3:1:PENDING")) == [
        ("a1", 3, "IN_PROGRESS"), ("b2", 7, "COMPLETED"), ("c3", 1, "PENDING")]
    # A line without a usable seq still wakes the intent's subscribers.
    assert list(parse_events("a1:x:PENDING\n\nb2:2:FAILED")) == [("a1", None, "PENDING"), ("b2", 2, "FAILED")]


async def test_a_statement_with_many_events_reaches_subscribers_in_chunks(db, heard, agent_address) -> None:
    hub, seen, payloads = heard.hub, heard.seen, heard.payloads
    batcher = WriteBatcher(db, workers=1, max_batch=N)
    batcher.start()
    try:
        store = IntentStore(db)
        leases = LeaseStore(db, max_payload_bytes=1024, batcher=batcher)
        await store.send("default", [NewIntent(TYPE, agent_address, "{}", "test") for _ in range(N)])
        await eventually(lambda: len([e for e in seen if e[1] == 1]) >= N, what="CREATED events")
        # The plain listener may lag behind the hub's: the CREATED lines must
        # all be in before the payloads are cleared, or they mix with the next.
        await eventually(lambda: sum(p.count(":1:") for p in payloads) >= N, what="the raw CREATED notifications")

        # One claim statement delivers all: its DELIVERED events go together.
        payloads.clear()
        first = set(seen)
        rows, _ = await leases.claim("s1", [agent_address], None, N, 60_000)
        assert len(rows) == N
        delivered = {(r["id"], 2, "DELIVERED") for r in rows}
        await eventually(lambda: delivered <= set(seen), what="DELIVERED events")
        await eventually(lambda: sum(p.count("\n") + 1 for p in payloads) >= N, what="the raw notifications")
        assert len(payloads) >= 3
        assert all(len(p.encode()) < 8000 for p in payloads)
        lines = [line for p in payloads for line in p.split("\n")]
        assert len(lines) == len(set(lines)) == N
        assert set(seen) - first == delivered

        # One batch of acks: one statement, its events together too.
        payloads.clear()
        with hub.subscribe_intent(rows[0]["id"]) as sub:
            await asyncio.gather(*(leases.ack(LeaseRef(r["id"], r["attempt"], r["lease_token"]), stream="s1")
                                   for r in rows))
            assert batcher.statements == 1
            acked = {(r["id"], 3, "IN_PROGRESS") for r in rows}
            await eventually(lambda: acked <= set(seen), what="ACKNOWLEDGED events")
            assert await sub.wait(1.0)
        await eventually(lambda: sum(p.count("\n") + 1 for p in payloads) >= N, what="the raw notifications")
        assert 3 <= len(payloads) <= 4
        assert hub.notifications >= len(payloads)
    finally:
        await batcher.close()


async def test_single_event_payloads_keep_the_old_format(db, heard, pg) -> None:
    """A replica that predates aggregation reads a single event as before, and
    this hub still reads the old format (sent by a database before 0003)."""
    hub, seen, payloads = heard.hub, heard.seen, heard.payloads
    intent_id = uuid.uuid4().hex[:26]
    with hub.subscribe_intent(intent_id) as sub:
        await pg.execute("SELECT pg_notify('intentd_events', $1)", f"{intent_id}:7:CANCELED")
        assert await sub.wait(5)
    await eventually(lambda: (intent_id, 7, "CANCELED") in seen, what="old-format event")

    (sent,) = await IntentStore(db).send("default", [NewIntent(TYPE, "agent://test/hub/one", "{}", "test")])
    created = f"{sent.row['id']}:1:PENDING"
    await eventually(lambda: created in payloads, what="the CREATED notification")
