"""Child intents with real processes: a real server, real sidecars
supervising the family test agent (tests/agents/family_agent.py), real
SIGKILL of parents, children and sidecars. The agent leaves a ledger row
for every step function it runs, every start (with the ids it got back) and
every value a gather returns, so these tests count what really happened:
no child sent twice, every attempt got the same children, no recorded step
ran twice, parents resume and get their children's results."""

from __future__ import annotations

import json
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from intentd.client import IntentClient, IntentState
from intentd.generated.v1 import admin_service_pb2, admin_service_pb2_grpc
from intentd.server.auth import KeyStore
from intentd.server.db import Database
from tests.stack import ledger
from tests.support import run_sync, sql, wait_until

AGENT = "tests.agents.family_agent"
ROLES = ("orchestrate", "call", "tree", "plan", "race", "work")


class Family:
    """One test's intent types (a prefix of its own) and its sidecars."""

    def __init__(self, cluster: Any, *, hold_ms: int = 2000, **type_settings: Any) -> None:
        self.cluster = cluster
        self.server = cluster.server()
        self.prefix = f"test.family.f{uuid.uuid4().hex[:8]}"
        with grpc.insecure_channel(self.server.address) as channel:
            stub = admin_service_pb2_grpc.AdminServiceStub(channel)
            for role in ROLES:
                stub.PutIntentType(admin_service_pb2.PutIntentTypeRequest(intent_type=admin_service_pb2.IntentType(
                    intent_type=self.type(role), wait_hold_ms=hold_ms, **type_settings)))
        self.sidecars: list[Any] = []

    def type(self, role: str) -> str:
        return f"{self.prefix}.{role}.v1"

    def sidecar(self, capacity: int = 8) -> Any:
        sc = self.cluster.sidecar(self.server.address, AGENT, capacity=str(capacity),
                                  TEST_AGENT_CAPACITY=str(capacity), TEST_FAMILY_PREFIX=self.prefix)
        self.sidecars.append(sc)
        return sc

    def send(self, client: IntentClient, role: str, **payload: Any) -> str:
        return client.send_intent(intent_type=self.type(role), to_agent=self.cluster.address, payload=payload)

    def finish(self, client: IntentClient, intent_id: str, state: IntentState = IntentState.COMPLETED,
               timeout: float = 90) -> Any:
        final = client.wait_for(intent_id, timeout=timeout)
        assert final.state is state, (final.state, final.error, self.cluster.logs()[-8000:])
        return final


def children_of(cluster: Any, parent_id: str) -> list[Any]:
    return sql(cluster.db, "SELECT id, state::text AS state, attempt, parent_idx, parent_ord, result::text AS result "
               "FROM intents WHERE parent_id = $1 ORDER BY parent_idx, parent_ord", parent_id)


def started_ids(entries: list[dict[str, Any]]) -> list[list[str]]:
    """The ids each start returned, in every attempt that got past it."""
    return [json.loads(e["phase"][len("started:"):]) for e in entries if e["phase"].startswith("started:")]


def returned(entries: list[dict[str, Any]]) -> list[Any]:
    return [json.loads(e["phase"][len("returned:"):]) for e in entries if e["phase"].startswith("returned:")]


def step_begins(entries: list[dict[str, Any]]) -> Counter[int]:
    return Counter(e["step"] for e in entries if e["phase"] == "begin")


def never_rerun_after_record(cluster: Any, intent_id: str) -> None:
    """No step function ran again in an attempt after the one that recorded
    it (the family agent's ledger step is the step's position). Agents share
    processes, so a kill elsewhere may re-run a step that was not recorded
    yet: that is allowed, a recorded one running again is not."""
    recorded = {r["idx"]: r["attempt"] for r in sql(cluster.db, "SELECT idx, attempt FROM intent_steps "
                                                    "WHERE intent_id = $1", intent_id)}
    for entry in ledger(cluster.db, intent_id):
        if entry["phase"] == "begin" and entry["step"] in recorded:
            assert entry["attempt"] <= recorded[entry["step"]], (intent_id, entry, recorded)


def parent_moves(cluster: Any, intent_id: str) -> list[tuple[str, str]]:
    """The parent's own events (not its children's), as (type, state)."""
    rows = sql(cluster.db, "SELECT type, state::text AS state FROM intent_events WHERE intent_id = $1 "
               "AND type NOT IN ('CHILD_STARTED', 'CHILD_FINISHED') ORDER BY seq", intent_id)
    return [(r["type"], r["state"]) for r in rows]


