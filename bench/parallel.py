"""Scenario 10, parallel steps: 10 no-op steps in one attempt, all at once
(``asyncio.gather`` of ``ctx.step`` calls) against the same 10 one after
another, in the same run, alternating intent by intent so that both see the
same machine. The agent times the steps inside its handler (perf_counter
around the gather or the loop), so the figure is the steps' own wall time:
each a round trip agent -> sidecar -> control plane -> PostgreSQL commit and
back. Sequential steps pay ten of them one after another; concurrent ones
overlap, and the server's group commit may put them in one transaction
(steps of one intent go to successive groups of it). Medians of ``reps``
runs of ``n`` intents each; the ratio is concurrent over sequential.
"""

from __future__ import annotations

from bench.harness import fresh_database, percentile, start_cluster
from bench.suite import Run
from intentd.client import AsyncIntentClient, IntentState

ADDRESS = "agent://bench/parallel/noop"
TYPE = "bench.parallel.v1"
STEPS = 10


async def one(client: AsyncIntentClient, concurrent: bool) -> float:
    intent_id = await client.send_intent(intent_type=TYPE, to_agent=ADDRESS,
                                         payload={"steps": STEPS, "concurrent": concurrent})
    final = await client.wait_for(intent_id, timeout=60)
    if final.state is not IntentState.COMPLETED or final.attempt != 1:
        raise RuntimeError(f"parallel intent ended {final.state.value} (attempt {final.attempt}): {final.error}")
    return float(final.result["ms"])


async def run(run: Run) -> None:
    cfg = run.config
    n = 10 if cfg.quick else 30
    sequential: list[float] = []
    concurrent: list[float] = []
    async with fresh_database("parallel") as url:
        cluster = await start_cluster(url, ADDRESS, 1, 4)
        client = AsyncIntentClient(cluster.server.address)
        try:
            for flag in (False, True) * 3:  # warm-up
                await one(client, flag)
            for _ in range(cfg.reps):
                seq: list[float] = []
                conc: list[float] = []
                for _ in range(n):
                    seq.append(await one(client, False))
                    conc.append(await one(client, True))
                sequential.append(percentile(seq, 50))
                concurrent.append(percentile(conc, 50))
        finally:
            await client.close()
            cluster.close()
    run.note("parallel", steps=STEPS, intents_per_rep=n)
    run.figure("parallel.sequential_ms", f"{STEPS} sequential no-op steps in one attempt, p50 (n={n})", "ms",
               sequential)
    run.figure("parallel.concurrent_ms", f"{STEPS} concurrent no-op steps in one attempt, p50 (n={n})", "ms",
               concurrent, baseline="parallel.sequential_ms", target="<1x")
