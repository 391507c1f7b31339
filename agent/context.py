"""What a handler sees of its intent: ``Context`` (for ``async def`` handlers)
and ``SyncContext`` (for ``def`` handlers, which run in a thread).

Both are facades over the attempt's engine (``attempt.Attempt``), which numbers
steps 1, 2, 3... in call order, replays the steps an earlier attempt recorded
and records the others through the sidecar; see the package docstring for the
guarantees. The two differ only in how they wait: ``Context`` awaits the
engine, ``SyncContext`` blocks on it through ``Attempt.blocking``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar, overload

from intentd.generated.v1 import delivery_pb2, intent_pb2

from .attempt import Attempt, StepPlan

P = ParamSpec("P")
T = TypeVar("T")


class _ContextBase:
    """What both contexts show of the attempt (read-only)."""

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    @property
    def intent(self) -> intent_pb2.Intent:
        """The ``intentd.v1.Intent`` proto, as delivered."""
        return self._attempt.intent

    @property
    def lease(self) -> delivery_pb2.Lease:
        return self._attempt.lease

    @property
    def assignment(self) -> delivery_pb2.Assignment:
        return self._attempt.assignment

    @property
    def intent_id(self) -> str:
        return self._attempt.intent_id

    @property
    def intent_type(self) -> str:
        return self._attempt.intent.intent_type

    @property
    def attempt(self) -> int:
        """1 on the first delivery."""
        return self._attempt.number

    @property
    def max_attempts(self) -> int:
        """How many attempts the intent may be given (0: the control plane's default)."""
        return self._attempt.intent.max_attempts

    @property
    def to_agent(self) -> str:
        return self._attempt.intent.to_agent

    @property
    def sender(self) -> str:
        return self._attempt.intent.sender

    @property
    def idempotency_key(self) -> str:
        return self._attempt.intent.idempotency_key

    @property
    def deadline(self) -> datetime | None:
        """Aware ``datetime``, or None."""
        return self._attempt.deadline

    @property
    def heartbeat_timeout(self) -> timedelta | None:
        return self._attempt.heartbeat_timeout

    @property
    def labels(self) -> dict[str, str]:
        return self._attempt.labels

    @property
    def payload(self) -> Any:
        """The decoded payload (also the handler's second argument)."""
        return self._attempt.payload

    @property
    def payload_json(self) -> bytes:
        return self._attempt.intent.payload

    @property
    def last_checkpoint(self) -> Any:
        """The last saved checkpoint (decoded JSON), or None."""
        return self._attempt.last_checkpoint

    @property
    def recorded_steps(self) -> int:
        """How many steps earlier attempts recorded."""
        return self._attempt.recorded_steps

    @property
    def replayed_steps(self) -> int:
        """How many of them this attempt replayed so far."""
        return self._attempt.replayed_steps

    @property
    def steps_completed(self) -> int:
        """Steps done so far in this attempt, replayed or run."""
        return self._attempt.steps_completed

    @property
    def cancelled(self) -> bool:
        """True once the attempt must stop: revoked by the sidecar, refused as
        stale, its sidecar stream dropped, or the agent is stopping."""
        return self._attempt.stopped

    @property
    def cancel_reason(self) -> str | None:
        """``CANCELED``, ``TIMED_OUT``, ``LEASE_LOST`` or ``SHUTDOWN``; None while live."""
        return self._attempt.stop_reason

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} intent={self.intent_id} type={self.intent_type} "
            f"attempt={self.attempt} steps={self.steps_completed}>"
        )


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Runs a step function: coroutine functions on the loop, plain functions in
    a worker thread (so blocking I/O does not stall other handlers)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


def _step_name(name: str | None, fn: Callable[..., Any]) -> str:
    return name or str(getattr(fn, "__name__", ""))


