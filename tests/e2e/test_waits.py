"""Durable waits with real processes: a real server, real sidecars
supervising the wait test agent (tests/agents/wait_agent.py), real SIGKILL.
The agent leaves a ledger row for every step it runs and for every value a
wait returns, so these tests count what really ran: no step runs twice, no
wait loses or changes its value, a wake costs one delivery."""

from __future__ import annotations

import json
import os
import random
import signal
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from intentd.client import IntentClient, IntentState
from intentd.client.errors import ClientError
from intentd.generated.v1 import admin_service_pb2, admin_service_pb2_grpc
from intentd.testing.database import connection
from tests.proxy import TcpProxy, postgres_through, postgres_upstream
from tests.stack import begins, create_ledger, ledger
from tests.support import run_sync, wait_until

AGENT = "tests.agents.wait_agent"


def new_type(server: str, hold_ms: int, **settings: Any) -> str:
    """An intent type of its own (the registry is shared by the tests on a database)."""
    intent_type = f"test.wait.t{uuid.uuid4().hex[:8]}.v1"
    with grpc.insecure_channel(server) as channel:
        admin_service_pb2_grpc.AdminServiceStub(channel).PutIntentType(admin_service_pb2.PutIntentTypeRequest(
            intent_type=admin_service_pb2.IntentType(intent_type=intent_type, wait_hold_ms=hold_ms, **settings)))
    return intent_type


def start(client: IntentClient, cluster: Any, intent_type: str, script: list[dict[str, Any]], **extra: Any) -> str:
    return client.send_intent(intent_type=intent_type, to_agent=cluster.address, payload={"script": script, **extra})


def sidecar(cluster: Any, server: Any, intent_type: str, capacity: int = 4) -> Any:
    return cluster.sidecar(server.address, AGENT, capacity=str(capacity), TEST_AGENT_CAPACITY=str(capacity),
                           TEST_AGENT_TYPE=intent_type)


def until_waiting(client: IntentClient, intent_id: str, cluster: Any, *, parked: bool, timeout: float = 30) -> Any:
    def reached() -> Any:
        intent = client.get(intent_id)
        if intent.waiting is not None and (intent.state is IntentState.WAITING or not parked):
            return intent
        return None

    try:
        return wait_until(reached, timeout, 0.01, f"intent {intent_id} waiting")
    except AssertionError:
        print(cluster.logs())
        raise


def finish(client: IntentClient, intent_id: str, cluster: Any, timeout: float = 60) -> Any:
    final = client.wait_for(intent_id, timeout=timeout)
    assert final.state is IntentState.COMPLETED, (final.state, final.error, cluster.logs()[-6000:])
    return final


def returned(entries: list[dict[str, Any]], op: int) -> list[Any]:
    """What the wait at operation ``op`` returned, once per attempt that got past it."""
    return [json.loads(e["phase"][len("returned:"):]) for e in entries
            if e["step"] == op and e["phase"].startswith("returned:")]


def deliveries(client: IntentClient, intent_id: str) -> int:
    return sum(1 for e in client.watch(intent_id) if e.type == "DELIVERED")


def agent_pid(sidecar_process: Any) -> int:
    children = Path(f"/proc/{sidecar_process.pid}/task/{sidecar_process.pid}/children").read_text().split()
    assert children, "the sidecar has no agent process"
    return int(children[0])


SCRIPT = [{"step": "a"}, {"signal": "go"}, {"step": "b"}]


def test_signal_before_the_wait_is_kept_in_the_inbox(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    with IntentClient(server.address) as client:
        # No agent yet: the signal arrives long before any handler waits for it.
        intent_id = start(client, cluster, intent_type, SCRIPT)
        sent = client.signal(intent_id, "go", {"n": 1})
        assert sent.created and sent.signal.consumed_by_step == 0
        sidecar(cluster, server, intent_type)
        final = finish(client, intent_id, cluster)
        assert final.result == ["a", {"n": 1}, "b"]
        # The wait found its signal at once: never parked, one delivery.
        assert final.attempt == 1 and final.parked_attempts == 0
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1, 3: 1})


def test_signal_within_the_hold_window_costs_no_redelivery(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=20_000)
    sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, SCRIPT)
        waiting = until_waiting(client, intent_id, cluster, parked=False)
        assert waiting.state is IntentState.IN_PROGRESS  # held, not parked
        assert waiting.waiting.kind == "SIGNAL" and waiting.waiting.name == "go"
        assert waiting.waiting.step_index == 2
        client.signal(intent_id, "go", {"n": 2})
        final = finish(client, intent_id, cluster)
        assert final.result == ["a", {"n": 2}, "b"]
        assert final.attempt == 1 and final.parked_attempts == 0
        assert deliveries(client, intent_id) == 1
        types = [e.type for e in client.watch(intent_id)]
        assert "WAITING" not in types and "SIGNALED" in types


