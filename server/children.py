"""Child intents (docs/children.md): starting them from a handler, and what
the ends of a family's members owe each other.

A child is an ordinary intent (the same table, lifecycle and APIs as one a
client sends) with a parent. Two jobs live here:

- ``start``: a handler's StartChildrenWrite. Under the parent's row lock,
  fenced by its lease: the children are inserted in one statement (the same
  insert_intents a client's send uses, so quotas and defaults are one copy)
  together with the position's record, so a start is exactly once; a repeat
  gets the record back and starts nothing.
- ``sweep``: the child sweeper's round over child_notices (written by the
  ending statement of a family member, migration 0011). It locks the
  notices' parents with SKIP LOCKED, adds CHILD_FINISHED events, records
  every AGENT wait its children now satisfy (once: the wait is resolved and
  a WAITING parent is PENDING) and cancels the live children of ended
  parents (SKIP LOCKED again; a child it could not lock keeps its parent's
  notice for the next round). It never waits for a lock, so the two
  generations of a family cannot deadlock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from intentd.core.errors import ValidationError
from intentd.core.limits import MAX_CHILDREN_PER_START, MAX_HORIZON_MS, MAX_STEP_NAME_LEN
from intentd.core.observability.tracing import TRACEPARENT_LABEL
from intentd.core.validation import check_agent_address, check_intent_type, check_labels, check_text
from intentd.core.waits import start_record_name
from intentd.generated.v1 import delivery_pb2

from . import errors
from .auth import Caller
from .batcher import apply_group
from .db import Database, Row
from .ids import new_id
from .leases import LeaseRef
from .queries import Q
from .quotas import Quotas, payload_json
from .store import INSERT, Insert
from .waits import WaitStore, stale_lease

__all__ = ["ChildSpec", "ChildStore", "StartSpec", "SweepRound"]


@dataclass(frozen=True)
class ChildSpec:
    """One validated ChildSpec."""

    to_agent: str
    intent_type: str
    payload: str  # JSON text
    deadline: datetime | None
    max_attempts: int | None
    labels: dict[str, str]
    detached: bool


@dataclass(frozen=True)
class StartSpec:
    """A validated StartChildrenWrite."""

    index: int
    step_name: str
    children: tuple[ChildSpec, ...]


@dataclass
class SweepRound:
    """What one sweep did: notices applied, CHILD_FINISHED events, AGENT
    waits recorded, children canceled; ``more``: a full batch was taken."""

    notices: int = 0
    finished: int = 0
    woken: int = 0
    canceled: int = 0
    # Notices left for a later round: their parent was held by another transaction.
    skipped: int = 0
    more: bool = False


def start_spec(msg: delivery_pb2.StartChildrenWrite, max_payload_bytes: int,
               now: datetime | None = None) -> StartSpec:
    """The checked write (ValidationError names the bad field; a payload past
    the tenant's limit is RESOURCE_EXHAUSTED, as for a client's send)."""
    if msg.index < 1:
        raise ValidationError("start_children.index", "must be at least 1")
    if not 1 <= len(msg.children) <= MAX_CHILDREN_PER_START:
        raise ValidationError("start_children.children",
                              f"has {len(msg.children)}; a start takes 1 to {MAX_CHILDREN_PER_START} children")
    check_text(msg.step_name, "start_children.step_name", MAX_STEP_NAME_LEN, required=True)
    children = []
    moment = now or datetime.now(UTC)
    for i, child in enumerate(msg.children):
        prefix = f"start_children.children[{i}]."
        check_agent_address(child.to_agent, f"{prefix}to_agent")
        check_intent_type(child.intent_type, f"{prefix}intent_type")
        payload = payload_json(child.payload, f"{prefix}payload", max_payload_bytes) if child.payload else "null"
        deadline: datetime | None = None
        if child.HasField("deadline"):
            deadline = child.deadline.ToDatetime(tzinfo=UTC)
            if deadline - moment > timedelta(milliseconds=MAX_HORIZON_MS):
                raise ValidationError(f"{prefix}deadline", "is more than 100 years ahead")
        if child.max_attempts < 0:
            raise ValidationError(f"{prefix}max_attempts", "must not be negative (0: the type's default)")
        children.append(ChildSpec(
            to_agent=child.to_agent, intent_type=child.intent_type, payload=payload, deadline=deadline,
            max_attempts=child.max_attempts or None, labels=check_labels(dict(child.labels), f"{prefix}labels"),
            detached=child.detached))
    expected = start_record_name(children[0].intent_type)
    if msg.step_name != expected:
        raise ValidationError("start_children.step_name", f"must be {expected!r} for this start")
    return StartSpec(index=msg.index, step_name=msg.step_name, children=tuple(children))


class ChildStore:
    def __init__(self, db: Database, waits: WaitStore, quotas: Quotas, *, auth_enabled: bool,
                 default_heartbeat_timeout_ms: int, max_history_bytes: int, max_history_steps: int) -> None:
        self.db = db
        self.waits = waits
        self.quotas = quotas
        self.auth_enabled = auth_enabled
        self.default_heartbeat_timeout_ms = default_heartbeat_timeout_ms
        self.max_history_bytes = max_history_bytes
        self.max_history_steps = max_history_steps

    # ------------------------------------------------------------ starting children

    async def max_payload_bytes(self, caller: Caller) -> int:
        """The payload bound a child of this caller's tenant is held to."""
        return await self.quotas.max_payload_bytes(caller)

    async def start(self, lease: LeaseRef, stream: str, caller: Caller, spec: StartSpec,
                    now: datetime | None = None) -> Row:
        """Starts the children of a StartChildrenWrite (or finds its record):
        the position's record row."""
        if self.auth_enabled:
            for i, child in enumerate(spec.children):
                if not caller.may_send(child.to_agent):
                    raise errors.PermissionDenied(
                        f"start_children.children[{i}].to_agent: API key {caller.name!r} may not send to "
                        f"{child.to_agent} (its send patterns: {', '.join(caller.send_patterns) or 'none'})")
        if spec.index > self.max_history_steps:
            raise errors.ResourceExhausted(
                f"start_children.index: position {spec.index} is past the history's limit of "
                f"{self.max_history_steps} steps (INTENTD_MAX_HISTORY_STEPS)")
        async with self.db.transaction() as conn:
            parent = await conn.fetchrow(Q.lock_intent, lease.intent_id, now)
            if parent is None:
                raise errors.NotFound(f"intent {lease.intent_id} not found")
            if (parent["lease_token"] != lease.token or parent["attempt"] != lease.attempt
                    or parent["state"] != "IN_PROGRESS" or parent["lease_session"] != stream
                    or parent["past_deadline"]):
                raise stale_lease(lease, parent)
            recorded = await conn.fetchrow(Q.step_at, lease.intent_id, spec.index)
            if recorded is not None:
                if recorded["name"] != spec.step_name:
                    raise errors.FailedPrecondition(
                        f"step divergence: position {spec.index} of intent {lease.intent_id} was recorded as "
                        f"{recorded['name']!r}, now reached as {spec.step_name!r}; steps and starts must be "
                        "deterministic in name and order")
                # A repeat whose answer was lost, or an earlier attempt's start:
                # the same children, nothing started.
                return recorded
            # Counted only when children are really started: a replay costs no send.
            await self.quotas.admit_sends(caller, len(spec.children))
            return await self._insert(conn, parent, spec, now)

    async def _insert(self, conn: asyncpg.Connection, parent: Row, spec: StartSpec, now: datetime | None) -> Row:
        trace = json.loads(parent["labels"] or "{}").get(TRACEPARENT_LABEL)
        inserts = []
        for ord_, child in enumerate(spec.children, start=1):
            labels = child.labels
            if trace and TRACEPARENT_LABEL not in labels:
                # The child's deliveries join the parent's trace.
                labels = {**labels, TRACEPARENT_LABEL: trace}
            inserts.append(Insert(
                id=new_id(), tenant=parent["tenant"], intent_type=child.intent_type, to_agent=child.to_agent,
                sender=parent["to_agent"], payload=child.payload, idempotency_key=None, labels=json.dumps(labels),
                max_attempts=child.max_attempts, deadline=child.deadline,
                heartbeat_timeout_ms=self.default_heartbeat_timeout_ms, at=now, parent_id=parent["id"],
                parent_idx=spec.index, parent_ord=ord_, detached=child.detached, deadline_cap=parent["deadline"]))
        outcomes = await apply_group(conn, INSERT, inserts)
        for insert, (row, _) in zip(inserts, outcomes, strict=True):
            if row is None:
                raise errors.FailedPrecondition(
                    f"child {insert.id} of intent {parent['id']} at position {spec.index} could not be inserted")
            if row["over_quota"]:
                raise errors.ResourceExhausted(
                    f"tenant {parent['tenant']!r} is at its quota of live intents (max_live_intents); "
                    f"the {len(inserts)} children of position {spec.index} were not started", retry_after_ms=1000)
        record = json.dumps({"children": [
            {"id": i.id, "to_agent": i.to_agent, "intent_type": i.intent_type} for i in inserts]},
            separators=(",", ":"))
        size = len(record.encode()) + len(spec.step_name.encode())
        if parent["history_bytes"] + size > self.max_history_bytes:
            raise errors.ResourceExhausted(
                f"start_children: the record of position {spec.index} would take intent {parent['id']}'s history "
                f"past its limit of {self.max_history_bytes} bytes (INTENTD_MAX_HISTORY_BYTES)")
        row = await conn.fetchrow(Q.record_start, parent["id"], spec.index, spec.step_name, record,
                                  [i.id for i in inserts], [i.to_agent for i in inserts], now)
        if row is None:
            raise errors.FailedPrecondition(
                f"position {spec.index} of intent {parent['id']} was recorded while its children were started")
        return row

    # ------------------------------------------------------------ the child sweeper

    async def sweep(self, batch: int = 500, now: datetime | None = None) -> SweepRound:
        """One round over the oldest notices (see the module docstring)."""
        done = SweepRound()
        async with self.db.transaction() as conn:
            notices = await conn.fetch(Q.take_notices, batch)
            if not notices:
                return done
            done.more = len(notices) == batch
            named = sorted({n["parent_id"] for n in notices})
            parents = {r["id"] for r in await conn.fetch(Q.lock_parents, named)}
            mine = [n for n in notices if n["parent_id"] in parents]
            # Notices of parents that are gone (retention) are dropped; those of
            # parents another transaction holds wait for a later round.
            held = {r["id"] for r in await conn.fetch(Q.existing_intents, [p for p in named if p not in parents])}
            applied = [n["seq"] for n in notices if n["parent_id"] not in parents and n["parent_id"] not in held]
            finished = [n for n in mine if n["kind"] == "FINISHED"]
            if finished:
                await conn.fetch(Q.child_finished_events, [n["parent_id"] for n in finished],
                                 [n["child_id"] for n in finished], now)
                done.finished = len(finished)
                done.woken = await self._settle_waits(conn, sorted({n["parent_id"] for n in finished}), now)
            applied += [n["seq"] for n in finished]
            ended = sorted({n["parent_id"] for n in mine if n["kind"] == "PARENT_ENDED"})
            if ended:
                done.canceled = len(await conn.fetch(Q.cancel_children, ended, now))
                left = {r["parent_id"] for r in await conn.fetch(Q.live_children_left, ended)}
                applied += [n["seq"] for n in mine if n["kind"] == "PARENT_ENDED" and n["parent_id"] not in left]
            await conn.execute(Q.drop_notices, applied)
            done.notices = len(applied)
            done.skipped = len(notices) - len(applied)
        return done

    async def _settle_waits(self, conn: asyncpg.Connection, parent_ids: list[str], now: datetime | None) -> int:
        """Records every open AGENT wait of the (locked) parents that their
        children now satisfy; returns how many."""
        recorded = 0
        for wait in await conn.fetch(Q.open_child_waits, parent_ids):
            value = await self.waits.child_wait_value(conn, wait["intent_id"], wait["idx"])
            if value is None:
                continue
            row = await conn.fetchrow(Q.record_wait, wait["intent_id"], wait["idx"], value, now, "STEP_COMPLETED",
                                      None, None, None, None)
            if row is not None:
                recorded += 1
        return recorded

