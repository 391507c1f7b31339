"""Exceptions of the agent SDK: all under ``AgentError`` (itself under
``intentd.core.errors.IntentdError``), except ``LeaseLost``."""

from __future__ import annotations

import re

import grpc

from intentd.core.errors import IntentdError
from intentd.core.limits import MAX_FAIL_CODE_LEN

_CODE_RE = re.compile(rf"^[A-Za-z0-9_.]{{1,{MAX_FAIL_CODE_LEN}}}$")


class AgentError(IntentdError):
    """Root of the agent SDK's exceptions (``LeaseLost`` excepted: see there)."""


class NonRetryableError(AgentError):
    """Raise from a handler to fail the intent at once, without further attempts.

    ``code`` is machine-readable (1-100 characters of ``[A-Za-z0-9_.]``, e.g.
    ``INVALID_INPUT``); ``message`` is for people. Any other exception a
    handler raises fails the attempt *retryably* (code ``AGENT_ERROR``).
    """

    def __init__(self, code: str, message: str = "") -> None:
        if not _CODE_RE.match(code):
            raise ValueError(f"error code {code!r} must be 1-{MAX_FAIL_CODE_LEN} characters of [A-Za-z0-9_.]")
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class StepDivergence(NonRetryableError):
    """The handler called a step under another name than an earlier attempt
    recorded at the same position: it is not deterministic in its steps.

    Handing it the recorded result would give a step someone else's result, so
    the intent is failed non-retryably with code ``STEP_DIVERGENCE`` -- even if
    the handler catches this exception.
    """

    def __init__(self, index: int, recorded_name: str, name: str) -> None:
        super().__init__(
            "STEP_DIVERGENCE",
            f"step {index} was recorded as {recorded_name!r} by an earlier attempt, "
            f"but this attempt called it {name!r}; steps must be deterministic in name and order",
        )
        self.index = index
        self.recorded_name = recorded_name
        self.name = name


class WaitTimedOut(AgentError):
    """A durable wait ended by its timeout (``ctx.wait_for_signal(...,
    timeout=)``, ``ctx.ask_human(..., timeout=)``) before what it waited for came.

    The timeout is recorded at the wait's position, so every attempt that
    reaches the wait raises it again there without waiting (a replay is as
    deterministic as a step's result). ``kind`` is ``SIGNAL``, ``HUMAN`` or
    ``AGENT`` (a sleep never times out), ``name`` the signal's name, the
    task's title, or ``gather`` / ``first`` (``ctx.gather(..., timeout=)``),
    ``index`` the wait's position, ``task_id`` the human task (HUMAN only).
    Left uncaught, it fails the intent non-retryably with code
    ``WAIT_TIMED_OUT``: every later attempt would time out at the same wait.
    """

    def __init__(self, kind: str, name: str, index: int, task_id: str = "") -> None:
        if kind == "SIGNAL":
            what = f"the signal {name!r}"
        elif kind == "AGENT":
            what = f"child intents ({name})"
        else:
            what = f"a decision on {name!r}"
        if task_id:
            what += f" (task {task_id})"
        super().__init__(f"wait {index} for {what} timed out")
        self.kind = kind
        self.name = name
        self.index = index
        self.task_id = task_id


class ChildFailed(AgentError):
    """A child intent this intent waited for (``ctx.gather``, ``ctx.first``,
    ``ctx.call``, ``handle.result()``) ended other than COMPLETED.

    ``child_id``; ``state``: ``FAILED``, ``CANCELED`` or ``TIMED_OUT``;
    ``code`` and ``message``: the child's error (e.g. ``ATTEMPTS_EXHAUSTED``
    for a dead-lettered child); ``to_agent`` and ``intent_type``: the child's.
    The outcome is recorded at the wait's position, so every later attempt
    raises it again there: left uncaught, it fails this intent non-retryably
    with code ``CHILD_FAILED``.
    """

    def __init__(self, child_id: str, state: str, code: str = "", message: str = "", *,
                 to_agent: str = "", intent_type: str = "") -> None:
        about = f" ({intent_type} at {to_agent})" if intent_type else ""
        error = f": {code}: {message}" if message else (f": {code}" if code else "")
        super().__init__(f"child intent {child_id}{about} ended {state}{error}")
        self.child_id = child_id
        self.state = state
        self.code = code
        self.message = message
        self.to_agent = to_agent
        self.intent_type = intent_type


class ChildResultsTooLarge(NonRetryableError):
    """The results of the children one wait waited for exceed, together, the
    intent's payload size limit, so the control plane recorded the wait
    without them. Gather fewer children at once (several gathers of smaller
    groups), or have the children return less (e.g. a reference to where the
    data is). Recorded like any wait: left uncaught it fails the intent
    (code ``CHILD_RESULTS_TOO_LARGE``)."""

    def __init__(self, index: int, children: int) -> None:
        super().__init__(
            "CHILD_RESULTS_TOO_LARGE",
            f"the results of the {children} children waited for at position {index} exceed the intent's "
            "payload size limit together, so they were not recorded; gather fewer children at once",
        )
        self.index = index
        self.children = children


class LeaseLost(BaseException):
    """The attempt may not write any more: the sidecar revoked it (canceled,
    timed out, lease lost), the control plane refused a write as stale
    (``FAILED_PRECONDITION``), the sidecar stream dropped, the agent is
    stopping, or the intent parked on a durable wait (reason ``PARKED``: the
    attempt is over, not failed; the next delivery replays to the wait).

    Raised by ``ctx`` calls of such an attempt. It derives from
    ``BaseException``, not from ``AgentError``, on purpose: fencing must not be
    swallowed by ``except Exception`` (or ``except IntentdError``) in a handler,
    which would go on working for an intent another attempt now owns. Even if it
    is swallowed, nothing more is reported for the attempt.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


class WriteError(AgentError):
    """The sidecar refused a write for another reason than a stale lease or a
    passing outage (for example ``INVALID_ARGUMENT``: a result over the size
    limit). Raised into the handler from the ``ctx`` call that made the write."""

    def __init__(self, method: str, code: str, details: str, retry_after_ms: int = 0) -> None:
        super().__init__(f"{method} refused: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details
        # RESOURCE_EXHAUSTED that passes with time: the same write may go again after this long.
        self.retry_after_ms = retry_after_ms


class WriteRefused(AgentError):
    """A write the sidecar answered with a status other than OK (inside the
    SDK: the attempt engine retries it, stops, or turns it into ``WriteError``)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_ms: int = 0) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_ms = retry_after_ms


class StreamLimitExceeded(WriteError):
    """A limit of the intent's streams refused chunks this attempt emitted
    (``ctx.emit``): a chunk over the chunk size (raised by that ``emit``,
    nothing emitted), or, from the control plane, the intent's bytes or its
    number of streams (``message`` names which): those chunks were dropped,
    and this is raised once, by the next ``ctx.emit`` or ``ctx.flush_streams``
    of the attempt (the chunk given to that ``emit`` is not emitted); later
    emits go on. The chunks-per-second limit is not raised: the SDK paces
    its writes to it. ``code`` is ``RESOURCE_EXHAUSTED``."""

    def __init__(self, message: str) -> None:
        super().__init__("Emit", "RESOURCE_EXHAUSTED", message)
        self.message = message
