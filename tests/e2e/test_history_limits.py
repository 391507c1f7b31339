"""Histories larger than any one message (issue 11, finding 2): recorded
steps travel in bounded pages on every hop (server -> sidecar -> agent,
ListIntentSteps, ListIntents), so an intent with a large history resumes; a
per-intent history limit refuses the step that would cross it, never a
resume. Real server, sidecar and agent processes, real SIGKILL."""

from __future__ import annotations

import hashlib
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from intentd.client import IntentClient, IntentState
from intentd.generated.v1 import delivery_pb2
from intentd.server.queries import Q
from intentd.server.settings import ServerSettings
from tests.agents.history_agent import step_result
from tests.stack import begins, ledger
from tests.support import ROOT, Keys, Process, RawSidecar, ServerProcess, run_sync

TYPE = "test.history.run.v1"
KIB = 1024
MIB = 1024 * KIB


class HistorySidecar(Process):
    """A sidecar supervising tests/agents/history_agent.py."""

    def __init__(self, server: str, address: str, ledger_url: str, log_path: Path) -> None:
        socket_path = f"/tmp/intentd-test-{uuid.uuid4().hex[:10]}.sock"
        super().__init__(
            ["sidecar", "--server", server, "--address", address, "--capacity", "1",
             "--listen", f"unix://{socket_path}", "--exec", f"{sys.executable} -m tests.agents.history_agent"],
            {"TEST_AGENT_ADDRESS": address, "TEST_LEDGER_URL": ledger_url, "PYTHONPATH": str(ROOT),
             "INTENTD_LOG_LEVEL": "INFO"},
            log_path,
        )


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def expected_sha256(intent_id: str, steps: int, size: int) -> str:
    digest = hashlib.sha256()
    for index in range(1, steps + 1):
        digest.update(step_result(intent_id, index, size).encode())
    return digest.hexdigest()


def resume_after_kill(cluster: Any, server: ServerProcess, steps: int, size: int,
                      timeout: float) -> tuple[str, Any, dict[str, float]]:
    """Runs ``steps`` steps of ``size`` bytes, SIGKILLs the agent after the
    last one is recorded, and waits for the resumed attempt to complete."""
    sidecar = HistorySidecar(server.address, cluster.address, cluster.db,
                             Path(cluster.logs_dir) / "history-sidecar.log")
    sidecar.start()
    cluster.track(sidecar)
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=cluster.address,
                                       payload={"steps": steps, "step_bytes": size, "crash_after": steps})
        deadline = time.monotonic() + timeout
        while client.get(intent_id).attempt < 2:
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        resumed_at = time.monotonic()
        final = client.wait_for(intent_id, timeout=max(1.0, deadline - time.monotonic()))
        figures = {"resume_s": time.monotonic() - resumed_at,
                   "server_peak_rss_mib": peak_rss_mib(server.pid),
                   "sidecar_peak_rss_mib": peak_rss_mib(sidecar.pid)}
        children = Path(f"/proc/{sidecar.pid}/task/{sidecar.pid}/children").read_text().split()
        if children:  # the agent of the resumed attempt
            figures["agent_peak_rss_mib"] = peak_rss_mib(int(children[0]))
    return intent_id, final, figures


def check_resumed(cluster: Any, intent_id: str, final: Any, steps: int, size: int) -> None:
    assert final.state is IntentState.COMPLETED, (final.state, final.error, cluster.logs()[-3000:])
    assert final.attempt == 2, cluster.logs()
    # Attempt 2 replayed every step (none ran again) and got each recorded result back.
    assert final.result == {"steps": steps, "sha256": expected_sha256(intent_id, steps, size), "replayed": steps}
    ran = begins(ledger(cluster.db, intent_id))
    assert ran == Counter({i: 1 for i in range(1, steps + 1)}), ran


