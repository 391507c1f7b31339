"""The read path of streams (docs/streams.md): StreamIntent and
ListIntentStreams on real servers and a real PostgreSQL.

Frames are appended here with plain SQL the way the emit statement appends
them (the head's next_offset update orders them, one INSERT per append, whose
statement-level trigger sends the intentd_streams notification), so these
tests do not depend on the write path."""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest

from intentd.client import IntentClient
from intentd.core.limits import MAX_STREAM_PAGE_BYTES, MAX_STREAM_PAGE_ENTRIES
from intentd.generated.v1 import intent_pb2, stream_pb2
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc
from intentd.server.hub import NotificationHub, parse_streams
from intentd.server.queries import Q
from intentd.testing import bulk
from tests.support import Keys, bearer, run_sync, sql, wait_until

TYPE = "intent.streams.read.v1"
TEXT, JSON = stream_pb2.CHUNK_FORMAT_TEXT, stream_pb2.CHUNK_FORMAT_JSON
REDELIVERED, STEP_RETRIED = stream_pb2.SUPERSEDE_REASON_REDELIVERED, stream_pb2.SUPERSEDE_REASON_STEP_RETRIED

# One append: the head row is created or moved on (that UPDATE orders the
# stream's appends), then one frame inserted.
_APPEND = """
WITH head AS (
    INSERT INTO intent_streams AS s (intent_id, name, next_offset, bytes)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (intent_id, name) DO UPDATE
        SET next_offset = s.next_offset + $3, bytes = s.bytes + $4, update_time = now()
    RETURNING next_offset
)
INSERT INTO stream_frames (intent_id, stream, end_offset, first_offset, attempt, positions, formats, data,
                           superseded, reason)
SELECT $1, $2, next_offset, next_offset - $3, $5, $6::int[], $7::smallint[], $8::bytea[], $9::int[], $10
FROM head
RETURNING first_offset
"""


@dataclass(frozen=True)
class Chunk:
    data: bytes
    position: int = 1
    format: int = TEXT


def text(*parts: str, position: int = 1) -> list[Chunk]:
    return [Chunk(p.encode(), position) for p in parts]


class Frames:
    """Appends to streams the way the write path does, with plain SQL."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url

    def append(self, intent_id: str, chunks: Sequence[Chunk], stream: str = "default", attempt: int = 1) -> int:
        """Appends one frame; returns its first offset."""
        rows = sql(self.url, _APPEND, intent_id, stream, len(chunks), sum(len(c.data) for c in chunks), attempt,
                   [c.position for c in chunks], [c.format for c in chunks], [c.data for c in chunks], None, None)
        return int(rows[0]["first_offset"])

    def marker(self, intent_id: str, positions: Sequence[int], reason: int, attempt: int,
               stream: str = "default") -> int:
        rows = sql(self.url, _APPEND, intent_id, stream, 1, 0, attempt, [0], [0], [b""], list(positions), reason)
        return int(rows[0]["first_offset"])

    def append_many(self, intent_id: str, frames: Sequence[Sequence[Chunk]], stream: str = "default") -> None:
        """Each frame its own statement and transaction, on one connection."""
        async def go() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                for chunks in frames:
                    await conn.execute(_APPEND, intent_id, stream, len(chunks), sum(len(c.data) for c in chunks), 1,
                                       [c.position for c in chunks], [c.format for c in chunks],
                                       [c.data for c in chunks], None, None)
            finally:
                await conn.close()

        run_sync(go(), timeout=120)


@pytest.fixture
def frames(database_url: str) -> Frames:
    return Frames(database_url)


@dataclass
class Read:
    entries: list[stream_pb2.StreamEntry] = field(default_factory=list)
    pages: list[pb.StreamIntentResponse] = field(default_factory=list)
    intent: intent_pb2.Intent | None = None
    error: grpc.RpcError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def offsets(self) -> list[int]:
        return [e.offset for e in self.entries]

    @property
    def texts(self) -> list[str]:
        return [e.data.decode() for e in self.entries]


def consume(call: Any, into: Read) -> Read:
    try:
        for reply in call:
            assert into.intent is None, "a message after the last one"
            into.pages.append(reply)
            into.entries.extend(reply.entries)
            if reply.HasField("intent"):
                into.intent = reply.intent
    except grpc.RpcError as exc:
        into.error = exc
    finally:
        into.done.set()
    return into


def read(address: str, intent_id: str, stream: str = "", from_offset: int = 0, skip: bool = False,
         metadata: list[tuple[str, str]] | None = None) -> Read:
    """A whole StreamIntent call (the intent must end, or this times out)."""
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.IntentServiceStub(channel).StreamIntent(
            pb.StreamIntentRequest(id=intent_id, stream=stream, from_offset=from_offset, skip_superseded=skip),
            metadata=metadata, timeout=60)
        return consume(call, Read())


@contextlib.contextmanager
def following(address: str, intent_id: str, stream: str = "", from_offset: int = 0, skip: bool = False,
              metadata: list[tuple[str, str]] | None = None) -> Iterator[Read]:
    """A StreamIntent call read on a thread while the test appends."""
    out = Read()
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.IntentServiceStub(channel).StreamIntent(
            pb.StreamIntentRequest(id=intent_id, stream=stream, from_offset=from_offset, skip_superseded=skip),
            metadata=metadata, timeout=60)
        thread = threading.Thread(target=consume, args=(call, out), daemon=True)
        thread.start()
        try:
            yield out
        finally:
            if not out.done.is_set():
                call.cancel()
            thread.join(10)


def subscribed(srv: Any, intent_id: str, stream: str = "default", readers: int = 1) -> Callable[[], bool]:
    """The server's readers of the stream have subscribed (they read after that)."""
    return lambda: len(srv.plane.hub._streams.get((intent_id, stream), ())) >= readers


