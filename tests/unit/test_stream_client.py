"""The client's stream readers (``client.stream``, ``client.streams``) against
a real gRPC server on loopback serving a fake IntentService: it streams a
prepared log of entries in pages, follows it live as the test appends, ends
with the final intent, and breaks calls with UNAVAILABLE (or answers another
status) where a test asks, so resuming is tested over real calls."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from intentd.client import (
    AsyncIntentClient,
    FailedPrecondition,
    IntentClient,
    IntentState,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StreamEntry,
    Superseded,
    Unavailable,
)
from intentd.client.models import IntentType as IntentTypeModel
from intentd.client.models import intent_type_from_proto, stream_entry_from_proto
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import intent_pb2, stream_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from tests.support import wait_until

ID = "01jstream0000000000000000000"
FAST: dict[str, Any] = {"initial_backoff": 0.001, "max_backoff": 0.005}
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def text(offset: int, data: str, *, attempt: int = 1, position: int = 1) -> stream_pb2.StreamEntry:
    entry = stream_pb2.StreamEntry(offset=offset, attempt=attempt, position=position,
                                   format=stream_pb2.CHUNK_FORMAT_TEXT, data=data.encode())
    entry.time.FromDatetime(T0)
    return entry


def jchunk(offset: int, value: Any, *, attempt: int = 1, position: int = 1) -> stream_pb2.StreamEntry:
    return stream_pb2.StreamEntry(offset=offset, attempt=attempt, position=position,
                                  format=stream_pb2.CHUNK_FORMAT_JSON, data=json.dumps(value).encode())


def marker(offset: int, positions: list[int], *, attempt: int = 2,
           reason: int = stream_pb2.SUPERSEDE_REASON_REDELIVERED) -> stream_pb2.StreamEntry:
    return stream_pb2.StreamEntry(offset=offset, attempt=attempt,
                                  superseded=stream_pb2.Superseded(positions=positions, reason=reason))


def final_intent(state: int = intent_pb2.INTENT_STATE_COMPLETED, **fields: Any) -> intent_pb2.Intent:
    return intent_pb2.Intent(id=ID, intent_type="intent.a.b.v1", to_agent="agent://a/b/c", state=state,
                             attempt=2, max_attempts=3, **fields)


def texts(n: int, start: int = 0) -> list[stream_pb2.StreamEntry]:
    return [text(i, f"t{i} ") for i in range(start, start + n)]


@dataclass
class FakeStreams:
    """The fake IntentService's state: one stream's log, the end, and the
    scripted failures. Every StreamIntent call is recorded."""

    log: list[stream_pb2.StreamEntry] = field(default_factory=list)
    end: intent_pb2.Intent | None = None
    # Entries per message.
    page: int = 3
    # Break the call with UNAVAILABLE once the entry at this offset was sent
    # (each break once, the first time it is reached).
    breaks: list[int] = field(default_factory=list)
    # Statuses the next calls answer at once, in order.
    refusals: list[grpc.StatusCode] = field(default_factory=list)
    # The status the n-th StreamIntent call (1-based) answers at once.
    refuse_call: dict[int, grpc.StatusCode] = field(default_factory=dict)
    # A resumed call (from_offset > 0) starts this many entries early, as a
    # server whose resume overlaps would.
    overlap: int = 0
    # The next calls end cleanly after what is stored, without the final message.
    cuts: int = 0
    requests: list[pb.StreamIntentRequest] = field(default_factory=list)
    infos: list[stream_pb2.StreamInfo] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def append(self, *entries: stream_pb2.StreamEntry) -> None:
        with self.cond:
            self.log.extend(entries)
            self.cond.notify_all()

    def finish(self, intent: intent_pb2.Intent) -> None:
        with self.cond:
            self.end = intent
            self.cond.notify_all()

    def calls(self) -> list[int]:
        with self.cond:
            return [r.from_offset for r in self.requests]


class FakeIntentService(pb_grpc.IntentServiceServicer):
    def __init__(self, state: FakeStreams) -> None:
        self.state = state

    def StreamIntent(self, request: pb.StreamIntentRequest,
                     context: grpc.ServicerContext) -> Iterator[pb.StreamIntentResponse]:
        s = self.state
        with s.cond:
            s.requests.append(request)
            refusal = s.refusals.pop(0) if s.refusals else s.refuse_call.get(len(s.requests))
            if refusal is not None:
                context.abort(refusal, "refused by the fake")
            cut = s.cuts > 0
            s.cuts -= cut
        cursor = request.from_offset
        if cursor > 0:
            cursor = max(0, cursor - s.overlap)
        while True:
            with s.cond:
                s.cond.wait_for(functools.partial(self._ready, cursor, cut, context), timeout=1.0)
                if not context.is_active():
                    return
                batch = s.log[cursor:cursor + s.page]
                ended = s.end if cursor + len(batch) >= len(s.log) else None
            hit = next((e.offset for e in batch if e.offset in s.breaks), None)
            if hit is not None:
                batch = [e for e in batch if e.offset <= hit]
                s.breaks.remove(hit)
                ended = None
            if batch or ended is not None:
                yield pb.StreamIntentResponse(entries=batch, intent=ended)
            cursor += len(batch)
            if hit is not None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the fake broke the call")
            if ended is not None:
                return
            if cut and cursor >= len(s.log):
                return

    def _ready(self, cursor: int, cut: bool, context: grpc.ServicerContext) -> bool:
        s = self.state
        return len(s.log) > cursor or s.end is not None or cut or not context.is_active()

    def ListIntentStreams(self, request: pb.ListIntentStreamsRequest,
                          context: grpc.ServicerContext) -> pb.ListIntentStreamsResponse:
        s = self.state
        with s.cond:
            if s.refusals:
                context.abort(s.refusals.pop(0), "refused by the fake")
        return pb.ListIntentStreamsResponse(streams=s.infos)


@dataclass
class FakeServer:
    address: str
    state: FakeStreams


@pytest.fixture(name="fake")
def fake_fixture() -> Iterator[FakeServer]:
    state = FakeStreams()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_IntentServiceServicer_to_server(FakeIntentService(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", state)
    finally:
        # Wake live calls so they see the server going.
        state.finish(final_intent())
        server.stop(grace=None).wait()


def offsets(entries: list[StreamEntry]) -> list[int]:
    return [e.offset for e in entries]


# ---------------------------------------------------------------- models


def test_entries_decode_by_format() -> None:
    t = stream_entry_from_proto(text(4, "héllo", attempt=2, position=3))
    assert (t.offset, t.attempt, t.position, t.time, t.format, t.data, t.raw, t.superseded, t.is_marker) == (
        4, 2, 3, T0, "text", "héllo", "héllo".encode(), None, False)
    j = stream_entry_from_proto(jchunk(5, {"tokens": [1, 2]}))
    assert (j.format, j.data, j.time) == ("json", {"tokens": [1, 2]}, None)
    m = stream_entry_from_proto(marker(6, [3, 4]))
    assert (m.format, m.data, m.raw, m.position, m.is_marker) == (None, None, b"", 0, True)
    assert m.superseded == Superseded((3, 4), "REDELIVERED")
    retried = stream_entry_from_proto(marker(7, [2], reason=stream_pb2.SUPERSEDE_REASON_STEP_RETRIED))
    assert retried.superseded == Superseded((2,), "STEP_RETRIED")
    # UNSPECIFIED is text (EmitChunk's rule); a format from a newer server keeps only raw.
    plain = stream_entry_from_proto(stream_pb2.StreamEntry(offset=1, data=b"x"))
    assert (plain.format, plain.data) == ("text", "x")
    newer = stream_entry_from_proto(stream_pb2.StreamEntry(offset=1, data=b"\x00", format=9))  # type: ignore[arg-type]
    assert (newer.format, newer.data, newer.raw, newer.is_marker) == (None, None, b"\x00", False)


def test_intent_type_carries_stream_keep_ms() -> None:
    assert not IntentTypeModel(intent_type="t.x.v1").to_proto().HasField("stream_keep_ms")
    zero = IntentTypeModel(intent_type="t.x.v1", stream_keep_ms=0).to_proto()
    assert zero.HasField("stream_keep_ms") and zero.stream_keep_ms == 0
    assert intent_type_from_proto(admin_pb.IntentType(intent_type="t.x.v1", stream_keep_ms=5000)).stream_keep_ms == 5000
    assert intent_type_from_proto(admin_pb.IntentType(intent_type="t.x.v1")).stream_keep_ms is None


# ---------------------------------------------------------------- blocking reader


def test_reads_to_the_end_with_the_final_intent(fake: FakeServer) -> None:
    fake.state.append(*texts(5), jchunk(5, [1]), marker(6, [1]))
    fake.state.finish(final_intent(result=b'{"ok":true}'))
    with IntentClient(fake.address, **FAST) as client:
        reader = client.stream(ID, "answer", skip_superseded=True)
        assert reader.intent is None and reader.next_offset == 0
        entries = list(reader)
        assert offsets(entries) == list(range(7))
        assert [e.format for e in entries] == ["text"] * 5 + ["json", None]
        assert reader.intent is not None and reader.intent.state is IntentState.COMPLETED
        assert reader.intent.result == {"ok": True}
        assert reader.next_offset == 7
        # Iterating again after the end makes no call.
        assert list(reader) == []
    request = fake.state.requests[0]
    assert (request.id, request.stream, request.from_offset, request.skip_superseded) == (ID, "answer", 0, True)
    assert len(fake.state.requests) == 1


def test_resumes_after_unavailable_without_gap_or_duplicate(fake: FakeServer) -> None:
    # Breaks mid-page and at a page's end, three in all: a budget of 2 retries
    # is enough since every reconnect makes progress, and the server is asked
    # for exactly the next offset each time.
    fake.state.append(*texts(10))
    fake.state.finish(final_intent())
    fake.state.breaks = [1, 5, 8]
    with IntentClient(fake.address, max_retries=2, **FAST) as client:
        entries = list(client.stream(ID))
    assert offsets(entries) == list(range(10))
    assert [e.data for e in entries] == [f"t{i} " for i in range(10)]
    assert fake.state.calls() == [0, 2, 6, 9]


def test_an_overlapping_resume_hands_nothing_out_twice(fake: FakeServer) -> None:
    fake.state.append(*texts(8))
    fake.state.finish(final_intent())
    fake.state.breaks = [2, 5]
    fake.state.overlap = 2
    with IntentClient(fake.address, **FAST) as client:
        assert offsets(list(client.stream(ID))) == list(range(8))
    assert fake.state.calls() == [0, 3, 6]


def test_follows_live_appends_until_the_end(fake: FakeServer) -> None:
    fake.state.append(text(0, "a"))
    with IntentClient(fake.address, **FAST) as client, client.stream(ID) as reader:
        seen = [next(reader).offset]
        fake.state.append(text(1, "b"), text(2, "c"))
        seen += [next(reader).offset, next(reader).offset]
        assert reader.intent is None
        fake.state.append(jchunk(3, {"done": True}))
        fake.state.finish(final_intent(state=intent_pb2.INTENT_STATE_FAILED))
        seen += [e.offset for e in reader]
        assert reader.intent is not None and reader.intent.state is IntentState.FAILED
    assert seen == [0, 1, 2, 3]
    assert fake.state.calls() == [0]


def test_a_reader_left_mid_page_resumes_at_its_next_offset(fake: FakeServer) -> None:
    fake.state.page = 5
    fake.state.append(*texts(5))
    fake.state.finish(final_intent())
    with IntentClient(fake.address, **FAST) as client:
        with client.stream(ID) as first:
            got = [next(first).offset, next(first).offset]
        assert first.next_offset == 2
        assert list(first) == []  # closed: ends at once
        rest = client.stream(ID, from_offset=first.next_offset)
        got += offsets(list(rest))
    assert got == [0, 1, 2, 3, 4]
    assert fake.state.calls() == [0, 2]


def test_a_clean_end_without_the_final_message_reconnects(fake: FakeServer) -> None:
    fake.state.append(*texts(3))
    fake.state.cuts = 1

    def after_the_reconnect() -> None:
        wait_until(lambda: len(fake.state.calls()) == 2)
        fake.state.append(text(3, "late"))
        fake.state.finish(final_intent())

    writer = threading.Thread(target=after_the_reconnect)
    writer.start()
    with IntentClient(fake.address, **FAST) as client, client.stream(ID) as reader:
        assert offsets(list(reader)) == [0, 1, 2, 3]
        assert reader.intent is not None
    writer.join()
    assert fake.state.calls() == [0, 3]


def test_the_retry_budget_runs_out_without_progress(fake: FakeServer) -> None:
    fake.state.append(*texts(2))
    fake.state.refusals = [grpc.StatusCode.UNAVAILABLE] * 3
    with IntentClient(fake.address, max_retries=2, **FAST) as client:
        with pytest.raises(Unavailable):
            list(client.stream(ID))
    assert fake.state.calls() == [0, 0, 0]


@pytest.mark.parametrize("code, error", [
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
])
def test_other_errors_are_typed_and_not_retried(fake: FakeServer, code: grpc.StatusCode, error: type) -> None:
    fake.state.refusals = [code]
    with IntentClient(fake.address, **FAST) as client:
        with pytest.raises(error) as info:
            list(client.stream(ID))
    assert info.value.details == "refused by the fake"
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert len(fake.state.requests) == 1


def test_an_error_after_a_resume_still_raises(fake: FakeServer) -> None:
    fake.state.append(*texts(4))
    fake.state.breaks = [1]
    with IntentClient(fake.address, **FAST) as client:
        reader = client.stream(ID)
        got = [next(reader).offset, next(reader).offset]
        with fake.state.cond:
            fake.state.refusals = [grpc.StatusCode.FAILED_PRECONDITION]
        with pytest.raises(FailedPrecondition):
            got += offsets(list(reader))
    assert got == [0, 1] and reader.next_offset == 2
    assert fake.state.calls() == [0, 2]


def test_negative_offset_is_refused_before_any_call(fake: FakeServer) -> None:
    with IntentClient(fake.address, **FAST) as client:
        with pytest.raises(InvalidArgument, match="from_offset"):
            client.stream(ID, from_offset=-1)
    assert fake.state.requests == []


def test_streams_lists_infos(fake: FakeServer) -> None:
    info = stream_pb2.StreamInfo(name="default", next_offset=12, bytes=345, pruned=True)
    info.create_time.FromDatetime(T0)
    fake.state.infos = [info, stream_pb2.StreamInfo(name="tokens")]
    fake.state.refusals = [grpc.StatusCode.UNAVAILABLE]  # retried like every unary call
    with IntentClient(fake.address, **FAST) as client:
        first, second = client.handle(ID).streams()
    assert (first.name, first.next_offset, first.bytes, first.pruned, first.create_time, first.update_time) == (
        "default", 12, 345, True, T0, None)
    assert (second.name, second.next_offset, second.pruned) == ("tokens", 0, False)


# ---------------------------------------------------------------- asyncio reader


async def test_async_reader_resumes_and_ends(fake: FakeServer) -> None:
    fake.state.append(*texts(6), marker(6, [1], reason=stream_pb2.SUPERSEDE_REASON_STEP_RETRIED))
    fake.state.finish(final_intent(state=intent_pb2.INTENT_STATE_CANCELED, cancel_reason="stop"))
    fake.state.breaks = [0, 4]
    async with AsyncIntentClient(fake.address, **FAST) as client:
        reader = client.handle(ID).stream("tokens", 0)
        entries = [e async for e in reader]
        assert offsets(entries) == list(range(7))
        assert entries[-1].superseded == Superseded((1,), "STEP_RETRIED")
        assert reader.intent is not None and reader.intent.state is IntentState.CANCELED
        assert reader.next_offset == 7
    assert fake.state.calls() == [0, 1, 5]
    assert {r.stream for r in fake.state.requests} == {"tokens"}


async def test_async_reader_closed_early_ends_its_call(fake: FakeServer) -> None:
    fake.state.append(*texts(2))
    async with AsyncIntentClient(fake.address, **FAST) as client:
        async with client.stream(ID, from_offset=1) as reader:
            first = await anext(reader)
        assert first.offset == 1 and reader.next_offset == 2
        assert [e async for e in reader] == []
        fake.state.refusals = [grpc.StatusCode.NOT_FOUND]
        with pytest.raises(NotFound):
            await client.streams(ID)


# ---------------------------------------------------------------- the Node client


NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"


def node_client(fake: FakeServer, *args: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("node and examples/node/node_modules (npm ci) are needed for the Node client")
    return subprocess.run([node, str(NODE_DIR / "client.js"), "stream", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "INTENTD_SERVER": fake.address})


def test_node_client_streams_resumes_and_ends(fake: FakeServer) -> None:
    fake.state.append(text(0, "héllo "), jchunk(1, {"n": 1}, position=2), marker(2, [2]), *texts(4, start=3))
    fake.state.breaks = [1, 4]
    fake.state.overlap = 1
    fake.state.finish(final_intent(state=intent_pb2.INTENT_STATE_FAILED))
    done = node_client(fake, ID, "tokens", "0")
    assert done.returncode == 1, done.stderr + done.stdout  # ended, not COMPLETED
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[:3] == [
        {"offset": 0, "attempt": 1, "position": 1, "format": "text", "data": "héllo "},
        {"offset": 1, "attempt": 1, "position": 2, "format": "json", "data": {"n": 1}},
        {"offset": 2, "attempt": 2, "position": 0, "superseded": {"positions": [2], "reason": "REDELIVERED"}},
    ]
    assert [line.get("offset") for line in lines[3:-1]] == [3, 4, 5, 6]
    assert lines[-1] == {"end": "FAILED"}
    assert fake.state.calls() == [0, 2, 5]
    assert {r.stream for r in fake.state.requests} == {"tokens"}


def test_node_client_stream_from_an_offset_and_errors(fake: FakeServer) -> None:
    fake.state.append(*texts(3))
    fake.state.finish(final_intent())
    done = node_client(fake, ID, "", "2")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        {"offset": 2, "attempt": 1, "position": 1, "format": "text", "data": "t2 "}, {"end": "COMPLETED"}]
    assert fake.state.requests[0].stream == "default" and fake.state.requests[0].from_offset == 2
    fake.state.refusals = [grpc.StatusCode.NOT_FOUND]
    missing = node_client(fake, ID)
    assert missing.returncode == 1 and "NOT_FOUND: refused by the fake" in missing.stderr
    assert missing.stdout == ""
