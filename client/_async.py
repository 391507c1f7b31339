"""The asyncio client."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc

from ._common import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    CallTimeout,
    ChannelOptions,
    Settings,
    StateFilter,
    WaitLoop,
    WatchCursor,
    batch_request,
    list_request,
    send_request,
    send_span,
)
from .errors import Unavailable
from .models import (
    Event,
    Intent,
    IntentInput,
    Page,
    Step,
    intent_from_proto,
    page_from_proto,
    step_from_proto,
)


class AsyncIntentClient:
    """An asyncio client of the IntentService; the same API as IntentClient
    with coroutines and async iterators.

    The channel is opened on first use, so the client may be built outside the
    event loop that will use it.
    """

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
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
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
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: Any = None
        self._closed = False

    @property
    def target(self) -> str:
        return self._settings.target

    @property
    def _stub(self) -> Any:
        if self._stub_instance is None:
            if self._closed:
                raise RuntimeError("the client is closed")
            s = self._settings
            options = list(s.channel_options)
            if s.credentials is None:
                self._channel = grpc.aio.insecure_channel(s.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(s.target, s.credentials, options=options)
            self._stub_instance = pb_grpc.IntentServiceStub(self._channel)
        return self._stub_instance

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel; calls in flight are cancelled after ``grace``."""
        self._closed = True
        channel, self._channel, self._stub_instance = self._channel, None, None
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

    async def send_intent(self, intent: IntentInput | None = None, **kw: Any) -> str:
        """Sends one intent and returns its id. Takes what ``build_spec`` takes."""
        sent, _ = await self.send(intent, **kw)
        return sent.id

    async def send(self, intent: IntentInput | None = None, **kw: Any) -> tuple[Intent, bool]:
        """Sends one intent; returns it and whether this call created it (False
        when an earlier send with the same idempotency key was matched)."""
        request = send_request(intent, kw, self._settings.sender)
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
        return intent_from_proto(resp.intent), resp.created

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

    async def cancel(self, intent_id: str, reason: str = "") -> Intent:
        resp: pb.CancelIntentResponse = await self._call(
            self._stub.CancelIntent, pb.CancelIntentRequest(id=intent_id, reason=reason)
        )
        return intent_from_proto(resp.intent)

    async def list(
        self,
        *,
        states: StateFilter = None,
        intent_type: str | None = None,
        to_agent: str | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page:
        """One page of intents, newest first."""
        request = list_request(
            states=states,
            intent_type=intent_type,
            to_agent=to_agent,
            labels=labels,
            page_size=page_size,
            page_token=page_token,
        )
        resp: pb.ListIntentsResponse = await self._call(self._stub.ListIntents, request)
        return page_from_proto(resp)

    async def iter_intents(
        self,
        *,
        states: StateFilter = None,
        intent_type: str | None = None,
        to_agent: str | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> AsyncIterator[Intent]:
        """Every matching intent, newest first, following the pages."""
        request = list_request(
            states=states,
            intent_type=intent_type,
            to_agent=to_agent,
            labels=labels,
            page_size=page_size,
            page_token=page_token,
        )
        while True:
            resp: pb.ListIntentsResponse = await self._call(self._stub.ListIntents, request)
            page = page_from_proto(resp)
            for intent in page.intents:
                yield intent
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

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
