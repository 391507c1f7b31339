"""A test agent that streams: it emits chunks from its handler body and
from steps, and can be SIGKILLed mid-step after a known number of chunks
reached the control plane, so tests can check exactly what a reader sees
across a crash and a redelivery.

Intent types ``<TEST_STREAM_PREFIX>.<role>.v1`` (prefix default ``test.stream``):

  tokens  {"steps": S, "count": N, "stream": name?, "kill_in_step": k?,
           "kill_after": j?, "kill_marks": DIR?, "block_until": PATH?,
           "pace_ms": ms?}
          body: emits {"phase": "start"} (JSON); then S steps "gen<s>", each
          emitting N text chunks "s<s>-t<i>|" (with "block_until", step 1
          waits after its first chunk is flushed until PATH exists); in step
          k of the first attempt that gets there (marker DIR/<id>), after j
          chunks it flushes them (committed: readers may have seen them) and
          SIGKILLs this process. Body at the end: {"phase": "done"}.
          Returns {"steps": S, "attempt": attempt}.
  flood   {"count": N, "size": bytes?}: one step emitting N text chunks of
          about ``size`` bytes (default 20), numbered; returns {"count": N}.
  limits  {"chunks": N, "size": bytes, "oversize": bool?, "flush_every": K?}:
          one step emitting N chunks of ``size`` bytes to stream "a" (a flush
          every K, default 10: one write each), then one chunk to stream
          "b"; a StreamLimitExceeded (at an emit or at the flush) is caught
          and recorded; with "oversize", first tries one chunk over the chunk
          limit. Returns what was refused: {"refused": [...], "b": ok}.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from intentd.agent import Agent, Context, StreamLimitExceeded
from intentd.core.limits import MAX_CHUNK_BYTES

# A default so tests can import the chunk helpers below.
ADDRESS = os.environ.get("TEST_AGENT_ADDRESS", "agent://test/local/streams")
PREFIX = os.environ.get("TEST_STREAM_PREFIX", "test.stream")

agent = Agent(ADDRESS, capacity=int(os.environ.get("TEST_AGENT_CAPACITY", "4")))


def intent_type(role: str) -> str:
    return f"{PREFIX}.{role}.v1"


def token(step: int, i: int) -> str:
    return f"s{step}-t{i}|"


def flood_chunk(i: int, size: int) -> str:
    head = f"{i:07d}:"
    return head + "x" * max(0, size - len(head))


@agent.handler(intent_type("tokens"))
async def tokens(ctx: Context, payload: dict[str, Any]) -> Any:
    stream = payload.get("stream", "default")
    pace = float(payload.get("pace_ms", 0)) / 1000
    await ctx.emit({"phase": "start"}, stream=stream)
    for s in range(1, int(payload["steps"]) + 1):
        async def gen(s: int = s) -> int:
            for i in range(int(payload["count"])):
                await ctx.emit(token(s, i), stream=stream)
                if s == 1 and i == 0 and payload.get("block_until"):
                    await ctx.flush_streams()
                    flag = Path(payload["block_until"])
                    while not flag.exists():  # noqa: ASYNC110, ASYNC240 -- the test's signal is a file
                        await asyncio.sleep(0.02)
                if s == payload.get("kill_in_step") and i + 1 == payload.get("kill_after"):
                    marker = Path(payload["kill_marks"]) / ctx.intent_id
                    if not marker.exists():
                        await ctx.flush_streams()  # committed: a reader may have shown them
                        marker.write_text(str(ctx.attempt))
                        os.kill(os.getpid(), signal.SIGKILL)
                if pace:
                    await asyncio.sleep(pace)
            return s

        await ctx.step(f"gen{s}", gen)
    await ctx.emit({"phase": "done"}, stream=stream)
    return {"steps": int(payload["steps"]), "attempt": ctx.attempt}


@agent.handler(intent_type("flood"))
async def flood(ctx: Context, payload: dict[str, Any]) -> Any:
    count, size = int(payload["count"]), int(payload.get("size", 20))

    async def run() -> int:
        for i in range(count):
            await ctx.emit(flood_chunk(i, size))
        return count

    return {"count": await ctx.step("flood", run)}


@agent.handler(intent_type("limits"))
async def limits(ctx: Context, payload: dict[str, Any]) -> Any:
    refused: list[str] = []

    async def run() -> list[str]:
        if payload.get("oversize"):
            try:
                await ctx.emit("x" * (MAX_CHUNK_BYTES + 1), stream="a")
            except StreamLimitExceeded as exc:
                refused.append(f"oversize:{exc.code}")
        for i in range(int(payload["chunks"])):
            try:
                await ctx.emit(flood_chunk(i, int(payload["size"])), stream="a")
                if (i + 1) % int(payload.get("flush_every", 10)) == 0:
                    await ctx.flush_streams()
            except StreamLimitExceeded as exc:
                refused.append(f"emit:{exc.code}")
        try:
            await ctx.flush_streams()
        except StreamLimitExceeded as exc:
            refused.append(f"flush:{exc.code}")
        return refused

    seen = await ctx.step("fill", run)
    await ctx.emit("after", stream="b")
    await ctx.flush_streams()
    return {"refused": seen}


if __name__ == "__main__":
    agent.run()
