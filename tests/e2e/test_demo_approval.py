"""`intentd demo approval` as a user runs it: real control plane, sidecar and
agent processes, a real SIGKILL while the intent waits, the real `intentd
tasks approve`. The demo checks its own story (ledger and control plane) and
exits non-zero when it does not hold; this test holds it to its report."""

from __future__ import annotations

import os
import subprocess
import sys

from intentd.commands.demo.deploy_agent import APPROVAL_TITLE


def test_demo_approval_resumes_at_step_6_after_a_human_approved_with_no_agent_running(databases) -> None:
    url = databases.create()
    done = subprocess.run(
        [sys.executable, "-m", "intentd.commands", "demo", "approval", "--no-color", "--database-url", url,
         "--timeout", "90"],
        capture_output=True, text=True, timeout=180, env={**os.environ},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"WAITING human {APPROVAL_TITLE!r} at step 6" in out
    assert "TASK_DECIDED approve by " in out
    assert "$ intentd tasks list --intent " in out and "$ intentd tasks approve " in out
    for check in (
        "✓ the intent parked WAITING on a human decision at step 6",
        "✓ the agent and its sidecar were SIGKILLed while it waited",
        "✓ with no agent running, the intent stayed WAITING and its task was listed OPEN",
        "✓ `intentd tasks approve` decided it (exit 0), and the decision woke the intent (PENDING)",
        "✓ a new agent took it and the intent COMPLETED",
        "✓ steps 1-5 ran exactly once each, all in the first agent",
        "✓ resumed at step 6: steps 6-10 ran exactly once each, all in the new agent",
        "✓ the decision is in the result: approve by ",
        "✓ and in the events: TASK_CREATED, then TASK_DECIDED approve by ",
        "✓ 2 deliveries, 1 of them parked: attempt 2, parked_attempts 1",
        "✓ 11 records in order",
    ):
        assert check in out, out
    report = out.partition("What happened")[2]
    assert report and "✗" not in report, out
    assert "step executions: 10 for 10 steps" in out
    assert "Approved while no agent ran; resumed at step 6" in out
