"""A three-step pipeline agent: the agent under test in test_pipeline_agent.py.

Run it for real with ``intentd sidecar --address agent://acme/test/pipeline
--exec "python pipeline_agent.py"``.
"""

from __future__ import annotations

from typing import Any

from intentd.agent import Agent, Context

agent = Agent("agent://acme/test/pipeline")


def extract(n: int) -> list[int]:
    return list(range(1, n + 1))


def validate(rows: list[int]) -> list[int]:
    return [row for row in rows if row % 2 == 1]


async def load(rows: list[int]) -> int:
    return sum(rows)


@agent.handler("acme.pipeline.v1")
async def process(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    rows = await ctx.step("extract", extract, payload["n"])
    clean = await ctx.step("validate", validate, rows)
    total = await ctx.step("load", load, clean)
    return {"rows": len(clean), "total": total}


if __name__ == "__main__":  # so that the test harness can import it without starting it
    agent.run()
