"""The asyncio client: the one implementation of the client's calls (the
blocking client runs it on a private event loop)."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import grpc.aio

from intentd.core.limits import DEFAULT_STREAM
from intentd.generated.v1 import admin_service_pb2 as admin_pb
from intentd.generated.v1 import admin_service_pb2_grpc as admin_grpc
from intentd.generated.v1 import human_task_pb2 as task_pb
from intentd.generated.v1 import human_task_pb2_grpc as task_grpc
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc

from ._common import (
    DEFAULT_TIMEOUT,
    CallTimeout,
    ClientBase,
    HandleBase,
    ListQuery,
    Settings,
    StreamCursor,
    TaskStateFilter,
    WaitLoop,
    WatchCursor,
    batch_request,
    decide_request,
    list_request,
    send_request,
    send_span,
    signal_request,
    task_list_request,
)
from .errors import Unavailable
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
    intent_from_proto,
    intent_type_from_proto,
    page_from_proto,
    signal_result_from_proto,
    step_from_proto,
    stream_info_from_proto,
    task_from_proto,
    task_page_from_proto,
)


class AsyncIntentHandle(HandleBase["AsyncIntentClient"]):
    """One intent, as ``AsyncIntentClient.start`` or ``.handle`` gives it."""

    async def get(self) -> Intent:
        return await self.client.get(self.id)

    async def result(self, timeout: float | None = None) -> Any:
        """Waits until the intent is terminal and returns its result. Raises
        IntentFailed / IntentCanceled / IntentTimedOut for those outcomes and
        WaitTimeout when ``timeout`` seconds pass first."""
        return (await self.client.wait_for(self.id, timeout, raise_on_failure=True)).result

    async def wait(self, timeout: float | None = None, *, raise_on_failure: bool = False) -> Intent:
        return await self.client.wait_for(self.id, timeout, raise_on_failure=raise_on_failure)

    def watch(self, after_seq: int = 0) -> AsyncIterator[Event]:
        return self.client.watch(self.id, after_seq)

    async def cancel(self, reason: str = "") -> Intent:
        return await self.client.cancel(self.id, reason)

    async def retry(self, extra_attempts: int = 0) -> Intent:
        return await self.client.retry(self.id, extra_attempts)

    async def steps(self) -> builtins.list[Step]:
        return await self.client.steps(self.id)

    async def signal(self, name: str, payload: Any = None, *, signal_id: str | None = None) -> SignalResult:
        return await self.client.signal(self.id, name, payload, signal_id=signal_id)

    async def tasks(self, states: TaskStateFilter = None) -> builtins.list[HumanTask]:
        """The intent's human tasks (OPEN ones unless ``states`` says otherwise)."""
        return [t async for t in self.client.iter_tasks(states=states, intent_id=self.id)]

    async def children(self) -> builtins.list[Intent]:
        """The child intents its handler started, in start order."""
        return await self.client.children(self.id)

    def stream(
        self, stream: str = DEFAULT_STREAM, from_offset: int = 0, *, skip_superseded: bool = False
    ) -> AsyncStreamReader:
        return self.client.stream(self.id, stream, from_offset, skip_superseded=skip_superseded)

    async def streams(self) -> builtins.list[StreamInfo]:
        return await self.client.streams(self.id)


