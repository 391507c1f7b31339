"""A test agent whose steps return large results, for histories that add up
past any one message: every step writes a "begin" row to the ledger table
(tests/stack.py), returns ``step_bytes`` characters derived from the intent id
and step index, and the handler returns a checksum of every result it got
(run or replayed), so a test can tell that each replayed result is the one
recorded.

Payload: ``steps``, ``step_bytes``, ``crash_after`` (SIGKILL this process on
attempt 1 once that many steps are recorded, before the next one begins).
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

import asyncpg

from intentd.agent import Agent, Context

_pool: asyncpg.Pool | None = None


def step_result(intent_id: str, index: int, size: int) -> str:
    """What step ``index`` returns: ``size`` characters, different for every step."""
    seed = hashlib.sha256(f"{intent_id}:{index}".encode()).hexdigest()
    return (seed * (size // len(seed) + 1))[:size]


async def ledger(ctx: Context, step: int, phase: str) -> None:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(os.environ["TEST_LEDGER_URL"], min_size=1, max_size=2)
    await _pool.execute(
        "INSERT INTO test_ledger (intent_id, step, attempt, phase, pid) VALUES ($1, $2, $3, $4, $5)",
        ctx.intent_id, step, ctx.attempt, phase, os.getpid(),
    )


async def run(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    steps = int(payload["steps"])
    size = int(payload["step_bytes"])
    crash_after = payload.get("crash_after")
    digest = hashlib.sha256()
    for index in range(1, steps + 1):
        if crash_after == index - 1 and ctx.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)

        async def work(index: int = index) -> str:
            await ledger(ctx, index, "begin")
            return step_result(ctx.intent_id, index, size)

        value = await ctx.step(f"step-{index}", work)
        digest.update(value.encode())
    if crash_after == steps and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"steps": steps, "sha256": digest.hexdigest(), "replayed": ctx.replayed_steps}


if __name__ == "__main__":
    agent = Agent(os.environ["TEST_AGENT_ADDRESS"], capacity=1)
    agent.add_handler("test.history.run.v1", run)
    agent.run()
