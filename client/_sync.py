"""The blocking client: the asyncio client, run on a private event loop thread."""

from __future__ import annotations

import builtins
import weakref
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from intentd.core.limits import DEFAULT_STREAM

from ._async import AsyncIntentClient, AsyncStreamReader
from ._common import ClientBase, HandleBase, ListQuery, TaskStateFilter
from ._loop import LoopThread
from .models import (
    Event,
    HumanTask,
    HumanTaskPage,
    Intent,
    IntentFields,
    IntentInput,
    IntentType,
    Page,
    SignalResult,
    Step,
    StreamEntry,
    StreamInfo,
)

T = TypeVar("T")


class IntentHandle(HandleBase["IntentClient"]):
    """One intent, as ``IntentClient.start`` or ``.handle`` gives it."""

    def get(self) -> Intent:
        return self.client.get(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Blocks until the intent is terminal and returns its result. Raises
        IntentFailed / IntentCanceled / IntentTimedOut for those outcomes and
        WaitTimeout when ``timeout`` seconds pass first."""
        return self.client.wait_for(self.id, timeout, raise_on_failure=True).result

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = False) -> Intent:
        return self.client.wait_for(self.id, timeout, raise_on_failure=raise_on_failure)

    def watch(self, after_seq: int = 0) -> Iterator[Event]:
        return self.client.watch(self.id, after_seq)

    def cancel(self, reason: str = "") -> Intent:
        return self.client.cancel(self.id, reason)

    def retry(self, extra_attempts: int = 0) -> Intent:
        return self.client.retry(self.id, extra_attempts)

    def steps(self) -> builtins.list[Step]:
        return self.client.steps(self.id)

    def signal(self, name: str, payload: Any = None, *, signal_id: str | None = None) -> SignalResult:
        return self.client.signal(self.id, name, payload, signal_id=signal_id)

    def tasks(self, states: TaskStateFilter = None) -> builtins.list[HumanTask]:
        """The intent's human tasks (OPEN ones unless ``states`` says otherwise)."""
        return builtins.list(self.client.iter_tasks(states=states, intent_id=self.id))

    def children(self) -> builtins.list[Intent]:
        """The child intents its handler started, in start order."""
        return self.client.children(self.id)

    def stream(
        self, stream: str = DEFAULT_STREAM, from_offset: int = 0, *, skip_superseded: bool = False
    ) -> StreamReader:
        return self.client.stream(self.id, stream, from_offset, skip_superseded=skip_superseded)

    def streams(self) -> builtins.list[StreamInfo]:
        return self.client.streams(self.id)


class StreamReader:
    """One stream of an intent, read from an offset: an iterator of its
    entries (``StreamEntry``), stored ones then live ones, until the intent is
    terminal and every entry was handed out. Then ``intent`` is the final
    intent; ``next_offset`` is always the offset after the last entry handed
    out, the one to resume from.

    On UNAVAILABLE it reconnects (with the client's backoff, the budget
    restored by every entry) and resumes at ``next_offset``: no entry is
    skipped or handed out twice. Other failures raise the matching
    ``ClientError`` (NotFound, PermissionDenied, FailedPrecondition for a
    pruned stream...). Leaving early: ``reader.close()`` or ``with``.
    """

    def __init__(self, client: IntentClient, reader: AsyncStreamReader) -> None:
        self._reader = reader
        self._entries = client._iterate(reader)

    @property
    def intent_id(self) -> str:
        return self._reader.intent_id

    @property
    def stream(self) -> str:
        return self._reader.stream

    @property
    def next_offset(self) -> int:
        return self._reader.next_offset

    @property
    def intent(self) -> Intent | None:
        """The final intent, once the end was reached; None before."""
        return self._reader.intent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.intent_id!r}, {self.stream!r}, next_offset={self.next_offset})"

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> StreamEntry:
        return next(self._entries)

    def close(self) -> None:
        """Ends the call (if one is open); iterating afterwards ends at once."""
        self._entries.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class IntentClient(ClientBase):
    """A blocking client of the IntentService (and the AdminService's intent
    types).

    Each call runs the matching ``AsyncIntentClient`` call on one event loop
    thread of this client's own (started at the first call, stopped by
    ``close``), so both clients behave alike: unary calls are retried on
    UNAVAILABLE with exponential backoff; every other failure is raised as the
    matching ``ClientError``. Thread-safe: calls from many threads share the
    loop and its channel.
    """

    def _open(self) -> None:
        self._aio = AsyncIntentClient._from_settings(self._settings)
        self._loop = LoopThread(f"intentd-client-{self._settings.target}")
        # Closes the loop thread when the client is collected (or at exit)
        # without close(); the callback holds the loop and the channel, not self.
        self._finalizer = weakref.finalize(self, self._loop.close, self._aio.close)

    def _iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        # A generator of the client's, so the client outlives the iteration.
        yield from self._loop.iterate(items)

    def close(self) -> None:
        """Closes the channel (calls in flight end CANCELLED) and stops the loop thread."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def send_intent(self, intent: IntentInput | None = None, **fields: Unpack[IntentFields]) -> str:
        """Sends one intent and returns its id: ``intent`` is a dict of the
        keyword names (or an IntentSpec), and keywords given override it."""
        return self._loop.run(self._aio.send_intent(intent, **fields))

    def start(self, intent: IntentInput | None = None, **fields: Unpack[IntentFields]) -> IntentHandle:
        """Sends one intent and returns its handle (``result()``, ``watch()``,
        ``cancel()`` ...); takes what ``send_intent`` takes."""
        sent, created = self.send(intent, **fields)
        return IntentHandle(self, sent.id, created=created)

    def handle(self, intent_id: str) -> IntentHandle:
        """The handle of an intent sent before (no call is made)."""
        return IntentHandle(self, intent_id)

    def send(self, intent: IntentInput | None = None, **fields: Unpack[IntentFields]) -> tuple[Intent, bool]:
        """Sends one intent; returns it and whether this call created it (False
        when an earlier send with the same idempotency key was matched)."""
        return self._loop.run(self._aio.send(intent, **fields))

    def send_intents(self, intents: Iterable[IntentInput]) -> builtins.list[str]:
        """Sends a batch, all or nothing; returns the ids in order."""
        return self._loop.run(self._aio.send_intents(intents))

    def get(self, intent_id: str) -> Intent:
        return self._loop.run(self._aio.get(intent_id))

    def wait_for(self, intent_id: str, timeout: float | None = None, *, raise_on_failure: bool = False) -> Intent:
        """Blocks until the intent is terminal and returns it.

        Raises WaitTimeout when ``timeout`` seconds pass first, and with
        ``raise_on_failure`` IntentFailed / IntentCanceled / IntentTimedOut
        for those outcomes. Rides out an outage of the server for as long as
        ``timeout`` allows.
        """
        return self._loop.run(self._aio.wait_for(intent_id, timeout, raise_on_failure=raise_on_failure))

    def watch(self, intent_id: str, after_seq: int = 0) -> Iterator[Event]:
        """The intent's events after ``after_seq``, replayed then live, until
        the server ends the stream after the terminal event. Reconnects on
        UNAVAILABLE and resumes after the last event yielded."""
        return self._iterate(self._aio.watch(intent_id, after_seq))

    def stream(
        self,
        intent_id: str,
        stream: str = DEFAULT_STREAM,
        from_offset: int = 0,
        *,
        skip_superseded: bool = False,
    ) -> StreamReader:
        """The entries of the intent's stream ``stream`` from ``from_offset``
        (docs/streams.md): an iterator of ``StreamEntry``, stored then live,
        ending once the intent is terminal (then the reader's ``intent`` is
        set). ``skip_superseded`` leaves out chunks that a marker already sent
        supersedes (markers are always handed out). No call is made until the
        first entry is asked for."""
        return StreamReader(self, self._aio.stream(intent_id, stream, from_offset, skip_superseded=skip_superseded))

    def streams(self, intent_id: str) -> builtins.list[StreamInfo]:
        """The intent's streams, by name (at most 16)."""
        return self._loop.run(self._aio.streams(intent_id))

    def cancel(self, intent_id: str, reason: str = "") -> Intent:
        return self._loop.run(self._aio.cancel(intent_id, reason))

    def list(self, **query: Unpack[ListQuery]) -> Page:
        """One page of intents, newest first (with ``parent_id``: that
        intent's children, in the order they were started)."""
        return self._loop.run(self._aio.list(**query))

    def iter_intents(self, **query: Unpack[ListQuery]) -> Iterator[Intent]:
        """Every matching intent, newest first (with ``parent_id``: in start
        order), following the pages."""
        return self._iterate(self._aio.iter_intents(**query))

    def children(self, intent_id: str) -> builtins.list[Intent]:
        """Every child intent of ``intent_id`` (docs/children.md), in the order
        its handler started them, following the pages."""
        return self._loop.run(self._aio.children(intent_id))

    def retry(self, intent_id: str, extra_attempts: int = 0) -> Intent:
        """Puts a FAILED intent back to PENDING, keeping its recorded steps."""
        return self._loop.run(self._aio.retry(intent_id, extra_attempts))

    def steps(self, intent_id: str) -> builtins.list[Step]:
        """Every recorded step of the intent, in order, following the pages."""
        return self._loop.run(self._aio.steps(intent_id))

    def signal(self, intent_id: str, name: str, payload: Any = None, *, signal_id: str | None = None) -> SignalResult:
        """Sends the signal ``name`` with ``payload`` (JSON) to a live intent:
        it satisfies the intent's open wait for that name at once (waking it
        when WAITING), or waits in its inbox for the wait that asks for it.

        ``signal_id`` deduplicates: a repeat with the same id is matched
        (``created`` False), never delivered twice. Without one, an id is made
        up once per call, so the client's retries after UNAVAILABLE are
        matched by the server; pass your own to make your own repeats safe."""
        return self._loop.run(self._aio.signal(intent_id, name, payload, signal_id=signal_id))

    def list_tasks(
        self,
        *,
        states: TaskStateFilter = None,
        assignee: str | None = None,
        intent_type: str | None = None,
        intent_id: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> HumanTaskPage:
        """One page of human tasks, newest first (OPEN ones unless ``states``
        says otherwise)."""
        return self._loop.run(self._aio.list_tasks(
            states=states, assignee=assignee, intent_type=intent_type, intent_id=intent_id,
            page_size=page_size, page_token=page_token))

    def iter_tasks(
        self,
        *,
        states: TaskStateFilter = None,
        assignee: str | None = None,
        intent_type: str | None = None,
        intent_id: str | None = None,
        page_size: int = 100,
    ) -> Iterator[HumanTask]:
        """Every matching task, newest first, following the pages."""
        return self._iterate(self._aio.iter_tasks(
            states=states, assignee=assignee, intent_type=intent_type, intent_id=intent_id, page_size=page_size))

    def get_task(self, task_id: str) -> HumanTask:
        return self._loop.run(self._aio.get_task(task_id))

    def decide_task(self, task_id: str, outcome: str, *, comment: str = "", form_data: Any = None) -> HumanTask:
        """Decides an OPEN task with one of its outcomes; the wait that asked
        returns the decision. Retried on UNAVAILABLE (the server answers a
        repeat of the closing decision, by the same key, unchanged)."""
        return self._loop.run(self._aio.decide_task(task_id, outcome, comment=comment, form_data=form_data))

    def approve(self, task_id: str, *, comment: str = "", form_data: Any = None) -> HumanTask:
        """``decide_task(task_id, "approve", ...)``."""
        return self.decide_task(task_id, "approve", comment=comment, form_data=form_data)

    def reject(self, task_id: str, *, comment: str = "", form_data: Any = None) -> HumanTask:
        """``decide_task(task_id, "reject", ...)``."""
        return self.decide_task(task_id, "reject", comment=comment, form_data=form_data)

    def put_intent_type(self, settings: IntentType) -> IntentType:
        """Creates or replaces an intent type's delivery settings (role admin)."""
        return self._loop.run(self._aio.put_intent_type(settings))

    def get_intent_type(self, intent_type: str) -> IntentType:
        return self._loop.run(self._aio.get_intent_type(intent_type))

    def list_intent_types(self) -> builtins.list[IntentType]:
        return self._loop.run(self._aio.list_intent_types())
