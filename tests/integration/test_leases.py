"""Leases, attempts and fencing at the database layer, with the clock moved
instead of waited for."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from intentd.client import IntentClient
from intentd.core.errors import ValidationError
from intentd.generated.v1 import agent_service_pb2 as apb
from intentd.generated.v1 import delivery_pb2
from intentd.server import errors
from intentd.server.leases import LeaseRef, LeaseStore
from intentd.server.store import IntentStore, NewIntent
from tests.support import RawSidecar

TYPE = "intent.pipeline.process.v1"


@pytest.fixture
def stores(db):
    return IntentStore(db), LeaseStore(db, max_payload_bytes=128 * 1024)


async def send(store: IntentStore, address: str, **kw) -> str:
    (sent,) = await store.send("default", [NewIntent(TYPE, address, "{}", "test", **kw)])
    return str(sent.row["id"])


def later() -> datetime:
    """A start time a minute ahead: expiry is held for one heartbeat timeout
    after PostgreSQL starts, and the embedded test server may have just started."""
    return datetime.now(UTC) + timedelta(minutes=1)


def mine(rows: list, intent_id: str) -> list:
    """The database is shared by the run; other tests' leases expire too."""
    return [r for r in rows if r["id"] == intent_id]


async def deliver(leases: LeaseStore, address: str, session: str = "s1", now=None) -> LeaseRef:
    rows, _ = await leases.claim(session, [address], None, 1, 5000, now=now)
    assert len(rows) == 1
    lease = LeaseRef(rows[0]["id"], rows[0]["attempt"], rows[0]["lease_token"])
    await leases.ack(lease, now=now)
    return lease


async def test_each_intent_is_claimed_by_one_stream_oldest_first(stores, agent_address) -> None:
    store, leases = stores
    ids = [await send(store, agent_address) for _ in range(5)]
    first, _ = await leases.claim("a", [agent_address], None, 2, 5000)
    second, _ = await leases.claim("b", [agent_address], None, 10, 5000)
    assert [r["id"] for r in first] == ids[:2]
    assert [r["id"] for r in second] == ids[2:]
    assert all(r["attempt"] == 1 and r["state"] == "DELIVERED" for r in first + second)
    assert not (await leases.claim("c", [agent_address], None, 10, 5000))[0]


async def test_lapsed_lease_is_redelivered_with_the_next_attempt_then_dead_lettered(stores, agent_address, pg) -> None:
    store, leases = stores
    intent_id = await send(store, agent_address, max_attempts=2)
    t0 = later()
    first = await deliver(leases, agent_address, now=t0)
    # Renewed at t0+5s, so still live at t0+12s (heartbeat timeout 10s).
    await leases.renew("s1", now=t0 + timedelta(seconds=5))
    assert mine(await leases.expire(now=t0 + timedelta(seconds=12)), intent_id) == []
    expired = mine(await leases.expire(now=t0 + timedelta(seconds=16)), intent_id)
    assert [(r["id"], r["state"]) for r in expired] == [(intent_id, "PENDING")]
    # Backoff: not claimable at once, claimable after it.
    t1 = t0 + timedelta(seconds=16)
    assert (await leases.claim("s2", [agent_address], None, 1, 5000, now=t1))[0] == []
    second = await deliver(leases, agent_address, "s2", now=t1 + timedelta(seconds=1))
    assert second.attempt == 2 and second.token != first.token
    # The first attempt is fenced off from every write.
    for write in (
        leases.record_step(first, 1, "extract", b"{}"),
        leases.save_checkpoint(first, b"{}"),
        leases.report_progress(first, "late", 0.5),
        leases.complete(first, b"{}"),
        leases.fail(first, "X", "late", True),
        leases.release(first, "AGENT_DIED"),
    ):
        with pytest.raises(errors.StaleLease):
            await write
    expired = mine(await leases.expire(now=t1 + timedelta(minutes=5)), intent_id)
    assert [(r["id"], r["state"]) for r in expired] == [(intent_id, "FAILED")]
    row = await pg.fetchrow("SELECT state::text, error_code, attempt FROM intents WHERE id=$1", intent_id)
    assert dict(row) == {"state": "FAILED", "error_code": "ATTEMPTS_EXHAUSTED", "attempt": 2}
    assert (await leases.claim("s3", [agent_address], None, 1, 5000, now=t1 + timedelta(minutes=6)))[0] == []


