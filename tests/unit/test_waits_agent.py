"""Durable waits in the agent SDK (docs/waits.md) against a scripted fake
sidecar (test_agent_unit's, with the Wait call and, in ``stream`` mode, the
writes on the Attach stream as the real sidecar takes them): replay of each
record shape, divergence, recorded timeouts, resolved and parked answers,
reserved step names and argument checks."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from intentd.agent import (
    PARKED,
    AgentError,
    Context,
    HumanDecision,
    LeaseLost,
    NonRetryableError,
    SyncContext,
    WaitTimedOut,
)
from intentd.agent import waits as agent_waits
from intentd.core import limits
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, intent_pb2, runtime_pb2
from tests.unit.test_agent_unit import TYPE, WAIT, FakeSidecar, assignment, make_agent, running, serving, steps_of

SIGNAL = {"signal": {"id": "sig-1", "name": "go", "payload": {"x": 1}, "sender": "k", "time": "2026-01-02T03:04:05Z"}}
FIRED = {"fired": "2026-01-02T03:04:05Z"}
DECISION = {"decision": {"task_id": "t1", "outcome": "approve", "decided_by": "alice",
                         "decide_time": "2026-01-02T03:04:05.250Z", "comment": "ok", "form_data": {"n": 2}}}
TIMED_OUT = {"timed_out": True}


def parked() -> delivery_pb2.WaitOutcome:
    return delivery_pb2.WaitOutcome(parked=True)


def resolved(index: int, name: str, value: Any) -> delivery_pb2.WaitOutcome:
    return delivery_pb2.WaitOutcome(step=intent_pb2.StepRecord(
        index=index, name=name, result=json.dumps(value).encode(), attempt=1))


class WaitingSidecar(FakeSidecar):
    """Answers waits from ``outcomes`` (by record name, in order; parked when
    none is left). With ``stream``, it welcomes the agent with stream_writes
    and takes every write on the Attach stream instead of the unary calls."""

    def __init__(self, stream: bool) -> None:
        super().__init__()
        self.stream = stream
        self.outcomes: dict[str, list[delivery_pb2.WaitOutcome]] = {}

    def outcome(self, wait: delivery_pb2.WaitWrite) -> delivery_pb2.WaitOutcome:
        queue = self.outcomes.get(wait.step_name) or []
        return queue.pop(0) if queue else parked()

    async def Wait(self, request: Any, context: Any) -> Any:
        return await self._write("Wait", request, context, runtime_pb2.WaitResponse(outcome=self.outcome(request.wait)))

    async def Attach(self, request_iterator: AsyncIterator[runtime_pb2.AttachRequest],
                     context: Any) -> AsyncIterator[runtime_pb2.AttachResponse]:
        if not self.stream:
            async for message in super().Attach(request_iterator, context):
                yield message
            return
        queue: asyncio.Queue[runtime_pb2.AttachResponse | None] = asyncio.Queue()
        self.sessions.append(queue)

        async def read() -> None:
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                for inner in req.batch.messages if kind == "batch" else [req]:
                    await self._take(queue, inner)

        reader = asyncio.create_task(read())
        try:
            yield runtime_pb2.AttachResponse(welcome=runtime_pb2.AgentWelcome(stream_writes=True))
            while (msg := await queue.get()) is not None:
                yield msg
        finally:
            reader.cancel()

    async def _take(self, queue: asyncio.Queue[runtime_pb2.AttachResponse | None],
                    req: runtime_pb2.AttachRequest) -> None:
        kind = req.WhichOneof("msg")
        if kind == "hello":
            self.hellos.append(req.hello)
        elif kind == "ack":
            self.acks.append(req.ack.lease)
            self.log.append(("ack", req.ack.lease.intent_id))
        elif kind == "write":
            write = req.write.write
            op = write.WhichOneof("op")
            method = {"step": "RecordStep", "checkpoint": "SaveCheckpoint", "progress": "ReportProgress",
                      "complete": "CompleteIntent", "fail": "FailIntent", "wait": "Wait"}[str(op)]
            self.writes.append((method, write))
            self.log.append((method, write.lease.intent_id))
            result = agent_service_pb2.WriteResult(request_id=req.write.request_id)
            if op == "step":
                result.step.CopyFrom(intent_pb2.StepRecord(index=write.step.index, name=write.step.name,
                                                           result=write.step.result, attempt=write.lease.attempt))
            elif op == "wait":
                result.wait.CopyFrom(self.outcome(write.wait))
            queue.put_nowait(runtime_pb2.AttachResponse(write_result=result))
        await self._note()


@pytest.fixture(params=["unary", "stream"])
async def sidecar(request: pytest.FixtureRequest) -> AsyncIterator[tuple[WaitingSidecar, str]]:
    fake = WaitingSidecar(stream=request.param == "stream")
    async with serving(fake) as address:
        yield fake, address


def waits_of(fake: FakeSidecar, intent_id: str) -> list[delivery_pb2.WaitWrite]:
    return [r.wait for r in fake.ops(intent_id, "Wait")]


def final_of(fake: FakeSidecar, intent_id: str) -> tuple[str, Any]:
    final = fake.final(intent_id)
    assert final is not None
    return final


# -- replays -------------------------------------------------------------------------


RECORDS = [
    ("@signal:go", SIGNAL), ("@sleep", FIRED), ("@human:Deploy?", DECISION),
    ("@signal:late", TIMED_OUT), ("@human:Again?", {"timed_out": True, "task_id": "t2"}),
]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_every_record_shape_is_replayed_without_waiting(sidecar: tuple[WaitingSidecar, str], kind: str) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    seen: dict[str, Any] = {}

    if kind == "async":
        @agent.handler(TYPE)
        async def process(ctx: Context, payload: Any) -> Any:
            seen["signal"] = await ctx.wait_for_signal("go", timeout=60)
            seen["sleep"] = await ctx.sleep(600)  # type: ignore[func-returns-value]
            seen["decision"] = await ctx.ask_human("Deploy?", assignees=["alice"])
            for call in (ctx.wait_for_signal("late", timeout=1), ctx.ask_human("Again?", timeout=1)):
                try:
                    await call
                except WaitTimedOut as exc:
                    seen.setdefault("timeouts", []).append(exc)
            return await ctx.step("after", lambda: "ran")
    else:
        @agent.handler(TYPE)
        def process_sync(ctx: SyncContext, payload: Any) -> Any:
            seen["signal"] = ctx.wait_for_signal("go", timeout=60)
            seen["sleep"] = ctx.sleep(600)  # type: ignore[func-returns-value]
            seen["decision"] = ctx.ask_human("Deploy?", assignees=["alice"])
            for call in (lambda: ctx.wait_for_signal("late", timeout=1), lambda: ctx.ask_human("Again?", timeout=1)):
                try:
                    call()
                except WaitTimedOut as exc:
                    seen.setdefault("timeouts", []).append(exc)
            return ctx.step("after", lambda: "ran")

    async with running(agent, fake):
        fake.push(assignment("r1", {}, attempt=2, steps=RECORDS))
        await fake.wait_for(lambda: fake.final("r1"))

    assert waits_of(fake, "r1") == []  # nothing waited for again
    assert seen["signal"] == {"x": 1} and seen["sleep"] is None
    assert seen["decision"] == HumanDecision(
        task_id="t1", outcome="approve", decided_by="alice",
        decide_time=datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC), comment="ok", form_data={"n": 2})
    assert seen["decision"].approved
    late, again = seen["timeouts"]
    assert (late.kind, late.name, late.index, late.task_id) == ("SIGNAL", "late", 4, "")
    assert (again.kind, again.name, again.index, again.task_id) == ("HUMAN", "Again?", 5, "t2")
    assert steps_of(fake, "r1") == [(6, "after", "ran")]
    method, req = final_of(fake, "r1")
    assert method == "CompleteIntent" and json.loads(req.complete.result) == "ran"


async def test_an_uncaught_timeout_fails_the_intent_for_good(sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        return await ctx.wait_for_signal("go", timeout=5)

    async with running(agent, fake):
        fake.push(assignment("t1", {}, attempt=2, steps=[("@signal:go", TIMED_OUT)]))
        await fake.wait_for(lambda: fake.final("t1"))

    method, req = final_of(fake, "t1")
    assert (method, req.fail.code, req.fail.retryable) == ("FailIntent", "WAIT_TIMED_OUT", False)
    assert "timed out" in req.fail.message


@pytest.mark.parametrize(("recorded", "called"), [
    ("@signal:go", "step"),       # a wait recorded where the handler now runs a step
    ("load", "signal"),           # a step recorded where the handler now waits
    ("@signal:other", "signal"),  # another signal
])
async def test_a_wait_diverging_from_the_record_fails_the_intent(
        sidecar: tuple[WaitingSidecar, str], recorded: str, called: str) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        try:
            if called == "step":
                await ctx.step("load", lambda: 1)
            else:
                await ctx.wait_for_signal("go")
        except NonRetryableError:
            pass  # caught: the intent fails all the same
        return "unreachable"

    async with running(agent, fake):
        fake.push(assignment("d1", {}, attempt=2, steps=[(recorded, SIGNAL)]))
        await fake.wait_for(lambda: fake.final("d1"))

    method, req = final_of(fake, "d1")
    assert (method, req.fail.code, req.fail.retryable) == ("FailIntent", "STEP_DIVERGENCE", False)
    assert waits_of(fake, "d1") == [] and steps_of(fake, "d1") == []


async def test_a_record_the_sdk_cannot_read_fails_the_intent_for_good(sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        await ctx.sleep(1)

    async with running(agent, fake):
        fake.push(assignment("b1", {}, attempt=2, steps=[("@sleep", {"what": 1})]))
        await fake.wait_for(lambda: fake.final("b1"))

    method, req = final_of(fake, "b1")
    assert (method, req.fail.code, req.fail.retryable) == ("FailIntent", "WAIT_RECORD_INVALID", False)


# -- reaching a wait: resolved, parked -------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_resolved_waits_return_their_record_and_take_their_positions(
        sidecar: tuple[WaitingSidecar, str], kind: str) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    until = datetime(2030, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    fake.outcomes = {
        "@signal:ci.passed": [resolved(2, "@signal:ci.passed", SIGNAL)],
        "@sleep": [resolved(3, "@sleep", FIRED), resolved(4, "@sleep", FIRED)],
        "@human:Ship it?": [resolved(5, "@human:Ship it?", DECISION)],
    }
    form = {"type": "object", "properties": {"n": {"type": "integer"}}}

    def flow(ctx: Any) -> Any:
        """The handler's waits, as calls: awaited (async) or made (sync)."""
        return [
            lambda: ctx.step("build", lambda: "b"),
            lambda: ctx.wait_for_signal("ci.passed", timeout=1.5),
            lambda: ctx.sleep(0.0001),
            lambda: ctx.sleep_until(until),
            lambda: ctx.ask_human("Ship it?", description="prod", outcomes=["approve", "reject", "later"],
                                  assignees=["alice", "bob"], form=form, timeout=86400, remind_after=3600),
            lambda: ctx.step("deploy", lambda: "d"),
        ]

    def plain(value: Any) -> Any:
        return value.outcome if isinstance(value, HumanDecision) else value

    if kind == "async":
        @agent.handler(TYPE)
        async def process(ctx: Context, payload: Any) -> Any:
            return [plain(await call()) for call in flow(ctx)]
    else:
        @agent.handler(TYPE)
        def process_sync(ctx: SyncContext, payload: Any) -> Any:
            return [plain(call()) for call in flow(ctx)]

    async with running(agent, fake):
        fake.push(assignment("w1", {}))
        await fake.wait_for(lambda: fake.final("w1"))

    method, req = final_of(fake, "w1")
    assert method == "CompleteIntent", req
    assert json.loads(req.complete.result) == ["b", {"x": 1}, None, None, "approve", "d"]
    assert steps_of(fake, "w1") == [(1, "build", "b"), (6, "deploy", "d")]
    signal_w, sleep_w, until_w, human_w = waits_of(fake, "w1")
    assert (signal_w.index, signal_w.step_name, signal_w.kind, signal_w.signal_name, signal_w.timeout_ms) == (
        2, "@signal:ci.passed", intent_pb2.WAIT_KIND_SIGNAL, "ci.passed", 1500)
    assert (sleep_w.index, sleep_w.step_name, sleep_w.kind, sleep_w.timeout_ms) == (
        3, "@sleep", intent_pb2.WAIT_KIND_TIME, 1)  # never 0: that means "no timeout" on the wire
    assert (until_w.index, until_w.timeout_ms, until_w.until.ToDatetime(tzinfo=UTC)) == (4, 0, until)
    assert (human_w.index, human_w.step_name, human_w.kind, human_w.timeout_ms) == (
        5, "@human:Ship it?", intent_pb2.WAIT_KIND_HUMAN, 86_400_000)
    task = human_w.task
    assert (task.title, task.description, list(task.outcomes), list(task.assignees), task.remind_after_ms) == (
        "Ship it?", "prod", ["approve", "reject", "later"], ["alice", "bob"], 3_600_000)
    assert json.loads(task.form_schema) == form


