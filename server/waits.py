"""Data access for durable waits (docs/waits.md): an attempt reaching a
wait (register, satisfy, park), signals, human tasks and the timer sweep.

Every transaction here that can satisfy a wait starts by locking the
intent's row, as every other writer of waits does (sql/waits.sql says
why); each state change after it is one guarded statement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from intentd.core.limits import MAX_INBOX_BYTES, MAX_INBOX_SIGNALS
from intentd.core.states import TERMINAL_STATES
from intentd.core.waits import AGENT, DEFAULT_OUTCOMES, HUMAN, SIGNAL, TIME

from . import errors
from .db import Database, Row
from .ids import new_id
from .leases import LeaseRef
from .queries import Q

__all__ = ["Reached", "SignalOutcome", "WaitSpec", "WaitStore", "rfc3339", "stale_lease"]

_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)


def rfc3339(value: datetime) -> str:
    """As intentd_rfc3339 (migration 0010) writes times into recorded values."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class SignalOutcome:
    """A signal sent: the intent after it, the signal's row (the first one
    for a repeated signal id), and whether this call created it."""

    intent: Row
    signal: Row
    created: bool


@dataclass(frozen=True)
class WaitSpec:
    """A validated WaitWrite."""

    index: int
    step_name: str
    kind: str  # core.waits.SIGNAL, HUMAN, TIME or AGENT
    # SIGNAL: the signal's name; HUMAN: the task's title; TIME: "";
    # AGENT: the child mode (ALL or FIRST).
    name: str
    timeout_ms: int = 0
    until: datetime | None = None
    description: str = ""
    outcomes: tuple[str, ...] = DEFAULT_OUTCOMES
    assignees: tuple[str, ...] = field(default_factory=tuple)
    form_schema: str | None = None  # JSON text
    remind_after_ms: int = 0
    # AGENT: the children waited for, in the handler's order.
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reached:
    """Where an attempt's wait stands after one try: resolved (``record``,
    the wait's step row), parked, or neither (then it may be held for up to
    ``hold_ms``, and is due in ``due_in_s`` seconds, None: never)."""

    record: Row | None
    parked: bool
    hold_ms: int
    due_in_s: float | None = None


def stale_lease(lease: LeaseRef, row: Row) -> errors.StaleLease:
    if row["past_deadline"] and row["state"] in ("DELIVERED", "IN_PROGRESS"):
        return errors.StaleLease(
            f"lease of attempt {lease.attempt} on intent {lease.intent_id} ended: the intent's deadline passed; "
            "stop working on it")
    return errors.StaleLease(
        f"lease of attempt {lease.attempt} on intent {lease.intent_id} is not live "
        f"(the intent is {row['state']} under another or no lease); stop working on it")


