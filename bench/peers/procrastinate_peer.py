"""procrastinate: N no-op jobs deferred with batch_defer_async in batches of
500, then one worker (concurrency 10, wait=False: exits when caught up)."""

from __future__ import annotations

import logging
import time
from typing import Any

import procrastinate

from bench.peers._cli import main


async def measure(url: str, n: int, reps: int) -> dict[str, Any]:
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    done = 0

    @app.task(name="noop")
    async def noop() -> None:
        nonlocal done
        done += 1

    seconds = []
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for _ in range(reps):
            began = time.perf_counter()
            for start in range(0, n, 500):
                await noop.batch_defer_async(*({} for _ in range(min(500, n - start))))
            await app.run_worker_async(concurrency=10, wait=False, install_signal_handlers=False)
            seconds.append(time.perf_counter() - began)
    if done != n * reps:
        raise RuntimeError(f"procrastinate ran {done} of {n * reps} jobs")
    return {"jobs": n, "seconds": seconds,
            "settings": "batch_defer_async x500, then run_worker_async(concurrency=10, wait=False)"}


if __name__ == "__main__":
    main(measure)
