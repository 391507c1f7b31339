"""The sidecar's side of streams, against test_sidecar_unit's scripted control
plane and a raw agent on the runtime API: an emit is forwarded like any write
(unary ``Emit`` and op ``emit`` on the Attach stream, batched frames too),
answered after the commit with the control plane's EmitOutcome, refused here
when malformed (INVALID_ARGUMENT, never sent), re-sent after a reconnect, and
a limit refusal comes back as the same status with the lease kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from intentd.agent import Agent, Context
from intentd.core.backoff import Backoff
from intentd.core.limits import MAX_CHUNK_BYTES, MAX_EMIT_BYTES, MAX_EMIT_CHUNKS
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2, runtime_pb2, stream_pb2
from intentd.sidecar import Sidecar
from tests.unit.test_sidecar_unit import (  # noqa: F401 - the fixtures: plane, sidecar
    ADDRESS,
    TYPE,
    WAIT,
    FakeAgent,
    FakeControlPlane,
    FakeStream,
    assign_and_ack,
    attached,
    expect_capacity,
    make_assignment,
    plane_fixture,
    plane_type,
    refusal,
    sidecar_fixture,
)

TEXT = stream_pb2.CHUNK_FORMAT_TEXT


@pytest.fixture
async def agent(sidecar: Sidecar) -> AsyncIterator[FakeAgent]:
    client = FakeAgent(sidecar.address)
    yield client
    await client.close()


def emit(lease: delivery_pb2.Lease, *texts: str, seq: int = 1, stream: str = "out",
         supersede: tuple[int, ...] = ()) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, emit=delivery_pb2.EmitWrite(
        stream=stream, seq=seq, supersede_positions=supersede,
        chunks=[stream_pb2.EmitChunk(data=t.encode(), format=TEXT, position=1) for t in texts]))


def answer_emit(stream: FakeStream, request: apb.ConnectRequest, first: int, appended: int) -> None:
    stream.send(apb.ConnectResponse(write_result=apb.WriteResult(
        request_id=request.write.request_id,
        emit=delivery_pb2.EmitOutcome(first_offset=first, appended=appended))))


def unary_emit(agent: FakeAgent, write: delivery_pb2.IntentWrite) -> asyncio.Future[runtime_pb2.EmitResponse]:
    return asyncio.ensure_future(agent.stub.Emit(runtime_pb2.EmitRequest(lease=write.lease, emit=write.emit)))


async def test_a_unary_emit_is_answered_after_the_commit_with_its_outcome(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    write = emit(assignment.lease, "hello", "world", seq=3, supersede=(2,))
    call = unary_emit(agent, write)
    request = await stream.expect("write")
    assert request.write.write == write
    # Not answered before the control plane is.
    assert not call.done()
    answer_emit(stream, request, first=40, appended=2)
    response = await asyncio.wait_for(call, WAIT)
    assert response.outcome == delivery_pb2.EmitOutcome(first_offset=40, appended=2)
    held = sidecar.leases.get(assignment.lease.token)
    assert held is not None and held.local


async def test_stream_emits_in_one_frame_are_forwarded_and_answered_by_request_id(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    lease = assignment.lease
    first, second = emit(lease, "a", seq=1), emit(lease, "b", "c", seq=2, stream="")
    await agent.call.write(runtime_pb2.AttachRequest(batch=runtime_pb2.AttachRequestBatch(messages=[
        runtime_pb2.AttachRequest(write=apb.WriteRequest(request_id=11, write=first)),
        runtime_pb2.AttachRequest(write=apb.WriteRequest(request_id=12, write=second)),
    ])))
    requests = {r.write.write.emit.seq: r for r in [await stream.expect("write") for _ in range(2)]}
    assert requests[1].write.write == first and requests[2].write.write == second
    answer_emit(stream, requests[2], first=0, appended=2)
    answer_emit(stream, requests[1], first=0, appended=0)  # e.g. its position was recorded
    results = {r.request_id: r for r in [(await agent.receive()).write_result for _ in range(2)]}
    assert (results[12].code, results[12].emit.appended) == (0, 2)
    assert (results[11].code, results[11].emit.appended, results[11].emit.first_offset) == (0, 0, 0)


def _bad(**fields: object) -> delivery_pb2.EmitWrite:
    return delivery_pb2.EmitWrite(**fields)  # type: ignore[arg-type]


def _chunk(size: int = 1, position: int = 1) -> stream_pb2.EmitChunk:
    return stream_pb2.EmitChunk(data=b"x" * size, format=TEXT, position=position)


@pytest.mark.parametrize(("bad", "why"), [
    (_bad(stream="has space", chunks=[_chunk()], seq=1), "emit.stream"),
    (_bad(stream="x" * 65, chunks=[_chunk()], seq=1), "emit.stream"),
    (_bad(stream="s", seq=1), "chunks or supersede_positions"),
    (_bad(stream="s", chunks=[_chunk(MAX_CHUNK_BYTES + 1)], seq=1), "emit.chunks[0].data"),
    (_bad(stream="s", chunks=[_chunk()] * (MAX_EMIT_CHUNKS + 1), seq=1), f"at most {MAX_EMIT_CHUNKS} chunks"),
    (_bad(stream="s", chunks=[_chunk(MAX_CHUNK_BYTES)] * (MAX_EMIT_BYTES // MAX_CHUNK_BYTES + 1), seq=1),
     f"at most {MAX_EMIT_BYTES} bytes"),
    (_bad(stream="s", chunks=[_chunk(), _chunk(position=0)], seq=1), "emit.chunks[1].position"),
    (_bad(supersede_positions=[0], seq=1), "supersede_positions"),
])
@pytest.mark.parametrize("path", ["unary", "stream"])
async def test_malformed_emits_are_refused_here(plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent,
                                                bad: delivery_pb2.EmitWrite, why: str, path: str) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    write = delivery_pb2.IntentWrite(lease=assignment.lease, emit=bad)
    if path == "unary":
        error = await refusal(unary_emit(agent, write), grpc.StatusCode.INVALID_ARGUMENT)
        assert why in (error.details() or "")
    else:
        await agent.write(6, write)
        result = (await agent.receive()).write_result
        assert result.request_id == 6 and result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert why in result.message
    assert not stream.has("write")


async def test_a_supersede_alone_needs_no_stream_name(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    write = emit(assignment.lease, seq=4, stream="", supersede=(3,))
    call = unary_emit(agent, write)
    request = await stream.expect("write")
    assert request.write.write == write
    answer_emit(stream, request, first=0, appended=0)
    assert (await asyncio.wait_for(call, WAIT)).outcome.appended == 0


async def test_a_pending_emit_is_sent_again_after_a_reconnect(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    write = emit(assignment.lease, "once", seq=7)
    call = unary_emit(agent, write)
    await stream.expect("write")
    stream.send(None)  # type: ignore[arg-type]  # the fake ends the stream before answering
    again = await plane.next_stream()
    assert assignment.lease in again.register.held
    # The same seq: the control plane answers a repeat of an applied one with repeated.
    request = await again.expect("write")
    assert request.write.write == write
    again.send(apb.ConnectResponse(write_result=apb.WriteResult(
        request_id=request.write.request_id, emit=delivery_pb2.EmitOutcome(repeated=True))))
    assert (await asyncio.wait_for(call, WAIT)).outcome.repeated


async def test_a_limit_refusal_comes_back_as_its_status_and_keeps_the_lease(
        plane: FakeControlPlane, sidecar: Sidecar, agent: FakeAgent) -> None:
    stream = await attached(plane, agent)
    assignment = await assign_and_ack(stream, agent)
    call = unary_emit(agent, emit(assignment.lease, "too much"))
    stream.answer(await stream.expect("write"), code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                  message="stream_max_bytes (1024) exceeded")
    error = await refusal(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.details() == "stream_max_bytes (1024) exceeded"
    held = sidecar.leases.get(assignment.lease.token)
    assert held is not None and held.local
    assert assignment.lease in sidecar.upstream.held_leases()


async def test_the_agent_sdk_emits_through_the_sidecar_before_its_record(
        plane: FakeControlPlane, sidecar: Sidecar) -> None:
    stream = await plane.next_stream()
    agent = Agent(ADDRESS, sidecar=sidecar.address, capacity=1, reconnect_backoff=Backoff(0.005, 0.02),
                  write_backoff=Backoff(0.005, 0.02), write_timeout=WAIT)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: object) -> str:
        async def talk() -> str:
            for word in ("one", "two", "three"):
                await ctx.emit(word)
            return "said"

        await ctx.step("talk", talk)
        await ctx.emit({"done": True}, stream="meta")
        return "ok"

    plane.auto_commit = True
    task = asyncio.create_task(agent.run_async())
    try:
        await expect_capacity(stream, 1)
        assignment = make_assignment()
        stream.assign(assignment)
        ops: list[delivery_pb2.IntentWrite] = []
        while not ops or ops[-1].WhichOneof("op") != "complete":
            ops.append((await stream.expect("write")).write.write)
    finally:
        await asyncio.wait_for(agent.stop(), WAIT)
        await asyncio.wait_for(task, WAIT)
    assert [w.WhichOneof("op") for w in ops] == ["emit", "step", "emit", "complete"]
    first, last = ops[0].emit, ops[2].emit
    assert (first.stream, first.seq, [c.data for c in first.chunks], [c.position for c in first.chunks]) == (
        "default", 1, [b"one", b"two", b"three"], [1, 1, 1])
    assert (last.stream, last.seq, [c.data for c in last.chunks], [c.position for c in last.chunks]) == (
        "meta", 2, [b'{"done":true}'], [2])
    assert all(w.lease == assignment.lease for w in ops)
