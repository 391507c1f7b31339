"""The sidecar's side of paged histories, against the scripted fake control
plane of test_sidecar_unit: it fetches recorded steps past an assignment's
first page when the agent asks for them, keeps only a window, and gives an
agent that does not fetch the whole history in its assignment, or a clear
failure when that cannot fit."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2, intent_pb2, runtime_pb2
from intentd.sidecar import Sidecar
from intentd.sidecar.dispatch import FILL_BYTES
from tests.unit.test_sidecar_unit import (  # noqa: F401 - the plane and sidecar fixtures, over plane_type below
    WAIT,
    FakeAgent,
    FakeControlPlane,
    expect_capacity,
    make_assignment,
    plane_fixture,
    sidecar_fixture,
)

RECORDED = 7


def record(index: int) -> intent_pb2.StepRecord:
    return intent_pb2.StepRecord(index=index, name=f"s{index}", result=b'"r%d"' % index, attempt=1)


class PagingPlane(FakeControlPlane):
    """Answers ListRecordedSteps with pages of two steps of a 7-step history."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches: list[apb.ListRecordedStepsRequest] = []

    async def ListRecordedSteps(self, request: apb.ListRecordedStepsRequest,
                                context: Any) -> apb.ListRecordedStepsResponse:
        self.fetches.append(request)
        last = min(RECORDED, request.from_index + 1)
        return apb.ListRecordedStepsResponse(
            steps=[record(i) for i in range(request.from_index, last + 1)], recorded_steps=RECORDED)


@pytest.fixture
def plane_type() -> type[PagingPlane]:
    return PagingPlane


async def attach(plane: PagingPlane, sidecar: Sidecar, fetches: bool) -> tuple[Any, FakeAgent]:
    stream = await plane.next_stream()
    assert stream.register.fetches_steps  # it tells the server it can take first pages
    agent = FakeAgent(sidecar.address)
    agent.call = agent.stub.Attach()
    await agent.call.write(runtime_pb2.AttachRequest(hello=runtime_pb2.AgentHello(
        capacity=1, language="test", fetches_steps=fetches)))
    assert (await agent.receive()).HasField("welcome")
    await expect_capacity(stream, 1)
    return stream, agent


def first_page(recorded_bytes: int = 100) -> delivery_pb2.Assignment:
    assignment = make_assignment(1)
    assignment.steps.extend([record(1), record(2)])
    assignment.recorded_steps = RECORDED
    assignment.recorded_bytes = recorded_bytes
    return assignment


async def test_a_fetching_agent_gets_the_first_page_and_the_rest_on_demand(plane: PagingPlane,
                                                                          sidecar: Sidecar) -> None:
    stream, agent = await attach(plane, sidecar, fetches=True)
    try:
        assignment = first_page()
        stream.assign(assignment)
        got = (await agent.receive()).assignment
        assert [s.index for s in got.steps] == [1, 2] and got.recorded_steps == RECORDED
        assert plane.fetches == []

        async def begin(index: int, name: str = "", any_name: bool = True) -> runtime_pb2.BeginStepResponse:
            response: runtime_pb2.BeginStepResponse = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(
                lease=assignment.lease, index=index, name=name, any_name=any_name), timeout=WAIT)
            return response

        assert (await begin(1)).step == record(1)  # the first page, kept by the sidecar too
        assert (await begin(3)).step == record(3)  # fetched with step 4
        assert (await begin(4)).step == record(4)  # from that page, no call
        assert [f.from_index for f in plane.fetches] == [3]
        assert (await begin(5)).step == record(5)
        assert [f.from_index for f in plane.fetches] == [3, 5]
        # Fenced: the fetch names the lease and the stream that holds it.
        assert all(f.lease == assignment.lease and f.session_id for f in plane.fetches)
        assert not (await begin(8)).recorded  # past the history: run it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await begin(6, name="other", any_name=False)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "divergence" in err.value.details()
        # Replays go forward: the window holds the last page fetched only.
        held = sidecar.leases.get(assignment.lease.token)
        assert held is not None
        window = held.history.window
        assert sorted(window) == [5, 6]
    finally:
        await agent.close()


