"""Child intents at the database layer (ChildStore, the child sweeper, AGENT
waits), on a real PostgreSQL: exactly-once starts, fencing, send patterns,
deadline caps, fan-in that wakes a parent once, FIRST, cascading cancel,
detached children, listing by parent, and the lock rules of the sweeper."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from intentd.core.waits import AGENT, ALL, FIRST, record_name, start_record_name
from intentd.generated.v1 import delivery_pb2
from intentd.server import errors
from intentd.server.auth import Caller
from intentd.server.children import ChildSpec, ChildStore, StartSpec, start_spec
from intentd.server.db import Database
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.quotas import Quotas
from intentd.server.store import IntentStore, NewIntent
from intentd.server.waits import WaitSpec, WaitStore

PARENT_TYPE = "intent.family.parent.v1"
CHILD_TYPE = "intent.family.child.v1"
CALLER = Caller("default", "orchestrator", frozenset({"agent"}), ("agent://**",), send_patterns=("agent://**",))


class Family:
    def __init__(self, db: Database, *, auth: bool = False, max_record_bytes: int = 128 * 1024) -> None:
        self.intents = IntentStore(db)
        self.leases = LeaseStore(db, max_payload_bytes=128 * 1024)
        self.waits = WaitStore(db, max_record_bytes=max_record_bytes)
        self.children = ChildStore(db, self.waits, Quotas(db, default_max_payload_bytes=128 * 1024),
                                   auth_enabled=auth, default_heartbeat_timeout_ms=10_000,
                                   max_history_bytes=1 << 30, max_history_steps=10_000)

    async def send(self, address: str, **kw: Any) -> str:
        (sent,) = await self.intents.send("default", [NewIntent(PARENT_TYPE, address, "{}", "test", **kw)])
        return str(sent.row["id"])

    async def deliver(self, address: str, session: str = "s1", limit: int = 1) -> list[LeaseRef]:
        rows, _ = await self.leases.claim(session, [address], None, limit, 5000)
        leases = [LeaseRef(r["id"], r["attempt"], r["lease_token"]) for r in rows]
        for lease in leases:
            await self.leases.ack(lease, stream=session)
        return leases

    async def start(self, lease: LeaseRef, index: int, addresses: list[str], *, caller: Caller = CALLER,
                    session: str = "s1", **kw: Any) -> list[str]:
        spec = StartSpec(index=index, step_name=start_record_name(CHILD_TYPE), children=tuple(
            ChildSpec(to_agent=a, intent_type=CHILD_TYPE, payload=json.dumps({"n": n}), deadline=kw.get("deadline"),
                      max_attempts=None, labels={}, detached=kw.get("detached", False))
            for n, a in enumerate(addresses)))
        row = await self.children.start(lease, session, caller, spec)
        return [c["id"] for c in json.loads(row["result"])["children"]]

    async def sweep(self) -> int:
        """Sweeps until nothing is left; the rounds it took."""
        rounds = 0
        while (await self.children.sweep()).notices:
            rounds += 1
        return rounds


def agent_wait(index: int, children: list[str], mode: str = ALL, timeout_ms: int = 0) -> WaitSpec:
    return WaitSpec(index=index, step_name=record_name(AGENT, mode), kind=AGENT, name=mode, timeout_ms=timeout_ms,
                    children=tuple(children))


# A database of this module's own: the servers other tests start on the
# shared one run child sweepers, which would take these tests' notices from
# under them (the module drives the sweeper itself, round by round).
@pytest.fixture(scope="module")
def family_url(databases: Any) -> str:
    return str(databases.create())


@pytest.fixture
async def db(family_url: str) -> AsyncIterator[Database]:
    database = Database(family_url, min_size=1, max_size=6)
    await database.open(run_migrations=False)
    yield database
    await database.close()


@pytest.fixture
async def pg(family_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(family_url)
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=str, decoder=str, schema="pg_catalog", format="text")
    yield conn
    await conn.close()


@pytest.fixture
def family(db: Database) -> Family:
    return Family(db)


async def state(pg: asyncpg.Connection, intent_id: str) -> str:
    return str(await pg.fetchval("SELECT state::text FROM intents WHERE id = $1", intent_id))


async def event_types(pg: asyncpg.Connection, intent_id: str) -> list[str]:
    return [r["type"] for r in await pg.fetch(
        "SELECT type FROM intent_events WHERE intent_id = $1 ORDER BY seq", intent_id)]


async def finish(family: Family, address: str, count: int, *, fail: bool = False) -> list[str]:
    """Delivers and completes (or fails for good) ``count`` children at ``address``."""
    done = []
    for lease in await family.deliver(address, "w1", count):
        if fail:
            await family.leases.fail(lease, "BOOM", "it broke", False, stream="w1")
        else:
            await family.leases.complete(lease, json.dumps({"done": lease.intent_id}).encode(), stream="w1")
        done.append(lease.intent_id)
    return done


# ---------------------------------------------------------------- starting


async def test_a_start_inserts_its_children_once_with_its_record(family: Family, agent_address: str, pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    workers = f"{agent_address}-w"
    ids = await family.start(lease, 1, [workers, workers, workers])
    assert len(set(ids)) == 3
    rows = await pg.fetch("SELECT id, parent_id, parent_idx, parent_ord, sender, state::text AS state FROM intents "
                          "WHERE parent_id = $1 ORDER BY parent_ord", parent_id)
    assert [(r["id"], r["parent_idx"], r["parent_ord"], r["state"]) for r in rows] == [
        (ids[0], 1, 1, "PENDING"), (ids[1], 1, 2, "PENDING"), (ids[2], 1, 3, "PENDING")]
    assert {r["sender"] for r in rows} == {agent_address}
    parent = await pg.fetchrow("SELECT * FROM intents WHERE id = $1", parent_id)
    assert (parent["child_count"], parent["steps_completed"], parent["last_step_index"]) == (3, 1, 1)
    assert (await event_types(pg, parent_id))[-4:] == ["STEP_COMPLETED"] + ["CHILD_STARTED"] * 3
    # The answer was lost and the sidecar sent it again: the same children, none new.
    assert await family.start(lease, 1, [workers, workers, workers]) == ids
    # A later attempt replaying the start gets the same children too.
    await family.leases.release(lease, "AGENT_DIED", stream="s1")
    (again,) = await family.deliver(agent_address)
    assert await family.start(again, 1, [workers, workers, workers]) == ids
    assert await pg.fetchval("SELECT count(*) FROM intents WHERE parent_id = $1", parent_id) == 3


async def test_a_start_is_fenced_and_checked_for_divergence(family: Family, agent_address: str) -> None:
    await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    await family.start(lease, 1, [f"{agent_address}-w"])
    other = StartSpec(index=1, step_name=start_record_name("intent.family.other.v1"), children=(ChildSpec(
        to_agent=f"{agent_address}-w", intent_type="intent.family.other.v1", payload="{}", deadline=None,
        max_attempts=None, labels={}, detached=False),))
    with pytest.raises(errors.FailedPrecondition, match="step divergence"):
        await family.children.start(lease, "s1", CALLER, other)
    with pytest.raises(errors.StaleLease):
        await family.start(LeaseRef(lease.intent_id, lease.attempt + 1, lease.token), 2, [f"{agent_address}-w"])
    with pytest.raises(errors.StaleLease):
        await family.start(lease, 2, [f"{agent_address}-w"], session="another-stream")


async def test_a_key_without_a_matching_send_pattern_starts_nothing(db: Database, agent_address: str, pg) -> None:
    family = Family(db, auth=True)
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    narrow = Caller("default", "narrow", frozenset({"agent"}), ("agent://**",), send_patterns=("agent://x/y/*",))
    with pytest.raises(errors.PermissionDenied, match="may not send to"):
        await family.start(lease, 1, [f"{agent_address}-w"], caller=narrow)
    none = Caller("default", "none", frozenset({"agent"}), ("agent://**",))
    with pytest.raises(errors.PermissionDenied, match="send patterns: none"):
        await family.start(lease, 1, [f"{agent_address}-w"], caller=none)
    assert await pg.fetchval("SELECT count(*) FROM intents WHERE parent_id = $1", parent_id) == 0
    assert await pg.fetchval("SELECT steps_completed FROM intents WHERE id = $1", parent_id) == 0


async def test_a_childs_deadline_never_exceeds_its_parents(family: Family, agent_address: str, pg) -> None:
    parent_deadline = datetime.now(UTC) + timedelta(hours=1)
    parent_id = await family.send(agent_address, deadline=parent_deadline)
    (lease,) = await family.deliver(agent_address)
    (late,) = await family.start(lease, 1, [f"{agent_address}-w"], deadline=parent_deadline + timedelta(hours=5))
    (none,) = await family.start(lease, 2, [f"{agent_address}-w"])
    (early,) = await family.start(lease, 3, [f"{agent_address}-w"], deadline=parent_deadline - timedelta(minutes=5))
    deadlines = {r["id"]: r["deadline"] for r in await pg.fetch(
        "SELECT id, deadline FROM intents WHERE parent_id = $1", parent_id)}
    parent = await pg.fetchval("SELECT deadline FROM intents WHERE id = $1", parent_id)
    assert deadlines[late] == parent and deadlines[none] == parent
    assert deadlines[early] < parent


def test_start_spec_checks_every_field() -> None:
    good = delivery_pb2.StartChildrenWrite(index=1, step_name=start_record_name(CHILD_TYPE), children=[
        delivery_pb2.ChildSpec(to_agent="agent://a/b/c", intent_type=CHILD_TYPE, payload=b'{"x": 1}')])
    assert start_spec(good, 1024).children[0].payload == '{"x": 1}'
    cases: list[tuple[delivery_pb2.StartChildrenWrite, str]] = []
    bad = delivery_pb2.StartChildrenWrite(); bad.CopyFrom(good); bad.step_name = "@start:nope"  # noqa: E702
    cases.append((bad, "step_name"))
    bad = delivery_pb2.StartChildrenWrite(); bad.CopyFrom(good); bad.children[0].to_agent = "http://x"  # noqa: E702
    cases.append((bad, "to_agent"))
    bad = delivery_pb2.StartChildrenWrite(); bad.CopyFrom(good); bad.children[0].payload = b"{"  # noqa: E702
    cases.append((bad, "payload"))
    bad = delivery_pb2.StartChildrenWrite(); bad.CopyFrom(good); del bad.children[:]  # noqa: E702
    cases.append((bad, "children"))
    bad = delivery_pb2.StartChildrenWrite(); bad.CopyFrom(good); bad.index = 0  # noqa: E702
    cases.append((bad, "index"))
    for msg, field in cases:
        with pytest.raises(Exception, match=field):
            start_spec(msg, 1024)
    big = delivery_pb2.StartChildrenWrite(); big.CopyFrom(good); big.children[0].payload = b'"' + b"x" * 2000 + b'"'  # noqa: E702
    with pytest.raises(errors.ResourceExhausted):
        start_spec(big, 1024)


# ---------------------------------------------------------------- AGENT waits and fan-in


async def test_fan_in_wakes_the_parked_parent_once_with_every_outcome(family: Family, agent_address: str,
                                                                      pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    workers = f"{agent_address}-w"
    ids = await family.start(lease, 1, [workers] * 5)
    reached = await family.waits.reach(lease, "s1", agent_wait(2, ids), park=True)
    assert reached.parked and await state(pg, parent_id) == "WAITING"
    done = await finish(family, workers, 3)
    await family.sweep()
    assert await state(pg, parent_id) == "WAITING"  # two to go
    done += await finish(family, workers, 1, fail=True)
    await family.sweep()
    assert await state(pg, parent_id) == "WAITING"
    done += await finish(family, workers, 1)
    await family.sweep()
    assert await state(pg, parent_id) == "PENDING"
    value = json.loads(await pg.fetchval("SELECT result::text FROM intent_steps WHERE intent_id = $1 AND idx = 2",
                                         parent_id))
    assert [c["id"] for c in value["children"]] == ids
    by_id = {c["id"]: c for c in value["children"]}
    failed = done[3]
    assert by_id[failed]["state"] == "FAILED" and by_id[failed]["error"]["code"] == "BOOM"
    assert by_id[failed]["result"] is None
    assert all(by_id[i]["state"] == "COMPLETED" and by_id[i]["result"] == {"done": i} for i in ids if i != failed)
    types = await event_types(pg, parent_id)
    assert types.count("CHILD_FINISHED") == 5
    # Woken once: one record at the wait's position, one move to PENDING.
    assert await pg.fetchval("SELECT count(*) FROM intent_events WHERE intent_id = $1 AND step_index = 2 "
                             "AND type = 'STEP_COMPLETED'", parent_id) == 1
    # The next attempt reaching the wait again gets the record, not a new wait.
    (again,) = await family.deliver(agent_address)
    replay = await family.waits.reach(again, "s1", agent_wait(2, ids))
    assert replay.record is not None and json.loads(replay.record["result"]) == value


async def test_a_fan_in_of_1000_children_wakes_the_parent_once(family: Family, agent_address: str, pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    workers = f"{agent_address}-w"
    ids = await family.start(lease, 1, [workers] * 1000)
    assert await pg.fetchval("SELECT count(*) FROM intents WHERE parent_id = $1", parent_id) == 1000
    assert (await family.waits.reach(lease, "s1", agent_wait(2, ids), park=True)).parked
    for _ in range(4):
        await finish(family, workers, 250)
        await family.sweep()
    assert await state(pg, parent_id) == "PENDING"
    # Once: a single WAITING -> PENDING move for the whole fan-in.
    moves = await pg.fetch("SELECT type, state::text AS state FROM intent_events WHERE intent_id = $1 "
                           "AND type NOT IN ('CHILD_STARTED', 'CHILD_FINISHED') ORDER BY seq", parent_id)
    assert [(m["type"], m["state"]) for m in moves][-2:] == [("WAITING", "WAITING"), ("STEP_COMPLETED", "PENDING")]
    assert await pg.fetchval("SELECT count(*) FROM intent_events WHERE intent_id = $1 AND type = 'CHILD_FINISHED'",
                             parent_id) == 1000
    assert await pg.fetchval("SELECT count(*) FROM child_notices WHERE parent_id = $1", parent_id) == 0


async def test_first_records_the_first_child_to_end(family: Family, agent_address: str, pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    fast, slow = f"{agent_address}-fast", f"{agent_address}-slow"
    ids = await family.start(lease, 1, [slow, fast])
    assert (await family.waits.reach(lease, "s1", agent_wait(2, ids, FIRST), park=True)).parked
    (winner,) = await finish(family, fast, 1)
    await family.sweep()
    value = json.loads(await pg.fetchval("SELECT result::text FROM intent_steps WHERE intent_id = $1 AND idx = 2",
                                         parent_id))
    assert value["first"] == winner == ids[1]
    assert [c["id"] for c in value["children"]] == [winner]
    assert await state(pg, parent_id) == "PENDING"


async def test_a_held_wait_is_resolved_at_once_when_its_children_are_done(family: Family, agent_address: str,
                                                                          pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    workers = f"{agent_address}-w"
    ids = await family.start(lease, 1, [workers] * 2)
    await finish(family, workers, 2)
    reached = await family.waits.reach(lease, "s1", agent_wait(2, ids))
    assert reached.record is not None and not reached.parked
    assert await state(pg, parent_id) == "IN_PROGRESS"
    await family.sweep()  # the late notices only add CHILD_FINISHED events
    assert (await event_types(pg, parent_id)).count("CHILD_FINISHED") == 2
    assert await pg.fetchval("SELECT count(*) FROM intent_steps WHERE intent_id = $1", parent_id) == 2


async def test_a_wait_refuses_ids_that_are_not_its_children(family: Family, agent_address: str, pg) -> None:
    stranger = await family.send(f"{agent_address}-x")
    await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    (mine,) = await family.start(lease, 1, [f"{agent_address}-w"])
    with pytest.raises(errors.InvalidArgument, match="not children"):
        await family.waits.reach(lease, "s1", agent_wait(2, [mine, stranger]))
    assert await pg.fetchval("SELECT count(*) FROM intent_waits WHERE intent_id = $1", lease.intent_id) == 0


async def test_results_too_large_for_a_record_are_omitted(db: Database, agent_address: str, pg) -> None:
    family = Family(db, max_record_bytes=1024)
    await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    workers = f"{agent_address}-w"
    ids = await family.start(lease, 1, [workers] * 2)
    for child in await family.deliver(workers, "w1", 2):
        await family.leases.complete(child, json.dumps("x" * 800).encode(), stream="w1")
    reached = await family.waits.reach(lease, "s1", agent_wait(2, ids))
    assert reached.record is not None
    value = json.loads(reached.record["result"])
    assert value["results_omitted"] is True
    assert [c["state"] for c in value["children"]] == ["COMPLETED", "COMPLETED"]
    assert all(c["result"] is None for c in value["children"])


async def test_an_agent_wait_times_out(family: Family, agent_address: str, pg) -> None:
    await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    ids = await family.start(lease, 1, [f"{agent_address}-w"])
    assert (await family.waits.reach(lease, "s1", agent_wait(2, ids, timeout_ms=1), park=True)).parked
    fired = await family.waits.fire_due(datetime.now(UTC) + timedelta(seconds=1))
    assert [(r["id"], r["kind"]) for r in fired] == [(lease.intent_id, "AGENT")]
    assert json.loads(await pg.fetchval("SELECT result::text FROM intent_steps WHERE intent_id = $1 AND idx = 2",
                                        lease.intent_id)) == {"timed_out": True}


# ---------------------------------------------------------------- the cascade


async def test_cancel_cascades_down_the_tree_but_not_to_detached_children(family: Family, agent_address: str,
                                                                          pg) -> None:
    root = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    planners = f"{agent_address}-planner"
    (planner,) = await family.start(lease, 1, [planners])
    (kept,) = await family.start(lease, 2, [f"{agent_address}-audit"], detached=True)
    (planner_lease,) = await family.deliver(planners, "s2")
    workers = f"{agent_address}-w"
    grandchildren = await family.start(planner_lease, 1, [workers] * 3, session="s2")
    await family.deliver(workers, "w1", 1)  # one grandchild is running
    await family.intents.cancel("default", root, "stop", None, "ops")
    await family.sweep()
    assert await state(pg, planner) == "CANCELED"
    assert [await state(pg, g) for g in grandchildren] == ["CANCELED"] * 3
    assert await state(pg, kept) == "PENDING"
    reasons = {await pg.fetchval("SELECT cancel_reason FROM intents WHERE id = $1", g) for g in grandchildren}
    assert reasons == {f"parent {planner} ended CANCELED"}
    # The parent sees its children end, the planner its own.
    assert (await event_types(pg, root)).count("CHILD_FINISHED") == 1
    assert (await event_types(pg, planner)).count("CHILD_FINISHED") == 3


async def test_a_failed_parent_cancels_its_children(family: Family, agent_address: str, pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    ids = await family.start(lease, 1, [f"{agent_address}-w"] * 2)
    await family.leases.fail(lease, "BOOM", "no", False, stream="s1")
    await family.sweep()
    assert await state(pg, parent_id) == "FAILED"
    assert [await state(pg, i) for i in ids] == ["CANCELED", "CANCELED"]


async def test_the_sweeper_skips_a_locked_parent_and_comes_back(family: Family, db: Database, agent_address: str,
                                                                pg) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    workers = f"{agent_address}-w"
    ids = await family.start(lease, 1, [workers])
    assert (await family.waits.reach(lease, "s1", agent_wait(2, ids), park=True)).parked
    await finish(family, workers, 1)
    async with db.transaction() as holder:
        await holder.execute("SELECT 1 FROM intents WHERE id = $1 FOR UPDATE", parent_id)
        round_ = await family.children.sweep()
        assert round_.skipped >= 1 and round_.woken == 0  # did not wait for the lock
    await family.sweep()
    assert await state(pg, parent_id) == "PENDING"


async def test_children_are_listed_in_start_order(family: Family, agent_address: str) -> None:
    parent_id = await family.send(agent_address)
    (lease,) = await family.deliver(agent_address)
    first = await family.start(lease, 1, [f"{agent_address}-w"] * 3)
    second = await family.start(lease, 2, [f"{agent_address}-w"] * 2)
    rows, more = await family.intents.list_intents("default", states=None, intent_type=None, to_agent=None,
                                                   labels=None, before_id=None, limit=4, parent_id=parent_id)
    assert [r["id"] for r in rows] == first + second[:1] and more
    rows, more = await family.intents.list_intents("default", states=None, intent_type=None, to_agent=None,
                                                   labels=None, before_id=rows[-1]["id"], limit=4,
                                                   parent_id=parent_id)
    assert [r["id"] for r in rows] == second[1:] and not more
    other, _ = await family.intents.list_intents("other-tenant", states=None, intent_type=None, to_agent=None,
                                                 labels=None, before_id=None, limit=4, parent_id=parent_id)
    assert other == []
