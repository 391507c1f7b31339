"""Data access for intents: every read and state change the client API makes.

Each state change is one guarded statement (UPDATE ... WHERE id AND state ...
RETURNING) that also appends its event; no row back means the transition
was refused, and the caller is told why with a follow-up read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

from intentd.core.limits import DEFAULT_WAIT_HOLD_MS
from intentd.core.states import IntentState

from . import errors, history
from .batcher import WriteBatcher, WriteKind, apply_group
from .db import Database, Row
from .ids import new_id
from .queries import Q

# New intents through the group commit: they touch no intent another write
# of the batch touches, so their rank among the kinds does not matter.
INSERT = WriteKind("insert", Q.insert_intents, -1, (
    "id", "tenant", "intent_type", "to_agent", "sender", "payload", "idempotency_key", "labels", "max_attempts",
    "deadline", "heartbeat_timeout_ms", "at", "parent_id", "parent_idx", "parent_ord", "detached", "deadline_cap"))


# Rows a listing reads from PostgreSQL at a time.
LIST_PREFETCH = 16


def size_of(row: Row) -> int:
    """About the bytes an intent row takes as a message: its variable-length
    text plus a fixed allowance for the rest."""
    return 512 + sum(len(row[name] or "") for name in (
        "payload", "result", "labels", "error_message", "progress_message", "cancel_reason", "idempotency_key"))


@dataclass(frozen=True)
class NewIntent:
    """A validated send request."""

    intent_type: str
    to_agent: str
    payload: str  # JSON text
    sender: str
    idempotency_key: str | None = None
    deadline: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_attempts: int | None = None
    # Raised instead of creating the intent (an earlier send with the same
    # key is still matched): e.g. a deadline that passed before a retry.
    refuse_if_new: Exception | None = None


@dataclass(frozen=True)
class Insert:
    """One intent's row for insert_intents: a NewIntent with its new id."""

    kind: ClassVar[WriteKind] = INSERT

    id: str
    tenant: str
    intent_type: str
    to_agent: str
    sender: str
    payload: str
    idempotency_key: str | None
    labels: str  # JSON text
    max_attempts: int | None
    deadline: datetime | None
    heartbeat_timeout_ms: int
    at: datetime | None
    # A child's place in its family (docs/children.md); None for a client's send.
    parent_id: str | None = None
    parent_idx: int | None = None
    parent_ord: int | None = None
    detached: bool | None = None
    deadline_cap: datetime | None = None

    @property
    def key(self) -> str:
        return self.id


@dataclass(frozen=True)
class Sent:
    row: Row
    created: bool