def test_a_call_to_a_fast_child_costs_the_parent_no_redelivery(cluster) -> None:
    family = Family(cluster)
    family.sidecar()
    with IntentClient(family.server.address) as client:
        parent = family.send(client, "call", work={"value": 7})
        final = family.finish(client, parent)
        assert final.result == {"value": 7, "n": None, "attempt": 1}
        # Held within the hold window: one delivery, never parked.
        assert (final.attempt, final.parked_attempts) == (1, 0)
        (child,) = children_of(cluster, parent)
        assert child["state"] == "COMPLETED" and child["parent_idx"] == 2  # after the step "prepare"
        types = [e.type for e in client.watch(parent)]
        assert types.count("CHILD_STARTED") == 1 and types.count("CHILD_FINISHED") == 1
        entries = ledger(cluster.db, parent)
        assert step_begins(entries) == Counter({1: 1, 4: 1})


def test_a_parent_killed_at_every_point_sends_no_child_twice(cluster, tmp_path: Path) -> None:
    """SIGKILL of the parent's agent before its start committed (after the
    step before it), after the start, while its children run (parked, the
    sidecar killed too), and after the fan-in: every parent resumes, gets the
    same children and their results, and no child exists twice."""
    family = Family(cluster, hold_ms=0)
    family.sidecar()
    family.sidecar()
    gate = tmp_path / "go"
    with IntentClient(family.server.address) as client:
        parents = {point: family.send(client, "orchestrate", children=3, kill_after=point,
                                      work={"value": point, "block_until": str(gate)})
                   for point in ("prepare", "started", "gathered")}
        parked = family.send(client, "orchestrate", children=3, work={"value": "parked", "block_until": str(gate)})
        wait_until(lambda: client.get(parked).state is IntentState.WAITING, 60, 0.05, "the parent parked")
        # Kill a sidecar with its whole process group while the parent is parked.
        family.sidecars[0].kill_group()
        family.sidecar()
        gate.write_text("go")
        for point, parent in [*parents.items(), ("parked", parked)]:
            final = family.finish(client, parent)
            kids = children_of(cluster, parent)
            assert len(kids) == 3, (point, kids)  # none sent twice
            assert [k["state"] for k in kids] == ["COMPLETED"] * 3
            entries = ledger(cluster.db, parent)
            starts = started_ids(entries)
            assert starts and all(s == [k["id"] for k in kids] for s in starts), (point, starts)
            assert [(v["value"], v["n"]) for v in final.result] == [(point, n) for n in range(3)]
            assert all(r == final.result for r in returned(entries))  # every attempt got the same results
            # Recorded steps never ran again (a kill of a process stops every
            # handler in it, so an unrecorded one may run again).
            never_rerun_after_record(cluster, parent)
            for kid in kids:
                never_rerun_after_record(cluster, kid["id"])


def test_a_killed_child_is_retried_and_a_dead_lettered_one_fails_the_call(cluster, tmp_path: Path) -> None:
    family = Family(cluster)
    family.sidecar()
    family.sidecar()
    flaky, doomed = tmp_path / "flaky", tmp_path / "doomed"
    flaky.write_text("kill")
    doomed.write_text("kill")
    with IntentClient(family.server.address) as client:
        retried = family.send(client, "call", work={"value": "ok", "kill_if": str(flaky)}, child_max_attempts=3)
        (child,) = wait_until(lambda: children_of(cluster, retried), 30, 0.05, "the child")
        wait_until(lambda: step_begins(ledger(cluster.db, child["id"]))[1] >= 1, 60, 0.05, "the child killed")
        flaky.unlink()
        final = family.finish(client, retried)
        assert final.result["value"] == "ok" and final.result["attempt"] >= 2  # retried per its own attempts
        dead = family.send(client, "call", work={"kill_if": str(doomed)}, child_max_attempts=2)
        failed = family.finish(client, dead, IntentState.FAILED)
        assert failed.error.code == "CHILD_FAILED", failed.error
        (kid,) = children_of(cluster, dead)
        assert kid["state"] == "FAILED" and kid["attempt"] == 2
        (outcome,) = returned(ledger(cluster.db, dead))
        assert outcome == {"failed": kid["id"], "state": "FAILED", "code": "ATTEMPTS_EXHAUSTED"}


