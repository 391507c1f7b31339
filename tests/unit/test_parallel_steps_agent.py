"""Parallel steps in the agent SDK's attempt engine, against the fake
sidecars of test_agent_unit / test_waits_agent: positions by call order,
the bound on running step functions (measured with events), the hand-back
rule, replay with holes, nested steps refused, waits beside steps, and
SyncContext.parallel."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from intentd.agent import Agent, Context, SyncContext
from intentd.agent.attempt import MAX_STEPS_IN_FLIGHT, MAX_STEPS_IN_FLIGHT_LIMIT
from intentd.generated.v1 import intent_pb2, runtime_pb2
from tests.unit.test_agent_unit import (
    AGENT,
    FAST,
    TYPE,
    WAIT,
    FakeSidecar,
    assignment,
    make_agent,
    running,
    serving,
    steps_of,
)
from tests.unit.test_waits_agent import FIRED, WaitingSidecar, resolved, waits_of


class RecordsSidecar(FakeSidecar):
    """Answers BeginStep from ``records`` (by position; absent: not recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, tuple[str, Any]] = {}
        self.begun: list[int] = []

    async def BeginStep(self, request: Any, context: Any) -> Any:
        self.begun.append(request.index)
        await self._note()
        if request.index not in self.records:
            return runtime_pb2.BeginStepResponse(recorded=False)
        name, value = self.records[request.index]
        return runtime_pb2.BeginStepResponse(recorded=True, step=intent_pb2.StepRecord(
            index=request.index, name=name, result=json.dumps(value).encode(), attempt=1))


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[RecordsSidecar, str]]:
    fake = RecordsSidecar()
    async with serving(fake) as address:
        yield fake, address


def final(fake: FakeSidecar, intent_id: str) -> tuple[str, Any]:
    outcome = fake.final(intent_id)
    assert outcome is not None
    return outcome


def holed(intent_id: str, page: list[tuple[int, str, Any]], recorded_steps: int,
          attempt: int = 2) -> runtime_pb2.AttachResponse:
    """An assignment whose first page has ``page`` (position, name, value)."""
    message = assignment(intent_id, {}, attempt=attempt)
    message.assignment.steps.extend(
        intent_pb2.StepRecord(index=i, name=n, result=json.dumps(v).encode(), attempt=1) for i, n, v in page)
    message.assignment.recorded_steps = recorded_steps
    return message


# -- positions ------------------------------------------------------------------------