async def test_an_agent_that_does_not_fetch_gets_the_whole_history(plane: PagingPlane, sidecar: Sidecar) -> None:
    stream, agent = await attach(plane, sidecar, fetches=False)
    try:
        stream.assign(first_page())
        got = (await agent.receive()).assignment
        assert [s.index for s in got.steps] == list(range(1, RECORDED + 1))
        assert got.steps[6] == record(7)
        assert [f.from_index for f in plane.fetches] == [3, 5, 7]
    finally:
        await agent.close()


async def test_a_history_too_large_for_an_agent_that_does_not_fetch_fails_the_attempt(
        plane: PagingPlane, sidecar: Sidecar) -> None:
    stream, agent = await attach(plane, sidecar, fetches=False)
    try:
        assignment = first_page(recorded_bytes=FILL_BYTES + 1)
        stream.assign(assignment)
        await stream.expect("ack")  # a fail needs the attempt in progress
        fail = (await stream.expect("write")).write.write
        assert fail.lease == assignment.lease and fail.fail.code == "HISTORY_TOO_LARGE" and fail.fail.retryable
        assert "fetches_steps" in fail.fail.message
        assert plane.fetches == []
    finally:
        await agent.close()


# -- holes: concurrent steps of an earlier attempt left positions unrecorded ------------

HOLED = (1, 2, 4, 5, 7)  # 3 and 6 are holes


class HolesPlane(FakeControlPlane):
    """A history recorded at positions 1, 2, 4, 5, 7; pages of two recorded
    steps (as steps_of cuts them: recorded steps, not positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fetches: list[int] = []

    async def ListRecordedSteps(self, request: apb.ListRecordedStepsRequest,
                                context: Any) -> apb.ListRecordedStepsResponse:
        self.fetches.append(request.from_index)
        page = [record(i) for i in HOLED if i >= request.from_index][:2]
        return apb.ListRecordedStepsResponse(steps=page, recorded_steps=max(HOLED))


@pytest.mark.parametrize("plane_type", [HolesPlane])
async def test_holes_answer_not_recorded_and_are_fetched_once(plane: HolesPlane, sidecar: Sidecar) -> None:
    stream, agent = await attach(plane, sidecar, fetches=True)  # type: ignore[arg-type]
    try:
        assignment = make_assignment(1)
        assignment.steps.extend([record(1), record(2)])
        assignment.recorded_steps = max(HOLED)
        stream.assign(assignment)
        await agent.receive()

        async def begin(index: int) -> bool:
            response: runtime_pb2.BeginStepResponse = await agent.stub.BeginStep(runtime_pb2.BeginStepRequest(
                lease=assignment.lease, index=index, any_name=True), timeout=WAIT)
            assert not response.recorded or response.step == record(index)
            return response.recorded

        # An agent replaying concurrent steps asks for 3, 4 and 5 at once:
        # one fetch from 3 answers all three (3 is a hole: it runs).
        assert await asyncio.gather(begin(3), begin(4), begin(5)) == [False, True, True]
        assert plane.fetches == [3]
        assert not await begin(3)  # known now: no second fetch
        assert plane.fetches == [3]
        assert [await begin(6), await begin(7), await begin(8)] == [False, True, False]
        assert plane.fetches == [3, 6]

        # This attempt fills hole 6 (out of order): BeginStep answers it from the window.
        await agent.ack(assignment.lease)
        await stream.expect("ack")
        await agent.write(1, delivery_pb2.IntentWrite(lease=assignment.lease, step=delivery_pb2.StepWrite(
            index=6, name="s6", result=b'"r6"')))
        stream.answer(await stream.expect("write"))
        assert (await agent.receive()).write_result.code == 0
        assert await begin(6) and plane.fetches == [3, 6]
    finally:
        await agent.close()


@pytest.mark.parametrize("plane_type", [HolesPlane])
async def test_an_agent_that_does_not_fetch_gets_a_holed_history_whole(plane: HolesPlane, sidecar: Sidecar) -> None:
    """Filled up to the highest position by the pages' last indexes, not
    by counting steps (holes would ask for the same page twice)."""
    stream, agent = await attach(plane, sidecar, fetches=False)  # type: ignore[arg-type]
    try:
        assignment = make_assignment(2)
        assignment.steps.extend([record(1), record(2)])
        assignment.recorded_steps = max(HOLED)
        stream.assign(assignment)
        got = (await agent.receive()).assignment
        assert [s.index for s in got.steps] == list(HOLED)
        assert plane.fetches == [3, 6]
    finally:
        await agent.close()
