"""The client-facing IntentService."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import grpc

from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_ATTEMPTS_LIMIT, MAX_HORIZON_MS, MAX_REASON_LEN, MAX_SENDER_LEN
from intentd.core.observability import metrics
from intentd.core.observability.tracing import TRACEPARENT_LABEL, traceparent_from_metadata
from intentd.core.states import IntentState
from intentd.core.streams import checked_stream_name
from intentd.core.validation import (
    check_agent_address,
    check_idempotency_key,
    check_intent_type,
    check_labels,
    check_text,
)
from intentd.core.waits import signal_id_problem, signal_name_problem
from intentd.generated.v1 import intent_service_pb2 as pb
from intentd.generated.v1 import intent_service_pb2_grpc as pb_grpc

from . import errors, history
from .auth import Authenticator, Caller, current_caller
from .chunk_reader import ChunkReader, Follow, StreamQuery
from .convert import (
    event_to_proto,
    intent_to_proto,
    signal_to_proto,
    step_to_proto,
    stream_entry_to_proto,
    stream_info_to_proto,
)
from .hub import NotificationHub
from .ids import looks_like_id, page_token, parse_page_token
from .quotas import Quotas, payload_json
from .rpc import Ctx, server_stream, unary
from .settings import ServerSettings
from .store import IntentStore, NewIntent
from .waits import WaitStore


def _timestamp_field(msg: object, field: str, path: str) -> datetime | None:
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    ts = getattr(msg, field)
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValidationError(path, "is not a valid timestamp") from None


def _traceparent(context: grpc.aio.ServicerContext) -> str | None:
    return traceparent_from_metadata(context.invocation_metadata() or ())


def _require_id(value: str, field: str = "id") -> str:
    if not value:
        raise ValidationError(field, "is required")
    if not looks_like_id(value):
        # It cannot exist; saying NOT_FOUND keeps one answer for unknown ids.
        raise errors.NotFound(f"intent {value[:80]!r} not found")
    return value


class IntentService(pb_grpc.IntentServiceServicer):
    def __init__(
        self, store: IntentStore, hub: NotificationHub, settings: ServerSettings, auth: Authenticator,
        quotas: Quotas, waits: WaitStore, chunks: ChunkReader | None = None,
    ) -> None:
        self.store = store
        self.chunks = chunks if chunks is not None else ChunkReader(store.db, hub, store)
        self.waits = waits
        self.hub = hub
        self.settings = settings
        self.auth = auth
        self.quotas = quotas
        self._watches: dict[str, int] = {}

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return current_caller().tenant

    @contextlib.contextmanager
    def _watch_slot(self, caller: Caller) -> Iterator[None]:
        """Counts an open WatchIntent or WaitIntent against its key's cap
        (with API keys off there is one caller, and no one else to protect)."""
        open_now = self._watches.get(caller.identity, 0)
        if self.auth.enabled and open_now >= self.settings.max_watches_per_key:
            raise errors.ResourceExhausted(
                f"API key {caller.name!r} has {open_now} WatchIntent/WaitIntent calls open (StreamIntent calls "
                f"count too) on this replica; "
                f"the limit is {self.settings.max_watches_per_key}", retry_after_ms=1000)
        self._watches[caller.identity] = open_now + 1
        try:
            yield
        finally:
            left = self._watches[caller.identity] - 1
            if left:
                self._watches[caller.identity] = left
            else:
                del self._watches[caller.identity]

    async def _check_key(self, caller: Caller) -> None:
        if not await self.auth.still_valid(caller):
            raise errors.Unauthenticated("the API key of this call was revoked or expired")

    @staticmethod
    def _idle(caller: Caller, left: float | None = None) -> float | None:
        """How long an idle watcher or waiter sleeps with nothing to wake it:
        until its own deadline or its key's expiry. Everything else (events,
        key changes, a reconnect of the listener, the hub's catch-up) wakes it."""
        limits = [] if left is None else [left]
        if caller.expire_time is not None:
            limits.append(max(0.0, (caller.expire_time - datetime.now(UTC)).total_seconds()) + 0.05)
        return min(limits) if limits else None

    def _new_intent(
        self, spec: pb.IntentSpec, prefix: str, now: datetime, max_payload: int, trace: str | None
    ) -> NewIntent:
        check_intent_type(spec.intent_type, f"{prefix}intent_type")
        check_agent_address(spec.to_agent, f"{prefix}to_agent")
        payload = payload_json(spec.payload, f"{prefix}payload", max_payload)
        check_idempotency_key(spec.idempotency_key, f"{prefix}idempotency_key")
        labels = check_labels(dict(spec.labels), f"{prefix}labels")
        if trace and TRACEPARENT_LABEL not in labels:
            # The trace travels with the intent to its deliveries and steps.
            labels = {**labels, TRACEPARENT_LABEL: trace}
        deadline = _timestamp_field(spec, "deadline", f"{prefix}deadline")
        if deadline is not None and deadline > now + timedelta(milliseconds=MAX_HORIZON_MS):
            raise ValidationError(f"{prefix}deadline", f"{deadline.isoformat()} is more than 100 years ahead")
        refusal = None
        if deadline is not None and deadline <= now:
            refusal = ValidationError(f"{prefix}deadline", f"{deadline.isoformat()} is in the past")
            if not spec.idempotency_key:
                raise refusal
            # A retry of a send whose answer was lost carries the same key and
            # deadline: it must get the original intent, not an error. Only a
            # send that would create a new intent is refused.
        if not 0 <= spec.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValidationError(f"{prefix}max_attempts", f"must be 0 (type default) to {MAX_ATTEMPTS_LIMIT}")
        caller = current_caller()
        # With keys, the sender is the key: one caller cannot claim another's
        # idempotency keys by naming it.
        sender = caller.name if self.auth.enabled else (spec.sender or "anonymous")
        check_text(sender, f"{prefix}sender", MAX_SENDER_LEN)
        return NewIntent(
            intent_type=spec.intent_type,
            to_agent=spec.to_agent,
            payload=payload,
            sender=sender,
            idempotency_key=spec.idempotency_key or None,
            deadline=deadline,
            labels=labels,
            max_attempts=spec.max_attempts or None,
            refuse_if_new=refusal,
        )

    @unary("client")
    async def SendIntent(self, request: pb.SendIntentRequest, context: Ctx) -> pb.SendIntentResponse:
        if not request.HasField("intent"):
            raise ValidationError("intent", "is required")
        caller = current_caller()
        max_payload = await self.quotas.max_payload_bytes(caller)
        spec = self._new_intent(request.intent, "intent.", datetime.now(UTC), max_payload, _traceparent(context))
        await self.quotas.admit_sends(caller, 1)
        (sent,) = await self.store.send(caller.tenant, [spec])
        metrics.record_send(sent.created)
        return pb.SendIntentResponse(intent=intent_to_proto(sent.row), created=sent.created)

    @unary("client")
    async def SendIntents(self, request: pb.SendIntentsRequest, context: Ctx) -> pb.SendIntentsResponse:
        if not request.intents:
            raise ValidationError("intents", "must not be empty")
        if len(request.intents) > self.settings.max_batch_size:
            raise errors.ResourceExhausted(
                f"intents: {len(request.intents)} in one batch; the limit is {self.settings.max_batch_size}"
            )
        now = datetime.now(UTC)
        caller = current_caller()
        max_payload = await self.quotas.max_payload_bytes(caller)
        trace = _traceparent(context)
        specs = [self._new_intent(spec, f"intents[{i}].", now, max_payload, trace)
                 for i, spec in enumerate(request.intents)]
        await self.quotas.admit_sends(caller, len(specs))
        sent = await self.store.send(caller.tenant, specs)
        for one in sent:
            metrics.record_send(one.created)
        return pb.SendIntentsResponse(
            results=[pb.SendIntentResponse(intent=intent_to_proto(s.row), created=s.created) for s in sent]
        )

    @unary("client")
    async def GetIntent(self, request: pb.GetIntentRequest, context: Ctx) -> pb.GetIntentResponse:
        row = await self.store.get(self._tenant(context), _require_id(request.id))
        return pb.GetIntentResponse(intent=intent_to_proto(row))

    @server_stream("client")
    async def WatchIntent(
        self, request: pb.WatchIntentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchIntentResponse]:
        intent_id = _require_id(request.id)
        if request.after_seq < 0:
            raise ValidationError("after_seq", "must not be negative")
        tenant = self._tenant(context)
        caller = current_caller()
        after = request.after_seq
        # Subscribe before the first read: a change committed between the read
        # and the subscription would otherwise be missed until the catch-up.
        with self._watch_slot(caller), self.hub.subscribe_intent(intent_id, caller.key_id) as sub:
            await self.store.get(tenant, intent_id)
            while True:
                events = await self.store.events(tenant, intent_id, after)
                for event in events:
                    after = event["seq"]
                    yield pb.WatchIntentResponse(event=event_to_proto(event))
                if events:
                    continue
                row = await self.store.get(tenant, intent_id)
                if row["last_seq"] > after:
                    continue
                # Every event up to the newest is sent; a terminal intent has no more.
                if IntentState(row["state"]).terminal:
                    return
                if self.hub.closing:
                    raise errors.Unavailable("server is shutting down; reconnect with after_seq")
                await self._check_key(caller)
                sub.seen = after
                await sub.wait(self._idle(caller))
                await self._check_key(caller)

    @server_stream("client")
    async def StreamIntent(
        self, request: pb.StreamIntentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamIntentResponse]:
        intent_id = _require_id(request.id)
        name = checked_stream_name(request.stream, "stream")
        if request.from_offset < 0:
            raise ValidationError("from_offset", "must not be negative")
        caller = current_caller()
        query = StreamQuery(caller.tenant, intent_id, name, request.from_offset, request.skip_superseded)
        # Like WatchIntent: woken by the key's changes, and the key checked
        # around every sleep (and before every page), so a revoked key ends it.
        follow = Follow(caller.key_id, check=lambda: self._check_key(caller), idle=lambda: self._idle(caller))
        with self._watch_slot(caller):
            async for page in self.chunks.read(query, follow):
                yield pb.StreamIntentResponse(
                    entries=[stream_entry_to_proto(entry) for entry in page.entries],
                    intent=intent_to_proto(page.intent) if page.intent is not None else None)

    @unary("client")
    async def ListIntentStreams(
        self, request: pb.ListIntentStreamsRequest, context: Ctx
    ) -> pb.ListIntentStreamsResponse:
        rows = await self.chunks.streams(self._tenant(context), _require_id(request.id))
        return pb.ListIntentStreamsResponse(streams=[stream_info_to_proto(row) for row in rows])

    @unary("client")
    async def WaitIntent(self, request: pb.WaitIntentRequest, context: Ctx) -> pb.WaitIntentResponse:
        intent_id = _require_id(request.id)
        if request.timeout_ms < 0:
            raise ValidationError("timeout_ms", "must not be negative")
        tenant = self._tenant(context)
        loop_deadline = None if request.timeout_ms == 0 else time.monotonic() + request.timeout_ms / 1000
        remaining_call = context.time_remaining()
        if remaining_call is not None:
            # Answer just before the caller's own deadline rather than after it.
            call_deadline = time.monotonic() + max(0.0, remaining_call - 0.05)
            loop_deadline = call_deadline if loop_deadline is None else min(loop_deadline, call_deadline)
        caller = current_caller()
        with self._watch_slot(caller), self.hub.subscribe_intent(intent_id, caller.key_id) as sub:
            while True:
                # Before every answer too: a revoked key gets no result.
                await self._check_key(caller)
                row = await self.store.get(tenant, intent_id)
                await self._check_key(caller)
                if IntentState(row["state"]).terminal:
                    return pb.WaitIntentResponse(intent=intent_to_proto(row), terminal=True)
                if self.hub.closing:
                    raise errors.Unavailable("server is shutting down; wait again")
                left = None if loop_deadline is None else loop_deadline - time.monotonic()
                if left is not None and left <= 0:
                    return pb.WaitIntentResponse(intent=intent_to_proto(row), terminal=False)
                sub.seen = row["last_seq"]
                await sub.wait(self._idle(caller, left))

    @unary("client")
    async def CancelIntent(self, request: pb.CancelIntentRequest, context: Ctx) -> pb.CancelIntentResponse:
        intent_id = _require_id(request.id)
        check_text(request.reason, "reason", MAX_REASON_LEN)
        row = await self.store.cancel(self._tenant(context), intent_id, request.reason or "canceled",
                                      actor=current_caller().name)
        metrics.observe_end_to_end("CANCELED", (row["finish_time"] - row["create_time"]).total_seconds())
        return pb.CancelIntentResponse(intent=intent_to_proto(row))

    @unary("client")
    async def ListIntents(self, request: pb.ListIntentsRequest, context: Ctx) -> pb.ListIntentsResponse:
        if not 0 <= request.page_size <= 1000:
            raise ValidationError("page_size", "must be 0 (default 100) to 1000")
        limit = request.page_size or 100
        states = []
        for i, value in enumerate(request.states):
            try:
                states.append(IntentState.from_proto(value))
            except ValueError as exc:
                raise ValidationError(f"states[{i}]", str(exc)) from None
        if request.intent_type:
            check_intent_type(request.intent_type)
        if request.to_agent:
            check_agent_address(request.to_agent)
        labels = check_labels(dict(request.labels)) if request.labels else None
        parent_id = None
        if request.parent_id:
            if not looks_like_id(request.parent_id):
                raise ValidationError("parent_id", "is not an intent id")
            parent_id = request.parent_id
        rows, more = await self.store.list_intents(
            self._tenant(context),
            states=states or None,
            intent_type=request.intent_type or None,
            to_agent=request.to_agent or None,
            labels=labels,
            before_id=parse_page_token(request.page_token),
            limit=limit,
            max_bytes=history.page_bytes(self.settings.max_message_bytes),
            parent_id=parent_id,
        )
        return pb.ListIntentsResponse(
            intents=[intent_to_proto(r) for r in rows],
            next_page_token=page_token(rows[-1]["id"]) if more else "",
        )

    @unary("client")
    async def SignalIntent(self, request: pb.SignalIntentRequest, context: Ctx) -> pb.SignalIntentResponse:
        intent_id = _require_id(request.id)
        problem = signal_name_problem(request.name)
        if problem is not None:
            raise ValidationError("name", problem)
        problem = signal_id_problem(request.signal_id)
        if problem is not None:
            raise ValidationError("signal_id", problem)
        caller = current_caller()
        payload = payload_json(request.payload, "payload", await self.quotas.max_payload_bytes(caller))
        # A signal is a write like a send: one rate for both, so a key cannot
        # load the database past its send limit through signals.
        await self.quotas.admit_sends(caller, 1)
        sent = await self.waits.signal(caller.tenant, intent_id, request.name, payload, request.signal_id or None,
                                       caller.name)
        if sent.created:
            # A matched repeat changed nothing: one audit row per signal.
            await self.store.audit(caller.tenant, caller.name, "intent.signal", intent_id,
                                   {"name": request.name, "signal_id": sent.signal["signal_id"]})
        return pb.SignalIntentResponse(intent=intent_to_proto(sent.intent), signal=signal_to_proto(sent.signal),
                                       created=sent.created)

    @unary("admin")
    async def RetryIntent(self, request: pb.RetryIntentRequest, context: Ctx) -> pb.RetryIntentResponse:
        intent_id = _require_id(request.id)
        if not 0 <= request.extra_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValidationError("extra_attempts", f"must be 0 to {MAX_ATTEMPTS_LIMIT}")
        row = await self.store.retry(self._tenant(context), intent_id, request.extra_attempts,
                                     actor=current_caller().name)
        return pb.RetryIntentResponse(intent=intent_to_proto(row))

    @unary("client")
    async def ListIntentSteps(
        self, request: pb.ListIntentStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListIntentStepsResponse:
        intent_id = _require_id(request.id)
        if not 0 <= request.page_size <= history.PAGE_STEPS:
            raise ValidationError("page_size", f"must be 0 (default {history.PAGE_STEPS}) to {history.PAGE_STEPS}")
        first = history.parse_page_token(request.page_token)
        rows, recorded = await self.store.steps(
            self._tenant(context), intent_id, first, request.page_size or history.PAGE_STEPS,
            history.page_bytes(self.settings.max_message_bytes))
        more = bool(rows) and rows[-1]["idx"] < recorded
        return pb.ListIntentStepsResponse(
            steps=[step_to_proto(r) for r in rows],
            next_page_token=history.page_token(rows[-1]["idx"] + 1) if more else "")

