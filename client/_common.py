"""What both clients share: the constructor and its settings, the retry
policy, request building and the bookkeeping of the wait and watch loops.
Nothing here does I/O: the asyncio client does it, and the blocking client
runs the asyncio client on a private event loop."""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, Self, TypedDict, TypeVar, Unpack

import grpc

from intentd.core.backoff import Backoff
from intentd.core.config import load_settings
from intentd.core.errors import SettingsError
from intentd.core.limits import MAX_TASK_COMMENT_LEN, MAX_TASK_OUTCOME_LEN
from intentd.core.observability import tracing
from intentd.core.states import IntentState
from intentd.core.waits import signal_id_problem, signal_name_problem
from intentd.generated.v1 import human_task_pb2 as task_pb
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import stream_pb2

from .config import DEFAULT_TARGET, ClientSettings, StrPath, bearer_metadata, tls_credentials
from .errors import (
    IntentCanceled,
    IntentFailed,
    IntentNotCompleted,
    IntentTimedOut,
    InvalidArgument,
    Unavailable,
    WaitTimeout,
    from_rpc_error,
    rpc_code,
)
from .models import (
    Event,
    HumanTaskState,
    Intent,
    IntentFields,
    IntentInput,
    StreamEntry,
    build_spec,
    encode_json,
    event_from_proto,
    intent_from_proto,
    stream_entry_from_proto,
)

# Each WaitIntent call is kept short enough that proxies and load balancers
# with idle timeouts do not cut it; wait_for chains as many as it needs.
WAIT_SLICE_SECONDS = 20.0
# Head room over the server-side wait, so the server answers "not yet" before
# the call's deadline turns the slice into DEADLINE_EXCEEDED.
WAIT_MARGIN_SECONDS = 5.0

ChannelOptions = Sequence[tuple[str, Any]]


class _Default(enum.Enum):
    TIMEOUT = enum.auto()


# Marks "the client's per-call timeout", since None already means "no deadline".
DEFAULT_TIMEOUT: Final = _Default.TIMEOUT
CallTimeout = float | None | Literal[_Default.TIMEOUT]
StateFilter = Iterable[IntentState | str] | IntentState | str | None
TaskStateFilter = Iterable[HumanTaskState | str] | HumanTaskState | str | None


class ListQuery(TypedDict, total=False):
    """The filters of ``list`` and ``iter_intents``."""

    # IntentState members or names ("FAILED", "failed", "INTENT_STATE_FAILED").
    states: StateFilter
    intent_type: str | None
    to_agent: str | None
    # Every label given must match.
    labels: Mapping[str, str] | None
    # Only the children of this intent (docs/children.md), in the order they
    # were started instead of newest first.
    parent_id: str | None
    # 0: the server's default.
    page_size: int
    page_token: str


class ClientOptions(TypedDict, total=False):
    """The constructor's arguments that ``from_env`` does not read."""

    sender: str | None
    max_retries: int
    initial_backoff: float
    max_backoff: float
    timeout: float | None
    channel_options: ChannelOptions | None
    metadata: Sequence[tuple[str, str]]


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    initial_backoff: float = 0.1
    max_backoff: float = 3.0
    _backoff: Backoff = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if self.initial_backoff <= 0:
            raise ValueError("initial_backoff must be positive")
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must be at least initial_backoff")
        object.__setattr__(self, "_backoff", Backoff(self.initial_backoff, self.max_backoff))

    def delay(self, attempt: int) -> float:
        return self._backoff.delay(attempt)

    def after_failure(self, err: grpc.RpcError, attempt: int) -> float:
        """The delay before retrying a call that failed with ``err`` after
        ``attempt`` earlier retries; raises the typed error when it must not be
        retried.

        Only UNAVAILABLE is retried: it means the request did not reach a
        server able to act on it (or, for SendIntent, that a retry is matched by
        the idempotency key).
        """
        if rpc_code(err) != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            raise from_rpc_error(err) from err
        return self.delay(attempt)


