"""The write side of streams (docs/streams.md): an attempt's emits appended
to its intent's streams, the markers of retried steps, and the pruning of
streams kept past their intent's end.

An emit is a fenced write like a step: its chunks go through the group
commit (``fenced.Emit``, statement ``emit_chunks``), which decides under the
intent's row lock whether it is appended, a repeat (by ``EmitWrite.seq``) or
refused by a limit, so racing emits cannot pass the limits together. A write
that also supersedes positions (``supersede_positions``) runs that first, in
its own fenced statement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from intentd.core.errors import ValidationError
from intentd.core.limits import (
    DEFAULT_STREAM,
    DEFAULT_STREAM_MAX_BYTES,
    DEFAULT_STREAM_MAX_CHUNKS_PER_S,
    MAX_CHUNK_BYTES,
    MAX_EMIT_BYTES,
    MAX_EMIT_CHUNKS,
    MAX_STREAMS_PER_INTENT,
)
from intentd.core.streams import checked_stream_name
from intentd.core.validation import parse_json
from intentd.generated.v1 import delivery_pb2, stream_pb2

from . import errors
from .batcher import Outcome, WriteBatcher, apply_group
from .db import Database, Row
from .fenced import Emit, LeaseRef
from .leases import refuse_write
from .queries import Q

__all__ = ["ChunkSpec", "ChunkStore", "EmitResult", "EmitSpec", "emit_key", "emit_spec"]

TEXT = stream_pb2.CHUNK_FORMAT_TEXT
JSON = stream_pb2.CHUNK_FORMAT_JSON
# EmitWrite.seq lives in the low 32 bits of the key (attempt * 2^32 + seq).
SEQ_BITS = 32
MAX_SEQ = 2**SEQ_BITS - 1


def emit_key(attempt: int, seq: int) -> int:
    """The order of an attempt's emits across attempts: a new attempt's first
    write is above every write of the earlier ones."""
    return (attempt << SEQ_BITS) + seq


@dataclass(frozen=True)
class ChunkSpec:
    data: bytes
    format: int  # TEXT or JSON (an unspecified format is TEXT)
    position: int


@dataclass(frozen=True)
class EmitSpec:
    """A checked EmitWrite."""

    stream: str
    chunks: tuple[ChunkSpec, ...]
    supersede_positions: tuple[int, ...]  # distinct, sorted
    seq: int


@dataclass(frozen=True)
class EmitResult:
    """EmitOutcome: the offset of the first chunk appended (0 when none
    was), how many were (the others were at recorded positions), and
    whether the write repeated one applied already."""

    first_offset: int
    appended: int
    repeated: bool
    # When the appended frame was committed (its entries' time); None when
    # nothing was. Not part of the outcome's value (EmitOutcome has no time).
    time: datetime | None = field(default=None, compare=False)

    def to_proto(self) -> delivery_pb2.EmitOutcome:
        return delivery_pb2.EmitOutcome(first_offset=self.first_offset, appended=self.appended,
                                        repeated=self.repeated)


def _chunk(msg: stream_pb2.EmitChunk, field: str) -> ChunkSpec:
    if len(msg.data) > MAX_CHUNK_BYTES:
        raise ValidationError(f"{field}.data", f"is {len(msg.data)} bytes; a chunk is at most {MAX_CHUNK_BYTES}")
    if msg.position < 1:
        raise ValidationError(f"{field}.position", "must be at least 1")
    fmt = msg.format or TEXT
    if fmt == TEXT:
        try:
            msg.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(f"{field}.data", f"is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    elif fmt == JSON:
        if not msg.data:
            raise ValidationError(f"{field}.data", "is empty, which is not JSON")
        parse_json(msg.data, f"{field}.data")
    else:
        raise ValidationError(f"{field}.format", f"{fmt} is not a chunk format (TEXT or JSON)")
    return ChunkSpec(msg.data, fmt, msg.position)


def emit_spec(msg: delivery_pb2.EmitWrite) -> EmitSpec:
    """Checks an EmitWrite before it joins a batch (a malformed one would
    fail the statement it shares with other intents' writes)."""
    if not 1 <= msg.seq <= MAX_SEQ:
        raise ValidationError("emit.seq", f"must be 1 to {MAX_SEQ} (1, 2, 3... per attempt)")
    if not msg.chunks and not msg.supersede_positions:
        raise ValidationError("emit.chunks", "is empty (and there are no supersede_positions)")
    if len(msg.chunks) > MAX_EMIT_CHUNKS:
        raise ValidationError("emit.chunks", f"holds {len(msg.chunks)} chunks; a write holds at most {MAX_EMIT_CHUNKS}")
    if len(msg.supersede_positions) > MAX_EMIT_CHUNKS:
        raise ValidationError("emit.supersede_positions", f"holds more than {MAX_EMIT_CHUNKS} positions")
    for i, position in enumerate(msg.supersede_positions):
        if position < 1:
            raise ValidationError(f"emit.supersede_positions[{i}]", "must be at least 1")
    # With no chunks the stream does not matter (supersede_positions spans all).
    name = checked_stream_name(msg.stream, "emit.stream") if msg.chunks or msg.stream else DEFAULT_STREAM
    chunks = tuple(_chunk(c, f"emit.chunks[{i}]") for i, c in enumerate(msg.chunks))
    size = sum(len(c.data) for c in chunks)
    if size > MAX_EMIT_BYTES:
        raise ValidationError("emit.chunks", f"hold {size} bytes; a write holds at most {MAX_EMIT_BYTES}")
    return EmitSpec(name, chunks, tuple(sorted(set(msg.supersede_positions))), int(msg.seq))


class ChunkStore:
    def __init__(self, db: Database, batcher: WriteBatcher | None = None, *,
                 max_bytes: int = DEFAULT_STREAM_MAX_BYTES,
                 max_chunks_per_s: int = DEFAULT_STREAM_MAX_CHUNKS_PER_S,
                 max_history_steps: int = 10_000) -> None:
        self.db = db
        self.batcher = batcher
        self.max_bytes = max_bytes
        self.max_chunks_per_s = max_chunks_per_s
        # No step is recorded past the history limit, so no chunk has a later
        # position than the body's after the last step: one past the limit.
        # Bounds what a head's open_positions can hold.
        self.max_position = max_history_steps + 1

    def _check_positions(self, spec: EmitSpec) -> None:
        for i, chunk in enumerate(spec.chunks):
            if chunk.position > self.max_position:
                raise ValidationError(f"emit.chunks[{i}].position", f"is {chunk.position}; positions go up to "
                                      f"{self.max_position} (INTENTD_MAX_HISTORY_STEPS + 1)")
        if spec.supersede_positions and spec.supersede_positions[-1] > self.max_position:
            raise ValidationError("emit.supersede_positions", f"go up to {self.max_position} "
                                  "(INTENTD_MAX_HISTORY_STEPS + 1)")

    async def emit(self, lease: LeaseRef, spec: EmitSpec | delivery_pb2.EmitWrite, *, session: str | None = None,
                   now: datetime | None = None) -> EmitResult:
        """Applies an emit of the attempt holding ``lease`` (through the
        stream ``session`` when given): its supersede positions, then its
        chunks. FAILED_PRECONDITION for a stale lease, RESOURCE_EXHAUSTED
        for a limit (nothing of its chunks appended)."""
        if isinstance(spec, delivery_pb2.EmitWrite):
            spec = emit_spec(spec)
        self._check_positions(spec)
        key = emit_key(lease.attempt, spec.seq)
        if spec.supersede_positions:
            repeated = await self.supersede(lease, spec.supersede_positions, key, final=not spec.chunks,
                                            session=session, now=now)
            if repeated or not spec.chunks:
                return EmitResult(0, 0, repeated)
        row, why = await self._write(Emit(
            lease, now, session, stream_name=spec.stream, emit_key=key, max_bytes=self.max_bytes,
            max_chunks_per_s=self.max_chunks_per_s, max_streams=MAX_STREAMS_PER_INTENT,
            data=tuple(c.data for c in spec.chunks), formats=tuple(c.format for c in spec.chunks),
            positions=tuple(c.position for c in spec.chunks)))
        if row is None:
            refuse_write(lease, why)
        verdict = row["verdict"]
        if verdict == "ok":
            return EmitResult(int(row["first_offset"]), int(row["appended"]), False,
                              row["time"] if row["appended"] else None)
        if verdict == "repeat":
            return EmitResult(0, 0, True)
        raise self._limit(lease, spec, row)

    async def supersede(self, lease: LeaseRef, positions: tuple[int, ...], key: int, *, final: bool,
                        session: str | None = None, now: datetime | None = None) -> bool:
        """Writes the STEP_RETRIED markers of ``positions`` (in every stream
        of the intent with open chunks at them); ``final``: the write has no
        chunks, so this applies its key. True when the write is a repeat
        (nothing written)."""
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q.supersede_positions, lease.intent_id, lease.token, lease.attempt, now,
                                      session, list(positions), final, key)
            if row is None:
                why = await conn.fetchrow(Q.write_diagnoses, [lease.intent_id], [lease.token], [lease.attempt], [0],
                                          [session], [now])
                refuse_write(lease, why)
        return bool(row["repeat"])

    async def prune(self, now: datetime | None = None, batch: int = 500) -> int:
        """Deletes the entries of up to ``batch`` streams whose keep time
        after their intent's end passed; returns how many were pruned."""
        async with self.db.connection() as conn:
            return int(await conn.fetchval(Q.prune_streams, now, batch))

    async def _write(self, write: Emit) -> Outcome:
        if self.batcher is not None:
            return await self.batcher.write(write)
        async with self.db.connection() as conn:
            (outcome,) = await apply_group(conn, write.kind, [write])
        return outcome

    def _limit(self, lease: LeaseRef, spec: EmitSpec, row: Row) -> errors.ResourceExhausted:
        where = f"emit to stream {spec.stream!r} of intent {lease.intent_id}"
        verdict = row["verdict"]
        if verdict == "streams":
            return errors.ResourceExhausted(
                f"{where}: an intent has at most {MAX_STREAMS_PER_INTENT} streams; it has {row['streams']}")
        if verdict == "bytes":
            return errors.ResourceExhausted(
                f"{where}: its {row['bytes']} bytes would take the intent's streams from {row['stream_bytes']} "
                f"bytes past the limit of {self.max_bytes} (INTENTD_STREAM_MAX_BYTES); nothing of it was appended")
        return errors.ResourceExhausted(
            f"{where}: its {row['appended']} chunks would take the intent past {self.max_chunks_per_s} chunks "
            f"per second (INTENTD_STREAM_MAX_CHUNKS_PER_S; {row['window_before']} in this second); nothing of it "
            "was appended", retry_after_ms=row["retry_after_ms"])
