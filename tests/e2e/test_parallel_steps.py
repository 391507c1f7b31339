"""Parallel steps with real processes: a real server, a real sidecar
supervising tests/agents/parallel_agent.py, real SIGKILL between the commits
of concurrent steps (the fast ones recorded, the slow ones still running).
After the redelivery each recorded step is replayed (its function not called
again), each other one runs again, and no position is recorded twice: the
agent's ledger and intent_steps / intent_events in the database say so."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from intentd.client import IntentClient, IntentState
from intentd.testing.database import connection
from tests.stack import begins, ledger
from tests.support import run_sync

AGENT = "tests.agents.parallel_agent"
ASYNC = "test.parallel.run.v1"
SYNC = "test.parallel.sync.v1"


def recorded(database_url: str, intent_id: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with connection(database_url) as conn:
            steps = await conn.fetch("SELECT idx, name, attempt FROM intent_steps WHERE intent_id = $1 ORDER BY idx",
                                     intent_id)
            events = await conn.fetch("SELECT step_index FROM intent_events WHERE intent_id = $1"
                                      " AND type = 'STEP_COMPLETED'", intent_id)
            row = await conn.fetchrow("SELECT steps_completed, last_step_index FROM intents WHERE id = $1", intent_id)
        return {"steps": [(r["idx"], r["name"], r["attempt"]) for r in steps],
                "events": Counter(r["step_index"] for r in events),
                "counts": (row["steps_completed"], row["last_step_index"])}

    return dict(run_sync(read()))


def run_killed(client: IntentClient, cluster: Any, intent_type: str, n: int, fast: list[int]) -> None:
    intent_id = client.send_intent(intent_type=intent_type, to_agent=cluster.address,
                                   payload={"n": n, "fast": fast})
    final = client.wait_for(intent_id, timeout=90)
    assert final.state is IntentState.COMPLETED, (final.state, final.error, cluster.logs()[-6000:])
    assert final.result == [f"v{p}" for p in range(1, n + 1)]
    assert final.attempt == 2  # the kill, then one redelivery

    entries = ledger(cluster.db, intent_id)
    assert [(e["step"], e["attempt"]) for e in entries if e["phase"] == "killing"] == [(0, 1)]
    slow = [p for p in range(1, n + 1) if p not in fast]
    # Recorded before the kill: replayed, their functions not called again;
    # still running at the kill: run again on attempt 2.
    assert begins(entries) == Counter({**{p: 1 for p in fast}, **{p: 2 for p in slow}})
    assert {e["step"] for e in entries if e["phase"] == "begin" and e["attempt"] == 2} == set(slow)

    db = recorded(cluster.db, intent_id)
    # Every position recorded exactly once, by the attempt that ran it to the end.
    assert db["steps"] == [(p, f"s{p}", 1 if p in fast else 2) for p in range(1, n + 1)]
    assert db["events"] == Counter(range(1, n + 1))
    assert db["counts"] == (n, n)


@pytest.mark.parametrize(("n", "fast"), [
    (2, [1]),                   # the first committed, the second not
    (2, [2]),                   # the second committed: position 1 is a hole below it
    (10, [2, 4, 6, 8, 10]),     # ten at once, every other one a hole on replay
])
def test_a_kill_between_concurrent_commits_replays_the_recorded_and_reruns_the_rest(
        cluster: Any, n: int, fast: list[int]) -> None:
    server = cluster.server()
    cluster.sidecar(server.address, AGENT)
    with IntentClient(server.address) as client:
        run_killed(client, cluster, ASYNC, n, fast)


def test_sync_parallel_killed_between_commits(cluster: Any) -> None:
    server = cluster.server()
    cluster.sidecar(server.address, AGENT)
    with IntentClient(server.address) as client:
        # One at a time: a kill ends every intent the agent process holds.
        run_killed(client, cluster, SYNC, 2, [1])
        run_killed(client, cluster, SYNC, 10, [1, 2, 3, 7, 9])


def test_concurrent_steps_without_a_kill(cluster: Any) -> None:
    server = cluster.server()
    cluster.sidecar(server.address, AGENT)
    with IntentClient(server.address) as client:
        for intent_type in (ASYNC, SYNC):
            intent_id = client.send_intent(intent_type=intent_type, to_agent=cluster.address, payload={"n": 10})
            final = client.wait_for(intent_id, timeout=60)
            assert final.state is IntentState.COMPLETED and final.attempt == 1, cluster.logs()[-4000:]
            assert final.result == [f"v{p}" for p in range(1, 11)]
            assert recorded(cluster.db, intent_id)["counts"] == (10, 10)
