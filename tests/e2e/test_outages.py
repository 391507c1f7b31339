"""PostgreSQL unreachable for 30 s under load: the control plane answers
UNAVAILABLE (no hang, no crash), agents' writes wait and retry, no lease is
expired for the time the database was away, and everything completes after."""

from __future__ import annotations

import time

import pytest

from intentd.client import IntentClient, IntentState, Unavailable
from tests.proxy import TcpProxy, postgres_through, postgres_upstream
from tests.stack import TYPE, begins, create_ledger, ledger
from tests.support import wait_until

OUTAGE_SECONDS = 30


@pytest.mark.timeout(180)
def test_database_outage_under_load_loses_nothing_and_redelivers_nothing(cluster, databases) -> None:
    # A database of its own: any other replica on the shared one (the session's
    # in-process server) would rightly see the partitioned replica's leases lapse.
    # Here the whole control plane loses PostgreSQL, as in a real outage.
    cluster.db = create_ledger(databases.create())
    with TcpProxy(postgres_upstream(cluster.db)) as proxy:
        server = cluster.server(INTENTD_DATABASE_URL=postgres_through(proxy, cluster.db),
                                INTENTD_HEARTBEAT_TIMEOUT_MS="2000")
        cluster.sidecar(server.address)
        with IntentClient(server.address) as client:
            ids = [client.send_intent(intent_type=TYPE, to_agent=cluster.address,
                                      payload={"steps": 40, "step_seconds": 0.1}) for _ in range(3)]
            wait_until(lambda: all(begins(ledger(cluster.db, i))[5] for i in ids), 60, what="work under way")
            proxy.cut(seconds=OUTAGE_SECONDS)
            cut_at = time.monotonic()
            # The control plane answers, and says the truth: unavailable, retry.
            with IntentClient(server.address, max_retries=0) as impatient:
                started = time.monotonic()
                with pytest.raises(Unavailable):
                    impatient.get(ids[0])
                assert time.monotonic() - started < 10
            assert server.alive()
            during = {i: max(begins(ledger(cluster.db, i)), default=0) for i in ids}
            finals = [client.wait_for(i, timeout=OUTAGE_SECONDS + 90) for i in ids]
        assert time.monotonic() - cut_at >= OUTAGE_SECONDS - 1
    assert [f.state for f in finals] == [IntentState.COMPLETED] * 3, cluster.logs()
    # No redelivery: the same attempt carried on once the database was back.
    assert [f.attempt for f in finals] == [1, 1, 1], cluster.logs()
    for intent_id in ids:
        ran = begins(ledger(cluster.db, intent_id))
        assert set(ran.values()) == {1}, ran  # no step ran twice
        assert sorted(ran) == list(range(1, 41))
    # Work stalled at the outage rather than running on unrecorded.
    assert all(steps < 40 for steps in during.values()), during


def test_frozen_sidecar_past_its_lease_wakes_up_fenced_off(cluster) -> None:
    import signal

    server = cluster.server()
    frozen = cluster.sidecar(server.address)
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=cluster.address,
                                       payload={"steps": 30, "step_seconds": 0.1})
        wait_until(lambda: begins(ledger(cluster.db, intent_id))[3], 60, what="step 3 under way")
        frozen.signal(signal.SIGSTOP)  # the sidecar only: its agent runs on and blocks on it
        try:
            cluster.sidecar(server.address)
            # The lease lapses (2 s without pings) and the other sidecar resumes the intent.
            wait_until(lambda: client.get(intent_id).attempt == 2, 30, what="redelivery")
        finally:
            frozen.signal(signal.SIGCONT)
        final = client.wait_for(intent_id, timeout=90)
        steps = client.steps(intent_id)
    assert final.state is IntentState.COMPLETED and final.attempt == 2, cluster.logs()
    assert [s.index for s in steps] == list(range(1, 31))
    first = [s.index for s in steps if s.attempt == 1]
    assert first == list(range(1, len(first) + 1))  # attempt 1 recorded a prefix, attempt 2 the rest
    entries = ledger(cluster.db, intent_id)
    # After waking, the zombie agent was told to stop; nothing it did after its
    # lease lapsed was recorded, and no recorded step ran again.
    ran = begins(entries)
    assert all(ran[i] == 1 for i in first), ran
    assert {e["attempt"] for e in entries if e["phase"] == "begin" and e["step"] > len(first) + 1} == {2}