def test_forty_steps_of_120_kib_resume_and_list(cluster) -> None:
    steps, size = 40, 120 * KIB
    server = cluster.server()
    intent_id, final, figures = resume_after_kill(cluster, server, steps, size, timeout=120)
    check_resumed(cluster, intent_id, final, steps, size)
    with IntentClient(server.address) as client:
        recorded = client.steps(intent_id)
    assert [s.index for s in recorded] == list(range(1, steps + 1))
    assert all(s.result == step_result(intent_id, s.index, size) for s in recorded)
    print(f"40 x 120 KiB: {figures}")


@pytest.mark.timeout(900)
def test_a_200_mib_history_of_1000_steps_resumes(cluster) -> None:
    steps, size = 1000, 200 * KIB
    server = cluster.server(INTENTD_MAX_PAYLOAD_BYTES=str(256 * KIB))
    started = time.monotonic()
    intent_id, final, figures = resume_after_kill(cluster, server, steps, size, timeout=800)
    check_resumed(cluster, intent_id, final, steps, size)
    with IntentClient(server.address) as client:
        intent = client.get(intent_id)
        pages = client.steps(intent_id)
    assert intent.steps_completed == steps and len(pages) == steps
    assert all(s.result == step_result(intent_id, s.index, size) for s in pages[:: 97])
    figures["total_s"] = time.monotonic() - started
    print(f"1000 x 200 KiB (200 MiB): {figures}")


# ---------------------------------------------------------------- the history limit


def _claim(raw: RawSidecar) -> delivery_pb2.Lease:
    assignment = raw.recv("assignment")
    raw.send(ack=delivery_pb2.AckAssignment(lease=assignment.lease))
    return assignment.lease


def _step(raw: RawSidecar, request_id: int, lease: delivery_pb2.Lease, index: int, result: bytes) -> Any:
    return raw.write(request_id, delivery_pb2.IntentWrite(
        lease=lease, step=delivery_pb2.StepWrite(index=index, name=f"step-{index}", result=result)))


@pytest.mark.parametrize("limit", ["bytes", "steps"])
def test_the_step_that_crosses_the_history_limit_is_refused_and_earlier_steps_kept(
        make_server, agent_address, limit) -> None:
    # Steps of 3,008 bytes (a 3,000-character JSON string and the name): three fit in 10,000 bytes.
    settings = ({"max_history_bytes": 10_000, "max_payload_bytes": 8 * KIB} if limit == "bytes"
                else {"max_history_steps": 3})
    srv = make_server(**settings)
    result = b'"' + b"x" * 3000 + b'"'
    with IntentClient(srv.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        raw = RawSidecar(srv.address, agent_address, ping_every=0.1)
        try:
            lease = _claim(raw)
            for index in (1, 2, 3):
                assert _step(raw, index, lease, index, result).code == 0
            refused = _step(raw, 4, lease, 4, result)
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], refused
            assert ("INTENTD_MAX_HISTORY_BYTES" if limit == "bytes" else "INTENTD_MAX_HISTORY_STEPS") \
                in refused.message
            assert "the 3 steps recorded are kept" in refused.message or "the 3 recorded are kept" in refused.message
            # A repeat of a recorded step is still answered with its record; the attempt goes on.
            assert _step(raw, 5, lease, 3, result).step.index == 3
            intent = client.get(intent_id)
            assert intent.state is IntentState.IN_PROGRESS and intent.steps_completed == 3
            assert [s.index for s in client.steps(intent_id)] == [1, 2, 3]
            done = raw.write(6, delivery_pb2.IntentWrite(lease=lease, complete=delivery_pb2.CompleteWrite(
                result=b"{}")))
            assert done.code == 0
        finally:
            raw.close()


def test_history_limit_settings_are_validated() -> None:
    from intentd.core.config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="MAX_HISTORY_BYTES"):
        load_settings(ServerSettings, {"INTENTD_MAX_HISTORY_BYTES": "1000"}).validate()
    with pytest.raises(SettingsError, match="MAX_HISTORY_STEPS"):
        load_settings(ServerSettings, {"INTENTD_MAX_HISTORY_STEPS": "0"}).validate()
    defaults = load_settings(ServerSettings, {})
    assert (defaults.max_history_bytes, defaults.max_history_steps) == (256 * MIB, 10_000)


# ---------------------------------------------------------------- tenants