class AsyncStreamReader:
    """One stream of an intent, read from an offset: an async iterator of its
    entries (``StreamEntry``), stored ones then live ones, until the intent is
    terminal and every entry was handed out. Then ``intent`` is the final
    intent; ``next_offset`` is always the offset after the last entry handed
    out, the one to resume from.

    On UNAVAILABLE it reconnects (with the client's backoff, the budget
    restored by every entry) and resumes at ``next_offset``: no entry is
    skipped or handed out twice. Other failures raise the matching
    ``ClientError`` (NotFound, PermissionDenied, FailedPrecondition for a
    pruned stream...). Leaving early: ``await reader.aclose()`` or
    ``async with``.
    """

    def __init__(self, client: AsyncIntentClient, cursor: StreamCursor) -> None:
        self._client = client
        self._cursor = cursor
        self._entries: AsyncGenerator[StreamEntry, None] | None = None

    @property
    def intent_id(self) -> str:
        return self._cursor.intent_id

    @property
    def stream(self) -> str:
        return self._cursor.stream

    @property
    def next_offset(self) -> int:
        return self._cursor.next_offset

    @property
    def intent(self) -> Intent | None:
        """The final intent, once the end was reached; None before."""
        return self._cursor.intent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.intent_id!r}, {self.stream!r}, next_offset={self.next_offset})"

    def __aiter__(self) -> AsyncStreamReader:
        return self

    async def __anext__(self) -> StreamEntry:
        if self._entries is None:
            self._entries = self._read()
        return await anext(self._entries)

    async def aclose(self) -> None:
        """Ends the call (if one is open); iterating afterwards ends at once."""
        entries, self._entries = self._entries, _ended()
        if entries is not None:
            await entries.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _read(self) -> AsyncGenerator[StreamEntry, None]:
        cursor = self._cursor
        if cursor.done:
            return
        settings = self._client._settings
        while True:
            call = self._client._stub.StreamIntent(cursor.request(), metadata=settings.call_metadata)
            try:
                async for resp in call:
                    for msg in resp.entries:
                        entry = cursor.accept(msg)
                        if entry is not None:
                            yield entry
                    if cursor.finish(resp):
                        return
                delay = cursor.after_cut()
            except grpc.RpcError as err:
                delay = cursor.after_failure(err)
            finally:
                # Also reached when the caller stops iterating early.
                call.cancel()
            await asyncio.sleep(delay)


async def _ended() -> AsyncGenerator[StreamEntry, None]:
    return
    yield  # an async generator that yields nothing


