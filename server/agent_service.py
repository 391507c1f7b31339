"""The sidecar-facing AgentService: one Connect stream per sidecar carries
registration, assignments, acknowledgements, fenced writes and pings.

The database decides ownership. What this module keeps in memory (which
leases a stream holds) only serves to push work and revocations quickly; it
is re-checked against PostgreSQL on every ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from intentd.core.errors import ValidationError
from intentd.core.framing import MAX_BATCH_MESSAGES, Framer, Outbox, frame
from intentd.core.limits import MAX_INTENT_TYPES
from intentd.core.observability import metrics
from intentd.core.validation import check_agent_address, check_intent_type
from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import agent_service_pb2_grpc as pb_grpc
from intentd.generated.v1 import delivery_pb2
from intentd.server import errors, history
from intentd.server.auth import KEY_RECHECK_SECONDS, Authenticator, Caller, current_caller
from intentd.server.convert import step_to_proto
from intentd.server.db import Row
from intentd.server.hub import NotificationHub
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.quotas import Bucket, Quotas
from intentd.server.rpc import MalformedRequest, to_server_error, unary
from intentd.server.settings import MISSED_PINGS_BEFORE_CLOSE, ServerSettings

log = logging.getLogger("intentd.agents")

REGISTER_TIMEOUT_S = 10.0
MAX_CAPACITY = 10_000
MAX_CLAIM_BATCH = 100
# Writes and acks of one stream processed at once; more wait, which pushes
# back on the stream through HTTP/2 flow control instead of growing memory.
MAX_CONCURRENT_WRITES = 256
# A live sidecar is heard at least once a ping interval (its pings, its pongs
# to ours). One silent for longer than this many intervals may be frozen or
# cut off: nothing is claimed for it, and nothing claimed is handed to it,
# until it is heard again (else the delivery waits out the ack timeout, and
# a lease of its that lapsed could come straight back to it).
SILENT_STREAM_PINGS = 1.5
# Messages queued for one stream before it counts as a consumer that stopped
# reading (its bytes are bounded by ServerSettings.stream_buffer_bytes).
MAX_OUTBOX = 10_000
# What a write's answer adds to what its request weighs (ids, times, codes):
# the room a write reserves in its stream's buffer before it is taken.
ANSWER_OVERHEAD_BYTES = 1024


@dataclass
class Held:
    lease: LeaseRef
    since: float  # monotonic time it was added; renew results older than this judge it
    # The intent's newest event seq when this stream got the lease: events at
    # or below it happened before and say nothing about this lease.
    seq: int = 0
    finishing: bool = False  # a complete/fail/release from its holder is in flight
    # Writes for a lease wait for its acknowledgement to commit: the sidecar
    # sends the ack and then writes at once, and they run concurrently here.
    acked: asyncio.Task[None] | None = None


@dataclass(eq=False)
class Session:
    caller: Caller
    sidecar_id: str
    addresses: tuple[str, ...]
    intent_types: tuple[str, ...]
    capacity: int
    # Bytes queued toward the sidecar (and promised to writes in flight)
    # beyond which the stream is not read (ServerSettings.stream_buffer_bytes).
    buffer_bytes: int
    batches: bool = False  # the sidecar takes ConnectResponse.batch
    fetches_steps: bool = False  # the sidecar fetches recorded steps past an assignment's first page
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    held: dict[str, Held] = field(default_factory=dict)
    outbox: Outbox[pb.ConnectResponse] = field(default_factory=lambda: Outbox(maxsize=MAX_OUTBOX))
    # Room in the buffer promised to the answers of writes in flight.
    reserved: int = 0
    # Since when the reader waits for the sidecar to drain its buffer.
    paused_since: float | None = None
    # Writes per second of this stream (None: unlimited).
    bucket: Bucket | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set by close()
    # Whether intents waiting out a retry backoff may have appeared since the
    # dispatcher last asked when the next one becomes claimable. Only a
    # change to PENDING (which notifies) or a lost notification (the catch-up
    # timer) can add one, so a completion's wake-up need not ask again.
    recheck_delayed: bool = True
    last_heard: float = field(default_factory=time.monotonic)
    # Messages the reader holds while it waits for this server's own write
    # budgets or write slots: the sidecar was heard, and is not read on
    # because of us, so that time never counts as its silence.
    held_back: int = 0
    # The dispatcher waits for the stream to be heard again (see SILENT_STREAM_PINGS).
    quiet: bool = False
    closed: bool = False
    # Leases this stream revoked: if the database still has them bound to the
    # stream (it will renew them with every ping), they are released.
    dropped: dict[str, LeaseRef] = field(default_factory=dict)
    # Why the server ends the stream, when it is the sidecar's fault.
    failure: errors.ServerError | None = None

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.held))

    @property
    def queued_bytes(self) -> int:
        return self.outbox.bytes + self.reserved

    def silent_for(self) -> float:
        """Seconds since the sidecar was last heard, none while the reader
        holds one of its messages back."""
        return 0.0 if self.held_back else time.monotonic() - self.last_heard

    @contextlib.asynccontextmanager
    async def holding_back(self) -> AsyncIterator[None]:
        """Around a wait of the reader for this server's own budgets."""
        self.held_back += 1
        try:
            yield
        finally:
            self.held_back -= 1
            self.last_heard = time.monotonic()

    async def room(self) -> None:
        """Waits while the stream's buffer is full; a message larger than
        the whole buffer still passes once the buffer is empty."""
        while not self.closed and self.queued_bytes >= self.buffer_bytes and self.queued_bytes > 0:
            if self.paused_since is None:
                self.paused_since = time.monotonic()
            self.outbox.taken.clear()
            await self.outbox.taken.wait()
        self.paused_since = None

    def reserve(self, size: int) -> None:
        self.reserved += size

    def unreserve(self, size: int) -> None:
        self.reserved -= size
        self.outbox.taken.set()

    def send(self, message: pb.ConnectResponse) -> None:
        if self.closed:
            return
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("sidecar %s is not reading its stream (%d messages queued); closing it",
                        self.sidecar_id, self.outbox.qsize())
            self.failure = errors.ResourceExhausted(
                f"the sidecar does not read its stream ({self.outbox.qsize()} messages queued)")
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.wake.set()
            self.ended.set()
            self.outbox.taken.set()
            while True:
                try:
                    self.outbox.put_nowait(None)
                    return
                except asyncio.QueueFull:
                    self.outbox.get_nowait()  # make room for the end marker


