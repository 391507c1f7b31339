"""The one record of the leases this sidecar holds.

The upstream (the stream to the control plane) and the dispatcher (the
attached agents) both read and change the same ``HeldLease`` per intent, so
"acked", "placed on which agent" and "announced on reconnect" each exist once.
A record has two halves that end independently, and it is forgotten when both
have ended:

- ``bound``: the control plane holds the lease for our stream, so it is
  renewed by our pings, announced in ``Register.held`` on reconnect, and
  bounds how long the stream may stay silent (its heartbeat timeout);
- ``place``: where it is here (``NEW``, ``WAITING`` for an agent, on an
  ``AGENT``, or ``DONE`` when no agent here runs it any more).

The life of a lease in the sidecar, and the event behind each move:

1. An ``Assignment`` arrives on the stream: the upstream adds the record
   (bound, ``NEW``; a token already held is a duplicate and ignored) and hands
   it to the dispatcher.
2. The dispatcher takes it: ``NEW -> AGENT`` when an attached agent handles
   the type and has a free slot (it gets the assignment), else
   ``NEW -> WAITING`` with a placement timer; while draining, ``NEW -> DONE``
   and a release (``DRAINED``) goes upstream.
3. ``WAITING -> AGENT`` when an agent attaches or a slot frees up;
   ``WAITING -> DONE`` (and a ``DRAINED`` release) when the placement timer
   fires or the sidecar starts draining.
4. On an agent, the agent's ack (or its first write, which may overtake the
   ack) sets ``acked``, once: a second ack would read as a stale lease. The
   upstream sets ``ack_sent`` when it hands the ack to a stream; an ack made
   while no stream was up goes out after re-registration, before the writes.
5. ``AGENT -> DONE`` when its agent's Attach stream ends (release
   ``AGENT_DIED``), on ``release_all`` at the end of a drain (revoked on the
   agent, released ``DRAINED``), when a write is answered stale or a
   complete/fail is answered OK, when a wait is answered parked (the intent
   is WAITING: nothing is released, the agent ends the handler), when the
   control plane revokes it, or when the recorded steps an old agent needs
   cannot be fetched. A wait answered resolved, and a start of child
   intents, add their records to the history, as a recorded step does.
6. Unbound when the control plane revokes it, when re-registration does not
   list it as kept (lost: its pending writes are refused, except a complete
   that may have committed, and the agent is told), when a
   complete/fail/release is answered for good, or when a wait is answered
   parked (the control plane cleared the lease: gone as ``PARKED``). Revoked and lost tokens are
   remembered (``gone``) so late writes for them are refused locally; a
   release in flight keeps a ``DONE`` record bound until its answer.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from intentd.generated.v1 import delivery_pb2, intent_pb2

# Lost or revoked lease tokens remembered to refuse late writes locally.
GONE_MEMORY = 4096
# Recorded steps kept per held intent, beyond the page being replayed: the
# newest this attempt recorded (a BeginStep for an older one fetches it).
WINDOW_BYTES = 2 * 1024 * 1024
# What the control plane uses when an assignment does not say.
DEFAULT_HEARTBEAT_TIMEOUT_MS = 10_000


class Place(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    AGENT = "agent"
    DONE = "done"


@dataclass(eq=False)
class History:
    """What the sidecar keeps of an attempt's recorded steps: the highest
    recorded position and a window of them (the page the agent replays
    from), never the whole history. Replays go forward, so a fetched page
    replaces the steps before it.

    Positions may be holes (concurrent steps of an earlier attempt that did
    not finish, below others that did), and steps are recorded out of order.
    A page holds every step recorded from its first index up to its last one
    (pages are cut after a step, never between), so positions ``low`` to
    ``high`` that the window lacks are known holes: BeginStep answers them
    "not recorded" without fetching again.
    """

    recorded: int
    window: dict[int, intent_pb2.StepRecord] = field(default_factory=dict)
    size: int = 0  # bytes in the window
    fetching: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The positions the window answers for, recorded or hole (none: low > high).
    low: int = 1
    high: int = 0

    @classmethod
    def of(cls, assignment: delivery_pb2.Assignment) -> History:
        # A server that pages says up to where; an older one sends them all.
        history = cls(max([assignment.recorded_steps, *(step.index for step in assignment.steps)]))
        if assignment.steps:
            # The first page, from position 1 (a claim may carry none of it:
            # then nothing is known yet).
            history.keep(assignment.steps, 1)
        return history

    def keep(self, steps: Iterable[intent_pb2.StepRecord], first: int) -> None:
        """A page fetched from position ``first`` on replaces the window;
        records this attempt added meanwhile inside the page's span stay (the
        page may have been read before they committed). An empty page says
        nothing is recorded from ``first`` on: that position is a hole."""
        page = {step.index: step for step in steps}
        low, high = first, max(page, default=first)
        for index, step in self.window.items():
            if low <= index <= high and index not in page:
                page[index] = step
        self.window = page
        self.size = sum(step.ByteSize() for step in page.values())
        self.low, self.high = low, high

    def answers(self, index: int) -> bool:
        """Whether the window says for sure if ``index`` is recorded."""
        return index in self.window or self.low <= index <= self.high or index > self.recorded

    def add(self, record: intent_pb2.StepRecord) -> None:
        """A step this attempt recorded; the oldest ones leave the window
        when it grows past WINDOW_BYTES."""
        self.recorded = max(self.recorded, record.index)
        old = self.window.pop(record.index, None)
        if old is not None:
            self.size -= old.ByteSize()
        self.window[record.index] = record
        self.size += record.ByteSize()
        while self.size > WINDOW_BYTES and len(self.window) > 1:
            gone = min(self.window)
            self.size -= self.window.pop(gone).ByteSize()
            # The window no longer answers for it, nor below it.
            self.low = max(self.low, gone + 1)


@dataclass(eq=False)
class HeldLease:
    """One lease this sidecar holds: its stage in the life above."""

    assignment: delivery_pb2.Assignment
    history: History
    # The server lets the lease lapse after this long without a ping from us.
    heartbeat_timeout_s: float
    bound: bool = True
    place: Place = Place.NEW
    # Set while place is AGENT.
    agent_id: int | None = None
    # The agent took it.
    acked: bool = False
    # The ack was handed to a stream. It is never sent twice: a second ack of
    # an IN_PROGRESS lease is refused, and the server revokes the lease then.
    ack_sent: bool = False
    # Gives a WAITING lease back when no agent takes it in time.
    expiry: asyncio.TimerHandle | None = None

    @property
    def lease(self) -> delivery_pb2.Lease:
        return self.assignment.lease

    @property
    def local(self) -> bool:
        """The dispatcher has it (waiting for an agent or on one)."""
        return self.place in (Place.WAITING, Place.AGENT)


class SidecarLeases:
    """Every lease this sidecar holds, by token, and the tokens it lost."""

    def __init__(self) -> None:
        self._leases: dict[str, HeldLease] = {}
        # Which leases each agent runs: derived from the records' placements,
        # kept so an agent's free slots are counted without a scan.
        self._by_agent: dict[int, set[str]] = {}
        # The same for the queue (in arrival order) and for every lease the
        # dispatcher has: each finished intent asks both, so neither is a scan.
        self._waiting: dict[str, HeldLease] = {}
        self._local = 0
        self._gone: OrderedDict[str, str] = OrderedDict()

    def arrive(self, assignment: delivery_pb2.Assignment) -> HeldLease | None:
        """Records an assignment from the control plane; None for a duplicate."""
        token = assignment.lease.token
        if token in self._leases:
            return None
        self._gone.pop(token, None)
        held = HeldLease(assignment, History.of(assignment),
                         (assignment.heartbeat_timeout_ms or DEFAULT_HEARTBEAT_TIMEOUT_MS) / 1000)
        self._leases[token] = held
        return held

    def get(self, token: str) -> HeldLease | None:
        return self._leases.get(token)

    def placed(self, token: str) -> HeldLease | None:
        """The lease if the dispatcher has it."""
        held = self._leases.get(token)
        return held if held is not None and held.local else None

    def bound(self) -> list[HeldLease]:
        return [held for held in self._leases.values() if held.bound]

    def local(self) -> list[HeldLease]:
        return [held for held in self._leases.values() if held.local]

    def local_count(self) -> int:
        return self._local

    def waiting(self) -> list[HeldLease]:
        return list(self._waiting.values())

    def on_agent(self, agent_id: int) -> list[HeldLease]:
        return [self._leases[token] for token in self._by_agent.get(agent_id, ())]

    def count_on(self, agent_id: int) -> int:
        return len(self._by_agent.get(agent_id, ()))

    def ack(self, held: HeldLease) -> bool:
        """The agent took it; False if it already had (its ack went out then)."""
        first, held.acked = not held.acked, True
        return first

    def wait(self, held: HeldLease) -> None:
        self._local += not held.local
        held.place = Place.WAITING
        self._waiting[held.lease.token] = held

    def place(self, held: HeldLease, agent_id: int) -> None:
        self._local += not held.local
        self._waiting.pop(held.lease.token, None)
        held.place, held.agent_id = Place.AGENT, agent_id
        self._by_agent.setdefault(agent_id, set()).add(held.lease.token)
        self._cancel_expiry(held)

    def finish(self, held: HeldLease) -> bool:
        """No agent here runs it any more; False if none did."""
        was_local = held.local
        self._local -= was_local
        self._waiting.pop(held.lease.token, None)
        self._cancel_expiry(held)
        if held.agent_id is not None:
            on_agent = self._by_agent.get(held.agent_id, set())
            on_agent.discard(held.lease.token)
            if not on_agent:
                self._by_agent.pop(held.agent_id, None)
        held.place, held.agent_id = Place.DONE, None
        self._forget_if_ended(held)
        return was_local

    def unbind(self, token: str, gone: str | None = None) -> HeldLease | None:
        """The control plane no longer holds it for us; ``gone`` (why it was
        revoked or lost) refuses later writes with its token."""
        if gone is not None:
            self._gone[token] = gone
            self._gone.move_to_end(token)
            while len(self._gone) > GONE_MEMORY:
                self._gone.popitem(last=False)
        held = self._leases.get(token)
        if held is not None:
            held.bound = False
            self._forget_if_ended(held)
        return held

    def gone(self, token: str) -> str | None:
        """Why the lease is known to be no longer ours, or None."""
        return self._gone.get(token)

    def _forget_if_ended(self, held: HeldLease) -> None:
        if not held.bound and not held.local and self._leases.get(held.lease.token) is held:
            del self._leases[held.lease.token]

    @staticmethod
    def _cancel_expiry(held: HeldLease) -> None:
        if held.expiry is not None:
            held.expiry.cancel()
            held.expiry = None
