"""intentd.testing as a user runs it: a control plane, a real sidecar process
supervising the agent through the runner, a real SIGKILL at a chosen step,
and what ran counted by the runner in the agent's process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from intentd.testing import IntentdEnvironment
from tests.support import ROOT

AGENT = "tests.agents.harness_agent:agent"


@pytest.fixture(scope="session")
def harness_env(admin_url: str) -> Iterator[IntentdEnvironment]:
    with IntentdEnvironment.start(database_url=admin_url) as env:
        yield env


async def released_causes(env: IntentdEnvironment, intent_id: str) -> list[str]:
    async with env.client() as client:
        return [e.message async for e in client.watch(intent_id) if e.type == "RELEASED"]


@pytest.mark.parametrize("k", [1, 3, 4])
async def test_kill_at_step_k_runs_step_k_again_and_replays_the_steps_before(harness_env, k) -> None:
    run = await harness_env.run(AGENT, "test.harness.async.v1", {"steps": 4}, kill_at_step=k)
    assert run.state == "COMPLETED", harness_env.logs()
    assert run.result == {"total": 2 * 1 + 3 * 2 + 2 * 3 + 3 * 4}
    assert run.attempts == 2
    # Attempt 1 ran steps 1..k and died after step k returned; attempt 2
    # replayed 1..k-1 without running them and ran k..4.
    assert [(e.index, e.attempt) for e in run.executions] == (
        [(i, 1) for i in range(1, k + 1)] + [(i, 2) for i in range(k, 5)])
    assert run.steps_run(f"step-{k}") == 2
    assert all(run.steps_run(f"step-{i}") == 1 for i in range(1, 5) if i != k)
    assert run.recorded_steps == ["step-1", "step-2", "step-3", "step-4"]
    assert [s.attempt for s in run.steps] == [1] * (k - 1) + [2] * (5 - k)
    first, second = ({e.pid for e in run.executions if e.attempt == a} for a in (1, 2))
    assert len(first) == len(second) == 1 and first != second  # a new process after the kill
    assert await released_causes(harness_env, run.intent_id) == ["AGENT_DIED"]


async def test_without_a_kill_every_step_runs_once(harness_env) -> None:
    run = await harness_env.run(AGENT, "test.harness.async.v1", {"steps": 3})
    assert (run.state, run.attempts, run.result) == ("COMPLETED", 1, {"total": 2 + 6 + 6})
    assert [(e.name, e.index, e.attempt) for e in run.executions] == [
        ("step-1", 1, 1), ("step-2", 2, 1), ("step-3", 3, 1)]
    assert run.steps_run() == 3 and run.steps_run(attempt=2) == 0
    assert await released_causes(harness_env, run.intent_id) == []


@pytest.mark.parametrize(("k", "again"), [(2, "decorated"), (3, "scoped")])
async def test_sync_handlers_step_fn_and_step_scope_are_tracked_and_killed(harness_env, k, again) -> None:
    run = await harness_env.run(AGENT, "test.harness.sync.v1", kill_at_step=k)
    assert (run.state, run.attempts, run.result) == ("COMPLETED", 2, {"result": 1200}), harness_env.logs()
    names = ["plain", "decorated", "scoped"]
    assert [(e.name, e.attempt) for e in run.executions] == (
        [(n, 1) for n in names[:k]] + [(n, 2) for n in names[k - 1:]])
    assert run.steps_run(again) == 2
    assert run.recorded_steps == names


async def test_a_step_that_raises_counts_as_run_and_keeps_its_number(harness_env) -> None:
    run = await harness_env.run(AGENT, "test.harness.flaky.v1", {"fail_until": 3}, max_attempts=3)
    assert (run.state, run.attempts, run.result) == ("COMPLETED", 3, {"before": 4, "flaky": "ok"})
    assert run.steps_run("before") == 1
    assert [(e.index, e.attempt) for e in run.executions if e.name == "flaky"] == [(2, 1), (2, 2), (2, 3)]
    assert run.recorded_steps == ["before", "flaky"]


async def test_a_kill_at_a_step_past_the_last_never_fires(harness_env) -> None:
    run = await harness_env.run(AGENT, "test.harness.async.v1", {"steps": 2}, kill_at_step=3)
    assert (run.state, run.attempts) == ("COMPLETED", 1)


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5])
async def test_kill_at_step_must_be_a_step_number(harness_env, bad) -> None:
    with pytest.raises(ValueError, match="kill_at_step"):
        await harness_env.run(AGENT, "test.harness.async.v1", kill_at_step=bad)


def test_the_documented_pytest_example_passes_as_a_user_runs_it() -> None:
    """examples/python is what the README tells users to copy: its own
    conftest (the pytest plugin), its agent module, run from its folder."""
    folder = ROOT / "examples" / "python"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."], cwd=folder,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