def _agent_stub(address: str) -> Any:
    from intentd.generated.v1 import agent_service_pb2_grpc

    return agent_service_pb2_grpc.AgentServiceStub(grpc.insecure_channel(address))


def test_recorded_steps_are_read_only_by_the_stream_holding_the_lease_in_its_tenant(
        make_server, database_url) -> None:
    from intentd.generated.v1 import agent_service_pb2 as apb
    from intentd.generated.v1 import intent_service_pb2 as ipb

    srv = make_server(auth="on")
    a, b = f"hista{uuid.uuid4().hex[:6]}", f"histb{uuid.uuid4().hex[:6]}"
    made = Keys(database_url)
    keys = {
        "a_client": made.create(a, "client", ["client"]),
        "a_agent": made.create(a, "agent", ["agent"], (f"agent://{a}/prod/*",)),
        "b_client": made.create(b, "client", ["client"]),
        "b_agent": made.create(b, "agent", ["agent"], ("agent://*",)),
    }
    address = f"agent://{a}/prod/x"
    with IntentClient(srv.address, metadata=[("authorization", f"Bearer {keys['a_client']}")]) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=address, payload={})
        raw = RawSidecar(srv.address, address, ping_every=0.1,
                         metadata=[("authorization", f"Bearer {keys['a_agent']}")])
        try:
            lease = _claim(raw)
            for index in (1, 2, 3):
                assert _step(raw, index, lease, index, b'"%d"' % index).code == 0
            stub = _agent_stub(srv.address)

            def fetch(key: str, session: str, from_index: int = 1) -> Any:
                return stub.ListRecordedSteps(
                    apb.ListRecordedStepsRequest(session_id=session, lease=lease, from_index=from_index),
                    metadata=[("authorization", f"Bearer {keys[key]}")], timeout=10)

            page = fetch("a_agent", raw.registered.session_id, 2)
            assert page.recorded_steps == 3 and [s.index for s in page.steps] == [2, 3]
            for key, session in (("b_agent", raw.registered.session_id), ("a_agent", str(uuid.uuid4()))):
                with pytest.raises(grpc.RpcError) as err:
                    fetch(key, session)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (key, err.value.details())
            with pytest.raises(grpc.RpcError) as err:
                fetch("a_client", raw.registered.session_id)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            from intentd.generated.v1 import intent_service_pb2_grpc

            with grpc.insecure_channel(srv.address) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    intent_service_pb2_grpc.IntentServiceStub(channel).ListIntentSteps(
                        ipb.ListIntentStepsRequest(id=intent_id),
                        metadata=[("authorization", f"Bearer {keys['b_client']}")], timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert [s.index for s in client.steps(intent_id)] == [1, 2, 3]
        finally:
            raw.close()

    # The query itself takes the tenant: another tenant's call finds nothing.
    async def query(tenant: str) -> list[int]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(Q.steps_of, [intent_id], tenant, 1, MIB, MIB, 1000)
            return [r["idx"] for r in rows]
        finally:
            await conn.close()

    assert run_sync(query(a)) == [1, 2, 3]
    assert run_sync(query(b)) == []


# ---------------------------------------------------------------- pages cut by bytes


async def test_step_pages_are_cut_by_bytes_per_intent_and_in_all(pg, agent_address) -> None:
    """steps_of, the one query every hop pages with."""
    ids = []
    for _ in range(2):
        intent_id = f"01hist{uuid.uuid4().hex[:20]}"
        ids.append(intent_id)
        await pg.execute(
            "INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts,"
            " heartbeat_timeout_ms, available_at, create_time, update_time, steps_completed)"
            " VALUES ($1, 'default', $2, $3, 'test', 'null', 3, 10000, now(), now(), now(), 10)",
            intent_id, TYPE, agent_address)
        for index in range(1, 11):
            # Sizes 1000, 2000, ... bytes (name "s" + result).
            result = '"' + "y" * (index * 1000 - 3) + '"'
            await pg.execute(
                "INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time,"
                " size_bytes) VALUES ($1, $2, 's', $3::jsonb, 1, gen_random_uuid(), now(), $4)",
                intent_id, index, result, index * 1000)
    ids.sort()

    async def page(from_index: int, mine: int, total: int, count: int = 1000) -> list[tuple[str, int]]:
        rows = await pg.fetch(Q.steps_of, ids, "default", from_index, mine, total, count)
        assert all(len(r["result"]) + len(r["name"]) == r["size_bytes"] for r in rows)
        return [(r["intent_id"], r["idx"]) for r in rows]

    # Each step counts its size and 32: 1032, 2032, 3032...; 6,100 bytes hold steps 1-3 (6,096).
    assert await page(1, 6_100, 10**9) == [(i, n) for i in ids for n in (1, 2, 3)]
    # A page always holds its first step, even one larger than the budget.
    assert await page(5, 100, 10**9) == [(ids[0], 5), (ids[1], 5)]
    # All pages together: the second intent's page stops where the total does.
    assert await page(1, 6_100, 6_096 + 1_032) == [(ids[0], 1), (ids[0], 2), (ids[0], 3), (ids[1], 1)]
    # The very first step is in even past the total; later intents then get none.
    assert await page(9, 10**6, 10) == [(ids[0], 9)]
    assert await page(1, 10**9, 10**9, count=2) == [(i, n) for i in ids for n in (1, 2)]
    assert await page(11, 10**9, 10**9) == []


def test_list_intent_steps_pages_by_bytes(make_server, agent_address) -> None:
    """With a 72 KiB message limit a page is at most 18 KiB (a quarter), and
    the client follows the pages; one response with all 40 steps (240 KiB)
    would not fit."""
    from intentd.generated.v1 import intent_service_pb2 as ipb
    from intentd.generated.v1 import intent_service_pb2_grpc

    srv = make_server(max_payload_bytes=8 * KIB, max_message_bytes=72 * KIB)
    budget = 72 * KIB // 4
    with IntentClient(srv.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        raw = RawSidecar(srv.address, agent_address, capacity=1, ping_every=0.1)
        try:
            lease = _claim(raw)
            for index in range(1, 41):
                assert _step(raw, index, lease, index, b'"' + b"z" * 6000 + b'"').code == 0
        finally:
            raw.close()
        with grpc.insecure_channel(srv.address) as channel:
            stub = intent_service_pb2_grpc.IntentServiceStub(channel)
            request = ipb.ListIntentStepsRequest(id=intent_id)
            pages = []
            while True:
                response = stub.ListIntentSteps(request, timeout=10)
                assert response.ByteSize() <= budget + 200
                pages.append([s.index for s in response.steps])
                if not response.next_page_token:
                    break
                request.page_token = response.next_page_token
            assert [i for p in pages for i in p] == list(range(1, 41))
            assert len(pages) > 10 and all(len(p) >= 1 for p in pages)
            small = stub.ListIntentSteps(ipb.ListIntentStepsRequest(id=intent_id, page_size=1), timeout=10)
            assert [s.index for s in small.steps] == [1] and small.next_page_token
            for bad in (ipb.ListIntentStepsRequest(id=intent_id, page_token="bogus"),
                        ipb.ListIntentStepsRequest(id=intent_id, page_size=1001)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListIntentSteps(bad, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [s.index for s in client.steps(intent_id)] == list(range(1, 41))


def test_list_intents_pages_by_bytes(make_server, agent_address) -> None:
    """30 intents of 6 KB payloads in one response (180 KB) would not fit a
    72 KiB message: pages end by bytes, and the client follows them."""
    from intentd.generated.v1 import intent_service_pb2 as ipb
    from intentd.generated.v1 import intent_service_pb2_grpc

    srv = make_server(max_payload_bytes=8 * KIB, max_message_bytes=72 * KIB)
    with IntentClient(srv.address) as client:
        sent = [client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={"pad": "p" * 6000})
                for _ in range(30)]
        with grpc.insecure_channel(srv.address) as channel:
            stub = intent_service_pb2_grpc.IntentServiceStub(channel)
            first = stub.ListIntents(ipb.ListIntentsRequest(to_agent=agent_address, page_size=1000), timeout=10)
            assert first.next_page_token and 1 <= len(first.intents) < 30
            assert first.ByteSize() <= 72 * KIB // 4 + 1000
        listed = [i.id for i in client.iter_intents(to_agent=agent_address)]
    assert listed == sorted(sent, reverse=True)


def test_assignments_carry_a_first_page_or_to_an_older_sidecar_the_whole_history(make_server, agent_address) -> None:
    """A sidecar that fetches gets the first page (18 KiB under a 72 KiB
    message limit) and the count; one that does not (an older sidecar) gets
    whole histories only, and an intent whose history does not fit one page
    waits for a sidecar that fetches instead of a message too large."""
    from intentd.generated.v1 import agent_service_pb2 as apb

    srv = make_server(max_payload_bytes=8 * KIB, max_message_bytes=72 * KIB)
    result = b'"' + b"h" * 6000 + b'"'
    with IntentClient(srv.address) as client:
        big = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={}, max_attempts=5)
        small = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={}, max_attempts=5)
        for intent_id, steps in ((big, 5), (small, 1)):
            raw = RawSidecar(srv.address, agent_address, capacity=1, ping_every=0.1)
            try:
                lease = _claim(raw)
                assert lease.intent_id == intent_id
                for index in range(1, steps + 1):
                    assert _step(raw, index, lease, index, result).code == 0
                released = raw.write(99, delivery_pb2.IntentWrite(
                    lease=lease, release=delivery_pb2.ReleaseWrite(reason="AGENT_DIED")))
                assert released.code == 0
            finally:
                raw.close()
        older = RawSidecar(srv.address, agent_address, capacity=2, ping_every=0.1)
        try:
            whole = older.recv("assignment")
            assert whole.lease.intent_id == small and [s.index for s in whole.steps] == [1]
            with pytest.raises(Exception):  # noqa: B017 - queue.Empty: nothing else is claimable for it
                older.recv("assignment", timeout=1.5)
        finally:
            older.close()
        newer = RawSidecar(srv.address, agent_address, capacity=2, ping_every=0.1, fetches_steps=True)
        try:
            paged = newer.recv("assignment")
            assert paged.lease.intent_id == big and paged.recorded_steps == 5
            assert [s.index for s in paged.steps] == [1, 2, 3]  # 3 x 6,038 bytes fit 18 KiB, 4 do not
            assert paged.recorded_bytes == 5 * (6002 + len("step-1"))
            page = _agent_stub(srv.address).ListRecordedSteps(apb.ListRecordedStepsRequest(
                session_id=newer.registered.session_id, lease=paged.lease, from_index=4), timeout=10)
            assert [s.index for s in page.steps] == [4, 5] and page.steps[1].result == result
        finally:
            newer.close()


def test_page_reads_are_paced_like_the_streams_writes(make_server, agent_address) -> None:
    """Each ListRecordedSteps is a database read: a sidecar calling it in a
    loop is held to its stream's write budget, like its writes, instead of
    costing the database as fast as it can ask."""
    from intentd.generated.v1 import agent_service_pb2 as apb

    srv = make_server(stream_writes_per_second=2)
    raw = RawSidecar(srv.address, agent_address, ping_every=0.1, fetches_steps=True)
    stub = _agent_stub(srv.address)
    lease = delivery_pb2.Lease(intent_id="01m8dsnxs4vrf409wync0kdayv", attempt=1, token=str(uuid.uuid4()))
    try:
        started = time.monotonic()
        codes = []
        for _ in range(6):
            with pytest.raises(grpc.RpcError) as err:
                stub.ListRecordedSteps(apb.ListRecordedStepsRequest(
                    session_id=raw.registered.session_id, lease=lease, from_index=1), timeout=30)
            codes.append(err.value.code())
        took = time.monotonic() - started
    finally:
        raw.close()
    assert set(codes) == {grpc.StatusCode.FAILED_PRECONDITION}  # not its lease
    # 6 reads at 2/s with a burst of 2: at least 2 s.
    assert took >= 1.9, took
