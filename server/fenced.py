"""The fenced writes of an attempt as typed parameter objects, one frozen
dataclass per kind of write, each knowing its statement and its columns.

A write is built by name (``Step(lease, at, stream, index=..., ...)``) and the
write batcher turns a group of them into the statement's arrays column by
column (``WriteKind.columns``), so no value travels by position. Every fenced
write carries its lease, its time (``at``: None in production, the database
clock decides) and the stream that must hold the lease (``stream``: None for
any), and can be diagnosed by ``write_diagnoses`` when it matched nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from intentd.core.errors import ValidationError

from .batcher import WriteKind
from .ids import looks_like_id
from .queries import Q

# Every fenced statement starts with the lease, in this order.
_LEASE = ("lease.intent_id", "lease.token", "lease.attempt")
# What every fenced write's diagnosis reads (write_diagnoses, in its order).
_DIAGNOSIS = (*_LEASE, "step_index", "stream", "at")


def _kind(name: str, query: str, rank: int, *columns: str, flat: tuple[str, ...] = ()) -> WriteKind:
    return WriteKind(name, query, rank, (*_LEASE, *columns), Q.write_diagnoses, _DIAGNOSIS, flat)


@dataclass(frozen=True)
class LeaseRef:
    intent_id: str
    attempt: int
    token: uuid.UUID

    @classmethod
    def parse(cls, intent_id: str, attempt: int, token: str) -> LeaseRef:
        if not intent_id:
            raise ValidationError("lease.intent_id", "is required")
        if not looks_like_id(intent_id):
            # Checked here, before the write joins a batch: an id PostgreSQL
            # cannot even store (a NUL) would fail the statement shared with
            # other tenants' writes.
            raise ValidationError("lease.intent_id", f"{intent_id[:40]!r} is not an intent id")
        if attempt < 1:
            raise ValidationError("lease.attempt", "must be at least 1")
        try:
            parsed = uuid.UUID(token)
        except ValueError:
            raise ValidationError("lease.token", "is not a lease token") from None
        return cls(intent_id, attempt, parsed)


@dataclass(frozen=True)
class FencedWrite:
    """What every fenced write carries; the kinds below add their values."""

    kind: ClassVar[WriteKind]

    lease: LeaseRef
    at: datetime | None
    stream: str | None

    @property
    def key(self) -> str:
        return self.lease.intent_id

    @property
    def step_index(self) -> int:
        """The step whose record the diagnosis reads (0: none)."""
        return 0


@dataclass(frozen=True)
class Ack(FencedWrite):
    """The sidecar took the delivery: DELIVERED to IN_PROGRESS, the lease
    now renewed by the heartbeat timeout."""

    kind = _kind("ack", Q.ack_assignments, 0, "at", "stream")


@dataclass(frozen=True)
class Step(FencedWrite):
    """A step's result, recorded once and in order, within the intent's
    history limits (steps and bytes)."""

    kind = _kind("step", Q.record_steps, 1, "index", "name", "result", "at", "stream", "max_history_bytes",
                 "max_history_steps")

    index: int
    name: str
    result: str  # JSON text
    max_history_bytes: int
    max_history_steps: int

    @property
    def step_index(self) -> int:
        return self.index


@dataclass(frozen=True)
class Checkpoint(FencedWrite):
    """The attempt's free-form state, replacing the last one; a later
    attempt of the intent gets it in its assignment."""

    kind = _kind("checkpoint", Q.save_checkpoints, 2, "state", "at", "stream")

    state: str  # JSON text


@dataclass(frozen=True)
class Progress(FencedWrite):
    """A message and the fraction done (0 to 1), kept and sent as an event."""

    kind = _kind("progress", Q.report_progresses, 3, "message", "fraction", "at", "stream")

    message: str
    fraction: float


@dataclass(frozen=True)
class Emit(FencedWrite):
    """Chunks appended to one stream of the intent (emit_chunks decides,
    under the intent's row lock: appended, a repeat by key, or a limit it
    would pass). One value per chunk in ``data``, ``formats`` and
    ``positions`` (the batcher's flat columns)."""

    kind = _kind("emit", Q.emit_chunks, 4, "stream_name", "emit_key", "at", "stream", "max_bytes",
                 "max_chunks_per_s", "max_streams", flat=("data", "formats", "positions"))

    stream_name: str
    emit_key: int  # attempt * 2^32 + seq
    max_bytes: int
    max_chunks_per_s: int
    max_streams: int
    data: tuple[bytes, ...]
    formats: tuple[int, ...]  # ChunkFormat numbers (TEXT or JSON)
    positions: tuple[int, ...]


@dataclass(frozen=True)
class Complete(FencedWrite):
    """The attempt's result: the intent is COMPLETED."""

    kind = _kind("complete", Q.complete_intents, 5, "result", "at", "stream")

    result: str  # JSON text


@dataclass(frozen=True)
class Fail(FencedWrite):
    """The attempt failed: another attempt follows after the backoff when
    ``retryable`` and attempts are left (intentd_attempt_end decides),
    else the intent is FAILED."""

    kind = _kind("fail", Q.fail_intents, 6, "code", "message", "retryable", "at", "stream")

    code: str
    message: str
    retryable: bool


@dataclass(frozen=True)
class Release(FencedWrite):
    """The intent given back without a result for redelivery at once
    (``reason``: one of leases.RELEASE_REASONS; intentd_attempt_end decides
    whether an attempt is left)."""

    kind = _kind("release", Q.release_intents, 7, "reason", "at", "stream")

    reason: str


# The kinds ranked in the order an attempt makes them (WriteKind.rank).
ACK, STEP, CHECKPOINT, PROGRESS, EMIT, COMPLETE, FAIL, RELEASE = (
    Ack.kind, Step.kind, Checkpoint.kind, Progress.kind, Emit.kind, Complete.kind, Fail.kind, Release.kind)
