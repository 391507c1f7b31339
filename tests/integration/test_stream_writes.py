"""The write side of streams on real PostgreSQL (docs/streams.md): emits
through the group commit (dense offsets in commit order, fenced, idempotent
by seq, the position rule), the markers (REDELIVERED at the ack of a later
attempt, STEP_RETRIED for supersede_positions), the limits under the row
lock, and the plans of the statements."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_CHUNK_BYTES, MAX_EMIT_BYTES, MAX_EMIT_CHUNKS, MAX_STREAMS_PER_INTENT
from intentd.generated.v1 import delivery_pb2, stream_pb2
from intentd.server import errors
from intentd.server.batcher import WriteBatcher
from intentd.server.chunks import ChunkStore, EmitResult, emit_spec
from intentd.server.db import Database
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.queries import Q
from intentd.server.store import IntentStore, NewIntent
from intentd.testing import bulk

TYPE = "intent.stream.writes.v1"
TEXT = stream_pb2.CHUNK_FORMAT_TEXT
JSON = stream_pb2.CHUNK_FORMAT_JSON


@dataclass
class Env:
    store: IntentStore
    leases: LeaseStore
    chunks: ChunkStore
    batcher: WriteBatcher
    address: str

    async def send(self, n: int = 1, intent_type: str = TYPE) -> list[str]:
        sent = await self.store.send("default", [NewIntent(intent_type, self.address, "{}", "test")
                                                 for _ in range(n)])
        return [str(s.row["id"]) for s in sent]

    async def deliver(self, session: str = "s1", n: int = 1) -> list[LeaseRef]:
        rows, _ = await self.leases.claim(session, [self.address], None, n, 5000)
        leases = [LeaseRef(r["id"], r["attempt"], r["lease_token"]) for r in rows]
        for lease in leases:
            await self.leases.ack(lease, stream=session)
        return leases


@pytest.fixture
async def env(db: Database, agent_address: str) -> AsyncIterator[Env]:
    batcher = WriteBatcher(db, workers=2)
    batcher.start()
    try:
        yield Env(IntentStore(db), LeaseStore(db, max_payload_bytes=128 * 1024, batcher=batcher),
                  ChunkStore(db, batcher, max_bytes=1024 * 1024, max_chunks_per_s=1000), batcher, agent_address)
    finally:
        await batcher.close()


def write(seq: int, *chunks: tuple[str | bytes, int], stream: str = "", fmt: int = TEXT,
          supersede: tuple[int, ...] = ()) -> delivery_pb2.EmitWrite:
    return delivery_pb2.EmitWrite(
        stream=stream, seq=seq, supersede_positions=supersede,
        chunks=[stream_pb2.EmitChunk(data=d.encode() if isinstance(d, str) else d, format=fmt, position=p)
                for d, p in chunks])


async def entries(pg: asyncpg.Connection, intent_id: str, stream: str = "default") -> list[dict[str, Any]]:
    """The stream's entries, one per offset, from its frames."""
    out: list[dict[str, Any]] = []
    for f in await pg.fetch("SELECT * FROM stream_frames WHERE intent_id = $1 AND stream = $2 ORDER BY end_offset",
                            intent_id, stream):
        for k in range(f["end_offset"] - f["first_offset"]):
            out.append({"offset": f["first_offset"] + k, "attempt": f["attempt"], "position": f["positions"][k],
                        "format": f["formats"][k], "data": bytes(f["data"][k]),
                        "superseded": f["superseded"], "reason": f["reason"]})
    return out


async def head(pg: asyncpg.Connection, intent_id: str, stream: str = "default") -> asyncpg.Record | None:
    return await pg.fetchrow("SELECT * FROM intent_streams WHERE intent_id = $1 AND name = $2", intent_id, stream)


async def totals(pg: asyncpg.Connection, intent_id: str) -> asyncpg.Record:
    row = await pg.fetchrow("SELECT stream_emit_key, stream_bytes, stream_window_at, stream_window_chunks,"
                            " stream_names FROM intents WHERE id = $1", intent_id)
    assert row is not None
    return row


