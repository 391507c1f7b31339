"""The blocking client."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

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


class IntentClient:
    """A blocking client of the IntentService.

    Unary calls are retried on UNAVAILABLE with exponential backoff; every
    other failure is raised as the matching ``IntentdError``. Thread-safe, as
    the gRPC channel beneath it is.
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
        s = self._settings
        options = list(s.channel_options)
        if s.credentials is None:
            self._channel: grpc.Channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, s.credentials, options=options)
        self._stub = pb_grpc.IntentServiceStub(self._channel)

    @property
    def target(self) -> str:
        return self._settings.target

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
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
                return method(request, timeout=deadline, metadata=metadata)
            except grpc.RpcError as err:
                delay = self._settings.retry.after_failure(err, attempt)
            time.sleep(delay)
            attempt += 1

    def send_intent(self, intent: IntentInput | None = None, **kw: Any) -> str:
        """Sends one intent and returns its id. Takes what ``build_spec`` takes."""
        created, _ = self.send(intent, **kw)
        return created.id

    def send(self, intent: IntentInput | None = None, **kw: Any) -> tuple[Intent, bool]:
        """Sends one intent; returns it and whether this call created it (False
        when an earlier send with the same idempotency key was matched)."""
        request = send_request(intent, kw, self._settings.sender)
        span = send_span(request)
        try:
            resp: pb.SendIntentResponse = self._call(
                self._stub.SendIntent, request, metadata=self._settings.traced_metadata()
            )
        except BaseException as exc:
            span.end(exc)
            raise
        span.set_attribute("intentd.intent_id", resp.intent.id)
        span.set_attribute("intentd.created", resp.created)
        span.end()
        return intent_from_proto(resp.intent), resp.created

    def send_intents(self, intents: Iterable[IntentInput]) -> builtins.list[str]:
        """Sends a batch, all or nothing; returns the ids in order."""
        request = batch_request(intents, self._settings.sender)
        if not request.intents:
            return []
        span = send_span(request)
        try:
            resp: pb.SendIntentsResponse = self._call(
                self._stub.SendIntents, request, metadata=self._settings.traced_metadata()
            )
        except BaseException as exc:
            span.end(exc)
            raise
        span.end()
        return [r.intent.id for r in resp.results]

    def get(self, intent_id: str) -> Intent:
        resp: pb.GetIntentResponse = self._call(
            self._stub.GetIntent, pb.GetIntentRequest(id=intent_id)
        )
        return intent_from_proto(resp.intent)

    def wait_for(
        self, intent_id: str, timeout: float | None = None, *, raise_on_failure: bool = False
    ) -> Intent:
        """Blocks until the intent is terminal and returns it.

        Raises WaitTimeout when ``timeout`` seconds pass first, and with
        ``raise_on_failure`` IntentFailed / IntentCanceled / IntentTimedOut
        for those outcomes.
        """
        loop = WaitLoop(intent_id, timeout, raise_on_failure)
        while True:
            request, call_timeout = loop.next_call()
            try:
                resp: pb.WaitIntentResponse = self._call(
                    self._stub.WaitIntent, request, call_timeout=call_timeout
                )
            except Unavailable:
                time.sleep(loop.outlast_outage(self._settings.retry.max_backoff))
                continue
            final = loop.finish(resp)
            if final is not None:
                return final

    def watch(self, intent_id: str, after_seq: int = 0) -> Iterator[Event]:
        """The intent's events after ``after_seq``, replayed then live, until
        the server ends the stream after the terminal event. Reconnects on
        UNAVAILABLE and resumes after the last event yielded."""
        cursor = WatchCursor(intent_id, after_seq, self._settings.retry)
        while True:
            call = self._stub.WatchIntent(
                cursor.request(), metadata=self._settings.call_metadata
            )
            try:
                for resp in call:
                    event = cursor.accept(resp)
                    if event is not None:
                        yield event
                return
            except grpc.RpcError as err:
                delay = cursor.after_failure(err)
            finally:
                # Also reached when the caller stops iterating early.
                call.cancel()
            time.sleep(delay)

    def cancel(self, intent_id: str, reason: str = "") -> Intent:
        resp: pb.CancelIntentResponse = self._call(
            self._stub.CancelIntent, pb.CancelIntentRequest(id=intent_id, reason=reason)
        )
        return intent_from_proto(resp.intent)

    def list(
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
        resp: pb.ListIntentsResponse = self._call(self._stub.ListIntents, request)
        return page_from_proto(resp)

    def iter_intents(
        self,
        *,
        states: StateFilter = None,
        intent_type: str | None = None,
        to_agent: str | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> Iterator[Intent]:
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
            resp: pb.ListIntentsResponse = self._call(self._stub.ListIntents, request)
            page = page_from_proto(resp)
            yield from page.intents
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def retry(self, intent_id: str, extra_attempts: int = 0) -> Intent:
        """Puts a FAILED intent back to PENDING, keeping its recorded steps."""
        resp: pb.RetryIntentResponse = self._call(
            self._stub.RetryIntent,
            pb.RetryIntentRequest(id=intent_id, extra_attempts=extra_attempts),
        )
        return intent_from_proto(resp.intent)

    def steps(self, intent_id: str) -> builtins.list[Step]:
        """Every recorded step of the intent, in order, following the pages
        (each at most 1 MiB, whatever the history's size)."""
        request = pb.ListIntentStepsRequest(id=intent_id)
        steps: builtins.list[Step] = []
        while True:
            resp: pb.ListIntentStepsResponse = self._call(self._stub.ListIntentSteps, request)
            steps.extend(step_from_proto(s) for s in resp.steps)
            if not resp.next_page_token:
                return steps
            request.page_token = resp.next_page_token