def new_intent(address: str, agent_address: str, metadata: list[tuple[str, str]] | None = None) -> str:
    # Nobody serves the address: the intent stays PENDING (not terminal) until canceled.
    with IntentClient(address, metadata=metadata or ()) as client:
        return client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})


def cancel(address: str, intent_id: str, metadata: list[tuple[str, str]] | None = None) -> None:
    with IntentClient(address, metadata=metadata or ()) as client:
        client.cancel(intent_id, reason="done reading")


async def pending_intent(pg: asyncpg.Connection, agent_address: str) -> str:
    """A PENDING intent written directly, for tests below the services."""
    intent_id = "01" + uuid.uuid4().hex[:24]
    await pg.execute("INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts, "
                     "heartbeat_timeout_ms, available_at, create_time, update_time) "
                     "VALUES ($1, 'default', $2, $3, 't', '{}', 3, 10000, now(), now(), now())",
                     intent_id, TYPE, agent_address)
    return intent_id


def code_of(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details() or ""


# ---------------------------------------------------------------- the hub


def test_stream_lines_parse_with_colons_in_the_name() -> None:
    assert list(parse_streams("01abc:default:7")) == [("01abc", "default", 7)]
    assert list(parse_streams("01abc:a:b:c:12\n01def:x:3")) == [("01abc", "a:b:c", 12), ("01def", "x", 3)]
    assert list(parse_streams("01abc:tokens:oops")) == [("01abc", "tokens", None)]
    assert list(parse_streams("")) == []


async def test_frames_wake_their_stream_readers_and_not_the_intents_watchers(
        database_url: str, agent_address: str, pg: asyncpg.Connection) -> None:
    hub = NotificationHub(database_url)
    await hub.start()
    try:
        intent_id = await pending_intent(pg, agent_address)
        with hub.subscribe_intent(intent_id) as watcher, \
                hub.subscribe_stream(intent_id, "a:b") as reader, \
                hub.subscribe_stream(intent_id, "other") as other:
            await pg.execute(_APPEND, intent_id, "a:b", 1, 1, 1, [1], [TEXT], [b"x"], None, None)
            assert await reader.wait(10)
            # The same notification reached every subscriber: none but the reader was woken.
            assert not reader.intent_moved
            assert not watcher._event.is_set() and not other._event.is_set()
            # An event of the intent wakes both, and tells the reader the intent moved.
            await pg.execute("SELECT pg_notify('intentd_events', $1)", f"{intent_id}:2:CANCELED")
            assert await reader.wait(10) and reader.intent_moved
            assert await watcher.wait(10)
        assert (intent_id, "a:b") not in hub._streams and intent_id not in hub._intents
    finally:
        await hub.close()


# ---------------------------------------------------------------- reading


def test_reads_from_any_offset_then_follows_live_until_the_end(server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    assert frames.append(intent_id, text("a", "b", "c")) == 0
    assert frames.append(intent_id, text("d", "e", "f", "g", position=2)) == 3
    with following(server.address, intent_id) as whole, \
            following(server.address, intent_id, from_offset=4) as middle, \
            following(server.address, intent_id, from_offset=7) as at_end, \
            following(server.address, intent_id, from_offset=9) as past_end:
        wait_until(subscribed(server, intent_id, readers=4), what="four readers")
        wait_until(lambda: len(whole.entries) == 7 and len(middle.entries) == 3, what="the stored entries")
        assert whole.texts == list("abcdefg") and whole.offsets == list(range(7))
        # A frame is cut at the cursor: 4 is the second entry of the second frame.
        assert middle.offsets == [4, 5, 6] and middle.texts == ["e", "f", "g"]
        assert at_end.entries == [] and past_end.entries == []
        # Live: several appends, each seen as it commits, in order.
        for i, word in enumerate(["h", "i", "j", "k", "l"]):
            frames.append(intent_id, text(word, position=3))
            wait_until(lambda n=8 + i: len(whole.entries) == n, what=f"live entry {7 + i}")
        wait_until(lambda: len(past_end.entries) == 3, what="the reader past the end")
        assert past_end.offsets == [9, 10, 11] and past_end.texts == ["j", "k", "l"]
        assert not whole.done.is_set()
        cancel(server.address, intent_id)
        for reader in (whole, middle, at_end, past_end):
            assert reader.done.wait(20) and reader.error is None
            assert reader.intent is not None and reader.intent.state == intent_pb2.INTENT_STATE_CANCELED
            assert reader.intent.id == intent_id
            assert not reader.pages[-1].entries  # the last message carries the intent only
    assert whole.texts == list("abcdefghijkl") and whole.offsets == list(range(12))
    assert at_end.offsets == [7, 8, 9, 10, 11]
    assert {e.attempt for e in whole.entries} == {1}
    assert [e.position for e in whole.entries] == [1] * 3 + [2] * 4 + [3] * 5
    assert all(e.format == TEXT and e.time.seconds > 0 and not e.HasField("superseded") for e in whole.entries)


def test_a_terminal_intent_is_read_to_its_end_and_an_empty_stream_is_not_missing(
        server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    frames.append(intent_id, [Chunk(b'{"n": 1}', 1, JSON), Chunk(b"tail", 2, TEXT)])
    frames.append(intent_id, text("x"), stream="tokens.v1:a")
    cancel(server.address, intent_id)
    done = read(server.address, intent_id)
    assert done.error is None and done.offsets == [0, 1] and [e.format for e in done.entries] == [JSON, TEXT]
    assert done.intent is not None and done.intent.state == intent_pb2.INTENT_STATE_CANCELED
    assert read(server.address, intent_id, "tokens.v1:a").texts == ["x"]
    # A stream nothing was emitted to is empty: the end comes at once.
    empty = read(server.address, intent_id, "never")
    assert empty.error is None and empty.entries == [] and empty.intent is not None
    beyond = read(server.address, intent_id, from_offset=100)
    assert beyond.entries == [] and beyond.intent is not None


def test_skip_superseded_leaves_out_what_a_marker_supersedes(server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    frames.append(intent_id, [Chunk(b"p1", 1), Chunk(b"p1b", 1), Chunk(b"p2", 2)])   # 0, 1, 2
    frames.append(intent_id, [Chunk(b"p3", 3)])                                        # 3
    frames.marker(intent_id, [2, 3], REDELIVERED, attempt=2)                           # 4
    frames.append(intent_id, [Chunk(b"p2 again", 2), Chunk(b"p3 again", 3)])           # 5, 6
    frames.marker(intent_id, [3], STEP_RETRIED, attempt=2)                             # 7
    frames.append(intent_id, [Chunk(b"p3 third", 3)])                                  # 8
    cancel(server.address, intent_id)

    everything = read(server.address, intent_id)
    assert everything.offsets == list(range(9))
    marker = everything.entries[4]
    assert marker.HasField("superseded") and list(marker.superseded.positions) == [2, 3]
    assert marker.superseded.reason == REDELIVERED and marker.attempt == 2
    assert marker.position == 0 and marker.format == stream_pb2.CHUNK_FORMAT_UNSPECIFIED and marker.data == b""
    assert everything.entries[7].superseded.reason == STEP_RETRIED

    skipped = read(server.address, intent_id, skip=True)
    assert skipped.offsets == [0, 1, 4, 5, 7, 8]
    assert skipped.texts == ["p1", "p1b", "", "p2 again", "", "p3 third"]
    # Only markers from from_offset on count: the one at 4 does not (2 and 3 are below 5).
    later = read(server.address, intent_id, from_offset=5, skip=True)
    assert later.offsets == [5, 7, 8]


def test_pages_are_bounded_and_a_frame_may_span_pages(server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    many = [Chunk(b"t", 1 + i // 1000) for i in range(MAX_STREAM_PAGE_ENTRIES + 904)]
    frames.append(intent_id, many)  # one frame of 5000 entries
    big = b"y" * 65536
    for _ in range(4):
        frames.append(intent_id, [Chunk(big, 9)] * 10)  # 640 KiB a frame
    cancel(server.address, intent_id)
    done = read(server.address, intent_id)
    assert done.error is None
    assert done.offsets == list(range(5040))
    sizes = [len(p.entries) for p in done.pages]
    assert sizes[0] == MAX_STREAM_PAGE_ENTRIES and sizes[-1] == 0
    assert all(0 < n <= MAX_STREAM_PAGE_ENTRIES for n in sizes[:-1])
    for page in done.pages:
        assert sum(len(e.data) for e in page.entries) <= MAX_STREAM_PAGE_BYTES
    # The 40 big chunks need three pages at least, and frames are cut across them.
    page_of = {e.offset: n for n, page in enumerate(done.pages) for e in page.entries}
    assert len({page_of[offset] for offset in range(5000, 5040)}) >= 3
    assert any(len({page_of[offset] for offset in range(first, first + 10)}) == 2 for first in range(5000, 5040, 10))
    assert page_of[4095] != page_of[4096]  # the frame of 5000 entries spans two


def test_a_reader_on_another_replica_gets_live_entries(make_server, frames, agent_address) -> None:
    one, two = make_server(), make_server()
    intent_id = new_intent(one.address, agent_address)
    with following(two.address, intent_id) as reader:
        wait_until(subscribed(two, intent_id), what="the reader on the second replica")
        frames.append(intent_id, text("a"))
        wait_until(lambda: reader.texts == ["a"], what="the first entry")
        frames.append(intent_id, text("b", "c"))
        wait_until(lambda: reader.texts == ["a", "b", "c"], what="the next ones")
        cancel(one.address, intent_id)
        assert reader.done.wait(20) and reader.intent is not None


def test_without_the_notification_a_following_reader_still_reads(databases, make_server, agent_address) -> None:
    """A lost notification costs a few seconds, never the entries: the
    reader reads again every REREAD_SECONDS while it follows."""
    url = databases.create()
    sql(url, "ALTER TABLE stream_frames DISABLE TRIGGER stream_frames_notify")
    srv = make_server(database_url=url)
    frames = Frames(url)
    intent_id = new_intent(srv.address, agent_address)
    with following(srv.address, intent_id) as reader:
        wait_until(subscribed(srv, intent_id), what="the reader")
        frames.append(intent_id, text("quiet"))
        wait_until(lambda: reader.texts == ["quiet"], timeout=20, what="the re-read")


def test_a_reader_that_does_not_read_slows_nobody(server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    frames.append(intent_id, text("first"))
    chunk = b"z" * 65536
    n = 640  # 40 MiB: more than gRPC's flow-control windows and the sockets hold
    with grpc.insecure_channel(server.address) as channel:
        slow = pb_grpc.IntentServiceStub(channel).StreamIntent(pb.StreamIntentRequest(id=intent_id), timeout=120)
        assert [e.data for e in next(slow).entries] == [b"first"]
        with following(server.address, intent_id) as fast:
            wait_until(subscribed(server, intent_id, readers=2), what="both readers")
            frames.append_many(intent_id, [[Chunk(chunk, 2)] * 4 for _ in range(n // 4)])
            # Every write committed while the slow reader was not reading.
            rows = sql(frames.url, "SELECT next_offset FROM intent_streams WHERE intent_id = $1", intent_id)
            assert rows[0]["next_offset"] == n + 1
            cancel(server.address, intent_id)
            assert fast.done.wait(60) and fast.error is None and fast.intent is not None
            assert fast.offsets == list(range(n + 1))
        # The slow one is still behind, its call open, unread.
        assert subscribed(server, intent_id)()
        rest = consume(slow, Read())
    assert rest.error is None and rest.intent is not None
    assert rest.offsets == list(range(1, n + 1))


# ---------------------------------------------------------------- refusals


def test_malformed_requests_are_invalid_arguments(server, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)

        def stream(**fields: Any) -> Callable[[], Any]:
            return lambda: list(stub.StreamIntent(pb.StreamIntentRequest(**fields), timeout=10))

        cases = [
            (dict(id=""), grpc.StatusCode.INVALID_ARGUMENT, "id: is required"),
            (dict(id="nope"), grpc.StatusCode.NOT_FOUND, "not found"),
            (dict(id=intent_id, stream="has space"), grpc.StatusCode.INVALID_ARGUMENT, "stream: may only contain"),
            (dict(id=intent_id, stream="x" * 65), grpc.StatusCode.INVALID_ARGUMENT, "stream: must be at most 64"),
            (dict(id=intent_id, stream="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "stream:"),
            (dict(id=intent_id, from_offset=-1), grpc.StatusCode.INVALID_ARGUMENT, "from_offset: must not be neg"),
        ]
        for fields, code, detail in cases:
            got, details = code_of(stream(**fields))
            assert (got, detail in details) == (code, True), (fields, got, details)
        got, details = code_of(lambda: stub.ListIntentStreams(pb.ListIntentStreamsRequest(id=""), timeout=10))
        assert got == grpc.StatusCode.INVALID_ARGUMENT


def test_a_pruned_stream_is_a_failed_precondition(server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    frames.append(intent_id, text("gone"))
    cancel(server.address, intent_id)
    sql(frames.url, "DELETE FROM stream_frames WHERE intent_id = $1", intent_id)
    sql(frames.url, "UPDATE intent_streams SET pruned = true WHERE intent_id = $1", intent_id)
    done = read(server.address, intent_id)
    assert done.error is not None and done.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pruned" in (done.error.details() or "") and done.entries == []
    with grpc.insecure_channel(server.address) as channel:
        (info,) = pb_grpc.IntentServiceStub(channel).ListIntentStreams(
            pb.ListIntentStreamsRequest(id=intent_id), timeout=10).streams
    assert (info.name, info.next_offset, info.bytes, info.pruned) == ("default", 1, 4, True)


def test_list_intent_streams_by_name(server, frames, agent_address) -> None:
    intent_id = new_intent(server.address, agent_address)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)

        def listed() -> list[stream_pb2.StreamInfo]:
            return list(stub.ListIntentStreams(pb.ListIntentStreamsRequest(id=intent_id), timeout=10).streams)

        assert listed() == []
        frames.append(intent_id, text("ab", "c"), stream="z")
        frames.append(intent_id, text("d"), stream="a:1")
        frames.append(intent_id, text("e"), stream="z")
        streams = listed()
        assert [(s.name, s.next_offset, s.bytes, s.pruned) for s in streams] == [("a:1", 1, 1, False),
                                                                                 ("z", 3, 4, False)]
        assert all(s.create_time.seconds > 0 and s.update_time.seconds > 0 for s in streams)
        code, _ = code_of(lambda: stub.ListIntentStreams(
            pb.ListIntentStreamsRequest(id="01" + uuid.uuid4().hex[:24]), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- keys and tenants


@pytest.fixture(scope="module")
def secure(database_url: str) -> Iterator[Any]:
    from tests.support import ServerThread, server_settings

    srv = ServerThread(server_settings(database_url, auth="on")).start()
    yield srv
    srv.stop()


def test_tenants_and_roles(secure, database_url) -> None:
    keys, frames = Keys(database_url), Frames(database_url)
    tenant, other = f"sr{uuid.uuid4().hex[:6]}", f"so{uuid.uuid4().hex[:6]}"
    mine = bearer(keys.create(tenant, "reader", ["client"]))
    admin = bearer(keys.create(tenant, "admin", ["admin"]))
    theirs = bearer(keys.create(other, "reader", ["client"]))
    agent = bearer(keys.create(tenant, "agent", ["agent"], (f"agent://{tenant}/prod/*",)))
    intent_id = new_intent(secure.address, f"agent://{tenant}/prod/nobody", metadata=mine)
    frames.append(intent_id, text("secret"))
    cancel(secure.address, intent_id, metadata=mine)
    assert read(secure.address, intent_id, metadata=mine).texts == ["secret"]
    assert read(secure.address, intent_id, metadata=admin).texts == ["secret"]
    elsewhere = read(secure.address, intent_id, metadata=theirs)
    assert elsewhere.error is not None and elsewhere.error.code() == grpc.StatusCode.NOT_FOUND
    assert elsewhere.entries == []
    as_agent = read(secure.address, intent_id, metadata=agent)
    assert as_agent.error is not None and as_agent.error.code() == grpc.StatusCode.PERMISSION_DENIED
    nobody = read(secure.address, intent_id)
    assert nobody.error is not None and nobody.error.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(secure.address) as channel:
        stub = pb_grpc.IntentServiceStub(channel)
        request = pb.ListIntentStreamsRequest(id=intent_id)
        assert [s.name for s in stub.ListIntentStreams(request, metadata=mine, timeout=10).streams] == ["default"]
        assert code_of(lambda: stub.ListIntentStreams(request, metadata=theirs, timeout=10))[0] == \
            grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: stub.ListIntentStreams(request, metadata=agent, timeout=10))[0] == \
            grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_key_ends_its_stream(secure, database_url) -> None:
    keys, frames = Keys(database_url), Frames(database_url)
    tenant = f"sv{uuid.uuid4().hex[:6]}"
    name = f"reader-{uuid.uuid4().hex[:6]}"
    key = bearer(keys.create(tenant, name, ["client"]))
    intent_id = new_intent(secure.address, f"agent://{tenant}/prod/nobody", metadata=key)
    with following(secure.address, intent_id, metadata=key) as reader:
        wait_until(subscribed(secure, intent_id), what="the reader")
        frames.append(intent_id, text("before"))
        wait_until(lambda: reader.texts == ["before"], what="the first entry")
        keys.revoke(tenant, name)
        assert reader.done.wait(20)
        frames.append(intent_id, text("after"))
    assert reader.error is not None and reader.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reader.texts == ["before"] and reader.intent is None


# ---------------------------------------------------------------- plans


@pytest.fixture(scope="module")
async def many_frames(databases: Any) -> Any:
    conn = await asyncpg.connect(databases.create())
    try:
        await conn.execute(bulk.TERMINAL, 2000)
        await conn.execute("INSERT INTO intent_streams (intent_id, name, next_offset) "
                           "SELECT id, 'default', 200 FROM intents")
        await conn.execute(
            "INSERT INTO stream_frames (intent_id, stream, end_offset, first_offset, attempt, positions, formats, "
            "data, superseded, reason) "
            "SELECT id, 'default', g * 4, g * 4 - 4, 1, '{1,1,1,1}', '{1,1,1,1}', '{a,b,c,d}', "
            "       CASE WHEN g % 10 = 0 THEN '{1}'::int[] END, CASE WHEN g % 10 = 0 THEN 1 END "
            "FROM intents, generate_series(1, 50) AS g")
        await conn.execute("VACUUM ANALYZE intent_streams, stream_frames")
        yield conn
    finally:
        await conn.close()


def _scans(plan: dict[str, Any]) -> list[str]:
    """The plan's scans of stream_frames and the indexes it reads."""
    found = []
    if plan.get("Relation Name") == "stream_frames" or "Index Name" in plan:
        found.append(f"{plan['Node Type']}:{plan.get('Index Name', '')}")
    for child in plan.get("Plans", []):
        found.extend(_scans(child))
    return found


async def test_stream_reads_use_the_frames_indexes(many_frames: asyncpg.Connection) -> None:
    intent_id = "00000" + "0" * 20 + "7"
    cases = [
        (Q.stream_frames_from, (intent_id, "default", 40, 256, 1 << 20), "stream_frames_pkey"),
        (Q.stream_markers_from, (intent_id, "default", 0), "stream_frames_markers"),
    ]
    for query, args, index in cases:
        (top,) = json.loads(await many_frames.fetchval("EXPLAIN (FORMAT JSON) " + query, *args))
        scans = _scans(top["Plan"])
        assert not [s for s in scans if s.startswith("Seq Scan")], scans
        assert {s.split(":")[1] for s in scans} - {""} == {index}, scans
    rows = await many_frames.fetch(Q.stream_frames_from, intent_id, "default", 41, 3, 1 << 20)
    assert [r["end_offset"] for r in rows] == [44, 48, 52]


async def test_the_byte_budget_cuts_a_read_after_the_frame_that_reaches_it(pg: asyncpg.Connection,
                                                                          agent_address: str) -> None:
    intent_id = await pending_intent(pg, agent_address)
    for _ in range(5):
        await pg.execute(_APPEND, intent_id, "default", 1, 1000, 1, [1], [TEXT], [bytes(range(256)) * 4], None,
                         None)
    rows = await pg.fetch(Q.stream_frames_from, intent_id, "default", 0, 100, 2500)
    # Each frame stores about 1 kB: the third reaches 2500, and nothing after it comes.
    assert [r["end_offset"] for r in rows] == [1, 2, 3] and rows[-1]["upto"] >= 2500
    assert [r["end_offset"] for r in await pg.fetch(Q.stream_frames_from, intent_id, "default", 0, 100, 1)] == [1]


def test_open_streams_count_against_the_keys_watch_cap(make_server, database_url) -> None:
    srv = make_server(auth="on", max_watches_per_key=2)
    keys = Keys(database_url)
    tenant = f"sc{uuid.uuid4().hex[:6]}"
    key = bearer(keys.create(tenant, "reader", ["client"]))
    intent_id = new_intent(srv.address, f"agent://{tenant}/prod/nobody", metadata=key)
    with following(srv.address, intent_id, metadata=key), following(srv.address, intent_id, metadata=key):
        wait_until(subscribed(srv, intent_id, readers=2), what="two readers")
        third = read(srv.address, intent_id, metadata=key)
        assert third.error is not None and third.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "StreamIntent calls count too" in (third.error.details() or "")
    # Canceled calls leave nothing behind: their subscriptions and slots are freed.
    wait_until(lambda: not subscribed(srv, intent_id)(), what="the canceled readers gone")
    wait_until(lambda: not srv.plane.hub._intents.get(intent_id), what="their intent subscriptions gone")
    cancel(srv.address, intent_id, metadata=key)
    assert read(srv.address, intent_id, metadata=key).error is None
