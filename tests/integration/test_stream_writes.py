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
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
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
    assert [(e["offset"], e["position"], e["data"]) for e in rows] == [(0, 1, b"hel"), (1, 1, b"lo"), (2, 2, b'{"a": 1}')]
    h = await head(pg, intent_id)
    assert h is not None and (h["next_offset"], h["bytes"], h["open_positions"]) == (3, 13, [1, 2])
    t = await totals(pg, intent_id)
    assert (t["stream_bytes"], t["stream_names"], t["stream_emit_key"]) == (13, ["default"], (1 << 32) + 2)
