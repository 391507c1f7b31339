"""The sidecar's side of durable waits, against test_sidecar_unit's scripted
control plane and a raw agent on the runtime API: a wait is forwarded like
any write (unary ``Wait`` and op ``wait`` on the Attach stream); answered
parked it ends the lease here (the slot is free, nothing is released, late
writes are refused locally); answered resolved its record joins the history
that ``BeginStep`` answers from."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2, intent_pb2, runtime_pb2
from intentd.sidecar import Sidecar
from tests.unit.test_sidecar_unit import (  # noqa: F401 - the fixtures: plane, sidecar, agent
    WAIT,
    FakeAgent,
    FakeControlPlane,
    FakeStream,
    assign_and_ack,
    attached,
    expect_capacity,
    make_settings,
    plane_fixture,
    plane_type,
    refusal,
    sidecar_fixture,
)

SIGNAL_RECORD = json.dumps({"signal": {"id": "s1", "name": "go", "payload": 7, "sender": "k",
                                       "time": "2026-01-02T03:04:05Z"}}).encode()


@pytest.fixture
async def agent(sidecar: Sidecar) -> AsyncIterator[FakeAgent]:
    client = FakeAgent(sidecar.address)
    yield client
    await client.close()


def wait_write(lease: delivery_pb2.Lease, index: int = 1) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, wait=delivery_pb2.WaitWrite(
        index=index, step_name="@signal:go", kind=intent_pb2.WAIT_KIND_SIGNAL, signal_name="go", timeout_ms=1000))


def answer_wait(stream: FakeStream, request: apb.ConnectRequest, outcome: delivery_pb2.WaitOutcome) -> None:
    stream.send(apb.ConnectResponse(write_result=apb.WriteResult(request_id=request.write.request_id, wait=outcome)))


def unary_wait(agent: FakeAgent, lease: delivery_pb2.Lease) -> asyncio.Future[runtime_pb2.WaitResponse]:
    write = wait_write(lease)
    return asyncio.ensure_future(agent.stub.Wait(runtime_pb2.WaitRequest(lease=lease, wait=write.wait)))


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_a_parked_wait_frees_the_slot_and_nothing_is_released(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent, path: str) -> None:
    stream = await attached(plane, agent, capacity=1)
    first = await assign_and_ack(stream, agent, n=1)
    if path == "unary":
        call = unary_wait(agent, first.lease)
    else:
        await agent.write(5, wait_write(first.lease))
    request = await stream.expect("write")
    assert request.write.write.wait == wait_write(first.lease).wait
    answer_wait(stream, request, delivery_pb2.WaitOutcome(parked=True))
    if path == "unary":
        assert (await asyncio.wait_for(call, WAIT)).outcome.parked
    else:
        result = (await agent.receive()).write_result
        assert (result.request_id, result.code, result.wait.parked) == (5, 0, True)

    # The lease is over here: not held, not renewed, not announced again.
    assert sidecar.leases.get(first.lease.token) is None
    assert first.lease not in sidecar.upstream.held_leases()
    assert sidecar.leases.gone(first.lease.token) == "PARKED"
    # The agent's one slot is free: the next intent goes straight to it.
    second = await assign_and_ack(stream, agent, n=2)
    # A late write under the parked lease is refused here, never sent.
    await refusal(agent.complete(first.lease))
    call = agent.complete(second.lease)
    done = await stream.expect("write")
    assert done.write.write.lease == second.lease and done.write.write.WhichOneof("op") == "complete"
    stream.answer(done)
    await asyncio.wait_for(call, WAIT)
    # The agent goes away: only what it still held would be released, and it holds nothing.
    agent.call.cancel()
    await stream.expect("set_capacity")
    await stream.expect("ping")
    assert not stream.has("write")
    assert sidecar.dispatcher.released == 0


@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_a_resolved_wait_joins_the_history_begin_step_answers(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent, path: str) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    lease = assignment.lease
    record = intent_pb2.StepRecord(index=1, name="@signal:go", result=SIGNAL_RECORD, attempt=1)
    if path == "unary":
        call = unary_wait(agent, lease)
    else:
        await agent.write(9, wait_write(lease))
    answer_wait(stream, await stream.expect("write"), delivery_pb2.WaitOutcome(step=record))
    if path == "unary":
        outcome = (await asyncio.wait_for(call, WAIT)).outcome
    else:
        outcome = (await agent.receive()).write_result.wait
    assert not outcome.parked and outcome.step == record
    # Answered from the window (the fake plane serves no ListRecordedSteps).
    begin = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=lease, index=1, any_name=True))
    assert begin.recorded and begin.step == record
    # Still held and on the agent: the attempt goes on.
    held = sidecar.leases.get(lease.token)
    assert held is not None and held.local and lease in sidecar.upstream.held_leases()


async def test_a_wait_refused_upstream_keeps_the_lease(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    call = unary_wait(agent, assignment.lease)
    stream.answer(await stream.expect("write"), code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad wait")
    await refusal(call, grpc.StatusCode.INVALID_ARGUMENT)
    held = sidecar.leases.get(assignment.lease.token)
    assert held is not None and held.local


@pytest.mark.parametrize(("write", "why"), [
    (wait_write(delivery_pb2.Lease(), index=0), "1-based index"),
    (delivery_pb2.IntentWrite(wait=delivery_pb2.WaitWrite(index=1, step_name="go", kind=1)), "record name"),
    (delivery_pb2.IntentWrite(wait=delivery_pb2.WaitWrite(index=1, step_name="@signal:go")), "kind"),
    (delivery_pb2.IntentWrite(step=delivery_pb2.StepWrite(index=1, name="@mine")), "reserved"),
])
async def test_bad_wait_writes_are_refused_locally(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent, write: delivery_pb2.IntentWrite,
        why: str) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    bad = delivery_pb2.IntentWrite()
    bad.CopyFrom(write)
    bad.lease.CopyFrom(assignment.lease)
    await agent.write(4, bad)
    result = (await agent.receive()).write_result
    assert result.request_id == 4 and result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert why in result.message
    assert not stream.has("write")


async def test_a_pending_wait_is_sent_again_after_a_reconnect(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    call = unary_wait(agent, assignment.lease)
    await stream.expect("write")
    stream.send(None)  # type: ignore[arg-type]  # the fake ends the stream: the hold is cut off
    again = await plane.next_stream()
    assert assignment.lease in again.register.held
    request = await again.expect("write")
    assert request.write.write.wait == wait_write(assignment.lease).wait
    answer_wait(again, request, delivery_pb2.WaitOutcome(parked=True))
    assert (await asyncio.wait_for(call, WAIT)).outcome.parked
    assert sidecar.leases.get(assignment.lease.token) is None



# ---------------------------------------------------------------- the Node example agent

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE_TYPE = "example.node.steps.v1"


def node_assignment(intent_id: str, attempt: int, steps: list[intent_pb2.StepRecord]) -> delivery_pb2.Assignment:
    payload = {"steps": 1, "step_ms": 0, "wait_for_signal": "go"}
    return delivery_pb2.Assignment(
        intent=intent_pb2.Intent(id=intent_id, intent_type=NODE_TYPE, payload=json.dumps(payload).encode()),
        lease=delivery_pb2.Lease(intent_id=intent_id, attempt=attempt, token=uuid.uuid4().hex),
        steps=steps, recorded_steps=len(steps), heartbeat_timeout_ms=10_000,
    )


@contextlib.asynccontextmanager
async def node_agent(plane: FakeControlPlane, tmp_path: Path) -> AsyncIterator[Sidecar]:
    """A sidecar for the Node example's intent type, and the Node agent attached to it."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("needs node and `npm ci` in examples/node")
    sidecar = Sidecar(make_settings(plane.port, tmp_path, intent_types=[NODE_TYPE]))
    await sidecar.start()
    env = {**os.environ, "INTENTD_SIDECAR_ADDRESS": str(sidecar.address), "AGENT_CAPACITY": "1"}
    process = await asyncio.create_subprocess_exec(node, str(NODE_DIR / "agent.js"), env=env)
    try:
        yield sidecar
    finally:
        process.kill()
        await process.wait()
        plane.auto_commit = True
        await sidecar.stop(grace=0)


