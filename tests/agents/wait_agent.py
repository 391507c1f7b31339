"""A test agent that runs a script of steps and durable waits from its
payload, leaving every side effect in the PostgreSQL ledger (its own
transaction), so tests can count what really ran and what each wait returned.

``payload["script"]`` is a list of operations, numbered from 1 in the ledger:
  {"step": NAME}                            a step: ledger "begin", returns NAME
  {"signal": NAME, "timeout": S?}           ctx.wait_for_signal
  {"sleep": S}                              ctx.sleep
  {"human": TITLE, "assignees": [...]?, "outcomes": [...]?, "timeout": S?}
                                            ctx.ask_human
Every wait writes ledger phase ``returned:<json>`` (the value, or
``{"timed_out": true}``) each time it returns in an attempt.
``payload["kill_after"]``: SIGKILL this process right after operation K
returned, on the attempts in ``payload["kill_attempts"]`` (default [1]).
The result is the list of the operations' values.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import asyncpg

from intentd.agent import Agent, Context, WaitTimedOut

ADDRESS = os.environ["TEST_AGENT_ADDRESS"]
LEDGER_URL = os.environ["TEST_LEDGER_URL"]

agent = Agent(ADDRESS, capacity=int(os.environ.get("TEST_AGENT_CAPACITY", "4")))
_pool: asyncpg.Pool | None = None


async def ledger(ctx: Context, op: int, phase: str) -> None:
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(LEDGER_URL, min_size=1, max_size=4)
    await _pool.execute(
        "INSERT INTO test_ledger (intent_id, step, attempt, phase, pid) VALUES ($1, $2, $3, $4, $5)",
        ctx.intent_id, op, ctx.attempt, phase, os.getpid(),
    )


async def wait(ctx: Context, op: dict[str, Any]) -> Any:
    try:
        if "signal" in op:
            return await ctx.wait_for_signal(op["signal"], timeout=op.get("timeout"))
        if "sleep" in op:
            await ctx.sleep(float(op["sleep"]))
            return "slept"
        decision = await ctx.ask_human(
            op["human"], assignees=op.get("assignees"), outcomes=tuple(op.get("outcomes", ("approve", "reject"))),
            timeout=op.get("timeout"))
        return {"outcome": decision.outcome, "by": decision.decided_by, "comment": decision.comment,
                "task_id": decision.task_id}
    except WaitTimedOut:
        return {"timed_out": True}


@agent.handler(os.environ.get("TEST_AGENT_TYPE", "test.wait.run.v1"))
async def run(ctx: Context, payload: dict[str, Any]) -> list[Any]:
    values: list[Any] = []
    for number, op in enumerate(payload["script"], start=1):
        if "step" in op:
            async def work(number: int = number, name: str = op["step"]) -> str:
                await ledger(ctx, number, "begin")
                return name

            values.append(await ctx.step(op["step"], work))
        else:
            value = await wait(ctx, op)
            await ledger(ctx, number, "returned:" + json.dumps(value, sort_keys=True))
            values.append(value)
        if payload.get("kill_after") == number and ctx.attempt in payload.get("kill_attempts", [1]):
            os.kill(os.getpid(), signal.SIGKILL)
    return values


if __name__ == "__main__":
    agent.run()