def test_three_levels_with_kills_at_every_level(cluster, tmp_path: Path) -> None:
    # All levels share the agent processes: a worker's SIGKILL also kills the
    # planners and the root running beside it, so every level has attempts to spare.
    family = Family(cluster, hold_ms=0, max_attempts=10)
    for _ in range(3):
        family.sidecar()
    markers = tmp_path / "killed"
    markers.mkdir()
    with IntentClient(family.server.address) as client:
        # The root and each planner are killed after their start (the first time
        # they get there: a worker's kill may end an earlier attempt before it),
        # each worker in its step.
        levels = tmp_path / "levels"
        levels.mkdir()
        root = family.send(client, "tree", planners=2, workers=2, kill_after="started", kill_marks=str(levels),
                           planner_kill_after="started", work={"value": "w", "kill_once": str(markers)})
        final = family.finish(client, root, timeout=120)
        workers = [r["id"] for r in sql(cluster.db, "SELECT w.id FROM intents p JOIN intents w ON w.parent_id = p.id"
                                        " WHERE p.parent_id = $1", root)]
        assert sorted(p.name for p in markers.iterdir()) == sorted(workers)  # every worker was killed
        for intent_id in [root, *workers, *(r["id"] for r in children_of(cluster, root))]:
            never_rerun_after_record(cluster, intent_id)
        planners = children_of(cluster, root)
        assert len(planners) == 2 and all(p["state"] == "COMPLETED" for p in planners)
        assert [[(v["value"], v["n"]) for v in planner] for planner in final.result] == [[("w", 0), ("w", 1)]] * 2
        assert all(v["attempt"] >= 2 for planner in final.result for v in planner)  # each worker was killed once
        for level in [root, *(p["id"] for p in planners)]:
            entries = ledger(cluster.db, level)
            kids = [k["id"] for k in children_of(cluster, level)]
            assert len(kids) == 2
            starts = started_ids(entries)
            assert (levels / f"{level}.started").exists()
            assert len(starts) >= 2 and all(s == kids for s in starts)  # killed after the start, same children
        assert sql(cluster.db, "SELECT count(*) AS n FROM intents p JOIN intents w ON w.parent_id = p.id "
                   "WHERE p.parent_id = $1", root)[0]["n"] == 4


def test_a_fan_out_of_1000_children_on_4_sidecars_wakes_the_parent_once(cluster) -> None:
    family = Family(cluster, hold_ms=0)
    for _ in range(4):
        family.sidecar(capacity=16)
    with IntentClient(family.server.address) as client:
        parent = family.send(client, "orchestrate", children=1000, work={"value": 1})
        final = family.finish(client, parent, timeout=300)
        assert len(final.result) == 1000 and [v["n"] for v in final.result] == list(range(1000))
        kids = children_of(cluster, parent)
        assert len(kids) == 1000 and {k["state"] for k in kids} == {"COMPLETED"}
        # Parked once on the gather, woken once: one WAITING -> PENDING for 1,000 children.
        moves = parent_moves(cluster, parent)
        assert moves.count(("WAITING", "WAITING")) == 1
        assert sum(1 for t, s in moves if t == "STEP_COMPLETED" and s == "PENDING") == 1
        assert (final.attempt, final.parked_attempts) == (2, 1)
        finished = sql(cluster.db, "SELECT count(*) AS n FROM intent_events WHERE intent_id = $1 "
                       "AND type = 'CHILD_FINISHED'", parent)
        assert finished[0]["n"] == 1000
        # The children were started by one statement: one start record, all at its position.
        assert {(k["parent_idx"]) for k in kids} == {2}


def test_canceling_a_parent_cancels_its_100_running_children_and_stops_their_agents(cluster) -> None:
    family = Family(cluster)
    for _ in range(4):
        family.sidecar(capacity=26)
    with IntentClient(family.server.address) as client:
        parent = family.send(client, "orchestrate", children=100, work={"hang": True})

        def running() -> bool:
            rows = sql(cluster.db, "SELECT count(*) AS n FROM test_ledger l JOIN intents i ON i.id = l.intent_id "
                       "WHERE i.parent_id = $1 AND l.phase = 'begin'", parent)
            return bool(rows[0]["n"] == 100)

        wait_until(running, 90, 0.1, "100 children running")
        client.cancel(parent, reason="operator")
        family.finish(client, parent, IntentState.CANCELED)

        def stopped() -> bool:
            rows = sql(cluster.db, "SELECT count(*) AS n FROM test_ledger l JOIN intents i ON i.id = l.intent_id "
                       "WHERE i.parent_id = $1 AND l.phase LIKE 'stopped:%'", parent)
            return bool(rows[0]["n"] == 100)

        wait_until(stopped, 60, 0.1, "100 children told to stop")
        kids = children_of(cluster, parent)
        assert len(kids) == 100 and {k["state"] for k in kids} == {"CANCELED"}
        phases = {r["phase"] for r in sql(cluster.db, "SELECT l.phase FROM test_ledger l JOIN intents i ON "
                                          "i.id = l.intent_id WHERE i.parent_id = $1 AND l.phase LIKE 'stopped:%'",
                                          parent)}
        assert phases == {"stopped:CANCELED"}


