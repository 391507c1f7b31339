"""Data access for deliveries: claims, acknowledgements, renewals, expiry
and the fenced writes of an attempt."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

from intentd.server import errors
from intentd.server.batcher import Outcome, WriteBatcher, WriteKind, apply_group
from intentd.server.db import Database, Row
from intentd.server.queries import Q
from intentd.validation import ValidationError, parse_json

RELEASE_REASONS = ("AGENT_DIED", "DRAINED", "SIDECAR_STOPPED")

# The fenced writes of an attempt, each one set-based statement for a group
# of writes (see WriteBatcher), ranked in the order an attempt makes them.
ACK = WriteKind("ack", Q.ack_assignments, 0, Q.write_diagnoses)
STEP = WriteKind("step", Q.record_steps, 1, Q.write_diagnoses)
CHECKPOINT = WriteKind("checkpoint", Q.save_checkpoints, 2, Q.write_diagnoses)
PROGRESS = WriteKind("progress", Q.report_progresses, 3, Q.write_diagnoses)
COMPLETE = WriteKind("complete", Q.complete_intents, 4, Q.write_diagnoses)
FAIL = WriteKind("fail", Q.fail_intents, 5, Q.write_diagnoses)
RELEASE = WriteKind("release", Q.release_intents, 6, Q.write_diagnoses)


@dataclass(frozen=True)
class LeaseRef:
    intent_id: str
    attempt: int
    token: uuid.UUID

    @classmethod
    def parse(cls, intent_id: str, attempt: int, token: str) -> LeaseRef:
        if not intent_id:
            raise ValidationError("lease.intent_id", "is required")
        if attempt < 1:
            raise ValidationError("lease.attempt", "must be at least 1")
        try:
            parsed = uuid.UUID(token)
        except ValueError:
            raise ValidationError("lease.token", "is not a lease token") from None
        return cls(intent_id, attempt, parsed)


def _stale(lease: LeaseRef, state: str, past_deadline: bool = False) -> errors.StaleLease:
    if past_deadline and state in ("DELIVERED", "IN_PROGRESS"):
        return errors.StaleLease(
            f"lease of attempt {lease.attempt} on intent {lease.intent_id} ended: the intent's deadline passed; "
            "stop working on it")
    return errors.StaleLease(
        f"lease of attempt {lease.attempt} on intent {lease.intent_id} is not live "
        f"(the intent is {state} under another or no lease); stop working on it"
    )


class LeaseStore:
    def __init__(self, db: Database, *, max_payload_bytes: int, batcher: WriteBatcher | None = None) -> None:
        self.db = db
        self.max_payload_bytes = max_payload_bytes
        self.batcher = batcher

    async def _write(
        self, kind: WriteKind, lease: LeaseRef, *args: object, now: datetime | None, index: int = 0,
        session: str | None = None,
    ) -> Outcome:
        """A fenced write, through the group commit when there is one: its
        row, or None and the write's diagnosis (``write_diagnoses`` at
        ``now``, for step ``index`` and checking that ``session`` holds the
        lease), read right after the write."""
        write_args = (lease.intent_id, lease.token, lease.attempt, *args)
        explain_args = (lease.intent_id, lease.token, lease.attempt, index, session, now)
        if self.batcher is not None:
            return await self.batcher.write(kind, lease.intent_id, write_args, explain_args)
        async with self.db.connection() as conn:
            (outcome,) = await apply_group(conn, kind, [write_args], [explain_args])
        return outcome

    async def claim(
        self,
        session: str,
        addresses: Sequence[str],
        intent_types: Sequence[str] | None,
        limit: int,
        ack_timeout_ms: int,
        now: datetime | None = None,
        tenant: str = "default",
    ) -> tuple[list[Row], dict[str, list[Row]]]:
        """Claims up to ``limit`` claimable intents for a stream; returns them
        with the steps recorded by their earlier attempts."""
        async with self.db.connection() as conn:
            rows = await conn.fetch(
                Q.claim_intents, session, list(addresses), list(intent_types) if intent_types else None,
                limit, now, ack_timeout_ms, tenant,
            )
            steps: dict[str, list[Row]] = defaultdict(list)
            resumed = [r["id"] for r in rows if r["steps_completed"] > 0]
            if resumed:
                for step in await conn.fetch(Q.steps_of, resumed):
                    steps[step["intent_id"]].append(step)
        return list(rows), steps

    async def seconds_until_available(
        self, addresses: Sequence[str], intent_types: Sequence[str] | None, now: datetime | None = None,
        tenant: str = "default",
    ) -> float | None:
        async with self.db.connection() as conn:
            value: float | None = await conn.fetchval(
                Q.next_available, list(addresses), list(intent_types) if intent_types else None, now, tenant
            )
        return value

    async def ack(self, lease: LeaseRef, now: datetime | None = None, session: str | None = None) -> None:
        row, why = await self._write(ACK, lease, now, session, now=now, session=session)
        if row is not None:
            return
        if why is not None and why["same_lease"] and why["holds"] and why["state"] == "IN_PROGRESS":
            return  # a repeated acknowledgement
        self._refuse(lease, why)

    async def renew(self, session: str, now: datetime | None = None) -> set[tuple[str, uuid.UUID]]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q.renew_leases, session, now)
        return {(r["id"], r["lease_token"]) for r in rows}

    async def rebind(
        self, lease: LeaseRef, session: str, addresses: Sequence[str], now: datetime | None = None,
        tenant: str = "default",
    ) -> int | None:
        """Re-binds a lease to a new stream serving ``addresses``; returns the
        intent's event seq, or None when the lease is no longer live or is
        for an address the stream does not serve."""
        async with self.db.connection() as conn:
            row = await conn.fetchrow(
                Q.rebind_lease, lease.intent_id, lease.token, lease.attempt, session, now, tenant, list(addresses))
        return None if row is None else int(row["last_seq"])

    async def record_step(
        self, lease: LeaseRef, index: int, name: str, result: bytes, now: datetime | None = None,
        session: str | None = None,
    ) -> Row:
        if index < 1:
            raise ValidationError("step.index", "must be at least 1")
        if not name or len(name) > 200:
            raise ValidationError("step.name", "must be 1 to 200 characters")
        text = parse_json(result, "step.result", self.max_payload_bytes)
        row, why = await self._write(
            STEP, lease, index, name, text, now, session, now=now, index=index, session=session)
        if row is not None:
            return row
        if why is None:
            raise errors.NotFound(f"intent {lease.intent_id} not found")
        if not why["same_lease"] or not why["holds"] or why["state"] != "IN_PROGRESS" or why["past_deadline"]:
            raise _stale(lease, why["state"], why["past_deadline"])
        if why["idx"] is not None:
            if why["name"] == name:
                # A repeat of a write that committed (its answer was lost): the
                # stored record is the answer.
                return {"intent_id": lease.intent_id, "idx": why["idx"], "name": why["name"],
                        "result": why["result"], "attempt": why["step_attempt"], "record_time": why["record_time"]}
            raise errors.FailedPrecondition(
                f"step divergence: step {index} of intent {lease.intent_id} was recorded as "
                f"{why['name']!r}, now reported as {name!r}; steps must be deterministic in name and order"
            )
        raise errors.FailedPrecondition(
            f"step {index} reported out of order: intent {lease.intent_id} has "
            f"{why['steps_completed']} recorded steps, so the next is {why['steps_completed'] + 1}"
        )

    async def save_checkpoint(
        self, lease: LeaseRef, state: bytes, now: datetime | None = None, session: str | None = None
    ) -> None:
        text = parse_json(state, "checkpoint.state", self.max_payload_bytes)
        await self._guarded(CHECKPOINT, lease, text, now, session, now=now)

    async def report_progress(
        self, lease: LeaseRef, message: str, fraction: float, now: datetime | None = None,
        session: str | None = None,
    ) -> None:
        if len(message) > 1000:
            raise ValidationError("progress.message", "is longer than 1000 characters")
        if not 0.0 <= fraction <= 1.0:
            raise ValidationError("progress.fraction", "must be between 0 and 1")
        await self._guarded(PROGRESS, lease, message, fraction, now, session, now=now)

    async def complete(
        self, lease: LeaseRef, result: bytes, now: datetime | None = None, session: str | None = None
    ) -> float | None:
        """Returns the intent's age at completion, or None for a repeat."""
        text = parse_json(result, "complete.result", self.max_payload_bytes)
        row, why = await self._write(COMPLETE, lease, text, now, session, now=now)
        if row is not None:
            return float(row["age_s"])
        if why is not None and why["same_lease"] and why["state"] == "COMPLETED":
            return None  # a repeat of a completion that committed
        self._refuse(lease, why)

    async def fail(
        self, lease: LeaseRef, code: str, message: str, retryable: bool, now: datetime | None = None,
        session: str | None = None,
    ) -> Row:
        code = code or "AGENT_ERROR"
        if len(code) > 100 or not code.replace("_", "").replace(".", "").isalnum():
            raise ValidationError("fail.code", "must be up to 100 characters of [A-Za-z0-9_.]")
        row, why = await self._write(FAIL, lease, code, message[:4000], retryable, now, session, now=now)
        if row is None:
            self._refuse(lease, why)
        return row

    async def release(
        self, lease: LeaseRef, reason: str, now: datetime | None = None, session: str | None = None
    ) -> Row:
        if reason not in RELEASE_REASONS:
            raise ValidationError("release.reason", f"must be one of {', '.join(RELEASE_REASONS)}")
        row, why = await self._write(RELEASE, lease, reason, now, session, now=now)
        if row is None:
            self._refuse(lease, why)
        return row

    async def ping(self) -> None:
        async with self.db.connection() as conn:
            await conn.fetchval(Q.ping)

    async def expire(self, now: datetime | None = None, batch: int = 500) -> list[Row]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.expire_leases, now, batch))

    async def _guarded(self, kind: WriteKind, lease: LeaseRef, *args: object, now: datetime | None) -> None:
        row, why = await self._write(kind, lease, *args, now=now)
        if row is None:
            self._refuse(lease, why)

    @staticmethod
    def _refuse(lease: LeaseRef, why: Row | None) -> NoReturn:
        if why is None:
            raise errors.NotFound(f"intent {lease.intent_id} not found")
        raise _stale(lease, why["state"], why["past_deadline"])
