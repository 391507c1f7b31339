"""A test agent whose every step leaves a side effect in a PostgreSQL ledger
table (its own transaction), so tests can count what really ran.

Behaviour comes from the intent's payload:
  steps            number of steps (default 5)
  step_seconds     how long each step works (default 0.01)
  crash_at         SIGKILL this process during that step (after its side effect
                   "begin" is written, before the result is recorded) ...
  crash_attempts   ... on these attempts (default [1])
  fail             "retryable" | "nonretryable": raise at step `fail_at`
  fail_at          (default 1)
  hang_at          step that sleeps until cancelled (for cancel/deadline tests)
  diverge_from_attempt  from this attempt on, steps get other names
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import asyncpg

from intentd.agent import Agent, Context, NonRetryableError

ADDRESS = os.environ["TEST_AGENT_ADDRESS"]
LEDGER_URL = os.environ["TEST_LEDGER_URL"]

agent = Agent(ADDRESS, capacity=int(os.environ.get("TEST_AGENT_CAPACITY", "4")))
_pool: asyncpg.Pool | None = None


async def ledger(ctx: Context, step: int, phase: str) -> None:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(LEDGER_URL, min_size=1, max_size=4)
    await _pool.execute(
        "INSERT INTO test_ledger (intent_id, step, attempt, phase, pid) VALUES ($1, $2, $3, $4, $5)",
        ctx.intent_id, step, ctx.attempt, phase, os.getpid(),
    )


@agent.handler(os.environ.get("TEST_AGENT_TYPE", "test.ledger.run.v1"))
async def run(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    steps = int(payload.get("steps", 5))
    seconds = float(payload.get("step_seconds", 0.01))
    diverge = payload.get("diverge_from_attempt")
    total = 0

    for index in range(1, steps + 1):
        name = f"step-{index}"
        if diverge is not None and ctx.attempt >= int(diverge):
            name = f"renamed-{index}"

        async def work(index: int = index) -> int:
            await ledger(ctx, index, "begin")
            if payload.get("crash_at") == index and ctx.attempt in payload.get("crash_attempts", [1]):
                os.kill(os.getpid(), signal.SIGKILL)
            if payload.get("fail") and payload.get("fail_at", 1) == index:
                if payload["fail"] == "nonretryable":
                    raise NonRetryableError("BAD_INPUT", f"step {index} cannot work on this payload")
                raise RuntimeError(f"step {index} failed, try again")
            if payload.get("hang_at") == index:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    await ledger(ctx, index, f"stopped:{ctx.cancel_reason}")
                    raise
            await asyncio.sleep(seconds)
            return index * 10

        total += await ctx.step(name, work)
    return {"total": total, "steps": steps}


if __name__ == "__main__":
    agent.run()
