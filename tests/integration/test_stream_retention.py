"""How long streams are kept (docs/streams.md), on real PostgreSQL: an
intent type's stream_keep_ms is copied into a stream's head when it is first
written; the pruner deletes the entries of such streams once their intent
ended that long ago (heads stay, marked pruned); without a keep time the
entries leave with their intent (retention's cascade). The admin API keeps
stream_keep_ms."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import grpc
import pytest

from intentd.generated.v1 import admin_service_pb2 as apb
from intentd.generated.v1 import admin_service_pb2_grpc as apb_grpc
from intentd.generated.v1 import delivery_pb2, stream_pb2
from intentd.server.batcher import WriteBatcher
from intentd.server.chunks import ChunkStore
from intentd.server.db import Database
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.store import IntentStore, NewIntent
from intentd.server.sweepers import StreamPruner
from tests.support import ServerThread


@dataclass
class Env:
    store: IntentStore
    leases: LeaseStore
    chunks: ChunkStore
    pg: asyncpg.Connection
    address: str

    async def put_type(self, intent_type: str, keep_ms: int | None) -> None:
        await self.store.put_intent_type("default", intent_type, max_attempts=3, heartbeat_timeout_ms=10_000,
                                         retry_backoff_ms=0, retry_backoff_max_ms=0, default_deadline_ms=None,
                                         stream_keep_ms=keep_ms)

    async def finished(self, intent_type: str, streams: tuple[str, ...] = ("default",)) -> tuple[str, datetime]:
        """An intent of ``intent_type`` that emitted to ``streams`` and
        completed: its id and finish time."""
        (sent,) = await self.store.send("default", [NewIntent(intent_type, self.address, "{}", "test")])
        rows, _ = await self.leases.claim("s1", [self.address], None, 1, 5000)
        (row,) = rows
        lease = LeaseRef(row["id"], row["attempt"], row["lease_token"])
        await self.leases.ack(lease, stream="s1")
        for seq, name in enumerate(streams, start=1):
            await self.chunks.emit(lease, delivery_pb2.EmitWrite(stream=name, seq=seq, chunks=[
                stream_pb2.EmitChunk(data=b"abc", position=1), stream_pb2.EmitChunk(data=b"de", position=1)]),
                session="s1")
        await self.leases.complete(lease, b'"done"', stream="s1")
        finish = await self.pg.fetchval("SELECT finish_time FROM intents WHERE id = $1", lease.intent_id)
        return str(sent.row["id"]), finish


@pytest.fixture
async def env(db: Database, pg: asyncpg.Connection, agent_address: str) -> AsyncIterator[Env]:
    batcher = WriteBatcher(db, workers=1)
    batcher.start()
    try:
        yield Env(IntentStore(db), LeaseStore(db, max_payload_bytes=128 * 1024, batcher=batcher),
                  ChunkStore(db, batcher), pg, agent_address)
    finally:
        await batcher.close()


async def frames(pg: asyncpg.Connection, intent_id: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM stream_frames WHERE intent_id = $1", intent_id))


async def heads(pg: asyncpg.Connection, intent_id: str) -> list[tuple[str, int, int, int | None, bool]]:
    rows = await pg.fetch("SELECT name, next_offset, bytes, keep_ms, pruned FROM intent_streams WHERE intent_id = $1"
                          " ORDER BY name", intent_id)
    return [(r["name"], r["next_offset"], r["bytes"], r["keep_ms"], r["pruned"]) for r in rows]


async def test_streams_kept_a_while_are_pruned_once_that_passed(env: Env, pg: asyncpg.Connection) -> None:
    await env.put_type("intent.retention.kept.v1", 60_000)
    intent_id, finish = await env.finished("intent.retention.kept.v1", ("default", "log"))
    # The type's keep time, as it was when each stream was first written.
    await env.put_type("intent.retention.kept.v1", 1)
    assert await heads(pg, intent_id) == [("default", 2, 5, 60_000, False), ("log", 2, 5, 60_000, False)]
    pruner = StreamPruner(env.chunks, interval=1.0)
    assert await pruner.run_once(finish + timedelta(milliseconds=59_999)) is False
    assert await frames(pg, intent_id) == 2  # one per write: a frame holds its chunks
    await pruner.run_once(finish + timedelta(milliseconds=60_000))
    assert pruner.pruned >= 2
    # The entries are gone; the heads stay, with their counts.
    assert await frames(pg, intent_id) == 0
    assert await heads(pg, intent_id) == [("default", 2, 5, 60_000, True), ("log", 2, 5, 60_000, True)]
    await env.chunks.prune(finish + timedelta(days=1))
    assert await heads(pg, intent_id) == [("default", 2, 5, 60_000, True), ("log", 2, 5, 60_000, True)]


async def test_a_live_intent_is_never_pruned_and_keep_0_prunes_at_the_end(env: Env, pg: asyncpg.Connection) -> None:
    await env.put_type("intent.retention.zero.v1", 0)
    (sent,) = await env.store.send("default", [NewIntent("intent.retention.zero.v1", env.address, "{}", "test")])
    rows, _ = await env.leases.claim("s1", [env.address], None, 1, 5000)
    lease = LeaseRef(rows[0]["id"], rows[0]["attempt"], rows[0]["lease_token"])
    await env.leases.ack(lease, stream="s1")
    await env.chunks.emit(lease, delivery_pb2.EmitWrite(seq=1, chunks=[stream_pb2.EmitChunk(data=b"x", position=1)]),
                          session="s1")
    far = await pg.fetchval("SELECT now() + interval '10 years'")
    await env.chunks.prune(far)
    assert await frames(pg, lease.intent_id) == 1
    await env.leases.complete(lease, b"1", stream="s1")
    finish = await pg.fetchval("SELECT finish_time FROM intents WHERE id = $1", lease.intent_id)
    await env.chunks.prune(finish)
    assert await frames(pg, lease.intent_id) == 0
    assert [h[4] for h in await heads(pg, str(sent.row["id"]))] == [True]


async def test_without_a_keep_time_entries_leave_with_their_intent(env: Env, pg: asyncpg.Connection) -> None:
    intent_id, finish = await env.finished("intent.retention.unregistered.v1")
    await env.put_type("intent.retention.forever.v1", None)
    kept_id, _ = await env.finished("intent.retention.forever.v1")
    for one in (intent_id, kept_id):
        assert [h[3] for h in await heads(pg, one)] == [None]
    await env.chunks.prune(finish + timedelta(days=3650))
    assert await frames(pg, intent_id) == 1 and await frames(pg, kept_id) == 1
    # Retention deletes the intents, and the cascade their heads and frames.
    deleted = await env.store.delete_finished(0, finish + timedelta(days=3650), 100_000)
    assert deleted >= 2
    for one in (intent_id, kept_id):
        assert await frames(pg, one) == 0 and await heads(pg, one) == []


@pytest.fixture
def admin(server: ServerThread) -> Iterator[apb_grpc.AdminServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield apb_grpc.AdminServiceStub(channel)


def test_the_admin_api_keeps_stream_keep_ms(admin: apb_grpc.AdminServiceStub) -> None:
    put = admin.PutIntentType(apb.PutIntentTypeRequest(intent_type=apb.IntentType(
        intent_type="intent.retention.admin.v1", stream_keep_ms=86_400_000)), timeout=10)
    assert put.intent_type.HasField("stream_keep_ms") and put.intent_type.stream_keep_ms == 86_400_000
    got = admin.GetIntentType(apb.GetIntentTypeRequest(intent_type="intent.retention.admin.v1"), timeout=10)
    assert got.intent_type.stream_keep_ms == 86_400_000
    # A put replaces it: unset is "as long as the intent".
    put = admin.PutIntentType(apb.PutIntentTypeRequest(intent_type=apb.IntentType(
        intent_type="intent.retention.admin.v1")), timeout=10)
    assert not put.intent_type.HasField("stream_keep_ms")
    zero = admin.PutIntentType(apb.PutIntentTypeRequest(intent_type=apb.IntentType(
        intent_type="intent.retention.admin.v1", stream_keep_ms=0)), timeout=10)
    assert zero.intent_type.HasField("stream_keep_ms") and zero.intent_type.stream_keep_ms == 0
    with pytest.raises(grpc.RpcError) as refused:
        admin.PutIntentType(apb.PutIntentTypeRequest(intent_type=apb.IntentType(
            intent_type="intent.retention.admin.v1", stream_keep_ms=-1)), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "intent_type.stream_keep_ms" in (refused.value.details() or "")
