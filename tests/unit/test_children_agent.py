"""Child intents in the agent SDK (agent/children.py) against a scripted fake
sidecar (test_waits_agent's, taking ``start_children`` on the Attach stream
as the real sidecar does): the encoding of starts and AGENT waits, the
decoding of every record shape, replays (same children, nothing started
again), ChildFailed / ChildResultsTooLarge / WaitTimedOut, divergence,
argument checks and positions taken at call time."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest

from intentd.agent import (
    PARKED,
    ChildCall,
    ChildFailed,
    ChildHandle,
    ChildResultsTooLarge,
    Context,
    LeaseLost,
    NonRetryableError,
    SyncChildHandle,
    SyncContext,
    WaitTimedOut,
    WriteError,
)
from intentd.agent import children as agent_children
from intentd.agent.attempt import Attempt
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, intent_pb2, runtime_pb2
from tests.unit.test_agent_unit import FAST, TYPE, assignment, finished, make_agent, running, serving, steps_of
from tests.unit.test_waits_agent import WaitingSidecar, final_of, resolved, waits_of

WORKER = "agent://acme/prod/worker"
REVIEWER = "agent://acme/prod/reviewer"
WORK = "intent.work.do.v1"
REVIEW = "intent.work.review.v1"


def child_id(parent: str, index: int, n: int) -> str:
    return f"{parent}.{index}.{n}"


def start_record(parent: str, index: int, children: list[tuple[str, str]]) -> dict[str, Any]:
    return {"children": [{"id": child_id(parent, index, n), "to_agent": a, "intent_type": t}
                         for n, (a, t) in enumerate(children)]}


def ended(cid: str, state: str = "COMPLETED", result: Any = None, code: str = "", message: str = "") -> dict[str, Any]:
    return {"id": cid, "state": state, "result": result,
            "error": {"code": code, "message": message} if state != "COMPLETED" else None}


class FamilySidecar(WaitingSidecar):
    """Takes starts of child intents on the stream: each is answered with a
    record naming children ``<parent>.<index>.<n>``, the first record again
    for a repeat (as the control plane does). Waits as ``WaitingSidecar``."""

    def __init__(self) -> None:
        super().__init__(stream=True)
        self.starts: dict[tuple[str, int], intent_pb2.StepRecord] = {}
        # Starts committed whose answer is then lost (UNAVAILABLE).
        self.lose_answers = 0

    async def _take(self, queue: asyncio.Queue[runtime_pb2.AttachResponse | None],
                    req: runtime_pb2.AttachRequest) -> None:
        if req.WhichOneof("msg") != "write" or req.write.write.WhichOneof("op") != "start_children":
            await super()._take(queue, req)
            return
        write = req.write.write
        self.writes.append(("StartChildren", write))
        self.log.append(("StartChildren", write.lease.intent_id))
        start = write.start_children
        key = (write.lease.intent_id, start.index)
        if key not in self.starts:
            record = start_record(write.lease.intent_id, start.index,
                                  [(c.to_agent, c.intent_type) for c in start.children])
            self.starts[key] = intent_pb2.StepRecord(index=start.index, name=start.step_name,
                                                     result=json.dumps(record).encode(), attempt=write.lease.attempt)
        result = agent_service_pb2.WriteResult(request_id=req.write.request_id, step=self.starts[key])
        if self.lose_answers:
            self.lose_answers -= 1
            result = agent_service_pb2.WriteResult(request_id=req.write.request_id, code=14, message="lost")
        queue.put_nowait(runtime_pb2.AttachResponse(write_result=result))
        await self._note()


@pytest.fixture
async def family() -> Any:
    fake = FamilySidecar()
    async with serving(fake) as address:
        yield fake, address


def starts_of(fake: WaitingSidecar, intent_id: str) -> list[delivery_pb2.StartChildrenWrite]:
    return [w.start_children for w in fake.ops(intent_id, "StartChildren")]


def gather_of(parent: str, index: int, results: list[Any]) -> dict[str, Any]:
    return {"children": [ended(child_id(parent, index, n), result=r) for n, r in enumerate(results)]}


# -- a fresh run -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_start_many_then_gather_starts_once_and_returns_results_in_order(family: Any, kind: str) -> None:
    fake, address = family
    agent = make_agent(address)
    deadline = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    calls = [
        ChildCall(WORKER, WORK, {"n": 0}, deadline=deadline, max_attempts=2, labels={"team": "a"}),
        ChildCall(WORKER, WORK, {"n": 1}),
        ChildCall(REVIEWER, REVIEW, None, detached=True),
    ]
    seen: dict[str, Any] = {}

    if kind == "async":
        @agent.handler(TYPE)
        async def run(ctx: Context, payload: Any) -> Any:
            handles = await ctx.start_many(calls)
            seen["handles"] = handles
            return await ctx.gather(*handles)
    else:
        @agent.handler(TYPE)
        def run_sync(ctx: SyncContext, payload: Any) -> Any:
            handles = ctx.start_many(calls)
            seen["handles"] = handles
            return ctx.gather(*handles)

    fake.outcomes["@gather"] = [resolved(2, "@gather", gather_of("p1", 1, ["r0", {"r": 1}, None]))]
    async with running(agent, fake):
        fake.push(assignment("p1", {}))
        await fake.wait_for(lambda: fake.final("p1"))

    (start,) = starts_of(fake, "p1")
    assert (start.index, start.step_name) == (1, f"@start:{WORK}")
    first, second, third = start.children
    assert (first.to_agent, first.intent_type, json.loads(first.payload)) == (WORKER, WORK, {"n": 0})
    assert first.deadline.ToDatetime(tzinfo=UTC) == deadline
    assert (first.max_attempts, dict(first.labels), first.detached) == (2, {"team": "a"}, False)
    assert not second.HasField("deadline") and second.max_attempts == 0 and not second.labels
    assert (third.to_agent, third.intent_type, third.payload, third.detached) == (REVIEWER, REVIEW, b"null", True)
    (wait,) = waits_of(fake, "p1")
    assert (wait.index, wait.step_name, wait.kind, wait.timeout_ms) == (2, "@gather", intent_pb2.WAIT_KIND_AGENT, 0)
    assert list(wait.children.intent_ids) == [child_id("p1", 1, n) for n in range(3)]
    assert wait.children.mode == delivery_pb2.CHILD_WAIT_MODE_ALL
    handles = seen["handles"]
    assert [(h.id, h.to_agent, h.intent_type, h.position) for h in handles] == [
        (child_id("p1", 1, 0), WORKER, WORK, 1), (child_id("p1", 1, 1), WORKER, WORK, 1),
        (child_id("p1", 1, 2), REVIEWER, REVIEW, 1)]
    assert all(type(h) is (ChildHandle if kind == "async" else SyncChildHandle) for h in handles)
    method, req = final_of(fake, "p1")
    assert method == "CompleteIntent" and json.loads(req.complete.result) == ["r0", {"r": 1}, None]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_call_takes_two_positions_and_returns_the_child_result(family: Any, kind: str) -> None:
    fake, address = family
    agent = make_agent(address)

    if kind == "async":
        @agent.handler(TYPE)
        async def run(ctx: Context, payload: Any) -> Any:
            before = await ctx.step("before", lambda: 1)
            return [before, await ctx.call(WORKER, WORK, {"x": 1}, deadline=timedelta(minutes=5)),
                    await ctx.step("after", lambda: 3)]
    else:
        @agent.handler(TYPE)
        def run_sync(ctx: SyncContext, payload: Any) -> Any:
            before = ctx.step("before", lambda: 1)
            return [before, ctx.call(WORKER, WORK, {"x": 1}, deadline=timedelta(minutes=5)),
                    ctx.step("after", lambda: 3)]

    fake.outcomes["@gather"] = [resolved(3, "@gather", {"children": [ended(child_id("c1", 2, 0), result=2)]})]
    sent = datetime.now(UTC)
    async with running(agent, fake):
        fake.push(assignment("c1", {}))
        await fake.wait_for(lambda: fake.final("c1"))

    (start,) = starts_of(fake, "c1")
    assert start.index == 2 and len(start.children) == 1
    child_deadline = start.children[0].deadline.ToDatetime(tzinfo=UTC)
    assert sent + timedelta(minutes=4) < child_deadline < sent + timedelta(minutes=6)
    (wait,) = waits_of(fake, "c1")
    assert wait.index == 3 and list(wait.children.intent_ids) == [child_id("c1", 2, 0)]
    assert steps_of(fake, "c1") == [(1, "before", 1), (4, "after", 3)]
    assert json.loads(final_of(fake, "c1")[1].complete.result) == [1, 2, 3]


# -- replays -----------------------------------------------------------------------------


async def test_a_replay_rebuilds_the_handles_from_the_start_record_and_starts_nothing(family: Any) -> None:
    fake, address = family
    agent = make_agent(address)
    seen: list[Any] = []

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        first = await ctx.start(WORKER, WORK, {"n": 0})
        second = await ctx.start(REVIEWER, REVIEW)
        seen.extend([first, second])
        return await ctx.gather(first, second)

    records = [(f"@start:{WORK}", start_record("r1", 1, [(WORKER, WORK)])),
               (f"@start:{REVIEW}", start_record("r1", 2, [(REVIEWER, REVIEW)]))]
    async with running(agent, fake):
        # Attempt 2 replays both starts and parks on the gather: its ids come from the records.
        fake.push(assignment("r1", {}, attempt=2, steps=records))
        await fake.wait_for(lambda: waits_of(fake, "r1"))
        # Attempt 3 replays all three.
        gathered = {"children": [ended(child_id("r1", 1, 0), result="a"), ended(child_id("r1", 2, 0), result="b")]}
        fake.push(assignment("r1", {}, attempt=3, steps=[*records, ("@gather", gathered)]))
        await fake.wait_for(lambda: fake.final("r1"))

    assert starts_of(fake, "r1") == []
    (wait,) = waits_of(fake, "r1")
    assert wait.index == 3 and list(wait.children.intent_ids) == [child_id("r1", 1, 0), child_id("r1", 2, 0)]
    # The same handles in both attempts.
    assert seen[:2] == seen[2:] and [h.id for h in seen[:2]] == [child_id("r1", 1, 0), child_id("r1", 2, 0)]
    assert json.loads(final_of(fake, "r1")[1].complete.result) == ["a", "b"]


async def test_a_parked_gather_ends_the_attempt(family: Any) -> None:
    fake, address = family
    agent = make_agent(address)
    stopped: list[BaseException] = []
    contexts: list[Context] = []

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        contexts.append(ctx)
        child = await ctx.start(WORKER, WORK)
        try:
            return await child.result()
        except (LeaseLost, asyncio.CancelledError) as exc:
            # LeaseLost when the handler reads the parked answer itself, a
            # cancel when the session got it first and ended the task.
            stopped.append(exc)
            raise

    async with running(agent, fake):
        fake.push(assignment("k1", {}))
        await fake.wait_for(lambda: waits_of(fake, "k1"))
        await finished(contexts[0])
    assert len(stopped) == 1 and contexts[0].cancel_reason == PARKED
    assert not isinstance(stopped[0], LeaseLost) or stopped[0].reason == PARKED
    assert fake.final("k1") is None  # nothing reported after parking


async def test_a_start_whose_answer_was_lost_is_sent_again_and_gets_the_same_children(family: Any) -> None:
    fake, address = family
    fake.lose_answers = 1
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        handle = await ctx.start(WORKER, WORK)
        return handle.id

    async with running(agent, fake):
        fake.push(assignment("d1", {}))
        await fake.wait_for(lambda: fake.final("d1"))
    assert json.loads(final_of(fake, "d1")[1].complete.result) == child_id("d1", 1, 0)
    first, again = starts_of(fake, "d1")
    assert first == again


# -- outcomes ----------------------------------------------------------------------------


async def test_a_failed_child_raises_child_failed_or_is_returned(family: Any) -> None:
    fake, address = family
    agent = make_agent(address)
    caught: list[Any] = []

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        handles = await ctx.start_many([ChildCall(WORKER, WORK, n) for n in range(3)])
        values = await ctx.gather(*handles, return_exceptions=True)
        caught.append(values)
        return await ctx.gather(*handles)  # raises the first failure in argument order

    outcome = {"children": [
        ended(child_id("f1", 1, 0), result=0),
        ended(child_id("f1", 1, 1), "CANCELED", code="CANCELED", message="parent said so"),
        ended(child_id("f1", 1, 2), "FAILED", code="ATTEMPTS_EXHAUSTED", message="boom"),
    ]}
    fake.outcomes["@gather"] = [resolved(2, "@gather", outcome), resolved(3, "@gather", outcome)]
    async with running(agent, fake):
        fake.push(assignment("f1", {}))
        await fake.wait_for(lambda: fake.final("f1"))

    (values,) = caught
    assert values[0] == 0
    canceled, failed = values[1], values[2]
    assert isinstance(canceled, ChildFailed) and isinstance(failed, ChildFailed)
    assert (canceled.child_id, canceled.state, canceled.code, canceled.message) == (
        child_id("f1", 1, 1), "CANCELED", "CANCELED", "parent said so")
    assert (failed.state, failed.code, failed.to_agent, failed.intent_type) == (
        "FAILED", "ATTEMPTS_EXHAUSTED", WORKER, WORK)
    method, req = final_of(fake, "f1")
    assert method == "FailIntent" and req.fail.code == "CHILD_FAILED" and not req.fail.retryable
    assert child_id("f1", 1, 1) in req.fail.message and "CANCELED" in req.fail.message


async def test_first_returns_the_winner_and_raises_when_it_failed(family: Any) -> None:
    fake, address = family
    agent = make_agent(address)
    seen: list[Any] = []

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        a = await ctx.start(WORKER, WORK, "a")
        b = await ctx.start(REVIEWER, REVIEW, "b")
        winner, value = await ctx.first(a, b, timeout=30)
        seen.append(winner is b)
        try:
            await ctx.first(a, b)
        except ChildFailed as exc:
            seen.append(exc.child_id)
        return value

    a_id, b_id = child_id("w1", 1, 0), child_id("w1", 2, 0)
    fake.outcomes["@first"] = [
        resolved(3, "@first", {"children": [ended(b_id, result="B")], "first": b_id}),
        resolved(4, "@first", {"children": [ended(a_id, "TIMED_OUT", code="DEADLINE_EXCEEDED"),
                                            ended(b_id, result="B")], "first": a_id}),
    ]
    async with running(agent, fake):
        fake.push(assignment("w1", {}))
        await fake.wait_for(lambda: fake.final("w1"))

    first, second = waits_of(fake, "w1")
    assert (first.step_name, first.children.mode, first.timeout_ms) == ("@first", delivery_pb2.CHILD_WAIT_MODE_FIRST,
                                                                        30_000)
    assert list(first.children.intent_ids) == [a_id, b_id] and second.timeout_ms == 0
    assert seen == [True, a_id]
    assert json.loads(final_of(fake, "w1")[1].complete.result) == "B"


@pytest.mark.parametrize(("record", "code"), [
    ({"timed_out": True}, "WAIT_TIMED_OUT"),
    ({"children": [{"id": "x", "state": "COMPLETED", "result": None, "error": None}], "results_omitted": True},
     "CHILD_RESULTS_TOO_LARGE"),
])
async def test_timeouts_and_omitted_results_fail_the_intent_for_good(family: Any, record: Any, code: str) -> None:
    fake, address = family
    agent = make_agent(address)
    raised: list[BaseException] = []

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        child = await ctx.start(WORKER, WORK)
        try:
            return await ctx.gather(child, timeout=1)
        except (WaitTimedOut, ChildResultsTooLarge) as exc:
            raised.append(exc)
            raise

    async with running(agent, fake):
        fake.push(assignment("t1", {}, attempt=2, steps=[
            (f"@start:{WORK}", start_record("t1", 1, [(WORKER, WORK)])), ("@gather", record)]))
        await fake.wait_for(lambda: fake.final("t1"))
    (exc,) = raised
    if isinstance(exc, WaitTimedOut):
        assert (exc.kind, exc.name, exc.index) == ("AGENT", "gather", 2)
        assert "child intents" in str(exc)
    else:
        assert isinstance(exc, ChildResultsTooLarge) and exc.index == 2 and "fewer" in str(exc)
    method, req = final_of(fake, "t1")
    assert method == "FailIntent" and req.fail.code == code and not req.fail.retryable


# -- divergence and bad records -------------------------------------------------------


@pytest.mark.parametrize(("steps", "code"), [
    # Another step at the start's position.
    ([("extract", 1)], "STEP_DIVERGENCE"),
    # A start of other children under the same name.
    ([(f"@start:{WORK}", start_record("v1", 1, [(WORKER, WORK), (WORKER, WORK)]))], "STEP_DIVERGENCE"),
    ([(f"@start:{WORK}", start_record("v1", 1, [(REVIEWER, WORK)]))], "STEP_DIVERGENCE"),
    ([(f"@start:{WORK}", {"children": []})], "CHILD_RECORD_INVALID"),
    ([(f"@start:{WORK}", start_record("v1", 1, [(WORKER, WORK)])), ("@gather", {"children": []})],
     "WAIT_RECORD_INVALID"),
    ([(f"@start:{WORK}", start_record("v1", 1, [(WORKER, WORK)])), ("@first", {"children": []})],
     "STEP_DIVERGENCE"),
])
async def test_a_start_or_wait_that_does_not_match_its_record_fails_for_good(
        family: Any, steps: list[tuple[str, Any]], code: str) -> None:
    fake, address = family
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def run(ctx: Context, payload: Any) -> Any:
        return await ctx.call(WORKER, WORK)

    async with running(agent, fake):
        fake.push(assignment("v1", {}, attempt=2, steps=steps))
        await fake.wait_for(lambda: fake.final("v1"))
    method, req = final_of(fake, "v1")
    assert method == "FailIntent" and req.fail.code == code and not req.fail.retryable, req.fail
    assert starts_of(fake, "v1") == [] and waits_of(fake, "v1") == []


async def test_a_sidecar_without_stream_writes_refuses_starts() -> None:
    fake = WaitingSidecar(stream=False)
    async with serving(fake) as address:
        agent = make_agent(address)
        caught: list[WriteError] = []

        @agent.handler(TYPE)
        async def run(ctx: Context, payload: Any) -> Any:
            try:
                return await ctx.start(WORKER, WORK)
            except WriteError as exc:
                caught.append(exc)
                raise

        async with running(agent, fake):
            fake.push(assignment("u1", {}))
            await fake.wait_for(lambda: fake.final("u1"))
    (exc,) = caught
    assert (exc.method, exc.code) == ("StartChildren", "UNIMPLEMENTED") and "upgrade the sidecar" in exc.details


# -- the pieces, without a sidecar ------------------------------------------------------


@pytest.fixture
async def attempt() -> Attempt:
    msg = assignment("a1", {}).assignment
    return Attempt(msg, cast(Any, None), loop=asyncio.get_running_loop(), write_backoff=FAST, write_timeout=1.0)


def handle(attempt: Attempt, cid: str, cls: type[ChildHandle] = ChildHandle) -> ChildHandle:
    return cls(cid, WORKER, WORK, 1, attempt)


async def test_positions_are_taken_when_called_not_when_awaited(attempt: Attempt) -> None:
    ctx = Context(attempt)
    starting = ctx.start(WORKER, WORK)
    assert attempt._next_position == 2 and attempt._open[1].name == f"@start:{WORK}"
    starting.close()  # never awaited: the plan stays open (the engine's rule for unawaited steps decides)
    attempt._open[1].close()
    gathering = ctx.gather(handle(attempt, "c"))
    assert attempt._open[1].name == "@gather"
    gathering.close()
    attempt._open[1].close()
    result = handle(attempt, "c").result()
    assert attempt._open[1].name == "@gather"
    result.close()


@pytest.mark.parametrize(("call", "error", "text"), [
    (ChildCall("agent://Acme/x", WORK), ValueError, "to_agent"),
    (ChildCall(WORKER, "Work"), ValueError, "intent_type"),
    (ChildCall(cast(Any, 7), WORK), TypeError, "to_agent"),
    (ChildCall(WORKER, WORK, {1j}), TypeError, "payload"),
    (ChildCall(WORKER, WORK, float("nan")), TypeError, "payload"),
    (ChildCall(WORKER, WORK, "\x00"), TypeError, "NUL"),
    (ChildCall(WORKER, WORK, deadline=datetime(2030, 1, 1)), ValueError, "aware"),
    (ChildCall(WORKER, WORK, deadline=timedelta(0)), ValueError, "positive"),
    (ChildCall(WORKER, WORK, deadline=timedelta(days=40000)), ValueError, "100 years"),
    (ChildCall(WORKER, WORK, deadline=cast(Any, 5)), TypeError, "deadline"),
    (ChildCall(WORKER, WORK, max_attempts=0), ValueError, "max_attempts"),
    (ChildCall(WORKER, WORK, max_attempts=cast(Any, True)), ValueError, "max_attempts"),
    (ChildCall(WORKER, WORK, labels={"bad key": "v"}), ValueError, "label"),
    (ChildCall(WORKER, WORK, labels=cast(Any, {"k": 1})), TypeError, "labels"),
    (ChildCall(WORKER, WORK, labels=cast(Any, ["k"])), TypeError, "labels"),
    (ChildCall(WORKER, WORK, detached=cast(Any, "yes")), TypeError, "detached"),
])
async def test_bad_children_are_refused_before_a_position_is_taken(
        attempt: Attempt, call: ChildCall, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        Context(attempt).start_many([call])
    assert attempt._next_position == 1 and not attempt._open


@pytest.mark.parametrize(("calls", "text"), [
    ([], "1 to 1000"),
    ([ChildCall(WORKER, WORK)] * 1001, "1 to 1000"),
    (ChildCall(WORKER, WORK), "list of ChildCall"),
    ([{"to_agent": WORKER}], "ChildCall"),
    ([ChildCall(WORKER, WORK, "x" * (40 * 1024 * 1024)), ChildCall(WORKER, WORK, "y" * (40 * 1024 * 1024))],
     "several calls"),
])
async def test_bad_starts_are_refused(attempt: Attempt, calls: Any, text: str) -> None:
    with pytest.raises((TypeError, ValueError), match=text):
        agent_children.Starting(attempt, calls, ChildHandle)
    assert attempt._next_position == 1


async def test_bad_waits_are_refused(attempt: Attempt) -> None:
    ctx = Context(attempt)
    other = Attempt(assignment("other", {}).assignment, cast(Any, None), loop=asyncio.get_running_loop(),
                    write_backoff=FAST, write_timeout=1.0)
    with pytest.raises(ValueError, match="1 to 1000"):
        ctx.gather()
    with pytest.raises(ValueError, match="1 to 1000"):
        ctx.first(*[handle(attempt, str(n)) for n in range(1001)])
    with pytest.raises(TypeError, match="ChildHandle"):
        ctx.gather(cast(Any, "c1"))
    with pytest.raises(ValueError, match="not of this intent"):
        ctx.gather(handle(other, "c1"))
    with pytest.raises(ValueError, match="timeout"):
        ctx.gather(handle(attempt, "c1"), timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        ctx.first(handle(attempt, "c1"), timeout=float("inf"))
    assert attempt._next_position == 1 and not attempt._open


def test_the_start_name_is_cut_to_the_step_name_limit() -> None:
    long_type = "a." + "b" * 190 + ".v1"
    name = agent_children.start_name(long_type)
    assert name.startswith("@start:a.bbb") and len(name) == 200


def test_a_handle_given_twice_is_waited_for_once() -> None:
    call = agent_children.child_wait("@gather", [cast(Any, h) for h in (
        ChildHandle("a", WORKER, WORK, 1, cast(Any, None)), ChildHandle("b", WORKER, WORK, 1, cast(Any, None)),
        ChildHandle("a", WORKER, WORK, 1, cast(Any, None)))], timeout=0)
    assert list(call.write.children.intent_ids) == ["a", "b"] and call.write.timeout_ms == 1


def test_handles_compare_by_their_fields() -> None:
    a = ChildHandle("a", WORKER, WORK, 1, cast(Any, object()))
    assert a == ChildHandle("a", WORKER, WORK, 1, cast(Any, object()))
    assert "attempt" not in repr(a)


def wait_call(name: str, ids: list[str]) -> agent_children.ChildWaitCall:
    return agent_children.child_wait(name, [ChildHandle(i, WORKER, WORK, 1, cast(Any, None)) for i in ids], None)


def test_every_wait_record_shape_decodes() -> None:
    gather = wait_call("@gather", ["a", "b"])
    outcomes = gather.value({"children": [ended("a", result={"x": 1}),
                                          ended("b", "FAILED", code="C", message="m")]}, 4)
    assert outcomes == {"a": agent_children.ChildOutcome("a", "COMPLETED", {"x": 1}, "", ""),
                        "b": agent_children.ChildOutcome("b", "FAILED", None, "C", "m")}
    first = wait_call("@first", ["a", "b"])
    assert first.value({"children": [ended("b", "CANCELED")], "first": "b"}, 4) == {
        "b": agent_children.ChildOutcome("b", "CANCELED", None, "", "")}
    # Both ended by the time the record was made: the winner only.
    assert list(first.value({"children": [ended("a"), ended("b")], "first": "a"}, 4)) == ["a"]
    with pytest.raises(WaitTimedOut) as timed_out:
        first.value({"timed_out": True}, 4)
    assert (timed_out.value.kind, timed_out.value.name, timed_out.value.index) == ("AGENT", "first", 4)
    with pytest.raises(ChildResultsTooLarge) as too_large:
        gather.value({"children": [ended("a"), ended("b")], "results_omitted": True}, 4)
    assert too_large.value.code == "CHILD_RESULTS_TOO_LARGE" and too_large.value.children == 2


@pytest.mark.parametrize(("name", "record"), [
    ("@gather", None),
    ("@gather", {"children": "a"}),
    ("@gather", {"children": [ended("a")]}),  # b missing
    ("@gather", {"children": [ended("a"), ended("b"), ended("c")]}),  # c not waited for
    ("@gather", {"children": [ended("a"), {"id": "b", "state": "RUNNING"}]}),
    ("@gather", {"children": [ended("a"), {"state": "COMPLETED"}]}),
    ("@first", {"children": [ended("a")]}),  # no winner
    ("@first", {"children": [ended("a")], "first": "b"}),
    ("@first", {"children": [ended("c")], "first": "c"}),
])
def test_bad_wait_records_fail_for_good(name: str, record: Any) -> None:
    with pytest.raises(NonRetryableError) as exc:
        wait_call(name, ["a", "b"]).value(record, 7)
    assert exc.value.code == "WAIT_RECORD_INVALID" and "wait 7" in exc.value.message


def test_child_failed_says_what_failed() -> None:
    exc = ChildFailed("c1", "FAILED", "ATTEMPTS_EXHAUSTED", "3 attempts", to_agent=WORKER, intent_type=WORK)
    assert str(exc) == f"child intent c1 ({WORK} at {WORKER}) ended FAILED: ATTEMPTS_EXHAUSTED: 3 attempts"
    assert str(ChildFailed("c2", "CANCELED")) == "child intent c2 ended CANCELED"


def test_child_spec_encodes_every_field() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    spec = agent_children.child_spec(ChildCall(
        WORKER, WORK, {"a": [1, "é"]}, deadline=datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=1))),
        max_attempts=5, labels={"k": "v"}, detached=True), now=now)
    assert spec == delivery_pb2.ChildSpec(to_agent=WORKER, intent_type=WORK, payload='{"a":[1,"é"]}'.encode(),
                                          max_attempts=5, labels={"k": "v"}, detached=True,
                                          deadline=spec.deadline)
    assert spec.deadline.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 1, 1, tzinfo=UTC)
    relative = agent_children.child_spec(ChildCall(WORKER, WORK, deadline=timedelta(hours=2)), now=now)
    assert relative.deadline.ToDatetime(tzinfo=UTC) == now + timedelta(hours=2)
