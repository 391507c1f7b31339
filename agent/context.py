"""What a handler sees of its intent: ``Context`` (for ``async def`` handlers)
and ``SyncContext`` (for ``def`` handlers, which run in a thread).

Both number steps 1, 2, 3... in call order, replay the steps an earlier attempt
recorded and record the others through the sidecar; see the package docstring
for the guarantees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import logging
import math
import random
import threading
import types
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import grpc

from intentd.core.observability import tracing
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, intent_pb2

from .errors import LeaseLost, StepDivergence, WriteError
from .session import SidecarSession, WriteRefused, method_of

log = logging.getLogger("intentd.agent")

P = ParamSpec("P")
T = TypeVar("T")

# Why an attempt stopped (ctx.cancel_reason). The first three come from the
# sidecar's Revocation; LEASE_LOST is also used for a write refused as stale and
# for a dropped sidecar stream; SHUTDOWN when the agent itself stops.
CANCELED = "CANCELED"
TIMED_OUT = "TIMED_OUT"
LEASE_LOST = "LEASE_LOST"
SHUTDOWN = "SHUTDOWN"

MAX_STEP_NAME = 200
MAX_PROGRESS_MESSAGE = 1000

# Codes after which a write is retried as is (every write is idempotent per
# lease): the sidecar or the control plane did not commit it, or we cannot tell.
_RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: retry n (0-based) waits in [cap/2, cap],
    cap = min(maximum, initial * 2**n)."""

    initial: float = 0.05
    maximum: float = 2.0

    def delay(self, attempt: int) -> float:
        cap = min(self.maximum, self.initial * 2.0 ** min(attempt, 30))
        return cap / 2 + random.random() * cap / 2


