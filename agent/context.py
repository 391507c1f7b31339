"""What a handler sees of its intent: ``Context`` (for ``async def`` handlers)
and ``SyncContext`` (for ``def`` handlers, which run in a thread).

Both are facades over the attempt's engine (``attempt.Attempt``), which numbers
steps 1, 2, 3... in call order, replays the steps an earlier attempt recorded
and records the others through the sidecar; see the package docstring for the
guarantees. The two differ only in how they wait: ``Context`` awaits the
engine, ``SyncContext`` blocks on it through ``Attempt.blocking``.

Durable waits (``wait_for_signal``, ``sleep``, ``sleep_until``, ``ask_human``;
docs/waits.md) take the next position like a step. When the control plane
has nothing for the wait within the intent type's hold window the intent
parks: the attempt is over (``cancel_reason`` ``PARKED``), the handler is
stopped as on a revocation and nothing more is reported; the next delivery,
once the signal, decision or timer came, replays to the wait and it returns.

Child intents (``start``, ``start_many``, ``gather``, ``first``, ``call``;
docs/children.md, agent/children.py) take their positions when they are
called, not when they are awaited: a start is a write whose record names the
children, a gather or first is a durable wait on them.

Streams (``emit``, ``flush_streams``; docs/streams.md, agent/emitter.py):
chunks a handler emits while it works (LLM tokens, progress, partial
results), buffered and sent in order behind the handler, each tagged with the
position it belongs to; every chunk emitted before a step's record commits
before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, Never, NoReturn, ParamSpec, Protocol, TypeVar, overload

from intentd.core.limits import DEFAULT_STREAM
from intentd.core.waits import DEFAULT_OUTCOMES

from . import children, waits
from .attempt import Attempt, StepPlan, current_step
from .children import ChildCall, ChildHandle, SyncChildHandle
from .waits import HumanDecision, WaitCall

P = ParamSpec("P")
T = TypeVar("T")
V = TypeVar("V")


class _Read(Generic[V]):
    """A read-only attribute of a context, read from its attempt when asked."""

    def __init__(self, get: Callable[[Attempt], V], doc: str = "") -> None:
        self._get = get
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, ctx: None, owner: type) -> _Read[V]: ...

    @overload
    def __get__(self, ctx: _ContextBase, owner: type) -> V: ...

    def __get__(self, ctx: _ContextBase | None, owner: type) -> _Read[V] | V:
        return self if ctx is None else self._get(ctx._attempt)

    # Never as the value's type: mypy refuses the assignment too.
    def __set__(self, ctx: _ContextBase, value: Never) -> NoReturn:
        raise AttributeError(f"ctx.{self._name} is read-only")


class _ContextBase:
    """What both contexts show of the attempt."""

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    intent = _Read(lambda a: a.intent, "The ``intentd.v1.Intent`` proto, as delivered.")
    lease = _Read(lambda a: a.lease, "The ``intentd.v1.Lease`` proto of this attempt.")
    assignment = _Read(lambda a: a.assignment, "The ``intentd.v1.Assignment`` proto, as delivered.")
    intent_id = _Read(lambda a: a.intent_id)
    intent_type = _Read(lambda a: a.intent.intent_type)
    attempt = _Read(lambda a: a.number, "1 on the first delivery.")
    max_attempts = _Read(lambda a: a.intent.max_attempts, "How many attempts the intent may be given.")
    to_agent = _Read(lambda a: a.intent.to_agent, "The address the intent was sent to.")
    sender = _Read(lambda a: a.intent.sender)
    idempotency_key = _Read(lambda a: a.intent.idempotency_key)
    deadline = _Read(lambda a: a.deadline, "An aware ``datetime``, or None.")
    heartbeat_timeout = _Read(lambda a: a.heartbeat_timeout, "A ``timedelta``, or None.")
    labels = _Read(lambda a: a.labels)
    payload = _Read(lambda a: a.payload, "The decoded payload (also the handler's second argument).")
    payload_json = _Read(lambda a: a.intent.payload, "The payload as sent (UTF-8 JSON).")
    last_checkpoint = _Read(lambda a: a.last_checkpoint, "The last saved checkpoint (decoded JSON), or None.")
    recorded_steps = _Read(
        lambda a: a.recorded_steps,
        "The highest position earlier attempts recorded (how many steps they recorded, unless "
        "concurrent steps left holes).",
    )
    replayed_steps = _Read(lambda a: a.replayed_steps, "How many of them this attempt replayed so far.")
    steps_completed = _Read(lambda a: a.steps_completed, "Steps done so far in this attempt, replayed or run.")
    cancelled = _Read(
        lambda a: a.stopped,
        "True once the attempt must stop: revoked by the sidecar, refused as stale, "
        "its sidecar stream dropped, or the agent is stopping.",
    )
    cancel_reason = _Read(
        lambda a: a.stop_reason,
        "``CANCELED``, ``TIMED_OUT``, ``LEASE_LOST``, ``SHUTDOWN`` or ``PARKED``; None while live.",
    )

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


class _AsyncStepDecorator(Protocol):
    """``Context.step_fn(name)``: the decorated function returns what ``fn`` does, awaited."""

    @overload
    def __call__(self, fn: Callable[P, Awaitable[T]], /) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


class _SyncStepDecorator(Protocol):
    """``SyncContext.step_fn(name)``: the decorated function returns what ``fn`` does."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> Callable[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> Callable[P, T]: ...


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
    def step(
        self, name: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]: ...

    @overload
    def step(
        self, name: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]: ...

    def step(
        self, name: str, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, Any]:
        """Runs ``fn(*args, **kwargs)`` as the next step, or returns the result
        an earlier attempt recorded for it without running it: ``await
        ctx.step(...)``.

        The step takes its position *now*, when ``step`` is called, not when
        the returned coroutine first runs: ``await asyncio.gather(ctx.step("a",
        fa), ctx.step("b", fb))`` numbers a=1 and b=2 in every attempt and runs
        them concurrently (at most ``Agent(max_steps_in_flight=)`` step
        functions of the attempt at once; the others wait). Steps must not be
        called from inside a running step's function (``RuntimeError``).

        ``fn`` may be a coroutine function or a plain function (run in a worker
        thread). Its result must be JSON-serialisable; what is returned is the
        JSON round trip of it (tuples come back as lists, dict keys as strings),
        the same on the first run and on replays. Returns only after the result
        is recorded. A step that raises is not recorded; when it ran alone
        (no other step open meanwhile) it does not use up its position: the
        next ``step`` call takes the same one.
        """
        attempt = self._attempt
        return attempt.step(name, functools.partial(_call, fn, args, kwargs))

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

    def step_fn(self, name: str | None = None) -> _AsyncStepDecorator:
        """Decorator form: each call of the decorated function is one step
        named ``name`` (default: the function's name)::

            @ctx.step_fn("validate")
            async def validate(rows): ...
            ok = await validate(rows)
        """

        def decorate(fn: Callable[P, Any]) -> Callable[P, Coroutine[Any, Any, Any]]:
            step_name = _step_name(name, fn)

            # Not a coroutine function: the step's position is taken at the call, as ctx.step's.
            @functools.wraps(fn)
            def run(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, Any]:
                return self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    async def checkpoint(self, state: Any) -> None:
        """Saves a free-form JSON checkpoint (last write wins); the next attempt
        finds it in ``ctx.last_checkpoint``."""
        await self._attempt.save_checkpoint(state)

    async def progress(self, message: str, fraction: float | None = None) -> None:
        """Reports progress (``fraction`` in 0..1; None keeps the last one)."""
        await self._attempt.report_progress(message, fraction)

    # -- streams (docs/streams.md) -------------------------------------------------

    async def emit(self, data: Any, *, stream: str = DEFAULT_STREAM) -> None:
        """Appends a chunk to one of the intent's streams (up to 16 per
        intent; names are 1 to 64 characters of ``[A-Za-z0-9_.:-]``), for
        clients reading it live or later. A ``str`` is a text chunk, anything
        else a JSON chunk; at most 64 KiB encoded (``StreamLimitExceeded``; a
        bad stream name: ``ValueError``; a value that is not JSON: ``TypeError``).

        Cheap enough to call per token: the chunk is buffered and sent behind
        the handler, in order, and this returns at once unless the attempt's
        buffer is full (then it waits for room). The chunk belongs to the step
        whose function calls this, else to the next position the handler will
        take; the chunks of a step commit before its record, so a replay does
        not emit them again (a replayed step's are dropped). Raises
        ``StreamLimitExceeded`` once when earlier chunks were refused by a
        limit of the intent's streams (this chunk is then not emitted)."""
        streams = self._attempt.streams
        item = streams.chunk(data, stream)
        if item is not None and not streams.offer(item):
            await streams.wait_room(item)

    async def flush_streams(self) -> None:
        """Returns once every chunk emitted so far is committed (or was
        refused: then raises ``StreamLimitExceeded``, once)."""
        await self._attempt.streams.flush(surface=True)

    # -- durable waits (docs/waits.md) ---------------------------------------------

    def wait_for_signal(self, name: str, *, timeout: float | None = None) -> Coroutine[Any, Any, Any]:
        """Waits, durably, for the next signal called ``name`` sent to this
        intent (``SignalIntent``); returns its payload. Signals that came
        before are kept in order; each wait takes one. ``timeout`` (seconds,
        counted from the first attempt that reached the wait) raises
        ``WaitTimedOut`` when it passes first. Like every wait, it takes its
        position when called."""
        return self._wait(waits.signal_wait(name, timeout))

    def sleep(self, seconds: float) -> Coroutine[Any, Any, None]:
        """Sleeps durably: counted from the first attempt that reached this
        sleep, on the control plane's clock; the intent parks meanwhile."""
        return self._wait(waits.sleep_wait(seconds))

    def sleep_until(self, when: datetime) -> Coroutine[Any, Any, None]:
        """Sleeps durably until ``when`` (an aware datetime; naive is refused)."""
        return self._wait(waits.sleep_until_wait(when))

    def ask_human(
        self,
        title: str,
        *,
        description: str | None = None,
        outcomes: Sequence[str] = DEFAULT_OUTCOMES,
        assignees: Sequence[str] | None = None,
        form: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        remind_after: float | None = None,
    ) -> Coroutine[Any, Any, HumanDecision]:
        """Makes a task for a human (once per wait, whatever the attempts) and
        waits, durably, for its decision. ``assignees``: the API key names
        that may decide (default: any client key of the tenant); ``form``: a
        JSON Schema the decision's form data must satisfy; ``timeout`` raises
        ``WaitTimedOut``; ``remind_after`` sends a ``TASK_REMINDED`` event."""
        return _as_decision(self._wait(_human(title, description, outcomes, assignees, form, timeout, remind_after)))

    def _wait(self, call: WaitCall) -> Coroutine[Any, Any, Any]:
        """The wait's position is taken now; the coroutine reaches it."""
        attempt = self._attempt
        return attempt.wait_at(attempt.open_wait(call), call)

    # -- child intents (docs/children.md) -------------------------------------------
    # Each takes its position when called, before the returned awaitable runs.

    def start(
        self,
        to_agent: str,
        intent_type: str,
        payload: Any = None,
        *,
        deadline: datetime | timedelta | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
        detached: bool = False,
    ) -> Coroutine[Any, Any, ChildHandle]:
        """Starts a child intent -- an ordinary intent for ``to_agent``, whose
        parent is this intent -- once, whatever the attempts: a replay gets the
        same child back. Returns its handle (``await handle.result()``, or
        ``ctx.gather``/``ctx.first``). ``deadline``: an aware datetime or a
        timedelta, capped at this intent's; ``detached``: the child is left
        running when this intent ends by cancel, failure or timeout."""
        return _only(children.Starting(self._attempt, [ChildCall(
            to_agent, intent_type, payload, deadline, max_attempts, labels, detached)], ChildHandle))

    def start_many(self, calls: Sequence[ChildCall]) -> Coroutine[Any, Any, list[ChildHandle]]:
        """Starts 1 to 1000 children at one position, in one statement; their
        handles in order."""
        return children.awaiting(children.Starting(self._attempt, calls, ChildHandle))

    def gather(self, *handles: ChildHandle, timeout: float | None = None,
               return_exceptions: bool = False) -> Coroutine[Any, Any, list[Any]]:
        """Waits, durably, until every child given has ended (the intent parks
        meanwhile: no lease, no slot); their results in argument order. A child
        that did not complete raises ``ChildFailed`` (the first such in
        argument order), or stands in its place with ``return_exceptions``.
        ``timeout`` (seconds) raises ``WaitTimedOut``."""
        return children.awaiting(children.Gathering(self._attempt, handles, timeout, return_exceptions))

    def first(self, *handles: ChildHandle,
              timeout: float | None = None) -> Coroutine[Any, Any, tuple[ChildHandle, Any]]:
        """Waits, durably, for the first of the children to end; returns its
        handle and result (``ChildFailed`` when it did not complete). The
        others go on running."""
        return children.awaiting(children.Firsting(self._attempt, handles, timeout))

    def call(
        self,
        to_agent: str,
        intent_type: str,
        payload: Any = None,
        *,
        deadline: datetime | timedelta | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
        detached: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """``start`` and the child's result: two positions (the start, then its
        wait), both taken now."""
        return children.calling(children.call_positions(children.Starting(self._attempt, [ChildCall(
            to_agent, intent_type, payload, deadline, max_attempts, labels, detached)], ChildHandle)))


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
        (a coroutine function is run on the agent's event loop). For steps
        that run concurrently, see ``parallel``."""
        attempt = self._attempt
        with attempt.open_step(name) as plan:
            plan.begin()
            if not plan.known:
                attempt.blocking(attempt.fetch(plan))
            if plan.replayed:
                return plan.value
            token = current_step.set(plan)
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = attempt.blocking(_await(result))
            finally:
                current_step.reset(token)
            return attempt.blocking(attempt.commit(plan, result))

    def parallel(self, *calls: tuple[Any, ...]) -> list[Any]:
        """Runs steps concurrently: each call is ``(name, fn, *args)``, as
        the arguments of ``step``. Their positions are taken in list order
        before any runs; the functions run on threads of their own (a
        coroutine function on the agent's event loop), at most
        ``Agent(max_steps_in_flight=)`` at once; returns their results in list
        order once all have finished (recorded steps are replayed, not run).
        If some raise, the first of them in list order is raised after all
        have finished; the others' records stand::

            rows, users = ctx.parallel(("rows", fetch_rows, day), ("users", fetch_users))
        """
        attempt = self._attempt
        parsed = [_parallel_call(call, number) for number, call in enumerate(calls, 1)]
        plans: list[StepPlan] = []
        try:
            for name, _, _ in parsed:
                plans.append(attempt.open_step(name))
        except BaseException:
            for plan in plans:
                plan.close()
            raise
        outcomes = attempt.blocking(_parallel(attempt, plans, parsed))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                attempt.check_live()  # a stopped attempt says so first
                raise outcome
        return outcomes

    def step_scope(self, name: str) -> SyncStepScope:
        """``with ctx.step_scope(name) as s:`` -- see ``Context.step_scope``."""
        return SyncStepScope(self._attempt, name)

    def step_fn(self, name: str | None = None) -> _SyncStepDecorator:
        """Decorator form of ``step``: each call of the function is one step."""

        def decorate(fn: Callable[P, Any]) -> Callable[P, Any]:
            step_name = _step_name(name, fn)

            @functools.wraps(fn)
            def run(*args: P.args, **kwargs: P.kwargs) -> Any:
                return self.step(step_name, fn, *args, **kwargs)

            return run

        return decorate

    def checkpoint(self, state: Any) -> None:
        self._attempt.blocking(self._attempt.save_checkpoint(state))

    def progress(self, message: str, fraction: float | None = None) -> None:
        self._attempt.blocking(self._attempt.report_progress(message, fraction))

    # -- streams: as on Context; emit blocks only while the buffer is full ----------

    def emit(self, data: Any, *, stream: str = DEFAULT_STREAM) -> None:
        """As ``Context.emit``, from the handler's thread (or a step's)."""
        attempt = self._attempt
        item = attempt.streams.chunk(data, stream)
        if item is not None and not attempt.streams.offer(item):
            attempt.blocking(attempt.streams.wait_room(item))

    def flush_streams(self) -> None:
        """As ``Context.flush_streams``, blocking."""
        self._attempt.blocking(self._attempt.streams.flush(surface=True))

    # -- durable waits: as on Context, blocking -------------------------------------

    def wait_for_signal(self, name: str, *, timeout: float | None = None) -> Any:
        return self._wait(waits.signal_wait(name, timeout))

    def sleep(self, seconds: float) -> None:
        self._wait(waits.sleep_wait(seconds))

    def sleep_until(self, when: datetime) -> None:
        self._wait(waits.sleep_until_wait(when))

    def ask_human(
        self,
        title: str,
        *,
        description: str | None = None,
        outcomes: Sequence[str] = DEFAULT_OUTCOMES,
        assignees: Sequence[str] | None = None,
        form: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        remind_after: float | None = None,
    ) -> HumanDecision:
        return _decision(self._wait(_human(title, description, outcomes, assignees, form, timeout, remind_after)))

    def _wait(self, call: WaitCall) -> Any:
        attempt = self._attempt
        plan = attempt.open_wait(call)
        return attempt.blocking(attempt.wait_at(plan, call))

    # -- child intents: as on Context, blocking (handles: SyncChildHandle) -------------

    def start(
        self,
        to_agent: str,
        intent_type: str,
        payload: Any = None,
        *,
        deadline: datetime | timedelta | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
        detached: bool = False,
    ) -> SyncChildHandle:
        (handle,) = self.start_many([ChildCall(to_agent, intent_type, payload, deadline, max_attempts, labels,
                                               detached)])
        return handle

    def start_many(self, calls: Sequence[ChildCall]) -> list[SyncChildHandle]:
        return children.blocking(children.Starting(self._attempt, calls, SyncChildHandle))

    def gather(self, *handles: ChildHandle, timeout: float | None = None,
               return_exceptions: bool = False) -> list[Any]:
        return children.blocking(children.Gathering(self._attempt, handles, timeout, return_exceptions))

    def first(self, *handles: ChildHandle, timeout: float | None = None) -> tuple[ChildHandle, Any]:
        return children.blocking(children.Firsting(self._attempt, handles, timeout))

    def call(
        self,
        to_agent: str,
        intent_type: str,
        payload: Any = None,
        *,
        deadline: datetime | timedelta | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
        detached: bool = False,
    ) -> Any:
        return children.calling_blocking(children.call_positions(children.Starting(self._attempt, [ChildCall(
            to_agent, intent_type, payload, deadline, max_attempts, labels, detached)], SyncChildHandle)))


def _parallel_call(call: Any, number: int) -> tuple[str, Callable[..., Any], tuple[Any, ...]]:
    if not isinstance(call, tuple) or len(call) < 2 or not isinstance(call[0], str) or not callable(call[1]):
        raise TypeError(f"parallel: call {number} must be a tuple (name, fn, *args), got {call!r:.80}")
    return call[0], call[1], call[2:]


async def _parallel(attempt: Attempt, plans: Sequence[StepPlan],
                    calls: Sequence[tuple[str, Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """The steps of ``SyncContext.parallel`` on the loop, each function on a
    thread of a pool as large as the bound allows (not the loop's default
    executor, whose few threads would be a second, smaller bound)."""
    loop = asyncio.get_running_loop()
    workers = max(1, min(len(plans), attempt.max_steps_in_flight))
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"intentd-step-{attempt.intent_id}")
    try:

        def runner(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], Awaitable[Any]]:
            async def run() -> Any:
                if inspect.iscoroutinefunction(fn):
                    return await fn(*args)
                # The context goes along: a step called in there is refused as nested.
                result = await loop.run_in_executor(pool, functools.partial(contextvars.copy_context().run, fn, *args))
                if inspect.isawaitable(result):
                    result = await result
                return result
            return run

        return list(await asyncio.gather(
            *(attempt.run_step(plan, runner(fn, args)) for plan, (_, fn, args) in zip(plans, calls, strict=True)),
            return_exceptions=True))
    finally:
        # Not waiting: a revoked attempt's functions cannot be stopped, and
        # the loop must not block on them; their threads end when they return.
        pool.shutdown(wait=False)


def _human(title: str, description: str | None, outcomes: Sequence[str], assignees: Sequence[str] | None,
           form: Mapping[str, Any] | None, timeout: float | None, remind_after: float | None) -> WaitCall:
    return waits.human_wait(title, description=description, outcomes=outcomes, assignees=assignees,
                            form=form, timeout=timeout, remind_after=remind_after)


def _decision(value: Any) -> HumanDecision:
    assert isinstance(value, HumanDecision)  # what a HUMAN wait's record decodes to
    return value


async def _as_decision(wait: Awaitable[Any]) -> HumanDecision:
    return _decision(await wait)


class _Scope:
    """The state of a ``step_scope`` block, for both forms of it. The body
    counts as the step's function: a step called in it is refused as nested
    (it would not be called on a replay that skips the work)."""

    def __init__(self, attempt: Attempt, name: str) -> None:
        self._attempt = attempt
        self.name = name
        self.index = 0
        self.replayed = False
        self.result: Any = None
        self._plan: StepPlan | None = None
        self._token: contextvars.Token[StepPlan | None] | None = None

    def _opened(self) -> StepPlan:
        plan = self._plan = self._attempt.open_step(self.name)
        plan.begin()
        return plan

    def _resolved(self) -> None:
        plan = self._plan
        assert plan is not None
        self.index = plan.index
        self.replayed = plan.replayed
        self.result = plan.value
        self._token = current_step.set(plan)

    @contextlib.contextmanager
    def _closing(self, exc: BaseException | None) -> Iterator[StepPlan | None]:
        """Yields the plan to record, or None (a replay, or the body raised);
        closes the plan with what ended the block."""
        plan = self._plan
        assert plan is not None
        if self._token is not None:
            current_step.reset(self._token)
            self._token = None
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

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        with self._closing(exc) as plan:
            if plan is not None:
                self.result = self._attempt.blocking(self._attempt.commit(plan, self.result))


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _only(starting: children.Starting[ChildHandle]) -> ChildHandle:
    (handle,) = await children.awaiting(starting)
    return handle
