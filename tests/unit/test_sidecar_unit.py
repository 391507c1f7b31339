"""The sidecar against a scripted fake control plane and a real local agent
client on its runtime API. No database, no real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from intentd.core.config import SettingsError, load_settings
from intentd.generated.v1 import (
    agent_service_pb2 as apb,
)
from intentd.generated.v1 import (
    agent_service_pb2_grpc,
    delivery_pb2,
    intent_pb2,
    runtime_pb2,
    runtime_pb2_grpc,
)
from intentd.sidecar import Sidecar, SidecarSettings, cli_main
from intentd.sidecar.supervisor import ADDRESS_ENV, AgentSupervisor
from intentd.sidecar.upstream import Upstream

WAIT = 5.0
ADDRESS = "agent://acme/prod/summarizer"
TYPE = "intent.docs.summarize.v1"
PING_MS = 100

Decide = Callable[[apb.Register], tuple[list[delivery_pb2.Lease], list[delivery_pb2.Lease]]]


# ---------------------------------------------------------------- fake control plane


class FakeStream:
    """One Connect stream as the fake server sees it."""

    def __init__(self, register: apb.Register) -> None:
        self.register = register
        self.outbox: asyncio.Queue[apb.ConnectResponse | None] = asyncio.Queue()
        self._received: defaultdict[str, asyncio.Queue[apb.ConnectRequest]] = defaultdict(asyncio.Queue)
        self.ended = asyncio.Event()

    def record(self, message: apb.ConnectRequest) -> None:
        self._received[str(message.WhichOneof("msg"))].put_nowait(message)

    async def expect(self, kind: str, timeout: float = WAIT) -> apb.ConnectRequest:
        return await asyncio.wait_for(self._received[kind].get(), timeout)

    def has(self, kind: str) -> bool:
        return not self._received[kind].empty()

    def send(self, message: apb.ConnectResponse) -> None:
        self.outbox.put_nowait(message)

    def assign(self, assignment: delivery_pb2.Assignment) -> None:
        self.send(apb.ConnectResponse(assignment=assignment))

    def answer(self, request: apb.ConnectRequest, code: int = 0, message: str = "") -> None:
        write = request.write.write
        step = None
        if code == 0 and write.WhichOneof("op") == "step":
            step = intent_pb2.StepRecord(index=write.step.index, name=write.step.name,
                                         result=write.step.result, attempt=write.lease.attempt)
        self.send(apb.ConnectResponse(write_result=apb.WriteResult(
            request_id=request.write.request_id, code=code, message=message, step=step)))


class FakeControlPlane(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.streams: asyncio.Queue[FakeStream] = asyncio.Queue()
        self.decide: Decide = lambda register: (list(register.held), [])
        self.auto_commit = False
        self.answer_pings = True
        self.server: Any = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server()
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(0)

    async def next_stream(self, timeout: float = WAIT) -> FakeStream:
        return await asyncio.wait_for(self.streams.get(), timeout)

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[apb.ConnectResponse]:
        requests = request_iterator.__aiter__()
        first = await anext(requests)
        assert first.WhichOneof("msg") == "register", first
        stream = FakeStream(first.register)
        kept, lost = self.decide(first.register)
        yield apb.ConnectResponse(registered=apb.Registered(
            session_id=uuid.uuid4().hex, ping_interval_ms=PING_MS, kept=kept, lost=lost))
        self.streams.put_nowait(stream)
        reader = asyncio.create_task(self._read(stream, requests))
        try:
            while (message := await stream.outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()
            stream.ended.set()

    async def _read(self, stream: FakeStream, requests: AsyncIterator[apb.ConnectRequest]) -> None:
        async for message in requests:
            stream.record(message)
            kind = message.WhichOneof("msg")
            if kind == "ping" and self.answer_pings:
                stream.send(apb.ConnectResponse(pong=apb.Pong(nonce=message.ping.nonce)))
            elif kind == "write" and self.auto_commit:
                stream.answer(message)
        stream.outbox.put_nowait(None)


# ---------------------------------------------------------------- local agent client


class FakeAgent:
    """A minimal agent speaking AgentRuntimeService to the sidecar."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = runtime_pb2_grpc.AgentRuntimeServiceStub(self.channel)
        self.call: Any = None

    async def attach(self, capacity: int = 2, intent_types: tuple[str, ...] = (), batches: bool = False) -> None:
        self.call = self.stub.Attach()
        await self.call.write(runtime_pb2.AttachRequest(hello=runtime_pb2.AgentHello(
            intent_types=intent_types, capacity=capacity, language="python-test", accepts_batches=batches)))
        # The sidecar speaks first: what its stream carries besides assignments.
        welcome = await self.receive()
        assert welcome.welcome.stream_writes and welcome.welcome.accepts_batches, welcome

    async def write(self, request_id: int, write: delivery_pb2.IntentWrite) -> None:
        """A write on the Attach stream (answered by a write_result)."""
        await self.call.write(runtime_pb2.AttachRequest(write=apb.WriteRequest(request_id=request_id, write=write)))

    async def receive(self, timeout: float = WAIT) -> runtime_pb2.AttachResponse:
        message = await asyncio.wait_for(self.call.read(), timeout)
        assert message is not grpc.aio.EOF
        return message  # type: ignore[no-any-return]

    async def ack(self, lease: delivery_pb2.Lease) -> None:
        await self.call.write(runtime_pb2.AttachRequest(ack=delivery_pb2.AckAssignment(lease=lease)))

    # The unary writes, under way (each answers once the control plane did).

    def record_step(self, lease: delivery_pb2.Lease, result: bytes = b"1") -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.stub.RecordStep(runtime_pb2.RecordStepRequest(
            lease=lease, step=delivery_pb2.StepWrite(index=1, name="fetch", result=result))))

    def checkpoint(self, lease: delivery_pb2.Lease) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.stub.SaveCheckpoint(runtime_pb2.SaveCheckpointRequest(
            lease=lease, checkpoint=delivery_pb2.CheckpointWrite(state=b"{}"))))

    def progress(self, lease: delivery_pb2.Lease, message: str, fraction: float = 0.0) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.stub.ReportProgress(runtime_pb2.ReportProgressRequest(
            lease=lease, progress=delivery_pb2.ProgressWrite(message=message, fraction=fraction))))

    def complete(self, lease: delivery_pb2.Lease, result: bytes = b"{}") -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.stub.CompleteIntent(runtime_pb2.CompleteIntentRequest(
            lease=lease, complete=delivery_pb2.CompleteWrite(result=result))))

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


