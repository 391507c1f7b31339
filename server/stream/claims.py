"""The claim loop of a stream: claims what the stream has room for, sends
it as assignments, and sleeps until a notification, a freed slot or the next
retry backoff says there may be more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from intentd.core.observability import metrics
from intentd.generated.v1 import agent_service_pb2 as pb

from .. import history
from ..db import Row
from ..leases import LeaseRef, LeaseStore
from ..settings import ServerSettings
from .leases import lease_message
from .liveness import Liveness
from .state import Stream

log = logging.getLogger("intentd.agents")

MAX_CLAIM_BATCH = 100
# A live sidecar is heard at least once a ping interval (its pings, its pongs
# to ours). One silent for longer than this many intervals may be frozen or
# cut off: nothing is claimed for it, and nothing claimed is handed to it,
# until it is heard again (else the delivery waits out the ack timeout, and
# a lease of its that lapsed could come straight back to it).
SILENT_STREAM_PINGS = 1.5


class ClaimLoop:
    def __init__(self, store: LeaseStore, settings: ServerSettings, liveness: Liveness,
                 closing: Callable[[], bool]) -> None:
        self.store = store
        self.settings = settings
        self.liveness = liveness
        self._closing = closing  # the replica is shutting down: claim nothing more

    def _silent(self, stream: Stream) -> bool:
        """True (and the stream marked to wake its claim loop when heard) if
        it was silent for longer than a live sidecar ever is."""
        silent = stream.silent_for() > SILENT_STREAM_PINGS * self.settings.ping_interval_ms / 1000
        stream.quiet = silent
        return silent

    async def _may_claim(self, stream: Stream) -> bool:
        """Before a claim: waits for room in the stream's buffer (what is
        claimed is sent at once), and checks that the key is still good."""
        await stream.room()
        return not stream.closed and await self.liveness.check_key(stream)

    async def _until_heard(self, stream: Stream, rows: Sequence[Row]) -> bool:
        """Claimed for a stream that fell silent meanwhile: waits until it is
        heard again; if it closes first, gives the claims back (never sent,
        so the attempt is not charged) and returns False."""
        cancelled = False
        try:
            while self._silent(stream) and not stream.closed:
                await stream.wake.wait()
                stream.wake.clear()
        except asyncio.CancelledError:
            cancelled = True  # the stream is ending; the claims still go back
        if not stream.closed and not cancelled:
            stream.wake.set()  # a wake-up taken here may have been meant for the next round
            return True
        for row in rows:
            with contextlib.suppress(Exception):
                await self.store.release(LeaseRef(row["id"], row["attempt"], row["lease_token"]), "DRAINED",
                                         stream=stream.id)
        if cancelled:
            raise asyncio.CancelledError
        return False

    async def run(self, stream: Stream) -> None:
        catchup = self.settings.dispatch_catchup_s
        while not stream.closed:
            # Cleared before looking, so a wake-up that arrives while we claim
            # is kept and makes the next round start at once.
            stream.wake.clear()
            timeout: float | None = catchup
            free = stream.free
            types = stream.intent_types or None  # SetCapacity may change them
            if free > 0 and not self._closing() and self._silent(stream):
                timeout = None  # the reader wakes us when the stream is heard again
            elif free > 0 and not self._closing():
                if not await self._may_claim(stream):
                    break
                want = min(free, MAX_CLAIM_BATCH)
                try:
                    rows, steps = await self.store.claim(
                        stream.id, stream.addresses, types, want, self.settings.ack_timeout_ms,
                        tenant=stream.caller.tenant, whole_history=not stream.fetches_steps)
                except Exception as exc:
                    log.warning("claim for stream %s failed: %s", stream.id, exc)
                    rows, steps = [], {}
                    timeout = 1.0
                if rows and self._silent(stream) and not await self._until_heard(stream, rows):
                    break
                for row in rows:
                    lease = LeaseRef(row["id"], row["attempt"], row["lease_token"])
                    if stream.closed:
                        break  # the lease lapses after the ack timeout and is redelivered
                    stream.leases.hold(lease, row["last_seq"])
                    metrics.DELIVERIES.inc()
                    metrics.observe_dispatch_latency((row["update_time"] - row["available_at"]).total_seconds())
                    stream.send(pb.ConnectResponse(
                        assignment=history.assignment(row, lease_message(lease), steps.get(row["id"], ()))))
                if len(rows) == want:
                    continue
                if timeout == catchup and stream.recheck_delayed:
                    stream.recheck_delayed = False
                    try:
                        wait = await self.store.seconds_until_available(
                            stream.addresses, types, tenant=stream.caller.tenant)
                    except Exception:
                        stream.recheck_delayed = True
                        wait = None
                    if wait is not None:
                        stream.recheck_delayed = True  # more may wait behind that one
                        timeout = min(catchup, max(0.001, wait))
            elif free == 0:
                timeout = None
            if timeout is None:
                await stream.wake.wait()
            else:
                try:
                    await asyncio.wait_for(stream.wake.wait(), timeout)
                except TimeoutError:
                    stream.recheck_delayed = True  # a notification may have been lost
