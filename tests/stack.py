"""A real stack for tests: server processes, sidecars supervising the
ledger test agent (tests/agents/ledger_agent.py), and the ledger that shows
what really ran."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from intentd.client import IntentClient
from intentd.testing.database import connection
from tests.support import ROOT, Process, ServerProcess, run_sync

TYPE = "test.ledger.run.v1"


@pytest.fixture(scope="session")
def ledger_db(database_url: str) -> str:
    return create_ledger(database_url)


def create_ledger(database_url: str) -> str:
    async def create() -> None:
        async with connection(database_url) as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS test_ledger (id bigserial PRIMARY KEY, intent_id text, step int,"
                " attempt int, phase text, pid int, at timestamptz DEFAULT clock_timestamp())"
            )

    run_sync(create())
    return database_url


def ledger(database_url: str, intent_id: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        async with connection(database_url) as conn:
            rows = await conn.fetch("SELECT step, attempt, phase, pid FROM test_ledger WHERE intent_id=$1 ORDER BY id",
                                    intent_id)
        return [dict(r) for r in rows]

    return list(run_sync(read()))


def begins(entries: list[dict[str, Any]]) -> Counter[int]:
    return Counter(e["step"] for e in entries if e["phase"] == "begin")


class Sidecar(Process):
    def __init__(self, server: str, address: str, ledger_url: str, log_path: Path,
                 agent_module: str = "tests.agents.ledger_agent", **env: str) -> None:
        socket_path = f"/tmp/intentd-test-{uuid.uuid4().hex[:10]}.sock"
        agent = f"{sys.executable} -m {agent_module}"
        super().__init__(
            ["sidecar", "--server", server, "--address", address, "--capacity", env.pop("capacity", "4"),
             "--listen", f"unix://{socket_path}", "--exec", agent],
            {"TEST_AGENT_ADDRESS": address, "TEST_LEDGER_URL": ledger_url, "PYTHONPATH": str(ROOT),
             "INTENTD_LOG_LEVEL": "INFO", **env},
            log_path,
        )

@pytest.fixture
def cluster(ledger_db: str, tmp_path: Path, agent_address: str) -> Iterator[Callable[..., Any]]:
    started: list[Process] = []

    class Cluster:
        address = agent_address
        db = ledger_db
        logs_dir = str(tmp_path)

        def track(self, process: Process) -> None:
            started.append(process)

        def server(self, **env: str) -> ServerProcess:
            srv = ServerProcess(self.db, tmp_path / f"server-{len(started)}.log", **env).start()
            started.append(srv)
            return srv

        def sidecar(self, server: str, agent_module: str = "tests.agents.ledger_agent", **env: str) -> Sidecar:
            sc = Sidecar(server, agent_address, self.db, tmp_path / f"sidecar-{len(started)}.log", agent_module,
                         **env)
            sc.start()
            started.append(sc)
            return sc

        def logs(self) -> str:
            return "\n".join(f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in started)

    yield Cluster()
    for p in reversed(started):
        if isinstance(p, Sidecar):
            p.kill_group()
        elif p.alive():
            p.kill()


def send(client: IntentClient, address: str, **payload: Any) -> str:
    max_attempts = payload.pop("max_attempts", 0)
    return client.send_intent(intent_type=TYPE, to_agent=address, payload=payload, max_attempts=max_attempts)


def finish(client: IntentClient, intent_id: str, cluster: Any, timeout: float = 60) -> Any:
    try:
        return client.wait_for(intent_id, timeout=timeout)
    except Exception:
        print(cluster.logs())
        raise