def encode_json(value: Any, what: str) -> bytes:
    """UTF-8 JSON as the control plane stores it (jsonb: no NaN, no NUL)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc
    if "\\u0000" in text:
        raise TypeError(f"{what} contains a NUL character, which the control plane cannot store")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(f"{what} is not valid Unicode text ({exc.reason})") from exc


def decode_json(data: bytes) -> Any:
    """Empty means null, as on the server."""
    return json.loads(data) if data else None


@dataclass
class _Plan:
    index: int
    name: str
    replayed: bool
    value: Any = None
    span: tracing.SpanHandle | None = None


class _BaseContext:
    """State and bookkeeping shared by ``Context`` and ``SyncContext``."""

    def __init__(
        self,
        assignment: delivery_pb2.Assignment,
        session: SidecarSession,
        *,
        loop: asyncio.AbstractEventLoop,
        write_backoff: Backoff,
        write_timeout: float | None,
    ) -> None:
        self.assignment = assignment
        self.intent: intent_pb2.Intent = assignment.intent
        self.lease: delivery_pb2.Lease = assignment.lease
        self.intent_id: str = assignment.lease.intent_id or assignment.intent.id
        self.intent_type: str = assignment.intent.intent_type
        self.attempt: int = assignment.lease.attempt
        self.deadline: datetime | None = (
            assignment.intent.deadline.ToDatetime(tzinfo=UTC)
            if assignment.intent.HasField("deadline")
            else None
        )
        self.heartbeat_timeout: timedelta | None = (
            timedelta(milliseconds=assignment.heartbeat_timeout_ms)
            if assignment.heartbeat_timeout_ms > 0
            else None
        )
        self.labels: dict[str, str] = dict(assignment.intent.labels)
        # The decoded payload (also the handler's second argument); set by the agent.
        self.payload: Any = None
        # The step records of earlier attempts, by index (1-based): those the
        # assignment carried; the others are asked for one by one as the
        # replay reaches them (_fetch_recorded), and each is dropped once
        # replayed, so a large history never sits in memory whole.
        self._recorded: dict[int, intent_pb2.StepRecord] = {s.index: s for s in assignment.steps}
        self.recorded_steps: int = max(assignment.recorded_steps, len(self._recorded))
        self.replayed_steps: int = 0
        self.last_checkpoint: Any = decode_json(assignment.checkpoint)
        self._progress_fraction = assignment.intent.checkpoint.progress_fraction
        self._next_index = 1
        self._active: _Plan | None = None
        self._divergence: StepDivergence | None = None
        self._stop_reason: str | None = None
        self._stop_message = ""
        self._finished = False  # the agent is done with this attempt
        self._session = session
        self._loop = loop
        self._write_backoff = write_backoff
        self._write_timeout = write_timeout
        self._log_prefix = f"intent {self.intent_id} attempt {self.attempt}"
        # Set by the agent: the asyncio task running the handler, and (for
        # SyncContext) the futures of writes a handler thread is waiting on.
        self._task: asyncio.Task[None] | None = None
        self._pending_lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()

    # -- public state --------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the attempt must stop: revoked by the sidecar, refused as
        stale, its sidecar stream dropped, or the agent is stopping."""
        return self._stop_reason is not None

    @property
    def cancel_reason(self) -> str | None:
        """``CANCELED``, ``TIMED_OUT``, ``LEASE_LOST`` or ``SHUTDOWN``; None while live."""
        return self._stop_reason

    @property
    def steps_completed(self) -> int:
        """Steps done so far in this attempt, replayed or run."""
        return self._next_index - 1

    @property
    def payload_json(self) -> bytes:
        return self.intent.payload

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} intent={self.intent_id} type={self.intent_type} "
            f"attempt={self.attempt} steps={self.steps_completed}>"
        )

    # -- stopping --------------------------------------------------------------

    def _stop(self, reason: str, message: str = "") -> bool:
        """Marks the attempt stopped (first reason wins); cancels what a handler
        thread waits on. Loop thread only. Returns whether this call stopped it."""
        if self._stop_reason is not None:
            return False
        self._stop_reason = reason
        self._stop_message = message
        with self._pending_lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        return True

    def _check_live(self) -> None:
        if self._stop_reason is not None:
            raise LeaseLost(self._stop_reason, self._stop_message)
        if self._finished:
            raise RuntimeError(
                f"{self._log_prefix} is over; this context can no longer be used"
            )

    # -- steps -----------------------------------------------------------------

    def _begin_step(self, name: str) -> _Plan:
        self._check_live()
        if self._divergence is not None:
            raise self._divergence
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_STEP_NAME:
            raise ValueError(f"step names are 1 to {MAX_STEP_NAME} characters, got {name!r}")
        if self._active is not None:
            raise RuntimeError(
                f"step {name!r} was started while step {self._active.index} "
                f"{self._active.name!r} is still running; steps of one handler must run "
                "one at a time (not concurrently, not nested), so that their numbering is "
                "the same in every attempt"
            )
        index = self._next_index
        record = self._recorded.get(index)
        if record is None:
            plan = _Plan(index, name, replayed=False)
        else:
            if record.name != name:
                self._divergence = StepDivergence(index, record.name, name)
                log.error("%s: %s", self._log_prefix, self._divergence.message)
                raise self._divergence
            plan = _Plan(index, name, replayed=True, value=decode_json(record.result))
            del self._recorded[index]
            self._next_index += 1
            self.replayed_steps += 1
            log.debug("%s: step %d %r replayed", self._log_prefix, index, name)
        self._active = plan
        # A child of the handler's span; current while the step runs, so the
        # step function's own spans nest under it.
        plan.span = tracing.start_span("intentd.step", attributes={
            "intentd.intent_id": self.intent_id,
            "intentd.attempt": self.attempt,
            "intentd.step.index": index,
            "intentd.step.name": name,
            "intentd.step.replayed": plan.replayed,
        })
        return plan

    def _must_fetch(self) -> bool:
        index = self._next_index
        return index <= self.recorded_steps and index not in self._recorded and self._active is None

    async def _fetch_recorded(self) -> None:
        """Gets the record of the next step from the sidecar when an earlier
        attempt recorded it and the assignment did not carry it."""
        if not self._must_fetch():
            return
        index = self._next_index
        retry = 0
        while True:
            self._check_live()
            try:
                record = await self._session.recorded_step(self.lease, index, "", self._write_timeout)
                break
            except WriteRefused as exc:
                if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                    self._stop(LEASE_LOST, exc.details)
                    self._check_live()
                if exc.code not in _RETRY_CODES:
                    raise WriteError("BeginStep", exc.code.name, exc.details) from None
                delay = self._write_backoff.delay(retry)
                retry += 1
                log.warning("%s: recorded step %d not fetched (%s: %s); retry %d in %.2fs",
                            self._log_prefix, index, exc.code.name, exc.details, retry, delay)
                await asyncio.sleep(delay)
        if record is None:
            # The sidecar knows better than the count we were given (none recorded there).
            self.recorded_steps = index - 1
        else:
            self._recorded[index] = record

    def _end_step(self, plan: _Plan, error: BaseException | None = None) -> None:
        if self._active is plan:
            self._active = None
        if plan.span is not None:
            plan.span.end(error)

    async def _commit_step(self, plan: _Plan, value: Any) -> Any:
        """Records a run step; returns its value as replays will see it."""
        data = encode_json(value, f"the result of step {plan.index} {plan.name!r}")
        response = await self._write(
            delivery_pb2.IntentWrite(
                lease=self.lease, step=delivery_pb2.StepWrite(index=plan.index, name=plan.name, result=data)),
            f"step {plan.index} {plan.name!r}",
        )
        self._next_index += 1
        log.debug("%s: step %d %r recorded", self._log_prefix, plan.index, plan.name)
        # The stored record is the answer (a retried write gets the first one back).
        stored = response.step.result if response.step.result else data
        return decode_json(stored)

    # -- writes ----------------------------------------------------------------

    async def _write(self, write: delivery_pb2.IntentWrite, what: str) -> agent_service_pb2.WriteResult:
        """One write through the sidecar, answered after the control plane
        committed it. Retries passing outages; a stale lease stops the attempt."""
        method = method_of(write)
        retry = 0
        while True:
            self._check_live()
            try:
                return await self._session.write(write, self._write_timeout)
            except WriteRefused as exc:
                code = exc.code
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning(
                        "%s: %s refused as stale (%s); stopping the handler",
                        self._log_prefix, method, exc.details,
                    )
                    self._stop(LEASE_LOST, exc.details)
                    self._check_live()
                if code not in _RETRY_CODES:
                    raise WriteError(method, code.name, exc.details) from None
                delay = self._write_backoff.delay(retry)
                retry += 1
                log.warning(
                    "%s: %s for %s not committed (%s: %s); retry %d in %.2fs",
                    self._log_prefix, method, what, code.name, exc.details, retry, delay,
                )
                await asyncio.sleep(delay)

    async def _save_checkpoint(self, state: Any) -> None:
        data = encode_json(state, "the checkpoint state")
        await self._write(
            delivery_pb2.IntentWrite(lease=self.lease, checkpoint=delivery_pb2.CheckpointWrite(state=data)),
            "checkpoint",
        )
        self.last_checkpoint = decode_json(data)

    async def _report_progress(self, message: str, fraction: float | None) -> None:
        if fraction is None:
            fraction = self._progress_fraction
        if not isinstance(fraction, int | float) or not math.isfinite(fraction) or not (
            0.0 <= fraction <= 1.0
        ):
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction!r}")
        if len(message) > MAX_PROGRESS_MESSAGE:
            raise ValueError(f"progress messages are at most {MAX_PROGRESS_MESSAGE} characters")
        self._check_live()
        await self._write(
            delivery_pb2.IntentWrite(
                lease=self.lease, progress=delivery_pb2.ProgressWrite(message=message, fraction=float(fraction))),
            "progress",
        )
        self._progress_fraction = float(fraction)


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Runs a step function: coroutine functions on the loop, plain functions in
    a worker thread (so blocking I/O does not stall other handlers)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


