"""The orchestrator of the example: for one intent it asks a research agent
and a coding agent at once, then a reviewer written in Node.js, and returns
what the three said (docs/children.md).

    intentd sidecar --server 127.0.0.1:7300 --address agent://example/local/orchestrator \\
        --exec "python examples/orchestrator/orchestrator.py"

Each child is started at a position of this handler's step sequence, so an
orchestrator that crashes and is redelivered gets the same children back,
never new ones; while it waits for them it holds no lease (WAITING).
"""

from __future__ import annotations

import os
import signal
from typing import Any

# The script's folder is on sys.path (python runs it as a script), so common is found.
from common import (
    CODE_TYPE,
    CODER,
    ORCHESTRATE_TYPE,
    ORCHESTRATOR,
    RESEARCH,
    RESEARCH_TYPE,
    REVIEW_TYPE,
    REVIEWER,
    ledger,
)

from intentd.agent import Agent, ChildFailed, Context

agent = Agent(ORCHESTRATOR)


@agent.handler(ORCHESTRATE_TYPE)
async def orchestrate(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    ledger(payload, agent="orchestrator", step="begin", attempt=ctx.attempt)
    worker_payload = {k: v for k, v in payload.items() if k in ("ledger", "work_s")}
    # Positions 1 and 2: two starts; both children run at once on their own agents.
    research = await ctx.start(RESEARCH, RESEARCH_TYPE, {"topic": payload["topic"], **worker_payload,
                                                         **payload.get("research", {})})
    code = await ctx.start(CODER, CODE_TYPE, {"spec": payload["spec"], **worker_payload,
                                              **payload.get("coder", {})})
    if payload.get("crash_after_start") and ctx.attempt == 1:
        # The starts are recorded: the next attempt gets the same two children.
        os.kill(os.getpid(), signal.SIGKILL)
    # Position 3: one wait for both; parks until both ended, woken once.
    found, written = await ctx.gather(research, code)
    # Positions 4 and 5: start the reviewer, wait for it.
    try:
        review = await ctx.call(REVIEWER, REVIEW_TYPE, {"topic": payload["topic"], "research": found,
                                                        "code": written, **worker_payload,
                                                        **payload.get("reviewer", {})})
    except ChildFailed as exc:
        # The reviewer's failure is an answer too: report it rather than fail the whole operation.
        review = {"verdict": "unreviewed", "why": f"{exc.state}: {exc.code}: {exc.message}"}
    ledger(payload, agent="orchestrator", step="end", attempt=ctx.attempt)
    return {
        "topic": payload["topic"],
        "research": found["summary"],
        "code_lines": written["lines"],
        "tests_passed": written["tests_passed"],
        "review": review,
        "children": [research.id, code.id],
        "attempt": ctx.attempt,
    }


if __name__ == "__main__":
    agent.run()
