"""A sample 10-step deploy pipeline that asks a human before production.

Steps 1-5 (checkout to staging) each append to the side-effect ledger
(INTENTD_DEMO_LEDGER, as the ETL agent does): a "begin" line when the step's
function starts, a "done" line when it returns, with the pid of the agent
process. Before step 6 the handler asks "Deploy to production?" with
``ctx.ask_human``: the attempt parks, the agent holds nothing while a human
decides, and after the decision a new delivery (to whatever agent is up then)
replays steps 1-5 from their records, gets the decision from the wait's
record, and runs steps 6-10. The agent has no checkpoint or polling code.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from intentd.agent import Agent, Context, HumanDecision

from .common import write_ledger

ADDRESS = "agent://demo/local/deploy"
INTENT_TYPE = "intent.demo.deploy.v1"
STAGES = ("checkout", "build", "unit tests", "package", "deploy to staging",
          "deploy to production", "smoke tests", "shift traffic", "tag release", "notify")
APPROVAL_TITLE = "Deploy to production?"
# The pipeline step the approval gates: the human is asked right before it.
APPROVAL_BEFORE = 6

agent = Agent(ADDRESS, capacity=1)


def _work(index: int, name: str, attempt: int, seconds: float, release: str) -> dict[str, Any]:
    write_ledger({"event": "begin", "step": index, "name": name, "attempt": attempt})
    time.sleep(seconds)
    digest = hashlib.sha256(f"{release}/{index}/{name}".encode()).hexdigest()[:12]
    write_ledger({"event": "done", "step": index, "name": name, "attempt": attempt})
    return {"step": index, "digest": digest}


def decision_dict(decision: HumanDecision) -> dict[str, Any]:
    return {
        "task_id": decision.task_id,
        "outcome": decision.outcome,
        "decided_by": decision.decided_by,
        "comment": decision.comment,
        "decide_time": decision.decide_time.isoformat(),
    }


@agent.handler(INTENT_TYPE)
async def deploy(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    release = str(payload.get("release", "v1.0.0"))
    seconds = float(payload.get("step_seconds", 0.05))
    digests: list[str] = []
    decision: HumanDecision | None = None
    for index, name in enumerate(STAGES, start=1):
        if index == APPROVAL_BEFORE:
            decision = await ctx.ask_human(
                APPROVAL_TITLE,
                description=f"{release} passed {len(digests)} steps and runs on staging. Ship it?",
                outcomes=("approve", "reject"),
            )
            if not decision.approved:
                return {"deployed": False, "release": release, "steps": index - 1,
                        "decision": decision_dict(decision)}
        out = await ctx.step(name, _work, index, name, ctx.attempt, seconds, release)
        digests.append(out["digest"])
    assert decision is not None
    return {"deployed": True, "release": release, "steps": len(STAGES), "decision": decision_dict(decision),
            "checksum": hashlib.sha256("".join(digests).encode()).hexdigest()[:16]}


def main() -> None:
    agent.run()


if __name__ == "__main__":
    main()
