"""The agent of tests/e2e/test_testing_harness.py: every way of writing a step
(``ctx.step`` with sync and async functions, ``step_fn``, ``step_scope``), in an
async and a sync handler, and a step that fails until its third call.

Payload: ``steps`` (default 4), ``fail_until`` (the ``flaky`` step raises on
attempts before this one).
"""

from __future__ import annotations

from typing import Any

from intentd.agent import Agent, Context, SyncContext

agent = Agent("agent://test/harness/worker")


def double(value: int) -> int:
    return value * 2


async def triple(value: int) -> int:
    return value * 3


@agent.handler("test.harness.async.v1")
async def run_async(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    total = 0
    for index in range(1, int(payload.get("steps", 4)) + 1):
        fn = double if index % 2 else triple
        total += await ctx.step(f"step-{index}", fn, index)
    return {"total": total}


@agent.handler("test.harness.sync.v1")
def run_sync(ctx: SyncContext, payload: dict[str, Any]) -> dict[str, Any]:
    first = ctx.step("plain", double, 1)

    @ctx.step_fn("decorated")
    def decorated(value: int) -> int:
        return value + 10

    second = decorated(first)
    with ctx.step_scope("scoped") as scope:
        if not scope.replayed:
            scope.result = second * 100
    return {"result": scope.result}


@agent.handler("test.harness.flaky.v1")
async def run_flaky(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    def flaky() -> str:
        if ctx.attempt < int(payload["fail_until"]):
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        return "ok"

    before = await ctx.step("before", double, 2)
    outcome = await ctx.step("flaky", flaky)
    return {"before": before, "flaky": outcome}


if __name__ == "__main__":
    agent.run()