async def step(env: Env, lease: LeaseRef, index: int, session: str = "s1") -> None:
    await env.leases.record_step(lease, index, f"step{index}", b"1", stream=session)


# ------------------------------------------------------------------ appends


async def test_emit_appends_with_dense_offsets_and_counts(env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    first = await env.chunks.emit(lease, write(1, ("hel", 1), ("lo", 1)), session="s1")
    assert first == EmitResult(0, 2, False)
    second = await env.chunks.emit(lease, write(2, ('{"a": 1}', 2)), session="s1")
    assert second == EmitResult(2, 1, False)
    rows = await entries(pg, intent_id)
    assert [(e["offset"], e["position"], e["data"]) for e in rows] == [
        (0, 1, b"hel"), (1, 1, b"lo"), (2, 2, b'{"a": 1}')]
    h = await head(pg, intent_id)
    assert h is not None and (h["next_offset"], h["bytes"], h["open_positions"]) == (3, 13, [1, 2])
    t = await totals(pg, intent_id)
    assert (t["stream_bytes"], t["stream_names"], t["stream_emit_key"]) == (13, ["default"], (1 << 32) + 2)


async def test_concurrent_emits_of_many_intents_share_groups_with_dense_offsets(
        env: Env, pg: asyncpg.Connection) -> None:
    ids = await env.send(12)
    leases = await env.deliver(n=12)
    assert sorted(lease.intent_id for lease in leases) == sorted(ids)
    batches = env.batcher.batches

    async def run(lease: LeaseRef) -> list[EmitResult]:
        # An attempt sends its emits one at a time (seq order); the intents run side by side.
        return [await env.chunks.emit(lease, write(seq, *[(f"{seq}.{k}", 1) for k in range(seq)]), session="s1")
                for seq in range(1, 6)]

    results = await asyncio.gather(*(run(lease) for lease in leases))
    # Writes of different intents went together: fewer groups than writes.
    assert env.batcher.batches - batches < 12 * 5
    for lease, outcomes in zip(leases, results, strict=True):
        assert [(o.first_offset, o.appended) for o in outcomes] == [(0, 1), (1, 2), (3, 3), (6, 4), (10, 5)]
        rows = await entries(pg, lease.intent_id)
        assert [e["offset"] for e in rows] == list(range(15))
        assert [e["data"] for e in rows] == [f"{s}.{k}".encode() for s in range(1, 6) for k in range(s)]


async def test_a_stale_or_foreign_lease_is_refused_and_appends_nothing(env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (old,) = await env.deliver("s1")
    await env.chunks.emit(old, write(1, ("a", 1)), session="s1")
    # Another stream that learnt the token does not hold the lease.
    with pytest.raises(errors.StaleLease):
        await env.chunks.emit(old, write(2, ("b", 1)), session="other")
    await env.leases.release(old, "AGENT_DIED", stream="s1")
    (new,) = await env.deliver("s2")
    assert new.attempt == 2
    with pytest.raises(errors.FailedPrecondition, match="not live"):
        await env.chunks.emit(old, write(3, ("c", 1)), session="s1")
    with pytest.raises(errors.FailedPrecondition, match="not live"):
        await env.chunks.emit(old, write(4, supersede=(1,)), session="s1")
    assert [e["data"] for e in await entries(pg, intent_id) if e["superseded"] is None] == [b"a"]
    # Through the WriteRouter's error mapping that is FAILED_PRECONDITION; an
    # unknown intent is NOT_FOUND.
    with pytest.raises(errors.NotFound):
        await env.chunks.emit(LeaseRef("0" * 26, 1, new.token), write(1, ("x", 1)))


async def test_a_repeated_seq_appends_nothing_and_a_new_attempt_starts_above(env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (first,) = await env.deliver("s1")
    assert await env.chunks.emit(first, write(1, ("a", 1)), session="s1") == EmitResult(0, 1, False)
    assert await env.chunks.emit(first, write(1, ("a", 1)), session="s1") == EmitResult(0, 0, True)
    assert await env.chunks.emit(first, write(3, ("b", 1)), session="s1") == EmitResult(1, 1, False)
    # Gaps are allowed, but going back is a repeat.
    assert await env.chunks.emit(first, write(2, ("late", 1)), session="s1") == EmitResult(0, 0, True)
    await env.leases.release(first, "AGENT_DIED", stream="s1")
    (second,) = await env.deliver("s2")
    # seq starts again at 1 in a new attempt.
    assert (await env.chunks.emit(second, write(1, ("c", 1)), session="s2")).appended == 1
    chunks = [e for e in await entries(pg, intent_id) if e["superseded"] is None]
    assert [(e["data"], e["attempt"]) for e in chunks] == [(b"a", 1), (b"b", 1), (b"c", 2)]
    assert (await totals(pg, intent_id))["stream_emit_key"] == (2 << 32) + 1


async def test_a_redone_batch_answers_the_emit_as_a_repeat(env: Env, pg: asyncpg.Connection) -> None:
    """The group commit's in-doubt redo applies a committed emit again: seq
    recognises it, so nothing is appended twice."""
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    lost = [True]

    async def lose_the_answer(conn: asyncpg.Connection, batch: list[Any]) -> None:
        if lost[0]:
            lost[0] = False
            raise ConnectionResetError("the answer was lost")

    env.batcher.after_statements = lose_the_answer
    try:
        outcome = await env.chunks.emit(lease, write(1, ("once", 1)), session="s1")
    finally:
        env.batcher.after_statements = None
    assert outcome == EmitResult(0, 0, True)
    assert [e["data"] for e in await entries(pg, intent_id)] == [b"once"]


async def test_chunks_at_recorded_positions_are_dropped(env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    await step(env, lease, 1)
    await step(env, lease, 2)
    outcome = await env.chunks.emit(lease, write(1, ("p1", 1), ("p3", 3), ("p2", 2), ("p3b", 3)), session="s1")
    assert outcome == EmitResult(0, 2, False)
    assert [(e["position"], e["data"]) for e in await entries(pg, intent_id)] == [(3, b"p3"), (3, b"p3b")]
    h = await head(pg, intent_id)
    assert h is not None and (h["bytes"], h["open_positions"]) == (5, [3])
    # All dropped: applied (the key moves on), nothing appended, no head for a new stream.
    assert await env.chunks.emit(lease, write(2, ("x", 1), stream="other"), session="s1") == EmitResult(0, 0, False)
    assert await head(pg, intent_id, "other") is None
    t = await totals(pg, intent_id)
    assert (t["stream_emit_key"], t["stream_names"], t["stream_bytes"]) == ((1 << 32) + 2, ["default"], 5)


# ------------------------------------------------------------------ markers


async def test_the_ack_of_a_later_attempt_supersedes_the_unrecorded_positions(
        env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (first,) = await env.deliver("s1")
    # The first attempt's ack wrote no marker (there was nothing to supersede).
    assert await entries(pg, intent_id) == []
    await env.chunks.emit(first, write(1, ("a1", 1), ("a2", 2)), session="s1")
    await env.chunks.emit(first, write(2, ("b1", 1), ("b3", 3), stream="b"), session="s1")
    await env.chunks.emit(first, write(3, ("c1", 1), stream="c"), session="s1")
    await step(env, first, 1)
    await env.leases.release(first, "AGENT_DIED", stream="s1")

    (second,) = await env.deliver("s2")
    a, b = await entries(pg, intent_id), await entries(pg, intent_id, "b")
    # Position 1 was recorded: never superseded; stream c has nothing else, so no marker.
    assert (a[-1]["offset"], a[-1]["superseded"], a[-1]["reason"], a[-1]["attempt"]) == (2, [2], 1, 2)
    assert (a[-1]["position"], a[-1]["format"], a[-1]["data"]) == (0, 0, b"")
    assert (b[-1]["offset"], b[-1]["superseded"], b[-1]["reason"]) == (2, [3], 1)
    assert [e["superseded"] for e in await entries(pg, intent_id, "c")] == [None]
    for name, next_offset in (("default", 3), ("b", 3), ("c", 1)):
        h = await head(pg, intent_id, name)
        assert h is not None and (h["open_positions"], h["next_offset"]) == ([], next_offset)

    # The re-run of position 2 emits again; when every open position is
    # recorded by then, the next attempt's ack writes no marker.
    await env.chunks.emit(second, write(1, ("a2'", 2)), session="s2")
    await step(env, second, 2, "s2")
    await env.leases.release(second, "AGENT_DIED", stream="s2")
    await env.deliver("s3")
    assert len(await entries(pg, intent_id)) == 4
    h = await head(pg, intent_id)
    assert h is not None and h["open_positions"] == []


async def test_supersede_positions_mark_every_stream_once_before_the_chunks(env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    await env.chunks.emit(lease, write(1, ("a2", 2), ("a3", 3), stream="a"), session="s1")
    await env.chunks.emit(lease, write(2, ("b2", 2), stream="b"), session="s1")
    await env.chunks.emit(lease, write(3, ("c3", 3), stream="c"), session="s1")
    # Position 2 failed and runs again: its chunks so far are superseded, in
    # every stream, before the re-run's.
    retry = write(4, ("a2'", 2), stream="a", supersede=(2,))
    assert await env.chunks.emit(lease, retry, session="s1") == EmitResult(3, 1, False)
    a, b, c = [await entries(pg, intent_id, name) for name in ("a", "b", "c")]
    assert [(e["offset"], e["superseded"], e["reason"], e["data"]) for e in a[2:]] == [
        (2, [2], 2, b""), (3, None, None, b"a2'")]
    assert [(e["offset"], e["superseded"], e["reason"]) for e in b] == [(0, None, None), (1, [2], 2)]
    assert len(c) == 1
    heads = {name: await head(pg, intent_id, name) for name in ("a", "b", "c")}
    assert {n: h["open_positions"] for n, h in heads.items() if h is not None} == {"a": [2, 3], "b": [], "c": [3]}
    # A repeat of that write (a lost answer) supersedes nothing again: the
    # re-run's chunk stays.
    assert await env.chunks.emit(lease, retry, session="s1") == EmitResult(0, 0, True)
    assert len(await entries(pg, intent_id, "a")) == 4
    # A write of positions only (no chunks, no stream) applies its key itself.
    assert await env.chunks.emit(lease, write(5, supersede=(3, 2)), session="s1") == EmitResult(0, 0, False)
    assert [e["superseded"] for e in (await entries(pg, intent_id, "a"))[4:]] == [[2, 3]]
    assert [e["superseded"] for e in (await entries(pg, intent_id, "c"))[1:]] == [[3]]
    assert (await totals(pg, intent_id))["stream_emit_key"] == (1 << 32) + 5
    assert await env.chunks.emit(lease, write(5, supersede=(3,)), session="s1") == EmitResult(0, 0, True)


# ------------------------------------------------------------------ limits


async def test_the_byte_limit_refuses_the_whole_write_and_changes_nothing(env: Env, pg: asyncpg.Connection) -> None:
    small = ChunkStore(env.chunks.db, env.batcher, max_bytes=1024, max_chunks_per_s=1000)
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    await small.emit(lease, write(1, ("x" * 1000, 1)), session="s1")
    before = (await totals(pg, intent_id), await head(pg, intent_id))
    with pytest.raises(errors.ResourceExhausted, match=r"past the limit of 1024 .*INTENTD_STREAM_MAX_BYTES"):
        await small.emit(lease, write(2, ("y" * 20, 1), ("z" * 20, 1)), session="s1")
    assert (await totals(pg, intent_id), await head(pg, intent_id)) == before
    # The refused seq was not applied: the next write (or a retry) goes through.
    assert (await small.emit(lease, write(2, ("y" * 24, 1)), session="s1")).appended == 1


async def test_the_rate_limit_counts_chunks_per_second_of_the_database_clock(
        env: Env, pg: asyncpg.Connection) -> None:
    slow = ChunkStore(env.chunks.db, env.batcher, max_bytes=1024 * 1024, max_chunks_per_s=5)
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    t0 = await pg.fetchval("SELECT now()")
    await slow.emit(lease, write(1, *[("a", 1)] * 3), session="s1", now=t0)
    before = await totals(pg, intent_id)
    with pytest.raises(errors.ResourceExhausted, match="5 chunks per second") as refused:
        await slow.emit(lease, write(2, *[("b", 1)] * 3), session="s1", now=t0 + timedelta(milliseconds=500))
    assert refused.value.retry_after_ms == 500
    assert await totals(pg, intent_id) == before
    assert (await slow.emit(lease, write(2, *[("b", 1)] * 2), session="s1",
                            now=t0 + timedelta(milliseconds=500))).appended == 2
    # A new window starts a second after the last one began.
    assert (await slow.emit(lease, write(3, *[("c", 1)] * 5), session="s1",
                            now=t0 + timedelta(milliseconds=1000))).appended == 5
    t = await totals(pg, intent_id)
    assert (t["stream_window_at"], t["stream_window_chunks"]) == (t0 + timedelta(seconds=1), 5)
    # A write with more chunks than a window takes never passes: no retry-after, though the window ends soon.
    with pytest.raises(errors.ResourceExhausted, match="5 chunks per second") as never:
        await slow.emit(lease, write(4, *[("d", 1)] * 6), session="s1", now=t0 + timedelta(milliseconds=1500))
    assert never.value.retry_after_ms == 0
    assert [e["data"] for e in await entries(pg, intent_id)] == [b"a"] * 3 + [b"b"] * 2 + [b"c"] * 5


async def test_a_seventeenth_stream_is_refused(env: Env, pg: asyncpg.Connection) -> None:
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    for k in range(MAX_STREAMS_PER_INTENT):
        await env.chunks.emit(lease, write(k + 1, ("x", 1), stream=f"s{k}"), session="s1")
    before = await totals(pg, intent_id)
    with pytest.raises(errors.ResourceExhausted, match="at most 16 streams"):
        await env.chunks.emit(lease, write(100, ("x", 1), stream="one-too-many"), session="s1")
    assert await totals(pg, intent_id) == before
    assert await head(pg, intent_id, "one-too-many") is None
    assert (await env.chunks.emit(lease, write(100, ("y", 1), stream="s3"), session="s1")).appended == 1


async def test_positions_past_the_history_limit_are_invalid(env: Env, pg: asyncpg.Connection) -> None:
    # No step is recorded past INTENTD_MAX_HISTORY_STEPS, so no chunk belongs
    # further: refused, and a head's open positions stay bounded.
    store = ChunkStore(env.chunks.db, env.batcher, max_history_steps=100)
    (intent_id,) = await env.send()
    (lease,) = await env.deliver()
    assert (await store.emit(lease, write(1, ("ok", 101)), session="s1")).appended == 1
    for bad, field in ((write(2, ("x", 102)), "emit.chunks[0].position"),
                       (write(2, supersede=(5, 500)), "emit.supersede_positions")):
        with pytest.raises(ValidationError) as refused:
            await store.emit(lease, bad, session="s1")
        assert refused.value.field == field
    assert (await head(pg, intent_id))["open_positions"] == [101]


def chunk(data: bytes = b"x", fmt: int = TEXT, position: int = 1) -> stream_pb2.EmitChunk:
    return stream_pb2.EmitChunk(data=data, format=fmt, position=position)


@pytest.mark.parametrize(("msg", "field"), [
    (delivery_pb2.EmitWrite(seq=1, stream="bad name", chunks=[chunk()]), "emit.stream"),
    (delivery_pb2.EmitWrite(seq=1, stream="x" * 65, chunks=[chunk()]), "emit.stream"),
    (delivery_pb2.EmitWrite(seq=1), "emit.chunks"),
    (delivery_pb2.EmitWrite(seq=0, chunks=[chunk()]), "emit.seq"),
    (delivery_pb2.EmitWrite(seq=2**32, chunks=[chunk()]), "emit.seq"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(), chunk(b"x" * (MAX_CHUNK_BYTES + 1))]), "emit.chunks[1].data"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk()] * (MAX_EMIT_CHUNKS + 1)), "emit.chunks"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(b"x" * MAX_CHUNK_BYTES)] * (MAX_EMIT_BYTES // MAX_CHUNK_BYTES + 1)),
     "emit.chunks"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(position=0)]), "emit.chunks[0].position"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(b"{nope", JSON)]), "emit.chunks[0].data"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(b"", JSON)]), "emit.chunks[0].data"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(b"\xff\xfe")]), "emit.chunks[0].data"),
    (delivery_pb2.EmitWrite(seq=1, chunks=[chunk(fmt=7)]), "emit.chunks[0].format"),
    (delivery_pb2.EmitWrite(seq=1, supersede_positions=[2, 0]), "emit.supersede_positions[1]"),
])
def test_malformed_emits_are_invalid_before_any_batch(msg: delivery_pb2.EmitWrite, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        emit_spec(msg)
    assert refused.value.field == field


def test_a_well_formed_emit_spec() -> None:
    spec = emit_spec(delivery_pb2.EmitWrite(seq=3, chunks=[chunk(b"hi", 0, 2), chunk(b'{"a": [1]}', JSON, 1)],
                                            supersede_positions=[4, 2, 4]))
    assert spec.stream == "default" and spec.seq == 3 and spec.supersede_positions == (2, 4)
    assert [(c.data, c.format, c.position) for c in spec.chunks] == [(b"hi", TEXT, 2), (b'{"a": [1]}', JSON, 1)]
    assert emit_spec(delivery_pb2.EmitWrite(seq=1, stream="a:b.c-d_9", chunks=[chunk()])).stream == "a:b.c-d_9"


# ------------------------------------------------------------------ the Connect stream


def test_emits_on_the_connect_stream_are_answered_with_their_outcome(server: Any, agent_address: str) -> None:
    from intentd.core.observability import metrics
    from intentd.generated.v1 import intent_service_pb2 as ipb
    from intentd.generated.v1 import intent_service_pb2_grpc as ipb_grpc
    from tests.support import RawSidecar

    with grpc.insecure_channel(server.address) as channel:
        ipb_grpc.IntentServiceStub(channel).SendIntent(ipb.SendIntentRequest(intent=ipb.IntentSpec(
            intent_type=TYPE, to_agent=agent_address, payload=b"{}")), timeout=10)
    raw = RawSidecar(server.address, agent_address)
    try:
        assignment = raw.recv("assignment")
        lease = assignment.lease
        # Sent right after the ack: the write waits for it (the ack-before-writes rule).
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        appended = metrics.CHUNKS_APPENDED._value.get()
        W = delivery_pb2.IntentWrite
        first = raw.write(1, W(lease=lease, emit=write(1, ("a", 1), ("b", 1))))
        assert (first.code, first.emit.first_offset, first.emit.appended, first.emit.repeated) == (0, 0, 2, False)
        again = raw.write(2, W(lease=lease, emit=write(1, ("a", 1), ("b", 1))))
        assert (again.code, again.emit.repeated) == (0, True)
        assert metrics.CHUNKS_APPENDED._value.get() == appended + 2
        bad = raw.write(3, W(lease=lease, emit=write(2, ("a", 1), stream="no spaces")))
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad.message.startswith("emit.stream")
        stale = delivery_pb2.Lease(intent_id=lease.intent_id, attempt=lease.attempt, token=str(uuid.uuid4()))
        refused = raw.write(4, W(lease=stale, emit=write(2, ("a", 1))))
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        # The lease is untouched: the holder goes on.
        assert raw.write(5, W(lease=lease, emit=write(2, ("c", 1)))).emit.first_offset == 2
    finally:
        raw.close()


# ------------------------------------------------------------------ plans

STREAM_TABLES = ("intents", "intent_steps", "intent_streams", "stream_frames", "intent_types")
BIG = 20_000


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _scans(conn: asyncpg.Connection, query: str, *args: Any, analyze: bool = False) -> list[dict[str, Any]]:
    """The plan's nodes that read the tables of streams (and intents)."""
    raw = await conn.fetchval(f"EXPLAIN ({'ANALYZE, ' if analyze else ''}FORMAT JSON) " + query, *args)
    (top,) = json.loads(raw)
    return [n for n in _nodes(top["Plan"])
            if n.get("Relation Name") in STREAM_TABLES and n["Node Type"] != "ModifyTable"]


@pytest.fixture(scope="module")
async def big(databases: Any) -> AsyncIterator[asyncpg.Connection]:
    """A database with many ended intents, each with a step, a stream (one
    in 20 kept a while, so prunable) and frames, and many intent types."""
    conn = await asyncpg.connect(databases.create())
    try:
        await conn.execute(bulk.TERMINAL, BIG)
        await conn.execute("""
            INSERT INTO intent_types (tenant, intent_type)
            SELECT 'default', 'type.' || g FROM generate_series(1, 2000) g;
            INSERT INTO intent_steps (intent_id, idx, name, result, attempt, lease_token, record_time)
            SELECT id, 1, 'noop', '1', 1, lease_token, finish_time FROM intents;
            INSERT INTO intent_streams (intent_id, name, next_offset, bytes, keep_ms, pruned)
            SELECT id, 'default', 50, 500, CASE WHEN right(id, 2)::int % 20 = 0 THEN 1000 END,
                   right(id, 2)::int % 20 = 0 AND right(id, 4)::int % 100 <> 0 FROM intents;
            INSERT INTO stream_frames (intent_id, stream, end_offset, first_offset, attempt, positions, formats, data)
            SELECT intent_id, name, g * 10, g * 10 - 10, 1, array_fill(1, ARRAY[10]),
                   array_fill(1::smallint, ARRAY[10]), array_fill('\\x61'::bytea, ARRAY[10])
            FROM intent_streams, generate_series(1, 5) g;
        """)
        await conn.execute("VACUUM ANALYZE intents, intent_steps, intent_streams, stream_frames, intent_types")
        yield conn
    finally:
        await conn.close()


def _emit_args() -> tuple[Any, ...]:
    some = "00000" + "0" * 20 + "7"
    return (Q.emit_chunks, [some], [uuid.uuid4()], [1], ["default"], [(1 << 32) + 1], [None], [None], [1 << 20],
            [1000], [MAX_STREAMS_PER_INTENT], [b"x", b"y"], [1, 1], [1, 2], [1, 1])


PLANNED = [
    ("emit_chunks", _emit_args),
    ("supersede_positions", lambda: (Q.supersede_positions, "00000" + "0" * 20 + "7", uuid.uuid4(), 1, None, None,
                                     [2], False, (1 << 32) + 2)),
    # A batch small beside the table, as the pruner's 500 is beside a production one.
    ("prune_streams", lambda: (Q.prune_streams, None, 20)),
]


@pytest.mark.parametrize(("name", "make"), PLANNED, ids=[name for name, _ in PLANNED])
async def test_the_stream_statements_reach_their_rows_through_indexes(
        big: asyncpg.Connection, name: str, make: Any) -> None:
    query, *args = make()
    scans = await _scans(big, query, *args)
    assert scans, name
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], (
        name, [(n["Node Type"], n["Relation Name"]) for n in scans])
    if name == "prune_streams":
        heads = [n.get("Index Name") or n["Node Type"] for n in scans if n["Relation Name"] == "intent_streams"]
        assert heads == ["intent_streams_prunable", "Tid Scan"], heads


class Undo(Exception):
    """Rolls a test's transaction back."""


async def test_the_ack_of_a_first_attempt_reads_no_stream_table(env: Env, pg: asyncpg.Connection) -> None:
    """Its REDELIVERED part is behind a one-time filter: never executed."""
    await env.send()
    rows, _ = await env.leases.claim("s1", [env.address], None, 1, 5000)
    (row,) = rows
    scans: list[dict[str, Any]] = []
    with pytest.raises(Undo):
        async with pg.transaction():
            scans = await _scans(pg, Q.ack_assignments, [row["id"]], [row["lease_token"]], [1], [None], ["s1"],
                                 analyze=True)
            assert await pg.fetchval("SELECT state::text FROM intents WHERE id = $1", row["id"]) == "IN_PROGRESS"
            raise Undo
    streams = [n for n in scans if n["Relation Name"] in ("intent_streams", "intent_steps", "stream_frames")]
    assert streams and all(n["Actual Loops"] == 0 for n in streams), [
        (n["Node Type"], n["Relation Name"], n["Actual Loops"]) for n in streams]