@dataclass(frozen=True)
class Settings:
    """The constructor arguments of both clients, checked once."""

    target: str
    sender: str | None
    retry: RetryPolicy
    timeout: float | None
    channel_options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def make(
        cls,
        target: str,
        *,
        sender: str | None,
        max_retries: int,
        initial_backoff: float,
        max_backoff: float,
        timeout: float | None,
        channel_options: ChannelOptions | None,
        credentials: grpc.ChannelCredentials | None,
        metadata: Sequence[tuple[str, str]],
        api_key: str | None = None,
        tls_ca_file: StrPath | None = None,
        tls_cert_file: StrPath | None = None,
        tls_key_file: StrPath | None = None,
    ) -> Settings:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        retry = RetryPolicy(max_retries, initial_backoff, max_backoff)
        tls = tls_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        if tls is not None:
            if credentials is not None:
                raise SettingsError("give credentials or tls_* files, not both")
            credentials = tls
        return cls(
            target=target,
            sender=sender or None,
            retry=retry,
            timeout=timeout,
            channel_options=merge_channel_options(retry, channel_options),
            credentials=credentials,
            metadata=(*metadata, *bearer_metadata(api_key)),
        )

    def call_timeout(self, timeout: CallTimeout) -> float | None:
        return self.timeout if timeout is DEFAULT_TIMEOUT else timeout

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        return self.metadata or None

    def traced_metadata(self) -> list[tuple[str, str]] | None:
        """``call_metadata`` plus the current span's W3C ``traceparent`` (the
        control plane keeps it with the intent, so the agent's spans join the
        sender's trace); the same as ``call_metadata`` outside a span."""
        return tracing.inject(self.metadata) or None


C = TypeVar("C")


class HandleBase(Generic[C]):
    """What both intent handles hold: their client and the intent's id."""

    def __init__(self, client: C, intent_id: str, *, created: bool | None = None) -> None:
        self.client = client
        self.id = intent_id
        # Whether the start created the intent (False: an earlier send with the
        # same idempotency key was matched); None for a handle made from an id.
        self.created = created

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


