"""The messages a sidecar sends after its registration, read and handed to
the job each belongs to: pings renew the stream's leases, acks and writes go
to the write router (bounded and paced), capacity changes to the stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import grpc

from intentd.core.errors import ValidationError
from intentd.generated.v1 import agent_service_pb2 as pb

from .. import errors
from ..leases import LeaseStore
from ..rpc import MalformedRequest
from .admission import Admission
from .registration import MAX_CAPACITY, validate_types
from .state import Stream
from .writes import WriteRouter

log = logging.getLogger("intentd.agents")

# Writes and acks of one stream processed at once; more wait, which pushes
# back on the stream through HTTP/2 flow control instead of growing memory.
MAX_CONCURRENT_WRITES = 256
# What a write's answer adds to what its request weighs (ids, times, codes):
# the room a write reserves in its stream's buffer before it is taken.
ANSWER_OVERHEAD_BYTES = 1024


class Inbound:
    """Reads one stream until it ends."""

    def __init__(self, stream: Stream, store: LeaseStore, admission: Admission, router: WriteRouter) -> None:
        self.stream = stream
        self.store = store
        self.admission = admission
        self.router = router
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_WRITES)
        self._background: set[asyncio.Task[None]] = set()
        self._renewing: asyncio.Task[None] | None = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _take_slot(self) -> None:
        """A write slot, within the stream's and its tenant's write budgets."""
        stream = self.stream
        async with stream.waiting_on_us():
            await self.admission.pace(stream.caller.tenant, stream.bucket)
            await self._slots.acquire()

    async def _ack(self, request: pb.ConnectRequest) -> None:
        try:
            await self.router.ack(self.stream, request.ack.lease)
        finally:
            self._slots.release()

    async def _write(self, request: pb.WriteRequest, promised: int) -> None:
        released = False

        def release() -> None:
            # Once: a held wait gives its slot back when it starts waiting.
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        try:
            await self.router.write(self.stream, request, on_hold=release)
        finally:
            release()
            self.stream.unreserve(promised)

    async def handle(self, request: pb.ConnectRequest) -> bool:
        """Handles one message; False ends the stream."""
        stream = self.stream
        kind = request.WhichOneof("msg")
        if kind == "ping":
            stream.send(pb.ConnectResponse(pong=pb.Pong(nonce=request.ping.nonce)))
            if self._renewing is None or self._renewing.done():
                self._renewing = asyncio.create_task(stream.leases.renew(self.store))
        elif kind == "pong":
            pass
        elif kind == "ack":
            # Bounded like writes: an ack for a lease nobody holds costs a
            # database diagnosis too.
            await self._take_slot()
            self._spawn(self._ack(request))
        elif kind == "write":
            await self._take_slot()
            # Its answer (mostly the size of the request: a step's answer
            # is the recorded step) is promised room in the buffer now.
            promised = request.write.ByteSize() + ANSWER_OVERHEAD_BYTES
            stream.reserve(promised)
            self._spawn(self._write(request.write, promised))
        elif kind == "set_capacity":
            return self._set_capacity(request.set_capacity)
        else:
            log.warning("sidecar %s sent unexpected %s; closing", stream.sidecar_id, kind)
            return False
        return True

    def _set_capacity(self, change: pb.SetCapacity) -> bool:
        stream = self.stream
        if not 0 <= change.capacity <= MAX_CAPACITY:
            log.warning("sidecar %s sent capacity %d; ignored", stream.sidecar_id, change.capacity)
            return True
        if change.HasField("intent_types"):
            # The types the sidecar's agents announced, with the capacity they bring.
            offered = change.intent_types.intent_types
            try:
                validate_types(offered, "set_capacity.intent_types")
            except ValidationError as exc:
                stream.failure = errors.InvalidArgument(str(exc))
                return False
            stream.intent_types = tuple(dict.fromkeys(offered))
            stream.recheck_delayed = True
        stream.capacity = change.capacity
        stream.wake.set()
        return True

    async def run(self, requests: AsyncIterator[pb.ConnectRequest]) -> None:
        stream = self.stream
        try:
            async for request in requests:
                stream.heard()
                if isinstance(request, MalformedRequest):
                    log.warning("sidecar %s sent a malformed message (%s); closing", stream.sidecar_id,
                                request.error)
                    stream.failure = request.invalid()
                    break
                messages: Sequence[pb.ConnectRequest]
                if request.HasField("batch"):
                    messages = request.batch.messages
                    if any(message.HasField("batch") for message in messages):
                        stream.failure = errors.InvalidArgument("batch: a batch must not contain a batch")
                        break
                else:
                    messages = [request]
                # Where a message ends the stream, the rest of its batch is not handled.
                ended = False
                for message in messages:
                    # Not read on while the sidecar leaves its answers unread.
                    await stream.room()
                    if stream.closed or not await self.handle(message):
                        ended = True
                        break
                if ended:
                    break
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            stream.close()
            # Writes already taken run to their commit; only their answers are lost.
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
