"""Tests of pipeline_agent.py with intentd.testing: a real control plane, a
real sidecar supervising the agent in its own process, a real SIGKILL.

Copy this file and conftest.py next to your agent; run ``pytest``.
"""

from __future__ import annotations

import pytest

from intentd.testing import IntentdEnvironment

AGENT = "pipeline_agent:agent"  # module:attribute of your intentd.agent.Agent


@pytest.mark.asyncio
async def test_pipeline_completes(intentd_env: IntentdEnvironment) -> None:
    run = await intentd_env.run(AGENT, "acme.pipeline.v1", {"n": 5})
    assert run.state == "COMPLETED"
    assert run.result == {"rows": 3, "total": 9}
    assert run.attempts == 1
    assert run.recorded_steps == ["extract", "validate", "load"]


@pytest.mark.asyncio
async def test_pipeline_resumes_after_the_agent_is_killed(intentd_env: IntentdEnvironment) -> None:
    # SIGKILL on attempt 1 right after "validate" (step 2) returned, before its
    # result was recorded: the nastiest moment.
    run = await intentd_env.run(AGENT, "acme.pipeline.v1", {"n": 5}, kill_at_step=2)
    assert run.state == "COMPLETED"
    assert run.result == {"rows": 3, "total": 9}
    assert run.attempts == 2
    assert run.steps_run("extract") == 1  # recorded before the kill: replayed on attempt 2, not run again
    assert run.steps_run("validate") == 2  # its result was lost with the process: it runs again
    assert run.steps_run("validate", attempt=2) == 1
    assert run.steps_run("load") == 1
    assert run.recorded_steps == ["extract", "validate", "load"]