def make_assignment(n: int = 1, steps: tuple[tuple[int, str], ...] = ()) -> delivery_pb2.Assignment:
    intent_id = f"intent{n:020d}"
    return delivery_pb2.Assignment(
        intent=intent_pb2.Intent(id=intent_id, intent_type=TYPE, to_agent=ADDRESS, payload=b"{}"),
        lease=delivery_pb2.Lease(intent_id=intent_id, attempt=1, token=uuid.uuid4().hex),
        steps=[intent_pb2.StepRecord(index=i, name=name, result=b'"r"') for i, name in steps],
        heartbeat_timeout_ms=10_000,
    )


def make_settings(port: int, tmp_path: Path, **overrides: Any) -> SidecarSettings:
    values: dict[str, Any] = {
        "server": f"127.0.0.1:{port}",
        "addresses": [ADDRESS],
        "intent_types": [TYPE],
        "capacity": 4,
        "agent_listen": f"unix://{tmp_path}/sc.sock",
        "reconnect_max_backoff_s": 0.2,
        "drain_grace_s": 2.0,
    }
    values.update(overrides)
    settings = SidecarSettings(**values)
    settings.validate()
    return settings


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Polls state that has no event to wait on, within a deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 -- bounded poll of plain attributes
            await asyncio.sleep(0.01)


def socket_file(address: str) -> Path:
    return Path(address.removeprefix("unix://"))


def file_mode(path: Path) -> int | None:
    return stat.S_IMODE(path.stat().st_mode) if path.exists() else None


async def expect_capacity(stream: FakeStream, capacity: int, timeout: float = WAIT) -> None:
    while True:
        message = await stream.expect("set_capacity", timeout)
        if message.set_capacity.capacity == capacity:
            return


