"""A WaitWrite on a stream: validated, then registered and tried in the
database, held for up to the intent's hold window while hub notifications
(any replica's signal or decision commits an event) or its due time may
satisfy it, and parked when the window ends unsatisfied (docs/waits.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from intentd.core import limits
from intentd.core.errors import ValidationError
from intentd.core.states import TERMINAL_STATES
from intentd.core.validation import check_horizon_ms, check_text, parse_json
from intentd.core.waits import (
    AGENT,
    CHILD_MODES,
    DEFAULT_OUTCOMES,
    HUMAN,
    KINDS,
    SIGNAL,
    TIME,
    record_name,
    signal_name_problem,
)
from intentd.generated.v1 import delivery_pb2, intent_pb2

from ..hub import NotificationHub, Subscription
from ..ids import looks_like_id
from ..leases import LeaseRef
from ..waits import Reached, WaitSpec, WaitStore
from .leases import StreamLease
from .state import Stream

# A due time is checked this long after the holder's clock says it passed,
# so the database's clock (which judges it) agrees.
DUE_SLACK_S = 0.005
# AGENT waits of at most this many children are woken by their children's ends.
HOLD_WATCHES_CHILDREN = 16
_TERMINAL = frozenset(s.value for s in TERMINAL_STATES)


def _kind(value: intent_pb2.WaitKind.ValueType) -> str:
    try:
        kind = intent_pb2.WaitKind.Name(value).removeprefix("WAIT_KIND_")
    except ValueError:
        kind = ""

    if kind not in KINDS:
        raise ValidationError("wait.kind", "must be SIGNAL, HUMAN, TIME or AGENT")
    return kind


def _children(msg: delivery_pb2.ChildWait) -> tuple[str, tuple[str, ...]]:
    """The mode and ids of an AGENT wait, checked."""
    mode = delivery_pb2.ChildWaitMode.Name(msg.mode).removeprefix("CHILD_WAIT_MODE_") \
        if msg.mode in delivery_pb2.ChildWaitMode.values() else ""
    if mode not in CHILD_MODES:
        raise ValidationError("wait.children.mode", "must be ALL or FIRST")
    ids = tuple(msg.intent_ids)
    if not 1 <= len(ids) <= limits.MAX_CHILDREN_PER_WAIT:
        raise ValidationError("wait.children.intent_ids",
                              f"has {len(ids)}; a wait waits for 1 to {limits.MAX_CHILDREN_PER_WAIT} children")
    for child in ids:
        if not looks_like_id(child):
            raise ValidationError("wait.children.intent_ids", f"{child[:64]!r} is not an intent id")
    if len(set(ids)) != len(ids):
        raise ValidationError("wait.children.intent_ids", "must not name a child twice")
    return mode, ids


def _form_schema(raw: bytes) -> str | None:
    if not raw:
        return None
    text = parse_json(raw, "wait.task.form_schema", limits.MAX_TASK_FORM_SCHEMA_BYTES)
    schema = json.loads(text)
    if not isinstance(schema, dict | bool):
        raise ValidationError("wait.task.form_schema", "must be a JSON Schema (an object)")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValidationError("wait.task.form_schema", f"is not a valid JSON Schema: {exc.message}") from None
    return text


def wait_spec(msg: delivery_pb2.WaitWrite, now: datetime | None = None) -> WaitSpec:
    """The checked WaitWrite (ValidationError names the bad field)."""
    kind = _kind(msg.kind)
    if msg.index < 1:
        raise ValidationError("wait.index", "must be at least 1")
    check_horizon_ms(msg.timeout_ms, "wait.timeout_ms")
    until: datetime | None = None
    if msg.HasField("until"):
        if kind != TIME:
            raise ValidationError("wait.until", "is only for TIME waits")
        until = msg.until.ToDatetime(tzinfo=UTC)
        if until - (now or datetime.now(UTC)) > timedelta(milliseconds=limits.MAX_HORIZON_MS):
            raise ValidationError("wait.until", "is more than 100 years ahead")
    name, task = "", msg.task
    if kind == AGENT:
        name, children = _children(msg.children)
        if msg.HasField("task") or msg.signal_name or until is not None:
            raise ValidationError("wait", "an AGENT wait takes children and timeout_ms only")
        expected = record_name(AGENT, name)
        if msg.step_name != expected:
            raise ValidationError("wait.step_name", f"must be {expected!r} for this wait")
        return WaitSpec(index=msg.index, step_name=msg.step_name, kind=kind, name=name, timeout_ms=msg.timeout_ms,
                        children=children)
    if msg.HasField("children"):
        raise ValidationError("wait.children", "is only for AGENT waits")
    if kind == SIGNAL:
        problem = signal_name_problem(msg.signal_name)
        if problem is not None:
            raise ValidationError("wait.signal_name", problem)
        name = msg.signal_name
    elif msg.signal_name:
        raise ValidationError("wait.signal_name", "is only for SIGNAL waits")
    if kind != HUMAN:
        if msg.HasField("task"):
            raise ValidationError("wait.task", "is only for HUMAN waits")
        expected = record_name(kind, name)
        if msg.step_name != expected:
            raise ValidationError("wait.step_name", f"must be {expected!r} for this wait")
        return WaitSpec(index=msg.index, step_name=msg.step_name, kind=kind, name=name, timeout_ms=msg.timeout_ms,
                        until=until)
    check_text(task.title, "wait.task.title", limits.MAX_TASK_TITLE_LEN, required=True)
    check_text(task.description, "wait.task.description", limits.MAX_TASK_DESCRIPTION_LEN)
    outcomes = tuple(task.outcomes) or DEFAULT_OUTCOMES
    if len(outcomes) > limits.MAX_TASK_OUTCOMES:
        raise ValidationError("wait.task.outcomes", f"has {len(outcomes)}; at most {limits.MAX_TASK_OUTCOMES}")
    if len(set(outcomes)) != len(outcomes):
        raise ValidationError("wait.task.outcomes", "must not repeat an outcome")
    for outcome in outcomes:
        check_text(outcome, "wait.task.outcomes", limits.MAX_TASK_OUTCOME_LEN, required=True)
    if len(task.assignees) > limits.MAX_TASK_ASSIGNEES:
        raise ValidationError("wait.task.assignees", f"has {len(task.assignees)}; at most {limits.MAX_TASK_ASSIGNEES}")
    for assignee in task.assignees:
        check_text(assignee, "wait.task.assignees", limits.MAX_KEY_LEN, required=True)
    check_horizon_ms(task.remind_after_ms, "wait.task.remind_after_ms")
    expected = record_name(HUMAN, task.title)
    if msg.step_name != expected:
        raise ValidationError("wait.step_name", f"must be {expected!r} for this wait")
    return WaitSpec(
        index=msg.index, step_name=msg.step_name, kind=kind, name=task.title, timeout_ms=msg.timeout_ms,
        description=task.description, outcomes=outcomes, assignees=tuple(dict.fromkeys(task.assignees)),
        form_schema=_form_schema(task.form_schema), remind_after_ms=task.remind_after_ms)


async def _woken(sub: Subscription, ended: asyncio.Event, timeout: float) -> None:
    """Until a notification of the intent, the stream's end or ``timeout``."""
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(ended.wait()),
                                           asyncio.ensure_future(sub.wait(timeout))]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in waits:
            future.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waits, return_exceptions=True)


