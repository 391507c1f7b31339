"""Data access for deliveries: claims, acknowledgements, renewals, expiry
and the fenced writes of an attempt."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_FAIL_CODE_LEN, MAX_FAIL_MESSAGE_LEN, MAX_PROGRESS_MESSAGE_LEN, MAX_STEP_NAME_LEN
from intentd.core.validation import check_text, parse_json
from intentd.core.waits import RESERVED_PREFIX

from . import errors, history
from .batcher import Outcome, WriteBatcher, apply_group
from .db import Database, Row
from .fenced import Ack, Checkpoint, Complete, Fail, FencedWrite, LeaseRef, Progress, Release, Step
from .queries import Q

__all__ = ["RELEASE_REASONS", "LeaseRef", "LeaseStore", "Rebound", "refuse_write"]

RELEASE_REASONS = ("AGENT_DIED", "DRAINED", "SIDECAR_STOPPED")
# No byte bound (PostgreSQL bigint).
UNBOUNDED = 2**62

@dataclass(frozen=True)
class Rebound:
    """A lease moved to a new stream: the intent's event seq, and whether
    the lease was acknowledged already."""

    seq: int
    acked: bool


def _stale(lease: LeaseRef, state: str, past_deadline: bool = False) -> errors.StaleLease:
    if past_deadline and state in ("DELIVERED", "IN_PROGRESS"):
        return errors.StaleLease(
            f"lease of attempt {lease.attempt} on intent {lease.intent_id} ended: the intent's deadline passed; "
            "stop working on it")
    return errors.StaleLease(
        f"lease of attempt {lease.attempt} on intent {lease.intent_id} is not live "
        f"(the intent is {state} under another or no lease); stop working on it"
    )


def refuse_write(lease: LeaseRef, why: Row | None) -> NoReturn:
    """The error of a fenced write its lease did not let through, from its
    diagnosis (write_diagnoses; None: no such intent)."""
    if why is None:
        raise errors.NotFound(f"intent {lease.intent_id} not found")
    raise _stale(lease, why["state"], why["past_deadline"])


def _repeat(lease: LeaseRef, why: Row) -> Row:
    """The answer to a repeated fail or release of an attempt that already
    ended that way: how it ended, as the first write was answered."""
    return {"ord": None, "id": lease.intent_id, "state": why["ended_state"], "error_code": why["ended_code"],
            "age_s": why["ended_age_s"]}


class LeaseStore:
    def __init__(self, db: Database, *, max_payload_bytes: int, batcher: WriteBatcher | None = None,
                 max_history_bytes: int = 256 * 1024 * 1024, max_history_steps: int = 10_000,
                 page_bytes: int = history.PAGE_BYTES) -> None:
        self.db = db
        self.max_payload_bytes = max_payload_bytes
        self.batcher = batcher
        self.max_history_bytes = max_history_bytes
        self.max_history_steps = max_history_steps
        self.page_bytes = page_bytes

    async def _write(self, write: FencedWrite) -> Outcome:
        """A fenced write, through the group commit when there is one: its
        row, or None and the write's diagnosis (``write_diagnoses``), read
        right after the write."""
        if self.batcher is not None:
            return await self.batcher.write(write)
        async with self.db.connection() as conn:
            (outcome,) = await apply_group(conn, write.kind, [write])
        return outcome

    async def claim(
        self,
        stream: str,
        addresses: Sequence[str],
        intent_types: Sequence[str] | None,
        limit: int,
        ack_timeout_ms: int,
        now: datetime | None = None,
        tenant: str = "default",
        whole_history: bool = False,
    ) -> tuple[list[Row], dict[str, list[Row]]]:
        """Claims up to ``limit`` claimable intents for a stream; returns them
        with the first page of the steps recorded by their earlier attempts.
        ``whole_history``: all of them, for a sidecar that cannot fetch; it
        is only given intents whose history fits in one page, so each of its
        assignments fits in a message (the others wait for a sidecar that
        fetches)."""
        fits = self.page_bytes if whole_history else None
        async with self.db.connection() as conn:
            rows = await conn.fetch(
                Q.claim_intents, stream, list(addresses), list(intent_types) if intent_types else None,
                limit, now, ack_timeout_ms, tenant, fits,
            )
            steps: dict[str, list[Row]] = defaultdict(list)
            resumed = [r["id"] for r in rows if history.recorded_to(r) > 0]
            if resumed:
                if whole_history:
                    budget, total, count = UNBOUNDED, UNBOUNDED, self.max_history_steps
                else:
                    budget, total, count = self.page_bytes, history.CLAIM_BYTES, history.PAGE_STEPS
                for step in await conn.fetch(Q.steps_of, resumed, tenant, 1, budget, total, count):
                    steps[step["intent_id"]].append(step)
        return list(rows), steps

    async def recorded_steps(
        self, lease: LeaseRef, stream: str, from_index: int, max_bytes: int, tenant: str = "default",
    ) -> tuple[int, list[Row]]:
        """A page of the steps recorded for the intent of a live lease held
        by ``stream``: the intent's highest recorded position and the steps
        from ``from_index`` on (every one recorded up to the page's last).
        FAILED_PRECONDITION when the stream does not hold the lease (stale,
        or never its own)."""
        if from_index < 1:
            raise ValidationError("from_index", "must be at least 1")
        if max_bytes < 0:
            raise ValidationError("max_bytes", "must not be negative")
        budget = min(max_bytes or self.page_bytes, self.page_bytes)
        async with self.db.connection() as conn:
            recorded = await conn.fetchval(Q.lease_holder, lease.intent_id, lease.token, lease.attempt, stream,
                                           tenant)
            if recorded is None:
                raise errors.StaleLease(
                    f"lease of attempt {lease.attempt} on intent {lease.intent_id} is not held by this stream; "
                    "stop working on it")
            rows = await conn.fetch(Q.steps_of, [lease.intent_id], tenant, from_index, budget, budget,
                                    history.PAGE_STEPS)
        return int(recorded), list(rows)

    async def seconds_until_available(
        self, addresses: Sequence[str], intent_types: Sequence[str] | None, now: datetime | None = None,
        tenant: str = "default",
    ) -> float | None:
        async with self.db.connection() as conn:
            value: float | None = await conn.fetchval(
                Q.next_available, list(addresses), list(intent_types) if intent_types else None, now, tenant
            )
        return value

    async def ack(self, lease: LeaseRef, now: datetime | None = None, stream: str | None = None) -> None:
        row, why = await self._write(Ack(lease, now, stream))
        if row is not None:
            return
        if why is not None and why["same_lease"] and why["holds"] and why["state"] == "IN_PROGRESS":
            return  # a repeated acknowledgement
        self._refuse(lease, why)

    async def renew(self, stream: str, now: datetime | None = None) -> set[tuple[str, uuid.UUID]]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q.renew_leases, stream, now)
        return {(r["id"], r["lease_token"]) for r in rows}

    async def endings(self, leases: Sequence[LeaseRef]) -> dict[str, str]:
        """The leases among ``leases`` whose attempt ended CANCELED or
        TIMED_OUT: intent id to that state."""
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q.lease_endings, [lease.intent_id for lease in leases],
                                    [lease.attempt for lease in leases])
        return {r["id"]: r["state"] for r in rows}

    async def rebind(
        self, lease: LeaseRef, stream: str, addresses: Sequence[str], now: datetime | None = None,
        tenant: str = "default",
    ) -> Rebound | None:
        """Re-binds a lease to a new stream serving ``addresses``; None when
        the lease is no longer live or is for an address the stream does not
        serve."""
        async with self.db.connection() as conn:
            row = await conn.fetchrow(
                Q.rebind_lease, lease.intent_id, lease.token, lease.attempt, stream, now, tenant, list(addresses))
        return None if row is None else Rebound(int(row["last_seq"]), row["state"] == "IN_PROGRESS")

    async def record_step(
        self, lease: LeaseRef, index: int, name: str, result: bytes, now: datetime | None = None,
        stream: str | None = None,
    ) -> Row:
        if index < 1:
            raise ValidationError("step.index", "must be at least 1")
        check_text(name, "step.name", MAX_STEP_NAME_LEN, required=True)
        if name.startswith(RESERVED_PREFIX):
            raise ValidationError("step.name", f"must not start with {RESERVED_PREFIX!r} (the records of waits do)")
        text = parse_json(result, "step.result", self.max_payload_bytes)
        row, why = await self._write(Step(
            lease, now, stream, index=index, name=name, result=text, max_history_bytes=self.max_history_bytes,
            max_history_steps=self.max_history_steps))
        if row is not None:
            return row
        if why is None:
            raise errors.NotFound(f"intent {lease.intent_id} not found")
        if not why["same_lease"] or not why["holds"] or why["state"] != "IN_PROGRESS" or why["past_deadline"]:
            raise _stale(lease, why["state"], why["past_deadline"])
        if why["idx"] is None:
            # Live and not recorded yet: any such position is taken (concurrent
            # steps record out of order), so only the history limit refuses it.
            raise self._history_full(lease, index, name, text, int(why["history_bytes"]), int(why["steps_completed"]))
        if why["name"] == name:
            # A repeat of a write that committed (its answer was lost), or of a
            # position recorded already: the stored record is the answer.
            return {"intent_id": lease.intent_id, "idx": why["idx"], "name": why["name"],
                    "result": why["result"], "attempt": why["step_attempt"], "record_time": why["record_time"]}
        raise errors.FailedPrecondition(
            f"step divergence: step {index} of intent {lease.intent_id} was recorded as "
            f"{why['name']!r}, now reported as {name!r}; steps must be deterministic in name and order"
        )

    def _history_full(self, lease: LeaseRef, index: int, name: str, text: str, recorded: int,
                      steps: int) -> errors.ServerError:
        if index > self.max_history_steps:
            return errors.ResourceExhausted(
                f"step {index} of intent {lease.intent_id}: an intent may record at most "
                f"{self.max_history_steps} steps (INTENTD_MAX_HISTORY_STEPS); the {steps} recorded are kept")
        # Near enough for the message: the database measured the result as jsonb prints it.
        size = len(text.encode()) + len(name.encode())
        return errors.ResourceExhausted(
            f"step {index} of intent {lease.intent_id}: its {size} bytes would take the recorded history "
            f"from {recorded} past the limit of {self.max_history_bytes} bytes (INTENTD_MAX_HISTORY_BYTES); "
            f"the {steps} steps recorded are kept")

    async def save_checkpoint(
        self, lease: LeaseRef, state: bytes, now: datetime | None = None, stream: str | None = None
    ) -> None:
        text = parse_json(state, "checkpoint.state", self.max_payload_bytes)
        await self._guarded(Checkpoint(lease, now, stream, state=text))

    async def report_progress(
        self, lease: LeaseRef, message: str, fraction: float, now: datetime | None = None,
        stream: str | None = None,
    ) -> None:
        check_text(message, "progress.message", MAX_PROGRESS_MESSAGE_LEN)
        if not 0.0 <= fraction <= 1.0:
            raise ValidationError("progress.fraction", "must be between 0 and 1")
        await self._guarded(Progress(lease, now, stream, message=message, fraction=fraction))

    async def complete(
        self, lease: LeaseRef, result: bytes, now: datetime | None = None, stream: str | None = None
    ) -> float | None:
        """Returns the intent's age at completion, or None for a repeat."""
        text = parse_json(result, "complete.result", self.max_payload_bytes)
        row, why = await self._write(Complete(lease, now, stream, result=text))
        if row is not None:
            return float(row["age_s"])
        if why is not None and why["same_lease"] and why["state"] == "COMPLETED":
            return None  # a repeat of a completion that committed
        self._refuse(lease, why)

    async def fail(
        self, lease: LeaseRef, code: str, message: str, retryable: bool, now: datetime | None = None,
        stream: str | None = None,
    ) -> Row:
        code = code or "AGENT_ERROR"
        if len(code) > MAX_FAIL_CODE_LEN or not code.isascii() or not code.replace("_", "").replace(".", "").isalnum():
            raise ValidationError("fail.code", f"must be up to {MAX_FAIL_CODE_LEN} characters of [A-Za-z0-9_.]")
        message = check_text(message[:MAX_FAIL_MESSAGE_LEN], "fail.message", MAX_FAIL_MESSAGE_LEN)
        row, why = await self._write(Fail(lease, now, stream, code=code, message=message, retryable=retryable))
        if row is not None:
            return row
        if why is not None and why["ended_by"] == "fail":
            return _repeat(lease, why)  # a repeat of a failure that committed
        self._refuse(lease, why)

    async def release(
        self, lease: LeaseRef, reason: str, now: datetime | None = None, stream: str | None = None
    ) -> Row:
        if reason not in RELEASE_REASONS:
            raise ValidationError("release.reason", f"must be one of {', '.join(RELEASE_REASONS)}")
        row, why = await self._write(Release(lease, now, stream, reason=reason))
        if row is not None:
            return row
        if why is not None and why["ended_by"] == reason:
            return _repeat(lease, why)  # a repeat of a release that committed
        self._refuse(lease, why)

    async def ping(self) -> None:
        async with self.db.connection() as conn:
            await conn.fetchval(Q.ping)

    async def expire(self, now: datetime | None = None, batch: int = 500) -> list[Row]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.expire_leases, now, batch))

    async def _guarded(self, write: FencedWrite) -> None:
        row, why = await self._write(write)
        if row is None:
            self._refuse(write.lease, why)

    @staticmethod
    def _refuse(lease: LeaseRef, why: Row | None) -> NoReturn:
        refuse_write(lease, why)
