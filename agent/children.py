"""Child intents on the agent's side (docs/children.md): a handler starts
intents for other agents and waits for their outcomes, durably.

A child operation is a position of the step sequence like a step or a wait,
taken when the handler *calls* it (``take_position``), before anything runs:

- a start (``ctx.start``, ``ctx.start_many``) is one ``StartChildrenWrite``
  whose record, ``{"children": [{"id", "to_agent", "intent_type"}, ...]}``,
  names the children. The control plane keys the children by (parent,
  position), so a replay -- or a retried write -- gets the same children back
  and starts nothing: a child is never sent twice. Its handles are rebuilt
  from that record in every attempt.
- a wait (``ctx.gather``, ``ctx.first``, ``handle.result()``) is an AGENT
  ``WaitWrite`` (``ChildWait``): it parks the parent like any durable wait,
  and its record holds the children's outcomes, decoded here into results,
  ``ChildFailed``, ``ChildResultsTooLarge`` or ``WaitTimedOut``.

``Starting``, ``Gathering`` and ``Firsting`` check their arguments and take their position in
their constructor (the synchronous part of the context's method); ``run()``
does the rest and leaves the position's plan open, so that ``Context`` closes
it where it awaits (``awaiting``) and ``SyncContext`` where it blocks
(``blocking``).
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from intentd.core import waits
from intentd.core.errors import ValidationError
from intentd.core.framing import MAX_MESSAGE_BYTES
from intentd.core.limits import MAX_ATTEMPTS_LIMIT, MAX_CHILDREN_PER_START, MAX_HORIZON_MS
from intentd.core.validation import check_agent_address, check_intent_type, check_labels
from intentd.core.waits import AGENT
from intentd.generated.v1 import delivery_pb2, intent_pb2

from .attempt import Attempt, StepPlan, encode_json
from .errors import ChildFailed, ChildResultsTooLarge, NonRetryableError, WaitTimedOut
from .waits import WaitCall, millis

T = TypeVar("T")
H = TypeVar("H", bound="ChildHandle")

# Record names (reserved: they start with "@", as waits' do), one copy in core.waits.
GATHER = waits.record_name(AGENT, waits.ALL)
FIRST = waits.record_name(AGENT, waits.FIRST)
# Children per start, handles per gather or first (the control plane's bound too).
MAX_CHILDREN = MAX_CHILDREN_PER_START
# A start is one write: its children must fit in one message to the sidecar,
# with room for the envelope.
MAX_START_BYTES = MAX_MESSAGE_BYTES - 64 * 1024

COMPLETED = "COMPLETED"
ENDED_STATES = frozenset({COMPLETED, "FAILED", "CANCELED", "TIMED_OUT"})

_MODES = {GATHER: delivery_pb2.CHILD_WAIT_MODE_ALL, FIRST: delivery_pb2.CHILD_WAIT_MODE_FIRST}


@dataclass(frozen=True)
class ChildCall:
    """One child for ``ctx.start_many``: what ``ctx.start`` takes, as a value.

    ``deadline``: an aware ``datetime`` or a ``timedelta`` from the start
    (capped at the parent's deadline by the control plane); ``max_attempts``:
    None for the type's setting; ``detached``: left running when the parent
    ends by cancel, failure or timeout (default: canceled with it).
    """

    to_agent: str
    intent_type: str
    payload: Any = None
    deadline: datetime | timedelta | None = None
    max_attempts: int | None = None
    labels: Mapping[str, str] | None = None
    detached: bool = False


@dataclass(frozen=True)
class ChildHandle:
    """A child intent this intent started: ``id`` (the child's intent id, the
    same in every attempt), ``to_agent``, ``intent_type``, and ``position``
    (the start's position in the step sequence). ``await handle.result()``
    waits for it (a gather of this one handle: it takes a position)."""

    id: str
    to_agent: str
    intent_type: str
    position: int
    _attempt: Attempt = field(repr=False, compare=False)

    def result(self) -> Coroutine[Any, Any, Any]:
        """The child's result, once it completed; ``ChildFailed`` when it
        ended otherwise. The position is taken now, at the call."""
        return _first_value(Gathering(self._attempt, [self]))


class SyncChildHandle(ChildHandle):
    """A ``ChildHandle`` of a ``def`` handler: ``result()`` blocks."""

    def result(self) -> Any:
        return blocking(Gathering(self._attempt, [self]))[0]


async def _first_value(op: _Operation[list[T]]) -> T:
    return (await awaiting(op))[0]


# -- positions ----------------------------------------------------------------------


def take_position(attempt: Attempt, name: str) -> StepPlan:
    """The one place this module takes a position: now, at the handler's call.

    The context's method calls it synchronously (before it returns its
    awaitable), so the numbering is the handler's call order. The plan stays
    open until ``awaiting``/``blocking`` ran the operation."""
    return attempt.open_step(name, wait=True)


class _Operation(Generic[T]):
    attempt: Attempt
    plan: StepPlan

    async def run(self) -> T:
        raise NotImplementedError


async def awaiting(op: _Operation[T]) -> T:
    """Runs ``op`` at its position (async handlers), closing it after."""
    with op.plan:
        op.plan.begin()
        return await op.run()


def blocking(op: _Operation[T]) -> T:
    """Runs ``op`` at its position from a ``def`` handler's thread."""
    with op.plan:
        op.plan.begin()
        return op.attempt.blocking(op.run())


# -- starts ---------------------------------------------------------------------------


def child_spec(call: ChildCall, what: str = "the child", now: datetime | None = None) -> delivery_pb2.ChildSpec:
    """``call`` checked and encoded (ValueError/TypeError naming ``what``)."""
    if not isinstance(call, ChildCall):
        raise TypeError(f"{what} must be a ChildCall, got {type(call).__name__}")
    spec = delivery_pb2.ChildSpec(
        to_agent=_checked(check_agent_address, call.to_agent, f"{what}: to_agent"),
        intent_type=_checked(check_intent_type, call.intent_type, f"{what}: intent_type"),
        payload=encode_json(call.payload, f"the payload of {what}"),
    )
    if call.deadline is not None:
        spec.deadline.FromDatetime(_deadline(call.deadline, what, now))
    if call.max_attempts is not None:
        attempts = call.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"{what}: max_attempts must be 1 to {MAX_ATTEMPTS_LIMIT} (or None), got {attempts!r}")
        spec.max_attempts = attempts
    if call.labels is not None:
        spec.labels.update(_labels(call.labels, what))
    if not isinstance(call.detached, bool):
        raise TypeError(f"{what}: detached must be True or False, got {call.detached!r}")
    spec.detached = call.detached
    return spec


