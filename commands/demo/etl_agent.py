"""A sample 50-step ETL agent: ten batches of extract, validate, transform,
deduplicate, load.

Every step appends to a side-effect ledger (a JSON-lines file named by
INTENTD_DEMO_LEDGER): a "begin" line when the step's function starts and a
"done" line when it returns. The ledger is how the demo proves which steps
really ran, and how often. The agent has no checkpoint code: resuming is the
platform's job.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from intentd.agent import Agent, Context

from .common import write_ledger

ADDRESS = "agent://demo/local/etl"
INTENT_TYPE = "intent.pipeline.etl.v1"
STAGES = ("extract", "validate", "transform", "deduplicate", "load")

agent = Agent(ADDRESS, capacity=1)


def _work(index: int, name: str, attempt: int, seconds: float, rows: list[int]) -> dict[str, Any]:
    write_ledger({"event": "begin", "step": index, "name": name, "attempt": attempt})
    time.sleep(seconds)
    digest = hashlib.sha256(json.dumps([index, name, rows]).encode()).hexdigest()[:12]
    write_ledger({"event": "done", "step": index, "name": name, "attempt": attempt})
    return {"rows": len(rows), "digest": digest}


@agent.handler(INTENT_TYPE)
async def run_pipeline(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    batches = int(payload.get("batches", 10))
    seconds = float(payload.get("step_seconds", 0.05))
    index = 0
    digests = []
    for batch in range(1, batches + 1):
        rows = list(range(batch * 100, batch * 100 + 20))
        for stage in STAGES:
            index += 1
            name = f"{stage}[batch {batch}]"
            out = await ctx.step(name, _work, index, name, ctx.attempt, seconds, rows)
            digests.append(out["digest"])
    return {"steps": index, "batches": batches, "checksum": hashlib.sha256("".join(digests).encode()).hexdigest()[:16]}


def main() -> None:
    agent.run()


if __name__ == "__main__":
    main()
