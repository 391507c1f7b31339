"""A test agent for tests/e2e/test_hardening_sidecar.py, configured by its environment:

  TEST_AGENT_ADDRESS  the address it serves
  TEST_AGENT_TYPES    comma-separated intent types it has handlers for
  TEST_AGENT_NAME     put in every result as "by", so a test sees who ran it
  TEST_ENV_DUMP       a path: the agent writes its os.environ there (JSON) at start

Behaviour comes from the intent's payload:
  sleep        seconds to work before returning
  block_until  a path: work until that file exists
  hang_on      an agent name: that agent works until cancelled (others return at once)
  fail         "nonretryable" | "retryable": raise instead of returning
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from intentd.agent import Agent, Context, NonRetryableError

NAME = os.environ.get("TEST_AGENT_NAME", "agent")
agent = Agent(os.environ["TEST_AGENT_ADDRESS"], capacity=int(os.environ.get("TEST_AGENT_CAPACITY", "1")))


async def run(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    if payload.get("sleep"):
        await asyncio.sleep(float(payload["sleep"]))
    if payload.get("block_until"):
        flag = Path(payload["block_until"])
        while not flag.exists():  # noqa: ASYNC110, ASYNC240 -- the test's signal is a file
            await asyncio.sleep(0.02)
    if payload.get("hang_on") == NAME:
        await asyncio.sleep(3600)
    if payload.get("fail") == "nonretryable":
        raise NonRetryableError("BAD_INPUT", "told to fail")
    if payload.get("fail") == "retryable":
        raise RuntimeError("told to fail, try again")
    return {"by": NAME, "attempt": ctx.attempt}


for intent_type in os.environ["TEST_AGENT_TYPES"].split(","):
    agent.add_handler(intent_type, run)


if __name__ == "__main__":
    dump = os.environ.get("TEST_ENV_DUMP")
    if dump:
        Path(dump + ".tmp").write_text(json.dumps(dict(os.environ)))
        os.replace(dump + ".tmp", dump)
    agent.run()
