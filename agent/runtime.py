"""``Agent``: attaches to the sidecar, takes assignments and runs handlers."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import grpc

from intentd.core.aio import run
from intentd.core.backoff import Backoff
from intentd.core.errors import ValidationError
from intentd.core.framing import CHANNEL_OPTIONS
from intentd.core.limits import MAX_FAIL_MESSAGE_LEN
from intentd.core.observability import bind_log_context, tracing
from intentd.core.validation import check_agent_address, check_intent_type
from intentd.generated.v1 import delivery_pb2, runtime_pb2

from .attempt import (
    LEASE_LOST,
    MAX_STEPS_IN_FLIGHT,
    MAX_STEPS_IN_FLIGHT_LIMIT,
    PARKED,
    SHUTDOWN,
    Attempt,
    decode_json,
    encode_json,
)
from .context import Context, SyncContext
from .errors import (
    ChildFailed,
    LeaseLost,
    NonRetryableError,
    StreamLimitExceeded,
    WaitTimedOut,
    WriteError,
    WriteRefused,
)
from .session import SidecarSession

log = logging.getLogger("intentd.agent")

ADDRESS_ENV = "INTENTD_SIDECAR_ADDRESS"
# The failure code of an intent whose next step would cross its history limit.
HISTORY_LIMIT_EXCEEDED = "HISTORY_LIMIT_EXCEEDED"
# The failure code of an intent whose handler let a wait's timeout go uncaught.
WAIT_TIMED_OUT = "WAIT_TIMED_OUT"
# The failure code of an intent whose handler let a child's failure go uncaught.
CHILD_FAILED = "CHILD_FAILED"
CHILD_NOT_PERMITTED = "CHILD_NOT_PERMITTED"
# An uncaught StreamLimitExceeded: the intent's stream bytes only grow, and a
# chunk over the size limit is the handler's own, so another attempt would be
# refused the same way.
STREAM_LIMIT_EXCEEDED = "STREAM_LIMIT_EXCEEDED"
RECONNECT_BACKOFF = Backoff(0.1, 5.0)
WRITE_BACKOFF = Backoff(0.05, 2.0)
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Handler:
    intent_type: str
    fn: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True)
class _Outcome:
    """What to report for a finished handler: a result or a failure."""

    result: bytes | None = None
    code: str = ""
    message: str = ""
    retryable: bool = True


def _is_async(fn: Callable[..., Any]) -> bool:
    # Also objects with an ``async def __call__``.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _check_type(intent_type: str) -> None:
    try:
        check_intent_type(intent_type)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _target(address: str) -> str:
    """gRPC target for ``unix:///path.sock``, a bare ``/path.sock`` or ``host:port``."""
    return f"unix://{address}" if address.startswith("/") else address