class WaitStore:
    def __init__(self, db: Database, *, max_record_bytes: int = 128 * 1024) -> None:
        self.db = db
        # An AGENT wait's record holds its children's results while they fit
        # in this (the payload limit: every record must fit in a message).
        self.max_record_bytes = max_record_bytes

    # ------------------------------------------------------------ an attempt's wait

    async def reach(
        self, lease: LeaseRef, stream: str, spec: WaitSpec, *, park: bool | None = None,
        now: datetime | None = None,
    ) -> Reached:
        """An attempt reached a wait: registers it (once per position), then
        tries to satisfy it. ``park``: park when it is not satisfied (None:
        only when the intent's hold window is 0)."""
        return await self._try(lease, stream, spec.index, spec, park, now)

    async def retry(
        self, lease: LeaseRef, stream: str, index: int, *, park: bool, now: datetime | None = None,
    ) -> Reached:
        """Tries a registered wait again (during its hold), parking it when
        ``park`` and it is still unsatisfied."""
        return await self._try(lease, stream, index, None, park, now)

    async def _try(
        self, lease: LeaseRef, stream: str, index: int, spec: WaitSpec | None, park: bool | None,
        now: datetime | None,
    ) -> Reached:
        intent_id = lease.intent_id
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(Q.lock_intent, intent_id, now)
            if row is None:
                raise errors.NotFound(f"intent {intent_id} not found")
            hold_ms = int(row["wait_hold_ms"])
            same = row["lease_token"] == lease.token and row["attempt"] == lease.attempt
            wait = await conn.fetchrow(Q.wait_at, intent_id, index, now)
            if same and row["state"] == "WAITING" and wait is not None and wait["resolved_time"] is None:
                return Reached(None, True, hold_ms)  # a repeat of a wait whose park committed
            if (not same or row["state"] != "IN_PROGRESS" or row["lease_session"] != stream
                    or row["past_deadline"]):
                raise stale_lease(lease, row)
            step_name = spec.step_name if spec is not None else wait["step_name"] if wait is not None else None
            step = await conn.fetchrow(Q.step_at, intent_id, index)
            if step is not None:
                if step["name"] == step_name:
                    return Reached(step, False, hold_ms)  # recorded: by a signal, a decision, an earlier try
                raise errors.FailedPrecondition(
                    f"step divergence: position {index} of intent {intent_id} was recorded as {step['name']!r}, "
                    f"now reached as {step_name!r}; steps and waits must be deterministic in name and order")
            if wait is None:
                if spec is None:
                    raise errors.FailedPrecondition(f"intent {intent_id} has no wait at position {index}")
                await self._register(conn, row, spec, now)
                wait = await conn.fetchrow(Q.wait_at, intent_id, index, now)
            elif spec is not None and wait["step_name"] != spec.step_name:
                raise errors.FailedPrecondition(
                    f"step divergence: the wait at position {index} of intent {intent_id} was registered as "
                    f"{wait['step_name']!r}, now reached as {spec.step_name!r}")
            if wait["resolved_time"] is not None:
                # Closed when the intent ended; it was retried since.
                await conn.execute(Q.reopen_wait, intent_id, index)
                wait = await conn.fetchrow(Q.wait_at, intent_id, index, now)
            record = await self._satisfy(conn, wait, now)
            if record is not None:
                return Reached(record, False, hold_ms)
            if park or (park is None and hold_ms == 0):
                parked = await conn.fetchrow(Q.park_intent, intent_id, lease.token, lease.attempt, stream, index, now)
                if parked is None:
                    raise stale_lease(lease, row)
                return Reached(None, True, hold_ms)
            due = wait["due_in_s"]
            return Reached(None, False, hold_ms, None if due is None else float(due))

    @staticmethod
    async def _register(conn: asyncpg.Connection, intent: Row, spec: WaitSpec, now: datetime | None) -> None:
        task_id = new_id() if spec.kind == HUMAN else None
        children: list[str] | None = None
        if spec.kind == AGENT:
            children = list(spec.children)
            foreign = [r["id"] for r in await conn.fetch(Q.foreign_children, intent["id"], children)]
            if foreign:
                raise errors.InvalidArgument(
                    f"wait.children: {len(foreign)} of the ids are not children of intent {intent['id']} "
                    f"(first: {foreign[0][:64]!r}); a handler waits only for children it started")
        await conn.fetchrow(
            Q.register_wait, intent["id"], spec.index, spec.kind, spec.name, spec.step_name, spec.until,
            intent["attempt"], now, task_id, spec.name, spec.description, list(spec.outcomes or DEFAULT_OUTCOMES),
            list(spec.assignees), spec.form_schema, spec.remind_after_ms, spec.timeout_ms, children,
            spec.name if spec.kind == AGENT else None)

    async def child_wait_value(self, conn: asyncpg.Connection, intent_id: str, index: int) -> str | None:
        """What the AGENT wait at ``index`` records now (None: unsatisfied):
        with its children's results while they fit in a record."""
        value: str | None = await conn.fetchval(Q.child_wait_value, intent_id, index, True)
        if value is not None and len(value.encode()) > self.max_record_bytes:
            value = await conn.fetchval(Q.child_wait_value, intent_id, index, False)
        return value

    async def _satisfy(self, conn: asyncpg.Connection, wait: Row, now: datetime | None) -> Row | None:
        """Records the wait's value if something satisfies it now: the
        oldest inbox signal of its name, its task's decision, or its due
        time. Runs under the intent's row lock."""
        intent_id, index, kind = wait["intent_id"], wait["idx"], wait["kind"]
        due = wait["due_in_s"] is not None and wait["due_in_s"] <= 0
        value: str | None = None
        event, message, signal_id = "STEP_COMPLETED", None, None
        if kind == SIGNAL:
            signal = await conn.fetchrow(Q.take_signal, intent_id, index, wait["name"])
            if signal is not None:
                value, signal_id = signal["value"], signal["signal_id"]
            elif due:
                value, event, message = json.dumps({"timed_out": True}), "TIMER_FIRED", "TIMEOUT"
        elif kind == HUMAN:
            task = await conn.fetchrow(Q.task_at, intent_id, index)
            if task is not None and task["state"] == "DECIDED":
                value = task["value"]
            elif due or (task is not None and task["state"] == "EXPIRED"):
                if task is not None:
                    await conn.fetchrow(Q.expire_task, task["id"])
                value = json.dumps({"timed_out": True, "task_id": wait["task_id"]})
                event, message = "TIMER_FIRED", "TIMEOUT"
        elif kind == TIME and due:
            value, event = json.dumps({"fired": rfc3339(wait["due_at"])}), "TIMER_FIRED"
        elif kind == AGENT:
            value = await self.child_wait_value(conn, intent_id, index)
            if value is None and due:
                value, event, message = json.dumps({"timed_out": True}), "TIMER_FIRED", "TIMEOUT"
        if value is None:
            return None
        record = await conn.fetchrow(Q.record_wait, intent_id, index, value, now, event, message, signal_id, None,
                                     None)
        if record is None:
            # Checked under the lock just before: a bug; roll the taking back.
            raise errors.FailedPrecondition(f"the wait at position {index} of intent {intent_id} could not be recorded")
        return record

    # ------------------------------------------------------------ signals

    async def signal(
        self, tenant: str, intent_id: str, name: str, payload: str, signal_id: str | None, sender: str,
        now: datetime | None = None,
    ) -> SignalOutcome:
        """Delivers a signal (``payload``: validated JSON text): satisfies the
        intent's open wait for ``name`` at once, else joins its inbox."""
        signal_id = signal_id or new_id()
        async with self.db.transaction() as conn:
            intent = await conn.fetchrow(Q.lock_intent_of_tenant, intent_id, tenant)
            if intent is None:
                raise errors.NotFound(f"intent {intent_id!r} not found")
            first = await conn.fetchrow(Q.signal_by_id, intent_id, signal_id)
            if first is not None:
                return SignalOutcome(intent, first, False)
            if intent["state"] in _TERMINAL:
                raise errors.FailedPrecondition(f"intent {intent_id} is {intent['state']}; it takes no more signals")
            wait = await conn.fetchrow(Q.open_signal_wait, intent_id, name, now)
            if wait is not None:
                signal = await conn.fetchrow(Q.insert_signal, intent_id, signal_id, name, payload, sender, now,
                                             wait["idx"])
                record = await conn.fetchrow(Q.record_wait, intent_id, wait["idx"], signal["value"], now, "SIGNALED",
                                             None, signal_id, sender, None)
                if record is None:
                    raise errors.FailedPrecondition(
                        f"the wait at position {wait['idx']} of intent {intent_id} could not be recorded")
            else:
                inbox = await conn.fetchrow(Q.inbox_size, intent_id)
                if inbox["signals"] >= MAX_INBOX_SIGNALS:
                    raise errors.ResourceExhausted(
                        f"intent {intent_id} has {MAX_INBOX_SIGNALS} signals no wait took yet; no more are kept",
                        retry_after_ms=1000)
                if inbox["bytes"] + len(payload.encode()) > MAX_INBOX_BYTES:
                    raise errors.ResourceExhausted(
                        f"intent {intent_id} holds {inbox['bytes']} bytes of signals no wait took yet; this one"
                        f" would pass the inbox's {MAX_INBOX_BYTES} bytes", retry_after_ms=1000)
                signal = await conn.fetchrow(Q.insert_signal, intent_id, signal_id, name, payload, sender, now, None)
            after = await conn.fetchrow(Q.get_intent, intent_id, tenant)
        return SignalOutcome(after, signal, True)

    # ------------------------------------------------------------ human tasks

    async def get_task(self, tenant: str, task_id: str) -> Row:
        async with self.db.connection() as conn:
            row: Row | None = await conn.fetchrow(Q.get_task, tenant, task_id)
        if row is None:
            raise errors.NotFound(f"human task {task_id!r} not found")
        return row

    async def list_tasks(
        self, tenant: str, *, states: Sequence[str], assignee: str | None, intent_type: str | None,
        intent_id: str | None, limit: int, before_id: str | None,
    ) -> list[Row]:
        """Newest first; ``states`` empty: all; ``assignee``: the tasks naming
        it among their assignees, or naming nobody."""
        async with self.db.connection() as conn:
            return list(await conn.fetch(Q.list_tasks, tenant, list(states) or None, assignee, intent_type,
                                         intent_id, before_id, limit))

    async def decide_task(
        self, tenant: str, task_id: str, outcome: str, comment: str, form_data: str | None, actor: str,
        now: datetime | None = None,
    ) -> Row:
        """OPEN to DECIDED (the caller checked permission, outcome and
        form); satisfies the task's wait. A repeat by the same actor with the
        same outcome answers the task as it is."""
        async with self.db.transaction() as conn:
            task = await conn.fetchrow(Q.get_task, tenant, task_id)
            if task is None:
                raise errors.NotFound(f"human task {task_id!r} not found")
            await conn.fetchrow(Q.lock_intent_of_tenant, task["intent_id"], tenant)
            decided = await conn.fetchrow(Q.decide_task, task_id, outcome, comment, form_data, actor, now)
            if decided is None:
                task = await conn.fetchrow(Q.get_task, tenant, task_id)
                if task["state"] == "DECIDED" and task["decided_by"] == actor and task["outcome"] == outcome:
                    return task
                raise errors.FailedPrecondition(f"human task {task_id} is {task['state']}; it cannot be decided")
            record = await conn.fetchrow(Q.record_wait, task["intent_id"], task["idx"], decided["value"], now,
                                         "TASK_DECIDED", outcome, None, actor, task_id)
            if record is None:
                # Its wait was not at the intent's next position (a handler that
                # diverged): the decision stands, and is told.
                await conn.fetchrow(Q.add_event, task["intent_id"], "TASK_DECIDED", outcome, actor, task_id, now,
                                    task["idx"], HUMAN, task["title"])
        row = dict(decided)
        row.pop("value", None)
        return row

    # ------------------------------------------------------------ the timer sweep

    async def fire_due(self, now: datetime | None = None, batch: int = 500) -> list[Row]:
        """Fires the due waits of parked intents (at most ``batch``): each
        intent's (id, to_agent, kind, idx)."""
        async with self.db.transaction() as conn:
            due = await conn.fetch(Q.due_waits, now, batch)
            if not due:
                return []
            return list(await conn.fetch(Q.fire_timers, [r["intent_id"] for r in due], [r["idx"] for r in due], now))

    async def remind_due(self, now: datetime | None = None, batch: int = 500) -> list[str]:
        """TASK_REMINDED, once, for open tasks past their reminder: their ids."""
        async with self.db.transaction() as conn:
            due = await conn.fetch(Q.due_reminders, now, batch)
            if not due:
                return []
            return [r["task_id"] for r in await conn.fetch(Q.remind_tasks, [r["id"] for r in due], now)]