class ClientBase:
    """The constructor both clients share; each sets up its I/O in ``_open``."""

    _settings: Settings

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        sender: str | None = None,
        max_retries: int = 8,
        initial_backoff: float = 0.1,
        max_backoff: float = 3.0,
        timeout: float | None = 30.0,
        channel_options: ChannelOptions | None = None,
        api_key: str | None = None,
        tls_ca_file: StrPath | None = None,
        tls_cert_file: StrPath | None = None,
        tls_key_file: StrPath | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``api_key`` is sent as ``authorization: Bearer <key>``; the
        ``tls_*`` files (PEM) turn TLS on (``credentials`` for any other
        channel credentials). ``timeout`` is each call's deadline in seconds;
        calls failing with UNAVAILABLE are retried ``max_retries`` times,
        with jittered exponential backoff from ``initial_backoff`` to
        ``max_backoff`` seconds. ``sender`` scopes idempotency keys."""
        self._settings = Settings.make(
            target,
            sender=sender,
            max_retries=max_retries,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            timeout=timeout,
            channel_options=channel_options,
            credentials=credentials,
            metadata=metadata,
            api_key=api_key,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
        )
        self._open()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Unpack[ClientOptions]) -> Self:
        """A client configured by ``INTENTD_TARGET``, ``INTENTD_API_KEY`` or
        ``INTENTD_API_KEY_FILE``, and ``INTENTD_TLS_CA_FILE`` /
        ``INTENTD_TLS_CERT_FILE`` / ``INTENTD_TLS_KEY_FILE`` (from
        ``os.environ`` unless ``environ`` is given). A bad value raises
        ``SettingsError`` naming the variable."""
        env = load_settings(ClientSettings, environ)
        return cls(env.target, api_key=env.bearer_key(), credentials=env.credentials(), **options)

    def _open(self) -> None:
        raise NotImplementedError

    @property
    def target(self) -> str:
        return self._settings.target


def send_span(request: pb.SendIntentRequest | pb.SendIntentsRequest) -> tracing.SpanHandle:
    """A CLIENT span around a send, only inside a trace the caller started
    (a send outside any span starts none). End it with ``.end(error)``."""
    if isinstance(request, pb.SendIntentRequest):
        attributes: dict[str, Any] = {
            "intentd.intent_type": request.intent.intent_type,
            "intentd.to_agent": request.intent.to_agent,
        }
    else:
        attributes = {"intentd.batch_size": len(request.intents)}
    return tracing.start_span("intentd.send", kind="client", attributes=attributes, child_only=True)


def merge_channel_options(
    retry: RetryPolicy, user: ChannelOptions | None
) -> tuple[tuple[str, Any], ...]:
    # gRPC's own reconnect backoff grows to 120 s by default; while it waits,
    # calls fail at once with UNAVAILABLE and our retries would run out long
    # before the channel tries to reconnect to a restarted server.
    options: dict[str, Any] = {
        "grpc.initial_reconnect_backoff_ms": max(1, round(retry.initial_backoff * 1000)),
        "grpc.max_reconnect_backoff_ms": max(1, round(retry.max_backoff * 1000)),
    }
    options.update(dict(user or ()))
    return tuple(options.items())


def _checked_spec(item: IntentInput | None, kw: IntentFields, sender: str | None) -> pb.IntentSpec:
    spec = build_spec(item, **kw)
    if not spec.sender and sender:
        spec.sender = sender
    return spec


def send_request(intent: IntentInput | None, kw: IntentFields, sender: str | None) -> pb.SendIntentRequest:
    try:
        spec = _checked_spec(intent, kw, sender)
    except InvalidArgument as exc:
        # Name the field as the server would: the spec travels as "intent".
        raise InvalidArgument(f"intent.{exc.details}") from None
    return pb.SendIntentRequest(intent=spec)


def batch_request(intents: Iterable[IntentInput], sender: str | None) -> pb.SendIntentsRequest:
    specs = []
    for i, item in enumerate(intents):
        try:
            specs.append(_checked_spec(item, {}, sender))
        except InvalidArgument as exc:
            raise InvalidArgument(f"intents[{i}].{exc.details}") from None
    return pb.SendIntentsRequest(intents=specs)


def _filter_values(states: Any, enum: Any, prefix: str) -> list[int]:
    """Proto values of a state filter given as members of ``enum`` or their
    names in any case, with or without the proto ``prefix``."""
    if states is None:
        return []
    if isinstance(states, str):
        # A lone name, not an iterable of its characters.
        states = [states]
    values: list[int] = []
    for i, state in enumerate(states):
        if isinstance(state, enum):
            values.append(state.to_proto())
            continue
        name = str(state).strip().upper().removeprefix(prefix)
        try:
            values.append(enum(name).to_proto())
        except ValueError:
            known = ", ".join(s.value for s in enum)
            raise InvalidArgument(f"states[{i}]: {state!r} is not one of {known}") from None
    return values


def state_values(states: StateFilter) -> list[int]:
    """Proto values of a state filter given as IntentState members or names
    ("FAILED", "failed", "INTENT_STATE_FAILED")."""
    return _filter_values(states, IntentState, "INTENT_STATE_")


def list_request(**query: Unpack[ListQuery]) -> pb.ListIntentsRequest:
    return pb.ListIntentsRequest(
        states=state_values(query.get("states")),  # type: ignore[arg-type]
        intent_type=query.get("intent_type") or "",
        to_agent=query.get("to_agent") or "",
        labels=dict(query.get("labels") or {}),
        page_size=query.get("page_size", 0),
        page_token=query.get("page_token", ""),
        parent_id=query.get("parent_id") or "",
    )


def signal_request(intent_id: str, name: str, payload: Any, signal_id: str | None) -> pb.SignalIntentRequest:
    """The SignalIntent request, checked as the server would check it. Without
    a ``signal_id`` one is made up here, once, so that the client's retries of
    this request after UNAVAILABLE are matched by the server, never stored
    twice."""
    if not intent_id:
        raise InvalidArgument("id: is required")
    problem = signal_name_problem(name)
    if problem is not None:
        raise InvalidArgument(f"name: {problem}")
    signal_id = signal_id or uuid.uuid4().hex
    problem = signal_id_problem(signal_id)
    if problem is not None:
        raise InvalidArgument(f"signal_id: {problem}")
    return pb.SignalIntentRequest(id=intent_id, name=name, payload=encode_json(payload), signal_id=signal_id)


def task_state_values(states: TaskStateFilter) -> list[int]:
    """Proto values of a task state filter given as HumanTaskState members or
    names ("OPEN", "open", "HUMAN_TASK_STATE_OPEN")."""
    return _filter_values(states, HumanTaskState, "HUMAN_TASK_STATE_")


def task_list_request(
    *,
    states: TaskStateFilter = None,
    assignee: str | None = None,
    intent_type: str | None = None,
    intent_id: str | None = None,
    page_size: int = 100,
    page_token: str | None = None,
) -> task_pb.ListHumanTasksRequest:
    if not 1 <= page_size <= 1000:
        raise InvalidArgument("page_size: must be 1 to 1000")
    return task_pb.ListHumanTasksRequest(
        states=task_state_values(states),  # type: ignore[arg-type]
        assignee=assignee or "",
        intent_type=intent_type or "",
        intent_id=intent_id or "",
        page_size=page_size,
        page_token=page_token or "",
    )


def decide_request(task_id: str, outcome: str, comment: str, form_data: Any) -> task_pb.DecideHumanTaskRequest:
    if not task_id:
        raise InvalidArgument("id: is required")
    if not outcome or len(outcome) > MAX_TASK_OUTCOME_LEN:
        raise InvalidArgument(f"outcome: must be 1 to {MAX_TASK_OUTCOME_LEN} characters")
    if len(comment) > MAX_TASK_COMMENT_LEN:
        raise InvalidArgument(f"comment: must be at most {MAX_TASK_COMMENT_LEN} characters")
    try:
        data = encode_json(form_data)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.details.replace("payload:", "form_data:", 1)) from None
    return task_pb.DecideHumanTaskRequest(id=task_id, outcome=outcome, comment=comment, form_data=data)


def outcome_error(intent: Intent) -> IntentNotCompleted | None:
    """The error ``wait_for(raise_on_failure=True)`` raises for a terminal
    intent, or None when it completed (or is not terminal)."""
    if intent.state is IntentState.FAILED:
        return IntentFailed(intent)
    if intent.state is IntentState.CANCELED:
        return IntentCanceled(intent)
    if intent.state is IntentState.TIMED_OUT:
        return IntentTimedOut(intent)
    return None


class WaitLoop:
    """The bookkeeping of ``wait_for``: a chain of bounded WaitIntent calls
    until the intent is terminal or the overall timeout passes."""

    def __init__(
        self,
        intent_id: str,
        timeout: float | None,
        raise_on_failure: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must not be negative")
        self.intent_id = intent_id
        self.timeout = timeout
        self.raise_on_failure = raise_on_failure
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout

    def next_call(self) -> tuple[pb.WaitIntentRequest, float]:
        """The next request and the deadline of its call, in seconds."""
        wait = WAIT_SLICE_SECONDS
        if self._deadline is not None:
            wait = min(wait, max(0.0, self._deadline - self._clock()))
        # timeout_ms 0 would mean "forever"; even a spent timeout asks once,
        # so wait_for(id, 0) reports the current state.
        timeout_ms = max(1, round(wait * 1000))
        return (
            pb.WaitIntentRequest(id=self.intent_id, timeout_ms=timeout_ms),
            wait + WAIT_MARGIN_SECONDS,
        )

    def outlast_outage(self, pause: float) -> float:
        """After the retries of one call are spent: how long to pause before
        waiting on. A wait is long-lived by nature, so it rides out an outage
        for as long as its own timeout allows; past that, the error stands."""
        if self._deadline is not None and self._clock() + pause >= self._deadline:
            raise
        return pause

    def finish(self, response: pb.WaitIntentResponse) -> Intent | None:
        """The final intent once the wait is over, None to call again.

        Raises WaitTimeout, or the IntentNotCompleted subclass when asked to.
        """
        intent = intent_from_proto(response.intent)
        if response.terminal or intent.terminal:
            if self.raise_on_failure:
                error = outcome_error(intent)
                if error is not None:
                    raise error
            return intent
        if self._deadline is not None and self._clock() >= self._deadline:
            raise WaitTimeout(
                f"intent {self.intent_id} is still {intent.state.value} after {self.timeout:g} s",
                intent,
            )
        return None


class WatchCursor:
    """The bookkeeping of ``watch``: where to resume after a reconnect, and how
    many reconnects in a row have failed."""

    def __init__(self, intent_id: str, after_seq: int, retry: RetryPolicy) -> None:
        if after_seq < 0:
            raise InvalidArgument("after_seq: must not be negative")
        self.intent_id = intent_id
        self.last_seq = after_seq
        self._retry = retry
        self._failures = 0

    def request(self) -> pb.WatchIntentRequest:
        return pb.WatchIntentRequest(id=self.intent_id, after_seq=self.last_seq)

    def accept(self, response: pb.WatchIntentResponse) -> Event | None:
        """The event to yield, or None for one already yielded."""
        event = event_from_proto(response.event)
        # The server resumes after after_seq; this guards against a replay
        # overlapping what was yielded before a reconnect anyway.
        if event.seq <= self.last_seq:
            return None
        self.last_seq = event.seq
        # Progress proves the connection works; the next outage gets the full
        # retry budget again.
        self._failures = 0
        return event

    def after_failure(self, err: grpc.RpcError) -> float:
        delay = self._retry.after_failure(err, self._failures)
        self._failures += 1
        return delay


class StreamCursor:
    """The bookkeeping of ``stream``: the offset to resume from after a
    reconnect (the one after the last entry handed out), the final intent once
    the server sent it, and how many reconnects in a row have failed."""

    def __init__(
        self, intent_id: str, stream: str, from_offset: int, skip_superseded: bool, retry: RetryPolicy
    ) -> None:
        if from_offset < 0:
            raise InvalidArgument("from_offset: must not be negative")
        self.intent_id = intent_id
        self.stream = stream
        self.skip_superseded = skip_superseded
        self.next_offset = from_offset
        self.intent: Intent | None = None
        self._retry = retry
        self._failures = 0

    @property
    def done(self) -> bool:
        return self.intent is not None

    def request(self) -> pb.StreamIntentRequest:
        return pb.StreamIntentRequest(
            id=self.intent_id, stream=self.stream, from_offset=self.next_offset,
            skip_superseded=self.skip_superseded,
        )

    def accept(self, msg: stream_pb2.StreamEntry) -> StreamEntry | None:
        """The entry to hand out, or None for one already handed out. Called
        as each entry is handed out, so ``next_offset`` never runs ahead of
        what the caller got (a caller that stops mid-page resumes there)."""
        # The server resumes at from_offset; this guards against a replay
        # overlapping what was handed out before a reconnect anyway. Offsets
        # may skip forward (skip_superseded), never back.
        if msg.offset < self.next_offset:
            return None
        self.next_offset = msg.offset + 1
        # Progress proves the connection works; the next outage gets the full
        # retry budget again.
        self._failures = 0
        return stream_entry_from_proto(msg)

    def finish(self, response: pb.StreamIntentResponse) -> bool:
        """After a message's entries: True when it was the last one (it
        carries the terminal intent)."""
        if response.HasField("intent"):
            self.intent = intent_from_proto(response.intent)
        return self.done

    def after_failure(self, err: grpc.RpcError) -> float:
        delay = self._retry.after_failure(err, self._failures)
        self._failures += 1
        return delay

    def after_cut(self) -> float:
        """The call ended cleanly without the last message (a server going
        away may end calls so): not the end, so it reconnects like after
        UNAVAILABLE, from the same retry budget."""
        if self._failures >= self._retry.max_retries:
            raise Unavailable(f"the server ended the stream of intent {self.intent_id} before its end")
        delay = self._retry.delay(self._failures)
        self._failures += 1
        return delay