def count_attempt_end(row: Row, cause: str) -> None:
    """Metrics for an attempt that ended without a result: a redelivery, or
    the dead letter when it was the last attempt."""
    if row["state"] == "PENDING":
        metrics.record_redelivery(cause)
    elif row["state"] == "FAILED":
        if row["error_code"] == "ATTEMPTS_EXHAUSTED":
            metrics.ATTEMPTS_EXHAUSTED.inc()
        if row["age_s"] is not None:
            metrics.observe_end_to_end("FAILED", float(row["age_s"]))


def _response_batch(messages: list[pb.ConnectResponse]) -> pb.ConnectResponse:
    return pb.ConnectResponse(batch=pb.ConnectResponseBatch(messages=messages))


def _lease_msg(lease: LeaseRef) -> delivery_pb2.Lease:
    return delivery_pb2.Lease(intent_id=lease.intent_id, attempt=lease.attempt, token=str(lease.token))


def _lease_ref(msg: delivery_pb2.Lease) -> LeaseRef:
    return LeaseRef.parse(msg.intent_id, msg.attempt, msg.token)


def _validate_register(msg: pb.Register) -> None:
    if not msg.sidecar_id or len(msg.sidecar_id) > 200:
        raise ValidationError("register.sidecar_id", "must be 1 to 200 characters")
    if not msg.addresses:
        raise ValidationError("register.addresses", "must name at least one agent address")
    if len(msg.addresses) > 100:
        raise ValidationError("register.addresses", "at most 100 addresses per sidecar")
    for i, address in enumerate(msg.addresses):
        check_agent_address(address, f"register.addresses[{i}]")
    _validate_types(msg.intent_types, "register.intent_types")
    if not 0 <= msg.capacity <= MAX_CAPACITY:
        raise ValidationError("register.capacity", f"must be 0 to {MAX_CAPACITY}")
    if len(msg.held) > MAX_CAPACITY:
        raise ValidationError("register.held", f"at most {MAX_CAPACITY} leases")