async def refusal(call: Awaitable[Any],
                  code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> grpc.aio.AioRpcError:
    """The error a call to the sidecar ends with, once its code is checked."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, WAIT)
    assert info.value.code() == code
    return info.value


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def plane_type() -> type[FakeControlPlane]:
    """What ``plane`` starts: a module overrides it with a fake of its own."""
    return FakeControlPlane


# Named apart from the fixture, so another module imports it without
# shadowing the name its tests take it by.
@pytest.fixture(name="plane")
async def plane_fixture(plane_type: type[FakeControlPlane]) -> AsyncIterator[FakeControlPlane]:
    fake = plane_type()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(name="sidecar")
async def sidecar_fixture(plane: FakeControlPlane, tmp_path: Path) -> AsyncIterator[Sidecar]:
    sc = Sidecar(make_settings(plane.port, tmp_path))
    await sc.start()
    yield sc
    plane.auto_commit = True
    await sc.stop(grace=0)


@pytest.fixture
async def agent(sidecar: Sidecar) -> AsyncIterator[FakeAgent]:
    client = FakeAgent(sidecar.address)
    yield client
    await client.close()


async def attached(plane: FakeControlPlane, agent: FakeAgent, capacity: int = 2,
                   announced: int | None = None) -> FakeStream:
    stream = await plane.next_stream()
    await agent.attach(capacity=capacity)
    await expect_capacity(stream, capacity if announced is None else announced)
    return stream


async def assign_and_ack(stream: FakeStream, agent: FakeAgent, n: int = 1,
                         steps: tuple[tuple[int, str], ...] = ()) -> delivery_pb2.Assignment:
    assignment = make_assignment(n, steps)
    stream.assign(assignment)
    received = await agent.receive()
    assert received.assignment == assignment
    await agent.ack(assignment.lease)
    ack = await stream.expect("ack")
    assert ack.ack.lease == assignment.lease
    return assignment


# ---------------------------------------------------------------- tests


async def test_registers_pings_and_answers_pings(plane: FakeControlPlane, sidecar: Sidecar) -> None:
    stream = await plane.next_stream()
    register = stream.register
    assert register.sidecar_id == sidecar.settings.sidecar_id
    assert list(register.addresses) == [ADDRESS]
    assert list(register.intent_types) == [TYPE]
    assert register.capacity == 0  # no agent attached yet
    assert not register.held
    await stream.expect("ping")
    stream.send(apb.ConnectResponse(ping=apb.Ping(nonce=42)))
    pong = await stream.expect("pong")
    assert pong.pong.nonce == 42
    assert file_mode(socket_file(sidecar.address)) == 0o600


async def test_assignment_goes_to_the_agent_and_its_ack_upstream(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent, capacity=2)
    await assign_and_ack(stream, agent)
    assert sidecar.dispatcher.held_count == 1


async def test_attach_must_start_with_a_valid_hello(sidecar: Sidecar, agent: FakeAgent) -> None:
    call = agent.stub.Attach()
    await call.write(runtime_pb2.AttachRequest(hello=runtime_pb2.AgentHello(intent_types=["Not A Type"])))
    refused = await refusal(call.read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert "hello.intent_types" in (refused.details() or "")
    assert not sidecar.dispatcher.agents


async def test_agent_capacity_is_capped_by_the_sidecar(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    await attached(plane, agent, capacity=50, announced=4)  # the sidecar allows 4


async def test_record_step_returns_only_after_the_commit(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    call = agent.record_step(assignment.lease, result=b'{"n": 1}')
    request = await stream.expect("write")
    write = request.write.write
    assert write.lease == assignment.lease and write.step.name == "fetch"
    await asyncio.sleep(0.05)
    assert not call.done(), "answered before the control plane committed"
    stream.answer(request)
    response = await asyncio.wait_for(call, WAIT)
    assert response.step.index == 1 and response.step.result == b'{"n": 1}'
    # The new record now answers BeginStep locally too.
    begin = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=assignment.lease, index=1, name="fetch"))
    assert begin.recorded


async def test_stream_writes_are_answered_after_the_commit_by_request_id(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    lease = assignment.lease
    # Two writes in one batch frame, then answered out of order upstream.
    await agent.call.write(runtime_pb2.AttachRequest(batch=runtime_pb2.AttachRequestBatch(messages=[
        runtime_pb2.AttachRequest(write=apb.WriteRequest(request_id=7, write=delivery_pb2.IntentWrite(
            lease=lease, step=delivery_pb2.StepWrite(index=1, name="fetch", result=b"1")))),
        runtime_pb2.AttachRequest(write=apb.WriteRequest(request_id=8, write=delivery_pb2.IntentWrite(
            lease=lease, progress=delivery_pb2.ProgressWrite(message="half", fraction=0.5)))),
    ])))
    writes = {w.write.write.WhichOneof("op"): w for w in [await stream.expect("write") for _ in range(2)]}
    reply = asyncio.ensure_future(agent.receive())
    await asyncio.sleep(0.05)
    assert not reply.done(), "answered before the control plane committed"
    stream.answer(writes["progress"], code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="stale lease")
    refused = (await reply).write_result
    assert (refused.request_id, refused.code, refused.message) == (
        8, grpc.StatusCode.FAILED_PRECONDITION.value[0], "stale lease")
    stream.answer(writes["step"])
    recorded = (await agent.receive()).write_result
    assert (recorded.request_id, recorded.code, recorded.step.name) == (7, 0, "fetch")


@pytest.mark.parametrize(("write", "why"), [
    (delivery_pb2.IntentWrite(release=delivery_pb2.ReleaseWrite(reason="AGENT_DIED")), "write.op"),
    (delivery_pb2.IntentWrite(complete=delivery_pb2.CompleteWrite(result=b"1")), "lease"),
    (delivery_pb2.IntentWrite(step=delivery_pb2.StepWrite(index=0, name="x")), "1-based index"),
])
async def test_bad_stream_writes_are_refused_locally(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent, write: delivery_pb2.IntentWrite, why: str
) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    if write.WhichOneof("op") != "complete":
        write.lease.CopyFrom(assignment.lease)
    await agent.write(3, write)
    result = (await agent.receive()).write_result
    assert result.request_id == 3 and result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert why in result.message
    assert not stream.has("write")


async def test_write_overtaking_the_ack_acknowledges_first(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    assignment = make_assignment()
    stream.assign(assignment)
    await agent.receive()
    # The handler's first write races its ack (they travel on different calls).
    call = agent.progress(assignment.lease, "started")
    assert (await stream.expect("ack")).ack.lease == assignment.lease
    stream.answer(await stream.expect("write"))
    await asyncio.wait_for(call, WAIT)
    await agent.ack(assignment.lease)  # the real ack, late: not sent twice
    await stream.expect("ping")
    await stream.expect("ping")
    assert not stream.has("ack")


async def test_write_refused_right_after_the_ack_is_not_sent_again(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    # The control plane orders a lease's ack before its writes
    # (tests/integration/test_leases.py: test_write_before_the_ack_waits_for_it),
    # so a refusal right after the ack is final, and the agent gets it as it is.
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    call = agent.record_step(assignment.lease)
    stream.answer(await stream.expect("write"), code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                  message="the intent is DELIVERED")
    await refusal(call)
    assert not stream.has("write")


async def test_refused_write_comes_back_as_the_same_status(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    first = agent.checkpoint(assignment.lease)
    second = agent.progress(assignment.lease, "half", fraction=0.5)
    writes = {w.write.write.WhichOneof("op"): w for w in [await stream.expect("write") for _ in range(2)]}
    checkpoint, progress = writes["checkpoint"], writes["progress"]
    # Out of order: results are matched by request_id.
    stream.answer(progress)
    await asyncio.wait_for(second, WAIT)
    assert not first.done()
    stream.answer(checkpoint, code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="stale lease")
    assert (await refusal(first)).details() == "stale lease"


async def test_begin_step_replays_and_detects_divergence(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent, steps=((1, "fetch"), (2, "parse")))
    lease = assignment.lease
    hit = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=lease, index=2, name="parse"))
    assert hit.recorded and hit.step.name == "parse" and hit.step.result == b'"r"'
    miss = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=lease, index=3, name="write"))
    assert not miss.recorded
    refused = await refusal(agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=lease, index=1, name="download")))
    assert "step divergence" in (refused.details() or "")


async def test_agent_stream_end_releases_its_intents_at_once(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    first = await assign_and_ack(stream, agent, n=1)
    second = make_assignment(2)  # delivered to the agent, not yet acked
    stream.assign(second)
    await agent.receive()
    agent.call.cancel()  # what a SIGKILLed agent looks like from here
    releases = [await stream.expect("write"), await stream.expect("write")]
    assert {r.write.write.lease.token for r in releases} == {first.lease.token, second.lease.token}
    assert all(r.write.write.release.reason == "AGENT_DIED" for r in releases)
    await expect_capacity(stream, 0)
    for request in releases:
        stream.answer(request)
    await wait_until(lambda: sidecar.dispatcher.released == 2 and not sidecar.upstream.held_leases())


async def test_reconnect_reannounces_held_and_revokes_lost(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent, capacity=3)
    kept = await assign_and_ack(stream, agent, n=1)
    lost = await assign_and_ack(stream, agent, n=2)
    late = make_assignment(3)  # the agent acks it only while the stream is down
    stream.assign(late)
    await agent.receive()
    await plane.stop()
    await wait_until(lambda: not sidecar.upstream.connected.is_set())

    # Writes while the stream is down wait for the next one.
    await agent.ack(late.lease)
    step = agent.record_step(kept.lease)
    doomed = agent.checkpoint(lost.lease)
    await wait_until(lambda: sidecar.upstream.health()["pending_writes"] == 2)

    plane.decide = lambda register: ([kept.lease, late.lease], [lost.lease])
    await plane.start()  # same port
    stream = await plane.next_stream()
    assert {lease.token for lease in stream.register.held} == {
        kept.lease.token, lost.lease.token, late.lease.token}
    assert stream.register.capacity == 3

    revocation = await agent.receive()
    assert revocation.revocation.lease == lost.lease
    assert revocation.revocation.reason == "LEASE_LOST"
    await refusal(doomed)

    # The ack made offline goes out now; the one already sent is not repeated
    # (a second ack of an IN_PROGRESS lease reads as stale to the server).
    assert (await stream.expect("ack")).ack.lease == late.lease
    request = await stream.expect("write")
    assert request.write.write.lease == kept.lease and request.write.write.step.name == "fetch"
    stream.answer(request)
    assert (await asyncio.wait_for(step, WAIT)).step.name == "fetch"
    assert not stream.has("ack")
    assert {lease.token for lease in sidecar.upstream.held_leases()} == {kept.lease.token, late.lease.token}
    # A lost lease is never written to again.
    await refusal(agent.complete(lost.lease))
    assert not stream.has("write")


async def test_sent_complete_is_resent_to_learn_its_outcome(
    plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent
) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    complete = agent.complete(assignment.lease, result=b'{"ok": true}')
    await stream.expect("write")  # committed, but the answer dies with the stream
    await plane.stop()
    # The intent is COMPLETED, so the lease reads as lost at re-register.
    plane.decide = lambda register: ([], list(register.held))
    await plane.start()
    stream = await plane.next_stream()
    request = await stream.expect("write")
    assert request.write.write.WhichOneof("op") == "complete"
    stream.answer(request)  # a repeat with the same lease is OK
    await asyncio.wait_for(complete, WAIT)


async def test_silent_server_is_dropped_and_reconnected(plane: FakeControlPlane, sidecar: Sidecar) -> None:
    plane.answer_pings = False
    first = await plane.next_stream()
    second = await plane.next_stream(timeout=3 * PING_MS / 1000 + WAIT)
    assert second.register.sidecar_id == first.register.sidecar_id
    await asyncio.wait_for(first.ended.wait(), WAIT)


async def test_unplaceable_assignment_is_given_back(
    plane: FakeControlPlane, sidecar: Sidecar
) -> None:
    sidecar.dispatcher.placement_timeout_s = 0.05
    stream = await plane.next_stream()
    assignment = make_assignment()
    stream.assign(assignment)  # no agent attached
    request = await stream.expect("write")
    assert request.write.write.lease == assignment.lease
    assert request.write.write.release.reason == "DRAINED"
    stream.answer(request)


async def test_drain_stops_taking_work_then_releases_leftovers(
    plane: FakeControlPlane, tmp_path: Path
) -> None:
    sc = Sidecar(make_settings(plane.port, tmp_path))
    await sc.start()
    client = FakeAgent(sc.address)
    try:
        stream = await attached(plane, client)
        finishing = await assign_and_ack(stream, client, n=1)
        stuck = await assign_and_ack(stream, client, n=2)
        stopping = asyncio.ensure_future(sc.stop(grace=0.5))
        await expect_capacity(stream, 0)
        # One finishes within the grace...
        complete = client.complete(finishing.lease)
        stream.answer(await stream.expect("write"))
        await asyncio.wait_for(complete, WAIT)
        # ...the other is released when it runs out, and its agent told to stop.
        release = await stream.expect("write")
        assert release.write.write.lease == stuck.lease
        assert release.write.write.release.reason == "DRAINED"
        assert (await client.receive()).revocation.lease == stuck.lease
        assert stream.has("ping") or await stream.expect("ping")  # still renewing while draining
        stream.answer(release)
        await asyncio.wait_for(stopping, WAIT)
        assert file_mode(socket_file(sc.address)) is None
    finally:
        await client.close()
        plane.auto_commit = True
        await sc.stop(grace=0)


async def test_upstream_writes_survive_a_missing_server(tmp_path: Path) -> None:
    # Nothing listens yet: the write waits instead of failing.
    plane = FakeControlPlane()
    plane.auto_commit = True
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        plane.port = probe.getsockname()[1]
    upstream = Upstream(servers=[f"127.0.0.1:{plane.port}"], sidecar_id="s", addresses=[ADDRESS],
                        intent_types=[], on_assignment=lambda a: None, on_revocation=lambda r: None,
                        reconnect_max_backoff_s=0.1)
    upstream.start()
    lease = delivery_pb2.Lease(intent_id="i", attempt=1, token="t")
    write = asyncio.ensure_future(upstream.write(delivery_pb2.IntentWrite(
        lease=lease, progress=delivery_pb2.ProgressWrite(message="x"))))
    await asyncio.sleep(0.3)
    assert not write.done()
    await plane.start()
    try:
        assert (await asyncio.wait_for(write, WAIT)).code == 0
    finally:
        await upstream.close()
        await plane.stop()
    closed = await upstream.write(delivery_pb2.IntentWrite(lease=lease, progress=delivery_pb2.ProgressWrite()))
    assert closed.code == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_supervisor_restarts_with_backoff_and_stops(tmp_path: Path) -> None:
    seen = tmp_path / "address"
    script = f"import os; open({str(seen)!r}, 'a').write(os.environ[{ADDRESS_ENV!r}] + '\\n'); raise SystemExit(3)"
    crashing = AgentSupervisor([sys.executable, "-c", script], "unix:///x", min_backoff_s=0.01, max_backoff_s=0.05)
    crashing.start()
    await wait_until(lambda: seen.exists() and len(seen.read_text().splitlines()) >= 3)
    await crashing.stop()
    assert set(seen.read_text().splitlines()) == {"unix:///x"}
    assert crashing.restarts >= 2

    sleeping = AgentSupervisor([sys.executable, "-c", "import time; time.sleep(60)"], "unix:///x",
                               stop_grace_s=2.0)
    sleeping.start()
    await asyncio.wait_for(sleeping.started.wait(), WAIT)
    await asyncio.wait_for(sleeping.stop(), WAIT)
    assert sleeping.last_exit == -signal.SIGTERM
    assert sleeping.restarts == 0


def test_settings_from_env_and_flags(tmp_path: Path) -> None:
    env = {
        "INTENTD_ADDRESSES": f"{ADDRESS}, agent://acme/prod/other",
        "INTENTD_SERVER": "10.0.0.1:7300,10.0.0.2:7300",
        "INTENTD_CAPACITY": "3",
        "INTENTD_EXEC": "python -m my_agent --flag 'two words'",
    }
    settings = load_settings(SidecarSettings, environ=env, capacity=7)
    assert settings.addresses == [ADDRESS, "agent://acme/prod/other"]
    assert settings.servers == ["10.0.0.1:7300", "10.0.0.2:7300"]
    assert settings.capacity == 7  # the flag wins
    assert settings.exec_argv == ["python", "-m", "my_agent", "--flag", "two words"]
    assert settings.agent_listen == f"unix://{tempfile.gettempdir()}/intentd-sidecar-{os.getpid()}.sock"
    assert settings.sidecar_id


@pytest.mark.parametrize(("env", "variable"), [
    ({}, "INTENTD_ADDRESSES"),
    ({"INTENTD_ADDRESSES": "http://nope"}, "INTENTD_ADDRESSES"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_INTENT_TYPES": "Bad Type"}, "INTENTD_INTENT_TYPES"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_CAPACITY": "0"}, "INTENTD_CAPACITY"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_AGENT_LISTEN": "0.0.0.0:7400"}, "INTENTD_AGENT_LISTEN"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_AGENT_LISTEN": "unix://relative.sock"}, "INTENTD_AGENT_LISTEN"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_AGENT_LISTEN": "unix:///tmp/" + "s" * 120}, "INTENTD_AGENT_LISTEN"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_SERVER": "nohostport"}, "INTENTD_SERVER"),
    ({"INTENTD_ADDRESSES": ADDRESS, "INTENTD_EXEC": "'unclosed"}, "INTENTD_EXEC"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings(SidecarSettings, environ=env)


def test_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTENTD_ADDRESSES", raising=False)
    assert cli_main(["--capacity", "2"]) == 2
    assert "INTENTD_ADDRESSES" in capsys.readouterr().err


AGENT_SCRIPT = """
import asyncio, os
import grpc
from intentd.generated.v1 import delivery_pb2, runtime_pb2, runtime_pb2_grpc

async def main():
    async with grpc.aio.insecure_channel(os.environ["INTENTD_SIDECAR_ADDRESS"]) as channel:
        call = runtime_pb2_grpc.AgentRuntimeServiceStub(channel).Attach()
        await call.write(runtime_pb2.AttachRequest(hello=runtime_pb2.AgentHello(capacity=3)))
        while (message := await call.read()) is not grpc.aio.EOF:
            if message.HasField("assignment"):
                await call.write(runtime_pb2.AttachRequest(
                    ack=delivery_pb2.AckAssignment(lease=message.assignment.lease)))

asyncio.run(main())
"""


async def test_command_supervises_the_agent_and_drains_on_sigterm(
    plane: FakeControlPlane, tmp_path: Path
) -> None:
    agent_file = tmp_path / "agent.py"
    agent_file.write_text(AGENT_SCRIPT)
    socket_path = tmp_path / "cmd.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from intentd.sidecar import cli_main; sys.exit(cli_main())",
        "--server", f"127.0.0.1:{plane.port}", "--address", ADDRESS, "--capacity", "5",
        "--listen", f"unix://{socket_path}", "--exec", f"{sys.executable} {agent_file}",
        "--drain-grace", "0.3",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        stream = await plane.next_stream(timeout=10)
        await expect_capacity(stream, 3)  # the supervised agent attached
        assignment = make_assignment()
        stream.assign(assignment)
        assert (await stream.expect("ack")).ack.lease == assignment.lease
        process.send_signal(signal.SIGTERM)
        await expect_capacity(stream, 0)
        release = await stream.expect("write")
        assert release.write.write.release.reason == "DRAINED"
        stream.answer(release)
        stdout, _ = await asyncio.wait_for(process.communicate(), WAIT)
        assert process.returncode == 0
        assert f"listening on unix://{socket_path}" in stdout.decode()
        assert file_mode(socket_path) is None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# ---------------------------------------------------------------- metrics and JSON logs


def scrape_metrics(url: str) -> dict[str, float]:
    """``{'name{k="v",...}': value}`` of one /metrics scrape (blocking)."""
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


async def test_metrics_endpoint_shows_held_intents_agents_and_reconnects(
    plane: FakeControlPlane, tmp_path: Path
) -> None:
    sc = Sidecar(make_settings(plane.port, tmp_path, metrics_listen="127.0.0.1:0"))
    await sc.start()
    agent = FakeAgent(sc.address)
    try:
        assert sc.metrics_server is not None
        url = sc.metrics_server.url
        before = await asyncio.to_thread(scrape_metrics, url)
        stream = await attached(plane, agent, capacity=2)
        assignment = await assign_and_ack(stream, agent)
        step = agent.record_step(assignment.lease)
        stream.answer(await stream.expect("write"))
        await asyncio.wait_for(step, WAIT)

        now = await asyncio.to_thread(scrape_metrics, url)
        assert now["intentd_sidecar_held_intents"] == 1
        assert now["intentd_sidecar_agents_attached"] == 1
        assert now["intentd_sidecar_upstream_up"] == 1
        assert now["intentd_sidecar_pending_writes"] == 0
        written = 'intentd_sidecar_writes_total{code="OK",op="step"}'
        assert now[written] - before[written] == 1
        assert now["intentd_build_info{version=\"0.1.0\"}"] == 1

        await plane.stop()
        await wait_until(lambda: not sc.upstream.connected.is_set())
        assert (await asyncio.to_thread(scrape_metrics, url))["intentd_sidecar_upstream_up"] == 0
        await plane.start()  # same port
        await plane.next_stream()
        await wait_until(lambda: sc.upstream.connected.is_set())
        after = await asyncio.to_thread(scrape_metrics, url)
        assert after["intentd_sidecar_reconnects_total"] > now["intentd_sidecar_reconnects_total"]
        assert after["intentd_sidecar_upstream_up"] == 1
        assert after["intentd_sidecar_held_intents"] == 1  # kept across the reconnect
    finally:
        plane.auto_commit = True
        await agent.close()
        await sc.stop(grace=0)
    assert sc.metrics_server is None
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape_metrics, url)


def test_metrics_and_log_settings_are_checked(tmp_path: Path) -> None:
    settings = load_settings(SidecarSettings, environ={
        "INTENTD_ADDRESSES": ADDRESS, "INTENTD_METRICS_LISTEN": "0.0.0.0:9464", "INTENTD_LOG_FORMAT": "json",
        "INTENTD_LOG_PAYLOADS": "true"})
    assert (settings.metrics_listen, settings.log_format, settings.log_payloads) == ("0.0.0.0:9464", "json", True)
    default = load_settings(SidecarSettings, environ={"INTENTD_ADDRESSES": ADDRESS, "INTENTD_METRICS_LISTEN": ""})
    assert default.metrics_listen is None and default.log_format == "text" and not default.log_payloads
    with pytest.raises(SettingsError, match="INTENTD_METRICS_LISTEN"):
        load_settings(SidecarSettings, environ={"INTENTD_ADDRESSES": ADDRESS, "INTENTD_METRICS_LISTEN": "9464"})
    with pytest.raises(SettingsError, match="INTENTD_LOG_FORMAT"):
        load_settings(SidecarSettings, environ={"INTENTD_ADDRESSES": ADDRESS, "INTENTD_LOG_FORMAT": "logfmt"})


async def test_command_logs_json_and_serves_metrics(plane: FakeControlPlane, tmp_path: Path) -> None:
    socket_path = tmp_path / "json.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from intentd.sidecar import cli_main; sys.exit(cli_main())",
        "--server", f"127.0.0.1:{plane.port}", "--address", ADDRESS, "--listen", f"unix://{socket_path}",
        "--metrics-listen", "127.0.0.1:0", "--drain-grace", "0",
        env={**os.environ, "INTENTD_LOG_FORMAT": "json", "INTENTD_SIDECAR_ID": "sc-json"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    entries: list[dict[str, Any]] = []
    try:
        url = None
        while url is None:
            line = await asyncio.wait_for(process.stderr.readline(), 10)
            assert line, "the sidecar exited before serving metrics"
            entries.append(json.loads(line))
            if entries[-1]["message"].startswith("metrics on "):
                url = entries[-1]["message"].removeprefix("metrics on ")
        stream = await plane.next_stream(timeout=10)
        async with asyncio.timeout(WAIT):
            # A bounded poll of another process's endpoint.
            while (await asyncio.to_thread(scrape_metrics, url))["intentd_sidecar_upstream_up"] != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        stream.assign(make_assignment())  # no agent attached: held until given back
        release = await stream.expect("write")
        assert release.write.write.release.reason == "DRAINED"
        stream.answer(release)
        process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), WAIT)
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    entries += [json.loads(line) for line in rest.decode().splitlines()]
    assert all(entry["sidecar_id"] == "sc-json" for entry in entries)
    given_back = [e for e in entries if e["message"].startswith("no attached agent took")]
    assert given_back and given_back[0]["intent_id"] == make_assignment().lease.intent_id
    assert given_back[0]["attempt"] == 1 and given_back[0]["level"] == "WARNING"
