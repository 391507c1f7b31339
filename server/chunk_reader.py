"""Reading an intent's stream (StreamIntent, docs/streams.md): its stored
entries from an offset, then live ones as they commit, until the intent ends.

A reader only ever reads committed frames, from its cursor, and sends them in
pages; it holds about one page beside what gRPC flow control holds, and a
reader that is not read only stops reading (the writers never wait for it).
It sleeps until the hub wakes it: frames of its stream, the intent's events
(to see its end), its key, a reconnect of the listener; and it reads again
every REREAD_SECONDS in case a notification was lost. Frames committed by
this replica are handed to its readers as they commit (``hub.appended``):
a reader sends those that continue at its cursor without reading them back,
and reads the database whenever it may hold more (``_drain``).

The end: frames are only written while the intent is IN_PROGRESS, under its
row lock, so once a read of the intent finds it terminal, one more read of
the frames after it finds them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from intentd.core.limits import MAX_STREAM_PAGE_BYTES, MAX_STREAM_PAGE_ENTRIES
from intentd.core.states import IntentState

from . import errors
from .db import Database, Row
from .hub import NotificationHub, StreamSubscription
from .queries import Q
from .store import IntentStore

# The longest a following reader sleeps without reading (a lost notification
# costs at most this much delay).
REREAD_SECONDS = 5.0
# Frames one read fetches at most (a frame is one append: one EmitWrite's
# chunks, or one marker).
FETCH_FRAMES = 256
# What an entry costs in a message beside its data (offset, attempt,
# position, time, format, tags), so a page of tiny chunks stays bounded too.
ENTRY_OVERHEAD_BYTES = 40


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a stream: a chunk, or a marker (``superseded`` set)."""

    offset: int
    attempt: int
    position: int
    time: datetime
    format: int  # ChunkFormat
    data: bytes
    superseded: tuple[int, ...] | None = None
    reason: int = 0  # SupersedeReason


@dataclass(frozen=True)
class Page:
    """One StreamIntentResponse: entries in offset order; ``intent`` (the
    terminal intent) only on the last page."""

    entries: tuple[Entry, ...]
    intent: Row | None = None


@dataclass(frozen=True)
class StreamQuery:
    """A validated StreamIntent request, in the caller's tenant."""

    tenant: str
    intent_id: str
    stream: str
    from_offset: int
    skip_superseded: bool = False


@dataclass(frozen=True)
class Follow:
    """What the calling service asks of a reader while it follows."""

    key_id: str | None = None
    # Raises when the call must end (its key was revoked or expired);
    # awaited before every page and around every sleep.
    check: Callable[[], Awaitable[None]] | None = None
    # The longest sleep with nothing to wake it (the key's expiry); None: none.
    idle: Callable[[], float | None] | None = None


@dataclass(frozen=True)
class PageBounds:
    entries: int = MAX_STREAM_PAGE_ENTRIES
    bytes: int = MAX_STREAM_PAGE_BYTES
    frames: int = FETCH_FRAMES


class _Reading:
    """One call's cursor, the markers it knows and the page it fills."""

    def __init__(self, query: StreamQuery, bounds: PageBounds) -> None:
        self.query = query
        self.bounds = bounds
        self.cursor = query.from_offset  # the next offset to consider
        # position -> the highest offset of a known marker superseding it:
        # a chunk at that position below that offset is left out.
        self.superseded_below: dict[int, int] = {}
        self.entries: list[Entry] = []
        self.bytes = 0

    def learn_marker(self, offset: int, positions: list[int]) -> None:
        for position in positions:
            if self.superseded_below.get(position, -1) < offset:
                self.superseded_below[position] = offset

    def skipped(self, offset: int, position: int) -> bool:
        return self.query.skip_superseded and self.superseded_below.get(position, -1) > offset

    def take(self) -> Page:
        page = Page(tuple(self.entries))
        self.entries, self.bytes = [], 0
        return page

    def add(self, frames: list[Row]) -> list[Page]:
        """Cuts the frames (the first one at the cursor) into the entries
        past the cursor; returns the pages they filled (the rest stays)."""
        if self.query.skip_superseded:
            # Markers of this read that follow a chunk in it supersede it too.
            for frame in frames:
                if frame["superseded"] is not None:
                    self.learn_marker(frame["first_offset"], frame["superseded"])
        full: list[Page] = []
        for frame in frames:
            first, marker = frame["first_offset"], frame["superseded"]
            attempt, at = frame["attempt"], frame["time"]
            positions, formats, data = frame["positions"], frame["formats"], frame["data"]
            for i in range(max(0, self.cursor - first), frame["end_offset"] - first):
                offset = first + i
                self.cursor = offset + 1
                if marker is None and self.skipped(offset, positions[i]):
                    continue
                chunk = data[i]
                size = len(chunk) + ENTRY_OVERHEAD_BYTES
                if self.entries and (len(self.entries) >= self.bounds.entries
                                     or self.bytes + size > self.bounds.bytes):
                    full.append(self.take())
                self.entries.append(Entry(
                    offset, attempt, positions[i], at, formats[i], chunk,
                    None if marker is None else tuple(marker), frame["reason"] or 0))
                self.bytes += size
        if self.entries and len(self.entries) >= self.bounds.entries:
            full.append(self.take())
        return full


