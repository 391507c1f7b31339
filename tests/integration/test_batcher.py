"""The group commit: set-based writes give every caller the answer it would
have got alone, in the order the writes arrived."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from intentd.server import errors
from intentd.server.batcher import WriteBatcher, WriteKind, _Write, plan
from intentd.server.db import Database
from intentd.server.fenced import ACK, CHECKPOINT, COMPLETE, FAIL, PROGRESS, RELEASE, STEP, Complete, Step
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.store import IntentStore, NewIntent

TYPE = "intent.pipeline.process.v1"
EXTRA = 40  # intents that only step and complete, to make the batch wide


# ----------------------------------------------------------------- planning


INSERT = WriteKind("insert", "", -1, ())


class _Params:
    def __init__(self, kind: WriteKind, key: str) -> None:
        self.kind, self.key = kind, key


def _w(kind: WriteKind, key: str) -> _Write:
    write = _Write.__new__(_Write)
    write.params = _Params(kind, key)
    return write


def test_plan_keeps_each_intent_in_arrival_order_and_one_write_per_intent_per_statement() -> None:
    batch = [_w(STEP, "a"), _w(ACK, "b"), _w(COMPLETE, "a"), _w(STEP, "b"), _w(ACK, "c"),
             _w(STEP, "a"), _w(INSERT, "e"), _w(STEP, "c"), _w(COMPLETE, "b"), _w(ACK, "d"), _w(INSERT, "f")]
    steps = plan(batch)
    # A round of inserts, acks, steps and completions; then a's second step,
    # which must follow its completion attempt.
    assert [(s[0].kind.name, [w.key for w in s]) for s in steps] == [
        ("insert", ["e", "f"]),
        ("ack", ["b", "c", "d"]),
        ("step", ["a", "b", "c"]),
        ("complete", ["a", "b"]),
        ("step", ["a"]),
    ]
    order = [w for s in steps for w in s]
    assert sorted(map(id, order)) == sorted(map(id, batch))
    for key in "abcdef":
        mine = [w for w in batch if w.key == key]
        assert [w for w in order if w.key == key] == mine
    for s in steps:
        assert len({w.key for w in s}) == len(s)
        assert len({w.kind for w in s}) == 1


# ------------------------------------------------------- same as sequential


async def _prepare(store: IntentStore, leases: LeaseStore, address: str, roles: list[str]) -> list[LeaseRef]:
    soon = datetime.now(UTC) + timedelta(hours=1)
    specs = [NewIntent(TYPE, address, "{}", "test", deadline=soon if role == "deadline" else None) for role in roles]
    await store.send("default", specs)
    rows, _ = await leases.claim("s1", [address], None, len(roles), 60_000)
    assert len(rows) == len(roles)
    refs = [LeaseRef(r["id"], r["attempt"], r["lease_token"]) for r in rows]
    for ref, role in zip(refs, roles, strict=True):
        if role != "delivered":
            await leases.ack(ref, stream="s1")
        if role == "stepped":
            await leases.record_step(ref, 1, "a", b'{"n": 1}', stream="s1")
    return refs


ROLES = ["delivered", "delivered", "acked", "acked", "stepped", "acked", "acked", "stepped", "acked", "acked",
         "delivered", "deadline"] + ["acked"] * EXTRA

Op = Callable[[LeaseStore, list[LeaseRef]], Awaitable[Any]]


def _ops() -> list[Op]:
    late = datetime.now(UTC) + timedelta(hours=2)
    ops: list[Op] = [
        lambda s, r: s.ack(r[0], stream="s1"),
        lambda s, r: s.record_step(r[2], 1, "a", b'{"n": 1}', stream="s1"),
        lambda s, r: s.ack(r[1], stream="s1"),
        # A second write of intent 0, right behind its ack.
        lambda s, r: s.record_step(r[0], 1, "a", b"[1]", stream="s1"),
        # Steps of one intent in index order.
        lambda s, r: s.record_step(r[2], 2, "b", b'{"n": 2}', stream="s1"),
        lambda s, r: s.record_step(r[3], 1, "a", b"{}", stream="s1"),
        lambda s, r: s.complete(r[4], b'{"done": 4}', stream="s1"),
        # Fenced: a token that is not the lease's, and a stream that does not hold it.
        lambda s, r: s.record_step(LeaseRef(r[5].intent_id, 1, uuid.uuid4()), 1, "a", b"{}", stream="s1"),
        lambda s, r: s.record_step(r[6], 1, "a", b"{}", stream="s2"),
        # A repeat of a step that committed, then a divergent one.
        lambda s, r: s.record_step(r[7], 1, "a", b'{"other": 1}', stream="s1"),
        lambda s, r: s.record_step(r[7], 1, "x", b"{}", stream="s1"),
        # A repeat of a completion in the same batch.
        lambda s, r: s.complete(r[4], b'{"done": 4}', stream="s1"),
        lambda s, r: s.save_checkpoint(r[8], b'{"at": 8}', stream="s1"),
        lambda s, r: s.report_progress(r[8], "half", 0.5, stream="s1"),
        lambda s, r: s.fail(r[8], "BOOM", "it broke", True, stream="s1"),
        lambda s, r: s.complete(r[8], b"{}", stream="s1"),  # after the failure: stale
        lambda s, r: s.release(r[9], "DRAINED", stream="s1"),
        # A step before the ack of its delivery is refused; the ack then applies.
        lambda s, r: s.record_step(r[10], 1, "a", b"{}", stream="s1"),
        lambda s, r: s.ack(r[10], stream="s1"),
        lambda s, r: s.complete(r[3], b'{"done": 3}', stream="s1"),
        lambda s, r: s.record_step(r[11], 1, "a", b"{}", now=late, stream="s1"),  # past the deadline
        lambda s, r: s.record_step(r[5], 1, "a", b"{}", stream="s1"),
        lambda s, r: s.ack(r[2], stream="s1"),  # a repeated acknowledgement
    ]
    # Wide: many intents' steps among the writes above, their completions after.
    for i in range(12, 12 + EXTRA):
        ops.insert(i - 12, lambda s, r, i=i: s.record_step(r[i], 1, "e", b'{"e": 1}', stream="s1"))
    for i in range(12, 12 + EXTRA):
        ops.append(lambda s, r, i=i: s.complete(r[i], b"{}", stream="s1"))
    return ops


def _answer(value: Any, refs: list[LeaseRef]) -> Any:
    def anonymous(text: str) -> str:
        for n, ref in enumerate(refs):
            text = text.replace(ref.intent_id, f"#{n}")
        return re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<uuid>", text)

    if isinstance(value, BaseException):
        return type(value).__name__, anonymous(str(value))
    if value is None or isinstance(value, float):
        return "age" if isinstance(value, float) else None
    if "idx" in value:
        return "step", value["idx"], value["name"], value["result"], value["attempt"]
    return value["state"], value["error_code"]


async def _state(db: Database, refs: list[LeaseRef]) -> list[Any]:
    ids = [r.intent_id for r in refs]
    async with db.connection() as conn:
        intents = {r["id"]: r for r in await conn.fetch(
            "SELECT id, state::text, attempt, steps_completed, last_seq, checkpoint, progress_message, error_code,"
            " max_attempts FROM intents WHERE id = ANY($1)", ids)}
        events = await conn.fetch("SELECT intent_id, seq, type, state::text FROM intent_events"
                                  " WHERE intent_id = ANY($1) ORDER BY intent_id, seq", ids)
        steps = await conn.fetch("SELECT intent_id, idx, name, result, attempt FROM intent_steps"
                                 " WHERE intent_id = ANY($1) ORDER BY intent_id, idx", ids)
    out = []
    for n, intent_id in enumerate(ids):
        row = dict(intents[intent_id])
        del row["id"]
        out.append((n, row,
                    [(e["seq"], e["type"], e["state"]) for e in events if e["intent_id"] == intent_id],
                    [(s["idx"], s["name"], s["result"], s["attempt"]) for s in steps if s["intent_id"] == intent_id]))
    return out


async def test_a_mixed_batch_answers_every_caller_as_sequential_writes_would(db) -> None:
    store = IntentStore(db)
    alone = LeaseStore(db, max_payload_bytes=128 * 1024)
    batcher = WriteBatcher(db, workers=1)
    batcher.start()
    grouped = LeaseStore(db, max_payload_bytes=128 * 1024, batcher=batcher)
    try:
        ops = _ops()
        first = await _prepare(store, alone, f"agent://test/b{uuid.uuid4().hex[:8]}/seq", ROLES)
        second = await _prepare(store, alone, f"agent://test/b{uuid.uuid4().hex[:8]}/batch", ROLES)

        sequential = []
        for op in ops:
            try:
                sequential.append(await op(alone, first))
            except Exception as exc:
                sequential.append(exc)
        # All writes are queued before the worker runs: one batch.
        batched = await asyncio.gather(*(op(grouped, second) for op in ops), return_exceptions=True)

        assert batcher.batches == 1 and batcher.writes == len(ops)  # no fallback to one by one
        # One statement per kind and round (three rounds here), not one per write.
        assert batcher.statements <= 3 * 7 < len(ops) // 4, batcher.statements
        expected = [_answer(a, first) for a in sequential]
        assert [_answer(a, second) for a in batched] == expected
        # The batch covers what it should: successes, fenced writes, repeats.
        kinds = {a[0] if isinstance(a, tuple) else a for a in expected}
        assert {"StaleLease", "FailedPrecondition", "step", "age", None, "PENDING"} <= kinds
        assert any("deadline passed" in str(a) for a in expected)
        assert await _state(db, second) == await _state(db, first)
    finally:
        await batcher.close()


async def test_one_bad_write_does_not_fail_the_others(db, agent_address) -> None:
    store = IntentStore(db)
    leases = LeaseStore(db, max_payload_bytes=128 * 1024)
    refs = await _prepare(store, leases, agent_address, ["acked"] * 4)
    batcher = WriteBatcher(db, workers=1)
    batcher.start()
    try:
        def step(ref: LeaseRef, result: str) -> Awaitable[Any]:
            # Straight to the batcher: the store would have refused the bad JSON.
            return batcher.write(Step(ref, None, "s1", index=1, name="a", result=result,
                                      max_history_bytes=leases.max_history_bytes,
                                      max_history_steps=leases.max_history_steps))

        outcomes = await asyncio.gather(step(refs[0], "{}"), step(refs[1], "{not json"), step(refs[2], "[2]"),
                                        batcher.write(Complete(refs[3], None, "s1", result="{}")),
                                        return_exceptions=True)
        assert isinstance(outcomes[1], errors.InvalidArgument)
        for outcome in (outcomes[0], outcomes[2], outcomes[3]):
            assert not isinstance(outcome, BaseException)
            row, why = outcome
            assert row is not None and why is None
        assert outcomes[2][0]["result"] == "[2]"
        # The refused batch was rolled back and applied again once with the
        # refused write isolated under a savepoint: the others commit together
        # (issue 11: no longer retried one by one).
        assert (batcher.batches, batcher.isolated) == (1, 1)
    finally:
        await batcher.close()


async def test_a_write_that_matches_nothing_is_explained_in_its_transaction(db, agent_address) -> None:
    store = IntentStore(db)
    leases = LeaseStore(db, max_payload_bytes=128 * 1024)
    (ref,) = await _prepare(store, leases, agent_address, ["delivered"])
    batcher = WriteBatcher(db, workers=1)
    batcher.start()
    try:
        grouped = LeaseStore(db, max_payload_bytes=128 * 1024, batcher=batcher)
        # Alone, the step would find the delivery not yet acknowledged: stale,
        # even though the ack behind it in the same batch then applies.
        step, ack = await asyncio.gather(grouped.record_step(ref, 1, "a", b"{}", stream="s1"),
                                         grouped.ack(ref, stream="s1"), return_exceptions=True)
        assert isinstance(step, errors.StaleLease) and "DELIVERED" in str(step)
        assert ack is None
        assert batcher.batches == 1
        # A repeat of a committed step is answered with the stored record.
        first = await grouped.record_step(ref, 1, "a", b'{"v": 1}', stream="s1")
        again = await grouped.record_step(ref, 1, "a", b'{"v": 2}', stream="s1")
        assert {k: again[k] for k in ("idx", "name", "result", "attempt", "record_time")} == \
               {k: first[k] for k in ("idx", "name", "result", "attempt", "record_time")}
    finally:
        await batcher.close()


async def test_set_based_writes_are_prepared_once_and_planned_once(databases, agent_address) -> None:
    """The pool keeps each connection's prepared statements, and the
    set-based writes settle on PostgreSQL's generic plan instead of being
    planned again for every group (which small groups on a big table would
    otherwise be: a plan for one row always looks cheaper)."""
    url = databases.create()
    db = Database(url, min_size=1, max_size=1)
    await db.open(run_migrations=False)
    try:
        async with db.connection() as conn:
            # Many deliveries in flight elsewhere: a plan for one row is then
            # much cheaper than one for the ten rows a generic plan assumes.
            await conn.execute(
                "INSERT INTO intents (id, tenant, intent_type, to_agent, sender, payload, max_attempts,"
                " heartbeat_timeout_ms, available_at, create_time, update_time, state, attempt, lease_token,"
                " lease_session, lease_expires_at)"
                " SELECT 'other' || g, 'default', 't', 'agent://other', 's', '{}', 3, 10000, now(), now(), now(),"
                " 'DELIVERED', 1, gen_random_uuid(), 'elsewhere', now() + interval '1 day'"
                " FROM generate_series(1, 20000) g")
            await conn.execute("ANALYZE intents")
        store = IntentStore(db)
        leases = LeaseStore(db, max_payload_bytes=1024)
        refs = await _prepare(store, leases, agent_address, ["delivered"] * 12)
        for ref in refs:
            await leases.ack(ref, stream="s1")
            await leases.record_step(ref, 1, "a", b"{}", stream="s1")
            await leases.complete(ref, b"{}", stream="s1")
        async with db.connection() as conn:
            plans = {r["statement"]: (r["generic_plans"], r["custom_plans"]) for r in await conn.fetch(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")}
        for kind in (ACK, STEP, COMPLETE):
            generic, custom = plans[kind.query]
            assert generic + custom >= 12 and custom <= 5, (kind.name, generic, custom)
    finally:
        await db.close()


def test_each_write_kind_names_one_column_per_parameter_of_its_statements() -> None:
    from intentd.server.store import INSERT as INSERT_INTENTS

    def parameters(query: str) -> int:
        return max(int(n) for n in re.findall(r"\$(\d+)", query))

    for kind in (ACK, STEP, CHECKPOINT, PROGRESS, COMPLETE, FAIL, RELEASE, INSERT_INTENTS):
        assert parameters(kind.query) == len(kind.columns), kind.name
        if kind.explain is not None:
            assert parameters(kind.explain) == len(kind.explain_columns), kind.name
