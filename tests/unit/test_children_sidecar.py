"""The sidecar's side of child intents, against test_sidecar_unit's scripted
control plane and a raw agent on the runtime API: a start of children goes
upstream like any write (on the Attach stream: it has no unary call), its
record joins the history ``BeginStep`` answers from, a malformed one is
refused locally, and an AGENT wait takes the wait path (parked frees the
slot, resolved joins the history), re-sent after a reconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2, intent_pb2, runtime_pb2
from intentd.sidecar import Sidecar
from tests.unit.test_sidecar_unit import (  # noqa: F401 - the fixtures: plane, sidecar
    WAIT,
    FakeAgent,
    FakeControlPlane,
    FakeStream,
    assign_and_ack,
    attached,
    plane_fixture,
    plane_type,
    sidecar_fixture,
)
from tests.unit.test_waits_sidecar import answer_wait

WORKER = "agent://acme/prod/worker"
WORK = "intent.work.do.v1"


@pytest.fixture
async def agent(sidecar: Sidecar) -> AsyncIterator[FakeAgent]:
    client = FakeAgent(sidecar.address)
    yield client
    await client.close()


def start_write(lease: delivery_pb2.Lease, index: int = 1, n: int = 2) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, start_children=delivery_pb2.StartChildrenWrite(
        index=index, step_name=f"@start:{WORK}",
        children=[delivery_pb2.ChildSpec(to_agent=WORKER, intent_type=WORK, payload=str(i).encode())
                  for i in range(n)]))


def start_record(index: int = 1) -> intent_pb2.StepRecord:
    record = {"children": [{"id": f"c{i}", "to_agent": WORKER, "intent_type": WORK} for i in range(2)]}
    return intent_pb2.StepRecord(index=index, name=f"@start:{WORK}", result=json.dumps(record).encode(), attempt=1)


def agent_wait(lease: delivery_pb2.Lease, index: int = 2) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, wait=delivery_pb2.WaitWrite(
        index=index, step_name="@gather", kind=intent_pb2.WAIT_KIND_AGENT,
        children=delivery_pb2.ChildWait(intent_ids=["c0", "c1"], mode=delivery_pb2.CHILD_WAIT_MODE_ALL)))


def answer_start(stream: FakeStream, request: apb.ConnectRequest, record: intent_pb2.StepRecord) -> None:
    stream.send(apb.ConnectResponse(write_result=apb.WriteResult(request_id=request.write.request_id, step=record)))


async def test_a_start_is_forwarded_and_its_record_joins_the_history(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    lease = assignment.lease
    await agent.write(3, start_write(lease))
    request = await stream.expect("write")
    assert request.write.write == start_write(lease)
    answer_start(stream, request, start_record())
    result = (await agent.receive()).write_result
    assert (result.request_id, result.code, result.step) == (3, 0, start_record())
    # Answered from the window (the fake plane serves no ListRecordedSteps).
    begin = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=lease, index=1, any_name=True))
    assert begin.recorded and begin.step == start_record()
    held = sidecar.leases.get(lease.token)
    assert held is not None and held.local and held.history.recorded == 1


async def test_a_start_refused_upstream_adds_nothing(plane: FakeControlPlane, sidecar: Sidecar,
                                                     agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    await agent.write(4, start_write(assignment.lease))
    stream.answer(await stream.expect("write"), code=grpc.StatusCode.PERMISSION_DENIED.value[0], message="no send")
    result = (await agent.receive()).write_result
    assert (result.code, result.message) == (grpc.StatusCode.PERMISSION_DENIED.value[0], "no send")
    held = sidecar.leases.get(assignment.lease.token)
    assert held is not None and held.local and held.history.recorded == 0


@pytest.mark.parametrize(("write", "why"), [
    (delivery_pb2.StartChildrenWrite(index=0, step_name=f"@start:{WORK}",
                                     children=[delivery_pb2.ChildSpec(to_agent=WORKER, intent_type=WORK)]),
     "1-based index"),
    (delivery_pb2.StartChildrenWrite(index=1, step_name="@gather",
                                     children=[delivery_pb2.ChildSpec(to_agent=WORKER, intent_type=WORK)]),
     "record name"),
    (delivery_pb2.StartChildrenWrite(index=1, step_name=f"@start:{WORK}"), "1 to 1000 children"),
    (delivery_pb2.StartChildrenWrite(index=1, step_name=f"@start:{WORK}",
                                     children=[delivery_pb2.ChildSpec()] * 1001), "1 to 1000 children"),
])
async def test_bad_starts_are_refused_locally(plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent,
                                              write: delivery_pb2.StartChildrenWrite, why: str) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    await agent.write(5, delivery_pb2.IntentWrite(lease=assignment.lease, start_children=write))
    result = (await agent.receive()).write_result
    assert result.request_id == 5 and result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert why in result.message
    assert not stream.has("write")


@pytest.mark.parametrize("outcome", ["parked", "resolved"])
async def test_an_agent_wait_takes_the_wait_path(plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent,
                                                 outcome: str) -> None:
    stream = await attached(plane, agent, capacity=1)
    assignment = await assign_and_ack(stream, agent)
    lease = assignment.lease
    await agent.write(6, agent_wait(lease))
    request = await stream.expect("write")
    assert request.write.write == agent_wait(lease)
    record = intent_pb2.StepRecord(index=2, name="@gather", attempt=1, result=json.dumps({"children": [
        {"id": f"c{i}", "state": "COMPLETED", "result": i, "error": None} for i in range(2)]}).encode())
    answer_wait(stream, request, delivery_pb2.WaitOutcome(parked=True) if outcome == "parked"
                else delivery_pb2.WaitOutcome(step=record))
    result = (await agent.receive()).write_result
    assert result.code == 0 and result.wait.parked is (outcome == "parked")
    if outcome == "parked":
        # Over here: the one slot is free for the next intent.
        assert sidecar.leases.gone(lease.token) == "PARKED"
        await assign_and_ack(stream, agent, n=2)
    else:
        begin = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(lease=lease, index=2, any_name=True))
        assert begin.recorded and begin.step == record


async def test_a_pending_start_is_sent_again_after_a_reconnect(plane: FakeControlPlane, sidecar: Sidecar,
                                                               agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    await agent.write(7, start_write(assignment.lease))
    await stream.expect("write")
    stream.send(None)  # type: ignore[arg-type]  # the fake ends the stream before answering
    again = await plane.next_stream()
    request = await again.expect("write")
    assert request.write.write == start_write(assignment.lease)
    answer_start(again, request, start_record())
    result = await asyncio.wait_for(agent.receive(), WAIT)
    assert result.write_result.request_id == 7 and result.write_result.step == start_record()