class Context(_BaseContext):
    """The handle an ``async def`` handler gets for its intent.

    Attributes: ``intent_id``, ``intent_type``, ``attempt`` (1 on the first
    delivery), ``intent`` (the ``intentd.v1.Intent`` proto), ``lease``,
    ``deadline`` (aware ``datetime`` or None), ``labels``, ``last_checkpoint``
    (decoded JSON or None), ``recorded_steps`` (how many steps earlier attempts
    recorded), ``replayed_steps`` (how many of them this attempt replayed so
    far), ``steps_completed``, ``cancelled`` and ``cancel_reason``.
    """

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Runs ``fn(*args, **kwargs)`` as the next step, or returns the result
        an earlier attempt recorded for it without running it.

        ``fn`` may be a coroutine function or a plain function (run in a worker
        thread). Its result must be JSON-serialisable; what is returned is the
        JSON round trip of it (tuples come back as lists, dict keys as strings),
        the same on the first run and on replays. Returns only after the result
        is recorded. A step that raises is not recorded and does not use up its
        index: the next ``step`` call takes the same index.
        """
        await self._fetch_recorded()
        plan = self._begin_step(name)
        error: BaseException | None = None
        try:
            if plan.replayed:
                return plan.value
            value = await _call(fn, args, kwargs)
            return await self._commit_step(plan, value)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_step(plan, error)

    def step_scope(self, name: str) -> StepScope:
        """The context-manager form of a step::

            async with ctx.step_scope("load") as s:
                if not s.replayed:          # the body always runs: skip the work
                    s.result = await load()  # when the result was recorded
            rows = s.result

        On a clean exit ``s.result`` is recorded (a body that raises records
        nothing); on a replay ``s.result`` is the recorded result.
        """
        return StepScope(self, name)

    def step_fn(
        self, name: str | None = None
    ) -> Callable[[Callable[P, Any]], Callable[P, Coroutine[Any, Any, Any]]]:
        """Decorator form: each call of the decorated function is one step
        named ``name`` (default: the function's name)::

            @ctx.step_fn("validate")
            async def validate(rows): ...
            ok = await validate(rows)
        """

        def decorate(fn: Callable[P, Any]) -> Callable[P, Coroutine[Any, Any, Any]]:
            step_name = name or str(getattr(fn, "__name__", ""))

            @functools.wraps(fn)
            async def run(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    async def checkpoint(self, state: Any) -> None:
        """Saves a free-form JSON checkpoint (last write wins); the next attempt
        finds it in ``ctx.last_checkpoint``."""
        await self._save_checkpoint(state)

    async def progress(self, message: str, fraction: float | None = None) -> None:
        """Reports progress (``fraction`` in 0..1; None keeps the last one)."""
        await self._report_progress(message, fraction)


class StepScope:
    """``async with ctx.step_scope(name) as s`` -- see ``Context.step_scope``."""

    def __init__(self, ctx: Context, name: str) -> None:
        self._ctx = ctx
        self.name = name
        self.index = 0
        self.replayed = False
        self.result: Any = None
        self._plan: _Plan | None = None

    async def __aenter__(self) -> StepScope:
        await self._ctx._fetch_recorded()
        self._plan = self._ctx._begin_step(self.name)
        self.index = self._plan.index
        self.replayed = self._plan.replayed
        self.result = self._plan.value
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        plan = self._plan
        assert plan is not None
        error = exc
        try:
            if plan.replayed:
                self.result = plan.value
            elif exc_type is None:
                self.result = await self._ctx._commit_step(plan, self.result)
        except BaseException as failure:
            error = failure
            raise
        finally:
            self._ctx._end_step(plan, error)


class SyncContext(_BaseContext):
    """The handle a plain ``def`` handler gets; it runs in its own thread and
    these methods block. Same attributes as ``Context``.

    After a revocation the handler thread cannot be interrupted; its next call
    on this context raises ``LeaseLost`` instead (and nothing more is reported).
    """

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError(
                "SyncContext methods block; call them from the handler's thread, "
                "not from the event loop (use an async def handler and Context there)"
            )
        if self._stop_reason is not None:
            coro.close()
            self._check_live()
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._pending_lock:
            self._pending.add(fut)
        try:
            # The attempt may have stopped between the check and the add.
            if self._stop_reason is not None:
                fut.cancel()
            return fut.result()
        except concurrent.futures.CancelledError:
            raise LeaseLost(self._stop_reason or LEASE_LOST, self._stop_message) from None
        finally:
            with self._pending_lock:
                self._pending.discard(fut)

    def _run_fn(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = self._blocking(_await(result))
        return result

    def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """As ``Context.step``, blocking; ``fn`` runs in the handler's thread
        (a coroutine function is run on the agent's event loop)."""
        if self._must_fetch():
            self._blocking(self._fetch_recorded())
        plan = self._begin_step(name)
        error: BaseException | None = None
        try:
            if plan.replayed:
                return plan.value
            value = self._run_fn(fn, args, kwargs)
            return self._blocking(self._commit_step(plan, value))
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_step(plan, error)

    def step_scope(self, name: str) -> SyncStepScope:
        """``with ctx.step_scope(name) as s:`` -- see ``Context.step_scope``."""
        return SyncStepScope(self, name)

    def step_fn(self, name: str | None = None) -> Callable[[Callable[P, T]], Callable[P, Any]]:
        """Decorator form of ``step``: each call of the function is one step."""

        def decorate(fn: Callable[P, T]) -> Callable[P, Any]:
            step_name = name or str(getattr(fn, "__name__", ""))

            @functools.wraps(fn)
            def run(*args: P.args, **kwargs: P.kwargs) -> Any:
                return self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    def checkpoint(self, state: Any) -> None:
        self._blocking(self._save_checkpoint(state))

    def progress(self, message: str, fraction: float | None = None) -> None:
        self._blocking(self._report_progress(message, fraction))


class SyncStepScope:
    """``with ctx.step_scope(name) as s`` for ``def`` handlers."""

    def __init__(self, ctx: SyncContext, name: str) -> None:
        self._ctx = ctx
        self.name = name
        self.index = 0
        self.replayed = False
        self.result: Any = None
        self._plan: _Plan | None = None

    def __enter__(self) -> SyncStepScope:
        if self._ctx._must_fetch():
            self._ctx._blocking(self._ctx._fetch_recorded())
        self._plan = self._ctx._begin_step(self.name)
        self.index = self._plan.index
        self.replayed = self._plan.replayed
        self.result = self._plan.value
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        plan = self._plan
        assert plan is not None
        error = exc
        try:
            if plan.replayed:
                self.result = plan.value
            elif exc_type is None:
                self.result = self._ctx._blocking(self._ctx._commit_step(plan, self.result))
        except BaseException as failure:
            error = failure
            raise
        finally:
            self._ctx._end_step(plan, error)


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable
