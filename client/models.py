"""Plain Python views of the API's messages, and the building of IntentSpec.

The dataclasses are what callers handle; ``Intent.proto`` keeps the raw
message for fields this module does not surface.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, Unpack

from google.protobuf.message import Message

from intentd.core.errors import ValidationError
from intentd.core.states import IntentState
from intentd.core.validation import check_agent_address, check_idempotency_key, check_intent_type, check_labels
from intentd.generated.v1 import admin_service_pb2, intent_pb2
from intentd.generated.v1 import intent_service_pb2 as pb

from .errors import InvalidArgument

Deadline = datetime | timedelta | None
IntentInput = Mapping[str, Any] | pb.IntentSpec


class IntentFields(TypedDict, total=False):
    """The keyword parameters of ``send_intent``, ``send``, ``start`` and
    ``build_spec``, and the keys of the dict form. None (and max_attempts 0)
    means "not given"."""

    intent_type: str
    to_agent: str
    # Anything JSON-serialisable, or bytes already holding JSON.
    payload: Any
    # Made up when not given, so the client's own retries never send twice.
    idempotency_key: str | None
    # Absolute (naive means UTC) or from now.
    deadline: Deadline
    labels: Mapping[str, str] | None
    # 0: the intent type's setting (3 by default).
    max_attempts: int
    # Scopes idempotency keys; defaults to the client's sender.
    sender: str | None


_SPEC_FIELDS = IntentFields.__optional_keys__


@dataclass(frozen=True, kw_only=True)
class IntentError:
    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True, kw_only=True)
class Intent:
    id: str
    intent_type: str
    to_agent: str
    payload: Any
    idempotency_key: str | None
    deadline: datetime | None
    labels: dict[str, str]
    state: IntentState
    attempt: int
    max_attempts: int
    result: Any
    error: IntentError | None
    create_time: datetime | None
    update_time: datetime | None
    finish_time: datetime | None
    steps_completed: int
    last_step: str
    sender: str
    cancel_reason: str
    last_event_seq: int
    tenant: str
    progress_message: str = ""
    progress_fraction: float = 0.0
    proto: intent_pb2.Intent = field(
        default_factory=intent_pb2.Intent, compare=False, repr=False
    )

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass(frozen=True, kw_only=True)
class Event:
    intent_id: str
    seq: int
    # The EventType name without its prefix, e.g. "CREATED", "STEP_COMPLETED".
    type: str
    time: datetime | None
    state: IntentState
    attempt: int
    step_name: str
    step_index: int
    message: str
    error: IntentError | None
    progress_fraction: float

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass(frozen=True, kw_only=True)
class Step:
    index: int
    name: str
    result: Any
    attempt: int
    record_time: datetime | None


@dataclass(frozen=True, kw_only=True)
class IntentType:
    """Delivery settings of one intent type (AdminService). A 0 means the
    server's default: 3 attempts, a 10 s heartbeat timeout, no deadline, and
    a backoff ceiling of 60 s."""

    intent_type: str
    max_attempts: int = 0
    heartbeat_timeout_ms: int = 0
    # Redelivery after a failed attempt waits retry_backoff_ms * 2**(attempt-1),
    # capped at retry_backoff_max_ms; 0 redelivers at once.
    retry_backoff_ms: int = 100
    retry_backoff_max_ms: int = 0
    # Deadline of intents of this type sent without one.
    default_deadline_ms: int = 0
    # Set by the server.
    update_time: datetime | None = None
    proto: admin_service_pb2.IntentType = field(
        default_factory=admin_service_pb2.IntentType, compare=False, repr=False
    )

    def to_proto(self) -> admin_service_pb2.IntentType:
        return admin_service_pb2.IntentType(
            intent_type=self.intent_type,
            max_attempts=self.max_attempts,
            heartbeat_timeout_ms=self.heartbeat_timeout_ms,
            retry_backoff_ms=self.retry_backoff_ms,
            retry_backoff_max_ms=self.retry_backoff_max_ms,
            default_deadline_ms=self.default_deadline_ms,
        )


@dataclass(frozen=True)
class Page:
    intents: list[Intent]
    # Empty on the last page.
    next_page_token: str


def decode_json(raw: bytes) -> Any:
    """The API carries JSON as UTF-8 bytes where empty means null."""
    if not raw:
        return None
    return json.loads(raw)


def encode_json(value: Any) -> bytes:
    """Bytes pass through untouched so callers can send pre-serialised JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if value is None:
        return b""
    try:
        # NaN and Infinity are not JSON; the server would refuse them anyway.
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"payload: is not JSON-serialisable ({exc})") from exc