class Agent:
    """An agent process: handlers by intent type, run under the sidecar.

    ``name`` is the agent's address (``agent://<org>/<env>/<name>``).
    ``sidecar`` is the sidecar's address, ``unix:///path.sock`` or
    ``127.0.0.1:PORT``; by default the ``INTENTD_SIDECAR_ADDRESS`` environment
    variable the sidecar sets for the agents it supervises. ``capacity`` is how
    many handlers run at once; ``max_steps_in_flight`` (1 to 256, default 16)
    how many step functions of one attempt run at once (concurrent
    ``ctx.step`` calls, ``ctx.parallel``): the others wait, their positions
    already taken.

    Handler exceptions: ``NonRetryableError(code, message)`` fails the intent at
    once; any other exception fails the attempt retryably (``AGENT_ERROR``).
    """

    def __init__(
        self,
        name: str,
        sidecar: str | None = None,
        capacity: int = 4,
        *,
        reconnect_backoff: Backoff = RECONNECT_BACKOFF,
        write_backoff: Backoff = WRITE_BACKOFF,
        write_timeout: float | None = 60.0,
        shutdown_grace: float = 10.0,
        max_steps_in_flight: int = MAX_STEPS_IN_FLIGHT,
    ) -> None:
        try:
            check_agent_address(name, "name")
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if (isinstance(max_steps_in_flight, bool) or not isinstance(max_steps_in_flight, int)
                or not 1 <= max_steps_in_flight <= MAX_STEPS_IN_FLIGHT_LIMIT):
            raise ValueError(
                f"max_steps_in_flight must be an integer from 1 to {MAX_STEPS_IN_FLIGHT_LIMIT}, "
                f"got {max_steps_in_flight!r}")
        self.max_steps_in_flight = max_steps_in_flight
        self.name = name
        self.capacity = capacity
        self._address = sidecar
        self._reconnect_backoff = reconnect_backoff
        self._write_backoff = write_backoff
        self._write_timeout = write_timeout
        self._shutdown_grace = shutdown_grace
        self._handlers: dict[str, _Handler] = {}
        self._running = False
        self._stopping = False
        self._grace = shutdown_grace
        self._wakeup: asyncio.Event | None = None
        self._cut_grace: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._session: SidecarSession[Attempt] | None = None

    # -- registration ----------------------------------------------------------

    def handler(self, intent_type: str) -> Callable[[F], F]:
        """Registers the decorated function as the handler of ``intent_type``.

        ``async def h(ctx: Context, payload)`` runs on the event loop;
        ``def h(ctx: SyncContext, payload)`` runs in a thread of its own.
        The return value (JSON-serialisable) is the intent's result.
        """

        _check_type(intent_type)

        def register(fn: F) -> F:
            self.add_handler(intent_type, fn)
            return fn

        return register

    def add_handler(self, intent_type: str, fn: Callable[..., Any]) -> None:
        _check_type(intent_type)
        if intent_type in self._handlers:
            raise ValueError(f"a handler for {intent_type} is already registered")
        if not callable(fn):
            raise TypeError(f"handler for {intent_type} is not callable: {fn!r}")
        self._handlers[intent_type] = _Handler(intent_type, fn, _is_async(fn))

    @property
    def intent_types(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def handlers(self) -> Mapping[str, Callable[..., Any]]:
        """The registered handler functions by intent type, in registration order (read-only)."""
        return MappingProxyType({intent_type: h.fn for intent_type, h in self._handlers.items()})

    @property
    def running_intents(self) -> list[str]:
        """Intent ids of the attempts currently held (started or waiting for a slot)."""
        session = self._session
        return [attempt.intent_id for attempt in session.running.values()] if session else []

    # -- running ---------------------------------------------------------------

    def run(self) -> None:
        """Runs until SIGINT/SIGTERM (a second signal skips the shutdown grace).
        On uvloop when it is installed: every step crosses the event loop a
        few times, and uvloop's loop costs about half of asyncio's per hop."""
        run(self._run_with_signals(), tune_gc=False)

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, Windows
                pass
        try:
            await self.run_async()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            log.warning("%s again: stopping now", sig.name)
            if self._cut_grace is not None:
                self._cut_grace.set()
            return
        log.info("%s: stopping (up to %.1fs for running handlers)", sig.name, self._shutdown_grace)
        self._request_stop(self._shutdown_grace)

    def _request_stop(self, grace: float) -> None:
        self._stopping = True
        self._grace = grace
        if self._wakeup is not None:
            self._wakeup.set()

    async def stop(self, grace: float = 0.0) -> None:
        """Stops ``run_async``: takes no new work, gives running handlers up to
        ``grace`` seconds to finish, cancels the rest (the sidecar then
        releases their intents for immediate redelivery; their recorded steps
        are kept) and closes the stream. Returns once ``run_async`` returned;
        does nothing when the agent is not running."""
        if not self._running or self._done is None:
            return
        self._request_stop(grace)
        await self._done.wait()

    async def run_async(self) -> None:
        """Attaches to the sidecar and runs handlers until ``stop()``;
        reconnects with backoff when the stream drops."""
        if self._running:
            raise RuntimeError("this agent is already running")
        if not self._handlers:
            raise RuntimeError("register at least one handler before running the agent")
        address = self._address or os.environ.get(ADDRESS_ENV, "")
        if not address:
            raise RuntimeError(
                f"no sidecar address: pass Agent(..., sidecar=...) or set {ADDRESS_ENV}"
            )
        target = _target(address)
        loop = asyncio.get_running_loop()
        try:
            # Only with INTENTD_TRACING set, and never over the application's own set-up.
            traced = tracing.configure(service_name=self.name)
        except ValueError as exc:
            log.warning("tracing stays off: %s", exc)
            traced = False
        self._running = True
        self._wakeup = asyncio.Event()
        self._cut_grace = asyncio.Event()
        self._done = asyncio.Event()
        self._stopping = False
        retry = 0
        try:
            while not self._stopping:
                started = loop.time()
                heard = False
                try:
                    heard = await self._attach(target)
                except grpc.aio.AioRpcError as exc:
                    # INVALID_ARGUMENT and the like will not heal by retrying,
                    # but a supervised agent that exited would only be restarted.
                    level = logging.WARNING if exc.code() in _TRANSIENT else logging.ERROR
                    log.log(
                        level, "sidecar %s: Attach failed: %s: %s",
                        address, exc.code().name, exc.details(),
                    )
                except Exception:
                    log.exception("sidecar %s: the Attach session failed", address)
                if self._stopping:
                    break
                if heard or loop.time() - started > 10.0:
                    retry = 0
                delay = self._reconnect_backoff.delay(retry)
                retry += 1
                log.info("reconnecting to the sidecar at %s in %.2fs", address, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
        finally:
            self._running = False
            self._stopping = False
            if traced:
                tracing.flush()
            self._done.set()
            log.info("agent %s stopped", self.name)

    async def _attach(self, target: str) -> bool:
        """One session; returns whether the sidecar sent anything (to reset the
        reconnect backoff). Raises the stream's error."""
        assert self._wakeup is not None and self._cut_grace is not None
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            session: SidecarSession[Attempt] = SidecarSession(channel, self.capacity)
            self._session = session
            reader: asyncio.Task[None] | None = None
            writer: asyncio.Task[None] | None = None
            stopper: asyncio.Task[bool] | None = None
            try:
                await session.call.write(
                    runtime_pb2.AttachRequest(
                        hello=runtime_pb2.AgentHello(
                            intent_types=self.intent_types,
                            capacity=self.capacity,
                            language="python",
                            accepts_batches=True,
                            fetches_steps=True,
                        )
                    )
                )
                log.info(
                    "agent %s attached to the sidecar (%s; capacity %d; types %s)",
                    self.name, target, self.capacity, ", ".join(self.intent_types),
                )
                reader = asyncio.create_task(self._read(session), name="intentd-agent-reader")
                writer = asyncio.create_task(session.write_loop(), name="intentd-agent-writer")
                stopper = asyncio.create_task(self._wakeup.wait())
                await asyncio.wait({reader, writer, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for stream_task in (reader, writer):
                    if stream_task.done():
                        stream_task.result()  # raises the stream's error
                        log.warning("the sidecar ended the Attach stream")
                        break
                else:
                    await self._drain(session, reader)
            finally:
                for task in (reader, writer, stopper):
                    if task is not None and not task.done():
                        task.cancel()
                self._session = None
                await session.close(SHUTDOWN if self._stopping else LEASE_LOST)
            return session.heard

    async def _drain(self, session: SidecarSession[Attempt], reader: asyncio.Task[None]) -> None:
        """Graceful stop: running handlers get up to the grace period (cut short
        by the stream dropping or a second signal)."""
        assert self._cut_grace is not None
        if not session.tasks() or self._grace <= 0:
            return
        log.info("waiting up to %.1fs for %d running handler(s)", self._grace, len(session.tasks()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        cut = asyncio.create_task(self._cut_grace.wait())
        try:
            while session.tasks() and not cut.done() and not reader.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait(
                    [*session.tasks(), cut, reader],
                    timeout=left,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            cut.cancel()

    async def _read(self, session: SidecarSession[Attempt]) -> None:
        while True:
            response = await session.call.read()
            if response is grpc.aio.EOF:
                return
            session.heard = True
            if response.WhichOneof("msg") == "batch":
                for inner in response.batch.messages:
                    self._handle(session, inner)
            else:
                self._handle(session, response)

    def _handle(self, session: SidecarSession[Attempt], response: runtime_pb2.AttachResponse) -> None:
        kind = response.WhichOneof("msg")
        try:
            if kind == "assignment":
                self._on_assignment(session, response.assignment)
            elif kind == "revocation":
                self._on_revocation(session, response.revocation)
            elif kind == "write_result":
                session.on_write_result(response.write_result)
            elif kind == "welcome":
                session.on_welcome(response.welcome)
            else:
                log.debug("ignoring an unknown message from the sidecar: %s", kind)
        except Exception:
            log.exception("could not handle a %s from the sidecar", kind)

    # -- assignments -----------------------------------------------------------

    def _on_assignment(self, session: SidecarSession[Attempt], assignment: delivery_pb2.Assignment) -> None:
        lease = assignment.lease
        if not lease.token or not lease.intent_id:
            log.error("ignoring an assignment without a lease (intent %s)", assignment.intent.id)
            return
        prefix = f"intent {lease.intent_id} attempt {lease.attempt}"
        if self._stopping:
            log.info("%s: not started, the agent is stopping", prefix)
            return
        if lease.token in session.running:
            log.warning("%s: assigned again with the same lease; ignored", prefix)
            return
        for other in list(session.running.values()):
            if other.intent_id == lease.intent_id:
                # The newer delivery fences the older one: stop it quietly.
                log.warning("%s: supersedes attempt %d still running here", prefix, other.number)
                other.revoke(LEASE_LOST, f"superseded by attempt {lease.attempt}")
        if assignment.intent.to_agent and assignment.intent.to_agent != self.name:
            log.warning(
                "%s: addressed to %s, not to this agent (%s)",
                prefix, assignment.intent.to_agent, self.name,
            )
        handler = self._handlers.get(assignment.intent.intent_type)
        attempt = Attempt(
            assignment,
            session,
            loop=asyncio.get_running_loop(),
            write_backoff=self._write_backoff,
            write_timeout=self._write_timeout,
            max_steps_in_flight=self.max_steps_in_flight,
        )
        # Parked attempts still unwinding hold no slot of the sidecar's any more.
        if sum(not other.stopped for other in session.running.values()) >= self.capacity:
            log.warning(
                "%s: the sidecar assigned more than the agent's capacity (%d); it waits for a slot",
                prefix, self.capacity,
            )
        session.running[lease.token] = attempt
        attempt.start(self._run_attempt(session, attempt, handler))

    def _on_revocation(self, session: SidecarSession[Attempt], revocation: delivery_pb2.Revocation) -> None:
        attempt = session.find(revocation.lease)
        if attempt is None:
            log.debug("revocation for a lease not held here: %s", revocation.lease.intent_id)
            return
        reason = revocation.reason or LEASE_LOST
        if attempt.revoke(reason, revocation.message):
            log.info(
                "%s: revoked (%s%s); cancelling the handler",
                attempt.log_prefix, reason, f": {revocation.message}" if revocation.message else "",
            )

    async def _run_attempt(
        self, session: SidecarSession[Attempt], attempt: Attempt, handler: _Handler | None
    ) -> None:
        token = attempt.lease.token
        # This task's own context: JSON log lines about the attempt carry these.
        bind_log_context(intent_id=attempt.intent_id, attempt=attempt.number)
        try:
            await self._run_traced(session, attempt, handler)
        except LeaseLost as exc:
            log.info("%s: stopped (%s); nothing reported", attempt.log_prefix, exc.reason)
        except asyncio.CancelledError:
            if not attempt.stopped:
                raise
            if attempt.stop_reason == PARKED:
                log.info("%s: parked on a wait; nothing more reported", attempt.log_prefix)
            else:
                log.info("%s: cancelled (%s); nothing reported", attempt.log_prefix, attempt.stop_reason)
        except Exception:
            # Nothing else can end this attempt short of closing the stream; the
            # intent stays in progress until the sidecar stream closes.
            log.exception("%s: could not report the outcome", attempt.log_prefix)
        finally:
            attempt.finish()
            if session.running.get(token) is attempt:
                del session.running[token]

    async def _run_traced(self, session: SidecarSession[Attempt], attempt: Attempt, handler: _Handler | None) -> None:
        """Runs and reports the attempt in a span whose parent is the trace
        context the sender's traceparent label carries (a new trace without)."""
        span = tracing.start_span(
            "intentd.handle",
            kind="consumer",
            traceparent=attempt.labels.get(tracing.TRACEPARENT_LABEL),
            tracestate=attempt.labels.get(tracing.TRACESTATE),
            attributes={
                "intentd.intent_id": attempt.intent_id,
                "intentd.intent_type": attempt.intent.intent_type,
                "intentd.attempt": attempt.number,
                "intentd.agent": self.name,
                "intentd.recorded_steps": attempt.recorded_steps,
            },
        )
        error: BaseException | None = None
        try:
            # The slot covers the handler, not the report: the sidecar counts
            # the slot free once the outcome is committed, and by then this
            # one must already be free, or the sidecar's next assignment
            # would find every slot of ours taken.
            async with session.slots:
                if attempt.stopped or self._stopping:
                    span.set_attribute("intentd.outcome", "stopped")
                    return
                try:
                    session.send(runtime_pb2.AttachRequest(ack=delivery_pb2.AckAssignment(lease=attempt.lease)))
                except WriteRefused as exc:  # the stream is gone; so is the lease
                    log.warning("%s: could not acknowledge (%s)", attempt.log_prefix, exc)
                    attempt.stop(LEASE_LOST, "the sidecar stream closed")
                    span.set_attribute("intentd.outcome", "stopped")
                    return
                log.info(
                    "%s: started (%d step(s) recorded by earlier attempts)",
                    attempt.log_prefix, attempt.recorded_steps,
                )
                outcome = await self._invoke(attempt, handler)
            if attempt.stopped:
                span.set_attribute("intentd.outcome", "stopped")
                span.set_attribute("intentd.stop_reason", attempt.stop_reason)
                log.info("%s: stopped (%s); nothing reported", attempt.log_prefix, attempt.stop_reason)
                return
            span.set_attribute("intentd.replayed_steps", attempt.replayed_steps)
            span.set_attribute("intentd.steps", attempt.steps_completed)
            if outcome.result is not None:
                span.set_attribute("intentd.outcome", "completed")
            else:
                span.set_attribute("intentd.outcome", "failed")
                span.set_attribute("intentd.error_code", outcome.code)
                span.set_attribute("intentd.retryable", outcome.retryable)
                span.set_error(f"{outcome.code}: {outcome.message}")
            await self._report(attempt, outcome)
        except LeaseLost as exc:
            # Fenced off (another attempt owns the intent) or parked: expected, not an error.
            span.set_attribute("intentd.outcome", "parked" if exc.reason == PARKED else "stopped")
            span.set_attribute("intentd.stop_reason", exc.reason)
            raise
        except BaseException as exc:
            if attempt.stop_reason == PARKED:
                span.set_attribute("intentd.outcome", "parked")
            else:
                error = exc
            raise
        finally:
            span.end(error)

    async def _invoke(self, attempt: Attempt, handler: _Handler | None) -> _Outcome:
        """Runs the handler; turns what it returned or raised into an outcome.
        LeaseLost and our own cancellation propagate."""
        try:
            try:
                attempt.payload = decode_json(attempt.intent.payload)
            except ValueError as exc:
                raise NonRetryableError("INVALID_PAYLOAD", f"payload is not JSON: {exc}") from exc
            if handler is None:
                return _Outcome(
                    code="NO_HANDLER",
                    message=f"agent {self.name} has no handler for {attempt.intent.intent_type!r} "
                    f"(it handles {', '.join(self.intent_types)})",
                    retryable=True,
                )
            if handler.is_async:
                result = await handler.fn(Context(attempt), attempt.payload)
            else:
                result = await _in_thread(handler.fn, SyncContext(attempt), attempt.payload)
            if inspect.isawaitable(result):
                result = await result
            if attempt.divergence is not None:
                raise attempt.divergence
            # How many earlier attempts recorded (the highest position,
            # recorded_steps, also counts the holes concurrent steps left).
            recorded = attempt.intent.checkpoint.steps_completed or attempt.recorded_steps
            if recorded > attempt.replayed_steps:
                log.warning(
                    "%s: finished after replaying %d of %d recorded steps; "
                    "steps should be deterministic in name and order",
                    attempt.log_prefix, attempt.replayed_steps, recorded,
                )
            data = encode_json(result, f"the result of the {attempt.intent.intent_type} handler")
            log.info("%s: completed", attempt.log_prefix)
            return _Outcome(result=data)
        except LeaseLost:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if attempt.stopped or (task is not None and task.cancelling()):
                raise  # cancelled by the agent (or the event loop is shutting down)
            log.warning("%s: the handler was cancelled from within; failing the attempt",
                        attempt.log_prefix)
            return _Outcome(code="AGENT_ERROR", message="the handler was cancelled", retryable=True)
        except NonRetryableError as exc:
            div = attempt.divergence or exc
            log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, div)
            return _Outcome(code=div.code, message=div.message[:MAX_FAIL_MESSAGE_LEN], retryable=False)
        except Exception as exc:
            if attempt.divergence is not None:
                div = attempt.divergence
                log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, div)
                return _Outcome(code=div.code, message=div.message, retryable=False)
            if isinstance(exc, WaitTimedOut):
                # Recorded: every later attempt would replay to this wait and time out again.
                log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, exc)
                return _Outcome(code=WAIT_TIMED_OUT, message=str(exc)[:MAX_FAIL_MESSAGE_LEN], retryable=False)
            if isinstance(exc, ChildFailed):
                # Recorded too: the wait replays to the same outcome in every attempt.
                log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, exc)
                return _Outcome(code=CHILD_FAILED, message=str(exc)[:MAX_FAIL_MESSAGE_LEN], retryable=False)
            if (isinstance(exc, WriteError) and exc.method in ("RecordStep", "Wait")
                    and exc.code == "RESOURCE_EXHAUSTED"):
                # The intent's history limit: a history only grows, so every
                # later attempt would replay to this step and be refused again.
                log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, exc)
                return _Outcome(code=HISTORY_LIMIT_EXCEEDED, message=str(exc)[:MAX_FAIL_MESSAGE_LEN], retryable=False)
            if isinstance(exc, StreamLimitExceeded):
                log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, exc)
                return _Outcome(code=STREAM_LIMIT_EXCEEDED, message=str(exc)[:MAX_FAIL_MESSAGE_LEN], retryable=False)
            if isinstance(exc, WriteError) and exc.method == "StartChildren" and exc.code == "PERMISSION_DENIED":
                # The sidecar's key may not send there: every attempt would be
                # refused the same way until an operator widens its send patterns.
                log.warning("%s: failed (non-retryable): %s", attempt.log_prefix, exc)
                return _Outcome(code=CHILD_NOT_PERMITTED, message=str(exc)[:MAX_FAIL_MESSAGE_LEN], retryable=False)
            log.warning("%s: handler raised; failing the attempt (retryable)", attempt.log_prefix,
                        exc_info=exc)
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return _Outcome(code="AGENT_ERROR", message=text[:MAX_FAIL_MESSAGE_LEN], retryable=True)

    async def _report(self, attempt: Attempt, outcome: _Outcome) -> None:
        if outcome.result is not None:
            try:
                await attempt.complete(outcome.result)
                return
            except WriteError as exc:
                # E.g. a result over the size limit: fail the attempt rather than
                # leave the intent in progress with nobody working on it.
                log.warning("%s: %s", attempt.log_prefix, exc)
                outcome = _Outcome(
                    code="AGENT_ERROR", message=str(exc)[:MAX_FAIL_MESSAGE_LEN], retryable=True
                )
        await attempt.fail(outcome.code, outcome.message, outcome.retryable)


async def _in_thread(fn: Callable[..., Any], ctx: SyncContext, payload: Any) -> Any:
    """Runs a ``def`` handler in a thread of its own (not a pool: a revoked
    handler cannot be interrupted and must not hold up the next one)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    run_in = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            value = run_in.run(fn, ctx, payload)
        except (KeyboardInterrupt, SystemExit) as exc:
            outcome: tuple[bool, Any] = (False, RuntimeError(f"handler raised {exc!r}"))
        except BaseException as exc:
            outcome = (False, exc)
        else:
            outcome = (True, value)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(
        target=target, name=f"intentd-agent-{ctx.intent_id}-{ctx.attempt}", daemon=True
    )
    thread.start()
    return await future