async def test_the_node_agent_parks_replays_and_takes_resolved_waits(plane: FakeControlPlane,
                                                                     tmp_path: Path) -> None:
    async with node_agent(plane, tmp_path):
        stream = await plane.next_stream()
        # A Node process loading grpc-js on a loaded 2-core machine takes a
        # few seconds to attach (CI once took more than the usual 5).
        await expect_capacity(stream, 1, timeout=30)
        step = intent_pb2.StepRecord(index=1, name="step-1", result=b"10", attempt=1)
        signal = intent_pb2.StepRecord(index=2, name="@signal:go", result=SIGNAL_RECORD, attempt=1)

        # Attempt 1 runs its step, then waits: parked, it writes nothing more.
        first = node_assignment("node-a", 1, [])
        stream.assign(first)
        await stream.expect("ack")
        recorded = await stream.expect("write")
        assert recorded.write.write.step.name == "step-1"
        stream.answer(recorded)
        waited = await stream.expect("write")
        assert waited.write.write.wait == delivery_pb2.WaitWrite(
            index=2, step_name="@signal:go", kind=intent_pb2.WAIT_KIND_SIGNAL, signal_name="go")
        answer_wait(stream, waited, delivery_pb2.WaitOutcome(parked=True))

        # Its one slot is free at once; this attempt's wait is answered resolved.
        second = node_assignment("node-b", 1, [step])
        stream.assign(second)
        await stream.expect("ack")
        waited = await stream.expect("write")
        assert waited.write.write.lease == second.lease and waited.write.write.wait.index == 2
        answer_wait(stream, waited, delivery_pb2.WaitOutcome(step=signal))
        completed = await stream.expect("write")
        assert completed.write.write.lease == second.lease
        assert json.loads(completed.write.write.complete.result)["signal"] == 7
        stream.answer(completed)

        # Woken, the first intent's next delivery replays the step and the wait's record.
        third = node_assignment("node-a", 2, [step, signal])
        stream.assign(third)
        await stream.expect("ack")
        completed = await stream.expect("write")
        assert completed.write.write.lease == third.lease
        result = json.loads(completed.write.write.complete.result)
        assert (result["signal"], result["replayed"], result["total"]) == (7, 1, 10)
        stream.answer(completed)
        assert not stream.has("write")
