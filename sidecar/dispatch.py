"""The local half of the sidecar: which attached agent runs which intent.

Assignments from the control plane are placed on an attached agent that
handles the type and has a free slot, or queued briefly until one has (the
placement is recorded on the lease, in ``SidecarLeases``: sidecar/leases.py).
Capacity and intent types announced upstream follow the attached agents (so
the control plane never claims an intent no agent here handles). When an agent's
Attach stream ends, everything it held is released at once (``AGENT_DIED``) so the
control plane redelivers now instead of after a lease timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from intentd.core.backoff import Backoff
from intentd.core.codes import OK
from intentd.core.framing import MAX_MESSAGE_BYTES
from intentd.core.limits import MAX_INTENT_TYPES
from intentd.core.observability import metrics
from intentd.core.observability.context import bind_log_context, log_context
from intentd.generated.v1 import agent_service_pb2, delivery_pb2, intent_pb2, runtime_pb2

from .errors import LeaseNotHeld, RecordedStepMismatch, StepsUnavailable
from .leases import HeldLease, Place, SidecarLeases
from .upstream import STALE_CODES, TERMINAL_OPS, describe

log = logging.getLogger("intentd.sidecar.dispatch")

AGENT_DIED = "AGENT_DIED"
DRAINED = "DRAINED"
# Shorter than the control plane's ack timeout (5 s): an assignment no agent
# could take is given back (attempt not charged) before it would time out.
PLACEMENT_TIMEOUT_S = 2.0
# Releases are retried until their answer is final.
RELEASE_BACKOFF = Backoff(0.2, 5.0)
# The most recorded bytes an assignment carries to an agent that does not
# fetch steps: well inside the agent channel's message limit.
FILL_BYTES = MAX_MESSAGE_BYTES * 3 // 4


def _about(lease: delivery_pb2.Lease) -> contextlib.AbstractContextManager[None]:
    """Log lines inside name the lease's intent and attempt (JSON logs)."""
    return log_context(intent_id=lease.intent_id, attempt=lease.attempt)


class Link(Protocol):
    """What the dispatcher needs from the control-plane connection."""

    def ack(self, lease: delivery_pb2.Lease) -> None: ...

    def set_capacity(self, capacity: int, intent_types: Sequence[str] | None = None) -> None: ...

    async def write(self, write: delivery_pb2.IntentWrite) -> agent_service_pb2.WriteResult: ...

    async def list_recorded_steps(self, lease: delivery_pb2.Lease, from_index: int,
                                  max_bytes: int = 0) -> agent_service_pb2.ListRecordedStepsResponse: ...


@dataclass(eq=False)
class AttachedAgent:
    """One attached agent (one open Attach stream)."""

    id: int
    intent_types: frozenset[str]
    capacity: int
    language: str = ""
    peer: str = ""
    # It asks BeginStep for recorded steps its assignment does not carry.
    fetches_steps: bool = False
    # None ends the stream.
    outbox: asyncio.Queue[runtime_pb2.AttachResponse | None] = field(default_factory=asyncio.Queue)

    def handles(self, intent_type: str) -> bool:
        return not self.intent_types or intent_type in self.intent_types

    def send(self, message: runtime_pb2.AttachResponse) -> None:
        self.outbox.put_nowait(message)

    def close(self) -> None:
        self.outbox.put_nowait(None)


