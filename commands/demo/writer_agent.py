"""A sample writer agent that streams its answer token by token, the way an
LLM agent does: three steps (outline, draft, polish), each emitting its words
to the intent's default stream as it "generates" them, and a status chunk on
the "status" stream before each step.

Each attempt appends a line to the side-effect ledger (INTENTD_DEMO_LEDGER)
with its pid, and each step's function a "begin" and a "done" line, so the
demo can kill it mid-step and prove which steps ran how often.
"""

from __future__ import annotations

import asyncio
from typing import Any

from intentd.agent import Agent, Context

from .common import write_ledger

ADDRESS = "agent://demo/local/writer"
INTENT_TYPE = "intent.writing.answer.v1"
SECTIONS = (
    ("outline", "Outline: durable agents keep their state in the platform, so a crash costs one step, not the run. "),
    ("draft", "Draft: when the agent is killed in the middle of a step, the control plane redelivers the intent; "
              "the new attempt replays the steps already recorded and runs the interrupted one again, while "
              "every reader of the stream learns which chunks the re-run replaces. "),
    ("polish", "Polish: nothing a reader saw is lost, nothing is shown twice without a marker, and the answer "
               "is the same as if nothing had happened."),
)

agent = Agent(ADDRESS, capacity=1)


def words(text: str) -> list[str]:
    return [w + " " for w in text.split(" ") if w]


@agent.handler(INTENT_TYPE)
async def write(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    seconds = float(payload.get("token_seconds", 0.02))
    write_ledger({"event": "attempt", "attempt": ctx.attempt})
    parts = []
    for index, (name, text) in enumerate(SECTIONS, start=1):
        await ctx.emit({"step": index, "name": name}, stream="status")

        async def generate(index: int = index, name: str = name, text: str = text) -> str:
            write_ledger({"event": "begin", "step": index, "name": name, "attempt": ctx.attempt})
            for token in words(text):
                await ctx.emit(token)
                await asyncio.sleep(seconds)
            write_ledger({"event": "done", "step": index, "name": name, "attempt": ctx.attempt})
            return "".join(words(text))

        parts.append(await ctx.step(name, generate))
    return {"answer": "".join(parts)}


def main() -> None:
    agent.run()


if __name__ == "__main__":
    main()
