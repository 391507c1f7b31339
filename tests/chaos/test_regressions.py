"""Product bugs the chaos soak found, each as the smallest test that shows
it. They were written as strict xfails against the code the soak ran on;
each bug has since been fixed in the tree, so they now guard the fixes.

See docs/chaos.md ("Bugs found") for how each showed up in a soak."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from intentd.client import IntentClient, IntentState, Internal, Unavailable
from intentd.generated.v1 import agent_service_pb2, delivery_pb2
from tests.support import RawSidecar, run_sync, wait_until

TYPE = "test.chaos.regression.v1"


async def _sql(database_url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def test_late_notification_of_an_older_event_does_not_strand_a_live_lease(
        make_server: Any, database_url: str, agent_address: str) -> None:
    """Bug 1: AgentService._on_event (server/agent_service.py) revoked a held
    lease on any PENDING/FAILED notification without looking at its seq, so a
    late notification of an older event (the CREATED event, or the previous
    attempt's RELEASED) revoked a lease just claimed or re-bound; the stream
    kept renewing it (renew_leases goes by session), so the intent stayed
    IN_PROGRESS with nobody working on it."""
    srv = make_server(heartbeat_timeout_ms=1000, ping_interval_ms=100)
    sidecar = RawSidecar(srv.address, agent_address, ping_every=0.1)
    try:
        wait_until(lambda: sidecar.of("registered"), 10, what="Registered")
        with IntentClient(srv.address) as client:
            intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
            lease: delivery_pb2.Lease = wait_until(
                lambda: next((a.lease for a in sidecar.of("assignment")), None), 10, what="the assignment")
            sidecar.send(ack=delivery_pb2.AckAssignment(lease=lease))
            wait_until(lambda: client.get(intent_id).state is IntentState.IN_PROGRESS, 10, what="IN_PROGRESS")
            # The CREATED event's notification (seq 1, state PENDING), delivered
            # late: LISTEN/NOTIFY does not order it before the claim.
            run_sync(_sql(database_url, "SELECT pg_notify('intentd_events', $1)", f"{intent_id}:1:PENDING"))
            time.sleep(3.0)  # three heartbeat timeouts, the stream pinging all along
            revoked = [r for r in sidecar.of("revocation") if r.lease.token == lease.token]
            intent = client.get(intent_id)
            stranded = bool(revoked) and intent.state is IntentState.IN_PROGRESS and intent.attempt == lease.attempt
            assert not stranded, (
                f"the holder was told {revoked[0].reason} ({revoked[0].message}) but the intent is still "
                f"{intent.state.value} under that lease {3.0}s later: nobody will ever finish it")
            client.cancel(intent_id)
    finally:
        sidecar.close()


def test_calls_after_pooled_connections_are_terminated_are_retryable_not_internal(
        make_server: Any, database_url: str, agent_address: str) -> None:
    """Bug 2: server/db.py did not map asyncpg's InternalClientError ("cannot
    switch to state N; another operation (2) is in progress", asyncpg issue
    #1069), raised when a pooled connection is used after PostgreSQL's FATAL for
    a terminated backend arrived but before the close was processed; the RPC
    answered INTERNAL, which clients do not retry (in a soak, wait_for raised
    Internal after conn_drop, and a SendIntent retry answered INTERNAL although
    its first try had created the intent)."""
    name = f"regr-{uuid.uuid4().hex[:8]}"
    srv = make_server(pool_min_size=1, pool_max_size=1, instance_name=name)
    internal: list[str] = []
    calls = 0
    stop = threading.Event()
    with IntentClient(srv.address, max_retries=0) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})

        def hammer() -> None:
            nonlocal calls
            while not stop.is_set():
                calls += 1
                try:
                    client.get(intent_id)
                except Unavailable:
                    pass  # retried by every client: fine
                except Internal as exc:
                    internal.append(str(exc))

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()

        async def drop_connections() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                for _ in range(60):  # what the soak's conn_drop fault does, often
                    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                       " WHERE application_name = $1", f"intentd:{name}")
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()

        try:
            run_sync(drop_connections(), timeout=60)
        finally:
            stop.set()
            thread.join(10)
        client.cancel(intent_id)
    assert not internal, f"{len(internal)} of {calls} GetIntent calls answered INTERNAL, e.g. {internal[0]}"


def test_send_retried_after_its_deadline_passed_returns_the_original(server: Any, agent_address: str) -> None:
    """Bug 4: IntentService._new_intent (server/intent_service.py) refused a
    deadline in the past before the idempotency key was looked up, so a
    SendIntent retried (same key, same absolute deadline) after the deadline
    passed answered INVALID_ARGUMENT although the first attempt had created the
    intent: the sender was told the send failed while the intent existed."""
    key = f"regr-{uuid.uuid4().hex}"
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    spec = {"intent_type": TYPE, "to_agent": agent_address, "payload": {"n": 1}, "idempotency_key": key,
            "deadline": deadline}
    with IntentClient(server.address) as client:
        first, created = client.send(spec)
        assert created
        time.sleep(1.3)
        # The client's retry of a send whose answer was lost (e.g. the replica
        # died after the commit) carries the same key and the same deadline.
        again, created_again = client.send(spec)
        assert (again.id, created_again) == (first.id, False)


def test_frozen_sidecar_does_not_let_its_agent_run_a_step_recorded_meanwhile(
        make_server: Any, database_url: str, agent_address: str, tmp_path: Any) -> None:
    """Bug 3: a sidecar frozen (SIGSTOP) while the answer to a committed
    RecordStep was on its way delivered that OK to its agent when it woke,
    before its pinger noticed the silence (sidecar/upstream.py _read_loop
    handled messages without checking how long the stream had been silent); by
    then its lease had lapsed and another attempt had recorded the next step,
    which the zombie agent then ran again."""
    import os
    import signal

    from tests.stack import TYPE as LEDGER_TYPE
    from tests.stack import Sidecar, create_ledger, ledger

    create_ledger(database_url)
    # Streams ping every 2 s, so a sidecar calls its stream dead after 6 s of
    # silence; leases lapse 6 s after the last ping (the least allowed).
    srv = make_server(heartbeat_timeout_ms=6000, ping_interval_ms=2000)
    leases = srv.plane.agents.leases
    record_step = leases.record_step
    claim = leases.claim
    frozen: list[str] = []  # the frozen sidecar's stream (server-side session id)

    async def record_then_freeze(lease: Any, index: int, *args: Any, **kwargs: Any) -> Any:
        row = await record_step(lease, index, *args, **kwargs)
        if index == 3 and lease.attempt == 1 and not frozen:
            # Committed; the OK is about to go out to a sidecar that froze.
            os.kill(first.pid, signal.SIGSTOP)
            async with leases.db.connection() as conn:
                frozen.append(await conn.fetchval("SELECT lease_session FROM intents WHERE id = $1",
                                                  lease.intent_id))
        return row

    async def claim_elsewhere(session: str, *args: Any, **kwargs: Any) -> Any:
        # The other sidecar takes the intent over (the frozen one's stream
        # stays open on the server a while and could otherwise win it back).
        if session in frozen:
            return [], {}
        return await claim(session, *args, **kwargs)

    leases.claim = claim_elsewhere
    leases.record_step = record_then_freeze
    first = Sidecar(srv.address, agent_address, database_url, tmp_path / "first.log")
    second = Sidecar(srv.address, agent_address, database_url, tmp_path / "second.log")
    first.start()
    try:
        with IntentClient(srv.address) as client:
            intent_id = client.send_intent(intent_type=LEDGER_TYPE, to_agent=agent_address,
                                           payload={"steps": 6, "step_seconds": 0.1})
            wait_until(lambda: frozen, 30, what="step 3 recorded and its sidecar frozen")
            second.start()  # takes the intent over once the frozen sidecar's lease lapses
            wait_until(lambda: any(s.index == 4 for s in client.steps(intent_id)), 30, interval=0.01,
                       what="the second sidecar to record step 4")
            # Woken before its own 6 s silence limit, after its lease lapsed.
            os.kill(first.pid, signal.SIGCONT)
            step4 = next(s for s in client.steps(intent_id) if s.index == 4)
            final = client.wait_for(intent_id, timeout=60)
            time.sleep(1.0)  # the zombie hears its lease is gone and stops
        assert final.state is IntentState.COMPLETED and step4.attempt == 2
        late = [e for e in ledger(database_url, intent_id)
                if e["phase"] == "begin" and e["step"] == 4 and e["attempt"] == 1]
        assert not late, f"attempt 1 began step 4 after attempt 2 recorded it at {step4.record_time}: {late}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGCONT)
        first.kill_group()
        second.kill_group()


def test_an_intent_past_its_deadline_does_not_complete(make_server: Any, agent_address: str) -> None:
    """Bug 5: deadlines were enforced only by the deadline sweeper; the fenced
    writes (server/sql/leases.sql complete_intent, record_step) did not check
    the deadline, so an intent completed after its deadline whenever the
    sweeper had not run yet (up to INTENTD_SWEEP_INTERVAL_S, or a whole
    database outage), though docs/state-machine.md says TIMED_OUT when "the
    deadline passed first"."""
    srv = make_server(sweep_interval_s=30)  # a legal setting: sweeps are rare
    sidecar = RawSidecar(srv.address, agent_address, ping_every=0.1)
    try:
        wait_until(lambda: sidecar.of("registered"), 10, what="Registered")
        with IntentClient(srv.address) as client:
            intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={},
                                           deadline=timedelta(seconds=1.0))
            lease: delivery_pb2.Lease = wait_until(
                lambda: next((a.lease for a in sidecar.of("assignment")), None), 10, what="the assignment")
            sidecar.send(ack=delivery_pb2.AckAssignment(lease=lease))
            wait_until(lambda: client.get(intent_id).state is IntentState.IN_PROGRESS, 10, what="IN_PROGRESS")
            deadline = client.get(intent_id).deadline
            assert deadline is not None
            time.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 0.5)
            sidecar.send(write=agent_service_pb2.WriteRequest(
                request_id=1, write=delivery_pb2.IntentWrite(
                    lease=lease, complete=delivery_pb2.CompleteWrite(result=b"{}"))))
            wait_until(lambda: sidecar.of("write_result"), 10, what="the write result")
            final = client.get(intent_id)
            assert final.state is not IntentState.COMPLETED, (
                f"completed at {final.finish_time}, {(final.finish_time - deadline).total_seconds():.2f}s after"
                f" its deadline {deadline}")
    finally:
        sidecar.close()