async def hold_wait(
    waits: WaitStore, hub: NotificationHub, stream: Stream, held: StreamLease | None, lease: LeaseRef,
    spec: WaitSpec, on_hold: Callable[[], None] | None = None,
) -> Reached | None:
    """The answer to a WaitWrite: resolved or parked; None when the stream
    ended during the hold (nobody to answer; the lease stays the sidecar's
    to re-announce, and its resent write is held again wherever it lands).
    ``on_hold`` is called when the write starts waiting, so the stream's
    other writes are not kept from their slots by a held one."""
    # A small AGENT wait also wakes on its children's own events: the holder
    # judges them at once instead of waiting for the child sweeper's round
    # (a call's latency). A large one would be tried again on every event of
    # every child; it waits for the sweeper, which judges it once per round.
    watched = spec.children if len(spec.children) <= HOLD_WATCHES_CHILDREN else ()
    with hub.subscribe_intent(lease.intent_id, also=watched, also_states=_TERMINAL) as sub:
        # Subscribed before the first try: a signal committing after it wakes us.
        reached = await waits.reach(lease, stream.id, spec)
        if reached.record is not None or reached.parked:
            return reached
        # One hold per lease gives its write slot back; a repeat of the write
        # while it is held keeps its slot, so the stream's write budget bounds
        # how many holds a sidecar can have at once.
        gives_slot = held is not None and not held.holding and on_hold is not None
        if gives_slot and held is not None and on_hold is not None:
            held.holding = True
            on_hold()
        try:
            return await _hold(waits, hub, sub, stream, held, lease, spec, reached)
        finally:
            if gives_slot and held is not None:
                held.holding = False


async def _hold(
    waits: WaitStore, hub: NotificationHub, sub: Subscription, stream: Stream,
    held: StreamLease | None, lease: LeaseRef, spec: WaitSpec, reached: Reached,
) -> Reached | None:
    """Tries again on every notification of the intent and at its due time,
    and parks once the hold window ended."""
    loop = asyncio.get_running_loop()
    hold_end = loop.time() + reached.hold_ms / 1000
    while True:
        left = hold_end - loop.time()
        if reached.due_in_s is not None:
            left = min(left, max(reached.due_in_s, 0.0) + DUE_SLACK_S)
        if left > 0:
            await _woken(sub, stream.ended, left)
        if stream.closed or hub.closing:
            return None
        park = loop.time() >= hold_end
        if park and held is not None:
            # Its own WAITING event, and the renewal that no longer finds
            # the lease, must not revoke what it is parking.
            held.finishing = True
        try:
            reached = await waits.retry(lease, stream.id, spec.index, park=park)
        finally:
            if held is not None and not reached.parked:
                held.finishing = False
        if reached.record is not None or reached.parked:
            return reached
