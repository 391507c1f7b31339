"""The streams of one attempt (docs/streams.md): what ``ctx.emit`` hands over
and how it reaches the control plane.

``emit`` is called per LLM token, so it only encodes the chunk, appends it to
the attempt's buffer and, when the sender is idle, wakes it: no protobuf
message and no task per chunk. The sender (one task per attempt, started by
the first emit) keeps one ``EmitWrite`` in flight at a time: sent at once when
nothing is in flight, otherwise gathered until the one in flight is answered
(a write holds consecutive chunks of one stream, up to ``MAX_EMIT_CHUNKS`` /
``MAX_EMIT_BYTES``). Writes carry ``seq`` 1, 2, 3... and go through the
attempt's one fenced write path (``Attempt.write``), which retries them through
outages: a repeat is recognised by its seq, so nothing is appended twice.

The buffer is bounded (chunks not yet answered, by count and bytes): an emit
that finds it full waits for room (``SyncContext.emit`` blocks), in the order
the emits came.

Order against the records: before the attempt writes a step record, a wait, a
start of children, its result or its failure, it flushes (every chunk emitted
before that moment answered), so a position's chunks commit before its
record; the control plane drops chunks at positions already recorded.

A write refused RESOURCE_EXHAUSTED for the intent's chunks per second (the
refusal carries a retry-after) is sent again after it, its chunks keeping
their room in the buffer: a handler that emits faster than the limit is slowed
to it, not robbed. Refused for a limit that time does not lift (the intent's
bytes, its number of streams; a write with more chunks than one second
takes), a write is split in halves until what fits is appended (``_send``);
the chunks that do not fit are dropped and the next ``emit`` or
``flush_streams`` raises ``StreamLimitExceeded`` once; so does an
emit of a chunk over ``MAX_CHUNK_BYTES``, at once. When the attempt stops the
buffer is dropped.

Threads: the sender and every future live on the agent's loop; a ``def``
handler's thread appends under the buffer's lock and wakes the sender with
``call_soon_threadsafe`` (only when it is idle).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from intentd.core.limits import DEFAULT_STREAM, MAX_CHUNK_BYTES, MAX_EMIT_BYTES, MAX_EMIT_CHUNKS
from intentd.core.streams import stream_name_problem
from intentd.generated.v1 import delivery_pb2, stream_pb2

from .errors import AgentError, LeaseLost, StreamLimitExceeded, WriteError

if TYPE_CHECKING:
    from .attempt import Attempt

log = logging.getLogger("intentd.agent")

# The longest pause a rate refusal's retry-after buys (the window is 1 s).
MAX_PACE_MS = 2000
# The buffer of one attempt: chunks emitted and not yet answered.
MAX_BUFFER_BYTES = 4 * 1024 * 1024
MAX_BUFFER_CHUNKS = 100_000

TEXT = stream_pb2.CHUNK_FORMAT_TEXT
JSON = stream_pb2.CHUNK_FORMAT_JSON

# A queued item: (stream, format, data, position) for a chunk; stream None for
# a supersede of the position. Tuples, not objects: one is made per token.
Item = tuple[str | None, "stream_pb2.ChunkFormat.ValueType", bytes, int]


class Emitter:
    """The stream buffer and sender of one attempt.

    - ``chunk(data, stream)``: the item for an emit (encoded, positioned), or
      None when it belongs to a replayed step (its chunks were committed when
      it ran); raises ``ValueError`` / ``TypeError`` for a bad chunk.
    - ``offer(item)``: appends it if there is room (False: none, ``wait_room``).
    - ``wait_room(item)``: appends it once there is room.
    - ``flush(surface=)``: waits until everything emitted so far is answered.
    - ``supersede(position)``: the position is run again in this attempt.
    - ``drop()``: the attempt stopped or ended.
    """

    def __init__(self, attempt: Attempt, encode: Callable[[Any, str], bytes], *,
                 max_bytes: int | None = None, max_chunks: int | None = None) -> None:
        self._attempt = attempt
        # attempt.encode_json (the rule of the JSON the control plane stores), given to avoid an import cycle.
        self._encode = encode
        self._loop = attempt.loop
        self.max_bytes = MAX_BUFFER_BYTES if max_bytes is None else max_bytes
        self.max_chunks = MAX_BUFFER_CHUNKS if max_chunks is None else max_chunks
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        # Appends from this thread wake the sender directly.
        self._loop_thread = threading.get_ident() if running is self._loop else None
        self._lock = threading.Lock()
        self._queue: collections.deque[Item] = collections.deque()
        # Chunks and bytes emitted and not yet answered (queued or in flight).
        self._chunks = 0
        self._bytes = 0
        # Items appended, and items answered (or dropped): flush waits for the second to reach the first.
        self._appended = 0
        self._answered = 0
        # Positions this attempt emitted chunks at (and did not supersede since).
        self._positions: set[int] = set()
        self._room_waiters: collections.deque[tuple[Item, asyncio.Future[bool]]] = collections.deque()
        self._flush_waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self._error: AgentError | None = None
        self._seq = 0
        self._idle = True
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._waker: asyncio.Future[None] | None = None

    # -- the handler's side ----------------------------------------------------

    def chunk(self, data: Any, stream: str) -> Item | None:
        """The item ``emit(data, stream=stream)`` appends; None when it is dropped here."""
        attempt = self._attempt
        attempt.check_live()
        if stream != DEFAULT_STREAM:
            problem = stream_name_problem(stream)
            if problem is not None:
                raise ValueError(f"stream name {stream!r} {problem}")
            stream = stream or DEFAULT_STREAM
        if isinstance(data, str):
            try:
                raw = data.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"the chunk is not valid Unicode text ({exc.reason})") from None
            fmt = TEXT
        else:
            raw = self._encode(data, "the chunk")
            fmt = JSON
        if len(raw) > MAX_CHUNK_BYTES:
            raise StreamLimitExceeded(f"a chunk is at most {MAX_CHUNK_BYTES} bytes encoded, got {len(raw)}; "
                                      "nothing was emitted")
        position = attempt.emit_position()
        if position is None:
            return None
        return (stream, fmt, raw, position)

    def offer(self, item: Item) -> bool:
        """Appends ``item`` if the buffer has room and no earlier emit waits
        for some; raises the pending ``StreamLimitExceeded`` (once) instead."""
        with self._lock:
            self._raise_error()
            if self._closed:
                return True  # the attempt stopped: its next call says so
            if self._room_waiters or not self._fits(len(item[2])):
                return False
            wake = self._push(item)
        if wake:
            self._wake_sender()
        return True

    async def wait_room(self, item: Item) -> None:
        """Appends ``item`` once the chunks ahead of it left room (on the loop)."""
        self._attempt.check_live()
        future: asyncio.Future[bool] = self._loop.create_future()
        with self._lock:
            if self._closed:
                future.set_result(False)
            elif not self._room_waiters and self._fits(len(item[2])):
                wake = self._push(item)
                future.set_result(True)
                if wake:
                    self._wake_sender()
            else:
                self._room_waiters.append((item, future))
        try:
            admitted = await future
        except asyncio.CancelledError:
            with self._lock:
                if (item, future) in self._room_waiters:
                    self._room_waiters.remove((item, future))
            raise
        if not admitted:
            self._attempt.check_live()

    async def flush(self, *, surface: bool = False) -> None:
        """Waits until every chunk emitted before the call was answered.
        ``surface``: raise the pending ``StreamLimitExceeded`` (once), as
        ``ctx.flush_streams`` does; the attempt's own flushes before its
        records leave it for the handler's next call."""
        with self._lock:
            if self._answered >= self._appended or self._closed:
                future = None
            else:
                future = self._loop.create_future()
                self._flush_waiters.append((self._appended, future))
        if future is not None:
            await future
        # Released by drop(): the attempt stopped.
        self._attempt.check_live()
        if surface:
            with self._lock:
                self._raise_error()

    def supersede(self, position: int) -> None:
        """A failed step's position is handed back to run again: the chunks
        emitted at it so far are superseded (queued after them), when there
        are any. Any thread."""
        with self._lock:
            if self._closed or position not in self._positions:
                return
            self._positions.discard(position)
            self._queue.append((None, stream_pb2.CHUNK_FORMAT_UNSPECIFIED, b"", position))
            self._appended += 1
            wake = self._idle
            self._idle = False
        if wake:
            self._wake_sender()

    def drop(self) -> None:
        """The attempt stopped or ended: nothing more is sent (loop thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._chunks = self._bytes = 0
            waiting = [future for _, future in self._room_waiters] + [future for _, future in self._flush_waiters]
            self._room_waiters.clear()
            self._flush_waiters.clear()
        for future in waiting:
            if not future.done():
                future.set_result(False)
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    @property
    def buffered(self) -> int:
        """Chunks emitted and not yet answered."""
        return self._chunks

    # -- inside the lock -------------------------------------------------------

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _fits(self, size: int) -> bool:
        # An empty buffer takes any chunk, so a bound below a chunk cannot stall.
        return self._chunks == 0 or (self._chunks < self.max_chunks and self._bytes + size <= self.max_bytes)

    def _push(self, item: Item) -> bool:
        """Appends a chunk; whether the sender must be woken."""
        self._queue.append(item)
        self._chunks += 1
        self._bytes += len(item[2])
        self._appended += 1
        self._positions.add(item[3])
        wake = self._idle
        self._idle = False
        return wake

    def _take(self) -> tuple[delivery_pb2.EmitWrite, int, int, int] | None:
        """The next write from the head of the queue: its leading supersedes,
        then consecutive chunks of one stream within the write's bounds; with
        the items, chunks and bytes it holds. None (idle) when empty."""
        queue = self._queue
        if not queue:
            self._idle = True
            return None
        supersede: list[int] = []
        while queue and queue[0][0] is None:
            position = queue.popleft()[3]
            if position not in supersede:
                supersede.append(position)
        items = len(supersede)
        chunks: list[stream_pb2.EmitChunk] = []
        size = 0
        stream = queue[0][0] if queue else None
        while queue and len(chunks) < MAX_EMIT_CHUNKS:
            name, fmt, data, position = queue[0]
            if name != stream or size + len(data) > MAX_EMIT_BYTES:
                break
            queue.popleft()
            chunks.append(stream_pb2.EmitChunk(data=data, format=fmt, position=position))
            size += len(data)
        items += len(chunks)
        self._seq += 1
        write = delivery_pb2.EmitWrite(stream=stream or "", chunks=chunks, supersede_positions=supersede,
                                       seq=self._seq)
        return write, items, len(chunks), size

    # -- the sender (on the loop) --------------------------------------------------

    def _wake_sender(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._wake()
        else:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._closed:
            return
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name=f"intentd-emit {self._attempt.log_prefix}")
        elif self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def _run(self) -> None:
        try:
            while not self._closed:
                with self._lock:
                    taken = self._take()
                if taken is None:
                    self._waker = self._loop.create_future()
                    try:
                        await self._waker
                    finally:
                        self._waker = None
                    continue
                await self._send(*taken)
        except Exception as exc:
            # A bug, not a refusal (those are WriteError): say so once, and
            # let nothing wait for a sender that is gone.
            log.exception("%s: the stream sender failed; later chunks are dropped", self._attempt.log_prefix)
            with self._lock:
                if self._error is None:
                    self._error = AgentError(f"the stream sender failed: {exc!r}")
            self.drop()
        except LeaseLost:
            # Stopped: drop() cleared the buffer and released the waiters. The
            # handler does not await its emits, so when ours was the write
            # refused as stale, stop it as a revocation would (the sidecar
            # may not send one: it only learns of the refusal as we do).
            task = self._attempt.task
            if task is not None and not task.done():
                task.cancel()

    async def _send(self, write: delivery_pb2.EmitWrite, items: int, chunks: int, size: int) -> None:
        """Sends one write taken from the queue, and then answers its items.
        Refused whole by a limit that part of it may still fit (the intent's
        bytes; more chunks than one second takes), it is split in halves,
        each sent with the next seq: so what is appended is the longest prefix that fits,
        found in about log2(n) writes, and only the chunks from the first one
        that does not fit on are dropped."""
        parts = [write]
        while parts:
            part = parts.pop(0)
            if not part.seq:
                with self._lock:
                    self._seq += 1
                    part.seq = self._seq
            try:
                await self._deliver(part)
            except WriteError as exc:
                if exc.code == "RESOURCE_EXHAUSTED" and len(part.chunks) > 1:
                    half = len(part.chunks) // 2
                    # Seqs are given as the halves are sent: applied keys must
                    # rise in the order of the writes, or a later half would
                    # pass for a repeat.
                    parts[:0] = [
                        delivery_pb2.EmitWrite(stream=part.stream, chunks=part.chunks[:half],
                                               supersede_positions=part.supersede_positions),
                        delivery_pb2.EmitWrite(stream=part.stream, chunks=part.chunks[half:])]
                    continue
                dropped = len(part.chunks) + sum(len(p.chunks) for p in parts)
                error: AgentError = StreamLimitExceeded(exc.details) if exc.code == "RESOURCE_EXHAUSTED" else exc
                log.warning("%s: emit %d to stream %r refused; %d chunk(s) are dropped: %s",
                            self._attempt.log_prefix, part.seq, part.stream, dropped, exc)
                with self._lock:
                    if self._error is None:
                        self._error = error
                break
        self._answer(items, chunks, size)

    async def _deliver(self, write: delivery_pb2.EmitWrite) -> None:
        """One write through the attempt's write path; refused for the
        intent's chunks per second with a retry-after, sent again after it."""
        attempt = self._attempt
        message = delivery_pb2.IntentWrite(lease=attempt.lease, emit=write)
        while True:
            try:
                await attempt.write(message, f"emit {write.seq}")
                return
            except WriteError as exc:
                if exc.code != "RESOURCE_EXHAUSTED" or exc.retry_after_ms <= 0:
                    raise
                # Faster than the intent's chunks per second: the write was
                # not applied and passes once the window does. Sent again,
                # its chunks keeping their room, so the handler's emits wait
                # (backpressure) instead of losing chunks.
                log.debug("%s: emit %d paced by the control plane for %d ms: %s",
                          attempt.log_prefix, write.seq, exc.retry_after_ms, exc.details)
                await asyncio.sleep(min(exc.retry_after_ms, MAX_PACE_MS) / 1000)
                attempt.check_live()

    def _answer(self, items: int, chunks: int, size: int) -> None:
        """A write was answered (or dropped): its room goes to the emits
        waiting, in order, and the flushes it completes return."""
        done: list[asyncio.Future[bool]] = []
        with self._lock:
            if self._closed:
                return
            self._chunks -= chunks
            self._bytes -= size
            self._answered += items
            while self._room_waiters and self._fits(len(self._room_waiters[0][0][2])):
                item, future = self._room_waiters.popleft()
                self._push(item)
                done.append(future)
            still: list[tuple[int, asyncio.Future[bool]]] = []
            for target, future in self._flush_waiters:
                if target <= self._answered:
                    done.append(future)
                else:
                    still.append((target, future))
            self._flush_waiters = still
        for future in done:
            if not future.done():
                future.set_result(True)
