"""The Python agent SDK (intentd.agent) against a fake sidecar.

The fake serves AgentRuntimeService on 127.0.0.1 (port 0): it records the
hello, acks and every write, pushes scripted Assignments/Revocations on the
Attach stream and can answer writes with scripted error codes. No control
plane, no database, no real sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from intentd.agent import (
    Agent,
    AgentError,
    Backoff,
    Context,
    LeaseLost,
    NonRetryableError,
    StepDivergence,
    SyncContext,
    WriteError,
)
from intentd.agent.errors import WriteRefused
from intentd.core.errors import IntentdError
from intentd.core.limits import MAX_FAIL_MESSAGE_LEN
from intentd.generated.v1 import delivery_pb2, intent_pb2, runtime_pb2, runtime_pb2_grpc

TYPE = "intent.pipeline.process.v1"
AGENT = "agent://acme/prod/data-pipeline"
FAST = Backoff(0.005, 0.02)
WAIT = 5.0

WRITE_METHODS = ("RecordStep", "SaveCheckpoint", "ReportProgress", "CompleteIntent", "FailIntent")


class FakeSidecar(runtime_pb2_grpc.AgentRuntimeServiceServicer):
    def __init__(self) -> None:
        self.hellos: list[runtime_pb2.AgentHello] = []
        self.acks: list[delivery_pb2.Lease] = []
        self.writes: list[tuple[str, Any]] = []
        # Acks and writes as they arrived: ("ack" or method, intent id).
        self.log: list[tuple[str, str]] = []
        # Per method, status codes to answer the next calls with (in order).
        self.errors: dict[str, list[grpc.StatusCode]] = defaultdict(list)
        self.sessions: list[asyncio.Queue[runtime_pb2.AttachResponse | None]] = []
        self._changed = asyncio.Condition()

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], object], within: float = WAIT) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), within)

    # -- what the agent sent ---------------------------------------------------

    def ops(self, intent_id: str, method: str | None = None) -> list[Any]:
        return [
            req for m, req in self.writes
            if req.lease.intent_id == intent_id and (method is None or m == method)
        ]

    def final(self, intent_id: str) -> tuple[str, Any] | None:
        for m, req in self.writes:
            if req.lease.intent_id == intent_id and m in ("CompleteIntent", "FailIntent"):
                return m, req
        return None

    def acked(self, intent_id: str) -> bool:
        return any(lease.intent_id == intent_id for lease in self.acks)

    # -- what the sidecar sends ------------------------------------------------

    def push(self, *messages: runtime_pb2.AttachResponse | None) -> None:
        for msg in messages:
            self.sessions[-1].put_nowait(msg)

    # -- the service -----------------------------------------------------------

    async def Attach(
        self, request_iterator: AsyncIterator[runtime_pb2.AttachRequest], context: Any
    ) -> AsyncIterator[runtime_pb2.AttachResponse]:
        queue: asyncio.Queue[runtime_pb2.AttachResponse | None] = asyncio.Queue()
        self.sessions.append(queue)

        async def read() -> None:
            async for req in request_iterator:
                if req.WhichOneof("msg") == "hello":
                    self.hellos.append(req.hello)
                else:
                    self.acks.append(req.ack.lease)
                    self.log.append(("ack", req.ack.lease.intent_id))
                await self._note()

        reader = asyncio.create_task(read())
        try:
            while True:
                msg = await queue.get()
                if msg is None:  # scripted end of the stream
                    return
                yield msg
        finally:
            reader.cancel()

    async def _write(self, method: str, request: Any, context: Any, response: Any) -> Any:
        self.writes.append((method, request))
        self.log.append((method, request.lease.intent_id))
        await self._note()
        if self.errors[method]:
            code = self.errors[method].pop(0)
            await context.abort(code, f"scripted {code.name}")
        return response

    async def BeginStep(self, request: Any, context: Any) -> Any:
        # The SDK keeps the replay list itself and never asks.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the Python SDK")

    async def RecordStep(self, request: Any, context: Any) -> Any:
        record = intent_pb2.StepRecord(
            index=request.step.index, name=request.step.name, result=request.step.result,
            attempt=request.lease.attempt,
        )
        return await self._write(
            "RecordStep", request, context, runtime_pb2.RecordStepResponse(step=record)
        )

    async def SaveCheckpoint(self, request: Any, context: Any) -> Any:
        return await self._write(
            "SaveCheckpoint", request, context, runtime_pb2.SaveCheckpointResponse()
        )

    async def ReportProgress(self, request: Any, context: Any) -> Any:
        return await self._write(
            "ReportProgress", request, context, runtime_pb2.ReportProgressResponse()
        )

    async def CompleteIntent(self, request: Any, context: Any) -> Any:
        return await self._write(
            "CompleteIntent", request, context, runtime_pb2.CompleteIntentResponse()
        )

    async def FailIntent(self, request: Any, context: Any) -> Any:
        return await self._write("FailIntent", request, context, runtime_pb2.FailIntentResponse())


def lease(intent_id: str, attempt: int = 1) -> delivery_pb2.Lease:
    return delivery_pb2.Lease(intent_id=intent_id, attempt=attempt, token=f"tok-{intent_id}-{attempt}")


def assignment(
    intent_id: str,
    payload: Any = None,
    *,
    attempt: int = 1,
    intent_type: str = TYPE,
    steps: Iterable[tuple[str, Any]] = (),
    checkpoint: Any = None,
) -> runtime_pb2.AttachResponse:
    return runtime_pb2.AttachResponse(
        assignment=delivery_pb2.Assignment(
            intent=intent_pb2.Intent(
                id=intent_id, intent_type=intent_type, to_agent=AGENT,
                payload=json.dumps(payload).encode(), attempt=attempt,
            ),
            lease=lease(intent_id, attempt),
            steps=[
                intent_pb2.StepRecord(index=i, name=name, result=json.dumps(value).encode(), attempt=1)
                for i, (name, value) in enumerate(steps, start=1)
            ],
            checkpoint=json.dumps(checkpoint).encode() if checkpoint is not None else b"",
            heartbeat_timeout_ms=10_000,
        )
    )


def revocation(intent_id: str, reason: str, attempt: int = 1) -> runtime_pb2.AttachResponse:
    return runtime_pb2.AttachResponse(
        revocation=delivery_pb2.Revocation(lease=lease(intent_id, attempt), reason=reason)
    )


def steps_of(fake: FakeSidecar, intent_id: str) -> list[tuple[int, str, Any]]:
    return [
        (r.step.index, r.step.name, json.loads(r.step.result))
        for r in fake.ops(intent_id, "RecordStep")
    ]


@contextlib.asynccontextmanager
async def serving(fake: FakeSidecar) -> AsyncIterator[str]:
    """A real gRPC server on loopback answering as ``fake``; yields its address."""
    server = grpc.aio.server()
    runtime_pb2_grpc.add_AgentRuntimeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[FakeSidecar, str]]:
    fake = FakeSidecar()
    async with serving(fake) as address:
        yield fake, address


def make_agent(address: str | None, capacity: int = 4) -> Agent:
    return Agent(
        AGENT, sidecar=address, capacity=capacity,
        reconnect_backoff=FAST, write_backoff=FAST, write_timeout=WAIT,
    )


async def finished(ctx: Context | SyncContext) -> None:
    """Waits until the agent is done with the attempt (reported or not)."""
    task = ctx._attempt.task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), WAIT)


@contextlib.asynccontextmanager
async def running(agent: Agent, fake: FakeSidecar) -> AsyncIterator[asyncio.Task[None]]:
    """Runs the agent until attached; stops it (and checks it stopped) on exit."""
    sessions = len(fake.hellos)
    task = asyncio.create_task(agent.run_async())
    try:
        await fake.wait_for(lambda: len(fake.hellos) > sessions)
        yield task
    finally:
        await asyncio.wait_for(agent.stop(), WAIT)
        await asyncio.wait_for(task, WAIT)


# -- fresh runs, replays --------------------------------------------------------


async def test_fresh_run_records_steps_in_order_and_completes(
    sidecar: tuple[FakeSidecar, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, address = sidecar
    monkeypatch.setenv("INTENTD_SIDECAR_ADDRESS", address)
    agent = make_agent(None, capacity=3)
    seen: dict[str, Any] = {}
    threads: list[str] = []

    def extract(source: str) -> tuple[int, ...]:
        threads.append(threading.current_thread().name)
        return (1, 2, 3)  # a tuple: the handler must see the JSON round trip (a list)

    async def transform(rows: list[int], *, factor: int) -> dict[str, Any]:
        return {"rows": [r * factor for r in rows], "n": len(rows)}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        seen["ctx"] = (ctx.intent_id, ctx.attempt, ctx.replayed_steps, ctx.cancelled,
                       ctx.deadline, ctx.last_checkpoint, ctx.payload)
        rows = await ctx.step("extract", extract, payload["source"])
        seen["rows"] = rows
        out = await ctx.step("transform", transform, rows, factor=10)
        await ctx.step("load", lambda: None)
        return {"rows": out["n"], "total": sum(out["rows"])}

    async with running(agent, fake):
        hello = fake.hellos[0]
        assert list(hello.intent_types) == [TYPE]
        assert hello.capacity == 3 and hello.language == "python"
        fake.push(assignment("i1", {"source": "s3://x"}))
        await fake.wait_for(lambda: fake.final("i1"))

    assert fake.acked("i1")
    assert seen["ctx"] == ("i1", 1, 0, False, None, None, {"source": "s3://x"})
    assert seen["rows"] == [1, 2, 3]
    assert threads and threads[0] != threading.main_thread().name
    assert steps_of(fake, "i1") == [
        (1, "extract", [1, 2, 3]),
        (2, "transform", {"rows": [10, 20, 30], "n": 3}),
        (3, "load", None),
    ]
    method, req = fake.final("i1")  # type: ignore[misc]
    assert method == "CompleteIntent"
    assert req.lease == lease("i1")
    assert json.loads(req.complete.result) == {"rows": 3, "total": 60}


async def test_replay_returns_recorded_results_without_running_them(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    calls: list[str] = []
    seen: dict[str, Any] = {}

    def fn(name: str, value: Any) -> Callable[[], Any]:
        def run() -> Any:
            calls.append(name)
            return value
        return run

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        a = await ctx.step("extract", fn("extract", "fresh-a"))
        b = await ctx.step("transform", fn("transform", "fresh-b"))
        seen["after_replay"] = ctx.replayed_steps
        c = await ctx.step("load", fn("load", "fresh-c"))
        d = await ctx.step("notify", fn("notify", {"sent": True}))
        seen["checkpoint"] = ctx.last_checkpoint
        seen["counts"] = (ctx.recorded_steps, ctx.replayed_steps, ctx.steps_completed)
        return [a, b, c, d]

    async with running(agent, fake):
        fake.push(assignment(
            "i2", attempt=2,
            steps=[("extract", {"recorded": 1}), ("transform", [1, "two", None])],
            checkpoint={"cursor": 10},
        ))
        await fake.wait_for(lambda: fake.final("i2"))

    assert calls == ["load", "notify"]
    assert seen["after_replay"] == 2
    assert seen["checkpoint"] == {"cursor": 10}
    assert seen["counts"] == (2, 2, 4)
    assert steps_of(fake, "i2") == [(3, "load", "fresh-c"), (4, "notify", {"sent": True})]
    assert all(r.lease.attempt == 2 for r in fake.ops("i2"))
    method, req = fake.final("i2")  # type: ignore[misc]
    assert method == "CompleteIntent"
    assert json.loads(req.complete.result) == [
        {"recorded": 1}, [1, "two", None], "fresh-c", {"sent": True}
    ]


async def test_divergence_fails_non_retryably_even_if_caught(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[str] = []
    caught: list[StepDivergence] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        await ctx.step("extract", lambda: ran.append("extract"))
        try:
            await ctx.step("fetch", lambda: ran.append("fetch"))  # recorded as "transform"
        except StepDivergence as exc:
            caught.append(exc)
            if payload["swallow"]:
                return "pretend all is well"
            raise
        return "unreachable"

    async with running(agent, fake):
        for n, swallow in ((1, False), (2, True)):
            fake.push(assignment(
                f"d{n}", {"swallow": swallow}, attempt=2,
                steps=[("extract", 1), ("transform", 2)],
            ))
        await fake.wait_for(lambda: fake.final("d1") and fake.final("d2"))

    assert ran == []
    assert [(e.index, e.recorded_name, e.name) for e in caught] == [(2, "transform", "fetch")] * 2
    for intent_id in ("d1", "d2"):
        method, req = fake.final(intent_id)  # type: ignore[misc]
        assert method == "FailIntent"
        assert req.fail.code == "STEP_DIVERGENCE" and req.fail.retryable is False
        assert "step 2" in req.fail.message
        assert "'transform'" in req.fail.message and "'fetch'" in req.fail.message
        assert fake.ops(intent_id, "RecordStep") == []


# -- failures --------------------------------------------------------------------


async def test_handler_exceptions_fail_retryably_or_not(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        await ctx.step("one", lambda: 1)
        if payload == "plain":
            raise ValueError("boom " + "x" * 5000)
        if payload == "bad-result":
            return {"not json": object()}
        raise NonRetryableError("BAD_INPUT", "no source given")

    async with running(agent, fake):
        fake.push(assignment("e1", "plain"), assignment("e2", "fatal"),
                  assignment("e3", "bad-result"))
        await fake.wait_for(lambda: all(fake.final(i) for i in ("e1", "e2", "e3")))

    m1, r1 = fake.final("e1")  # type: ignore[misc]
    assert m1 == "FailIntent" and r1.fail.retryable is True and r1.fail.code == "AGENT_ERROR"
    assert r1.fail.message.startswith("ValueError: boom") and len(r1.fail.message) == MAX_FAIL_MESSAGE_LEN
    m2, r2 = fake.final("e2")  # type: ignore[misc]
    assert m2 == "FailIntent" and r2.fail.retryable is False
    assert (r2.fail.code, r2.fail.message) == ("BAD_INPUT", "no source given")
    m3, r3 = fake.final("e3")  # type: ignore[misc]
    assert m3 == "FailIntent" and r3.fail.retryable is True
    assert "not JSON-serialisable" in r3.fail.message
    for intent_id in ("e1", "e2", "e3"):
        assert steps_of(fake, intent_id) == [(1, "one", 1)]


async def test_non_json_step_result_names_the_step_and_records_nothing(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    errors: list[BaseException] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        await ctx.step("ok", lambda: "fine")
        try:
            await ctx.step("bad", lambda: {1, 2})
        except TypeError as exc:
            errors.append(exc)
            raise
        return None

    async with running(agent, fake):
        fake.push(assignment("j1"))
        await fake.wait_for(lambda: fake.final("j1"))

    assert len(errors) == 1
    assert "step 2 'bad'" in str(errors[0]) and "JSON" in str(errors[0])
    assert steps_of(fake, "j1") == [(1, "ok", "fine")]
    method, req = fake.final("j1")  # type: ignore[misc]
    assert method == "FailIntent" and req.fail.retryable is True and "step 2 'bad'" in req.fail.message


async def test_a_step_refused_by_the_history_limit_fails_the_intent_non_retryably(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    """RESOURCE_EXHAUSTED on a step is the intent's history limit: a history
    only grows, so a retry would replay to the same step and be refused again
    (it used to fail retryably, and every attempt was spent the same way)."""
    fake, address = sidecar
    agent = make_agent(address)
    fake.errors["RecordStep"] = [grpc.StatusCode.RESOURCE_EXHAUSTED]

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        await ctx.step("one", lambda: 1)
        return None

    async with running(agent, fake):
        fake.push(assignment("j1"))
        await fake.wait_for(lambda: fake.final("j1"))

    method, req = fake.final("j1")  # type: ignore[misc]
    assert (method, req.fail.code, req.fail.retryable) == ("FailIntent", "HISTORY_LIMIT_EXCEEDED", False)
    assert "RecordStep" in req.fail.message


async def test_failed_step_keeps_its_index_and_concurrent_steps_run(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    concurrent: list[Any] = []

    def explode() -> None:
        raise OSError("network down")

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        with contextlib.suppress(OSError):
            await ctx.step("flaky", explode)
        first = await ctx.step("fallback", lambda: "fb")
        gate = asyncio.Event()

        async def slow() -> str:
            await gate.wait()
            return "slow"

        async def other() -> str:
            try:
                result: str = await ctx.step("b", lambda: "b")
                return result
            finally:
                gate.set()

        concurrent.extend(
            await asyncio.gather(ctx.step("a", slow), other(), return_exceptions=True)
        )
        return first

    async with running(agent, fake):
        fake.push(assignment("c1"))
        await fake.wait_for(lambda: fake.final("c1"))

    # a took position 2 when called; b, called once other() ran, 3; b was
    # recorded first (a waited for it), each at its own position.
    assert concurrent == ["slow", "b"]
    assert steps_of(fake, "c1") == [(1, "fallback", "fb"), (3, "b", "b"), (2, "a", "slow")]
    assert fake.final("c1")[0] == "CompleteIntent"  # type: ignore[index]


# -- stopping: revocations, stale leases, dropped streams --------------------------


async def test_revocation_cancels_the_running_handler(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    started = asyncio.Event()
    unwound = asyncio.Event()
    contexts: dict[str, Context] = {}

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        contexts[ctx.intent_id] = ctx
        if payload == "quick":
            return "done"
        try:
            await ctx.step("wait", forever)
        finally:
            unwound.set()
        return "unreachable"

    async with running(agent, fake):
        fake.push(assignment("r1", "slow"))
        await asyncio.wait_for(started.wait(), WAIT)
        fake.push(revocation("r1", "CANCELED"))
        await asyncio.wait_for(unwound.wait(), WAIT)
        assert contexts["r1"].cancelled and contexts["r1"].cancel_reason == "CANCELED"
        await finished(contexts["r1"])
        assert agent.running_intents == []
        # The agent goes on with other work.
        fake.push(assignment("r2", "quick"))
        await fake.wait_for(lambda: fake.final("r2"))

    assert fake.ops("r1") == []  # no step, no completion, no failure after the revocation
    assert fake.final("r2")[0] == "CompleteIntent"  # type: ignore[index]


async def test_failed_precondition_stops_the_handler_silently(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.errors["RecordStep"] = [grpc.StatusCode.FAILED_PRECONDITION]
    ended = asyncio.Event()
    ran: list[str] = []
    raised: list[BaseException] = []
    contexts: list[Context] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        contexts.append(ctx)
        try:
            await ctx.step("one", lambda: ran.append("one"))
            await ctx.step("two", lambda: ran.append("two"))
        except BaseException as exc:
            raised.append(exc)
            raise
        finally:
            ended.set()
        return "unreachable"

    async with running(agent, fake):
        fake.push(assignment("p1"))
        await asyncio.wait_for(ended.wait(), WAIT)
        await finished(contexts[0])

    assert ran == ["one"]
    assert len(fake.ops("p1", "RecordStep")) == 1  # never retried
    assert isinstance(raised[0], LeaseLost) and raised[0].reason == "LEASE_LOST"
    assert contexts[0].cancelled and contexts[0].cancel_reason == "LEASE_LOST"
    assert fake.final("p1") is None


async def test_failed_precondition_on_complete_reports_nothing_more(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.errors["CompleteIntent"] = [grpc.StatusCode.FAILED_PRECONDITION]
    contexts: dict[str, Context] = {}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        contexts[ctx.intent_id] = ctx
        return "result"

    async with running(agent, fake):
        fake.push(assignment("p2"))
        await fake.wait_for(lambda: fake.final("p2"))
        await finished(contexts["p2"])
        assert contexts["p2"].cancel_reason == "LEASE_LOST"

    assert [m for m, r in fake.writes if r.lease.intent_id == "p2"] == ["CompleteIntent"]


async def test_unavailable_writes_are_retried_unchanged(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.errors["RecordStep"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    fake.errors["CompleteIntent"] = [grpc.StatusCode.UNAVAILABLE]
    calls: list[int] = []

    def one() -> dict[str, int]:
        calls.append(1)
        return {"x": 1}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        return await ctx.step("one", one)

    async with running(agent, fake):
        fake.push(assignment("u1"))
        await fake.wait_for(lambda: len(fake.ops("u1", "CompleteIntent")) == 2)

    assert calls == [1]
    records = fake.ops("u1", "RecordStep")
    assert len(records) == 3 and records[0] == records[1] == records[2]
    assert [json.loads(r.complete.result) for r in fake.ops("u1", "CompleteIntent")] == [{"x": 1}] * 2


async def test_dropped_stream_cancels_handlers_and_reconnects(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    started = asyncio.Event()
    contexts: dict[str, Context] = {}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        contexts[ctx.intent_id] = ctx
        if payload == "block":
            started.set()
            await asyncio.Event().wait()
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("s1", "block"))
        await asyncio.wait_for(started.wait(), WAIT)
        fake.push(None)  # the sidecar ends the stream
        await fake.wait_for(lambda: len(fake.hellos) == 2)
        assert contexts["s1"].cancel_reason == "LEASE_LOST"
        fake.push(assignment("s2", "go"))
        await fake.wait_for(lambda: fake.final("s2"))

    assert fake.final("s1") is None
    assert fake.final("s2")[0] == "CompleteIntent"  # type: ignore[index]


async def test_capacity_limits_running_handlers(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address, capacity=1)
    gate = asyncio.Event()
    active: list[str] = []
    most = 0

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        nonlocal most
        active.append(ctx.intent_id)
        most = max(most, len(active))
        await gate.wait()
        active.remove(ctx.intent_id)
        return ctx.intent_id

    async with running(agent, fake):
        fake.push(assignment("k1"), assignment("k2"), assignment("k3"))
        await fake.wait_for(lambda: fake.acked("k1"))
        gate.set()
        await fake.wait_for(lambda: all(fake.final(i) for i in ("k1", "k2", "k3")))

    assert most == 1
    # Each waiting assignment was acknowledged (started) only once the one
    # before it had left its handler; the slot does not wait for the outcome
    # to be committed (the sidecar frees its own slot only after that).
    acks = [entry[1] for entry in fake.log if entry[0] == "ack"]
    assert acks == ["k1", "k2", "k3"]


async def test_stop_waits_for_running_handlers_up_to_the_grace(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    gate = asyncio.Event()
    hanging = asyncio.Event()
    contexts: dict[str, Context] = {}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        contexts[ctx.intent_id] = ctx
        if payload == "finish":
            await ctx.step("wait", gate.wait)
            return "finished in the grace period"
        hanging.set()
        await asyncio.Event().wait()
        return "unreachable"

    async with running(agent, fake):
        fake.push(assignment("g1", "finish"))
        await fake.wait_for(lambda: fake.acked("g1"))
        stopping = asyncio.create_task(agent.stop(grace=WAIT))
        await asyncio.sleep(0)  # let stop() begin: the agent now drains
        assert not stopping.done()
        gate.set()
        await asyncio.wait_for(stopping, WAIT)
        assert fake.final("g1")[0] == "CompleteIntent"  # type: ignore[index]
        assert not contexts["g1"].cancelled

    # Without a grace period, running handlers are cancelled and report nothing.
    async with running(agent, fake):
        fake.push(assignment("g2", "hang"))
        await asyncio.wait_for(hanging.wait(), WAIT)
        await asyncio.wait_for(agent.stop(), WAIT)
        assert contexts["g2"].cancel_reason == "SHUTDOWN"
    assert fake.final("g2") is None


async def test_newer_delivery_of_the_same_intent_stops_the_older(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    contexts: dict[int, Context] = {}
    first_running = asyncio.Event()

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        contexts[ctx.attempt] = ctx
        if ctx.attempt == 1:
            first_running.set()
            await asyncio.Event().wait()
        return ctx.attempt

    async with running(agent, fake):
        fake.push(assignment("n1", attempt=1))
        await asyncio.wait_for(first_running.wait(), WAIT)
        fake.push(assignment("n1", attempt=2))
        await fake.wait_for(lambda: fake.final("n1"))
        await finished(contexts[1])

    assert contexts[1].cancel_reason == "LEASE_LOST"
    method, req = fake.final("n1")  # type: ignore[misc]
    assert (method, req.lease.attempt, json.loads(req.complete.result)) == ("CompleteIntent", 2, 2)
    assert [r.lease.attempt for r in fake.ops("n1")] == [2]


# -- the other forms -------------------------------------------------------------------


async def test_step_scope_step_fn_checkpoint_and_progress(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[str] = []
    seen: dict[str, Any] = {}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        async with ctx.step_scope("extract") as s:  # recorded: the body skips the work
            seen["replayed"] = s.replayed
            if not s.replayed:
                ran.append("extract")
                s.result = "fresh"
        async with ctx.step_scope("load") as s2:
            if not s2.replayed:
                ran.append("load")
                s2.result = {"loaded": (1, 2)}

        @ctx.step_fn("validate")
        async def validate(rows: Any) -> bool:
            ran.append("validate")
            return bool(rows)

        ok = await validate(s2.result)
        await ctx.checkpoint({"cursor": 10})
        seen["checkpoint"] = ctx.last_checkpoint
        await ctx.progress("loading", 0.5)
        await ctx.progress("still loading")
        return {"extract": s.result, "load": s2.result, "ok": ok}

    async with running(agent, fake):
        fake.push(assignment("f1", steps=[("extract", "recorded")]))
        await fake.wait_for(lambda: fake.final("f1"))

    assert seen == {"replayed": True, "checkpoint": {"cursor": 10}}
    assert ran == ["load", "validate"]
    assert steps_of(fake, "f1") == [(2, "load", {"loaded": [1, 2]}), (3, "validate", True)]
    (cp,) = fake.ops("f1", "SaveCheckpoint")
    assert json.loads(cp.checkpoint.state) == {"cursor": 10}
    progress = [(p.progress.message, p.progress.fraction) for p in fake.ops("f1", "ReportProgress")]
    assert progress == [("loading", 0.5), ("still loading", 0.5)]
    _, req = fake.final("f1")  # type: ignore[misc]
    assert json.loads(req.complete.result) == {
        "extract": "recorded", "load": {"loaded": [1, 2]}, "ok": True
    }


async def test_sync_handler_runs_in_a_thread_with_blocking_context(
    sidecar: tuple[FakeSidecar, str],
) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    ran: list[str] = []
    threads: list[bool] = []

    async def async_step() -> str:
        ran.append("async")
        return "from the loop"

    def extract() -> str:
        ran.append("extract")
        return "fresh"

    def transform(x: int) -> int:
        ran.append("transform")
        return x * 2

    @agent.handler(TYPE)
    def process(ctx: SyncContext, payload: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        a = ctx.step("extract", extract)
        b = ctx.step("transform", transform, payload["n"])
        c = ctx.step("notify", async_step)
        with ctx.step_scope("scope") as s:
            s.result = ("t",)
        ctx.checkpoint({"at": 4})
        ctx.progress("half", 0.5)
        if payload.get("fail"):
            raise NonRetryableError("SYNC_FAIL", "as asked")
        return {"a": a, "b": b, "c": c, "s": s.result}

    async with running(agent, fake):
        fake.push(assignment("y1", {"n": 21}, attempt=2, steps=[("extract", "recorded")]))
        fake.push(assignment("y2", {"n": 1, "fail": True}))
        await fake.wait_for(lambda: fake.final("y1") and fake.final("y2"))

    assert threads == [False, False]
    assert ran.count("extract") == 1  # only y2, which had nothing recorded
    assert steps_of(fake, "y1") == [
        (2, "transform", 42), (3, "notify", "from the loop"), (4, "scope", ["t"])
    ]
    method, req = fake.final("y1")  # type: ignore[misc]
    assert method == "CompleteIntent"
    assert json.loads(req.complete.result) == {
        "a": "recorded", "b": 42, "c": "from the loop", "s": ["t"]
    }
    method, req = fake.final("y2")  # type: ignore[misc]
    assert (method, req.fail.code, req.fail.retryable) == ("FailIntent", "SYNC_FAIL", False)


async def test_revoked_sync_handler_cannot_write_again(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    release = threading.Event()
    entered = threading.Event()
    outcome: list[BaseException] = []
    done = threading.Event()
    contexts: list[SyncContext] = []

    def one() -> bool:
        entered.set()
        return release.wait(WAIT)

    @agent.handler(TYPE)
    def process(ctx: SyncContext, payload: Any) -> Any:
        contexts.append(ctx)
        try:
            ctx.step("one", one)
            ctx.step("two", lambda: "never")
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            done.set()
        return "unreachable"

    async with running(agent, fake):
        fake.push(assignment("v1"))
        await asyncio.to_thread(entered.wait, WAIT)
        fake.push(revocation("v1", "TIMED_OUT"))
        await finished(contexts[0])  # the task ends at once; the thread is still in step one
        assert not done.is_set()
        release.set()
        assert await asyncio.to_thread(done.wait, WAIT)

    assert isinstance(outcome[0], LeaseLost) and outcome[0].reason == "TIMED_OUT"
    assert fake.ops("v1") == []


async def test_unix_socket_address_and_unknown_type(tmp_path: Any) -> None:
    fake = FakeSidecar()
    server = grpc.aio.server()
    runtime_pb2_grpc.add_AgentRuntimeServiceServicer_to_server(fake, server)
    address = f"unix://{tmp_path}/sidecar.sock"
    server.add_insecure_port(address)
    await server.start()
    try:
        agent = make_agent(address)

        @agent.handler(TYPE)
        async def process(ctx: Context, payload: Any) -> Any:
            return payload

        async with running(agent, fake):
            fake.push(assignment("x1", [1]), assignment("x2", intent_type="intent.other.thing.v1"))
            await fake.wait_for(lambda: fake.final("x1") and fake.final("x2"))
    finally:
        await server.stop(0)

    assert json.loads(fake.final("x1")[1].complete.result) == [1]  # type: ignore[index]
    method, req = fake.final("x2")  # type: ignore[misc]
    assert (method, req.fail.code, req.fail.retryable) == ("FailIntent", "NO_HANDLER", True)


async def test_reconnects_until_the_sidecar_is_up(tmp_path: Any) -> None:
    address = f"unix://{tmp_path}/late.sock"
    agent = make_agent(address)
    failed = asyncio.Event()

    class OnAttachFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Attach failed" in record.getMessage():
                failed.set()

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        return "late"

    watcher = OnAttachFailure()
    logging.getLogger("intentd.agent").addHandler(watcher)
    fake = FakeSidecar()
    server = grpc.aio.server()
    runtime_pb2_grpc.add_AgentRuntimeServiceServicer_to_server(fake, server)
    task = asyncio.create_task(agent.run_async())
    try:
        await asyncio.wait_for(failed.wait(), WAIT)  # nothing listens yet
        server.add_insecure_port(address)
        await server.start()
        await fake.wait_for(lambda: fake.hellos)
        fake.push(assignment("z1"))
        await fake.wait_for(lambda: fake.final("z1"))
    finally:
        logging.getLogger("intentd.agent").removeHandler(watcher)
        await asyncio.wait_for(agent.stop(), WAIT)
        await asyncio.wait_for(task, WAIT)
        await server.stop(0)
    assert fake.final("z1")[0] == "CompleteIntent"  # type: ignore[index]


def test_constructor_and_registration_checks() -> None:
    with pytest.raises(ValueError, match="agent address"):
        Agent("data-pipeline")
    with pytest.raises(ValueError, match="capacity"):
        Agent(AGENT, capacity=0)
    agent = Agent(AGENT)
    with pytest.raises(ValueError, match="intent_type"):
        agent.handler("Not A Type")
    agent.handler(TYPE)(lambda ctx, payload: None)
    with pytest.raises(ValueError, match="already registered"):
        agent.handler(TYPE)(lambda ctx, payload: None)
    with pytest.raises(ValueError, match="error code"):
        NonRetryableError("not a code!", "x")
    assert NonRetryableError("BAD_INPUT", "m").code == "BAD_INPUT"


def test_errors_have_one_root_but_lease_lost() -> None:
    for error in (NonRetryableError, StepDivergence, WriteError, WriteRefused):
        assert issubclass(error, AgentError), error
    assert issubclass(AgentError, IntentdError)
    # Fencing must get through `except Exception` in a handler.
    assert not issubclass(LeaseLost, Exception) and issubclass(LeaseLost, BaseException)


async def test_handlers_are_readable_and_register_again_on_a_fresh_agent(
    sidecar: tuple[FakeSidecar, str]
) -> None:
    """What intentd.testing does: read an agent's handlers, wrap them, and
    register the wrappers on a new Agent."""
    fake, address = sidecar
    agent = make_agent(address)
    calls: list[str] = []

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        return await ctx.step("one", lambda: "async")

    @agent.handler("intent.pipeline.sync.v1")
    def process_sync(ctx: SyncContext, payload: Any) -> Any:
        return ctx.step("one", lambda: "sync")

    handlers = agent.handlers
    assert list(handlers) == [TYPE, "intent.pipeline.sync.v1"]  # registration order
    assert handlers[TYPE] is process and handlers["intent.pipeline.sync.v1"] is process_sync
    with pytest.raises(TypeError):
        handlers[TYPE] = process  # type: ignore[index]

    fresh = make_agent(address)
    for intent_type, fn in handlers.items():
        if intent_type == TYPE:
            async def wrapped(ctx: Context, payload: Any, fn: Any = fn) -> Any:
                calls.append("async")
                return await fn(ctx, payload)

            fresh.handler(intent_type)(wrapped)
        else:
            fresh.handler(intent_type)(fn)  # the user's function itself, unchanged
    assert list(fresh.handlers) == list(handlers) and agent.handlers[TYPE] is process

    async with running(fresh, fake):
        fake.push(assignment("w1"), assignment("w2", intent_type="intent.pipeline.sync.v1"))
        await fake.wait_for(lambda: fake.final("w1") and fake.final("w2"))
    assert calls == ["async"]
    assert [json.loads(fake.final(i)[1].complete.result) for i in ("w1", "w2")] == ["async", "sync"]  # type: ignore[index]


async def test_context_attributes_are_typed_and_read_only(sidecar: tuple[FakeSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    seen: dict[str, Any] = {}

    @agent.handler(TYPE)
    async def process(ctx: Context, payload: Any) -> Any:
        seen["fields"] = (ctx.intent_id, ctx.intent_type, ctx.attempt, ctx.max_attempts, ctx.to_agent,
                          ctx.sender, ctx.idempotency_key, ctx.labels, ctx.heartbeat_timeout, ctx.payload_json)
        seen["protos"] = (ctx.intent.id, ctx.lease.token)
        with pytest.raises(AttributeError, match="read-only"):
            ctx.intent_id = "another"  # type: ignore[assignment]
        return None

    pushed = assignment("r1", {"a": 1}, attempt=2)
    intent = pushed.assignment.intent
    intent.max_attempts, intent.sender, intent.idempotency_key = 5, "svc://billing", "order-7"
    intent.labels["team"] = "data"
    async with running(agent, fake):
        fake.push(pushed)
        await fake.wait_for(lambda: fake.final("r1"))
    assert fake.final("r1")[0] == "CompleteIntent"  # type: ignore[index]
    assert seen["fields"] == ("r1", TYPE, 2, 5, AGENT, "svc://billing", "order-7", {"team": "data"},
                              timedelta(seconds=10), b'{"a": 1}')
    assert seen["protos"] == ("r1", lease("r1", 2).token)


async def test_run_async_needs_an_address_and_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTENTD_SIDECAR_ADDRESS", raising=False)
    agent = Agent(AGENT)
    with pytest.raises(RuntimeError, match="handler"):
        await agent.run_async()
    agent.handler(TYPE)(lambda ctx, payload: None)
    with pytest.raises(RuntimeError, match="INTENTD_SIDECAR_ADDRESS"):
        await agent.run_async()
