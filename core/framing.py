"""Coalescing a stream's queued messages into one batch frame.

Each gRPC stream message costs a syscall, an HTTP/2 frame and a trip through
grpc core on both ends, whatever its size. Under load a stream's writer
finds many small messages queued behind the one it just sent (acks, writes,
results, assignments); sending them as one ``batch`` message pays that cost
once. Nothing waits to fill a batch: an idle stream sends each message alone,
as soon as it is queued, so batching adds no latency.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class _Message(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Message)

# The message size limit of the sidecar's channels, both ways, upstream and to
# its agents: an assignment carries the results of the steps already
# recorded, which can add up past gRPC's default of 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# Bounds of one frame. Bytes: well under the smallest message limit on our
# streams (4 MiB, gRPC's default, which an agent in another language may
# keep), so a frame is never refused where its messages alone would pass.
MAX_BATCH_MESSAGES = 256
MAX_BATCH_BYTES = 1024 * 1024


class Outbox(asyncio.Queue[M | None]):
    """A stream's queue of messages to send (``None`` ends it) that knows how
    many bytes it holds, so a stream can be bounded in bytes, not only in
    messages: ``bytes``, and ``taken`` (set whenever a message leaves) to
    wait on for room."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.bytes = 0
        self._sizes: deque[int] = deque()
        self.taken = asyncio.Event()

    def _put(self, item: M | None) -> None:
        size = 0 if item is None else item.ByteSize()
        self._sizes.append(size)
        self.bytes += size
        super()._put(item)

    def _get(self) -> M | None:
        item = super()._get()
        self.bytes -= self._sizes.popleft()
        self.taken.set()
        return item


class Framer(Generic[M]):
    """Reads a stream's outbox (``None`` ends it) as the frames to write:
    the next message and those queued right behind it, without waiting.

    A frame stops at ``limit`` messages or before the message that would take
    it past ``max_bytes`` (that one starts the next frame; a message larger
    than ``max_bytes`` goes alone). ``limit`` 1: the peer takes no batches.
    """

    def __init__(self, queue: asyncio.Queue[M | None], *, limit: int = MAX_BATCH_MESSAGES,
                 max_bytes: int = MAX_BATCH_BYTES) -> None:
        self._queue = queue
        self.limit = limit
        self._max_bytes = max_bytes
        self._carry: M | None = None
        self._ended = False

    async def next(self) -> list[M] | None:
        """The next frame's messages; None once the end marker was read."""
        if self._ended:
            return None
        first = self._carry
        self._carry = None
        if first is None:
            first = await self._queue.get()
            if first is None:
                self._ended = True
                return None
        messages = [first]
        size = first.ByteSize()
        while len(messages) < self.limit:
            try:
                message = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if message is None:
                self._ended = True
                break
            size += message.ByteSize()
            if size > self._max_bytes:
                self._carry = message
                break
            messages.append(message)
        return messages


def frame(messages: list[M], batch: Callable[[list[M]], M]) -> M:
    """One message to write: the only one, or a batch of them all."""
    return messages[0] if len(messages) == 1 else batch(messages)
