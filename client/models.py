"""Plain Python views of the API's messages, and the building of IntentSpec.

The dataclasses are what callers handle; ``Intent.proto`` keeps the raw
message for fields this module does not surface.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypedDict, Unpack

from google.protobuf.message import Message

from intentd.core.errors import ValidationError
from intentd.core.states import IntentState
from intentd.core.validation import check_agent_address, check_idempotency_key, check_intent_type, check_labels
from intentd.generated.v1 import admin_service_pb2, human_task_pb2, intent_pb2, stream_pb2
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
class WaitInfo:
    """What an intent waits for (docs/waits.md): set while it is WAITING, and
    while a live attempt holds an open wait."""

    # "SIGNAL", "HUMAN", "TIME" or "AGENT" (WAIT_KINDS; child intents:
    # docs/children.md).
    kind: str
    # SIGNAL: the signal's name; HUMAN: the task's title; TIME: empty;
    # AGENT: "ALL" (gather) or "FIRST" (first).
    name: str
    # The wait's position in the step sequence (1-based).
    step_index: int
    # When it was first reached; kept across attempts.
    since: datetime | None
    # TIME: when it fires; SIGNAL and HUMAN: when it times out. None: never.
    due_time: datetime | None
    # HUMAN: the task to decide.
    task_id: str


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
    waiting: WaitInfo | None = None
    # Deliveries that ended by parking on a wait: not failures, and not
    # counted against max_attempts (attempts used = attempt - parked_attempts).
    parked_attempts: int = 0
    # A child intent (docs/children.md): the intent whose handler started it
    # and the position of that start in its step sequence; "" and 0 for an
    # intent a client sent.
    parent_id: str = ""
    parent_step_index: int = 0
    # Left running when its parent ends (else canceled with it).
    detached: bool = False
    # Children it started; list them with list(parent_id=...).
    child_count: int = 0
    proto: intent_pb2.Intent = field(
        default_factory=intent_pb2.Intent, compare=False, repr=False
    )

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def attempts_used(self) -> int:
        """The deliveries counted against ``max_attempts``."""
        return self.attempt - self.parked_attempts

    @property
    def is_child(self) -> bool:
        return bool(self.parent_id)


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
    # Waits and signals (see the event types in docs/waits.md): "SIGNAL",
    # "HUMAN", "TIME" or "".
    wait_kind: str = ""
    wait_name: str = ""
    signal_id: str = ""
    task_id: str = ""
    # Who caused it (the API key's name): cancels, retries, signals, decisions.
    actor: str = ""
    # CHILD_STARTED, CHILD_FINISHED: the child, and (CHILD_FINISHED) the
    # state it ended in; None for other events.
    child_id: str = ""
    child_state: IntentState | None = None

    @property
    def terminal(self) -> bool:
        return self.state.terminal


# The event types of durable waits, by their names in Event.type.
WAIT_EVENT_TYPES = frozenset(
    {"WAITING", "SIGNALED", "TASK_CREATED", "TASK_DECIDED", "TIMER_FIRED", "TASK_REMINDED"}
)
# The event types of child intents, on the parent (docs/children.md).
CHILD_EVENT_TYPES = frozenset({"CHILD_STARTED", "CHILD_FINISHED"})
# What WaitInfo.kind and Event.wait_kind may be (proto WaitKind, the SQL
# check of intent_waits.kind and intentd.core.waits.KINDS: a test keeps them
# equal).
WAIT_KINDS = ("SIGNAL", "HUMAN", "TIME", "AGENT")


@dataclass(frozen=True, kw_only=True)
class Signal:
    id: str
    name: str
    payload: Any
    # The sending key's name.
    sender: str
    create_time: datetime | None
    # The position of the wait that took it; 0 while it is in the inbox.
    consumed_by_step: int


@dataclass(frozen=True, kw_only=True)
class SignalResult:
    """What ``signal`` returns: the intent after the signal, the signal as
    stored, and whether this call stored it (False: an earlier send with the
    same signal_id was matched)."""

    intent: Intent
    signal: Signal
    created: bool


class HumanTaskState(enum.StrEnum):
    OPEN = "OPEN"
    DECIDED = "DECIDED"
    # Its timeout passed first.
    EXPIRED = "EXPIRED"
    # Its intent ended before a decision.
    CANCELED = "CANCELED"

    def to_proto(self) -> human_task_pb2.HumanTaskState.ValueType:
        return human_task_pb2.HumanTaskState.Value(f"HUMAN_TASK_STATE_{self.value}")

    @classmethod
    def from_proto(cls, value: int) -> HumanTaskState:
        """Raises ValueError for UNSPECIFIED and for numbers the enum does not have."""
        try:
            name = human_task_pb2.HumanTaskState.Name(value)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"unknown human task state {value}") from None
        if name == "HUMAN_TASK_STATE_UNSPECIFIED":
            raise ValueError("human task state must be specified")
        return cls(name.removeprefix("HUMAN_TASK_STATE_"))


@dataclass(frozen=True, kw_only=True)
class HumanDecision:
    task_id: str
    outcome: str
    # The deciding key's name.
    decided_by: str
    decide_time: datetime | None
    comment: str
    # The decoded form data; None when the task has no form.
    form_data: Any

    @property
    def approved(self) -> bool:
        return self.outcome == "approve"


@dataclass(frozen=True, kw_only=True)
class HumanTask:
    id: str
    intent_id: str
    intent_type: str
    to_agent: str
    # The wait's position in the intent's step sequence.
    step_index: int
    title: str
    description: str
    outcomes: list[str]
    assignees: list[str]
    # The decoded JSON Schema of the form; None: no form.
    form_schema: Any
    state: HumanTaskState
    create_time: datetime | None
    # When the wait times out; None: never.
    due_time: datetime | None
    # When a reminder is sent; None: never.
    remind_time: datetime | None
    # Set when DECIDED.
    decision: HumanDecision | None
    proto: human_task_pb2.HumanTask = field(
        default_factory=human_task_pb2.HumanTask, compare=False, repr=False
    )

    @property
    def open(self) -> bool:
        return self.state is HumanTaskState.OPEN


@dataclass(frozen=True)
class HumanTaskPage:
    tasks: list[HumanTask]
    # Empty on the last page.
    next_page_token: str


@dataclass(frozen=True, kw_only=True)
class Step:
    index: int
    name: str
    result: Any
    attempt: int
    record_time: datetime | None


# StreamEntry.format: the chunk's ChunkFormat; None for a marker.
ChunkFormatName = Literal["text", "json"]


@dataclass(frozen=True)
class Superseded:
    """What a marker entry says: every chunk entry of its stream at a lower
    offset whose position is in ``positions`` is superseded."""

    positions: tuple[int, ...]
    # "REDELIVERED" (a new attempt began) or "STEP_RETRIED" (a failed step's
    # position runs again in the same attempt); UNKNOWN_<n> for a reason a
    # newer server sends that this client does not know.
    reason: str


@dataclass(frozen=True, kw_only=True)
class StreamEntry:
    """One entry of an intent's stream (``client.stream``): a chunk an agent
    emitted, or a marker (``superseded`` set) taking earlier chunks back."""

    offset: int
    # The attempt that emitted it (a marker: the attempt that began, or whose
    # step is retried).
    attempt: int
    # The step position the chunk belongs to (0 for a marker).
    position: int
    # When it was committed.
    time: datetime | None
    format: ChunkFormatName | None
    # A text chunk: the str; a JSON chunk: the decoded value; a marker: None.
    data: Any
    raw: bytes
    superseded: Superseded | None = None

    @property
    def is_marker(self) -> bool:
        return self.superseded is not None


@dataclass(frozen=True, kw_only=True)
class StreamInfo:
    """One stream of an intent, as ``client.streams`` lists it."""

    name: str
    # The offset the next entry gets: the number of entries so far.
    next_offset: int
    # The bytes of chunk data in it.
    bytes: int
    create_time: datetime | None
    update_time: datetime | None
    # Its entries were deleted (the intent type's stream_keep_ms passed after
    # the intent ended); the counts remain.
    pruned: bool


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
    # How long an attempt at an unsatisfied wait keeps its lease before it
    # parks: None is the server's default (2000), 0 parks at once.
    wait_hold_ms: int | None = None
    # How long a finished intent's streams keep their entries (docs/streams.md):
    # None as long as the intent itself, 0 until the next prune after its end.
    stream_keep_ms: int | None = None
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
            # An optional field: unset (None) and 0 mean different things.
            wait_hold_ms=self.wait_hold_ms,
            stream_keep_ms=self.stream_keep_ms,
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


def wait_kind_name(value: int) -> str:
    """"SIGNAL", "HUMAN" or "TIME"; "" for UNSPECIFIED; UNKNOWN_<n> for a
    kind a newer server sends that this client does not know."""
    try:
        name = intent_pb2.WaitKind.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"UNKNOWN_{value}"
    return "" if name == "WAIT_KIND_UNSPECIFIED" else name.removeprefix("WAIT_KIND_")


def wait_info_from_proto(msg: intent_pb2.WaitInfo) -> WaitInfo:
    return WaitInfo(
        kind=wait_kind_name(msg.kind),
        name=msg.name,
        step_index=msg.step_index,
        since=_time(msg, "since"),
        due_time=_time(msg, "due_time"),
        task_id=msg.task_id,
    )


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
        waiting=wait_info_from_proto(msg.waiting) if msg.HasField("waiting") else None,
        parked_attempts=msg.parked_attempts,
        parent_id=msg.parent_id,
        parent_step_index=msg.parent_step_index,
        detached=msg.detached,
        child_count=msg.child_count,
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
        wait_kind=wait_kind_name(msg.wait_kind),
        wait_name=msg.wait_name,
        signal_id=msg.signal_id,
        task_id=msg.task_id,
        actor=msg.actor,
        child_id=msg.child_id,
        child_state=_child_state(msg.child_state),
    )


def _child_state(value: int) -> IntentState | None:
    """UNSPECIFIED (every event but CHILD_FINISHED) and numbers a newer
    server sends that this client does not know are None."""
    try:
        return IntentState.from_proto(value)
    except ValueError:
        return None


def signal_from_proto(msg: pb.Signal) -> Signal:
    return Signal(
        id=msg.id,
        name=msg.name,
        payload=decode_json(msg.payload),
        sender=msg.sender,
        create_time=_time(msg, "create_time"),
        consumed_by_step=msg.consumed_by_step,
    )


def signal_result_from_proto(msg: pb.SignalIntentResponse) -> SignalResult:
    return SignalResult(
        intent=intent_from_proto(msg.intent), signal=signal_from_proto(msg.signal), created=msg.created
    )


def decision_from_proto(msg: human_task_pb2.HumanDecision, task_id: str) -> HumanDecision:
    return HumanDecision(
        task_id=task_id,
        outcome=msg.outcome,
        decided_by=msg.decided_by,
        decide_time=_time(msg, "decide_time"),
        comment=msg.comment,
        form_data=decode_json(msg.form_data),
    )


def task_from_proto(msg: human_task_pb2.HumanTask) -> HumanTask:
    return HumanTask(
        id=msg.id,
        intent_id=msg.intent_id,
        intent_type=msg.intent_type,
        to_agent=msg.to_agent,
        step_index=msg.step_index,
        title=msg.title,
        description=msg.description,
        outcomes=list(msg.outcomes),
        assignees=list(msg.assignees),
        form_schema=decode_json(msg.form_schema),
        state=HumanTaskState.from_proto(msg.state),
        create_time=_time(msg, "create_time"),
        due_time=_time(msg, "due_time"),
        remind_time=_time(msg, "remind_time"),
        decision=decision_from_proto(msg.decision, msg.id) if msg.HasField("decision") else None,
        proto=msg,
    )


def task_page_from_proto(msg: human_task_pb2.ListHumanTasksResponse) -> HumanTaskPage:
    return HumanTaskPage(tasks=[task_from_proto(t) for t in msg.tasks], next_page_token=msg.next_page_token)


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
        wait_hold_ms=msg.wait_hold_ms if msg.HasField("wait_hold_ms") else None,
        stream_keep_ms=msg.stream_keep_ms if msg.HasField("stream_keep_ms") else None,
        update_time=_time(msg, "update_time"),
        proto=msg,
    )


def supersede_reason_name(value: int) -> str:
    try:
        name = stream_pb2.SupersedeReason.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return f"UNKNOWN_{value}"
    return "" if name == "SUPERSEDE_REASON_UNSPECIFIED" else name.removeprefix("SUPERSEDE_REASON_")


def stream_entry_from_proto(msg: stream_pb2.StreamEntry) -> StreamEntry:
    raw = bytes(msg.data)
    common: dict[str, Any] = {
        "offset": msg.offset, "attempt": msg.attempt, "position": msg.position, "time": _time(msg, "time"),
        "raw": raw,
    }
    if msg.HasField("superseded"):
        marker = Superseded(tuple(msg.superseded.positions), supersede_reason_name(msg.superseded.reason))
        return StreamEntry(**common, format=None, data=None, superseded=marker)
    if msg.format == stream_pb2.CHUNK_FORMAT_JSON:
        return StreamEntry(**common, format="json", data=json.loads(raw))
    if msg.format in (stream_pb2.CHUNK_FORMAT_TEXT, stream_pb2.CHUNK_FORMAT_UNSPECIFIED):
        # The server refuses text that is not UTF-8; "replace" keeps a reader
        # going rather than end it on one bad chunk.
        return StreamEntry(**common, format="text", data=raw.decode("utf-8", errors="replace"))
    # A format a newer server sends that this client does not know: only raw.
    return StreamEntry(**common, format=None, data=None)


def stream_info_from_proto(msg: stream_pb2.StreamInfo) -> StreamInfo:
    return StreamInfo(
        name=msg.name,
        next_offset=msg.next_offset,
        bytes=msg.bytes,
        create_time=_time(msg, "create_time"),
        update_time=_time(msg, "update_time"),
        pruned=msg.pruned,
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
    "CHILD_EVENT_TYPES",
    "WAIT_EVENT_TYPES",
    "WAIT_KINDS",
    "ChunkFormatName",
    "Event",
    "HumanDecision",
    "HumanTask",
    "HumanTaskPage",
    "HumanTaskState",
    "Intent",
    "IntentError",
    "IntentFields",
    "IntentType",
    "Page",
    "Signal",
    "SignalResult",
    "Step",
    "StreamEntry",
    "StreamInfo",
    "Superseded",
    "WaitInfo",
    "build_spec",
    "deadline_datetime",
    "decision_from_proto",
    "decode_json",
    "encode_json",
    "event_from_proto",
    "intent_from_proto",
    "intent_type_from_proto",
    "page_from_proto",
    "signal_from_proto",
    "signal_result_from_proto",
    "step_from_proto",
    "stream_entry_from_proto",
    "stream_info_from_proto",
    "supersede_reason_name",
    "task_from_proto",
    "task_page_from_proto",
    "wait_info_from_proto",
    "wait_kind_name",
]