def _time(msg: Message, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    value: datetime = getattr(msg, name).ToDatetime(tzinfo=UTC)
    return value


def _error(msg: intent_pb2.Intent | intent_pb2.IntentEvent) -> IntentError | None:
    if not msg.HasField("error"):
        return None
    err = msg.error
    return IntentError(code=err.code, message=err.message, retryable=err.retryable)


def intent_from_proto(msg: intent_pb2.Intent) -> Intent:
    checkpoint = msg.checkpoint
    return Intent(
        id=msg.id,
        intent_type=msg.intent_type,
        to_agent=msg.to_agent,
        payload=decode_json(msg.payload),
        idempotency_key=msg.idempotency_key or None,
        deadline=_time(msg, "deadline"),
        labels=dict(msg.labels),
        state=IntentState.from_proto(msg.state),
        attempt=msg.attempt,
        max_attempts=msg.max_attempts,
        result=decode_json(msg.result),
        error=_error(msg),
        create_time=_time(msg, "create_time"),
        update_time=_time(msg, "update_time"),
        finish_time=_time(msg, "finish_time"),
        steps_completed=checkpoint.steps_completed,
        last_step=checkpoint.last_step,
        sender=msg.sender,
        cancel_reason=msg.cancel_reason,
        last_event_seq=msg.last_event_seq,
        tenant=msg.tenant,
        progress_message=checkpoint.progress_message,
        progress_fraction=checkpoint.progress_fraction,
        proto=msg,
    )


def event_type_name(value: int) -> str:
    try:
        name = intent_pb2.EventType.Name(value)  # type: ignore[arg-type]
    except ValueError:
        # A newer server may send types this client does not know yet.
        return f"UNKNOWN_{value}"
    return name.removeprefix("EVENT_TYPE_")


def event_from_proto(msg: intent_pb2.IntentEvent) -> Event:
    return Event(
        intent_id=msg.intent_id,
        seq=msg.seq,
        type=event_type_name(msg.type),
        time=_time(msg, "time"),
        state=IntentState.from_proto(msg.state),
        attempt=msg.attempt,
        step_name=msg.step_name,
        step_index=msg.step_index,
        message=msg.message,
        error=_error(msg),
        progress_fraction=msg.progress_fraction,
    )


def step_from_proto(msg: intent_pb2.StepRecord) -> Step:
    return Step(
        index=msg.index,
        name=msg.name,
        result=decode_json(msg.result),
        attempt=msg.attempt,
        record_time=_time(msg, "record_time"),
    )


def intent_type_from_proto(msg: admin_service_pb2.IntentType) -> IntentType:
    return IntentType(
        intent_type=msg.intent_type,
        max_attempts=msg.max_attempts,
        heartbeat_timeout_ms=msg.heartbeat_timeout_ms,
        retry_backoff_ms=msg.retry_backoff_ms,
        retry_backoff_max_ms=msg.retry_backoff_max_ms,
        default_deadline_ms=msg.default_deadline_ms,
        update_time=_time(msg, "update_time"),
        proto=msg,
    )


def page_from_proto(msg: pb.ListIntentsResponse) -> Page:
    return Page(
        intents=[intent_from_proto(i) for i in msg.intents],
        next_page_token=msg.next_page_token,
    )


def deadline_datetime(value: Deadline, now: datetime | None = None) -> datetime | None:
    """An absolute UTC deadline: naive datetimes are taken as UTC, timedeltas
    count from now."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return (now or datetime.now(UTC)) + value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    raise InvalidArgument(f"deadline: expected a datetime or timedelta, got {type(value).__name__}")


def build_spec(intent: IntentInput | None = None, **overrides: Unpack[IntentFields]) -> pb.IntentSpec:
    """Builds the IntentSpec to send.

    ``intent`` may be a dict using the keyword names, or an IntentSpec; keyword
    arguments that are given (not None, max_attempts not 0) override it.
    Without an idempotency key one is made up, so that the client's own
    retries after UNAVAILABLE cannot create the intent twice.

    Raises InvalidArgument (a ValueError) for fields the server would refuse.
    """
    try:
        return _build_spec(intent, overrides)
    except ValidationError as exc:
        raise InvalidArgument(str(exc)) from None


def _known(fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = set(fields) - _SPEC_FIELDS
    if unknown:
        raise TypeError(f"unknown {what}: {', '.join(sorted(unknown))}")
    return dict(fields)


def _build_spec(intent: IntentInput | None, overrides: Mapping[str, Any]) -> pb.IntentSpec:
    spec = pb.IntentSpec()
    if isinstance(intent, pb.IntentSpec):
        spec.CopyFrom(intent)
        fields: dict[str, Any] = {}
    elif intent is None:
        fields = {}
    elif isinstance(intent, Mapping):
        fields = _known(intent, "intent fields")
    else:
        raise TypeError(f"intent must be a dict or an IntentSpec, not {type(intent).__name__}")
    given = _known(overrides, "keyword arguments")
    # max_attempts 0 is "not given" too, so it cannot reset the dict's value.
    given["max_attempts"] = given.get("max_attempts") or None
    fields.update({k: v for k, v in given.items() if v is not None})

    if "intent_type" in fields:
        spec.intent_type = fields["intent_type"]
    if "to_agent" in fields:
        spec.to_agent = fields["to_agent"]
    if "payload" in fields:
        spec.payload = encode_json(fields["payload"])
    if fields.get("idempotency_key"):
        spec.idempotency_key = fields["idempotency_key"]
    if fields.get("deadline") is not None:
        when = deadline_datetime(fields["deadline"])
        assert when is not None
        spec.deadline.FromDatetime(when)
    if fields.get("labels"):
        spec.labels.clear()
        spec.labels.update(fields["labels"])
    if fields.get("max_attempts"):
        spec.max_attempts = fields["max_attempts"]
    if fields.get("sender"):
        spec.sender = fields["sender"]
    if not spec.idempotency_key:
        spec.idempotency_key = uuid.uuid4().hex

    check_intent_type(spec.intent_type)
    check_agent_address(spec.to_agent)
    check_idempotency_key(spec.idempotency_key)
    check_labels(dict(spec.labels))
    return spec


__all__ = [
    "Event",
    "Intent",
    "IntentError",
    "IntentFields",
    "IntentType",
    "Page",
    "Step",
    "build_spec",
    "deadline_datetime",
    "decode_json",
    "encode_json",
    "event_from_proto",
    "intent_from_proto",
    "intent_type_from_proto",
    "page_from_proto",
    "step_from_proto",
]