class Context(_ContextBase):
    """The handle an ``async def`` handler gets for its intent.

    Attributes (read-only): ``intent_id``, ``intent_type``, ``attempt`` (1 on
    the first delivery), ``max_attempts``, ``to_agent``, ``sender``,
    ``idempotency_key``, ``payload``, ``deadline`` (aware ``datetime`` or None),
    ``labels``, ``last_checkpoint`` (decoded JSON or None), ``recorded_steps``
    (how many steps earlier attempts recorded), ``replayed_steps`` (how many of
    them this attempt replayed so far), ``steps_completed``, ``cancelled`` and
    ``cancel_reason``; ``intent`` and ``lease`` are the raw protos.
    """

    @overload
    async def step(
        self, name: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    async def step(self, name: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Runs ``fn(*args, **kwargs)`` as the next step, or returns the result
        an earlier attempt recorded for it without running it.

        ``fn`` may be a coroutine function or a plain function (run in a worker
        thread). Its result must be JSON-serialisable; what is returned is the
        JSON round trip of it (tuples come back as lists, dict keys as strings),
        the same on the first run and on replays. Returns only after the result
        is recorded. A step that raises is not recorded and does not use up its
        index: the next ``step`` call takes the same index.
        """
        attempt = self._attempt
        with attempt.open_step(name) as plan:
            if not plan.known:
                await attempt.fetch(plan)
            if plan.replayed:
                return plan.value
            return await attempt.commit(plan, await _call(fn, args, kwargs))

    def step_scope(self, name: str) -> StepScope:
        """The context-manager form of a step::

            async with ctx.step_scope("load") as s:
                if not s.replayed:          # the body always runs: skip the work
                    s.result = await load()  # when the result was recorded
            rows = s.result

        On a clean exit ``s.result`` is recorded (a body that raises records
        nothing); on a replay ``s.result`` is the recorded result.
        """
        return StepScope(self._attempt, name)

    def step_fn(
        self, name: str | None = None
    ) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
        """Decorator form: each call of the decorated function is one step
        named ``name`` (default: the function's name)::

            @ctx.step_fn("validate")
            async def validate(rows): ...
            ok = await validate(rows)
        """

        def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
            step_name = _step_name(name, fn)

            @functools.wraps(fn)
            async def run(*args: P.args, **kwargs: P.kwargs) -> T:
                return await self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    async def checkpoint(self, state: Any) -> None:
        """Saves a free-form JSON checkpoint (last write wins); the next attempt
        finds it in ``ctx.last_checkpoint``."""
        await self._attempt.save_checkpoint(state)

    async def progress(self, message: str, fraction: float | None = None) -> None:
        """Reports progress (``fraction`` in 0..1; None keeps the last one)."""
        await self._attempt.report_progress(message, fraction)


class SyncContext(_ContextBase):
    """The handle a plain ``def`` handler gets; it runs in its own thread and
    these methods block. Same attributes as ``Context``.

    After a revocation the handler thread cannot be interrupted; its next call
    on this context raises ``LeaseLost`` instead (and nothing more is reported).
    """

    @overload
    def step(
        self, name: str, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    def step(self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    def step(self, name: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """As ``Context.step``, blocking; ``fn`` runs in the handler's thread
        (a coroutine function is run on the agent's event loop)."""
        attempt = self._attempt
        with attempt.open_step(name) as plan:
            if not plan.known:
                attempt.blocking(attempt.fetch(plan))
            if plan.replayed:
                return plan.value
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = attempt.blocking(_await(result))
            return attempt.blocking(attempt.commit(plan, result))

    def step_scope(self, name: str) -> SyncStepScope:
        """``with ctx.step_scope(name) as s:`` -- see ``Context.step_scope``."""
        return SyncStepScope(self._attempt, name)

    def step_fn(self, name: str | None = None) -> Callable[[Callable[P, T]], Callable[P, T]]:
        """Decorator form of ``step``: each call of the function is one step."""

        def decorate(fn: Callable[P, T]) -> Callable[P, T]:
            step_name = _step_name(name, fn)

            @functools.wraps(fn)
            def run(*args: P.args, **kwargs: P.kwargs) -> T:
                return self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    def checkpoint(self, state: Any) -> None:
        self._attempt.blocking(self._attempt.save_checkpoint(state))

    def progress(self, message: str, fraction: float | None = None) -> None:
        self._attempt.blocking(self._attempt.report_progress(message, fraction))


class _Scope:
    """The state of a ``step_scope`` block, for both forms of it."""

    def __init__(self, attempt: Attempt, name: str) -> None:
        self._attempt = attempt
        self.name = name
        self.index = 0
        self.replayed = False
        self.result: Any = None
        self._plan: StepPlan | None = None

    def _opened(self) -> StepPlan:
        plan = self._plan = self._attempt.open_step(self.name)
        return plan

    def _resolved(self) -> None:
        plan = self._plan
        assert plan is not None
        self.index = plan.index
        self.replayed = plan.replayed
        self.result = plan.value

    @contextlib.contextmanager
    def _closing(self, exc: BaseException | None) -> Iterator[StepPlan | None]:
        """Yields the plan to record, or None (a replay, or the body raised);
        closes the plan with what ended the block."""
        plan = self._plan
        assert plan is not None
        if plan.replayed:
            self.result = plan.value
        try:
            yield plan if not plan.replayed and exc is None else None
        except BaseException as failure:
            plan.close(failure)
            raise
        plan.close(exc)


class StepScope(_Scope):
    """``async with ctx.step_scope(name) as s`` -- see ``Context.step_scope``."""

    async def __aenter__(self) -> StepScope:
        plan = self._opened()
        if not plan.known:
            await self._attempt.fetch(plan)
        self._resolved()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        with self._closing(exc) as plan:
            if plan is not None:
                self.result = await self._attempt.commit(plan, self.result)


class SyncStepScope(_Scope):
    """``with ctx.step_scope(name) as s`` for ``def`` handlers."""

    def __enter__(self) -> SyncStepScope:
        plan = self._opened()
        if not plan.known:
            self._attempt.blocking(self._attempt.fetch(plan))
        self._resolved()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        with self._closing(exc) as plan:
            if plan is not None:
                self.result = self._attempt.blocking(self._attempt.commit(plan, self.result))


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable
