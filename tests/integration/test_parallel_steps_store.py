"""Parallel steps in the control plane's store, on real PostgreSQL:
record_steps takes any position not recorded yet, in any order, through the
group commit (several steps of one intent in one batch go to successive
groups); steps_completed counts them, last_step_index is the highest; pages
(the assignment's first page, ListRecordedSteps, ListIntentSteps) are right
with holes."""

from __future__ import annotations

import asyncio

import pytest

from intentd.generated.v1 import delivery_pb2
from intentd.server import errors, history
from intentd.server.batcher import WriteBatcher
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.queries import Q
from intentd.server.store import IntentStore, NewIntent

TYPE = "intent.pipeline.process.v1"


async def _deliver(store: IntentStore, leases: LeaseStore, address: str, session: str) -> LeaseRef:
    rows, _ = await leases.claim(session, [address], None, 1, 5000)
    assert len(rows) == 1
    lease = LeaseRef(rows[0]["id"], rows[0]["attempt"], rows[0]["lease_token"])
    await leases.ack(lease, stream=session)
    return lease


async def test_steps_record_out_of_order_once_each_and_holes_page_right(db, pg, agent_address) -> None:
    store = IntentStore(db)
    batcher = WriteBatcher(db, workers=1)
    batcher.start()
    leases = LeaseStore(db, max_payload_bytes=128 * 1024, batcher=batcher, max_history_steps=8)
    try:
        (sent,) = await store.send("default", [NewIntent(TYPE, agent_address, "{}", "test")])
        intent_id = str(sent.row["id"])
        lease = await _deliver(store, leases, agent_address, "s1")

        # Four concurrent steps of one attempt, finishing in the order 5, 2, 4, 1
        # (3 never finishes: a hole); in one batch they go to successive groups.
        rows = await asyncio.gather(*(
            leases.record_step(lease, index, f"s{index}", str(index * 10).encode(), stream="s1")
            for index in (5, 2, 4, 1)))
        assert [r["idx"] for r in rows] == [5, 2, 4, 1]
        row = await pg.fetchrow("SELECT steps_completed, last_step_index, history_bytes FROM intents WHERE id = $1",
                                intent_id)
        assert (row["steps_completed"], row["last_step_index"]) == (4, 5)
        recorded = await pg.fetch("SELECT idx, name FROM intent_steps WHERE intent_id = $1 ORDER BY idx", intent_id)
        assert [(r["idx"], r["name"]) for r in recorded] == [(1, "s1"), (2, "s2"), (4, "s4"), (5, "s5")]
        events = await pg.fetch("SELECT step_index FROM intent_events WHERE intent_id = $1 AND type = 'STEP_COMPLETED'"
                                " ORDER BY seq", intent_id)
        assert [e["step_index"] for e in events] == [5, 2, 4, 1]

        # A repeat of a recorded position (a lost answer, or a racing second
        # write) inserts nothing and answers with the first record.
        again = await leases.record_step(lease, 4, "s4", b"999", stream="s1")
        assert again["result"] == "40"
        with pytest.raises(errors.FailedPrecondition, match="divergence"):
            await leases.record_step(lease, 2, "other", b"1", stream="s1")
        # The step limit is on positions: past it is refused, the count kept.
        with pytest.raises(errors.ResourceExhausted, match="the 4 recorded are kept"):
            await leases.record_step(lease, 9, "s9", b"1", stream="s1")
        assert await pg.fetchval("SELECT steps_completed FROM intents WHERE id = $1", intent_id) == 4

        # The hole is filled later, by this attempt or the next.
        assert (await leases.record_step(lease, 3, "s3", b"30", stream="s1"))["idx"] == 3
        assert await pg.fetchval("SELECT steps_completed FROM intents WHERE id = $1", intent_id) == 5
        await leases.record_step(lease, 7, "s7", b"70", stream="s1")

        # ListRecordedSteps (a sidecar fetching): the highest position, and a
        # page from a hole starts at the next recorded step.
        top, page = await leases.recorded_steps(lease, "s1", 6, 0)
        assert top == 7 and [r["idx"] for r in page] == [7]
        # Pages count recorded steps, not positions: two steps from 4 are 4 and 5... and 7 after them.
        rows = await pg.fetch(Q.steps_of, [intent_id], "default", 4, 10**6, 10**6, 3)
        assert [r["idx"] for r in rows] == [4, 5, 7]
        rows = await pg.fetch(Q.steps_of, [intent_id], "default", 8, 10**6, 10**6, 3)
        assert rows == []

        # The next attempt's assignment: recorded_steps is the highest position.
        await leases.release(lease, "AGENT_DIED", stream="s1")
        claimed, steps = await leases.claim("s2", [agent_address], None, 1, 5000)
        (row,) = claimed
        assignment = history.assignment(
            row, delivery_pb2.Lease(intent_id=intent_id, attempt=row["attempt"], token=str(row["lease_token"])),
            steps[intent_id])
        assert assignment.recorded_steps == 7 and assignment.intent.checkpoint.steps_completed == 6
        assert [s.index for s in assignment.steps] == [1, 2, 3, 4, 5, 7]
    finally:
        await batcher.close()
