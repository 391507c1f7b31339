"""The two Python workers of the orchestrator example: a research agent and
a coding agent. To them a child intent is an intent like any other.

    intentd sidecar --server 127.0.0.1:7300 --address agent://example/local/research \\
        --exec "python examples/orchestrator/workers.py research"
    intentd sidecar --server 127.0.0.1:7300 --address agent://example/local/coder \\
        --exec "python examples/orchestrator/workers.py coder"
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

# The script's folder is on sys.path (python runs it as a script), so common is found.
from common import CODE_TYPE, CODER, RESEARCH, RESEARCH_TYPE, ledger

from intentd.agent import Agent, Context

research = Agent(RESEARCH)
coder = Agent(CODER)


def _crash_here(ctx: Context, payload: dict[str, Any], step: str) -> None:
    """payload["crash_at"] names a step to die in on the first attempt: the
    child is retried per its own attempts while its parent waits, parked."""
    if payload.get("crash_at") == step and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@research.handler(RESEARCH_TYPE)
async def do_research(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    topic = str(payload.get("topic", ""))

    async def search() -> list[str]:
        ledger(payload, agent="research", step="search", attempt=ctx.attempt)
        _crash_here(ctx, payload, "search")
        await asyncio.sleep(float(payload.get("work_s", 0.05)))
        return [f"https://example.org/{topic.replace(' ', '-')}/{n}" for n in range(1, 4)]

    async def summarize(sources: list[str]) -> str:
        ledger(payload, agent="research", step="summarize", attempt=ctx.attempt)
        _crash_here(ctx, payload, "summarize")
        return f"{len(sources)} sources on {topic!r}"

    sources = await ctx.step("search", search)
    summary = await ctx.step("summarize", summarize, sources)
    return {"summary": summary, "sources": sources, "attempt": ctx.attempt}


@coder.handler(CODE_TYPE)
async def write_code(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    spec = str(payload.get("spec", ""))

    async def draft() -> str:
        ledger(payload, agent="coder", step="draft", attempt=ctx.attempt)
        _crash_here(ctx, payload, "draft")
        await asyncio.sleep(float(payload.get("work_s", 0.05)))
        return f"def solution():\n    # {spec}\n    return 42\n"

    async def test(code: str) -> bool:
        ledger(payload, agent="coder", step="test", attempt=ctx.attempt)
        _crash_here(ctx, payload, "test")
        return "return" in code

    code = await ctx.step("draft", draft)
    passed = await ctx.step("test", test, code)
    return {"code": code, "lines": code.count("\n"), "tests_passed": passed, "attempt": ctx.attempt}


AGENTS = {"research": research, "coder": coder}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in AGENTS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(AGENTS)}")
    AGENTS[sys.argv[1]].run()
