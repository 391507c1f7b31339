"""LISTEN/NOTIFY fan-out inside one control-plane replica.

One dedicated connection listens on the intentd channels. Watchers and
waiters subscribe to an intent id (and the API key they call with);
stream readers to an intent's stream as well; dispatchers subscribe to
addresses. A notification is only a wake-up:
subscribers always read the truth from the database. An idle subscriber
costs the database nothing: it sleeps until woken, by a notification about
its intent or key, by a reconnect of the listener (after which everybody
re-reads, since notifications may have been missed), or by the catch-up,
one query per CATCHUP_SECONDS for all subscriptions of the replica, which
wakes those whose intent moved past what they saw (a notification lost
while connected, which PostgreSQL does not do short of its queue filling).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import asyncpg

from intentd.core.observability import metrics

from .db import Row
from .queries import Q

log = logging.getLogger("intentd.hub")

EVENTS_CHANNEL = "intentd_events"
PENDING_CHANNEL = "intentd_pending"
KEYS_CHANNEL = "intentd_keys"
# A statement wrote child notices (migration 0011): the child sweeper runs.
CHILDREN_CHANNEL = "intentd_children"
# A statement appended stream frames (migration 0012): their readers read.
STREAMS_CHANNEL = "intentd_streams"
CATCHUP_SECONDS = 10.0
# Frames handed to one stream reader of this replica and not sent yet; past
# either bound it reads them from the database instead.
MAX_PENDING_FRAMES = 64
MAX_PENDING_BYTES = 4 * 1024 * 1024
_CATCHUP_CHUNK = 5000


def parse_events(payload: str) -> Iterator[tuple[str, int | None, str]]:
    """The events of an ``intentd_events`` notification: one
    ``intent_id:seq:state`` line per event (migration 0003 sends all the
    events of a statement together; before it, a notification was one such
    line, which parses the same). A line whose seq does not parse still
    wakes the intent's subscribers, with seq None."""
    for line in payload.split("\n"):
        intent_id, _, rest = line.partition(":")
        if not intent_id:
            continue
        seq_text, _, state = rest.partition(":")
        try:
            seq: int | None = int(seq_text)
        except ValueError:
            seq = None
        yield intent_id, seq, state


def parse_streams(payload: str) -> Iterator[tuple[str, str, int | None]]:
    """The streams of an ``intentd_streams`` notification: one
    ``intent_id:stream:end_offset`` line per stream a statement appended to.
    A stream name may hold ':' (an intent id never does), so the id ends at
    the first ':' and the offset starts after the last one. A line whose
    offset does not parse still wakes the stream's readers, with None."""
    for line in payload.split("\n"):
        intent_id, _, rest = line.partition(":")
        stream, _, offset_text = rest.rpartition(":")
        if not intent_id or not stream:
            continue
        try:
            offset: int | None = int(offset_text)
        except ValueError:
            offset = None
        yield intent_id, stream, offset


class Subscription:
    def __init__(self, key_id: str | None = None) -> None:
        self._event = asyncio.Event()
        self.key_id = key_id
        # The intent's newest event seq the subscriber has seen; the
        # catch-up wakes it when the database has a newer one.
        self.seen = 0

    def notify(self) -> None:
        self._event.set()

    def notify_event(self, state: str) -> None:
        """An event of the intent, ``state`` the intent's state after it."""
        self.notify()

    async def wait(self, timeout: float | None) -> bool:
        """True when woken, False on timeout. Clears the wake-up."""
        try:
            if timeout is None:
                await self._event.wait()
            else:
                await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._event.clear()


class _Relay(Subscription):
    """Stands for a subscription under other intents' ids, and wakes it only
    for their events that end in ``states`` (and whenever everybody must
    re-read: a reconnect, the catch-up)."""

    def __init__(self, target: Subscription, states: frozenset[str]) -> None:
        super().__init__()
        self.target = target
        self.states = states

    def notify(self) -> None:
        self.target.notify()

    def notify_event(self, state: str) -> None:
        if state in self.states:
            self.target.notify()