def test_parked_intent_holds_no_lease_and_a_signal_wakes_it_with_one_delivery(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0, max_attempts=1)
    sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, SCRIPT)
        parked = until_waiting(client, intent_id, cluster, parked=True)
        assert parked.waiting.kind == "SIGNAL" and parked.waiting.step_index == 2
        rows = run_sync(_sql(cluster.db, "SELECT lease_session, parked_attempts FROM intents WHERE id = $1",
                             intent_id))
        assert rows[0]["lease_session"] is None and rows[0]["parked_attempts"] == 1
        client.signal(intent_id, "go", "hello")
        final = finish(client, intent_id, cluster)
        assert final.result == ["a", "hello", "b"]
        # max_attempts=1 and two deliveries: the parked attempt was not counted.
        assert final.attempt == 2 and final.parked_attempts == 1
        assert deliveries(client, intent_id) == 2
        entries = ledger(cluster.db, intent_id)
        assert begins(entries) == Counter({1: 1, 3: 1})
        assert returned(entries, 2) == ["hello"]
        events = list(client.watch(intent_id))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        waiting = [e for e in events if e.type == "WAITING"]
        assert len(waiting) == 1 and waiting[0].wait_kind == "SIGNAL" and waiting[0].wait_name == "go"


def test_signal_after_the_agent_died(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    first = sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, SCRIPT)
        until_waiting(client, intent_id, cluster, parked=True)
        first.kill_group()  # sidecar and agent: nothing serves the address now
        client.signal(intent_id, "go", 7)
        assert client.get(intent_id).state is IntentState.PENDING
        sidecar(cluster, server, intent_type)
        final = finish(client, intent_id, cluster)
        assert final.result == ["a", 7, "b"]
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1, 3: 1})


def test_the_same_signal_id_twice_is_delivered_once(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sidecar(cluster, server, intent_type)
    script = [{"signal": "go"}, {"signal": "go", "timeout": 1.0}]
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, script)
        first = client.signal(intent_id, "go", 1, signal_id="once")
        again = client.signal(intent_id, "go", 1, signal_id="once")
        assert first.created and not again.created and again.signal.id == first.signal.id
        final = finish(client, intent_id, cluster)
        # One signal: the first wait took it, the second timed out.
        assert final.result == [1, {"timed_out": True}]
        events = list(client.watch(intent_id))
        assert sum(1 for e in events if e.type == "SIGNALED") == 1
        fired = [e for e in events if e.type == "TIMER_FIRED"]
        assert len(fired) == 1 and fired[0].message == "TIMEOUT"


def test_signal_to_a_terminal_or_unknown_intent_is_refused(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, [{"step": "only"}])
        finish(client, intent_id, cluster)
        with pytest.raises(ClientError) as terminal:
            client.signal(intent_id, "go", 1)
        assert terminal.value.code is grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ClientError) as unknown:
            client.signal("0" * 26, "go", 1)
        assert unknown.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError) as bad:
            client.signal(intent_id, "no spaces allowed", 1)
        assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("who", ["agent_itself", "test"])
def test_agent_killed_between_the_signal_commit_and_the_wait_return(cluster, who) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=20_000)
    sc = sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        extra = {"kill_after": 2} if who == "agent_itself" else {}
        intent_id = start(client, cluster, intent_type, SCRIPT, **extra)
        until_waiting(client, intent_id, cluster, parked=False)
        pid = agent_pid(sc)
        client.signal(intent_id, "go", "v")
        if who == "test":
            # The signal is committed; its answer may or may not have reached the agent.
            os.kill(pid, signal.SIGKILL)
        final = finish(client, intent_id, cluster)
        assert final.result == ["a", "v", "b"]
        entries = ledger(cluster.db, intent_id)
        assert begins(entries) == Counter({1: 1, 3: 1}), entries
        # Whatever attempt saw the wait return saw the same value.
        assert set(map(json.dumps, returned(entries, 2))) == {'"v"'}
        assert final.parked_attempts == 0
        assert final.attempt == 2 if who == "agent_itself" else final.attempt in (1, 2)