async def test_positions_follow_call_order_whatever_finishes_first(sidecar: tuple[RecordsSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[str] = []

    def recorded(name: str) -> bool:
        return any(n == name for _, n, _ in steps_of(fake, "o1"))

    async def work(i: int, after: str | None) -> int:
        ran.append(f"s{i}")
        # Each waits until the one called after it is recorded: they are
        # recorded last to first.
        if after is not None:
            await fake.wait_for(lambda: recorded(after))
        return i

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        first = await asyncio.gather(ctx.step("a", work, 8, "b"), ctx.step("b", work, 9, None))
        ten = await asyncio.gather(*(ctx.step(f"s{i}", work, i, f"s{i + 1}" if i < 9 else None) for i in range(10)))
        return [first, ten]

    async with running(agent, fake):
        fake.push(assignment("o1", {}))
        await fake.wait_for(lambda: fake.final("o1"))
        method, request = final(fake, "o1")
        assert method == "CompleteIntent" and json.loads(request.complete.result) == [[8, 9], list(range(10))]
        recorded = steps_of(fake, "o1")
        # Recorded as they finished (b before a, s9 first), each at its call's position.
        assert [i for i, _, _ in recorded] == [2, 1, *range(12, 2, -1)]
        assert sorted((i, n) for i, n, _ in recorded) == [(1, "a"), (2, "b"), *((i + 3, f"s{i}") for i in range(10))]

        # The next attempt replays every one of them, not one function runs.
        ran.clear()
        page = [(i, n, v) for i, n, v in sorted(recorded)]
        fake.push(holed("o1", page, 12, attempt=2))
        await fake.wait_for(lambda: len([w for w in fake.writes if w[0] == "CompleteIntent"]) == 2)
    assert ran == [] and fake.begun == []


async def test_the_bound_holds_step_functions_not_positions(sidecar: tuple[RecordsSidecar, str]) -> None:
    fake, address = sidecar
    agent = Agent(AGENT, sidecar=address, reconnect_backoff=FAST, write_backoff=FAST, write_timeout=WAIT,
                  max_steps_in_flight=3)
    seen: dict[str, Any] = {"running": 0, "peak": 0, "started": []}

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        release = asyncio.Event()
        three = asyncio.Event()

        async def work(i: int) -> int:
            seen["running"] += 1
            seen["peak"] = max(seen["peak"], seen["running"])
            seen["started"].append(i)
            if len(seen["started"]) == 3:
                three.set()
            await release.wait()
            seen["running"] -= 1
            return i

        steps = asyncio.gather(*(ctx.step(f"s{i}", work, i) for i in range(10)))
        await three.wait()
        # Without the bound all ten would have started in the same pass of the loop.
        seen["at_three"] = list(seen["started"])
        release.set()
        return await steps

    async with running(agent, fake):
        fake.push(assignment("b1", {}))
        await fake.wait_for(lambda: fake.final("b1"))
    assert json.loads(final(fake, "b1")[1].complete.result) == list(range(10))
    assert seen["peak"] == 3 and seen["at_three"] == [0, 1, 2]
    # Waiting for a slot kept the positions taken at the call.
    assert sorted((i, n) for i, n, _ in steps_of(fake, "b1")) == [(i + 1, f"s{i}") for i in range(10)]


def test_the_bound_is_checked() -> None:
    assert MAX_STEPS_IN_FLIGHT == 16
    assert Agent(AGENT).max_steps_in_flight == 16
    assert Agent(AGENT, max_steps_in_flight=MAX_STEPS_IN_FLIGHT_LIMIT).max_steps_in_flight == 256
    for bad in (0, 257, True, 2.0):
        with pytest.raises(ValueError, match="max_steps_in_flight"):
            Agent(AGENT, max_steps_in_flight=bad)  # type: ignore[arg-type]


# -- the hand-back rule ---------------------------------------------------------------------


@pytest.mark.parametrize("first_to_fail", ["a", "b"])
async def test_a_failed_step_hands_its_position_back_only_when_it_ran_alone(
        sidecar: tuple[RecordsSidecar, str], first_to_fail: str) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    tries = {"x": 0}

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        def flaky() -> str:
            tries["x"] += 1
            if tries["x"] < 3:
                raise OSError("try again")
            return "x"

        while True:  # a retry loop: every try at position 1
            try:
                await ctx.step("x", flaky)
                break
            except OSError:
                continue
        # Two concurrent steps that both fail, in the order the test picks:
        # neither position is handed back, so "c" is at 4 whatever the order.
        failed = {"a": asyncio.Event(), "b": asyncio.Event()}
        other = {"a": "b", "b": "a"}

        async def fail(name: str) -> None:
            if name != first_to_fail:
                await failed[other[name]].wait()
            failed[name].set()
            raise OSError(name)

        outcomes = await asyncio.gather(ctx.step("a", fail, "a"), ctx.step("b", fail, "b"), return_exceptions=True)
        assert all(isinstance(o, OSError) for o in outcomes)
        return await ctx.step("c", lambda: "c")

    async with running(agent, fake):
        fake.push(assignment("h1", {}))
        await fake.wait_for(lambda: fake.final("h1"))
    assert final(fake, "h1")[0] == "CompleteIntent"
    assert steps_of(fake, "h1") == [(1, "x", "x"), (4, "c", "c")]


# -- replay with holes ----------------------------------------------------------------------


async def test_holes_are_fetched_and_run_the_rest_replayed(sidecar: tuple[RecordsSidecar, str]) -> None:
    """Attempt 1 recorded a, c, d, e of five concurrent steps and g after
    them (a and c on the assignment's page, d, e and g past it); 2 is a
    hole below the page's end (known without asking), 6 one past the page
    that the sidecar answers "not recorded". The old engine took that answer
    for the end of the history and ran g again."""
    fake, address = sidecar
    fake.records = {4: ("d", "D"), 5: ("e", "E"), 7: ("g", "G")}
    agent = make_agent(address)
    ran: list[str] = []

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        def work(name: str) -> str:
            ran.append(name)
            return name.upper()

        values = await asyncio.gather(*(ctx.step(n, work, n) for n in "abcde"))
        values.append(await ctx.step("f", work, "f"))
        values.append(await ctx.step("g", work, "g"))  # recorded past a hole the replay asked about
        return values

    async with running(agent, fake):
        fake.push(holed("r1", [(1, "a", "A"), (3, "c", "C")], recorded_steps=7))
        await fake.wait_for(lambda: fake.final("r1"))
    method, request = final(fake, "r1")
    assert method == "CompleteIntent" and json.loads(request.complete.result) == list("ABCDEFG")
    assert ran == ["b", "f"]
    # d and e are fetched concurrently (either may ask first), f and g one after another.
    assert sorted(fake.begun[:2]) == [4, 5] and fake.begun[2:] == [6, 7]
    assert steps_of(fake, "r1") == [(2, "b", "B"), (6, "f", "F")]


# -- nesting ----------------------------------------------------------------------------


async def test_nested_steps_are_refused(sidecar: tuple[RecordsSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    refused: list[str] = []

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        async def outer() -> str:
            try:
                await ctx.step("inner", lambda: 1)
            except RuntimeError as exc:
                refused.append(str(exc))
            return "outer"

        def outer_in_a_thread() -> str:
            try:
                ctx.step("inner", lambda: 1).close()
            except RuntimeError as exc:
                refused.append(str(exc))
            return "thread"

        values = [await ctx.step("o1", outer), await ctx.step("o2", outer_in_a_thread)]
        async with ctx.step_scope("scoped") as scope:
            try:
                ctx.sleep(1).close()
            except RuntimeError as exc:
                refused.append(str(exc))
            scope.result = "scoped"
        return [*values, scope.result]

    async with running(agent, fake):
        fake.push(assignment("n1", {}))
        await fake.wait_for(lambda: fake.final("n1"))
    assert json.loads(final(fake, "n1")[1].complete.result) == ["outer", "thread", "scoped"]
    assert len(refused) == 3 and all("cannot nest" in r for r in refused)
    assert refused[0].startswith("step 'inner' was called inside step 1 'o1'")
    assert [(i, n) for i, n, _ in steps_of(fake, "n1")] == [(1, "o1"), (2, "o2"), (3, "scoped")]


# -- waits beside steps ---------------------------------------------------------------------


@pytest.fixture
async def waiting() -> AsyncIterator[tuple[WaitingSidecar, str]]:
    fake = WaitingSidecar(stream=True)
    async with serving(fake) as address:
        yield fake, address


async def test_a_wait_takes_its_position_at_the_call_and_runs_beside_steps(
        waiting: tuple[WaitingSidecar, str]) -> None:
    fake, address = waiting
    fake.outcomes["@sleep"] = [resolved(2, "@sleep", FIRED)]
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        slept = asyncio.Event()

        async def after_the_sleep() -> str:
            await slept.wait()
            return "stepped"

        step = ctx.step("a", after_the_sleep)
        sleeping = ctx.sleep(5)  # position 2, taken now
        values = await asyncio.gather(step, _then(sleeping, slept.set))
        return [values[0], await ctx.step("b", lambda: "b")]

    async with running(agent, fake):
        fake.push(assignment("w1", {}))
        await fake.wait_for(lambda: fake.final("w1"))
    assert json.loads(final(fake, "w1")[1].complete.result) == ["stepped", "b"]
    assert [(w.index, w.step_name) for w in waits_of(fake, "w1")] == [(2, "@sleep")]
    assert steps_of(fake, "w1") == [(1, "a", "stepped"), (3, "b", "b")]


async def _then(awaitable: Any, after: Callable[[], None]) -> Any:
    value = await awaitable
    after()
    return value


# -- SyncContext.parallel ---------------------------------------------------------------


async def test_parallel_in_a_def_handler(sidecar: tuple[RecordsSidecar, str]) -> None:
    fake, address = sidecar
    agent = Agent(AGENT, sidecar=address, reconnect_backoff=FAST, write_backoff=FAST, write_timeout=WAIT,
                  max_steps_in_flight=2)
    lock = threading.Lock()
    seen: dict[str, Any] = {"running": 0, "peak": 0, "threads": set()}
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    two = asyncio.Event()
    raised: list[BaseException] = []

    def work(i: int) -> int:
        with lock:
            seen["running"] += 1
            seen["peak"] = max(seen["peak"], seen["running"])
            seen["threads"].add(threading.get_ident())
            if seen["running"] == 2:
                loop.call_soon_threadsafe(two.set)
        gate.wait(WAIT)
        with lock:
            seen["running"] -= 1
        if i in (3, 1):
            raise ValueError(f"step {i}")
        return i * 10

    async def async_work() -> str:
        return "async"

    @agent.handler(TYPE)
    def handle(ctx: SyncContext, payload: Any) -> Any:
        first = ctx.parallel(("s0", work, 0), ("s2", work, 2), ("co", async_work))
        try:
            ctx.parallel(("t3", work, 3), ("t4", work, 4), ("t1", work, 1))
        except ValueError as exc:
            raised.append(exc)
        return first

    async with running(agent, fake):
        fake.push(assignment("p1", {}))
        await two.wait()
        gate.set()
        await fake.wait_for(lambda: fake.final("p1"))
    assert json.loads(final(fake, "p1")[1].complete.result) == [0, 20, "async"]
    assert seen["peak"] == 2 and threading.get_ident() not in seen["threads"]
    # The first failure in list order (t3), raised after all had finished; t4's record stands.
    assert [str(e) for e in raised] == ["step 3"]
    assert sorted((i, n) for i, n, _ in steps_of(fake, "p1")) == [(1, "s0"), (2, "s2"), (3, "co"), (5, "t4")]


async def test_parallel_replays_and_checks_its_calls(sidecar: tuple[RecordsSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[str] = []
    refused: list[str] = []

    @agent.handler(TYPE)
    def handle(ctx: SyncContext, payload: Any) -> Any:
        for bad in ((), ("x",), ("x", 1), (1, print)):
            try:
                ctx.parallel(bad)  # type: ignore[arg-type]
            except TypeError as exc:
                refused.append(str(exc))
        return ctx.parallel(*((n, lambda n=n: ran.append(n) or n) for n in "abc"))

    async with running(agent, fake):
        fake.push(holed("q1", [(1, "a", "A"), (3, "c", "C")], recorded_steps=3))
        await fake.wait_for(lambda: fake.final("q1"))
    assert json.loads(final(fake, "q1")[1].complete.result) == ["A", "b", "C"]
    assert ran == ["b"] and len(refused) == 4 and all("(name, fn, *args)" in r for r in refused)
    assert steps_of(fake, "q1") == [(2, "b", "b")]