class StreamSubscription(Subscription):
    """A stream reader's wake-ups: for new frames of its stream and for
    whatever may have changed its intent (an event, the catch-up, a
    reconnect, its key). ``intent_moved`` tells the reader whether it must
    read the intent again or only the frames."""

    def __init__(self, key_id: str | None = None) -> None:
        super().__init__(key_id)
        self.intent_moved = False
        # Frames this replica committed, handed over as they committed (see
        # ``frames_at``), bounded; and what says the database may hold more:
        # the highest end offset notified, and ``must_read`` (set by every
        # wake-up that is not a frame's: a reconnect, the catch-up, an event).
        self.pending: collections.deque[Row] = collections.deque()
        self._pending_bytes = 0
        self.notified_end = -1
        self.must_read = True

    def notify(self) -> None:
        self.intent_moved = True
        self.must_read = True
        super().notify()

    def notify_frames(self, end_offset: int | None = None) -> None:
        if end_offset is None:
            self.must_read = True
        else:
            self.notified_end = max(self.notified_end, end_offset)
        self._event.set()

    def hand_over(self, frame: Row) -> None:
        """A frame this replica just committed (the columns of
        ``stream_frames``), for the reader to send without reading it back."""
        size = sum(len(d) for d in frame["data"])
        if len(self.pending) >= MAX_PENDING_FRAMES or self._pending_bytes + size > MAX_PENDING_BYTES:
            # A reader that is behind reads from the database anyway.
            self.pending.clear()
            self._pending_bytes = 0
            self.must_read = True
        else:
            self.pending.append(frame)
            self._pending_bytes += size
        self.notify_frames(int(frame["end_offset"]))

    def frames_at(self, cursor: int) -> list[Row]:
        """The handed-over frames that continue the stream exactly at
        ``cursor``, in order (those the reader read past are dropped). When
        the first one left does not start there, a frame is missing from the
        hand-over (another replica's, a marker, one that overflowed): they
        are dropped and the reader reads the database."""
        out: list[Row] = []
        while self.pending:
            frame = self.pending[0]
            if frame["end_offset"] <= cursor:
                self._drop_first()
            elif frame["first_offset"] == cursor:
                out.append(frame)
                cursor = int(frame["end_offset"])
                self._drop_first()
            else:
                self.pending.clear()
                self._pending_bytes = 0
                self.must_read = True
                break
        return out

    def _drop_first(self) -> None:
        frame = self.pending.popleft()
        self._pending_bytes -= sum(len(d) for d in frame["data"])