def test_first_returns_the_winner_and_the_loser_is_canceled_with_the_parent(cluster, tmp_path: Path) -> None:
    family = Family(cluster)
    family.sidecar()
    with IntentClient(family.server.address) as client:
        parent = family.send(client, "race", children=[{"value": "slow", "hang": True}, {"value": "fast"}])
        final = family.finish(client, parent)
        assert final.result == {"winner": 1, "value": {"value": "fast", "n": None, "attempt": 1}}
        slow, fast = children_of(cluster, parent)
        assert fast["state"] == "COMPLETED"
        # The parent ended: the child nobody waits for is canceled, and its agent told so.
        wait_until(lambda: children_of(cluster, parent)[0]["state"] == "CANCELED", 30, 0.05, "the loser canceled")
        wait_until(lambda: any(e["phase"] == "stopped:CANCELED" for e in ledger(cluster.db, slow["id"])), 30, 0.05,
                   "the loser's agent stopped")


def test_a_sigkilled_sidecar_of_a_parent_waiting_on_a_call_loses_nothing(cluster, tmp_path: Path) -> None:
    family = Family(cluster, hold_ms=0)
    first = family.sidecar()
    gate = tmp_path / "gate"
    with IntentClient(family.server.address) as client:
        parent = family.send(client, "call", work={"value": 3, "block_until": str(gate)})
        wait_until(lambda: client.get(parent).state is IntentState.WAITING, 60, 0.05, "the parent parked")
        first.signal_group(signal.SIGKILL)
        family.sidecar()
        gate.write_text("go")
        final = family.finish(client, parent)
        assert final.result["value"] == 3
        assert len(children_of(cluster, parent)) == 1
        assert step_begins(ledger(cluster.db, parent)) == Counter({1: 1, 4: 1})  # prepare ran before the kill


def test_an_agent_key_without_a_send_pattern_for_the_address_starts_no_child(cluster) -> None:
    server = cluster.server(INTENTD_AUTH="on")
    tenant = f"fam{uuid.uuid4().hex[:6]}"
    elsewhere = cluster.address.rsplit("/", 1)[0] + "/elsewhere"

    async def keys() -> tuple[str, str, str]:
        db = Database(cluster.db, min_size=1, max_size=1)
        await db.open(run_migrations=False)
        try:
            store = KeyStore(db)
            _, narrow = await store.create(tenant, "narrow", ["agent"], (cluster.address,),
                                           send_patterns=(elsewhere,))
            _, wide = await store.create(tenant, "wide", ["agent"], (cluster.address,),
                                         send_patterns=(cluster.address,))
            _, client_key = await store.create(tenant, "client", ["client"])
            return narrow, wide, client_key
        finally:
            await db.close()

    narrow, wide, client_key = run_sync(keys())
    prefix = f"test.family.f{uuid.uuid4().hex[:8]}"
    first = cluster.sidecar(server.address, AGENT, TEST_FAMILY_PREFIX=prefix, INTENTD_API_KEY=narrow)
    with IntentClient(server.address, metadata=[("authorization", f"Bearer {client_key}")]) as client:
        parent = client.send_intent(intent_type=f"{prefix}.call.v1", to_agent=cluster.address,
                                    payload={"work": {"value": 1}})
        final = client.wait_for(parent, timeout=60)
        assert final.state is IntentState.FAILED, (final, cluster.logs()[-6000:])
        assert final.error.code == "CHILD_NOT_PERMITTED" and "PERMISSION_DENIED" in final.error.message
        assert final.attempt == 1  # not retried: every attempt would be refused the same way
        assert children_of(cluster, parent) == []  # nothing sent
        first.kill_group()
        # The same handler under a key that may send there: the child runs, in the parent's tenant.
        cluster.sidecar(server.address, AGENT, TEST_FAMILY_PREFIX=prefix, INTENTD_API_KEY=wide)
        allowed = client.send_intent(intent_type=f"{prefix}.call.v1", to_agent=cluster.address,
                                     payload={"work": {"value": 2}})
        done = client.wait_for(allowed, timeout=60)
        assert done.state is IntentState.COMPLETED, (done, cluster.logs()[-6000:])
        (child,) = children_of(cluster, allowed)
        assert sql(cluster.db, "SELECT tenant FROM intents WHERE id = $1", child["id"])[0]["tenant"] == tenant