class Dispatcher:
    def __init__(self, link: Link, capacity: int, *, intent_types: Iterable[str] = (),
                 placement_timeout_s: float = PLACEMENT_TIMEOUT_S, leases: SidecarLeases | None = None) -> None:
        self._link = link
        self.max_capacity = capacity
        # The sidecar's own limit (--intent-type); empty: whatever its agents handle.
        self.intent_types = frozenset(intent_types)
        self.placement_timeout_s = placement_timeout_s
        self.agents: dict[int, AttachedAgent] = {}
        self._leases = SidecarLeases() if leases is None else leases
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._fills: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._closing = False
        self.released = 0

    # ------------------------------------------------------------ state

    @property
    def capacity(self) -> int:
        return self.offer()[0]

    def offer(self) -> tuple[int, list[str]]:
        """What the control plane may claim for this sidecar: the capacity of
        the agents that may run something here, and the intent types they
        announced within the sidecar's own list (empty: every type)."""
        configured = sorted(self.intent_types)
        if self.draining:
            return 0, configured
        capacity, types, every = 0, set[str](), False
        for agent in self.agents.values():
            served: frozenset[str] | None
            if agent.intent_types and self.intent_types:
                served = agent.intent_types & self.intent_types
                if not served:
                    continue  # it handles nothing this sidecar takes
            else:
                served = agent.intent_types or self.intent_types or None
            capacity += agent.capacity
            if served is None or len(types | served) > MAX_INTENT_TYPES:
                every = True  # more than a stream may name: every type, placement sorts them out
            else:
                types |= served
        return min(self.max_capacity, capacity), [] if every else sorted(types or configured)

    @property
    def held_count(self) -> int:
        return self._leases.local_count()

    def health(self) -> dict[str, object]:
        return {
            "agents": len(self.agents),
            "held": self.held_count,
            "queued": len(self._leases.waiting()),
            "capacity": self.capacity,
            "draining": self.draining,
            "releases_in_flight": len(self._tasks),
        }

    # ------------------------------------------------------------ agents

    def attach(self, intent_types: Iterable[str], capacity: int, *, language: str = "",
               peer: str = "", fetches_steps: bool = False) -> AttachedAgent:
        # An SDK that leaves capacity unset (0) runs one at a time.
        agent = AttachedAgent(
            id=next(self._ids),
            intent_types=frozenset(intent_types),
            capacity=min(max(capacity, 1), self.max_capacity),
            language=language,
            peer=peer,
            fetches_steps=fetches_steps,
        )
        self.agents[agent.id] = agent
        log.info("agent %d attached (%s, capacity %d, types %s)", agent.id, language or "unknown language",
                 agent.capacity, sorted(agent.intent_types) or "all")
        self._update_capacity()
        self._pump()
        return agent

    def detach(self, agent: AttachedAgent) -> None:
        """The agent's stream ended: give back all it held, now. Synchronous so
        it completes even from a cancelled stream handler."""
        if self.agents.pop(agent.id, None) is None:
            return
        orphans = self._leases.on_agent(agent.id)
        if orphans:
            log.warning("agent %d went away holding %d intents; releasing them (%s)",
                        agent.id, len(orphans), AGENT_DIED)
        else:
            log.info("agent %d detached", agent.id)
        for held in orphans:
            self._leases.finish(held)
            self._release_soon(held.lease, AGENT_DIED)
        agent.close()
        self._update_capacity()
        self._pump()
        self._check_idle()

    def ack(self, agent: AttachedAgent, lease: delivery_pb2.Lease) -> bool:
        held = self._leases.placed(lease.token)
        if held is None or held.agent_id != agent.id:
            with _about(lease):
                log.warning("agent %d acknowledged %s, which it does not hold; ignored", agent.id, describe(lease))
            return False
        self._acknowledge(held)
        return True

    def _acknowledge(self, held: HeldLease) -> None:
        # Once only: the control plane takes a second ack of an IN_PROGRESS
        # lease for a stale one and revokes it.
        if self._leases.ack(held):
            self._link.ack(held.lease)

    # ------------------------------------------------------------ from the control plane

    def on_assignment(self, held: HeldLease) -> None:
        with _about(held.lease):
            self._take(held)

    def _take(self, held: HeldLease) -> None:
        if self.draining:
            # Sent before our SetCapacity(0) arrived: give it straight back.
            self._leases.finish(held)
            self._release_soon(held.lease, DRAINED)
            return
        self._leases.wait(held)
        self._idle.clear()
        if not self._place(held):
            log.info("no agent free for %s (%s); holding it up to %.1fs",
                     describe(held.lease), held.assignment.intent.intent_type, self.placement_timeout_s)
            held.expiry = asyncio.get_running_loop().call_later(self.placement_timeout_s, self._expire, held)

    def on_revocation(self, revocation: delivery_pb2.Revocation) -> None:
        held = self._leases.placed(revocation.lease.token)
        agent = self._finish(held) if held is not None else None
        if agent is not None:
            agent.send(runtime_pb2.AttachResponse(revocation=revocation))

    # ------------------------------------------------------------ from the agent

    async def begin_step(self, lease: delivery_pb2.Lease, index: int, name: str,
                         any_name: bool = False) -> intent_pb2.StepRecord | None:
        """The recorded step at ``index``, or None when it is still to run.
        A step past the window is fetched from the control plane with the
        page that follows it. ``any_name``: no divergence check here."""
        held = self._leases.placed(lease.token)
        if held is None:
            raise LeaseNotHeld(f"{describe(lease)} is not held by this sidecar")
        history = held.history
        record = history.window.get(index)
        if record is None and not history.answers(index):
            # Concurrent steps of the agent ask together: the first fetch
            # usually answers the others too (the lock makes them wait for it).
            async with history.fetching:
                record = history.window.get(index)
                if record is None and not history.answers(index):
                    record = await self._fetch(held, index)
        if record is None:
            return None
        if record.name != name and not any_name:
            raise RecordedStepMismatch(index, record.name, name)
        return record

    async def _fetch(self, held: HeldLease, index: int) -> intent_pb2.StepRecord | None:
        try:
            page = await self._link.list_recorded_steps(held.lease, index)
        except StepsUnavailable as exc:
            if exc.code in STALE_CODES:
                raise LeaseNotHeld(f"{describe(held.lease)}: {exc.message}") from None
            raise
        held.history.recorded = max(held.history.recorded, page.recorded_steps)
        held.history.keep(page.steps, index)
        log.debug("fetched steps %d.. of %s: %d steps", index, describe(held.lease), len(page.steps))
        return held.history.window.get(index)

    async def write(self, write: delivery_pb2.IntentWrite) -> agent_service_pb2.WriteResult:
        with _about(write.lease):
            return await self._forward(write)

    async def _forward(self, write: delivery_pb2.IntentWrite) -> agent_service_pb2.WriteResult:
        held = self._leases.placed(write.lease.token)
        if held is not None and held.place is Place.AGENT and not held.acked:
            # The ack travels on the Attach stream, this write on its own call,
            # so it can overtake the ack; but a write proves the handler
            # started, so acknowledge first (the outbox keeps the order, and
            # the control plane holds a lease's writes until its ack committed).
            self._acknowledge(held)
        result = await self._link.write(write)
        token = write.lease.token
        op = write.WhichOneof("op")
        held = self._leases.placed(token)
        if held is None:
            return result
        if result.code == OK and op == "step":
            held.history.add(result.step if result.HasField("step") else intent_pb2.StepRecord(
                index=write.step.index, name=write.step.name, result=write.step.result))
        if result.code == OK and op == "start_children" and result.HasField("step"):
            # The start's record (the children's ids) answers BeginStep like a step's.
            held.history.add(result.step)
        parked = result.code == OK and op == "wait" and result.wait.parked
        if result.code == OK and op == "wait" and not parked and result.wait.HasField("step"):
            # Resolved: its record answers BeginStep like a step's.
            held.history.add(result.wait.step)
        if result.code in STALE_CODES or (op in TERMINAL_OPS and result.code == OK) or parked:
            # Done, parked or refused as stale: either way the agent stops, so
            # free its slot. A parked lease is not released: the control plane
            # already took it back (the intent is WAITING).
            self._finish(held)
        return result

    # ------------------------------------------------------------ draining

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._update_capacity()
        for held in self._leases.waiting():
            self._finish(held)
            self._release_soon(held.lease, DRAINED)

    async def wait_idle(self, deadline: float, interrupt: asyncio.Event | None = None) -> bool:
        """Waits until no intent is held; False on timeout or interrupt."""
        waiters = [asyncio.ensure_future(self._idle.wait())]
        if interrupt is not None:
            waiters.append(asyncio.ensure_future(interrupt.wait()))
        try:
            await asyncio.wait(waiters, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._idle.is_set()

    async def release_all(self, reason: str, deadline: float) -> None:
        """Stops every held intent on its agent and gives it back upstream."""
        for held in self._leases.local():
            agent = self._finish(held)
            if agent is not None:
                agent.send(runtime_pb2.AttachResponse(revocation=delivery_pb2.Revocation(
                    lease=held.lease, reason="LEASE_LOST", message=f"released by the sidecar: {reason}")))
            self._release_soon(held.lease, reason)
        await self.wait_releases(deadline)

    async def wait_releases(self, deadline: float) -> bool:
        if not self._tasks:
            return True
        _, not_done = await asyncio.wait(set(self._tasks), timeout=deadline)
        return not not_done

    async def close(self, deadline: float) -> None:
        """Waits for releases in flight up to ``deadline`` seconds, then ends every agent stream."""
        if not await self.wait_releases(deadline):
            log.warning("%d releases unanswered after %.1fs; their leases will lapse", len(self._tasks), deadline)
        self._closing = True
        for task in [*self._tasks, *self._fills]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for agent in list(self.agents.values()):
            agent.close()

    # ------------------------------------------------------------ internals

    def _free(self, agent: AttachedAgent) -> int:
        return agent.capacity - self._leases.count_on(agent.id)

    def _place(self, held: HeldLease) -> bool:
        intent_type = held.assignment.intent.intent_type
        candidates = [a for a in self.agents.values() if self._free(a) > 0 and a.handles(intent_type)]
        if not candidates:
            return False
        agent = max(candidates, key=self._free)
        self._leases.place(held, agent.id)
        if agent.fetches_steps or held.history.recorded <= len(held.assignment.steps):
            self._hand_over(agent, held, held.assignment)
        else:
            task = asyncio.get_running_loop().create_task(self._fill(agent, held), name=f"fill-{held.lease.intent_id}")
            self._fills.add(task)
            task.add_done_callback(self._fills.discard)
        return True

    def _hand_over(self, agent: AttachedAgent, held: HeldLease, assignment: delivery_pb2.Assignment) -> None:
        agent.send(runtime_pb2.AttachResponse(assignment=assignment))
        # The window has them; the copy that went out is the agent's.
        del held.assignment.steps[:]

    async def _fill(self, agent: AttachedAgent, held: HeldLease) -> None:
        """An agent that does not fetch recorded steps gets them all in its
        assignment, as before paging, if they fit in one message; otherwise
        the attempt fails with HISTORY_TOO_LARGE (never a replay that would
        re-run recorded steps)."""
        lease = held.lease
        with _about(lease):
            if held.assignment.recorded_bytes > FILL_BYTES:
                log.error("%s: its %d recorded bytes do not fit in one assignment and agent %d (%s) does not "
                          "fetch recorded steps; failing the attempt", describe(lease),
                          held.assignment.recorded_bytes, agent.id, agent.language or "unknown language")
                await self.write(delivery_pb2.IntentWrite(lease=lease, fail=delivery_pb2.FailWrite(
                    code="HISTORY_TOO_LARGE", retryable=True, message=(
                        f"the {held.history.recorded} recorded steps ({held.assignment.recorded_bytes} bytes) do not "
                        f"fit in one assignment (limit {FILL_BYTES} bytes) and the agent's SDK does not fetch "
                        "recorded steps (AgentHello.fetches_steps); upgrade the agent SDK"))))
                return
            assignment = delivery_pb2.Assignment()
            assignment.CopyFrom(held.assignment)
            try:
                # Up to the highest recorded position; holes are no steps.
                last = max((step.index for step in assignment.steps), default=0)
                while last < held.history.recorded and held.local:
                    page = await self._link.list_recorded_steps(lease, last + 1)
                    if not page.steps:
                        break
                    assignment.steps.extend(page.steps)
                    last = page.steps[-1].index
            except StepsUnavailable as exc:
                log.warning("%s: recorded steps could not be fetched for the agent (%s)", describe(lease),
                            exc.message)
                if held.local:
                    self._finish(held)
                    if exc.code not in STALE_CODES:  # a stale lease is not ours to give back
                        self._release_soon(lease, AGENT_DIED)
                return
            if held.place is Place.AGENT and held.agent_id == agent.id:
                self._hand_over(agent, held, assignment)

    def _pump(self) -> None:
        if self.draining:
            return
        for held in self._leases.waiting():
            self._place(held)

    def _expire(self, held: HeldLease) -> None:
        if held.place is not Place.WAITING:
            return
        with _about(held.lease):
            log.warning("no attached agent took %s (%s) within %.1fs; giving it back",
                        describe(held.lease), held.assignment.intent.intent_type, self.placement_timeout_s)
        self._finish(held)
        self._release_soon(held.lease, DRAINED)

    def _finish(self, held: HeldLease) -> AttachedAgent | None:
        """Frees the lease's slot here; the agent it ran on, if any."""
        agent = self.agents.get(held.agent_id) if held.agent_id is not None else None
        if not self._leases.finish(held):
            return None
        self._pump()
        self._check_idle()
        return agent

    def _check_idle(self) -> None:
        if not self._leases.local_count():
            self._idle.set()

    def _update_capacity(self) -> None:
        self._link.set_capacity(*self.offer())

    def _release_soon(self, lease: delivery_pb2.Lease, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release(lease, reason), name=f"release-{lease.intent_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, lease: delivery_pb2.Lease, reason: str) -> None:
        # A lease we stop caring about but never release would be renewed by
        # every ping of our stream: retry until the answer is final. (Its own
        # task, so the binding ends with it.)
        bind_log_context(intent_id=lease.intent_id, attempt=lease.attempt)
        retries = 0
        write = delivery_pb2.IntentWrite(lease=lease, release=delivery_pb2.ReleaseWrite(reason=reason))
        while not self._closing:
            result = await self._link.write(write)
            if result.code == OK:
                self.released += 1
                metrics.SIDECAR_RELEASES.labels(reason=reason).inc()
                log.info("released %s (%s)", describe(lease), reason)
                return
            if result.code in STALE_CODES:
                log.info("%s was no longer ours to release (%s)", describe(lease), result.message)
                return
            delay = RELEASE_BACKOFF.delay(retries)
            retries += 1
            log.warning("releasing %s failed (code %d: %s); retrying in %.1fs",
                        describe(lease), result.code, result.message, delay)
            await asyncio.sleep(delay)