class NotificationHub:
    def __init__(self, url: str, *, reconnect_delay: float = 0.5, application_name: str = "intentd") -> None:
        self._url = url
        self._application_name = application_name
        self._reconnect_delay = reconnect_delay
        self._intents: dict[str, set[Subscription]] = defaultdict(set)
        self._by_key: dict[str, set[Subscription]] = defaultdict(set)
        self._streams: dict[tuple[str, str], set[StreamSubscription]] = defaultdict(set)
        self._key_listeners: list[Callable[[str], None]] = []
        self._catchup: asyncio.Task[None] | None = None
        self._conn_lock = asyncio.Lock()
        self._pending_listeners: list[Callable[[str], None]] = []
        self._children_listeners: list[Callable[[], None]] = []
        self._event_listeners: list[Callable[[str, int, str], None]] = []
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()
        self.notifications = 0

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notification-hub")
        self._catchup = asyncio.create_task(self._catch_up(), name="notification-hub-catchup")
        # Do not serve before we listen, or the first sends' wake-ups are lost
        # (they would still be found by the catch-up, only later).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), 10)

    async def close(self) -> None:
        self._closing = True
        self._wake_all()
        for task in (self._task, self._catchup):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)

    @contextlib.contextmanager
    def subscribe_intent(self, intent_id: str, key_id: str | None = None, also: Sequence[str] = (),
                         also_states: frozenset[str] = frozenset()) -> Iterator[Subscription]:
        """Wake-ups for changes of the intent (and for the events of the
        intents ``also`` names that leave them in ``also_states``: the ends of
        the children a held AGENT wait waits for) and, with ``key_id``, of
        that API key (so a revocation ends the call at once)."""
        sub = Subscription(key_id)
        with self._subscribed(sub, intent_id, key_id, also, also_states):
            yield sub

    @contextlib.contextmanager
    def _subscribed(self, sub: Subscription, intent_id: str, key_id: str | None, also: Sequence[str] = (),
                    also_states: frozenset[str] = frozenset()) -> Iterator[None]:
        names: list[tuple[dict[str, set[Subscription]], str, Subscription]] = [(self._intents, intent_id, sub)]
        if also:
            relay = _Relay(sub, also_states)
            names += [(self._intents, i, relay) for i in dict.fromkeys(also) if i != intent_id]
        if key_id:
            names.append((self._by_key, key_id, sub))
        for index, name, member in names:
            index[name].add(member)
        try:
            yield
        finally:
            for index, name, member in names:
                subs = index.get(name)
                if subs is not None:
                    subs.discard(member)
                    if not subs:
                        del index[name]

    @contextlib.contextmanager
    def subscribe_stream(self, intent_id: str, stream: str, key_id: str | None = None
                         ) -> Iterator[StreamSubscription]:
        """Wake-ups for frames appended to the intent's stream, and, as
        ``subscribe_intent`` gives them, for the intent's changes (so the
        reader sees its end) and the API key's. Frames wake only their
        stream's readers, never the intent's watchers."""
        sub = StreamSubscription(key_id)
        readers = self._streams[(intent_id, stream)]
        readers.add(sub)
        try:
            with self._subscribed(sub, intent_id, key_id):
                yield sub
        finally:
            readers.discard(sub)
            if not readers and self._streams.get((intent_id, stream)) is readers:
                del self._streams[(intent_id, stream)]

    def on_key(self, callback: Callable[[str], None]) -> None:
        """Calls ``callback(key_id)`` when an API key changed, and
        ``callback("")`` when changes may have been missed (a reconnect).
        Called before the key's subscribers are woken."""
        self._key_listeners.append(callback)

    def on_pending(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Calls ``callback(address)`` when an intent becomes PENDING; returns
        a function that unsubscribes."""
        self._pending_listeners.append(callback)
        return lambda: self._pending_listeners.remove(callback)

    def on_children(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Calls ``callback()`` when child notices were written (and after a
        reconnect, when some may have been missed); returns a function that
        unsubscribes."""
        self._children_listeners.append(callback)
        return lambda: self._children_listeners.remove(callback)

    def on_event(self, callback: Callable[[str, int, str], None]) -> Callable[[], None]:
        """Calls ``callback(intent_id, seq, state_after)`` for every committed
        event. Notifications are not ordered against anything else: listeners
        must judge an event by its seq, never by its arrival."""
        self._event_listeners.append(callback)
        return lambda: self._event_listeners.remove(callback)

    def _wake_all(self) -> None:
        for callback in list(self._key_listeners):
            callback("")
        for subs in list(self._intents.values()):
            for sub in list(subs):
                sub.notify()
        for callback in list(self._pending_listeners):
            callback("")
        for wake in list(self._children_listeners):
            wake()

    def _on_children(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.labels(channel="children").inc()
        for wake in list(self._children_listeners):
            wake()

    def appended(self, intent_id: str, stream: str, frame: Row | None) -> None:
        """This replica committed a frame of the stream (the columns of
        ``stream_frames``): its readers here get it now, not a notification
        round trip and a read later (the notification still comes, and wakes
        the other replicas' readers). None: a frame was committed but is not
        at hand; they read it."""
        for sub in list(self._streams.get((intent_id, stream), ())):
            if frame is None:
                sub.notify_frames(None)
            else:
                sub.hand_over(frame)

    def _on_streams(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.labels(channel="streams").inc()
        for intent_id, stream, offset in parse_streams(payload):
            for sub in list(self._streams.get((intent_id, stream), ())):
                sub.notify_frames(offset)

    def _on_event(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.labels(channel="events").inc()
        listeners = list(self._event_listeners)
        for intent_id, seq, state in parse_events(payload):
            subs = self._intents.get(intent_id)
            if subs:
                for sub in list(subs):
                    sub.notify_event(state)
            if seq is not None:
                for listener in listeners:
                    listener(intent_id, seq, state)

    def _on_key(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.labels(channel="keys").inc()
        for callback in list(self._key_listeners):
            callback(payload)
        for sub in list(self._by_key.get(payload, ())):
            sub.notify()

    async def _catch_up(self) -> None:
        while not self._closing:
            await asyncio.sleep(CATCHUP_SECONDS)
            conn = self._conn
            if conn is None or not self._intents:
                continue
            ids = list(self._intents)
            try:
                newest: dict[str, int] = {}
                for start in range(0, len(ids), _CATCHUP_CHUNK):
                    async with self._conn_lock:  # one query at a time on the listener's connection
                        rows = await asyncio.wait_for(
                            conn.fetch(Q.intents_last_seq, ids[start:start + _CATCHUP_CHUNK]), 5)
                    newest.update((row["id"], row["last_seq"]) for row in rows)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("catch-up read failed (%s); the reconnect wakes everyone", type(exc).__name__)
                continue
            for intent_id in ids:
                seq = newest.get(intent_id)
                for sub in list(self._intents.get(intent_id, ())):
                    if seq is None or seq > sub.seen:
                        sub.notify()

    def _on_pending(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.labels(channel="pending").inc()
        for callback in list(self._pending_listeners):
            callback(payload)

    async def _run(self) -> None:
        while not self._closing:
            try:
                conn = await asyncpg.connect(
                    self._url, timeout=10, server_settings={"application_name": self._application_name})
                self._conn = conn
                await conn.add_listener(EVENTS_CHANNEL, self._on_event)
                await conn.add_listener(PENDING_CHANNEL, self._on_pending)
                await conn.add_listener(KEYS_CHANNEL, self._on_key)
                await conn.add_listener(CHILDREN_CHANNEL, self._on_children)
                await conn.add_listener(STREAMS_CHANNEL, self._on_streams)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                self.connected.set()
                # Anything that happened while we were not listening must be re-read.
                self._wake_all()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                    if not lost.is_set():
                        # Detects a half-open connection the socket did not report.
                        async with self._conn_lock:
                            await asyncio.wait_for(conn.execute(Q.ping), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    log.warning("listener connection lost (%s); reconnecting", type(exc).__name__)
            self.connected.clear()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.terminate()
                self._conn = None
            if not self._closing:
                await asyncio.sleep(self._reconnect_delay)
