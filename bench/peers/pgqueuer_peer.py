"""pgqueuer: N no-op jobs enqueued in batches of 500, then drained by one
QueueManager (batch_size 10, default settings otherwise)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode

from bench.peers._cli import main


async def one_pass(queries: Queries, url: str, n: int) -> float:
    worker_conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(worker_conn)))
    done = 0

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        nonlocal done
        done += 1

    began = time.perf_counter()
    for start in range(0, n, 500):
        k = min(500, n - start)
        await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
    await qm.run(batch_size=10, mode=QueueExecutionMode.drain, dequeue_timeout=timedelta(seconds=1))
    ended = time.perf_counter()
    await worker_conn.close()
    if done != n:
        raise RuntimeError(f"pgqueuer ran {done} of {n} jobs")
    return ended - began


async def measure(url: str, n: int, reps: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(conn))
    await queries.install()
    seconds = [await one_pass(queries, url, n) for _ in range(reps)]
    await conn.close()
    return {"jobs": n, "seconds": seconds,
            "settings": "enqueue batches of 500, then QueueManager.run(batch_size=10, mode=drain)"}


if __name__ == "__main__":
    main(measure)
