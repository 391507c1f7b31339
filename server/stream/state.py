"""The state of one sidecar stream and its end: what it registered with, its
outbox and the buffer bound on it, when it was last heard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import InitVar, dataclass, field

from intentd.core.framing import Outbox
from intentd.generated.v1 import agent_service_pb2 as pb

from .. import errors
from ..auth import Caller
from ..quotas import Bucket
from .leases import StreamLeases

log = logging.getLogger("intentd.agents")

# Messages queued for one stream before it counts as a consumer that stopped
# reading (its bytes are bounded by ServerSettings.stream_buffer_bytes).
MAX_OUTBOX = 10_000


@dataclass(eq=False)
class Stream:
    caller: Caller
    sidecar_id: str
    addresses: tuple[str, ...]
    intent_types: tuple[str, ...]
    capacity: int
    # Bytes queued toward the sidecar (and promised to writes in flight)
    # beyond which the stream is not read (ServerSettings.stream_buffer_bytes).
    buffer_bytes: int
    # Which stream holds each intent, across the streams of this replica
    # (kept by each stream's StreamLeases).
    holders: InitVar[dict[str, StreamLeases]]
    batches: bool = False  # the sidecar takes ConnectResponse.batch
    fetches_steps: bool = False  # the sidecar fetches recorded steps past an assignment's first page
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    leases: StreamLeases = field(init=False)
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
    # claim loop last asked when the next one becomes claimable. Only a
    # change to PENDING (which notifies) or a lost notification (the catch-up
    # timer) can add one, so a completion's wake-up need not ask again.
    recheck_delayed: bool = True
    last_heard: float = field(default_factory=time.monotonic)
    # Messages the reader keeps while it waits for this server's own write
    # budgets or write slots: the sidecar was heard, and is not read on
    # because of us, so that time never counts as its silence.
    kept_waiting: int = 0
    # The claim loop waits for the stream to be heard again (see claims.SILENT_STREAM_PINGS).
    quiet: bool = False
    closed: bool = False
    # Why the server ends the stream, when it is the sidecar's fault.
    failure: errors.ServerError | None = None

    def __post_init__(self, holders: dict[str, StreamLeases]) -> None:
        self.leases = StreamLeases(self.id, self.sidecar_id, holders, self.send, self.wake)

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.leases))

    @property
    def queued_bytes(self) -> int:
        return self.outbox.bytes + self.reserved

    def silent_for(self) -> float:
        """Seconds since the sidecar was last heard, none while the reader
        keeps one of its messages waiting."""
        return 0.0 if self.kept_waiting else time.monotonic() - self.last_heard

    def heard(self) -> None:
        self.last_heard = time.monotonic()
        if self.quiet:
            self.quiet = False
            self.wake.set()

    @contextlib.asynccontextmanager
    async def waiting_on_us(self) -> AsyncIterator[None]:
        """Around a wait of the reader for this server's own budgets."""
        self.kept_waiting += 1
        try:
            yield
        finally:
            self.kept_waiting -= 1
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
