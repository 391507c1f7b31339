"""The agent SDK's side of paged histories, against the scripted fake
sidecar of test_agent_unit: recorded steps past the assignment's page are
asked for with BeginStep one by one as the replay reaches them, never run,
and dropped once replayed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from intentd.agent import Context, SyncContext
from intentd.generated.v1 import intent_pb2, runtime_pb2
from tests.unit.test_agent_unit import TYPE, FakeSidecar, assignment, make_agent, running, serving, steps_of

RECORDED = 4


class PagingSidecar(FakeSidecar):
    """Knows four recorded steps; the assignments it pushes carry the first two."""

    def __init__(self) -> None:
        super().__init__()
        self.begun: list[runtime_pb2.BeginStepRequest] = []
        self.names = {i: f"s{i}" for i in range(1, RECORDED + 1)}

    async def BeginStep(self, request: Any, context: Any) -> Any:
        self.begun.append(request)
        await self._note()
        if request.index > RECORDED:
            return runtime_pb2.BeginStepResponse(recorded=False)
        return runtime_pb2.BeginStepResponse(recorded=True, step=intent_pb2.StepRecord(
            index=request.index, name=self.names[request.index], result=json.dumps(request.index * 10).encode()))


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[PagingSidecar, str]]:
    fake = PagingSidecar()
    async with serving(fake) as address:
        yield fake, address


def first_page(intent_id: str) -> runtime_pb2.AttachResponse:
    message = assignment(intent_id, {}, attempt=2, steps=[("s1", 10), ("s2", 20)])
    message.assignment.recorded_steps = RECORDED
    return message


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_steps_past_the_first_page_are_fetched_and_replayed_not_run(
        sidecar: tuple[PagingSidecar, str], kind: str) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[int] = []
    seen: dict[str, Any] = {}

    def work(index: int) -> int:
        ran.append(index)
        return index * 100

    if kind == "async":
        @agent.handler(TYPE)
        async def handle(ctx: Context, payload: Any) -> Any:
            values = [await ctx.step(f"s{i}", work, i) for i in range(1, 6)]
            seen["replayed"] = ctx.replayed_steps
            seen["kept"] = sorted(ctx._attempt.records)
            return values
    else:
        @agent.handler(TYPE)
        def handle(ctx: SyncContext, payload: Any) -> Any:
            values = [ctx.step(f"s{i}", work, i) for i in range(1, 6)]
            seen["replayed"] = ctx.replayed_steps
            seen["kept"] = sorted(ctx._attempt.records)
            return values

    async with running(agent, fake):
        assert fake.hellos[0].fetches_steps
        fake.push(first_page("p1"))
        await fake.wait_for(lambda: fake.final("p1"))
    method, request = fake.final("p1")  # type: ignore[misc]
    assert method == "CompleteIntent", request
    assert json.loads(request.complete.result) == [10, 20, 30, 40, 500]
    assert ran == [5] and seen == {"replayed": 4, "kept": []}
    # Asked for 3 and 4 (not in the assignment), name-blind; never for 5 (past the count).
    assert [(b.index, b.any_name) for b in fake.begun] == [(3, True), (4, True)]
    assert steps_of(fake, "p1") == [(5, "s5", 500)]


async def test_a_fetched_step_under_another_name_is_a_divergence(sidecar: tuple[PagingSidecar, str]) -> None:
    fake, address = sidecar
    fake.names[3] = "renamed"
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        return [await ctx.step(f"s{i}", lambda: 0) for i in range(1, 6)]

    async with running(agent, fake):
        fake.push(first_page("d1"))
        await fake.wait_for(lambda: fake.final("d1"))
    method, request = fake.final("d1")  # type: ignore[misc]
    assert method == "FailIntent" and request.fail.code == "STEP_DIVERGENCE" and not request.fail.retryable
    assert "'renamed'" in request.fail.message and steps_of(fake, "d1") == []
