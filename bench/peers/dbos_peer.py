"""DBOS: N workflows of 10 no-op async steps, all started at once in one
process (each step's result is checkpointed in PostgreSQL before the next)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dbos import DBOS, DBOSConfig

from bench.peers._cli import main

STEPS = 10


@DBOS.step()
async def noop_step(i: int) -> int:
    return i


@DBOS.workflow()
async def ten_steps() -> int:
    total = 0
    for i in range(STEPS):
        total += await noop_step(i)
    return total


async def one_pass(n: int) -> float:
    began = time.perf_counter()
    handles = [await DBOS.start_workflow_async(ten_steps) for _ in range(n)]
    results = await asyncio.gather(*(h.get_result() for h in handles))
    ended = time.perf_counter()
    if results != [sum(range(STEPS))] * n:
        raise RuntimeError("DBOS workflows returned wrong results")
    return ended - began


async def measure(url: str, n: int, reps: int) -> dict[str, Any]:
    config: DBOSConfig = {"name": "bench", "system_database_url": url, "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()
    try:
        seconds = [await one_pass(n) for _ in range(reps)]
    finally:
        DBOS.destroy()
    return {"workflows": n, "steps": n * STEPS, "seconds": seconds,
            "settings": f"{n} workflows x {STEPS} async steps started together; default config"}


if __name__ == "__main__":
    main(measure)