def test_waiting_intents_survive_the_server_being_killed(cluster, databases) -> None:
    # A database of its own: no other replica (the session's in-process
    # server) may act on these intents while this one is down.
    cluster.db = create_ledger(databases.create())
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sc = sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        ids = [start(client, cluster, intent_type, SCRIPT) for _ in range(5)]
        for intent_id in ids:
            until_waiting(client, intent_id, cluster, parked=True)
    server.kill()
    sc.kill_group()
    replacement = cluster.server()
    sidecar(cluster, replacement, intent_type)
    with IntentClient(replacement.address) as client:
        for n, intent_id in enumerate(ids):
            assert client.get(intent_id).state is IntentState.WAITING
            client.signal(intent_id, "go", n)
        for n, intent_id in enumerate(ids):
            final = finish(client, intent_id, cluster)
            assert final.result == ["a", n, "b"]
            entries = ledger(cluster.db, intent_id)
            assert begins(entries) == Counter({1: 1, 3: 1})
            assert returned(entries, 2) == [n]


def test_a_timer_due_while_every_replica_was_down_fires_on_the_first_one_up(cluster, databases) -> None:
    cluster.db = create_ledger(databases.create())
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sc = sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, [{"step": "a"}, {"sleep": 2.0}, {"step": "b"}])
        parked = until_waiting(client, intent_id, cluster, parked=True)
        due = parked.waiting.due_time
        assert parked.waiting.kind == "TIME" and due is not None
    server.kill()
    sc.kill_group()
    # Every replica down while the timer comes due (the database's clock decides).
    wait_until(lambda: run_sync(_sql(cluster.db, "SELECT now() > $1 AS past", due))[0]["past"], 30, 0.1)
    replacement = cluster.server()
    sidecar(cluster, replacement, intent_type)
    with IntentClient(replacement.address) as client:
        final = finish(client, intent_id, cluster)
        assert final.result == ["a", "slept", "b"]
        fired = [e for e in client.watch(intent_id) if e.type == "TIMER_FIRED"]
        assert len(fired) == 1 and fired[0].time >= due
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1, 3: 1})


@pytest.mark.timeout(180)
def test_database_outage_while_intents_wait_and_a_timer_comes_due(cluster, databases) -> None:
    """Every connection to PostgreSQL cut and refused for a while, as a
    restart does, while intents are parked and a timer comes due."""
    cluster.db = create_ledger(databases.create())
    with TcpProxy(postgres_upstream(cluster.db)) as proxy:
        server = cluster.server(INTENTD_DATABASE_URL=postgres_through(proxy, cluster.db))
        intent_type = new_type(server.address, hold_ms=0)
        sidecar(cluster, server, intent_type)
        with IntentClient(server.address) as client:
            ids = [start(client, cluster, intent_type, SCRIPT) for _ in range(3)]
            timer = start(client, cluster, intent_type, [{"step": "a"}, {"sleep": 2.0}, {"step": "b"}])
            for intent_id in [*ids, timer]:
                until_waiting(client, intent_id, cluster, parked=True)
            proxy.cut(seconds=6)  # the timer comes due in the outage
            for n, intent_id in enumerate(ids):
                client.signal(intent_id, "go", n)  # retried by the client until the database is back
            finals = [finish(client, i, cluster, timeout=120) for i in [*ids, timer]]
            assert [f.result for f in finals] == [["a", 0, "b"], ["a", 1, "b"], ["a", 2, "b"], ["a", "slept", "b"]]
            for n, intent_id in enumerate(ids):
                entries = ledger(cluster.db, intent_id)
                assert begins(entries) == Counter({1: 1, 3: 1})
                assert returned(entries, 2) == [n]
            assert sum(1 for e in client.watch(timer) if e.type == "TIMER_FIRED") == 1
            assert begins(ledger(cluster.db, timer)) == Counter({1: 1, 3: 1})


def test_sleep_within_the_hold_window_returns_without_parking(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=10_000)
    sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, [{"sleep": 0.3}, {"step": "b"}])
        final = finish(client, intent_id, cluster)
        assert final.result == ["slept", "b"] and final.attempt == 1 and final.parked_attempts == 0
        fired = [e for e in client.watch(intent_id) if e.type == "TIMER_FIRED"]
        steps = client.steps(intent_id)
        assert steps[0].name == "@sleep" and len(fired) <= 1