class AsyncIntentClient(ClientBase):
    """An asyncio client of the IntentService (and the AdminService's intent
    types); the same API as IntentClient with coroutines and async iterators.

    Unary calls are retried on UNAVAILABLE with exponential backoff; every
    other failure is raised as the matching ``ClientError``. The channel is
    opened on first use, so the client may be built outside the event loop
    that will use it.
    """

    def _open(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: Any = None
        self._admin_instance: Any = None
        self._tasks_instance: Any = None
        self._closed = False

    @classmethod
    def _from_settings(cls, settings: Settings) -> AsyncIntentClient:
        client = cls.__new__(cls)
        client._settings = settings
        client._open()
        return client

    def _connect(self) -> grpc.aio.Channel:
        if self._channel is None:
            if self._closed:
                raise RuntimeError("the client is closed")
            s = self._settings
            options = list(s.channel_options)
            if s.credentials is None:
                self._channel = grpc.aio.insecure_channel(s.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(s.target, s.credentials, options=options)
        return self._channel

    @property
    def _stub(self) -> Any:
        if self._stub_instance is None:
            self._stub_instance = pb_grpc.IntentServiceStub(self._connect())
        return self._stub_instance

    @property
    def _admin(self) -> Any:
        if self._admin_instance is None:
            self._admin_instance = admin_grpc.AdminServiceStub(self._connect())
        return self._admin_instance

    @property
    def _tasks(self) -> Any:
        if self._tasks_instance is None:
            self._tasks_instance = task_grpc.HumanTaskServiceStub(self._connect())
        return self._tasks_instance

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel; calls in flight are cancelled after ``grace``."""
        self._closed = True
        channel, self._channel = self._channel, None
        self._stub_instance = self._admin_instance = self._tasks_instance = None
        if channel is not None:
            await channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: Any,
        request: Any,
        call_timeout: CallTimeout = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Any:
        """One unary call, retried on UNAVAILABLE."""
        deadline = self._settings.call_timeout(call_timeout)
        if metadata is None:
            metadata = self._settings.call_metadata
        attempt = 0
        while True:
            try:
                return await method(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as err:
                delay = self._settings.retry.after_failure(err, attempt)
            await asyncio.sleep(delay)
            attempt += 1

    async def send_intent(self, intent: IntentInput | None = None, **fields: Unpack[IntentFields]) -> str:
        """Sends one intent and returns its id: ``intent`` is a dict of the
        keyword names (or an IntentSpec), and keywords given override it."""
        resp = await self._send(intent, fields)
        return resp.intent.id

    async def start(self, intent: IntentInput | None = None, **fields: Unpack[IntentFields]) -> AsyncIntentHandle:
        """Sends one intent and returns its handle (``result()``, ``watch()``,
        ``cancel()`` ...); takes what ``send_intent`` takes."""
        resp = await self._send(intent, fields)
        return AsyncIntentHandle(self, resp.intent.id, created=resp.created)

    def handle(self, intent_id: str) -> AsyncIntentHandle:
        """The handle of an intent sent before (no call is made)."""
        return AsyncIntentHandle(self, intent_id)

    async def send(self, intent: IntentInput | None = None, **fields: Unpack[IntentFields]) -> tuple[Intent, bool]:
        """Sends one intent; returns it and whether this call created it (False
        when an earlier send with the same idempotency key was matched)."""
        resp = await self._send(intent, fields)
        return intent_from_proto(resp.intent), resp.created

    async def _send(self, intent: IntentInput | None, fields: IntentFields) -> pb.SendIntentResponse:
        # send_intent and start need only the id: the hot path converts no
        # Intent model it would throw away.
        request = send_request(intent, fields, self._settings.sender)
        span = send_span(request)
        try:
            resp: pb.SendIntentResponse = await self._call(
                self._stub.SendIntent, request, metadata=self._settings.traced_metadata()
            )
        except BaseException as exc:
            span.end(exc)
            raise
        span.set_attribute("intentd.intent_id", resp.intent.id)
        span.set_attribute("intentd.created", resp.created)
        span.end()
        return resp

    async def send_intents(self, intents: Iterable[IntentInput]) -> builtins.list[str]:
        """Sends a batch, all or nothing; returns the ids in order."""
        request = batch_request(intents, self._settings.sender)
        if not request.intents:
            return []
        span = send_span(request)
        try:
            resp: pb.SendIntentsResponse = await self._call(
                self._stub.SendIntents, request, metadata=self._settings.traced_metadata()
            )
        except BaseException as exc:
            span.end(exc)
            raise
        span.end()
        return [r.intent.id for r in resp.results]

    async def get(self, intent_id: str) -> Intent:
        resp: pb.GetIntentResponse = await self._call(
            self._stub.GetIntent, pb.GetIntentRequest(id=intent_id)
        )
        return intent_from_proto(resp.intent)

    async def wait_for(
        self,
        intent_id: str,
        # The server must know how long to wait, which an asyncio.timeout()
        # around the call cannot tell it; it also keeps the sync signature.
        timeout: float | None = None,
        *,
        raise_on_failure: bool = False,
    ) -> Intent:
        """Waits until the intent is terminal and returns it.

        Raises WaitTimeout when ``timeout`` seconds pass first, and with
        ``raise_on_failure`` IntentFailed / IntentCanceled / IntentTimedOut
        for those outcomes.
        """
        loop = WaitLoop(intent_id, timeout, raise_on_failure)
        while True:
            request, call_timeout = loop.next_call()
            try:
                resp: pb.WaitIntentResponse = await self._call(
                    self._stub.WaitIntent, request, call_timeout=call_timeout
                )
            except Unavailable:
                await asyncio.sleep(loop.outlast_outage(self._settings.retry.max_backoff))
                continue
            final = loop.finish(resp)
            if final is not None:
                return final

    async def watch(self, intent_id: str, after_seq: int = 0) -> AsyncIterator[Event]:
        """The intent's events after ``after_seq``, replayed then live, until
        the server ends the stream after the terminal event. Reconnects on
        UNAVAILABLE and resumes after the last event yielded."""
        cursor = WatchCursor(intent_id, after_seq, self._settings.retry)
        while True:
            call = self._stub.WatchIntent(cursor.request(), metadata=self._settings.call_metadata)
            try:
                async for resp in call:
                    event = cursor.accept(resp)
                    if event is not None:
                        yield event
                return
            except grpc.RpcError as err:
                delay = cursor.after_failure(err)
            finally:
                # Also reached when the caller stops iterating early.
                call.cancel()
            await asyncio.sleep(delay)

    def stream(
        self,
        intent_id: str,
        stream: str = DEFAULT_STREAM,
        from_offset: int = 0,
        *,
        skip_superseded: bool = False,
    ) -> AsyncStreamReader:
        """The entries of the intent's stream ``stream`` from ``from_offset``
        (docs/streams.md): an async iterator of ``StreamEntry``, stored then
        live, ending once the intent is terminal (then the reader's ``intent``
        is set). ``skip_superseded`` leaves out chunks that a marker already
        sent supersedes (markers are always handed out). No call is made until
        the first entry is asked for."""
        cursor = StreamCursor(intent_id, stream, from_offset, skip_superseded, self._settings.retry)
        return AsyncStreamReader(self, cursor)

    async def streams(self, intent_id: str) -> builtins.list[StreamInfo]:
        """The intent's streams, by name (at most 16)."""
        resp: pb.ListIntentStreamsResponse = await self._call(
            self._stub.ListIntentStreams, pb.ListIntentStreamsRequest(id=intent_id)
        )
        return [stream_info_from_proto(s) for s in resp.streams]

    async def cancel(self, intent_id: str, reason: str = "") -> Intent:
        resp: pb.CancelIntentResponse = await self._call(
            self._stub.CancelIntent, pb.CancelIntentRequest(id=intent_id, reason=reason)
        )
        return intent_from_proto(resp.intent)

    async def list(self, **query: Unpack[ListQuery]) -> Page:
        """One page of intents, newest first (with ``parent_id``: that
        intent's children, in the order they were started)."""
        request = list_request(**query)
        resp: pb.ListIntentsResponse = await self._call(self._stub.ListIntents, request)
        return page_from_proto(resp)

    async def iter_intents(self, **query: Unpack[ListQuery]) -> AsyncIterator[Intent]:
        """Every matching intent, newest first (with ``parent_id``: in start
        order), following the pages."""
        request = list_request(**query)
        while True:
            resp: pb.ListIntentsResponse = await self._call(self._stub.ListIntents, request)
            page = page_from_proto(resp)
            for intent in page.intents:
                yield intent
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def children(self, intent_id: str) -> builtins.list[Intent]:
        """Every child intent of ``intent_id`` (docs/children.md), in the order
        its handler started them, following the pages."""
        return [i async for i in self.iter_intents(parent_id=intent_id)]

    async def retry(self, intent_id: str, extra_attempts: int = 0) -> Intent:
        """Puts a FAILED intent back to PENDING, keeping its recorded steps."""
        resp: pb.RetryIntentResponse = await self._call(
            self._stub.RetryIntent,
            pb.RetryIntentRequest(id=intent_id, extra_attempts=extra_attempts),
        )
        return intent_from_proto(resp.intent)

    async def steps(self, intent_id: str) -> builtins.list[Step]:
        """Every recorded step of the intent, in order, following the pages
        (each at most 1 MiB, whatever the history's size)."""
        request = pb.ListIntentStepsRequest(id=intent_id)
        steps: builtins.list[Step] = []
        while True:
            resp: pb.ListIntentStepsResponse = await self._call(self._stub.ListIntentSteps, request)
            steps.extend(step_from_proto(s) for s in resp.steps)
            if not resp.next_page_token:
                return steps
            request.page_token = resp.next_page_token

    # ------------------------------------------------------------ durable waits

    async def signal(
        self, intent_id: str, name: str, payload: Any = None, *, signal_id: str | None = None
    ) -> SignalResult:
        """Sends the signal ``name`` (any JSON-serialisable ``payload``, or bytes
        holding JSON) to a live intent: it satisfies the intent's open wait for
        that name at once (waking it when WAITING), or waits in its inbox for
        the wait that asks for it.

        ``signal_id`` deduplicates: a repeat with the same id is matched
        (``created`` False), never delivered twice. Without one, an id is made
        up once per call, so the call is retried on UNAVAILABLE like every
        unary call and a retry is matched by the server; pass your own id to
        make repeats of your own (a redelivered webhook) safe as well.
        Raises InvalidArgument before any call for a bad name or id,
        FailedPrecondition when the intent is terminal, NotFound."""
        request = signal_request(intent_id, name, payload, signal_id)
        resp: pb.SignalIntentResponse = await self._call(self._stub.SignalIntent, request)
        return signal_result_from_proto(resp)

    async def list_tasks(
        self,
        *,
        states: TaskStateFilter = None,
        assignee: str | None = None,
        intent_type: str | None = None,
        intent_id: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
    ) -> HumanTaskPage:
        """One page of human tasks, newest first. ``states`` (HumanTaskState
        members or names) defaults to OPEN on the server; ``assignee`` keeps
        the tasks that key name may decide (tasks without assignees too)."""
        request = task_list_request(states=states, assignee=assignee, intent_type=intent_type,
                                    intent_id=intent_id, page_size=page_size, page_token=page_token)
        resp: task_pb.ListHumanTasksResponse = await self._call(self._tasks.ListHumanTasks, request)
        return task_page_from_proto(resp)

    async def iter_tasks(
        self,
        *,
        states: TaskStateFilter = None,
        assignee: str | None = None,
        intent_type: str | None = None,
        intent_id: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[HumanTask]:
        """Every matching task, newest first, following the pages."""
        request = task_list_request(states=states, assignee=assignee, intent_type=intent_type,
                                    intent_id=intent_id, page_size=page_size)
        while True:
            resp: task_pb.ListHumanTasksResponse = await self._call(self._tasks.ListHumanTasks, request)
            page = task_page_from_proto(resp)
            for task in page.tasks:
                yield task
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def get_task(self, task_id: str) -> HumanTask:
        resp: task_pb.GetHumanTaskResponse = await self._call(
            self._tasks.GetHumanTask, task_pb.GetHumanTaskRequest(id=task_id)
        )
        return task_from_proto(resp.task)

    async def decide_task(
        self, task_id: str, outcome: str, *, comment: str = "", form_data: Any = None
    ) -> HumanTask:
        """Decides an OPEN task with one of its outcomes; the wait that asked
        returns the decision and the intent wakes. ``form_data`` (JSON) is
        checked against the task's form schema. Retried on UNAVAILABLE: the
        server answers a repeat of the decision that closed the task, by the
        same key, with the task unchanged. Raises InvalidArgument (an outcome
        not allowed, form data the schema refuses), PermissionDenied (not an
        assignee), FailedPrecondition (the task is no longer open)."""
        request = decide_request(task_id, outcome, comment, form_data)
        resp: task_pb.DecideHumanTaskResponse = await self._call(self._tasks.DecideHumanTask, request)
        return task_from_proto(resp.task)

    async def approve(self, task_id: str, *, comment: str = "", form_data: Any = None) -> HumanTask:
        """``decide_task(task_id, "approve", ...)``."""
        return await self.decide_task(task_id, "approve", comment=comment, form_data=form_data)

    async def reject(self, task_id: str, *, comment: str = "", form_data: Any = None) -> HumanTask:
        """``decide_task(task_id, "reject", ...)``."""
        return await self.decide_task(task_id, "reject", comment=comment, form_data=form_data)

    # ------------------------------------------------------------ AdminService (role admin)

    async def put_intent_type(self, settings: IntentType) -> IntentType:
        """Creates or replaces an intent type's delivery settings; returns them
        as stored."""
        resp: admin_pb.PutIntentTypeResponse = await self._call(
            self._admin.PutIntentType, admin_pb.PutIntentTypeRequest(intent_type=settings.to_proto())
        )
        return intent_type_from_proto(resp.intent_type)

    async def get_intent_type(self, intent_type: str) -> IntentType:
        resp: admin_pb.GetIntentTypeResponse = await self._call(
            self._admin.GetIntentType, admin_pb.GetIntentTypeRequest(intent_type=intent_type)
        )
        return intent_type_from_proto(resp.intent_type)

    async def list_intent_types(self) -> builtins.list[IntentType]:
        resp: admin_pb.ListIntentTypesResponse = await self._call(
            self._admin.ListIntentTypes, admin_pb.ListIntentTypesRequest()
        )
        return [intent_type_from_proto(t) for t in resp.intent_types]
