"""The sidecar's one stream to the control plane: ``AgentService.Connect``.

The stream carries registration, assignments, acknowledgements, writes and
their results, and pings both ways (docs/protocol.md). It is also the
liveness signal for every lease the sidecar holds, so this module's job is to
keep exactly one healthy stream up, notice quickly when it is not, and make
sure nothing the agent asked for is lost across a reconnect:

- writes stay pending until their ``WriteResult`` arrives and are re-sent on
  the next stream (step, checkpoint, complete and wait are idempotent per
  lease; a wait and a start of child intents also per position; an emit
  by its seq);
- held leases are re-announced in ``Register.held``; the ``lost`` ones are
  revoked locally and their pending writes refused with FAILED_PRECONDITION;
- acknowledgements made while no stream was up are sent once one is (never
  twice: the server treats a repeated ack as a stale lease).

What it knows of each lease (bound to our stream, acked, ack sent, gone) is
in the ``SidecarLeases`` it shares with the dispatcher (sidecar/leases.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from intentd.core.background import BackgroundService
from intentd.core.backoff import Backoff
from intentd.core.codes import FAILED_PRECONDITION, NOT_FOUND, OK, RETRY_WRITE_CODES, UNAVAILABLE, number_of
from intentd.core.framing import CHANNEL_OPTIONS, MAX_BATCH_MESSAGES, Framer, frame
from intentd.core.observability import metrics
from intentd.core.observability.context import log_context
from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import agent_service_pb2_grpc as pb_grpc
from intentd.generated.v1 import delivery_pb2

from .errors import ConnectError, StepsUnavailable
from .leases import HeldLease, SidecarLeases

log = logging.getLogger("intentd.sidecar.upstream")

# Ops that end the attempt: once answered, the lease is no longer held.
TERMINAL_OPS = frozenset({"complete", "fail", "release"})
# Why a lease is gone after a wait parked its intent.
PARKED = "PARKED"
# Answers after which the lease is certainly not ours (any more).
STALE_CODES = frozenset({FAILED_PRECONDITION, NOT_FOUND})
FINAL_CODES = STALE_CODES | {OK}

DEFAULT_PING_INTERVAL_S = 5.0
# A stream silent for this many ping intervals is dead.
SILENCE_LIMIT_PINGS = 3
MIN_PING_INTERVAL_S = 0.02
# A stream must last this long before reconnect backoff starts over, so a
# server that accepts and then drops us at once is not hammered.
HEALTHY_STREAM_S = 5.0
# Retries of a page of recorded steps while the stream is between replicas.
FETCH_BACKOFF = Backoff(0.05, 1.0)
# Reconnects after a stream that did not last wait up to 0.1 s * 2**failures,
# up to the reconnect_max_backoff_s setting.
FIRST_RECONNECT_S = 0.1

AssignmentHandler = Callable[[HeldLease], None]
RevocationHandler = Callable[[delivery_pb2.Revocation], None]


def _request_batch(messages: list[pb.ConnectRequest]) -> pb.ConnectRequest:
    return pb.ConnectRequest(batch=pb.ConnectRequestBatch(messages=messages))


def describe(lease: delivery_pb2.Lease) -> str:
    return f"intent {lease.intent_id} attempt {lease.attempt}"


def local_result(code: int, message: str, request_id: int = 0) -> pb.WriteResult:
    """A result made by the sidecar itself (the control plane never saw the write)."""
    return pb.WriteResult(request_id=request_id, code=code, message=message)


@dataclass
class _PendingWrite:
    request_id: int
    write: delivery_pb2.IntentWrite
    future: asyncio.Future[pb.WriteResult]
    # Handed to a stream at least once, so it may have committed.
    sent: bool = False

    @property
    def op(self) -> str | None:
        return self.write.WhichOneof("op")

    def resolve(self, result: pb.WriteResult) -> None:
        if not self.future.done():
            self.future.set_result(result)


@dataclass
class _Stream:
    """One registered stream; everything in it dies with the stream."""

    call: Any
    target: str
    session_id: str
    ping_interval_s: float
    last_heard: float
    sent_capacity: int
    batches: bool = False  # the server takes ConnectRequest.batch
    sent_types: list[str] = field(default_factory=list)
    channel: Any = None  # for the unary calls a stream's holder may make (ListRecordedSteps)
    outbox: asyncio.Queue[pb.ConnectRequest | None] = field(default_factory=asyncio.Queue)
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    dead_reason: str = ""

    def send(self, message: pb.ConnectRequest) -> None:
        self.outbox.put_nowait(message)

    def kill(self, reason: str) -> None:
        if not self.dead.is_set():
            self.dead_reason = reason
            self.dead.set()


class _Pinger(BackgroundService):
    """Pings every interval (each ping renews the leases) and declares the
    stream dead when nothing at all was heard for three intervals."""

    name = "sidecar-pinger"

    def __init__(self, stream: _Stream) -> None:
        super().__init__(stream.ping_interval_s)
        self._stream = stream
        self._nonces = itertools.count(1)

    async def run_once(self) -> None:
        silent = asyncio.get_running_loop().time() - self._stream.last_heard
        if silent > SILENCE_LIMIT_PINGS * self.interval:
            self._stream.kill(f"nothing heard for {silent:.1f}s (ping interval {self.interval:.2f}s)")
            return
        self._stream.send(pb.ConnectRequest(ping=pb.Ping(nonce=next(self._nonces))))


class Upstream:
    """Keeps one registered ``Connect`` stream up across replicas and outages."""

    def __init__(
        self,
        *,
        servers: Sequence[str],
        sidecar_id: str,
        addresses: Sequence[str],
        intent_types: Sequence[str],
        on_assignment: AssignmentHandler,
        on_revocation: RevocationHandler,
        reconnect_max_backoff_s: float = 5.0,
        register_timeout_s: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        leases: SidecarLeases | None = None,
    ) -> None:
        self._credentials = credentials
        self._metadata = tuple(metadata)
        if not servers:
            raise ValueError("at least one control-plane address is required")
        self.servers = list(servers)
        self.sidecar_id = sidecar_id
        self.addresses = list(addresses)
        self.intent_types = list(intent_types)
        self._on_assignment = on_assignment
        self._on_revocation = on_revocation
        self._reconnect = Backoff(FIRST_RECONNECT_S, reconnect_max_backoff_s)
        self._register_timeout = register_timeout_s
        self._capacity = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _PendingWrite] = {}
        self._leases = SidecarLeases() if leases is None else leases
        self._stream: _Stream | None = None
        self._rotation = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self.connected = asyncio.Event()
        self.registrations = 0

    # ------------------------------------------------------------ public API

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def session_id(self) -> str | None:
        return self._stream.session_id if self._stream is not None else None

    @property
    def pending_writes(self) -> int:
        """Writes waiting for the control plane's answer."""
        return len(self._pending)

    def held_leases(self) -> list[delivery_pb2.Lease]:
        return [held.lease for held in self._leases.bound()]

    def health(self) -> dict[str, Any]:
        stream = self._stream
        return {
            "connected": stream is not None,
            "server": stream.target if stream else None,
            "session_id": stream.session_id if stream else None,
            "registrations": self.registrations,
            "held": len(self._leases.bound()),
            "pending_writes": len(self._pending),
            "capacity": self._capacity,
        }

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("upstream already started")
        self._task = asyncio.create_task(self._run(), name="sidecar-upstream")

    async def wait_connected(self, deadline: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), deadline)
            return True
        return False

    def set_capacity(self, capacity: int, intent_types: Sequence[str] | None = None) -> None:
        """What the control plane may claim for us: how many more intents, and
        (when given) of which types (empty: every type), both at once."""
        self._capacity = max(0, capacity)
        if intent_types is not None:
            self.intent_types = list(intent_types)
        stream = self._stream
        if stream is not None and (stream.sent_capacity, stream.sent_types) != (self._capacity, self.intent_types):
            stream.sent_capacity = self._capacity
            stream.sent_types = list(self.intent_types)
            stream.send(pb.ConnectRequest(set_capacity=pb.SetCapacity(
                capacity=self._capacity, intent_types=pb.IntentTypeSet(intent_types=self.intent_types))))

    def ack(self, lease: delivery_pb2.Lease) -> None:
        """Sends the ack of a lease the dispatcher marked acked."""
        if self._leases.get(lease.token) is None:
            with log_context(intent_id=lease.intent_id, attempt=lease.attempt):
                log.warning("acknowledging %s, which this sidecar does not hold", describe(lease))
        # Without a stream it goes out after re-registration if the lease is kept.
        if self._stream is not None:
            self._stream.send(pb.ConnectRequest(ack=delivery_pb2.AckAssignment(lease=lease)))

    async def write(self, write: delivery_pb2.IntentWrite) -> pb.WriteResult:
        """Sends a write and returns the control plane's answer after its commit.

        While the stream is down the write waits and goes out on the next
        stream; it is answered locally only when its lease is known to be gone
        (FAILED_PRECONDITION) or the sidecar is shutting down (UNAVAILABLE).
        """
        result = await self._write(write)
        metrics.record_sidecar_write(write.WhichOneof("op"), result.code)
        return result

    async def _write(self, write: delivery_pb2.IntentWrite) -> pb.WriteResult:
        if self._closing:
            return local_result(UNAVAILABLE, "the sidecar is shutting down; the write was not sent")
        reason = self._leases.gone(write.lease.token)
        if reason is not None:
            return local_result(
                FAILED_PRECONDITION, f"{describe(write.lease)} is no longer held by this sidecar ({reason})"
            )
        request_id = next(self._ids)
        pending = _PendingWrite(request_id, write, asyncio.get_running_loop().create_future())
        self._pending[request_id] = pending
        if self._stream is not None:
            self._stream.send(self._write_request(pending))
        try:
            return await pending.future
        finally:
            # Also when the caller gave up: a late result is then dropped.
            self._pending.pop(request_id, None)

    async def list_recorded_steps(self, lease: delivery_pb2.Lease, from_index: int,
                                  max_bytes: int = 0) -> pb.ListRecordedStepsResponse:
        """A page of the steps earlier attempts recorded for a held lease,
        asked on the current stream's channel as that stream. Waits out a
        reconnect; raises ``StepsUnavailable`` with the final answer."""
        retries = 0
        while True:
            stream = self._stream
            if self._closing:
                raise StepsUnavailable(UNAVAILABLE, "the sidecar is shutting down")
            reason = self._leases.gone(lease.token)
            if reason is not None:
                raise StepsUnavailable(FAILED_PRECONDITION, f"{describe(lease)} is no longer held ({reason})")
            if stream is None or stream.channel is None:
                await self.wait_connected(1.0)
                continue
            request = pb.ListRecordedStepsRequest(session_id=stream.session_id, lease=lease,
                                                  from_index=from_index, max_bytes=max_bytes)
            try:
                response: pb.ListRecordedStepsResponse = await pb_grpc.AgentServiceStub(
                    stream.channel).ListRecordedSteps(request, metadata=self._metadata or None, timeout=30.0)
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_WRITE_CODES:
                    raise StepsUnavailable(number_of(exc.code()), exc.details() or exc.code().name) from None
                log.info("fetching steps of %s: %s; retrying", describe(lease), exc.code().name)
            await asyncio.sleep(FETCH_BACKOFF.delay(retries))
            retries += 1

    async def close(self, deadline: float = 5.0) -> None:
        """Ends the stream; leases still held lapse on the server. Pending
        writes are answered UNAVAILABLE (not committed as far as we know)."""
        if self._closing:
            return
        self._closing = True
        self._closed.set()
        task = self._task
        if task is not None and self._stream is None:
            # Between streams (or stuck connecting) there is nothing to finish.
            task.cancel()
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=deadline)
            if not done:
                log.warning("upstream did not stop within %.1fs; cancelling", deadline)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                log.error("upstream loop died", exc_info=task.exception())
        for pending in list(self._pending.values()):
            pending.resolve(local_result(UNAVAILABLE, "the sidecar shut down before the control plane answered",
                                         pending.request_id))
        self._pending.clear()

    # ------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        first = True
        while not self._closing:
            if not first:
                metrics.SIDECAR_RECONNECTS.inc()
            first = False
            target = self.servers[self._rotation % len(self.servers)]
            self._rotation += 1
            began = loop.time()
            registered = False
            try:
                registered = await self._run_stream(target)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("control plane %s: %s: %s", target, exc.code().name, exc.details())
            except (ConnectError, TimeoutError) as exc:
                log.warning("control plane %s: %s", target, str(exc) or "no Registered in time")
            except Exception:
                log.exception("stream to control plane %s failed", target)
            if self._closing:
                break
            healthy = registered and loop.time() - began >= HEALTHY_STREAM_S
            failures = 0 if healthy else failures + 1
            delay = self._reconnect.delay(failures)
            log.debug("reconnecting in %.2fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)

    async def _run_stream(self, target: str) -> bool:
        """One stream, from Register to its end. True if it got registered."""
        loop = asyncio.get_running_loop()
        channel = (
            grpc.aio.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
            if self._credentials is not None
            else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        call: Any = None
        stream: _Stream | None = None
        pinger: _Pinger | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            call = pb_grpc.AgentServiceStub(channel).Connect(metadata=self._metadata or None)
            register = self._register_message()
            # Bounded as a whole: a peer that takes the connection but never
            # speaks HTTP/2 (or a black-holed replica) must not hold us here.
            async with asyncio.timeout(self._register_timeout):
                await call.write(pb.ConnectRequest(register=register))
                reply = await call.read()
            if reply is grpc.aio.EOF:
                code = await call.code()
                raise ConnectError(f"stream ended before Registered: {code.name}: {await call.details()}")
            if reply.WhichOneof("msg") != "registered":
                raise ConnectError(f"expected Registered first, got {reply.WhichOneof('msg')}")
            registered = reply.registered
            interval = registered.ping_interval_ms / 1000 or DEFAULT_PING_INTERVAL_S
            stream = _Stream(
                call=call,
                target=target,
                session_id=registered.session_id,
                ping_interval_s=max(MIN_PING_INTERVAL_S, interval),
                last_heard=loop.time(),
                sent_capacity=register.capacity,
                batches=registered.accepts_batches,
                sent_types=list(register.intent_types),
                channel=channel,
            )
            self._activate(stream, registered)
            pinger = _Pinger(stream)
            pinger.start()
            tasks = [
                asyncio.create_task(self._read_loop(stream), name="sidecar-upstream-read"),
                asyncio.create_task(self._write_loop(stream), name="sidecar-upstream-write"),
                asyncio.create_task(stream.dead.wait()),
                asyncio.create_task(self._closed.wait()),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    stream.kill(f"{task.get_name()}: {task.exception()!r}")
            if self._closing:
                log.info("closing the stream to %s", target)
            else:
                log.warning("stream to %s ended: %s", target, stream.dead_reason or "unknown reason")
            return True
        finally:
            if stream is not None:
                self._deactivate(stream)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if pinger is not None:
                await pinger.stop(deadline=1.0)
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _register_message(self) -> pb.Register:
        return pb.Register(
            sidecar_id=self.sidecar_id,
            addresses=self.addresses,
            intent_types=self.intent_types,
            capacity=self._capacity,
            held=self.held_leases(),
            accepts_batches=True,
            fetches_steps=True,
        )

    def _activate(self, stream: _Stream, registered: pb.Registered) -> None:
        """Applies Registered and makes the stream current. Synchronous on
        purpose: no write can slip between the re-send and going live."""
        kept = {lease.token for lease in registered.kept}
        lost = {lease.token for lease in registered.lost}
        for held in self._leases.bound():
            if held.lease.token in kept:
                continue
            if held.lease.token not in lost:
                log.warning("Registered did not list %s as kept or lost; treating it as lost",
                            describe(held.lease))
            self._lose(held.lease, "LEASE_LOST", "the lease was lost while the sidecar reconnected")
        self._stream = stream
        self.registrations += 1
        self.connected.set()
        log.info(
            "registered with %s (stream %s, ping every %.2fs, %d leases kept, %d lost)",
            stream.target, stream.session_id, stream.ping_interval_s, len(kept), len(lost),
        )
        # Acks before writes: a kept lease's writes need it IN_PROGRESS.
        for held in self._leases.bound():
            if held.acked and not held.ack_sent:
                stream.send(pb.ConnectRequest(ack=delivery_pb2.AckAssignment(lease=held.lease)))
        for request_id in sorted(self._pending):
            stream.send(self._write_request(self._pending[request_id]))
        self.set_capacity(self._capacity)

    def _deactivate(self, stream: _Stream) -> None:
        if self._stream is stream:
            self._stream = None
            self.connected.clear()

    def _lose(self, lease: delivery_pb2.Lease, reason: str, message: str) -> None:
        self._leases.unbind(lease.token, gone=reason)
        completing = False
        for pending in list(self._pending.values()):
            if pending.write.lease.token != lease.token:
                continue
            if pending.op == "complete" and pending.sent:
                # It may have committed before the stream broke (which is why
                # the lease reads as lost). A repeat with the same lease is OK
                # if it did, and fenced if not, so re-send it to learn which.
                completing = True
                continue
            pending.resolve(local_result(FAILED_PRECONDITION, f"{describe(lease)}: {message}",
                                         pending.request_id))
        if completing:
            # The agent learns the outcome from its CompleteIntent call.
            return
        self._notify(self._on_revocation, delivery_pb2.Revocation(lease=lease, reason=reason, message=message))

    @staticmethod
    def _write_request(pending: _PendingWrite) -> pb.ConnectRequest:
        return pb.ConnectRequest(write=pb.WriteRequest(request_id=pending.request_id, write=pending.write))

    # ------------------------------------------------------------ stream tasks

    async def _write_loop(self, stream: _Stream) -> None:
        frames = Framer(stream.outbox, limit=MAX_BATCH_MESSAGES if stream.batches else 1)
        while (queued := await frames.next()) is not None:
            messages = [message for message in queued if self._still_to_send(message)]
            if messages:
                await stream.call.write(frame(messages, _request_batch))

    def _still_to_send(self, message: pb.ConnectRequest) -> bool:
        """Marks a write or ack as sent (before the await: a message
        interrupted mid-send may have arrived); False for one not to send."""
        kind = message.WhichOneof("msg")
        if kind == "write":
            pending = self._pending.get(message.write.request_id)
            if pending is None:
                return False  # answered locally or its caller gave up meanwhile
            pending.sent = True
        elif kind == "ack":
            held = self._leases.get(message.ack.lease.token)
            if held is not None:
                if held.ack_sent:
                    return False
                held.ack_sent = True
        return True

    async def _read_loop(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await stream.call.read()
            except grpc.aio.AioRpcError as exc:
                stream.kill(f"{exc.code().name}: {exc.details()}")
                return
            if message is grpc.aio.EOF:
                code = await stream.call.code()
                stream.kill(f"the server ended the stream ({code.name}: {await stream.call.details()})")
                return
            now = loop.time()
            if now - stream.last_heard > self._silence_limit(stream):
                # We were frozen (SIGSTOP, a stalled host) or the network was:
                # our leases may have lapsed and moved on meanwhile. Nothing
                # read after such a gap may reach the agent (an OK for a step
                # would let a zombie start the next one); the re-registration
                # tells which leases are still ours.
                stream.kill(f"a message arrived after {now - stream.last_heard:.1f}s of silence")
                return
            stream.last_heard = now
            self._handle(stream, message)

    def _silence_limit(self, stream: _Stream) -> float:
        """How long this stream may have been silent before what it says next
        cannot be trusted: three ping intervals, and less than any held
        lease's heartbeat timeout (past half of it, the lease may have lapsed
        on the server before our next ping lands)."""
        limit = SILENCE_LIMIT_PINGS * stream.ping_interval_s
        for held in self._leases.bound():
            limit = min(limit, held.heartbeat_timeout_s / 2)
        return limit

    def _handle(self, stream: _Stream, message: pb.ConnectResponse) -> None:
        kind = message.WhichOneof("msg")
        if kind == "batch":
            for inner in message.batch.messages:
                if inner.WhichOneof("msg") == "batch":
                    log.warning("ignoring a batch nested in a batch from the control plane")
                else:
                    self._handle(stream, inner)
        elif kind == "ping":
            stream.send(pb.ConnectRequest(pong=pb.Pong(nonce=message.ping.nonce)))
        elif kind == "pong":
            pass  # hearing it was the point
        elif kind == "assignment":
            held = self._leases.arrive(message.assignment)
            if held is None:
                log.warning("duplicate assignment of %s ignored", describe(message.assignment.lease))
            else:
                self._notify(self._on_assignment, held)
        elif kind == "write_result":
            self._on_write_result(message.write_result)
        elif kind == "revocation":
            lease = message.revocation.lease
            log.info("%s revoked: %s %s", describe(lease), message.revocation.reason,
                     message.revocation.message)
            self._leases.unbind(lease.token, gone=message.revocation.reason or "revoked")
            self._notify(self._on_revocation, message.revocation)
        elif kind == "registered":
            log.warning("ignoring a second Registered on stream %s", stream.session_id)
        else:
            log.warning("ignoring an unknown message from the control plane: %s", kind)

    def _on_write_result(self, result: pb.WriteResult) -> None:
        pending = self._pending.pop(result.request_id, None)
        if pending is None:
            log.debug("result for write %d nobody waits for (code %d)", result.request_id, result.code)
            return
        if pending.op in TERMINAL_OPS and result.code in FINAL_CODES:
            # Answered for good: the attempt is over (or was not ours anyway).
            self._leases.unbind(pending.write.lease.token)
        elif pending.op == "wait" and result.code == OK and result.wait.parked:
            # The intent is WAITING and its lease cleared: not ours to renew or
            # announce, and a late write under it is refused here.
            self._leases.unbind(pending.write.lease.token, gone=PARKED)
        pending.resolve(result)

    @staticmethod
    def _notify(handler: Callable[[Any], None], message: Any) -> None:
        try:
            handler(message)
        except Exception:
            # One bad handoff must not take down the stream for every lease.
            log.exception("handling %s failed", type(message).__name__)