async def test_the_answer_is_the_value_the_handler_gets(sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.outcomes = {"@signal:go": [resolved(1, "@signal:go", SIGNAL)],
                     "@human:Deploy?": [resolved(2, "@human:Deploy?", DECISION)]}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        payload = await ctx.wait_for_signal("go")
        decision = await ctx.ask_human("Deploy?")
        return {"payload": payload, "decision": [decision.outcome, decision.decided_by, decision.approved,
                                                 decision.decide_time.isoformat(), decision.form_data],
                "steps": ctx.steps_completed}

    async with running(agent, fake):
        fake.push(assignment("v1", {}))
        await fake.wait_for(lambda: fake.final("v1"))

    method, req = final_of(fake, "v1")
    assert method == "CompleteIntent"
    assert json.loads(req.complete.result) == {
        "payload": {"x": 1}, "decision": ["approve", "alice", True, "2026-01-02T03:04:05.250000+00:00", {"n": 2}],
        "steps": 2}
    assert list(waits_of(fake, "v1")[1].task.outcomes) == ["approve", "reject"]


async def test_a_resolved_record_under_another_name_is_a_divergence(sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.outcomes = {"@signal:go": [resolved(1, "@signal:stop", SIGNAL)]}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        return await ctx.wait_for_signal("go")

    async with running(agent, fake):
        fake.push(assignment("n1", {}))
        await fake.wait_for(lambda: fake.final("n1"))

    method, req = final_of(fake, "n1")
    assert (method, req.fail.code) == ("FailIntent", "STEP_DIVERGENCE")


async def test_a_parked_async_handler_is_stopped_and_writes_nothing_more(sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address, capacity=1)
    ended = asyncio.Event()
    seen: dict[str, Any] = {}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        if payload == "next":
            return "next done"
        seen["ctx"] = ctx
        await ctx.step("before", lambda: 1)
        try:
            await ctx.wait_for_signal("go")
        except BaseException as exc:  # a handler that swallows the end of its attempt
            seen["raised"] = exc
        try:
            await ctx.checkpoint({"after": "parking"})
        except BaseException as exc:
            seen["write after"] = exc
        finally:
            ended.set()
        return "must not be reported"

    async with running(agent, fake):
        fake.push(assignment("p1", "wait"))
        await asyncio.wait_for(ended.wait(), WAIT)
        # Capacity 1: the next intent runs only once the parked one freed the slot.
        fake.push(assignment("p2", "next"))
        await fake.wait_for(lambda: fake.final("p2"))
        assert "p1" not in agent.running_intents

    ctx = seen["ctx"]
    assert ctx.cancelled and ctx.cancel_reason == PARKED
    assert isinstance(seen["raised"], LeaseLost | asyncio.CancelledError)
    assert isinstance(seen["write after"], LeaseLost) and seen["write after"].reason == PARKED
    assert [m for m, r in fake.writes if r.lease.intent_id == "p1"] == ["RecordStep", "Wait"]
    assert final_of(fake, "p2")[0] == "CompleteIntent"


async def test_a_parked_sync_handler_is_stopped_and_writes_nothing_more(sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address, capacity=1)
    ended = threading.Event()
    seen: dict[str, Any] = {}

    @agent.handler(TYPE)
    def process(ctx: SyncContext, payload: Any) -> Any:
        if payload == "next":
            return "next done"
        seen["ctx"] = ctx
        try:
            ctx.wait_for_signal("go")
        except Exception as exc:  # must not catch it
            seen["swallowed"] = exc
        except BaseException as exc:
            seen["raised"] = exc
        try:
            ctx.step("after", lambda: 1)
        except BaseException as exc:
            seen["write after"] = exc
        finally:
            ended.set()
        return "must not be reported"

    async with running(agent, fake):
        fake.push(assignment("s1", "wait"))
        assert await asyncio.to_thread(ended.wait, WAIT)
        fake.push(assignment("s2", "next"))
        await fake.wait_for(lambda: fake.final("s2"))

    assert "swallowed" not in seen
    assert isinstance(seen["raised"], LeaseLost) and seen["raised"].reason == PARKED
    assert isinstance(seen["write after"], LeaseLost)
    assert seen["ctx"].cancel_reason == PARKED
    assert [m for m, r in fake.writes if r.lease.intent_id == "s1"] == ["Wait"]


async def test_a_replayed_wait_after_parking_returns_and_the_handler_goes_on(
        sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[str] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        await ctx.step("build", lambda: ran.append("build"))
        signal = await ctx.wait_for_signal("go")
        return await ctx.step("deploy", lambda: signal)

    async with running(agent, fake):
        fake.push(assignment("a1", {}))
        await fake.wait_for(lambda: len(fake.ops("a1", "Wait")) == 1)
        # Woken: the next delivery carries the build step and the wait's record.
        fake.push(assignment("a1", {}, attempt=2, steps=[("build", None), ("@signal:go", SIGNAL)]))
        await fake.wait_for(lambda: fake.final("a1"))

    assert ran == ["build"]
    assert [(r.lease.attempt, m) for m, r in fake.writes if r.lease.intent_id == "a1"] == [
        (1, "RecordStep"), (1, "Wait"), (2, "RecordStep"), (2, "CompleteIntent")]
    assert steps_of(fake, "a1")[-1] == (3, "deploy", {"x": 1})


# -- names and arguments --------------------------------------------------------------


async def test_reserved_step_names_and_bad_arguments_are_refused_without_a_position(
        sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    refused: list[BaseException] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        for call in (lambda: ctx.step("@signal:go", lambda: 1), lambda: ctx.step("@mine", lambda: 1),
                     lambda: ctx.wait_for_signal("bad name"), lambda: ctx.sleep(-1),
                     lambda: ctx.sleep_until(datetime(2030, 1, 1)), lambda: ctx.ask_human("")):
            try:
                await call()
            except (ValueError, TypeError) as exc:
                refused.append(exc)
        async with ctx.step_scope("ok") as scope:
            scope.result = 1
        return "fine"

    async with running(agent, fake):
        fake.push(assignment("x1", {}))
        await fake.wait_for(lambda: fake.final("x1"))

    assert len(refused) == 6 and "reserved" in str(refused[0]) and "reserved" in str(refused[1])
    assert steps_of(fake, "x1") == [(1, "ok", 1)]
    assert waits_of(fake, "x1") == []


@pytest.mark.parametrize(("make", "error", "words"), [
    (lambda: agent_waits.signal_wait("", None), ValueError, "signal name"),
    (lambda: agent_waits.signal_wait("a b", None), ValueError, "signal name"),
    (lambda: agent_waits.signal_wait("x" * (limits.MAX_SIGNAL_NAME_LEN + 1), None), ValueError, "signal name"),
    (lambda: agent_waits.signal_wait("go", -0.5), ValueError, "timeout"),
    (lambda: agent_waits.signal_wait("go", math.nan), ValueError, "timeout"),
    (lambda: agent_waits.signal_wait("go", math.inf), ValueError, "timeout"),
    (lambda: agent_waits.signal_wait("go", True), ValueError, "timeout"),
    (lambda: agent_waits.signal_wait("go", "5"), ValueError, "timeout"),  # type: ignore[arg-type]
    (lambda: agent_waits.sleep_wait(10.0 ** 12), ValueError, "seconds"),
    (lambda: agent_waits.sleep_until_wait(datetime(2030, 1, 1)), ValueError, "aware"),
    (lambda: agent_waits.sleep_until_wait("2030-01-01"), TypeError, "datetime"),  # type: ignore[arg-type]
    (lambda: human(title="x" * (limits.MAX_TASK_TITLE_LEN + 1)), ValueError, "title"),
    (lambda: human(description="d" * (limits.MAX_TASK_DESCRIPTION_LEN + 1)), ValueError, "description"),
    (lambda: human(outcomes=[]), ValueError, "at least one"),
    (lambda: human(outcomes="approve"), TypeError, "outcomes"),
    (lambda: human(outcomes=["a", "a"]), ValueError, "repeat"),
    (lambda: human(outcomes=[""]), ValueError, "outcomes"),
    (lambda: human(outcomes=[f"o{i}" for i in range(limits.MAX_TASK_OUTCOMES + 1)]), ValueError, "at most"),
    (lambda: human(outcomes=["o" * (limits.MAX_TASK_OUTCOME_LEN + 1)]), ValueError, "outcomes"),
    (lambda: human(assignees=[f"k{i}" for i in range(limits.MAX_TASK_ASSIGNEES + 1)]), ValueError, "at most"),
    (lambda: human(assignees=[1]), ValueError, "assignees"),
    (lambda: human(form={"default": {1, 2}}), TypeError, "JSON"),
    (lambda: human(form={"x": "y" * limits.MAX_TASK_FORM_SCHEMA_BYTES}), ValueError, "bytes"),
    (lambda: human(form=["not", "a", "schema"]), TypeError, "mapping"),
    (lambda: human(timeout=-1), ValueError, "timeout"),
    (lambda: human(remind_after=math.nan), ValueError, "remind_after"),
])
def test_wait_arguments_are_checked_early(make: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        make()


def human(**overrides: Any) -> agent_waits.WaitCall:
    args: dict[str, Any] = {"title": "Deploy?", "description": None, "outcomes": ("approve", "reject"),
                            "assignees": None, "form": None, "timeout": None, "remind_after": None}
    args.update(overrides)
    return agent_waits.human_wait(args.pop("title"), **args)


def test_record_names_come_from_the_shared_rules() -> None:
    assert agent_waits.signal_wait("go", None).record_name == "@signal:go"
    assert agent_waits.sleep_wait(1).record_name == "@sleep"
    long_title = "t" * limits.MAX_TASK_TITLE_LEN
    assert agent_waits.human_wait(long_title, description=None, outcomes=("ok",), assignees=None, form=None,
                                  timeout=None, remind_after=None).record_name == ("@human:" + long_title)[:200]
    # A timeout of 0 still times out (at once); on the wire 0 would mean never.
    assert agent_waits.signal_wait("go", 0).write.timeout_ms == 1
    assert not agent_waits.signal_wait("go", None).write.HasField("until")


def test_wait_errors_and_decisions() -> None:
    exc = WaitTimedOut("HUMAN", "Deploy?", 3, "t9")
    assert isinstance(exc, AgentError) and not isinstance(exc, NonRetryableError)
    assert "t9" in str(exc) and exc.index == 3
    decision = HumanDecision("t", "reject", "bob", datetime.now(UTC), "", None)
    assert not decision.approved
    with pytest.raises(AttributeError):
        decision.outcome = "approve"  # type: ignore[misc]


async def test_a_wait_write_may_take_the_hold_window_on_top_of_the_write_timeout(
        sidecar: tuple[WaitingSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    seen: list[float | None] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        seen.extend([ctx._attempt._write_timeout, ctx._attempt._wait_timeout])
        return None

    async with running(agent, fake):
        fake.push(assignment("h1", {}))
        await fake.wait_for(lambda: fake.final("h1"))

    assert seen == [WAIT, WAIT + limits.MAX_WAIT_HOLD_MS / 1000]


async def test_the_testing_runner_counts_waits_as_positions(tmp_path: Any) -> None:
    from intentd.testing.runner import AsyncTrackedContext, SyncTrackedContext, Tracker

    class Fake:
        intent_id, attempt, labels = "i", 2, {}

        def wait_for_signal(self, name: str, timeout: float | None = None) -> Any:
            if timeout is not None:
                raise WaitTimedOut("SIGNAL", name, 1)
            return "payload"

        async def sleep(self, seconds: float) -> None:
            return None

        def elsewhere(self) -> str:
            return "read through"

    sync_tracker = Tracker(Fake(), tmp_path)
    sync_ctx = SyncTrackedContext(Fake(), sync_tracker)
    assert sync_ctx.wait_for_signal("go") == "payload"
    with pytest.raises(WaitTimedOut):
        sync_ctx.wait_for_signal("go", timeout=1)
    assert sync_ctx.elsewhere() == "read through"
    assert sync_tracker.done == 2
    async_tracker = Tracker(Fake(), tmp_path)
    await AsyncTrackedContext(Fake(), async_tracker).sleep(1)
    assert async_tracker.done == 1
