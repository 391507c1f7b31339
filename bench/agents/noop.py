"""The benchmark's agent: no-op work, so what is measured is intentd itself.

Started by a sidecar (``--exec``) or by the bench beside one. Address and
capacity come from ``BENCH_AGENT_ADDRESS`` and ``BENCH_AGENT_CAPACITY``.

Handlers:
  bench.noop.v1     one no-op step, then return
  bench.steps.v1    ``payload["steps"]`` sequential no-op steps; returns each
                    step's wall time in ms (measured around ``ctx.step``)
  bench.latency.v1  returns ``time.time()`` taken when the handler started,
                    after one no-op step
  bench.wait.held.v1, bench.wait.parked.v1
                    ``payload["steps"]`` no-op steps, then waits for the
                    signal "go"; returns ``time.time()`` taken as the wait
                    returned (the types differ only in their hold window)
  bench.wait.timer.v1
                    a durable ``ctx.sleep(payload["seconds"])``
  bench.family.leaf.v1
                    returns at once (no step): the children of the two below
  bench.family.fanout.v1
                    starts ``payload["children"]`` leaf children in one
                    start_many and gathers them
  bench.family.call.v1
                    ``ctx.call`` of one leaf child; returns the call's wall
                    time in ms as the parent's handler saw it
  bench.parallel.v1 ``payload["steps"]`` no-op steps in one attempt, all at
                    once (``asyncio.gather`` of ``ctx.step`` calls) when
                    ``payload["concurrent"]``, else one after another;
                    returns their wall time in ms (measured around them)
  bench.stream.emit.v1
                    one step emitting ``payload["count"]`` text chunks of
                    ``payload["size"]`` bytes as fast as ``ctx.emit`` takes them
  bench.stream.progress.v1
                    the same chunks as ``ctx.progress`` reports (one awaited
                    write and one event each): the baseline of streams
  bench.stream.ping.v1
                    ``payload["count"]`` chunks, each the ``time.time()`` of
                    its emit, ``payload["gap_ms"]`` apart (``progress``: as
                    progress reports instead)
  bench.hang.v1     writes ``<pid> <attempt> <time>`` to
                    ``$BENCH_STATE_DIR/<intent id>.<attempt>`` and then runs a
                    step that sleeps until the process is killed or the
                    attempt is revoked (then it writes ``<pid> <reason>
                    <time>`` to ``<intent id>.<attempt>.stopped``)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from intentd.agent import Agent, ChildCall, Context

agent = Agent(os.environ["BENCH_AGENT_ADDRESS"], capacity=int(os.environ.get("BENCH_AGENT_CAPACITY", "50")))


async def _noop() -> int:
    return 1


@agent.handler("bench.noop.v1")
async def noop(ctx: Context, payload: Any) -> dict[str, Any]:
    await ctx.step("noop", _noop)
    return {"ok": True}


@agent.handler("bench.steps.v1")
async def steps(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    timings: list[float] = []
    clock = time.perf_counter
    for index in range(int(payload.get("steps", 10))):
        began = clock()
        await ctx.step(f"s{index}", _noop)
        timings.append(round((clock() - began) * 1000, 4))
    return {"ms": timings if payload.get("timings") else [], "n": len(timings)}


@agent.handler("bench.parallel.v1")
async def parallel(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    n = int(payload.get("steps", 10))
    began = time.perf_counter()
    if payload.get("concurrent"):
        await asyncio.gather(*(ctx.step(f"s{index}", _noop) for index in range(n)))
    else:
        for index in range(n):
            await ctx.step(f"s{index}", _noop)
    return {"ms": round((time.perf_counter() - began) * 1000, 4)}


def _chunk(i: int, size: int) -> str:
    head = f"{i:08d}"
    return head + "." * max(0, size - len(head))


@agent.handler("bench.stream.emit.v1")
async def stream_emit(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    count, size = int(payload["count"]), int(payload["size"])

    async def emit() -> int:
        for i in range(count):
            await ctx.emit(_chunk(i, size))
        return count

    return {"count": await ctx.step("emit", emit)}


@agent.handler("bench.stream.progress.v1")
async def stream_progress(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    count, size = int(payload["count"]), int(payload["size"])

    async def report() -> int:
        for i in range(count):
            await ctx.progress(_chunk(i, size))
        return count

    return {"count": await ctx.step("report", report)}


@agent.handler("bench.stream.ping.v1")
async def stream_ping(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    gap = float(payload["gap_ms"]) / 1000
    for _ in range(int(payload["count"])):
        if payload.get("progress"):
            await ctx.progress(repr(time.time()))
        else:
            await ctx.emit(repr(time.time()))
        await asyncio.sleep(gap)
    return {"ok": True}


@agent.handler("bench.latency.v1")
async def latency(ctx: Context, payload: Any) -> dict[str, Any]:
    started = time.time()
    await ctx.step("noop", _noop)
    return {"start": started}


@agent.handler("bench.wait.held.v1")
@agent.handler("bench.wait.parked.v1")
async def wait(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    for index in range(int(payload.get("steps", 0))):
        await ctx.step(f"s{index}", _noop)
    await ctx.wait_for_signal("go")
    return {"returned": time.time()}


@agent.handler("bench.wait.timer.v1")
async def timer(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    await ctx.sleep(float(payload.get("seconds", 1.0)))
    return {"returned": time.time()}


@agent.handler("bench.hang.v1")
async def hang(ctx: Context, payload: Any) -> dict[str, Any]:
    async def work() -> int:
        marker = Path(os.environ["BENCH_STATE_DIR"]) / f"{ctx.intent_id}.{ctx.attempt}"
        marker.write_text(f"{os.getpid()} {ctx.attempt} {time.time()}")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped = marker.with_name(f"{marker.name}.stopped")
            stopped.write_text(f"{os.getpid()} {ctx.cancel_reason} {time.time()}")
            raise
        return 1

    await ctx.step("hang", work)
    return {}


@agent.handler("bench.family.leaf.v1")
async def leaf(ctx: Context, payload: Any) -> dict[str, Any]:
    return {"ok": True}


@agent.handler("bench.family.fanout.v1")
async def fanout(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    calls = [ChildCall(agent.name, "bench.family.leaf.v1", {"n": n}) for n in range(int(payload["children"]))]
    handles = await ctx.start_many(calls)
    results = await ctx.gather(*handles)
    return {"n": len(results)}


@agent.handler("bench.family.call.v1")
async def call(ctx: Context, payload: Any) -> dict[str, Any]:
    began = time.time()
    await ctx.call(agent.name, "bench.family.leaf.v1", {})
    return {"ms": (time.time() - began) * 1000}


if __name__ == "__main__":
    agent.run()
