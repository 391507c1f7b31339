"""The one record of the leases a stream holds, and the only code that
changes it: taking a lease on, forgetting it, revoking it, judging it by a
renewal, and ordering its acknowledgement before its writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from intentd.generated.v1 import agent_service_pb2 as pb
from intentd.generated.v1 import delivery_pb2

from ..leases import LeaseRef, LeaseStore

log = logging.getLogger("intentd.agents")


def lease_message(lease: LeaseRef) -> delivery_pb2.Lease:
    return delivery_pb2.Lease(intent_id=lease.intent_id, attempt=lease.attempt, token=str(lease.token))


def lease_ref(msg: delivery_pb2.Lease) -> LeaseRef:
    return LeaseRef.parse(msg.intent_id, msg.attempt, msg.token)


@dataclass(eq=False)
class StreamLease:
    lease: LeaseRef
    since: float  # monotonic time it was added; renew results older than this judge it
    # The intent's newest event seq when this stream got the lease: events at
    # or below it happened before and say nothing about this lease.
    seq: int = 0
    finishing: bool = False  # a complete/fail/release from its holder is in flight
    # A wait write of this lease is held (holds.hold_wait): only that one
    # gives its write slot back, so repeats cannot pile up holds unbounded.
    holding: bool = False
    # Done once the lease's acknowledgement was handled (whatever its answer),
    # or at once for a lease taken on already acknowledged. The sidecar sends
    # the ack and then writes at once, and they run concurrently here: the
    # writes wait for it (see ack_settled).
    acked: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def is_of(self, token: uuid.UUID | str) -> bool:
        return str(self.lease.token) == str(token)

    async def ack_settled(self, within: float) -> None:
        """Waits, at most ``within`` seconds, until the lease's ack was
        handled; after that a write goes ahead and the database judges it."""
        if self.acked.done():
            return
        # asyncio.timeout, not wait_for: one timer handle, no extra future
        # and task per write (this runs for most writes of a fresh lease).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self.acked)

    def settle_ack(self) -> None:
        if not self.acked.done():
            self.acked.set_result(None)


class StreamLeases:
    def __init__(
        self, stream_id: str, sidecar_id: str, holders: dict[str, StreamLeases],
        send: Callable[[pb.ConnectResponse], None], wake: asyncio.Event,
    ) -> None:
        self.stream_id = stream_id
        self.sidecar_id = sidecar_id
        self._holders = holders
        self._send = send
        self._wake = wake  # the claim loop: a slot came free
        self._held: dict[str, StreamLease] = {}
        # Leases this stream revoked: if the database still has them bound to
        # the stream (it renews them with every ping), they are released.
        self._dropped: dict[str, LeaseRef] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[StreamLease]:
        return iter(list(self._held.values()))

    def get(self, intent_id: str, token: uuid.UUID | str | None = None) -> StreamLease | None:
        """The stream's lease of the intent; with ``token``, only that lease
        (the stream may already hold the intent's next attempt)."""
        held = self._held.get(intent_id)
        if held is None or (token is not None and not held.is_of(token)):
            return None
        return held

    def hold(self, lease: LeaseRef, seq: int, *, acked: bool = False) -> StreamLease:
        held = StreamLease(lease, time.monotonic(), seq=seq)
        if acked:
            held.settle_ack()
        self._held[lease.intent_id] = held
        self._holders[lease.intent_id] = self
        return held

    def forget(self, intent_id: str, token: uuid.UUID | str | None = None) -> None:
        held = self.get(intent_id, token)
        if held is None:
            return
        del self._held[intent_id]
        held.settle_ack()  # nothing waits for it any more
        if self._holders.get(intent_id) is self:
            del self._holders[intent_id]
        self._wake.set()

    def revoke(self, held: StreamLease, reason: str, message: str) -> None:
        log.info("revoking %s attempt %d from sidecar %s: %s", held.lease.intent_id, held.lease.attempt,
                 self.sidecar_id, reason)
        self.forget(held.lease.intent_id, held.lease.token)
        self._dropped[held.lease.intent_id] = held.lease
        self._send(pb.ConnectResponse(revocation=delivery_pb2.Revocation(
            lease=lease_message(held.lease), reason=reason, message=message)))

    def on_event(self, intent_id: str, seq: int, state: str) -> None:
        """An event of an intent this stream holds: an end the holder did not
        write takes the lease back from it."""
        held = self._held.get(intent_id)
        if held is None or held.finishing or seq <= held.seq:
            return
        if state in ("CANCELED", "TIMED_OUT"):
            self.revoke(held, state, f"the intent was {state.lower().replace('_', ' ')}")
        elif state in ("PENDING", "FAILED"):
            self.revoke(held, "LEASE_LOST", "the lease expired and the intent moved on")

    async def renew(self, store: LeaseStore) -> None:
        """Renews the stream's leases in the database and judges them by the
        answer: one no longer live was lost; one revoked but still bound to
        the stream is given back."""
        started = time.monotonic()
        try:
            live = await store.renew(self.stream_id)
        except Exception as exc:
            # The database is unreachable: nothing can be judged lost now.
            log.warning("lease renewal for stream %s failed: %s", self.stream_id, exc)
            return
        lost = [held for held in self._held.values()
                if held.since < started and not held.finishing and (held.lease.intent_id, held.lease.token) not in live]
        if lost:
            await self._revoke_lost(store, lost)
        # A lease this stream gave up on but the database still binds to it
        # would be renewed forever with nobody working on it: give it back.
        for intent_id, lease in list(self._dropped.items()):
            if (intent_id, lease.token) not in live:
                del self._dropped[intent_id]
            elif intent_id not in self._held:
                del self._dropped[intent_id]
                try:
                    await store.release(lease, "SIDECAR_STOPPED", stream=self.stream_id)
                    log.warning("released %s: its stream %s had dropped it but still held it", intent_id,
                                self.stream_id)
                except Exception as exc:
                    log.warning("releasing orphaned lease of %s failed: %s", intent_id, exc)

    async def _revoke_lost(self, store: LeaseStore, lost: list[StreamLease]) -> None:
        # A cancel or a deadline can reach the database before its event
        # reaches this stream: its holder is told that end, not a lapse.
        try:
            endings = await store.endings([held.lease for held in lost])
        except Exception as exc:
            log.warning("reading why leases of stream %s were lost failed: %s", self.stream_id, exc)
            endings = {}
        for held in lost:
            if self.get(held.lease.intent_id, held.lease.token) is not held:
                continue  # judged while the ends were read (an event, a finish)
            state = endings.get(held.lease.intent_id)
            if state is not None:
                self.revoke(held, state, f"the intent was {state.lower().replace('_', ' ')}")
            else:
                self.revoke(held, "LEASE_LOST", "the lease is no longer held by this stream")

    def close(self) -> None:
        """The stream ended. The leases it held are not released: they lapse
        unless the sidecar reconnects in time and re-announces them."""
        for intent_id, held in self._held.items():
            held.settle_ack()
            if self._holders.get(intent_id) is self:
                del self._holders[intent_id]
