"""The Node.js examples (examples/node) against a live stack: a real control
plane process, a real sidecar supervising the Node agent (`--exec "node
agent.js"`), and the Node client. Everything is loaded from the .proto files
at run time, so this is also a check that the contracts work from a second
language without generated code."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from intentd.client import IntentClient, IntentState
from intentd.generated.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.support import ROOT, Process, ServerProcess, wait_until

NODE_DIR = ROOT / "examples" / "node"
CLIENT_JS = NODE_DIR / "client.js"
AGENT_JS = NODE_DIR / "agent.js"
INTENT_TYPE = "example.node.steps.v1"

pytestmark = pytest.mark.timeout(120)


@dataclass
class Stack:
    server: ServerProcess
    # `intentd sidecar` supervising the Node agent; its own process group, so
    # killing the group takes the agent along.
    sidecar: Process
    address: str
    node: str
    tmp: Path

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in (self.server, self.sidecar))

    def run_client(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
        result = subprocess.run(
            [self.node, str(CLIENT_JS), self.server.address, self.address, json.dumps(payload)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "WAIT_TIMEOUT_S": "30"},
        )
        lines = result.stdout.strip().splitlines()
        assert lines, f"client printed nothing (exit {result.returncode}):\n{result.stderr}\n{self.logs()}"
        return result.returncode, json.loads(lines[-1]), result.stdout


@pytest.fixture(scope="module")
def stack(node: str, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("node-stack")
    address = f"agent://test/node{uuid.uuid4().hex[:8]}/worker"
    server = ServerProcess(database_url, tmp / "server.log").start()
    # Short, so it fits sockaddr_un on any TMPDIR.
    socket_path = f"/tmp/intentd-node-{uuid.uuid4().hex[:10]}.sock"
    sidecar = Process(
        ["sidecar", "--server", server.address, "--address", address, "--listen", f"unix://{socket_path}",
         "--exec", f"{shlex.quote(node)} {shlex.quote(str(AGENT_JS))}"],
        {"INTENTD_LOG_LEVEL": "INFO"},
        tmp / "sidecar.log",
    )
    sidecar.start()
    try:
        wait_until(lambda: "attached to" in sidecar.log() or not sidecar.alive(), 30, 0.05, "the Node agent")
        assert sidecar.alive(), sidecar.log()
        yield Stack(server, sidecar, address, node, tmp)
    finally:
        sidecar.kill_group()
        server.kill()


def ledger_begins(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["phase"] == "begin"]


def test_node_client_sends_and_node_agent_completes(stack: Stack) -> None:
    ledger = stack.tmp / f"ledger-{uuid.uuid4().hex[:6]}.jsonl"
    code, final, stdout = stack.run_client({"steps": 3, "ledger": str(ledger)})
    assert code == 0, f"{stdout}\n{stack.logs()}"
    assert '"state":"COMPLETED"' in stdout
    assert final["state"] == "COMPLETED"
    assert final["intent_type"] == INTENT_TYPE and final["to_agent"] == stack.address
    assert final["result"] == {"total": 60, "steps": 3, "language": "node", "replayed": 0, "attempt": 1}
    assert final["attempt"] == 1 and final["steps_completed"] == 3
    assert [e["step"] for e in ledger_begins(ledger)] == [1, 2, 3]
    # What the Node processes wrote is what PostgreSQL holds, read back by the Python client.
    with IntentClient(stack.server.address) as client:
        intent = client.get(final["id"])
        assert intent.state is IntentState.COMPLETED and intent.result == final["result"]
        steps = client.steps(final["id"])
        assert [(s.index, s.name, s.result) for s in steps] == [(1, "step-1", 10), (2, "step-2", 20),
                                                                (3, "step-3", 30)]


@pytest.mark.parametrize("mode", ["kill", "exit"])
def test_node_agent_killed_mid_way_resumes_without_rerunning_recorded_steps(stack: Stack, mode: str) -> None:
    ledger = stack.tmp / f"ledger-{mode}-{uuid.uuid4().hex[:6]}.jsonl"
    payload = {"steps": 5, "crash_at": 3, "crash_mode": mode, "ledger": str(ledger)}
    code, final, stdout = stack.run_client(payload)
    assert code == 0, f"{stdout}\n{stack.logs()}"
    assert final["state"] == "COMPLETED"
    assert final["attempt"] == 2
    # Attempt 2 was handed steps 1-2 by BeginStep and ran 3-5 itself.
    assert final["result"] == {"total": 150, "steps": 5, "language": "node", "replayed": 2, "attempt": 2}
    begins = ledger_begins(ledger)
    assert Counter(e["step"] for e in begins) == Counter({1: 1, 2: 1, 3: 2, 4: 1, 5: 1})
    assert [(e["step"], e["attempt"]) for e in begins] == [(1, 1), (2, 1), (3, 1), (3, 2), (4, 2), (5, 2)]
    assert len({e["pid"] for e in begins}) == 2, "attempt 2 ran in a new agent process"
    with IntentClient(stack.server.address) as client:
        steps = client.steps(final["id"])
        assert [s.attempt for s in steps] == [1, 1, 2, 2, 2]
        released = [e for e in client.watch(final["id"]) if e.type == "RELEASED"]
        assert [e.message for e in released] == ["AGENT_DIED"]


@pytest.mark.parametrize("hold_ms", [0, 20_000])
def test_node_agent_waits_for_a_signal_parked_or_held(stack: Stack, hold_ms: int) -> None:
    """The wire steps of a wait from a second language: BeginStep at the
    wait's position, Wait, then either the record (held) or the end of the
    attempt (parked) and a replay of the record after the signal woke it."""
    with grpc.insecure_channel(stack.server.address) as channel:
        admin_service_pb2_grpc.AdminServiceStub(channel).PutIntentType(admin_service_pb2.PutIntentTypeRequest(
            intent_type=admin_service_pb2.IntentType(intent_type=INTENT_TYPE, wait_hold_ms=hold_ms)))
    ledger = stack.tmp / f"ledger-wait-{uuid.uuid4().hex[:6]}.jsonl"
    with IntentClient(stack.server.address) as client:
        intent_id = client.send_intent(intent_type=INTENT_TYPE, to_agent=stack.address,
                                       payload={"steps": 2, "wait_for_signal": "go", "ledger": str(ledger)})

        def waiting() -> bool:
            intent = client.get(intent_id)
            return intent.waiting is not None and (hold_ms > 0 or intent.state is IntentState.WAITING)

        wait_until(waiting, 30, 0.02, "the Node agent reached its wait")
        client.signal(intent_id, "go", {"from": "python"})
        final = client.wait_for(intent_id, timeout=30)
        assert final.state is IntentState.COMPLETED, (final.error, stack.logs())
        assert final.result["signal"] == {"from": "python"}
        assert final.parked_attempts == (1 if hold_ms == 0 else 0)
        assert final.attempt == (2 if hold_ms == 0 else 1)
        assert [e["step"] for e in ledger_begins(ledger)] == [1, 2]
        assert [s.name for s in client.steps(intent_id)] == ["step-1", "step-2", "@signal:go"]
