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
from collections.abc import Callable
from typing import Protocol, TypeVar


class _Message(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Message)

# Bounds of one frame: far below the 64 MiB message limit of our channels,
# small enough that one frame does not hold up the stream for long.
MAX_BATCH_MESSAGES = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024


def take_queued(queue: asyncio.Queue[M | None], first: M, *, limit: int = MAX_BATCH_MESSAGES,
                max_bytes: int = MAX_BATCH_BYTES) -> tuple[list[M], bool]:
    """``first`` and the messages queued right behind it, without waiting.

    Stops at ``limit`` messages or once ``max_bytes`` is reached. Returns the
    messages and whether the end marker (``None``) was taken from the queue:
    it ends the stream after these messages.
    """
    messages = [first]
    size = first.ByteSize()
    while len(messages) < limit and size < max_bytes:
        try:
            message = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        if message is None:
            return messages, True
        messages.append(message)
        size += message.ByteSize()
    return messages, False


def frame(messages: list[M], batch: Callable[[list[M]], M] | None) -> M:
    """One message to write: the only one, or a batch of all when the peer takes batches.

    Without ``batch`` only a single message may be passed.
    """
    if len(messages) == 1:
        return messages[0]
    if batch is None:
        raise ValueError("several messages but the peer takes no batches")
    return batch(messages)