async def test_unacknowledged_delivery_is_taken_back(stores, agent_address) -> None:
    store, leases = stores
    intent_id = await send(store, agent_address)
    t0 = later()
    rows, _ = await leases.claim("s1", [agent_address], None, 1, 2000, now=t0)
    # Pings do not extend an unacknowledged delivery.
    await leases.renew("s1", now=t0 + timedelta(seconds=1))
    expired = mine(await leases.expire(now=t0 + timedelta(seconds=3)), intent_id)
    assert [r["id"] for r in expired] == [intent_id]
    with pytest.raises(errors.StaleLease):
        await leases.ack(LeaseRef(intent_id, 1, rows[0]["lease_token"]))


async def test_steps_are_recorded_once_and_replayed(stores, agent_address) -> None:
    store, leases = stores
    intent_id = await send(store, agent_address)
    lease = await deliver(leases, agent_address)
    first = await leases.record_step(lease, 1, "extract", b'{"rows": 3}')
    assert first["idx"] == 1 and first["attempt"] == 1
    again = await leases.record_step(lease, 1, "extract", b'{"rows": 999}')
    assert again["result"] == '{"rows": 3}'  # the stored record answers a repeat
    with pytest.raises(errors.FailedPrecondition, match="divergence"):
        await leases.record_step(lease, 1, "transform", b"{}")
    # Out of order (concurrent steps): position 3 before 2, which stays a hole.
    assert (await leases.record_step(lease, 3, "load", b"{}"))["idx"] == 3
    await leases.release(lease, "AGENT_DIED")
    rows, steps = await leases.claim("s2", [agent_address], None, 1, 5000)
    assert (rows[0]["attempt"], rows[0]["steps_completed"], rows[0]["last_step_index"]) == (2, 2, 3)
    assert [(s["idx"], s["name"], s["result"]) for s in steps[intent_id]] == [
        (1, "extract", '{"rows": 3}'), (3, "load", "{}")]


async def test_release_reasons_and_completion_repeat(stores, agent_address, pg) -> None:
    store, leases = stores
    intent_id = await send(store, agent_address, max_attempts=1)
    lease = await deliver(leases, agent_address)
    assert (await leases.release(lease, "DRAINED"))["state"] == "PENDING"  # a drain grants the attempt back
    assert await pg.fetchval("SELECT max_attempts FROM intents WHERE id=$1", intent_id) == 2
    lease = await deliver(leases, agent_address)
    await leases.complete(lease, b'{"ok": true}')
    await leases.complete(lease, b'{"ok": true}')  # a repeat (lost answer) is fine
    with pytest.raises(ValidationError, match=r"release\.reason"):
        await leases.release(lease, "BECAUSE")


async def test_non_retryable_failure_ends_at_once_and_retry_keeps_steps(stores, agent_address) -> None:
    store, leases = stores
    intent_id = await send(store, agent_address)
    lease = await deliver(leases, agent_address)
    await leases.record_step(lease, 1, "extract", b"1")
    assert (await leases.fail(lease, "BAD_INPUT", "no", retryable=False))["state"] == "FAILED"
    row = await store.get("default", intent_id)
    assert (row["state"], row["attempt"], row["error_code"]) == ("FAILED", 1, "BAD_INPUT")
    retried = await store.retry("default", intent_id, 0)
    assert retried["state"] == "PENDING" and retried["max_attempts"] == 1 + 3
    rows, steps = await leases.claim("s9", [agent_address], None, 1, 5000)
    assert rows[0]["attempt"] == 2 and [s["name"] for s in steps[intent_id]] == ["extract"]


async def test_retryable_failure_backs_off_and_counts(stores, agent_address) -> None:
    store, leases = stores
    intent_id = await send(store, agent_address, max_attempts=2)
    lease = await deliver(leases, agent_address)
    assert (await leases.fail(lease, "FLAKY", "try again", retryable=True))["state"] == "PENDING"
    row = await store.get("default", intent_id)
    assert row["available_at"] > row["update_time"]  # backoff before the next attempt
    lease = await deliver(leases, agent_address, now=row["available_at"])
    assert (await leases.fail(lease, "FLAKY", "again", retryable=True))["state"] == "FAILED"
    row = await store.get("default", intent_id)
    assert row["error_code"] == "ATTEMPTS_EXHAUSTED" and "FLAKY" in row["error_message"]


async def test_rebind_keeps_a_lease_only_for_its_token(stores, agent_address) -> None:
    store, leases = stores
    await send(store, agent_address)
    lease = await deliver(leases, agent_address, "old-stream")
    forged = LeaseRef(lease.intent_id, lease.attempt, uuid.uuid4())
    assert not await leases.rebind(forged, "thief", [agent_address])
    assert await leases.rebind(lease, "new-stream", [agent_address])
    assert {i for i, _ in await leases.renew("new-stream")} == {lease.intent_id}
    assert await leases.renew("old-stream") == set()