class IntentStore:
    def __init__(
        self, db: Database, *, default_heartbeat_timeout_ms: int = 10_000, batcher: WriteBatcher | None = None
    ) -> None:
        self.db = db
        self.default_heartbeat_timeout_ms = default_heartbeat_timeout_ms
        self.batcher = batcher

    async def send(self, tenant: str, intents: Sequence[NewIntent], now: datetime | None = None) -> list[Sent]:
        """Creates the intents, or matches earlier sends by idempotency key.
        A batch is one transaction: all are written or none."""
        if len(intents) == 1 and self.batcher is not None and intents[0].refuse_if_new is None:
            spec = intents[0]
            # Single sends from many callers share one INSERT and its commit (group commit).
            insert = self._insert(tenant, spec, now)
            row, _ = await self.batcher.write(insert)
            if row is not None:
                return [self._created(tenant, row)]
            # Its own row from an insert whose answer was lost, or the earlier
            # send holding the key: read back, never inserted again.
            async with self.db.connection() as conn:
                return [await self._match_existing(conn, tenant, spec, insert.id)]
        async with self.db.transaction() as conn:
            return await self._send_many(conn, tenant, intents, now)

    async def _send_many(
        self, conn: asyncpg.Connection, tenant: str, intents: Sequence[NewIntent], now: datetime | None
    ) -> list[Sent]:
        """One INSERT for the batch; the rows it did not insert (key taken) are
        matched to the earlier sends one by one, in send order."""
        fresh = [i for i, spec in enumerate(intents) if spec.refuse_if_new is None]
        inserts = {i: self._insert(tenant, intents[i], now) for i in fresh}
        outcomes = await apply_group(conn, INSERT, [inserts[i] for i in fresh])
        inserted = {i: row for i, (row, _) in zip(fresh, outcomes, strict=True) if row is not None}
        return [self._created(tenant, inserted[i]) if i in inserted
                else await self._match_existing(conn, tenant, spec, inserts[i].id if i in inserts else None)
                for i, spec in enumerate(intents)]

    @staticmethod
    def _created(tenant: str, row: Row) -> Sent:
        if row["over_quota"]:
            # Decided by the database under the tenant's lock (intentd_live_room).
            raise errors.ResourceExhausted(
                f"tenant {tenant!r} is at its quota of live intents (max_live_intents); "
                "send again when some have finished", retry_after_ms=1000)
        return Sent(row, True)

    async def _match_existing(
        self, conn: asyncpg.Connection, tenant: str, spec: NewIntent, intent_id: str | None
    ) -> Sent:
        """The send's own row, or the earlier send with the same idempotency
        key if it was the same request."""
        existing = await conn.fetchrow(
            Q.find_sent,
            tenant,
            spec.sender,
            spec.idempotency_key,
            spec.intent_type,
            spec.to_agent,
            spec.payload,
            intent_id,
        )
        if existing is None:
            if spec.refuse_if_new is not None:
                raise spec.refuse_if_new
            # The conflicting row vanished between the two statements (retention
            # deleted it); the client's retry will create it afresh.
            raise errors.Unavailable("idempotency key conflict raced with a delete; retry")
        if not existing["same_request"]:
            raise errors.AlreadyExists(
                f"idempotency_key {spec.idempotency_key!r} was already used by sender "
                f"{spec.sender!r} for intent {existing['id']} with a different intent_type, "
                "to_agent or payload"
            )
        return Sent(existing, bool(existing["own"]))

    def _insert(self, tenant: str, spec: NewIntent, now: datetime | None) -> Insert:
        return Insert(
            id=new_id(), tenant=tenant, intent_type=spec.intent_type, to_agent=spec.to_agent, sender=spec.sender,
            payload=spec.payload, idempotency_key=spec.idempotency_key, labels=json.dumps(spec.labels),
            max_attempts=spec.max_attempts, deadline=spec.deadline,
            heartbeat_timeout_ms=self.default_heartbeat_timeout_ms, at=now,
        )

    async def get(self, tenant: str, intent_id: str) -> Row:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q.get_intent, intent_id, tenant)
        if row is None:
            raise errors.NotFound(f"intent {intent_id!r} not found")
        return row

    async def list_intents(
        self,
        tenant: str,
        *,
        states: Sequence[IntentState] | None,
        intent_type: str | None,
        to_agent: str | None,
        labels: dict[str, str] | None,
        before_id: str | None,
        limit: int,
        max_bytes: int | None = None,
        parent_id: str | None = None,
    ) -> tuple[list[Row], bool]:
        """Up to ``limit`` intents, newest first (``parent_id``: that
        intent's children in start order, ``before_id`` then the last one
        seen), cut before the one that would take the page past ``max_bytes``
        (``size_of`` each; the first is always in); and whether more follow.
        Rows are read through a cursor, so a cut page reads little past its
        end."""
        rows: list[Row] = []
        size = 0
        state_names = [s.value for s in states] if states else None
        label_json = json.dumps(labels) if labels else None
        async with self.db.transaction() as conn:
            if parent_id is not None:
                cursor = conn.cursor(Q.list_children, tenant, parent_id, state_names, intent_type, to_agent,
                                     label_json, before_id, limit + 1, prefetch=LIST_PREFETCH)
            else:
                cursor = conn.cursor(Q.list_intents, tenant, state_names, intent_type, to_agent, label_json,
                                     before_id, limit + 1, prefetch=LIST_PREFETCH)
            async for row in cursor:
                if len(rows) == limit:
                    return rows, True
                size += size_of(row)
                if rows and max_bytes is not None and size > max_bytes:
                    return rows, True
                rows.append(row)
        return rows, False

    async def events(self, tenant: str, intent_id: str, after_seq: int, limit: int = 500) -> list[Row]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.list_events, intent_id, tenant, after_seq, limit))

    async def steps(
        self, tenant: str, intent_id: str, from_index: int, limit: int, max_bytes: int
    ) -> tuple[list[Row], int]:
        """A page of an intent's steps from ``from_index`` on (at most
        ``limit`` steps, cut before the one that would pass ``max_bytes``),
        and the highest position the intent had recorded just before (more
        follow while a page ends below it)."""
        recorded = history.recorded_to(await self.get(tenant, intent_id))
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q.steps_of, [intent_id], tenant, from_index, max_bytes, max_bytes, limit)
        return list(rows), recorded

    async def cancel(
        self, tenant: str, intent_id: str, reason: str, now: datetime | None = None, actor: str | None = None
    ) -> Row:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(Q.cancel_intent, intent_id, tenant, reason, now, actor)
        if row is None:
            current = await self.get(tenant, intent_id)
            raise errors.FailedPrecondition(
                f"intent {intent_id} is {current['state']}, which is terminal; it cannot be canceled"
            )
        return row

    async def retry(
        self, tenant: str, intent_id: str, extra_attempts: int, now: datetime | None = None,
        actor: str | None = None,
    ) -> Row:
        async with self.db.connection() as conn:
            current = await conn.fetchrow(Q.get_intent, intent_id, tenant)
            if current is None:
                raise errors.NotFound(f"intent {intent_id!r} not found")
            extra = extra_attempts or current["max_attempts"]
            row = await conn.fetchrow(Q.retry_intent, intent_id, tenant, extra, now, actor)
            if row is not None:
                return row
            why = await conn.fetchrow(Q.retry_refusal, intent_id, tenant, now)
        if why is None:
            raise errors.NotFound(f"intent {intent_id!r} not found")
        if why["state"] != IntentState.FAILED:
            raise errors.FailedPrecondition(f"intent {intent_id} is {why['state']}; only FAILED intents can be retried")
        if why["past_deadline"]:
            raise errors.FailedPrecondition(f"intent {intent_id} is past its deadline; it cannot be retried")
        raise errors.ResourceExhausted(
            f"tenant {tenant!r} is at its quota of live intents (max_live_intents); retry intent {intent_id} "
            "when fewer are live", retry_after_ms=1000)

    async def delete_finished(self, retention_s: float, now: datetime | None = None, batch: int = 500) -> int:
        async with self.db.connection() as conn:
            return len(await conn.fetch(Q.delete_finished_intents, now, retention_s, batch))

    async def expire_deadlines(self, now: datetime | None = None, batch: int = 500) -> list[Row]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.expire_deadlines, now, batch))

    async def put_intent_type(self, tenant: str, intent_type: str, **settings: Any) -> Row:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(
                Q.upsert_intent_type,
                tenant,
                intent_type,
                settings["max_attempts"],
                settings["heartbeat_timeout_ms"],
                settings["retry_backoff_ms"],
                settings["retry_backoff_max_ms"],
                settings["default_deadline_ms"],
                settings.get("wait_hold_ms"),
                DEFAULT_WAIT_HOLD_MS,
                settings.get("stream_keep_ms"),
            )
        assert row is not None
        return row

    async def get_intent_type(self, tenant: str, intent_type: str) -> Row | None:
        async with self.db.connection() as conn:
            row: Row | None = await conn.fetchrow(Q.get_intent_type, tenant, intent_type)
        return row

    async def list_intent_types(self, tenant: str) -> list[Row]:
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.list_intent_types, tenant))

    async def audit(self, tenant: str, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        async with self.db.connection() as conn:
            await conn.execute(Q.audit, tenant, actor, action, target, json.dumps(detail))
