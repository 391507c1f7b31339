"""Scenario 3, step recording cost.

(a) One intent of ``seq_steps`` (1,000) sequential no-op steps: the agent
    times each ``ctx.step`` (perf_counter around the call, so the figure is
    the full agent -> sidecar -> server -> PostgreSQL commit -> back round
    trip) and returns the timings; p50/p99 per intent, one intent per rep.
(b) ``conc_intents`` (200) intents x ``conc_steps`` (10) steps at once on the
    standard cluster (4 sidecars x 50): recorded steps/s over the window
    from the first to the last step record (``intent_steps.record_time``),
    and intents/s from the send to the last completion.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench.harness import fresh_database, percentile, start_cluster
from bench.suite import Run
from intentd.client import AsyncIntentClient, IntentState

ADDRESS = "agent://bench/steps/noop"
TYPE = "bench.steps.v1"
WINDOW = ("SELECT count(*) AS n, extract(epoch FROM max(record_time) - min(record_time))::float8 AS seconds"
          " FROM intent_steps WHERE intent_id = ANY($1::text[])")
LAST = "SELECT extract(epoch FROM max(finish_time))::float8 FROM intents WHERE id = ANY($1::text[])"


async def sequential(client: AsyncIntentClient, steps: int) -> list[float]:
    intent_id = await client.send_intent(intent_type=TYPE, to_agent=ADDRESS,
                                         payload={"steps": steps, "timings": True})
    final = await client.wait_for(intent_id, timeout=600)
    if final.state is not IntentState.COMPLETED:
        raise RuntimeError(f"sequential steps intent ended {final.state.value}: {final.error}")
    timings: list[float] = final.result["ms"]
    return timings


async def concurrent(client: AsyncIntentClient, conn: asyncpg.Connection, intents: int,
                     steps: int) -> tuple[float, float]:
    """Recorded steps/s (first to last step record) and intents/s (first send
    to last completion)."""
    began = time.time()
    ids = await client.send_intents([{"intent_type": TYPE, "to_agent": ADDRESS, "payload": {"steps": steps}}
                                     for _ in range(intents)])
    finals = await asyncio.gather(*(client.wait_for(i, timeout=600) for i in ids))
    bad = [f for f in finals if f.state is not IntentState.COMPLETED]
    if bad:
        raise RuntimeError(f"{len(bad)} concurrent step intents did not complete: {bad[0].error}")
    row = await conn.fetchrow(WINDOW, ids)
    last = await conn.fetchval(LAST, ids)
    return float(row["n"]) / float(row["seconds"]), intents / (float(last) - began)


async def run(run: Run) -> None:
    cfg = run.config
    p50, p99, rates, intent_rates = [], [], [], []
    async with fresh_database("steps") as url:
        cluster = await start_cluster(url, ADDRESS, cfg.e2e_sidecars, cfg.e2e_capacity)
        client = AsyncIntentClient(cluster.server.address)
        conn = await asyncpg.connect(url)
        try:
            await sequential(client, 50)  # warm-up
            await concurrent(client, conn, 20, 5)
            for _ in range(cfg.reps):
                timings = await sequential(client, cfg.seq_steps)
                p50.append(percentile(timings, 50))
                p99.append(percentile(timings, 99))
                steps_rate, intents_rate = await concurrent(client, conn, cfg.conc_intents, cfg.conc_steps)
                rates.append(steps_rate)
                intent_rates.append(intents_rate)
        finally:
            await conn.close()
            await client.close()
            cluster.close()
    n = cfg.seq_steps
    run.figure("steps.seq_p50", f"Step recorded, sequential ({n} steps) p50", "ms/step", p50,
               baseline="limits.pg1_p50", target="<=1")
    run.figure("steps.seq_p99", f"Step recorded, sequential ({n} steps) p99", "ms/step", p99,
               baseline="limits.pg1_p99")
    run.figure("steps.conc_rate", f"Steps recorded/s, {cfg.conc_intents} intents x {cfg.conc_steps} at once",
               "steps/s", rates, baseline="limits.pg8", target=">=4000")
    run.figure("steps.conc_intents_rate", f"Intents/s of {cfg.conc_steps} steps, {cfg.conc_intents} at once",
               "intents/s", intent_rates, baseline="limits.pg8")
