"""Real server processes on one database: replicas share nothing but
PostgreSQL, and a restart loses nothing."""

from __future__ import annotations

import threading
import time
import uuid

from intentd.client import IntentClient, IntentState
from tests.support import ServerProcess, running, wait_until

TYPE = "intent.pipeline.process.v1"


def test_two_replicas_see_watch_and_cancel_each_others_intents(database_url, agent_address, tmp_path) -> None:
    a = ServerProcess(database_url, tmp_path / "a.log").start()
    b = ServerProcess(database_url, tmp_path / "b.log").start()
    with running(a, b), IntentClient(a.address) as via_a, IntentClient(b.address) as via_b:
        intent_id = via_a.send_intent(intent_type=TYPE, to_agent=agent_address, payload={"n": 1})
        assert via_b.get(intent_id).state is IntentState.PENDING
        events: list[tuple[int, str]] = []
        watching = threading.Thread(target=lambda: events.extend((e.seq, e.type) for e in via_a.watch(intent_id)))
        watching.start()
        canceled = via_b.cancel(intent_id, reason="from replica b")
        assert canceled.state is IntentState.CANCELED
        watching.join(15)
        assert not watching.is_alive()
        assert events == [(1, "CREATED"), (2, "CANCELED")]
        assert via_a.wait_for(intent_id, timeout=5).cancel_reason == "from replica b"
        assert [i.id for i in via_b.list(to_agent=agent_address).intents] == [intent_id]


def test_restart_keeps_intents_and_a_retrying_client_rides_through(database_url, agent_address, tmp_path) -> None:
    server = ServerProcess(database_url, tmp_path / "s1.log").start()
    sent: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_sending() -> None:
        # Enough retries to outlast a restart; each send carries its own key,
        # so a retry after a lost answer cannot make a second intent.
        with IntentClient(server.address, max_retries=60, max_backoff=0.5, timeout=5) as client:
            n = 0
            while not stop.is_set() and n < 400:
                try:
                    sent.append(client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={"n": n},
                                                   idempotency_key=f"restart-{n}-{uuid.uuid4().hex}"))
                except BaseException as exc:
                    errors.append(exc)
                    return
                n += 1

    with running(server):
        with IntentClient(server.address) as client:
            before = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={"before": True})
            client.cancel(before, reason="checking events survive")
        sender = threading.Thread(target=keep_sending)
        sender.start()
        deadline = time.monotonic() + 10
        while len(sent) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL: no graceful anything
        restarted = ServerProcess(database_url, tmp_path / "s2.log", port=server.port).start()
        with running(restarted):
            count_at_restart = len(sent)
            deadline = time.monotonic() + 20
            while len(sent) < count_at_restart + 20 and time.monotonic() < deadline and not errors:
                time.sleep(0.01)
            stop.set()
            sender.join(30)
            assert not errors, errors
            assert len(sent) >= count_at_restart + 20, "the client did not get going again after the restart"
            with IntentClient(restarted.address) as client:
                old = client.get(before)
                assert old.state is IntentState.CANCELED
                assert [e.type for e in client.watch(before)] == ["CREATED", "CANCELED"]
                listed = {i.id for i in client.iter_intents(to_agent=agent_address)}
                assert set(sent) | {before} == listed  # none lost, none doubled
                assert len(sent) == len(set(sent))


def test_sigterm_shuts_down_gracefully_and_watchers_resume(database_url, agent_address, tmp_path) -> None:
    server = ServerProcess(database_url, tmp_path / "g1.log").start()
    with running(server), IntentClient(server.address, max_retries=60, max_backoff=0.3) as client:
        intent_id = client.send_intent(intent_type=TYPE, to_agent=agent_address, payload={})
        events: list[int] = []
        def follow() -> None:
            for event in client.watch(intent_id):
                events.append(event.seq)

        watching = threading.Thread(target=follow)
        watching.start()
        wait_until(lambda: events == [1], 10, what="the watch to replay its first event")  # now tailing
        assert server.terminate(timeout=15) == 0
        assert "stopped" in server.log()
        restarted = ServerProcess(database_url, tmp_path / "g2.log", port=server.port).start()
        with running(restarted):
            with IntentClient(restarted.address) as other:
                other.cancel(intent_id, reason="after restart")
            watching.join(20)
            assert not watching.is_alive()
            assert events == [1, 2]