def _validate_types(intent_types: Sequence[str], field: str) -> None:
    if len(intent_types) > MAX_INTENT_TYPES:
        raise ValidationError(field, f"at most {MAX_INTENT_TYPES} intent types")
    for i, intent_type in enumerate(intent_types):
        check_intent_type(intent_type, f"{field}[{i}]")


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(
        self, leases: LeaseStore, hub: NotificationHub, settings: ServerSettings, auth: Authenticator,
        quotas: Quotas,
    ) -> None:
        self.leases = leases
        self.quotas = quotas
        self.auth = auth
        self.hub = hub
        self.settings = settings
        self.sessions: set[Session] = set()
        self._holders: dict[str, Session] = {}
        self._closing = False
        self.assignments_sent = 0
        # Streams open on this replica per API key and per tenant (the caps),
        # and each tenant's write budget, shared by its streams here.
        self._streams_by_key: dict[str, int] = {}
        self._streams_by_tenant: dict[str, int] = {}
        self._tenant_buckets: dict[str, Bucket] = {}
        self._key_checks: set[asyncio.Future[bool]] = set()
        hub.on_pending(self._on_pending)
        hub.on_event(self._on_event)
        auth.on_change(self._on_key_change)

    # ------------------------------------------------------------ wake-ups

    def _on_pending(self, address: str) -> None:
        for session in list(self.sessions):
            if not address or address in session.addresses:
                session.recheck_delayed = True
                session.wake.set()

    def _on_event(self, intent_id: str, seq: int, state: str) -> None:
        session = self._holders.get(intent_id)
        if session is None:
            return
        held = session.held.get(intent_id)
        if held is None or held.finishing or seq <= held.seq:
            return
        if state in ("CANCELED", "TIMED_OUT"):
            self._revoke(session, held, state, f"the intent was {state.lower().replace('_', ' ')}")
        elif state in ("PENDING", "FAILED"):
            self._revoke(session, held, "LEASE_LOST", "the lease expired and the intent moved on")

    def _forget(self, session: Session, intent_id: str, token: uuid.UUID | str | None = None) -> None:
        """Drops the stream's hold on the intent; with ``token``, only the hold
        of that lease (the stream may already hold the intent's next attempt)."""
        held = session.held.get(intent_id)
        if held is None or (token is not None and str(held.lease.token) != str(token)):
            return
        del session.held[intent_id]
        if self._holders.get(intent_id) is session:
            del self._holders[intent_id]
        session.wake.set()

    def _revoke(self, session: Session, held: Held, reason: str, message: str) -> None:
        log.info("revoking %s attempt %d from sidecar %s: %s", held.lease.intent_id, held.lease.attempt,
                 session.sidecar_id, reason)
        self._forget(session, held.lease.intent_id, held.lease.token)
        session.dropped[held.lease.intent_id] = held.lease
        session.send(pb.ConnectResponse(revocation=delivery_pb2.Revocation(
            lease=_lease_msg(held.lease), reason=reason, message=message)))

    def _hold(self, session: Session, lease: LeaseRef, seq: int) -> None:
        session.held[lease.intent_id] = Held(lease, time.monotonic(), seq=seq)
        self._holders[lease.intent_id] = session

    def _on_key_change(self, key_id: str) -> None:
        """A key changed (or changes may have been missed: ``key_id`` empty):
        its streams re-check it now rather than at their next poll."""
        for session in list(self.sessions):
            if not key_id or session.caller.key_id == key_id:
                check = asyncio.ensure_future(self._check_key(session))
                self._key_checks.add(check)
                check.add_done_callback(self._key_checks.discard)

    async def _check_key(self, session: Session) -> bool:
        """False (and the stream ends UNAUTHENTICATED) when its key was
        revoked or expired."""
        if not self.auth.enabled or session.closed:
            return not session.closed
        try:
            valid = await self.auth.still_valid(session.caller)
        except Exception:
            return True  # the database is away; the key is judged when it is back
        if not valid and not session.closed:
            log.warning("API key %r of sidecar %s was revoked or expired; closing its stream",
                        session.caller.name, session.sidecar_id)
            session.failure = errors.Unauthenticated("the API key of this stream was revoked or expired")
            session.close()
        return valid

    async def _may_claim(self, session: Session) -> bool:
        """Before a claim: waits for room in the stream's buffer (what is
        claimed is sent at once), and checks that the key is still good."""
        await session.room()
        return not session.closed and await self._check_key(session)

    def _admit(self, caller: Caller) -> None:
        """Counts a new stream against its key's and tenant's caps (with API
        keys off there is one caller, and no one else to protect)."""
        by_key = self._streams_by_key.get(caller.identity, 0)
        enforced = self.auth.enabled
        if enforced and by_key >= self.settings.max_streams_per_key:
            raise errors.ResourceExhausted(
                f"API key {caller.name!r} has {by_key} sidecar streams open on this replica; "
                f"the limit is {self.settings.max_streams_per_key}", retry_after_ms=1000)
        by_tenant = self._streams_by_tenant.get(caller.tenant, 0)
        if enforced and by_tenant >= self.settings.max_streams_per_tenant:
            raise errors.ResourceExhausted(
                f"tenant {caller.tenant!r} has {by_tenant} sidecar streams open on this replica; "
                f"the limit is {self.settings.max_streams_per_tenant}", retry_after_ms=1000)
        self._streams_by_key[caller.identity] = by_key + 1
        self._streams_by_tenant[caller.tenant] = by_tenant + 1

    def _leave(self, caller: Caller) -> None:
        for counts, name in ((self._streams_by_key, caller.identity), (self._streams_by_tenant, caller.tenant)):
            left = counts.get(name, 1) - 1
            if left > 0:
                counts[name] = left
            else:
                counts.pop(name, None)
        if caller.tenant not in self._streams_by_tenant:
            self._tenant_buckets.pop(caller.tenant, None)

    async def _pace(self, name: str, stream: Bucket | None) -> None:
        """Waits for a stream's and its tenant's write budgets: a flood is
        read only as fast as its budget, and HTTP/2 pushes back on it."""
        rate = await self.quotas.writes_per_second(name, self.settings.tenant_writes_per_second)
        tenant = None
        if rate > 0:
            tenant = self._tenant_buckets.get(name)
            if tenant is None or tenant.rate != rate:
                tenant = self._tenant_buckets[name] = Bucket(rate, max(rate, 1.0), time.monotonic())
        for bucket in (stream, tenant):
            if bucket is not None:
                while True:
                    wait = bucket.take(1, time.monotonic())
                    if wait <= 0:
                        break
                    # Not refused: the reader waits, so the sidecar is slowed.
                    await asyncio.sleep(wait)

    # ------------------------------------------------------------ the stream

    async def Connect(  # type: ignore[override]  # grpc.aio also takes a coroutine that writes via context
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            # Before anything is read: a stream without a good key ends at once.
            caller = await self.auth.authenticate(context, "agent")
            self._admit(caller)
        except Exception as exc:
            await self._refuse(context, exc)
            return
        try:
            await self._serve(caller, request_iterator, context)
        finally:
            self._leave(caller)

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        mapped = to_server_error(exc)
        if mapped is None:
            log.exception("registration failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error during registration")
        else:
            retry_after = getattr(mapped, "retry_after_ms", None)
            if retry_after is not None:
                context.set_trailing_metadata((("retry-after-ms", str(retry_after)),))
            await context.abort(mapped.code, mapped.message)

    async def _serve(
        self, caller: Caller, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            session = await self._register(caller, request_iterator, context)
        except Exception as exc:
            await self._refuse(context, exc)
            return
        if session is None:
            return
        self.sessions.add(session)
        for held in session.held.values():
            self._holders[held.lease.intent_id] = session
        tasks = [
            asyncio.create_task(self._read(session, request_iterator), name=f"read-{session.id}"),
            asyncio.create_task(self._dispatch(session), name=f"dispatch-{session.id}"),
            asyncio.create_task(self._ping(session), name=f"ping-{session.id}"),
        ]
        frames = Framer(session.outbox, limit=MAX_BATCH_MESSAGES if session.batches else 1)
        ended = asyncio.ensure_future(session.ended.wait())
        try:
            while (messages := await frames.next()) is not None:
                # A write waits for the sidecar to take it (HTTP/2 flow
                # control); one that does not read would hold the stream open
                # for ever, so the end of the session ends the wait.
                write = asyncio.ensure_future(context.write(frame(messages, _response_batch)))
                await asyncio.wait((write, ended), return_when=asyncio.FIRST_COMPLETED)
                if not write.done():
                    write.cancel()
                    break
                write.result()
        finally:
            ended.cancel()
            session.close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.sessions.discard(session)
            for intent_id in list(session.held):
                if self._holders.get(intent_id) is session:
                    del self._holders[intent_id]
            # The leases it held are not released here: they lapse unless the
            # sidecar reconnects in time and re-announces them.
            log.info("sidecar %s stream %s closed holding %d", session.sidecar_id, session.id, len(session.held))
        if session.failure is not None:
            await context.abort(session.failure.code, session.failure.message)

    async def _register(
        self, caller: Caller, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> Session | None:
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator)), REGISTER_TIMEOUT_S)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise ValidationError("register", f"was not sent within {REGISTER_TIMEOUT_S:.0f}s") from None
        if isinstance(first, MalformedRequest):
            raise first.invalid()
        if first.WhichOneof("msg") != "register":
            raise ValidationError("register", "the first message of a Connect stream must be register")
        if self._closing:
            raise errors.Unavailable("server is shutting down; connect to another replica")
        reg = first.register
        _validate_register(reg)
        for address in reg.addresses:
            if not caller.may_serve(address):
                raise errors.PermissionDenied(
                    f"API key {caller.name!r} may not serve {address} (its patterns: "
                    f"{', '.join(caller.address_patterns) or 'none'})")
        session = Session(
            caller=caller,
            sidecar_id=reg.sidecar_id,
            addresses=tuple(dict.fromkeys(reg.addresses)),
            intent_types=tuple(dict.fromkeys(reg.intent_types)),
            capacity=reg.capacity,
            batches=reg.accepts_batches,
            fetches_steps=reg.fetches_steps,
            buffer_bytes=self.settings.stream_buffer_bytes,
        )
        rate = self.settings.stream_writes_per_second
        if rate > 0:
            session.bucket = Bucket(rate, max(rate, 1.0), time.monotonic())
        kept: list[delivery_pb2.Lease] = []
        lost: list[delivery_pb2.Lease] = []
        for msg in reg.held:
            try:
                lease = _lease_ref(msg)
            except ValidationError:
                lost.append(msg)
                continue
            # Only for an address this stream may serve (checked against the
            # key above): the database refuses a lease of any other.
            seq = await self.leases.rebind(lease, session.id, session.addresses, tenant=caller.tenant)
            if seq is not None:
                self._hold(session, lease, seq)
                kept.append(msg)
            else:
                lost.append(msg)
        await context.write(pb.ConnectResponse(registered=pb.Registered(
            session_id=session.id, ping_interval_ms=self.settings.ping_interval_ms, kept=kept, lost=lost,
            accepts_batches=True)))
        log.info("sidecar %s connected (stream %s) for %s, capacity %d, kept %d lost %d",
                 session.sidecar_id, session.id, ",".join(session.addresses), session.capacity,
                 len(kept), len(lost))
        return session

    async def _read(self, session: Session, request_iterator: AsyncIterator[pb.ConnectRequest]) -> None:
        writes = asyncio.Semaphore(MAX_CONCURRENT_WRITES)
        background: set[asyncio.Task[None]] = set()

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            task = asyncio.create_task(coro)
            background.add(task)
            task.add_done_callback(background.discard)

        renewing: asyncio.Task[None] | None = None

        async def handle(request: pb.ConnectRequest) -> bool:
            """Handles one message; False ends the stream."""
            nonlocal renewing
            kind = request.WhichOneof("msg")
            if kind == "ping":
                session.send(pb.ConnectResponse(pong=pb.Pong(nonce=request.ping.nonce)))
                if renewing is None or renewing.done():
                    renewing = asyncio.create_task(self._renew(session))
            elif kind == "pong":
                pass
            elif kind == "ack":
                # Bounded like writes: an ack for a lease nobody holds costs a
                # database diagnosis too.
                async with session.holding_back():
                    await self._pace(session.caller.tenant, session.bucket)
                    await writes.acquire()
                ack = asyncio.create_task(self._ack(session, request.ack.lease, writes))
                background.add(ack)
                ack.add_done_callback(background.discard)
                held_now = session.held.get(request.ack.lease.intent_id)
                if held_now is not None:
                    held_now.acked = ack
            elif kind == "write":
                async with session.holding_back():
                    await self._pace(session.caller.tenant, session.bucket)
                    await writes.acquire()
                # Its answer (mostly the size of the request: a step's answer
                # is the recorded step) is promised room in the buffer now.
                promised = request.write.ByteSize() + ANSWER_OVERHEAD_BYTES
                session.reserve(promised)
                spawn(self._write(session, request.write, writes, promised))
            elif kind == "set_capacity":
                if not 0 <= request.set_capacity.capacity <= MAX_CAPACITY:
                    log.warning("sidecar %s sent capacity %d; ignored", session.sidecar_id,
                                request.set_capacity.capacity)
                    return True
                if request.set_capacity.HasField("intent_types"):
                    # The types the sidecar's agents announced, with the capacity they bring.
                    offered = request.set_capacity.intent_types.intent_types
                    try:
                        _validate_types(offered, "set_capacity.intent_types")
                    except ValidationError as exc:
                        session.failure = errors.InvalidArgument(str(exc))
                        return False
                    session.intent_types = tuple(dict.fromkeys(offered))
                    session.recheck_delayed = True
                session.capacity = request.set_capacity.capacity
                session.wake.set()
            else:
                log.warning("sidecar %s sent unexpected %s; closing", session.sidecar_id, kind)
                return False
            return True

        try:
            async for request in request_iterator:
                session.last_heard = time.monotonic()
                if session.quiet:
                    session.quiet = False
                    session.wake.set()
                if isinstance(request, MalformedRequest):
                    log.warning("sidecar %s sent a malformed message (%s); closing", session.sidecar_id,
                                request.error)
                    session.failure = request.invalid()
                    break
                messages: Sequence[pb.ConnectRequest]
                if request.HasField("batch"):
                    messages = request.batch.messages
                    if any(message.HasField("batch") for message in messages):
                        session.failure = errors.InvalidArgument("batch: a batch must not contain a batch")
                        break
                else:
                    messages = [request]
                # Where a message ends the stream, the rest of its batch is not handled.
                ended = False
                for message in messages:
                    # Not read on while the sidecar leaves its answers unread.
                    await session.room()
                    if session.closed or not await handle(message):
                        ended = True
                        break
                if ended:
                    break
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            session.close()
            # Writes already taken run to their commit; only their answers are lost.
            if background:
                await asyncio.gather(*background, return_exceptions=True)

    async def _renew(self, session: Session) -> None:
        started = time.monotonic()
        try:
            live = await self.leases.renew(session.id)
        except Exception as exc:
            # The database is unreachable: nothing can be judged lost now.
            log.warning("lease renewal for stream %s failed: %s", session.id, exc)
            return
        for held in list(session.held.values()):
            if held.since < started and not held.finishing and (held.lease.intent_id, held.lease.token) not in live:
                self._revoke(session, held, "LEASE_LOST", "the lease is no longer held by this stream")
        # A lease this stream gave up on but the database still binds to it
        # would be renewed forever with nobody working on it: give it back.
        for intent_id, lease in list(session.dropped.items()):
            if (intent_id, lease.token) not in live:
                del session.dropped[intent_id]
            elif intent_id not in session.held:
                del session.dropped[intent_id]
                try:
                    await self.leases.release(lease, "SIDECAR_STOPPED", session=session.id)
                    log.warning("released %s: its stream %s had dropped it but still held it", intent_id, session.id)
                except Exception as exc:
                    log.warning("releasing orphaned lease of %s failed: %s", intent_id, exc)

    async def _ack(self, session: Session, msg: delivery_pb2.Lease, slots: asyncio.Semaphore) -> None:
        try:
            await self._acknowledge(session, msg)
        finally:
            slots.release()

    async def _acknowledge(self, session: Session, msg: delivery_pb2.Lease) -> None:
        # The sidecar sends an ack once; a database hiccup must not waste the
        # attempt, so an unavailable database is retried until the stream ends
        # or the ack timeout would have taken the delivery back anyway.
        deadline = time.monotonic() + self.settings.ack_timeout_ms / 1000
        delay = 0.05
        while True:
            try:
                await self.leases.ack(_lease_ref(msg), session=session.id)
                return
            except errors.FailedPrecondition as exc:
                held = session.held.get(msg.intent_id)
                if held is not None and str(held.lease.token) == msg.token:
                    self._revoke(session, held, "LEASE_LOST", exc.message)
                return
            except errors.NotFound as exc:
                # Nothing to take back; a flood of these must not flood the log.
                log.debug("ack of %s refused: %s", msg.intent_id, exc)
                return
            except errors.Unavailable as exc:
                if session.closed or time.monotonic() + delay > deadline:
                    log.warning("ack of %s failed: %s", msg.intent_id, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except Exception as exc:
                log.warning("ack of %s failed: %s", msg.intent_id, exc)
                return

    async def _write(
        self, session: Session, request: pb.WriteRequest, slots: asyncio.Semaphore, promised: int = 0
    ) -> None:
        result = pb.WriteResult(request_id=request.request_id)
        write = request.write
        op = write.WhichOneof("op")
        held = session.held.get(write.lease.intent_id)
        final = op in ("complete", "fail", "release")
        if held is not None and held.acked is not None and not held.acked.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(held.acked)
        if final and held is not None:
            held.finishing = True
        try:
            lease = _lease_ref(write.lease)
            # Only the stream holding the lease may write under it.
            mine = session.id
            if op == "step":
                row = await self.leases.record_step(
                    lease, write.step.index, write.step.name, write.step.result, session=mine)
                result.step.CopyFrom(step_to_proto(row))
                metrics.STEPS_RECORDED.inc()
            elif op == "checkpoint":
                await self.leases.save_checkpoint(lease, write.checkpoint.state, session=mine)
            elif op == "progress":
                await self.leases.report_progress(lease, write.progress.message, write.progress.fraction, session=mine)
            elif op == "complete":
                age = await self.leases.complete(lease, write.complete.result, session=mine)
                if age is not None:
                    metrics.observe_end_to_end("COMPLETED", age)
            elif op == "fail":
                ended = await self.leases.fail(
                    lease, write.fail.code, write.fail.message, write.fail.retryable, session=mine)
                count_attempt_end(ended, metrics.FAILED_RETRYABLE)
            elif op == "release":
                ended = await self.leases.release(lease, write.release.reason, session=mine)
                count_attempt_end(ended, metrics.release_cause(write.release.reason))
            else:
                raise ValidationError("write.op", "is required")
            if final:
                self._forget(session, lease.intent_id, lease.token)
        except Exception as exc:
            mapped = to_server_error(exc)
            if mapped is None:
                log.exception("write %s on %s failed", op, write.lease.intent_id)
                mapped = errors.ServerError(f"internal error in {op}")
            result.code = mapped.code.value[0]
            result.message = mapped.message
            if held is not None and (isinstance(mapped, errors.StaleLease) or (
                final and isinstance(mapped, errors.FailedPrecondition))):
                self._forget(session, write.lease.intent_id, write.lease.token)
            elif held is not None:
                held.finishing = False
        finally:
            slots.release()
            session.unreserve(promised)
        metrics.record_write(op, result.code)
        session.send(pb.ConnectResponse(write_result=result))

    def _silent(self, session: Session) -> bool:
        """True (and the stream marked to wake its dispatcher when heard) if
        it was silent for longer than a live sidecar ever is."""
        silent = session.silent_for() > SILENT_STREAM_PINGS * self.settings.ping_interval_ms / 1000
        session.quiet = silent
        return silent

    async def _until_heard(self, session: Session, rows: Sequence[Row]) -> bool:
        """Claimed for a stream that fell silent meanwhile: waits until it is
        heard again; if it closes first, gives the claims back (never sent,
        so the attempt is not charged) and returns False."""
        cancelled = False
        try:
            while self._silent(session) and not session.closed:
                await session.wake.wait()
                session.wake.clear()
        except asyncio.CancelledError:
            cancelled = True  # the stream is ending; the claims still go back
        if not session.closed and not cancelled:
            session.wake.set()  # a wake-up taken here may have been meant for the next round
            return True
        for row in rows:
            with contextlib.suppress(Exception):
                await self.leases.release(LeaseRef(row["id"], row["attempt"], row["lease_token"]), "DRAINED",
                                          session=session.id)
        if cancelled:
            raise asyncio.CancelledError
        return False

    async def _dispatch(self, session: Session) -> None:
        catchup = self.settings.dispatch_catchup_s
        while not session.closed:
            # Cleared before looking, so a wake-up that arrives while we claim
            # is kept and makes the next round start at once.
            session.wake.clear()
            timeout: float | None = catchup
            free = session.free
            types = session.intent_types or None  # SetCapacity may change them
            if free > 0 and not self._closing and self._silent(session):
                timeout = None  # _read wakes us when the stream is heard again
            elif free > 0 and not self._closing:
                if not await self._may_claim(session):
                    break
                want = min(free, MAX_CLAIM_BATCH)
                try:
                    rows, steps = await self.leases.claim(
                        session.id, session.addresses, types, want, self.settings.ack_timeout_ms,
                        tenant=session.caller.tenant, whole_history=not session.fetches_steps)
                except Exception as exc:
                    log.warning("claim for stream %s failed: %s", session.id, exc)
                    rows, steps = [], {}
                    timeout = 1.0
                if rows and self._silent(session) and not await self._until_heard(session, rows):
                    break
                for row in rows:
                    lease = LeaseRef(row["id"], row["attempt"], row["lease_token"])
                    if session.closed:
                        break  # the lease lapses after the ack timeout and is redelivered
                    self._hold(session, lease, row["last_seq"])
                    self.assignments_sent += 1
                    metrics.DELIVERIES.inc()
                    metrics.observe_dispatch_latency((row["update_time"] - row["available_at"]).total_seconds())
                    session.send(pb.ConnectResponse(
                        assignment=history.assignment(row, _lease_msg(lease), steps.get(row["id"], ()))))
                if len(rows) == want:
                    continue
                if timeout == catchup and session.recheck_delayed:
                    session.recheck_delayed = False
                    try:
                        wait = await self.leases.seconds_until_available(
                            session.addresses, types, tenant=session.caller.tenant)
                    except Exception:
                        session.recheck_delayed = True
                        wait = None
                    if wait is not None:
                        session.recheck_delayed = True  # more may wait behind that one
                        timeout = min(catchup, max(0.001, wait))
            elif free == 0:
                timeout = None
            if timeout is None:
                await session.wake.wait()
            else:
                try:
                    await asyncio.wait_for(session.wake.wait(), timeout)
                except TimeoutError:
                    session.recheck_delayed = True  # a notification may have been lost

    async def _ping(self, session: Session) -> None:
        interval = self.settings.ping_interval_ms / 1000
        nonce = 0
        while not session.closed:
            await asyncio.sleep(interval)
            silent = session.silent_for()
            if silent > MISSED_PINGS_BEFORE_CLOSE * interval:
                paused = session.paused_since
                if paused is not None and time.monotonic() - paused > MISSED_PINGS_BEFORE_CLOSE * interval:
                    # Not read because it does not read: the same as silent.
                    log.warning("sidecar %s has not read its stream for %.1fs (%d bytes queued); closing it",
                                session.sidecar_id, time.monotonic() - paused, session.queued_bytes)
                    session.failure = errors.ResourceExhausted(
                        f"the sidecar does not read its stream: {session.queued_bytes} bytes queued for it, "
                        f"the limit is {session.buffer_bytes}")
                else:
                    log.warning("sidecar %s silent for %.1fs; closing its stream", session.sidecar_id, silent)
                session.close()
                return
            nonce += 1
            session.send(pb.ConnectResponse(ping=pb.Ping(nonce=nonce)))
            if self.auth.enabled and nonce % max(1, round(KEY_RECHECK_SECONDS / interval)) == 0:
                if not await self._check_key(session):
                    return

    @unary("agent")
    async def ListRecordedSteps(
        self, request: pb.ListRecordedStepsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRecordedStepsResponse:
        """A page of a held intent's history, for a sidecar whose assignment
        carried only the first. Only the stream holding the lease may read
        it: the database checks lease, stream and tenant."""
        if not request.session_id or len(request.session_id) > 100:
            raise ValidationError("session_id", "must be the Registered.session_id of the stream")
        # Each page is a database read: paced like the stream's writes (its
        # own budget too when the stream is on this replica).
        caller = current_caller()
        stream = next((s for s in self.sessions if s.id == request.session_id and s.caller.tenant == caller.tenant),
                      None)
        await self._pace(caller.tenant, stream.bucket if stream is not None else None)
        recorded, rows = await self.leases.recorded_steps(
            _lease_ref(request.lease), request.session_id, request.from_index, request.max_bytes,
            tenant=caller.tenant)
        return pb.ListRecordedStepsResponse(steps=[step_to_proto(r) for r in rows], recorded_steps=recorded)

    async def close_all(self) -> None:
        """Ends every stream so sidecars reconnect to another replica (their
        leases stay theirs: they re-announce them there)."""
        self._closing = True
        for session in list(self.sessions):
            session.close()
