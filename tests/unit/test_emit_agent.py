"""Streams in the agent SDK (ctx.emit, agent/emitter.py) against a scripted
fake sidecar (test_waits_agent's, in both modes: unary calls, and writes on
the Attach stream), which can hold emit answers back and refuse them: chunk
positions (body, steps, parallel steps, replays), flush before records, one
write in flight with the rest gathered behind it, seq, the limit error raised
once, the supersede of a handed-back position, emits from a def handler's
thread, the bounded buffer and what a stopped attempt does with it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from intentd.agent import Context, LeaseLost, StreamLimitExceeded, SyncContext, WriteError
from intentd.agent import emitter as agent_emitter
from intentd.core.limits import MAX_CHUNK_BYTES, MAX_EMIT_BYTES, MAX_EMIT_CHUNKS
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, runtime_pb2, stream_pb2
from tests.unit.test_agent_unit import TYPE, assignment, make_agent, revocation, running, serving, steps_of
from tests.unit.test_sidecar_unit import wait_until
from tests.unit.test_waits_agent import WaitingSidecar

TEXT = stream_pb2.CHUNK_FORMAT_TEXT
JSON = stream_pb2.CHUNK_FORMAT_JSON


class EmitSidecar(WaitingSidecar):
    """Takes emits too: records them (``emits``, in arrival order), answers
    them in order, holds the answers while ``hold`` is set, and answers the
    next ones with the codes in ``emit_errors``."""

    def __init__(self, stream: bool) -> None:
        super().__init__(stream)
        self.emits: list[delivery_pb2.EmitWrite] = []
        self.emit_errors: list[tuple[grpc.StatusCode, str]] = []
        self.retry_after_ms = 0  # sent with the emit_errors (a rate refusal)
        self.hold = False
        self._released = asyncio.Event()
        self.in_flight = 0
        self.max_in_flight = 0
        self._offsets: dict[str, int] = {}
        self._answering: set[asyncio.Task[None]] = set()

    def release(self) -> None:
        self.hold = False
        self._released.set()

    async def _answer(self, emit: delivery_pb2.EmitWrite, lease: delivery_pb2.Lease) -> agent_service_pb2.WriteResult:
        self.emits.append(emit)
        self.writes.append(("Emit", delivery_pb2.IntentWrite(lease=lease, emit=emit)))
        self.log.append(("Emit", lease.intent_id))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await self._note()
        if self.hold:
            await self._released.wait()
        self.in_flight -= 1
        await self._note()
        if self.emit_errors:
            code, message = self.emit_errors.pop(0)
            return agent_service_pb2.WriteResult(code=code.value[0], message=message,
                                                 retry_after_ms=self.retry_after_ms)
        first = self._offsets.get(emit.stream, 0)
        self._offsets[emit.stream] = first + len(emit.chunks)
        return agent_service_pb2.WriteResult(emit=delivery_pb2.EmitOutcome(
            first_offset=first, appended=len(emit.chunks)))

    async def Emit(self, request: Any, context: Any) -> Any:
        result = await self._answer(request.emit, request.lease)
        if result.code:
            if result.retry_after_ms:
                context.set_trailing_metadata((("retry-after-ms", str(result.retry_after_ms)),))
            await context.abort(_status(result.code), result.message)
        return runtime_pb2.EmitResponse(outcome=result.emit)

    async def _take(self, queue: asyncio.Queue[runtime_pb2.AttachResponse | None],
                    req: runtime_pb2.AttachRequest) -> None:
        if req.WhichOneof("msg") != "write" or req.write.write.WhichOneof("op") != "emit":
            await super()._take(queue, req)
            return

        async def answer(request_id: int, write: delivery_pb2.IntentWrite) -> None:
            result = await self._answer(write.emit, write.lease)
            result.request_id = request_id
            queue.put_nowait(runtime_pb2.AttachResponse(write_result=result))

        # Its own task: a held answer must not stop the stream's other messages.
        task = asyncio.create_task(answer(req.write.request_id, req.write.write))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    # -- what arrived ------------------------------------------------------------

    def chunks(self, stream: str | None = None) -> list[tuple[str, int, Any, int]]:
        """(stream, format, decoded data, position) of every chunk, in order."""
        return [(e.stream, c.format, c.data.decode() if c.format == TEXT else json.loads(c.data), c.position)
                for e in self.emits for c in e.chunks if stream is None or e.stream == stream]

    def items(self) -> list[tuple[str, Any]]:
        """The emits flattened: ("supersede", position) and ("chunk", text)."""
        out: list[tuple[str, Any]] = []
        for emit in self.emits:
            out.extend(("supersede", p) for p in emit.supersede_positions)
            out.extend(("chunk", c.data.decode()) for c in emit.chunks)
        return out


def _status(code: int) -> grpc.StatusCode:
    return next(s for s in grpc.StatusCode if s.value[0] == code)


@pytest.fixture(params=["unary", "stream"])
async def sidecar(request: pytest.FixtureRequest) -> AsyncIterator[tuple[EmitSidecar, str]]:
    fake = EmitSidecar(stream=request.param == "stream")
    async with serving(fake) as address:
        yield fake, address


def completed(fake: EmitSidecar, intent_id: str) -> Any:
    outcome = fake.final(intent_id)
    assert outcome is not None
    method, request = outcome
    assert method == "CompleteIntent", request
    return json.loads(request.complete.result)


# -- positions --------------------------------------------------------------------------


async def test_chunks_carry_the_position_of_their_step_or_the_next_one(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("before")  # the body, before step 1: position 1

        async def one() -> int:
            await ctx.emit("in one")
            await ctx.emit({"tokens": 3}, stream="meta")
            return 1

        await ctx.step("one", one)
        await ctx.emit("between")  # position 2

        async def par(name: str) -> str:
            await ctx.emit(f"in {name}")
            return name

        await asyncio.gather(ctx.step("a", par, "a"), ctx.step("b", par, "b"))  # positions 2 and 3
        async with ctx.step_scope("scope") as s:  # position 4
            await ctx.emit("in scope")
            s.result = "s"
        await ctx.emit("after")  # position 5
        return "done"

    async with running(agent, fake):
        fake.push(assignment("p1", {}))
        await fake.wait_for(lambda: fake.final("p1"))
    assert completed(fake, "p1") == "done"
    default = [(d, p) for _, f, d, p in fake.chunks("default")]
    assert default[:3] == [("before", 1), ("in one", 1), ("between", 2)]
    assert sorted(default[3:5]) == [("in a", 2), ("in b", 3)]
    assert default[5:] == [("in scope", 4), ("after", 5)]
    assert fake.chunks("meta") == [("meta", JSON, {"tokens": 3}, 1)]
    assert all(f == TEXT for s, f, _, _ in fake.chunks() if s == "default")
    assert [e.seq for e in fake.emits] == list(range(1, len(fake.emits) + 1))


async def test_a_replayed_step_emits_nothing_and_body_emits_are_sent(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("top")
        async with ctx.step_scope("load") as s:
            # The body runs on a replay too: its chunks were committed when it ran.
            await ctx.emit("loading")
            if not s.replayed:
                s.result = 1
        await ctx.emit("end")
        return s.result

    async with running(agent, fake):
        fake.push(assignment("r1", {}, attempt=2, steps=[("load", 1)]))
        await fake.wait_for(lambda: fake.final("r1"))
    assert completed(fake, "r1") == 1
    # Body chunks go (the control plane drops the one at recorded position 1).
    assert [(d, p) for _, _, d, p in fake.chunks()] == [("top", 1), ("end", 2)]


# -- order, in flight, batching, seq ---------------------------------------------------------


async def test_a_step_record_waits_for_the_chunks_emitted_before_it(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.hold = True

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        async def talk() -> str:
            await ctx.emit("a")
            await fake.wait_for(lambda: fake.emits)  # in flight (and held)
            await ctx.emit("b")
            await ctx.emit("c")
            return "said"

        await ctx.step("talk", talk)
        await ctx.emit("bye")
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("f1", {}))
        await fake.wait_for(lambda: fake.emits)
        # The step function returned, its chunks are in flight: no record yet.
        assert not fake.ops("f1", "RecordStep")
        fake.release()
        await fake.wait_for(lambda: fake.final("f1"))
    # "a" went at once, "b" and "c" behind it; the record only once both
    # were answered, and the result only after "bye".
    assert [m for m, i in fake.log if i == "f1" and m != "ack"] == [
        "Emit", "Emit", "RecordStep", "Emit", "CompleteIntent"]
    assert [[c.data for c in e.chunks] for e in fake.emits] == [[b"a"], [b"b", b"c"], [b"bye"]]
    assert steps_of(fake, "f1") == [(1, "talk", "said")]


async def test_one_write_in_flight_and_the_rest_gathered_behind_it(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.hold = True
    big = "x" * (60 * 1024)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("first")  # nothing in flight: sent at once
        await fake.wait_for(lambda: len(fake.emits) == 1)
        for i in range(MAX_EMIT_CHUNKS + 10):
            await ctx.emit(str(i))
        await ctx.emit("one", stream="other")
        await ctx.emit("two", stream="other")
        await ctx.emit("back")
        for _ in range(20):
            await ctx.emit(big, stream="big")
        fake.release()
        await ctx.flush_streams()
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("n1", {}))
        await fake.wait_for(lambda: fake.final("n1"))
    assert completed(fake, "n1") == "ok"
    assert fake.max_in_flight == 1
    shape = [(e.stream, len(e.chunks)) for e in fake.emits]
    per_write = MAX_EMIT_BYTES // len(big)
    assert shape == [("default", 1), ("default", MAX_EMIT_CHUNKS), ("default", 10), ("other", 2), ("default", 1),
                     ("big", per_write), ("big", 20 - per_write)]
    assert [e.seq for e in fake.emits] == list(range(1, 8))
    assert [d for _, _, d, _ in fake.chunks("default")] == ["first", *map(str, range(MAX_EMIT_CHUNKS + 10)), "back"]


async def test_an_emit_is_retried_through_an_outage_with_its_seq(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.emit_errors = [(grpc.StatusCode.UNAVAILABLE, "upstream down")]

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("hello")
        await ctx.flush_streams()
        await ctx.emit("again")
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("u1", {}))
        await fake.wait_for(lambda: fake.final("u1"))
    assert completed(fake, "u1") == "ok"
    # The same write twice (a repeat the control plane would recognise), then the next seq.
    assert [(e.seq, [c.data for c in e.chunks]) for e in fake.emits] == [
        (1, [b"hello"]), (1, [b"hello"]), (2, [b"again"])]


# -- errors ------------------------------------------------------------------------------------


async def test_a_limit_refusal_is_raised_once_and_later_emits_go_on(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.emit_errors = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "stream_max_bytes (1024) exceeded")] * 2
    seen: list[Any] = []

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("dropped 1")
        with pytest.raises(StreamLimitExceeded) as info:
            await ctx.flush_streams()
        seen.append((info.value.code, info.value.message, isinstance(info.value, WriteError)))
        await ctx.flush_streams()  # once only
        await ctx.emit("dropped 2")
        # The attempt's own flush before a record does not raise it...
        await ctx.step("s", lambda: 1)
        # ...the next emit does (its chunk is not emitted), and the one after goes.
        with pytest.raises(StreamLimitExceeded):
            await ctx.emit("not emitted")
        await ctx.emit("kept")
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("l1", {}))
        await fake.wait_for(lambda: fake.final("l1"))
    assert completed(fake, "l1") == "ok"
    assert seen == [("RESOURCE_EXHAUSTED", "stream_max_bytes (1024) exceeded", True)]
    assert [d for _, _, d, _ in fake.chunks()] == ["dropped 1", "dropped 2", "kept"]
    assert steps_of(fake, "l1") == [(1, "s", 1)]


async def test_a_rate_refusal_paces_the_write_and_loses_nothing(sidecar: tuple[EmitSidecar, str]) -> None:
    # Refused with a retry-after (the intent's chunks per second), a write is
    # sent again, the same seq, after it: the handler is slowed, never robbed.
    fake, address = sidecar
    agent = make_agent(address)
    fake.emit_errors = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "stream_max_chunks_per_s (5) exceeded")] * 2
    fake.retry_after_ms = 20

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("first")
        await ctx.flush_streams()  # nothing raised: paced, then appended
        await ctx.emit("second")
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("r1", {}))
        await fake.wait_for(lambda: fake.final("r1"))
    assert completed(fake, "r1") == "ok"
    assert [(e.seq, [c.data for c in e.chunks]) for e in fake.emits] == [
        (1, [b"first"]), (1, [b"first"]), (1, [b"first"]), (2, [b"second"])]


async def test_a_write_refused_whole_is_halved_until_what_fits_is_appended(
        sidecar: tuple[EmitSidecar, str]) -> None:
    # Refused without a retry-after (the intent's bytes; more chunks than a
    # second takes), a write is split in halves, each with a higher seq than
    # the one before, so that none of them passes for a repeat.
    fake, address = sidecar
    agent = make_agent(address)
    fake.emit_errors = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big for the window")] * 2

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        for i in range(9):  # no await yields meanwhile: one write of nine
            await ctx.emit(f"c{i}")
        await ctx.flush_streams()  # nothing raised: everything fitted in the end
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("h1", {}))
        await fake.wait_for(lambda: fake.final("h1"))
    assert completed(fake, "h1") == "ok"
    sent = [(e.seq, [c.data.decode() for c in e.chunks]) for e in fake.emits]
    # The nine refused (error 1), their first half refused (error 2), then its halves and the second half.
    assert sent == [(1, [f"c{i}" for i in range(9)]), (2, ["c0", "c1", "c2", "c3"]), (3, ["c0", "c1"]),
                    (4, ["c2", "c3"]), (5, ["c4", "c5", "c6", "c7", "c8"])]
    assert fake._offsets == {"default": 9}  # appended: each chunk once


async def test_a_stale_emit_stops_the_attempt(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.emit_errors = [(grpc.StatusCode.FAILED_PRECONDITION, "stale lease")]
    contexts: list[Context] = []

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        contexts.append(ctx)
        await ctx.emit("a")
        await asyncio.Event().wait()  # a long call that awaits no ctx method
        return "never"

    async with running(agent, fake):
        fake.push(assignment("s1", {}))
        await fake.wait_for(lambda: fake.emits)
        await wait_until(lambda: contexts and contexts[0]._attempt.task is not None
                         and contexts[0]._attempt.task.done())
        assert contexts[0].cancel_reason == "LEASE_LOST"
        with pytest.raises(LeaseLost):
            await contexts[0].emit("b")
    assert fake.final("s1") is None and len(fake.emits) == 1


async def test_a_revoked_attempt_drops_its_buffer(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    fake.hold = True
    contexts: list[Context] = []

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        contexts.append(ctx)
        await ctx.emit("0")
        await fake.wait_for(lambda: fake.emits)
        for i in range(1, 100):
            await ctx.emit(str(i))
        await asyncio.Event().wait()  # until revoked

    async with running(agent, fake):
        fake.push(assignment("v1", {}))
        await fake.wait_for(lambda: fake.emits)
        await wait_until(lambda: contexts and contexts[0]._attempt.streams.buffered == 100)
        fake.push(revocation("v1", "CANCELED"))
        streams = contexts[0]._attempt.streams
        await wait_until(lambda: streams.buffered == 0 and streams._task is not None and streams._task.done())
        fake.release()
    # Only the write in flight when it stopped went out; nothing reported.
    assert [len(e.chunks) for e in fake.emits] == [1]
    assert fake.final("v1") is None
    with pytest.raises(LeaseLost):
        await contexts[0].emit("late")


async def test_bad_chunks_and_stream_names_raise_at_once(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    raised: list[str] = []

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        for bad, error in [(dict(stream="no spaces"), ValueError), (dict(stream="x" * 65), ValueError),
                           (dict(data="y" * (MAX_CHUNK_BYTES + 1)), StreamLimitExceeded),
                           (dict(data={1, 2}), TypeError),
                           (dict(data=float("nan")), TypeError), (dict(data="\udc80"), ValueError)]:
            with pytest.raises(error) as info:
                await ctx.emit(bad.get("data", "d"), stream=bad.get("stream", "default"))
            raised.append(str(info.value))
        await ctx.emit("y" * MAX_CHUNK_BYTES, stream="a-b_c.d:e")
        await ctx.emit([1, "two"], stream="")  # empty: the default stream
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("b1", {}))
        await fake.wait_for(lambda: fake.final("b1"))
    assert completed(fake, "b1") == "ok"
    assert len(raised) == 6 and "stream name" in raised[0] and "64" in raised[1] and "65536" in raised[2]
    assert [(s, f, p) for s, f, _, p in fake.chunks()] == [("a-b_c.d:e", TEXT, 1), ("default", JSON, 1)]


# -- the handed-back position ---------------------------------------------------------------------


async def test_a_retried_step_supersedes_its_earlier_chunks(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        tries = {"n": 0}

        async def flaky() -> int:
            tries["n"] += 1
            await ctx.emit(f"try {tries['n']}")
            await ctx.flush_streams()  # so each try's chunk is its own write
            if tries["n"] < 3:
                raise OSError("again")
            return tries["n"]

        while True:  # a retry loop: every try at position 1
            try:
                n = await ctx.step("flaky", flaky)
                break
            except OSError:
                continue

        async def quiet() -> None:
            raise OSError("no chunks")

        with pytest.raises(OSError):
            await ctx.step("quiet", quiet)  # handed back, but it emitted nothing

        async def loud(name: str) -> None:
            await ctx.emit(name)
            raise OSError(name)

        # Concurrent: neither position is handed back (they are holes), so no supersede.
        await asyncio.gather(ctx.step("c", loud, "c"), ctx.step("d", loud, "d"), return_exceptions=True)
        return n

    async with running(agent, fake):
        fake.push(assignment("h1", {}))
        await fake.wait_for(lambda: fake.final("h1"))
    assert completed(fake, "h1") == 3
    items = fake.items()
    assert items[:5] == [("chunk", "try 1"), ("supersede", 1), ("chunk", "try 2"), ("supersede", 1),
                         ("chunk", "try 3")]
    assert sorted(items[5:]) == [("chunk", "c"), ("chunk", "d")]
    assert [(d, p) for _, _, d, p in fake.chunks()][:3] == [("try 1", 1), ("try 2", 1), ("try 3", 1)]
    assert sorted((d, p) for _, _, d, p in fake.chunks()[3:]) == [("c", 2), ("d", 3)]


# -- def handlers and the bounded buffer ------------------------------------------------------------


async def test_a_def_handler_emits_from_its_threads(sidecar: tuple[EmitSidecar, str]) -> None:
    fake, address = sidecar
    agent = make_agent(address)
    threads: set[str] = set()

    @agent.handler(TYPE)
    def handle(ctx: SyncContext, payload: Any) -> Any:
        threads.add(threading.current_thread().name)
        for i in range(500):
            ctx.emit(f"t{i}")

        def step(name: str) -> str:
            threads.add(threading.current_thread().name)
            ctx.emit(f"in {name}")
            return name

        ctx.step("one", step, "one")
        ctx.parallel(("a", step, "a"), ("b", step, "b"))
        ctx.emit({"done": True})
        ctx.flush_streams()
        return "ok"

    async with running(agent, fake):
        fake.push(assignment("t1", {}))
        await fake.wait_for(lambda: fake.final("t1"))
    assert completed(fake, "t1") == "ok"
    chunks = [(d, p) for _, _, d, p in fake.chunks()]
    assert chunks[:501] == [*((f"t{i}", 1) for i in range(500)), ("in one", 1)]
    assert sorted(chunks[501:503]) == [("in a", 2), ("in b", 3)]
    assert chunks[503:] == [({"done": True}, 4)]
    assert len(threads) >= 2 and threading.current_thread().name not in threads


@pytest.mark.parametrize("kind", ["async", "def"])
@pytest.mark.parametrize("bound", ["chunks", "bytes"])
async def test_a_full_buffer_holds_the_emit_until_there_is_room(
        sidecar: tuple[EmitSidecar, str], monkeypatch: pytest.MonkeyPatch, kind: str, bound: str) -> None:
    fake, address = sidecar
    if bound == "chunks":
        monkeypatch.setattr(agent_emitter, "MAX_BUFFER_CHUNKS", 10)
    else:
        monkeypatch.setattr(agent_emitter, "MAX_BUFFER_BYTES", 10 * 4)  # ten chunks of 4 bytes
    agent = make_agent(address)
    fake.hold = True
    count = {"n": 0}
    contexts: list[Any] = []

    if kind == "async":
        @agent.handler(TYPE)
        async def handle(ctx: Context, payload: Any) -> Any:
            contexts.append(ctx)
            for i in range(25):
                await ctx.emit(f"{i:04d}")
                count["n"] += 1
            return "ok"
    else:
        @agent.handler(TYPE)
        def handle_sync(ctx: SyncContext, payload: Any) -> Any:
            contexts.append(ctx)
            for i in range(25):
                ctx.emit(f"{i:04d}")
                count["n"] += 1
            return "ok"

    async with running(agent, fake):
        fake.push(assignment("w1", {}))
        await fake.wait_for(lambda: fake.emits)
        # One in flight and nine queued fill it: the eleventh emit waits.
        await wait_until(lambda: contexts and contexts[0]._attempt.streams._room_waiters)
        assert count["n"] == 10 and contexts[0]._attempt.streams.buffered == 10
        fake.release()
        await fake.wait_for(lambda: fake.final("w1"))
    assert completed(fake, "w1") == "ok"
    assert [d for _, _, d, _ in fake.chunks()] == [f"{i:04d}" for i in range(25)]
    assert fake.max_in_flight == 1


async def test_an_uncaught_stream_limit_fails_the_intent_for_good(sidecar: tuple[EmitSidecar, str]) -> None:
    # Another attempt would be refused the same way (a stream's bytes only
    # grow; an oversized chunk is the handler's own): not retryable.
    fake, address = sidecar
    agent = make_agent(address)

    @agent.handler(TYPE)
    async def handle(ctx: Context, payload: Any) -> Any:
        await ctx.emit("z" * (MAX_CHUNK_BYTES + 1))
        return "never"

    async with running(agent, fake):
        fake.push(assignment("x1", {}))
        await fake.wait_for(lambda: fake.final("x1"))
    outcome = fake.final("x1")
    assert outcome is not None
    method, request = outcome
    assert (method, request.fail.code, request.fail.retryable) == ("FailIntent", "STREAM_LIMIT_EXCEEDED", False)