def _checked(check: Any, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    try:
        return str(check(value, what))
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _deadline(value: Any, what: str, now: datetime | None) -> datetime:
    horizon = timedelta(milliseconds=MAX_HORIZON_MS)
    if isinstance(value, timedelta):
        if not timedelta(0) < value <= horizon:
            raise ValueError(f"{what}: a deadline from now must be positive and at most 100 years, got {value}")
        return (now or datetime.now(UTC)) + value
    if not isinstance(value, datetime):
        raise TypeError(f"{what}: deadline must be a datetime or a timedelta, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        # A naive time means a different instant on every machine's clock.
        raise ValueError(f"{what}: the deadline must be an aware datetime (with a tzinfo), or a timedelta")
    when = value.astimezone(UTC)
    if when - (now or datetime.now(UTC)) > horizon:
        raise ValueError(f"{what}: the deadline is more than 100 years ahead: {value.isoformat()}")
    return when


def _labels(labels: Any, what: str) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise TypeError(f"{what}: labels must be a mapping of strings to strings, got {type(labels).__name__}")
    items = dict(labels)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
        raise TypeError(f"{what}: labels must map strings to strings")
    try:
        return check_labels(items, f"{what}: labels")
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def start_name(intent_type: str) -> str:
    """The record name of a start: ``@start:<intent type of the first child>``."""
    return waits.start_record_name(intent_type)


class Starting(_Operation[list[H]]):
    """``ctx.start`` / ``ctx.start_many``: the children checked and the
    position taken at construction; ``run()`` replays the start's record or
    writes the start, and returns one handle per child, in order."""

    def __init__(self, attempt: Attempt, calls: Sequence[ChildCall], handle: type[H]) -> None:
        if isinstance(calls, ChildCall) or not isinstance(calls, Sequence):
            raise TypeError(f"start_many takes a list of ChildCall, got {type(calls).__name__}")
        if not 1 <= len(calls) <= MAX_CHILDREN:
            raise ValueError(f"a start takes 1 to {MAX_CHILDREN} children, got {len(calls)}")
        now = datetime.now(UTC)
        many = len(calls) > 1
        self.specs = [child_spec(c, f"child {i}" if many else "the child", now) for i, c in enumerate(calls)]
        size = sum(s.ByteSize() for s in self.specs)
        if size > MAX_START_BYTES:
            raise ValueError(f"the children's specs are {size} bytes together; one start takes at most "
                             f"{MAX_START_BYTES}: start them in several calls")
        self.attempt = attempt
        self._handle = handle
        self.plan = take_position(attempt, start_name(self.specs[0].intent_type))

    async def run(self) -> list[H]:
        attempt, plan = self.attempt, self.plan
        if not plan.known:
            await attempt.fetch(plan)
        record = plan.value if plan.replayed else await attempt.start_children(plan, self.specs)
        return self.handles(record)

    def handles(self, record: Any) -> list[H]:
        """The handles of a start's record; the record must name the children
        this call starts (else the handler is not deterministic)."""
        plan = self.plan
        started = _started(record, plan)
        recorded = [(c["to_agent"], c["intent_type"]) for c in started]
        asked = [(s.to_agent, s.intent_type) for s in self.specs]
        if recorded != asked:
            raise NonRetryableError(
                "STEP_DIVERGENCE",
                f"start {plan.index} {plan.name!r} was recorded with {len(recorded)} children "
                f"{_show(recorded)} by an earlier attempt, but this attempt starts {len(asked)} "
                f"{_show(asked)}; child starts must be deterministic like steps",
            )
        return [self._handle(c["id"], c["to_agent"], c["intent_type"], plan.index, self.attempt) for c in started]


def _started(record: Any, plan: StepPlan) -> list[dict[str, str]]:
    children = record.get("children") if isinstance(record, dict) else None
    if isinstance(children, list) and children and all(
        isinstance(c, dict) and all(isinstance(c.get(k), str) and c[k] for k in ("id", "to_agent", "intent_type"))
        for c in children
    ):
        return children
    # The same on every replay: retrying cannot help.
    raise NonRetryableError(
        "CHILD_RECORD_INVALID",
        f"the record of start {plan.index} {plan.name!r} is not a start's record: {str(record)[:200]}",
    )


def _show(pairs: list[tuple[str, str]]) -> str:
    text = ", ".join(f"{t} at {a}" for a, t in pairs[:3])
    return f"({text}{', ...' if len(pairs) > 3 else ''})"


# -- waits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildOutcome:
    """How one child ended, as an AGENT wait's record says."""

    id: str
    state: str
    result: Any
    code: str
    message: str

    def error(self, handle: ChildHandle) -> ChildFailed:
        return ChildFailed(self.id, self.state, self.code, self.message,
                           to_agent=handle.to_agent, intent_type=handle.intent_type)


@dataclass(frozen=True)
class ChildWaitCall(WaitCall):
    """An AGENT wait: ``name`` is its record name (``@gather``, ``@first``);
    ``value`` decodes its record into the outcomes, by child id."""

    @property
    def record_name(self) -> str:
        return self.name

    def value(self, record: Any, index: int) -> dict[str, ChildOutcome]:
        if isinstance(record, dict):
            if record.get("timed_out") is True:
                raise WaitTimedOut(AGENT, self.name.lstrip("@"), index)
            if record.get("results_omitted") is True:
                raise ChildResultsTooLarge(index, len(self.write.children.intent_ids))
            outcomes = _outcomes(record.get("children"))
            first = record.get("first")
            wanted = set(self.write.children.intent_ids)
            if outcomes is not None and set(outcomes) <= wanted:
                if self.name == GATHER and set(outcomes) == wanted:
                    return outcomes
                if self.name == FIRST and isinstance(first, str) and first in outcomes:
                    return {first: outcomes[first]}
        raise NonRetryableError(
            "WAIT_RECORD_INVALID",
            f"the record of wait {index} {self.name!r} is not a child wait's record: {str(record)[:200]}",
        )


def _outcomes(children: Any) -> dict[str, ChildOutcome] | None:
    if not isinstance(children, list):
        return None
    outcomes: dict[str, ChildOutcome] = {}
    for child in children:
        if not isinstance(child, dict) or not isinstance(child.get("id"), str):
            return None
        if child.get("state") not in ENDED_STATES:
            return None
        error = child.get("error")
        error = error if isinstance(error, dict) else {}
        outcomes[child["id"]] = ChildOutcome(child["id"], child["state"], child.get("result"),
                                             str(error.get("code") or ""), str(error.get("message") or ""))
    return outcomes


def check_handles(attempt: Attempt, handles: Sequence[Any], what: str) -> list[ChildHandle]:
    """``handles`` as given (1..1000 of this intent's children)."""
    if not 1 <= len(handles) <= MAX_CHILDREN:
        raise ValueError(f"{what} takes 1 to {MAX_CHILDREN} child handles, got {len(handles)}")
    for handle in handles:
        if not isinstance(handle, ChildHandle):
            raise TypeError(f"{what} takes the ChildHandles of ctx.start/start_many, got {type(handle).__name__}")
        if handle._attempt.intent_id != attempt.intent_id:
            raise ValueError(f"{what}: child {handle.id} is a child of intent {handle._attempt.intent_id}, "
                             f"not of this intent {attempt.intent_id}")
    return list(handles)


def child_wait(name: str, handles: Sequence[ChildHandle], timeout: float | None) -> ChildWaitCall:
    # A handle given twice is waited for once; its outcome answers both.
    ids = list(dict.fromkeys(h.id for h in handles))
    write = delivery_pb2.WaitWrite(kind=intent_pb2.WAIT_KIND_AGENT,
                                   children=delivery_pb2.ChildWait(intent_ids=ids, mode=_MODES[name]))
    if timeout is not None:
        write.timeout_ms = millis(timeout, "timeout")
    return ChildWaitCall(AGENT, name, write)


class _Waiting(_Operation[T]):
    """An AGENT wait: the handles checked and the position taken at
    construction. ``handles`` may be None and given later with ``bind``
    (``ctx.call`` takes its wait's position before its child exists)."""

    name = GATHER

    def __init__(self, attempt: Attempt, handles: Sequence[Any] | None, timeout: float | None = None) -> None:
        self.attempt = attempt
        self._timeout = timeout
        self.handles: list[ChildHandle] = []
        self.call: ChildWaitCall | None = None
        if handles is not None:
            self.bind(handles)
        elif timeout is not None:
            millis(timeout, "timeout")
        self.plan = take_position(attempt, self.name)

    def bind(self, handles: Sequence[Any]) -> None:
        self.handles = check_handles(self.attempt, handles, self.name.lstrip("@"))
        self.call = child_wait(self.name, self.handles, self._timeout)

    async def _outcomes(self) -> dict[str, ChildOutcome]:
        assert self.call is not None, "bind the handles first"
        outcomes: dict[str, ChildOutcome] = await self.attempt.wait_at(self.plan, self.call)
        return outcomes


class Gathering(_Waiting[list[Any]]):
    """``ctx.gather``: every child's result, in argument order; the first
    child (in that order) that did not complete is raised as ``ChildFailed``,
    or stands in its place with ``return_exceptions``."""

    name = GATHER

    def __init__(self, attempt: Attempt, handles: Sequence[Any] | None, timeout: float | None = None,
                 return_exceptions: bool = False) -> None:
        self.return_exceptions = return_exceptions
        super().__init__(attempt, handles, timeout)

    async def run(self) -> list[Any]:
        outcomes = await self._outcomes()
        values: list[Any] = []
        for handle in self.handles:
            outcome = outcomes[handle.id]
            if outcome.state == COMPLETED:
                values.append(outcome.result)
            elif self.return_exceptions:
                values.append(outcome.error(handle))
            else:
                raise outcome.error(handle)
        return values


class Firsting(_Waiting[tuple[ChildHandle, Any]]):
    """``ctx.first``: the first child to end and its result; ``ChildFailed``
    when that child did not complete."""

    name = FIRST

    async def run(self) -> tuple[ChildHandle, Any]:
        ((child, outcome),) = (await self._outcomes()).items()
        handle = next(h for h in self.handles if h.id == child)
        if outcome.state != COMPLETED:
            raise outcome.error(handle)
        return handle, outcome.result


# -- ctx.call: a start, then a gather of its one child ------------------------------------


def call_positions(starting: Starting[Any]) -> tuple[Starting[Any], Gathering]:
    """The two positions of a ``ctx.call``, both taken now, at the call: the
    start's (taken by ``starting``) and its wait's, right after it, so that
    concurrent calls number the same in every attempt."""
    return starting, Gathering(starting.attempt, None)


async def calling(positions: tuple[Starting[Any], Gathering]) -> Any:
    starting, waiting = positions
    try:
        (handle,) = await awaiting(starting)
        waiting.bind([handle])
        return (await awaiting(waiting))[0]
    finally:
        waiting.plan.close()  # when the start failed, the wait never ran


def calling_blocking(positions: tuple[Starting[Any], Gathering]) -> Any:
    starting, waiting = positions
    try:
        (handle,) = blocking(starting)
        waiting.bind([handle])
        return blocking(waiting)[0]
    finally:
        waiting.plan.close()
