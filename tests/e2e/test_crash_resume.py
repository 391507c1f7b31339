"""The heart of intentd with real processes: a real server, real sidecars
supervising real agent processes, real SIGKILL. Every step of the test agent
writes a side effect to a ledger table in its own transaction, so these tests
count what really ran."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from intentd.client import IntentClient, IntentState
from intentd.generated.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    delivery_pb2,
)
from tests.stack import TYPE, Sidecar, begins, finish, ledger, send
from tests.support import run_sync, wait_until


@pytest.mark.parametrize("k", [1, 4, 8])
def test_agent_killed_at_step_k_resumes_at_k(cluster, k) -> None:
    server = cluster.server()
    cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        intent_id = send(client, cluster.address, steps=8, crash_at=k)
        final = finish(client, intent_id, cluster)
        assert final.state is IntentState.COMPLETED, cluster.logs()
        assert final.result == {"total": sum(i * 10 for i in range(1, 9)), "steps": 8}
        assert final.attempt == 2
        ran = begins(ledger(cluster.db, intent_id))
        assert all(ran[i] == 1 for i in range(1, k)), ran  # before the kill: exactly once
        assert ran[k] == 2, ran  # the interrupted step: killed before its result was recorded
        assert all(ran[i] == 1 for i in range(k + 1, 9)), ran
        steps = client.steps(intent_id)
        assert [s.index for s in steps] == list(range(1, 9))
        assert [s.attempt for s in steps] == [1] * (k - 1) + [2] * (9 - k)
        events = list(client.watch(intent_id))
        released = [e for e in events if e.type == "RELEASED"]
        assert len(released) == 1 and released[0].message == "AGENT_DIED"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_always_crashing_agent_is_dead_lettered_after_max_attempts_then_retried(cluster) -> None:
    server = cluster.server()
    cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        intent_id = send(client, cluster.address, steps=4, crash_at=3, crash_attempts=[1, 2, 3])
        final = finish(client, intent_id, cluster)
        assert final.state is IntentState.FAILED
        assert final.error is not None and final.error.code == "ATTEMPTS_EXHAUSTED"
        assert final.attempt == 3
        deliveries = [e for e in client.watch(intent_id) if e.type == "DELIVERED"]
        assert [e.attempt for e in deliveries] == [1, 2, 3]
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1, 2: 1, 3: 3})
        # The dead letter comes back at its last step; attempt 4 no longer crashes.
        client.retry(intent_id)
        final = finish(client, intent_id, cluster)
        assert final.state is IntentState.COMPLETED and final.attempt == 4
        assert begins(ledger(cluster.db, intent_id)) == Counter({1: 1, 2: 1, 3: 4, 4: 1})


def test_max_attempts_per_type_and_per_intent(cluster) -> None:
    server = cluster.server()
    # A type of its own: the registry is shared by every test on this database.
    intent_type = f"test.attempts.t{uuid.uuid4().hex[:8]}.v1"
    # One intent at a time: an agent's death ends the attempts of every intent it holds.
    cluster.sidecar(server.address, capacity="1", TEST_AGENT_CAPACITY="1", TEST_AGENT_TYPE=intent_type)
    with grpc.insecure_channel(server.address) as channel:
        admin_service_pb2_grpc.AdminServiceStub(channel).PutIntentType(admin_service_pb2.PutIntentTypeRequest(
            intent_type=admin_service_pb2.IntentType(intent_type=intent_type, max_attempts=2, retry_backoff_ms=10)))
    crash = {"steps": 2, "crash_at": 1, "crash_attempts": list(range(1, 10))}
    with IntentClient(server.address) as client:
        by_type = client.send_intent(intent_type=intent_type, to_agent=cluster.address, payload=crash)
        by_intent = client.send_intent(intent_type=intent_type, to_agent=cluster.address, payload=crash,
                                       max_attempts=4)
        assert finish(client, by_type, cluster).attempt == 2
        assert finish(client, by_intent, cluster).attempt == 4
        assert begins(ledger(cluster.db, by_type))[1] == 2
        assert begins(ledger(cluster.db, by_intent))[1] == 4


def test_non_retryable_failure_ends_at_once_and_retryable_counts(cluster) -> None:
    server = cluster.server()
    cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        hard = send(client, cluster.address, steps=3, fail="nonretryable", fail_at=2)
        soft = send(client, cluster.address, steps=3, fail="retryable", fail_at=2, max_attempts=2)
        final = finish(client, hard, cluster)
        assert (final.state, final.attempt, final.error.code) == (IntentState.FAILED, 1, "BAD_INPUT")
        final = finish(client, soft, cluster)
        assert (final.state, final.attempt, final.error.code) == (IntentState.FAILED, 2, "ATTEMPTS_EXHAUSTED")
        assert begins(ledger(cluster.db, soft)) == Counter({1: 1, 2: 2})


def test_cancel_and_deadline_reach_the_agent_mid_step(cluster) -> None:
    from datetime import timedelta

    server = cluster.server()
    cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        canceled = send(client, cluster.address, steps=3, hang_at=2)
        wait_until(lambda: begins(ledger(cluster.db, canceled))[2] == 1, 30, what="step 2 to start")
        client.cancel(canceled, reason="operator said stop")
        timed = client.send_intent(intent_type=TYPE, to_agent=cluster.address, payload={"steps": 3, "hang_at": 1},
                                   deadline=timedelta(seconds=2))
        assert finish(client, canceled, cluster).state is IntentState.CANCELED
        assert finish(client, timed, cluster).state is IntentState.TIMED_OUT
        wait_until(lambda: any(e["phase"] == "stopped:CANCELED" for e in ledger(cluster.db, canceled)), 15,
                   what="the agent to see the cancel")
        wait_until(lambda: any(e["phase"] == "stopped:TIMED_OUT" for e in ledger(cluster.db, timed)), 15,
                   what="the agent to see the deadline")
        assert 3 not in begins(ledger(cluster.db, canceled))


def test_step_name_divergence_on_replay_is_a_clear_failure(cluster) -> None:
    server = cluster.server()
    cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        intent_id = send(client, cluster.address, steps=4, crash_at=3, diverge_from_attempt=2)
        final = finish(client, intent_id, cluster)
        assert final.state is IntentState.FAILED
        assert final.error.code == "STEP_DIVERGENCE"
        assert "step-1" in final.error.message and "renamed-1" in final.error.message
        assert [s.name for s in client.steps(intent_id)] == ["step-1", "step-2"]


def test_killed_sidecar_lease_expires_and_another_sidecar_resumes(cluster) -> None:
    server = cluster.server()
    first = cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        intent_id = send(client, cluster.address, steps=6, step_seconds=0.01, hang_at=4)
        wait_until(lambda: begins(ledger(cluster.db, intent_id))[4] == 1, 30, what="step 4 to start")
        lease = _current_lease(cluster.db, intent_id)
        first.kill_group()  # the sidecar and its agent die without a word
        cluster.sidecar(server.address)
        # The second sidecar's agent hangs too (same payload), so cancel once it has resumed at step 4.
        wait_until(lambda: begins(ledger(cluster.db, intent_id))[4] == 2, 30, what="step 4 to run again")
        assert begins(ledger(cluster.db, intent_id))[3] == 1  # steps 1-3 were not run again
        assert client.get(intent_id).attempt == 2
        # The old attempt is fenced off: its late write is refused.
        code = _write_with(server.address, lease)
        assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        client.cancel(intent_id)


def _current_lease(database_url: str, intent_id: str) -> delivery_pb2.Lease:
    async def read() -> delivery_pb2.Lease:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT attempt, lease_token::text FROM intents WHERE id=$1", intent_id)
            return delivery_pb2.Lease(intent_id=intent_id, attempt=row["attempt"], token=row["lease_token"])
        finally:
            await conn.close()

    lease: delivery_pb2.Lease = run_sync(read())
    return lease


def _write_with(server: str, lease: delivery_pb2.Lease) -> int:
    """Opens a raw sidecar stream and tries a step write with the given lease."""
    requests = [
        agent_service_pb2.ConnectRequest(register=agent_service_pb2.Register(
            sidecar_id="zombie", addresses=["agent://test/zombie/x"], capacity=0)),
        agent_service_pb2.ConnectRequest(write=agent_service_pb2.WriteRequest(
            request_id=7,
            write=delivery_pb2.IntentWrite(
                lease=lease, step=delivery_pb2.StepWrite(index=4, name="step-4", result=b"40")),
        )),
    ]
    done = threading.Event()

    def gen() -> Iterator[agent_service_pb2.ConnectRequest]:
        yield from requests
        done.wait(10)

    with grpc.insecure_channel(server) as channel:
        stream = agent_service_pb2_grpc.AgentServiceStub(channel).Connect(gen(), timeout=15)
        for reply in stream:
            if reply.WhichOneof("msg") == "write_result":
                done.set()
                return int(reply.write_result.code)
    raise AssertionError("no write result")


def test_server_replica_killed_sidecar_moves_and_keeps_its_leases(cluster) -> None:
    a = cluster.server()
    b = cluster.server()
    cluster.sidecar(f"{a.address},{b.address}")
    with IntentClient(a.address) as client:
        ids = [send(client, cluster.address, steps=10, step_seconds=0.15) for _ in range(3)]
    wait_until(lambda: all(begins(ledger(cluster.db, i))[2] >= 1 for i in ids), 30, what="work to start")
    # Kill the replica the sidecar's stream is on (it may have picked either).
    connected = [s for s in (a, b) if "connected (stream" in s.log()]
    assert len(connected) == 1, cluster.logs()
    connected[0].kill()
    survivor = b if connected[0] is a else a
    with IntentClient(survivor.address) as client:
        finals = [finish(client, i, cluster) for i in ids]
    assert all(f.state is IntentState.COMPLETED for f in finals), cluster.logs()
    # The reconnect kept the leases: no redelivery, every step ran once.
    assert [f.attempt for f in finals] == [1, 1, 1], cluster.logs()
    for i in ids:
        assert set(begins(ledger(cluster.db, i)).values()) == {1}


def test_short_network_cut_causes_no_redelivery(cluster) -> None:
    from tests.proxy import TcpProxy

    server = cluster.server(INTENTD_HEARTBEAT_TIMEOUT_MS="4000")
    with TcpProxy(server.address) as proxy:
        cluster.sidecar(proxy.address)
        with IntentClient(server.address) as client:
            intent_id = send(client, cluster.address, steps=12, step_seconds=0.1)
            wait_until(lambda: begins(ledger(cluster.db, intent_id))[3] >= 1, 30, what="step 3")
            proxy.cut(seconds=1.0)  # shorter than the 4 s heartbeat timeout
            final = finish(client, intent_id, cluster)
            assert proxy.cuts == 1
    assert final.state is IntentState.COMPLETED
    assert final.attempt == 1, cluster.logs()
    assert set(begins(ledger(cluster.db, intent_id)).values()) == {1}


def test_sigterm_drain_finishes_running_work_within_the_grace(cluster) -> None:
    server = cluster.server()
    sidecar = cluster.sidecar(server.address)
    sidecar.args += ["--drain-grace", "20"]
    with IntentClient(server.address) as client:
        intent_id = send(client, cluster.address, steps=6, step_seconds=0.3)
        wait_until(lambda: begins(ledger(cluster.db, intent_id))[2] >= 1, 30, what="step 2")
        assert sidecar.terminate(timeout=30) == 0, cluster.logs()
        final = client.get(intent_id)
    # It kept heartbeating while draining: finished by attempt 1, nothing ran twice.
    assert final.state is IntentState.COMPLETED and final.attempt == 1, cluster.logs()
    assert set(begins(ledger(cluster.db, intent_id)).values()) == {1}


def test_sigterm_drain_past_the_grace_releases_for_redelivery(cluster) -> None:
    server = cluster.server()
    first = Sidecar(server.address, cluster.address, cluster.db, Path(cluster.logs_dir) / "drain.log")
    first.args += ["--drain-grace", "1"]
    first.start()
    cluster.track(first)
    with IntentClient(server.address) as client:
        intent_id = send(client, cluster.address, steps=3, hang_at=2)
        wait_until(lambda: begins(ledger(cluster.db, intent_id))[2] == 1, 30, what="step 2")
        assert first.terminate(timeout=30) == 0, cluster.logs()
        intent = client.get(intent_id)
        assert intent.state is IntentState.PENDING and intent.max_attempts == 4  # the drain gave the attempt back
        cluster.sidecar(server.address)
        wait_until(lambda: begins(ledger(cluster.db, intent_id))[2] == 2, 30, what="step 2 again elsewhere")
        assert begins(ledger(cluster.db, intent_id))[1] == 1
        # The first agent was told to stop (its handler saw the revocation) before it was shut down.
        assert any(e["phase"].startswith("stopped:") for e in ledger(cluster.db, intent_id))
        client.cancel(intent_id)
        events = [(e.type, e.message) for e in client.watch(intent_id)]
        assert ("RELEASED", "DRAINED") in events
