"""The orchestrator example (examples/orchestrator) against live stacks:
real control-plane, sidecar and agent processes, the reviewer in Node.js.

- The Node reviewer alone (a client sends it the review intent directly)
  runs today: it is a plain agent.
- The whole example (examples/orchestrator/run.py: the orchestrator starts
  research and coding at once, gathers them, calls the reviewer)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from intentd.client import IntentClient, IntentState
from tests.e2e.test_node_examples import AGENT_JS
from tests.support import ROOT, Process, ServerProcess, wait_until

EXAMPLE = ROOT / "examples" / "orchestrator"
REVIEW_TYPE = "intent.example.review.v1"

pytestmark = pytest.mark.timeout(240)

def _ledger(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reviewer(node: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[ServerProcess, str]]:
    tmp = tmp_path_factory.mktemp("reviewer")
    address = f"agent://test/rev{uuid.uuid4().hex[:8]}/reviewer"
    server = ServerProcess(database_url, tmp / "server.log").start()
    sidecar = Process(
        ["sidecar", "--server", server.address, "--address", address,
         "--listen", f"unix:///tmp/intentd-rev-{uuid.uuid4().hex[:10]}.sock",
         "--exec", f"{shlex.quote(node)} {shlex.quote(str(AGENT_JS))}"],
        {"INTENTD_LOG_LEVEL": "INFO", "AGENT_HANDLERS": str(EXAMPLE / "reviewer.js")},
        tmp / "sidecar.log",
    )
    sidecar.start()
    try:
        wait_until(lambda: "attached to" in sidecar.log() or not sidecar.alive(), 30, 0.05, "the Node agent")
        assert sidecar.alive(), sidecar.log()
        # The example's handler is offered beside the Node example's own.
        assert REVIEW_TYPE in sidecar.log() and "example.node.steps.v1" in sidecar.log()
        yield server, address
    finally:
        sidecar.kill_group()
        server.kill()


def test_the_node_reviewer_reviews_and_resumes_after_a_kill(reviewer: tuple[ServerProcess, str],
                                                           tmp_path: Path) -> None:
    server, address = reviewer
    ledger = tmp_path / "ledger.jsonl"
    payload = {"topic": "t", "research": {"sources": ["a", "b"]}, "code": {"lines": 3},
               "ledger": str(ledger), "crash_at": 2}
    with IntentClient(server.address) as client:
        intent_id = client.send_intent(intent_type=REVIEW_TYPE, to_agent=address, payload=payload)
        final = client.wait_for(intent_id, timeout=60)
        assert final.state is IntentState.COMPLETED, final.error
        assert final.result == {"verdict": "approve", "notes": ["research cites 2 sources", "code has 3 lines"],
                                "reviewer": "node", "topic": "t", "attempt": 2}
        assert [(s.index, s.name) for s in client.steps(intent_id)] == [(1, "read"), (2, "decide")]
        empty = client.send_intent(intent_type=REVIEW_TYPE, to_agent=address, payload={})
        assert client.wait_for(empty, timeout=60).result["verdict"] == "request-changes"
    # Killed during step 2 of attempt 1: step 1 ran once (replayed), step 2 twice.
    assert Counter(e["step"] for e in _ledger(ledger)) == {1: 1, 2: 2}


def _run_example(database_url: str, *extra: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, str(EXAMPLE / "run.py"), "--database-url", database_url, "--json",
                             "--timeout", "120", *extra],
                            capture_output=True, text=True, timeout=220, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    shown: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return shown


def _children(tree: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["to_agent"].rsplit("/", 1)[-1], c["state"]) for c in tree["children"]]


def test_the_example_runs_end_to_end(node: str, database_url: str) -> None:
    shown = _run_example(database_url)
    assert shown["state"] == "COMPLETED", shown
    result = shown["result"]
    assert result["review"]["verdict"] == "approve" and result["review"]["reviewer"] == "node"
    assert result["research"].startswith("3 sources") and result["tests_passed"] is True
    tree = shown["tree"]
    assert tree["id"] == shown["id"] and tree["child_count"] == 3
    # Started in this order: research and coder at positions 1 and 2, the reviewer at 4.
    assert _children(tree) == [("research", "COMPLETED"), ("coder", "COMPLETED"), ("reviewer", "COMPLETED")]
    assert [c["parent_step_index"] for c in tree["children"]] == [1, 2, 4]
    assert [c["id"] for c in tree["children"][:2]] == result["children"]


def test_an_orchestrator_killed_after_its_starts_sends_no_child_twice(node: str, database_url: str,
                                                                      tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    payload = {"crash_after_start": True, "ledger": str(ledger), "coder": {"crash_at": "draft"}}
    shown = _run_example(database_url, "--payload", json.dumps(payload))
    assert shown["state"] == "COMPLETED", shown
    assert shown["result"]["attempt"] >= 2
    assert _children(shown["tree"]) == [("research", "COMPLETED"), ("coder", "COMPLETED"),
                                        ("reviewer", "COMPLETED")]
    # The reviewer's lines (Node) name no agent.
    runs = Counter((e.get("agent", "reviewer"), e["step"]) for e in _ledger(ledger))
    # One research and one coder intent in all: each worker step ran once, except the coder's
    # draft, killed once (its own retry), and nothing of the orchestrator's attempt 1 was sent again.
    assert runs[("research", "search")] == 1 and runs[("research", "summarize")] == 1
    assert runs[("coder", "draft")] == 2 and runs[("coder", "test")] == 1
    assert runs[("orchestrator", "begin")] >= 2 and runs[("orchestrator", "end")] == 1