class ChunkReader:
    def __init__(self, db: Database, hub: NotificationHub, store: IntentStore, *,
                 bounds: PageBounds | None = None, reread_s: float = REREAD_SECONDS) -> None:
        self.db = db
        self.hub = hub
        self.store = store
        self.bounds = bounds or PageBounds()
        self.reread_s = reread_s

    async def streams(self, tenant: str, intent_id: str) -> list[Row]:
        """The intent's stream heads by name; NotFound outside the tenant."""
        async with self.db.connection() as conn:
            rows = await conn.fetch(Q.list_intent_streams, intent_id, tenant)
        if not rows:
            raise errors.NotFound(f"intent {intent_id!r} not found")
        return [row for row in rows if row["name"] is not None]

    async def read(self, query: StreamQuery, follow: Follow | None = None) -> AsyncIterator[Page]:
        """The pages of the stream from ``query.from_offset`` on, live, and
        last a page with the terminal intent. NotFound: no such intent in the
        tenant; FailedPrecondition: the stream was pruned."""
        follow = follow or Follow()
        reading = _Reading(query, self.bounds)
        # Subscribe before the first read: a frame committed between the read
        # and the subscription would otherwise wait for the re-read.
        with self.hub.subscribe_stream(query.intent_id, query.stream, follow.key_id) as sub:
            intent = await self.store.get(query.tenant, query.intent_id)
            await self._refuse_pruned(query)
            if query.skip_superseded:
                async with self.db.connection() as conn:
                    markers = await conn.fetch(Q.stream_markers_from, query.intent_id, query.stream,
                                               query.from_offset)
                for marker in markers:
                    reading.learn_marker(marker["first_offset"], marker["superseded"])
            while True:
                # The state before the frames: see the module's docstring.
                terminal = IntentState(intent["state"]).terminal
                if terminal:
                    sub.must_read = True  # the frames after the end's read: all of them, from the database
                async for page in self._drain(reading, follow, sub):
                    yield page
                if terminal:
                    # Pruning deletes the frames after the end: frames read
                    # before a head that is not pruned are all there were.
                    await self._refuse_pruned(query)
                    yield Page((), intent)
                    return
                if self.hub.closing:
                    raise errors.Unavailable(
                        "server is shutting down; reconnect with from_offset after the last entry")
                woken = await self._sleep(sub, intent, follow)
                if not woken:
                    sub.must_read = True  # the re-read that covers a lost notification
                if not woken or sub.intent_moved:
                    sub.intent_moved = False
                    intent = await self.store.get(query.tenant, query.intent_id)

    async def _drain(self, reading: _Reading, follow: Follow, sub: StreamSubscription) -> AsyncIterator[Page]:
        """Every committed entry past the cursor, in pages (the last one
        possibly short): first the frames this replica handed over that
        continue at the cursor, then, when the database may hold more (a
        notification past the cursor, a wake-up that was not a frame's, a
        hand-over with a gap), the frames read from it."""
        query, bounds = reading.query, reading.bounds
        while True:
            progressed = False
            handed = sub.frames_at(reading.cursor)
            if handed:
                progressed = True
                for page in reading.add(handed):
                    await _check(follow)
                    yield page
            if sub.must_read or sub.notified_end > reading.cursor:
                sub.must_read = False
                async with self.db.connection() as conn:
                    frames = await conn.fetch(Q.stream_frames_from, query.intent_id, query.stream, reading.cursor,
                                              bounds.frames, bounds.bytes)
                more = bool(frames) and (len(frames) >= bounds.frames or frames[-1]["upto"] >= bounds.bytes)
                for page in reading.add(frames):
                    await _check(follow)
                    yield page
                if more:
                    sub.must_read = True
                progressed = progressed or bool(frames)
            if not progressed:
                break
        if reading.entries:
            await _check(follow)
            yield reading.take()

    async def _sleep(self, sub: StreamSubscription, intent: Row, follow: Follow) -> bool:
        await _check(follow)
        sub.seen = intent["last_seq"]
        timeout = self.reread_s
        idle = follow.idle() if follow.idle is not None else None
        if idle is not None:
            timeout = min(timeout, idle)
        woken = await sub.wait(timeout)
        await _check(follow)
        return woken

    async def _refuse_pruned(self, query: StreamQuery) -> None:
        async with self.db.connection() as conn:
            head = await conn.fetchrow(Q.stream_head, query.intent_id, query.stream)
        if head is not None and head["pruned"]:
            raise errors.FailedPrecondition(
                f"stream {query.stream!r} of intent {query.intent_id!r} was pruned (its intent type keeps "
                "streams for stream_keep_ms after the intent ends)")


async def _check(follow: Follow) -> None:
    if follow.check is not None:
        await follow.check()