def test_thousand_intents_wait_on_one_agent_of_capacity_one(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sidecar(cluster, server, intent_type, capacity=1)
    count = 1000
    with IntentClient(server.address) as client:
        ids = client.send_intents([{"intent_type": intent_type, "to_agent": cluster.address,
                                    "payload": {"script": SCRIPT}} for _ in range(count)])

        def parked() -> bool:
            rows = run_sync(_sql(cluster.db, "SELECT count(*) AS n FROM intents WHERE id = ANY($1::text[])"
                                 " AND state = 'WAITING'", ids))
            return bool(rows[0]["n"] == count)

        wait_until(parked, 300, 0.2, "all intents parked")
        order = list(enumerate(ids))
        random.Random(13).shuffle(order)
        for n, intent_id in order:
            client.signal(intent_id, "go", n)
        for n, intent_id in enumerate(ids):
            final = client.wait_for(intent_id, timeout=300)
            assert final.state is IntentState.COMPLETED, (final.state, final.error)
            assert final.result == ["a", n, "b"]
        rows = run_sync(_sql(cluster.db, "SELECT intent_id, count(*) AS n FROM intent_events WHERE"
                             " intent_id = ANY($1::text[]) AND type = 'DELIVERED' GROUP BY intent_id", ids))
        # One delivery to reach the wait, one per wake: never more.
        assert Counter(r["n"] for r in rows) == Counter({2: count})
        rows = run_sync(_sql(cluster.db, "SELECT count(*) AS n FROM test_ledger WHERE intent_id = ANY($1::text[])"
                             " AND phase = 'begin'", ids))
        assert rows[0]["n"] == 2 * count


def test_ask_human_decided_through_the_api(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sc = sidecar(cluster, server, intent_type)
    script = [{"step": "build"}, {"human": "Deploy?", "outcomes": ["approve", "reject"]}, {"step": "deploy"}]
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, script)
        parked = until_waiting(client, intent_id, cluster, parked=True)
        assert parked.waiting.kind == "HUMAN" and parked.waiting.task_id
        os_kill(agent_pid(sc))  # no agent is needed while a human thinks
        tasks = client.list_tasks(intent_id=intent_id).tasks
        assert [t.id for t in tasks] == [parked.waiting.task_id] and tasks[0].title == "Deploy?"
        with pytest.raises(ClientError) as wrong:
            client.decide_task(tasks[0].id, "maybe")
        assert wrong.value.code is grpc.StatusCode.INVALID_ARGUMENT
        decided = client.approve(tasks[0].id, comment="ship it")
        assert decided.state == "DECIDED" and decided.decision.outcome == "approve"
        with pytest.raises(ClientError) as again:
            client.reject(tasks[0].id)
        assert again.value.code is grpc.StatusCode.FAILED_PRECONDITION
        final = finish(client, intent_id, cluster)
        assert final.result[1]["outcome"] == "approve" and final.result[1]["comment"] == "ship it"
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1, 3: 1})
        types = [e.type for e in client.watch(intent_id)]
        assert types.index("TASK_CREATED") < types.index("WAITING") < types.index("TASK_DECIDED")


def test_cancel_of_a_waiting_intent(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = start(client, cluster, intent_type, [{"human": "Approve?"}])
        parked = until_waiting(client, intent_id, cluster, parked=True)
        client.cancel(intent_id, "not needed")
        assert client.get(intent_id).state is IntentState.CANCELED
        assert client.get_task(parked.waiting.task_id).state == "CANCELED"
        with pytest.raises(ClientError) as late:
            client.approve(parked.waiting.task_id)
        assert late.value.code is grpc.StatusCode.FAILED_PRECONDITION


def os_kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


async def _sql(url: str, query: str, *args: Any) -> list[Any]:
    async with connection(url) as conn:
        return list(await conn.fetch(query, *args))



def test_a_deadline_ends_a_waiting_intent_and_its_task(cluster) -> None:
    server = cluster.server()
    intent_type = new_type(server.address, hold_ms=0)
    sidecar(cluster, server, intent_type)
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=intent_type, to_agent=cluster.address,
                                       payload={"script": [{"step": "a"}, {"human": "Approve?"}]},
                                       deadline=timedelta(seconds=3))
        parked = until_waiting(client, intent_id, cluster, parked=True)
        final = client.wait_for(intent_id, timeout=30)
        assert final.state is IntentState.TIMED_OUT, (final.state, cluster.logs()[-3000:])
        assert final.waiting is None
        assert client.get_task(parked.waiting.task_id).state == "CANCELED"
        with pytest.raises(ClientError) as late:
            client.signal(intent_id, "go", 1)
        assert late.value.code is grpc.StatusCode.FAILED_PRECONDITION
        # Nothing ran after the park, and nothing was redelivered for the deadline.
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1})
        assert deliveries(client, intent_id) == 1