async def test_retention_deletes_old_terminal_intents_with_their_events_and_steps(stores, agent_address, pg) -> None:
    store, leases = stores
    done = await send(store, agent_address)
    lease = await deliver(leases, agent_address)
    await leases.record_step(lease, 1, "extract", b"1")
    await leases.complete(lease, b"{}")
    live = await send(store, agent_address)
    soon = datetime.now(UTC) + timedelta(days=1)
    await store.delete_finished(retention_s=2 * 86400, now=soon)  # finished a day ago: kept
    assert await pg.fetchval("SELECT count(*) FROM intents WHERE id = $1", done) == 1
    # Every batch: the shared database holds the terminal intents of earlier tests too.
    while await store.delete_finished(retention_s=3600, now=soon, batch=5000):
        pass
    assert await pg.fetchval("SELECT count(*) FROM intents WHERE id = $1", done) == 0
    assert await pg.fetchval("SELECT count(*) FROM intent_events WHERE intent_id = $1", done) == 0
    assert await pg.fetchval("SELECT count(*) FROM intent_steps WHERE intent_id = $1", done) == 0
    assert await pg.fetchval("SELECT count(*) FROM intents WHERE id = $1", live) == 1  # live intents never go


# ----------------------------------------------------------------- ack before writes, on a stream


def _step(lease: delivery_pb2.Lease, index: int) -> delivery_pb2.IntentWrite:
    return delivery_pb2.IntentWrite(lease=lease, step=delivery_pb2.StepWrite(index=index, name=f"s{index}",
                                                                           result=b"1"))


def test_a_write_sent_before_its_ack_waits_for_the_ack_and_is_accepted(server, agent_address) -> None:
    """The one rule that orders a lease's ack before its writes is the
    server's: a write that overtakes the ack waits for it (bounded by the ack
    timeout), so the sidecar never has to send a refused write again."""
    with IntentClient(server.address) as client:
        client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    raw = RawSidecar(server.address, agent_address, ping_every=0.2)
    try:
        lease = raw.recv("assignment").lease
        raw.send(write=apb.WriteRequest(request_id=1, write=_step(lease, 1)))
        time.sleep(0.5)  # read and waiting, its ack not sent yet
        assert not raw.of("write_result")
        raw.send(ack=delivery_pb2.AckAssignment(lease=lease))
        result = raw.recv("write_result")
        assert (result.request_id, result.code, result.message) == (1, 0, "")
        assert (result.step.index, result.step.name) == (1, "s1")
    finally:
        raw.close()


def test_a_lease_acknowledged_on_an_earlier_stream_is_written_at_once(server, agent_address) -> None:
    """A reconnecting sidecar re-announces an acknowledged lease and sends no
    second ack: its writes must not wait for one."""
    with IntentClient(server.address) as client:
        client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
    first = RawSidecar(server.address, agent_address, ping_every=0.2)
    lease = first.recv("assignment").lease
    first.send(ack=delivery_pb2.AckAssignment(lease=lease))
    assert first.write(1, _step(lease, 1)).code == 0
    first.close()
    second = RawSidecar(server.address, agent_address, ping_every=0.2, held=[lease])
    try:
        assert [kept.token for kept in second.registered.kept] == [lease.token]
        began = time.monotonic()
        assert second.write(2, _step(lease, 2)).code == 0
        assert time.monotonic() - began < server.settings.ack_timeout_ms / 1000 / 2
    finally:
        second.close()


async def test_a_renewal_that_finds_a_lease_canceled_tells_its_holder_canceled_not_lost(stores, agent_address) -> None:
    # The cancel's event may reach the stream after its next renewal: the
    # renewal then judges the lease, and must name the end, not a lapse.
    from intentd.server.stream.leases import StreamLeases

    store, leases = stores
    canceled_id, lapsed_id = await send(store, agent_address), await send(store, agent_address)
    session = f"renew-{uuid.uuid4()}"
    canceled = await deliver(leases, agent_address, session)
    lapsed = await deliver(leases, agent_address, session)
    assert {canceled.intent_id, lapsed.intent_id} == {canceled_id, lapsed_id}
    sent: list[apb.ConnectResponse] = []
    stream = StreamLeases(session, "sidecar-1", {}, sent.append, asyncio.Event())
    stream.hold(canceled, seq=0, acked=True)
    stream.hold(lapsed, seq=0, acked=True)
    await store.cancel("default", canceled.intent_id, "the test cancels it")
    await leases.release(lapsed, "AGENT_DIED", stream=session)  # back to PENDING behind this stream's back
    await stream.renew(leases)
    reasons = {m.revocation.lease.intent_id: m.revocation.reason for m in sent}
    assert reasons == {canceled.intent_id: "CANCELED", lapsed.intent_id: "LEASE_LOST"}
    assert len(stream) == 0
