"""The engine of one attempt: everything an attempt is apart from what its handler sees.

``Attempt`` owns the lease, the handler's task, the stop state, the replay plan
(the records of earlier attempts, by position), the step positions and the
fenced writes with their one retry loop. ``Context`` and ``SyncContext``
(``context.py``) are facades over it for handlers; ``runtime.py`` starts,
revokes and reports attempts through it; ``session.py`` carries its writes and
revokes it when the stream closes.

Every durable operation of a handler goes down one path:

1. ``open_step(name)`` takes the next *position* (1, 2, 3... in call order)
   synchronously, when the handler calls ``ctx.step(...)``, not when the step
   first runs: ``asyncio.gather(ctx.step("a", fa), ctx.step("b", fb))`` numbers
   a=1 and b=2 in every attempt, whichever finishes first. It looks the
   position up in the replay plan: recorded under that name, it is replayed;
   under another name, ``StepDivergence``; not recorded, it runs. When the
   position may have been recorded by an earlier attempt but the assignment
   did not carry the record, ``plan.known`` is False and ``fetch(plan)`` asks
   the sidecar first; "not recorded" is an answer too (a hole, below).
2. ``run_step(plan, call)`` runs the step function under the attempt's bound
   (at most ``max_steps_in_flight`` step functions at once; the others wait,
   their positions taken) and ``commit(plan, value)`` records what ran,
   through ``write``: the one fenced write, retried through passing outages,
   stopping the attempt when the lease is stale. Concurrent steps commit in
   whatever order they finish; the control plane takes any position not yet
   recorded.
3. Closing the plan ends it. A position neither replayed nor recorded (its
   step raised) is handed back, so the next call takes it again, only when
   the step ran alone: nothing else was open when it was taken and no
   position was taken after it. Otherwise it stays a *hole*: unrecorded, below
   positions that are, answered "not recorded" on replay (so it runs). Alone
   is what keeps today's retry loop (``try: await ctx.step(...)`` again and
   again at one position) and is decided by call order only: a rule that
   looked at which concurrent step ended last would number the steps after a
   failed ``gather`` by timing.

The other durable operations take their position from the same path:

- durable waits (``wait``, with ``waits.py``): a wait takes a position from
  ``open_step`` like a step (at call time too), is replayed from its record or
  written as its own kind of ``IntentWrite`` through ``write``; answered
  resolved, the record is its value; answered parked, the attempt is over:
  ``park`` stops it (reason ``PARKED``) and cancels its task, and nothing more
  is written for it (steps still running then are refused as stale).
- child intents (``start_children``, with ``children.py``): a start takes a
  position, is one ``StartChildrenWrite`` whose record names the children
  (the same ones in every attempt), and a gather or first is an AGENT wait
  (``wait_at``) whose record carries the children's outcomes.

Streams (``emit``, with ``emitter.py``): a chunk takes the position of the
step whose function emits it (``current_step``), else the next position
(``_next_position``); none is taken for it. The attempt's ``Emitter`` buffers
the chunks and sends them through ``write`` (one ``EmitWrite`` in flight,
``seq`` 1, 2, 3...); every record and end (``FLUSHING_OPS``) first waits for
the chunks emitted before it, and a position handed back is superseded when
chunks were emitted at it. Stopping drops the buffer.

Nested steps are refused: a step (or wait) called while a step function of
this attempt runs, from inside it (``current_step``, a context variable, is
set while a step function or a ``step_scope`` body runs). On replay a recorded
step's function does not run, so the steps inside it would not be called and
every position after them would shift: the replay would diverge exactly when
it worked. Concurrency goes beside a step, not inside it.

Threads: the engine lives on the agent's event loop. A ``def`` handler's
thread calls the synchronous methods (``open_step``, ``check_live``) directly
and runs the coroutines through ``blocking``, the one bridge onto the loop;
the positions are kept under a lock, since plans opened in that thread close
on the loop (``SyncContext.parallel``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import grpc

from intentd.core.backoff import Backoff
from intentd.core.codes import RETRY_WRITE_CODES
from intentd.core.limits import MAX_PROGRESS_MESSAGE_LEN, MAX_STEP_NAME_LEN, MAX_WAIT_HOLD_MS
from intentd.core.observability import tracing
from intentd.core.waits import RESERVED_PREFIX
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, intent_pb2

from .emitter import Emitter
from .errors import LeaseLost, StepDivergence, WriteError, WriteRefused
from .session import SidecarSession, method_of

if TYPE_CHECKING:
    from .waits import WaitCall

log = logging.getLogger("intentd.agent")

T = TypeVar("T")

# Why an attempt stopped (ctx.cancel_reason). The first three come from the
# sidecar's Revocation; LEASE_LOST is also used for a write refused as stale and
# for a dropped sidecar stream; SHUTDOWN when the agent itself stops; PARKED
# when the intent parked on a durable wait (the attempt is over, not failed).
CANCELED = "CANCELED"
TIMED_OUT = "TIMED_OUT"
LEASE_LOST = "LEASE_LOST"
SHUTDOWN = "SHUTDOWN"
PARKED = "PARKED"

# What a handler thread's call answers once the attempt stopped (blocking).
_STOPPED = object()

# Step functions of one attempt running at once by default, and the most an
# agent may allow (Agent(max_steps_in_flight=...)); the others wait with their
# positions taken. Each is a write in flight to the sidecar once it returns,
# and the bound keeps one handler's gather from taking every thread and write
# slot of the agent.
MAX_STEPS_IN_FLIGHT = 16
MAX_STEPS_IN_FLIGHT_LIMIT = 256

# The writes that first flush the attempt's streams (emitter.py): a
# position's chunks commit before its record, and all of them before the end.
FLUSHING_OPS = frozenset({"step", "wait", "start_children", "complete", "fail"})

# The plan whose step function (or step_scope body) runs in this context:
# a step called there would nest (refused, see the module docstring).
current_step: contextvars.ContextVar[StepPlan | None] = contextvars.ContextVar("intentd_current_step", default=None)


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


class StepPlan:
    """One position of the attempt, from ``open_step`` until it is closed.

    ``replayed``: an earlier attempt recorded it and ``value`` is that result;
    ``known`` is False until the replay plan says whether it was recorded
    (``Attempt.fetch``). ``alone``: nothing else was open when it was taken
    (and it loses that as soon as another position is taken while it is open):
    only such a plan's unrecorded position is handed back.
    """

    __slots__ = ("_attempt", "alone", "done", "index", "known", "name", "replayed", "span", "value")

    def __init__(self, attempt: Attempt, index: int, name: str, alone: bool) -> None:
        self._attempt = attempt
        self.index = index
        self.name = name
        self.alone = alone
        self.known = False
        self.replayed = False
        self.done = False  # replayed or recorded: the position is used up
        self.value: Any = None
        self.span: tracing.SpanHandle | None = None

    def __enter__(self) -> StepPlan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.close(exc)

    @property
    def attempt(self) -> Attempt:
        return self._attempt

    def begin(self) -> None:
        """Starts the plan's span, in the context the step runs in (its
        task, or the handler's thread) and which also closes it: a child of
        the handler's span, current while the step runs, so the step
        function's own spans nest under it. Concurrent steps each get theirs
        in their own task; again, does nothing."""
        if self.span is not None:
            return
        attempt = self._attempt
        self.span = tracing.start_span("intentd.step", attributes={
            "intentd.intent_id": attempt.intent_id,
            "intentd.attempt": attempt.number,
            "intentd.step.index": self.index,
            "intentd.step.name": self.name,
            "intentd.step.replayed": self.replayed if self.known else None,
        })

    def close(self, error: BaseException | None = None) -> None:
        """Ends the plan (``error``: what ended it, for its span); again, does nothing."""
        self._attempt._close(self, error)


class Attempt:
    """One attempt at an intent: its lease, task, stop state, replay plan and writes.

    The package's interface (runtime.py, session.py, context.py):

    - ``start(run)``: runs the attempt's coroutine as its task (``task``).
    - ``stop(reason, message)``: the attempt may write no more (``stopped``,
      ``stop_reason``); first reason wins.
    - ``revoke(reason, message)``: ``stop``, and cancels the task.
    - ``finish()``: the agent is done with the attempt; its context is unusable.
    - ``check_live()``: raises ``LeaseLost`` once stopped.
    - ``open_step(name)`` / ``fetch(plan)`` / ``commit(plan, value)``: a step's
      position, its replay, its record (see the module docstring);
      ``run_step(plan, call)`` all of a step after its position: replay or
      run under the bound, record, close.
    - ``wait(call)``: a durable wait at the next position (replayed, resolved
      or parked); ``open_wait(call)`` + ``wait_at(plan, call)`` the same with
      the position taken at call time; ``park(message)``: the attempt parked.
    - ``start_children(plan, specs)``: starts child intents at a position taken.
    - ``write(write, what)``: one fenced write, retried through outages.
    - ``streams``: the ``Emitter`` of ``ctx.emit``; ``emit_position()`` a chunk's position.
    - ``save_checkpoint(state)``, ``report_progress(message, fraction)``,
      ``complete(result)``, ``fail(code, message, retryable)``: the other writes.
    - ``blocking(coro)``: runs one of these from a handler thread.
    """

    def __init__(
        self,
        assignment: delivery_pb2.Assignment,
        session: SidecarSession[Any],
        *,
        loop: asyncio.AbstractEventLoop,
        write_backoff: Backoff,
        write_timeout: float | None,
        max_steps_in_flight: int = MAX_STEPS_IN_FLIGHT,
    ) -> None:
        intent = assignment.intent
        self.assignment = assignment
        self.intent: intent_pb2.Intent = intent
        self.lease: delivery_pb2.Lease = assignment.lease
        self.intent_id: str = assignment.lease.intent_id or intent.id
        self.number: int = assignment.lease.attempt
        self.deadline: datetime | None = (
            intent.deadline.ToDatetime(tzinfo=UTC) if intent.HasField("deadline") else None
        )
        self.heartbeat_timeout: timedelta | None = (
            timedelta(milliseconds=assignment.heartbeat_timeout_ms)
            if assignment.heartbeat_timeout_ms > 0
            else None
        )
        self.labels: dict[str, str] = dict(intent.labels)
        # The decoded payload (also the handler's second argument); set by the agent.
        self.payload: Any = None
        self.log_prefix = f"intent {self.intent_id} attempt {self.number}"
        self.task: asyncio.Task[None] | None = None
        # The records of earlier attempts, by position: those the assignment
        # carried; the others are asked for one by one as the replay reaches
        # them (fetch), and each is dropped once replayed, so a large history
        # never sits in memory whole.
        self.records: dict[int, intent_pb2.StepRecord] = {s.index: s for s in assignment.steps}
        # The highest position earlier attempts recorded: above it nothing
        # is; at or below it a position may be a hole (concurrent steps that
        # did not finish), answered "not recorded" when fetched.
        self.recorded_steps: int = max([assignment.recorded_steps, *self.records])
        # The first page of the history is every record from position 1 up
        # to its last one (pages are cut after a step, never between): a
        # position up to there that the page lacks is a hole, known without
        # asking the sidecar.
        self._paged_to = max(self.records, default=0)
        self.replayed_steps = 0
        self.steps_completed = 0
        self.last_checkpoint: Any = decode_json(assignment.checkpoint)
        self._progress_fraction = intent.checkpoint.progress_fraction
        self._next_position = 1
        self._open: dict[int, StepPlan] = {}
        # Opens happen in a def handler's thread, closes on the loop.
        self._positions = threading.Lock()
        self.max_steps_in_flight = max_steps_in_flight
        self._slots = asyncio.Semaphore(max_steps_in_flight)
        self._divergence: StepDivergence | None = None
        self._stop_reason: str | None = None
        self._stop_message = ""
        self._finished = False
        self._session = session
        self._loop = loop
        self._write_backoff = write_backoff
        self._write_timeout = write_timeout
        # A wait's write may be held by the control plane for the intent
        # type's hold window before it is answered.
        self._wait_timeout = None if write_timeout is None else write_timeout + MAX_WAIT_HOLD_MS / 1000
        # The futures of coroutines a handler thread waits on (blocking):
        # stopping cancels them so that the thread gets LeaseLost at once.
        self._pending_lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        # ctx.emit's buffer and sender.
        self.streams = Emitter(self, encode_json)

    # -- lifecycle -------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """True once the attempt may write no more (see ``stop``)."""
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the attempt stopped (``CANCELED``, ``TIMED_OUT``, ``LEASE_LOST``, ``SHUTDOWN``,
        ``PARKED``); None while live."""
        return self._stop_reason

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The agent's event loop, where the attempt's tasks and futures live."""
        return self._loop

    @property
    def divergence(self) -> StepDivergence | None:
        """Set once the handler called a step under another name than was recorded:
        the intent then fails with it, whatever the handler did next."""
        return self._divergence

    def start(self, run: Coroutine[Any, Any, None]) -> None:
        self.task = asyncio.create_task(run, name=f"intentd-agent {self.log_prefix}")

    def stop(self, reason: str, message: str = "") -> bool:
        """Marks the attempt stopped (first reason wins) and cancels what a
        handler thread waits on. Loop thread only. Returns whether this call
        stopped it."""
        if self._stop_reason is not None:
            return False
        self._stop_reason = reason
        self._stop_message = message
        self.streams.drop()
        with self._pending_lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()
        return True

    def revoke(self, reason: str, message: str = "") -> bool:
        """``stop``, and cancels the handler's task; returns whether this call stopped it."""
        if not self.stop(reason, message):
            return False
        if self.task is not None:
            self.task.cancel()
        return True

    def park(self, message: str) -> None:
        """The intent parked on a wait: the lease is gone, the attempt over.
        Stops it and cancels its task (an ``async def`` handler ends at its
        await; a ``def`` handler's blocking call raises ``LeaseLost``, and the
        slot is free even if that thread goes on). Called by the session as
        soon as the answer arrives, and by ``wait`` when it reads it (then,
        in the task itself, ``LeaseLost`` ends the handler instead)."""
        if self.stop(PARKED, message) and self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def finish(self) -> None:
        self._finished = True
        self.streams.drop()

    def check_live(self) -> None:
        if self._stop_reason is not None:
            raise LeaseLost(self._stop_reason, self._stop_message)
        if self._finished:
            raise RuntimeError(f"{self.log_prefix} is over; this context can no longer be used")

    # -- positions and the replay plan -----------------------------------------

    def open_step(self, name: str, *, wait: bool = False) -> StepPlan:
        """Takes the next position for a step called ``name`` (``wait``: the
        record name of a wait) and resolves it from the replay plan when the
        record is at hand (else ``plan.known`` is False: ``fetch`` it). Close
        the plan when done (``run_step`` does; or use it as a context
        manager). Synchronous: the position is the call's, whenever it runs."""
        self.check_live()
        if self._divergence is not None:
            raise self._divergence
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_STEP_NAME_LEN:
            raise ValueError(f"step names are 1 to {MAX_STEP_NAME_LEN} characters, got {name!r}")
        if name.startswith(RESERVED_PREFIX) != wait:
            # The control plane refuses them too: they are the records of waits.
            raise ValueError(f"step names starting with {RESERVED_PREFIX!r} are reserved for waits, got {name!r}")
        outer = current_step.get()
        if outer is not None and outer.attempt is self:
            raise RuntimeError(
                f"step {name!r} was called inside step {outer.index} {outer.name!r}; steps cannot nest: "
                "a replay returns the outer step's recorded result without running its function, so the "
                "steps inside it would not be called and every later position would shift. Run steps "
                "beside each other instead (asyncio.gather of ctx.step calls, or ctx.parallel)"
            )
        with self._positions:
            plan = StepPlan(self, self._next_position, name, alone=not self._open)
            if plan.index > self.recorded_steps or plan.index in self.records or plan.index <= self._paged_to:
                self._resolve(plan, self.records.get(plan.index))
            self._next_position += 1
            for other in self._open.values():
                other.alone = False
            self._open[plan.index] = plan
        return plan

    async def fetch(self, plan: StepPlan) -> None:
        """Resolves a plan whose record an earlier attempt may have written
        but the assignment did not carry: the sidecar fetches it. "Not
        recorded" is an answer: a hole, which runs. A plan it could not
        resolve is closed."""
        try:
            record = await self._retrying(
                lambda: self._session.recorded_step(self.lease, plan.index, "", self._write_timeout),
                "BeginStep", f"the record of step {plan.index}",
            )
            self._resolve(plan, record)
        except BaseException as exc:
            plan.close(exc)
            raise

    def _resolve(self, plan: StepPlan, record: intent_pb2.StepRecord | None) -> None:
        if record is not None:
            if record.name != plan.name:
                self._diverge(plan, record.name)
            plan.replayed = plan.done = True
            plan.value = decode_json(record.result)
            self.records.pop(plan.index, None)
            self.replayed_steps += 1
            self.steps_completed += 1
            log.debug("%s: step %d %r replayed", self.log_prefix, plan.index, plan.name)
        plan.known = True
        if plan.span is not None:
            plan.span.set_attribute("intentd.step.replayed", plan.replayed)

    def _diverge(self, plan: StepPlan, recorded: str) -> NoReturn:
        """The handler called ``plan`` where ``recorded`` is recorded: the
        intent fails with it, whatever the handler does next."""
        self._divergence = StepDivergence(plan.index, recorded, plan.name)
        log.error("%s: %s", self.log_prefix, self._divergence.message)
        raise self._divergence

    def _close(self, plan: StepPlan, error: BaseException | None) -> None:
        with self._positions:
            if self._open.get(plan.index) is not plan:
                return  # closed already
            del self._open[plan.index]
            if not plan.done and plan.alone and self._next_position == plan.index + 1:
                # Not recorded and it ran alone: the next call takes this position again.
                self._next_position = plan.index
                # Its chunks so far are superseded by the ones the next run emits
                # (queued before any of those: the next run starts after this).
                self.streams.supersede(plan.index)
        if plan.span is not None:
            plan.span.end(error)

    def emit_position(self) -> int | None:
        """The position of a chunk emitted now: the step whose function (or
        step_scope body) runs in this context, else the next position the
        handler will take; None inside a replayed step (its chunks were
        emitted when it ran)."""
        plan = current_step.get()
        if plan is not None and plan.attempt is self:
            return None if plan.replayed else plan.index
        return self._next_position

    async def run_step(self, plan: StepPlan, call: Callable[[], Awaitable[Any]]) -> Any:
        """Everything of a step after ``open_step``: its replay, or ``call()``
        (the step function) under the attempt's bound and its record; closes
        the plan. Run it in the context the step belongs to (``ctx.step``'s
        coroutine, a task of a ``gather``)."""
        try:
            plan.begin()
            if not plan.known:
                await self.fetch(plan)
            if plan.replayed:
                value = plan.value
            else:
                async with self._slots:
                    self.check_live()
                    token = current_step.set(plan)
                    try:
                        result = await call()
                    finally:
                        current_step.reset(token)
                value = await self.commit(plan, result)
        except BaseException as exc:
            plan.close(exc)
            raise
        plan.close()
        return value

    def step(self, name: str, call: Callable[[], Awaitable[Any]]) -> Coroutine[Any, Any, Any]:
        """A step at the next position, taken now; the coroutine replays or
        runs it (``run_step``)."""
        return self.run_step(self.open_step(name), call)

    async def commit(self, plan: StepPlan, value: Any) -> Any:
        """Records what a step returned; returns it as replays will see it."""
        data = encode_json(value, f"the result of step {plan.index} {plan.name!r}")
        response = await self.write(
            delivery_pb2.IntentWrite(
                lease=self.lease, step=delivery_pb2.StepWrite(index=plan.index, name=plan.name, result=data)),
            f"step {plan.index} {plan.name!r}",
        )
        plan.done = True
        self.steps_completed += 1
        log.debug("%s: step %d %r recorded", self.log_prefix, plan.index, plan.name)
        # The stored record is the answer (a retried write gets the first one back).
        return decode_json(response.step.result or data)

    # -- durable waits -----------------------------------------------------------

    async def wait(self, call: WaitCall) -> Any:
        """A durable wait at the next position: its recorded value when an
        earlier attempt (or the control plane, at once) resolved it; raises
        ``LeaseLost(PARKED)`` when the intent parked on it. The position is
        taken when this coroutine starts; ``open_wait`` takes it at once."""
        return await self.wait_at(self.open_wait(call), call)

    def open_wait(self, call: WaitCall) -> StepPlan:
        """The position of a wait, taken now (``wait_at`` reaches it)."""
        return self.open_step(call.record_name, wait=True)

    async def wait_at(self, plan: StepPlan, call: WaitCall) -> Any:
        """The wait of ``open_wait``: replayed, resolved or parked; closes the plan."""
        with plan:
            plan.begin()
            if not plan.known:
                await self.fetch(plan)
            record = plan.value if plan.replayed else await self._reach(plan, call)
            return call.value(record, plan.index)

    async def _reach(self, plan: StepPlan, call: WaitCall) -> Any:
        write = delivery_pb2.IntentWrite(lease=self.lease, wait=call.write)
        write.wait.index = plan.index
        write.wait.step_name = plan.name
        what = f"wait {plan.index} {plan.name!r}"
        response = await self.write(write, what, timeout=self._wait_timeout)
        if response.wait.parked:
            self.park(f"the intent parked on {what}")
            log.info("%s: parked on %s; the attempt is over", self.log_prefix, what)
            self.check_live()
        record = response.wait.step
        if record.name and record.name != plan.name:
            self._diverge(plan, record.name)
        plan.done = True
        self.steps_completed += 1
        log.debug("%s: %s resolved", self.log_prefix, what)
        return decode_json(record.result)

    # -- child intents (children.py) ----------------------------------------------

    async def start_children(self, plan: StepPlan, children: Sequence[delivery_pb2.ChildSpec]) -> Any:
        """Starts ``children`` at ``plan``'s position (taken, known, not
        replayed): one write, the children and the record committed together.
        Returns the decoded record, the first one for a repeat (nothing is
        started twice)."""
        write = delivery_pb2.IntentWrite(lease=self.lease, start_children=delivery_pb2.StartChildrenWrite(
            index=plan.index, step_name=plan.name, children=children))
        what = f"start {plan.index} {plan.name!r}"
        response = await self.write(write, what)
        record = response.step
        if record.name and record.name != plan.name:
            self._diverge(plan, record.name)
        plan.done = True
        self.steps_completed += 1
        log.debug("%s: %s recorded (%d children)", self.log_prefix, what, len(children))
        return decode_json(record.result)

    # -- writes ----------------------------------------------------------------

    async def write(self, write: delivery_pb2.IntentWrite, what: str,
                    timeout: float | None = None) -> agent_service_pb2.WriteResult:
        """One write through the sidecar, answered after the control plane
        committed it (``timeout``: other than the agent's write timeout).
        Retries passing outages; a stale lease stops the attempt. A record or
        an end first waits for the chunks emitted before it (FLUSHING_OPS)."""
        if write.WhichOneof("op") in FLUSHING_OPS:
            await self.streams.flush()
        limit = self._write_timeout if timeout is None else timeout
        return await self._retrying(lambda: self._session.write(write, limit), method_of(write), what)

    async def _retrying(self, send: Callable[[], Awaitable[T]], method: str, what: str) -> T:
        """The retry loop of every call the attempt makes to the sidecar."""
        retry = 0
        while True:
            self.check_live()
            try:
                return await send()
            except WriteRefused as exc:
                code = exc.code
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning(
                        "%s: %s refused as stale (%s); stopping the handler",
                        self.log_prefix, method, exc.details,
                    )
                    self.stop(LEASE_LOST, exc.details)
                    self.check_live()
                if code not in RETRY_WRITE_CODES:
                    raise WriteError(method, code.name, exc.details, exc.retry_after_ms) from None
                delay = self._write_backoff.delay(retry)
                retry += 1
                log.warning(
                    "%s: %s for %s not committed (%s: %s); retry %d in %.2fs",
                    self.log_prefix, method, what, code.name, exc.details, retry, delay,
                )
                await asyncio.sleep(delay)

    async def save_checkpoint(self, state: Any) -> None:
        data = encode_json(state, "the checkpoint state")
        await self.write(
            delivery_pb2.IntentWrite(lease=self.lease, checkpoint=delivery_pb2.CheckpointWrite(state=data)),
            "checkpoint",
        )
        self.last_checkpoint = decode_json(data)

    async def report_progress(self, message: str, fraction: float | None) -> None:
        if fraction is None:
            fraction = self._progress_fraction
        if not isinstance(fraction, int | float) or not math.isfinite(fraction) or not (
            0.0 <= fraction <= 1.0
        ):
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction!r}")
        if len(message) > MAX_PROGRESS_MESSAGE_LEN:
            raise ValueError(f"progress messages are at most {MAX_PROGRESS_MESSAGE_LEN} characters")
        self.check_live()
        await self.write(
            delivery_pb2.IntentWrite(
                lease=self.lease, progress=delivery_pb2.ProgressWrite(message=message, fraction=float(fraction))),
            "progress",
        )
        self._progress_fraction = float(fraction)

    async def complete(self, result: bytes) -> None:
        await self.write(
            delivery_pb2.IntentWrite(lease=self.lease, complete=delivery_pb2.CompleteWrite(result=result)),
            "the result",
        )

    async def fail(self, code: str, message: str, retryable: bool) -> None:
        await self.write(
            delivery_pb2.IntentWrite(
                lease=self.lease,
                fail=delivery_pb2.FailWrite(code=code, message=message, retryable=retryable),
            ),
            "the failure",
        )

    # -- the bridge for handler threads ------------------------------------------

    async def _unless_stopped(self, coro: Coroutine[Any, Any, T]) -> T | object:
        """``coro``, with the LeaseLost of a stopped attempt answered as
        ``_STOPPED``: ``stop`` cancels the thread's future, and an exception
        left in a task behind a cancelled future would never be retrieved
        (asyncio logs each one)."""
        try:
            return await coro
        except LeaseLost:
            if self._stop_reason is None:
                raise
            return _STOPPED

    def blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` on the agent's loop and waits for it, from a handler
        thread; raises ``LeaseLost`` as soon as the attempt stops."""
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
            self.check_live()
        fut = asyncio.run_coroutine_threadsafe(self._unless_stopped(coro), self._loop)
        with self._pending_lock:
            self._pending.add(fut)
        try:
            # The attempt may have stopped between the check and the add.
            if self._stop_reason is not None:
                fut.cancel()
            result = fut.result()
        except concurrent.futures.CancelledError:
            raise LeaseLost(self._stop_reason or LEASE_LOST, self._stop_message) from None
        finally:
            with self._pending_lock:
                self._pending.discard(fut)
        if result is _STOPPED:
            raise LeaseLost(self._stop_reason or LEASE_LOST, self._stop_message)
        return cast(T, result)
