"""Durable waits on the agent's side (docs/waits.md): each wait's arguments
checked and turned into its ``WaitWrite``, and the wait's record turned back
into what the wait returns (or raises).

The engine (``Attempt.wait``) gives a wait its position and decides between
the replay and the write; this module knows only what a wait is. The record
names, the kinds and the limits are the shared rules of ``core.waits`` and
``core.limits``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from intentd.core import waits
from intentd.core.limits import (
    MAX_TASK_ASSIGNEES,
    MAX_TASK_DESCRIPTION_LEN,
    MAX_TASK_FORM_SCHEMA_BYTES,
    MAX_TASK_OUTCOME_LEN,
    MAX_TASK_OUTCOMES,
    MAX_TASK_TITLE_LEN,
)
from intentd.generated.v1 import delivery_pb2, intent_pb2

from .attempt import encode_json
from .errors import NonRetryableError, WaitTimedOut

# The longest timeout or sleep a wait takes: far beyond any real one, and
# well inside what the control plane's clock arithmetic (and int64 ms) holds.
MAX_WAIT_SECONDS = 100 * 365 * 86400
# Assignees are API key names; the control plane checks them against its
# keys, this only keeps out what cannot be one.
_MAX_ASSIGNEE_LEN = 200

_KINDS = {
    waits.SIGNAL: intent_pb2.WAIT_KIND_SIGNAL,
    waits.HUMAN: intent_pb2.WAIT_KIND_HUMAN,
    waits.TIME: intent_pb2.WAIT_KIND_TIME,
}


@dataclass(frozen=True)
class HumanDecision:
    """What ``ctx.ask_human`` returns: the decision a person made on the task."""

    task_id: str
    outcome: str
    # The name of the API key that decided.
    decided_by: str
    # Aware, on the control plane's clock.
    decide_time: datetime
    comment: str
    # The decision's form data (decoded JSON), or None without a form.
    form_data: Any

    @property
    def approved(self) -> bool:
        return self.outcome == "approve"


@dataclass(frozen=True)
class WaitCall:
    """One wait a handler reached: its kind, its name (the signal's, the
    task's title, empty for a sleep) and its write without the position."""

    kind: str
    name: str
    write: delivery_pb2.WaitWrite

    @property
    def record_name(self) -> str:
        return waits.record_name(self.kind, self.name)

    def value(self, record: Any, index: int) -> Any:
        """What the wait returns for ``record`` (its decoded JSON); raises
        ``WaitTimedOut`` for a recorded timeout."""
        if isinstance(record, dict):
            if record.get("timed_out") is True and self.kind != waits.TIME:
                raise WaitTimedOut(self.kind, self.name, index, str(record.get("task_id") or ""))
            if self.kind == waits.SIGNAL and isinstance(record.get("signal"), dict):
                return record["signal"].get("payload")
            if self.kind == waits.TIME and "fired" in record:
                return None
            if self.kind == waits.HUMAN and isinstance(record.get("decision"), dict):
                decision = _decision(record["decision"])
                if decision is not None:
                    return decision
        # A record this SDK cannot read is the same on every replay: retrying cannot help.
        raise NonRetryableError(
            "WAIT_RECORD_INVALID",
            f"the record of wait {index} {self.record_name!r} is not a {self.kind} wait's record: "
            f"{str(record)[:200]}",
        )


def _decision(fields: dict[str, Any]) -> HumanDecision | None:
    when = fields.get("decide_time")
    if not isinstance(when, str):
        return None
    try:
        decided = datetime.fromisoformat(when)
    except ValueError:
        return None
    if decided.tzinfo is None:
        decided = decided.replace(tzinfo=UTC)
    return HumanDecision(
        task_id=str(fields.get("task_id") or ""),
        outcome=str(fields.get("outcome") or ""),
        decided_by=str(fields.get("decided_by") or ""),
        decide_time=decided,
        comment=str(fields.get("comment") or ""),
        form_data=fields.get("form_data"),
    )


def millis(seconds: float, what: str) -> int:
    """``seconds`` as the wire's milliseconds. Never 0: on the wire 0 means
    "no timeout", so a timeout of 0 is the shortest one (it still takes a
    signal or decision that is already there)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or not (
        0 <= seconds <= MAX_WAIT_SECONDS
    ):
        raise ValueError(f"{what} must be a finite number of seconds from 0 to {MAX_WAIT_SECONDS}, got {seconds!r}")
    return max(1, math.ceil(seconds * 1000))


def _text(value: Any, what: str, low: int, high: int) -> str:
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise ValueError(f"{what} must be a string of {low} to {high} characters, got {value!r:.80}")
    return value


def _strings(values: Any, what: str, most: int, longest: int) -> list[str]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a sequence of strings (not one string), got {values!r:.80}")
    items = [_text(v, f"each of {what}", 1, longest) for v in values]
    if len(items) > most:
        raise ValueError(f"{what}: at most {most}, got {len(items)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{what} must not repeat a value: {items!r:.200}")
    return items


def signal_wait(name: str, timeout: float | None) -> WaitCall:
    problem = waits.signal_name_problem(name)
    if problem is not None:
        raise ValueError(f"signal name {name!r:.80}: {problem}")
    write = delivery_pb2.WaitWrite(kind=_KINDS[waits.SIGNAL], signal_name=name)
    if timeout is not None:
        write.timeout_ms = millis(timeout, "timeout")
    return WaitCall(waits.SIGNAL, name, write)


def sleep_wait(seconds: float) -> WaitCall:
    return WaitCall(waits.TIME, "", delivery_pb2.WaitWrite(kind=_KINDS[waits.TIME],
                                                            timeout_ms=millis(seconds, "seconds")))


def sleep_until_wait(when: datetime) -> WaitCall:
    if not isinstance(when, datetime):
        raise TypeError(f"sleep_until takes a datetime, got {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        # A naive time means a different instant on every machine's clock.
        raise ValueError("sleep_until needs an aware datetime (with a tzinfo, e.g. datetime.now(UTC) + ...)")
    write = delivery_pb2.WaitWrite(kind=_KINDS[waits.TIME])
    write.until.FromDatetime(when.astimezone(UTC))
    return WaitCall(waits.TIME, "", write)


def human_wait(
    title: str,
    *,
    description: str | None,
    outcomes: Sequence[str],
    assignees: Sequence[str] | None,
    form: Mapping[str, Any] | None,
    timeout: float | None,
    remind_after: float | None,
) -> WaitCall:
    task = delivery_pb2.HumanTaskSpec(title=_text(title, "title", 1, MAX_TASK_TITLE_LEN))
    if description is not None:
        task.description = _text(description, "description", 0, MAX_TASK_DESCRIPTION_LEN)
    task.outcomes.extend(_strings(outcomes, "outcomes", MAX_TASK_OUTCOMES, MAX_TASK_OUTCOME_LEN))
    if not task.outcomes:
        raise ValueError("outcomes must name at least one outcome")
    if assignees is not None:
        task.assignees.extend(_strings(assignees, "assignees", MAX_TASK_ASSIGNEES, _MAX_ASSIGNEE_LEN))
    if form is not None:
        if not isinstance(form, Mapping):
            raise TypeError(f"form must be a JSON Schema (a mapping), got {type(form).__name__}")
        schema = encode_json(dict(form), "the form's JSON Schema")
        if len(schema) > MAX_TASK_FORM_SCHEMA_BYTES:
            raise ValueError(f"the form's JSON Schema is {len(schema)} bytes; at most {MAX_TASK_FORM_SCHEMA_BYTES}")
        task.form_schema = schema
    if remind_after is not None:
        task.remind_after_ms = millis(remind_after, "remind_after")
    write = delivery_pb2.WaitWrite(kind=_KINDS[waits.HUMAN], task=task)
    if timeout is not None:
        write.timeout_ms = millis(timeout, "timeout")
    return WaitCall(waits.HUMAN, title, write)
